//! datapath-svc's Prometheus metrics. Packet counters are read from the
//! per-CPU eBPF map at scrape time, so they cost nothing between scrapes.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::bpf::Counters;

#[derive(Clone)]
pub struct Metrics {
    /// CNI operations by op and outcome.
    pub cni_ops: Family<Vec<(String, String)>, Counter>,
    pub lb_frontends: Gauge,
    pub lb_syncs: Family<Vec<(String, String)>, Counter>,
    pub lb_sync_seconds: Histogram,
    pub endpoints: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry, counters: Arc<Counters>) -> Self {
        let m = Self {
            cni_ops: Family::default(),
            lb_frontends: Gauge::default(),
            lb_syncs: Family::default(),
            lb_sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            endpoints: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("weft_datapath");
        r.register(
            "cni_operations",
            "CNI operations by op and outcome",
            m.cni_ops.clone(),
        );
        r.register(
            "lb_frontends",
            "Service frontends programmed",
            m.lb_frontends.clone(),
        );
        r.register(
            "lb_syncs",
            "Load-balancer map syncs by scope and outcome",
            m.lb_syncs.clone(),
        );
        r.register(
            "lb_sync_seconds",
            "Time to bring the maps in line after a change",
            m.lb_sync_seconds.clone(),
        );
        r.register(
            "endpoints",
            "Pods attached on this node",
            m.endpoints.clone(),
        );
        r.register_collector(Box::new(PacketCollector { counters }));
        m
    }

    /// Metrics that record into nothing, for tests.
    pub fn unregistered() -> Self {
        Self {
            cni_ops: Family::default(),
            lb_frontends: Gauge::default(),
            lb_syncs: Family::default(),
            lb_sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            endpoints: Gauge::default(),
        }
    }
}

struct PacketCollector {
    counters: Arc<Counters>,
}

impl std::fmt::Debug for PacketCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PacketCollector")
    }
}

impl Collector for PacketCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let values = self.counters.read();
        {
            let mut packets = encoder.encode_descriptor(
                "weft_datapath_packets",
                "Packets seen by the eBPF programs, by outcome",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (reason, v) in &values {
                let labels = [("reason", reason.label())];
                ConstCounter::new(v.packets).encode(packets.encode_family(&labels)?)?;
            }
        }
        let mut bytes = encoder.encode_descriptor(
            "weft_datapath_bytes",
            "Bytes seen by the eBPF programs, by outcome",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, v) in &values {
            let labels = [("reason", reason.label())];
            ConstCounter::new(v.bytes).encode(bytes.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
