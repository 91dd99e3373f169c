//! weft's side of the Kubernetes API, shared by the services that talk to
//! it: the custom resources that hold the cluster's allocation state
//! ([`crd`]), how a service connects ([`client`]), the one retry policy and
//! what it learns about the API's reachability ([`retry`], [`observe`]), following a
//! store's own objects ([`follow`]), the flags for both ([`config`]), and
//! the few facts about API answers that their optimistic-concurrency loops
//! decide on ([`api`]).
//!
//! The CRD YAML under `deploy/crds/` is generated from the types here
//! (`cargo run -p weft-k8s --bin crdgen -- deploy/crds`); a test fails when
//! the checked-in files and the types disagree.

pub mod access;
pub mod api;
pub mod client;
pub mod config;
pub mod crd;
pub mod follow;
pub mod observe;
pub mod retry;
