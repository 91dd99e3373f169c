//! Loading, pinning and attaching the eBPF programs, and the kernel side of
//! the load-balancer maps.
//!
//! Maps are pinned by name under the node's directory
//! (`/sys/fs/bpf/weft/<node>/`), so they outlive this process and a restart
//! finds them full. Each endpoint's attachments are TCX links pinned under
//! `links/`; they keep forwarding while no datapath-svc runs, and a new
//! datapath-svc swaps its freshly loaded program into them atomically.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};

use crate::{
    maps::{Lb4Backend, Lb4Key, Lb4ReverseNat, Lb4Service, MetricsValue, Reason, names},
    sync::{LbMaps, SyncError},
};

/// The compiled programs (see build.rs).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft.bpf.o"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("bpffs at {path}: {message}")]
    BpfFs { path: String, message: String },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("attaching to {ifname} ({direction}): {message}")]
    Attach {
        ifname: String,
        direction: &'static str,
        message: String,
    },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

pub type Result<T, E = BpfError> = std::result::Result<T, E>;

/// The programs of one node and where its pins live.
pub struct Programs {
    ebpf: Ebpf,
    links_dir: PathBuf,
}

/// Both directions of a pod veth, host side.
const ATTACHMENTS: [(&str, TcAttachType, &str); 2] = [
    ("from_container", TcAttachType::Ingress, "ingress"),
    ("to_container", TcAttachType::Egress, "egress"),
];

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

/// The kernel's load-balancer maps.
pub struct KernelLbMaps {
    services: BpfHashMap<MapData, Lb4Key, Lb4Service>,
    backends: BpfHashMap<MapData, u32, Lb4Backend>,
    rev_nat: BpfHashMap<MapData, u16, Lb4ReverseNat>,
}

/// Per-reason packet counters.
pub struct Counters {
    map: PerCpuArray<MapData, MetricsValue>,
}

impl Programs {
    /// Loads the programs, re-using the maps pinned in `pin_dir` (creating
    /// and pinning them on first start).
    pub fn load(pin_dir: &Path) -> Result<(Self, KernelLbMaps, Counters)> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| BpfError::Io { path, source }
        };
        fs::create_dir_all(pin_dir).map_err(io(pin_dir))?;
        let links_dir = pin_dir.join("links");
        fs::create_dir_all(&links_dir).map_err(io(&links_dir))?;
        raise_memlock_limit();

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(PROGRAMS)?;
        for (name, _, _) in ATTACHMENTS {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| BpfError::Program { name, source })?;
        }
        let maps = KernelLbMaps {
            services: take_hash(&mut ebpf, names::LB4_SERVICES)?,
            backends: take_hash(&mut ebpf, names::LB4_BACKENDS)?,
            rev_nat: take_hash(&mut ebpf, names::LB4_REVERSE_NAT)?,
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
        Ok((Self { ebpf, links_dir }, maps, counters))
    }

    /// bpffs refuses names with a dot, hence `<ifname>@<direction>`.
    fn link_path(&self, ifname: &str, direction: &str) -> PathBuf {
        self.links_dir.join(format!("{ifname}@{direction}"))
    }

    /// Attaches both programs to a pod's host-side veth. Where a pinned link
    /// exists already (a restart), the program inside it is replaced
    /// atomically instead, so no packet passes unprocessed.
    pub fn attach(&mut self, ifname: &str) -> Result<()> {
        for (name, attach_type, direction) in ATTACHMENTS {
            let path = self.link_path(ifname, direction);
            let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
            let err = |message: String| BpfError::Attach {
                ifname: ifname.to_string(),
                direction,
                message,
            };
            if let Ok(pinned) = PinnedLink::from_pin(&path) {
                let replaced = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| describe(&e))
                    .and_then(|link| prog.attach_to_link(link).map_err(|e| describe(&e)))
                    // The pin keeps the link; holding another descriptor here
                    // would keep it alive past a detach.
                    .and_then(|id| prog.take_link(id).map(drop).map_err(|e| describe(&e)));
                match replaced {
                    Ok(()) => continue,
                    // The interface behind the link is gone (an interface of
                    // the same name is new): start over with a fresh link.
                    Err(e) => {
                        tracing::debug!(ifname, direction, error = %e, "stale pinned link replaced");
                        let _ = fs::remove_file(&path);
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
                .pin(&path)
                .map_err(|e| err(format!("pinning {}: {}", path.display(), describe(&e))))?;
        }
        Ok(())
    }

    /// Detaches both programs from a pod's veth (if still there) and removes
    /// the pins.
    pub fn detach(&mut self, ifname: &str) -> Result<()> {
        for (_, _, direction) in ATTACHMENTS {
            let path = self.link_path(ifname, direction);
            match PinnedLink::from_pin(&path) {
                // Unpinning and dropping the last reference detaches it.
                Ok(pinned) => drop(pinned.unpin()),
                Err(_) => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }

    /// Host interface names that have pinned links.
    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.links_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.rsplit_once('@').map(|(ifname, _)| ifname.to_string())
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
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

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or(BpfError::Map {
            name,
            message: "program not in the object".into(),
        })?
        .try_into()
        .map_err(|source| BpfError::Program { name, source })
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
        })
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
