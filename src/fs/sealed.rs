//! Between the filesystem and the capsule: nodes and chunks are read through proofs and opened
//! with the generation of the content key their record names; a commit's payloads are sealed
//! with the newest generation as they are added and appended as one record.

use std::sync::{Arc, RwLock};

use crate::capsule::{AppendOptions, Capsule, Parents};
use crate::crypto::aead::{self, ContentKey, OpenError, Place, SealedKind};
use crate::crypto::keys::Identity;
use crate::member::ContentKeys;
use crate::record::{KeyGen, RecordHash, RecordKind, SubIdx, SubRecordBuf};
use crate::store::Durability;
use crate::{Error, Result, VerifyError};

use super::node::CHUNK_SIZE;
use super::payload_cache::Caches;
use super::trie::{DecodedNode, Loc, NodePos, NodeSink, NodeSource};

/// A capsule with the generations of the content key that open and seal its filesystem
/// payloads, and the caches of payloads already proven and opened (both shared by a mount's
/// views of the past).
pub struct Sealed {
    pub capsule: Arc<Capsule>,
    keys: Arc<RwLock<Arc<ContentKeys>>>,
    pub cache: Arc<Caches>,
}

impl Sealed {
    /// `keys` must hold a generation (`member::keyring` makes sure).
    pub fn new(capsule: Arc<Capsule>, keys: ContentKeys) -> Self {
        assert!(keys.current().is_some(), "a key ring with a key in it");
        Self { capsule, keys: Arc::new(RwLock::new(Arc::new(keys))), cache: Arc::default() }
    }

    /// Another view of the same capsule, sharing the keys and the caches.
    pub fn share(&self) -> Self {
        Self { capsule: self.capsule.clone(), keys: self.keys.clone(), cache: self.cache.clone() }
    }

    pub fn keys(&self) -> Arc<ContentKeys> {
        self.keys.read().expect("no panics while locked").clone()
    }

    /// Takes `keys` from now on, for this view and those it shares them with.
    pub fn set_keys(&self, keys: ContentKeys) {
        assert!(keys.current().is_some(), "a key ring with a key in it");
        *self.keys.write().expect("no panics while locked") = Arc::new(keys);
    }

    /// The key new payloads are sealed with: the newest generation held.
    pub fn sealing_key(&self) -> ContentKey {
        self.keys().current().expect("checked when set").clone()
    }

    /// Opens a payload of `at.record` with the key of `generation`, the one that record names
    /// (its proof says which).
    fn open_with<R>(
        &self,
        at: Loc,
        place: &Place,
        generation: KeyGen,
        mut open: impl FnMut(&ContentKey) -> std::result::Result<R, OpenError>,
    ) -> Result<R> {
        let keys = self.keys();
        let candidates = keys.get(generation);
        if candidates.is_empty() {
            return Err(no_key(at.record, generation, keys.newest()));
        }
        candidates.iter().find_map(|key| open(key).ok()).ok_or_else(|| seal_broken(at, place))
    }

    pub fn place(&self, kind: SealedKind, object: u64, offset: u64, level: u8) -> Place {
        Place { capsule: self.capsule.id(), kind, object, offset, level }
    }

    /// Where chunk `n` of file `ino` is sealed: one definition for the reads, the commit and
    /// the sealer thread, which must agree on it.
    pub fn chunk_place(&self, ino: u64, n: u64) -> Place {
        self.piece_place(ino, n, 0)
    }

    /// Where the piece of chunk `n` of file `ino` that starts `start` bytes into the chunk is
    /// sealed: at its byte offset in the file, so pieces cannot be reordered or moved.
    pub fn piece_place(&self, ino: u64, n: u64, start: usize) -> Place {
        self.place(SealedKind::Chunk, ino, n * CHUNK_SIZE + start as u64, 0)
    }

    /// Reads one payload through its proof and opens it, or takes it from the cache of
    /// payloads that passed both before; the cache keeps what is read here.
    pub fn read(&self, at: Loc, place: &Place) -> Result<Arc<Vec<u8>>> {
        if let Some(plain) = self.cache.plain.get(at, place) {
            return Ok(plain);
        }
        let (sealed, proof) = self.capsule.read_sub_record(at.record, at.idx)?;
        let plain = Arc::new(self.open_with(at, place, proof.key_gen, |key| aead::open(key, place, sealed.get()))?);
        self.cache.plain.insert(at, *place, plain.clone(), plain.len());
        Ok(plain)
    }

    /// A payload read whole into `out` (a chunk for a read that covers all of it): opened
    /// straight into place, not kept in the cache, unless the cache has it already. The
    /// kernel's page cache keeps it: keeping it here too, a 512 MiB sequential read filled
    /// 256 MiB of fresh memory (page faults and zeroing were a tenth of the read's CPU). Returns how many bytes it wrote; the rest of `out` is left
    /// alone (a short chunk ends in a hole).
    pub fn read_into(&self, at: Loc, place: &Place, out: &mut [u8]) -> Result<usize> {
        let cached = self.cache.plain.get(at, place);
        let plain = match cached {
            Some(plain) => plain,
            None => {
                let (sealed, proof) = self.capsule.read_sub_record(at.record, at.idx)?;
                let len = sealed.get().len().saturating_sub(aead::SEAL_OVERHEAD);
                let generation = proof.key_gen;
                if len <= out.len() {
                    self.open_with(at, place, generation, |key| {
                        aead::open_into(key, place, sealed.get(), &mut out[..len])
                    })?;
                    return Ok(len);
                }
                Arc::new(self.open_with(at, place, generation, |key| aead::open(key, place, sealed.get()))?)
            }
        };
        let len = plain.len().min(out.len());
        out[..len].copy_from_slice(&plain[..len]);
        Ok(len)
    }

