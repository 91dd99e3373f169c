//! A pod's network plumbing, over netlink: the veth pair, the pod's address
//! and routes, and the node's route back to the pod.
//!
//! The pod gets its address as a /32 and a default route through a
//! link-local gateway, 169.254.1.1, whose neighbour entry is pinned to the
//! MAC of the host-side veth. So every packet the pod sends lands on the host
//! veth, where the eBPF programs see it, no matter where it is going, and the
//! host needs no address in the pod's subnet.

use std::{net::Ipv4Addr, os::fd::AsRawFd as _, path::Path};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// The pods' default gateway. Link-local, never on the wire.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("network namespace {path}: {message}")]
    Netns { path: String, message: String },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = NetError> = std::result::Result<T, E>;

pub(crate) fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// Whether a netlink error is "no such device" / "no such entry".
fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV || m.raw_code() == -libc::ENOENT)
}

/// What `create` made.
#[derive(Debug, Clone)]
pub struct PodLink {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
    /// The cookie of the pod's network namespace, for the socket hooks.
    pub netns_cookie: u64,
}

/// A stable host-side interface name for an attachment: the same container
/// and interface always map to the same name, within the 15-byte limit.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    // FNV-1a: tiny, stable across releases (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("wft{:012x}", h & 0xffff_ffff_ffff)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A netlink connection in the calling thread's network namespace.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetError::Other(format!("netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

pub(crate) async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    match handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

/// Every IPv4 route of the main table in the calling thread's namespace.
pub(crate) async fn ipv4_routes(handle: &Handle) -> Result<Vec<RouteMessage>> {
    handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing routes"))
}

/// The index of the interface `name`, if it exists.
pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(link_by_name(handle, name).await?.map(|l| l.header.index))
}

fn mac_of(link: &LinkMessage) -> [u8; 6] {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) if m.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(m);
                Some(mac)
            }
            _ => None,
        })
        .unwrap_or_default()
}

/// Creates the veth pair with its peer directly inside the pod's namespace
/// (named `pod_ifname` there) and brings the host side up. The pod side is
/// configured by [`address`], which can run while the programs are being
/// attached to the host side.
pub async fn create_pair(
    handle: &Handle,
    host_ifname: &str,
    netns: &Path,
    pod_ifname: &str,
    mtu: u32,
) -> Result<PodLink> {
    let ns_file = std::fs::File::open(netns).map_err(|e| NetError::Netns {
        path: netns.display().to_string(),
        message: e.to_string(),
    })?;

    // A leftover from an interrupted attempt would make the add fail.
    if let Some(old) = link_by_name(handle, host_ifname).await? {
        handle
            .link()
            .del(old.header.index)
            .execute()
            .await
            .map_err(nl("removing a stale veth"))?;
    }

    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(pod_ifname.to_string())
        .mtu(mtu)
        .setns_by_fd(ns_file.as_raw_fd())
        .build();
    let mut veth = LinkVeth::new(host_ifname, pod_ifname).mtu(mtu);
    veth = veth.set_info_data(InfoData::Veth(InfoVeth::Peer(peer)));
    handle
        .link()
        .add(veth.build())
        .execute()
        .await
        .map_err(nl(format!("creating veth {host_ifname}")))?;

    let host = link_by_name(handle, host_ifname)
        .await?
        .ok_or_else(|| NetError::Other(format!("{host_ifname} vanished after creation")))?;
    let host_ifindex = host.header.index;
    let host_mac = mac_of(&host);
    handle
        .link()
        .set(LinkUnspec::new_with_index(host_ifindex).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {host_ifname} up")))?;
    disable_ipv6(host_ifname);
    Ok(PodLink {
        host_ifname: host_ifname.to_string(),
        host_ifindex,
        host_mac,
        pod_mac: [0; 6],
        netns_cookie: 0,
    })
}

/// Addresses the pod side of a pair made by [`create_pair`] and routes the
/// node to the pod; fills in the pod side's MAC and the namespace's cookie.
pub async fn address(
    handle: &Handle,
    link: &mut PodLink,
    netns: &Path,
    pod_ifname: &str,
    pod_ip: Ipv4Addr,
) -> Result<()> {
    // Inside the pod.
    (link.pod_mac, link.netns_cookie) = {
        let netns = netns.to_path_buf();
        let pod_ifname = pod_ifname.to_string();
        let host_mac = link.host_mac;
        weft_common::netns::spawn_in(&netns, move || async move {
            let mac = configure_pod_side(&pod_ifname, pod_ip, host_mac).await?;
            Ok((mac, crate::bpf::netns_cookie()?))
        })
        .await
        .map_err(|e| NetError::Netns {
            path: netns_display(&netns),
            message: format!("{e:#}"),
        })?
    };

    // The node's route to the pod.
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(pod_ip, 32)
        .output_interface(link.host_ifindex)
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("route to {pod_ip}")))?;
    Ok(())
}

