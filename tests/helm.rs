//! The helm chart (`deploy/helm/weft`) and the image (`deploy/images`):
//! the chart lints clean with `--strict` and renders with the default
//! values and with a file that moves every setting
//! (`ci/kube-proxy-replacement-values.yaml`); every rendered manifest
//! validates offline against the Kubernetes schemas; every command line it
//! renders is one the binaries accept (`--check-config`); and the image
//! builds exactly the workspace binaries the chart runs.
//!
//! helm and kubernetes-validate come from `.tools/bin` (scripts/setup.sh);
//! the binaries from `target/debug` (`cargo build --workspace --bins`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use serde_yaml::Value;
use weft_e2e::{
    bin_dir,
    chart::{NAMESPACE, chart, find, helm, kind, name, render, render_text, repo, run},
    tool,
};

#[path = "../common/tests/pki/mod.rs"]
mod pki;

/// A Kubernetes version kubernetes-validate bundles schemas for, and one
/// that has the gRPC probes the chart uses.
const KUBERNETES_VERSION: &str = "1.32.0";

/// The values files the chart is checked with: the defaults, and one that
/// changes every setting.
fn value_sets() -> Vec<(&'static str, Option<PathBuf>)> {
    vec![
        ("default values", None),
        (
            "kube-proxy-replacement values",
            Some(chart().join("ci/kube-proxy-replacement-values.yaml")),
        ),
    ]
}

#[test]
fn chart_lints_clean_with_default_and_non_default_values() {
    for (what, values) in value_sets() {
        let chart = chart();
        let out = helm(
            &["lint", "--strict", chart.to_str().expect("utf-8 path")],
            values.as_deref(),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("0 chart(s) failed"), "{what}: {text}");
        assert!(!text.contains("[WARNING]"), "{what}: {text}");
    }
}

#[test]
fn both_value_sets_render_every_workload() {
    for (what, values) in value_sets() {
        let docs = render(values.as_deref());
        for (k, n) in [
            ("Deployment", "weft-svc-watcher"),
            ("Deployment", "weft-ipam-svc"),
            ("Deployment", "weft-identity-svc"),
            ("DaemonSet", "weft-datapath"),
            ("ConfigMap", "weft-config"),
            ("Service", "weft-svc-watcher"),
            ("Service", "weft-datapath"),
            ("ServiceAccount", "weft-datapath"),
            ("ClusterRole", "weft-svc-watcher"),
        ] {
            find(&docs, k, n);
        }
        println!("{what}: {} manifests", docs.len());
    }
}

