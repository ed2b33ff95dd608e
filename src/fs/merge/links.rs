//! Link counts, counted again from the names the merge decided, and names given back to files
//! the merge would leave with none.

use std::collections::{BTreeSet, HashMap};

use super::conflicts::changed_in;
use super::{Entry, Merge, SIDES, Side, insert_entry, lookup};
use crate::Result;
use crate::crypto::aead::SealedKind;
use crate::fs::node::{DirEntry, Kind};

impl Merge<'_> {
    /// Notes, for folders' link counts, that a name in directory `dir` ends as `result` where
    /// the loser and winner have `sides`.
    pub(super) fn count(&mut self, dir: u64, result: &Entry, sides: [&Entry; 2]) {
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
    pub(super) fn count_gone_names(&mut self, ino: u64) -> Result<()> {
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
    pub(super) fn count_links(&mut self) -> Result<()> {
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
    pub(super) fn recount_file_links(&mut self) -> Result<()> {
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
    pub(super) fn revive_nameless(&mut self) -> Result<()> {
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
}
