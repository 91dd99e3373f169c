//! Follows the cluster's Nodes through svc-watcher and reconciles the
//! allocations with them.
//!
//! Nothing is decided before the mirror holds a complete state: a node
//! missing from a half-received snapshot must not lose its CIDR. Events that
//! arrive together are applied together, so a burst of new nodes costs one
//! disk flush, not one per node.

use std::{collections::BTreeMap, sync::Arc};

use futures::{FutureExt as _, Stream, StreamExt as _};
use ipnet::Ipv4Net;
use tokio_util::sync::CancellationToken;
use weft_common::{
    backoff,
    watch::{Applied, Mirror},
};
use weft_proto::watcher::v1::{Kind, Node, WatchEvent, resource, watch_event::Event};

use crate::{allocator::Want, config::Mode, state::Ipam, store::CidrStore};

/// The most events applied before reconciling, so a long burst still makes
/// progress visible.
const MAX_BATCH: usize = 1024;

/// Runs until `events` ends or `shutdown` fires. A reconcile the store
/// refused (an API outage) is tried again after a back-off, or with the
/// next event, whichever comes first.
pub async fn follow<S: CidrStore>(
    ipam: Arc<Ipam<S>>,
    events: impl Stream<Item = WatchEvent> + Send,
    shutdown: CancellationToken,
) {
    let mut events = std::pin::pin!(events);
    let mut mirror = Mirror::new();
    let mut dirty = false;
    let mut backoff = backoff::store_retry();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => Some(e),
            _ = backoff::sleep_until(retry_at), if retry_at.is_some() => None,
        };
        if let Some(first) = next {
            let Some(first) = first else { return };
            dirty |= apply(&mut mirror, &first);
            let mut batched = 1;
            while batched < MAX_BATCH {
                match events.next().now_or_never() {
                    Some(Some(event)) => {
                        dirty |= apply(&mut mirror, &event);
                        batched += 1;
                    }
                    _ => break,
                }
            }
        }
        if dirty && mirror.is_synced() {
            match ipam.reconcile(&wants(&mirror, ipam.mode())).await {
                Ok(()) => {
                    dirty = false;
                    backoff.reset();
                    retry_at = None;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "allocations not written; trying again");
                    retry_at = Some(tokio::time::Instant::now() + delay);
                }
            }
        }
    }
}

/// Applies one event; true when the nodes may have changed. Every SYNCED
/// counts, even one that changed nothing: after a restart it is the moment
/// nodes that disappeared while the service was down are known to be gone.
fn apply(mirror: &mut Mirror, event: &WatchEvent) -> bool {
    let changed = matches!(mirror.apply(event), Applied::Changed(_));
    changed || matches!(event.event, Some(Event::Synced(_)))
}

/// What every node in the mirror should hold.
pub fn wants(mirror: &Mirror, mode: Mode) -> BTreeMap<String, Want> {
    mirror
        .of_kind(Kind::Node)
        .filter_map(|(key, resource)| {
            let node = match &resource.kind {
                Some(resource::Kind::Node(n)) => n,
                _ => return None,
            };
            let want = match mode {
                Mode::ClusterPool => Want::AnyBlock,
                Mode::Kubernetes => Want::Exactly(spec_cidr(&key.name, node)),
            };
            Some((key.name.clone(), want))
        })
        .collect()
}

/// The first IPv4 entry of `spec.podCIDRs`.
fn spec_cidr(name: &str, node: &Node) -> Option<Ipv4Net> {
    node.pod_cidrs.iter().find_map(|c| match c.parse::<Ipv4Net>() {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            if !c.contains(':') {
                tracing::warn!(node = %name, cidr = %c, "ignoring unparsable spec.podCIDRs entry");
            }
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::watcher::v1::{ObjectMeta, Resource, Synced};

    fn node(name: &str, cidrs: &[&str]) -> Resource {
        Resource {
            kind: Some(resource::Kind::Node(Node {
                meta: Some(ObjectMeta {
                    name: name.into(),
                    ..Default::default()
                }),
                pod_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
                addresses: Vec::new(),
            })),
        }
    }

    #[test]
    fn kubernetes_mode_takes_the_first_ipv4_pod_cidr() {
        let mut m = Mirror::new();
        for r in [
            node("a", &["fd00::/64", "10.1.2.0/24"]),
            node("b", &[]),
            node("c", &["bogus"]),
        ] {
            m.apply(&WatchEvent {
                epoch: "e".into(),
                revision: 1,
                event: Some(Event::Upsert(r)),
            });
        }
        m.apply(&WatchEvent {
            epoch: "e".into(),
            revision: 1,
            event: Some(Event::Synced(Synced {})),
        });
        let w = wants(&m, Mode::Kubernetes);
        assert_eq!(
            w.get("a"),
            Some(&Want::Exactly(Some("10.1.2.0/24".parse().expect("cidr"))))
        );
        assert_eq!(w.get("b"), Some(&Want::Exactly(None)));
        assert_eq!(w.get("c"), Some(&Want::Exactly(None)));
        assert_eq!(wants(&m, Mode::ClusterPool).len(), 3);
    }
}
