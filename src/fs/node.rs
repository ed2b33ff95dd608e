//! What the filesystem stores: inodes (in the inode table), directory entries (in each
//! directory's tree), chunk refs (in each file's chunk map) and the superblock of a commit.

use borsh::{BorshDeserialize, BorshSerialize};

use super::trie::{Ref, Value};
use crate::record::codec::{self, Canonical, DecodeError, FORMAT_VERSION};
use crate::record::{DeviceId, RecordHash, WriterId};

/// Bytes per chunk: each chunk is one sealed sub-record.
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
#[borsh(use_discriminant = true)]
#[repr(u8)]
pub enum Kind {
    File = 0,
    Dir = 1,
    Symlink = 2,
    /// A named pipe; the kernel carries its data, the capsule only its inode.
    Fifo = 3,
    /// A unix socket's name; the kernel connects to it, the capsule keeps its inode.
    Socket = 4,
    /// A character device node; `rdev` names the device.
    CharDevice = 5,
    /// A block device node; `rdev` names the device.
    BlockDevice = 6,
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self { secs: d.as_secs() as i64, nanos: d.subsec_nanos() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Inode {
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// Root of the chunk map (file) or entry tree (directory); None while empty.
    pub content: Option<Ref>,
    /// A symlink's target.
    pub target: Vec<u8>,
    /// The device a character or block device node stands for (Linux `dev_t`, as FUSE has it).
    pub rdev: u32,
    /// Extended attributes (user.* only), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The commit that last changed this inode: stored as `Ref::Here`, so it resolves to the
    /// record holding it (which cannot be named before it exists). Provenance xattrs read it.
    pub changed_in: Option<Ref>,
    /// The inode number this file's chunks and chunk map were sealed at, when not its own: a
    /// merge's conflict copy keeps the other version's stored chunks (every machine computes
    /// the same copy, so none may seal anything new). Its first write seals it afresh.
    pub sealed_as: Option<u64>,
}

impl Value for Inode {
    fn resolve(&mut self, base: RecordHash) {
        for r in [&mut self.content, &mut self.changed_in].into_iter().flatten() {
            r.resolve_in_place(base);
        }
    }
}

impl Inode {
    pub fn new(kind: Kind, perm: u16, uid: u32, gid: u32) -> Self {
        let now = Time::now();
        Self {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            content: None,
            target: Vec::new(),
            rdev: 0,
            xattrs: Vec::new(),
            changed_in: None,
            sealed_as: None,
        }
    }

    /// The inode number this file's chunks are sealed at (see `sealed_as`).
    pub fn chunks_at(&self, ino: u64) -> u64 {
        self.sealed_as.unwrap_or(ino)
    }

    /// Clears the bits a change of contents or owner takes away, as Linux does: set-user-ID
    /// always, set-group-ID only with group execute (without it, the bit marks mandatory
    /// locking, not privilege).
    pub fn drop_set_ids(&mut self) {
        self.perm &= !0o4000;
        if self.perm & 0o010 != 0 {
            self.perm &= !0o2000;
        }
    }
}

/// One name in a directory. Entries whose names hash alike share a bucket.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
}

/// The entries of one name hash, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Bucket(pub Vec<DirEntry>);

impl Value for Bucket {}

impl Value for Ref {
    fn resolve(&mut self, base: RecordHash) {
        self.resolve_in_place(base);
    }
}

/// Most pieces one chunk is kept in; an append past them seals the chunk whole again.
pub const MAX_PIECES: usize = 16;

/// One sealed payload holding `len` bytes of a chunk, after the pieces before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Piece {
    pub at: Ref,
    pub len: u32,
}

/// Where a chunk's bytes are: pieces that follow each other. A chunk written whole is one
/// piece; an append to a committed chunk adds a piece of just the bytes it added, so an
/// fsync'ed append seals and stores those bytes, not the whole chunk again.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Chunk {
    pub pieces: Vec<Piece>,
}

impl Value for Chunk {
    fn resolve(&mut self, base: RecordHash) {
        self.pieces.iter_mut().for_each(|p| p.at.resolve_in_place(base));
    }
}

impl Chunk {
    pub fn whole(at: Ref, len: usize) -> Self {
        Self { pieces: vec![Piece { at, len: len as u32 }] }
    }

    /// Bytes in all pieces.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.len as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each piece with the byte offset it starts at within the chunk.
    pub fn with_offsets(&self) -> impl Iterator<Item = (usize, &Piece)> {
        self.pieces.iter().scan(0, |start, p| {
            let at = *start;
            *start += p.len as usize;
            Some((at, p))
        })
    }
}

/// Key of a name in its directory's tree.
pub fn name_key(name: &[u8]) -> u64 {
    let h = blake3::hash(name);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("blake3 gives 32 bytes"))
}

/// Inode numbers are handed out per device, so that files two devices make apart never
/// share a number and a merge can combine them: `range << 32 | n`, where `range` (below
/// 2^29, never 0) comes from the writer and device and `n` counts from 1. Range 0 holds the
/// root alone; numbers from 2^61 are conflict copies (`conflict_copy_ino`).
pub fn inode_range(writer: &WriterId, device: &DeviceId) -> u32 {
    let mut h = blake3::Hasher::new();
    h.update(b"capsulefs inode range v1\0").update(writer.as_bytes()).update(&device.0);
    let n = u32::from_le_bytes(h.finalize().as_bytes()[..4].try_into().expect("blake3 gives 32 bytes"));
    1 + n % ((1 << 29) - 1)
}

/// The number of inode `n` of `range`.
pub fn ranged_ino(range: u32, n: u32) -> u64 {
    u64::from(range) << 32 | u64::from(n)
}

/// Where conflict copies are numbered: from 2^61 up, below the kernel numbers of views.
const CONFLICT_BASE: u64 = 1 << 61;

/// The number of the conflict copy of inode `ino` as changed in record `record`: the same on
/// every machine that computes the merge.
pub fn conflict_copy_ino(record: &RecordHash, ino: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"capsulefs conflict copy v1\0").update(record.as_bytes()).update(&ino.to_le_bytes());
    let n = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("blake3 gives 32 bytes"));
    CONFLICT_BASE | (n & (CONFLICT_BASE - 1))
}

/// The last sub-record of every filesystem commit: where the inode table is.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Superblock {
    pub version: u8,
    pub inodes: Option<Ref>,
    /// Per inode range, the last number handed out in it (see `inode_range`), sorted.
    pub allocated: Vec<(u32, u32)>,
    pub chunk_size: u32,
}

impl Canonical for Superblock {
    fn check(&self) -> Result<(), DecodeError> {
        if self.version != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion(self.version));
        }
        if !self.allocated.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(DecodeError::NonCanonical("inode ranges out of order"));
        }
        if u64::from(self.chunk_size) != CHUNK_SIZE {
            return Err(DecodeError::NonCanonical("this build reads 64 KiB chunks only"));
        }
        Ok(())
    }
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        codec::decode(bytes)
    }
}
