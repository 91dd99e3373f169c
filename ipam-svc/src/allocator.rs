//! The CIDR allocator: which node holds which block, and which block comes
//! next. Pure and in memory, so the rules can be tested exhaustively; the
//! service persists what [`reconcile`] decides before anyone hears of it.
//!
//! Allocations never overlap, not even with blocks of another size left over
//! from an earlier `--cluster-pool-ipv4-mask-size`: a node that has a CIDR
//! keeps it, and new blocks are carved around it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;

use crate::store::CidrOp;

/// A block someone else holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{cidr} overlaps {held}, held by node {holder}")]
pub struct Overlap {
    pub cidr: Ipv4Net,
    pub held: Ipv4Net,
    pub holder: String,
}

/// How full one pool is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub pool: Ipv4Net,
    pub mask: u8,
    pub total: u64,
    pub used: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Allocator {
    pools: Vec<Ipv4Net>,
    mask: u8,
    by_node: BTreeMap<String, Ipv4Net>,
    /// The same allocations keyed by first address. They never overlap, so
    /// the entry starting last at or before a block's end is the only one
    /// that can overlap it.
    by_start: BTreeMap<Ipv4Addr, (Ipv4Net, String)>,
}

impl Allocator {
    /// An allocator that carves `mask`-sized blocks out of `pools` (none in
    /// kubernetes mode, where every CIDR comes from the node).
    pub fn new(pools: Vec<Ipv4Net>, mask: u8) -> Self {
        Self {
            pools,
            mask,
            ..Self::default()
        }
    }

    pub fn get(&self, node: &str) -> Option<Ipv4Net> {
        self.by_node.get(node).copied()
    }

    /// Every allocation, by node name.
    pub fn allocations(&self) -> impl Iterator<Item = (&str, Ipv4Net)> {
        self.by_node.iter().map(|(n, c)| (n.as_str(), *c))
    }

    pub fn len(&self) -> usize {
        self.by_node.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_node.is_empty()
    }

    pub fn pools(&self) -> &[Ipv4Net] {
        &self.pools
    }

    /// The size of the blocks carved out of the pools.
    pub fn mask(&self) -> u8 {
        self.mask
    }

    /// The allocation overlapping `cidr`, if any.
    pub fn overlapping(&self, cidr: Ipv4Net) -> Option<(Ipv4Net, &str)> {
        let (_, (held, holder)) = self.by_start.range(..=cidr.broadcast()).next_back()?;
        (held.broadcast() >= cidr.network()).then_some((*held, holder.as_str()))
    }

    /// Gives `cidr` to `node`, replacing what the node held; refused when
    /// another node holds any part of it.
    pub fn assign(&mut self, node: &str, cidr: Ipv4Net) -> Result<(), Overlap> {
        let cidr = cidr.trunc();
        let previous = self.release(node);
        if let Some((held, holder)) = self.overlapping(cidr) {
            let err = Overlap {
                cidr,
                held,
                holder: holder.to_string(),
            };
            if let Some(previous) = previous {
                self.insert(node, previous);
            }
            return Err(err);
        }
        self.insert(node, cidr);
        Ok(())
    }

    fn insert(&mut self, node: &str, cidr: Ipv4Net) {
        self.by_node.insert(node.to_string(), cidr);
        self.by_start
            .insert(cidr.network(), (cidr, node.to_string()));
    }

    /// Frees the node's block, returning it.
    pub fn release(&mut self, node: &str) -> Option<Ipv4Net> {
        let cidr = self.by_node.remove(node)?;
        self.by_start.remove(&cidr.network());
        Some(cidr)
    }

    /// The lowest free block of the first pool that has one.
    pub fn lowest_free(&self) -> Option<Ipv4Net> {
        self.pools.iter().find_map(|pool| {
            pool.subnets(self.mask)
                .ok()?
                .find(|block| self.overlapping(*block).is_none())
        })
    }

    /// Occupancy of every pool.
    pub fn usage(&self) -> Vec<PoolUsage> {
        self.pools
            .iter()
            .map(|pool| {
                let used = self
                    .by_start
                    .range(pool.network()..=pool.broadcast())
                    .filter(|(_, (cidr, _))| pool.contains(cidr))
                    .count() as u64;
                let total = 1u64 << (self.mask.saturating_sub(pool.prefix_len()));
                PoolUsage {
                    pool: *pool,
                    mask: self.mask,
                    total,
                    used,
                }
            })
            .collect()
    }
}

/// What a node present in the cluster should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Any free block of the cluster pool (cluster-pool mode).
    AnyBlock,
    /// Exactly the node's `spec.podCIDRs` entry (kubernetes mode); `None`
    /// while Kubernetes has not assigned one.
    Exactly(Option<Ipv4Net>),
}

