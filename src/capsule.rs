//! One capsule on this machine: signed metadata, local store and proof cache. Appending,
//! accepting records from elsewhere, proving, and auditing everything all go through here.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::crypto::keys::Identity;
use crate::crypto::random_bytes;
use crate::crypto::sign::{self, TrustKey};
use crate::member::Rights;
use crate::member::history::History;
use crate::proof::fork::ForkEvidence;
use crate::proof::verify::{Authority, TrustState, check_record_bytes, check_record_claims};
use crate::proof::{CacheStats, CacheUse, ProofCache, Prover, RecordProof, SubRecordProof, Verified, witness};
use crate::record::codec::{Canonical, FORMAT_VERSION};
use crate::record::{
    CapsuleId, DeviceId, KeyGen, Metadata, NodeHash, Params, Payload, Record, RecordHash, RecordHeader, RecordKind,
    Seq, SignedMetadata, SubIdx, SubRecord, SubRecordBuf, WriterId, merkle,
};
use crate::replica::Replica;
use crate::replica::prefetch::SubRecordSource;
use crate::store::{CapsuleStore, Durability, Kv, SubValue};
use crate::{Error, Fork, Result, StoreError, VerifyError};

/// Records whose proven headers stay in memory.
pub const PROOF_CACHE_RECORDS: usize = 1 << 16;

/// Capacity of the throw-away cache of a proof that ignores earlier proofs.
const FRESH_PROOF_RECORDS: NonZeroUsize = NonZeroUsize::new(256).expect("non-zero");

/// Whether a proof may stop at records proven before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlierProofs {
    Use,
    Ignore,
}

/// How `Capsule::append` writes a record.
#[derive(Clone, Copy, Debug)]
pub struct AppendOptions {
    pub sign: bool,
    pub kind: RecordKind,
    pub key_gen: KeyGen,
    pub durability: Durability,
}

impl Default for AppendOptions {
    fn default() -> Self {
        Self { sign: false, kind: RecordKind::Data, key_gen: KeyGen(0), durability: Durability::Durable }
    }
}

/// Which records a new record names as its parents.
#[derive(Clone, Copy, Debug)]
pub enum Parents<'a> {
    /// Every current head: the record merges everything this store holds.
    AllHeads,
    /// Exactly these (a filesystem commit names the records whose state it contains).
    These(&'a [RecordHash]),
}

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

/// `Capsule::difference` in progress. Records are popped highest first; every parent is
/// lower than its children, so a record's side is settled by the time it is popped.
#[derive(Default)]
struct DifferenceWalk {
    heap: std::collections::BinaryHeap<(u64, RecordHash)>,
    /// Queued records and whether the other side holds them (reachable from its heads).
    theirs: HashMap<RecordHash, bool>,
    /// Queued records not known to be theirs: the walk ends when none is left.
    mine_queued: usize,
}

impl DifferenceWalk {
    fn enqueue(&mut self, capsule: &Capsule, h: RecordHash, theirs: bool) -> Result<()> {
        if h == RecordHash::genesis(capsule.id) {
            return Ok(());
        }
        match self.theirs.get(&h).copied() {
            Some(true) => return Ok(()),
            Some(false) if !theirs => return Ok(()),
            Some(false) => {
                // Queued as ours only, and reachable from their heads after all.
                self.theirs.insert(h, true);
                self.mine_queued -= 1;
                return Ok(());
            }
            None => {}
        }
        let Some(height) = capsule.store.height(&h)? else { return Ok(()) };
        self.theirs.insert(h, theirs);
        self.mine_queued += usize::from(!theirs);
        self.heap.push((height, h));
        Ok(())
    }
}

/// A record from elsewhere that passed every check needing no store (`check_incoming`).
pub struct Incoming {
    hash: RecordHash,
    record: Record,
    subs: Vec<SubValue>,
}

impl Incoming {
    pub fn hash(&self) -> RecordHash {
        self.hash
    }
    pub fn record(&self) -> &Record {
        &self.record
    }
}

