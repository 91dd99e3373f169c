//! kube-proxy's rule sets for a list of ClusterIP Services, generated the
//! way kube-proxy's iptables and nftables proxiers structure them, so the
//! kernel does the same work per packet and per load as on a real node.
//!
//! iptables (`iptables-restore` input): `KUBE-SERVICES` holds one rule per
//! service port, matched in order, jumping to `KUBE-SVC-<hash>`, which picks
//! an endpoint with `-m statistic --mode random --probability 1/(n-i)` and
//! jumps to `KUBE-SEP-<hash>`, which DNATs. Masquerade marking
//! (`KUBE-MARK-MASQ`) for traffic from outside the cluster CIDR and for
//! hairpin, and the filter-table chains, are included as kube-proxy writes
//! them.
//!
//! nftables (`nft -f` input, knftables' one-command-per-line style): table
//! `ip kube-proxy`, one `service-ips` verdict map keyed by
//! `ipv4_addr . inet_proto . inet_service`, a `service-<hash>-<ns>/<name>/tcp/<port>`
//! chain per service port choosing an endpoint with `numgen random mod n`,
//! and an `endpoint-…` chain per endpoint that DNATs.
//!
//! Chain names hash like kube-proxy's (base32 of a digest of the service
//! port name, protocol and endpoint) but with FNV instead of SHA-256: the
//! names have the same length and are as unique, which is all the kernel
//! sees.

use std::fmt::Write as _;

use crate::services::{BenchService, PORT_NAME};

/// A stable base32 digest of `s`, `len` characters (at most 25).
pub fn hash_name(s: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        let mut h = seed;
        for b in s.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    };
    let bits =
        (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x8422_2325_cbf2_9ce4));
    (0..len.min(25))
        .map(|i| ALPHABET[((bits >> (123 - 5 * i)) & 31) as usize] as char)
        .collect()
}

fn svc_chain(s: &BenchService) -> String {
    format!(
        "KUBE-SVC-{}",
        hash_name(&format!("{}tcp", s.port_name()), 16)
    )
}

fn sep_chain(s: &BenchService, ip: std::net::Ipv4Addr, port: u16) -> String {
    format!(
        "KUBE-SEP-{}",
        hash_name(&format!("{}tcp{ip}:{port}", s.port_name()), 16)
    )
}

/// The `KUBE-SERVICES` rule of one service port.
fn iptables_services_rule(out: &mut String, s: &BenchService) {
    let _ = writeln!(
        out,
        "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} -j {}",
        s.port_name(),
        s.cluster_ip,
        s.port,
        svc_chain(s)
    );
}

/// The rules of a service's `KUBE-SVC` chain and its `KUBE-SEP` chains.
fn iptables_service_chains(out: &mut String, s: &BenchService, cluster_cidr: &str) {
    let svc = svc_chain(s);
    let _ = writeln!(
        out,
        "-A {svc} -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
        s.port_name(),
        s.cluster_ip,
        s.port
    );
    let n = s.backends.len();
    for (i, (ip, port)) in s.backends.iter().enumerate() {
        let sep = sep_chain(s, *ip, *port);
        if i + 1 < n {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{} -> {ip}:{port}\" -m statistic --mode random --probability {:.10} -j {sep}",
                s.port_name(),
                1.0 / (n - i) as f64
            );
        } else {
            let _ = writeln!(
                out,
                "-A {svc} -m comment --comment \"{} -> {ip}:{port}\" -j {sep}",
                s.port_name()
            );
        }
    }
    for (ip, port) in &s.backends {
        let sep = sep_chain(s, *ip, *port);
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{}\" -s {ip}/32 -j KUBE-MARK-MASQ",
            s.port_name()
        );
        let _ = writeln!(
            out,
            "-A {sep} -m comment --comment \"{}\" -m tcp -p tcp -j DNAT --to-destination {ip}:{port}",
            s.port_name()
        );
    }
}

fn iptables_declare(out: &mut String, s: &BenchService) {
    let _ = writeln!(out, ":{} - [0:0]", svc_chain(s));
    for (ip, port) in &s.backends {
        let _ = writeln!(out, ":{} - [0:0]", sep_chain(s, *ip, *port));
    }
}

