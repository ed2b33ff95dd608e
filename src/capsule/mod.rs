//! One capsule on this machine: signed metadata, local store and proof cache. Every `impl
//! Capsule` lives in this folder, one concern a file: making records here (`write`), the one
//! gate for records from anywhere (`ingest`), proofs and reads (`read`), the DAG's shape
//! (`dag`), forks (`forks`) and full audits (`audit`).

mod audit;
mod dag;
mod forks;
mod incoming;
mod ingest;
pub mod membership;
mod read;
mod write;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use audit::AuditReport;
pub use incoming::{Incoming, Pending, StagedBatch};
pub use ingest::{Admission, Admitted, Ingested};
pub use read::{EarlierProofs, SubRecordFill};
pub(crate) use write::sub_records;
pub use write::{AppendOptions, Parents};

use crate::crypto::keys::Identity;
use crate::crypto::random_bytes;
use crate::crypto::sign::{self, TrustKey};
use crate::proof::verify::TrustState;
use crate::proof::{CacheStats, ProofCache};
use crate::record::codec::{Canonical, FORMAT_VERSION};
use crate::record::{CapsuleId, DeviceId, Metadata, Params, RecordHash, Seq, SignedMetadata, WriterId};
use crate::rights::Rights;
use crate::store::{CapsuleStore, Durability, Kv};
use crate::{Error, Result, VerifyError};
use membership::{History, Scope};

/// Records whose proven headers stay in memory.
pub const PROOF_CACHE_RECORDS: usize = 1 << 16;

/// What a new capsule is made of.
pub struct NewCapsule<'a> {
    pub name: &'a str,
    /// Signs the metadata; always a writer and an admin.
    pub creator: &'a Identity,
    /// Further writers allowed from the start.
    pub writers: Vec<WriterId>,
    pub params: Params,
}

impl<'a> NewCapsule<'a> {
    pub fn new(name: &'a str, creator: &'a Identity) -> Self {
        Self { name, creator, writers: Vec::new(), params: Params::default() }
    }
}

/// The MAC context of the replica watermarks a store keeps.
const WATERMARK_CONTEXT: &str = "capsulefs 2026 what a replica was seen to hold v1";

fn watermark_note(url: &str) -> String {
    format!("replica-held/{}", &blake3::hash(url.as_bytes()).to_hex()[..32])
}

/// What appends and ingests keep between them, under the write lock: copies of store values
/// that only they change, so an fsync'ed commit does not read them back (the reverse scan for
/// a writer's last sequence number alone was a tenth of its CPU).
#[derive(Default)]
struct WriteState {
    /// Each writer's highest sequence number stored from each device, once looked up.
    last_seqs: HashMap<(WriterId, DeviceId), Seq>,
    /// This store's device id, once read (or chosen, at the first append).
    device: Option<DeviceId>,
    heads: Option<Vec<RecordHash>>,
    /// Of the heads this process stored (through the gate, so they prove): their heights,
    /// writers and whether they are signed, so a commit on top of them reads nothing back (nor
    /// asks whether its parents are known or proven).
    head_facts: HashMap<RecordHash, HeadFacts>,
    next_order: Option<u64>,
    /// How many forks evidence is kept of, once counted (dropped when evidence is kept).
    forks_held: Option<usize>,
    /// Records stored by this process, and calls of `wake_waiters`, for `wait_for_records`.
    stored: u64,
    wakeups: u64,
}

#[derive(Clone, Copy)]
struct HeadFacts {
    height: u64,
    writer: WriterId,
    signed: bool,
}

impl WriteState {
    fn heads(&mut self, store: &CapsuleStore) -> Result<Vec<RecordHash>> {
        match &self.heads {
            Some(heads) => Ok(heads.clone()),
            None => Ok(self.heads.insert(store.heads()?).clone()),
        }
    }

    fn next_order(&mut self, store: &CapsuleStore) -> Result<u64> {
        match self.next_order {
            Some(order) => Ok(order),
            None => Ok(*self.next_order.insert(store.next_order()?)),
        }
    }

    fn last_seq(&mut self, store: &CapsuleStore, w: &WriterId, d: &DeviceId) -> Result<Option<Seq>> {
        if let Some(seq) = self.last_seqs.get(&(*w, *d)) {
            return Ok(Some(*seq));
        }
        let found = store.last_seq(w, d)?;
        if let Some(seq) = found {
            self.last_seqs.insert((*w, *d), seq);
        }
        Ok(found)
    }