#[test]
fn non_default_values_reach_the_rendered_manifests() {
    let values = value_sets()[1].1.clone();
    let docs = render(values.as_deref());
    let config = &find(&docs, "ConfigMap", "weft-config")["data"];
    for (key, want) in [
        ("kube-proxy-replacement", "true"),
        ("routing-mode", "native"),
        ("lb-algorithm", "maglev"),
        ("maglev-table-size", "65521"),
        ("maglev-hash-seed", "3141592653"),
        ("cluster-pool-ipv4-cidr", "10.200.0.0/15"),
        ("identity-store", "sled"),
    ] {
        assert_eq!(config[key].as_str(), Some(want), "{key}");
    }
    let ipam = container(find(&docs, "Deployment", "weft-ipam-svc"), "ipam-svc");
    let args = strings(&ipam["args"]);
    assert!(
        args.contains(&"--cluster-pool-ipv4-mask-size=26".to_string()),
        "{args:?}"
    );
    assert!(args.contains(&"--otlp-endpoint=http://otel-collector.monitoring:4317".to_string()));
    for arg in ["--api-retry-budget=90s", "--api-unready-after=20s"] {
        assert!(args.contains(&arg.to_string()), "{arg}: {args:?}");
    }
    let watcher = find(&docs, "Deployment", "weft-svc-watcher");
    assert!(
        strings(&container(watcher, "svc-watcher")["args"])
            .contains(&"--watch-unready-after=15s".to_string())
    );
    let datapath = find(&docs, "DaemonSet", "weft-datapath");
    let image = container(datapath, "datapath-svc")["image"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(image, "registry.example.com/net/weft:0.1.0-rc.1");
    // With the kubernetes store an allocator may write its own custom
    // resource and nothing else; with sled it gets no API access and keeps
    // its database on the volume given.
    let rules = &find(&docs, "ClusterRole", "weft-ipam-svc")["rules"];
    assert_eq!(strings(&rules[0]["resources"]), ["nodecidrs"]);
    assert!(
        !docs
            .iter()
            .any(|d| kind(d) == "ClusterRole" && name(d) == "weft-identity-svc"),
        "identity-svc on sled needs no API access"
    );
    let identity = find(&docs, "Deployment", "weft-identity-svc");
    let args = strings(&container(identity, "identity-svc")["args"]);
    assert!(args.contains(&"--store=sled".to_string()), "{args:?}");
    assert!(args.contains(&"--state-dir=/var/lib/weft/identity-svc".to_string()));
    assert_eq!(
        pod_spec(identity)["volumes"][0]["hostPath"]["path"].as_str(),
        Some("/var/lib/weft/identity-svc")
    );

    // The defaults: both allocators on their custom resources, each allowed
    // only its own; datapath-svc never gets API credentials.
    let docs = render(None);
    // Each ClusterRole is exactly what its component's code declares it
    // asks of the API (API_ACCESS), rule for rule.
    let roles: BTreeMap<&str, BTreeSet<(String, String, String)>> = docs
        .iter()
        .filter(|d| kind(d) == "ClusterRole")
        .map(|d| {
            let mut granted = BTreeSet::new();
            for rule in d["rules"].as_sequence().into_iter().flatten() {
                for group in strings(&rule["apiGroups"]) {
                    for resource in strings(&rule["resources"]) {
                        for verb in strings(&rule["verbs"]) {
                            granted.insert((group.clone(), resource.clone(), verb));
                        }
                    }
                }
            }
            (name(d), granted)
        })
        .collect();
    let declared = weft_k8s::access::triples;
    assert_eq!(
        roles["weft-svc-watcher"],
        declared(svc_watcher::source::kubernetes::API_ACCESS)
    );
    assert_eq!(
        roles["weft-ipam-svc"],
        declared(ipam_svc::kube_store::API_ACCESS)
    );
    assert_eq!(
        roles["weft-identity-svc"],
        declared(identity_svc::kube_store::API_ACCESS)
    );
    assert!(!roles.contains_key("weft-datapath"));
    for binding in docs.iter().filter(|d| kind(d).ends_with("Binding")) {
        assert_ne!(
            binding["subjects"][0]["name"].as_str(),
            Some("weft-datapath"),
            "{}",
            name(binding)
        );
    }
    let sa = find(&docs, "ServiceAccount", "weft-datapath");
    assert_eq!(sa["automountServiceAccountToken"].as_bool(), Some(false));
    let ipam = find(&docs, "Deployment", "weft-ipam-svc");
    let ipam_args = strings(&container(ipam, "ipam-svc")["args"]);
    for arg in [
        "--store=kubernetes",
        "--api-retry-budget=60s",
        "--api-unready-after=10s",
    ] {
        assert!(ipam_args.contains(&arg.to_string()), "{arg}: {ipam_args:?}");
    }
    assert!(
        pod_spec(ipam)["volumes"].is_null(),
        "no state volume without sled"
    );
}

#[test]
fn chart_refuses_settings_that_cannot_work() {
    let chart = chart();
    for (set, why) in [
        ("kubeProxyReplacement=true", "k8sServiceHost"),
        ("ipamSvc.replicas=2,ipamSvc.store=sled", "store=kubernetes"),
        ("loadBalancer.algorithm=hash", "algorithm"),
        ("maglev.tableSize=1000", "tableSize"),
    ] {
        let out = Command::new(tool("helm"))
            .args(["template", "weft"])
            .arg(&chart)
            .args(["--set", set])
            .output()
            .expect("running helm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(stderr.contains(why), "{set}: {stderr}");
    }
}

/// Kinds whose schemas are not among the Kubernetes API's own, so
/// kubernetes-validate cannot check them: the ServiceMonitor belongs to the
/// Prometheus operator (checked by `service_monitor_selects_every_metrics_port`
/// instead).
const NOT_CORE: &[&str] = &["ServiceMonitor"];

#[test]
fn every_rendered_manifest_validates_against_the_kubernetes_schemas() {
    for (what, values) in value_sets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut files = Vec::new();
        for (i, text) in render_text(values.as_deref()).iter().enumerate() {
            let doc: Value = serde_yaml::from_str(text).expect("valid YAML");
            if NOT_CORE.contains(&kind(&doc)) {
                continue;
            }
            let path = dir
                .path()
                .join(format!("{i:02}-{}-{}.yaml", kind(&doc), name(&doc)));
            std::fs::write(&path, text).expect("write");
            files.push(path);
        }
        let out = run(Command::new(tool("kubernetes-validate"))
            .args(["--kubernetes-version", KUBERNETES_VERSION, "--strict"])
            .args(&files));
        let report = String::from_utf8_lossy(&out.stdout);
        // Every file must have been checked against a schema, not skipped
        // for want of one (that is only a warning).
        let passed = report.matches(" passed for resource ").count();
        assert_eq!(
            passed,
            files.len(),
            "{what}:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{what}: {passed} manifests valid for Kubernetes {KUBERNETES_VERSION}");
    }
}

#[test]
fn service_monitor_selects_every_metrics_port() {
    let values = value_sets()[1].1.clone();
    let docs = render(values.as_deref());
    let monitor = docs
        .iter()
        .find(|d| kind(d) == "ServiceMonitor")
        .expect("enabled in the non-default values");
    assert_eq!(
        monitor["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"].as_str(),
        Some("metrics")
    );
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels");
    let selected: Vec<&Value> = docs
        .iter()
        .filter(|d| kind(d) == "Service")
        .filter(|s| {
            selector
                .iter()
                .all(|(k, v)| s["metadata"]["labels"][k.as_str().unwrap_or_default()] == *v)
        })
        .collect();
    assert_eq!(selected.len(), 4, "one Service per component");
    for svc in selected {
        let ports = svc["spec"]["ports"].as_sequence().expect("ports");
        assert!(
            ports.iter().any(|p| p["name"].as_str() == Some("metrics")),
            "{} has a metrics port",
            name(svc)
        );
    }
    assert!(
        !render(None).iter().any(|d| kind(d) == "ServiceMonitor"),
        "off by default: it needs the Prometheus operator's CRDs"
    );
}

/// The chart's `crds/` is a link to `deploy/crds`, where the CRDs are
/// generated from weft-k8s's types: helm follows it when it loads or
/// packages the chart, so there is one copy to keep current.
#[test]
fn chart_ships_every_crd_in_deploy_crds() {
    let link = chart().join("crds");
    let target = std::fs::read_link(&link).expect("deploy/helm/weft/crds is a symlink");
    assert_eq!(
        link.parent()
            .expect("chart")
            .join(target)
            .canonicalize()
            .expect("resolves"),
        repo()
            .join("deploy/crds")
            .canonicalize()
            .expect("deploy/crds exists")
    );
    let mut generated = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("deploy/crds")).expect("deploy/crds") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let doc: Value =
                serde_yaml::from_str(&std::fs::read_to_string(&path).expect("read")).expect("yaml");
            generated.insert(name(&doc).to_string());
        }
    }
    assert!(!generated.is_empty(), "deploy/crds holds the CRDs");
    for (what, values) in value_sets() {
        let rendered: BTreeSet<String> = render(values.as_deref())
            .iter()
            .filter(|d| kind(d) == "CustomResourceDefinition")
            .map(|d| name(d).to_string())
            .collect();
        assert_eq!(rendered, generated, "{what}");
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn container<'a>(workload: &'a Value, name_: &str) -> &'a Value {
    pod_spec(workload)["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(name_)))
        .unwrap_or_else(|| panic!("no container {name_} in {}", name(workload)))
}

