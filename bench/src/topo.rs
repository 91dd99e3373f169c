//! The same pods-and-node shape as weft's lab, without weft: a node
//! namespace and pod namespaces joined by veth pairs, plumbed exactly as
//! datapath-svc plumbs a pod (a /32 on the pod's `eth0`, a default route
//! through the link-local gateway 169.254.1.1 pinned to the host veth's
//! MAC, a /32 route back on the node). kube-proxy-style rules go into the
//! node namespace, where the pods' packets are routed.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use weft_lab::net::{ip_in, netns_add, netns_del, netns_path, netns_with_prefix, sysctl_in};

use crate::services::TARGET_PORT;

pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The node's own address, on a device standing in for its NIC.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 100);

/// A pod of the plain topology.
pub struct PlainPod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    server: Option<Child>,
}

/// A node namespace, a client pod and backend pods running the lab's pod
/// server.
pub struct Plain {
    pub prefix: String,
    pub node: String,
    pub client: PlainPod,
    pub backends: Vec<PlainPod>,
}

impl Plain {
    /// Builds the topology (removing any left over with the same prefix)
    /// and starts `backends` pod servers from `weft_lab_bin`.
    pub fn up(prefix: &str, weft_lab_bin: &Path, backends: usize) -> anyhow::Result<Self> {
        clean(prefix)?;
        let node = format!("{prefix}-node");
        netns_add(&node)?;
        // A veth with its peer left dangling stands in for the node's NIC
        // (this kernel has no dummy devices).
        ip_in(
            &node,
            &[
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0-peer",
            ],
        )?;
        ip_in(
            &node,
            &["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"],
        )?;
        ip_in(&node, &["link", "set", "eth0", "up"])?;
        sysctl_in(&node, "net.ipv4.ip_forward", "1")?;
        let mut plain = Self {
            prefix: prefix.to_string(),
            node: node.clone(),
            client: plumb(prefix, &node, "client", CLIENT_IP, 100)?,
            backends: Vec::new(),
        };
        client_sysctls(&plain.client.netns)?;
        for i in 0..backends {
            let ip = Ipv4Addr::new(10, 244, 0, 2 + i as u8);
            let mut pod = plumb(prefix, &node, &format!("be-{}", i + 1), ip, i as u8 + 1)?;
            let child = Command::new("nsenter")
                .arg(format!("--net={}", netns_path(&pod.netns).display()))
                .arg(weft_lab_bin)
                .args([
                    "pod-server",
                    &format!("--name={}", pod.name),
                    &format!("--port={TARGET_PORT}"),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", weft_lab_bin.display()))?;
            pod.server = Some(child);
            plain.backends.push(pod);
        }
        for b in &plain.backends {
            wait_listening(&plain.client.netns, SocketAddr::from((b.ip, TARGET_PORT)))?;
        }
        Ok(plain)
    }

    /// Runs `program args` in the node namespace with `stdin`; returns how
    /// long it took. Fails with its stderr when it fails.
    pub fn run_in_node(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<Duration> {
        run_in_netns(&self.node, program, args, stdin)
    }

    pub fn down(mut self) {
        for pod in self.backends.iter_mut() {
            if let Some(mut c) = pod.server.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = clean(&self.prefix);
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        for pod in self.backends.iter_mut() {
            if let Some(mut c) = pod.server.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Runs `program args` inside namespace `netns` (entering only its network
/// namespace), feeding it `stdin`; returns the wall time it took.
pub fn run_in_netns(
    netns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns_path(netns).display()))
        .arg(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (is it installed?)"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("feeding {program}"))?;
    }
    let out = child.wait_with_output()?;
    let took = started.elapsed();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.lines().take(5).collect::<Vec<_>>().join(" | ");
        bail!("{program} {} failed: {err}", args.join(" "));
    }
    Ok(took)
}

/// The client pod's settings, the same in every topology: the whole
/// ephemeral port range, so the connection-rate test does not run out.
pub fn client_sysctls(netns: &str) -> anyhow::Result<()> {
    sysctl_in(netns, "net.ipv4.ip_local_port_range", "1024 65535")
}

/// Removes namespaces (and their veths) of an earlier run.
pub fn clean(prefix: &str) -> anyhow::Result<()> {
    for ns in netns_with_prefix(&format!("{prefix}-")) {
        netns_del(&ns)?;
    }
    Ok(())
}

fn plumb(prefix: &str, node: &str, name: &str, ip: Ipv4Addr, k: u8) -> anyhow::Result<PlainPod> {
    let netns = format!("{prefix}-{name}");
    netns_add(&netns)?;
    let host_if = format!("vh{k}");
    let host_mac = format!("02:00:00:00:{k:02x}:01");
    ip_in(
        node,
        &[
            "link", "add", &host_if, "address", &host_mac, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ],
    )?;
    ip_in(node, &["link", "set", &host_if, "up"])?;
    ip_in(&netns, &["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    ip_in(&netns, &["link", "set", "eth0", "up"])?;
    ip_in(
        &netns,
        &[
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ],
    )?;
    ip_in(
        &netns,
        &[
            "neigh",
            "replace",
            "169.254.1.1",
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    )?;
    ip_in(
        &netns,
        &[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ],
    )?;
    ip_in(
        node,
        &[
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            &host_if,
            "scope",
            "link",
        ],
    )?;
    Ok(PlainPod {
        name: name.to_string(),
        netns,
        ip,
        server: None,
    })
}

/// Waits until `addr` accepts connections from inside `netns`.
pub fn wait_listening(netns: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let path = netns_path(netns);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let up = weft_common::netns::run_in(&path, move || {
            Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        })?;
        if up {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{addr} does not answer from {netns}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
