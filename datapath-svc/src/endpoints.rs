//! The pods attached on this node, as the datapath set them up.
//!
//! Stored in sled, so a restarted datapath-svc knows every veth it made and
//! can re-attach programs, answer CHECK and carry out DEL.

use weft_common::store::{MsgTree, Store, StoreError};
use weft_proto::datapath::v1::{CniInterface, CniIp, CniResult, CniRoute, PortMapping};

use crate::podnet::GATEWAY;

/// One attachment: a container's interface and what was made for it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EndpointRecord {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, tag = "2")]
    pub ifname: String,
    #[prost(string, tag = "3")]
    pub netns: String,
    #[prost(string, tag = "4")]
    pub host_ifname: String,
    #[prost(string, tag = "5")]
    pub ip: String,
    #[prost(string, tag = "6")]
    pub pod_namespace: String,
    #[prost(string, tag = "7")]
    pub pod_name: String,
    #[prost(string, tag = "8")]
    pub pod_uid: String,
    #[prost(string, tag = "9")]
    pub host_mac: String,
    #[prost(string, tag = "10")]
    pub pod_mac: String,
    #[prost(uint32, tag = "11")]
    pub mtu: u32,
    /// The runtime's portMappings (HostPort), from CNI.
    #[prost(message, repeated, tag = "12")]
    pub port_mappings: Vec<PortMapping>,
    /// The cookie of the pod's network namespace (0: not recorded).
    #[prost(uint64, tag = "13")]
    pub netns_cookie: u64,
}

impl EndpointRecord {
    /// `namespace/name` of the pod; its name alone when the runtime sent no
    /// namespace (a container outside Kubernetes); the container id when
    /// it sent no name either.
    pub fn pod(&self) -> String {
        match (self.pod_namespace.is_empty(), self.pod_name.is_empty()) {
            (_, true) => self.container_id.clone(),
            (true, false) => self.pod_name.clone(),
            (false, false) => format!("{}/{}", self.pod_namespace, self.pod_name),
        }
    }

    /// The CNI result describing this attachment.
    pub fn result(&self) -> CniResult {
        CniResult {
            interfaces: vec![
                CniInterface {
                    name: self.host_ifname.clone(),
                    mac: self.host_mac.clone(),
                    sandbox: String::new(),
                    mtu: self.mtu,
                },
                CniInterface {
                    name: self.ifname.clone(),
                    mac: self.pod_mac.clone(),
                    sandbox: self.netns.clone(),
                    mtu: self.mtu,
                },
            ],
            ips: vec![CniIp {
                address: format!("{}/32", self.ip),
                gateway: GATEWAY.to_string(),
                interface: Some(1),
            }],
            routes: vec![CniRoute {
                dst: "0.0.0.0/0".into(),
                gw: GATEWAY.to_string(),
            }],
        }
    }
}

/// The key of an attachment, also the owner name of its pod address.
pub fn attachment_key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

#[derive(Clone)]
pub struct Endpoints {
    tree: MsgTree<EndpointRecord>,
    store: Store,
}

impl Endpoints {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree("endpoints")?,
            store: store.clone(),
        })
    }

    pub fn get(&self, key: &str) -> Result<Option<EndpointRecord>, StoreError> {
        self.tree.get(key)
    }

    pub async fn put(&self, record: &EndpointRecord) -> Result<(), StoreError> {
        self.tree
            .insert(attachment_key(&record.container_id, &record.ifname), record)?;
        self.store.flush().await
    }

    pub async fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.tree.remove(key)?;
        self.store.flush().await
    }

    pub fn all(&self) -> Result<Vec<EndpointRecord>, StoreError> {
        Ok(self.tree.entries()?.into_iter().map(|(_, v)| v).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_read_well_whatever_the_runtime_sent() {
        let record = |ns: &str, name: &str| EndpointRecord {
            container_id: "c0ffee".into(),
            pod_namespace: ns.into(),
            pod_name: name.into(),
            ..Default::default()
        };
        assert_eq!(record("default", "web").pod(), "default/web");
        assert_eq!(record("", "web").pod(), "web", "no namespace: podman");
        assert_eq!(record("", "").pod(), "c0ffee", "nothing: the container");
    }
}
