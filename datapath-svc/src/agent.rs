//! The node agent's shared state and the pod attachment lifecycle (what CNI
//! ADD, DEL, CHECK and GC do).

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use ipnet::Ipv4Net;
use tokio::sync::watch;
use tonic::transport::Channel;
use weft_common::{store::Store, watch::Mirror};
use weft_proto::{
    datapath::v1::{CniAttachment, CniRequest, CniResult},
    identity::v1::{AllocateRequest, SecurityIdentity, identity_client::IdentityClient},
};

use crate::{
    bpf::{Counters, KernelLbMaps, Programs},
    endpoints::{EndpointRecord, Endpoints, attachment_key},
    flows::FlowLog,
    lb::NodeView,
    metrics::Metrics,
    podattach::PodPrograms,
    podipam::{IpamError, PodIpam},
    podnet,
    policy_sync::{AddressBook, PolicySync},
    routing::{Device, RoutingMode},
    sockpods::SockPods,
    sync::LbSync,
};

/// CNI error codes, shared with the plugin.
pub use weft_cni_contract::code as cni_code;

/// Why a CNI operation failed, with the CNI code the plugin should print.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CniFailure {
    pub grpc: tonic::Code,
    pub cni_code: u32,
    pub message: String,
}

impl CniFailure {
    pub fn new(grpc: tonic::Code, cni_code: u32, message: impl Into<String>) -> Self {
        Self {
            grpc,
            cni_code,
            message: message.into(),
        }
    }

    fn invalid_env(message: impl Into<String>) -> Self {
        Self::new(tonic::Code::InvalidArgument, cni_code::INVALID_ENV, message)
    }

    fn internal(cni_code: u32, message: impl Into<String>) -> Self {
        Self::new(tonic::Code::Internal, cni_code, message)
    }
}

/// Whether each control-plane peer is reachable, for status pages.
#[derive(Debug)]
pub struct Peers {
    pub watcher: watch::Sender<bool>,
    pub ipam: watch::Sender<bool>,
    pub identity: watch::Sender<bool>,
    pub last_error: Mutex<Option<String>>,
}

impl Default for Peers {
    fn default() -> Self {
        Self {
            watcher: watch::channel(false).0,
            ipam: watch::channel(false).0,
            identity: watch::channel(false).0,
            last_error: Mutex::new(None),
        }
    }
}

impl Peers {
    pub fn record_error(&self, e: impl std::fmt::Display) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }
}

/// What the agent knows about its node from flags and the host.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    pub mtu: u32,
    pub pin_dir: PathBuf,
    pub routing_mode: RoutingMode,
    /// The external devices the device programs are attached to.
    pub devices: Vec<Device>,
    /// The node as load-balancer frontends see it.
    pub view: NodeView,
    /// The kube-proxy replacement features that are on, for status pages.
    pub features: Vec<String>,
}

