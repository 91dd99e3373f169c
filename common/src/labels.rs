//! Security labels: the part of a pod's labels that decides its identity.
//!
//! identity-svc allocates a number per distinct set, and every datapath
//! computes the same set for the pods it sees, so both must use this one
//! function. Labels that change on every rollout (pod-template-hash and
//! friends) are left out, or every rollout would mint new identities.

use std::collections::BTreeMap;

/// Identities below this are reserved; allocated identities start here.
pub const MIN_ALLOCATED_IDENTITY: u32 = 256;
/// The largest identity that fits the datapath's 16-bit field.
pub const MAX_ALLOCATED_IDENTITY: u32 = 65535;

/// The reserved identities, fixed across every cluster.
pub mod reserved {
    pub const UNKNOWN: u32 = 0;
    pub const HOST: u32 = 1;
    pub const WORLD: u32 = 2;
    pub const UNMANAGED: u32 = 3;
    pub const HEALTH: u32 = 4;
    pub const INIT: u32 = 5;
    pub const REMOTE_NODE: u32 = 6;
    pub const KUBE_APISERVER: u32 = 7;

    /// Every reserved identity with its name.
    pub const ALL: &[(u32, &str)] = &[
        (HOST, "host"),
        (WORLD, "world"),
        (UNMANAGED, "unmanaged"),
        (HEALTH, "health"),
        (INIT, "init"),
        (REMOTE_NODE, "remote-node"),
        (KUBE_APISERVER, "kube-apiserver"),
    ];
}

/// The label key carrying the pod's namespace.
pub const NAMESPACE_LABEL: &str = "k8s:io.kubernetes.pod.namespace";
/// The prefix of labels copied from the pod's namespace.
pub const NAMESPACE_LABELS_PREFIX: &str = "k8s:io.weft.k8s.namespace.labels.";

/// Pod labels that say nothing about security.
const IGNORED_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "job-name",
    "batch.kubernetes.io/job-name",
];

/// The security labels of a pod in namespace `namespace` with labels
/// `pod_labels`, whose namespace carries `namespace_labels`.
pub fn security_labels(
    namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = pod_labels
        .iter()
        .filter(|(k, _)| !IGNORED_POD_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (format!("k8s:{k}"), v.clone()))
        .collect();
    out.extend(
        namespace_labels
            .iter()
            .map(|(k, v)| (format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone())),
    );
    out.insert(NAMESPACE_LABEL.to_string(), namespace.to_string());
    out
}

/// The labels of a reserved identity, e.g. `reserved:host`.
pub fn reserved_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(format!("reserved:{name}"), String::new())])
}

/// A canonical string for a label set: sorted `key=value` joined by `;`.
/// Two sets are the same identity exactly when their keys are equal.
pub fn canonical_key<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let sorted: BTreeMap<&String, &String> = labels.into_iter().collect();
    let mut key = String::new();
    for (k, v) in sorted {
        if !key.is_empty() {
            key.push(';');
        }
        key.push_str(k);
        key.push('=');
        key.push_str(v);
    }
    key
}

/// Whether `labels` carry every key and value of a map-style selector (a
/// Service's `spec.selector`). An empty selector selects nothing, as for
/// Services.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a Kubernetes label selector (matchLabels and matchExpressions)
/// matches the labels `get` looks up. An empty selector matches everything,
/// as in NetworkPolicy; an operator it does not know matches nothing.
pub fn label_selector_matches<'a>(
    selector: &weft_proto::watcher::v1::LabelSelector,
    get: impl Fn(&str) -> Option<&'a str>,
) -> bool {
    selector
        .match_labels
        .iter()
        .all(|(k, v)| get(k) == Some(v.as_str()))
        && selector.match_expressions.iter().all(|r| {
            let value = get(&r.key);
            match r.operator.as_str() {
                "In" => value.is_some_and(|v| r.values.iter().any(|x| x == v)),
                "NotIn" => value.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rollout_labels_do_not_change_the_set() {
        let a = security_labels(
            "default",
            &map(&[("app", "web"), ("pod-template-hash", "abc")]),
            &map(&[]),
        );
        let b = security_labels(
            "default",
            &map(&[("app", "web"), ("pod-template-hash", "xyz")]),
            &map(&[]),
        );
        assert_eq!(a, b);
        assert_eq!(a.get("k8s:app").map(String::as_str), Some("web"));
        assert_eq!(a.get(NAMESPACE_LABEL).map(String::as_str), Some("default"));
    }

    #[test]
    fn namespace_labels_are_included() {
        let a = security_labels("team-a", &map(&[("app", "web")]), &map(&[("team", "a")]));
        assert_eq!(
            a.get("k8s:io.weft.k8s.namespace.labels.team")
                .map(String::as_str),
            Some("a")
        );
    }

    #[test]
    fn label_selectors_follow_kubernetes_semantics() {
        use weft_proto::watcher::v1::{LabelSelector, LabelSelectorRequirement};
        let labels = map(&[("app", "web"), ("tier", "front")]);
        let get = |k: &str| labels.get(k).map(String::as_str);
        let req = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        assert!(
            label_selector_matches(&LabelSelector::default(), get),
            "empty selects all"
        );
        let sel = |labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: map(labels),
            match_expressions: exprs,
        };
        assert!(label_selector_matches(&sel(&[("app", "web")], vec![]), get));
        assert!(!label_selector_matches(&sel(&[("app", "db")], vec![]), get));
        assert!(label_selector_matches(
            &sel(&[], vec![req("tier", "In", &["front", "back"])]),
            get
        ));
        assert!(!label_selector_matches(
            &sel(&[], vec![req("tier", "NotIn", &["front"])]),
            get
        ));
        assert!(label_selector_matches(
            &sel(&[], vec![req("env", "NotIn", &["prod"])]),
            get
        ));
        assert!(label_selector_matches(
            &sel(&[], vec![req("app", "Exists", &[])]),
            get
        ));
        assert!(label_selector_matches(
            &sel(&[], vec![req("env", "DoesNotExist", &[])]),
            get
        ));
        assert!(!label_selector_matches(
            &sel(&[], vec![req("app", "Bogus", &[])]),
            get
        ));
    }

    #[test]
    fn service_selectors() {
        assert!(selector_matches(
            &map(&[("app", "web")]),
            &map(&[("app", "web"), ("x", "y")])
        ));
        assert!(!selector_matches(
            &map(&[("app", "web")]),
            &map(&[("app", "db")])
        ));
        assert!(!selector_matches(&map(&[]), &map(&[("app", "web")])));
    }

    proptest! {
        #[test]
        fn canonical_key_is_order_independent(pairs in proptest::collection::vec(("[a-z]{1,5}", "[a-z]{0,5}"), 0..8)) {
            let forward: Vec<(String, String)> = pairs.clone();
            let mut backward = pairs.clone();
            backward.reverse();
            let a: BTreeMap<String, String> = forward.into_iter().collect();
            let b: BTreeMap<String, String> = backward.into_iter().rev().collect();
            prop_assert_eq!(canonical_key(&a), canonical_key(&b));
        }
    }
}
