//! POSIX operations over one capsule's filesystem state, without FUSE types.
//!
//! State is the inode table of the last commit plus an overlay of changes: the inode table's
//! changed nodes, the changed chunk maps and directories, and written chunks not yet committed.
//! `commit` seals all of it into one record: chunks, then changed tree nodes bottom up, then
//! the superblock last. Reads of committed data go through `Sealed`, so every byte returned
//! was proven and opened first.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::heads;
use super::node::{
    Bucket, CHUNK_SIZE, Chunk, DirEntry, Inode, Kind, MAX_PIECES, Piece, ROOT_INO, Superblock, Time, inode_range,
    name_key, ranged_ino,
};
use super::payload_cache::Caches;
use super::sealed::{CommitBuilder, Sealed};
use super::sealer::{ChunkKey, Sealer};
use super::state::{CHUNK_LEAF, DIR_LEAF, State, committed_tree, current_tree};
use super::trie::{Loc, NodeSource, Ref, Trie, Value, Written};
use crate::capsule::{Capsule, EarlierProofs};
use crate::crypto::aead::SealedKind;
use crate::crypto::keys::Identity;
use crate::member::KeyRing;
use crate::proof::Anchor;
use crate::record::codec::FORMAT_VERSION;
use crate::record::{RecordHash, RecordKind, SubIdx};
use crate::store::Durability;
use crate::{Error, Result, VerifyError};

/// The longest name component and symlink target a local disk (ext4) takes.
const MAX_NAME: usize = 255;
const MAX_SYMLINK_TARGET: usize = 4095;
const MAX_XATTR_VALUE: usize = 64 * 1024;
const PROVENANCE_PREFIX: &[u8] = b"user.capsule.";
const PROVENANCE: [&[u8]; 3] = [b"record", b"writer", b"verified"];

/// What moving to another commit changed, for the kernel's caches to forget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Inodes whose attributes or contents differ (or that appeared or went).
    pub inodes: Vec<u64>,
    /// Names that appeared, went, or name another inode: (directory, name).
    pub names: Vec<(u64, Vec<u8>)>,
}

/// setxattr's flags: any, XATTR_CREATE (must not exist) or XATTR_REPLACE (must exist).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    Any,
    Create,
    Replace,
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

pub struct Fs {
    /// The capsule, content key and cache of verified payloads (shared with views).
    sealed: Sealed,
    /// None for a read-only view (of the past, or without write rights).
    writer: Option<Identity>,
    inodes: Trie<Inode>,
    /// The last inode number handed out per range (see `node::inode_range`).
    allocated: BTreeMap<u32, u32>,
    /// This writer and device's range, once known (at the first `make`).
    range: Option<u32>,
    /// Chunk maps and directories changed since the last commit (directories also by a merge).
    files: HashMap<u64, Trie<Chunk>>,
    dirs: HashMap<u64, Trie<Bucket>>,
    /// Written chunks not yet committed, by (inode, chunk number).
    chunks: BTreeMap<ChunkKey, PendingChunk>,
    /// Bumped by every change to a pending chunk, which takes the new value as its version.
    chunk_version: u64,
    /// Seals completed chunks while writes go on (writable filesystems only).
    sealer: Option<Sealer>,
    /// The filesystem heads this state holds: the commit it builds on, or the branches it
    /// merged (committed as parents by the next commit).
    heads: Vec<RecordHash>,
    /// Whether anything changed here since the last commit (a merge alone is no change).
    touched: bool,
    /// Open handles per inode: an unlinked file lives on (nlink 0) until its last close.
    open_handles: HashMap<u64, u32>,
    /// Of those, the handles that may write, per inode.
    writers: HashMap<u64, u32>,
    /// Handles opened for reading, by handle number.
    readers: HashMap<u64, Reader>,
    /// The filesystem heads the last follow did not move to, and the files open for writing
    /// here that held it back.
    held_back: Option<(Vec<RecordHash>, Vec<u64>)>,
}

/// A handle opened for reading. When a follow changes its file under it, it is pinned to the
/// file as it was, and reads that version until closed, as a local disk's reader of a file
/// renamed over keeps the old one. Attributes are not pinned: the kernel keeps one size per
/// inode for every handle, so a pinned reader reads its version up to the current size.
struct Reader {
    ino: u64,
    pinned: Option<Inode>,
}

/// Which version of a file a read sees.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Version {
    /// As it stands here, writes pending included.
    Live,
    /// As committed at the inode the reader holds.
    Committed,
}

/// A chunk's bytes: pending in memory, or committed (proven and opened, perhaps cached).
enum ChunkBytes<'a> {
    Pending(&'a [u8]),
    Committed(Arc<Vec<u8>>),
}

