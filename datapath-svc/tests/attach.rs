//! The programs load and pin their maps; the pod programs go on a veth as
//! tc filters that outlive the loading process, a second load (a restart)
//! swaps its programs into those filters, and TCX links an earlier release
//! pinned for the veth are released. Needs root and eBPF, as CI has.

use std::{path::PathBuf, process::Command};

use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions};
use datapath_svc::bpf::{LoadConfig, Programs, ensure_bpffs};
use futures::TryStreamExt as _;
use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};

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

const VETH: &str = "wfttest0";

/// What the kernel runs on the veth: the tc bpf filters' program ids and
/// the TCX programs, per direction (ingress, egress).
#[derive(Debug, Clone, PartialEq)]
struct Attached {
    tc: (Vec<u32>, Vec<u32>),
    tcx: (usize, usize),
}

async fn tc_programs(handle: &rtnetlink::Handle, ifindex: u32, egress: bool) -> Vec<u32> {
    let mut tf = handle.traffic_filter(ifindex as i32);
    let request = tf.get();
    let request = if egress {
        request.egress()
    } else {
        request.ingress()
    };
    let filters: Vec<_> = request.execute().try_collect().await.unwrap_or_default();
    filters
        .iter()
        .flat_map(|f| &f.attributes)
        .filter_map(|a| match a {
            TcAttribute::Options(opts) => Some(opts),
            _ => None,
        })
        .flatten()
        .filter_map(|o| match o {
            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(id),
            _ => None,
        })
        .copied()
        .collect()
}

fn tcx_count(attach_type: TcAttachType) -> usize {
    SchedClassifier::query_tcx(VETH, attach_type)
        .map(|(_, progs)| progs.len())
        .unwrap_or_default()
}

/// Loads the programs (in the calling thread's namespace), optionally
/// attaches the pod programs to the veth, and reports what is attached.
fn load_and_attach(dir: &std::path::Path, attach: bool) -> anyhow::Result<Attached> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (mut progs, _maps, _counters) = Programs::load(dir, &LoadConfig::default())?;
        let pods = progs.take_pod_programs().expect("pod programs");
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        let ifindex = datapath_svc::podnet::link_index(&handle, VETH)
            .await?
            .expect("the veth exists");
        if attach {
            pods.attach(&handle, ifindex, VETH).await?;
        }
        Ok(Attached {
            tc: (
                tc_programs(&handle, ifindex, false).await,
                tc_programs(&handle, ifindex, true).await,
            ),
            tcx: (
                tcx_count(TcAttachType::Ingress),
                tcx_count(TcAttachType::Egress),
            ),
        })
    })
}

#[test]
fn pod_programs_attach_as_tc_filters_that_a_reload_replaces() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (eBPF)"
    );
    let ns = Netns(format!("dpattach{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&[
        "-n", &ns.0, "link", "add", VETH, "type", "veth", "peer", "name", "wfttest1",
    ]);
    ip(&["-n", &ns.0, "link", "set", VETH, "up"]);
    let root = PathBuf::from("/sys/fs/bpf");
    ensure_bpffs(&root).expect("bpffs");
    let pin_dir = root.join("weft").join(&ns.0);
    let netns_path = PathBuf::from("/run/netns").join(&ns.0);

    // An earlier release's TCX links, pinned where it kept them.
    let dir = pin_dir.clone();
    weft_common::netns::run_in(&netns_path, move || {
        let (progs, _maps, _counters) = Programs::load(&dir, &LoadConfig::default())?;
        drop(progs);
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/weft.bpf.o"
            )))?;
        for (name, t, direction) in [
            ("from_container", TcAttachType::Ingress, "ingress"),
            ("to_container", TcAttachType::Egress, "egress"),
        ] {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).expect("in the object").try_into()?;
            prog.load()?;
            let id =
                prog.attach_with_options(VETH, t, TcAttachOptions::TcxOrder(LinkOrder::default()))?;
            let link = FdLink::try_from(prog.take_link(id)?)?;
            link.pin(dir.join("links").join(format!("{VETH}@{direction}")))?;
        }
        Ok(())
    })
    .expect("an earlier release's TCX links");

    let dir = pin_dir.clone();
    let first = weft_common::netns::run_in(&netns_path, move || load_and_attach(&dir, true))
        .expect("first load and attach");
    assert_eq!(first.tc.0.len(), 1, "one program on ingress: {first:?}");
    assert_eq!(first.tc.1.len(), 1, "one program on egress: {first:?}");
    assert_eq!(first.tcx, (0, 0), "the old TCX links are released");
    assert!(
        !pin_dir.join(format!("links/{VETH}@ingress")).exists(),
        "and their pins removed"
    );
    for f in ["weft_lb4_services", "weft_ct4_services"] {
        assert!(pin_dir.join(f).exists(), "{f} pinned");
    }

    // The loading process is gone (its objects dropped): the filters stay,
    // and a new load swaps its programs into them.
    let dir = pin_dir.clone();
    let still = weft_common::netns::run_in(&netns_path, move || load_and_attach(&dir, false))
        .expect("look");
    assert_eq!(
        still.tc, first.tc,
        "programs stay attached with no loader running"
    );
    let dir = pin_dir.clone();
    let after = weft_common::netns::run_in(&netns_path, move || load_and_attach(&dir, true))
        .expect("reload");
    assert_eq!(after.tc.0.len(), 1, "a reload replaces, it does not stack");
    assert_eq!(after.tc.1.len(), 1, "a reload replaces, it does not stack");
    assert_ne!(
        after.tc.0, first.tc.0,
        "the new program is the one attached"
    );
    assert_ne!(
        after.tc.1, first.tc.1,
        "the new program is the one attached"
    );
    let _ = std::fs::remove_dir_all(&pin_dir);
}