fn netns_display(p: &Path) -> String {
    p.display().to_string()
}

async fn configure_pod_side(ifname: &str, ip: Ipv4Addr, gateway_mac: [u8; 6]) -> Result<[u8; 6]> {
    let handle = connect()?;
    if let Some(lo) = link_by_name(&handle, "lo").await? {
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo.header.index).up().build())
            .execute()
            .await
            .map_err(nl("bringing lo up"))?;
    }
    let link = link_by_name(&handle, ifname)
        .await?
        .ok_or_else(|| NetError::Other(format!("{ifname} not found in the pod")))?;
    let index = link.header.index;
    handle
        .address()
        .add(index, ip.into(), 32)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("adding {ip}/32")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {ifname} up")))?;
    handle
        .neighbours()
        .add(index, GATEWAY.into())
        .link_layer_address(&gateway_mac)
        .replace()
        .execute()
        .await
        .map_err(nl("pinning the gateway's neighbour entry"))?;
    let gw_route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(gw_route)
        .replace()
        .execute()
        .await
        .map_err(nl("route to the gateway"))?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(GATEWAY)
        .output_interface(index)
        .build();
    handle
        .route()
        .add(default)
        .replace()
        .execute()
        .await
        .map_err(nl("default route"))?;
    Ok(mac_of(&link))
}

/// The cookie of the network namespace at `netns`.
pub async fn netns_cookie(netns: &Path) -> Result<u64> {
    weft_common::netns::spawn_in(netns, || async { Ok(crate::bpf::netns_cookie()?) })
        .await
        .map_err(|e| NetError::Netns {
            path: netns_display(netns),
            message: format!("{e:#}"),
        })
}

/// Removes the veth pair (both ends go together). Gone already is fine.
pub async fn delete(handle: &Handle, host_ifname: &str) -> Result<()> {
    let Some(link) = link_by_name(handle, host_ifname).await? else {
        return Ok(());
    };
    match handle.link().del(link.header.index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(nl(format!("deleting {host_ifname}"))(e)),
    }
}

/// What ADD set up for one attachment, as CHECK compares it.
#[derive(Debug, Clone)]
pub struct Plumbing {
    pub host_ifname: String,
    pub pod_ifname: String,
    pub ip: Ipv4Addr,
    /// 0: not recorded (the link's MTU is not compared).
    pub mtu: u32,
    /// `aa:bb:..`; empty: not recorded.
    pub host_mac: String,
    pub pod_mac: String,
}

/// Why CHECK fails: the pod's network is not what ADD left ([`Broken`]),
/// or looking at it failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Broken(String),
    #[error(transparent)]
    Net(#[from] NetError),
}

