//! weft on a real Kubernetes: upstream 1.35 built from its modules, a
//! containerd and a kubelet on each of two nodes, no kube-proxy, and weft
//! installed by `helm install deploy/helm/weft`. The lab plays Kubernetes;
//! here Kubernetes plays itself: the scheduler places pods, the kubelet asks
//! containerd for sandboxes and containerd runs `weft-cni`, the
//! EndpointSlice controller feeds svc-watcher, and weft's own pods run from
//! the image built here.
//!
//! One cluster, the promises checked in order (bringing a cluster up costs
//! a minute or two, so they share it).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use weft_e2e::{
    eventually,
    kube::{AGNHOST, TestCluster, hostnames},
    load::{self, Flow, Kind, Load, Server, Tally},
};
use weft_lab::{
    kube::install::{NAMESPACE, RELEASE},
    net::netns_path,
};

/// The servers: agnhost netexec, HTTP on 8080 and UDP on 8081.
const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 8081;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weft_serves_a_real_kubernetes_cluster() {
    let started = Instant::now();
    let c = TestCluster::up("kc", 2).await;
    let up = started.elapsed();
    println!(
        "cluster up with weft and CoreDNS in {:.0} s",
        up.as_secs_f64()
    );

    let w = Workload::deploy(&c).await;
    pods_get_addresses_from_their_nodes_cidr(&c).await;
    services_answer_from_pods_nodes_and_outside_on_both_nodes(&c, &w).await;
    the_kubernetes_service_answers_a_pod_through_weft(&c).await;
    network_policy_denies_and_allows_as_written(&c, &w).await;
    deleting_a_pod_frees_its_address(&c).await;
    weftctl_status_in_a_datapath_pod_is_healthy(&c).await;
    allocators_keep_their_state_in_the_api_servers_custom_resources(&c).await;

    let load = start_load(&c, &w);
    let mut phases = Vec::new();
    phases.push(a_rolling_upgrade_of_every_weft_pod_loses_no_connection(&c, &load).await);
    phases.push(kubelet_and_containerd_restarts_change_nothing(&c, &w, &load).await);
    phases
        .push(svc_watcher_survives_an_api_server_restart_and_a_forced_relist(&c, &w, &load).await);
    let total = report(&load, &phases);
    load.stop();
    assert!(
        total.clean(),
        "connections failed under disruption (table above)"
    );
    println!(
        "all promises held in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    c.down().await;
}

/// The Deployment and Services every phase uses, and where clients are.
struct Workload {
    cluster_ip: Ipv4Addr,
    udp_ip: Ipv4Addr,
    node_port: u16,
    /// Client pods' network namespaces: client-1 on node 1, client-2 on node 2.
    clients: Vec<(String, PathBuf)>,
    nodes: Vec<(String, Ipv4Addr)>,
}

impl Workload {
    /// `kubectl create deployment` and `kubectl expose`, as a user would,
    /// with the replicas spread over both nodes, and a client pod on each.
    async fn deploy(c: &TestCluster) -> Self {
        let k = c.kubectl();
        let run = |args: Vec<String>| {
            let k = k.clone();
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                k.run(&args).await.expect("kubectl")
            }
        };
        let netexec = format!("--http-port={HTTP_PORT}");
        let udp = format!("--udp-port={UDP_PORT}");
        run(strings(&[
            "create",
            "deployment",
            "web",
            "--image",
            AGNHOST,
            "--replicas=0",
            "--",
            "/agnhost",
            "netexec",
            &netexec,
            &udp,
        ]))
        .await;
        run(strings(&[
            "patch", "deployment", "web", "--type=merge", "-p",
            r#"{"spec":{"template":{"spec":{"topologySpreadConstraints":[{"maxSkew":1,"topologyKey":"kubernetes.io/hostname","whenUnsatisfiable":"DoNotSchedule","labelSelector":{"matchLabels":{"app":"web"}}}]}}}}"#,
        ]))
        .await;
        run(strings(&["scale", "deployment", "web", "--replicas=4"])).await;
        let target = HTTP_PORT.to_string();
        let udp_target = UDP_PORT.to_string();
        run(strings(&[
            "expose",
            "deployment",
            "web",
            "--port=80",
            "--target-port",
            &target,
        ]))
        .await;
        run(strings(&[
            "expose",
            "deployment",
            "web",
            "--name=web-udp",
            "--port=81",
            "--target-port",
            &udp_target,
            "--protocol=UDP",
        ]))
        .await;
        run(strings(&[
            "expose",
            "deployment",
            "web",
            "--name=web-np",
            "--type=NodePort",
            "--port=80",
            "--target-port",
            &target,
        ]))
        .await;
        let nodes: Vec<(String, Ipv4Addr)> =
            c.nodes().iter().map(|n| (n.name.clone(), n.addr)).collect();
        for (i, (node, _)) in nodes.iter().enumerate() {
            let overrides = format!(r#"{{"apiVersion":"v1","spec":{{"nodeName":"{node}"}}}}"#);
            run(strings(&[
                "run",
                &format!("client-{}", i + 1),
                "--image",
                AGNHOST,
                "--overrides",
                &overrides,
            ]))
            .await;
        }
        run(strings(&[
            "rollout",
            "status",
            "deployment/web",
            "--timeout=120s",
        ]))
        .await;
        run(strings(&[
            "wait",
            "--for=condition=Ready",
            "pod/client-1",
            "pod/client-2",
            "--timeout=120s",
        ]))
        .await;

        let ip = |svc: &'static str| {
            let k = k.clone();
            async move {
                k.run(&["get", "service", svc, "-o", "jsonpath={.spec.clusterIP}"])
                    .await
                    .expect("service")
                    .parse::<Ipv4Addr>()
                    .expect("a cluster IP")
            }
        };
        let node_port = k
            .run(&[
                "get",
                "service",
                "web-np",
                "-o",
                "jsonpath={.spec.ports[0].nodePort}",
            ])
            .await
            .expect("web-np")
            .parse()
            .expect("a node port");
        let mut clients = Vec::new();
        for name in ["client-1", "client-2"] {
            clients.push((
                name.to_string(),
                c.pod_netns("default", name).await.expect("client netns"),
            ));
        }
        Self {
            cluster_ip: ip("web").await,
            udp_ip: ip("web-udp").await,
            node_port,
            clients,
            nodes,
        }
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Every pod with an address of its own has one from the CIDR ipam-svc
/// gave its node, as the NodeCIDR custom resources record it.
async fn pods_get_addresses_from_their_nodes_cidr(c: &TestCluster) {
    let k = c.kubectl();
    let cidrs: BTreeMap<String, ipnet::Ipv4Net> = k
        .json(&["get", "nodecidrs.weft.io"])
        .await
        .expect("NodeCIDRs")["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["spec"]["node"].as_str().expect("node").to_string(),
                i["spec"]["cidr"]
                    .as_str()
                    .expect("cidr")
                    .parse()
                    .expect("a CIDR"),
            )
        })
        .collect();
    assert_eq!(cidrs.len(), 2, "a CIDR per node: {cidrs:?}");
    let pods = k.json(&["get", "pods", "-A"]).await.expect("pods");
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for pod in pods["items"].as_array().expect("items") {
        if pod["spec"]["hostNetwork"].as_bool() == Some(true) {
            continue;
        }
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let node = pod["spec"]["nodeName"].as_str().expect("scheduled");
        let ip: Ipv4Addr = pod["status"]["podIP"]
            .as_str()
            .expect("a pod IP")
            .parse()
            .expect("IPv4");
        let cidr = cidrs
            .get(node)
            .unwrap_or_else(|| panic!("no CIDR for {node}"));
        assert!(
            cidr.contains(&ip),
            "{name} on {node} has {ip}, outside {cidr}"
        );
        *per_node.entry(node.to_string()).or_default() += 1;
    }
    assert_eq!(per_node.len(), 2, "pods on both nodes: {per_node:?}");
    println!("pod addresses: every pod inside its node's CIDR {per_node:?}, {cidrs:?}");
}

