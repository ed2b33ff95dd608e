//! The three-way merge of two filesystem branches from their common state, computed alike on
//! every machine: it reads only stored, proven values and decides by fixed rules, so two
//! machines holding the same heads show the same tree, with the same conflict names and inode
//! numbers, and neither has to commit the merge for the other to see it.
//!
//! Rules (the *winner* is the later head in hash order, the *loser* the other):
//! - An inode changed on one side takes that side's value. Changed on both: attributes merge
//!   field by field (a field changed on one side only takes that change; times changed on
//!   both take the later); a file's contents changed on both keep the winner's in place and
//!   the loser's as a conflict copy beside it. A deleted inode changed on the other side stays.
//! - A directory's names merge the same way, one name at a time. Added on both sides for
//!   different inodes: the winner's keeps the name, the loser's gets a conflict name. A name
//!   one side removed or replaced, deleting what it named, stays (or, replaced, moves to a
//!   conflict name) when the other side changed anything under it; a side that kept the inode
//!   moved it or unlinked one of its names, and a file that would end with no name gets one
//!   back. A directory renamed on one side and written on the other keeps both, since names
//!   point at inodes; one moved to two places, or two moved into each other, keeps the
//!   winner's move. A file moved to two places keeps the winner's move too (two renames are
//!   no hard link); a name added on a side that kept the old one is a link, and stays. A name
//!   never outlives its inode: one side's name for an inode the other side deleted keeps it.
//! - Conflict names are `stem.conflict-<writer8>-<record8>.ext`, from the record that last
//!   changed the losing version; conflict copies are numbered by `conflict_copy_ino`.
//! - Link counts are counted again from the names the merge decided.
//!
//! This module sits above `state`: it reads states and makes one, and `state` knows nothing
//! of merging. `of_heads` folds the merges of several heads; `inodes` merges one inode's
//! attributes, `names` one directory's names, `moves` settles folders and files moved on both
//! sides, `links` counts links again, and `conflicts` places conflict copies and names them.

mod conflicts;
mod inodes;
mod links;
mod moves;
mod names;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use super::heads;
use super::node::{Bucket, DirEntry, Inode, Kind, name_key};
use super::sealed::Sealed;
use super::state::State;
use super::trie::{NodeSource, Trie};
use crate::Result;
use crate::crypto::aead::SealedKind;
use crate::record::RecordHash;

/// The state holding every one of `heads`: none for no heads, a commit's own for one,
/// and for more, their merge, folded in hash order (each later head wins the conflicts
/// against the merge of those before it), from the merge of their common commits.
pub fn of_heads(sealed: &Sealed, heads: &[RecordHash]) -> Result<State> {
    let mut sorted = heads.to_vec();
    sorted.sort();
    sorted.dedup();
    let Some((&first, rest)) = sorted.split_first() else { return Ok(State::empty()) };
    let mut state = State::committed(sealed, first)?;
    let mut merged = vec![first];
    for &head in rest {
        let bases = heads::merge_bases(&sealed.capsule, &merged, head)?;
        let base = of_heads(sealed, &bases)?;
        state = three_way(sealed, &base, &state, &State::committed(sealed, head)?)?;
        merged.push(head);
    }
    Ok(state)
}

/// The merge of `loser` and `winner`, both descended from `base`.
pub fn three_way(sealed: &Sealed, base: &State, loser: &State, winner: &State) -> Result<State> {
    let table = sealed.tree(SealedKind::InodeTable, 0);
    let mut changed: [BTreeSet<u64>; 2] = [
        base.inodes.changed_keys(&loser.inodes, &table)?.into_iter().collect(),
        base.inodes.changed_keys(&winner.inodes, &table)?.into_iter().collect(),
    ];
    // A folder changed in memory (by a merge not committed: the state so far of a fold of
    // several heads, or a merge of merge bases) is no change to the inode table: its names
    // are merged one by one like those of any folder a side changed.
    for (i, side) in [loser, winner].into_iter().enumerate() {
        changed[i].extend(side.dirs.keys().chain(base.dirs.keys()));
    }
    let mut out = winner.clone();
    for (&range, &n) in &loser.allocated {
        let last = out.allocated.entry(range).or_default();
        *last = (*last).max(n);
    }
    let merge = Merge {
        sealed,
        base,
        sides: [loser, winner],
        changed,
        out,
        from: HashMap::new(),
        links: HashMap::new(),
        copies: Vec::new(),
        merged_dirs: HashSet::new(),
        moves: Vec::new(),
        left: HashMap::new(),
        file_names: Vec::new(),
        unnamed: [HashSet::new(), HashSet::new()],
        fresh_copies: HashSet::new(),
        revive: Vec::new(),
    };
    merge.run()
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Side {
    Loser = 0,
    Winner = 1,
}

const SIDES: [Side; 2] = [Side::Loser, Side::Winner];

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Loser => Side::Winner,
            Side::Winner => Side::Loser,
        }
    }
}

