//! Pod addresses out of the node's CIDR.
//!
//! Each address is a key in a sled tree whose value names its owner (the
//! attachment: container id and interface). An address is written and
//! flushed before it is handed out, and claimed with compare-and-swap, so no
//! crash or race gives one address to two pods. Allocation continues
//! round-robin after the last address handed out, so a freed address is not
//! immediately reused while stale connection-tracking entries may still
//! point at it.

use std::{net::Ipv4Addr, sync::Mutex};

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("the node has no pod CIDR yet")]
    NoCidr,
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("pod address store: {0}")]
    Store(#[from] sled::Error),
}

pub type Result<T, E = IpamError> = std::result::Result<T, E>;

pub struct PodIpam {
    tree: sled::Tree,
    state: Mutex<State>,
}

struct State {
    cidr: Option<Ipv4Net>,
    /// Offset into the CIDR where the next search starts.
    cursor: u32,
}

impl PodIpam {
    pub fn new(tree: sled::Tree, cidr: Option<Ipv4Net>) -> Self {
        Self {
            tree,
            state: Mutex::new(State { cidr, cursor: 0 }),
        }
    }

    pub fn set_cidr(&self, cidr: Ipv4Net) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.cidr != Some(cidr) {
            s.cidr = Some(cidr);
            s.cursor = 0;
        }
    }

    pub fn cidr(&self) -> Option<Ipv4Net> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).cidr
    }

    /// Addresses a pod can get: the CIDR without its network and broadcast
    /// addresses and the first host address, kept for the node itself.
    pub fn capacity(&self) -> u64 {
        self.cidr()
            .map(|c| (c.hosts().count() as u64).saturating_sub(1))
            .unwrap_or(0)
    }

    pub fn used(&self) -> u64 {
        self.tree.len() as u64
    }

    /// The address `owner` holds, allocating one if it holds none. Durable
    /// before it returns.
    pub async fn allocate(&self, owner: &str) -> Result<Ipv4Addr> {
        if let Some(ip) = self.owned_by(owner)? {
            return Ok(ip);
        }
        let ip = self.claim(owner)?;
        weft_common::store::flush(&self.tree).await?;
        Ok(ip)
    }

    fn claim(&self, owner: &str) -> Result<Ipv4Addr> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let cidr = s.cidr.ok_or(IpamError::NoCidr)?;
        let base = u32::from(cidr.network());
        let size = 1u64 << (32 - cidr.prefix_len());
        // Offsets 0 (network), 1 (the node) and size-1 (broadcast) are kept.
        let first = 2u32;
        let last = (size.saturating_sub(2)) as u32;
        if last < first {
            return Err(IpamError::Exhausted(cidr));
        }
        let span = last - first + 1;
        for i in 0..span {
            let offset = first + (s.cursor + i) % span;
            let ip = Ipv4Addr::from(base + offset);
            let claimed = self.tree.compare_and_swap(
                ip.octets(),
                None as Option<&[u8]>,
                Some(owner.as_bytes()),
            )?;
            if claimed.is_ok() {
                s.cursor = (offset - first + 1) % span;
                return Ok(ip);
            }
        }
        Err(IpamError::Exhausted(cidr))
    }

    /// The address `owner` holds, if any.
    pub fn owned_by(&self, owner: &str) -> Result<Option<Ipv4Addr>> {
        for item in self.tree.iter() {
            let (k, v) = item?;
            if v.as_ref() == owner.as_bytes()
                && let Ok(octets) = <[u8; 4]>::try_from(k.as_ref())
            {
                return Ok(Some(Ipv4Addr::from(octets)));
            }
        }
        Ok(None)
    }

    /// Releases whatever `owner` holds. Durable before it returns.
    pub async fn release(&self, owner: &str) -> Result<Option<Ipv4Addr>> {
        let Some(ip) = self.owned_by(owner)? else {
            return Ok(None);
        };
        self.tree
            .compare_and_swap(ip.octets(), Some(owner.as_bytes()), None as Option<&[u8]>)?
            .ok();
        weft_common::store::flush(&self.tree).await?;
        Ok(Some(ip))
    }

    /// Every allocation: (address, owner).
    pub fn allocations(&self) -> Result<Vec<(Ipv4Addr, String)>> {
        self.tree
            .iter()
            .map(|item| {
                let (k, v) = item?;
                let octets = <[u8; 4]>::try_from(k.as_ref()).unwrap_or_default();
                Ok((
                    Ipv4Addr::from(octets),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn ipam(cidr: &str) -> PodIpam {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        PodIpam::new(
            db.open_tree("ips").expect("tree"),
            Some(cidr.parse().expect("cidr")),
        )
    }

    #[tokio::test]
    async fn hands_out_each_address_once_and_skips_reserved_ones() {
        let ipam = ipam("10.244.1.0/29");
        assert_eq!(ipam.capacity(), 5);
        let mut seen = HashSet::new();
        for i in 0..5 {
            let ip = ipam.allocate(&format!("c{i}")).await.expect("allocate");
            assert!(seen.insert(ip));
            assert!(![0, 1, 7].contains(&ip.octets()[3]), "{ip} is reserved");
        }
        assert!(matches!(
            ipam.allocate("c5").await,
            Err(IpamError::Exhausted(_))
        ));
        assert_eq!(
            ipam.allocate("c2").await.expect("same owner"),
            ipam.owned_by("c2").expect("owned").expect("some")
        );
    }

    #[tokio::test]
    async fn a_released_address_is_not_reused_at_once() {
        let ipam = ipam("10.244.1.0/24");
        let a = ipam.allocate("a").await.expect("a");
        ipam.release("a").await.expect("release");
        let b = ipam.allocate("b").await.expect("b");
        assert_ne!(a, b);
        assert_eq!(ipam.used(), 1);
    }

    #[tokio::test]
    async fn no_cidr_is_a_clear_error() {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let ipam = PodIpam::new(db.open_tree("ips").expect("tree"), None);
        assert!(matches!(ipam.allocate("a").await, Err(IpamError::NoCidr)));
    }
}
