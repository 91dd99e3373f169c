//! weft-cni as container runtimes call it: through libcni, the library
//! containerd, CRI-O and podman are built on, at the version Debian 12,
//! containerd 1.6/1.7 and podman 4 ship (v1.1.2) and at the newest one
//! (what containerd 2.x vendors), with the config list the chart renders.
//! The driver (`deploy/cni/libcni-driver`, built by `deploy/cni/build.sh`)
//! does what a runtime does: ADD with capability arguments, CHECK with the
//! result libcni cached, DEL.
//!
//! Per libcni version: ADD with a hostPort through `runtimeConfig`,
//! reached from outside the node; CHECK of a healthy pod; CHECK of a pod
//! broken in each way a pod's network can break, which must fail with
//! code 106 naming what broke; DEL, after which the veth is gone. Then a
//! container from a runtime that sends no pod namespace, a namespace file
//! of the wrong type, and a node out of pod addresses.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use weft_e2e::{TestLab, bin_dir, chart};
use weft_lab::{net::netns_path, podserver::tcp_who};
use weft_proto::datapath::v1::ListEndpointsRequest;

const TIMEOUT: Duration = Duration::from_secs(5);
/// weft's code for "the pod's network is not as ADD left it".
const NETWORK_CHANGED: u64 = 106;

/// The libcni drivers, one per libcni version: `(version, binary)`.
fn drivers() -> Vec<(String, PathBuf)> {
    let out = Command::new(chart::repo().join("deploy/cni/build.sh"))
        .output()
        .expect("running deploy/cni/build.sh");
    assert!(
        out.status.success(),
        "deploy/cni/build.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .expect("driver directory")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let version = path
                .file_name()?
                .to_str()?
                .strip_prefix("libcni-driver-")?
                .to_string();
            Some((version, path))
        })
        .collect();
    found.sort();
    assert!(found.len() >= 2, "a driver per libcni version: {found:?}");
    found
}

/// What one call through libcni answered: the printed JSON (a result or a
/// CNI error object) and whether it succeeded.
struct Answer {
    ok: bool,
    json: serde_json::Value,
}

impl Answer {
    fn code(&self) -> Option<u64> {
        self.json["code"].as_u64()
    }
    fn msg(&self) -> String {
        format!("{} {}", self.json["msg"], self.json["details"])
    }
}

/// A runtime on one node of the lab: a libcni driver, the chart's config
/// list pointed at that node's datapath-svc, and libcni's result cache.
struct Runtime {
    driver: PathBuf,
    node: String,
    conflist: PathBuf,
    cache: tempfile::TempDir,
}

impl Runtime {
    fn new(driver: &Path, lab: &TestLab, node: &str, dir: &Path) -> Self {
        // The chart's list as rendered; only the host paths move to where
        // this lab node's datapath-svc serves (a lab node shares the host's
        // file system).
        let mut list = chart::cni_config_list(None);
        let plugin = &mut list["plugins"][0];
        plugin["socketPath"] = serde_json::json!(lab.cni_socket(node));
        plugin["delQueueDir"] = serde_json::json!(lab.cni_del_queue_dir(node));
        let conflist = dir.join(format!("{node}.conflist"));
        std::fs::write(&conflist, list.to_string()).expect("writing the config list");
        Self {
            driver: driver.to_path_buf(),
            node: node.to_string(),
            conflist,
            cache: tempfile::tempdir().expect("libcni cache directory"),
        }
    }

    /// One libcni call from the node's network namespace, as a runtime on
    /// the node makes it.
    fn call(&self, command: &str, netns: &Path, id: &str, args: &str, cap_args: &str) -> Answer {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns_path(&self.node).display()))
            .arg(&self.driver)
            .arg(command)
            .args(["-conflist", self.conflist.to_str().expect("utf-8")])
            .args(["-netns", netns.to_str().expect("utf-8")])
            .args(["-id", id, "-args", args, "-cap-args", cap_args])
            .args(["-cache-dir", self.cache.path().to_str().expect("utf-8")])
            .env("CNI_PATH", bin_dir())
            .output()
            .expect("running the libcni driver");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = if stdout.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| {
                panic!(
                    "{command}: not JSON ({e}): {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        };
        Answer {
            ok: out.status.success(),
            json,
        }
    }
}

