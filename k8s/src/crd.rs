//! The custom resources that hold weft's allocation state in a cluster.
//!
//! One object per allocation, so that creating it is the atomic claim: the
//! API server refuses a second create of the same name (409
//! AlreadyExists), whichever replica or machine tries. Both kinds are
//! cluster-scoped, like the things they allocate.
//!
//! - [`NodeCIDR`], named after the block (`10-244-1-0-24`): the block
//!   belongs to `spec.node`. The name makes a block impossible to give
//!   twice; a node that (through a race between replicas) ends up with two
//!   blocks keeps the one created first, by resourceVersion, and the other
//!   is deleted before anyone reported it (see ipam-svc's store).
//! - [`SecurityIdentity`], named after its number (`256`): the number
//!   stands for `spec.labels`. `spec.owners` lists who holds a reference;
//!   it is in the spec, not in a status subresource, so that the create
//!   that claims a number also records its first owner in the same write.

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of weft's resources.
pub const GROUP: &str = "weft.io";
/// The label on a NodeCIDR naming its node (through [`crate::api::label_value`]).
pub const NODE_LABEL: &str = "weft.io/node";
/// The label on a SecurityIdentity carrying a hash of its canonical labels.
pub const LABELS_HASH_LABEL: &str = "weft.io/labels-hash";
/// The label every object a weft service writes carries.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// A node's pod CIDR, claimed by creating this object.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "NodeCIDR",
    plural = "nodecidrs",
    singular = "nodecidr",
    shortname = "ncidr",
    doc = "A pod CIDR block held by a node; the object's name is the block (10-244-1-0-24).",
    printcolumn = r#"{"name": "Node", "type": "string", "jsonPath": ".spec.node"}"#,
    printcolumn = r#"{"name": "CIDR", "type": "string", "jsonPath": ".spec.cidr"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    selectable = ".spec.node"
)]
pub struct NodeCIDRSpec {
    /// The node holding the block.
    pub node: String,
    /// The block, e.g. `10.244.1.0/24`.
    pub cidr: String,
}

/// A numeric security identity, claimed by creating this object.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "weft.io",
    version = "v1alpha1",
    kind = "SecurityIdentity",
    plural = "securityidentities",
    singular = "securityidentity",
    shortname = "sid",
    doc = "A numeric security identity for a set of security labels; the object's name is the number.",
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
pub struct SecurityIdentitySpec {
    /// The security labels (`k8s:app`, `k8s:io.kubernetes.pod.namespace`, ...).
    pub labels: BTreeMap<String, String>,
    /// Who holds a reference (`pod:default/web-0`, or a caller's owner),
    /// sorted. An identity without owners is collected after a grace period.
    #[serde(default)]
    pub owners: Vec<String>,
}

/// The object name of a block: `10.244.1.0/24` → `10-244-1-0-24`.
/// Dots and the slash become dashes, which keeps the name a DNS label.
pub fn node_cidr_name(cidr: &str) -> String {
    cidr.replace(['.', '/', ':'], "-")
}

/// Every CRD weft defines, as YAML files: (file name, contents).
pub fn crd_files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    [NodeCIDR::crd(), SecurityIdentity::crd()]
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            let yaml = serde_yaml::to_string(&crd)?;
            Ok((
                name,
                format!("# Generated from weft-k8s's Rust types by `cargo run -p weft-k8s --bin crdgen -- deploy/crds`; do not edit.\n{yaml}"),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(node_cidr_name("10.244.1.0/24"), "10-244-1-0-24");
        assert_eq!(
            NodeCIDR::crd().metadata.name.as_deref(),
            Some("nodecidrs.weft.io")
        );
        assert_eq!(
            SecurityIdentity::crd().spec.scope,
            "Cluster",
            "identities are cluster-wide"
        );
    }
}