    fn stored(&mut self, w: WriterId, d: DeviceId, seq: Seq) {
        let last = self.last_seqs.entry((w, d)).or_insert(seq);
        *last = (*last).max(seq);
    }

    /// The device this store numbers its records as: read once, or chosen at random and
    /// stored durably by the first append.
    fn device(&mut self, store: &CapsuleStore) -> Result<DeviceId> {
        if let Some(d) = self.device {
            return Ok(d);
        }
        let device = match store.device()? {
            Some(d) => d,
            None => {
                let d = DeviceId(crate::crypto::random_bytes::<16>());
                let mut batch = store.batch();
                batch.put_device(d);
                store.write(batch, Durability::Durable)?;
                d
            }
        };
        Ok(*self.device.insert(device))
    }

    /// A new device id for this store, stored durably, in place of one whose sequence numbers
    /// ran out.
    fn new_device(&mut self, store: &CapsuleStore) -> Result<DeviceId> {
        let d = DeviceId(crate::crypto::random_bytes::<16>());
        let mut batch = store.batch();
        batch.put_device(d);
        store.write(batch, Durability::Durable)?;
        self.last_seqs.retain(|(_, device), _| *device != d);
        Ok(*self.device.insert(d))
    }
}

pub struct Capsule {
    id: CapsuleId,
    signed: SignedMetadata,
    store: CapsuleStore,
    cache: ProofCache,
    local: Vec<Identity>,
    /// Authenticates the proven marks persisted in the store; without it they stay in memory.
    trust_key: Option<TrustKey>,
    /// One append or ingest at a time: each reads heads and sequence numbers it then updates.
    write_lock: Mutex<WriteState>,
    /// Told each time a record is stored (see `wait_for_records`).
    stored: Condvar,
    /// Where a sparse replica fetches the sub-records it does not hold (`fill_from`).
    filler: OnceLock<Box<dyn SubRecordFill>>,
    /// Where membership records lie, and the rights in force at each record.
    history: History,
}