/// What `ingest` did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    Stored(RecordHash),
    AlreadyPresent(RecordHash),
}

/// Totals of a full audit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    pub records: u64,
    pub signed: u64,
    pub sub_records: u64,
    pub sub_record_bytes: u64,
    /// Sub-records of a sparse replica not held here (fetched when read).
    pub not_held: u64,
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
    /// Of the heads this process stored: their heights and whether they are signed, so a
    /// commit on top of them reads neither back (nor asks whether its parents are known).
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
}

/// Most records kept aside (`Capsule::set_aside`): a removed writer cannot fill the store.
const MAX_ASIDE: usize = 1024;

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
    filler: OnceLock<SubRecordSource>,
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

/// The Merkle root over the payloads, and each sub-record encoded with its path.
pub(crate) fn sub_records(subs: Vec<SubRecordBuf>) -> (NodeHash, Vec<Vec<u8>>) {
    let leaves: Vec<_> = subs.iter().map(SubRecordBuf::leaf).collect();
    let (root, paths) = merkle::build(&leaves);
    (root, subs.into_iter().zip(paths).map(|(s, path)| s.finish(&path)).collect())
}

fn copied(payloads: &[&[u8]]) -> Vec<SubRecordBuf> {
    payloads.iter().map(|p| SubRecordBuf::copied(p)).collect()
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
        Ok(Self::with_store(check_metadata(&bytes)?, store, local))
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

    pub fn store(&self) -> &CapsuleStore {
        &self.store
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

    /// How many forks this capsule keeps evidence of (counted once, then kept up to date).
    pub fn fork_count(&self) -> Result<usize> {
        let mut state = self.write_lock.lock().expect("no panics while locked");
        match state.forks_held {
            Some(count) => Ok(count),
            None => Ok(*state.forks_held.insert(self.forks()?.len())),
        }
    }

    /// The forks this capsule keeps evidence of: (writer, device, seq), each once.
    pub fn forks(&self) -> Result<Vec<(WriterId, DeviceId, Seq)>> {
        let mut forks: Vec<_> = self.store.evidence()?.into_iter().map(|e| (e.writer, e.device, e.seq)).collect();
        forks.dedup();
        Ok(forks)
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
        self.history.rights_of(self, &self.heads()?)
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
    pub fn announced_at_hand(&self) -> Option<crate::replica::Announced> {
        let state = self.write_lock.try_lock().ok()?;
        Some(crate::replica::Announced { heads: state.heads.clone()?, forks: Some(state.forks_held?) })
    }

    /// Appends one record holding `payloads` as sub-records, on top of every current head.
    pub fn append(&self, writer: &Identity, payloads: &[&[u8]], opts: AppendOptions) -> Result<RecordHash> {
        self.append_built(writer, Parents::AllHeads, copied(payloads), opts)
    }

    /// `append` of sub-records whose payloads were written in place (see `SubRecordBuf`), on
    /// top of `parents`.
    pub fn append_built(
        &self,
        writer: &Identity,
        parents: Parents<'_>,
        subs: Vec<SubRecordBuf>,
        opts: AppendOptions,
    ) -> Result<RecordHash> {
        let sub_count = u32::try_from(subs.len()).map_err(|_| Error::Invalid("too many sub-records".into()))?;
        let mut state = self.write_lock.lock().expect("no panics while locked");
        let mut parents = match parents {
            Parents::AllHeads => state.heads(&self.store)?,
            Parents::These(given) => {
                let mut given = given.to_vec();
                given.sort();
                given.dedup();
                given
            }
        };
        if parents.is_empty() {
            parents.push(RecordHash::genesis(self.id));
        }
        let w = writer.writer();
        let device = state.device(&self.store)?;
        let seq = Seq(state.last_seq(&self.store, &w, &device)?.map_or(1, |s| s.0 + 1));
        let (merkle_root, subs) = sub_records(subs);
        let header = RecordHeader {
            version: FORMAT_VERSION,
            capsule: self.id,
            parents,
            writer: w,
            device,
            seq,
            time_ms: now_ms(),
            kind: opts.kind,
            key_gen: opts.key_gen,
            sub_count,
            merkle_root,
        };
        header.check().map_err(|e| Error::Invalid(format!("record: {e}")))?;
        let h = header.hash();
        let signature = opts.sign.then(|| sign::sign_record(writer.key(), &h));
        let attestation = (!opts.sign).then(|| sign::attest(writer.key(), &self.id, &h));
        // Signed just above: verifying it again was a tenth of an fsync-heavy workload's CPU.
        // `insert` checks the writer's rights.
        let subs = subs.into_iter().map(SubValue::Bytes).collect();
        self.insert(&mut state, h, Record { header, signature }, subs, attestation, opts.durability)?;
        Ok(h)
    }

    /// Accepts a record made elsewhere, with its sub-records' payloads, after checking
    /// everything: encoding, payloads against the Merkle root, capsule, writer rights,
    /// signature, known parents and sequence-number uniqueness.
    pub fn ingest(&self, record_bytes: &[u8], payloads: &[&[u8]], durability: Durability) -> Result<Ingested> {
        self.ingest_checked(
            self.check_incoming(record_bytes, payloads.iter().map(|p| p.to_vec()).collect())?,
            durability,
        )
    }

    /// Every check of a record from elsewhere that needs no store: encoding, payloads against
    /// its Merkle root, capsule, writer rights and signature. `ingest_checked` stores it. Each
    /// payload becomes its sub-record where it lies, between its length and its Merkle path
    /// (`SubValue::Pieces`), not copied into a buffer of its own.
    pub fn check_incoming(&self, record_bytes: &[u8], payloads: Vec<Vec<u8>>) -> Result<Incoming> {
        let record = Record::decode(record_bytes).map_err(VerifyError::Undecodable)?;
        let h = record.hash();
        let leaves: Vec<NodeHash> = payloads.iter().map(|p| merkle::leaf_hash(p)).collect();
        let (root, paths) = merkle::build(&leaves);
        if root != record.header.merkle_root || payloads.len() != record.header.sub_count as usize {
            return Err(VerifyError::PayloadMismatch {
                record: h,
                count: record.header.sub_count,
                actual_count: payloads.len(),
                root: record.header.merkle_root.to_hex(),
            }
            .into());
        }
        check_record_claims(self.id, h, &record)?;
        let subs = payloads
            .into_iter()
            .zip(&paths)
            .map(|(body, path)| {
                let (head, tail) = SubRecord::around(&body, path);
                SubValue::Pieces { head, body, tail }
            })
            .collect();
        Ok(Incoming { hash: h, record, subs })
    }

    /// Writes the large sub-records of `incoming` to the store now (`CapsuleStore::stage`),
    /// so that `ingest_checked` only names them. For records that will be stored: a stream's
    /// next batch is copied in while the one before is synced. A record already held is left
    /// as it is, so a batch pushed twice does not fill the store twice.
    pub fn stage(&self, incoming: &mut Incoming) -> Result<()> {
        if self.store.has_record(&incoming.hash)? {
            return Ok(());
        }
        let values: Vec<Vec<&[u8]>> = incoming.subs.iter().map(SubValue::pieces).collect();
        let staged = self.store.stage(&values)?;
        for (sub, staged) in incoming.subs.iter_mut().zip(staged) {
            if let Some(staged) = staged {
                *sub = SubValue::Staged(staged);
            }
        }
        Ok(())
    }

    /// Stores a record `check_incoming` passed, once its parents are known and its sequence
    /// number is not another record's.
    pub fn ingest_checked(&self, incoming: Incoming, durability: Durability) -> Result<Ingested> {
        let Incoming { hash: h, record, subs } = incoming;
        let mut state = self.write_lock.lock().expect("no panics while locked");
        if self.store.has_record(&h)? {
            return Ok(Ingested::AlreadyPresent(h));
        }
        self.insert(&mut state, h, record, subs, None, durability)?;
        Ok(Ingested::Stored(h))
    }

    /// Checks and stores one new record, whose claims the caller checked, in one atomic
    /// batch. Caller holds `write_lock`.
    fn insert(
        &self,
        state: &mut WriteState,
        h: RecordHash,
        record: Record,
        subs: Vec<SubValue>,
        attestation: Option<[u8; 32]>,
        durability: Durability,
    ) -> Result<()> {
        let header = &record.header;
        // Past the writer's highest number stored, no record can hold this one's already.
        let past_last =
            state.last_seq(&self.store, &header.writer, &header.device)?.is_some_and(|last| header.seq > last);
        let (order, heads_before) = (state.next_order(&self.store)?, state.heads(&self.store)?);
        let facts = &state.head_facts;
        let unread: Vec<RecordHash> = header.parents.iter().filter(|p| !facts.contains_key(p)).copied().collect();
        self.check_parents_known(h, &unread)?;
        let frontier = match self.history.check_writer(self, h, header, true) {
            Err(e @ Error::Verify(VerifyError::Revoked { .. })) => {
                self.keep_aside(h, &record)?;
                return Err(e);
            }
            checked => checked?,
        };
        if !past_last && let Some(first) = self.store.record_at(&header.writer, &header.device, header.seq)? {
            self.check_seq_entry(first, header)?;
            state.forks_held = None;
            return Err(self.keep_evidence(first, h, &record)?);
        }
        let mut batch = self.store.batch();
        let upto = self.history.keep(self, &mut batch, h, header, frontier);
        if subs.len() != header.sub_count as usize {
            batch.mark_sparse(); // a header without its sub-records (`check_incoming_header`)
        }
        let heads = batch.put_record(&h, record.encode(), &header.parents, heads_before, order);
        for (i, sub) in subs.into_iter().enumerate() {
            batch.put_sub_record(&h, SubIdx(i as u32), sub);
        }
        batch.put_seq(&header.writer, &header.device, header.seq, &h);
        let height = self.height_of_child(&header.parents, facts)?;
        batch.put_height(&h, height);
        if let Some(mac) = attestation {
            batch.put_attestation(&h, mac);
        }
        let signed = record.signature.is_some();
        if signed {
            let known_signed = |p: &RecordHash| facts.get(p).is_some_and(|f| f.signed);
            witness::stage_signed(&self.store, &mut batch, self.id, h, &header.parents, &known_signed)?;
        }
        self.store.write(batch, durability)?;
        if let Err(e) = self.history.stored(self, h, header, upto) {
            tracing::warn!(record = ?h, "stored, but its membership entries could not be read yet: {e}");
        }
        state.stored(header.writer, header.device, header.seq);
        state.head_facts.retain(|k, _| heads.contains(k));
        state.head_facts.insert(h, HeadFacts { height, signed });
        (state.heads, state.next_order) = (Some(heads), Some(order + 1));
        state.stored += 1;
        self.stored.notify_all();
        Ok(())
    }

    /// Keeps a record refused past its writer's revocation cut-off, as evidence of what the
    /// removed writer tried (header and signature, not payloads); at most `MAX_ASIDE`.
    fn keep_aside(&self, h: RecordHash, record: &Record) -> Result<()> {
        let held = self.store.aside()?;
        if held.len() >= MAX_ASIDE || held.iter().any(|(k, _)| *k == h) {
            return Ok(());
        }
        let mut batch = self.store.batch();
        batch.put_aside(&h, record.encode());
        self.store.write(batch, Durability::Buffered)
    }

    /// The records kept aside: refused because their writers made them past the cut-off of
    /// a revocation held here. Each checked against its hash.
    pub fn set_aside(&self) -> Result<Vec<(RecordHash, Record)>> {
        self.store.aside()?.into_iter().map(|(h, bytes)| Ok((h, check_record_bytes(h, &bytes)?))).collect()
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

    /// The height a record with `parents` gets: one above the highest of them.
    fn height_of_child(&self, parents: &[RecordHash], facts: &HashMap<RecordHash, HeadFacts>) -> Result<u64> {
        let genesis = RecordHash::genesis(self.id);
        let mut highest = 0;
        for p in parents.iter().filter(|p| **p != genesis) {
            let height = match facts.get(p) {
                Some(f) => f.height,
                None => self
                    .store
                    .height(p)?
                    .ok_or_else(|| StoreError::BadIndex { cf: "heights", detail: format!("{p:?} has no height") })?,
            };
            highest = highest.max(height);
        }
        Ok(highest + 1)
    }

    /// The records this capsule holds that are not ancestors of `theirs` (nor among them),
    /// parents first: what a replica whose heads are `theirs` lacks, as far as this capsule
    /// can tell (heads it does not hold are skipped). Walks down from both sets of heads in
    /// order of height, so it stops once only the other side's records are left: the cost
    /// grows with the difference and the history above its lowest record, not with the
    /// capsule.
    pub fn difference(&self, theirs: &[RecordHash]) -> Result<Vec<RecordHash>> {
        let mut walk = DifferenceWalk::default();
        for h in theirs {
            walk.enqueue(self, *h, true)?;
        }
        for h in self.heads()? {
            walk.enqueue(self, h, false)?;
        }
        let mut missing = Vec::new();
        while walk.mine_queued > 0 {
            let Some((_, h)) = walk.heap.pop() else { break };
            let theirs = walk.theirs[&h];
            if !theirs {
                walk.mine_queued -= 1;
                missing.push(h);
            }
            for p in self.record(h)?.header.parents {
                walk.enqueue(self, p, theirs)?;
            }
        }
        missing.reverse();
        Ok(missing)
    }

    fn check_parents_known(&self, record: RecordHash, parents: &[RecordHash]) -> Result<()> {
        let genesis = RecordHash::genesis(self.id);
        for p in parents {
            if *p != genesis && !self.store.has_record(p)? {
                return Err(VerifyError::UnknownParent { record, parent: *p }.into());
            }
        }
        Ok(())
    }

    /// A sequence index entry is a claim of the store's, not evidence: before two records are
    /// called a fork, the indexed one must really be that writer's record with that number.
    fn check_seq_entry(&self, indexed: RecordHash, header: &RecordHeader) -> Result<()> {
        let first = self.record(indexed)?.header;
        if first.writer != header.writer || first.device != header.device || first.seq != header.seq {
            let detail = format!(
                "{:?} {:?} seq {} points at {indexed:?}, which is not that record",
                header.writer, header.device, header.seq.0
            );
            return Err(StoreError::BadIndex { cf: "seqs", detail }.into());
        }
        Ok(())
    }

    /// The forks this capsule keeps evidence of, as evidence anyone can check: for each
    /// writer, device and sequence number, the first signed record with each other one.
    pub fn fork_evidence(&self) -> Result<Vec<ForkEvidence>> {
        let mut groups: std::collections::BTreeMap<_, Vec<Record>> = std::collections::BTreeMap::new();
        for e in self.store.evidence()? {
            let record = check_record_bytes(e.record, &e.record_bytes)?;
            if record.signature.is_some() {
                groups.entry((e.writer, e.device, e.seq)).or_default().push(record);
            }
        }
        let mut evidence = Vec::new();
        for records in groups.values() {
            if let [first, rest @ ..] = records.as_slice() {
                evidence.extend(rest.iter().map(|r| ForkEvidence::of(first, r)));
            }
        }
        Ok(evidence)
    }

    /// Keeps `evidence` (from a replica, or from another client through one) once it checks:
    /// the fork it proves, if it was not known here; None if it was.
    pub fn take_evidence(&self, evidence: &ForkEvidence) -> Result<Option<Fork>> {
        let fork = evidence.check(self.id)?;
        // A stranger's fork is no one's concern, and would only fill the store.
        if self.rights()?.level(&fork.writer).is_none() && self.last_seqs_of(&fork.writer)?.is_empty() {
            return Err(VerifyError::UnauthorizedWriter { record: fork.first, writer: fork.writer }.into());
        }
        let known = self.store.evidence()?;
        let held = |h: RecordHash| known.iter().any(|e| e.record == h);
        if held(fork.first) && held(fork.second) {
            return Ok(None);
        }
        let mut batch = self.store.batch();
        for (h, bytes) in [(fork.first, &evidence.first), (fork.second, &evidence.second)] {
            batch.put_evidence(&fork.writer, &fork.device, fork.seq, &h, bytes.clone());
        }
        self.store.write(batch, Durability::Durable)?;
        self.write_lock.lock().expect("no panics while locked").forks_held = None;
        tracing::error!("a replica passed on evidence of a fork: {fork}");
        Ok(Some(fork))
    }

    /// Stores both records of a reused sequence number as evidence, and returns the error.
    fn keep_evidence(&self, first: RecordHash, second: RecordHash, record: &Record) -> Result<Error> {
        let (writer, device, seq) = (record.header.writer, record.header.device, record.header.seq);
        let first_bytes = self.store.record_bytes(&first)?.ok_or(VerifyError::MissingRecord { record: first })?;
        let mut batch = self.store.batch();
        batch.put_evidence(&writer, &device, seq, &first, first_bytes);
        batch.put_evidence(&writer, &device, seq, &second, record.encode());
        self.store.write(batch, Durability::Durable)?;
        tracing::error!(
            ?writer,
            ?device,
            seq = seq.0,
            ?first,
            ?second,
            "writer equivocated: two records share a sequence number"
        );
        Ok(VerifyError::Equivocation(Box::new(Fork { writer, device, seq, first, second })).into())
    }

    fn prover(&self) -> Prover<'_> {
        self.prover_with(&self.cache, CacheUse::MemoryAndStore)
    }

    fn prover_with<'a>(&'a self, cache: &'a ProofCache, cache_use: CacheUse) -> Prover<'a> {
        Prover { authority: self, source: &self.store, trust: self.trust(), cache, cache_use }
    }

    /// The encoding of `record` with a signature made now, if it is unsigned and its writer's
    /// key is one this machine holds; None otherwise. The hash stays the same: the signature
    /// lies outside it. (Push signs what a replica would otherwise have to wait for.)
    pub fn sign_own(&self, record: RecordHash) -> Result<Option<Vec<u8>>> {
        let mut parsed = self.record(record)?;
        if parsed.signature.is_some() {
            return Ok(None);
        }
        let Some(identity) = self.local.iter().find(|i| i.writer() == parsed.header.writer) else { return Ok(None) };
        parsed.signature = Some(sign::sign_record(identity.key(), &record));
        Ok(Some(parsed.encode()))
    }

    /// The header of `record`, proven.
    pub fn proven_header(&self, record: RecordHash) -> Result<Arc<RecordHeader>> {
        Ok(self.prover().prove_record(record)?.0)
    }

    /// Proves a record, stopping at earlier proofs or ignoring them.
    pub fn prove_record(&self, record: RecordHash, earlier: EarlierProofs) -> Result<RecordProof> {
        match earlier {
            EarlierProofs::Use => Ok(self.prover().prove_record(record)?.1),
            EarlierProofs::Ignore => {
                let fresh = ProofCache::new(FRESH_PROOF_RECORDS);
                Ok(self.prover_with(&fresh, CacheUse::MemoryOnly).prove_record(record)?.1)
            }
        }
    }

    /// Proves a sub-record without returning its bytes.
    pub fn prove_sub_record(&self, record: RecordHash, idx: SubIdx, earlier: EarlierProofs) -> Result<SubRecordProof> {
        match earlier {
            EarlierProofs::Use => Ok(self.prover().read_sub_record(record, idx)?.1),
            EarlierProofs::Ignore => {
                let fresh = ProofCache::new(FRESH_PROOF_RECORDS);
                Ok(self.prover_with(&fresh, CacheUse::MemoryOnly).read_sub_record(record, idx)?.1)
            }
        }
    }

    /// Sub-record `idx` of `record`, returned only after it is proven. A sparse replica that
    /// does not hold it fetches it from the replica `fill_from` named, proves it against the
    /// stored header, keeps it, and returns it.
    pub fn read_sub_record(&self, record: RecordHash, idx: SubIdx) -> Result<(Verified<Payload>, SubRecordProof)> {
        let read = self.prover().read_sub_record(record, idx);
        let Some(source) = self.filler.get() else { return read };
        match &read {
            Err(Error::Verify(VerifyError::MissingSubRecord { .. })) => {}
            // A kept copy that is damaged (or never reached the disk before a power cut: kept
            // copies are not synced) is fetched again, and proven like the first time.
            Err(
                e @ (Error::Verify(VerifyError::MerkleMismatch { .. } | VerifyError::MalformedSubRecord { .. })
                | Error::Store(_)),
            ) => tracing::warn!("{e}: fetching sub-record {} of {record:?} again from {}", idx.0, source.describe()),
            _ => return read,
        }
        let (prover, mut batch, mut asked) = (self.prover(), self.store.batch(), None);
        // The rest of the run is kept too, each proven first (a bad one is left out: a read
        // of it fetches it again, and fails then if it is still bad).
        for (i, bytes) in source.run_holding(record, idx)? {
            match prover.check_sub_record(record, i, bytes.clone()) {
                Ok(proven) => {
                    batch.put_sub_record(&record, i, SubValue::Bytes(bytes));
                    if i == idx {
                        asked = Some(proven);
                    }
                }
                Err(e) if i == idx => return Err(e),
                Err(e) => tracing::debug!("not keeping sub-record {} of {record:?}: {e}", i.0),
            }
        }
        let proven = asked.ok_or_else(|| {
            Error::Replica(format!(
                "{}: lost sub-record {} of {record:?}, which this sparse copy does not hold either: \
                 read it from another replica (`capsulefs pull NAME URL`)",
                source.describe(),
                idx.0
            ))
        })?;
        if let Err(e) = self.store.write(batch, Durability::Cache) {
            // A store opened read-only beside a mount: the next read fetches it again.
            tracing::debug!("not keeping fetched sub-records: {e}");
        }
        Ok(proven)
    }

    /// Makes this a sparse replica's capsule: sub-records it does not hold are fetched from
    /// `source` when read (and proven like any other). Set once; later calls are ignored.
    pub fn fill_from(&self, source: Arc<dyn Replica>) {
        let _ = self.filler.set(SubRecordSource::new(source));
    }

    /// Every check `check_incoming` makes that needs no payloads: for a sparse replica, which
    /// takes a record's header now and its sub-records when they are read (each proven against
    /// the header's Merkle root then).
    pub fn check_incoming_header(&self, record_bytes: &[u8]) -> Result<Incoming> {
        let record = Record::decode(record_bytes).map_err(VerifyError::Undecodable)?;
        let h = record.hash();
        check_record_claims(self.id, h, &record)?;
        Ok(Incoming { hash: h, record, subs: Vec::new() })
    }

    /// Stored record `h`, checked against its hash (not proven): for walks of the DAG's shape.
    pub fn record(&self, h: RecordHash) -> Result<Record> {
        let bytes = self.store.record_bytes(&h)?.ok_or(VerifyError::MissingRecord { record: h })?;
        Ok(check_record_bytes(h, &bytes)?)
    }

    /// Stored records, newest first, each checked against its hash (not proven).
    pub fn log(&self) -> Result<impl Iterator<Item = Result<(RecordHash, Record)>> + '_> {
        Ok(self.store.arrival_order(true)?.map(|h| {
            let h = h?;
            Ok((h, self.record(h)?))
        }))
    }

    /// `log` without the records that fail their own check, each logged as left out of
    /// `scan`: for scans that must go on past one damaged record. Store errors still end it.
    pub fn intact_log<'a>(&'a self, scan: &'a str) -> Result<impl Iterator<Item = Result<(RecordHash, Record)>> + 'a> {
        Ok(self.log()?.filter(move |entry| match entry {
            Err(Error::Verify(e)) => {
                tracing::warn!("{scan}: leaving out a record that fails its check: {e}");
                false
            }
            _ => true,
        }))
    }

    /// Finds a record by full hash, unique hex prefix (at least 4 digits), or `head`.
    pub fn resolve(&self, reference: &str) -> Result<RecordHash> {
        if reference == "head" {
            return match self.heads()?.as_slice() {
                [one] => Ok(*one),
                [] => Err(Error::NotFound("a head (the capsule has no records)".into())),
                _ => Err(Error::Invalid("the capsule has several heads: name the record by hash".into())),
            };
        }
        if reference.len() == 64 {
            return RecordHash::from_hex(reference).map_err(|e| Error::Invalid(e.to_string()));
        }
        let lower = reference.to_ascii_lowercase();
        if lower.len() < 4 || lower.len() > 64 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Invalid(format!(
                "'{reference}' is not a record hash or a prefix of at least 4 hex digits"
            )));
        }
        let byte_prefix = hex::decode(&lower[..lower.len() & !1]).expect("checked hex digits");
        let mut found = Vec::new();
        for entry in self.store.kv().scan(crate::store::Cf::Records, &byte_prefix, false)? {
            let h = RecordHash::from_slice(&entry?.0)
                .map_err(|e| StoreError::BadIndex { cf: "records", detail: e.to_string() })?;
            if h.to_hex().starts_with(&lower) {
                found.push(h);
            }
            if found.len() > 1 {
                return Err(Error::Invalid(format!("'{reference}' matches several records: give more digits")));
            }
        }
        found.pop().ok_or_else(|| Error::NotFound(format!("record {reference}")))
    }

    /// Checks every record and sub-record from scratch, trusting no earlier proof; returns the
    /// first failure. Records are visited in arrival order, so parents come before children.
    pub fn audit(&self) -> Result<AuditReport> {
        let audit_cache = new_cache();
        let prover = self.prover_with(&audit_cache, CacheUse::MemoryOnly);
        let mut report = AuditReport::default();
        let sparse = self.store.is_sparse()?;
        for h in self.store.arrival_order(false)? {
            let h = h?;
            let record = self.record(h)?;
            check_record_claims(self.id, h, &record)?;
            self.check_parents_known(h, &record.header.parents)?;
            // Proven before the indexes are checked: a planted record is unverified data.
            prover.prove_record(h)?;
            let header = &record.header;
            if self.store.record_at(&header.writer, &header.device, header.seq)? != Some(h) {
                let detail =
                    format!("{:?} {:?} seq {} does not point at {h:?}", header.writer, header.device, header.seq.0);
                return Err(StoreError::BadIndex { cf: "seqs", detail }.into());
            }
            for idx in 0..record.header.sub_count {
                let data = match prover.read_sub_record(h, SubIdx(idx)) {
                    Err(Error::Verify(VerifyError::MissingSubRecord { .. })) if sparse => {
                        report.not_held += 1;
                        continue;
                    }
                    read => read?.0,
                };
                report.sub_records += 1;
                report.sub_record_bytes += data.get().len() as u64;
            }
            report.records += 1;
            report.signed += u64::from(record.signature.is_some());
        }
        Ok(report)
    }
}

impl Authority for Capsule {
    fn check_writer(&self, record: RecordHash, header: &RecordHeader) -> Result<()> {
        self.history.check_writer(self, record, header, false).map(drop)
    }
}
