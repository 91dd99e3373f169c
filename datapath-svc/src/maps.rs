//! The Rust side of every map key and value the eBPF programs use.
//!
//! Each struct mirrors one in `bpf/lib/*.h`; `layout_matches_c` compares
//! sizes and offsets against what the C compiler produced, so a change on one
//! side that is not made on the other fails the build's tests. Addresses and
//! ports are stored in network byte order, as the packets carry them.

use std::net::Ipv4Addr;

/// Map names, as pinned under the node's bpffs directory.
pub mod names {
    pub const LB4_SERVICES: &str = "weft_lb4_services";
    pub const LB4_BACKENDS: &str = "weft_lb4_backends";
    pub const LB4_REVERSE_NAT: &str = "weft_lb4_reverse_nat";
    pub const CT4_SERVICES: &str = "weft_ct4_services";
    pub const CT4_REVERSE: &str = "weft_ct4_reverse";
    pub const METRICS: &str = "weft_metrics";
    pub const LB4_MAGLEV: &str = "weft_lb4_maglev";
    pub const LB4_AFFINITY: &str = "weft_lb4_affinity";
    pub const MASQ4: &str = "weft_masq4";
    pub const SOCK4_REVNAT: &str = "weft_sock4_revnat";
    pub const SOCK4_PODS: &str = "weft_sock4_pods";
    pub const NODE_ADDRS: &str = "weft_node_addrs";
    pub const POLICY: &str = "weft_policy";
    pub const IPCACHE: &str = "weft_ipcache";
    pub const IPCACHE_CIDR: &str = "weft_ipcache_cidr";
    pub const ENDPOINTS: &str = "weft_endpoints";
    pub const POLICY_CT: &str = "weft_policy_ct";
    pub const FLOWS: &str = "weft_flows";
}

/// Policy directions, as the pod sees them.
pub mod direction {
    pub const INGRESS: u8 = 1;
    pub const EGRESS: u8 = 2;
}

/// `endpoint_policy.flags`
pub mod endpoint_flags {
    pub const INGRESS_ENFORCED: u32 = 1 << 0;
    pub const EGRESS_ENFORCED: u32 = 1 << 1;
}

/// Policy key prefix lengths, in bits after the prefix length field.
pub mod policy_prefix {
    pub const ANY_PROTO: u32 = 72;
    pub const ANY_PORT: u32 = 80;
    pub const FULL: u32 = 96;
}

/// `flow_event.verdict`
pub mod verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    pub const TRANSLATED: u8 = 3;
}

/// Globals the programs read, set at load time.
pub mod globals {
    pub const NETNS_COOKIE: &str = "CFG_NETNS_COOKIE";
    pub const CLUSTER_NET: &str = "CFG_CLUSTER_NET";
    pub const CLUSTER_MASK: &str = "CFG_CLUSTER_MASK";
    pub const MAGLEV_M: &str = "CFG_MAGLEV_M";
    pub const MASQUERADE: &str = "CFG_MASQUERADE";
    pub const HASH_SEED: &str = "CFG_HASH_SEED";
}

/// `lb4_service.algorithm`
pub mod algorithm {
    pub const RANDOM: u8 = 0;
    pub const MAGLEV: u8 = 1;
}

/// Backend ids per Maglev map entry (`MAGLEV_BLOCK`).
pub const MAGLEV_BLOCK: usize = 32;

/// `lb4_service.flags`
pub mod svc_flags {
    pub const CLUSTER_IP: u8 = 1 << 0;
    pub const NODE_PORT: u8 = 1 << 1;
    pub const EXTERNAL_IP: u8 = 1 << 2;
    pub const LOAD_BALANCER: u8 = 1 << 3;
    pub const HOST_PORT: u8 = 1 << 4;
    pub const AFFINITY: u8 = 1 << 5;
    /// No backend is ready: the slots hold serving terminating ones, which
    /// then take new connections.
    pub const TERMINATING_ONLY: u8 = 1 << 6;
}

/// `lb4_service.flags2`
pub mod svc_flags2 {
    /// Internal clients have their own entry, at `scope::INTERNAL`.
    pub const TWO_SCOPES: u8 = 1 << 0;
    /// A Local traffic policy leaves the entry no backend while the Service
    /// has endpoints on other nodes: packets are dropped, not rejected.
    pub const ENDPOINTS_ELSEWHERE: u8 = 1 << 1;
}

/// `lb4_key.scope`
pub mod scope {
    pub const EXTERNAL: u8 = 0;
    pub const INTERNAL: u8 = 1;
}

