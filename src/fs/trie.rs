//! A persistent map from u64 keys to values, kept as immutable nodes in sub-records: the shape
//! of the inode table, file chunk maps and directories.
//!
//! A node is either an inner node, with up to 16 children indexed by 4 bits of the key, or a
//! leaf bucket of at most `leaf_max` entries. A full leaf splits into an inner node. Key bits
//! are used lowest first, so dense keys (inode and chunk numbers) spread evenly. Changing a key
//! rewrites only the nodes on its path; everything else stays a reference into an earlier
//! record. Nodes committed in one record refer to each other with `Ref::Here`, because that
//! record's hash depends on them, so they cannot name it.
//!
//! The tree neither seals nor proves anything: `NodeSource` hands it plaintext nodes that were
//! already proven and opened, and `NodeSink` takes the nodes of a commit.

use std::any::Any;
use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;

use borsh::{BorshDeserialize, BorshSerialize};

use crate::record::codec::{self, Canonical, DecodeError, strictly_ascending};
use crate::record::{RecordHash, SubIdx};
use crate::{Error, Result, VerifyError};

/// Key bits a level. A change rewrites its path, and an inner node spells out a 37-byte ref
/// for each child: with 64 children (6 bits) the path to one inode among 5000 was two inner
/// nodes of 2.4 KiB; with 16 it is three of 0.6 KiB.
const BITS: u32 = 4;
const FANOUT: u64 = 1 << BITS;
/// Depth at which every key bit is used up; a leaf there holds at most one key.
const MAX_DEPTH: u32 = 64u32.div_ceil(BITS);

fn digit(key: u64, depth: u32) -> u8 {
    ((key >> (depth * BITS)) % FANOUT) as u8
}

/// The key bits that every key under a node at `depth` shares.
fn prefix_mask(depth: u32) -> u64 {
    1u64.checked_shl(depth * BITS).map_or(u64::MAX, |b| b - 1)
}

/// Where a node is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    pub record: RecordHash,
    pub idx: SubIdx,
}

/// A child pointer as stored: in the same record as its parent, or in an earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum Ref {
    Here(SubIdx),
    At(RecordHash, SubIdx),
}

impl Ref {
    /// Makes a `Here` ref absolute, as loaded from record `base`.
    pub fn resolve_in_place(&mut self, base: RecordHash) {
        if let Ref::Here(idx) = *self {
            *self = Ref::At(base, idx);
        }
    }

    /// The location an absolute ref names. Values read from a tree are absolute (`Value::resolve`
    /// runs as they load); only a commit being built holds `Here` refs.
    pub fn absolute(self) -> Loc {
        match self {
            Ref::At(record, idx) => Loc { record, idx },
            Ref::Here(_) => {
                unreachable!("refs read from a tree are absolute; `Here` lives only in a commit being built")
            }
        }
    }

    /// The location this ref names, for a ref stored in (or returned for) record `base`.
    pub fn resolve(self, base: RecordHash) -> Loc {
        match self {
            Ref::Here(idx) => Loc { record: base, idx },
            Ref::At(record, idx) => Loc { record, idx },
        }
    }
}

/// A node's position in its tree; sinks bind it into the node's associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePos {
    pub depth: u32,
    pub prefix: u64,
}

/// Values the tree can hold. A value may itself hold refs (an inode points at its chunk map);
/// `resolve` turns its `Ref::Here`s into `Ref::At(base, ..)` when it is loaded from `base`.
pub trait Value: BorshSerialize + BorshDeserialize + Clone + Send + Sync + 'static {
    fn resolve(&mut self, _base: RecordHash) {}
}

macro_rules! plain_values {
    ($($t:ty),*) => { $(impl Value for $t {})* };
}
plain_values!(u8, u16, u32, u64);

/// A node as stored (borsh, no version byte: the structure that points at it carries one).
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
enum StoredNode<V> {
    /// Children by key digit: sorted, unique, non-empty.
    Inner(Vec<(u8, Ref)>),
    /// Entries by key: sorted, unique, non-empty.
    Leaf(Vec<(u64, V)>),
}

