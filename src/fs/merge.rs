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

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use super::node::{Bucket, DirEntry, Inode, Kind, ROOT_INO, Time, conflict_copy_ino, name_key};
use super::sealed::Sealed;
use super::state::{DIR_LEAF, State};
use super::trie::{NodeSource, Ref, Trie};
use crate::Result;
use crate::crypto::aead::SealedKind;
use crate::record::RecordHash;

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

/// What the merge makes of one name.
struct Decision {
    /// The entry the name ends with.
    entry: Entry,
    /// An entry that moves to a conflict name.
    moved: Option<DirEntry>,
    /// (side, inode) of a name kept because that side changed something under it.
    kept: Option<(Side, u64)>,
    /// A file's name to give back if the file ends with no name (`revive_nameless`).
    revive: Option<DirEntry>,
}

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

    fn merge_inode(&mut self, ino: u64) -> Result<()> {
        let [in_loser, in_winner] = [0, 1].map(|s| self.changed[s].contains(&ino));
        let loser = self.side(Side::Loser).inode(self.sealed, ino)?;
        if !in_winner {
            return self.take(ino, Side::Loser, loser);
        }
        if !in_loser {
            return Ok(()); // the winner's, already in place
        }
        let winner = self.side(Side::Winner).inode(self.sealed, ino)?;
        match (loser, winner) {
            // A delete against a change keeps the change.
            (Some(l), None) => self.take(ino, Side::Loser, Some(l)),
            (Some(l), Some(w)) if l != w => {
                let base = self.base.inode(self.sealed, ino)?;
                let (merged, conflict) = merge_attributes(base.as_ref(), &l, &w);
                if conflict {
                    self.copies.push((ino, l));
                }
                self.put(ino, merged)
            }
            _ => Ok(()),
        }
    }

    /// Merges the names of directory `ino`. Returns directories it brought back, whose own
    /// names are merged next.
    fn merge_dir(&mut self, ino: u64) -> Result<Vec<u64>> {
        let sealed = self.sealed;
        let src = sealed.tree(SealedKind::Directory, ino);
        let tree_in = |state: &State| -> Result<Trie<Bucket>> {
            Ok(match state.inode(sealed, ino)? {
                Some(inode) if inode.kind == Kind::Dir => state.dir_tree(ino, &inode).into_owned(),
                _ => Trie::empty(DIR_LEAF),
            })
        };
        let base = tree_in(self.base)?;
        let sides = [tree_in(self.sides[0])?, tree_in(self.sides[1])?];
        let mut keys = BTreeSet::new();
        for tree in &sides {
            keys.extend(base.changed_keys(tree, &src)?);
        }
        let mut tree = tree_in(&self.out)?;
        let mut edited = false;
        let mut renamed = Vec::new();
        let mut restored = Vec::new();
        for key in keys {
            let bucket = |t: &Trie<Bucket>| -> Result<Bucket> { Ok(t.get(&src, key)?.unwrap_or_default()) };
            let (b, l, w) = (bucket(&base)?, bucket(&sides[0])?, bucket(&sides[1])?);
            let names: BTreeSet<&[u8]> = b.0.iter().chain(&l.0).chain(&w.0).map(|e| e.name.as_slice()).collect();
            let mut now = bucket(&tree)?;
            let mut bucket_edited = false;
            for name in names {
                let find = |bucket: &Bucket| bucket.0.iter().find(|e| e.name == name).cloned();
                let (eb, el, ew) = (find(&b), find(&l), find(&w));
                let decision = self.decide(&eb, &el, &ew)?;
                // A name kept, or moved to a conflict name, whose inode the other side deleted
                // (one side renamed a file, the other removed it) keeps its inode too: a name
                // never dangles.
                for e in decision.entry.iter().chain(&decision.moved) {
                    if self.out.inode(self.sealed, e.ino)?.is_none()
                        && let Some(side) = self.side_holding(e.ino)?
                    {
                        restored.push((side, e.ino));
                    }
                }
                self.note_move(ino, &eb, &decision.entry, decision.entry == ew);
                self.note_file_names(ino, &eb, [&el, &ew], &decision.entry);
                restored.extend(decision.kept);
                self.revive.extend(decision.revive.map(|e| (ino, e)));
                renamed.extend(decision.moved);
                self.count(ino, &decision.entry, [&el, &ew]);
                if find(&now) != decision.entry {
                    now.0.retain(|e| e.name != name);
                    now.0.extend(decision.entry);
                    bucket_edited = true;
                }
            }
            if !bucket_edited {
                continue;
            }
            edited = true;
            now.0.sort_by(|a, b| a.name.cmp(&b.name));
            if now.0.is_empty() {
                tree.remove(&src, key)?;
            } else {
                tree.insert(&src, key, now)?;
            }
        }
        // Inodes first: a moved entry is named from the version it keeps.
        let mut back = Vec::new();
        for (side, x) in restored {
            self.restore(side, x, &mut back)?;
        }
        for entry in renamed {
            let name = self.conflict_name(ino, &tree, &entry.name, self.changed_in_of(entry.ino)?)?;
            let at = [lookup(&sides[0], &src, &name)?, lookup(&sides[1], &src, &name)?];
            let entry = DirEntry { name, ..entry };
            let named = Some(entry.clone());
            self.count(ino, &named, [&at[0], &at[1]]);
            self.note_move(ino, &None, &named, false);
            insert_entry(&mut tree, &src, entry)?;
            edited = true;
        }
        if edited || self.out.dirs.contains_key(&ino) {
            self.out.dirs.insert(ino, tree);
        }
        Ok(back)
    }

    /// Notes a folder given a name in `dir` that it had not there in the base, and where
    /// a folder named in the base went from.
    fn note_move(&mut self, dir: u64, eb: &Entry, result: &Entry, winners: bool) {
        let ino_of = |e: &Entry| e.as_ref().filter(|e| e.kind == Kind::Dir).map(|e| e.ino);
        if let Some(x) = ino_of(result)
            && ino_of(eb) != Some(x)
        {
            let name = result.as_ref().map(|e| e.name.clone()).unwrap_or_default();
            self.moves.push((x, dir, name, winners));
        }
        if let Some(x) = ino_of(eb)
            && ino_of(result) != Some(x)
        {
            let name = eb.as_ref().map(|e| e.name.clone()).unwrap_or_default();
            self.left.insert(x, (dir, name));
        }
    }

    /// Notes, for `settle_file_moves`, a file named in `dir` where the base did not name it,
    /// and the files a side took this base name from.
    fn note_file_names(&mut self, dir: u64, eb: &Entry, sides: [&Entry; 2], result: &Entry) {
        if let Some(b) = eb.as_ref().filter(|b| b.kind != Kind::Dir) {
            for side in SIDES {
                if sides[side as usize].as_ref().is_none_or(|e| e.ino != b.ino) {
                    self.unnamed[side as usize].insert(b.ino);
                }
            }
        }
        if let Some(e) = result.as_ref().filter(|e| e.kind != Kind::Dir)
            && eb.as_ref().is_none_or(|b| b.ino != e.ino)
        {
            self.file_names.push((e.ino, dir, e.name.clone(), *sides[Side::Winner as usize] == *result));
        }
    }

    /// A file both sides moved (each took a base name from it and gave it a new one) keeps
    /// the winner's new names only, as a folder keeps the winner's move: two renames apart
    /// are not a hard link. A new name on a side that kept the old one (a link) stays.
    fn settle_file_moves(&mut self) -> Result<()> {
        let names = std::mem::take(&mut self.file_names);
        let moved_on_both = |x: u64| self.unnamed[0].contains(&x) && self.unnamed[1].contains(&x);
        let winners: HashSet<u64> = names.iter().filter(|n| n.3).map(|n| n.0).collect();
        let dropped: Vec<(u64, u64, Vec<u8>)> = names
            .into_iter()
            .filter(|(x, _, _, winners_name)| !winners_name && winners.contains(x) && moved_on_both(*x))
            .map(|(x, dir, name, _)| (x, dir, name))
            .collect();
        for (x, dir, name) in dropped {
            let Some(inode) = self.out.inode(self.sealed, dir)? else { continue };
            let src = self.sealed.tree(SealedKind::Directory, dir);
            let mut tree = self.out.dir_tree(dir, &inode).into_owned();
            let key = name_key(&name);
            let mut bucket = tree.get(&src, key)?.unwrap_or_default();
            bucket.0.retain(|e| !(e.name == name && e.ino == x));
            if bucket.0.is_empty() {
                tree.remove(&src, key)?;
            } else {
                tree.insert(&src, key, bucket)?;
            }
            self.out.dirs.insert(dir, tree);
        }
        Ok(())
    }

    /// A folder has one name: of two moves of one folder, the winner's stays; moves that
    /// put folders inside each other (so no path from the root reaches them) lose the
    /// loser's, which goes back to its base name.
    fn settle_moves(&mut self) -> Result<()> {
        let mut moves = std::mem::take(&mut self.moves);
        moves.sort_by_key(|m| (m.0, !m.3, m.1, m.2.clone()));
        let mut named = HashSet::new();
        let mut kept = Vec::new();
        for (x, dir, name, winners) in moves {
            if named.insert(x) {
                kept.push((x, dir, name, winners));
            } else {
                self.drop_name(dir, &name, x)?;
            }
        }
        if kept.iter().all(|m| m.3) || kept.iter().all(|m| !m.3) {
            return Ok(()); // one side's moves alone make no cycle
        }
        let reached = self.reachable_dirs()?;
        for (x, dir, name, winners) in kept {
            if winners || reached.contains(&x) {
                continue;
            }
            self.drop_name(dir, &name, x)?;
            if let Some((parent, name)) = self.left.get(&x).cloned() {
                let src = self.sealed.tree(SealedKind::Directory, parent);
                let Some(inode) = self.out.inode(self.sealed, parent)? else { continue };
                let mut tree = self.out.dir_tree(parent, &inode).into_owned();
                let name = match lookup(&tree, &src, &name)? {
                    None => name,
                    Some(_) => self.conflict_name(parent, &tree, &name, self.changed_in_of(x)?)?,
                };
                let entry = DirEntry { name, ino: x, kind: Kind::Dir };
                self.count(parent, &Some(entry.clone()), [&None, &None]);
                insert_entry(&mut tree, &src, entry)?;
                self.out.dirs.insert(parent, tree);
            }
        }
        Ok(())
    }

    /// Removes the name `name` of folder `x` from `dir`, as the merge had decided it.
    fn drop_name(&mut self, dir: u64, name: &[u8], x: u64) -> Result<()> {
        let Some(inode) = self.out.inode(self.sealed, dir)? else { return Ok(()) };
        let src = self.sealed.tree(SealedKind::Directory, dir);
        let mut tree = self.out.dir_tree(dir, &inode).into_owned();
        let key = name_key(name);
        let mut bucket = tree.get(&src, key)?.unwrap_or_default();
        bucket.0.retain(|e| !(e.name == name && e.ino == x));
        if bucket.0.is_empty() {
            tree.remove(&src, key)?;
        } else {
            tree.insert(&src, key, bucket)?;
        }
        self.out.dirs.insert(dir, tree);
        for side in SIDES {
            *self.links.entry((dir, side)).or_default() -= 1;
        }
        Ok(())
    }

    /// The folders a path from the root reaches in the merge.
    fn reachable_dirs(&self) -> Result<HashSet<u64>> {
        let mut reached = HashSet::from([ROOT_INO]);
        let mut stack = vec![ROOT_INO];
        while let Some(dir) = stack.pop() {
            let Some(inode) = self.out.inode(self.sealed, dir)? else { continue };
            let src = self.sealed.tree(SealedKind::Directory, dir);
            for (_, bucket) in self.out.dir_tree(dir, &inode).entries(&src)? {
                for e in bucket.0.into_iter().filter(|e| e.kind == Kind::Dir) {
                    if reached.insert(e.ino) {
                        stack.push(e.ino);
                    }
                }
            }
        }
        Ok(reached)
    }

    fn changed_in_of(&self, ino: u64) -> Result<RecordHash> {
        Ok(self.out.inode(self.sealed, ino)?.as_ref().map_or(NO_RECORD, changed_in))
    }

    /// What a name ends as, given its base, loser and winner entries.
    fn decide(&self, eb: &Entry, el: &Entry, ew: &Entry) -> Result<Decision> {
        if el == ew {
            return Ok(Decision { entry: el.clone(), moved: None, kept: None, revive: None });
        }
        let (mut result, mut moved, unchanged) = match (el, ew) {
            _ if el == eb => (ew.clone(), None, Some(Side::Loser)),
            _ if ew == eb => (el.clone(), None, Some(Side::Winner)),
            (Some(l), Some(w)) if l.ino != w.ino => (ew.clone(), el.clone(), None),
            (_, Some(_)) => (ew.clone(), None, None),
            (l, None) => (l.clone(), None, None),
        };
        // A name one side removed or replaced while the other changed what it named. If
        // the first side deleted the inode, the name stays (or moves to a conflict name when
        // replaced). If it kept the inode, it moved or unlinked one of its names: a folder's
        // other name stays; a file gets this name back only if it ends with none.
        let (mut kept, mut revive) = (None, None);
        if let (Some(side), Some(x)) = (unchanged, eb)
            && result.as_ref().map(|e| e.ino) != Some(x.ino)
            && self.touched(side, x.ino)?
        {
            if self.side(side.other()).inode(self.sealed, x.ino)?.is_none() {
                match result {
                    None => result = Some(x.clone()),
                    Some(_) => moved = Some(x.clone()),
                }
                kept = Some((side, x.ino));
            } else if x.kind != Kind::Dir {
                revive = Some(x.clone());
            }
        }
        Ok(Decision { entry: result, moved, kept, revive })
    }

    /// Whether `side` changed inode `ino` or anything in the tree below it (a file's names
    /// alone are no change to it).
    fn touched(&self, side: Side, ino: u64) -> Result<bool> {
        let mut stack = vec![ino];
        let state = self.side(side);
        while let Some(ino) = stack.pop() {
            let now = state.inode(self.sealed, ino)?;
            if self.changed[side as usize].contains(&ino) {
                match (&now, self.base.inode(self.sealed, ino)?) {
                    (Some(n), Some(b)) if n.kind != Kind::Dir && !edited(n, &b) => continue,
                    _ => return Ok(true),
                }
            }
            if let Some(inode) = now
                && inode.kind == Kind::Dir
            {
                let src = self.sealed.tree(SealedKind::Directory, ino);
                for (_, bucket) in state.dir_tree(ino, &inode).entries(&src)? {
                    stack.extend(bucket.0.iter().map(|e| e.ino));
                }
            }
        }
        Ok(false)
    }

    /// The side that holds inode `ino`, the loser first; None if neither does.
    fn side_holding(&self, ino: u64) -> Result<Option<Side>> {
        for side in SIDES {
            if self.side(side).inode(self.sealed, ino)?.is_some() {
                return Ok(Some(side));
            }
        }
        Ok(None)
    }

    /// Brings back inode `ino` as `side` has it when the other side deleted it; a directory
    /// brought back is queued in `back` so its names are merged too.
    fn restore(&mut self, side: Side, ino: u64, back: &mut Vec<u64>) -> Result<()> {
        if self.out.inode(self.sealed, ino)?.is_some() {
            return Ok(());
        }
        let value = self.side(side).inode(self.sealed, ino)?;
        if value.as_ref().is_some_and(|i| i.kind == Kind::Dir) {
            back.push(ino);
        }
        self.take(ino, side, value)
    }

    /// Notes, for folders' link counts, that a name in directory `dir` ends as `result` where
    /// the loser and winner have `sides`.
    fn count(&mut self, dir: u64, result: &Entry, sides: [&Entry; 2]) {
        // A folder's link count is its subfolders'; files are counted from their names
        // (`recount_file_links`).
        let subfolder = |e: &Entry| e.as_ref().is_some_and(|e| e.kind == Kind::Dir);
        for (side, entry) in SIDES.into_iter().zip(sides) {
            let delta = i64::from(subfolder(result)) - i64::from(subfolder(entry));
            if delta != 0 {
                *self.links.entry((dir, side)).or_default() += delta;
            }
        }
    }

    /// Notes, for link counts, that the names a side has in folder `ino` are gone when the
    /// merge ends without the folder (the other side removed it, and this side changed
    /// nothing under it).
    fn count_gone_names(&mut self, ino: u64) -> Result<()> {
        if self.out.inode(self.sealed, ino)?.is_some() {
            return Ok(());
        }
        let src = self.sealed.tree(SealedKind::Directory, ino);
        for side in SIDES {
            let state = self.side(side);
            let Some(inode) = state.inode(self.sealed, ino)?.filter(|i| i.kind == Kind::Dir) else { continue };
            for (_, bucket) in state.dir_tree(ino, &inode).entries(&src)? {
                for e in bucket.0 {
                    let mut none = [&None, &None];
                    let had = Some(e);
                    none[side as usize] = &had;
                    self.count(ino, &None, none);
                }
            }
        }
        Ok(())
    }

    /// Sets the link count of every folder whose subfolders the merge decided: the count of
    /// the side its value came from, moved by the subfolders that side lacks or has in excess.
    fn count_links(&mut self) -> Result<()> {
        let links: Vec<((u64, Side), i64)> = self.links.iter().map(|(k, d)| (*k, *d)).collect();
        for ((ino, side), delta) in links {
            if delta == 0 || self.from.get(&ino).copied().unwrap_or(Side::Winner) != side {
                continue;
            }
            if let Some(mut inode) = self.out.inode(self.sealed, ino)? {
                inode.nlink = u32::try_from((i64::from(inode.nlink) + delta).max(0)).unwrap_or(u32::MAX);
                self.put(ino, inode)?;
            }
        }
        Ok(())
    }

    /// Sets the link count of every file named in a folder the merge touched: the count its
    /// value had on the side it came from, less that side's names in those folders, plus the
    /// merge's own names there. Folders the merge did not touch are alike on every side, so
    /// only these are read; counting names rather than decisions holds however a name came to
    /// go (a conflict name that a merge of merge bases made, and one side never had, is no
    /// name that side removed).
    fn recount_file_links(&mut self) -> Result<()> {
        let mut touched: BTreeSet<u64> = self.merged_dirs.iter().copied().collect();
        touched.extend(self.out.dirs.keys());
        touched.extend(self.changed[0].union(&self.changed[1]));
        let mut names: [HashMap<u64, i64>; 3] = Default::default();
        for &dir in &touched {
            for (slot, state) in [self.sides[0], self.sides[1], &self.out].into_iter().enumerate() {
                let Some(inode) = state.inode(self.sealed, dir)?.filter(|i| i.kind == Kind::Dir) else { continue };
                let src = self.sealed.tree(SealedKind::Directory, dir);
                for (_, bucket) in state.dir_tree(dir, &inode).entries(&src)? {
                    for e in bucket.0.iter().filter(|e| e.kind != Kind::Dir) {
                        *names[slot].entry(e.ino).or_default() += 1;
                    }
                }
            }
        }
        let files: BTreeSet<u64> = names.iter().flat_map(|n| n.keys().copied()).collect();
        for x in files {
            let Some(mut inode) = self.out.inode(self.sealed, x)? else { continue };
            let side = if self.fresh_copies.contains(&x) {
                None
            } else {
                Some(self.from.get(&x).copied().unwrap_or(Side::Winner))
            };
            let theirs = side.map_or(0, |s| names[s as usize].get(&x).copied().unwrap_or(0));
            let ours = names[2].get(&x).copied().unwrap_or(0);
            let nlink = (i64::from(inode.nlink) - theirs + ours).max(0);
            let nlink = u32::try_from(nlink).unwrap_or(u32::MAX);
            if inode.nlink != nlink {
                inode.nlink = nlink;
                self.put(x, inode)?;
            }
        }
        Ok(())
    }

    /// Gives a file that ends with no name, while one side changed it, a name it had: each
    /// unlinked on one side, whose other names went on the other.
    fn revive_nameless(&mut self) -> Result<()> {
        for (dir, entry) in std::mem::take(&mut self.revive) {
            let Some(mut inode) = self.out.inode(self.sealed, entry.ino)? else { continue };
            let Some(dir_inode) = self.out.inode(self.sealed, dir)?.filter(|_| inode.nlink == 0) else { continue };
            let src = self.sealed.tree(SealedKind::Directory, dir);
            let mut tree = self.out.dir_tree(dir, &dir_inode).into_owned();
            let name = match lookup(&tree, &src, &entry.name)? {
                None => entry.name.clone(),
                Some(_) => self.conflict_name(dir, &tree, &entry.name, changed_in(&inode))?,
            };
            insert_entry(&mut tree, &src, DirEntry { name, ..entry.clone() })?;
            self.out.dirs.insert(dir, tree);
            inode.nlink = 1;
            self.put(entry.ino, inode)?;
        }
        Ok(())
    }

    /// Places each conflict copy beside the first name of the file it is a version of (in
    /// tree order from the root), or in the root if no name reaches it.
    fn place_copies(&mut self) -> Result<()> {
        if self.copies.is_empty() {
            return Ok(());
        }
        let wanted: HashSet<u64> = self.copies.iter().map(|(ino, _)| *ino).collect();
        let names = self.first_names(&wanted)?;
        for (ino, mut version) in std::mem::take(&mut self.copies) {
            let record = changed_in(&version);
            let copy = conflict_copy_ino(&record, ino);
            // A side that committed an earlier merge of these versions holds this copy
            // already (its number comes from the version alone): it is not made twice.
            if self.out.inode(self.sealed, copy)?.is_some() {
                continue;
            }
            if version.kind == Kind::File {
                version.sealed_as = Some(version.chunks_at(ino));
            }
            // Counted from its one name by `recount_file_links`.
            version.nlink = 0;
            self.fresh_copies.insert(copy);
            let (dir, name) = names.get(&ino).cloned().unwrap_or((ROOT_INO, b"conflict".to_vec()));
            let dir_inode = self.out.inode(self.sealed, dir)?.expect("a directory the walk listed");
            let src = self.sealed.tree(SealedKind::Directory, dir);
            let mut tree = self.out.dir_tree(dir, &dir_inode).into_owned();
            let name = self.conflict_name(dir, &tree, &name, record)?;
            insert_entry(&mut tree, &src, DirEntry { name, ino: copy, kind: version.kind })?;
            self.out.dirs.insert(dir, tree);
            self.put(copy, version)?;
        }
        Ok(())
    }

    /// The first name (directory, name) of each inode in `wanted`, walking the merged tree
    /// breadth first from the root.
    fn first_names(&self, wanted: &HashSet<u64>) -> Result<HashMap<u64, (u64, Vec<u8>)>> {
        let mut found = HashMap::new();
        let mut queue = VecDeque::from([ROOT_INO]);
        let mut seen = HashSet::new();
        while let Some(dir) = queue.pop_front() {
            if found.len() == wanted.len() || !seen.insert(dir) {
                continue;
            }
            let Some(inode) = self.out.inode(self.sealed, dir)? else { continue };
            let src = self.sealed.tree(SealedKind::Directory, dir);
            for (_, bucket) in self.out.dir_tree(dir, &inode).entries(&src)? {
                for e in bucket.0 {
                    if wanted.contains(&e.ino) {
                        found.entry(e.ino).or_insert((dir, e.name.clone()));
                    }
                    if e.kind == Kind::Dir {
                        queue.push_back(e.ino);
                    }
                }
            }
        }
        Ok(found)
    }

    /// A conflict name for `name` from `record`, the commit that last changed the version
    /// it names, unused in `tree` (directory `dir`'s).
    fn conflict_name(&self, dir: u64, tree: &Trie<Bucket>, name: &[u8], record: RecordHash) -> Result<Vec<u8>> {
        let writer = match self.sealed.capsule.record(record) {
            Ok(r) => r.header.writer.to_hex()[..8].to_owned(),
            Err(_) => "00000000".to_owned(),
        };
        let src = self.sealed.tree(SealedKind::Directory, dir);
        let tag = format!("conflict-{writer}-{}", &record.to_hex()[..8]);
        for n in 1u32.. {
            let name = conflict_name(name, &if n == 1 { tag.clone() } else { format!("{tag}-{n}") });
            if lookup(tree, &src, &name)?.is_none() {
                return Ok(name);
            }
        }
        unreachable!("some numbered name is free")
    }
}

