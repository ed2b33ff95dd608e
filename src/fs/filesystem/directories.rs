//! Names: looking up and listing directories, making, linking, unlinking and moving nodes.

use super::{Fs, MAX_NAME, shown};
use crate::crypto::aead::SealedKind;
use crate::fs::node::{DirEntry, Inode, Kind, ROOT_INO, Time, inode_range, name_key, ranged_ino};
use crate::fs::state::{DIR_LEAF, committed_tree, current_tree};
use crate::{Error, Result};

/// The longest symlink target a local disk (ext4) takes.
const MAX_SYMLINK_TARGET: usize = 4095;

/// ENAMETOOLONG comes before any other check, as on a local disk.
fn check_name_length(name: &[u8]) -> Result<()> {
    if name.len() > MAX_NAME {
        return Err(Error::NameTooLong(format!("a name of {} bytes", name.len())));
    }
    Ok(())
}

fn check_entry_name(name: &[u8]) -> Result<()> {
    check_name_length(name)?;
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return Err(Error::Invalid(format!("'{}' is not a valid file name", String::from_utf8_lossy(name))));
    }
    Ok(())
}

impl Fs {
    fn dir_inode(&self, ino: u64) -> Result<Inode> {
        let inode = self.getattr(ino)?;
        if inode.kind != Kind::Dir {
            return Err(Error::NotADirectory(format!("inode {ino}")));
        }
        Ok(inode)
    }

    fn lookup_in(&self, dir: u64, name: &[u8]) -> Result<Option<DirEntry>> {
        check_name_length(name)?;
        let inode = self.dir_inode(dir)?;
        let sealed = &self.sealed;
        let src = sealed.tree(SealedKind::Directory, dir);
        let bucket = current_tree(&self.dirs, dir, &inode, DIR_LEAF).get(&src, name_key(name))?;
        Ok(bucket.and_then(|b| b.0.into_iter().find(|e| e.name == name)))
    }

    pub fn lookup(&self, dir: u64, name: &[u8]) -> Result<(u64, Inode)> {
        let entry = self.lookup_in(dir, name)?.ok_or_else(|| Error::NotFound(shown(name)))?;
        Ok((entry.ino, self.getattr(entry.ino)?))
    }

    /// Every entry of a directory (without `.` and `..`), in tree order.
    pub fn readdir(&self, dir: u64) -> Result<Vec<DirEntry>> {
        let inode = self.dir_inode(dir)?;
        let sealed = &self.sealed;
        let src = sealed.tree(SealedKind::Directory, dir);
        let buckets = current_tree(&self.dirs, dir, &inode, DIR_LEAF).entries(&src)?;
        Ok(buckets.into_iter().flat_map(|(_, b)| b.0).collect())
    }

    /// Applies `change` to the bucket of `name` in `dir`, marking the directory changed.
    fn edit_dir(&mut self, dir: u64, name: &[u8], change: impl FnOnce(&mut Vec<DirEntry>)) -> Result<()> {
        let inode = self.dir_inode(dir)?;
        let sealed = &self.sealed;
        let src = sealed.tree(SealedKind::Directory, dir);
        let tree = self.dirs.entry(dir).or_insert_with(|| committed_tree(inode.content, DIR_LEAF));
        let key = name_key(name);
        let mut bucket = tree.get(&src, key)?.unwrap_or_default();
        change(&mut bucket.0);
        bucket.0.sort_by(|a, b| a.name.cmp(&b.name));
        if bucket.0.is_empty() {
            tree.remove(&src, key)?;
        } else {
            tree.insert(&src, key, bucket)?;
        }
        Ok(())
    }

    fn touch_dir(&mut self, dir: u64, nlink_delta: i32) -> Result<()> {
        let mut inode = self.getattr(dir)?;
        let now = Time::now();
        inode.mtime = now;
        inode.ctime = now;
        inode.nlink = inode.nlink.saturating_add_signed(nlink_delta);
        self.put_inode(dir, inode)
    }

    fn add_entry(&mut self, dir: u64, name: &[u8], ino: u64, kind: Kind) -> Result<()> {
        self.edit_dir(dir, name, |b| b.push(DirEntry { name: name.to_vec(), ino, kind }))?;
        self.touch_dir(dir, if kind == Kind::Dir { 1 } else { 0 })
    }

