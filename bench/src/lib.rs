//! weft's benchmarks: the datapath against kube-proxy's iptables and
//! nftables modes and the no-translation floor, control-plane latency, CNI
//! latency and memory. `bench/run.sh` runs them all; see `bench/README.md`.

pub mod cni;
pub mod control;
pub mod datapath;
pub mod load;
pub mod report;
pub mod rules;
pub mod services;
pub mod stats;
pub mod topo;
pub mod weft;
