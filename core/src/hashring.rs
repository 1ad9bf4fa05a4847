//! Consistent hash ring of management nodes.
//!
//! Every management node places `vnodes` points on a 64-bit ring; a resource belongs to the node
//! owning the first point at or after the resource's hash. Adding or removing a node moves only
//! the keys between its points and their predecessors (about 1/N of all keys).

use uuid::Uuid;

/// Management node identity.
pub type NodeId = Uuid;

/// Virtual nodes per management node (ZStack uses 500).
pub const DEFAULT_VNODES: usize = 500;

/// A stable 64-bit hash (FNV-1a followed by a splitmix64 finalizer for avalanche).
/// Independent of process, seed and Rust version, so every node computes the same ring.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix64(h)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
pub struct HashRing {
    vnodes: usize,
    points: Vec<(u64, NodeId)>,
}

impl HashRing {
    pub fn new(vnodes: usize) -> Self {
        HashRing {
            vnodes: vnodes.max(1),
            points: Vec::new(),
        }
    }

    pub fn with_nodes(vnodes: usize, nodes: impl IntoIterator<Item = NodeId>) -> Self {
        let mut ring = HashRing::new(vnodes);
        for n in nodes {
            ring.add(n);
        }
        ring
    }

    /// Add a node (no-op when present).
    pub fn add(&mut self, node: NodeId) {
        if self.contains(node) {
            return;
        }
        for v in 0..self.vnodes {
            let mut key = [0u8; 24];
            key[..16].copy_from_slice(node.as_bytes());
            key[16..].copy_from_slice(&(v as u64).to_le_bytes());
            self.points.push((hash64(&key), node));
        }
        // Ties (practically impossible) are broken by node id, so every node sorts alike.
        self.points.sort_unstable();
    }

    pub fn remove(&mut self, node: NodeId) {
        self.points.retain(|(_, n)| *n != node);
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.points.iter().any(|(_, n)| *n == node)
    }

    /// The distinct nodes on the ring, sorted.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.points.iter().map(|(_, n)| *n).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The node that owns `key`, or `None` when the ring is empty.
    pub fn owner_of_hash(&self, h: u64) -> Option<NodeId> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.points.partition_point(|(p, _)| *p < h);
        let i = if i == self.points.len() { 0 } else { i };
        Some(self.points[i].1)
    }

    pub fn owner(&self, key: &Uuid) -> Option<NodeId> {
        self.owner_of_hash(hash64(key.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Ids;
    use std::collections::HashMap;

    #[test]
    fn empty_ring_owns_nothing_single_node_owns_everything() {
        let ids = Ids::from_seed(1);
        let mut ring = HashRing::new(DEFAULT_VNODES);
        assert_eq!(ring.owner(&ids.uuid()), None);
        let n = ids.uuid();
        ring.add(n);
        for _ in 0..100 {
            assert_eq!(ring.owner(&ids.uuid()), Some(n));
        }
    }

    #[test]
    fn keys_spread_evenly_and_move_little_when_a_node_joins() {
        let ids = Ids::from_seed(2);
        let nodes: Vec<NodeId> = (0..4).map(|_| ids.uuid()).collect();
        let ring = HashRing::with_nodes(DEFAULT_VNODES, nodes[..3].iter().copied());
        let keys: Vec<Uuid> = (0..30_000).map(|_| ids.uuid()).collect();
        let mut counts: HashMap<NodeId, usize> = HashMap::new();
        for k in &keys {
            *counts.entry(ring.owner(k).unwrap()).or_default() += 1;
        }
        for n in &nodes[..3] {
            let share = counts[n] as f64 / keys.len() as f64;
            assert!((0.28..0.39).contains(&share), "share {share}");
        }
        let mut bigger = ring.clone();
        bigger.add(nodes[3]);
        let moved = keys
            .iter()
            .filter(|k| ring.owner(k) != bigger.owner(k))
            .count();
        // Every moved key moved to the new node, and about a quarter moved.
        assert!(keys
            .iter()
            .filter(|k| ring.owner(k) != bigger.owner(k))
            .all(|k| bigger.owner(k) == Some(nodes[3])));
        let frac = moved as f64 / keys.len() as f64;
        assert!((0.18..0.32).contains(&frac), "moved {frac}");
    }

    #[test]
    fn ring_is_independent_of_insertion_order() {
        let ids = Ids::from_seed(3);
        let nodes: Vec<NodeId> = (0..3).map(|_| ids.uuid()).collect();
        let a = HashRing::with_nodes(50, nodes.iter().copied());
        let b = HashRing::with_nodes(50, nodes.iter().rev().copied());
        for _ in 0..1000 {
            let k = ids.uuid();
            assert_eq!(a.owner(&k), b.owner(&k));
        }
        let mut c = a.clone();
        c.remove(nodes[1]);
        assert!(!c.contains(nodes[1]));
        assert_eq!(c.nodes().len(), 2);
    }
}