impl<V> Canonical for StoredNode<V> {
    fn check(&self) -> Result<(), DecodeError> {
        let ok = match self {
            StoredNode::Inner(children) => {
                let digits: Vec<u8> = children.iter().map(|c| c.0).collect();
                !digits.is_empty() && strictly_ascending(&digits) && digits.iter().all(|d| u64::from(*d) < FANOUT)
            }
            StoredNode::Leaf(entries) => {
                let keys: Vec<u64> = entries.iter().map(|e| e.0).collect();
                !keys.is_empty() && strictly_ascending(&keys)
            }
        };
        if ok { Ok(()) } else { Err(DecodeError::NonCanonical("tree node children or entries")) }
    }
}

/// A node decoded before, type-erased so that one cache serves trees of every value type.
pub type DecodedNode = Arc<dyn Any + Send + Sync>;

/// Gives the tree the plaintext of nodes committed before (proven and opened by the caller,
/// who binds `pos` into the seal), and optionally keeps nodes it decoded from them.
pub trait NodeSource {
    fn load(&self, at: Loc, pos: NodePos) -> Result<Arc<Vec<u8>>>;

    /// The node that `keep_decoded` kept for `at` at `pos`, if it is still kept.
    fn decoded(&self, _at: Loc, _pos: NodePos) -> Option<DecodedNode> {
        None
    }

    /// Keeps a node decoded from the `weight` plaintext bytes `load` gave for `at` at `pos`.
    fn keep_decoded(&self, _at: Loc, _pos: NodePos, _node: DecodedNode, _weight: usize) {}
}

/// Takes the nodes of a commit; returns each one's index in the record being built.
pub trait NodeSink {
    fn push(&mut self, pos: NodePos, plaintext: Vec<u8>) -> Result<SubIdx>;
}

#[derive(Clone)]
enum Slot<V> {
    Stored(Loc),
    Dirty(Box<Node<V>>),
}

#[derive(Clone)]
enum Node<V> {
    Inner(BTreeMap<u8, Slot<V>>),
    Leaf(BTreeMap<u64, V>),
}

/// The map; cheap to open at any committed root, which is how history is read.
#[derive(Clone)]
pub struct Trie<V> {
    root: Option<Slot<V>>,
    leaf_max: usize,
}

/// The committed node at `at`: decoded before, or loaded and decoded now (and then kept).
fn load_node<V: Value>(src: &dyn NodeSource, at: Loc, pos: NodePos) -> Result<Arc<Node<V>>> {
    if let Some(node) = src.decoded(at, pos).and_then(|node| node.downcast::<Node<V>>().ok()) {
        return Ok(node);
    }
    let bytes = src.load(at, pos)?;
    let node = Arc::new(decode_node(&bytes, at, pos)?);
    src.keep_decoded(at, pos, node.clone(), bytes.len());
    Ok(node)
}

fn decode_node<V: Value>(bytes: &[u8], at: Loc, pos: NodePos) -> Result<Node<V>> {
    let stored: StoredNode<V> = codec::decode_unversioned(bytes).map_err(|source| VerifyError::MalformedSubRecord {
        record: at.record,
        idx: at.idx,
        source,
    })?;
    let misplaced = || Error::from(VerifyError::MisplacedNode { record: at.record, idx: at.idx });
    Ok(match stored {
        StoredNode::Inner(_) if pos.depth >= MAX_DEPTH => return Err(misplaced()),
        StoredNode::Inner(children) => {
            // At the last level fewer than 6 key bits remain.
            let limit = 1u64.checked_shl(64 - pos.depth * BITS).unwrap_or(FANOUT).min(FANOUT);
            if children.iter().any(|(d, _)| u64::from(*d) >= limit) {
                return Err(misplaced());
            }
            Node::Inner(children.into_iter().map(|(d, r)| (d, Slot::Stored(r.resolve(at.record)))).collect())
        }
        StoredNode::Leaf(entries) => {
            if entries.iter().any(|(k, _)| k & prefix_mask(pos.depth) != pos.prefix) {
                return Err(misplaced());
            }
            Node::Leaf(
                entries
                    .into_iter()
                    .map(|(k, mut v)| {
                        v.resolve(at.record);
                        (k, v)
                    })
                    .collect(),
            )
        }
    })
}

/// A node to read: one being edited, or a committed one as loaded.
enum NodeView<'a, V> {
    Dirty(&'a Node<V>),
    Committed(Arc<Node<V>>),
}

impl<V> Deref for NodeView<'_, V> {
    type Target = Node<V>;
    fn deref(&self) -> &Node<V> {
        match self {
            NodeView::Dirty(node) => node,
            NodeView::Committed(node) => node,
        }
    }
}

