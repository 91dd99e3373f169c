//! Network namespaces and links for the lab, made with iproute2.
//!
//! The lab is a harness around the product, so it uses the `ip` tool an
//! operator would use by hand; weft itself speaks netlink directly.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The control plane's address on the lab network.
pub const CP_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
/// ExternalIPs the lab network routes to the first node, as an upstream
/// router would.
pub const EXTERNAL_IP_RANGE: &str = "192.0.2.0/24";
/// LoadBalancer ingress IPs the lab network routes to the last node, as a
/// load balancer announcing them would.
pub const LOAD_BALANCER_RANGE: &str = "198.51.100.0/24";

/// The address of the `i`th node (from 0) on the lab network.
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 0, 11 + i as u8)
}

/// The lab's network: a control-plane namespace `cp` holding a bridge at
/// [`CP_ADDR`]/24, and each node a namespace whose `eth0` is on that
/// bridge at its address. The control-plane namespace doubles as the world
/// outside the cluster: it routes external and load-balancer addresses to
/// the first and last node, as a router and a load balancer would.
pub fn build_topology(cp: &str, nodes: &[(String, Ipv4Addr)]) -> anyhow::Result<()> {
    netns_add(cp)?;
    ip_in(cp, &["link", "add", "br0", "type", "bridge"])?;
    ip_in(cp, &["addr", "add", &format!("{CP_ADDR}/24"), "dev", "br0"])?;
    ip_in(cp, &["link", "set", "br0", "up"])?;
    for (i, (node, addr)) in nodes.iter().enumerate() {
        netns_add(node)?;
        let port = format!("n{}", i + 1);
        ip_in(
            cp,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", node,
            ],
        )?;
        ip_in(cp, &["link", "set", &port, "master", "br0", "up"])?;
        ip_in(node, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip_in(node, &["link", "set", "eth0", "up"])?;
    }
    if let (Some((_, first)), Some((_, last))) = (nodes.first(), nodes.last()) {
        ip_in(
            cp,
            &["route", "add", EXTERNAL_IP_RANGE, "via", &first.to_string()],
        )?;
        ip_in(
            cp,
            &[
                "route",
                "add",
                LOAD_BALANCER_RANGE,
                "via",
                &last.to_string(),
            ],
        )?;
    }
    Ok(())
}

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n NS ...`.
pub fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Creates a namespace with its loopback up; an existing one is replaced.
pub fn netns_add(name: &str) -> anyhow::Result<()> {
    if netns_exists(name) {
        netns_del(name)?;
    }
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])
}

pub fn netns_del(name: &str) -> anyhow::Result<()> {
    if netns_exists(name) {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

/// Every namespace whose name starts with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Writes a sysctl inside a namespace.
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("running sysctl")?;
    if !status.success() {
        bail!("sysctl {key}={value} in {ns} failed");
    }
    Ok(())
}
