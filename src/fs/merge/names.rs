//! One directory's names, merged one name at a time from the base's, the loser's and the
//! winner's entries.

use std::collections::BTreeSet;

use super::inodes::edited;
use super::{Entry, Merge, SIDES, Side, insert_entry, lookup};
use crate::Result;
use crate::crypto::aead::SealedKind;
use crate::fs::node::{Bucket, DirEntry, Kind};
use crate::fs::state::{DIR_LEAF, State};
use crate::fs::trie::Trie;

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
    /// Merges the names of directory `ino`. Returns directories it brought back, whose own
    /// names are merged next.
    pub(super) fn merge_dir(&mut self, ino: u64) -> Result<Vec<u64>> {
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
}
