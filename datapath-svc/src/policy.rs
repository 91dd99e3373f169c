//! Kubernetes NetworkPolicy, compiled to per-endpoint allow entries keyed by
//! security identity.
//!
//! Peers are matched against identities (their labels carry the pod's
//! namespace and the namespace's labels), not against pods, so a policy
//! covers pods on every node and pods that do not exist yet. `ipBlock` peers
//! become CIDR identities in a prefix map of their own; the datapath looks
//! up the longest prefix, so an `except` is simply a more specific prefix
//! whose identity the rule does not allow. A peer passes by its pod (or
//! node) identity or by its CIDR identity, so an ipBlock covers every
//! address in it, pods' too, as Kubernetes defines it. Pure functions:
//! `sync` applies the result to the maps.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use weft_common::labels::{
    NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, label_selector_matches, reserved,
};
use weft_proto::watcher::v1::{LabelSelector, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyRule};

use crate::{
    lb::Proto,
    maps::{EndpointPolicy, PolicyKey, direction, endpoint_flags, policy_prefix},
};

/// CIDR identities are node-local and start here, above every cluster
/// identity (which fit 16 bits).
pub const CIDR_IDENTITY_BASE: u32 = 1 << 24;

/// Container ports: (name, protocol, number).
pub type NamedPorts = Vec<(String, Proto, u16)>;

/// A pod on this node, as policy sees it.
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    /// The pod's host veth ifindex: what the datapath keys policy by.
    pub ep_id: u32,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub identity: u32,
    /// Container ports, for named ports.
    pub ports: NamedPorts,
}

/// A security identity and its labels.
#[derive(Debug, Clone)]
pub struct IdentityView {
    pub id: u32,
    pub labels: BTreeMap<String, String>,
}

pub struct PolicyInputs<'a> {
    pub policies: &'a [NetworkPolicy],
    pub identities: &'a [IdentityView],
    pub endpoints: &'a [LocalEndpoint],
    /// Every pod of the cluster with a known identity: (identity, ports),
    /// to resolve named ports of egress rules.
    pub pods: &'a [(u32, NamedPorts)],
}

/// What the policy maps should hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DesiredPolicy {
    /// Endpoints isolated in at least one direction.
    pub endpoints: BTreeMap<u32, EndpointPolicy>,
    /// (prefix length, key) of every allow entry.
    pub entries: BTreeSet<(u32, PolicyKey)>,
    /// CIDR identities of ipBlock rules, for the ipcache.
    pub cidrs: BTreeMap<Ipv4Net, u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PortSpec {
    Any,
    AllOf(Proto),
    Range(Proto, u16, u16),
}

fn ns_of(policy: &NetworkPolicy) -> &str {
    policy
        .meta
        .as_ref()
        .map(|m| m.namespace.as_str())
        .unwrap_or_default()
}

/// Whether `policy` selects a pod in `namespace` with `labels`.
fn selects(policy: &NetworkPolicy, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    ns_of(policy) == namespace
        && policy
            .pod_selector
            .as_ref()
            .is_none_or(|sel| label_selector_matches(sel, |k| labels.get(k).map(String::as_str)))
}

/// Whether an identity matches a peer's pod and namespace selectors, for a
/// policy in `policy_ns`.
fn identity_matches(peer: &NetworkPolicyPeer, policy_ns: &str, id: &IdentityView) -> bool {
    let Some(ns) = id.labels.get(NAMESPACE_LABEL) else {
        return false;
    };
    let ns_ok = match &peer.namespace_selector {
        None => ns == policy_ns,
        Some(sel) => label_selector_matches(sel, |k| {
            if k == "kubernetes.io/metadata.name" {
                return Some(ns.as_str());
            }
            id.labels
                .get(&format!("{NAMESPACE_LABELS_PREFIX}{k}"))
                .map(String::as_str)
        }),
    };
    let pod_ok = peer
        .pod_selector
        .as_ref()
        .is_none_or(|sel: &LabelSelector| {
            label_selector_matches(sel, |k| {
                id.labels.get(&format!("k8s:{k}")).map(String::as_str)
            })
        });
    ns_ok && pod_ok
}

