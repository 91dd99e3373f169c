//! NetworkPolicy enforced by security identity in the eBPF datapath, flow
//! events that say why a packet was dropped, and `weftctl status` agreeing
//! with the lab.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use weft_e2e::{TestLab, eventually, run_in_netns};
use weft_lab::{
    lab::CP_ADDR,
    podserver::{in_pod, tcp_who},
};

const SHORT: Duration = Duration::from_millis(700);

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: team-a
  labels:
    team: a
---
apiVersion: v1
kind: Namespace
metadata:
  name: team-b
  labels:
    team: b
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector:
    app: web
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: 8080
"#;

fn pod(ns: &str, name: &str, app: &str, node: &str) -> String {
    weft_e2e::pod_manifest(ns, name, &[("app", app)], Some(node), None)
}

const DENY_INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-deny-all
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: web
  policyTypes: [Ingress]
"#;

const ALLOW_TEAM_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-allow-team-a
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: web
  policyTypes: [Ingress]
  ingress:
    - from:
        - namespaceSelector:
            matchLabels:
              team: a
      ports:
        - protocol: TCP
          port: http
"#;

const EGRESS_BLOCK: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: client-d-egress
  namespace: default
spec:
  podSelector:
    matchLabels:
      app: client-d
  policyTypes: [Egress]
  egress:
    - to:
        - ipBlock:
            cidr: 172.31.0.0/24
            except: [172.31.0.1/32]
      ports:
        - protocol: TCP
          port: 8000
          endPort: 8100
"#;

/// Whether a TCP request from a pod to `addr` is answered, and by whom.
fn reach(lab: &TestLab, ns: &str, pod: &str, addr: SocketAddr) -> Option<String> {
    in_pod(&lab.pod_netns_path(ns, pod), move || {
        Ok(tcp_who(addr, SHORT).ok())
    })
    .expect("ran in the pod")
}