pub struct Agent {
    pub node: String,
    pub mtu: u32,
    pub pin_dir: PathBuf,
    pub config: NodeConfig,
    pub features: Vec<String>,
    pub store: Store,
    pub ipam: PodIpam,
    pub endpoints: Endpoints,
    pub programs: Mutex<Programs>,
    /// The programs every pod veth carries.
    pub pod_programs: PodPrograms,
    /// The pods whose Services the socket hooks translate.
    pub sock_pods: SockPods,
    /// Whether pods get their Services translated at the socket layer.
    pub sock_lb_pods: bool,
    pub lb: Mutex<LbSync<KernelLbMaps>>,
    pub counters: Arc<Counters>,
    pub netlink: rtnetlink::Handle,
    /// The cluster state as last seen from svc-watcher (or the cache).
    pub cluster: RwLock<Mirror>,
    /// The identity table from identity-svc, by canonical label key.
    pub identities: RwLock<HashMap<String, SecurityIdentity>>,
    pub peers: Peers,
    pub metrics: Metrics,
    /// Every node's pod CIDR, from ipam-svc, for routes to other nodes.
    pub allocations: Mutex<BTreeMap<String, Ipv4Net>>,
    /// Woken when routes to other nodes may need to change.
    pub routes_dirty: tokio::sync::Notify,
    /// The policy maps as programmed.
    pub policy: Mutex<PolicySync>,
    /// Woken when policy may need recompiling.
    pub policy_dirty: tokio::sync::Notify,
    /// Addresses to pods and identities, for flow events.
    pub addresses: RwLock<AddressBook>,
    /// Recent flow events and the live feed.
    pub flows: FlowLog,
    /// The health check node ports of Services with local traffic policy.
    pub health_checks: crate::health::HealthChecks,
    /// Whether the maps are programmed and recent (kube-proxy's healthz).
    pub node_health: Arc<crate::health::NodeHealth>,
    /// Pods whose host ports may have changed (`namespace/name`).
    hostports_dirty: tokio::sync::mpsc::UnboundedSender<String>,
    identity: IdentityClient<Channel>,
    attach_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// What an Agent is built from.
pub struct AgentParts {
    pub config: NodeConfig,
    pub store: Store,
    pub ipam: PodIpam,
    pub endpoints: Endpoints,
    pub programs: Programs,
    pub pod_programs: PodPrograms,
    pub sock_pods: SockPods,
    pub sock_lb_pods: bool,
    pub lb: LbSync<KernelLbMaps>,
    pub counters: Arc<Counters>,
    pub netlink: rtnetlink::Handle,
    pub cluster: Mirror,
    pub metrics: Metrics,
    pub identity: IdentityClient<Channel>,
    pub hostports_dirty: tokio::sync::mpsc::UnboundedSender<String>,
    pub policy: PolicySync,
    pub health_checks: crate::health::HealthChecks,
}

impl Agent {
    pub fn new(p: AgentParts) -> Self {
        Self {
            node: p.config.name.clone(),
            mtu: p.config.mtu,
            pin_dir: p.config.pin_dir.clone(),
            features: p.config.features.clone(),
            config: p.config,
            store: p.store,
            ipam: p.ipam,
            endpoints: p.endpoints,
            pod_programs: p.pod_programs,
            sock_pods: p.sock_pods,
            sock_lb_pods: p.sock_lb_pods,
            programs: Mutex::new(p.programs),
            lb: Mutex::new(p.lb),
            counters: p.counters,
            netlink: p.netlink,
            cluster: RwLock::new(p.cluster),
            identities: RwLock::new(HashMap::new()),
            peers: Peers::default(),
            metrics: p.metrics,
            allocations: Mutex::new(BTreeMap::new()),
            routes_dirty: tokio::sync::Notify::new(),
            policy: Mutex::new(p.policy),
            policy_dirty: tokio::sync::Notify::new(),
            addresses: RwLock::new(AddressBook::default()),
            flows: FlowLog::new(4096),
            hostports_dirty: p.hostports_dirty,
            health_checks: p.health_checks,
            node_health: Arc::default(),
            identity: p.identity,
            attach_locks: Mutex::new(HashMap::new()),
        }
    }