/// The node in `slot`: borrowed when in memory, loaded when committed.
fn view<'a, V: Value>(src: &dyn NodeSource, slot: &'a Slot<V>, pos: NodePos) -> Result<NodeView<'a, V>> {
    Ok(match slot {
        Slot::Dirty(node) => NodeView::Dirty(node),
        Slot::Stored(at) => NodeView::Committed(load_node(src, *at, pos)?),
    })
}

fn child_pos(pos: NodePos, d: u8) -> NodePos {
    NodePos { depth: pos.depth + 1, prefix: pos.prefix | (u64::from(d) << (pos.depth * BITS)) }
}

/// A node for `entries` at `pos`, split into inner nodes as far as `leaf_max` requires.
fn build<V>(entries: BTreeMap<u64, V>, pos: NodePos, leaf_max: usize) -> Node<V> {
    if entries.len() <= leaf_max || pos.depth >= MAX_DEPTH {
        return Node::Leaf(entries);
    }
    let mut groups: BTreeMap<u8, BTreeMap<u64, V>> = BTreeMap::new();
    for (k, v) in entries {
        groups.entry(digit(k, pos.depth)).or_default().insert(k, v);
    }
    Node::Inner(
        groups.into_iter().map(|(d, g)| (d, Slot::Dirty(Box::new(build(g, child_pos(pos, d), leaf_max))))).collect(),
    )
}

impl<V: Value> Trie<V> {
    const ROOT: NodePos = NodePos { depth: 0, prefix: 0 };

    pub fn empty(leaf_max: usize) -> Self {
        Self { root: None, leaf_max: leaf_max.max(1) }
    }

    /// The tree whose root node is at `root`.
    pub fn open(root: Loc, leaf_max: usize) -> Self {
        Self { root: Some(Slot::Stored(root)), leaf_max: leaf_max.max(1) }
    }

    /// Whether the tree has changes not yet committed.
    pub fn is_dirty(&self) -> bool {
        matches!(self.root, Some(Slot::Dirty(_)))
    }

    pub fn get(&self, src: &dyn NodeSource, key: u64) -> Result<Option<V>> {
        match &self.root {
            None => Ok(None),
            Some(root) => Self::get_in(src, root, key, Self::ROOT),
        }
    }

    fn get_in(src: &dyn NodeSource, slot: &Slot<V>, key: u64, pos: NodePos) -> Result<Option<V>> {
        match &*view(src, slot, pos)? {
            Node::Leaf(entries) => Ok(entries.get(&key).cloned()),
            Node::Inner(children) => {
                let d = digit(key, pos.depth);
                match children.get(&d) {
                    None => Ok(None),
                    Some(child) => Self::get_in(src, child, key, child_pos(pos, d)),
                }
            }
        }
    }

