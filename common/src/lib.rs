//! What every weft service shares.
//!
//! A service's `main.rs` parses its flags (with [`config::CommonArgs`]
//! flattened in), calls [`telemetry::init`], takes a [`shutdown::Shutdown`]
//! and serves its API through [`grpc::GrpcServer`] and its metrics through
//! [`metrics::serve`]. Everything else here is a building block those pieces
//! and the services reuse.

pub mod backoff;
pub mod client;
pub mod config;
pub mod grpc;
pub mod labels;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod readiness;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod watch;
