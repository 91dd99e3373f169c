//! What a weft service asks of the Kubernetes API, declared beside the code
//! that asks it. The chart's RBAC is checked against these lists both ways:
//! its rules grant nothing beyond them, and a real API server answers yes
//! to `kubectl auth can-i` for each, as the chart's service account.

/// Verbs on one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The API group; `""` is the core group.
    pub group: &'static str,
    /// The resource's plural name.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// What a kube-rs `watcher` does: a list, then a watch from its version.
pub const WATCH: &[&str] = &["list", "watch"];

/// Every (group, resource, verb) the lists name, for comparing with RBAC
/// rules.
pub fn triples(access: &[Access]) -> std::collections::BTreeSet<(String, String, String)> {
    access
        .iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect()
}