    /// Serialises operations on one attachment; different pods proceed in
    /// parallel.
    async fn lock_attachment(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.attach_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(key.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// CNI ADD: an address, a veth pair, routes and the programs.
    pub async fn add(&self, req: &CniRequest) -> Result<CniResult, CniFailure> {
        validate_attachment(req, true)?;
        let key = attachment_key(&req.container_id, &req.ifname);
        let _guard = self.lock_attachment(&key).await;

        if let Some(existing) = self.endpoints.get(&key).map_err(store_failure)? {
            // A repeated ADD (the runtime retried): same answer if intact.
            if existing.netns == req.netns && self.check_record(&existing).await.is_ok() {
                return Ok(existing.result());
            }
            self.teardown(&existing).await?;
        }

        let ip = self.ipam.allocate(&key).await.map_err(|e| match e {
            IpamError::NoCidr => CniFailure::new(
                tonic::Code::Unavailable,
                cni_code::TRY_AGAIN_LATER,
                format!(
                    "node {} has no pod CIDR yet; is ipam-svc running?",
                    self.node
                ),
            ),
            IpamError::Exhausted(cidr) => CniFailure::new(
                tonic::Code::ResourceExhausted,
                cni_code::RESOURCE_EXHAUSTED,
                format!("no free pod address left in {cidr}"),
            ),
            IpamError::Store(e) => {
                CniFailure::internal(cni_code::IO_FAILURE, format!("pod address store: {e}"))
            }
        })?;

        match self.plumb(req, ip).await {
            Ok(record) => {
                self.metrics
                    .cni_ops
                    .get_or_create(&op_label("add", "ok"))
                    .inc();
                self.allocate_identity(&record).await;
                self.hostports_changed(&record);
                Ok(record.result())
            }
            Err(e) => {
                let host_ifname = podnet::host_ifname(&req.container_id, &req.ifname);
                let _ = podnet::delete(&self.netlink, &host_ifname).await;
                let _ = self.ipam.release(&key).await;
                self.metrics
                    .cni_ops
                    .get_or_create(&op_label("add", "error"))
                    .inc();
                Err(e)
            }
        }
    }

    async fn plumb(&self, req: &CniRequest, ip: Ipv4Addr) -> Result<EndpointRecord, CniFailure> {
        let host_ifname = podnet::host_ifname(&req.container_id, &req.ifname);
        let mtu = if req.mtu > 0 { req.mtu } else { self.mtu };
        let setup = |e: &dyn std::fmt::Display| {
            CniFailure::internal(cni_code::NETWORK_SETUP, e.to_string())
        };
        let netns = Path::new(&req.netns);
        let mut link = podnet::create_pair(&self.netlink, &host_ifname, netns, &req.ifname, mtu)
            .await
            .map_err(|e| setup(&e))?;
        // The programs go on before the pod has an address, so nothing it
        // sends passes unprocessed.
        self.pod_programs
            .attach(&self.netlink, link.host_ifindex, &host_ifname)
            .await
            .map_err(|e| setup(&e))?;
        podnet::address(&self.netlink, &mut link, netns, &req.ifname, ip)
            .await
            .map_err(|e| setup(&e))?;
        if self.sock_lb_pods
            && let Err(e) = self
                .sock_pods
                .insert(link.netns_cookie, ip, link.host_ifindex)
        {
            // The programs on the veth serve the pod's Services meanwhile.
            tracing::warn!(pod = %req.pod_name, error = %e, "socket-level load-balancing for the pod");
        }
        let record = EndpointRecord {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            netns: req.netns.clone(),
            host_ifname,
            ip: ip.to_string(),
            pod_namespace: req.pod_namespace.clone(),
            pod_name: req.pod_name.clone(),
            pod_uid: req.pod_uid.clone(),
            host_mac: podnet::format_mac(&link.host_mac),
            pod_mac: podnet::format_mac(&link.pod_mac),
            mtu,
            port_mappings: req.port_mappings.clone(),
            netns_cookie: link.netns_cookie,
        };
        self.endpoints.put(&record).await.map_err(store_failure)?;
        tracing::info!(pod = %record.pod(), ip = %record.ip, host_ifname = %record.host_ifname, "endpoint added");
        Ok(record)
    }

    /// CNI DEL: idempotent; an unknown attachment is already deleted.
    pub async fn del(&self, req: &CniRequest) -> Result<(), CniFailure> {
        validate_attachment(req, false)?;
        let key = attachment_key(&req.container_id, &req.ifname);
        let _guard = self.lock_attachment(&key).await;
        match self.endpoints.get(&key).map_err(store_failure)? {
            Some(record) => self.teardown(&record).await?,
            None => {
                // An ADD that crashed half-way may have left an address or a veth.
                let host_ifname = podnet::host_ifname(&req.container_id, &req.ifname);
                podnet::delete(&self.netlink, &host_ifname)
                    .await
                    .map_err(|e| CniFailure::internal(cni_code::NETWORK_SETUP, e.to_string()))?;
                self.pod_programs.forget_tcx_links(&host_ifname);
                self.ipam
                    .release(&key)
                    .await
                    .map_err(|e| CniFailure::internal(cni_code::IO_FAILURE, e.to_string()))?;
            }
        }
        self.metrics
            .cni_ops
            .get_or_create(&op_label("del", "ok"))
            .inc();
        Ok(())
    }

    async fn teardown(&self, record: &EndpointRecord) -> Result<(), CniFailure> {
        let key = attachment_key(&record.container_id, &record.ifname);
        // The programs' filters go with the veth.
        podnet::delete(&self.netlink, &record.host_ifname)
            .await
            .map_err(|e| CniFailure::internal(cni_code::NETWORK_SETUP, e.to_string()))?;
        self.pod_programs.forget_tcx_links(&record.host_ifname);
        if let Ok(ip) = record.ip.parse()
            && let Err(e) = self.sock_pods.remove(ip)
        {
            tracing::warn!(pod = %record.pod(), error = %e, "removing the pod from the socket hooks");
        }
        self.ipam
            .release(&key)
            .await
            .map_err(|e| CniFailure::internal(cni_code::IO_FAILURE, e.to_string()))?;
        self.endpoints.remove(&key).await.map_err(store_failure)?;
        self.hostports_changed(record);
        tracing::info!(pod = %record.pod(), ip = %record.ip, "endpoint removed");
        Ok(())
    }

    /// CNI CHECK: the attachment exists and is as ADD left it.
    pub async fn check(&self, req: &CniRequest) -> Result<(), CniFailure> {
        validate_attachment(req, true)?;
        let key = attachment_key(&req.container_id, &req.ifname);
        let record = self
            .endpoints
            .get(&key)
            .map_err(store_failure)?
            .ok_or_else(|| {
                CniFailure::new(
                    tonic::Code::NotFound,
                    cni_code::UNKNOWN_CONTAINER,
                    format!("no attachment {key}"),
                )
            })?;
        if let Some(prev) = &req.prev_result {
            let want = format!("{}/32", record.ip);
            if !prev.ips.is_empty() && !prev.ips.iter().any(|i| i.address == want) {
                return Err(CniFailure::new(
                    tonic::Code::FailedPrecondition,
                    cni_code::NETWORK_CHANGED,
                    format!("prevResult does not list {want}, the address the pod has"),
                ));
            }
        }
        self.check_record(&record).await
    }

    async fn check_record(&self, record: &EndpointRecord) -> Result<(), CniFailure> {
        let ip: Ipv4Addr = record.ip.parse().map_err(|_| {
            CniFailure::internal(
                cni_code::IO_FAILURE,
                format!("stored address {:?} is invalid", record.ip),
            )
        })?;
        let want = podnet::Plumbing {
            host_ifname: record.host_ifname.clone(),
            pod_ifname: record.ifname.clone(),
            ip,
            mtu: record.mtu,
            host_mac: record.host_mac.clone(),
            pod_mac: record.pod_mac.clone(),
        };
        let changed = |m: String| {
            CniFailure::new(
                tonic::Code::FailedPrecondition,
                cni_code::NETWORK_CHANGED,
                m,
            )
        };
        let host_index = podnet::check(&self.netlink, &want, Path::new(&record.netns))
            .await
            .map_err(|e| match e {
                podnet::CheckError::Broken(m) => changed(m),
                podnet::CheckError::Net(e) => {
                    CniFailure::internal(cni_code::NETWORK_SETUP, e.to_string())
                }
            })?;
        self.pod_programs
            .verify(&self.netlink, host_index)
            .await
            .map_err(changed)
    }

    /// CNI GC: releases every attachment the runtime no longer knows.
    pub async fn gc(&self, valid: &[CniAttachment]) -> Result<Vec<CniAttachment>, CniFailure> {
        let keep: std::collections::HashSet<String> = valid
            .iter()
            .map(|a| attachment_key(&a.container_id, &a.ifname))
            .collect();
        let mut released = Vec::new();
        for record in self.endpoints.all().map_err(store_failure)? {
            if keep.contains(&attachment_key(&record.container_id, &record.ifname)) {
                continue;
            }
            let req = CniRequest {
                container_id: record.container_id.clone(),
                ifname: record.ifname.clone(),
                ..Default::default()
            };
            self.del(&req).await?;
            released.push(CniAttachment {
                container_id: record.container_id,
                ifname: record.ifname,
            });
        }
        Ok(released)
    }

    /// Re-attaches the current programs to every endpoint's veth, swapping
    /// them into the pinned links atomically. Endpoints whose veth is gone
    /// (the pod died while no datapath-svc ran) are cleaned up.
    pub async fn restore_endpoints(&self) -> anyhow::Result<usize> {
        let mut restored = 0;
        let mut sock_pods = HashMap::new();
        for record in self.endpoints.all()? {
            let attached = match podnet::link_index(&self.netlink, &record.host_ifname).await {
                Ok(Some(index)) => self
                    .pod_programs
                    .attach(&self.netlink, index, &record.host_ifname)
                    .await
                    .map(|()| index)
                    .map_err(|e| e.to_string()),
                Ok(None) => Err(format!("{} is gone", record.host_ifname)),
                Err(e) => Err(e.to_string()),
            };
            match attached {
                Ok(index) => {
                    restored += 1;
                    if self.sock_lb_pods {
                        self.sock_pod_of(&record, index, &mut sock_pods).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(pod = %record.pod(), error = %e, "endpoint's interface is gone; removing it");
                    if let Err(e) = self.teardown(&record).await {
                        tracing::warn!(pod = %record.pod(), error = %e, "removing a dead endpoint");
                    }
                }
            }
        }
        // Pods gone while no agent ran leave the map too.
        self.sock_pods.sync(&sock_pods)?;
        Ok(restored)
    }

    /// Adds a restored endpoint to the socket hooks' pods; its namespace's
    /// cookie is looked up if the record predates it.
    async fn sock_pod_of(
        &self,
        record: &EndpointRecord,
        ifindex: u32,
        pods: &mut HashMap<u64, (Ipv4Addr, u32)>,
    ) {
        let Ok(ip) = record.ip.parse() else {
            return;
        };
        let cookie = match record.netns_cookie {
            0 => match podnet::netns_cookie(Path::new(&record.netns)).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(pod = %record.pod(), error = %e, "no socket-level load-balancing for the pod");
                    return;
                }
            },
            c => c,
        };
        pods.insert(cookie, (ip, ifindex));
    }

    /// Asks identity-svc for the new pod's identity right away, holding a
    /// reference as the pod (the same owner identity-svc's own pod watch
    /// uses, so the two never count twice). Best effort and bounded: the pod
    /// runs with `init` until the identity arrives through the watch.
    async fn allocate_identity(&self, record: &EndpointRecord) {
        if record.pod_name.is_empty() || record.pod_namespace.is_empty() {
            return;
        }
        let (_, labels) = self.identity_of(&record.pod_namespace, &record.pod_name);
        if labels.is_empty() {
            return;
        }
        let mut request = tonic::Request::new(AllocateRequest {
            labels: labels.into_iter().collect(),
            owner: format!("pod:{}", record.pod()),
        });
        request.set_timeout(std::time::Duration::from_secs(1));
        // identity-svc's span joins the trace of the CNI ADD this is part of.
        weft_common::trace::inject_into(&mut request);
        let mut client = self.identity.clone();
        match tokio::time::timeout(std::time::Duration::from_secs(1), client.allocate(request))
            .await
        {
            Ok(Ok(id)) => {
                let id = id.into_inner();
                tracing::debug!(pod = %record.pod(), identity = id.id, "identity allocated");
                let key = weft_common::labels::canonical_key(&id.labels);
                self.identities
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, id);
            }
            Ok(Err(status)) => {
                tracing::debug!(pod = %record.pod(), %status, "identity not allocated yet")
            }
            Err(_) => tracing::debug!(pod = %record.pod(), "identity-svc did not answer in time"),
        }
    }

