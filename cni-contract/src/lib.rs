//! What the CNI plugin and datapath-svc must agree on, defined once: the
//! error codes ([`code`]), the gRPC metadata key that carries one from
//! datapath-svc to the plugin, and the on-disk format of the DEL queue
//! ([`del_queue`]) the plugin writes and datapath-svc replays.

pub mod code;
pub mod del_queue;

/// The gRPC response metadata key in which datapath-svc names the CNI
/// code of a failure (decimal); the plugin prints that code rather than
/// one guessed from the gRPC status.
pub const CODE_METADATA_KEY: &str = "cni-code";
