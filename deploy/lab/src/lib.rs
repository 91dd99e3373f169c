//! The local lab: a whole weft cluster in network namespaces on one
//! machine, driven through a directory of Kubernetes manifests. The demo and
//! the end-to-end tests both run on it.

pub mod client;
pub mod cluster;
pub mod kube;
pub mod lab;
pub mod manifests;
pub mod net;
pub mod podserver;
pub mod procs;

pub use lab::{Lab, LabConfig, OwnedLab};