/// Compares one side of the veth pair with what ADD made of it.
fn check_link(link: &LinkMessage, what: &str, mtu: u32, mac: &str) -> Result<(), CheckError> {
    let broken = |m: String| Err(CheckError::Broken(format!("{what} {m}")));
    if !link.header.flags.contains(LinkFlags::Up) {
        return broken("is down".into());
    }
    let have_mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    if mtu != 0 && have_mtu != Some(mtu) {
        return broken(format!("has MTU {}, not {mtu}", have_mtu.unwrap_or(0)));
    }
    let have_mac = format_mac(&mac_of(link));
    if !mac.is_empty() && have_mac != mac {
        return broken(format!("has MAC {have_mac}, not {mac}"));
    }
    Ok(())
}

/// CHECK: whether the pair is still as ADD left it. The host side exists,
/// is up, with its MTU and MAC; inside the pod, the interface is up with
/// its MTU, MAC and address, and the routes to the gateway and the default
/// route through it are there. (The programs on the host side are the
/// caller's to check.) Returns the host side's index.
pub async fn check(handle: &Handle, want: &Plumbing, netns: &Path) -> Result<u32, CheckError> {
    let host = link_by_name(handle, &want.host_ifname)
        .await?
        .ok_or_else(|| {
            CheckError::Broken(format!("host interface {} is missing", want.host_ifname))
        })?;
    check_link(
        &host,
        &format!("host interface {}", want.host_ifname),
        want.mtu,
        &want.host_mac,
    )?;
    let want_pod = want.clone();
    let inside =
        weft_common::netns::spawn_in(
            netns,
            move || async move { Ok(check_pod_side(&want_pod).await) },
        )
        .await
        .map_err(|e| NetError::Netns {
            path: netns_display(netns),
            message: format!("{e:#}"),
        })?;
    inside?;
    Ok(host.header.index)
}

async fn check_pod_side(want: &Plumbing) -> Result<(), CheckError> {
    let handle = connect()?;
    let ifname = &want.pod_ifname;
    let link = link_by_name(&handle, ifname)
        .await?
        .ok_or_else(|| CheckError::Broken(format!("{ifname} is missing in the pod")))?;
    check_link(
        &link,
        &format!("{ifname} in the pod"),
        want.mtu,
        &want.pod_mac,
    )?;
    let index = link.header.index;
    let addrs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses"))?;
    let has_ip = addrs.iter().any(|a| {
        a.header.prefix_len == 32
            && a.attributes.iter().any(|attr| {
                matches!(attr, AddressAttribute::Address(std::net::IpAddr::V4(v)) if *v == want.ip)
            })
    });
    if !has_ip {
        return Err(CheckError::Broken(format!(
            "{ifname} in the pod does not carry {}/32",
            want.ip
        )));
    }
    let routes = ipv4_routes(&handle).await?;
    let on_link = |r: &&RouteMessage| {
        r.attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
    };
    let to_gateway = routes.iter().filter(on_link).any(|r| {
        r.header.destination_prefix_length == 32
            && r.attributes.iter().any(|a| {
                matches!(a, RouteAttribute::Destination(RouteAddress::Inet(ip)) if *ip == GATEWAY)
            })
    });
    if !to_gateway {
        return Err(CheckError::Broken(format!(
            "the pod has no route to the gateway {GATEWAY} on {ifname}"
        )));
    }
    let default = routes.iter().filter(on_link).any(|r| {
        r.header.destination_prefix_length == 0
            && r.attributes.iter().any(
                |a| matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(ip)) if *ip == GATEWAY),
            )
    });
    if !default {
        return Err(CheckError::Broken(format!(
            "the pod has no default route through {GATEWAY} on {ifname}"
        )));
    }
    Ok(())
}

/// Pod veths carry IPv4 only; IPv6 link-local chatter would just be noise.
fn disable_ipv6(ifname: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    let _ = std::fs::write(path, "1");
}

/// Turns on IPv4 forwarding in this namespace; the node routes pod traffic.
pub fn enable_forwarding() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_stable_and_short() {
        let a = host_ifname("0123456789abcdef", "eth0");
        assert_eq!(a, host_ifname("0123456789abcdef", "eth0"));
        assert_ne!(a, host_ifname("0123456789abcdef", "eth1"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("wft"));
    }
}