/// The identities a rule's peers allow; `None` means any peer.
fn peer_identities(
    rule: &NetworkPolicyRule,
    policy_ns: &str,
    identities: &[IdentityView],
    cidrs: &BTreeMap<Ipv4Net, u32>,
) -> Option<BTreeSet<u32>> {
    if rule.peers.is_empty() {
        return None;
    }
    let mut out = BTreeSet::new();
    for peer in &rule.peers {
        if let Some(block) = peer.ip_block.as_ref().filter(|b| !b.cidr.is_empty()) {
            let Ok(net) = block.cidr.parse::<Ipv4Net>() else {
                continue;
            };
            let except: Vec<Ipv4Net> = block.except.iter().filter_map(|e| e.parse().ok()).collect();
            out.extend(
                cidrs
                    .iter()
                    .filter(|(c, _)| net.contains(*c) && !except.iter().any(|e| e.contains(*c)))
                    .map(|(_, id)| *id),
            );
            // Addresses no prefix map entry holds at all are `world`.
            if net.prefix_len() == 0 && except.is_empty() {
                out.insert(reserved::WORLD);
            }
            continue;
        }
        if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
            continue;
        }
        out.extend(
            identities
                .iter()
                .filter(|id| identity_matches(peer, policy_ns, id))
                .map(|id| id.id),
        );
    }
    Some(out)
}

fn rule_ports(rule: &NetworkPolicyRule, named: impl Fn(&str, Proto) -> Vec<u16>) -> Vec<PortSpec> {
    if rule.ports.is_empty() {
        return vec![PortSpec::Any];
    }
    let mut out = Vec::new();
    for p in &rule.ports {
        let Some(proto) = Proto::from_proto(p.protocol()) else {
            continue;
        };
        if p.port.is_empty() {
            out.push(PortSpec::AllOf(proto));
        } else if let Ok(n) = p.port.parse::<u16>() {
            let end = u16::try_from(p.end_port)
                .ok()
                .filter(|e| *e >= n)
                .unwrap_or(n);
            out.push(PortSpec::Range(proto, n, end));
        } else {
            out.extend(
                named(&p.port, proto)
                    .into_iter()
                    .map(|n| PortSpec::Range(proto, n, n)),
            );
        }
    }
    out
}

/// A port range as aligned power-of-two blocks: (first port, prefix bits).
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let mut start = u32::from(lo);
    let end = u32::from(hi);
    while start <= end {
        // The largest block that starts at `start` and fits before `end`.
        let mut size = if start == 0 {
            1 << 16
        } else {
            1u32 << start.trailing_zeros().min(16)
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        out.push((start as u16, 16 - size.trailing_zeros()));
        start += size;
    }
    out
}

fn entries_for(
    ep_id: u32,
    dir: u8,
    identity: u32,
    port: PortSpec,
    out: &mut BTreeSet<(u32, PolicyKey)>,
) {
    let key = |proto: u8, dport: u16| PolicyKey {
        ep_id,
        identity,
        direction: dir,
        proto,
        dport: dport.to_be(),
    };
    match port {
        PortSpec::Any => {
            out.insert((policy_prefix::ANY_PROTO, key(0, 0)));
        }
        PortSpec::AllOf(proto) => {
            out.insert((policy_prefix::ANY_PORT, key(proto.number(), 0)));
        }
        PortSpec::Range(proto, lo, hi) => {
            for (start, bits) in port_blocks(lo, hi) {
                out.insert((policy_prefix::ANY_PORT + bits, key(proto.number(), start)));
            }
        }
    }
}

