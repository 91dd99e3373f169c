//! The node's own network: which devices face the outside, and how pods
//! reach pods on other nodes.
//!
//! In native mode every other node's pod CIDR is routed to that node's
//! address. In tunnel mode it is routed through a VXLAN device, the way
//! flannel does it: the device's address is the first address of the node's
//! CIDR, each remote node is a permanent neighbour (its VTEP address and a
//! MAC derived from its node IP) with a forwarding entry pointing at its
//! node IP, so no learning or flooding is ever needed. Routes weft installs
//! carry their own protocol number, so a restart finds and cleans up what an
//! earlier run left.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlags, LinkMessage},
    neighbour::{NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::podnet::{NetError, Result, link_by_name, nl};

/// The protocol number on weft's routes (`ip route show proto 42`).
pub const ROUTE_PROTOCOL: u8 = 42;
pub const VXLAN_DEVICE: &str = "weft_vxlan";
pub const VXLAN_VNI: u32 = 42;
pub const VXLAN_PORT: u16 = 8472;
/// VXLAN's encapsulation costs 50 bytes of MTU.
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoutingMode {
    /// Route each node's pod CIDR to the node's address.
    Native,
    /// Carry pod traffic between nodes in VXLAN.
    Tunnel,
}

/// One of the node's external devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub index: u32,
    pub addr: Ipv4Addr,
    pub mtu: u32,
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> u32 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(1500)
}

/// The devices facing the outside: the named ones, or when none are named,
/// every interface that is up and has an IPv4 address, except loopback,
/// pod veths and weft's own tunnel.
pub async fn discover_devices(handle: &Handle, names: &[String]) -> Result<Vec<Device>> {
    let names: Vec<String> = names.iter().filter(|n| !n.is_empty()).cloned().collect();
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))?;
    let addrs: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses"))?;
    let mut out = Vec::new();
    for link in links {
        let Some(name) = link_name(&link) else {
            continue;
        };
        let chosen = if names.is_empty() {
            link.header.flags.contains(LinkFlags::Up)
                && !link.header.flags.contains(LinkFlags::Loopback)
                && !name.starts_with("wft")
                && name != VXLAN_DEVICE
        } else {
            names.contains(&name)
        };
        if !chosen {
            continue;
        }
        let addr = addrs
            .iter()
            .filter(|a| a.header.index == link.header.index)
            .find_map(|a| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
                    _ => None,
                })
            });
        if let Some(addr) = addr {
            out.push(Device {
                name,
                index: link.header.index,
                addr,
                mtu: link_mtu(&link),
            });
        }
    }
    for name in &names {
        if !out.iter().any(|d| &d.name == name) {
            return Err(NetError::Other(format!(
                "--devices: {name} does not exist or has no IPv4 address"
            )));
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A node's VTEP MAC, derived from its address so every node can compute
/// every other node's without asking (locally administered, unicast).
pub fn vtep_mac(node_ip: Ipv4Addr) -> [u8; 6] {
    let o = node_ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// A node's VTEP address: the first address of its pod CIDR, which pod
/// IPAM never hands out.
pub fn vtep_addr(cidr: Ipv4Net) -> Ipv4Addr {
    cidr.network()
}

/// What routing should look like: the other nodes, by name, with their pod
/// CIDR and node address.
pub type Peers = BTreeMap<String, (Ipv4Net, Ipv4Addr)>;

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(link_by_name(handle, name).await?.map(|l| l.header.index))
}

/// Creates (or adopts) the VXLAN device for this node.
async fn ensure_vxlan(handle: &Handle, device: &Device, own_cidr: Ipv4Net) -> Result<u32> {
    let index = match link_index(handle, VXLAN_DEVICE).await? {
        Some(i) => i,
        None => {
            let msg = LinkVxlan::new(VXLAN_DEVICE, VXLAN_VNI)
                .dev(device.index)
                .port(VXLAN_PORT)
                .local(device.addr)
                .learning(false)
                .mtu(device.mtu.saturating_sub(VXLAN_OVERHEAD))
                .address(vtep_mac(device.addr).to_vec())
                .build();
            handle
                .link()
                .add(msg)
                .execute()
                .await
                .map_err(nl("creating the VXLAN device"))?;
            link_index(handle, VXLAN_DEVICE)
                .await?
                .ok_or_else(|| NetError::Other("the VXLAN device vanished after creation".into()))?
        }
    };
    handle
        .address()
        .add(index, vtep_addr(own_cidr).into(), 32)
        .replace()
        .execute()
        .await
        .map_err(nl("addressing the VXLAN device"))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("bringing the VXLAN device up"))?;
    Ok(index)
}

fn route_dst(r: &RouteMessage) -> Option<Ipv4Net> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
            Ipv4Net::new(*ip, r.header.destination_prefix_length).ok()
        }
        _ => None,
    })
}