const NODEPORTS_LAST: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n";

/// A complete `iptables-restore` input for `services`, in their order
/// (the last one is matched last in `KUBE-SERVICES`).
pub fn iptables_restore(services: &[BenchService], cluster_cidr: &str) -> String {
    let mut out = String::with_capacity(services.len() * 1200 + 4096);
    out.push_str(
        "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
",
    );
    for s in services {
        iptables_declare(&mut out, s);
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
",
    );
    for s in services {
        iptables_services_rule(&mut out, s);
    }
    out.push_str(NODEPORTS_LAST);
    for s in services {
        iptables_service_chains(&mut out, s, cluster_cidr);
    }
    out.push_str("COMMIT\n");
    out
}

/// What kube-proxy's partial sync (`iptables-restore --noflush`) writes
/// when one service's endpoints changed from `before` to `after`: the whole
/// `KUBE-SERVICES` chain (kube-proxy always rewrites it), the changed
/// service's chains, and the deletion of endpoint chains no longer used.
pub fn iptables_update(
    services: &[BenchService],
    before: &BenchService,
    after: &BenchService,
    cluster_cidr: &str,
) -> String {
    let mut out = String::with_capacity(services.len() * 150 + 4096);
    out.push_str("*nat\n:KUBE-SERVICES - [0:0]\n");
    iptables_declare(&mut out, after);
    // Stale endpoint chains are declared (which flushes them) and then
    // deleted, as kube-proxy does.
    let stale: Vec<String> = before
        .backends
        .iter()
        .filter(|b| !after.backends.contains(b))
        .map(|(ip, port)| sep_chain(before, *ip, *port))
        .collect();
    for chain in &stale {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for s in services {
        iptables_services_rule(&mut out, s);
    }
    out.push_str(NODEPORTS_LAST);
    iptables_service_chains(&mut out, after, cluster_cidr);
    for chain in &stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

const NFT_TABLE: &str = "ip kube-proxy";

fn nft_service_chain(s: &BenchService) -> String {
    let id = format!("{}/{}/tcp/{PORT_NAME}", crate::services::NAMESPACE, s.name);
    format!(
        "service-{}-{id}",
        hash_name(&format!("{}tcp", s.port_name()), 8)
    )
}

fn nft_endpoint_chain(s: &BenchService, ip: std::net::Ipv4Addr, port: u16) -> String {
    let id = format!(
        "{}/{}/tcp/{PORT_NAME}__{ip}/{port}",
        crate::services::NAMESPACE,
        s.name
    );
    format!(
        "endpoint-{}-{id}",
        hash_name(&format!("{}tcp{ip}:{port}", s.port_name()), 8)
    )
}

/// The rules of a service's chain (which must exist and be empty).
fn nft_service_rules(out: &mut String, s: &BenchService, cluster_cidr: &str) {
    let chain = nft_service_chain(s);
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {chain} ip daddr {} tcp dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
        s.cluster_ip, s.port
    );
    if s.backends.is_empty() {
        return;
    }
    let arms: Vec<String> = s
        .backends
        .iter()
        .enumerate()
        .map(|(i, (ip, port))| format!("{i} : goto {}", nft_endpoint_chain(s, *ip, *port)))
        .collect();
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {chain} numgen random mod {} vmap {{ {} }}",
        s.backends.len(),
        arms.join(" , ")
    );
}

fn nft_endpoint(out: &mut String, s: &BenchService, ip: std::net::Ipv4Addr, port: u16) {
    let chain = nft_endpoint_chain(s, ip, port);
    let _ = writeln!(out, "add chain {NFT_TABLE} {chain}");
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {chain} ip saddr {ip} jump mark-for-masquerade"
    );
    let _ = writeln!(
        out,
        "add rule {NFT_TABLE} {chain} meta l4proto tcp dnat to {ip}:{port}"
    );
}

/// A complete `nft -f` input for `services`: kube-proxy's base chains, maps
/// and sets, then each service's chains and map elements.
pub fn nft_ruleset(
    services: &[BenchService],
    cluster_cidr: &str,
    service_cidr: &str,
    node_ips: &[std::net::Ipv4Addr],
) -> String {
    let t = NFT_TABLE;
    let mut out = String::with_capacity(services.len() * 1500 + 8192);
    let _ = write!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}
