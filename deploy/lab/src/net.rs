//! Network namespaces and links for the lab, made with iproute2.
//!
//! The lab is a harness around the product, so it uses the `ip` tool an
//! operator would use by hand; weft itself speaks netlink directly.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

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
