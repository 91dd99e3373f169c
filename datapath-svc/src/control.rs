//! Follows ipam-svc (this node's pod CIDR) and identity-svc (the identity
//! table). Both streams reconnect with back-off; what they delivered last is
//! kept (the CIDRs on disk), so pods keep getting addresses, and routes to
//! other nodes stay, while either service is away.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use weft_common::{backoff::Backoff, labels::canonical_key};
use weft_proto::{
    identity::v1::{self as identity, identity_client::IdentityClient, identity_event},
    ipam::v1::{self as ipam, allocation_event, ipam_client::IpamClient},
};

use weft_common::watch::ObjKey;
use weft_proto::watcher::v1::{Kind, Resource, resource};

use crate::{agent::Agent, routing};

const NODE_CIDR_KEY: &str = "node_cidr";

/// The node CIDR remembered from the last run.
pub fn cached_cidr(store: &weft_common::store::Store) -> anyhow::Result<Option<ipnet::Ipv4Net>> {
    let meta = store.raw_tree("meta")?;
    Ok(meta
        .get(NODE_CIDR_KEY)?
        .and_then(|v| String::from_utf8(v.to_vec()).ok())
        .and_then(|s| s.parse().ok()))
}

async fn remember_cidr(agent: &Agent, cidr: ipnet::Ipv4Net) -> anyhow::Result<()> {
    let meta = agent.store.raw_tree("meta")?;
    meta.insert(NODE_CIDR_KEY, cidr.to_string().as_bytes())?;
    agent.store.flush().await?;
    Ok(())
}

/// Waits out a back-off delay; false when shutting down.
async fn pause(backoff: &mut Backoff, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(backoff.next_delay()) => true,
    }
}

/// Where every node's pod CIDR is cached (node name -> CIDR), for routes to
/// other nodes.
const ALLOCATIONS_TREE: &str = "node_cidrs";

/// Every node's pod CIDR as last heard from ipam-svc. Loaded before anything
/// computes routes: a datapath that starts while ipam-svc is away must not
/// take the routes to other nodes' pods down because it knows of no node.
pub fn cached_allocations(
    store: &weft_common::store::Store,
) -> anyhow::Result<BTreeMap<String, ipnet::Ipv4Net>> {
    let tree = store.raw_tree(ALLOCATIONS_TREE)?;
    let mut out = BTreeMap::new();
    for entry in tree.iter() {
        let (k, v) = entry?;
        let (Ok(node), Some(cidr)) = (
            String::from_utf8(k.to_vec()),
            std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()),
        ) else {
            continue;
        };
        out.insert(node, cidr);
    }
    Ok(out)
}

/// Writes one node's allocation (or its release) to the cache.
fn cache_allocation(agent: &Agent, node: &str, cidr: Option<ipnet::Ipv4Net>) -> anyhow::Result<()> {
    let tree = agent.store.raw_tree(ALLOCATIONS_TREE)?;
    match cidr {
        Some(c) => tree.insert(node, c.to_string().as_bytes())?,
        None => tree.remove(node)?,
    };
    Ok(())
}

/// Replaces the cache with a complete table.
async fn cache_allocations(
    agent: &Agent,
    table: &BTreeMap<String, ipnet::Ipv4Net>,
) -> anyhow::Result<()> {
    let tree = agent.store.raw_tree(ALLOCATIONS_TREE)?;
    for entry in tree.iter() {
        let (k, _) = entry?;
        if !String::from_utf8(k.to_vec()).is_ok_and(|n| table.contains_key(&n)) {
            tree.remove(k)?;
        }
    }
    for (node, cidr) in table {
        tree.insert(node.as_str(), cidr.to_string().as_bytes())?;
    }
    agent.store.flush().await?;
    Ok(())
}

/// Applies one ipam-svc event: every node's CIDR is kept for routing, and
/// this node's also for pod addresses (and on disk, for the next start).
///
/// Each stream starts with a snapshot, collected in `staging` and swapped
/// in whole at its SYNCED: a node released while the stream was down is
/// then forgotten, and until then the table (cached, or from the previous
/// stream) stays as it was.
async fn apply_allocation(
    agent: &Agent,
    event: Option<allocation_event::Event>,
    staging: &mut Option<BTreeMap<String, ipnet::Ipv4Net>>,
) {
    match event {
        Some(allocation_event::Event::Allocated(a)) => {
            let cidr = match a.cidr.parse::<ipnet::Ipv4Net>() {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(cidr = %a.cidr, error = %e, "ipam-svc sent an invalid CIDR");
                    return;
                }
            };
            if a.node == agent.node {
                if agent.ipam.cidr() != Some(cidr) {
                    tracing::info!(%cidr, "node pod CIDR");
                }
                if let Err(e) = remember_cidr(agent, cidr).await {
                    tracing::warn!(error = %e, "caching the node CIDR");
                }
                agent.ipam.set_cidr(cidr);
            }
            match staging {
                Some(table) => {
                    table.insert(a.node, cidr);
                }
                None => {
                    if let Err(e) = cache_allocation(agent, &a.node, Some(cidr)) {
                        tracing::warn!(error = %e, "caching node CIDRs");
                    }
                    agent
                        .allocations
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(a.node, cidr);
                    agent.routes_dirty.notify_one();
                }
            }
        }
        Some(allocation_event::Event::Released(node)) => match staging {
            Some(table) => {
                table.remove(&node);
            }
            None => {
                if let Err(e) = cache_allocation(agent, &node, None) {
                    tracing::warn!(error = %e, "caching node CIDRs");
                }
                agent
                    .allocations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&node);
                agent.routes_dirty.notify_one();
            }
        },
        Some(allocation_event::Event::Synced(_)) => {
            if let Some(table) = staging.take() {
                if let Err(e) = cache_allocations(agent, &table).await {
                    tracing::warn!(error = %e, "caching node CIDRs");
                }
                tracing::info!(nodes = table.len(), "node CIDRs synced");
                *agent.allocations.lock().unwrap_or_else(|p| p.into_inner()) = table;
                agent.routes_dirty.notify_one();
            }
        }
        None => {}
    }
}