    /// The pod at an address and its identity, as far as this node knows.
    pub fn who(&self, addr: std::net::Ipv4Addr) -> (String, u32) {
        let book = self.addresses.read().unwrap_or_else(|p| p.into_inner());
        match book.pods.get(&addr) {
            Some((pod, id)) => (pod.clone(), *id),
            None => (
                String::new(),
                crate::flows::lookup_identity(&book.ipcache, addr)
                    .unwrap_or(weft_common::labels::reserved::WORLD),
            ),
        }
    }

    fn hostports_changed(&self, record: &EndpointRecord) {
        self.policy_dirty.notify_one();
        if !record.port_mappings.is_empty() || !record.pod_name.is_empty() {
            let _ = self.hostports_dirty.send(record.pod());
        }
    }

    /// Carries out the DELs the CNI plugin queued while this agent was down.
    pub async fn drain_del_queue(&self, dir: &Path) {
        let drained = match weft_cni_contract::del_queue::drain_dir(dir) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "reading the CNI DEL queue");
                return;
            }
        };
        for bad in drained.malformed {
            tracing::warn!(path = %bad.path.display(), error = %bad.error, "discarding an unreadable queued DEL");
            let _ = bad.discard();
        }
        for pending in drained.pending {
            let req = pending.del.to_request();
            match self.del(&req).await {
                Ok(()) => {
                    tracing::info!(container_id = %req.container_id, ifname = %req.ifname, "queued CNI DEL carried out");
                    if let Err(e) = pending.done() {
                        tracing::warn!(path = %pending.path.display(), error = %e, "removing a drained DEL");
                    }
                }
                Err(e) => {
                    tracing::warn!(container_id = %req.container_id, error = %e, "queued CNI DEL failed; kept for the next start")
                }
            }
        }
    }

    /// Whether the node can take pods now.
    pub fn ready(&self) -> Result<(), CniFailure> {
        match self.ipam.cidr() {
            Some(_) => Ok(()),
            None => Err(CniFailure::new(
                tonic::Code::Unavailable,
                cni_code::PLUGIN_NOT_AVAILABLE,
                format!("node {} has no pod CIDR yet", self.node),
            )),
        }
    }
}