impl std::ops::Deref for ChunkBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ChunkBytes::Pending(b) => b,
            ChunkBytes::Committed(b) => b,
        }
    }
}

/// A written chunk waiting for a commit. `version` changes with every change to it, so that
/// a seal made early (`Sealer`) is used only for the very bytes it sealed.
struct PendingChunk {
    data: Arc<Vec<u8>>,
    version: u64,
    /// The committed pieces `data` still begins with, unchanged: set when a committed chunk
    /// is loaded to be extended, cleared by any write below their end. A commit then seals
    /// only the bytes after them, as one more piece.
    kept: Option<Chunk>,
}

impl ChunkBytes<'_> {
    fn into_owned(self) -> Vec<u8> {
        match self {
            ChunkBytes::Pending(b) => b.to_vec(),
            ChunkBytes::Committed(b) => Arc::unwrap_or_clone(b),
        }
    }
}

/// ENAMETOOLONG comes before any other check, as on a local disk.
fn check_name_length(name: &[u8]) -> Result<()> {
    if name.len() > MAX_NAME {
        return Err(Error::NameTooLong(format!("a name of {} bytes", name.len())));
    }
    Ok(())
}

fn check_name(name: &[u8]) -> Result<()> {
    check_name_length(name)?;
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return Err(Error::Invalid(format!("'{}' is not a valid file name", String::from_utf8_lossy(name))));
    }
    Ok(())
}

/// A piece must hold exactly the bytes its chunk map says: both are proven, so a mismatch is
/// a writer's fault, refused rather than read short or long.
fn check_piece_len(at: Loc, piece: &Piece, actual: usize) -> Result<()> {
    if actual != piece.len as usize {
        return Err(VerifyError::PieceLength { record: at.record, idx: at.idx, expected: piece.len, actual }.into());
    }
    Ok(())
}

fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl Fs {
    /// The filesystem as of the capsule's filesystem heads, writable by `writer`: one
    /// commit's state, or the deterministic merge of branches made apart (`State::of_heads`);
    /// empty if there is no commit yet.
    pub fn open(capsule: Arc<Capsule>, keys: impl Into<KeyRing>, writer: Option<Identity>) -> Result<Self> {
        let fs_heads = heads::filesystem_heads(&capsule)?;
        let sealed = Sealed::new(capsule, keys.into());
        if fs_heads.is_empty() {
            let mut fs = Self::with_state(sealed, writer, State::empty(), Vec::new());
            fs.put_inode(ROOT_INO, Inode::new(Kind::Dir, 0o755, 0, 0))?;
            return Ok(fs);
        }
        match State::of_heads(&sealed, &fs_heads) {
            Ok(state) => Ok(Self::with_state(sealed, writer, state, fs_heads)),
            // A member removed from the capsule reads on what was shared with them.
            Err(Error::NoKey(why)) if writer.is_none() => {
                let keys = sealed.keys();
                let readable = |g| !keys.get(g).is_empty();
                let Some(newest) = heads::newest_readable(&sealed.capsule, &fs_heads, readable)? else {
                    return Err(Error::NoKey(why));
                };
                tracing::error!("showing {newest:?}, the newest state this identity holds the key for: {why}");
                Self::at(sealed, None, newest)
            }
            Err(e) => Err(e),
        }
    }

    /// The filesystem as of commit `record` (a view of the past when `writer` is None).
    pub fn open_at(
        capsule: Arc<Capsule>,
        keys: impl Into<KeyRing>,
        writer: Option<Identity>,
        record: RecordHash,
    ) -> Result<Self> {
        Self::at(Sealed::new(capsule, keys.into()), writer, record)
    }

    fn at(sealed: Sealed, writer: Option<Identity>, record: RecordHash) -> Result<Self> {
        let state = State::committed(&sealed, record)?;
        Ok(Self::with_state(sealed, writer, state, vec![record]))
    }

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
        let state = State::of_heads(&self.sealed, &heads)?;
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

    fn with_state(sealed: Sealed, writer: Option<Identity>, state: State, heads: Vec<RecordHash>) -> Self {
        let sealer = writer.is_some().then(|| Sealer::start(sealed.sealing_key()));
        Self {
            sealed,
            writer,
            inodes: state.inodes,
            allocated: state.allocated,
            range: None,
            files: HashMap::new(),
            dirs: state.dirs,
            chunks: BTreeMap::new(),
            chunk_version: 0,
            sealer,
            heads,
            touched: false,
            open_handles: HashMap::new(),
            writers: HashMap::new(),
            readers: HashMap::new(),
            held_back: None,
        }
    }

    /// The filesystem heads this state holds: one commit, or the branches it merged.
    pub fn heads(&self) -> &[RecordHash] {
        &self.heads
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

    /// Bytes of written chunks waiting for a commit.
    pub fn pending_bytes(&self) -> usize {
        self.chunks.values().map(|c| c.data.len()).sum()
    }

    /// Whether changes wait for a commit.
    pub fn is_dirty(&self) -> bool {
        self.touched || !self.chunks.is_empty()
    }

    /// Whether writes are refused: a view of the past, or no write rights.
    pub fn is_read_only(&self) -> bool {
        self.writer.is_none()
    }

    pub fn capsule(&self) -> &Arc<Capsule> {
        &self.sealed.capsule
    }

    /// Every filesystem commit in the capsule, oldest first; records that fail their own
    /// check are left out (and logged).
    pub fn commits(&self) -> Result<Vec<RecordHash>> {
        let mut commits = Vec::new();
        for entry in self.sealed.capsule.intact_log("history")? {
            let (h, r) = entry?;
            if r.header.kind == RecordKind::FsCommit {
                commits.push(h);
            }
        }
        commits.reverse();
        Ok(commits)
    }

    /// A read-only view of commit `record`, sharing this filesystem's capsule, keys and cache.
    pub fn view_at(&self, record: RecordHash) -> Result<Fs> {
        Self::at(self.sealed.share(), None, record)
    }

    /// Stops writing: the identity it wrote as no longer holds the write level. Changes not
    /// yet committed cannot be (no record of theirs would be accepted): dropped, and the
    /// bytes counted in the log.
    pub fn lose_writer(&mut self) {
        if self.writer.take().is_none() {
            return;
        }
        self.sealer = None;
        let lost = self.pending_bytes();
        self.chunks.clear();
        self.files.clear();
        self.touched = false;
        tracing::error!(
            "this identity no longer holds the write level: the mount is read-only from now on (writes fail with \
             EROFS){}",
            if lost > 0 {
                format!("; {lost} bytes written since the last commit could not be committed")
            } else {
                String::new()
            }
        );
    }

    /// The newest generation of the content key this filesystem holds.
    pub fn sealing_key_generation(&self) -> crate::record::KeyGen {
        self.sealed.sealing_key().generation()
    }

    /// Takes the generations of the content key in `keys` (a membership record brought a new
    /// one, or took them away): reads open with them at once, and once the newest generation
    /// changed, commits seal with it (chunks sealed ahead with the old one are sealed again).
    pub fn take_keys(&mut self, keys: KeyRing) {
        let (old, new) = (self.sealed.sealing_key(), keys.current().cloned());
        self.sealed.set_keys(keys);
        if let Some(new) = new.filter(|new| !crate::crypto::aead::same_key(new, &old))
            && self.sealer.is_some()
        {
            tracing::info!("sealing with generation {} of the content key from now on", new.generation().0);
            self.sealer = Some(Sealer::start(new));
        }
    }

    /// Uses `cache` for verified payloads (to size it, or to share it).
    pub fn with_cache(mut self, cache: Arc<Caches>) -> Self {
        self.sealed.cache = cache;
        self
    }

    pub fn cache(&self) -> &Caches {
        &self.sealed.cache
    }

    fn writable(&self) -> Result<()> {
        if self.writer.is_none() { Err(Error::ReadOnlyView) } else { Ok(()) }
    }

    pub fn getattr(&self, ino: u64) -> Result<Inode> {
        let src = &self.sealed;
        self.inodes
            .get(&src.tree(SealedKind::InodeTable, 0), ino)?
            .ok_or_else(|| Error::NotFound(format!("inode {ino}")))
    }

    fn put_inode(&mut self, ino: u64, mut inode: Inode) -> Result<()> {
        // Resolves to the record of the next commit (see Inode::changed_in).
        inode.changed_in = Some(Ref::Here(SubIdx(0)));
        let sealed = &self.sealed;
        self.inodes.insert(&sealed.tree(SealedKind::InodeTable, 0), ino, inode)?;
        self.touched = true;
        Ok(())
    }

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
        check_name(name)?;
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
        check_name(name)?;
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

    /// A handle to `ino` that may write was opened.
    pub fn opened(&mut self, ino: u64) {
        *self.open_handles.entry(ino).or_default() += 1;
        *self.writers.entry(ino).or_default() += 1;
    }

    /// Handle `fh` to `ino` was opened for reading only.
    pub fn opened_reader(&mut self, ino: u64, fh: u64) {
        *self.open_handles.entry(ino).or_default() += 1;
        self.readers.insert(fh, Reader { ino, pinned: None });
    }

    /// Whether handles pinned to an older version of `ino` are open (see `Reader`).
    pub fn has_pinned_readers(&self, ino: u64) -> bool {
        self.readers.values().any(|r| r.ino == ino && r.pinned.is_some())
    }

    /// Reading handle `fh` was closed.
    pub fn released_reader(&mut self, fh: u64) -> Result<()> {
        match self.readers.remove(&fh) {
            Some(reader) => self.closed(reader.ino),
            None => Ok(()),
        }
    }

    /// `read` through handle `fh`: the version it is pinned to, if a follow pinned it.
    pub fn read_handle(&self, fh: u64, ino: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
        match self.readers.get(&fh) {
            Some(Reader { ino: i, pinned: Some(inode) }) if *i == ino => {
                self.read_from(ino, inode, offset, len, Version::Committed)
            }
            _ => self.read(ino, offset, len),
        }
    }

    /// A handle to `ino` that may write was closed.
    pub fn released(&mut self, ino: u64) -> Result<()> {
        count_down(&mut self.writers, ino);
        self.closed(ino)
    }

    /// A handle to `ino` was closed; the last close of an unlinked file removes it.
    fn closed(&mut self, ino: u64) -> Result<()> {
        if !count_down(&mut self.open_handles, ino) {
            return Ok(());
        }
        match self.getattr(ino) {
            Ok(inode) if inode.nlink == 0 && self.writer.is_some() => self.remove_inode(ino),
            _ => Ok(()),
        }
    }

    fn remove_inode(&mut self, ino: u64) -> Result<()> {
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
        check_name(new_name)?;
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

    /// Changes attributes (chmod, chown, utimens); `change` sees the current inode.
    pub fn set_attr(&mut self, ino: u64, change: impl FnOnce(&mut Inode)) -> Result<Inode> {
        self.writable()?;
        let mut inode = self.getattr(ino)?;
        change(&mut inode);
        inode.perm &= 0o7777;
        inode.ctime = Time::now();
        self.put_inode(ino, inode.clone())?;
        Ok(inode)
    }

    /// An extended attribute: stored user.* ones, or the read-only provenance of the inode
    /// (`user.capsule.record`, `.writer`, `.verified`).
    pub fn get_xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        // Only user.* is stored. Answered before any lookup: the kernel asks for
        // security.capability before every write to a file.
        if !name.starts_with(b"user.") {
            return Err(Error::NoAttribute(shown(name)));
        }
        let inode = self.getattr(ino)?;
        if let Some(field) = name.strip_prefix(PROVENANCE_PREFIX) {
            return self.provenance(&inode, field).and_then(|v| v.ok_or_else(|| Error::NoAttribute(shown(name))));
        }
        inode
            .xattrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| Error::NoAttribute(shown(name)))
    }

    fn provenance(&self, inode: &Inode, field: &[u8]) -> Result<Option<Vec<u8>>> {
        let Some(Ref::At(record, _)) = inode.changed_in else {
            return Ok(PROVENANCE.contains(&field).then(|| b"uncommitted".to_vec()));
        };
        Ok(Some(match field {
            b"record" => record.to_hex().into_bytes(),
            b"writer" => self.sealed.capsule.proven_header(record)?.writer.to_hex().into_bytes(),
            b"verified" => match self.sealed.capsule.prove_record(record, EarlierProofs::Ignore)?.anchor {
                Anchor::Signed { record, .. } => format!("signed {record}"),
                Anchor::Cached { record } => format!("proven {record}"),
                Anchor::Attested { record, .. } => format!("attested-locally {record}"),
            }
            .into_bytes(),
            _ => return Ok(None),
        }))
    }

    /// Names of the stored extended attributes. Provenance is readable by name but not
    /// listed, so `cp -a` and `rsync -X` neither copy it out nor fail to set it on copy in.
    pub fn list_xattrs(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        Ok(self.getattr(ino)?.xattrs.into_iter().map(|(n, _)| n).collect())
    }

    /// Sets (or with `value` None, removes) a user.* extended attribute.
    pub fn set_xattr(&mut self, ino: u64, name: &[u8], value: Option<&[u8]>, mode: XattrMode) -> Result<()> {
        self.writable()?;
        if name.starts_with(PROVENANCE_PREFIX) {
            return Err(Error::NotPermitted(shown(name)));
        }
        if !name.starts_with(b"user.") || name.len() > MAX_NAME {
            return Err(Error::Unsupported(format!("extended attribute {} (only user.* is stored)", shown(name))));
        }
        if value.is_some_and(|v| v.len() > MAX_XATTR_VALUE) {
            return Err(Error::Invalid(format!("value of {} is over 64 KiB", shown(name))));
        }
        let mut inode = self.getattr(ino)?;
        let at = inode.xattrs.binary_search_by(|(n, _)| n.as_slice().cmp(name));
        match (at, value, mode) {
            (Ok(_), Some(_), XattrMode::Create) => return Err(Error::Exists(shown(name))),
            (Err(_), _, XattrMode::Replace) | (Err(_), None, _) => return Err(Error::NoAttribute(shown(name))),
            (Ok(i), Some(v), _) => inode.xattrs[i].1 = v.to_vec(),
            (Err(i), Some(v), _) => inode.xattrs.insert(i, (name.to_vec(), v.to_vec())),
            (Ok(i), None, _) => drop(inode.xattrs.remove(i)),
        }
        inode.ctime = Time::now();
        self.put_inode(ino, inode)
    }

    /// The bytes of chunk `n` of file `ino`: pending (borrowed), committed (proven, opened
    /// and kept in the payload cache: it is read only in part here, and the rest of it is
    /// likely asked for next), or None for a hole.
    fn chunk(&self, ino: u64, inode: &Inode, n: u64, version: Version) -> Result<Option<ChunkBytes<'_>>> {
        if let Some(c) = self.chunks.get(&(ino, n)).filter(|_| version == Version::Live) {
            return Ok(Some(ChunkBytes::Pending(&c.data)));
        }
        let Some(chunk) = self.stored_chunk(ino, inode, n, version)? else { return Ok(None) };
        Ok(Some(ChunkBytes::Committed(self.committed_bytes(inode.chunks_at(ino), n, &chunk)?)))
    }

    /// `committed_chunk` of the live file, or of exactly the version `inode` names.
    fn stored_chunk(&self, ino: u64, inode: &Inode, n: u64, version: Version) -> Result<Option<Chunk>> {
        match version {
            Version::Live => self.committed_chunk(ino, inode, n),
            Version::Committed => {
                let src = self.sealed.tree(SealedKind::ChunkMap, inode.chunks_at(ino));
                committed_tree(inode.content, CHUNK_LEAF).get(&src, n)
            }
        }
    }

    /// Where committed chunk `n` of file `ino` is stored, or None for a hole.
    fn committed_chunk(&self, ino: u64, inode: &Inode, n: u64) -> Result<Option<Chunk>> {
        let src = self.sealed.tree(SealedKind::ChunkMap, inode.chunks_at(ino));
        current_tree(&self.files, ino, inode, CHUNK_LEAF).get(&src, n)
    }

    /// The bytes of committed chunk `n` of the file whose chunks are sealed at inode number
    /// `ino` (`Inode::chunks_at`): its pieces, each proven and opened.
    fn committed_bytes(&self, ino: u64, n: u64, chunk: &Chunk) -> Result<Arc<Vec<u8>>> {
        if let [only] = chunk.pieces.as_slice() {
            return self.piece(ino, n, 0, only);
        }
        self.committed_copy(ino, n, chunk, chunk.len()).map(Arc::new)
    }

    /// Committed chunk `n`'s bytes in a buffer of its own with room for `capacity` bytes,
    /// each piece copied once (a write that grows the chunk would otherwise copy it again).
    fn committed_copy(&self, ino: u64, n: u64, chunk: &Chunk, capacity: usize) -> Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(capacity.max(chunk.len()));
        for (start, piece) in chunk.with_offsets() {
            bytes.extend_from_slice(&self.piece(ino, n, start, piece)?);
        }
        Ok(bytes)
    }

    /// One piece of committed chunk `n` of the file sealed at `ino`, starting `start` bytes
    /// into it.
    fn piece(&self, ino: u64, n: u64, start: usize, piece: &Piece) -> Result<Arc<Vec<u8>>> {
        let at = piece.at.absolute();
        let plain = self.sealed.read(at, &self.sealed.piece_place(ino, n, start))?;
        check_piece_len(at, piece, plain.len())?;
        Ok(plain)
    }

    fn file_inode(&self, ino: u64) -> Result<Inode> {
        let inode = self.getattr(ino)?;
        match inode.kind {
            Kind::File => Ok(inode),
            Kind::Dir => Err(Error::IsADirectory(format!("inode {ino}"))),
            other => Err(Error::Invalid(format!("inode {ino} is a {other:?}, not a regular file"))),
        }
    }

    /// The version a pending chunk takes when it changes (see `PendingChunk`).
    fn next_chunk_version(&mut self) -> u64 {
        self.chunk_version += 1;
        self.chunk_version
    }

    /// Up to `len` bytes from `offset`; holes read as zeros.
    pub fn read(&self, ino: u64, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.read_from(ino, &self.file_inode(ino)?, offset, len, Version::Live)
    }

    /// Reads `inode`'s bytes: with the writes pending here (`Live`), or as `inode` names them
    /// (`Committed`: a pinned reader's older version of the file).
    fn read_from(&self, ino: u64, inode: &Inode, offset: u64, len: u32, version: Version) -> Result<Vec<u8>> {
        let end = inode.size.min(offset.saturating_add(u64::from(len)));
        let mut out = vec![0; end.saturating_sub(offset) as usize];
        let mut pos = offset;
        while pos < end {
            let n = pos / CHUNK_SIZE;
            let within = (pos % CHUNK_SIZE) as usize;
            let take = (end - pos).min(CHUNK_SIZE - within as u64) as usize;
            let dst = &mut out[(pos - offset) as usize..][..take];
            let pending = version == Version::Live && self.chunks.contains_key(&(ino, n));
            if take == CHUNK_SIZE as usize && !pending {
                // A committed chunk of one piece read whole is opened straight into the reply.
                match self.stored_chunk(ino, inode, n, version)? {
                    Some(Chunk { pieces }) if pieces.len() == 1 => {
                        let at = pieces[0].at.absolute();
                        let place = self.sealed.chunk_place(inode.chunks_at(ino), n);
                        let len = self.sealed.read_into(at, &place, dst)?;
                        check_piece_len(at, &pieces[0], len)?;
                    }
                    Some(chunk) => {
                        let bytes = self.committed_bytes(inode.chunks_at(ino), n, &chunk)?;
                        let have = bytes.len().min(take);
                        dst[..have].copy_from_slice(&bytes[..have]);
                    }
                    None => {}
                }
            } else if let Some(chunk) = self.chunk(ino, inode, n, version)? {
                let start = within.min(chunk.len());
                let have = (chunk.len() - start).min(take);
                dst[..have].copy_from_slice(&chunk[start..start + have]);
            }
            pos += take as u64;
        }
        Ok(out)
    }

    /// A conflict copy's first change: its chunks were sealed at another inode's number (see
    /// `Inode::sealed_as`), so they are read and made pending here, to be sealed at its own.
    fn unshare(&mut self, ino: u64, inode: &mut Inode) -> Result<()> {
        let Some(at) = inode.sealed_as else { return Ok(()) };
        let src = self.sealed.tree(SealedKind::ChunkMap, at);
        for (n, chunk) in committed_tree::<Chunk>(inode.content, CHUNK_LEAF).entries(&src)? {
            let data = self.committed_bytes(at, n, &chunk)?;
            let version = self.next_chunk_version();
            self.chunks.insert((ino, n), PendingChunk { data, version, kept: None });
        }
        self.files.insert(ino, Trie::empty(CHUNK_LEAF));
        (inode.content, inode.sealed_as) = (None, None);
        Ok(())
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        self.write_clearing(ino, offset, data, false)
    }

    /// `write` by a process without CAP_FSETID: it also clears the file's set-user-ID and
    /// set-group-ID bits (`Inode::drop_set_ids`), in the same inode update.
    pub fn write_unprivileged(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        self.write_clearing(ino, offset, data, true)
    }

    fn write_clearing(&mut self, ino: u64, offset: u64, data: &[u8], drop_set_ids: bool) -> Result<()> {
        self.writable()?;
        let mut inode = self.file_inode(ino)?;
        self.unshare(ino, &mut inode)?;
        if drop_set_ids {
            inode.drop_set_ids();
        }
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let n = pos / CHUNK_SIZE;
            let within = (pos % CHUNK_SIZE) as usize;
            let take = rest.len().min(CHUNK_SIZE as usize - within);
            // Edit a pending chunk in place; load a committed one only the first time, and only
            // if some of its bytes survive: not for a whole-chunk write, nor past the end.
            if !self.chunks.contains_key(&(ino, n)) {
                let keeps_old = take < CHUNK_SIZE as usize && n * CHUNK_SIZE < inode.size;
                let kept = if keeps_old { self.committed_chunk(ino, &inode, n)? } else { None };
                let data = match &kept {
                    Some(chunk) => self.committed_copy(ino, n, chunk, within + take)?,
                    None => Vec::new(),
                };
                self.chunks.insert((ino, n), PendingChunk { data: Arc::new(data), version: 0, kept });
            }
            let version = self.next_chunk_version();
            let pending = self.chunks.get_mut(&(ino, n)).expect("inserted just above");
            pending.version = version;
            if pending.kept.as_ref().is_some_and(|k| within < k.len()) {
                pending.kept = None; // rewritten below the committed pieces' end
            }
            // Copies only if the sealer still holds this chunk's bytes from an earlier write.
            let chunk = Arc::make_mut(&mut pending.data);
            if chunk.len() <= within {
                // Appending (the common case): no zero-fill of bytes about to be overwritten.
                chunk.resize(within, 0);
                chunk.extend_from_slice(&rest[..take]);
            } else {
                if chunk.len() < within + take {
                    chunk.resize(within + take, 0);
                }
                chunk[within..within + take].copy_from_slice(&rest[..take]);
            }
            // A write that reaches a chunk's end has most likely finished it.
            if within + take == CHUNK_SIZE as usize
                && let Some(sealer) = &self.sealer
            {
                let place = self.sealed.chunk_place(ino, n);
                sealer.submit((ino, n), pending.version, pending.data.clone(), place);
            }
            pos += take as u64;
            rest = &rest[take..];
        }
        let now = Time::now();
        inode.size = inode.size.max(offset + data.len() as u64);
        inode.mtime = now;
        inode.ctime = now;
        self.put_inode(ino, inode)
    }

    pub fn truncate(&mut self, ino: u64, size: u64) -> Result<()> {
        self.writable()?;
        let mut inode = self.file_inode(ino)?;
        self.unshare(ino, &mut inode)?;
        if size < inode.size {
            let keep = size.div_ceil(CHUNK_SIZE);
            // Trim the new last chunk so the cut bytes cannot come back if the file grows again.
            if !size.is_multiple_of(CHUNK_SIZE)
                && let Some(mut last) = self.chunk(ino, &inode, keep - 1, Version::Live)?.map(ChunkBytes::into_owned)
            {
                last.truncate((size % CHUNK_SIZE) as usize);
                let version = self.next_chunk_version();
                self.chunks.insert((ino, keep - 1), PendingChunk { data: Arc::new(last), version, kept: None });
            }
            self.chunks.retain(|(i, n), _| *i != ino || *n < keep);
            let sealed = &self.sealed;
            let src = sealed.tree(SealedKind::ChunkMap, ino);
            let map = self.files.entry(ino).or_insert_with(|| committed_tree(inode.content, CHUNK_LEAF));
            for (n, _) in map.entries(&src)? {
                if n >= keep {
                    map.remove(&src, n)?;
                }
            }
        }
        let now = Time::now();
        inode.size = size;
        inode.mtime = now;
        inode.ctime = now;
        self.put_inode(ino, inode)
    }

    fn set_content(inodes: &mut Trie<Inode>, table: &dyn NodeSource, ino: u64, root: Option<Ref>) -> Result<()> {
        if let Some(mut inode) = inodes.get(table, ino)? {
            inode.content = root;
            inodes.insert(table, ino, inode)?;
        }
        Ok(())
    }

    /// Writes the changed nodes of every file's chunk map or directory's entry tree (`kind`)
    /// to `builder` and points each inode at its tree's new root.
    fn commit_contents<V: Value>(
        trees: &HashMap<u64, Trie<V>>,
        kind: SealedKind,
        builder: &mut CommitBuilder<'_>,
        inodes: &mut Trie<Inode>,
        table: &dyn NodeSource,
    ) -> Result<Vec<(u64, Written)>> {
        let mut written = Vec::with_capacity(trees.len());
        for (&ino, tree) in trees {
            let nodes = tree.commit(&mut builder.tree(kind, ino))?;
            Self::set_content(inodes, table, ino, nodes.root())?;
            written.push((ino, nodes));
        }
        Ok(written)
    }

    /// `Trie::committed` for each tree `commit_contents` wrote into `record`.
    fn contents_committed<V: Value>(
        trees: &mut HashMap<u64, Trie<V>>,
        written: Vec<(u64, Written)>,
        kind: SealedKind,
        record: RecordHash,
        sealed: &Sealed,
    ) {
        for (ino, nodes) in written {
            if let Some(tree) = trees.get_mut(&ino) {
                tree.committed(nodes, record, &sealed.tree(kind, ino));
            }
        }
    }

    /// Seals every change into one record (signed if `sign`) and makes it the new base.
    /// Returns None when there was nothing to commit.
    pub fn commit(&mut self, sign: bool, durability: Durability) -> Result<Option<RecordHash>> {
        if !self.is_dirty() {
            return self.writable().map(|()| None);
        }
        self.append_commit(sign, durability).map(Some)
    }

    /// Makes every commit so far durable.
    pub fn sync(&self) -> Result<()> {
        self.sealed.capsule.store().sync()
    }

    /// A signed commit even when nothing changed (a record of one superblock), so that the
    /// unsigned commits before it are proven by a signature within the capsule's T bound.
    pub fn sign_now(&mut self, durability: Durability) -> Result<RecordHash> {
        self.append_commit(true, durability)
    }

    fn append_commit(&mut self, sign: bool, durability: Durability) -> Result<RecordHash> {
        let Some(writer) = self.writer.as_ref() else { return Err(Error::ReadOnlyView) };
        // Work on copies, so a failed append leaves every change in place to retry.
        let mut inodes = self.inodes.clone();
        let mut files = self.files.clone();
        let mut dirs = self.dirs.clone();
        let sealed = &self.sealed;
        let table = sealed.tree(SealedKind::InodeTable, 0);
        let mut builder = CommitBuilder::new(sealed);
        let mut sealed_early = self.sealer.as_ref().map(Sealer::take).unwrap_or_default();
        // Chunks first; their maps then point at them within this record.
        for (&(ino, n), pending) in &self.chunks {
            // The inode is read once per file, to open its chunk map.
            let map = match files.entry(ino) {
                Entry::Occupied(map) => map.into_mut(),
                Entry::Vacant(slot) => {
                    let Some(inode) = inodes.get(&table, ino)? else { continue };
                    slot.insert(committed_tree(inode.content, CHUNK_LEAF))
                }
            };
            let len = pending.data.len();
            let extendable = pending.kept.as_ref().filter(|k| k.pieces.len() < MAX_PIECES && k.len() < len);
            let chunk = match (sealed_early.remove(&(ino, n)), extendable) {
                // Sealed at this place by the sealer, from exactly these bytes.
                (Some((version, sub)), _) if version == pending.version => {
                    Chunk::whole(Ref::Here(builder.push_sealed(sub)), len)
                }
                // The appended bytes as one more piece, joined with the last pieces while they
                // are no longer than it (a binary counter): a chunk appended to line by line
                // keeps about log2(lines) pieces and seals each byte about that many times,
                // where sealing it whole every MAX_PIECES appends cost half a chunk each time.
                (_, Some(kept)) => {
                    let mut pieces = kept.pieces.clone();
                    let mut start = kept.len();
                    while let Some(last) = pieces.last()
                        && last.len as usize <= len - start
                    {
                        start -= last.len as usize;
                        pieces.pop();
                    }
                    let idx = builder.push_kept(&sealed.piece_place(ino, n, start), &pending.data[start..]);
                    pieces.push(Piece { at: Ref::Here(idx), len: (len - start) as u32 });
                    Chunk { pieces }
                }
                _ if len < CHUNK_SIZE as usize => {
                    Chunk::whole(Ref::Here(builder.push_kept(&sealed.chunk_place(ino, n), &pending.data)), len)
                }
                _ => Chunk::whole(Ref::Here(builder.push(&sealed.chunk_place(ino, n), &pending.data)), len),
            };
            map.insert(&sealed.tree(SealedKind::ChunkMap, ino), n, chunk)?;
        }
        let file_nodes = Self::commit_contents(&files, SealedKind::ChunkMap, &mut builder, &mut inodes, &table)?;
        let dir_nodes = Self::commit_contents(&dirs, SealedKind::Directory, &mut builder, &mut inodes, &table)?;
        let inode_nodes = inodes.commit(&mut builder.tree(SealedKind::InodeTable, 0))?;
        let sb = Superblock {
            version: FORMAT_VERSION,
            inodes: inode_nodes.root(),
            allocated: self.allocated.iter().map(|(r, n)| (*r, *n)).collect(),
            chunk_size: CHUNK_SIZE as u32,
        };
        builder.push(&sealed.place(SealedKind::Superblock, 0, 0, 0), &sb.encode());
        let parents = heads::commit_parents(&sealed.capsule, &self.heads)?;
        let record = builder.finish(writer, &parents, sign, durability)?;
        // Every tree's new nodes go to the cache decoded: the next write reads the same paths.
        Self::contents_committed(&mut files, file_nodes, SealedKind::ChunkMap, record, sealed);
        Self::contents_committed(&mut dirs, dir_nodes, SealedKind::Directory, record, sealed);
        inodes.committed(inode_nodes, record, &table);
        self.inodes = inodes;
        self.files.clear();
        self.dirs.clear();
        self.chunks.clear();
        self.heads = vec![record];
        self.touched = false;
        Ok(record)
    }
}

/// One handle fewer to `ino` in `counts`; true when that was its last (it leaves the map).
fn count_down(counts: &mut HashMap<u64, u32>, ino: u64) -> bool {
    let Some(count) = counts.get_mut(&ino) else { return false };
    *count -= 1;
    if *count > 0 {
        return false;
    }
    counts.remove(&ino);
    true
}