/// Which node each backend pod runs on, by name.
async fn backend_nodes(c: &TestCluster) -> BTreeMap<String, String> {
    let pods = c
        .kubectl()
        .json(&["get", "pods", "-l", "app=web"])
        .await
        .expect("pods");
    pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().expect("name").to_string(),
                p["spec"]["nodeName"].as_str().expect("node").to_string(),
            )
        })
        .collect()
}

/// The ClusterIP (TCP and UDP) from a pod on each node and from each node,
/// and the NodePort of both nodes from pods, nodes and outside the
/// cluster: every request answered, by backends on both nodes.
async fn services_answer_from_pods_nodes_and_outside_on_both_nodes(c: &TestCluster, w: &Workload) {
    let backends = backend_nodes(c).await;
    let mut sources: Vec<(String, PathBuf)> = w.clients.clone();
    for (node, _) in &w.nodes {
        sources.push((node.clone(), netns_path(node)));
    }
    let http = SocketAddr::from((w.cluster_ip, 80));
    let udp = SocketAddr::from((w.udp_ip, 81));
    // New Services reach the datapath within moments; wait for the first.
    eventually(Duration::from_secs(30), "the ClusterIP answers", || {
        hostnames(&w.clients[0].1, http, 1, false)
    })
    .await;
    for (from, netns) in &sources {
        for (addr, is_udp) in [(http, false), (udp, true)] {
            let answers = hostnames(netns, addr, 24, is_udp)
                .await
                .unwrap_or_else(|e| panic!("{from} -> {addr}: {e:#}"));
            let nodes: BTreeSet<&String> = answers.iter().filter_map(|h| backends.get(h)).collect();
            assert_eq!(
                nodes.len(),
                2,
                "{from} -> {addr} {}: answered by {answers:?}, not by backends on both nodes",
                if is_udp { "UDP" } else { "TCP" }
            );
        }
    }
    sources.push(("outside".into(), netns_path(&c.cp_netns())));
    for (from, netns) in &sources {
        for (node, addr) in &w.nodes {
            let to = SocketAddr::from((*addr, w.node_port));
            let answers = hostnames(netns, to, 8, false)
                .await
                .unwrap_or_else(|e| panic!("{from} -> NodePort of {node} {to}: {e:#}"));
            assert_eq!(answers.len(), 8);
        }
    }
    println!(
        "services: ClusterIP TCP+UDP from {} sources and NodePort of both nodes from {} sources, all answered",
        sources.len() - 1,
        sources.len()
    );
}