struct Merge<'a> {
    sealed: &'a Sealed,
    base: &'a State,
    sides: [&'a State; 2],
    /// Per side, the inodes whose entries differ from the base's.
    changed: [BTreeSet<u64>; 2],
    out: State,
    /// The side whose value an inode took, where it is not the winner's.
    from: HashMap<u64, Side>,
    /// Per (folder, side): subfolders the merge ends with less those that side has.
    links: HashMap<(u64, Side), i64>,
    /// Files whose contents both sides changed: the loser's version, to place beside them.
    copies: Vec<(u64, Inode)>,
    merged_dirs: HashSet<u64>,
    /// Folders the merge gave a name they had not in the base: (folder, parent, name, whether
    /// the name is the winner's). Two sides may move one folder to two places, or into each
    /// other; `settle_moves` undoes the loser's move then.
    moves: Vec<(u64, u64, Vec<u8>, bool)>,
    /// Where a moved folder's base name was: (parent, name).
    left: HashMap<u64, (u64, Vec<u8>)>,
    /// Names a file got in the merge that it had not in the base: (file, folder, name,
    /// whether the name is the winner's).
    file_names: Vec<(u64, u64, Vec<u8>, bool)>,
    /// Per side, files that side took a base name from.
    unnamed: [HashSet<u64>; 2],
    /// Conflict copies this merge made: their names are all in folders it touched.
    fresh_copies: HashSet<u64>,
    /// Names one side unlinked of a file the other changed: (folder, entry).
    revive: Vec<(u64, DirEntry)>,
}

/// A name's entry in one version of its directory.
type Entry = Option<DirEntry>;

impl Merge<'_> {
    fn run(mut self) -> Result<State> {
        let inos: BTreeSet<u64> = self.changed[0].union(&self.changed[1]).copied().collect();
        for &ino in &inos {
            self.merge_inode(ino)?;
        }
        let mut dirs: VecDeque<u64> = inos.iter().copied().collect();
        while let Some(ino) = dirs.pop_front() {
            if self.merged_dirs.contains(&ino) {
                continue;
            }
            if let Some(inode) = self.out.inode(self.sealed, ino)?
                && inode.kind == Kind::Dir
            {
                self.merged_dirs.insert(ino);
                dirs.extend(self.merge_dir(ino)?);
            }
        }
        self.settle_moves()?;
        self.settle_file_moves()?;
        self.place_copies()?;
        for ino in inos {
            self.count_gone_names(ino)?;
        }
        self.count_links()?;
        self.recount_file_links()?;
        self.revive_nameless()?;
        Ok(self.out)
    }

    fn side(&self, side: Side) -> &State {
        self.sides[side as usize]
    }

    fn put(&mut self, ino: u64, inode: Inode) -> Result<()> {
        self.out.inodes.insert(&self.sealed.tree(SealedKind::InodeTable, 0), ino, inode)?;
        Ok(())
    }

    /// Makes `ino` what `side` has (or nothing), with its directory tree if that side
    /// changed it in memory.
    fn take(&mut self, ino: u64, side: Side, value: Option<Inode>) -> Result<()> {
        self.from.insert(ino, side);
        self.out.dirs.remove(&ino);
        match value {
            None => {
                self.out.inodes.remove(&self.sealed.tree(SealedKind::InodeTable, 0), ino)?;
            }
            Some(inode) => {
                if let Some(tree) = self.side(side).dirs.get(&ino) {
                    self.out.dirs.insert(ino, tree.clone());
                }
                self.put(ino, inode)?;
            }
        }
        Ok(())
    }
}

fn insert_entry(tree: &mut Trie<Bucket>, src: &dyn NodeSource, entry: DirEntry) -> Result<()> {
    let key = name_key(&entry.name);
    let mut bucket = tree.get(src, key)?.unwrap_or_default();
    bucket.0.retain(|e| e.name != entry.name);
    bucket.0.push(entry);
    bucket.0.sort_by(|a, b| a.name.cmp(&b.name));
    tree.insert(src, key, bucket)?;
    Ok(())
}

fn lookup(tree: &Trie<Bucket>, src: &dyn NodeSource, name: &[u8]) -> Result<Entry> {
    Ok(tree.get(src, name_key(name))?.and_then(|b| b.0.into_iter().find(|e| e.name == name)))
}
