//! The service's Prometheus metrics.

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Default)]
pub struct Metrics {
    pub identities: Gauge,
    pub allocations: Counter,
    pub gc_collected: Counter,
    pub exhausted: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them (counters get their `_total`
    /// suffix from the registry).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "weft_identity_identities",
            "Allocated identities (the reserved ones not counted)",
            m.identities.clone(),
        );
        registry.register(
            "weft_identity_allocations",
            "Identities created for new label sets",
            m.allocations.clone(),
        );
        registry.register(
            "weft_identity_gc_collected",
            "Identities collected after their grace period without references",
            m.gc_collected.clone(),
        );
        registry.register(
            "weft_identity_exhausted",
            "Allocations refused because every number is in use",
            m.exhausted.clone(),
        );
        m
    }
}