/// A pod reaches the API server by the `kubernetes` Service's name, with
/// no kube-proxy: cluster DNS and the Service both go through weft.
async fn the_kubernetes_service_answers_a_pod_through_weft(c: &TestCluster) {
    let out = c
        .kubectl()
        .run(&[
            "exec",
            "client-1",
            "--",
            "curl",
            "-sk",
            "--max-time",
            "5",
            "https://kubernetes.default.svc.cluster.local/version",
        ])
        .await
        .expect("curl from a pod to the kubernetes Service");
    let version: serde_json::Value = serde_json::from_str(&out).expect("the API server's JSON");
    let git = version["gitVersion"].as_str().unwrap_or_default();
    assert!(git.starts_with("v1.35."), "version {version}");
    println!("kubernetes Service from a pod: API server {git}");
}

/// Fails unless every one of three tries fails: a policy that denies.
async fn denied(netns: &std::path::Path, to: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..3 {
        if hostnames(netns, to, 1, false).await.is_ok() {
            anyhow::bail!("{to} answered");
        }
    }
    Ok(())
}

async fn network_policy_denies_and_allows_as_written(c: &TestCluster, w: &Workload) {
    let k = c.kubectl();
    let to = SocketAddr::from((w.cluster_ip, 80));
    let (client1, client2) = (&w.clients[0].1, &w.clients[1].1);
    k.run_with_input(
        &["apply", "-f", "-"],
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-deny}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n",
    )
    .await
    .expect("deny policy");
    eventually(Duration::from_secs(30), "deny-all stops client-1", || {
        denied(client1, to)
    })
    .await;
    eventually(Duration::from_secs(30), "deny-all stops client-2", || {
        denied(client2, to)
    })
    .await;

    k.run(&["label", "pod", "client-2", "role=allowed"])
        .await
        .expect("label");
    k.run_with_input(
        &["apply", "-f", "-"],
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-allow}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n    - from: [{podSelector: {matchLabels: {role: allowed}}}]\n      ports: [{port: 8080}]\n",
    )
    .await
    .expect("allow policy");
    eventually(
        Duration::from_secs(30),
        "the labelled client-2 is let in",
        || hostnames(client2, to, 8, false),
    )
    .await;
    denied(client1, to)
        .await
        .expect("client-1 is still kept out");

    k.run(&["delete", "networkpolicy", "web-deny", "web-allow"])
        .await
        .expect("delete policies");
    eventually(
        Duration::from_secs(30),
        "without policies client-1 is let in again",
        || hostnames(client1, to, 4, false),
    )
    .await;
    println!(
        "network policy: deny-all denied both clients, the allow let only the labelled one in"
    );
}

