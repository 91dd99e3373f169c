//! A ClusterIP Service load-balanced by the eBPF datapath between lab pods,
//! with all five services running as processes and every pod plumbed by
//! the real CNI plugin binary.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use weft_e2e::{TestLab, eventually, run_in_netns, tool};
use weft_lab::podserver::{in_pod, tcp_who, udp_who};
use weft_proto::datapath::v1::StatusRequest;

const SERVICE: &str = r#"
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
    - name: udp
      protocol: UDP
      port: 53
      targetPort: 8080
"#;

fn pod(name: &str, app: &str) -> String {
    weft_e2e::pod_manifest("default", name, &[("app", app)], None, None)
}

/// Sends `n` TCP connections and `n` UDP datagrams (each from a fresh
/// source port) from a pod; returns who answered, by protocol. Any
/// unanswered request fails.
fn call(
    lab: &TestLab,
    from: &str,
    vip: Ipv4Addr,
    n: usize,
) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let netns = lab.pod_netns_path("default", from);
    in_pod(&netns, move || {
        let mut tcp = BTreeMap::new();
        let mut udp = BTreeMap::new();
        for i in 0..n {
            let who = tcp_who(SocketAddr::from((vip, 80)), Duration::from_secs(2))
                .map_err(|e| anyhow::anyhow!("TCP request {i} lost: {e:#}"))?;
            *tcp.entry(who).or_insert(0) += 1;
        }
        for i in 0..n {
            let who = udp_who(SocketAddr::from((vip, 53)), Duration::from_secs(2))
                .map_err(|e| anyhow::anyhow!("UDP datagram {i} lost: {e:#}"))?;
            *udp.entry(who).or_insert(0) += 1;
        }
        Ok((tcp, udp))
    })
    .expect("every request answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusterip_balances_tcp_and_udp_and_follows_backend_removal() {
    let lab = TestLab::up("clusterip_balances", 1).await;
    let node = lab.node_names()[0].clone();
    lab.manifests
        .apply_yaml("service-web.yaml", SERVICE)
        .expect("apply");
    for (name, app) in [
        ("backend-1", "web"),
        ("backend-2", "web"),
        ("client", "client"),
    ] {
        lab.manifests
            .apply_yaml(&format!("pod-{name}.yaml"), &pod(name, app))
            .expect("apply");
    }
    for name in ["backend-1", "backend-2", "client"] {
        lab.wait_pod_ready("default", name, Duration::from_secs(30))
            .await
            .expect("pod ready");
    }
    let vip = lab.cluster_ip("web").await;
    lab.wait_frontend(&node, &format!("{vip}:80/TCP"), 2).await;
    lab.wait_frontend(&node, &format!("{vip}:53/UDP"), 2).await;

    let (tcp, udp) = call(&lab, "client", vip, 50);
    println!("50 TCP connections to {vip}:80 answered by {tcp:?}");
    println!("50 UDP datagrams to {vip}:53 answered by {udp:?}");
    for answers in [&tcp, &udp] {
        assert_eq!(answers.values().sum::<usize>(), 50, "no request lost");
        assert!(
            answers.get("backend-1").is_some_and(|n| *n > 0),
            "backend-1 answered: {answers:?}"
        );
        assert!(
            answers.get("backend-2").is_some_and(|n| *n > 0),
            "backend-2 answered: {answers:?}"
        );
    }

    // Delete one backend from the manifests; within a second every new
    // connection must reach the remaining one.
    std::fs::remove_file(lab.manifests.root().join("pod-backend-2.yaml")).expect("delete pod");
    let removed = Instant::now();
    // Converged once 20 new connections in a row reach backend-1 (by
    // chance alone: one in a million).
    let converged = eventually(Duration::from_secs(5), "only backend-1 answers", || {
        let netns = lab.pod_netns_path("default", "client");
        async move {
            in_pod(&netns, move || {
                let start = removed.elapsed();
                for _ in 0..20 {
                    let who = tcp_who(SocketAddr::from((vip, 80)), Duration::from_millis(300))?;
                    anyhow::ensure!(who == "backend-1", "{who} answered");
                }
                Ok(start)
            })
        }
    })
    .await;
    println!("new connections reach only backend-1 from {converged:?} after the removal");
    assert!(
        converged < Duration::from_secs(1),
        "converged within a second"
    );
    tokio::time::sleep_until((removed + Duration::from_secs(1)).into()).await;
    let (tcp, udp) = call(&lab, "client", vip, 50);
    println!("after removal: TCP {tcp:?}, UDP {udp:?}");
    assert_eq!(tcp, BTreeMap::from([("backend-1".to_string(), 50)]));
    assert_eq!(udp, BTreeMap::from([("backend-1".to_string(), 50)]));
    lab.down().await;
}

