#![allow(clippy::unwrap_used)]

use super::*;
use weft_proto::watcher::v1::resource::Kind as R;

fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
    serde_yaml::from_str(yaml).expect("test manifest parses")
}

fn svc(yaml: &str) -> Result<pb::Service> {
    match service(&parse(yaml))?.kind {
        Some(R::Service(s)) => Ok(s),
        other => panic!("not a service: {other:?}"),
    }
}

fn slice(yaml: &str) -> Result<pb::EndpointSlice> {
    match endpoint_slice(&parse(yaml))?.kind {
        Some(R::EndpointSlice(s)) => Ok(s),
        other => panic!("not a slice: {other:?}"),
    }
}

fn pod_of(yaml: &str) -> Result<pb::Pod> {
    match pod(&parse(yaml))?.kind {
        Some(R::Pod(p)) => Ok(p),
        other => panic!("not a pod: {other:?}"),
    }
}

fn node_of(yaml: &str) -> Result<pb::Node> {
    match node(&parse(yaml))?.kind {
        Some(R::Node(n)) => Ok(n),
        other => panic!("not a node: {other:?}"),
    }
}

fn policy(yaml: &str) -> Result<pb::NetworkPolicy> {
    match network_policy(&parse(yaml))?.kind {
        Some(R::NetworkPolicy(p)) => Ok(p),
        other => panic!("not a policy: {other:?}"),
    }
}

fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.expect_err("conversion should fail").to_string()
}

// ---------------------------------------------------------------- Service

/// Only what a subscriber reads travels: kubectl's copy of the whole
/// object and everyone else's notes stay behind, on every kind.
#[test]
fn only_the_annotations_subscribers_read_are_forwarded() {
    let annotations = r#"
  annotations:
    weft.io/lb-algorithm: maglev
    kubectl.kubernetes.io/last-applied-configuration: '{"apiVersion":"v1","kind":"Service","metadata":{"name":"web"}}'
    deployment.kubernetes.io/revision: "3"
    note: hi"#;
    let s = svc(&format!(
        "metadata:\n  name: web{annotations}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{port: 80}}]\n"
    ))
    .unwrap();
    let kept: Vec<(&str, &str)> = s
        .meta
        .as_ref()
        .unwrap()
        .annotations
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(kept, [("weft.io/lb-algorithm", "maglev")]);
    for key in weft_common::watch::FORWARDED_ANNOTATIONS {
        assert!(
            s.meta.as_ref().unwrap().annotations.contains_key(*key),
            "{key} is forwarded"
        );
    }

    let p = pod_of(&format!(
        "metadata:\n  name: p{annotations}\nspec:\n  nodeName: n\n"
    ))
    .unwrap();
    assert_eq!(
        p.meta.unwrap().annotations.keys().collect::<Vec<_>>(),
        ["weft.io/lb-algorithm"]
    );
    let n = node_of(&format!("metadata:\n  name: n{annotations}\n")).unwrap();
    assert!(
        !n.meta
            .unwrap()
            .annotations
            .contains_key("kubectl.kubernetes.io/last-applied-configuration")
    );
}

