//! svc-watcher's Prometheus metrics.
//!
//! One [`Metrics`] is created per process and cloned into the state store,
//! the sources and the gRPC service (the metric handles share their values).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use weft_proto::watcher::v1::Kind;

use crate::convert::kind_name;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EventLabels {
    kind: String,
    r#type: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct InvalidLabels {
    kind: String,
    reason: String,
}

/// The handles to every svc-watcher metric.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    objects: Family<KindLabels, Gauge>,
    events: Family<EventLabels, Counter>,
    subscribers: Gauge,
    invalid: Family<InvalidLabels, Counter>,
    revision: Gauge,
    relists: Family<KindLabels, Counter>,
    watch_errors: Family<KindLabels, Counter>,
}

impl Metrics {
    /// Metrics not yet registered anywhere (tests use them as they are).
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates the metrics and registers them in `registry`.
    pub fn registered(registry: &mut Registry) -> Self {
        let m = Self::new();
        registry.register(
            "weft_watcher_objects",
            "Objects currently held, by kind",
            m.objects.clone(),
        );
        registry.register(
            "weft_watcher_events",
            "Delta events produced, by kind and type (upsert, delete)",
            m.events.clone(),
        );
        registry.register(
            "weft_watcher_subscribers",
            "Open Subscribe streams",
            m.subscribers.clone(),
        );
        registry.register(
            "weft_watcher_invalid_objects",
            "Objects or files refused as invalid, by kind and reason",
            m.invalid.clone(),
        );
        registry.register(
            "weft_watcher_revision",
            "The current revision of the state",
            m.revision.clone(),
        );
        registry.register(
            "weft_watcher_relists",
            "Full lists of a kind after the first (the watch could not resume: 410 Gone, or a restart of the watch)",
            m.relists.clone(),
        );
        registry.register(
            "weft_watcher_watch_errors",
            "Errors of the Kubernetes watch, by kind (each is retried with back-off)",
            m.watch_errors.clone(),
        );
        m
    }

    fn kind_labels(kind: Kind) -> KindLabels {
        KindLabels {
            kind: kind_name(kind).to_string(),
        }
    }

    pub(crate) fn relist(&self, kind: Kind) {
        self.relists.get_or_create(&Self::kind_labels(kind)).inc();
    }

    pub(crate) fn watch_error(&self, kind: Kind) {
        self.watch_errors
            .get_or_create(&Self::kind_labels(kind))
            .inc();
    }

    /// Relists of `kind` so far.
    pub fn relists(&self, kind: Kind) -> u64 {
        self.relists.get_or_create(&Self::kind_labels(kind)).get()
    }

    pub(crate) fn set_objects(&self, kind: Kind, count: usize) {
        self.objects
            .get_or_create(&KindLabels {
                kind: kind_name(kind).to_string(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub(crate) fn event(&self, kind: Kind, event_type: &'static str) {
        self.events
            .get_or_create(&EventLabels {
                kind: kind_name(kind).to_string(),
                r#type: event_type.to_string(),
            })
            .inc();
    }

    /// Counts one refused object (`kind` is the Kubernetes kind name, or
    /// `file` for a file that did not parse at all).
    pub fn invalid(&self, kind: &str, reason: &str) {
        self.invalid
            .get_or_create(&InvalidLabels {
                kind: kind.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// How many objects were refused so far with this kind and reason.
    pub fn invalid_count(&self, kind: &str, reason: &str) -> u64 {
        self.invalid
            .get_or_create(&InvalidLabels {
                kind: kind.to_string(),
                reason: reason.to_string(),
            })
            .get()
    }

    pub(crate) fn set_revision(&self, revision: u64) {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    pub(crate) fn subscriber_added(&self) {
        self.subscribers.inc();
    }

    pub(crate) fn subscriber_removed(&self) {
        self.subscribers.dec();
    }

    /// Open Subscribe streams.
    pub fn subscribers(&self) -> i64 {
        self.subscribers.get()
    }
}