fn op_label(op: &str, outcome: &str) -> Vec<(String, String)> {
    vec![("op".into(), op.into()), ("outcome".into(), outcome.into())]
}

fn store_failure(e: weft_common::store::StoreError) -> CniFailure {
    CniFailure::internal(cni_code::IO_FAILURE, e.to_string())
}

/// Whether `path` is a namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`):
/// anything else would fail deep inside netlink with a message that names
/// nothing the runtime passed.
/// What is wrong with `path` as a network namespace, if anything: it must
/// exist, be readable, and be a namespace file (nsfs) of the network type,
/// not a UTS or mount namespace or a plain file.
fn netns_problem(path: &Path) -> Option<String> {
    use std::os::fd::AsRawFd as _;
    // linux/nsfs.h: _IO(0xb7, 0x3).
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some("does not exist".into());
        }
        Err(e) => return Some(format!("cannot be opened: {e}")),
    };
    // SAFETY: the ioctl takes no argument and only reads the open file.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind < 0 {
        return Some(
            "is not a namespace file (such as /proc/<pid>/ns/net or /run/netns/<name>)".into(),
        );
    }
    let name = match kind {
        libc::CLONE_NEWNET => return None,
        libc::CLONE_NEWNS => "a mount",
        libc::CLONE_NEWUTS => "a UTS",
        libc::CLONE_NEWIPC => "an IPC",
        libc::CLONE_NEWPID => "a PID",
        libc::CLONE_NEWUSER => "a user",
        libc::CLONE_NEWCGROUP => "a cgroup",
        libc::CLONE_NEWTIME => "a time",
        _ => "another kind of",
    };
    Some(format!("is {name} namespace, not a network namespace"))
}