    /// Makes the node in `slot` editable, loading it if it is committed.
    fn dirty<'a>(src: &dyn NodeSource, slot: &'a mut Slot<V>, pos: NodePos) -> Result<&'a mut Node<V>> {
        if let Slot::Stored(at) = slot {
            *slot = Slot::Dirty(Box::new(Arc::unwrap_or_clone(load_node(src, *at, pos)?)));
        }
        match slot {
            Slot::Dirty(node) => Ok(node),
            Slot::Stored(_) => unreachable!("replaced just above"),
        }
    }

    pub fn insert(&mut self, src: &dyn NodeSource, key: u64, value: V) -> Result<Option<V>> {
        let leaf_max = self.leaf_max;
        let mut slot = self.root.get_or_insert_with(|| Slot::Dirty(Box::new(Node::Leaf(BTreeMap::new()))));
        let mut pos = Self::ROOT;
        loop {
            let node = Self::dirty(src, slot, pos)?;
            if let Node::Leaf(entries) = node {
                let old = entries.insert(key, value);
                if entries.len() > leaf_max {
                    *node = build(std::mem::take(entries), pos, leaf_max);
                }
                return Ok(old);
            }
            let Node::Inner(children) = node else { unreachable!("leaf handled above") };
            let d = digit(key, pos.depth);
            slot = children.entry(d).or_insert_with(|| Slot::Dirty(Box::new(Node::Leaf(BTreeMap::new()))));
            pos = child_pos(pos, d);
        }
    }

    pub fn remove(&mut self, src: &dyn NodeSource, key: u64) -> Result<Option<V>> {
        // A miss must not rewrite the path.
        if self.get(src, key)?.is_none() {
            return Ok(None);
        }
        let Some(root) = self.root.as_mut() else { return Ok(None) };
        let (old, now_empty) = Self::remove_in(src, root, key, Self::ROOT)?;
        if now_empty {
            self.root = None;
        }
        Ok(old)
    }

    fn remove_in(src: &dyn NodeSource, slot: &mut Slot<V>, key: u64, pos: NodePos) -> Result<(Option<V>, bool)> {
        match Self::dirty(src, slot, pos)? {
            Node::Leaf(entries) => {
                let old = entries.remove(&key);
                Ok((old, entries.is_empty()))
            }
            Node::Inner(children) => {
                let d = digit(key, pos.depth);
                let Some(child) = children.get_mut(&d) else { return Ok((None, false)) };
                let (old, child_empty) = Self::remove_in(src, child, key, child_pos(pos, d))?;
                if child_empty {
                    children.remove(&d);
                }
                Ok((old, children.is_empty()))
            }
        }
    }

    /// The keys whose values differ between this tree and `other` (held by one only, or
    /// unequal), in ascending order. Subtrees both share (the same stored node) are skipped,
    /// so the cost grows with the difference, not with the trees.
    pub fn changed_keys(&self, other: &Self, src: &dyn NodeSource) -> Result<Vec<u64>>
    where
        V: PartialEq,
    {
        let mut out = Vec::new();
        Self::diff(src, self.root.as_ref(), other.root.as_ref(), Self::ROOT, &mut out)?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn diff(
        src: &dyn NodeSource,
        a: Option<&Slot<V>>,
        b: Option<&Slot<V>>,
        pos: NodePos,
        out: &mut Vec<u64>,
    ) -> Result<()>
    where
        V: PartialEq,
    {
        if let (Some(Slot::Stored(x)), Some(Slot::Stored(y))) = (a, b)
            && x == y
        {
            return Ok(());
        }
        let a = a.map(|slot| view(src, slot, pos)).transpose()?;
        let b = b.map(|slot| view(src, slot, pos)).transpose()?;
        if let (Some(Node::Inner(left)), Some(Node::Inner(right))) = (a.as_deref(), b.as_deref()) {
            let digits: std::collections::BTreeSet<&u8> = left.keys().chain(right.keys()).collect();
            for d in digits {
                Self::diff(src, left.get(d), right.get(d), child_pos(pos, *d), out)?;
            }
            return Ok(());
        }
        // A leaf against anything: compare the entries under each side.
        let under = |node: Option<&Node<V>>| -> Result<BTreeMap<u64, V>> {
            let mut entries = Vec::new();
            match node {
                None => {}
                Some(Node::Leaf(leaf)) => entries.extend(leaf.iter().map(|(k, v)| (*k, v.clone()))),
                Some(Node::Inner(children)) => {
                    for (d, child) in children {
                        Self::collect(src, child, child_pos(pos, *d), &mut entries)?;
                    }
                }
            }
            Ok(entries.into_iter().collect())
        };
        let (left, right) = (under(a.as_deref())?, under(b.as_deref())?);
        out.extend(left.keys().chain(right.keys()).filter(|k| left.get(k) != right.get(k)));
        Ok(())
    }

    /// Every entry, in tree order (by key digits, lowest digit first).
    pub fn entries(&self, src: &dyn NodeSource) -> Result<Vec<(u64, V)>> {
        let mut out = Vec::new();
        if let Some(root) = &self.root {
            Self::collect(src, root, Self::ROOT, &mut out)?;
        }
        Ok(out)
    }

    fn collect(src: &dyn NodeSource, slot: &Slot<V>, pos: NodePos, out: &mut Vec<(u64, V)>) -> Result<()> {
        match &*view(src, slot, pos)? {
            Node::Leaf(entries) => out.extend(entries.iter().map(|(k, v)| (*k, v.clone()))),
            Node::Inner(children) => {
                for (d, child) in children {
                    Self::collect(src, child, child_pos(pos, *d), out)?;
                }
            }
        }
        Ok(())
    }

    /// Writes every changed node to `sink`, children first. The tree is unchanged until
    /// `committed` names the record.
    pub fn commit(&self, sink: &mut dyn NodeSink) -> Result<Written> {
        let mut placed = Vec::new();
        let root = self.root.as_ref().map(|root| Self::commit_slot(root, Self::ROOT, sink, &mut placed)).transpose()?;
        Ok(Written { root, placed })
    }

    fn commit_slot(
        slot: &Slot<V>,
        pos: NodePos,
        sink: &mut dyn NodeSink,
        placed: &mut Vec<(SubIdx, usize)>,
    ) -> Result<Ref> {
        let node = match slot {
            Slot::Stored(at) => return Ok(Ref::At(at.record, at.idx)),
            Slot::Dirty(node) => node,
        };
        let stored = match &**node {
            Node::Leaf(entries) => StoredNode::Leaf(entries.iter().map(|(k, v)| (*k, v.clone())).collect()),
            Node::Inner(children) => StoredNode::Inner(
                children
                    .iter()
                    .map(|(d, child)| Ok((*d, Self::commit_slot(child, child_pos(pos, *d), sink, placed)?)))
                    .collect::<Result<_>>()?,
            ),
        };
        let plaintext = codec::encode(&stored);
        let weight = plaintext.len();
        let idx = sink.push(pos, plaintext)?;
        placed.push((idx, weight));
        Ok(Ref::Here(idx))
    }

    /// Records that the commit `written` is stored as `record`: the changed nodes leave the
    /// tree, which reads them back from there, and go to `src` decoded, as loading them would
    /// have left them (the next change to the same file reads the same path again).
    pub fn committed(&mut self, written: Written, record: RecordHash, src: &dyn NodeSource) {
        let mut placed = written.placed.into_iter();
        if let Some(root) = self.root.as_mut() {
            Self::settle(root, Self::ROOT, record, &mut placed, src);
        }
        debug_assert!(placed.next().is_none(), "one place for every node written");
    }

    /// `committed` for the subtree in `slot`, children first, as `commit_slot` wrote them.
    fn settle(
        slot: &mut Slot<V>,
        pos: NodePos,
        record: RecordHash,
        placed: &mut impl Iterator<Item = (SubIdx, usize)>,
        src: &dyn NodeSource,
    ) {
        let Slot::Dirty(node) = slot else { return };
        match &mut **node {
            Node::Inner(children) => {
                for (d, child) in children.iter_mut() {
                    Self::settle(child, child_pos(pos, *d), record, placed, src);
                }
            }
            Node::Leaf(entries) => entries.values_mut().for_each(|v| v.resolve(record)),
        }
        let (idx, weight) = placed.next().expect("commit_slot placed every node it wrote");
        let at = Loc { record, idx };
        if let Slot::Dirty(node) = std::mem::replace(slot, Slot::Stored(at)) {
            src.keep_decoded(at, pos, Arc::new(*node), weight);
        }
    }
}

