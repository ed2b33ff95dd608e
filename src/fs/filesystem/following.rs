//! Moving to newer heads: following the commits that arrive from elsewhere, merging branches,
//! and holding back while files open for writing here would change under their writers.

use super::Fs;
use crate::Result;
use crate::crypto::aead::SealedKind;
use crate::fs::node::{Bucket, Inode, Kind};
use crate::fs::state::{DIR_LEAF, State, current_tree};
use crate::fs::{heads, merge};
use crate::record::RecordHash;

/// What moving to another commit changed, for the kernel's caches to forget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Inodes whose attributes or contents differ (or that appeared or went).
    pub inodes: Vec<u64>,
    /// Names that appeared, went, or name another inode: (directory, name).
    pub names: Vec<(u64, Vec<u8>)>,
}

/// What `Fs::follow` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Followed {
    /// Already at the capsule's filesystem head.
    Same,
    /// Moved to the state of these filesystem heads (their merge, for more than one), which
    /// changed these.
    Moved(Vec<RecordHash>, Changes),
    /// Newer commits exist, but changes are pending here: once they are committed, the next
    /// follow merges.
    Pending,
    /// Newer commits exist, but they change the bytes of these files, which are open for
    /// writing here: the move waits until they are closed (see `Fs::follow`).
    HeldBack(Vec<u64>),
}

impl Fs {
    /// Moves this filesystem to the capsule's filesystem heads when records from elsewhere
    /// moved them, unless changes are pending here: to the newer commit, or to the merge of
    /// the branches there now are. Open handles and caches stay: the cache holds proven
    /// bytes by place.
    ///
    /// Nor does it move while the move would change the bytes of a file open for writing
    /// here (or remove it): that file is an edit in progress, as one a sync tool finds
    /// changed on a local disk. Its writer keeps reading what it wrote (reading another
    /// version back right after an fsync, or one page of each where the kernel kept the
    /// other, is what the chaos run found), its next writes and commits land in it, and once
    /// it is closed the merge decides, a conflict keeping both versions. Readers are pinned
    /// instead (see `Reader`): they cannot change the file.
    pub fn follow(&mut self) -> Result<Followed> {
        let Some(heads) = self.newer_heads()? else {
            self.held_back = None;
            return Ok(Followed::Same);
        };
        if self.is_dirty() && !self.untouched() {
            return Ok(Followed::Pending);
        }
        // Waiting for the same heads and files: no need to merge again to know.
        let still_open = self.still_held_back();
        if !still_open.is_empty() && self.held_back.as_ref().is_some_and(|(held, _)| *held == heads) {
            return Ok(Followed::HeldBack(still_open));
        }
        let state = merge::of_heads(&self.sealed, &heads)?;
        let changes = self.changes(&state)?;
        let held = self.written_and_changed(&state, &changes)?;
        if !held.is_empty() {
            self.held_back = Some((heads, held.clone()));
            return Ok(Followed::HeldBack(held));
        }
        self.held_back = None;
        // Readers of a file the move changed keep the inode they saw.
        let table = self.sealed.tree(SealedKind::InodeTable, 0);
        for reader in self.readers.values_mut().filter(|r| r.pinned.is_none()) {
            if changes.inodes.binary_search(&reader.ino).is_ok() {
                reader.pinned = self.inodes.get(&table, reader.ino)?;
            }
        }
        (self.inodes, self.dirs, self.allocated) = (state.inodes, state.dirs, state.allocated);
        self.files.clear();
        self.chunks.clear();
        self.touched = false;
        self.heads = heads.clone();
        Ok(Followed::Moved(heads, changes))
    }

    /// The files open for writing here whose bytes state `new` changes, or which it removes.
    fn written_and_changed(&self, new: &State, changes: &Changes) -> Result<Vec<u64>> {
        let table = self.sealed.tree(SealedKind::InodeTable, 0);
        let bytes = |i: Option<Inode>| i.map(|i| (i.content, i.size, i.sealed_as));
        let mut held = Vec::new();
        for &ino in changes.inodes.iter().filter(|ino| self.writers.contains_key(ino)) {
            if bytes(self.inodes.get(&table, ino)?) != bytes(new.inode(&self.sealed, ino)?) {
                held.push(ino);
            }
        }
        Ok(held)
    }

    /// Of the files that held the last follow back, those still open for writing.
    fn still_held_back(&self) -> Vec<u64> {
        let Some((_, files)) = &self.held_back else { return Vec::new() };
        files.iter().copied().filter(|ino| self.writers.contains_key(ino)).collect()
    }

    /// How many files open for writing here keep this filesystem from showing newer commits
    /// (`Followed::HeldBack`).
    pub fn held_back_by(&self) -> usize {
        self.still_held_back().len()
    }

    /// Whether a follow held back by open files may move now: the last of them was closed.
    pub fn held_back_no_more(&self) -> bool {
        self.held_back.is_some() && self.still_held_back().is_empty()
    }

    /// Whether the capsule's filesystem heads moved past the state shown here.
    pub fn behind(&self) -> Result<bool> {
        Ok(self.newer_heads()?.is_some())
    }

    /// The capsule's filesystem heads, when they moved past the state shown here.
    fn newer_heads(&self) -> Result<Option<Vec<RecordHash>>> {
        let heads = heads::filesystem_heads(&self.sealed.capsule)?;
        Ok((!heads.is_empty() && heads != self.heads).then_some(heads))
    }

    /// What differs between this filesystem and state `new`: the inodes, and in
    /// directories on both sides, the names.
    fn changes(&self, new: &State) -> Result<Changes> {
        let table = self.sealed.tree(SealedKind::InodeTable, 0);
        let mut inodes = self.inodes.changed_keys(&new.inodes, &table)?;
        // Directories a merge changed in memory may keep their inodes.
        inodes.extend(self.dirs.keys().chain(new.dirs.keys()));
        inodes.sort_unstable();
        inodes.dedup();
        let mut names = Vec::new();
        for &ino in &inodes {
            let (Some(a), Some(b)) = (self.inodes.get(&table, ino)?, new.inode(&self.sealed, ino)?) else { continue };
            if a.kind != Kind::Dir || b.kind != Kind::Dir {
                continue;
            }
            let src = self.sealed.tree(SealedKind::Directory, ino);
            let (a, b) = (current_tree(&self.dirs, ino, &a, DIR_LEAF), new.dir_tree(ino, &b));
            for key in a.changed_keys(&b, &src)? {
                let (left, right) = (a.get(&src, key)?.unwrap_or_default(), b.get(&src, key)?.unwrap_or_default());
                let find = |bucket: &Bucket, name: &[u8]| bucket.0.iter().find(|e| e.name == name).cloned();
                for entry in left.0.iter().chain(&right.0) {
                    if find(&left, &entry.name) != find(&right, &entry.name) {
                        names.push((ino, entry.name.clone()));
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        Ok(Changes { inodes, names })
    }

    /// A new filesystem nothing was done to yet but making its root: given up for a commit
    /// that arrives from elsewhere, rather than made a branch of its own.
    fn untouched(&self) -> bool {
        self.heads.is_empty()
            && self.allocated.is_empty()
            && self.chunks.is_empty()
            && self.files.is_empty()
            && self.dirs.is_empty()
    }
}
