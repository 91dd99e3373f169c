//! weft's gRPC contracts.
//!
//! The `.proto` files under `weft/` are the contract; this crate only
//! generates code from them. Each service lives in its own versioned package.

#![allow(unreachable_pub, clippy::all)]

/// The encoded descriptors of every weft package, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("weft_descriptor");

pub mod watcher {
    pub mod v1 {
        tonic::include_proto!("weft.watcher.v1");
    }
}

pub mod ipam {
    pub mod v1 {
        tonic::include_proto!("weft.ipam.v1");
    }
}

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("weft.identity.v1");
    }
}

pub mod datapath {
    pub mod v1 {
        tonic::include_proto!("weft.datapath.v1");
    }
}
