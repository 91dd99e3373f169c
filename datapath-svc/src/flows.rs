//! Flow events: read from the datapath's ring buffer, described with pod
//! names and identities, kept (the last N) and streamed to subscribers.

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::broadcast};
use tokio_util::sync::CancellationToken;
use weft_proto::datapath::v1::{Flow, FlowsRequest};

use crate::{
    agent::Agent,
    lb::Proto,
    maps::{FlowEvent, Reason, addr_from_be, direction, port_from_be, verdict},
};

/// The recent flows and the live feed.
pub struct FlowLog {
    recent: Mutex<VecDeque<Flow>>,
    capacity: usize,
    feed: broadcast::Sender<Flow>,
}

impl FlowLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            recent: Mutex::new(VecDeque::new()),
            capacity,
            // Followers that fall this far behind are told they lagged;
            // every slot is allocated up front, so keep it modest.
            feed: broadcast::channel(512).0,
        }
    }

    pub fn push(&self, flow: Flow) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == self.capacity {
                recent.pop_front();
            }
            recent.push_back(flow.clone());
        }
        let _ = self.feed.send(flow);
    }

    /// The last `last` matching flows (all when 0), oldest first.
    pub fn recent(&self, filter: &FlowsRequest) -> Vec<Flow> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Flow> = recent
            .iter()
            .filter(|f| matches(filter, f))
            .cloned()
            .collect();
        if filter.last > 0 && out.len() > filter.last as usize {
            out.drain(..out.len() - filter.last as usize);
        }
        out
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Flow> {
        self.feed.subscribe()
    }
}

/// Whether a flow passes a request's filters.
pub fn matches(filter: &FlowsRequest, f: &Flow) -> bool {
    let pod_ns = |p: &str| {
        p.split_once('/')
            .map(|(ns, _)| ns.to_string())
            .unwrap_or_default()
    };
    (filter.pod.is_empty() || f.source_pod == filter.pod || f.destination_pod == filter.pod)
        && (filter.namespace.is_empty()
            || pod_ns(&f.source_pod) == filter.namespace
            || pod_ns(&f.destination_pod) == filter.namespace)
        && (filter.verdict.is_empty() || f.verdict == filter.verdict)
        && (filter.identity == 0
            || f.source_identity == filter.identity
            || f.destination_identity == filter.identity)
}

fn verdict_name(v: u8) -> &'static str {
    match v {
        verdict::FORWARDED => "forwarded",
        verdict::DROPPED => "dropped",
        verdict::TRANSLATED => "translated",
        _ => "unknown",
    }
}

/// Turns a raw event into a Flow, naming pods and filling in identities the
/// datapath did not look up.
pub fn describe(agent: &Agent, ev: &FlowEvent) -> Flow {
    let src = addr_from_be(ev.saddr);
    let dst = addr_from_be(ev.daddr);
    let (src_pod, src_id) = agent.who(src);
    let (dst_pod, dst_id) = agent.who(dst);
    let boot_offset = boot_to_unix();
    let proto = Proto::from_number(ev.proto)
        .map(|p| p.to_string())
        .unwrap_or_else(|| ev.proto.to_string());
    Flow {
        time_unix_nanos: ev.timestamp.saturating_add(boot_offset),
        node: agent.node.clone(),
        verdict: verdict_name(ev.verdict).into(),
        reason: Reason::from_number(ev.reason)
            .map(|r| r.label().to_string())
            .unwrap_or_else(|| ev.reason.to_string()),
        direction: match ev.direction {
            direction::INGRESS => "ingress",
            direction::EGRESS => "egress",
            _ => "",
        }
        .into(),
        protocol: proto,
        source: SocketAddrV4::new(src, port_from_be(ev.sport)).to_string(),
        destination: SocketAddrV4::new(dst, port_from_be(ev.dport)).to_string(),
        original_destination: if ev.orig_daddr == 0 {
            String::new()
        } else {
            SocketAddrV4::new(addr_from_be(ev.orig_daddr), port_from_be(ev.orig_dport)).to_string()
        },
        source_pod: src_pod,
        destination_pod: dst_pod,
        source_identity: if ev.src_identity != 0 {
            ev.src_identity
        } else {
            src_id
        },
        destination_identity: if ev.dst_identity != 0 {
            ev.dst_identity
        } else {
            dst_id
        },
    }
}

