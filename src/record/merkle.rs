//! The Merkle tree joining a record's sub-records (RFC 9162 shape, domain-separated hashes).
//!
//! Leaves hash as `blake3(0x00 || data)`, inner nodes as `blake3(0x01 || left || right)`, and an
//! empty record's root is `blake3(0x02)`. A tree of n leaves splits at the largest power of two
//! below n, so odd counts need no duplicated leaves and every leaf has exactly one path.

use borsh::{BorshDeserialize, BorshSerialize};

use super::codec::{Canonical, DecodeError};
use super::ids::NodeHash;

const LEAF: u8 = 0x00;
const NODE: u8 = 0x01;
const EMPTY: u8 = 0x02;

pub fn leaf_hash(data: &[u8]) -> NodeHash {
    let mut h = blake3::Hasher::new();
    h.update(&[LEAF]);
    h.update(data);
    NodeHash::from_bytes(*h.finalize().as_bytes())
}

fn node_hash(left: &NodeHash, right: &NodeHash) -> NodeHash {
    // One-shot hashing of a stack buffer: node hashes dominate path checks, and a streaming
    // Hasher costs more to set up than these 65 bytes cost to hash.
    let mut input = [0u8; 65];
    input[0] = NODE;
    input[1..33].copy_from_slice(left.as_bytes());
    input[33..].copy_from_slice(right.as_bytes());
    NodeHash::from_bytes(*blake3::hash(&input).as_bytes())
}

fn empty_root() -> NodeHash {
    NodeHash::from_bytes(*blake3::hash(&[EMPTY]).as_bytes())
}

/// Largest power of two strictly below `n` (n >= 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Sibling hashes from a leaf up to the root: bottom first.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct MerklePath(pub Vec<NodeHash>);

impl Canonical for MerklePath {
    fn check(&self) -> Result<(), DecodeError> {
        // A path is never longer than the deepest tree of u32::MAX leaves.
        if self.0.len() > 32 {
            return Err(DecodeError::NonCanonical("Merkle path longer than 32"));
        }
        Ok(())
    }
}

/// The root over all leaf hashes plus every leaf's path, in one O(n log n) pass.
pub fn build(leaves: &[NodeHash]) -> (NodeHash, Vec<MerklePath>) {
    if leaves.is_empty() {
        return (empty_root(), Vec::new());
    }
    let mut paths = vec![MerklePath(Vec::new()); leaves.len()];
    let root = build_range(leaves, &mut paths);
    (root, paths)
}

fn build_range(leaves: &[NodeHash], paths: &mut [MerklePath]) -> NodeHash {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let k = split(leaves.len());
    let (left_paths, right_paths) = paths.split_at_mut(k);
    let left = build_range(&leaves[..k], left_paths);
    let right = build_range(&leaves[k..], right_paths);
    left_paths.iter_mut().for_each(|p| p.0.push(right));
    right_paths.iter_mut().for_each(|p| p.0.push(left));
    node_hash(&left, &right)
}

/// A subtree of a record's tree: leaves `start..end` and their hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subtree {
    pub start: u32,
    pub end: u32,
    pub hash: NodeHash,
}

/// Checks that `leaf` at `idx` of `count` leaves, with `path`, leads to `root`. `known` may
/// vouch for subtrees verified before: the walk stops at the first one it reaches, which must
/// then match. Returns the subtrees computed on the way (all proven now), or None on mismatch,
/// including a path whose length does not fit the position.
pub fn verify_path(
    idx: u32,
    count: u32,
    leaf: NodeHash,
    path: &MerklePath,
    root: NodeHash,
    known: impl Fn(u32, u32) -> Option<NodeHash>,
) -> Option<Vec<Subtree>> {
    if idx >= count {
        return None;
    }
    // Ranges from the root down to the leaf; the path lists siblings from the bottom up.
    let mut ranges = vec![(0, count)];
    let (mut start, mut end) = (0, count);
    while end - start > 1 {
        let mid = start + split((end - start) as usize) as u32;
        (start, end) = if idx < mid { (start, mid) } else { (mid, end) };
        ranges.push((start, end));
    }
    if path.0.len() != ranges.len() - 1 {
        return None;
    }
    let mut computed = Vec::with_capacity(ranges.len());
    let mut hash = leaf;
    for (level, &(start, end)) in ranges.iter().rev().enumerate() {
        if let Some(proven) = known(start, end) {
            return (proven == hash).then_some(computed);
        }
        computed.push(Subtree { start, end, hash });
        let Some(sibling) = path.0.get(level) else { break };
        let (parent_start, _) = ranges[ranges.len() - 2 - level];
        hash = if start == parent_start { node_hash(&hash, sibling) } else { node_hash(sibling, &hash) };
    }
    (hash == root).then_some(computed)
}