add chain {t} mark-for-masquerade
add rule {t} mark-for-masquerade mark set mark or 0x4000
add chain {t} masquerading
add rule {t} masquerading mark and 0x4000 == 0 return
add rule {t} masquerading mark set mark xor 0x4000
add rule {t} masquerading masquerade fully-random
add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}
add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}
add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}
add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}
add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}
add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}
add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}
add chain {t} services
add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips
add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add chain {t} firewall-check
add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add chain {t} service-endpoints-check
add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add chain {t} nodeport-endpoints-check
add rule {t} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add chain {t} cluster-ips-check
add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"
add rule {t} cluster-ips-check ip daddr {{ {service_cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\"
add chain {t} filter-prerouting {{ type filter hook prerouting priority -110 ; }}
add rule {t} filter-prerouting ct state new jump firewall-check
add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}
add rule {t} filter-forward ct state new jump service-endpoints-check
add rule {t} filter-forward ct state new jump cluster-ips-check
add chain {t} filter-input {{ type filter hook input priority -110 ; }}
add rule {t} filter-input ct state new jump nodeport-endpoints-check
add rule {t} filter-input ct state new jump service-endpoints-check
add chain {t} filter-output {{ type filter hook output priority -110 ; }}
add rule {t} filter-output ct state new jump service-endpoints-check
add rule {t} filter-output ct state new jump firewall-check
add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}
add rule {t} nat-prerouting jump services
add chain {t} nat-output {{ type nat hook output priority -100 ; }}
add rule {t} nat-output jump services
add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}
add rule {t} nat-postrouting jump masquerading
"
    );
    for ip in node_ips {
        let _ = writeln!(out, "add element {t} nodeport-ips {{ {ip} }}");
    }
    out.push_str(&nft_services(services, cluster_cidr));
    out
}

/// The chains, rules and map elements of `services`, to add to a table
/// that [`nft_ruleset`] made (possibly with other services already in it).
pub fn nft_services(services: &[BenchService], cluster_cidr: &str) -> String {
    let t = NFT_TABLE;
    let mut out = String::with_capacity(services.len() * 1500);
    for s in services {
        let _ = writeln!(out, "add chain {t} {}", nft_service_chain(s));
        for (ip, port) in &s.backends {
            nft_endpoint(&mut out, s, *ip, *port);
        }
        nft_service_rules(&mut out, s, cluster_cidr);
        let _ = writeln!(out, "add element {t} cluster-ips {{ {} }}", s.cluster_ip);
        let _ = writeln!(
            out,
            "add element {t} service-ips {{ {} . tcp . {} : goto {} }}",
            s.cluster_ip,
            s.port,
            nft_service_chain(s)
        );
    }
    out
}

