//! weft's CNI plugin.
//!
//! The container runtime executes `weft-cni` once per CNI command. It reads
//! the CNI environment ([`env`]) and the network config on stdin
//! ([`config`]), forwards ADD, DEL, CHECK, STATUS and GC to datapath-svc's
//! `Cni` gRPC service over a node-local unix socket ([`client`]), and prints
//! the result or the spec's error object ([`result`], codes in [`error`]).
//! VERSION it answers itself. A DEL that cannot reach datapath-svc is
//! written to an on-disk queue ([`del_queue`]) that datapath-svc replays
//! when it starts; that module is public so datapath-svc can read it.
//!
//! With `otlpEndpoint` in the config, each invocation is a span ([`trace`])
//! that datapath-svc continues, exported before the process exits.
//!
//! Spec versions 1.1.0 and 1.0.0 are spoken, and 0.4.0, 0.3.1 and 0.3.0 are
//! accepted (results in their older format).

pub mod client;
pub mod commands;
pub mod config;
pub mod del_queue;
pub mod env;
pub mod error;
pub mod logging;
pub mod result;
pub mod trace;

pub use commands::{Outcome, run};
pub use error::CniError;