/// What the kubelet would hand a test process for the downward API.
fn field_ref(path: &str, pod_name: &str) -> String {
    match path {
        "spec.nodeName" => "node-1".into(),
        "metadata.namespace" => NAMESPACE.into(),
        "metadata.name" => format!("{pod_name}-7d9f8c6b5-x2x4q"),
        "status.podIP" | "status.hostIP" => "192.0.2.31".into(),
        other => panic!("no test value for fieldRef {other}"),
    }
}

/// Expands `$(NAME)` as the kubelet does: from the variables defined
/// before, and the Services' `*_SERVICE_HOST` variables (a test cluster IP).
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find(')') else {
            break;
        };
        let var = &rest[start + 2..start + len];
        match env.get(var) {
            Some(v) => out.push_str(v),
            None if var.ends_with("_SERVICE_HOST") => out.push_str("10.96.0.10"),
            None => panic!("$({var}) refers to nothing the kubelet would set"),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// A container's environment as the kubelet would build it.
fn environment(c: &Value, pod_name: &str, config: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in c["env"].as_sequence().into_iter().flatten() {
        let key = var["name"].as_str().expect("env name").to_string();
        let value = if let Some(v) = var["value"].as_str() {
            Some(expand(v, &env))
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some(field_ref(path, pod_name))
        } else if let Some(r) = var["valueFrom"]["configMapKeyRef"].as_mapping() {
            assert_eq!(
                r.get("name").and_then(Value::as_str),
                Some(name(config)),
                "{key} refers to the rendered ConfigMap"
            );
            let k = r.get("key").and_then(Value::as_str).expect("key");
            let found = config["data"][k].as_str().map(String::from);
            if found.is_none() {
                assert_eq!(
                    r.get("optional").and_then(Value::as_bool),
                    Some(true),
                    "{key}: the ConfigMap has no key {k}"
                );
            }
            found
        } else {
            panic!("{key}: a source the test does not know: {var:?}")
        };
        if let Some(v) = value {
            env.insert(key, v);
        }
    }
    env
}

/// Stands in for the kubelet mounting the pod's Secret volumes: each
/// Secret mounted by `c` gets a directory holding a test CA's `ca.crt` and a
/// `tls.crt`/`tls.key` it signed (the layout of a kubernetes.io/tls Secret
/// with a CA, as the chart expects); returns (mountPath, directory) pairs.
fn mount_secrets(
    workload: &Value,
    c: &Value,
    ca: &pki::Ca,
    scratch: &Path,
) -> Vec<(String, PathBuf)> {
    let secrets: BTreeSet<&str> = pod_spec(workload)["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|v| v["secret"].is_mapping())
        .filter_map(|v| v["name"].as_str())
        .collect();
    c["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|m| m["name"].as_str().is_some_and(|n| secrets.contains(n)))
        .map(|m| {
            let path = m["mountPath"].as_str().expect("mountPath").to_string();
            let dir = scratch.join(format!("{}-{}", name(workload), path.replace('/', "_")));
            std::fs::create_dir_all(&dir).expect("secret directory");
            ca.leaf(name(workload), &[name(workload)])
                .write(&dir, "tls");
            (path, dir)
        })
        .collect()
}

/// `value` with a mounted path moved to where the test put the files.
fn remount(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (path, dir) in mounts {
        if let Some(rest) = value.strip_prefix(path.as_str()) {
            return format!("{}{rest}", dir.display());
        }
        if let Some((flag, v)) = value.split_once('=')
            && let Some(rest) = v.strip_prefix(path.as_str())
        {
            return format!("{flag}={}{rest}", dir.display());
        }
    }
    value.to_string()
}

#[test]
fn rendered_command_lines_are_accepted_by_the_binaries() {
    let bins = bin_dir();
    let ca = pki::Ca::new("weft-test-ca");
    let scratch = tempfile::tempdir().expect("tempdir");
    for (what, values) in value_sets() {
        let docs = render(values.as_deref());
        let config = find(&docs, "ConfigMap", "weft-config");
        let mut checked = BTreeSet::new();
        for workload in docs
            .iter()
            .filter(|d| matches!(kind(d), "Deployment" | "DaemonSet"))
        {
            for c in pod_spec(workload)["containers"]
                .as_sequence()
                .expect("containers")
            {
                let command = strings(&c["command"]);
                let binary = command.first().expect("every container names its binary");
                let path = bins.join(binary);
                assert!(
                    path.exists(),
                    "{} is missing: build the workspace first (cargo build --workspace --bins)",
                    path.display()
                );
                let args: Vec<String> = command[1..]
                    .iter()
                    .cloned()
                    .chain(strings(&c["args"]))
                    .collect();
                let mounts = mount_secrets(workload, c, &ca, scratch.path());
                let args: Vec<String> = args.iter().map(|a| remount(a, &mounts)).collect();
                let env: BTreeMap<String, String> = environment(c, name(workload), config)
                    .into_iter()
                    .map(|(k, v)| (k, remount(&v, &mounts)))
                    .collect();
                let out = Command::new(&path)
                    .env_clear()
                    .envs(&env)
                    .args(&args)
                    .arg("--check-config")
                    .output()
                    .expect("running the binary");
                assert!(
                    out.status.success(),
                    "{what}: {binary} refused its rendered command line\nargs: {args:?}\nenv: {env:?}\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                println!("{what}: {binary} {} -> ok", args.join(" "));
                checked.insert(binary.clone());
            }
        }
        assert_eq!(
            checked,
            BTreeSet::from(
                ["svc-watcher", "ipam-svc", "identity-svc", "datapath-svc"].map(String::from)
            ),
            "{what}"
        );
    }
}

#[test]
fn rendered_cni_config_is_one_the_plugin_accepts() {
    for (what, values) in value_sets() {
        let list = weft_e2e::chart::cni_config_list(values.as_deref());
        // A config list at a version libcni 1.1 (containerd 1.6/1.7,
        // podman 4) accepts, with weft-cni its only plugin.
        assert_eq!(list["cniVersion"], "1.0.0", "{what}");
        assert_eq!(list["name"], "weft", "{what}");
        let plugins = list["plugins"].as_array().expect("plugins");
        assert_eq!(plugins.len(), 1, "{what}");
        let plugin = &plugins[0];
        assert_eq!(plugin["type"], "weft-cni", "{what}");
        assert_eq!(plugin["socketPath"], "/run/weft/cni.sock", "{what}");
        // Without the capability runtimes never pass hostPorts.
        assert_eq!(plugin["capabilities"]["portMappings"], true, "{what}");
        // What the runtime hands the plugin: its entry, with the list's
        // name and version.
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        // ADD parses the config (with the runtime's portMappings, in the
        // Go-cased form containerd sends), then dials datapath-svc, which is
        // not there: "try again later" (11) shows the config itself was
        // accepted (a config error would be 1, 6 or 7).
        conf["runtimeConfig"] = serde_json::json!({"portMappings": [
            {"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}
        ]});
        let mut child = Command::new(bin_dir().join("weft-cni"))
            .env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "helm-test")
            .env("CNI_NETNS", "/proc/self/ns/net")
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("running weft-cni");
        conf["socketPath"] = serde_json::json!("/nonexistent/weft/cni.sock");
        conf.as_object_mut().expect("object").remove("logFile");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write config");
        let out = child.wait_with_output().expect("weft-cni output");
        let answer: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("a CNI error object");
        assert_eq!(answer["code"], 11, "{what}: {answer}");
    }
}

/// Binary names the Dockerfile builds (`--bin X`) and copies into the
/// runtime image (`/out/X`).
fn dockerfile_binaries(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '\\')
        .filter(|w| !w.is_empty())
        .collect();
    let built = words
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1].to_string())
        .collect();
    let copied = words
        .iter()
        .filter_map(|w| w.strip_prefix("/out/"))
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect();
    (built, copied)
}

fn workspace_binaries() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run(Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo()));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str().map(String::from))
        .collect()
}