/// The transaction kube-proxy's nftables proxier sends when one service's
/// endpoints changed: new endpoint chains, the service chain flushed and
/// refilled, and the endpoint chains no longer used deleted.
pub fn nft_update(before: &BenchService, after: &BenchService, cluster_cidr: &str) -> String {
    let mut out = String::new();
    for (ip, port) in &after.backends {
        if !before.backends.contains(&(*ip, *port)) {
            nft_endpoint(&mut out, after, *ip, *port);
        }
    }
    let _ = writeln!(out, "flush chain {NFT_TABLE} {}", nft_service_chain(after));
    nft_service_rules(&mut out, after, cluster_cidr);
    for (ip, port) in &before.backends {
        if !after.backends.contains(&(*ip, *port)) {
            let _ = writeln!(
                out,
                "delete chain {NFT_TABLE} {}",
                nft_endpoint_chain(before, *ip, *port)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::services::service;

    fn three() -> BenchService {
        service(
            0,
            (2..5)
                .map(|i| (Ipv4Addr::new(10, 244, 0, i), 8080))
                .collect(),
        )
    }

    #[test]
    fn hashes_are_stable_base32_of_the_asked_length() {
        let h = hash_name("bench/svc-0:httptcp", 16);
        assert_eq!(h.len(), 16);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        );
        assert_eq!(h, hash_name("bench/svc-0:httptcp", 16));
        assert_ne!(h, hash_name("bench/svc-1:httptcp", 16));
    }

    #[test]
    fn iptables_picks_each_endpoint_with_equal_probability() {
        let rules = iptables_restore(&[three()], "10.244.0.0/16");
        let svc = svc_chain(&three());
        let picks: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc} ")) && l.contains("KUBE-SEP-"))
            .collect();
        assert_eq!(picks.len(), 3);
        // 1/3, then 1/2 of the rest, then whatever is left: uniform.
        assert!(
            picks[0].contains("--probability 0.3333333333"),
            "{}",
            picks[0]
        );
        assert!(
            picks[1].contains("--probability 0.5000000000"),
            "{}",
            picks[1]
        );
        assert!(!picks[2].contains("statistic"), "{}", picks[2]);
        let dnats = rules.lines().filter(|l| l.contains("-j DNAT")).count();
        assert_eq!(dnats, 3);
        assert!(rules.contains("--to-destination 10.244.0.4:8080"));
        assert_eq!(rules.matches("COMMIT").count(), 2);
    }

    #[test]
    fn iptables_services_are_matched_in_the_given_order_before_nodeports() {
        let a = service(0, vec![(Ipv4Addr::new(10, 244, 0, 2), 8080)]);
        let b = service(1, vec![(Ipv4Addr::new(10, 244, 0, 2), 8080)]);
        let rules = iptables_restore(&[a, b], "10.244.0.0/16");
        let order: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(order.len(), 3);
        assert!(order[0].contains("-d 10.100.0.1/32"));
        assert!(order[1].contains("-d 10.100.0.2/32"));
        assert!(order[2].contains("KUBE-NODEPORTS"));
    }

    #[test]
    fn iptables_update_rewrites_services_and_drops_the_lost_endpoint() {
        let before = three();
        let mut after = before.clone();
        let lost = after.backends.pop().expect("a backend");
        let update = iptables_update(&[after.clone()], &before, &after, "10.244.0.0/16");
        assert!(update.starts_with("*nat\n:KUBE-SERVICES - [0:0]\n"));
        let stale = sep_chain(&before, lost.0, lost.1);
        assert!(update.contains(&format!(":{stale} - [0:0]\n")));
        assert!(update.contains(&format!("-X {stale}")));
        assert_eq!(update.lines().filter(|l| l.contains("-j DNAT")).count(), 2);
    }

    #[test]
    fn nft_has_one_map_element_and_chain_per_service() {
        let rules = nft_ruleset(
            &[three()],
            "10.244.0.0/16",
            "10.100.0.0/16",
            &[Ipv4Addr::new(172, 30, 0, 1)],
        );
        let elements: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("add element ip kube-proxy service-ips"))
            .collect();
        assert_eq!(elements.len(), 1);
        assert!(elements[0].contains("10.100.0.1 . tcp . 80 : goto service-"));
        assert!(rules.contains("numgen random mod 3 vmap { 0 : goto endpoint-"));
        assert_eq!(rules.matches("dnat to").count(), 3);
        assert_eq!(
            rules
                .lines()
                .filter(|l| l.starts_with("add chain ip kube-proxy endpoint-"))
                .count(),
            3
        );
    }

    #[test]
    fn nft_ruleset_is_the_base_plus_the_services() {
        let svcs = [three()];
        let base = nft_ruleset(&[], "10.244.0.0/16", "10.100.0.0/16", &[]);
        let all = nft_ruleset(&svcs, "10.244.0.0/16", "10.100.0.0/16", &[]);
        assert_eq!(
            all,
            format!("{base}{}", nft_services(&svcs, "10.244.0.0/16"))
        );
        assert!(!base.contains("service-ips {{ 10."));
    }

    #[test]
    fn nft_update_replaces_the_service_chain_and_deletes_lost_endpoints() {
        let before = three();
        let mut after = before.clone();
        after.backends.pop();
        let update = nft_update(&before, &after, "10.244.0.0/16");
        assert!(update.contains("flush chain ip kube-proxy service-"));
        assert!(update.contains("numgen random mod 2 vmap"));
        assert_eq!(update.matches("delete chain").count(), 1);
    }
}
