//! Loading, pinning and attaching the eBPF programs, and the kernel side of
//! the load-balancer maps.
//!
//! Maps are pinned by name under the node's directory
//! (`/sys/fs/bpf/weft/<node>/`), so they outlive this process and a restart
//! finds them full. The node's devices and the cgroup carry the programs
//! through BPF links pinned under `links/`; pod veths through tc filters
//! (see [`crate::podattach`]). Either way they keep forwarding while no
//! datapath-svc runs, and a new datapath-svc swaps its freshly loaded
//! program in atomically (tc, TCX) or attaches beside the old one and then
//! drops it (cgroup socket hooks, whose programs are idempotent, so running
//! both for a moment is harmless).

use std::{
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf, lpm_trie::LpmTrie},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use ipnet::Ipv4Net;

use crate::{
    maps::{
        EndpointPolicy, IpcacheEntry, IpcacheKey, Lb4Backend, Lb4Key, Lb4MaglevBlock, Lb4MaglevKey,
        Lb4ReverseNat, Lb4Service, MetricsValue, PolicyEntry, PolicyKey, Reason, be_addr, globals,
        names,
    },
    podattach::PodPrograms,
    sync::{LbMaps, MaglevConfig, SyncError},
};

/// The compiled programs (see build.rs).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft.bpf.o"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("bpffs at {path}: {message}")]
    BpfFs { path: String, message: String },
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("eBPF program {name}: {message}")]
    Program { name: &'static str, message: String },
    #[error("eBPF map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("attaching to {target} ({direction}): {message}")]
    Attach {
        target: String,
        direction: &'static str,
        message: String,
    },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

pub type Result<T, E = BpfError> = std::result::Result<T, E>;

/// What the programs are told at load time.
#[derive(Debug, Clone, Default)]
pub struct LoadConfig {
    /// The node's network namespace, for the socket hooks to recognise it.
    pub netns_cookie: u64,
    /// The cluster's pod CIDR: pod traffic leaving it is masqueraded.
    pub cluster_cidr: Option<Ipv4Net>,
    pub masquerade: bool,
    pub maglev: MaglevConfig,
    /// Capacity of the service and backend maps (Cilium's
    /// `bpf-lb-map-max`); 0 keeps the compiled-in 65536. A frontend takes
    /// one service entry plus one per backend, so large clusters need more.
    /// Applies when the maps are created: maps already pinned keep their size.
    pub lb_map_max: u32,
}

/// The programs of one node and where its pins live.
pub struct Programs {
    ebpf: Ebpf,
    links_dir: PathBuf,
    node_addrs: BpfHashMap<MapData, u32, u32>,
    pods: Option<PodPrograms>,
}

/// The maps network policy is programmed into.
pub struct PolicyMaps {
    pub policy: LpmTrie<MapData, PolicyKey, PolicyEntry>,
    pub ipcache: LpmTrie<MapData, IpcacheKey, IpcacheEntry>,
    /// The CIDR identities of ipBlock rules, apart: an address matches
    /// its pod or node identity and its CIDR identity both.
    pub ipcache_cidr: LpmTrie<MapData, IpcacheKey, IpcacheEntry>,
    pub endpoints: BpfHashMap<MapData, u32, EndpointPolicy>,
}

/// An external device's attachments.
const DEVICE_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("from_netdev", TcAttachType::Ingress, "ingress"),
    ("to_netdev", TcAttachType::Egress, "egress"),
];

/// The socket hooks for the node's own processes.
const SOCK_PROGRAMS: [&str; 4] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
];

/// Pins of device attachments carry this prefix; pod veths have none.
const DEVICE_PIN_PREFIX: &str = "netdev-";
const CGROUP_PIN_PREFIX: &str = "cgroup-";

/// Makes sure a bpf filesystem is mounted at `root`, mounting one if not.
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    let err = |message: String| BpfError::BpfFs {
        path: root.display().to_string(),
        message,
    };
    fs::create_dir_all(root).map_err(|e| err(e.to_string()))?;
    let st = nix::sys::statfs::statfs(root).map_err(|e| err(e.to_string()))?;
    if st.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| err(format!("not a bpffs and mounting one failed: {e}")))
}