/// The datapath's endpoint list on a node, by pod IP.
async fn endpoint_ips(c: &TestCluster, node: &str) -> BTreeSet<String> {
    let out = c
        .weftctl(node, &["endpoint", "list", "-o", "json"])
        .await
        .expect("weftctl endpoint list");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    v["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["ip"].as_str().map(String::from))
        .collect()
}

async fn pod_ips_used(c: &TestCluster, node: &str) -> u64 {
    let out = c
        .weftctl(node, &["status", "-o", "json"])
        .await
        .expect("weftctl status");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    v["datapath"]["pod_ips_used"]
        .as_u64()
        .expect("pod_ips_used")
}

async fn deleting_a_pod_frees_its_address(c: &TestCluster) {
    let k = c.kubectl();
    let node = c.nodes()[1].name.clone();
    let used_before = pod_ips_used(c, &node).await;
    let overrides = format!(r#"{{"apiVersion":"v1","spec":{{"nodeName":"{node}"}}}}"#);
    k.run(&[
        "run",
        "short-lived",
        "--image",
        AGNHOST,
        "--overrides",
        &overrides,
    ])
    .await
    .expect("kubectl run");
    k.run(&[
        "wait",
        "--for=condition=Ready",
        "pod/short-lived",
        "--timeout=60s",
    ])
    .await
    .expect("pod ready");
    let ip = k
        .run(&[
            "get",
            "pod",
            "short-lived",
            "-o",
            "jsonpath={.status.podIP}",
        ])
        .await
        .expect("pod IP");
    assert!(
        endpoint_ips(c, &node).await.contains(&ip),
        "{ip} is not an endpoint on {node}"
    );
    assert_eq!(pod_ips_used(c, &node).await, used_before + 1);
    k.run(&["delete", "pod", "short-lived", "--wait=true"])
        .await
        .expect("delete");
    eventually(Duration::from_secs(30), "the address is freed", || {
        let ip = ip.clone();
        let node = node.clone();
        async move {
            let used = pod_ips_used(c, &node).await;
            anyhow::ensure!(
                !endpoint_ips(c, &node).await.contains(&ip),
                "{ip} is still an endpoint"
            );
            anyhow::ensure!(
                used == used_before,
                "{used} addresses in use, {used_before} before"
            );
            Ok(())
        }
    })
    .await;
    println!("kubectl delete pod: {ip} freed on {node}");
}

async fn weftctl_status_in_a_datapath_pod_is_healthy(c: &TestCluster) {
    for node in c.nodes() {
        let out = c
            .weftctl(&node.name, &["status"])
            .await
            .unwrap_or_else(|e| panic!("weftctl status on {}: {e:#}", node.name));
        assert!(out.contains("Overall: healthy"), "{}:\n{out}", node.name);
    }
    println!("weftctl status: healthy in every datapath pod");
}

async fn allocators_keep_their_state_in_the_api_servers_custom_resources(c: &TestCluster) {
    let k = c.kubectl();
    let nodes: BTreeSet<String> = k
        .json(&["get", "nodecidrs.weft.io"])
        .await
        .expect("NodeCIDRs")["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["spec"]["node"].as_str().map(String::from))
        .collect();
    let expected: BTreeSet<String> = c.nodes().into_iter().map(|n| n.name).collect();
    assert_eq!(nodes, expected, "a NodeCIDR per node");
    let ids = k
        .json(&["get", "securityidentities.weft.io"])
        .await
        .expect("SecurityIdentities");
    let web = ids["items"].as_array().expect("items").iter().any(|i| {
        i["spec"]["labels"]["k8s:app"] == "web"
            && i["spec"]["owners"].as_array().is_some_and(|o| o.len() >= 4)
    });
    assert!(web, "no SecurityIdentity owned by the web pods: {ids}");
    println!("allocators: NodeCIDRs and SecurityIdentities in the API server");
}

/// Traffic that runs through the disruptions: new connections and
/// datagrams to the ClusterIP from a pod on each node and from a node,
/// long-lived connections, and new connections to both NodePorts from
/// outside the cluster.
fn start_load(c: &TestCluster, w: &Workload) -> Load {
    let http = SocketAddr::from((w.cluster_ip, 80));
    let udp = SocketAddr::from((w.udp_ip, 81));
    let outside = netns_path(&c.cp_netns());
    let mut flows = vec![
        (
            w.clients[0].clone(),
            http,
            "ClusterIP".to_string(),
            Kind::TcpNew,
        ),
        (w.clients[0].clone(), udp, "ClusterIP".into(), Kind::Udp),
        (
            w.clients[0].clone(),
            http,
            "ClusterIP".into(),
            Kind::TcpEstablished(8),
        ),
        (w.clients[1].clone(), http, "ClusterIP".into(), Kind::TcpNew),
        (
            (w.nodes[1].0.clone(), netns_path(&w.nodes[1].0)),
            http,
            "ClusterIP".into(),
            Kind::TcpNew,
        ),
    ];
    for (node, addr) in &w.nodes {
        flows.push((
            ("outside".into(), outside.clone()),
            SocketAddr::from((*addr, w.node_port)),
            format!("NodePort {node}"),
            Kind::TcpNew,
        ));
    }
    let flows = flows
        .into_iter()
        .map(|((from, netns), to, what, kind)| Flow {
            from,
            netns,
            to,
            what,
            kind,
            server: Server::Netexec,
        })
        .collect();
    Load::start(flows, Duration::from_millis(20)).expect("starting the load")
}

/// A named span of the load.
struct Phase {
    name: &'static str,
    before: Vec<Tally>,
    after: Vec<Tally>,
    took: Duration,
}

async fn phase<F, Fut>(load: &Load, name: &'static str, run: F) -> Phase
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let before = load.snapshot();
    run().await;
    // Let anything a disruption broke show before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = load.snapshot();
    let (table, total) = load::report(load, &before, &after);
    println!(
        "{name} ({:.0} s):\n{table}    total {total}",
        started.elapsed().as_secs_f64()
    );
    for e in load.errors_since(started) {
        println!("      {e}");
    }
    Phase {
        name,
        before,
        after,
        took: started.elapsed(),
    }
}

fn report(load: &Load, phases: &[Phase]) -> Tally {
    let mut total = Tally::default();
    println!("\nconnections under disruption:");
    for p in phases {
        let (_, t) = load::report(load, &p.before, &p.after);
        println!("  {:<60} {:>4.0} s  {t}", p.name, p.took.as_secs_f64());
        total = total + t;
    }
    println!("  {:<60}         {total}", "all");
    total
}

/// `helm upgrade` that changes every weft pod's template, so the
/// DaemonSet rolls node by node and the Deployments restart.
async fn a_rolling_upgrade_of_every_weft_pod_loses_no_connection(
    c: &TestCluster,
    load: &Load,
) -> Phase {
    phase(load, "helm upgrade rolling every weft pod", || async {
        let chart = c.cfg.chart.clone().expect("chart");
        let chart = chart.display().to_string();
        let stamp = format!("podAnnotations.weft\\.io/restarted={}", std::process::id());
        let mut args = vec![
            "upgrade",
            RELEASE,
            &chart,
            "--namespace",
            NAMESPACE,
            "--reuse-values",
        ];
        args.extend(["--set-string", &stamp]);
        let before = weft_pod_uids(c).await;
        c.kubectl().helm(&args).await.expect("helm upgrade");
        c.wait_weft(Duration::from_secs(240))
            .await
            .expect("weft rolled out");
        let after = weft_pod_uids(c).await;
        assert!(
            before.is_disjoint(&after),
            "every weft pod was replaced: {before:?} {after:?}"
        );
    })
    .await
}

async fn weft_pod_uids(c: &TestCluster) -> BTreeSet<String> {
    let pods = c
        .kubectl()
        .json(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/part-of=weft",
        ])
        .await
        .expect("weft pods");
    pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|p| p["metadata"]["uid"].as_str().map(String::from))
        .collect()
}

/// Every pod's identity, address and restart count.
async fn pod_fingerprints(c: &TestCluster) -> BTreeSet<String> {
    let pods = c
        .kubectl()
        .json(&["get", "pods", "-A"])
        .await
        .expect("pods");
    pods["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| {
            let restarts: u64 = p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["restartCount"].as_u64())
                .sum();
            format!(
                "{}/{} {} {} restarts={restarts}",
                p["metadata"]["namespace"].as_str().unwrap_or_default(),
                p["metadata"]["name"].as_str().unwrap_or_default(),
                p["metadata"]["uid"].as_str().unwrap_or_default(),
                p["status"]["podIP"].as_str().unwrap_or_default(),
            )
        })
        .collect()
}