/// Compiles the policies for this node's endpoints.
pub fn compute(inputs: &PolicyInputs<'_>) -> DesiredPolicy {
    let mut desired = DesiredPolicy::default();
    // CIDR identities, numbered in address order so they are stable.
    let mut all_cidrs: BTreeSet<Ipv4Net> = BTreeSet::new();
    for p in inputs.policies {
        for rule in p.ingress.iter().chain(&p.egress) {
            for peer in &rule.peers {
                if let Some(b) = &peer.ip_block {
                    all_cidrs.extend(b.cidr.parse::<Ipv4Net>().ok());
                    all_cidrs.extend(b.except.iter().filter_map(|e| e.parse::<Ipv4Net>().ok()));
                }
            }
        }
    }
    desired.cidrs = all_cidrs
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.trunc(), CIDR_IDENTITY_BASE + i as u32))
        .collect();

    for ep in inputs.endpoints {
        let selecting: Vec<&NetworkPolicy> = inputs
            .policies
            .iter()
            .filter(|p| selects(p, &ep.namespace, &ep.labels))
            .collect();
        let mut flags = 0;
        for p in &selecting {
            let ns = ns_of(p);
            let types = |t: &str| p.policy_types.iter().any(|x| x == t);
            if types("Ingress") {
                flags |= endpoint_flags::INGRESS_ENFORCED;
                for rule in &p.ingress {
                    let peers = peer_identities(rule, ns, inputs.identities, &desired.cidrs);
                    let ports = rule_ports(rule, |name, proto| {
                        ep.ports
                            .iter()
                            .filter(|(n, p, _)| n == name && *p == proto)
                            .map(|(_, _, n)| *n)
                            .collect()
                    });
                    add(
                        ep.ep_id,
                        direction::INGRESS,
                        peers,
                        &ports,
                        &mut desired.entries,
                    );
                }
            }
            if types("Egress") {
                flags |= endpoint_flags::EGRESS_ENFORCED;
                for rule in &p.egress {
                    let peers = peer_identities(rule, ns, inputs.identities, &desired.cidrs);
                    let ports = rule_ports(rule, |name, proto| {
                        let mut found: Vec<u16> = inputs
                            .pods
                            .iter()
                            .filter(|(id, _)| peers.as_ref().is_none_or(|p| p.contains(id)))
                            .flat_map(|(_, ports)| ports.iter())
                            .filter(|(n, p, _)| n == name && *p == proto)
                            .map(|(_, _, n)| *n)
                            .collect();
                        found.sort();
                        found.dedup();
                        found
                    });
                    add(
                        ep.ep_id,
                        direction::EGRESS,
                        peers,
                        &ports,
                        &mut desired.entries,
                    );
                }
            }
        }
        if flags != 0 {
            desired.endpoints.insert(
                ep.ep_id,
                EndpointPolicy {
                    flags,
                    identity: ep.identity,
                },
            );
        }
    }
    desired
}

