//! The service's Prometheus metrics.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::allocator::PoolUsage;

type PoolLabels = Vec<(String, String)>;

#[derive(Clone, Default)]
pub struct Metrics {
    cidrs_total: Family<PoolLabels, Gauge>,
    cidrs_used: Family<PoolLabels, Gauge>,
    pub pool_exhausted: Counter,
    pub allocations: Counter,
    pub releases: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them (counters get their `_total`
    /// suffix from the registry).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "weft_ipam_cidrs_total",
            "Blocks each pool holds",
            m.cidrs_total.clone(),
        );
        registry.register(
            "weft_ipam_cidrs_used",
            "Blocks of each pool given to nodes",
            m.cidrs_used.clone(),
        );
        registry.register(
            "weft_ipam_pool_exhausted",
            "Nodes that found every pool full",
            m.pool_exhausted.clone(),
        );
        registry.register(
            "weft_ipam_allocations",
            "CIDRs given to nodes",
            m.allocations.clone(),
        );
        registry.register(
            "weft_ipam_releases",
            "CIDRs freed because their node is gone",
            m.releases.clone(),
        );
        m
    }

    pub fn set_usage(&self, usage: &[PoolUsage]) {
        for u in usage {
            let labels = vec![("pool".to_string(), u.pool.to_string())];
            self.cidrs_total
                .get_or_create(&labels)
                .set(i64::try_from(u.total).unwrap_or(i64::MAX));
            self.cidrs_used
                .get_or_create(&labels)
                .set(i64::try_from(u.used).unwrap_or(i64::MAX));
        }
    }
}
