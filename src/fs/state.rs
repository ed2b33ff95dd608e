//! A filesystem state: one commit's, or one that `merge` made of several (the deterministic
//! merge of branches that writers or devices made apart, computed alike by every machine that
//! holds the same heads). `merge` builds on this module, never the other way round.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use super::node::{Bucket, Inode, Superblock};
use super::sealed::Sealed;
use super::trie::{Loc, Ref, Trie, Value};
use crate::crypto::aead::SealedKind;
use crate::record::{RecordHash, RecordKind, SubIdx};
use crate::{Error, Result, VerifyError};

/// An inode encodes to about 160 bytes, so a full leaf of 16 already weighs as much as four
/// inner nodes: leaves split before they are most of the path a change rewrites.
pub const INODE_LEAF: usize = 16;
pub const DIR_LEAF: usize = 64;
pub const CHUNK_LEAF: usize = 128;

/// An inode table, the directory trees changed in memory (by a merge not yet committed), and
/// the last inode number handed out per range (see `node::inode_range`).
#[derive(Clone)]
pub struct State {
    pub inodes: Trie<Inode>,
    pub dirs: HashMap<u64, Trie<Bucket>>,
    pub allocated: BTreeMap<u32, u32>,
}

/// A tree as committed at `root` (cheap: nothing is read until used).
pub fn committed_tree<V: Value>(root: Option<Ref>, leaf_max: usize) -> Trie<V> {
    match root {
        // Values loaded from a committed leaf have absolute refs; `Here` never reaches this.
        Some(Ref::At(record, idx)) => Trie::open(Loc { record, idx }, leaf_max),
        Some(Ref::Here(_)) | None => Trie::empty(leaf_max),
    }
}

/// The tree of `ino` (whose inode is `inode`) as it stands: changed in `overlay`, or as
/// committed.
pub fn current_tree<'a, V: Value>(
    overlay: &'a HashMap<u64, Trie<V>>,
    ino: u64,
    inode: &Inode,
    leaf_max: usize,
) -> Cow<'a, Trie<V>> {
    match overlay.get(&ino) {
        Some(tree) => Cow::Borrowed(tree),
        None => Cow::Owned(committed_tree(inode.content, leaf_max)),
    }
}

impl State {
    /// No inodes at all: what two branches that each made their own first commit share.
    pub fn empty() -> Self {
        Self { inodes: Trie::empty(INODE_LEAF), dirs: HashMap::new(), allocated: BTreeMap::new() }
    }

    /// The state commit `record` holds, from its superblock.
    pub fn committed(sealed: &Sealed, record: RecordHash) -> Result<Self> {
        let header = sealed.capsule.proven_header(record)?;
        let last = match header.kind {
            RecordKind::FsCommit => header.sub_count.checked_sub(1),
            RecordKind::Data | RecordKind::Membership => None,
        }
        .ok_or_else(|| {
            Error::NotFound(format!("{record:?} as a filesystem commit (it is a {:?} record)", header.kind))
        })?;
        let at = Loc { record, idx: SubIdx(last) };
        let bytes = sealed.read(at, &sealed.place(SealedKind::Superblock, 0, 0, 0))?;
        let sb = Superblock::decode(&bytes).map_err(|source| VerifyError::MalformedSubRecord {
            record,
            idx: at.idx,
            source,
        })?;
        let inodes = match sb.inodes {
            Some(r) => Trie::open(r.resolve(record), INODE_LEAF),
            None => Trie::empty(INODE_LEAF),
        };
        Ok(Self { inodes, dirs: HashMap::new(), allocated: sb.allocated.into_iter().collect() })
    }

    pub fn inode(&self, sealed: &Sealed, ino: u64) -> Result<Option<Inode>> {
        self.inodes.get(&sealed.tree(SealedKind::InodeTable, 0), ino)
    }

    /// The entry tree of directory `ino` (whose inode is `inode`): changed in memory, or
    /// as committed.
    pub fn dir_tree(&self, ino: u64, inode: &Inode) -> Cow<'_, Trie<Bucket>> {
        current_tree(&self.dirs, ino, inode, DIR_LEAF)
    }
}