/// The cgroup v2 hierarchy's mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// The cookie of the calling thread's network namespace.
pub fn netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is
    // a valid, initialised u64; the socket fd is open for the call.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The kernel's load-balancer maps.
pub struct KernelLbMaps {
    services: BpfHashMap<MapData, Lb4Key, Lb4Service>,
    backends: BpfHashMap<MapData, u32, Lb4Backend>,
    rev_nat: BpfHashMap<MapData, u16, Lb4ReverseNat>,
    maglev: BpfHashMap<MapData, Lb4MaglevKey, Lb4MaglevBlock>,
}

/// Per-reason packet counters.
pub struct Counters {
    map: PerCpuArray<MapData, MetricsValue>,
}

/// An error with its chain of causes: aya's syscall errors keep the errno
/// in their source.
fn describe(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl Programs {
    /// Loads the programs, re-using the maps pinned in `pin_dir` (creating
    /// and pinning them on first start).
    pub fn load(pin_dir: &Path, cfg: &LoadConfig) -> Result<(Self, KernelLbMaps, Counters)> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| BpfError::Io { path, source }
        };
        fs::create_dir_all(pin_dir).map_err(io(pin_dir))?;
        let links_dir = pin_dir.join("links");
        fs::create_dir_all(&links_dir).map_err(io(&links_dir))?;
        raise_memlock_limit();

        let (cluster_net, cluster_mask) = match cfg.cluster_cidr {
            Some(c) => (be_addr(c.network()), be_addr(c.netmask())),
            None => (0, 0),
        };
        let masquerade = u32::from(cfg.masquerade && cfg.cluster_cidr.is_some());
        let mut loader = EbpfLoader::new();
        if cfg.lb_map_max > 0 {
            loader
                .map_max_entries(names::LB4_SERVICES, cfg.lb_map_max)
                .map_max_entries(names::LB4_BACKENDS, cfg.lb_map_max);
        }
        let mut ebpf = loader
            .default_map_pin_directory(pin_dir)
            .override_global(globals::NETNS_COOKIE, &cfg.netns_cookie, true)
            .override_global(globals::CLUSTER_NET, &cluster_net, true)
            .override_global(globals::CLUSTER_MASK, &cluster_mask, true)
            .override_global(globals::MAGLEV_M, &cfg.maglev.m, true)
            .override_global(globals::MASQUERADE, &masquerade, true)
            .override_global(globals::HASH_SEED, &cfg.maglev.seed, true)
            .load(PROGRAMS)
            .map_err(|e| BpfError::Load(describe(&e)))?;
        for name in ["from_container", "to_container"]
            .into_iter()
            .chain(DEVICE_PROGRAMS.map(|(name, _, _)| name))
        {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|e| BpfError::Program {
                name,
                message: describe(&e),
            })?;
        }
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| BpfError::Program {
                name,
                message: describe(&e),
            })?;
        }
        let pods = {
            let mut fd = |name: &'static str| -> Result<(aya::programs::ProgramFd, u32)> {
                let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
                let failed = |message: String| BpfError::Program { name, message };
                let id = prog.info().map_err(|e| failed(describe(&e)))?.id();
                let fd = prog.fd().map_err(|e| failed(describe(&e)))?;
                Ok((fd.try_clone().map_err(|e| failed(e.to_string()))?, id))
            };
            let (from_container, from_id) = fd("from_container")?;
            let (to_container, to_id) = fd("to_container")?;
            let ids = crate::podattach::ProgramIds {
                from_container: from_id,
                to_container: to_id,
            };
            PodPrograms::new(from_container, to_container, ids, &links_dir)
        };
        let maps = KernelLbMaps {
            services: take_hash(&mut ebpf, names::LB4_SERVICES)?,
            backends: take_hash(&mut ebpf, names::LB4_BACKENDS)?,
            rev_nat: take_hash(&mut ebpf, names::LB4_REVERSE_NAT)?,
            maglev: take_hash(&mut ebpf, names::LB4_MAGLEV)?,
        };
        let counters = {
            let map = ebpf.take_map(names::METRICS).ok_or(BpfError::Map {
                name: names::METRICS,
                message: "not in the object".into(),
            })?;
            Counters {
                map: PerCpuArray::try_from(map).map_err(|e| BpfError::Map {
                    name: names::METRICS,
                    message: e.to_string(),
                })?,
            }
        };
        let node_addrs = take_hash(&mut ebpf, names::NODE_ADDRS)?;
        Ok((
            Self {
                ebpf,
                pods: Some(pods),
                links_dir,
                node_addrs,
            },
            maps,
            counters,
        ))
    }

    /// The policy maps; `None` once taken.
    pub fn take_policy_maps(&mut self) -> Result<PolicyMaps> {
        fn lpm<K: aya::Pod, V: aya::Pod>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<LpmTrie<MapData, K, V>> {
            let map = ebpf.take_map(name).ok_or(BpfError::Map {
                name,
                message: "not in the object (or taken)".into(),
            })?;
            LpmTrie::try_from(map).map_err(|e| BpfError::Map {
                name,
                message: e.to_string(),
            })
        }
        Ok(PolicyMaps {
            policy: lpm(&mut self.ebpf, names::POLICY)?,
            ipcache: lpm(&mut self.ebpf, names::IPCACHE)?,
            ipcache_cidr: lpm(&mut self.ebpf, names::IPCACHE_CIDR)?,
            endpoints: take_hash(&mut self.ebpf, names::ENDPOINTS)?,
        })
    }

    /// The pods the socket hooks translate for.
    pub fn take_sock_pods(&mut self) -> Result<BpfHashMap<MapData, u64, crate::maps::Sock4Pod>> {
        take_hash(&mut self.ebpf, names::SOCK4_PODS)
    }

    /// The flow-event ring buffer.
    pub fn take_flows(&mut self) -> Result<RingBuf<MapData>> {
        let name = names::FLOWS;
        let map = self.ebpf.take_map(name).ok_or(BpfError::Map {
            name,
            message: "not in the object (or taken)".into(),
        })?;
        RingBuf::try_from(map).map_err(|e| BpfError::Map {
            name,
            message: e.to_string(),
        })
    }

    /// The pod programs, to attach to pod veths without this object's
    /// lock; `None` once taken.
    pub fn take_pod_programs(&mut self) -> Option<PodPrograms> {
        self.pods.take()
    }

    /// Attaches the device programs to one of the node's external devices,
    /// whose IPv4 address `addr` is the source for SNAT on it.
    pub fn attach_device(&mut self, ifname: &str, ifindex: u32, addr: Ipv4Addr) -> Result<()> {
        self.node_addrs
            .insert(ifindex, be_addr(addr), 0)
            .map_err(|e| BpfError::Map {
                name: names::NODE_ADDRS,
                message: e.to_string(),
            })?;
        let pin = format!("{DEVICE_PIN_PREFIX}{ifname}");
        for (name, attach_type, direction) in DEVICE_PROGRAMS {
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            attach_tc(
                prog,
                ifname,
                attach_type,
                direction,
                &link_path(&self.links_dir, &pin, direction),
            )?;
        }
        Ok(())
    }

    /// Attaches the socket programs to the cgroup v2 hierarchy at `root`:
    /// new links first, then the previous run's are dropped.
    pub fn attach_cgroup(&mut self, root: &Path) -> Result<()> {
        let cgroup = fs::File::open(root).map_err(|source| BpfError::Io {
            path: root.display().to_string(),
            source,
        })?;
        let old: Vec<PathBuf> = fs::read_dir(&self.links_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(CGROUP_PIN_PREFIX))
            })
            .collect();
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        for name in SOCK_PROGRAMS {
            let err = |message: String| BpfError::Attach {
                target: root.display().to_string(),
                direction: name,
                message,
            };
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| err(describe(&e)))?;
            let link = prog.take_link(id).map_err(|e| err(describe(&e)))?;
            let fd_link = FdLink::try_from(link).map_err(|e| err(describe(&e)))?;
            let path = self
                .links_dir
                .join(format!("{CGROUP_PIN_PREFIX}{name}@{generation}"));
            fd_link
                .pin(&path)
                .map_err(|e| err(format!("pinning {}: {}", path.display(), describe(&e))))?;
        }
        for path in old {
            match PinnedLink::from_pin(&path) {
                Ok(pinned) => drop(pinned.unpin()),
                Err(_) => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::Program {
            name,
            message: "not in the object".into(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| BpfError::Program {
            name,
            message: describe(&e),
        })
}

/// bpffs refuses names with a dot, hence `<ifname>@<direction>`.
fn link_path(links_dir: &Path, pin: &str, direction: &str) -> PathBuf {
    links_dir.join(format!("{pin}@{direction}"))
}

/// Attaches a tc program to an interface through a TCX link pinned at
/// `path`. Where that pin exists already (a restart), the program inside
/// it is replaced atomically instead, so no packet passes unprocessed.
fn attach_tc(
    prog: &mut SchedClassifier,
    ifname: &str,
    attach_type: TcAttachType,
    direction: &'static str,
    path: &Path,
) -> Result<()> {
    let err = |message: String| BpfError::Attach {
        target: ifname.to_string(),
        direction,
        message,
    };
    if let Ok(pinned) = PinnedLink::from_pin(path) {
        let replaced = SchedClassifierLink::try_from(FdLink::from(pinned))
            .map_err(|e| describe(&e))
            .and_then(|link| prog.attach_to_link(link).map_err(|e| describe(&e)))
            // The pin keeps the link; holding another descriptor here
            // would keep it alive past a detach.
            .and_then(|id| prog.take_link(id).map(drop).map_err(|e| describe(&e)));
        match replaced {
            Ok(()) => return Ok(()),
            // The interface behind the link is gone (an interface of the
            // same name is new): start over with a fresh link.
            Err(e) => {
                tracing::debug!(ifname, direction, error = %e, "stale pinned link replaced");
                let _ = fs::remove_file(path);
            }
        }
    }
    let id = prog
        .attach_with_options(
            ifname,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| err(describe(&e)))?;
    let link = prog.take_link(id).map_err(|e| err(describe(&e)))?;
    let fd_link = FdLink::try_from(link).map_err(|e| err(describe(&e)))?;
    fd_link
        .pin(path)
        .map_err(|e| err(format!("pinning {}: {}", path.display(), describe(&e))))?;
    Ok(())
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>> {
    let map = ebpf.take_map(name).ok_or(BpfError::Map {
        name,
        message: "not in the object".into(),
    })?;
    BpfHashMap::try_from(map).map_err(|e| BpfError::Map {
        name,
        message: e.to_string(),
    })
}

/// Kernels before 5.11 charge map memory to RLIMIT_MEMLOCK; lift it so
/// large maps load there too. Newer kernels ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> SyncError {
    move |e| SyncError::Map {
        map,
        message: e.to_string(),
    }
}

/// Removing what is already gone is fine: removals are idempotent.
fn ignore_missing(r: Result<(), aya::maps::MapError>, map: &'static str) -> Result<(), SyncError> {
    match r {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(e) => Err(map_err(map)(e)),
    }
}

impl LbMaps for KernelLbMaps {
    fn set_service(&mut self, key: Lb4Key, value: Lb4Service) -> Result<(), SyncError> {
        self.services
            .insert(key, value, 0)
            .map_err(map_err(names::LB4_SERVICES))
    }
    fn del_service(&mut self, key: Lb4Key) -> Result<(), SyncError> {
        ignore_missing(self.services.remove(&key), names::LB4_SERVICES)
    }
    fn set_backend(&mut self, id: u32, value: Lb4Backend) -> Result<(), SyncError> {
        self.backends
            .insert(id, value, 0)
            .map_err(map_err(names::LB4_BACKENDS))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), SyncError> {
        ignore_missing(self.backends.remove(&id), names::LB4_BACKENDS)
    }
    fn set_rev_nat(&mut self, id: u16, value: Lb4ReverseNat) -> Result<(), SyncError> {
        self.rev_nat
            .insert(id, value, 0)
            .map_err(map_err(names::LB4_REVERSE_NAT))
    }
    fn del_rev_nat(&mut self, id: u16) -> Result<(), SyncError> {
        ignore_missing(self.rev_nat.remove(&id), names::LB4_REVERSE_NAT)
    }
    fn set_maglev(&mut self, key: Lb4MaglevKey, value: Lb4MaglevBlock) -> Result<(), SyncError> {
        self.maglev
            .insert(key, value, 0)
            .map_err(map_err(names::LB4_MAGLEV))
    }
    fn del_maglev(&mut self, key: Lb4MaglevKey) -> Result<(), SyncError> {
        ignore_missing(self.maglev.remove(&key), names::LB4_MAGLEV)
    }
    fn services(&self) -> Result<Vec<(Lb4Key, Lb4Service)>, SyncError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::LB4_SERVICES))
    }
    fn backends(&self) -> Result<Vec<(u32, Lb4Backend)>, SyncError> {
        self.backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::LB4_BACKENDS))
    }
    fn rev_nats(&self) -> Result<Vec<(u16, Lb4ReverseNat)>, SyncError> {
        self.rev_nat
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::LB4_REVERSE_NAT))
    }
    fn maglev(&self) -> Result<Vec<(Lb4MaglevKey, Lb4MaglevBlock)>, SyncError> {
        self.maglev
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(names::LB4_MAGLEV))
    }
}