/// Applies the namespaces and one pod per (namespace, name, app, node),
/// waits for them and returns their addresses by name.
async fn start_pods(
    lab: &TestLab,
    pods: &[(&'static str, &'static str, &str, &str)],
) -> std::collections::BTreeMap<&'static str, Ipv4Addr> {
    lab.manifests
        .apply_yaml("namespaces.yaml", NAMESPACES)
        .expect("apply");
    for (ns, name, app, node) in pods {
        lab.manifests
            .apply_yaml(&format!("pod-{ns}-{name}.yaml"), &pod(ns, name, app, node))
            .expect("apply");
    }
    let mut ips = std::collections::BTreeMap::new();
    for (ns, name, _, _) in pods {
        ips.insert(
            *name,
            lab.wait_pod_ready(ns, name, Duration::from_secs(60))
                .await
                .expect("ready"),
        );
    }
    ips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_by_identity_with_flows_and_status() {
    let lab = TestLab::up("network_policy", 2).await;
    let nodes = lab.node_names();
    let (n1, n2) = (nodes[0].clone(), nodes[1].clone());
    let ips = start_pods(
        &lab,
        &[
            ("default", "web", "web", &n1),
            ("team-a", "client-a", "client", &n2),
            ("team-b", "client-b", "client", &n1),
            ("default", "client-d", "client-d", &n2),
        ],
    )
    .await;
    let web = SocketAddr::from((ips["web"], 8080));
    // Before any policy every client gets in.
    for (ns, client) in [
        ("team-a", "client-a"),
        ("team-b", "client-b"),
        ("default", "client-d"),
    ] {
        eventually(
            Duration::from_secs(10),
            &format!("{client} reaches web"),
            || async { reach(&lab, ns, client, web).ok_or_else(|| anyhow::anyhow!("no answer")) },
        )
        .await;
    }

    // A connection established before the policy outlives it.
    let established = std::thread::spawn({
        let netns = lab.pod_netns_path("team-b", "client-b");
        move || {
            weft_common::netns::run_in(&netns, move || {
                let (who, stream) =
                    weft_lab::podserver::tcp_download_start(web, 4 << 20, Duration::from_secs(10))?;
                let got = weft_lab::podserver::tcp_download_finish(
                    stream,
                    64 << 10,
                    Duration::from_millis(20),
                )?;
                Ok((who, got))
            })
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    // Default deny: nobody gets in, and the drop says why.
    lab.manifests
        .apply_yaml("policy-deny.yaml", DENY_INGRESS)
        .expect("apply");
    eventually(Duration::from_secs(10), "client-b is denied", || async {
        match reach(&lab, "team-b", "client-b", web) {
            None => Ok(()),
            Some(who) => Err(anyhow::anyhow!("{who} still answers")),
        }
    })
    .await;
    assert!(
        reach(&lab, "team-a", "client-a", web).is_none(),
        "default deny covers every namespace"
    );
    let weftctl = lab.bin("weftctl");
    let datapath = format!("http://{}:9403", lab.node_addr(&n1).expect("addr"));
    let (status, flows, err) = run_in_netns(
        &n1,
        &weftctl,
        &[
            "--datapath",
            &datapath,
            "flows",
            "--verdict",
            "dropped",
            "--pod",
            "default/web",
        ],
    );
    assert!(status.success(), "weftctl flows: {err}");
    println!("weftctl flows --verdict dropped --pod default/web:\n{flows}");
    let drop_line = flows
        .lines()
        .find(|l| l.contains("policy_denied") && l.contains("team-b/client-b"))
        .unwrap_or_else(|| panic!("the drop of client-b shows with its reason:\n{flows}"));
    assert!(
        drop_line.contains("DROPPED")
            && drop_line.contains("ingress")
            && drop_line.contains("default/web")
    );
    let (who, got) = established.join().expect("thread").expect("download");
    println!("the connection opened before the policy delivered {got} bytes from {who}");
    assert_eq!(
        got,
        4 << 20,
        "an established connection is not cut by a new policy"
    );

    // Allow one namespace: only it gets in, on the named port, also
    // through the Service and from the other node.
    lab.manifests
        .apply_yaml("policy-allow-team-a.yaml", ALLOW_TEAM_A)
        .expect("apply");
    eventually(Duration::from_secs(10), "client-a is allowed", || async {
        reach(&lab, "team-a", "client-a", web).ok_or_else(|| anyhow::anyhow!("no answer"))
    })
    .await;
    let vip: Ipv4Addr = lab
        .manifests
        .read()
        .services
        .iter()
        .find(|(_, s)| s.metadata.name.as_deref() == Some("web"))
        .and_then(|(_, s)| s.spec.as_ref()?.cluster_ip.as_ref()?.parse().ok())
        .expect("cluster IP");
    assert_eq!(
        reach(&lab, "team-a", "client-a", SocketAddr::from((vip, 80))).as_deref(),
        Some("web")
    );
    assert!(
        reach(&lab, "team-b", "client-b", web).is_none(),
        "team-b stays out"
    );
    assert!(
        reach(&lab, "default", "client-d", web).is_none(),
        "the policy's own namespace is not team a"
    );
    println!("ingress: team-a allowed (direct and via {vip}:80), team-b and default denied");

    // Egress by ipBlock: one CIDR in, one address carved out of it.
    add_address(&lab.cp_netns(), "172.31.0.2/24");
    let outside = lab
        .start_outside_server("outside", 8090)
        .await
        .expect("outside server");
    let allowed = SocketAddr::from((Ipv4Addr::new(172, 31, 0, 2), outside.port()));
    let blocked = SocketAddr::from((CP_ADDR, outside.port()));
    assert!(
        reach(&lab, "default", "client-d", blocked).is_some(),
        "reachable before the egress policy"
    );
    lab.manifests
        .apply_yaml("policy-egress.yaml", EGRESS_BLOCK)
        .expect("apply");
    eventually(
        Duration::from_secs(10),
        "client-d's egress to the excepted address is denied",
        || async {
            match reach(&lab, "default", "client-d", blocked) {
                None => Ok(()),
                Some(_) => Err(anyhow::anyhow!("still reachable")),
            }
        },
    )
    .await;
    assert_eq!(
        reach(&lab, "default", "client-d", allowed).as_deref(),
        Some("outside"),
        "the allowed CIDR"
    );
    println!("egress: {allowed} allowed, {blocked} denied by the ipBlock except");

    // weftctl status agrees with the lab.
    let args = [
        "--datapath",
        &datapath,
        "--watcher",
        &format!("http://{CP_ADDR}:9400"),
        "--ipam",
        &format!("http://{CP_ADDR}:9401"),
        "--identity",
        &format!("http://{CP_ADDR}:9402"),
        "-o",
        "json",
        "status",
    ];
    let (status, out, err) = run_in_netns(&n1, &weftctl, &args);
    assert!(status.success(), "weftctl status: {out} {err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(report["healthy"], true, "{out}");
    for s in report["services"].as_array().expect("services") {
        assert_eq!(s["status"], "SERVING", "{s}");
    }
    let dp = &report["datapath"];
    let on_n1 = lab
        .pods()
        .await
        .into_iter()
        .filter(|(_, node, _)| *node == n1)
        .count();
    assert_eq!(
        dp["pod_ips_used"], on_n1 as u64,
        "addresses used on {n1}: {dp}"
    );
    assert_eq!(
        dp["policy"]["isolated_endpoints"], 1,
        "web is the isolated pod on {n1}: {dp}"
    );
    let cidr = report["ipam"]["allocations"]
        .as_array()
        .expect("allocations")
        .iter()
        .find(|a| a["node"] == n1.as_str())
        .map(|a| a["cidr"].clone())
        .expect("node 1 allocation");
    assert_eq!(dp["pod_cidr"], cidr, "the datapath's CIDR is ipam-svc's");
    let lb = dp["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .find(|m| m["name"] == "weft_lb4_services")
        .expect("lb map");
    assert_eq!(
        lb["entries"], 2,
        "one ClusterIP frontend with one backend: {lb}"
    );
    println!(
        "weftctl status on {n1}: {on_n1} pod addresses, CIDR {cidr}, 1 isolated pod, lb map {lb}"
    );
    lab.down().await;
}

/// Adds an address to an interface of a lab namespace (the outside world
/// gets a second address for the ipBlock test).
fn add_address(netns: &str, cidr: &str) {
    let ok = std::process::Command::new("ip")
        .args(["-n", netns, "addr", "add", cidr, "dev", "br0"])
        .status()
        .expect("ip")
        .success();
    assert!(ok, "adding {cidr} in {netns}");
}

/// An ipBlock covers every address in it, pods' included, as Kubernetes
/// defines it; an `except` carves a pod's address out, and another rule
/// naming that address lets it in again. Found by the e2e suite's netpol
/// specs ("enforce except clause while egress access to server in CIDR
/// block", "an IP overlapping both IPBlock.CIDR and IPBlock.Except is
/// allowed"): weft matched ipBlocks against non-pod addresses only, and an
/// `except` of a pod's /32 replaced that pod's identity on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_blocks_cover_pod_addresses_and_excepts_carve_them_out() {
    let lab = TestLab::up("ip_blocks_pods", 2).await;
    let nodes = lab.node_names();
    let (n1, n2) = (nodes[0].clone(), nodes[1].clone());
    let ips = start_pods(
        &lab,
        &[
            ("default", "web", "web", &n1),
            ("team-b", "near", "client", &n1),
            ("team-b", "far", "client", &n2),
        ],
    )
    .await;
    let web = SocketAddr::from((ips["web"], 8080));
    let ingress = |name: &str, block: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  podSelector:\n    matchLabels:\n      app: web\n  policyTypes: [Ingress]\n  ingress:\n    - from:\n        - ipBlock:\n{block}"
        )
    };
    // The pod network, but for `far`.
    lab.manifests
        .apply_yaml(
            "pods-but-far.yaml",
            &ingress(
                "pods-but-far",
                &format!(
                    "            cidr: 10.244.0.0/16\n            except: [{}/32]\n",
                    ips["far"]
                ),
            ),
        )
        .expect("apply");
    eventually(
        Duration::from_secs(10),
        "the except keeps far out",
        || async {
            anyhow::ensure!(reach(&lab, "team-b", "far", web).is_none(), "far got in");
            anyhow::ensure!(
                reach(&lab, "team-b", "near", web).is_some(),
                "near was kept out"
            );
            Ok(())
        },
    )
    .await;
    // A second rule naming far's address: the overlap is allowed.
    lab.manifests
        .apply_yaml(
            "far-itself.yaml",
            &ingress(
                "far-itself",
                &format!("            cidr: {}/32\n", ips["far"]),
            ),
        )
        .expect("apply");
    eventually(
        Duration::from_secs(10),
        "the second rule lets far in",
        || async {
            anyhow::ensure!(reach(&lab, "team-b", "far", web).is_some(), "far kept out");
            anyhow::ensure!(
                reach(&lab, "team-b", "near", web).is_some(),
                "near kept out"
            );
            Ok(())
        },
    )
    .await;
    // An except naming web's own /32 takes nothing from web's identity: an
    // egress rule allowing web by its labels still lets the clients reach
    // it, beside an ipBlock rule whose except names web's address.
    lab.manifests
        .apply_yaml(
            "clients-egress.yaml",
            &format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: clients-egress\n  namespace: team-b\nspec:\n  podSelector:\n    matchLabels:\n      app: client\n  policyTypes: [Egress]\n  egress:\n    - to:\n        - namespaceSelector:\n            matchLabels:\n              kubernetes.io/metadata.name: default\n          podSelector:\n            matchLabels:\n              app: web\n    - to:\n        - ipBlock:\n            cidr: 10.244.0.0/16\n            except: [{}/32]\n",
                ips["web"]
            ),
        )
        .expect("apply");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for client in ["near", "far"] {
        assert!(
            reach(&lab, "team-b", client, web).is_some(),
            "{client} lost web: the except of web's /32 took web's identity"
        );
    }
    lab.down().await;
}
