//! Test support for the integration tests; `fake_watcher` and `process` are
//! also used by identity-svc's tests, which include them by path.

#![allow(dead_code, unreachable_pub)]

pub mod fake_watcher;
pub mod process;