    fn remove_entry(&mut self, dir: u64, name: &[u8], kind: Kind) -> Result<()> {
        self.edit_dir(dir, name, |b| b.retain(|e| e.name != name))?;
        self.touch_dir(dir, if kind == Kind::Dir { -1 } else { 0 })
    }

    /// Makes a new node of any kind named `name` in `dir`.
    pub fn make(&mut self, dir: u64, name: &[u8], mut inode: Inode) -> Result<(u64, Inode)> {
        self.writable()?;
        check_entry_name(name)?;
        if inode.target.len() > MAX_SYMLINK_TARGET {
            return Err(Error::NameTooLong(format!("a symlink target of {} bytes", inode.target.len())));
        }
        if self.lookup_in(dir, name)?.is_some() {
            return Err(Error::Exists(shown(name)));
        }
        let ino = self.allocate()?;
        if inode.kind == Kind::Symlink {
            inode.size = inode.target.len() as u64;
        }
        self.put_inode(ino, inode.clone())?;
        self.add_entry(dir, name, ino, inode.kind)?;
        Ok((ino, inode))
    }

    /// The next inode number of this writer and device's range.
    fn allocate(&mut self) -> Result<u64> {
        let range = match self.range {
            Some(range) => range,
            None => {
                let writer = self.writer.as_ref().ok_or(Error::ReadOnlyView)?.writer();
                *self.range.insert(inode_range(&writer, &self.sealed.capsule.device()?))
            }
        };
        let last = self.allocated.entry(range).or_default();
        *last = last.checked_add(1).ok_or_else(|| {
            Error::Invalid("this device has made 2^32 files in this capsule, all its inode numbers".into())
        })?;
        Ok(ranged_ino(range, *last))
    }

    /// A new name for an existing file (hard link).
    pub fn link(&mut self, ino: u64, dir: u64, name: &[u8]) -> Result<Inode> {
        self.writable()?;
        check_entry_name(name)?;
        let mut inode = self.getattr(ino)?;
        if inode.kind == Kind::Dir {
            return Err(Error::IsADirectory(format!("inode {ino} (directories cannot be hard-linked)")));
        }
        if self.lookup_in(dir, name)?.is_some() {
            return Err(Error::Exists(shown(name)));
        }
        inode.nlink += 1;
        inode.ctime = Time::now();
        self.put_inode(ino, inode.clone())?;
        self.add_entry(dir, name, ino, inode.kind)?;
        Ok(inode)
    }

    pub(super) fn remove_inode(&mut self, ino: u64) -> Result<()> {
        let sealed = &self.sealed;
        self.inodes.remove(&sealed.tree(SealedKind::InodeTable, 0), ino)?;
        self.touched = true;
        self.files.remove(&ino);
        self.dirs.remove(&ino);
        self.chunks.retain(|(i, _), _| *i != ino);
        Ok(())
    }

    /// Drops one link to `ino`. At zero links the inode goes, unless a handle still has it
    /// open: then it stays, with nlink 0, until `released`.
    fn drop_link(&mut self, ino: u64) -> Result<()> {
        let mut inode = self.getattr(ino)?;
        inode.nlink = inode.nlink.saturating_sub(1);
        let gone = inode.nlink == 0 || inode.kind == Kind::Dir;
        if gone && inode.kind != Kind::Dir && self.open_handles.contains_key(&ino) {
            inode.nlink = 0;
            inode.ctime = Time::now();
            self.put_inode(ino, inode)
        } else if gone {
            self.remove_inode(ino)
        } else {
            inode.ctime = Time::now();
            self.put_inode(ino, inode)
        }
    }

    pub fn unlink(&mut self, dir: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        let entry = self.lookup_in(dir, name)?.ok_or_else(|| Error::NotFound(shown(name)))?;
        if entry.kind == Kind::Dir {
            return Err(Error::IsADirectory(shown(name)));
        }
        self.remove_entry(dir, name, entry.kind)?;
        self.drop_link(entry.ino)
    }

    pub fn rmdir(&mut self, dir: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        let entry = self.lookup_in(dir, name)?.ok_or_else(|| Error::NotFound(shown(name)))?;
        if entry.kind != Kind::Dir {
            return Err(Error::NotADirectory(shown(name)));
        }
        if !self.readdir(entry.ino)?.is_empty() {
            return Err(Error::NotEmpty(shown(name)));
        }
        self.remove_entry(dir, name, Kind::Dir)?;
        self.drop_link(entry.ino)
    }

