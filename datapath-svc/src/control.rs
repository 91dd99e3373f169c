//! Follows ipam-svc (this node's pod CIDR) and identity-svc (the identity
//! table). Both streams reconnect with back-off; what they delivered last is
//! kept (the CIDR on disk), so pods keep getting addresses while either
//! service is away.

use std::{collections::HashMap, sync::Arc};

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

/// Applies one ipam-svc event: every node's CIDR is kept for routing, and
/// this node's also for pod addresses (and on disk, for the next start).
async fn apply_allocation(agent: &Agent, event: Option<allocation_event::Event>) {
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
            agent
                .allocations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(a.node, cidr);
            agent.routes_dirty.notify_one();
        }
        Some(allocation_event::Event::Released(node)) => {
            agent
                .allocations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&node);
            agent.routes_dirty.notify_one();
        }
        Some(allocation_event::Event::Synced(_)) | None => {}
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
                loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(ev)) => {
                            backoff.reset();
                            apply_allocation(&agent, ev.event).await;
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