/// Each port describes exactly what it serves: its own API, health and
/// reflection, and no other weft API a call to which would answer
/// `Unimplemented`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_lists_its_api_and_health_through_reflection() {
    let lab = TestLab::up("grpcurl_reflection", 1).await;
    let grpcurl = tool("grpcurl");
    let node = lab.node_names()[0].clone();
    let cp = lab.cp_netns();
    for (netns, port, api) in [
        (cp.as_str(), 9400, "weft.watcher.v1.Watcher"),
        (cp.as_str(), 9401, "weft.ipam.v1.Ipam"),
        (cp.as_str(), 9402, "weft.identity.v1.Identity"),
        (node.as_str(), 9403, "weft.datapath.v1.Datapath"),
    ] {
        let addr = format!("127.0.0.1:{port}");
        let (status, out, err) = run_in_netns(netns, &grpcurl, &["-plaintext", &addr, "list"]);
        assert!(status.success(), "grpcurl list {addr}: {err}");
        println!("grpcurl -plaintext {addr} list\n{out}");
        let listed: BTreeSet<&str> = out.lines().collect();
        let expected = BTreeSet::from([
            api,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ]);
        assert_eq!(listed, expected, "services listed on {addr}");
        let (status, out, err) = run_in_netns(
            netns,
            &grpcurl,
            &["-plaintext", &addr, "grpc.health.v1.Health/Check"],
        );
        assert!(
            status.success() && out.contains("SERVING"),
            "health check {addr}: {out} {err}"
        );
    }
    // The CNI socket serves the plugin's API only.
    let socket = lab.cni_socket(&node);
    let (status, out, err) = run_in_netns(
        &node,
        &grpcurl,
        &[
            "-plaintext",
            "-authority",
            "localhost",
            "-unix",
            socket.to_str().expect("utf-8 path"),
            "list",
        ],
    );
    assert!(status.success(), "grpcurl list on the CNI socket: {err}");
    let listed: BTreeSet<&str> = out.lines().collect();
    assert_eq!(
        listed,
        BTreeSet::from([
            "weft.datapath.v1.Cni",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ]),
        "services listed on the CNI socket"
    );
    lab.down().await;
}

/// Runs the CNI plugin binary with a config on stdin and the given
/// environment, the way a runtime does.
fn run_cni(lab: &TestLab, stdin: &str, env: &[(&str, &str)]) -> (i32, serde_json::Value) {
    use std::io::Write as _;
    let mut child = std::process::Command::new(lab.bin("weft-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running weft-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("weft-cni output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {stdout}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cni_input_gets_the_spec_error_and_leaves_the_datapath_alone() {
    let lab = TestLab::up("cni_errors", 1).await;
    let node = lab.node_names()[0].clone();
    let socket = lab.cni_socket(&node);
    let conf = |version: &str| {
        format!(
            r#"{{"cniVersion":"{version}","name":"weft","type":"weft-cni","socketPath":"{}"}}"#,
            socket.display()
        )
    };
    let netns = "/proc/self/ns/net";
    let base = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "bad0001"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    let with_netns: Vec<(&str, &str)> =
        base.iter().copied().chain([("CNI_NETNS", netns)]).collect();
    let (code, err) = run_cni(&lab, "{this is not json", &with_netns);
    println!("malformed JSON: exit {code}, {err}");
    assert_ne!(code, 0);
    assert_eq!(err["code"], 6, "decoding failure: {err}");

    let (code, err) = run_cni(&lab, &conf("9.9.9"), &with_netns);
    println!("unknown cniVersion: exit {code}, {err}");
    assert_ne!(code, 0);
    assert_eq!(err["code"], 1, "incompatible version: {err}");

    let (code, err) = run_cni(&lab, &conf("1.1.0"), &base);
    println!("missing CNI_NETNS: exit {code}, {err}");
    assert_ne!(code, 0);
    assert_eq!(err["code"], 4, "invalid environment: {err}");
    assert!(
        err["msg"].as_str().is_some_and(|m| m.contains("CNI_NETNS")),
        "the message names the variable: {err}"
    );

    // The datapath is unaffected: healthy, nothing attached, and a real pod
    // still gets plumbed and answers through a Service.
    let status = lab
        .datapath(&node)
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        status.pod_ips_used, 0,
        "no address was handed out for bad input"
    );
    lab.manifests
        .apply_yaml("service-web.yaml", SERVICE)
        .expect("apply");
    lab.manifests
        .apply_yaml("pod-backend-1.yaml", &pod("backend-1", "web"))
        .expect("apply");
    lab.manifests
        .apply_yaml("pod-client.yaml", &pod("client", "client"))
        .expect("apply");
    lab.wait_pod_ready("default", "backend-1", Duration::from_secs(30))
        .await
        .expect("ready");
    lab.wait_pod_ready("default", "client", Duration::from_secs(30))
        .await
        .expect("ready");
    let vip = lab.cluster_ip("web").await;
    lab.wait_frontend(&node, &format!("{vip}:80/TCP"), 1).await;
    let (tcp, _) = call(&lab, "client", vip, 5);
    assert_eq!(tcp.get("backend-1"), Some(&5));
    lab.down().await;
}
