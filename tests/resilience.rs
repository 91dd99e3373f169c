//! Traffic never waits for the control plane.
//!
//! Under continuous load through a ClusterIP and NodePorts (long-lived
//! connections doing request/reply, new TCP connections and UDP datagrams,
//! from a pod and from outside the cluster), every service is restarted in
//! turn, datapath-svc with SIGTERM and with SIGKILL: no established
//! connection breaks, no new one fails, and the load-balancer maps hold the
//! desired state throughout, with the same entries and ids (no flush).
//!
//! Then: a new pod on a node whose CIDR is cached gets an address and a
//! working endpoint while svc-watcher, ipam-svc and identity-svc are all
//! down; CNI DEL while datapath-svc is down is queued and carried out at its
//! start, CNI ADD fails fast with "try again later"; malformed Kubernetes
//! objects are skipped with a metric while the rest flows; and the CNI
//! socket refuses anyone but root.
//!
//! The tests here take the machine's CPUs for themselves (a lab each, and
//! one runs a load generator): they run one at a time.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::Path,
    time::{Duration, Instant},
};

use weft_e2e::{
    TestLab, eventually,
    lbmaps::{self, MapWatch},
    load::{self, Flow, Kind, Load, Server, Tally},
};
use weft_lab::{
    lab::CniCall,
    net::netns_path,
    podserver::{in_pod, tcp_who, udp_who},
};
use weft_proto::datapath::v1::{
    EndpointEntry, ListEndpointsRequest, ListServicesRequest, StatusRequest, StatusResponse,
};

/// One test at a time: each brings up a lab, and the load test needs the
/// CPUs to itself to mean anything.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TIMEOUT: Duration = Duration::from_secs(3);

