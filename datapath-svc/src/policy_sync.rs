//! Keeps the policy maps (per-endpoint allow entries, the ipcache, the
//! isolated endpoints) equal to the compiled policy.
//!
//! Ordering keeps traffic that stays allowed flowing: allow entries and
//! ipcache entries go in before an endpoint is isolated, an endpoint stops
//! being isolated before its entries go, and entries that are no longer
//! wanted leave last. Like the load-balancer maps, the state is adopted
//! from the pinned maps at start instead of being flushed.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::lpm_trie::Key;
use ipnet::Ipv4Net;

use crate::{
    bpf::PolicyMaps,
    maps::{
        EndpointPolicy, IpcacheEntry, IpcacheKey, PolicyEntry, PolicyKey, addr_from_be, be_addr,
        names,
    },
    policy::DesiredPolicy,
    sync::SyncError,
};

type Result<T, E = SyncError> = std::result::Result<T, E>;

fn err(map: &'static str) -> impl Fn(aya::maps::MapError) -> SyncError {
    move |e| SyncError::Map {
        map,
        message: e.to_string(),
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>, map: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(e) => Err(err(map)(e)),
    }
}

pub struct PolicySync {
    maps: PolicyMaps,
    endpoints: BTreeMap<u32, EndpointPolicy>,
    entries: BTreeSet<(u32, PolicyKey)>,
    /// Pod and node addresses, as held in weft_ipcache.
    ipcache: BTreeMap<Ipv4Net, u32>,
    /// ipBlock prefixes, as held in weft_ipcache_cidr.
    cidrs: BTreeMap<Ipv4Net, u32>,
}

type PrefixTrie = aya::maps::LpmTrie<aya::maps::MapData, IpcacheKey, IpcacheEntry>;

fn prefix_key(net: &Ipv4Net) -> Key<IpcacheKey> {
    Key::new(
        u32::from(net.prefix_len()),
        IpcacheKey {
            addr: be_addr(net.network()),
        },
    )
}

fn read_prefixes(map: &PrefixTrie, name: &'static str) -> Result<BTreeMap<Ipv4Net, u32>> {
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (k, v) = item.map_err(err(name))?;
        let prefix = u8::try_from(k.prefix_len()).unwrap_or(32);
        if let Ok(net) = Ipv4Net::new(addr_from_be(k.data().addr), prefix) {
            out.insert(net, v.identity);
        }
    }
    Ok(out)
}

/// Writes the prefixes of `want` that `held` lacks or holds differently.
fn add_prefixes(
    map: &mut PrefixTrie,
    held: &mut BTreeMap<Ipv4Net, u32>,
    want: &BTreeMap<Ipv4Net, u32>,
    name: &'static str,
) -> Result<()> {
    for (net, id) in want {
        if held.get(net) != Some(id) {
            let entry = IpcacheEntry {
                identity: *id,
                flags: 0,
            };
            map.insert(&prefix_key(net), entry, 0).map_err(err(name))?;
            held.insert(*net, *id);
        }
    }
    Ok(())
}

/// Removes the prefixes `held` has that `want` does not.
fn remove_prefixes(
    map: &mut PrefixTrie,
    held: &mut BTreeMap<Ipv4Net, u32>,
    want: &BTreeMap<Ipv4Net, u32>,
    name: &'static str,
) -> Result<()> {
    let stale: Vec<Ipv4Net> = held
        .keys()
        .filter(|n| !want.contains_key(n))
        .copied()
        .collect();
    for net in stale {
        ignore_missing(map.remove(&prefix_key(&net)), name)?;
        held.remove(&net);
    }
    Ok(())
}

