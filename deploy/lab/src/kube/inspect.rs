//! Looking into the running cluster as an operator (and a test) does:
//! weftctl in a node's datapath pod, and a pod's network namespace, to send
//! traffic from inside it.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use super::{Cluster, install::NAMESPACE};

impl Cluster {
    /// The datapath pod on `node`.
    pub async fn datapath_pod(&self, node: &str) -> anyhow::Result<String> {
        let selector = format!("spec.nodeName={node}");
        let pods = self
            .kubectl()
            .json(&[
                "-n",
                NAMESPACE,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=datapath",
                "--field-selector",
                &selector,
            ])
            .await?;
        pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .find_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .with_context(|| format!("no datapath pod on {node}"))
    }

    /// `kubectl exec <datapath pod> -- weftctl <args>` on `node`.
    pub async fn weftctl(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let pod = self.datapath_pod(node).await?;
        let mut all = vec![
            "-n",
            NAMESPACE,
            "exec",
            &pod,
            "-c",
            "datapath-svc",
            "--",
            "weftctl",
        ];
        all.extend_from_slice(args);
        self.kubectl().run(&all).await
    }

    /// A kubeconfig that acts as a service account (a token from the
    /// TokenRequest API), to run a component with exactly the rights the
    /// chart gives it.
    pub async fn service_account_kubeconfig(
        &self,
        namespace: &str,
        account: &str,
    ) -> anyhow::Result<PathBuf> {
        let token = self
            .kubectl()
            .run(&["-n", namespace, "create", "token", account, "--duration=2h"])
            .await?;
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "weft-lab", "cluster": {
                "server": self.api_server(),
                "certificate-authority": self.pki.ca_cert(),
            }}],
            "users": [{"name": account, "user": {"token": token.trim()}}],
            "contexts": [{"name": "weft-lab", "context": {"cluster": "weft-lab", "user": account}}],
            "current-context": "weft-lab",
        });
        let path = self.pki.kubeconfig(&format!("sa-{namespace}-{account}"));
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        Ok(path)
    }

    /// The network namespace of a running pod, as a path this process can
    /// enter (`/proc/<pid>/ns/net` of one of its containers).
    pub async fn pod_netns(&self, namespace: &str, name: &str) -> anyhow::Result<PathBuf> {
        let pod = self
            .kubectl()
            .json(&["-n", namespace, "get", "pod", name])
            .await?;
        let node = pod["spec"]["nodeName"]
            .as_str()
            .with_context(|| format!("{namespace}/{name} is not scheduled"))?;
        let id = pod["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|id| id.strip_prefix("containerd://"))
            .with_context(|| format!("{namespace}/{name} has no running container"))?
            .to_string();
        let node = self.node(node)?;
        let tasks = self.ctr(&node, &["tasks", "ls"]).await?;
        for line in tasks.lines().skip(1) {
            let mut cols = line.split_whitespace();
            if cols.next() == Some(id.as_str()) {
                let pid = cols.next().context("task pid")?;
                return Ok(PathBuf::from(format!("/proc/{pid}/ns/net")));
            }
        }
        bail!("no task {id} for {namespace}/{name} on {}", node.name)
    }
}