fn pod(name: &str, app: &str, node: &str) -> String {
    weft_e2e::pod_manifest("default", name, &[("app", app)], Some(node), None)
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: NodePort
  selector:
    app: web
  ports:
    - name: tcp
      protocol: TCP
      port: 80
      targetPort: 8080
      nodePort: 30080
    - name: udp
      protocol: UDP
      port: 53
      targetPort: 8080
      nodePort: 30053
"#;

async fn status(lab: &TestLab, node: &str) -> anyhow::Result<StatusResponse> {
    Ok(lab
        .datapath(node)
        .status(StatusRequest {})
        .await?
        .into_inner())
}

async fn endpoints(lab: &TestLab, node: &str) -> anyhow::Result<Vec<EndpointEntry>> {
    Ok(lab
        .datapath(node)
        .list_endpoints(ListEndpointsRequest {})
        .await?
        .into_inner()
        .endpoints)
}

/// Waits until `node`'s datapath is connected to the named control-plane
/// services again.
async fn wait_connected(lab: &TestLab, node: &str, peers: &[&str]) {
    eventually(
        Duration::from_secs(30),
        &format!("{node} connected to {peers:?}"),
        || async {
            let s = status(lab, node).await?;
            for peer in peers {
                let up = s.components.iter().any(|c| c.name == *peer && c.connected);
                anyhow::ensure!(up, "{peer} not connected");
            }
            Ok(())
        },
    )
    .await;
}

const CONTROL_PLANE: [&str; 3] = ["svc-watcher", "ipam-svc", "identity-svc"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Term,
    Kill,
}

struct Phase {
    name: &'static str,
    services: Vec<String>,
    how: How,
}

/// Stops `services` (SIGTERM: each must exit 0 on its own; SIGKILL), keeps
/// them down for `down`, and starts them again in order.
async fn restart(lab: &TestLab, services: &[String], how: How, down: Duration) {
    for s in services {
        match how {
            How::Term => {
                let exit = lab.stop_service(s).await.expect("stop");
                assert!(
                    exit.is_some_and(|e| e.success()),
                    "{s} exits 0 on SIGTERM, promptly: {exit:?}"
                );
            }
            How::Kill => lab.kill_service(s).await.expect("kill"),
        }
    }
    tokio::time::sleep(down).await;
    for s in services {
        lab.start_service(s).await.expect("start");
    }
}

/// The maps of every node: equal to the desired state computed from
/// svc-watcher's objects, and to what they held before the restarts.
async fn check_maps(lab: &TestLab, watches: &[MapWatch]) -> Result<String, String> {
    let mut notes = Vec::new();
    for (node, watch) in lab.node_names().iter().zip(watches) {
        let desired = lbmaps::desired(lab, node)
            .await
            .map_err(|e| format!("{node}: desired state: {e:#}"))?;
        let maps = lbmaps::verify(&watch.pin_dir, &desired).map_err(|e| format!("{e:#}"))?;
        let baseline = watch.baseline();
        if maps != baseline {
            return Err(format!(
                "{node}: the maps changed: {}",
                lbmaps::describe_diff(&baseline, &maps)
            ));
        }
        let (samples, deviations, first) = watch.tally();
        if deviations > 0 {
            return Err(format!(
                "{node}: {deviations} of {samples} samples differed from the programmed state, first: {}",
                first.unwrap_or_default()
            ));
        }
        notes.push(format!(
            "{node}: {} frontends, {} service entries, {} backends equal to the desired state; {samples} samples, none differed",
            desired.len(),
            maps.services.len(),
            maps.backends.len()
        ));
    }
    Ok(notes.join("\n    "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_connection_notices_any_restart_under_load() {
    let _serial = SERIAL.lock().await;
    let lab = TestLab::up("resilience_load", 2).await;
    let nodes = lab.node_names();
    let (n1, n2) = (nodes[0].clone(), nodes[1].clone());
    let ip1 = lab.node_addr(&n1).expect("addr");
    let ip2 = lab.node_addr(&n2).expect("addr");
    lab.manifests
        .apply_yaml("service-web.yaml", WEB)
        .expect("apply");
    for (name, app, node) in [
        ("web-1", "web", &n1),
        ("web-2", "web", &n2),
        ("client-1", "client", &n1),
    ] {
        lab.manifests
            .apply_yaml(&format!("pod-{name}.yaml"), &pod(name, app, node))
            .expect("apply");
    }
    for name in ["web-1", "web-2", "client-1"] {
        lab.wait_pod_ready("default", name, Duration::from_secs(60))
            .await
            .expect("pod ready");
    }
    let vip = lab.cluster_ip("web").await;
    for (node, ip) in [(&n1, ip1), (&n2, ip2)] {
        for frontend in [
            format!("{vip}:80/TCP"),
            format!("{vip}:53/UDP"),
            format!("{ip}:30080/TCP"),
            format!("{ip}:30053/UDP"),
        ] {
            lab.wait_frontend(node, &frontend, 2).await;
        }
    }
    let watches: Vec<MapWatch> = nodes
        .iter()
        .map(|n| MapWatch::start(&lab.pin_dir(n)).expect("map watch"))
        .collect();
    let initial = check_maps(&lab, &watches)
        .await
        .unwrap_or_else(|e| panic!("before any restart: {e}"));
    println!("before any restart:\n    {initial}");

    let client = lab.pod_netns_path("default", "client-1");
    let outside = netns_path(&lab.cp_netns());
    // (from, to, what, kind): from the client pod or from outside the cluster.
    use Kind::{TcpEstablished as Established, TcpNew as New, Udp};
    let flows: Vec<Flow> = [
        ("client-1", (vip, 80), "ClusterIP", Established(4)),
        ("client-1", (vip, 80), "ClusterIP", New),
        ("client-1", (vip, 53), "ClusterIP", Udp),
        ("client-1", (ip2, 30080), "NodePort", New),
        ("client-1", (ip2, 30053), "NodePort", Udp),
        ("outside", (ip1, 30080), "NodePort", Established(4)),
        ("outside", (ip2, 30080), "NodePort", Established(2)),
        ("outside", (ip1, 30080), "NodePort", New),
        ("outside", (ip2, 30080), "NodePort", New),
        ("outside", (ip1, 30053), "NodePort", Udp),
    ]
    .into_iter()
    .map(|(from, to, what, kind)| Flow {
        from: from.into(),
        netns: if from == "outside" {
            outside.clone()
        } else {
            client.clone()
        },
        to: to.into(),
        what: what.into(),
        kind,
        server: Server::Lab,
    })
    .collect();
    let load = Load::start(flows, Duration::from_millis(8)).expect("load");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let datapaths: Vec<String> = nodes.iter().map(|n| format!("datapath-svc/{n}")).collect();
    let phases = vec![
        Phase {
            name: "svc-watcher restarted",
            services: vec!["svc-watcher".into()],
            how: How::Term,
        },
        Phase {
            name: "ipam-svc restarted",
            services: vec!["ipam-svc".into()],
            how: How::Term,
        },
        Phase {
            name: "identity-svc restarted",
            services: vec!["identity-svc".into()],
            how: How::Term,
        },
        Phase {
            name: "all three restarted at once",
            services: CONTROL_PLANE.iter().map(|s| s.to_string()).collect(),
            how: How::Term,
        },
        Phase {
            name: "datapath-svc SIGTERM and start (both nodes)",
            services: datapaths.clone(),
            how: How::Term,
        },
        Phase {
            name: "datapath-svc SIGKILL and start (both nodes)",
            services: datapaths.clone(),
            how: How::Kill,
        },
    ];

    let mut failures = Vec::new();
    let mut grand = Tally::default();
    let mut before = load.snapshot();
    let started = Instant::now();
    for phase in &phases {
        let at = Instant::now();
        restart(&lab, &phase.services, phase.how, Duration::from_secs(1)).await;
        for node in &nodes {
            wait_connected(&lab, node, &CONTROL_PLANE).await;
        }
        let took = at.elapsed();
        // Some more traffic on the restarted system.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = load.snapshot();
        let (table, total) = load::report(&load, &before, &after);
        grand = grand + total;
        let maps = check_maps(&lab, &watches).await;
        println!(
            "phase: {} (back after {took:.1?})\n{table}    total {total}\n    maps: {}",
            phase.name,
            match &maps {
                Ok(m) => m.clone(),
                Err(e) => format!("WRONG: {e}"),
            }
        );
        if !total.clean() {
            failures.push(format!(
                "{}: {total}\n      {}",
                phase.name,
                load.errors_since(at).join("\n      ")
            ));
        }
        if let Err(e) = maps {
            failures.push(format!("{}: maps: {e}", phase.name));
        }
        before = after;
    }
    let kinds: Vec<Kind> = load.flows().map(|f| f.kind).collect();
    let end = load.stop();
    let opened: u64 = end.iter().map(|t| t.opened).sum();
    println!(
        "all phases ({:.1?}): {grand}; established connections opened {opened} (the first ones plus one per break)",
        started.elapsed()
    );
    let by_kind = |pred: &dyn Fn(&Kind) -> bool| -> u64 {
        end.iter()
            .zip(&kinds)
            .filter(|(_, k)| pred(k))
            .map(|(t, _)| t.tried)
            .sum()
    };
    let tcp_new = by_kind(&|k| *k == Kind::TcpNew);
    let udp = by_kind(&|k| *k == Kind::Udp);
    let round_trips = by_kind(&|k| matches!(k, Kind::TcpEstablished(_)));
    println!(
        "whole run: {tcp_new} new TCP connections, {udp} UDP datagrams, {round_trips} round trips on established connections"
    );
    assert!(
        failures.is_empty(),
        "traffic noticed a restart:\n  {}",
        failures.join("\n  ")
    );
    assert!(
        tcp_new >= 2000 && udp >= 1000,
        "enough load to mean something: {tcp_new} TCP, {udp} UDP"
    );
    drop(watches);
    lab.down().await;
}

/// The endpoint of `pod` on `node`, if the datapath lists one.
async fn endpoint_of(lab: &TestLab, node: &str, pod: &str) -> anyhow::Result<EndpointEntry> {
    endpoints(lab, node)
        .await?
        .into_iter()
        .find(|e| e.pod == pod)
        .ok_or_else(|| anyhow::anyhow!("no endpoint for {pod}"))
}

/// TCP and UDP to `ip:8080` from `from`'s pod: who answered.
fn ask_pod(lab: &TestLab, from: &str, ip: Ipv4Addr) -> anyhow::Result<(String, String)> {
    let netns = lab.pod_netns_path("default", from);
    let addr = SocketAddr::from((ip, 8080));
    in_pod(&netns, move || {
        Ok((tcp_who(addr, TIMEOUT)?, udp_who(addr, TIMEOUT)?))
    })
}

/// With svc-watcher, ipam-svc and identity-svc all stopped, and datapath-svc
/// itself restarted (so the CIDR comes from its disk cache), a new pod gets
/// an address and a working endpoint, reachable from a pod on the other
/// node, with identity `init`. The control plane then comes back one
/// service at a time, svc-watcher first: the pod stays reachable, and its
/// identity turns into the real one without the pod being touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_gets_an_address_and_an_endpoint_with_the_control_plane_down() {
    let _serial = SERIAL.lock().await;
    let lab = TestLab::up("resilience_cp_down", 2).await;
    let nodes = lab.node_names();
    let (n1, n2) = (nodes[0].clone(), nodes[1].clone());
    lab.manifests
        .apply_yaml("pod-peer.yaml", &pod("peer", "peer", &n2))
        .expect("apply");
    lab.wait_pod_ready("default", "peer", Duration::from_secs(60))
        .await
        .expect("peer ready");
    let cidr: ipnet::Ipv4Net = status(&lab, &n1)
        .await
        .expect("status")
        .pod_cidr
        .parse()
        .expect("node 1 has a CIDR");

    for s in CONTROL_PLANE {
        let exit = lab.stop_service(s).await.expect("stop");
        assert!(exit.is_some_and(|e| e.success()), "{s} stopped cleanly");
    }
    lab.kill_service(&format!("datapath-svc/{n1}"))
        .await
        .expect("kill");
    lab.start_service(&format!("datapath-svc/{n1}"))
        .await
        .expect("datapath-svc starts without its control plane");

    let started = Instant::now();
    lab.manifests
        .apply_yaml("pod-late.yaml", &pod("late", "late", &n1))
        .expect("apply");
    let ip = lab
        .wait_pod_ready("default", "late", Duration::from_secs(30))
        .await
        .expect("the new pod is ready with the control plane down");
    println!(
        "control plane down: pod default/late got {ip} (node CIDR {cidr}, from the cache) in {:.1?}",
        started.elapsed()
    );
    assert!(cidr.contains(&ip), "{ip} is from the cached CIDR {cidr}");
    let (tcp, udp) = ask_pod(&lab, "peer", ip).expect("reachable from the other node");
    assert_eq!((tcp.as_str(), udp.as_str()), ("late", "late"));
    let ep = endpoint_of(&lab, &n1, "default/late")
        .await
        .expect("endpoint");
    println!(
        "  endpoint {} on {}, identity {} (init is {})",
        ep.ip,
        ep.host_ifname,
        ep.identity,
        weft_common::labels::reserved::INIT
    );
    assert_eq!(ep.identity, weft_common::labels::reserved::INIT);

    // svc-watcher alone comes back: the datapath resyncs (and recomputes its
    // routes) while ipam-svc is still away. Nothing may be lost.
    lab.start_service("svc-watcher").await.expect("start");
    wait_connected(&lab, &n1, &["svc-watcher"]).await;
    wait_connected(&lab, &n2, &["svc-watcher"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (tcp, udp) = ask_pod(&lab, "peer", ip).expect("still reachable with ipam-svc down");
    assert_eq!((tcp.as_str(), udp.as_str()), ("late", "late"));
    let ep_now = endpoint_of(&lab, &n1, "default/late")
        .await
        .expect("endpoint");
    assert_eq!(
        ep_now.identity,
        weft_common::labels::reserved::INIT,
        "init until identity-svc returns"
    );

    lab.start_service("ipam-svc").await.expect("start");
    lab.start_service("identity-svc").await.expect("start");
    let real = eventually(
        Duration::from_secs(20),
        "the real identity replaces init",
        || async {
            let e = endpoint_of(&lab, &n1, "default/late").await?;
            anyhow::ensure!(e.identity >= 256, "identity {}", e.identity);
            Ok(e)
        },
    )
    .await;
    println!(
        "  control plane back: identity {} for labels {:?}",
        real.identity, real.labels
    );
    assert_eq!(
        real.labels.get("k8s:app").map(String::as_str),
        Some("late"),
        "the identity is the pod's: {:?}",
        real.labels
    );
    assert_eq!(
        (
            real.container_id.as_str(),
            real.ip.as_str(),
            real.host_ifname.as_str()
        ),
        (
            ep.container_id.as_str(),
            ep.ip.as_str(),
            ep.host_ifname.as_str()
        ),
        "the pod was not touched"
    );
    let (tcp, _) = ask_pod(&lab, "peer", ip).expect("reachable");
    assert_eq!(tcp, "late");
    lab.down().await;
}

/// The files in a CNI DEL queue directory (hidden temporaries aside).
fn queued(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

fn cni_error(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a CNI error object ({e}): {stdout}"))
}

fn cni_call<'a>(node: &'a str, command: &'a str, id: &'a str, netns: &'a str) -> CniCall<'a> {
    CniCall::new(node, command, id, netns, "default", id)
}

/// CNI DEL while datapath-svc is down is queued on disk and carried out
/// when it starts; CNI ADD while it is down (stopped, killed, or hung)
/// fails within a bound with "try again later" (11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_del_is_queued_and_add_fails_fast_while_the_datapath_is_down() {
    let _serial = SERIAL.lock().await;
    let lab = TestLab::up("resilience_cni_down", 1).await;
    let node = lab.node_names()[0].clone();
    let service = format!("datapath-svc/{node}");
    let queue = lab.cni_del_queue_dir(&node);
    let netns_a = format!("{}-extra-a", lab.cfg.name);
    let netns_b = format!("{}-extra-b", lab.cfg.name);
    weft_lab::net::netns_add(&netns_a).expect("netns a");
    weft_lab::net::netns_add(&netns_b).expect("netns b");
    // A sandbox plumbed through the real plugin and datapath.
    let added = lab
        .cni(&cni_call(&node, "ADD", "extra-a", &netns_a))
        .await
        .expect("ADD with the datapath up");
    let used_before = status(&lab, &node).await.expect("status").pod_ips_used;
    let ep = endpoints(&lab, &node)
        .await
        .expect("endpoints")
        .into_iter()
        .find(|e| e.container_id == "extra-a")
        .expect("the endpoint is listed");
    println!(
        "ADD extra-a: {} on {} ({used_before} addresses in use)",
        ep.ip, ep.host_ifname
    );
    assert!(added.contains(&ep.ip), "{added}");

    let exit = lab.stop_service(&service).await.expect("stop");
    assert!(exit.is_some_and(|e| e.success()), "SIGTERM: exit 0");

    // DEL while down: success, and queued.
    let t = Instant::now();
    let out = lab
        .cni_output(&cni_call(&node, "DEL", "extra-a", &netns_a))
        .await
        .expect("run DEL");
    let del_took = t.elapsed();
    let files = queued(&queue);
    println!(
        "DEL with datapath-svc stopped: exit {:?} in {del_took:.1?}, queued {files:?}",
        out.status.code()
    );
    assert!(out.status.success(), "DEL succeeds: {}", cni_error(&out));
    assert_eq!(files.len(), 1, "one DEL queued in {}", queue.display());

    // ADD while down (stopped, then killed with its socket file left
    // behind): code 11 within the bound.
    // One ADD of extra-b: how long the plugin took, and what it printed.
    let timed_add = async || {
        let t = Instant::now();
        let out = lab
            .cni_output(&cni_call(&node, "ADD", "extra-b", &netns_b))
            .await
            .expect("run ADD");
        (t.elapsed(), out)
    };
    let mut add_failures = Vec::new();
    let (took, out) = timed_add().await;
    add_failures.push(("stopped", took, out));

    lab.start_service(&service).await.expect("start");
    // The queued DEL was carried out before the datapath served.
    let files = queued(&queue);
    let eps = endpoints(&lab, &node).await.expect("endpoints");
    let used_after = status(&lab, &node).await.expect("status").pod_ips_used;
    let veth_gone = weft_lab::net::ip_in(&node, &["link", "show", &ep.host_ifname]).is_err();
    println!(
        "datapath-svc started: queue {files:?}, extra-a listed: {}, addresses in use {used_before} -> {used_after}, veth {} gone: {veth_gone}",
        eps.iter().any(|e| e.container_id == "extra-a"),
        ep.host_ifname
    );
    assert!(files.is_empty(), "the queue is drained");
    assert!(!eps.iter().any(|e| e.container_id == "extra-a"));
    assert_eq!(used_after + 1, used_before, "the address was released");
    assert!(veth_gone, "the pod's veth is gone");

    lab.kill_service(&service).await.expect("kill");
    assert!(
        lab.cni_socket(&node).exists(),
        "SIGKILL leaves the socket file behind"
    );
    let (took, out) = timed_add().await;
    add_failures.push(("killed, stale socket", took, out));
    lab.start_service(&service).await.expect("start");

    for (how, took, out) in &add_failures {
        let err = cni_error(out);
        println!(
            "ADD with datapath-svc {how}: exit {:?} in {took:.2?}: {err}",
            out.status.code()
        );
        assert!(!out.status.success(), "ADD fails");
        assert_eq!(err["code"], 11, "try again later: {err}");
        assert!(
            err["msg"]
                .as_str()
                .is_some_and(|m| m.contains("datapath-svc")),
            "the message says what is missing: {err}"
        );
        assert!(
            *took < Duration::from_secs(3),
            "{how}: fails fast ({took:?})"
        );
    }

    // Hung (SIGSTOP): the socket accepts but nobody answers. ADD gives up
    // within the plugin's timeout (10 s by default) instead of hanging.
    let pid = lab.service_pid(&service).await.expect("pid");
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let (took, out) = timed_add().await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    let err = cni_error(&out);
    println!(
        "ADD with datapath-svc hung: exit {:?} in {took:.2?}: {err}",
        out.status.code()
    );
    assert_eq!(err["code"], 11, "try again later: {err}");
    assert!(
        took < Duration::from_secs(12),
        "bounded by the plugin's timeout: {took:?}"
    );

    // Once it answers again, the runtime's retry of the ADD works.
    lab.wait_serving(&service, Duration::from_secs(20))
        .await
        .expect("serving");
    let added = lab
        .cni(&cni_call(&node, "ADD", "extra-b", &netns_b))
        .await
        .expect("ADD after the datapath is back");
    println!("ADD extra-b once datapath-svc is back: {added}");
    lab.cni(&cni_call(&node, "DEL", "extra-b", &netns_b))
        .await
        .expect("DEL");
    lab.down().await;
}

/// Scrapes a Prometheus endpoint from inside a lab namespace.
fn scrape(netns: &Path, addr: SocketAddr) -> anyhow::Result<String> {
    in_pod(netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
}

/// `weft_watcher_invalid_objects_total` by (kind, reason).
fn invalid_counts(metrics: &str) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("weft_watcher_invalid_objects_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|l| l.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        out.insert(
            (label("kind"), label("reason")),
            value.trim().parse().unwrap_or(0),
        );
    }
    out
}

const MALFORMED: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: bad-port
  namespace: default
spec:
  selector:
    app: web
  ports:
    - name: tcp
      protocol: TCP
      port: 70000
      targetPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: bad-ip
  namespace: default
spec:
  clusterIP: 10.96.300.1
  selector:
    app: web
  ports:
    - port: 81
      targetPort: 8080
---
apiVersion: v1
kind: Node
metadata:
  name: bad-cidr
spec:
  podCIDR: 10.244.300.0/24
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-handmade
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
  - conditions:
      ready: true
ports:
  - name: tcp
    port: 8080
    protocol: TCP
---
apiVersion: v1
kind: Service
metadata:
  name: good-too
  namespace: default
spec:
  selector:
    app: web
  ports:
    - name: tcp
      protocol: TCP
      port: 8081
      targetPort: 8080
"#;

const WEB_CLUSTERIP: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector:
    app: web
  ports:
    - name: tcp
      protocol: TCP
      port: 80
      targetPort: 8080
"#;

/// Malformed objects from the watch (bad ports, bad addresses, bad CIDRs,
/// missing fields, and a bad update of a good Service) are skipped with a
/// logged reason and a metric; the good objects next to them reach the
/// datapath, and what was programmed before stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_objects_are_skipped_and_the_rest_keeps_flowing() {
    let _serial = SERIAL.lock().await;
    let lab = TestLab::up("resilience_malformed", 1).await;
    let node = lab.node_names()[0].clone();
    lab.manifests
        .apply_yaml("service-web.yaml", WEB_CLUSTERIP)
        .expect("apply");
    for (name, app) in [("web-1", "web"), ("client", "client")] {
        lab.manifests
            .apply_yaml(&format!("pod-{name}.yaml"), &pod(name, app, &node))
            .expect("apply");
        lab.wait_pod_ready("default", name, Duration::from_secs(60))
            .await
            .expect("ready");
    }
    let vip = lab.cluster_ip("web").await;
    lab.wait_frontend(&node, &format!("{vip}:80/TCP"), 1).await;
    let cp = netns_path(&lab.cp_netns());
    let metrics_addr = SocketAddr::from((weft_lab::lab::CP_ADDR, 9410));
    let before = invalid_counts(&scrape(&cp, metrics_addr).expect("metrics"));

    lab.manifests
        .apply_yaml("malformed.yaml", MALFORMED)
        .expect("apply");
    // A bad update of the good Service: refused, the old version stays.
    let bad_web = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  clusterIP: {vip}\n  sessionAffinity: Sometimes\n  selector:\n    app: web\n  ports:\n    - name: tcp\n      protocol: TCP\n      port: 80\n      targetPort: 8080\n"
    );
    std::fs::write(lab.manifests.root().join("service-web.yaml"), bad_web).expect("write");

    let good_vip = lab.cluster_ip("good-too").await;
    lab.wait_frontend(&node, &format!("{good_vip}:8081/TCP"), 1)
        .await;
    let wanted = [
        ("Service", "invalid_port"),
        ("Service", "invalid_ip"),
        ("Service", "invalid_value"),
        ("Node", "invalid_cidr"),
        ("EndpointSlice", "missing_field"),
    ];
    let after = eventually(
        Duration::from_secs(10),
        "every malformed object counted",
        || async {
            let now = invalid_counts(&scrape(&cp, metrics_addr)?);
            for (kind, reason) in wanted {
                let key = (kind.to_string(), reason.to_string());
                let grew =
                    now.get(&key).copied().unwrap_or(0) > before.get(&key).copied().unwrap_or(0);
                anyhow::ensure!(grew, "{kind}/{reason} not counted: {now:?}");
            }
            Ok(now)
        },
    )
    .await;
    println!("weft_watcher_invalid_objects_total before: {before:?}");
    println!("weft_watcher_invalid_objects_total after:  {after:?}");

    let log = std::fs::read_to_string(lab.log_dir().join("svc-watcher.log")).expect("log");
    let skipped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("invalid object skipped"))
        .collect();
    for field in [
        "spec.ports[0].port",
        "spec.clusterIP",
        "spec.podCIDR",
        "endpoints[0].addresses",
        "spec.sessionAffinity",
    ] {
        assert!(
            skipped.iter().any(|l| l.contains(field)),
            "the log names {field}: {skipped:#?}"
        );
    }
    println!(
        "{} skip lines logged, e.g. {}",
        skipped.len(),
        skipped.first().map(|l| strip_ansi(l)).unwrap_or_default()
    );

    // What was there stays, the good newcomer is there, and traffic flows.
    let services = lab
        .datapath(&node)
        .list_services(ListServicesRequest {})
        .await
        .expect("services")
        .into_inner()
        .services;
    let frontends: Vec<&str> = services.iter().map(|s| s.frontend.as_str()).collect();
    println!("programmed: {frontends:?}");
    assert!(frontends.contains(&format!("{vip}:80/TCP").as_str()));
    assert!(frontends.contains(&format!("{good_vip}:8081/TCP").as_str()));
    assert_eq!(services.len(), 2, "nothing malformed was programmed");
    let maps = lbmaps::verify(
        &lab.pin_dir(&node),
        &lbmaps::desired(&lab, &node).await.expect("desired"),
    );
    assert!(maps.is_ok(), "maps equal the desired state: {maps:?}");
    let netns = lab.pod_netns_path("default", "client");
    let answers = in_pod(&netns, move || {
        (0..10)
            .map(|_| tcp_who(SocketAddr::from((vip, 80)), TIMEOUT))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .expect("the old Service still answers");
    assert!(answers.iter().all(|a| a == "web-1"), "{answers:?}");
    lab.down().await;
}

/// A log line without its terminal colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Copies the plugin where any user may run it (the build tree may not be
/// readable to others).
fn plugin_for_everyone(lab: &TestLab) -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bin = dir.path().join("weft-cni");
    std::fs::copy(lab.bin("weft-cni"), &bin).expect("copy");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (dir, bin)
}

/// CNI STATUS through the plugin, as `uid` (None: as root).
fn cni_status_as(bin: &Path, socket: &Path, uid: Option<u32>) -> std::process::Output {
    let conf = format!(
        r#"{{"cniVersion":"1.1.0","name":"weft","type":"weft-cni","socketPath":"{}"}}"#,
        socket.display()
    );
    let mut cmd = std::process::Command::new(bin);
    cmd.env_clear()
        .env("CNI_COMMAND", "STATUS")
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = cmd.spawn().expect("run weft-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.as_bytes())
        .expect("stdin");
    child.wait_with_output().expect("output")
}

/// The node-local CNI socket is root's only: the plugin run as another user
/// is refused (EACCES), the same plugin run as root gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cni_socket_refuses_anyone_but_root() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let _serial = SERIAL.lock().await;
    let lab = TestLab::up("resilience_socket", 1).await;
    let node = lab.node_names()[0].clone();
    let socket = lab.cni_socket(&node);
    let meta = std::fs::metadata(&socket).expect("socket");
    println!(
        "{}: mode {:o}, owner {}",
        socket.display(),
        meta.permissions().mode() & 0o777,
        meta.uid()
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);

    let (_dir, bin) = plugin_for_everyone(&lab);
    let nobody = 65534;
    let out = cni_status_as(&bin, &socket, Some(nobody));
    let err = cni_error(&out);
    println!(
        "STATUS as uid {nobody}: exit {:?}: {err}",
        out.status.code()
    );
    assert!(!out.status.success(), "refused");
    assert!(
        err.to_string().contains("Permission denied"),
        "refused by the socket's permissions (EACCES): {err}"
    );
    // And a direct connect as that user, without the plugin in between.
    let probe = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import socket,errno\ns=socket.socket(socket.AF_UNIX)\ntry:\n  s.connect('{}')\n  print('connected')\nexcept OSError as e:\n  print(errno.errorcode[e.errno])",
            socket.display()
        ))
        .uid(nobody)
        .gid(nobody)
        .output();
    if let Ok(probe) = probe {
        let said = String::from_utf8_lossy(&probe.stdout).trim().to_string();
        println!("connect() as uid {nobody}: {said}");
        assert_eq!(said, "EACCES");
    }

    let out = cni_status_as(&bin, &socket, None);
    println!(
        "STATUS as root: exit {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.status.success(), "root gets in");
    lab.down().await;
}