fn pod_args(name: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=libcni;K8S_POD_NAME={name};K8S_POD_UID=uid-{name}")
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("running a command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pod network namespace of the lab's (removed with the lab).
fn pod_netns(lab: &TestLab, name: &str) -> (String, PathBuf) {
    let ns = lab.pod_netns("libcni", name);
    weft_lab::net::netns_add(&ns).expect("pod netns");
    let path = netns_path(&ns);
    (ns, path)
}

/// Each way a pod's network can break after ADD: a description, the
/// commands that break it (`{pod}` the pod's netns, `{node}` the node's,
/// `{host}` the host-side veth), and what CHECK's message must name.
const BREAKAGES: &[(&str, &[&[&str]], &str)] = &[
    (
        "pod interface down",
        &[&["ip", "-n", "{pod}", "link", "set", "eth0", "down"]],
        "eth0 in the pod is down",
    ),
    (
        "default route deleted",
        &[&["ip", "-n", "{pod}", "route", "del", "default"]],
        "no default route",
    ),
    (
        "MTU changed",
        &[&["ip", "-n", "{pod}", "link", "set", "eth0", "mtu", "1280"]],
        "has MTU 1280",
    ),
    (
        "MAC changed",
        &[&[
            "ip",
            "-n",
            "{pod}",
            "link",
            "set",
            "eth0",
            "address",
            "02:00:00:00:00:42",
        ]],
        "has MAC 02:00:00:00:00:42",
    ),
    (
        "address removed",
        &[&["ip", "-n", "{pod}", "address", "flush", "dev", "eth0"]],
        "does not carry",
    ),
    (
        "host veth down",
        &[&["ip", "-n", "{node}", "link", "set", "{host}", "down"]],
        "is down",
    ),
    (
        "eBPF filters removed",
        &[
            &[
                "tc", "-n", "{node}", "filter", "del", "dev", "{host}", "ingress",
            ],
            &[
                "tc", "-n", "{node}", "filter", "del", "dev", "{host}", "egress",
            ],
        ],
        "program is not attached",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcni_callers_add_check_and_delete_with_the_charts_config() {
    let drivers = drivers();
    // A small pod CIDR, so that running out of addresses is quick to reach.
    let lab = TestLab::up_with("libcni_runtime", 1, |cfg| cfg.mask_size = 27).await;
    let node = lab.node_names()[0].clone();
    let node_ip = lab.node_addr(&node).expect("node address");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut datapath = lab.datapath(&node);

    for (n, (version, driver)) in drivers.iter().enumerate() {
        let rt = Runtime::new(driver, &lab, &node, dir.path());

        // ADD with a hostPort, as `podman run -p` or a pod's hostPort asks.
        let host_port = 18080 + n as u16;
        let (_, web) = pod_netns(&lab, &format!("web{n}"));
        let cap = format!(
            r#"{{"portMappings": [{{"hostPort": {host_port}, "containerPort": 8080, "protocol": "tcp"}}]}}"#
        );
        let id = format!("libcni-web-{n}");
        let added = rt.call("add", &web, &id, &pod_args(&format!("web{n}")), &cap);
        assert!(added.ok, "libcni {version}: ADD: {}", added.json);
        let ip = added.json["ips"][0]["address"]
            .as_str()
            .expect("an address in the result")
            .to_string();
        println!("libcni {version}: ADD gave {ip}");
        let listener = weft_common::netns::run_in(&web, || {
            Ok(std::net::TcpListener::bind(("0.0.0.0", 8080))?)
        })
        .expect("listening in the pod");
        std::thread::spawn(move || {
            use std::io::{BufRead as _, Write as _};
            for mut conn in listener.incoming().flatten() {
                let mut line = String::new();
                let _ = std::io::BufReader::new(&conn).read_line(&mut line);
                let _ = conn.write_all(b"web hostport\n");
            }
        });
        let target = SocketAddr::from((node_ip, host_port));
        let who = weft_common::netns::run_in(&netns_path(&lab.cp_netns()), move || {
            tcp_who(target, TIMEOUT)
        })
        .unwrap_or_else(|e| panic!("libcni {version}: hostPort {target} from outside: {e:#}"));
        assert_eq!(who, "web", "libcni {version}: hostPort answered by the pod");

        let checked = rt.call("check", &web, &id, &pod_args(&format!("web{n}")), &cap);
        assert!(
            checked.ok,
            "libcni {version}: CHECK of a healthy pod: {}",
            checked.json
        );
        let deleted = rt.call("del", &web, &id, &pod_args(&format!("web{n}")), &cap);
        assert!(deleted.ok, "libcni {version}: DEL: {}", deleted.json);

        // CHECK of a pod broken after ADD, each way in turn.
        for (i, (what, commands, names)) in BREAKAGES.iter().enumerate() {
            let name = format!("b{n}x{i}");
            let (pod_ns, pod) = pod_netns(&lab, &name);
            let id = format!("libcni-{name}");
            let args = pod_args(&name);
            let added = rt.call("add", &pod, &id, &args, "{}");
            assert!(added.ok, "libcni {version}: ADD for {what}: {}", added.json);
            let host = added.json["interfaces"][0]["name"]
                .as_str()
                .expect("host interface in the result")
                .to_string();
            let ok = rt.call("check", &pod, &id, &args, "{}");
            assert!(ok.ok, "libcni {version}: CHECK before {what}: {}", ok.json);
            for command in commands.iter() {
                let argv: Vec<String> = command
                    .iter()
                    .map(|a| {
                        a.replace("{pod}", &pod_ns)
                            .replace("{node}", &node)
                            .replace("{host}", &host)
                    })
                    .collect();
                sh(&argv.iter().map(String::as_str).collect::<Vec<_>>());
            }
            let broken = rt.call("check", &pod, &id, &args, "{}");
            println!("libcni {version}: CHECK after {what}: {}", broken.json);
            assert!(!broken.ok, "libcni {version}: CHECK passed after {what}");
            assert_eq!(
                broken.code(),
                Some(NETWORK_CHANGED),
                "libcni {version}: CHECK after {what}: {}",
                broken.json
            );
            assert!(
                broken.msg().contains(names),
                "libcni {version}: CHECK after {what} names {names:?}: {}",
                broken.msg()
            );
            let deleted = rt.call("del", &pod, &id, &args, "{}");
            assert!(
                deleted.ok,
                "libcni {version}: DEL after {what}: {}",
                deleted.json
            );
            let gone = Command::new("ip")
                .args(["-n", &node, "link", "show", &host])
                .output()
                .expect("ip link show");
            assert!(
                !gone.status.success(),
                "libcni {version}: {host} removed by DEL"
            );
        }
    }

    // A runtime that sends no pod namespace (podman): the container is
    // named by its name alone and is `unmanaged` (identity 3), not `init`
    // waiting for labels that will never come.
    let (version, driver) = drivers.last().expect("a driver");
    let rt = Runtime::new(driver, &lab, &node, dir.path());
    let (_, plain) = pod_netns(&lab, "plain");
    let added = rt.call(
        "add",
        &plain,
        "libcni-plain",
        "IgnoreUnknown=1;K8S_POD_NAME=plain",
        "{}",
    );
    assert!(
        added.ok,
        "libcni {version}: ADD without a namespace: {}",
        added.json
    );
    let endpoints = datapath
        .list_endpoints(ListEndpointsRequest::default())
        .await
        .expect("ListEndpoints")
        .into_inner()
        .endpoints;
    let plain_ep = endpoints
        .iter()
        .find(|e| e.container_id == "libcni-plain")
        .expect("the container's endpoint");
    assert_eq!(plain_ep.pod, "plain");
    assert_eq!(plain_ep.identity, weft_common::labels::reserved::UNMANAGED);
    assert!(
        plain_ep.labels.contains_key("reserved:unmanaged"),
        "{plain_ep:?}"
    );
    let deleted = rt.call(
        "del",
        &plain,
        "libcni-plain",
        "IgnoreUnknown=1;K8S_POD_NAME=plain",
        "{}",
    );
    assert!(deleted.ok, "libcni {version}: DEL: {}", deleted.json);

    // A namespace file of the wrong kind is named for what it is (4).
    let uts = Path::new("/proc/self/ns/uts");
    let refused = rt.call("add", uts, "libcni-uts", &pod_args("uts"), "{}");
    assert!(!refused.ok);
    assert_eq!(refused.code(), Some(4), "{}", refused.json);
    assert!(
        refused
            .msg()
            .contains("is a UTS namespace, not a network namespace"),
        "{}",
        refused.msg()
    );

    // Out of addresses: code 101 ("out of a resource"), named as such, and
    // the pods that got one keep it.
    let mut filled = Vec::new();
    let exhausted = loop {
        let name = format!("full{}", filled.len());
        let (_, pod) = pod_netns(&lab, &name);
        let id = format!("libcni-{name}");
        let answer = rt.call("add", &pod, &id, &pod_args(&name), "{}");
        if !answer.ok {
            break answer;
        }
        filled.push((pod, id, name));
        assert!(
            filled.len() <= 32,
            "a /27 cannot give more than 32 addresses"
        );
    };
    println!(
        "libcni {version}: ADD after {} pods: {}",
        filled.len(),
        exhausted.json
    );
    assert!(filled.len() >= 20, "a /27 gives most of its addresses");
    assert_eq!(exhausted.code(), Some(101), "{}", exhausted.json);
    assert!(exhausted.msg().contains("address"), "{}", exhausted.msg());
    for (pod, id, name) in &filled {
        let ok = rt.call("check", pod, id, &pod_args(name), "{}");
        assert!(ok.ok, "{name} still healthy: {}", ok.json);
        let deleted = rt.call("del", pod, id, &pod_args(name), "{}");
        assert!(deleted.ok, "DEL {name}: {}", deleted.json);
    }
    lab.down().await;
}