impl PolicySync {
    /// Adopts what the maps hold.
    pub fn restore(maps: PolicyMaps) -> Result<Self> {
        let endpoints = maps
            .endpoints
            .iter()
            .collect::<Result<BTreeMap<_, _>, _>>()
            .map_err(err(names::ENDPOINTS))?;
        let entries = maps
            .policy
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())))
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(err(names::POLICY))?;
        let ipcache = read_prefixes(&maps.ipcache, names::IPCACHE)?;
        let cidrs = read_prefixes(&maps.ipcache_cidr, names::IPCACHE_CIDR)?;
        Ok(Self {
            maps,
            endpoints,
            entries,
            ipcache,
            cidrs,
        })
    }

    pub fn isolated_endpoints(&self) -> usize {
        self.endpoints.len()
    }

    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    /// Every address identity held: pods, nodes and ipBlock prefixes.
    pub fn ipcache_len(&self) -> usize {
        self.ipcache.len() + self.cidrs.len()
    }

    /// Brings the maps in line with `desired` and the ipcache `ipcache`.
    pub fn apply(
        &mut self,
        desired: &DesiredPolicy,
        ipcache: &BTreeMap<Ipv4Net, u32>,
    ) -> Result<()> {
        // 1. Identities for addresses and prefixes, new and changed.
        add_prefixes(
            &mut self.maps.ipcache,
            &mut self.ipcache,
            ipcache,
            names::IPCACHE,
        )?;
        add_prefixes(
            &mut self.maps.ipcache_cidr,
            &mut self.cidrs,
            &desired.cidrs,
            names::IPCACHE_CIDR,
        )?;
        // 2. New allow entries.
        for (len, key) in desired.entries.difference(&self.entries.clone()) {
            self.maps
                .policy
                .insert(&Key::new(*len, *key), PolicyEntry { flags: 0 }, 0)
                .map_err(err(names::POLICY))?;
            self.entries.insert((*len, *key));
        }
        // 3. Endpoints: isolation on and changed, then off.
        for (ep, value) in &desired.endpoints {
            if self.endpoints.get(ep) != Some(value) {
                self.maps
                    .endpoints
                    .insert(*ep, *value, 0)
                    .map_err(err(names::ENDPOINTS))?;
                self.endpoints.insert(*ep, *value);
            }
        }
        let gone: Vec<u32> = self
            .endpoints
            .keys()
            .filter(|e| !desired.endpoints.contains_key(e))
            .copied()
            .collect();
        for ep in gone {
            ignore_missing(self.maps.endpoints.remove(&ep), names::ENDPOINTS)?;
            self.endpoints.remove(&ep);
        }
        // 4. Allow entries no longer wanted.
        let stale: Vec<(u32, PolicyKey)> =
            self.entries.difference(&desired.entries).copied().collect();
        for (len, key) in stale {
            ignore_missing(self.maps.policy.remove(&Key::new(len, key)), names::POLICY)?;
            self.entries.remove(&(len, key));
        }
        // 5. Addresses and prefixes no longer known.
        remove_prefixes(
            &mut self.maps.ipcache,
            &mut self.ipcache,
            ipcache,
            names::IPCACHE,
        )?;
        remove_prefixes(
            &mut self.maps.ipcache_cidr,
            &mut self.cidrs,
            &desired.cidrs,
            names::IPCACHE_CIDR,
        )?;
        Ok(())
    }
}

/// What flow events and status pages need to name addresses.
#[derive(Debug, Default, Clone)]
pub struct AddressBook {
    /// Pod addresses: (namespace/name, identity).
    pub pods: std::collections::HashMap<std::net::Ipv4Addr, (String, u32)>,
    /// The ipcache as programmed.
    pub ipcache: BTreeMap<Ipv4Net, u32>,
}

/// Which pod each pod address belongs to, from (name, pod, identity).
///
/// An address may be listed by more than one pod: a pod that is gone or
/// going keeps its address in its status after the address went to a new
/// pod (addresses come back quickly in a /24, and the e2e suite's netpol
/// specs churn pods fast enough to see it). A pod that ran to completion
/// holds nothing; of the others a pod not being deleted wins over one that
/// is, then the most recently changed (resourceVersions are etcd
/// revisions, so they order changes).
fn address_holders<'a>(
    pods: impl IntoIterator<Item = (String, &'a weft_proto::watcher::v1::Pod, u32)>,
) -> std::collections::HashMap<std::net::Ipv4Addr, (String, u32)> {
    let mut held: std::collections::HashMap<std::net::Ipv4Addr, ((bool, u64), String, u32)> =
        std::collections::HashMap::new();
    for (name, pod, id) in pods {
        if matches!(pod.phase.as_str(), "Succeeded" | "Failed") {
            continue;
        }
        let meta = pod.meta.as_ref();
        let claim = (
            !meta.is_some_and(|m| m.deleting),
            meta.and_then(|m| m.resource_version.parse().ok())
                .unwrap_or(0),
        );
        for ip in pod.pod_ips.iter().filter_map(|ip| ip.parse().ok()) {
            if held.get(&ip).is_none_or(|(c, _, _)| *c < claim) {
                held.insert(ip, (claim, name.clone(), id));
            }
        }
    }
    held.into_iter()
        .map(|(ip, (_, name, id))| (ip, (name, id)))
        .collect()
}

