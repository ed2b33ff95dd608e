//! POSIX operations over one capsule's filesystem state, without FUSE types.
//!
//! State is the inode table of the last commit plus an overlay of changes: the inode table's
//! changed nodes, the changed chunk maps and directories, and written chunks not yet committed.
//! `commit` seals all of it into one record: chunks, then changed tree nodes bottom up, then
//! the superblock last. Reads of committed data go through `Sealed`, so every byte returned
//! was proven and opened first.
//!
//! `Fs` is one type whose operations are spread by concern: this file holds its state,
//! opening and accessors; `following` moves it to newer heads; `directories` names and
//! unnames nodes; `files` reads, writes and tracks open handles; `xattrs` holds extended
//! attributes and provenance; `commits` seals the changes into a record.

mod commits;
mod directories;
mod files;
mod following;
mod xattrs;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::node::{Bucket, Chunk, Inode, Kind, ROOT_INO, Time};
use super::payload_cache::Caches;
use super::sealed::Sealed;
use super::sealer::{ChunkKey, Sealer};
use super::state::State;
use super::trie::{Ref, Trie};
use super::{heads, merge};
use crate::capsule::Capsule;
use crate::crypto::aead::SealedKind;
use crate::crypto::keys::Identity;
use crate::member::ContentKeys;
use crate::record::{RecordHash, RecordKind, SubIdx};
use crate::{Error, Result};
pub use commits::Signing;
pub use following::{Changes, Followed};
pub use xattrs::XattrMode;

/// The longest name component a local disk (ext4) takes, for file names and xattr names alike.
const MAX_NAME: usize = 255;

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

fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl Fs {
    /// The filesystem as of the capsule's filesystem heads, writable by `writer`: one
    /// commit's state, or the deterministic merge of branches made apart (`merge::of_heads`);
    /// empty if there is no commit yet.
    pub fn open(capsule: Arc<Capsule>, keys: impl Into<ContentKeys>, writer: Option<Identity>) -> Result<Self> {
        let fs_heads = heads::filesystem_heads(&capsule)?;
        let sealed = Sealed::new(capsule, keys.into());
        if fs_heads.is_empty() {
            let mut fs = Self::with_state(sealed, writer, State::empty(), Vec::new());
            fs.put_inode(ROOT_INO, Inode::new(Kind::Dir, 0o755, 0, 0))?;
            return Ok(fs);
        }
        match merge::of_heads(&sealed, &fs_heads) {
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
        keys: impl Into<ContentKeys>,
        writer: Option<Identity>,
        record: RecordHash,
    ) -> Result<Self> {
        Self::at(Sealed::new(capsule, keys.into()), writer, record)
    }

    fn at(sealed: Sealed, writer: Option<Identity>, record: RecordHash) -> Result<Self> {
        let state = State::committed(&sealed, record)?;
        Ok(Self::with_state(sealed, writer, state, vec![record]))
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
    pub fn take_keys(&mut self, keys: ContentKeys) {
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
}