fn add(
    ep_id: u32,
    dir: u8,
    peers: Option<BTreeSet<u32>>,
    ports: &[PortSpec],
    out: &mut BTreeSet<(u32, PolicyKey)>,
) {
    let identities: Vec<u32> = match peers {
        None => vec![0],
        Some(set) => set.into_iter().collect(),
    };
    for id in identities {
        for port in ports {
            entries_for(ep_id, dir, id, *port, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_common::labels::security_labels;
    use weft_proto::watcher::v1::{IpBlock, NetworkPolicyPort, ObjectMeta, Protocol};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn identity(
        id: u32,
        ns: &str,
        pod: &[(&str, &str)],
        ns_labels: &[(&str, &str)],
    ) -> IdentityView {
        IdentityView {
            id,
            labels: security_labels(ns, &labels(pod), &labels(ns_labels)),
        }
    }

    fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(pairs),
            match_expressions: vec![],
        }
    }

    fn policy(
        ns: &str,
        pod: &[(&str, &str)],
        types: &[&str],
        ingress: Vec<NetworkPolicyRule>,
        egress: Vec<NetworkPolicyRule>,
    ) -> NetworkPolicy {
        NetworkPolicy {
            meta: Some(ObjectMeta {
                namespace: ns.into(),
                name: "p".into(),
                ..Default::default()
            }),
            pod_selector: Some(selector(pod)),
            policy_types: types.iter().map(|t| t.to_string()).collect(),
            ingress,
            egress,
        }
    }

    fn endpoint(ep_id: u32, ns: &str, pod: &[(&str, &str)]) -> LocalEndpoint {
        LocalEndpoint {
            ep_id,
            namespace: ns.into(),
            labels: labels(pod),
            identity: 300,
            ports: vec![("http".into(), Proto::Tcp, 8080)],
        }
    }

    fn tcp(port: &str, end: u32) -> NetworkPolicyPort {
        NetworkPolicyPort {
            protocol: Protocol::Tcp as i32,
            port: port.into(),
            end_port: end,
        }
    }

    #[test]
    fn port_ranges_become_aligned_blocks() {
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(port_blocks(8000, 8007), vec![(8000, 13)]);
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        let blocks = port_blocks(1000, 2000);
        let covered: u32 = blocks.iter().map(|(_, bits)| 1u32 << (16 - bits)).sum();
        assert_eq!(covered, 1001);
        for (start, bits) in blocks {
            assert_eq!(u32::from(start) % (1 << (16 - bits)), 0, "aligned");
        }
    }

    #[test]
    fn a_pod_without_policy_is_not_isolated_and_default_deny_isolates() {
        let eps = [endpoint(7, "default", &[("app", "web")])];
        let none = compute(&PolicyInputs {
            policies: &[],
            identities: &[],
            endpoints: &eps,
            pods: &[],
        });
        assert!(none.endpoints.is_empty() && none.entries.is_empty());
        let deny = [policy("default", &[], &["Ingress"], vec![], vec![])];
        let d = compute(&PolicyInputs {
            policies: &deny,
            identities: &[],
            endpoints: &eps,
            pods: &[],
        });
        assert_eq!(d.endpoints[&7].flags, endpoint_flags::INGRESS_ENFORCED);
        assert!(d.entries.is_empty(), "nothing is allowed in");
    }

    #[test]
    fn namespace_selectors_allow_the_namespaces_identities_only() {
        let ids = [
            identity(300, "team-a", &[("app", "client")], &[("team", "a")]),
            identity(301, "team-b", &[("app", "client")], &[("team", "b")]),
            identity(302, "default", &[("app", "web")], &[]),
        ];
        let rule = NetworkPolicyRule {
            peers: vec![NetworkPolicyPeer {
                namespace_selector: Some(selector(&[("team", "a")])),
                ..Default::default()
            }],
            ports: vec![tcp("http", 0)],
        };
        let pols = [policy(
            "default",
            &[("app", "web")],
            &["Ingress"],
            vec![rule],
            vec![],
        )];
        let eps = [endpoint(7, "default", &[("app", "web")])];
        let d = compute(&PolicyInputs {
            policies: &pols,
            identities: &ids,
            endpoints: &eps,
            pods: &[],
        });
        let keys: Vec<_> = d
            .entries
            .iter()
            .map(|(len, k)| (*len, k.identity, u16::from_be(k.dport)))
            .collect();
        assert_eq!(
            keys,
            vec![(96, 300, 8080)],
            "named port resolved, team-a only"
        );
    }

    #[test]
    fn ip_blocks_allow_their_prefixes_but_not_the_exceptions() {
        let rule = NetworkPolicyRule {
            peers: vec![NetworkPolicyPeer {
                ip_block: Some(IpBlock {
                    cidr: "172.31.0.0/24".into(),
                    except: vec!["172.31.0.200/32".into()],
                }),
                ..Default::default()
            }],
            ports: vec![],
        };
        let pols = [policy("default", &[], &["Egress"], vec![], vec![rule])];
        let eps = [endpoint(7, "default", &[])];
        let d = compute(&PolicyInputs {
            policies: &pols,
            identities: &[],
            endpoints: &eps,
            pods: &[],
        });
        let block = d.cidrs[&"172.31.0.0/24".parse().expect("cidr")];
        let except = d.cidrs[&"172.31.0.200/32".parse().expect("cidr")];
        let allowed: BTreeSet<u32> = d.entries.iter().map(|(_, k)| k.identity).collect();
        assert!(allowed.contains(&block) && !allowed.contains(&except));
        assert_eq!(d.endpoints[&7].flags, endpoint_flags::EGRESS_ENFORCED);
    }

    #[test]
    fn empty_peers_and_ports_allow_everything_in_that_direction() {
        let pols = [policy(
            "default",
            &[],
            &["Ingress"],
            vec![NetworkPolicyRule::default()],
            vec![],
        )];
        let eps = [endpoint(7, "default", &[])];
        let d = compute(&PolicyInputs {
            policies: &pols,
            identities: &[],
            endpoints: &eps,
            pods: &[],
        });
        assert_eq!(
            d.entries
                .iter()
                .map(|(len, k)| (*len, k.identity, k.proto))
                .collect::<Vec<_>>(),
            vec![(72, 0, 0)]
        );
    }
}
