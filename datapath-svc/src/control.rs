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

use crate::agent::Agent;

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
                            if let Some(allocation_event::Event::Allocated(a)) = ev.event
                                && a.node == agent.node
                            {
                                match a.cidr.parse::<ipnet::Ipv4Net>() {
                                    Ok(cidr) => {
                                        if agent.ipam.cidr() != Some(cidr) {
                                            tracing::info!(%cidr, "node pod CIDR");
                                        }
                                        if let Err(e) = remember_cidr(&agent, cidr).await {
                                            tracing::warn!(error = %e, "caching the node CIDR");
                                        }
                                        agent.ipam.set_cidr(cidr);
                                    }
                                    Err(e) => {
                                        tracing::warn!(cidr = %a.cidr, error = %e, "ipam-svc sent an invalid CIDR")
                                    }
                                }
                            }
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