/// Checks what the runtime passed, naming the offending variable.
fn validate_attachment(req: &CniRequest, needs_netns: bool) -> Result<(), CniFailure> {
    if req.container_id.is_empty() {
        return Err(CniFailure::invalid_env(
            "container_id (CNI_CONTAINERID) is required",
        ));
    }
    if !req
        .container_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(CniFailure::invalid_env(format!(
            "container_id (CNI_CONTAINERID) {:?} may hold only letters, digits, '_', '.' and '-'",
            req.container_id
        )));
    }
    let ifname = &req.ifname;
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname == "."
        || ifname == ".."
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(CniFailure::invalid_env(format!(
            "ifname (CNI_IFNAME) {ifname:?} is not a valid interface name"
        )));
    }
    if needs_netns {
        if req.netns.is_empty() {
            return Err(CniFailure::invalid_env("netns (CNI_NETNS) is required"));
        }
        if let Some(problem) = netns_problem(Path::new(&req.netns)) {
            return Err(CniFailure::invalid_env(format!(
                "netns (CNI_NETNS) {} {problem}",
                req.netns
            )));
        }
    }
    Ok(())
}

impl Agent {
    /// The identity of a pod on this node and its security labels; `init`
    /// until identity-svc has allocated one for the labels.
    pub fn identity_of(
        &self,
        namespace: &str,
        name: &str,
    ) -> (u32, std::collections::BTreeMap<String, String>) {
        let mirror = self.cluster.read().unwrap_or_else(|p| p.into_inner());
        self.identity_in(&mirror, namespace, name)
    }