/// Keeps the routes to other nodes' pods in line with the allocations and
/// the Node objects, whenever either changes.
pub async fn follow_routes(agent: Arc<Agent>, shutdown: CancellationToken) {
    let Some(device) = agent.config.devices.first().cloned() else {
        tracing::warn!("no external device: pods can reach only this node");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = agent.routes_dirty.notified() => {}
        }
        // Let a burst of changes settle into one pass.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let peers = peers(&agent);
        let own = agent.ipam.cidr();
        if let Err(e) = routing::sync_routes(
            &agent.netlink,
            agent.config.routing_mode,
            &device,
            own,
            &peers,
        )
        .await
        {
            tracing::warn!(error = %e, "syncing routes to other nodes; retrying");
            agent.peers.record_error(&e);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            agent.routes_dirty.notify_one();
        }
    }
}

/// Other nodes with a CIDR and a known InternalIP.
fn peers(agent: &Agent) -> routing::Peers {
    let allocations = agent
        .allocations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mirror = agent.cluster.read().unwrap_or_else(|p| p.into_inner());
    allocations
        .into_iter()
        .filter(|(node, _)| *node != agent.node)
        .filter_map(|(node, cidr)| {
            let Some(Resource {
                kind: Some(resource::Kind::Node(n)),
            }) = mirror.get(&ObjKey::new(Kind::Node, "", &node))
            else {
                return None;
            };
            let ip = n
                .addresses
                .iter()
                .filter(|a| a.r#type == "InternalIP")
                .chain(n.addresses.iter().filter(|a| a.r#type == "ExternalIP"))
                .find_map(|a| a.address.parse().ok())?;
            Some((node, (cidr, ip)))
        })
        .collect()
}

pub async fn follow_ipam(agent: Arc<Agent>, channel: Channel, shutdown: CancellationToken) {
    let mut client = IpamClient::new(channel);
    let mut backoff = Backoff::default();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.watch(ipam::WatchRequest {}) => r,
        };
        match stream {
            Ok(response) => {
                agent.peers.ipam.send_replace(true);
                let mut stream = response.into_inner();
                let mut staging = Some(BTreeMap::new());
                loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(ev)) => {
                            backoff.reset();
                            apply_allocation(&agent, ev.event, &mut staging).await;
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(%status, "ipam-svc stream broke");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::debug!(%status, "ipam-svc unavailable"),
        }
        agent.peers.ipam.send_replace(false);
        if !pause(&mut backoff, &shutdown).await {
            return;
        }
    }
}

pub async fn follow_identities(agent: Arc<Agent>, channel: Channel, shutdown: CancellationToken) {
    let mut client = IdentityClient::new(channel).max_decoding_message_size(64 << 20);
    let mut backoff = Backoff::default();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = client.watch(identity::WatchRequest {}) => r,
        };
        match stream {
            Ok(response) => {
                agent.peers.identity.send_replace(true);
                let mut stream = response.into_inner();
                // The table is rebuilt from each connection's snapshot, and
                // swapped in whole once it is complete.
                let mut staging: Option<HashMap<String, identity::SecurityIdentity>> =
                    Some(HashMap::new());
                loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = stream.message() => m,
                    };
                    let ev = match msg {
                        Ok(Some(ev)) => ev,
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(%status, "identity-svc stream broke");
                            break;
                        }
                    };
                    backoff.reset();
                    match ev.event {
                        Some(identity_event::Event::Upsert(id)) => {
                            let key = canonical_key(&id.labels);
                            match &mut staging {
                                Some(table) => {
                                    table.insert(key, id);
                                }
                                None => {
                                    agent
                                        .identities
                                        .write()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .insert(key, id);
                                }
                            }
                        }
                        Some(identity_event::Event::Delete(number)) => {
                            let table = match &mut staging {
                                Some(t) => t,
                                None => &mut *agent
                                    .identities
                                    .write()
                                    .unwrap_or_else(|p| p.into_inner()),
                            };
                            table.retain(|_, v| v.id != number);
                        }
                        Some(identity_event::Event::Synced(_)) => {
                            if let Some(table) = staging.take() {
                                tracing::info!(identities = table.len(), "identity table synced");
                                *agent.identities.write().unwrap_or_else(|p| p.into_inner()) =
                                    table;
                            }
                        }
                        None => {}
                    }
                    // Identities decide pods' places in policy and the ipcache.
                    agent.policy_dirty.notify_one();
                }
            }
            Err(status) => tracing::debug!(%status, "identity-svc unavailable"),
        }
        agent.peers.identity.send_replace(false);
        if !pause(&mut backoff, &shutdown).await {
            return;
        }
    }
}