#[test]
fn service_defaults_are_kubernetes_defaults() {
    let s = svc(r#"
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
"#)
    .unwrap();
    let meta = s.meta.clone().unwrap();
    assert_eq!(meta.namespace, "default");
    assert_eq!(meta.name, "web");
    assert!(!meta.deleting);
    assert_eq!(s.r#type(), ServiceType::ClusterIp);
    assert_eq!(s.cluster_ips, vec!["10.96.0.10"]);
    assert_eq!(s.ports.len(), 1);
    assert_eq!(s.ports[0].protocol(), Protocol::Tcp);
    assert_eq!(s.ports[0].port, 80);
    assert_eq!(s.ports[0].target_port, "80");
    assert_eq!(s.ports[0].node_port, 0);
    assert_eq!(s.session_affinity(), SessionAffinity::None);
    assert_eq!(s.session_affinity_timeout_seconds, 0);
    assert_eq!(s.external_traffic_policy(), TrafficPolicy::Cluster);
    assert_eq!(s.internal_traffic_policy(), TrafficPolicy::Cluster);
}

#[test]
fn service_carries_every_field() {
    let s = svc(r#"
metadata:
  name: shop
  namespace: prod
  uid: u-1
  resourceVersion: "42"
  labels: {app: shop}
  annotations: {weft.io/lb-algorithm: maglev}
  deletionTimestamp: "2024-01-01T00:00:00Z"
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  clusterIPs: [10.96.0.1, "fd00::1"]
  externalIPs: [192.0.2.7]
  selector: {app: shop}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
status:
  loadBalancer:
    ingress: [{ip: 203.0.113.9}, {hostname: lb.example}]
"#)
    .unwrap();
    let meta = s.meta.clone().unwrap();
    assert_eq!(meta.namespace, "prod");
    assert_eq!(meta.uid, "u-1");
    assert_eq!(meta.resource_version, "42");
    assert_eq!(meta.labels["app"], "shop");
    assert_eq!(meta.annotations["weft.io/lb-algorithm"], "maglev");
    assert!(meta.deleting);
    assert_eq!(s.r#type(), ServiceType::LoadBalancer);
    assert_eq!(s.cluster_ips, vec!["10.96.0.1", "fd00::1"]);
    assert_eq!(s.external_ips, vec!["192.0.2.7"]);
    assert_eq!(s.load_balancer_ips, vec!["203.0.113.9"]);
    assert_eq!(s.selector["app"], "shop");
    assert_eq!(s.session_affinity(), SessionAffinity::ClientIp);
    assert_eq!(s.session_affinity_timeout_seconds, 60);
    assert_eq!(s.external_traffic_policy(), TrafficPolicy::Local);
    assert_eq!(s.internal_traffic_policy(), TrafficPolicy::Local);
    assert_eq!(s.ports[0].target_port, "http");
    assert_eq!(s.ports[0].node_port, 30080);
    assert_eq!(s.ports[1].protocol(), Protocol::Udp);
    assert_eq!(s.ports[1].target_port, "5353");
}

#[test]
fn client_ip_affinity_defaults_to_three_hours() {
    let s = svc("metadata: {name: a}\nspec: {sessionAffinity: ClientIP}\n").unwrap();
    assert_eq!(
        s.session_affinity_timeout_seconds,
        DEFAULT_AFFINITY_TIMEOUT_SECONDS
    );
    assert_eq!(DEFAULT_AFFINITY_TIMEOUT_SECONDS, 10_800);
}

#[test]
fn headless_and_unallocated_services_have_no_cluster_ip() {
    let s = svc("metadata: {name: a}\nspec: {clusterIP: None}\n").unwrap();
    assert!(s.cluster_ips.is_empty());
    let s = svc("metadata: {name: a}\nspec: {clusterIPs: [None]}\n").unwrap();
    assert!(s.cluster_ips.is_empty());
    let s = svc("metadata: {name: a}\n").unwrap();
    assert!(s.cluster_ips.is_empty());
    assert_eq!(s.r#type(), ServiceType::ClusterIp);
}

#[test]
fn target_port_zero_or_empty_means_the_port() {
    let s = svc("metadata: {name: a}\nspec: {ports: [{port: 81, targetPort: 0}, {port: 82, targetPort: ''}]}\n")
        .unwrap();
    assert_eq!(s.ports[0].target_port, "81");
    assert_eq!(s.ports[1].target_port, "82");
}

#[test]
fn service_validation_names_the_field() {
    assert_eq!(
        err_text(svc(
            "metadata: {name: a}\nspec: {ports: [{port: 80}, {port: 70000}]}\n"
        )),
        "spec.ports[1].port: 70000 is out of range"
    );
    assert_eq!(
        err_text(svc("metadata: {name: a}\nspec: {ports: [{port: 0}]}\n")),
        "spec.ports[0].port: 0 is out of range"
    );
    assert_eq!(
        err_text(svc("metadata: {name: a}\nspec: {clusterIP: 10.96.0.300}\n")),
        "spec.clusterIP: \"10.96.0.300\" is not an IP address"
    );
    assert_eq!(
        err_text(svc(
            "metadata: {name: a}\nspec: {clusterIPs: [10.0.0.1, nope]}\n"
        )),
        "spec.clusterIPs[1]: \"nope\" is not an IP address"
    );
    assert!(
        err_text(svc(
            "metadata: {name: a}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n"
        ))
        .starts_with("spec.ports[0].protocol: \"ICMP\"")
    );
    assert!(
        err_text(svc("metadata: {name: a}\nspec: {type: Magic}\n"))
            .starts_with("spec.type: \"Magic\"")
    );
    assert_eq!(
        err_text(svc(
            "metadata: {name: a}\nspec: {ports: [{port: 80, nodePort: 99999}]}\n"
        )),
        "spec.ports[0].nodePort: 99999 is out of range"
    );
    assert_eq!(
        err_text(svc(
            "metadata: {name: a}\nspec: {ports: [{port: 80, targetPort: 65536}]}\n"
        )),
        "spec.ports[0].targetPort: 65536 is out of range"
    );
    assert_eq!(
        err_text(svc("metadata: {name: a}\nspec: {externalIPs: [x]}\n")),
        "spec.externalIPs[0]: \"x\" is not an IP address"
    );
    assert!(
        err_text(svc(
            "metadata: {name: a}\nspec: {sessionAffinity: Sticky}\n"
        ))
        .starts_with("spec.sessionAffinity:")
    );
    assert!(
        err_text(svc(
            "metadata: {name: a}\nspec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}\n"
        ))
        .starts_with("spec.sessionAffinityConfig.clientIP.timeoutSeconds:")
    );
    assert!(
        err_text(svc(
            "metadata: {name: a}\nspec: {externalTrafficPolicy: Global}\n"
        ))
        .starts_with("spec.externalTrafficPolicy:")
    );
    assert!(
        err_text(svc(
            "metadata: {name: a}\nstatus: {loadBalancer: {ingress: [{ip: bad}]}}\n"
        ))
        .starts_with("status.loadBalancer.ingress[0].ip:")
    );
    let e = service(&parse("metadata: {namespace: x}\n")).unwrap_err();
    assert_eq!(e.to_string(), "metadata.name: is required");
    assert_eq!(e.reason, Reason::Missing);
}

#[test]
fn errors_carry_a_reason_for_metrics() {
    let e = service(&parse("metadata: {name: a}\nspec: {ports: [{port: 0}]}\n")).unwrap_err();
    assert_eq!(e.reason, Reason::Port);
    assert_eq!(e.reason.as_str(), "invalid_port");
    let e = service(&parse("metadata: {name: a}\nspec: {clusterIP: x}\n")).unwrap_err();
    assert_eq!(e.reason, Reason::Ip);
}

// ---------------------------------------------------------- EndpointSlice

const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
  nodeName: node-a
  zone: z1
  targetRef: {kind: Pod, name: web-1}
- addresses: [10.244.1.6]
  conditions: {ready: false}
  targetRef: {kind: Pod, name: web-2, namespace: other}
- addresses: [10.244.1.7]
  conditions: {ready: false, serving: true, terminating: true}
  targetRef: {kind: Node, name: node-a}
ports:
- {name: http, port: 8080}
- {name: dns, port: 53, protocol: UDP}
"#;

#[test]
fn endpoint_conditions_follow_kubernetes_semantics() {
    let s = slice(SLICE).unwrap();
    assert_eq!(s.service_name, "web");
    assert_eq!(s.address_type, "IPv4");
    let e = &s.endpoints;
    // Unset: ready, serving, not terminating.
    assert!(e[0].ready && e[0].serving && !e[0].terminating);
    // Serving unset follows ready.
    assert!(!e[1].ready && !e[1].serving && !e[1].terminating);
    assert!(!e[2].ready && e[2].serving && e[2].terminating);
    assert_eq!(e[0].node_name, "node-a");
    assert_eq!(e[0].zone, "z1");
    assert_eq!(e[0].target_pod, "shop/web-1");
    assert_eq!(e[1].target_pod, "other/web-2");
    assert_eq!(e[2].target_pod, "");
    assert_eq!(s.ports[0].protocol(), Protocol::Tcp);
    assert_eq!(s.ports[0].port, 8080);
    assert_eq!(s.ports[1].protocol(), Protocol::Udp);
}

#[test]
fn endpoint_slice_validation() {
    let no_label = SLICE.replace("labels: {kubernetes.io/service-name: web}", "labels: {}");
    let e = endpoint_slice(&parse(&no_label)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "metadata.labels[\"kubernetes.io/service-name\"]: is required"
    );
    assert_eq!(e.reason, Reason::Missing);
    let bad_ip = SLICE.replace("10.244.1.6", "10.244.1.600");
    assert_eq!(
        err_text(slice(&bad_ip)),
        "endpoints[1].addresses[0]: \"10.244.1.600\" is not an IPv4 address"
    );
    let wrong_family = SLICE.replace("10.244.1.6", "fd00::6");
    assert!(err_text(slice(&wrong_family)).starts_with("endpoints[1].addresses[0]:"));
    let bad_port = SLICE.replace("port: 8080", "port: 65536");
    assert_eq!(
        err_text(slice(&bad_port)),
        "ports[0].port: 65536 is out of range"
    );
    let bad_type = SLICE.replace("addressType: IPv4", "addressType: IPv5");
    assert!(err_text(slice(&bad_type)).starts_with("addressType:"));
}

// -------------------------------------------------------------------- Pod

#[test]
fn pod_fields() {
    let p = pod_of(
        r#"
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  containers:
  - name: c
    ports:
    - {name: http, containerPort: 8080}
    - {containerPort: 53, protocol: UDP, hostPort: 5353, hostIP: 127.0.0.1}
status:
  phase: Running
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}, {ip: "fd00::5"}]
"#,
    )
    .unwrap();
    assert_eq!(p.node_name, "node-a");
    assert_eq!(p.pod_ips, vec!["10.244.1.5", "fd00::5"]);
    assert_eq!(p.phase, "Running");
    assert!(!p.host_network);
    assert_eq!(p.container_ports.len(), 2);
    assert_eq!(p.container_ports[0].protocol(), Protocol::Tcp);
    assert_eq!(p.container_ports[0].host_port, 0);
    assert_eq!(p.container_ports[1].protocol(), Protocol::Udp);
    assert_eq!(p.container_ports[1].host_port, 5353);
    assert_eq!(p.container_ports[1].host_ip, "127.0.0.1");

    let p = pod_of(
        "metadata: {name: h}\nspec: {hostNetwork: true, containers: []}\nstatus: {podIP: 192.0.2.1}\n",
    )
    .unwrap();
    assert!(p.host_network);
    assert_eq!(p.pod_ips, vec!["192.0.2.1"]);
    assert_eq!(p.meta.unwrap().namespace, "default");
}

#[test]
fn pod_validation() {
    assert_eq!(
        err_text(pod_of(
            "metadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 0}]}]}\n"
        )),
        "spec.containers[0].ports[0].containerPort: 0 is out of range"
    );
    assert_eq!(
        err_text(pod_of("metadata: {name: p}\nstatus: {podIP: x}\n")),
        "status.podIP: \"x\" is not an IP address"
    );
    assert_eq!(
        err_text(pod_of(
            "metadata: {name: p}\nstatus: {podIPs: [{ip: 1.2.3.4}, {ip: y}]}\n"
        )),
        "status.podIPs[1].ip: \"y\" is not an IP address"
    );
}

// ---------------------------------------------------------- Node, Namespace

#[test]
fn node_fields() {
    let n = node_of(
        r#"
metadata: {name: node-a, namespace: ignored}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, "fd00:1::/64"]}
status:
  addresses: [{type: InternalIP, address: 192.168.1.10}, {type: Hostname, address: node-a}]
"#,
    )
    .unwrap();
    assert_eq!(n.meta.unwrap().namespace, "");
    assert_eq!(n.pod_cidrs, vec!["10.244.1.0/24", "fd00:1::/64"]);
    assert_eq!(n.addresses.len(), 2);
    assert_eq!(n.addresses[0].r#type, "InternalIP");
    assert_eq!(n.addresses[0].address, "192.168.1.10");
    let n = node_of("metadata: {name: b}\nspec: {podCIDR: 10.244.2.0/24}\n").unwrap();
    assert_eq!(n.pod_cidrs, vec!["10.244.2.0/24"]);
    let n = node_of("metadata: {name: c}\n").unwrap();
    assert!(n.pod_cidrs.is_empty());
}

#[test]
fn node_validation() {
    let e = node(&parse("metadata: {name: a}\nspec: {podCIDR: 10.244.1.0}\n")).unwrap_err();
    assert_eq!(e.to_string(), "spec.podCIDR: \"10.244.1.0\" is not a CIDR");
    assert_eq!(e.reason, Reason::Cidr);
    assert_eq!(
        err_text(node_of(
            "metadata: {name: a}\nspec: {podCIDRs: [10.0.0.0/8, 10.0.0.0/99]}\n"
        )),
        "spec.podCIDRs[1]: \"10.0.0.0/99\" is not a CIDR"
    );
}

#[test]
fn namespace_is_cluster_scoped() {
    let r = namespace(&parse("metadata: {name: shop, labels: {team: a}}\n")).unwrap();
    let Some(R::Namespace(ns)) = r.kind else {
        panic!("not a namespace")
    };
    let meta = ns.meta.unwrap();
    assert_eq!(meta.name, "shop");
    assert_eq!(meta.namespace, "");
    assert_eq!(meta.labels["team"], "a");
}

// ---------------------------------------------------------- NetworkPolicy

#[test]
fn policy_types_default_as_in_kubernetes() {
    let p = policy("metadata: {name: deny}\nspec: {podSelector: {}}\n").unwrap();
    assert_eq!(p.policy_types, vec!["Ingress"]);
    assert_eq!(p.pod_selector, Some(pb::LabelSelector::default()));
    let p = policy("metadata: {name: e}\nspec: {podSelector: {}, egress: [{}]}\n").unwrap();
    assert_eq!(p.policy_types, vec!["Ingress", "Egress"]);
    assert_eq!(p.egress.len(), 1);
    assert!(p.egress[0].peers.is_empty() && p.egress[0].ports.is_empty());
    let p =
        policy("metadata: {name: e}\nspec: {podSelector: {}, policyTypes: [Egress]}\n").unwrap();
    assert_eq!(p.policy_types, vec!["Egress"]);
}

#[test]
fn policy_rules_keep_selector_presence() {
    let p = policy(
        r#"
metadata: {name: allow, namespace: shop}
spec:
  podSelector:
    matchLabels: {app: db}
    matchExpressions: [{key: tier, operator: In, values: [a, b]}]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
    - namespaceSelector: {}
    - podSelector: {}
      namespaceSelector: {matchLabels: {team: x}}
    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}
    ports:
    - {port: 5432}
    - {protocol: UDP, port: dns}
    - {port: 8000, endPort: 8100}
    - {}
  egress:
  - to: [{ipBlock: {cidr: "::/0"}}]
"#,
    )
    .unwrap();
    let sel = p.pod_selector.unwrap();
    assert_eq!(sel.match_labels["app"], "db");
    assert_eq!(sel.match_expressions[0].operator, "In");
    assert_eq!(sel.match_expressions[0].values, vec!["a", "b"]);
    assert_eq!(p.policy_types, vec!["Ingress", "Egress"]);
    let peers = &p.ingress[0].peers;
    assert_eq!(
        peers[0].pod_selector.as_ref().unwrap().match_labels["app"],
        "web"
    );
    assert!(peers[0].namespace_selector.is_none());
    assert!(peers[1].pod_selector.is_none());
    assert_eq!(
        peers[1].namespace_selector,
        Some(pb::LabelSelector::default())
    );
    assert_eq!(peers[2].pod_selector, Some(pb::LabelSelector::default()));
    assert_eq!(
        peers[2].namespace_selector.as_ref().unwrap().match_labels["team"],
        "x"
    );
    let block = peers[3].ip_block.as_ref().unwrap();
    assert_eq!(block.cidr, "10.0.0.0/8");
    assert_eq!(block.except, vec!["10.1.0.0/16"]);
    assert!(peers[0].ip_block.is_none());
    let ports = &p.ingress[0].ports;
    assert_eq!(
        (
            ports[0].protocol(),
            ports[0].port.as_str(),
            ports[0].end_port
        ),
        (Protocol::Tcp, "5432", 0)
    );
    assert_eq!(
        (ports[1].protocol(), ports[1].port.as_str()),
        (Protocol::Udp, "dns")
    );
    assert_eq!((ports[2].port.as_str(), ports[2].end_port), ("8000", 8100));
    assert_eq!(
        (ports[3].protocol(), ports[3].port.as_str()),
        (Protocol::Tcp, "")
    );
    assert_eq!(p.egress[0].peers[0].ip_block.as_ref().unwrap().cidr, "::/0");
}

#[test]
fn policy_validation() {
    let base = "metadata: {name: p}\nspec:\n  podSelector: {}\n";
    let with = |rest: &str| format!("{base}{rest}");
    let e = network_policy(&parse(&with(
        "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0}}]}]\n",
    )))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0.0\" is not a CIDR"
    );
    assert_eq!(e.reason, Reason::Cidr);
    assert_eq!(
        err_text(policy(&with(
            "  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [nope]}}]}]\n"
        ))),
        "spec.egress[0].to[0].ipBlock.except[0]: \"nope\" is not a CIDR"
    );
    assert!(
        err_text(policy(&with(
            "  ingress: [{from: [{podSelector: {matchExpressions: [{key: a, operator: Near}]}}]}]\n"
        )))
        .starts_with("spec.ingress[0].from[0].podSelector.matchExpressions[0].operator:")
    );
    assert_eq!(
        err_text(policy(&with(
            "  ingress: [{ports: [{port: 90, endPort: 80}]}]\n"
        ))),
        "spec.ingress[0].ports[0].endPort: 80 is below port 90"
    );
    assert_eq!(
        err_text(policy(&with("  ingress: [{ports: [{port: 0}]}]\n"))),
        "spec.ingress[0].ports[0].port: 0 is out of range"
    );
    assert!(
        err_text(policy(&with("  ingress: [{from: [{}]}]\n")))
            .starts_with("spec.ingress[0].from[0]:")
    );
    assert!(
        err_text(policy(&with(
            "  ingress: [{from: [{podSelector: {}, ipBlock: {cidr: 10.0.0.0/8}}]}]\n"
        )))
        .starts_with("spec.ingress[0].from[0]:")
    );
    assert!(
        err_text(policy(&with("  policyTypes: [Sideways]\n"))).starts_with("spec.policyTypes[0]:")
    );
}
