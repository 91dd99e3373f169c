//! Test support. The fake svc-watcher and the process helpers are shared
//! with ipam-svc and live there, in `ipam-svc/tests/common/`.

#![allow(dead_code, unreachable_pub)]

#[path = "../../../ipam-svc/tests/common/fake_watcher.rs"]
pub mod fake_watcher;
#[path = "../../../ipam-svc/tests/common/process.rs"]
pub mod process;
