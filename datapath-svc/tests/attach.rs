//! The programs load, pin their maps, attach to a veth through pinned TCX
//! links, and a second load (a restart) swaps itself into those links.
//! Needs root and eBPF, as CI has.

use std::{path::PathBuf, process::Command};

use datapath_svc::bpf::{Programs, ensure_bpffs};

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "ip {args:?}");
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Program ids attached to `ifname` in one direction, via TCX query.
fn attached(ifname: &str, egress: bool) -> Vec<u32> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let t = if egress {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    };
    SchedClassifier::query_tcx(ifname, t)
        .map(|(_, progs)| progs.iter().map(|p| p.id()).collect())
        .unwrap_or_default()
}

#[test]
fn programs_attach_through_pinned_links_and_a_reload_replaces_them() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (eBPF)"
    );
    let ns = Netns(format!("dpattach{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&[
        "-n", &ns.0, "link", "add", "wfttest0", "type", "veth", "peer", "name", "wfttest1",
    ]);
    ip(&["-n", &ns.0, "link", "set", "wfttest0", "up"]);
    let root = PathBuf::from("/sys/fs/bpf");
    ensure_bpffs(&root).expect("bpffs");
    let pin_dir = root.join("weft").join(&ns.0);
    let netns_path = PathBuf::from("/run/netns").join(&ns.0);

    let dir = pin_dir.clone();
    let first = weft_common::netns::run_in(&netns_path, move || {
        let (mut progs, _maps, _counters) =
            Programs::load(&dir, &datapath_svc::bpf::LoadConfig::default())?;
        progs.attach("wfttest0")?;
        Ok((attached("wfttest0", false), attached("wfttest0", true)))
    })
    .expect("first load and attach");
    assert_eq!(first.0.len(), 1, "one program on ingress");
    assert_eq!(first.1.len(), 1, "one program on egress");
    for f in [
        "links/wfttest0@ingress",
        "links/wfttest0@egress",
        "weft_lb4_services",
        "weft_ct4_services",
    ] {
        assert!(pin_dir.join(f).exists(), "{f} pinned");
    }

    // The loading process is gone (its objects dropped): the links stay,
    // and a new load swaps its program into them.
    let dir = pin_dir.clone();
    let (still, after) = weft_common::netns::run_in(&netns_path, move || {
        let still = (attached("wfttest0", false), attached("wfttest0", true));
        let (mut progs, _maps, _counters) =
            Programs::load(&dir, &datapath_svc::bpf::LoadConfig::default())?;
        progs.attach("wfttest0")?;
        Ok((
            still,
            (attached("wfttest0", false), attached("wfttest0", true)),
        ))
    })
    .expect("reload");
    assert_eq!(
        still, first,
        "programs stay attached with no loader running"
    );
    assert_eq!(after.0.len(), 1, "a reload replaces, it does not stack");
    assert_ne!(after.0, first.0, "the new program is the one attached");

    let dir = pin_dir.clone();
    let (kept, detached) = weft_common::netns::run_in(&netns_path, move || {
        let kept = (attached("wfttest0", false), attached("wfttest0", true));
        let (mut progs, _maps, _counters) =
            Programs::load(&dir, &datapath_svc::bpf::LoadConfig::default())?;
        assert_eq!(progs.attached_interfaces(), vec!["wfttest0".to_string()]);
        progs.detach("wfttest0")?;
        Ok((
            kept,
            (attached("wfttest0", false), attached("wfttest0", true)),
        ))
    })
    .expect("detach");
    assert_eq!(
        kept, after,
        "the replaced programs outlive their loader too"
    );
    assert!(
        detached.0.is_empty() && detached.1.is_empty(),
        "detach removes both"
    );
    assert!(
        !pin_dir.join("links/wfttest0@ingress").exists(),
        "the pins are gone"
    );
    let _ = std::fs::remove_dir_all(&pin_dir);
}
