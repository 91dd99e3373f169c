//! The pods the socket hooks translate for: each pod's network namespace,
//! by cookie, with its address (the client for ClientIP affinity and the
//! Maglev hash) and its host veth (for flow events).
//!
//! A pod in the map has its Services translated once, at `connect()` or
//! `sendmsg()`, instead of on every packet by the programs on its veth; a
//! pod not in it (the hooks are off, or the entry is not there yet) is
//! still served by those per-packet programs, so the map is an
//! optimisation that correctness never waits for.

use std::{collections::HashMap, net::Ipv4Addr, sync::Mutex};

use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::{
    bpf::BpfError,
    maps::{Sock4Pod, be_addr, names},
};

pub struct SockPods {
    map: Mutex<BpfHashMap<MapData, u64, Sock4Pod>>,
}

fn map_error(e: impl std::fmt::Display) -> BpfError {
    BpfError::Map {
        name: names::SOCK4_PODS,
        message: e.to_string(),
    }
}

impl SockPods {
    pub fn new(map: BpfHashMap<MapData, u64, Sock4Pod>) -> Self {
        Self {
            map: Mutex::new(map),
        }
    }

    /// Serves the pod whose network namespace has `cookie`.
    pub fn insert(
        &self,
        cookie: u64,
        address: Ipv4Addr,
        host_ifindex: u32,
    ) -> Result<(), BpfError> {
        let value = Sock4Pod {
            address: be_addr(address),
            ep_id: host_ifindex,
        };
        self.lock().insert(cookie, value, 0).map_err(map_error)
    }

    /// Stops serving the pod at `address` (its namespace may be gone, and
    /// with it the cookie, so the map is searched by address).
    pub fn remove(&self, address: Ipv4Addr) -> Result<(), BpfError> {
        let mut map = self.lock();
        let stale: Vec<u64> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, pod)| pod.address == be_addr(address))
            .map(|(cookie, _)| cookie)
            .collect();
        for cookie in stale {
            map.remove(&cookie).map_err(map_error)?;
        }
        Ok(())
    }

    /// Makes the map hold exactly `pods` (cookie to address and veth).
    pub fn sync(&self, pods: &HashMap<u64, (Ipv4Addr, u32)>) -> Result<(), BpfError> {
        let mut map = self.lock();
        let present: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for cookie in present {
            if !pods.contains_key(&cookie) {
                map.remove(&cookie).map_err(map_error)?;
            }
        }
        for (cookie, (address, ifindex)) in pods {
            let value = Sock4Pod {
                address: be_addr(*address),
                ep_id: *ifindex,
            };
            map.insert(cookie, value, 0).map_err(map_error)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BpfHashMap<MapData, u64, Sock4Pod>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}