async fn kubelet_and_containerd_restarts_change_nothing(
    c: &TestCluster,
    w: &Workload,
    load: &Load,
) -> Phase {
    phase(
        load,
        "kubelet and containerd restarts on node 2",
        || async {
            let before = pod_fingerprints(c).await;
            let node = w.nodes[1].0.clone();
            for process in ["kubelet", "containerd"] {
                let daemon = c.find_daemon(&format!("{node}-{process}")).expect("daemon");
                daemon.restart().await.expect("restart");
                tokio::time::sleep(Duration::from_secs(5)).await;
                c.kubectl()
                    .run(&[
                        "wait",
                        "--for=condition=Ready",
                        "node",
                        &node,
                        "--timeout=60s",
                    ])
                    .await
                    .expect("node Ready again");
            }
            // The kubelet resyncs its pods after a restart: give it the time
            // it would take to restart any, then compare.
            tokio::time::sleep(Duration::from_secs(10)).await;
            let after = pod_fingerprints(c).await;
            assert_eq!(before, after, "pods changed across the restarts");
        },
    )
    .await
}

/// svc-watcher's relist counter, from its metrics.
async fn relists(c: &TestCluster, w: &Workload) -> u64 {
    weft_e2e::kube::watcher_relists(
        &netns_path(&c.cp_netns()),
        SocketAddr::from((w.nodes[0].1, 9410)),
    )
    .await
}

