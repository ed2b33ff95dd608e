//! Moves made on both sides: a folder or file keeps one of them, and folders moved into each
//! other go back where they were.

use std::collections::HashSet;

use super::{Merge, SIDES, insert_entry, lookup};
use crate::Result;
use crate::crypto::aead::SealedKind;
use crate::fs::node::{DirEntry, Kind, ROOT_INO, name_key};

impl Merge<'_> {
    /// A file both sides moved (each took a base name from it and gave it a new one) keeps
    /// the winner's new names only, as a folder keeps the winner's move: two renames apart
    /// are not a hard link. A new name on a side that kept the old one (a link) stays.
    pub(super) fn settle_file_moves(&mut self) -> Result<()> {
        let names = std::mem::take(&mut self.file_names);
        let moved_on_both = |x: u64| self.unnamed[0].contains(&x) && self.unnamed[1].contains(&x);
        let winners: HashSet<u64> = names.iter().filter(|n| n.3).map(|n| n.0).collect();
        let dropped: Vec<(u64, u64, Vec<u8>)> = names
            .into_iter()
            .filter(|(x, _, _, winners_name)| !winners_name && winners.contains(x) && moved_on_both(*x))
            .map(|(x, dir, name, _)| (x, dir, name))
            .collect();
        for (x, dir, name) in dropped {
            self.remove_name(dir, &name, x)?;
        }
        Ok(())
    }

    /// A folder has one name: of two moves of one folder, the winner's stays; moves that
    /// put folders inside each other (so no path from the root reaches them) lose the
    /// loser's, which goes back to its base name.
    pub(super) fn settle_moves(&mut self) -> Result<()> {
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
        if !self.remove_name(dir, name, x)? {
            return Ok(());
        }
        for side in SIDES {
            *self.links.entry((dir, side)).or_default() -= 1;
        }
        Ok(())
    }

    /// Removes the entry `name` -> `x` from folder `dir` of the merge; false when the merge
    /// has no folder `dir`.
    fn remove_name(&mut self, dir: u64, name: &[u8], x: u64) -> Result<bool> {
        let Some(inode) = self.out.inode(self.sealed, dir)? else { return Ok(false) };
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
        Ok(true)
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
}