/// `lb4_backend.flags`
pub mod backend_flags {
    pub const TERMINATING: u8 = 1 << 0;
    pub const LOCAL: u8 = 1 << 1;
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4Key {
    pub address: u32,
    pub dport: u16,
    pub backend_slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lb4Service {
    pub backend_id: u32,
    pub count: u16,
    pub rev_nat_index: u16,
    pub flags: u8,
    pub algorithm: u8,
    pub flags2: u8,
    pub pad: u8,
    pub affinity_timeout: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Lb4Backend {
    pub address: u32,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lb4ReverseNat {
    pub address: u32,
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ct4Key {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ct4Entry {
    pub last_seen: u64,
    pub backend_id: u32,
    pub address: u32,
    pub port: u16,
    pub rev_nat_index: u16,
    pub flags: u8,
    pub pad: [u8; 3],
    pub nat_addr: u32,
    pub nat_port: u16,
    pub pad2: u16,
}

/// The data of an LPM `policy_key` (aya adds the prefix length).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PolicyKey {
    pub ep_id: u32,
    pub identity: u32,
    pub direction: u8,
    pub proto: u8,
    pub dport: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyEntry {
    pub flags: u32,
}

/// The data of an LPM `ipcache_key`: an IPv4 address, network order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct IpcacheKey {
    pub addr: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpcacheEntry {
    pub identity: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointPolicy {
    pub flags: u32,
    pub identity: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PolicyCtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
    pub ep_id: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub timestamp: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub orig_daddr: u32,
    pub ep_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub sport: u16,
    pub dport: u16,
    pub orig_dport: u16,
    pub proto: u8,
    pub verdict: u8,
    pub reason: u8,
    pub direction: u8,
    pub pad: [u8; 6],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Snat4PortKey {
    pub nat_addr: u32,
    pub nat_port: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snat4Port {
    pub remote_addr: u32,
    pub remote_port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4MaglevKey {
    pub rev_nat_index: u16,
    pub pad: u16,
    pub block: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lb4MaglevBlock {
    pub backend_ids: [u32; MAGLEV_BLOCK],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Lb4AffinityKey {
    pub client: u32,
    pub rev_nat_index: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lb4Affinity {
    pub last_used: u64,
    pub backend_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sock4RevnatKey {
    pub cookie: u64,
    pub address: u32,
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sock4Revnat {
    pub address: u32,
    pub port: u16,
    pub rev_nat_index: u16,
}

/// What a connected socket was translated from (socket-local storage).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sock4Xlate {
    pub address: u32,
    pub port: u16,
    pub rev_nat_index: u16,
    pub backend: u32,
    pub backend_port: u16,
    pub pad: u16,
}

/// A pod of this node, keyed by its network namespace's cookie.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sock4Pod {
    pub address: u32,
    pub ep_id: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sock4FlowKey {
    pub cookie: u64,
    pub address: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sock4Flow {
    pub last_seen: u64,
    pub backend_id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}

// SAFETY: every type above is #[repr(C)], made only of integers, with
// explicit padding fields, so any bit pattern is valid and none is
// uninitialised.
unsafe impl aya::Pod for Lb4Key {}
unsafe impl aya::Pod for Lb4Service {}
unsafe impl aya::Pod for Lb4Backend {}
unsafe impl aya::Pod for Lb4ReverseNat {}
unsafe impl aya::Pod for Ct4Key {}
unsafe impl aya::Pod for Ct4Entry {}
unsafe impl aya::Pod for MetricsValue {}
unsafe impl aya::Pod for Lb4MaglevKey {}
unsafe impl aya::Pod for Snat4PortKey {}
unsafe impl aya::Pod for Snat4Port {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyEntry {}
unsafe impl aya::Pod for IpcacheKey {}
unsafe impl aya::Pod for IpcacheEntry {}
unsafe impl aya::Pod for EndpointPolicy {}
unsafe impl aya::Pod for PolicyCtKey {}
unsafe impl aya::Pod for Lb4MaglevBlock {}
unsafe impl aya::Pod for Lb4AffinityKey {}
unsafe impl aya::Pod for Lb4Affinity {}
unsafe impl aya::Pod for Sock4RevnatKey {}
unsafe impl aya::Pod for Sock4Revnat {}
unsafe impl aya::Pod for Sock4Pod {}
unsafe impl aya::Pod for Sock4Xlate {}
unsafe impl aya::Pod for Sock4FlowKey {}
unsafe impl aya::Pod for Sock4Flow {}

/// Packet outcomes counted in `weft_metrics`; mirrors `enum weft_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    Passed = 0,
    LbTranslated = 1,
    LbReversed = 2,
    NoBackend = 3,
    Malformed = 4,
    CsumError = 5,
    Masqueraded = 6,
    NatExhausted = 7,
    FibFailed = 8,
    SockTranslated = 9,
    PolicyDenied = 10,
    PolicyAllowed = 11,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::Passed,
        Reason::LbTranslated,
        Reason::LbReversed,
        Reason::NoBackend,
        Reason::Malformed,
        Reason::CsumError,
        Reason::Masqueraded,
        Reason::NatExhausted,
        Reason::FibFailed,
        Reason::SockTranslated,
        Reason::PolicyDenied,
        Reason::PolicyAllowed,
    ];

    pub fn from_number(n: u8) -> Option<Self> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| *r as u32 == u32::from(n))
    }

    pub fn label(self) -> &'static str {
        match self {
            Reason::Passed => "passed",
            Reason::LbTranslated => "lb_translated",
            Reason::LbReversed => "lb_reversed",
            Reason::NoBackend => "no_backend",
            Reason::Malformed => "malformed",
            Reason::CsumError => "csum_error",
            Reason::Masqueraded => "masqueraded",
            Reason::NatExhausted => "nat_exhausted",
            Reason::FibFailed => "fib_failed",
            Reason::SockTranslated => "sock_translated",
            Reason::PolicyDenied => "policy_denied",
            Reason::PolicyAllowed => "policy_allowed",
        }
    }
}

/// Network-order helpers: the maps hold addresses and ports as the wire does.
pub fn be_addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn addr_from_be(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

pub fn be_port(port: u16) -> u16 {
    port.to_be()
}

pub fn port_from_be(raw: u16) -> u16 {
    u16::from_be(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[allow(clippy::type_complexity)]
    mod c {
        include!(concat!(env!("OUT_DIR"), "/layout.rs"));
    }
    use c::C_LAYOUT;

    /// An LPM trie key in C starts with the prefix length, which aya adds
    /// in front of the Rust data: shift the data's layout by four bytes.
    fn lpm(
        (size, fields): (usize, Vec<(&'static str, usize)>),
    ) -> (usize, Vec<(&'static str, usize)>) {
        (
            size + 4,
            fields.into_iter().map(|(f, o)| (f, o + 4)).collect(),
        )
    }

    fn rust_layout(name: &str) -> (usize, Vec<(&'static str, usize)>) {
        macro_rules! layout {
            ($t:ty, $($f:ident),*) => {
                (size_of::<$t>(), vec![$((stringify!($f), offset_of!($t, $f))),*])
            };
        }
        match name {
            "lb4_key" => layout!(Lb4Key, address, dport, backend_slot, proto, scope),
            "lb4_service" => layout!(
                Lb4Service,
                backend_id,
                count,
                rev_nat_index,
                flags,
                algorithm,
                flags2,
                affinity_timeout
            ),
            "lb4_backend" => layout!(Lb4Backend, address, port, proto, flags),
            "lb4_reverse_nat" => layout!(Lb4ReverseNat, address, port),
            "ct4_key" => layout!(Ct4Key, saddr, daddr, sport, dport, proto),
            "ct4_entry" => layout!(
                Ct4Entry,
                last_seen,
                backend_id,
                address,
                port,
                rev_nat_index,
                flags,
                nat_addr,
                nat_port
            ),
            "lb4_maglev_key" => layout!(Lb4MaglevKey, rev_nat_index, block),
            "snat4_port_key" => layout!(Snat4PortKey, nat_addr, nat_port, proto),
            "snat4_port" => layout!(Snat4Port, remote_addr, remote_port),
            "policy_key" => lpm(layout!(PolicyKey, ep_id, identity, direction, proto, dport)),
            "policy_entry" => layout!(PolicyEntry, flags),
            "ipcache_key" => lpm(layout!(IpcacheKey, addr)),
            "ipcache_entry" => layout!(IpcacheEntry, identity, flags),
            "endpoint_policy" => layout!(EndpointPolicy, flags, identity),
            "policy_ct_key" => layout!(PolicyCtKey, saddr, daddr, sport, dport, proto, ep_id),
            "flow_event" => layout!(
                FlowEvent,
                timestamp,
                saddr,
                daddr,
                orig_daddr,
                ep_id,
                src_identity,
                dst_identity,
                sport,
                dport,
                orig_dport,
                proto,
                verdict,
                reason,
                direction
            ),
            "lb4_maglev_block" => layout!(Lb4MaglevBlock, backend_ids),
            "lb4_affinity_key" => layout!(Lb4AffinityKey, client, rev_nat_index),
            "lb4_affinity" => layout!(Lb4Affinity, last_used, backend_id),
            "sock4_revnat_key" => layout!(Sock4RevnatKey, cookie, address, port),
            "sock4_revnat" => layout!(Sock4Revnat, address, port, rev_nat_index),
            "sock4_pod" => layout!(Sock4Pod, address, ep_id),
            "sock4_xlate" => layout!(
                Sock4Xlate,
                address,
                port,
                rev_nat_index,
                backend,
                backend_port
            ),
            "sock4_flow_key" => layout!(Sock4FlowKey, cookie, address, port, proto),
            "sock4_flow" => layout!(Sock4Flow, last_seen, backend_id),
            "metrics_value" => layout!(MetricsValue, packets, bytes),
            other => panic!("no Rust mirror for C struct {other}"),
        }
    }

    #[test]
    fn layout_matches_c() {
        for (name, size, fields) in C_LAYOUT {
            let (rust_size, rust_fields) = rust_layout(name);
            assert_eq!(rust_size, *size, "size of {name}");
            assert_eq!(rust_fields.as_slice(), *fields, "field offsets of {name}");
        }
    }

    #[test]
    fn byte_order_round_trips() {
        let ip = Ipv4Addr::new(10, 96, 0, 10);
        assert_eq!(be_addr(ip).to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(addr_from_be(be_addr(ip)), ip);
        assert_eq!(be_port(8080).to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(port_from_be(be_port(8080)), 8080);
    }
}