/// Stands for the record of a value that names none (never so in a stored commit).
const NO_RECORD: RecordHash = RecordHash::from_bytes([0; 32]);

fn changed_in(inode: &Inode) -> RecordHash {
    match inode.changed_in {
        Some(Ref::At(record, _)) => record,
        _ => NO_RECORD,
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

/// `name` with `tag` put before its extension: `report.txt` → `report.<tag>.txt`, so programs
/// still open the copy; a name with no extension (or a dotfile) gets it at the end. The stem
/// is shortened, never the tag, to stay within 255 bytes.
fn conflict_name(name: &[u8], tag: &str) -> Vec<u8> {
    let dot = name.iter().rposition(|&c| c == b'.').filter(|&i| i > 0);
    let (stem, ext) = match dot {
        Some(i) if name.len() - i <= 16 => name.split_at(i),
        _ => (name, &[][..]),
    };
    let room = 255usize.saturating_sub(tag.len() + 1 + ext.len());
    let mut out = stem[..stem.len().min(room)].to_vec();
    out.push(b'.');
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(ext);
    out
}

/// A field merged three ways: the loser's when only it changed, else the winner's.
fn pick<T: PartialEq + Clone>(base: Option<&T>, loser: &T, winner: &T) -> T {
    if base == Some(winner) && base != Some(loser) { loser.clone() } else { winner.clone() }
}

/// A time merged three ways: the later when both changed.
fn pick_time(base: Option<&Time>, loser: &Time, winner: &Time) -> Time {
    if base != Some(loser) && base != Some(winner) {
        let key = |t: &Time| (t.secs, t.nanos);
        return if key(loser) > key(winner) { *loser } else { *winner };
    }
    pick(base, loser, winner)
}

/// Whether a file's inode changed in more than its names (link count, ctime, provenance).
fn edited(now: &Inode, base: &Inode) -> bool {
    contents(now) != contents(base)
        || (now.perm, now.uid, now.gid, now.mtime) != (base.perm, base.uid, base.gid, base.mtime)
        || now.xattrs != base.xattrs
}

/// What a non-directory holds: its bytes (and where they are sealed), target or device.
fn contents(i: &Inode) -> (Option<Ref>, u64, &[u8], u32, Option<u64>) {
    (i.content, i.size, &i.target, i.rdev, i.sealed_as)
}

/// The inode both sides changed, field by field; and whether the contents of a
/// non-directory conflict (both changed them differently), when the winner's stay.
fn merge_attributes(base: Option<&Inode>, l: &Inode, w: &Inode) -> (Inode, bool) {
    let mut m = w.clone();
    m.perm = pick(base.map(|b| &b.perm), &l.perm, &w.perm);
    (m.uid, m.gid) = pick(base.map(|b| (b.uid, b.gid)).as_ref(), &(l.uid, l.gid), &(w.uid, w.gid));
    m.xattrs = pick(base.map(|b| &b.xattrs), &l.xattrs, &w.xattrs);
    m.atime = pick_time(base.map(|b| &b.atime), &l.atime, &w.atime);
    m.mtime = pick_time(base.map(|b| &b.mtime), &l.mtime, &w.mtime);
    m.ctime = pick_time(base.map(|b| &b.ctime), &l.ctime, &w.ctime);
    if w.kind == Kind::Dir {
        return (m, false); // its names merge one by one
    }
    let (cb, cl, cw) = (base.map(contents), contents(l), contents(w));
    if cl == cw || cb.as_ref() == Some(&cl) {
        return (m, false);
    }
    if cb.as_ref() == Some(&cw) {
        (m.content, m.size, m.target, m.rdev, m.sealed_as) = (l.content, l.size, l.target.clone(), l.rdev, l.sealed_as);
        return (m, false);
    }
    (m, true)
}