/// How many siblings the path of leaf `idx` of `count` has: its depth in the tree.
pub fn path_len(mut idx: u32, mut count: u32) -> usize {
    let mut depth = 0;
    while count > 1 {
        let k = split(count as usize) as u32;
        (idx, count) = if idx < k { (idx, k) } else { (idx - k, count - k) };
        depth += 1;
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The obvious recursive definition, to test the one-pass builder against.
    fn naive_root(leaves: &[NodeHash]) -> NodeHash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => node_hash(&naive_root(&leaves[..split(n)]), &naive_root(&leaves[split(n)..])),
        }
    }

    fn root_from_path(idx: u32, count: u32, leaf: NodeHash, path: &MerklePath) -> Option<NodeHash> {
        let (root, _) = build(&leaves(count as usize));
        verify_path(idx, count, leaf, path, root, |_, _| None).map(|_| root)
    }

    fn leaves(n: usize) -> Vec<NodeHash> {
        (0..n).map(|i| leaf_hash(&i.to_le_bytes())).collect()
    }

    #[test]
    fn builder_matches_naive_root_and_every_path_verifies() {
        for n in 0..70 {
            let ls = leaves(n);
            let (root, paths) = build(&ls);
            assert_eq!(root, naive_root(&ls), "n={n}");
            for (i, p) in paths.iter().enumerate() {
                assert_eq!(root_from_path(i as u32, n as u32, ls[i], p), Some(root), "n={n} i={i}");
                assert_eq!(path_len(i as u32, n as u32), p.0.len());
                assert!(p.0.len() <= 7);
            }
        }
    }

    #[test]
    fn path_length_is_logarithmic() {
        let (_, paths) = build(&leaves(1000));
        assert!(paths.iter().all(|p| p.0.len() <= 10));
    }

    #[test]
    fn wrong_index_tampered_sibling_truncated_or_padded_path_fail() {
        let ls = leaves(11);
        let (root, paths) = build(&ls);
        let p = &paths[5];
        assert_ne!(root_from_path(6, 11, ls[5], p), Some(root));
        assert_eq!(root_from_path(11, 11, ls[5], p), None);
        let mut tampered = p.clone();
        tampered.0[1] = leaf_hash(b"x");
        assert_ne!(root_from_path(5, 11, ls[5], &tampered), Some(root));
        let truncated = MerklePath(p.0[..p.0.len() - 1].to_vec());
        assert_ne!(root_from_path(5, 11, ls[5], &truncated), Some(root));
        let mut padded = p.clone();
        padded.0.push(root);
        assert_eq!(root_from_path(5, 11, ls[5], &padded), None);
        assert_ne!(root_from_path(5, 12, ls[5], p), Some(root));
    }

    #[test]
    fn known_subtrees_end_the_walk_and_must_match() {
        let ls = leaves(13);
        let (root, paths) = build(&ls);
        let first = verify_path(4, 13, ls[4], &paths[4], root, |_, _| None).unwrap();
        assert_eq!(first.len(), 5, "the leaf, three inner subtrees and the root");
        let known = |s: u32, e: u32| first.iter().find(|t| (t.start, t.end) == (s, e)).map(|t| t.hash);
        // Leaf 5 shares subtree 4..6 with leaf 4: one hash, then a known node.
        assert_eq!(verify_path(5, 13, ls[5], &paths[5], root, known).unwrap().len(), 1);
        assert!(verify_path(5, 13, leaf_hash(b"forged"), &paths[5], root, known).is_none());
        let mut bad = paths[5].clone();
        bad.0[0] = leaf_hash(b"x");
        assert!(verify_path(5, 13, ls[5], &bad, root, known).is_none());
        // A leaf vouched for itself needs no hashing at all.
        assert_eq!(verify_path(4, 13, ls[4], &paths[4], root, known).unwrap().len(), 0);
    }

    #[test]
    fn leaf_and_node_domains_differ() {
        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        let mut concat = a.as_bytes().to_vec();
        concat.extend_from_slice(b.as_bytes());
        assert_ne!(leaf_hash(&concat), node_hash(&a, &b));
    }
}