/// Gathers what policy depends on from the agent's view of the cluster.
fn inputs(agent: &crate::agent::Agent) -> (DesiredPolicy, BTreeMap<Ipv4Net, u32>, AddressBook) {
    use weft_common::{
        labels::{canonical_key, reserved, security_labels},
        watch::ObjKey,
    };
    use weft_proto::watcher::v1::{Kind, Resource, resource};

    use crate::{
        lb::Proto,
        policy::{IdentityView, LocalEndpoint, PolicyInputs, compute},
    };

    let mirror = agent.cluster.read().unwrap_or_else(|p| p.into_inner());
    let table = agent
        .identities
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let identities: Vec<IdentityView> = table
        .values()
        .filter(|i| !i.reserved)
        .map(|i| IdentityView {
            id: i.id,
            labels: i
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
        .collect();
    let namespaces: std::collections::HashMap<String, std::collections::BTreeMap<String, String>> =
        mirror
            .of_kind(Kind::Namespace)
            .filter_map(|(k, r)| match &r.kind {
                Some(resource::Kind::Namespace(ns)) => {
                    Some((k.name.clone(), ns.meta.as_ref()?.labels.clone()))
                }
                _ => None,
            })
            .collect();
    let policies: Vec<_> = mirror
        .of_kind(Kind::NetworkPolicy)
        .filter_map(|(_, r)| match &r.kind {
            Some(resource::Kind::NetworkPolicy(p)) => Some(p.clone()),
            _ => None,
        })
        .collect();

    let mut book = AddressBook::default();
    let mut ipcache: BTreeMap<Ipv4Net, u32> = BTreeMap::new();
    let mut pods = Vec::new();
    let ports_of = |pod: &weft_proto::watcher::v1::Pod| -> Vec<(String, Proto, u16)> {
        pod.container_ports
            .iter()
            .filter_map(|p| {
                Some((
                    p.name.clone(),
                    Proto::from_proto(p.protocol())?,
                    u16::try_from(p.container_port).ok()?,
                ))
            })
            .collect()
    };
    let mut claims = Vec::new();
    for (key, r) in mirror.of_kind(Kind::Pod) {
        let Some(resource::Kind::Pod(pod)) = &r.kind else {
            continue;
        };
        if pod.host_network {
            continue;
        }
        let pod_labels = pod
            .meta
            .as_ref()
            .map(|m| m.labels.clone())
            .unwrap_or_default();
        let ns_labels = namespaces.get(&key.namespace).cloned().unwrap_or_default();
        let labels = security_labels(&key.namespace, &pod_labels, &ns_labels);
        let Some(id) = table.get(&canonical_key(&labels)).map(|i| i.id) else {
            continue;
        };
        pods.push((id, ports_of(pod)));
        claims.push((format!("{}/{}", key.namespace, key.name), pod.clone(), id));
    }
    for (ip, (name, id)) in address_holders(claims.iter().map(|(n, p, i)| (n.clone(), p, *i))) {
        ipcache.insert(Ipv4Net::from(ip), id);
        book.pods.insert(ip, (name, id));
    }
    // Nodes: this one is the host, the others remote nodes.
    for (_, r) in mirror.of_kind(Kind::Node) {
        let Some(resource::Kind::Node(n)) = &r.kind else {
            continue;
        };
        for a in n
            .addresses
            .iter()
            .filter(|a| a.r#type == "InternalIP" || a.r#type == "ExternalIP")
        {
            if let Ok(ip) = a.address.parse::<std::net::Ipv4Addr>() {
                ipcache.insert(Ipv4Net::from(ip), reserved::REMOTE_NODE);
            }
        }
    }
    for addr in &agent.config.view.addrs {
        ipcache.insert(Ipv4Net::from(*addr), reserved::HOST);
    }

    let mut endpoints = Vec::new();
    for record in agent.endpoints.all().unwrap_or_default() {
        let Ok(ep_id) = nix::net::if_::if_nametoindex(record.host_ifname.as_str()) else {
            continue;
        };
        let (identity, _) = agent.identity_in(&mirror, &record.pod_namespace, &record.pod_name);
        let pod = match mirror.get(&ObjKey::new(
            Kind::Pod,
            &record.pod_namespace,
            &record.pod_name,
        )) {
            Some(Resource {
                kind: Some(resource::Kind::Pod(p)),
            }) => Some(p),
            _ => None,
        };
        if let Ok(ip) = record.ip.parse::<std::net::Ipv4Addr>() {
            ipcache.insert(Ipv4Net::from(ip), identity);
            book.pods.insert(ip, (record.pod(), identity));
        }
        endpoints.push(LocalEndpoint {
            ep_id,
            namespace: record.pod_namespace.clone(),
            labels: pod
                .as_ref()
                .and_then(|p| p.meta.as_ref())
                .map(|m| m.labels.clone())
                .unwrap_or_default(),
            identity,
            ports: pod.as_ref().map(ports_of).unwrap_or_default(),
        });
    }
    drop(mirror);
    let desired = compute(&PolicyInputs {
        policies: &policies,
        identities: &identities,
        endpoints: &endpoints,
        pods: &pods,
    });
    // ipBlock prefixes go to a map of their own: a pod address keeps its
    // identity even where an ipBlock prefix (an `except` of a pod's /32,
    // say) covers it.
    book.ipcache = ipcache.clone();
    book.ipcache
        .extend(desired.cidrs.iter().map(|(c, id)| (*c, *id)));
    (desired, ipcache, book)
}

/// Recompiles and reprograms policy whenever something it depends on
/// changes (policies, pods, namespaces, nodes, identities, endpoints).
pub async fn follow(
    agent: std::sync::Arc<crate::agent::Agent>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        // Let a burst of changes settle into one pass.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (desired, ipcache, book) = inputs(&agent);
        let applied = agent
            .policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply(&desired, &ipcache);
        match applied {
            Ok(()) => {
                *agent.addresses.write().unwrap_or_else(|p| p.into_inner()) = book;
            }
            Err(e) => {
                tracing::error!(error = %e, "programming network policy failed; retrying");
                agent.peers.record_error(&e);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                agent.policy_dirty.notify_one();
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = agent.policy_dirty.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::watcher::v1::{ObjectMeta, Pod};

    use super::address_holders;

    fn pod(ip: &str, phase: &str, deleting: bool, rv: &str) -> Pod {
        Pod {
            meta: Some(ObjectMeta {
                deleting,
                resource_version: rv.into(),
                ..Default::default()
            }),
            pod_ips: vec![ip.into()],
            phase: phase.into(),
            ..Default::default()
        }
    }

    /// The e2e suite's netpol specs found a new pod's address mapped to
    /// the identity of the pod that had it before, whichever sorted last.
    #[test]
    fn a_reused_address_belongs_to_the_pod_holding_it_now() {
        let ip = "10.244.1.7";
        let new = pod(ip, "Running", false, "900");
        for old in [
            pod(ip, "Succeeded", false, "950"),
            pod(ip, "Failed", false, "950"),
            pod(ip, "Running", true, "950"),
            pod(ip, "Running", false, "800"),
        ] {
            // Either order: the pods' names must not decide.
            for pods in [
                vec![
                    ("a/old".to_string(), &old, 1),
                    ("z/new".to_string(), &new, 2),
                ],
                vec![
                    ("z/new".to_string(), &new, 2),
                    ("a/old".to_string(), &old, 1),
                ],
            ] {
                let held = address_holders(pods);
                let ip: std::net::Ipv4Addr = ip.parse().expect("address");
                assert_eq!(held.get(&ip), Some(&("z/new".to_string(), 2)), "{old:?}");
            }
        }
    }
}