    /// The source for the tree of `object` (an inode, or 0 for the inode table).
    pub fn tree(&self, kind: SealedKind, object: u64) -> TreeSource<'_> {
        TreeSource { sealed: self, kind, object }
    }
}

fn no_key(record: RecordHash, generation: KeyGen, newest: Option<KeyGen>) -> Error {
    Error::NoKey(format!(
        "{record:?} is sealed under generation {} of the content key, and this identity holds generations up to {}: \
         it was removed from the capsule after that record's writer had it (`capsulefs members NAME` shows who is \
         in), or the membership record with the new key has not been pulled yet (`capsulefs pull NAME`)",
        generation.0,
        newest.map_or(0, |g| g.0)
    ))
}

fn seal_broken(at: Loc, place: &Place) -> crate::Error {
    tracing::error!(record = ?at.record, idx = at.idx.0, ?place, "payload does not open at its place");
    VerifyError::SealBroken { record: at.record, idx: at.idx }.into()
}

pub struct TreeSource<'a> {
    sealed: &'a Sealed,
    kind: SealedKind,
    object: u64,
}

fn level(pos: NodePos) -> u8 {
    u8::try_from(pos.depth).expect("tree depth is at most 16")
}

impl TreeSource<'_> {
    fn place(&self, pos: NodePos) -> Place {
        self.sealed.place(self.kind, self.object, pos.prefix, level(pos))
    }
}

impl NodeSource for TreeSource<'_> {
    fn load(&self, at: Loc, pos: NodePos) -> Result<Arc<Vec<u8>>> {
        self.sealed.read(at, &self.place(pos))
    }

    fn decoded(&self, at: Loc, pos: NodePos) -> Option<DecodedNode> {
        self.sealed.cache.nodes.get(at, &self.place(pos))
    }

    fn keep_decoded(&self, at: Loc, pos: NodePos, node: DecodedNode, weight: usize) {
        self.sealed.cache.nodes.insert(at, self.place(pos), node, weight);
    }
}

/// The sealed payloads of one commit, in sub-record order.
pub struct CommitBuilder<'a> {
    sealed: &'a Sealed,
    /// Every payload of one commit is sealed with one key, the one its record names.
    key: ContentKey,
    payloads: Vec<SubRecordBuf>,
    /// Plaintexts of the tree nodes (and partial chunks) sealed here: once the record is
    /// appended they go to the payload cache, since the next operation reads them back (whole
    /// chunks would only churn it).
    nodes: Vec<(SubIdx, Place, Vec<u8>)>,
}

impl<'a> CommitBuilder<'a> {
    pub fn new(sealed: &'a Sealed) -> Self {
        Self { sealed, key: sealed.sealing_key(), payloads: Vec::new(), nodes: Vec::new() }
    }

    pub fn push(&mut self, place: &Place, plaintext: &[u8]) -> SubIdx {
        let key = &self.key;
        let sub =
            SubRecordBuf::filled(aead::sealed_len(plaintext.len()), |out| aead::seal_into(key, place, plaintext, out));
        self.push_sealed(sub)
    }

    /// The key this commit's payloads are sealed with.
    pub fn key(&self) -> &ContentKey {
        &self.key
    }

    /// `push`, keeping the plaintext for the payload cache once the record is appended: for a
    /// file's partial last chunk, which the next append reads back to extend (an fsync'ed log
    /// otherwise proves, reads and opens up to 64 KiB per append).
    pub fn push_kept(&mut self, place: &Place, plaintext: &[u8]) -> SubIdx {
        let idx = self.push(place, plaintext);
        self.nodes.push((idx, *place, plaintext.to_vec()));
        idx
    }

    /// A payload sealed before (by `fs::sealer`, with this builder's key, `key()`, and the
    /// place its caller asks for it at).
    pub fn push_sealed(&mut self, sub: SubRecordBuf) -> SubIdx {
        self.payloads.push(sub);
        SubIdx(self.payloads.len() as u32 - 1)
    }

    /// The sink for the tree of `object`.
    pub fn tree(&mut self, kind: SealedKind, object: u64) -> TreeSink<'_, 'a> {
        TreeSink { builder: self, kind, object }
    }

    /// Appends the payloads as one filesystem commit on top of `parents`.
    pub fn finish(
        self,
        writer: &Identity,
        parents: &[RecordHash],
        sign: bool,
        durability: Durability,
    ) -> Result<RecordHash> {
        let opts = AppendOptions { sign, kind: RecordKind::FsCommit, key_gen: self.key.generation(), durability };
        let record = self.sealed.capsule.append_built(writer, Parents::These(parents), self.payloads, opts)?;
        for (idx, place, plain) in self.nodes {
            let weight = plain.len();
            self.sealed.cache.plain.insert(Loc { record, idx }, place, Arc::new(plain), weight);
        }
        Ok(record)
    }
}

pub struct TreeSink<'b, 'a> {
    builder: &'b mut CommitBuilder<'a>,
    kind: SealedKind,
    object: u64,
}

impl NodeSink for TreeSink<'_, '_> {
    fn push(&mut self, pos: NodePos, plaintext: Vec<u8>) -> Result<SubIdx> {
        let place = self.builder.sealed.place(self.kind, self.object, pos.prefix, level(pos));
        let idx = self.builder.push(&place, &plaintext);
        self.builder.nodes.push((idx, place, plaintext));
        Ok(idx)
    }
}
