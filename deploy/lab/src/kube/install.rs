//! Installing weft on the real cluster with its own chart, the way the
//! README tells an operator to replace kube-proxy, and cluster DNS after it
//! (CoreDNS needs the pod network weft provides).

use std::{path::Path, time::Duration};

use anyhow::Context as _;

use super::{API_PORT, Cluster, node};
use crate::net::CP_ADDR;

/// The helm release and the namespace weft runs in.
pub const RELEASE: &str = "weft";
pub const NAMESPACE: &str = "kube-system";

/// The workloads the chart creates, and how to wait for each.
pub const WORKLOADS: &[&str] = &[
    "deployment/weft-svc-watcher",
    "deployment/weft-ipam-svc",
    "deployment/weft-identity-svc",
    "daemonset/weft-datapath",
];

const COREDNS: &str = include_str!("../../../kube/coredns.yaml");

impl Cluster {
    /// The `helm install` arguments for this cluster: kube-proxy
    /// replaced, the API server by its address, the control plane on the
    /// first node (reached at its address), the image from this machine.
    pub fn helm_values(&self) -> anyhow::Result<Vec<String>> {
        let first = self.nodes().into_iter().next().context("no nodes")?;
        let (repository, tag) = self
            .cfg
            .weft_image
            .rsplit_once(':')
            .context("the weft image needs a tag")?;
        let cgroup = node::cgroup2_root().context("no cgroup v2 hierarchy on this machine")?;
        let pin = format!(r#"{{"kubernetes.io/hostname":"{}"}}"#, first.name);
        let mut values = vec![
            format!("image.repository={repository}"),
            format!("image.tag={tag}"),
            "image.pullPolicy=Never".into(),
            "kubeProxyReplacement=true".into(),
            format!("k8sServiceHost={CP_ADDR}"),
            format!("k8sServicePort={API_PORT}"),
            format!("controlPlane.host={}", first.addr),
            format!("routingMode={}", self.cfg.routing_mode),
            format!("datapath.cgroupHostRoot={}", cgroup.display()),
            "logging.format=text".into(),
        ];
        let mut args = Vec::new();
        for v in values.drain(..).chain(self.cfg.helm_set.iter().cloned()) {
            args.push("--set".to_string());
            args.push(v);
        }
        for component in ["svcWatcher", "ipamSvc", "identitySvc"] {
            args.push("--set-json".into());
            args.push(format!("{component}.nodeSelector={pin}"));
        }
        Ok(args)
    }

    /// `helm install` of the chart, then waits until every weft workload
    /// has rolled out and every node is Ready.
    pub async fn install_weft(&self, chart: &Path) -> anyhow::Result<()> {
        let chart = chart.display().to_string();
        let values = self.helm_values()?;
        let mut args = vec!["install", RELEASE, &chart, "--namespace", NAMESPACE];
        args.extend(values.iter().map(String::as_str));
        self.kubectl().helm(&args).await?;
        self.wait_weft(Duration::from_secs(240)).await?;
        self.route_pod_cidrs().await
    }

    /// Routes each node's pod CIDR to the node on the lab network, as a
    /// cloud's route table does for native routing: the control plane is
    /// not a node here, and the API server reaches pods (its pod and
    /// Service proxy, webhooks) across that network.
    pub async fn route_pod_cidrs(&self) -> anyhow::Result<()> {
        let list = self.kubectl().json(&["get", "nodecidrs.weft.io"]).await?;
        for item in list["items"].as_array().into_iter().flatten() {
            let (Some(node), Some(cidr)) =
                (item["spec"]["node"].as_str(), item["spec"]["cidr"].as_str())
            else {
                continue;
            };
            let node = self.node(node)?;
            crate::net::ip_in(
                &self.cp_netns(),
                &["route", "replace", cidr, "via", &node.addr.to_string()],
            )?;
        }
        Ok(())
    }

    /// Waits for every weft workload to roll out and every node to be Ready.
    pub async fn wait_weft(&self, timeout: Duration) -> anyhow::Result<()> {
        let kubectl = self.kubectl();
        let timeout_arg = format!("--timeout={}s", timeout.as_secs());
        for workload in WORKLOADS {
            kubectl
                .run(&["-n", NAMESPACE, "rollout", "status", workload, &timeout_arg])
                .await
                .with_context(|| format!("{workload} did not roll out"))?;
        }
        kubectl
            .run(&[
                "wait",
                "--for=condition=Ready",
                "node",
                "--all",
                &timeout_arg,
            ])
            .await
            .context("nodes did not become Ready")?;
        Ok(())
    }

    /// CoreDNS as kubeadm installs it, at the address the kubelets give pods.
    pub async fn install_dns(&self) -> anyhow::Result<()> {
        let kubectl = self.kubectl();
        kubectl
            .run_with_input(&["apply", "-f", "-"], COREDNS)
            .await?;
        kubectl
            .run(&[
                "-n",
                NAMESPACE,
                "rollout",
                "status",
                "deployment/coredns",
                "--timeout=180s",
            ])
            .await
            .context("CoreDNS did not roll out")?;
        Ok(())
    }
}
