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
    let mut h = blake3::Hasher::new();
    h.update(&[NODE]);
    h.update(left.as_bytes());
    h.update(right.as_bytes());
    NodeHash::from_bytes(*h.finalize().as_bytes())
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

/// The root that `leaf` at `idx` of `count` leaves implies through `path`; None when the
/// path's length does not fit the position (truncated, padded or index out of range).
pub fn root_from_path(idx: u32, count: u32, leaf: NodeHash, path: &MerklePath) -> Option<NodeHash> {
    if idx >= count {
        return None;
    }
    walk(idx as usize, count as usize, leaf, &path.0)
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

fn walk(idx: usize, n: usize, leaf: NodeHash, path: &[NodeHash]) -> Option<NodeHash> {
    if n == 1 {
        return path.is_empty().then_some(leaf);
    }
    let (top, rest) = path.split_last()?;
    let k = split(n);
    Some(if idx < k {
        node_hash(&walk(idx, k, leaf, rest)?, top)
    } else {
        node_hash(top, &walk(idx - k, n - k, leaf, rest)?)
    })
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
    fn leaf_and_node_domains_differ() {
        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        let mut concat = a.as_bytes().to_vec();
        concat.extend_from_slice(b.as_bytes());
        assert_ne!(leaf_hash(&concat), node_hash(&a, &b));
    }
}