    /// [`Agent::identity_of`] for a caller that already holds the cluster
    /// mirror: taking its read lock a second time on one thread deadlocks
    /// as soon as a writer queues between the two (std's `RwLock` lets a
    /// waiting writer go first).
    pub fn identity_in(
        &self,
        mirror: &weft_common::watch::Mirror,
        namespace: &str,
        name: &str,
    ) -> (u32, std::collections::BTreeMap<String, String>) {
        use weft_common::labels::{canonical_key, reserved, security_labels};
        use weft_common::watch::ObjKey;
        use weft_proto::watcher::v1::{Kind, Resource, resource};

        // A runtime that sends no K8S_POD_NAMESPACE (podman, a plain CNI
        // caller) started a container Kubernetes does not know: it will
        // never have labels, so it is `unmanaged` for good, not `init`
        // waiting for them.
        if namespace.is_empty() {
            return (
                reserved::UNMANAGED,
                weft_common::labels::reserved_labels("unmanaged"),
            );
        }
        let Some(Resource {
            kind: Some(resource::Kind::Pod(pod)),
        }) = mirror.get(&ObjKey::new(Kind::Pod, namespace, name))
        else {
            return (reserved::INIT, Default::default());
        };
        let pod_labels = pod
            .meta
            .as_ref()
            .map(|m| m.labels.clone())
            .unwrap_or_default();
        let ns_labels = match mirror.get(&ObjKey::new(Kind::Namespace, "", namespace)) {
            Some(Resource {
                kind: Some(resource::Kind::Namespace(ns)),
            }) => ns
                .meta
                .as_ref()
                .map(|m| m.labels.clone())
                .unwrap_or_default(),
            _ => Default::default(),
        };
        let labels = security_labels(namespace, &pod_labels, &ns_labels);
        let id = self
            .identities
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&canonical_key(&labels))
            .map(|i| i.id)
            .unwrap_or(reserved::INIT);
        (id, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cid: &str, ifname: &str, netns: &str) -> CniRequest {
        CniRequest {
            container_id: cid.into(),
            ifname: ifname.into(),
            netns: netns.into(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_attachments_name_the_variable() {
        let e =
            validate_attachment(&req("", "eth0", "/proc/self/ns/net"), true).expect_err("no id");
        assert!(e.message.contains("CNI_CONTAINERID") && e.cni_code == cni_code::INVALID_ENV);
        let e = validate_attachment(
            &req("abc", "this-name-is-too-long", "/proc/self/ns/net"),
            true,
        )
        .expect_err("long");
        assert!(e.message.contains("CNI_IFNAME"));
        let e = validate_attachment(&req("abc", "eth0", ""), true).expect_err("no netns");
        assert!(e.message.contains("CNI_NETNS"));
        let e = validate_attachment(&req("abc", "eth0", "/nonexistent/netns"), true)
            .expect_err("missing netns");
        assert!(e.message.contains("does not exist"));
        validate_attachment(&req("abc", "eth0", ""), false).expect("DEL needs no netns");
        validate_attachment(&req("abc-1.2_3", "eth0", "/proc/self/ns/net"), true).expect("valid");
        let e = validate_attachment(&req("abc", "eth0", "/tmp"), true).expect_err("not a netns");
        assert!(e.message.contains("CNI_NETNS") && e.message.contains("is not a namespace file"));
    }

    /// Namespace files of another type are named for what they are, with
    /// code 4, not let through to fail in netlink.
    #[test]
    fn other_namespace_types_are_refused_by_type() {
        for (path, kind) in [
            ("/proc/self/ns/uts", "a UTS namespace"),
            ("/proc/self/ns/mnt", "a mount namespace"),
            ("/proc/self/ns/ipc", "an IPC namespace"),
        ] {
            let e = validate_attachment(&req("abc", "eth0", path), true).expect_err(path);
            assert_eq!(e.cni_code, cni_code::INVALID_ENV, "{path}");
            assert!(
                e.message.contains(kind) && e.message.contains("not a network namespace"),
                "{path}: {}",
                e.message
            );
        }
        validate_attachment(&req("abc", "eth0", "/proc/self/ns/net"), true).expect("a netns");
    }

    proptest::proptest! {
        /// Whatever the runtime passes, the answer is a decision, never a
        /// panic; a refusal is "invalid environment" naming the variable.
        #[test]
        fn arbitrary_attachments_are_accepted_or_refused_by_name(
            cid in proptest::prelude::prop_oneof!["\\PC{0,80}", "[a-zA-Z0-9_.-]{0,70}"],
            ifname in proptest::prelude::prop_oneof!["\\PC{0,20}", "[a-z0-9]{1,15}", proptest::prelude::Just(".".to_string())],
            netns in proptest::prelude::prop_oneof!["\\PC{0,40}", proptest::prelude::Just("/proc/self/ns/net".to_string()), proptest::prelude::Just("/tmp".to_string())],
            needs_netns in proptest::prelude::any::<bool>(),
        ) {
            match validate_attachment(&req(&cid, &ifname, &netns), needs_netns) {
                Ok(()) => {
                    proptest::prop_assert!(!cid.is_empty() && !ifname.is_empty() && ifname.len() <= 15);
                    proptest::prop_assert!(!needs_netns || netns == "/proc/self/ns/net");
                }
                Err(e) => {
                    proptest::prop_assert_eq!(e.cni_code, cni_code::INVALID_ENV);
                    proptest::prop_assert_eq!(e.grpc, tonic::Code::InvalidArgument);
                    proptest::prop_assert!(
                        ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"].iter().any(|v| e.message.contains(v)),
                        "{}", e.message
                    );
                }
            }
        }
    }
}