#[test]
fn image_holds_workspace_binaries_and_everything_the_chart_runs() {
    let dir = repo().join("deploy/images");
    let workspace = workspace_binaries();
    let mut image = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("deploy/images") {
        let path = entry.expect("entry").path();
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !(file == "Dockerfile" || file.ends_with(".Dockerfile")) {
            continue;
        }
        let (built, copied) = dockerfile_binaries(&std::fs::read_to_string(&path).expect("read"));
        assert!(!built.is_empty(), "{file} builds something");
        assert_eq!(built, copied, "{file}: what is built is what is shipped");
        for b in &built {
            assert!(
                workspace.contains(b),
                "{file}: {b} is not a workspace binary ({workspace:?})"
            );
        }
        image.extend(built);
    }
    // The offline build (deploy/images/build.sh, the one the real-cluster
    // tests install) ships the same binaries.
    let script = std::fs::read_to_string(dir.join("build.sh")).expect("deploy/images/build.sh");
    let offline: BTreeSet<String> = script
        .lines()
        .find_map(|l| l.trim().strip_prefix("binaries=(")?.strip_suffix(')'))
        .expect("a binaries=(...) line in build.sh")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(
        offline, image,
        "the offline image and the Dockerfile ship different binaries"
    );
    for (what, values) in value_sets() {
        for workload in render(values.as_deref())
            .iter()
            .filter(|d| matches!(kind(d), "Deployment" | "DaemonSet"))
        {
            for c in pod_spec(workload)["containers"]
                .as_sequence()
                .expect("containers")
            {
                let command = strings(&c["command"]);
                let binary = command.first().expect("command");
                assert!(
                    image.contains(binary),
                    "{what}: {binary} is not in the image"
                );
            }
            for c in pod_spec(workload)["initContainers"]
                .as_sequence()
                .into_iter()
                .flatten()
            {
                for word in strings(&c["command"])
                    .iter()
                    .flat_map(|s| s.split_whitespace())
                {
                    if let Some(b) = word.strip_prefix("/usr/local/bin/") {
                        assert!(image.contains(b), "{what}: {b} is not in the image");
                    }
                }
            }
        }
    }
}
