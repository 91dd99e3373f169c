//! A node of the real cluster: a network namespace (from the lab's
//! topology) plus a mount namespace of its own, in which a containerd and
//! a kubelet run.
//!
//! The mount namespace is what makes two nodes of one machine two nodes:
//! the paths a node's software shares with its pods by `hostPath` (the CNI
//! config and plugin directories, `/run/weft` with the CNI socket,
//! `/var/lib/weft`, the pod network namespaces under `/run/netns`, the
//! kubelet's and containerd's state) are each bound to a directory of that
//! node's own, as a machine of its own would have them. Everything else
//! (`/sys/fs/bpf`, where weft pins per node name; `/sys/fs/cgroup`; the
//! binaries) is the host's. The namespace's mounts are shared within it,
//! so pod network namespaces that containerd creates after the datapath
//! pod started still reach that pod (its `HostToContainer` volume).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// A node directory bound over each host path, inside the node.
pub const BINDS: &[(&str, &str)] = &[
    ("etc-cni-net.d", "/etc/cni/net.d"),
    ("opt-cni-bin", "/opt/cni/bin"),
    ("run-weft", "/run/weft"),
    ("var-lib-weft", "/var/lib/weft"),
    ("run-netns", "/run/netns"),
    ("var-lib-kubelet", "/var/lib/kubelet"),
    ("var-lib-containerd", "/var/lib/containerd"),
    ("run-containerd", "/run/containerd"),
    ("var-log-pods", "/var/log/pods"),
    ("var-log-containers", "/var/log/containers"),
];

/// containerd's socket, inside the node.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

/// The CNI plugins a node has before weft installs its own: containerd
/// calls `loopback` for every pod's `lo`.
const BASE_CNI_PLUGINS: &[&str] = &["/usr/lib/cni/loopback"];

/// One node's files.
#[derive(Debug, Clone)]
pub struct NodeLayout {
    pub name: String,
    pub addr: Ipv4Addr,
    /// Its directories (the bind sources and its configuration).
    pub dir: PathBuf,
    /// The file that holds its mount namespace.
    pub mount_ns: PathBuf,
    /// The file that holds its UTS namespace: the node's hostname is its
    /// name, as on a machine of its own (a hostNetwork pod's hostname is
    /// the node's, and the e2e suite checks it).
    pub uts_ns: PathBuf,
}

impl NodeLayout {
    pub fn config(&self, file: &str) -> PathBuf {
        self.dir.join("config").join(file)
    }

    /// The node's cgroup under every hierarchy, as the kubelet's
    /// `cgroupRoot`: its pods go under it, apart from the other nodes'.
    pub fn cgroup_root(&self) -> String {
        format!("/weft-lab/{}", self.name)
    }

    /// Makes the node's directories and its mount namespace.
    pub fn create(&self) -> anyhow::Result<()> {
        for (dir, target) in BINDS {
            std::fs::create_dir_all(self.dir.join(dir))?;
            // The mount point must exist on the host to be bound over.
            std::fs::create_dir_all(target)
                .with_context(|| format!("creating mount point {target}"))?;
        }
        std::fs::create_dir_all(self.dir.join("config"))?;
        for plugin in BASE_CNI_PLUGINS {
            let src = Path::new(plugin);
            let name = src.file_name().context("plugin name")?;
            std::fs::copy(src, self.dir.join("opt-cni-bin").join(name)).with_context(|| {
                format!("copying {plugin} (Debian's containernetworking-plugins)")
            })?;
        }
        if let Some(parent) = self.mount_ns.parent() {
            private_mount_dir(parent)?;
        }
        std::fs::write(&self.mount_ns, b"")?;
        let mut script = String::from("mount --make-rshared /\n");
        for (dir, target) in BINDS {
            let src = self.dir.join(dir);
            script += &format!(
                "mount --bind '{}' '{target}'\nmount --make-shared '{target}'\n",
                src.display()
            );
        }
        run(
            Command::new("unshare")
                .arg(format!("--mount={}", self.mount_ns.display()))
                .args(["--propagation", "slave", "sh", "-ec", &script]),
            "making the node's mount namespace",
        )?;
        std::fs::write(&self.uts_ns, b"")?;
        run(
            Command::new("unshare")
                .arg(format!("--uts={}", self.uts_ns.display()))
                .args(["hostname", &self.name]),
            "making the node's UTS namespace",
        )?;
        self.create_cgroups()
    }

    fn create_cgroups(&self) -> anyhow::Result<()> {
        for hierarchy in cgroup_hierarchies() {
            let mut dir = hierarchy.clone();
            for part in self.cgroup_root().trim_start_matches('/').split('/') {
                let parent = dir.clone();
                dir.push(part);
                if dir.exists() {
                    continue;
                }
                std::fs::create_dir(&dir)
                    .with_context(|| format!("creating cgroup {}", dir.display()))?;
                // A v1 cpuset takes no task until it has CPUs and memory
                // nodes: the parent's.
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(value) = std::fs::read_to_string(parent.join(file)) {
                        let _ = std::fs::write(dir.join(file), value.trim());
                    }
                }
            }
        }
        Ok(())
    }

    /// containerd's configuration: its CRI plugin with the node's paths
    /// (the defaults, inside the node), the pause image the kubelet
    /// expects, and the cgroupfs driver.
    pub fn containerd_config(&self, sandbox_image: &str) -> String {
        format!(
            r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # These machines run without CAP_SYS_RESOURCE, which lowering a
  # process's oom_score_adj below containerd's own needs.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"#
        )
    }

    /// The kubelet's configuration file.
    pub fn kubelet_config(&self, ca: &Path, cluster_dns: Ipv4Addr) -> String {
        let config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root(),
            // Debian's kernel mounts cgroups hybrid (v1 controllers); 1.35
            // refuses cgroup v1 unless told.
            "failCgroupV1": false,
            "containerRuntimeEndpoint": format!("unix://{CONTAINERD_SOCKET}"),
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": ca},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDNS": [cluster_dns],
            "clusterDomain": "cluster.local",
            // No upstream resolvers: nothing leaves the machine.
            "resolvConf": self.config("resolv.conf"),
            "failSwapOn": false,
            // The nodes share one disk with the machine's other work: evict
            // only when it is truly full.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "rotateCertificates": false,
        });
        serde_json::to_string_pretty(&config).unwrap_or_default()
    }
}

/// Where cgroup hierarchies are mounted: each v1 controller's, and the v2
/// one (unified, or the only one).
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .filter(|p| p.starts_with("/sys/fs/cgroup"))
        .collect()
}

/// The cgroup v2 hierarchy, where weft's socket programs attach.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Makes `dir` a private mount of its own, as a mount namespace's handle
/// file must sit on one (a shared one would propagate the handle into the
/// namespace it holds).
fn private_mount_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let is_mount = Command::new("mountpoint")
        .arg("-q")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !is_mount {
        run(
            Command::new("mount").arg("--bind").arg(dir).arg(dir),
            "binding the namespace directory",
        )?;
    }
    run(
        Command::new("mount").arg("--make-private").arg(dir),
        "making the namespace directory private",
    )
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
