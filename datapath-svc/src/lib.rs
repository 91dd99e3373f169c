//! datapath-svc: weft's agent on every node.

pub mod bpf;
pub mod lb;
pub mod maps;
pub mod sync;