impl Drop for Capsule {
    fn drop(&mut self) {
        if let Err(e) = self.save_proven() {
            tracing::warn!(%e, "could not save the proven set; those records will be proven again");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Decodes signed metadata and checks the creator's signature over its id.
pub(crate) fn check_metadata(bytes: &[u8]) -> Result<SignedMetadata> {
    let signed = SignedMetadata::decode(bytes).map_err(|e| VerifyError::Metadata(e.to_string()))?;
    let id = signed.metadata.id();
    if !sign::verify_metadata(&signed.metadata.creator, &id, &signed.signature) {
        return Err(VerifyError::Metadata(format!("creator signature over {id:?} does not verify")).into());
    }
    Ok(signed)
}

fn new_cache() -> ProofCache {
    ProofCache::new(NonZeroUsize::new(PROOF_CACHE_RECORDS).expect("constant is non-zero"))
}

impl Capsule {
    /// Makes a new capsule in an empty store. `local` are the identities whose keys this
    /// machine holds (they attest their own unsigned records).
    pub fn create(kv: Arc<dyn Kv>, spec: NewCapsule<'_>, local: Vec<Identity>) -> Result<Self> {
        let creator = spec.creator;
        let mut writers = spec.writers;
        writers.retain(|w| *w != creator.writer());
        writers.sort();
        writers.dedup();
        let metadata = Metadata {
            version: FORMAT_VERSION,
            name: spec.name.to_owned(),
            creator: creator.writer(),
            writers,
            admins: Vec::new(),
            params: spec.params,
            created_ms: now_ms(),
            nonce: random_bytes(),
        };
        metadata.check().map_err(|e| Error::Invalid(format!("capsule '{}': {e}", spec.name)))?;
        let id = metadata.id();
        let signed = SignedMetadata { signature: sign::sign_metadata(creator.key(), &id), metadata };
        Self::start_store(kv, signed, local)
    }

    /// A capsule whose (checked) signed metadata becomes the root of an empty store.
    fn start_store(kv: Arc<dyn Kv>, signed: SignedMetadata, local: Vec<Identity>) -> Result<Self> {
        let store = CapsuleStore::new(kv);
        if store.metadata_bytes()?.is_some() {
            return Err(Error::Exists("a capsule in this store".into()));
        }
        let mut batch = store.batch();
        batch.put_metadata(signed.encode());
        batch.mark_witness_per_writer();
        store.write(batch, Durability::Durable)?;
        Ok(Self::with_store(signed, store, local))
    }

    fn with_store(signed: SignedMetadata, store: CapsuleStore, local: Vec<Identity>) -> Self {
        let id = signed.metadata.id();
        Self {
            id,
            signed,
            store,
            cache: new_cache(),
            local,
            trust_key: None,
            write_lock: Mutex::default(),
            stored: Condvar::new(),
            filler: OnceLock::new(),
            history: History::default(),
        }
    }

    /// Opens the capsule in `kv`, checking its metadata signature.
    pub fn open(kv: Arc<dyn Kv>, local: Vec<Identity>) -> Result<Self> {
        let store = CapsuleStore::new(kv);
        let bytes = store.metadata_bytes()?.ok_or_else(|| Error::NotFound("capsule metadata in this store".into()))?;
        let capsule = Self::with_store(check_metadata(&bytes)?, store, local);
        if !capsule.store.witness_per_writer()? {
            match crate::proof::witness::reindex(&capsule.store, RecordHash::genesis(capsule.id)) {
                Ok(n) => {
                    tracing::info!("reindexed the signatures of {n} records: each writer's records prove by their own")
                }
                Err(e) => tracing::warn!(
                    "the signature index of this store is from an older version and could not be rebuilt now ({e}): unsigned records prove once it is opened for writing"
                ),
            }
        }
        Ok(capsule)
    }

    /// Persists proven marks in the store, authenticated with `key`, and trusts only marks
    /// that `key` made. Without a key, proofs are remembered in memory only.
    pub fn with_trust_key(mut self, key: TrustKey) -> Self {
        self.trust_key = Some(key);
        self
    }

    /// Makes a replica of capsule `id` in an empty store from its signed metadata (as another
    /// replica hands it over), after checking that the metadata is `id`'s and signed by its
    /// creator.
    pub fn adopt(kv: Arc<dyn Kv>, id: CapsuleId, metadata: &[u8], local: Vec<Identity>) -> Result<Self> {
        let signed = check_metadata(metadata)?;
        if signed.metadata.id() != id {
            return Err(VerifyError::Metadata(format!(
                "it is the metadata of {:?}, not of {id:?}",
                signed.metadata.id()
            ))
            .into());
        }
        // The canonical decode re-encoded it byte for byte, so the stored bytes are `metadata`.
        Self::start_store(kv, signed, local)
    }

    /// The signed metadata as stored and exchanged.
    pub fn metadata_bytes(&self) -> Vec<u8> {
        self.signed.encode()
    }

    /// Keeps up to `records` proven record headers in memory (the lru of `proof::cache`).
    pub fn with_proof_cache(mut self, records: NonZeroUsize) -> Self {
        self.cache = ProofCache::new(records);
        self
    }

    pub fn id(&self) -> CapsuleId {
        self.id
    }

    pub fn metadata(&self) -> &Metadata {
        &self.signed.metadata
    }

    /// The store itself, read by the local replica (`replica::local`) and `verify`, and by tests
    /// that inspect it or, playing someone who can write its files, alter it. Every write of
    /// capsulefs's own goes through the capsule (`append`, `admit`).
    pub fn store(&self) -> &CapsuleStore {
        &self.store
    }

    /// Whether record `h` is held here (a record is held only with all its ancestors).
    pub fn holds(&self, h: &RecordHash) -> Result<bool> {
        self.store.has_record(h)
    }

    /// Record `h`'s height (1 + its highest parent's), if it is held.
    pub fn height(&self, h: &RecordHash) -> Result<Option<u64>> {
        self.store.height(h)
    }

    /// Whether some records are held without their sub-records (a sparse copy).
    pub fn is_sparse(&self) -> Result<bool> {
        self.store.is_sparse()
    }

    /// The highest sequence number held of `writer`'s `device`.
    pub fn last_seq(&self, writer: &WriterId, device: &DeviceId) -> Result<Option<Seq>> {
        self.store.last_seq(writer, device)
    }

    /// Makes every write so far durable.
    pub fn sync_to_disk(&self) -> Result<()> {
        self.store.sync()
    }

    /// What replica `url` was last seen to hold, by writer and device: the highest signed
    /// sequence number (`keep_replica_watermarks`). Empty if none was kept, or if the note
    /// does not carry this machine's MAC (made elsewhere, or altered): a note that cannot be
    /// trusted is dropped, which can only cost an alarm, never raise a false one.
    pub fn replica_watermarks(&self, url: &str) -> Result<Vec<(WriterId, DeviceId, Seq)>> {
        let (Some(key), Some(bytes)) = (&self.trust_key, self.store.note(&watermark_note(url))?) else {
            return Ok(Vec::new());
        };
        let Some((body, mac)) = bytes.split_last_chunk::<32>() else { return Ok(Vec::new()) };
        if key.note_mac(WATERMARK_CONTEXT, &[self.id.as_bytes(), url.as_bytes(), body].concat()) != *mac {
            tracing::warn!("ignoring what was noted of {url}: the note is not this machine's");
            return Ok(Vec::new());
        }
        Ok(borsh::from_slice::<Vec<(WriterId, DeviceId, Seq)>>(body).unwrap_or_default())
    }

    /// Keeps `marks` as what replica `url` was seen to hold, so that a replica that goes back
    /// while this machine is away is noticed at the next pull. Needs the trust key.
    pub fn keep_replica_watermarks(&self, url: &str, marks: &[(WriterId, DeviceId, Seq)]) -> Result<()> {
        let Some(key) = &self.trust_key else { return Ok(()) };
        let body = borsh::to_vec(marks).expect("encoding to memory");
        let mac = key.note_mac(WATERMARK_CONTEXT, &[self.id.as_bytes(), url.as_bytes(), &body].concat());
        let mut batch = self.store.batch();
        batch.put_note(&watermark_note(url), [body, mac.to_vec()].concat());
        self.store.write(batch, Durability::Buffered)
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Forgets proofs held in memory (after saving the proven set).
    pub fn clear_proof_cache(&self) -> Result<()> {
        self.save_proven()?;
        self.cache.clear();
        Ok(())
    }

    /// Writes the records proven since the last save to the store's proven set.
    pub fn save_proven(&self) -> Result<()> {
        self.trust().save_proven(&self.cache.take_unsaved())
    }

    /// This machine's trust state for the capsule (see `proof::TrustState`).
    pub fn trust(&self) -> TrustState<'_> {
        TrustState { capsule: self.id, store: &self.store, key: self.trust_key.as_ref(), local: &self.local }
    }

    /// The device this store writes as (chosen and stored now if it has not written yet).
    pub fn device(&self) -> Result<DeviceId> {
        self.write_lock.lock().expect("no panics while locked").device(&self.store)
    }

    /// The rights in force now: the metadata's, with every membership record held applied.
    pub fn rights(&self) -> Result<Arc<Rights>> {
        self.history.rights_of(&Scope::stored(self), &self.heads()?)
    }

    /// The highest sequence number held of each of `writer`'s devices.
    pub fn last_seqs_of(&self, writer: &WriterId) -> Result<Vec<(DeviceId, Seq)>> {
        self.store.last_seqs_of(writer)
    }

    /// Current heads, sorted; a capsule without records has none.
    pub fn heads(&self) -> Result<Vec<RecordHash>> {
        self.write_lock.lock().expect("no panics while locked").heads(&self.store)
    }

    /// What `Replica::announce` answers, when it is at hand: heads and fork count known in
    /// memory and the write lock free. For callers that must not wait (a server's async
    /// handlers); None means ask `announce`.
    pub fn announced_at_hand(&self) -> Option<crate::wire::Announced> {
        let state = self.write_lock.try_lock().ok()?;
        Some(crate::wire::Announced { heads: state.heads.clone()?, forks: Some(state.forks_held?) })
    }

    /// How many records this process has stored in the capsule so far.
    pub fn records_stored(&self) -> u64 {
        self.write_lock.lock().expect("no panics while locked").stored
    }

    /// Waits until this process has stored more than `seen` records, or `timeout` passed, or
    /// `wake_waiters` was called; returns the count. How a background thread (a mount's push)
    /// hears of each commit at once without reading the store over and over.
    pub fn wait_for_records(&self, seen: u64, timeout: Duration) -> u64 {
        let state = self.write_lock.lock().expect("no panics while locked");
        let woken = state.wakeups;
        let (state, _) = self
            .stored
            .wait_timeout_while(state, timeout, |s| s.stored <= seen && s.wakeups == woken)
            .expect("no panics while locked");
        state.stored
    }

    /// Ends every `wait_for_records` now.
    pub fn wake_waiters(&self) {
        self.write_lock.lock().expect("no panics while locked").wakeups += 1;
        self.stored.notify_all();
    }
}