/// The API server stops; etcd moves on and is compacted past every
/// revision svc-watcher saw, so its watches resume only by listing again
/// (410 Gone); the API server comes back. Traffic never notices, and a
/// Service created afterwards is served.
async fn svc_watcher_survives_an_api_server_restart_and_a_forced_relist(
    c: &TestCluster,
    w: &Workload,
    load: &Load,
) -> Phase {
    phase(load, "API server restart and etcd compaction (410)", || async {
        let relists_before = relists(c, w).await;
        let apiserver = c.find_daemon("kube-apiserver").expect("daemon");
        apiserver
            .stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30))
            .await;
        let revision = c.etcd_compact(50).await.expect("etcd compaction");
        tokio::time::sleep(Duration::from_secs(5)).await;
        apiserver.start().expect("API server start");
        c.wait_api(Duration::from_secs(90)).await.expect("API server ready");
        let back = Instant::now();
        c.kubectl()
            .run(&["expose", "deployment", "web", "--name=late", "--port=82", "--target-port=8080"])
            .await
            .expect("a new Service");
        let ip: Ipv4Addr = c
            .kubectl()
            .run(&["get", "service", "late", "-o", "jsonpath={.spec.clusterIP}"])
            .await
            .expect("late")
            .parse()
            .expect("IPv4");
        eventually(Duration::from_secs(60), "the new Service answers", || {
            hostnames(&w.clients[1].1, SocketAddr::from((ip, 82)), 1, false)
        })
        .await;
        let relists_after = relists(c, w).await;
        println!(
            "  etcd compacted at revision {revision}; svc-watcher listed again {} times; a Service created after the API server returned answered {:.1} s later",
            relists_after - relists_before,
            back.elapsed().as_secs_f64()
        );
        assert!(relists_after > relists_before, "svc-watcher never listed again");
    })
    .await
}
