//! weft's CNI plugin.
//!
//! The container runtime executes `weft-cni` once per CNI command. It reads
//! the CNI environment ([`env`]) and the network config on stdin
//! ([`config`]), forwards ADD, DEL, CHECK, STATUS and GC to datapath-svc's
//! `Cni` gRPC service over a node-local unix socket ([`client`]), and prints
//! the result or the spec's error object ([`result`], codes in [`error`]).
//! VERSION it answers itself. A DEL that cannot reach datapath-svc is
//! written to an on-disk queue that datapath-svc replays when it starts;
//! its format, like the error codes, is defined once for both in the
//! `weft-cni-contract` crate.
//!
//! With `otlpEndpoint` in the config, each invocation is a span ([`trace`])
//! that datapath-svc continues, exported before the process exits.
//!
//! Spec versions 1.1.0 and 1.0.0 are spoken, and 0.4.0, 0.3.1 and 0.3.0 are
//! accepted (results in their older format).

pub mod client;
pub mod commands;
pub mod config;
pub mod env;
pub mod error;
pub mod logging;
pub mod result;
pub mod trace;

pub use commands::{Outcome, run};
pub use error::CniError;
pub use weft_cni_contract::del_queue;