    /// Moves `name` in `dir` to `new_name` in `new_dir`, replacing a file there, or an empty
    /// directory when a directory moves.
    pub fn rename(&mut self, dir: u64, name: &[u8], new_dir: u64, new_name: &[u8]) -> Result<()> {
        self.writable()?;
        check_entry_name(new_name)?;
        let entry = self.lookup_in(dir, name)?.ok_or_else(|| Error::NotFound(shown(name)))?;
        if entry.kind == Kind::Dir && self.is_within(new_dir, entry.ino)? {
            return Err(Error::Invalid(format!("cannot move directory '{}' into itself", shown(name))));
        }
        if let Some(existing) = self.lookup_in(new_dir, new_name)? {
            if existing.ino == entry.ino {
                return Ok(());
            }
            match (entry.kind == Kind::Dir, existing.kind == Kind::Dir) {
                (true, false) => return Err(Error::NotADirectory(shown(new_name))),
                (false, true) => return Err(Error::IsADirectory(shown(new_name))),
                (true, true) => self.rmdir(new_dir, new_name)?,
                (false, false) => self.unlink(new_dir, new_name)?,
            }
        }
        self.remove_entry(dir, name, entry.kind)?;
        self.add_entry(new_dir, new_name, entry.ino, entry.kind)?;
        self.set_attr(entry.ino, |_| {}).map(drop) // ctime moves with the name
    }

    /// Swaps two existing names atomically (renameat2 RENAME_EXCHANGE): each keeps its
    /// inode, kinds may differ, and neither directory may end up inside itself.
    pub fn exchange(&mut self, dir: u64, name: &[u8], new_dir: u64, new_name: &[u8]) -> Result<()> {
        self.writable()?;
        let a = self.lookup_in(dir, name)?.ok_or_else(|| Error::NotFound(shown(name)))?;
        let b = self.lookup_in(new_dir, new_name)?.ok_or_else(|| Error::NotFound(shown(new_name)))?;
        if a.ino == b.ino {
            return Ok(());
        }
        for (moved, to) in [(&a, new_dir), (&b, dir)] {
            if moved.kind == Kind::Dir && self.is_within(to, moved.ino)? {
                return Err(Error::Invalid(format!("cannot move directory '{}' into itself", shown(&moved.name))));
            }
        }
        self.remove_entry(dir, name, a.kind)?;
        self.remove_entry(new_dir, new_name, b.kind)?;
        self.add_entry(dir, name, b.ino, b.kind)?;
        self.add_entry(new_dir, new_name, a.ino, a.kind)?;
        for ino in [a.ino, b.ino] {
            self.set_attr(ino, |_| {})?; // ctime moves with the name
        }
        Ok(())
    }

    /// Removes files that no name reaches: unlinked while open, then never closed because
    /// the mount ended without a clean unmount. Returns how many went.
    pub fn sweep_orphans(&mut self) -> Result<usize> {
        self.writable()?;
        let sealed = &self.sealed;
        let orphans: Vec<u64> = self
            .inodes
            .entries(&sealed.tree(SealedKind::InodeTable, 0))?
            .into_iter()
            .filter(|(ino, inode)| inode.nlink == 0 && !self.open_handles.contains_key(ino))
            .map(|(ino, _)| ino)
            .collect();
        for &ino in &orphans {
            self.remove_inode(ino)?;
        }
        Ok(orphans.len())
    }

    /// Whether `dir` is `ancestor` or lies below it (walks up through `..` entries).
    fn is_within(&self, dir: u64, ancestor: u64) -> Result<bool> {
        let mut current = dir;
        for _ in 0..4096 {
            if current == ancestor {
                return Ok(true);
            }
            if current == ROOT_INO {
                return Ok(false);
            }
            current = self.parent_of(current)?;
        }
        Err(Error::Invalid("directory tree deeper than 4096 levels".into()))
    }

    /// A directory's parent: the directory holding an entry for it (found from the root down).
    fn parent_of(&self, dir: u64) -> Result<u64> {
        let mut stack = vec![ROOT_INO];
        while let Some(d) = stack.pop() {
            for e in self.readdir(d)? {
                if e.kind == Kind::Dir {
                    if e.ino == dir {
                        return Ok(d);
                    }
                    stack.push(e.ino);
                }
            }
        }
        Err(Error::NotFound(format!("the parent of directory inode {dir}")))
    }
}