/// Why a node present in the cluster has no CIDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// Every pool is full.
    Exhausted,
    /// Kubernetes assigned no IPv4 pod CIDR yet.
    NoPodCidr,
    /// The node's pod CIDR overlaps another node's.
    Conflict(Overlap),
}

/// What one reconcile changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The writes that make the store match, in order.
    pub ops: Vec<CidrOp>,
    pub allocated: Vec<(String, Ipv4Net)>,
    pub released: Vec<(String, Ipv4Net)>,
    /// Every node that is present and still has no CIDR, and why.
    pub pending: BTreeMap<String, Pending>,
}

impl Outcome {
    pub fn changed(&self) -> bool {
        !self.ops.is_empty()
    }
}

/// Brings the allocations in line with the nodes of a complete (synced)
/// cluster state: frees the blocks of nodes that are gone first, so pending
/// nodes can take them, then gives each node without a CIDR one, in name
/// order so the result is deterministic.
pub fn reconcile(alloc: &mut Allocator, nodes: &BTreeMap<String, Want>) -> Outcome {
    let mut out = Outcome::default();
    let gone: BTreeSet<String> = alloc
        .by_node
        .keys()
        .filter(|n| !nodes.contains_key(*n))
        .cloned()
        .collect();
    for node in gone {
        if let Some(cidr) = alloc.release(&node) {
            out.ops.push(CidrOp::Remove { node: node.clone() });
            out.released.push((node, cidr));
        }
    }
    for (node, want) in nodes {
        let held = alloc.get(node);
        match (want, held) {
            (Want::AnyBlock, Some(_)) => {}
            (Want::AnyBlock, None) => match alloc.lowest_free() {
                Some(cidr) => {
                    // The block is free, so this cannot overlap.
                    if alloc.assign(node, cidr).is_ok() {
                        out.ops.push(CidrOp::Put {
                            node: node.clone(),
                            cidr,
                        });
                        out.allocated.push((node.clone(), cidr));
                    }
                }
                None => {
                    out.pending.insert(node.clone(), Pending::Exhausted);
                }
            },
            // Keep what the node has until Kubernetes says otherwise.
            (Want::Exactly(None), Some(_)) => {}
            (Want::Exactly(None), None) => {
                out.pending.insert(node.clone(), Pending::NoPodCidr);
            }
            (Want::Exactly(Some(cidr)), held) if held == Some(*cidr) => {}
            (Want::Exactly(Some(cidr)), held) => match alloc.assign(node, *cidr) {
                Ok(()) => {
                    out.ops.push(CidrOp::Put {
                        node: node.clone(),
                        cidr: *cidr,
                    });
                    out.allocated.push((node.clone(), *cidr));
                }
                Err(overlap) => {
                    // A node that had a CIDR keeps it; one that had none waits.
                    if held.is_none() {
                        out.pending.insert(node.clone(), Pending::Conflict(overlap));
                    } else {
                        tracing::error!(%node, error = %overlap, "node's pod CIDR changed to one another node holds; keeping the old one");
                    }
                }
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test CIDR")
    }

    fn any(names: &[&str]) -> BTreeMap<String, Want> {
        names
            .iter()
            .map(|n| (n.to_string(), Want::AnyBlock))
            .collect()
    }

    #[test]
    fn nodes_get_the_lowest_free_block_in_name_order() {
        let mut a = Allocator::new(vec![net("10.244.0.0/16")], 24);
        let out = reconcile(&mut a, &any(&["b", "a"]));
        assert_eq!(a.get("a"), Some(net("10.244.0.0/24")));
        assert_eq!(a.get("b"), Some(net("10.244.1.0/24")));
        assert_eq!(out.allocated.len(), 2);
        assert_eq!(out.ops.len(), 2);

        // a leaves; its block goes to the next newcomer.
        let out = reconcile(&mut a, &any(&["b", "c"]));
        assert_eq!(out.released, vec![("a".to_string(), net("10.244.0.0/24"))]);
        assert_eq!(a.get("c"), Some(net("10.244.0.0/24")));
        assert_eq!(a.get("b"), Some(net("10.244.1.0/24")));

        // Nothing changes, nothing is written.
        assert!(!reconcile(&mut a, &any(&["b", "c"])).changed());
    }

    #[test]
    fn the_next_pool_is_used_when_the_first_is_full() {
        let mut a = Allocator::new(vec![net("10.0.0.0/30"), net("10.1.0.0/29")], 30);
        reconcile(&mut a, &any(&["a", "b", "c"]));
        assert_eq!(a.get("a"), Some(net("10.0.0.0/30")));
        assert_eq!(a.get("b"), Some(net("10.1.0.0/30")));
        assert_eq!(a.get("c"), Some(net("10.1.0.4/30")));
        let out = reconcile(&mut a, &any(&["a", "b", "c", "d"]));
        assert_eq!(out.pending.get("d"), Some(&Pending::Exhausted));
        let usage = a.usage();
        assert_eq!((usage[0].total, usage[0].used), (1, 1));
        assert_eq!((usage[1].total, usage[1].used), (2, 2));

        // A block frees up: the pending node gets it in the same pass.
        let out = reconcile(&mut a, &any(&["b", "c", "d"]));
        assert!(out.pending.is_empty());
        assert_eq!(a.get("d"), Some(net("10.0.0.0/30")));
    }

    #[test]
    fn blocks_of_another_size_are_carved_around() {
        let mut a = Allocator::new(vec![net("10.244.0.0/16")], 24);
        // Left over from an earlier /23 configuration.
        a.assign("old", net("10.244.0.0/23")).expect("free");
        reconcile(&mut a, &any(&["old", "new"]));
        assert_eq!(a.get("old"), Some(net("10.244.0.0/23")));
        assert_eq!(a.get("new"), Some(net("10.244.2.0/24")));
    }

    #[test]
    fn kubernetes_mode_takes_the_spec_and_refuses_overlaps() {
        let mut a = Allocator::new(Vec::new(), 24);
        let nodes: BTreeMap<String, Want> = [
            ("a".to_string(), Want::Exactly(Some(net("10.1.0.0/24")))),
            ("b".to_string(), Want::Exactly(Some(net("10.1.0.0/25")))),
            ("c".to_string(), Want::Exactly(None)),
        ]
        .into();
        let out = reconcile(&mut a, &nodes);
        assert_eq!(a.get("a"), Some(net("10.1.0.0/24")));
        assert_eq!(a.get("b"), None);
        assert!(matches!(out.pending.get("b"), Some(Pending::Conflict(_))));
        assert_eq!(out.pending.get("c"), Some(&Pending::NoPodCidr));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Add(u8),
        Remove(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..24).prop_map(Step::Add),
            (0u8..24).prop_map(Step::Remove)
        ]
    }

    proptest! {
        /// Whatever nodes come and go, no block is ever held by two nodes,
        /// a node keeps its block while it exists, and nobody waits while a
        /// block is free.
        #[test]
        fn no_block_is_ever_shared(steps in proptest::collection::vec(step(), 1..80)) {
            // 16 blocks for up to 24 nodes, so exhaustion happens too.
            let mut a = Allocator::new(vec![net("10.0.0.0/28"), net("10.0.1.0/29")], 30);
            let mut present: BTreeSet<String> = BTreeSet::new();
            let mut replayed: BTreeMap<String, Ipv4Net> = BTreeMap::new();
            for s in steps {
                match s {
                    Step::Add(n) => { present.insert(format!("node-{n}")); }
                    Step::Remove(n) => { present.remove(&format!("node-{n}")); }
                }
                let before: BTreeMap<String, Ipv4Net> =
                    a.allocations().map(|(n, c)| (n.to_string(), c)).collect();
                let wants = present.iter().map(|n| (n.clone(), Want::AnyBlock)).collect();
                let out = reconcile(&mut a, &wants);

                // The ops replayed on an empty store give the same table.
                for op in &out.ops {
                    match op {
                        CidrOp::Put { node, cidr } => { replayed.insert(node.clone(), *cidr); }
                        CidrOp::Remove { node } => { replayed.remove(node); }
                    }
                }
                let now: BTreeMap<String, Ipv4Net> =
                    a.allocations().map(|(n, c)| (n.to_string(), c)).collect();
                prop_assert_eq!(&replayed, &now);

                let all: Vec<Ipv4Net> = now.values().copied().collect();
                for (i, x) in all.iter().enumerate() {
                    prop_assert!(a.pools().iter().any(|p| p.contains(x)));
                    for y in &all[i + 1..] {
                        prop_assert!(!x.contains(y) && !y.contains(x), "{} and {} overlap", x, y);
                    }
                }
                for (node, cidr) in &before {
                    if present.contains(node) {
                        prop_assert_eq!(now.get(node), Some(cidr));
                    }
                }
                prop_assert!(now.keys().all(|n| present.contains(n)));
                if !out.pending.is_empty() {
                    prop_assert!(a.lowest_free().is_none());
                }
                let used: u64 = a.usage().iter().map(|u| u.used).sum();
                prop_assert_eq!(used as usize, now.len());
            }
        }
    }
}