/// Nanoseconds from boot (the datapath's clock) to the Unix epoch.
fn boot_to_unix() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, a valid local.
    let mono = if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } == 0 {
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        Duration::ZERO
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(mono).as_nanos() as u64
}

/// Reads the ring buffer until shutdown.
pub async fn follow(agent: Arc<Agent>, ring: RingBuf<MapData>, shutdown: CancellationToken) {
    // SAFETY: the ring buffer owns its map's descriptor, which stays open
    // and the same for as long as the RingBuf (owned by the AsyncFd) lives.
    let registered = unsafe { AsyncFd::register(ring) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "flow events unavailable");
            return;
        }
    };
    // The programs wake this reader only when the ring fills up (see
    // flows.h); otherwise it drains on this tick.
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => drain(&agent, fd.get_mut()),
            g = fd.readable_mut() => match g {
                Ok(mut guard) => {
                    drain(&agent, guard.get_inner_mut());
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading flow events");
                    return;
                }
            },
        }
    }
}

/// How long a flow event may wait in the ring before datapath-svc reads it.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Moves every event waiting in the ring into the agent's flow log.
fn drain(agent: &Agent, ring: &mut RingBuf<MapData>) {
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<FlowEvent>() {
            continue;
        }
        // SAFETY: the ring holds `struct flow_event` records written by the
        // programs; the layout test pins FlowEvent to that struct, and
        // read_unaligned copes with any alignment.
        let ev: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        agent.flows.push(describe(agent, &ev));
    }
}

/// Longest-prefix match in the userspace copy of the ipcache.
pub fn lookup_identity(
    ipcache: &std::collections::BTreeMap<ipnet::Ipv4Net, u32>,
    addr: Ipv4Addr,
) -> Option<u32> {
    ipcache
        .iter()
        .filter(|(net, _)| net.contains(&addr))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, id)| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(v: &str, src_pod: &str, dst_pod: &str, id: u32) -> Flow {
        Flow {
            verdict: v.into(),
            source_pod: src_pod.into(),
            destination_pod: dst_pod.into(),
            source_identity: id,
            ..Default::default()
        }
    }

    #[test]
    fn filters_combine() {
        let f = flow("dropped", "team-a/client", "default/web", 300);
        let req = |pod: &str, ns: &str, v: &str, id: u32| FlowsRequest {
            pod: pod.into(),
            namespace: ns.into(),
            verdict: v.into(),
            identity: id,
            ..Default::default()
        };
        assert!(matches(&req("", "", "", 0), &f));
        assert!(matches(&req("default/web", "", "dropped", 0), &f));
        assert!(matches(&req("", "team-a", "", 300), &f));
        assert!(!matches(&req("", "team-b", "", 0), &f));
        assert!(!matches(&req("", "", "forwarded", 0), &f));
        assert!(!matches(&req("", "", "", 301), &f));
    }

    #[test]
    fn the_log_keeps_the_last_n() {
        let log = FlowLog::new(3);
        for i in 0..5 {
            log.push(flow("forwarded", &format!("ns/p{i}"), "", 0));
        }
        let all = log.recent(&FlowsRequest::default());
        assert_eq!(
            all.iter()
                .map(|f| f.source_pod.as_str())
                .collect::<Vec<_>>(),
            vec!["ns/p2", "ns/p3", "ns/p4"]
        );
        let last = log.recent(&FlowsRequest {
            last: 1,
            ..Default::default()
        });
        assert_eq!(last.len(), 1);
    }

    #[test]
    fn identities_come_from_the_longest_prefix() {
        let mut ipcache = std::collections::BTreeMap::new();
        ipcache.insert("172.31.0.0/24".parse().expect("net"), 16777216);
        ipcache.insert("172.31.0.11/32".parse().expect("net"), 1);
        assert_eq!(
            lookup_identity(&ipcache, Ipv4Addr::new(172, 31, 0, 11)),
            Some(1)
        );
        assert_eq!(
            lookup_identity(&ipcache, Ipv4Addr::new(172, 31, 0, 9)),
            Some(16777216)
        );
        assert_eq!(lookup_identity(&ipcache, Ipv4Addr::new(8, 8, 8, 8)), None);
    }
}