impl KernelLbMaps {
    /// Opens the pinned maps of a node without loading programs (tests and
    /// diagnostics read them this way).
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        fn open<K: aya::Pod, V: aya::Pod>(
            dir: &Path,
            name: &'static str,
        ) -> Result<BpfHashMap<MapData, K, V>> {
            let data = MapData::from_pin(dir.join(name)).map_err(|e| BpfError::Map {
                name,
                message: e.to_string(),
            })?;
            BpfHashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|e| BpfError::Map {
                name,
                message: e.to_string(),
            })
        }
        Ok(Self {
            services: open(pin_dir, names::LB4_SERVICES)?,
            backends: open(pin_dir, names::LB4_BACKENDS)?,
            rev_nat: open(pin_dir, names::LB4_REVERSE_NAT)?,
            maglev: open(pin_dir, names::LB4_MAGLEV)?,
        })
    }

    /// One service-map entry, if programmed.
    pub fn service(&self, key: &Lb4Key) -> Option<Lb4Service> {
        self.services.get(key, 0).ok()
    }

    /// How many frontends are programmed (one reverse-NAT entry each),
    /// without walking the much larger service map.
    pub fn frontends(&self) -> usize {
        self.rev_nat.keys().filter(|k| k.is_ok()).count()
    }

    /// (name, entries, max entries) of each map, for status pages.
    pub fn fill(&self) -> Vec<(&'static str, u64, u64)> {
        fn fill<K: aya::Pod, V: aya::Pod>(
            name: &'static str,
            m: &BpfHashMap<MapData, K, V>,
        ) -> (&'static str, u64, u64) {
            let entries = m.keys().filter(|k| k.is_ok()).count() as u64;
            let max = aya::maps::IterableMap::map(m)
                .info()
                .map(|i| u64::from(i.max_entries()))
                .unwrap_or(0);
            (name, entries, max)
        }
        vec![
            fill(names::LB4_SERVICES, &self.services),
            fill(names::LB4_BACKENDS, &self.backends),
            fill(names::LB4_REVERSE_NAT, &self.rev_nat),
            fill(names::LB4_MAGLEV, &self.maglev),
        ]
    }
}

impl Counters {
    /// Packets and bytes per reason, summed over CPUs.
    pub fn read(&self) -> Vec<(Reason, MetricsValue)> {
        Reason::ALL
            .iter()
            .filter_map(|r| {
                let per_cpu = self.map.get(&(*r as u32), 0).ok()?;
                let total = per_cpu
                    .iter()
                    .fold(MetricsValue::default(), |acc, v| MetricsValue {
                        packets: acc.packets + v.packets,
                        bytes: acc.bytes + v.bytes,
                    });
                Some((*r, total))
            })
            .collect()
    }
}
