//! The real cluster's control plane: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler, in the control-plane
//! namespace, with the flags kubeadm would give them for a cluster with no
//! kube-proxy and no cloud.

use std::path::Path;

use super::{Cluster, daemon::Daemon};
use crate::net::CP_ADDR;

/// The API server's port on [`CP_ADDR`].
pub const API_PORT: u16 = 6443;
const ETCD_CLIENT: &str = "http://127.0.0.1:2379";

/// A controller's kubeconfig, for its API calls and for checking who
/// calls its own endpoints.
fn kubeconfig_flags(pki: &super::pki::Pki, name: &str) -> Vec<String> {
    let config = pki.kubeconfig(name).display().to_string();
    [
        "--kubeconfig",
        "--authentication-kubeconfig",
        "--authorization-kubeconfig",
    ]
    .iter()
    .map(|flag| format!("{flag}={config}"))
    .collect()
}

impl Cluster {
    pub(crate) fn control_plane_daemons(&self) -> Vec<Daemon> {
        let pki = &self.pki;
        let bin = |name: &str| self.cfg.upstream_bin.join(name);
        let path = |p: &Path| p.display().to_string();
        let etcd = self.daemon(
            "etcd",
            None,
            "etcd".into(),
            vec![
                format!("--data-dir={}", self.cfg.state_dir.join("etcd").display()),
                format!("--listen-client-urls={ETCD_CLIENT}"),
                format!("--advertise-client-urls={ETCD_CLIENT}"),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--name=control-plane".into(),
                // Keeps the revision history the watch tests compact by hand.
                "--auto-compaction-retention=0".into(),
            ],
        );
        let apiserver = self.daemon(
            "kube-apiserver",
            None,
            bin("kube-apiserver"),
            vec![
                format!("--advertise-address={CP_ADDR}"),
                "--bind-address=0.0.0.0".into(),
                format!("--secure-port={API_PORT}"),
                format!("--etcd-servers={ETCD_CLIENT}"),
                format!("--service-cluster-ip-range={}", self.cfg.service_cidr),
                "--service-node-port-range=30000-32767".into(),
                format!("--client-ca-file={}", path(&pki.ca_cert())),
                format!("--tls-cert-file={}", path(&pki.cert("kube-apiserver"))),
                format!(
                    "--tls-private-key-file={}",
                    path(&pki.key("kube-apiserver"))
                ),
                format!(
                    "--kubelet-client-certificate={}",
                    path(&pki.cert("apiserver-kubelet-client"))
                ),
                format!(
                    "--kubelet-client-key={}",
                    path(&pki.key("apiserver-kubelet-client"))
                ),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!(
                    "--service-account-key-file={}",
                    path(&pki.service_account_pub())
                ),
                format!(
                    "--service-account-signing-key-file={}",
                    path(&pki.service_account_key())
                ),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
            ],
        );
        let controller_manager = self.daemon(
            "kube-controller-manager",
            None,
            bin("kube-controller-manager"),
            [
                kubeconfig_flags(pki, "kube-controller-manager"),
                vec![
                    format!(
                        "--service-account-private-key-file={}",
                        path(&pki.service_account_key())
                    ),
                    format!("--root-ca-file={}", path(&pki.ca_cert())),
                    format!("--cluster-signing-cert-file={}", path(&pki.ca_cert())),
                    format!("--cluster-signing-key-file={}", path(&pki.ca_key())),
                    "--use-service-account-credentials=true".into(),
                    format!("--service-cluster-ip-range={}", self.cfg.service_cidr),
                    // weft's ipam-svc hands out node CIDRs (cluster-pool mode).
                    "--allocate-node-cidrs=false".into(),
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    "--profiling=false".into(),
                ],
            ]
            .concat(),
        );
        let scheduler = self.daemon(
            "kube-scheduler",
            None,
            bin("kube-scheduler"),
            [
                kubeconfig_flags(pki, "kube-scheduler"),
                vec![
                    "--leader-elect=false".into(),
                    "--bind-address=127.0.0.1".into(),
                    "--profiling=false".into(),
                ],
            ]
            .concat(),
        );
        vec![etcd, apiserver, controller_manager, scheduler]
    }
}

impl Cluster {
    /// Moves etcd `writes` revisions on (keys outside Kubernetes' prefix)
    /// and compacts its history up to the newest: every resourceVersion a
    /// watcher held is then gone, and resuming from one answers 410 Gone.
    /// Returns the compacted revision.
    pub async fn etcd_compact(&self, writes: usize) -> anyhow::Result<u64> {
        let etcdctl = |args: Vec<String>| {
            let netns = crate::net::netns_path(&self.cp_netns());
            async move {
                let out = tokio::process::Command::new("nsenter")
                    .arg(format!("--net={}", netns.display()))
                    .args(["--", "etcdctl", "--endpoints", ETCD_CLIENT])
                    .args(&args)
                    .env("ETCDCTL_API", "3")
                    .output()
                    .await?;
                anyhow::ensure!(
                    out.status.success(),
                    "etcdctl {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out.stdout).into_owned())
            }
        };
        for i in 0..writes {
            etcdctl(vec![
                "put".into(),
                format!("/weft-lab/filler/{i}"),
                "x".into(),
            ])
            .await?;
        }
        let status = etcdctl(vec![
            "endpoint".into(),
            "status".into(),
            "-w".into(),
            "json".into(),
        ])
        .await?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        let revision = status[0]["Status"]["header"]["revision"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no revision in etcd's status: {status}"))?;
        etcdctl(vec!["compact".into(), revision.to_string()]).await?;
        Ok(revision)
    }
}