/// A commit's nodes as written to a sink: the root's ref (None for an empty tree) and each
/// node's index and size, in the order written.
pub struct Written {
    root: Option<Ref>,
    placed: Vec<(SubIdx, usize)>,
}

impl Written {
    pub fn root(&self) -> Option<Ref> {
        self.root
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// Committed nodes by location, and a counter standing in for record hashes.
    #[derive(Default)]
    struct Mem {
        nodes: RefCell<HashMap<Loc, Vec<u8>>>,
        records: RefCell<u8>,
    }

    impl NodeSource for Mem {
        fn load(&self, at: Loc, _pos: NodePos) -> Result<Arc<Vec<u8>>> {
            self.nodes
                .borrow()
                .get(&at)
                .cloned()
                .map(Arc::new)
                .ok_or(Error::from(VerifyError::MissingSubRecord { record: at.record, idx: at.idx }))
        }
    }

    struct Batch(Vec<Vec<u8>>);

    impl NodeSink for Batch {
        fn push(&mut self, _pos: NodePos, plaintext: Vec<u8>) -> Result<SubIdx> {
            self.0.push(plaintext);
            Ok(SubIdx(self.0.len() as u32 - 1))
        }
    }

    impl Mem {
        /// Commits `t` as a new record; returns how many nodes it wrote.
        fn commit<V: Value>(&self, t: &mut Trie<V>) -> usize {
            self.commit_keeping(t, self)
        }

        /// `commit`, handing the nodes written to `keep` decoded.
        fn commit_keeping<V: Value>(&self, t: &mut Trie<V>, keep: &dyn NodeSource) -> usize {
            let mut batch = Batch(Vec::new());
            let written = t.commit(&mut batch).unwrap();
            let record = {
                let mut n = self.records.borrow_mut();
                *n += 1;
                RecordHash::from_bytes([*n; 32])
            };
            let count = batch.0.len();
            for (i, bytes) in batch.0.into_iter().enumerate() {
                self.nodes.borrow_mut().insert(Loc { record, idx: SubIdx(i as u32) }, bytes);
            }
            t.committed(written, record, keep);
            count
        }
    }

    /// A `Mem` that also keeps decoded nodes, counting the loads that miss them.
    #[derive(Default)]
    struct Kept {
        mem: Mem,
        decoded: RefCell<HashMap<Loc, DecodedNode>>,
        loads: RefCell<usize>,
    }

    impl NodeSource for Kept {
        fn load(&self, at: Loc, pos: NodePos) -> Result<Arc<Vec<u8>>> {
            *self.loads.borrow_mut() += 1;
            self.mem.load(at, pos)
        }

        fn decoded(&self, at: Loc, _pos: NodePos) -> Option<DecodedNode> {
            self.decoded.borrow().get(&at).cloned()
        }

        fn keep_decoded(&self, at: Loc, _pos: NodePos, node: DecodedNode, _weight: usize) {
            self.decoded.borrow_mut().insert(at, node);
        }
    }

    /// A value that points into a record, as an inode points at its chunk map.
    #[derive(Clone, Debug, PartialEq, BorshSerialize, BorshDeserialize)]
    struct Pointer(Ref);

    impl Value for Pointer {
        fn resolve(&mut self, base: RecordHash) {
            self.0.resolve_in_place(base);
        }
    }

    #[test]
    fn committed_nodes_are_kept_as_loading_them_would_decode_them() {
        let kept = Kept::default();
        let mut t: Trie<Pointer> = Trie::empty(4);
        for k in 0..500u64 {
            t.insert(&kept, k, Pointer(Ref::Here(SubIdx(k as u32)))).unwrap();
        }
        kept.mem.commit_keeping(&mut t, &kept);
        let record = RecordHash::from_bytes([1; 32]);
        for k in [0u64, 7, 499] {
            assert_eq!(t.get(&kept, k).unwrap(), Some(Pointer(Ref::At(record, SubIdx(k as u32)))));
        }
        assert_eq!(*kept.loads.borrow(), 0, "every node of the commit was kept decoded");
        assert_eq!(t.entries(&kept).unwrap(), t.entries(&kept.mem).unwrap(), "kept and loaded nodes agree");
    }

    #[test]
    fn dense_keys_split_and_survive_commits() {
        let mem = Mem::default();
        let mut t: Trie<u32> = Trie::empty(8);
        for k in 0..1000u64 {
            t.insert(&mem, k, k as u32 * 3).unwrap();
        }
        mem.commit(&mut t);
        assert!(!t.is_dirty());
        for k in [0u64, 1, 63, 64, 999] {
            assert_eq!(t.get(&mem, k).unwrap(), Some(k as u32 * 3));
        }
        assert_eq!(t.get(&mem, 1000).unwrap(), None);
        assert_eq!(t.entries(&mem).unwrap().len(), 1000);
    }

    #[test]
    fn one_change_rewrites_only_its_path() {
        let mem = Mem::default();
        let mut t: Trie<u64> = Trie::empty(16);
        for k in 0..100_000u64 {
            t.insert(&mem, k, k).unwrap();
        }
        let all = mem.commit(&mut t);
        assert!(all > 6000, "{all} nodes for 100k entries");
        t.insert(&mem, 4242, 0).unwrap();
        let written = mem.commit(&mut t);
        // 100k keys in leaves of <= 16: 16^3 inner nodes hold ~24 keys each, one more split.
        assert_eq!(written, 5, "root, three inner nodes and a leaf rewritten for one key");
        let reopened: Trie<u64> =
            Trie::open(Loc { record: RecordHash::from_bytes([2; 32]), idx: SubIdx(written as u32 - 1) }, 16);
        assert_eq!(reopened.get(&mem, 4242).unwrap(), Some(0));
        assert_eq!(reopened.get(&mem, 4243).unwrap(), Some(4243));
        t.remove(&mem, 77_777).unwrap();
        assert!(mem.commit(&mut t) <= 5, "a removal rewrites at most its path");
        assert_eq!(t.remove(&mem, 77_777).unwrap(), None);
        assert!(!t.is_dirty(), "a miss rewrites nothing");
    }

    #[test]
    fn sparse_keys_work_at_every_depth() {
        let mem = Mem::default();
        let mut t: Trie<u8> = Trie::empty(1);
        let keys = [0u64, u64::MAX, 1 << 63, (1 << 63) | 1, 1 << 60, 12345];
        for k in keys {
            t.insert(&mem, k, 1).unwrap();
        }
        mem.commit(&mut t);
        for k in keys {
            assert_eq!(t.get(&mem, k).unwrap(), Some(1), "{k:#x}");
        }
        for k in keys {
            t.remove(&mem, k).unwrap();
        }
        assert!(t.entries(&mem).unwrap().is_empty());
        mem.commit(&mut t);
        assert_eq!(t.get(&mem, 0).unwrap(), None);
    }

    #[test]
    fn a_node_referenced_from_the_wrong_place_is_refused() {
        let mem = Mem::default();
        let mut t: Trie<u8> = Trie::empty(2);
        for k in 0..64u64 {
            t.insert(&mem, k, 0).unwrap();
        }
        mem.commit(&mut t);
        // Swap two leaves of the root's children: keys no longer match their position.
        let record = RecordHash::from_bytes([1; 32]);
        let (a, b) = (Loc { record, idx: SubIdx(0) }, Loc { record, idx: SubIdx(1) });
        let mut nodes = mem.nodes.borrow_mut();
        let (na, nb) = (nodes[&a].clone(), nodes[&b].clone());
        nodes.insert(a, nb);
        nodes.insert(b, na);
        drop(nodes);
        let err = t.get(&mem, 0).unwrap_err();
        assert!(matches!(err, Error::Verify(VerifyError::MisplacedNode { .. })), "{err:?}");
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u16),
        Remove(u64),
        Commit,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small key space for collisions, plus a few wide keys.
        let key = prop_oneof![0u64..300, any::<u64>()];
        prop_oneof![
            4 => (key.clone(), any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => key.prop_map(Op::Remove),
            1 => Just(Op::Commit),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_btreemap(ops in proptest::collection::vec(op(), 1..300), leaf_max in 1usize..6) {
            let mem = Mem::default();
            let mut t: Trie<u16> = Trie::empty(leaf_max);
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(t.insert(&mem, k, v).unwrap(), model.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(t.remove(&mem, k).unwrap(), model.remove(&k)),
                    Op::Commit => { mem.commit(&mut t); }
                }
            }
            mem.commit(&mut t);
            let mut got = t.entries(&mem).unwrap();
            got.sort();
            prop_assert_eq!(got, model.clone().into_iter().collect::<Vec<_>>());
            for (k, v) in &model {
                prop_assert_eq!(t.get(&mem, *k).unwrap(), Some(*v));
            }
        }

        /// A committed version and a later one (committed in between or not): the changed keys
        /// are exactly those the two models disagree on, either way round.
        #[test]
        fn changed_keys_are_what_two_versions_disagree_on(
            first in proptest::collection::vec(op(), 0..200),
            then in proptest::collection::vec(op(), 0..60),
            leaf_max in 1usize..6,
        ) {
            let mem = Mem::default();
            let apply = |t: &mut Trie<u16>, model: &mut BTreeMap<u64, u16>, op: &Op| match op {
                Op::Insert(k, v) => { t.insert(&mem, *k, *v).unwrap(); model.insert(*k, *v); }
                Op::Remove(k) => { t.remove(&mem, *k).unwrap(); model.remove(k); }
                Op::Commit => { mem.commit(t); }
            };
            let (mut t, mut model) = (Trie::empty(leaf_max), BTreeMap::new());
            first.iter().for_each(|op| apply(&mut t, &mut model, op));
            mem.commit(&mut t);
            let (before, before_model) = (t.clone(), model.clone());
            then.iter().for_each(|op| apply(&mut t, &mut model, op));
            let mut want: Vec<u64> =
                before_model.keys().chain(model.keys()).filter(|k| before_model.get(k) != model.get(k)).copied().collect();
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(before.changed_keys(&t, &mem).unwrap(), want.clone());
            prop_assert_eq!(t.changed_keys(&before, &mem).unwrap(), want);
        }
    }
}