/// Brings the routes to other nodes' pod CIDRs in line with `peers`,
/// removing weft routes for nodes that are gone.
pub async fn sync_routes(
    handle: &Handle,
    mode: RoutingMode,
    device: &Device,
    own_cidr: Option<Ipv4Net>,
    peers: &Peers,
) -> Result<()> {
    let vxlan = match (mode, own_cidr) {
        (RoutingMode::Tunnel, Some(cidr)) => Some(ensure_vxlan(handle, device, cidr).await?),
        (RoutingMode::Tunnel, None) => return Ok(()), // until the node has a CIDR
        (RoutingMode::Native, _) => None,
    };
    let mut wanted: BTreeSet<Ipv4Net> = BTreeSet::new();
    for (cidr, node_ip) in peers.values() {
        if Some(*cidr) == own_cidr || *node_ip == device.addr {
            continue;
        }
        wanted.insert(*cidr);
        let route = match vxlan {
            Some(index) => {
                let vtep = vtep_addr(*cidr);
                let mac = vtep_mac(*node_ip);
                handle
                    .neighbours()
                    .add(index, vtep.into())
                    .link_layer_address(&mac)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl(format!("neighbour {vtep}")))?;
                handle
                    .neighbours()
                    .add_bridge(index, &mac)
                    .destination(IpAddr::V4(*node_ip))
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl(format!("forwarding entry for {node_ip}")))?;
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(cidr.network(), cidr.prefix_len())
                    .gateway(vtep)
                    .output_interface(index)
                    .onlink()
                    .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                    .build()
            }
            None => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(cidr.network(), cidr.prefix_len())
                .gateway(*node_ip)
                .output_interface(device.index)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .build(),
        };
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("route to {cidr}")))?;
    }
    // Routes of ours to nodes that are gone (or from the other mode).
    let existing = crate::podnet::ipv4_routes(handle).await?;
    for r in existing {
        // Read back, 42 is a protocol with a name (babel), not `Other(42)`:
        // compare the number.
        if u8::from(r.header.protocol) != ROUTE_PROTOCOL || r.header.scope == RouteScope::Link {
            continue;
        }
        let Some(dst) = route_dst(&r) else { continue };
        let via_vxlan = r
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Oif(i) if Some(*i) == vxlan));
        if (!wanted.contains(&dst) || (vxlan.is_some() != via_vxlan))
            && let Err(e) = handle.route().del(r).execute().await
        {
            tracing::warn!(%dst, error = %e, "removing a stale route");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_identity_follows_the_node() {
        assert_eq!(
            vtep_mac(Ipv4Addr::new(172, 31, 0, 12)),
            [0x0a, 0x58, 172, 31, 0, 12]
        );
        let cidr: Ipv4Net = "10.244.3.0/24".parse().expect("cidr");
        assert_eq!(vtep_addr(cidr), Ipv4Addr::new(10, 244, 3, 0));
    }
}
