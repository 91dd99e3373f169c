//! The pod programs on a pod's host-side veth, through classic tc: a
//! `clsact` qdisc with one direct-action `bpf` filter per direction, added
//! over netlink.
//!
//! The node's own devices carry their programs through TCX links (see
//! [`crate::bpf`]); pod veths do not, because a TCX attach holds the RTNL
//! lock across an RCU grace period (15 to 25 ms on a small virtual machine).
//! A pod would cost two of them on the CNI ADD path, and pods added at once
//! would queue behind each other and behind every other netlink user on the
//! node. A classic filter is added in well under a millisecond. It belongs
//! to the interface: it outlives this process without a pin and goes with
//! the veth. And `replace` on the same handle swaps the program in place,
//! atomically, when a restarted agent attaches the programs it loaded.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::programs::{ProgramFd, links::PinnedLink};
use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    Handle,
    packet_core::{
        NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
        NetlinkPayload,
    },
    packet_route::{
        RouteNetlinkMessage,
        tc::{TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
    },
};

use crate::bpf::BpfError;

/// The filter's priority and handle: one filter per direction, always the
/// same, so a re-attach replaces rather than stacks.
const PRIORITY: u16 = 1;
const HANDLE: u32 = 1;
const ETH_P_ALL: u16 = 0x0003;

/// The two pod programs, by direction as the host-side veth sees it.
#[derive(Debug)]
pub struct PodPrograms {
    /// Packets leaving the pod: the veth's ingress.
    from_container: ProgramFd,
    /// Packets entering the pod: the veth's egress.
    to_container: ProgramFd,
    /// The kernel's ids of the two, for CHECK to find them on a veth.
    ids: ProgramIds,
    /// Where earlier releases pinned TCX links of pod veths.
    links_dir: PathBuf,
}

/// The kernel's ids of the pod programs.
#[derive(Debug, Clone, Copy)]
pub struct ProgramIds {
    pub from_container: u32,
    pub to_container: u32,
}

impl PodPrograms {
    pub(crate) fn new(
        from_container: ProgramFd,
        to_container: ProgramFd,
        ids: ProgramIds,
        links_dir: &Path,
    ) -> Self {
        Self {
            from_container,
            to_container,
            ids,
            links_dir: links_dir.to_path_buf(),
        }
    }

    /// CHECK: whether the veth `ifindex` still carries both programs, these
    /// very ones (a filter removed, or replaced by another program, fails).
    /// `Err` says which is missing.
    pub async fn verify(&self, handle: &Handle, ifindex: u32) -> Result<(), String> {
        let wanted = [
            ("from_container", "ingress", self.ids.from_container),
            ("to_container", "egress", self.ids.to_container),
        ];
        for (name, direction, id) in wanted {
            let request = handle.traffic_filter(ifindex as i32).get();
            let request = if direction == "ingress" {
                request.ingress()
            } else {
                request.egress()
            };
            // No clsact qdisc at all answers with an error: not attached.
            let filters: Vec<TcMessage> = request.execute().try_collect().await.unwrap_or_default();
            let attached = filters.iter().any(|f| {
                f.attributes.iter().any(|a| {
                    matches!(a, TcAttribute::Options(opts) if opts.iter().any(|o| {
                        matches!(o, TcOption::Bpf(TcFilterBpfOption::ProgId(i)) if *i == id)
                    }))
                })
            });
            if !attached {
                return Err(format!(
                    "the {name} program is not attached to the host veth's {direction}"
                ));
            }
        }
        Ok(())
    }

    /// Attaches both programs to the veth `ifindex` (named `ifname`), or
    /// swaps them into the filters already there.
    pub async fn attach(
        &self,
        handle: &Handle,
        ifindex: u32,
        ifname: &str,
    ) -> Result<(), BpfError> {
        let err = |direction: &'static str| {
            move |e: rtnetlink::Error| BpfError::Attach {
                target: ifname.to_string(),
                direction,
                message: e.to_string(),
            }
        };
        match request(handle, clsact(ifindex), NLM_F_CREATE | NLM_F_EXCL).await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => {}
            Err(e) => return Err(err("clsact")(e)),
        }
        let flags = NLM_F_CREATE | NLM_F_REPLACE;
        let ingress = bpf_filter(
            ifindex,
            TcHandle::MIN_INGRESS,
            &self.from_container,
            "from_container",
        );
        let egress = bpf_filter(
            ifindex,
            TcHandle::MIN_EGRESS,
            &self.to_container,
            "to_container",
        );
        let (ingress, egress) = futures::join!(
            request(handle, ingress, flags),
            request(handle, egress, flags)
        );
        ingress.map_err(err("ingress"))?;
        egress.map_err(err("egress"))?;
        self.forget_tcx_links(ifname);
        Ok(())
    }

    /// Releases TCX links an earlier release pinned for this veth; the tc
    /// filters carry the programs now.
    pub fn forget_tcx_links(&self, ifname: &str) {
        for direction in ["ingress", "egress"] {
            let path = self.links_dir.join(format!("{ifname}@{direction}"));
            if let Ok(pinned) = PinnedLink::from_pin(&path) {
                // Unpinning and dropping the last reference detaches it.
                drop(pinned.unpin());
            } else {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

/// `tc qdisc add dev <ifindex> clsact`.
fn clsact(ifindex: u32) -> RouteNetlinkMessage {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = TcHandle::CLSACT;
    msg.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    msg.attributes.push(TcAttribute::Kind("clsact".into()));
    RouteNetlinkMessage::NewQueueDiscipline(msg)
}

/// `tc filter replace dev <ifindex> <ingress|egress> prio 1 handle 1 bpf da
/// fd <program>`.
fn bpf_filter(
    ifindex: u32,
    direction: u16,
    program: &ProgramFd,
    name: &str,
) -> RouteNetlinkMessage {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = TcHandle {
        major: 0xffff,
        minor: direction,
    };
    msg.header.handle = HANDLE.into();
    msg.header.info = u32::from(PRIORITY) << 16 | u32::from(ETH_P_ALL.to_be());
    msg.attributes.push(TcAttribute::Kind("bpf".into()));
    msg.attributes.push(TcAttribute::Options(vec![
        TcOption::Bpf(TcFilterBpfOption::ProgFd(program.as_fd().as_raw_fd() as u32)),
        TcOption::Bpf(TcFilterBpfOption::ProgName(name.into())),
        TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
    ]));
    RouteNetlinkMessage::NewTrafficFilter(msg)
}

/// Sends one request and waits for its acknowledgement.
async fn request(
    handle: &Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut response = handle.clone().request(req)?;
    while let Some(msg) = response.next().await {
        if let NetlinkPayload::Error(e) = msg.payload {
            return Err(rtnetlink::Error::NetlinkError(e));
        }
    }
    Ok(())
}
