//! Typed access to one capsule's column families. Key layouts (big-endian integers, so keys
//! sort numerically) are listed in ARCHITECTURE.md; values are format bytes or borsh.

use std::sync::Arc;

use borsh::{BorshDeserialize, BorshSerialize};

use super::kv::{Batch, Cf, Durability, Kv, Staged};
use crate::record::{DeviceId, RecordHash, Seq, SubIdx, WriterId};
use crate::{Result, StoreError};

const METADATA_KEY: &[u8] = b"metadata";
/// The current heads, as sorted 32-byte hashes in one value: heads change on every record, and
/// one key per head would leave a tombstone per record for every later scan to wade through.
const HEADS_KEY: &[u8] = b"heads";
/// The arrival number the next record gets (u64 big-endian).
const NEXT_ORDER_KEY: &[u8] = b"next-order";
/// Present once the store holds a record without its sub-records (a sparse replica): a
/// missing sub-record is then fetched from a replica, not a loss. Forging it hides nothing:
/// what is fetched is proven like anything else, and `verify` counts what is not held.
const SPARSE_KEY: &[u8] = b"sparse";
/// This store's device id (16 bytes), chosen at its first append: the sequence space its
/// writers' records are numbered in.
const DEVICE_KEY: &[u8] = b"device";
/// Present once the witness index is kept per (record, writer) (`proof::witness`); a store
/// from before is reindexed when opened for writing.
const WITNESS_PER_WRITER_KEY: &[u8] = b"witness-per-writer";

/// One of two records one writer's device made with the same sequence number: proof of a
/// fork. `anchor`: for an unsigned record, the records up to one its writer signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    pub writer: WriterId,
    pub device: DeviceId,
    pub seq: Seq,
    pub record: RecordHash,
    pub record_bytes: Vec<u8>,
    pub anchor: Vec<Vec<u8>>,
}

/// Starts an evidence value that carries an anchor chain (borsh `(record, anchor)` follows);
/// a value without it is the record's encoding alone.
const ANCHORED_EVIDENCE: &[u8] = b"capsanc1";

/// Closest descendant of a record that one writer signed: `anchor` is `dist` hops away, first
/// hop `via` (a child of the record). A record its writer signed is its own witness with
/// `dist` 0. Kept per (record, writer): a signature vouches only for its signer's records, so
/// each writer's records are proven through that writer's own signatures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Witness {
    pub anchor: RecordHash,
    pub dist: u32,
    pub via: RecordHash,
}

#[derive(Clone)]
pub struct CapsuleStore {
    kv: Arc<dyn Kv>,
}

fn bad_index(cf: Cf, detail: impl ToString) -> crate::Error {
    StoreError::BadIndex { cf: cf.name(), detail: detail.to_string() }.into()
}

fn hash_value(cf: Cf, v: &[u8]) -> Result<RecordHash> {
    if v.len() != 32 {
        return Err(bad_index(cf, format!("value of {} bytes where a hash belongs", v.len())));
    }
    RecordHash::from_slice(v).map_err(|e| bad_index(cf, e))
}

fn witness_key(h: &RecordHash, w: &WriterId) -> Vec<u8> {
    [&h.as_bytes()[..], &w.as_bytes()[..]].concat()
}

fn sub_key(h: &RecordHash, idx: SubIdx) -> Vec<u8> {
    [&h.as_bytes()[..], &idx.0.to_be_bytes()].concat()
}

/// Notes live in the meta column family under this prefix and their name.
fn note_key(name: &str) -> Vec<u8> {
    [b"note/".as_slice(), name.as_bytes()].concat()
}

/// A sequence space: one writer's records from one device.
fn lane_key(w: &WriterId, d: &DeviceId) -> Vec<u8> {
    [&w.as_bytes()[..], &d.0].concat()
}

fn seq_key(w: &WriterId, d: &DeviceId, seq: Seq) -> Vec<u8> {
    [lane_key(w, d), seq.0.to_be_bytes().to_vec()].concat()
}

/// Bytes of a `seq_key`: writer, device, sequence number.
const SEQ_KEY_LEN: usize = 32 + 16 + 8;

/// Writer, device and sequence number from a key that starts with a `seq_key` (the seqs and
/// evidence column families).
fn seq_key_parts(cf: Cf, key: &[u8]) -> Result<(WriterId, DeviceId, Seq)> {
    let short = || bad_index(cf, format!("a key shorter than {SEQ_KEY_LEN} bytes"));
    let key = key.get(..SEQ_KEY_LEN).ok_or_else(short)?;
    let writer = WriterId::from_slice(&key[..32]).map_err(|e| bad_index(cf, e))?;
    let device = DeviceId(key[32..48].try_into().expect("length checked"));
    Ok((writer, device, Seq(u64::from_be_bytes(key[48..].try_into().expect("length checked")))))
}

impl CapsuleStore {
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        Self { kv }
    }

    pub fn metadata_bytes(&self) -> Result<Option<Vec<u8>>> {
        self.kv.get(Cf::Meta, METADATA_KEY)
    }

    pub fn record_bytes(&self, h: &RecordHash) -> Result<Option<Vec<u8>>> {
        self.kv.get(Cf::Records, h.as_bytes())
    }

    pub fn has_record(&self, h: &RecordHash) -> Result<bool> {
        Ok(self.record_bytes(h)?.is_some())
    }

    /// Whether some records are held without their sub-records (see `SPARSE_KEY`).
    pub fn is_sparse(&self) -> Result<bool> {
        Ok(self.kv.get(Cf::Meta, SPARSE_KEY)?.is_some())
    }

    pub fn sub_record_bytes(&self, h: &RecordHash, idx: SubIdx) -> Result<Option<Vec<u8>>> {
        self.kv.get(Cf::Subs, &sub_key(h, idx))
    }

    /// The length of a stored sub-record, without reading it where the store can tell.
    pub fn sub_record_len(&self, h: &RecordHash, idx: SubIdx) -> Result<Option<usize>> {
        self.kv.value_len(Cf::Subs, &sub_key(h, idx))
    }

    /// The closest descendant of `h` that writer `w` signed, as indexed (a hint: every hop
    /// is checked).
    pub fn witness(&self, h: &RecordHash, w: &WriterId) -> Result<Option<Witness>> {
        let Some(v) = self.kv.get(Cf::Witness, &witness_key(h, w))? else { return Ok(None) };
        borsh::from_slice(&v).map(Some).map_err(|e| bad_index(Cf::Witness, e))
    }

    /// Whether the witness index is kept per writer (see `WITNESS_PER_WRITER_KEY`).
    pub fn witness_per_writer(&self) -> Result<bool> {
        Ok(self.kv.get(Cf::Meta, WITNESS_PER_WRITER_KEY)?.is_some())
    }

    /// Every key of the witness index and of the proven set: what a reindex drops.
    pub fn derived_trust_keys(&self) -> Result<Vec<(Cf, Vec<u8>)>> {
        let mut keys = Vec::new();
        for cf in [Cf::Witness, Cf::Proven] {
            for entry in self.kv.scan(cf, &[], false)? {
                keys.push((cf, entry?.0));
            }
        }
        Ok(keys)
    }

    pub fn heads(&self) -> Result<Vec<RecordHash>> {
        let Some(v) = self.kv.get(Cf::Meta, HEADS_KEY)? else { return Ok(Vec::new()) };
        if v.len() % 32 != 0 {
            return Err(bad_index(Cf::Meta, "heads value is not a list of hashes"));
        }
        v.chunks(32).map(|c| hash_value(Cf::Meta, c)).collect()
    }

    /// A record's height: 1 + its highest parent's (the genesis parent is 0), so every parent
    /// is lower than its children. Derived from verified records when they are stored.
    pub fn height(&self, h: &RecordHash) -> Result<Option<u64>> {
        let Some(v) = self.kv.get(Cf::Heights, h.as_bytes())? else { return Ok(None) };
        let bytes: [u8; 8] = v.try_into().map_err(|_| bad_index(Cf::Heights, "a height is not 8 bytes"))?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    /// A record's membership frontier as kept, MAC first (`capsule::membership` checks it).
    pub fn frontier(&self, h: &RecordHash) -> Result<Option<Vec<u8>>> {
        self.kv.get(Cf::Frontiers, h.as_bytes())
    }

    /// Records kept aside (refused past a revocation's cut-off), by hash, as they came.
    pub fn aside(&self) -> Result<Vec<(RecordHash, Vec<u8>)>> {
        self.kv.scan(Cf::Aside, &[], false)?.map(|e| e.and_then(|(k, v)| Ok((hash_value(Cf::Aside, &k)?, v)))).collect()
    }

    /// The membership records stored, by hash.
    pub fn memberships(&self) -> Result<Vec<RecordHash>> {
        self.kv.scan(Cf::Memberships, &[], false)?.map(|e| hash_value(Cf::Memberships, &e?.0)).collect()
    }

    /// The highest sequence number stored of each of writer `w`'s devices.
    pub fn last_seqs_of(&self, w: &WriterId) -> Result<Vec<(DeviceId, Seq)>> {
        let mut last: Vec<(DeviceId, Seq)> = Vec::new();
        for entry in self.kv.scan(Cf::Seqs, w.as_bytes(), false)? {
            let (_, device, seq) = seq_key_parts(Cf::Seqs, &entry?.0)?;
            match last.last_mut() {
                Some((d, s)) if *d == device => *s = seq,
                _ => last.push((device, seq)),
            }
        }
        Ok(last)
    }

    pub fn record_at(&self, w: &WriterId, d: &DeviceId, seq: Seq) -> Result<Option<RecordHash>> {
        self.kv.get(Cf::Seqs, &seq_key(w, d, seq))?.map(|v| hash_value(Cf::Seqs, &v)).transpose()
    }

    /// The highest sequence number stored of writer `w`'s device `d`.
    pub fn last_seq(&self, w: &WriterId, d: &DeviceId) -> Result<Option<Seq>> {
        let Some(entry) = self.kv.scan(Cf::Seqs, &lane_key(w, d), true)?.next() else { return Ok(None) };
        Ok(Some(seq_key_parts(Cf::Seqs, &entry?.0)?.2))
    }

    /// A note this machine keeps in the store under `name` (authenticated by the caller).
    pub fn note(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.kv.get(Cf::Meta, &note_key(name))
    }

    /// This store's device id, once its first append chose one.
    pub fn device(&self) -> Result<Option<DeviceId>> {
        let Some(v) = self.kv.get(Cf::Meta, DEVICE_KEY)? else { return Ok(None) };
        let bytes: [u8; 16] = v.try_into().map_err(|_| bad_index(Cf::Meta, "the device id is not 16 bytes"))?;
        Ok(Some(DeviceId(bytes)))
    }

    /// The proven mark of `h` as stored (a MAC that `proof::TrustState` checks).
    pub fn proven_mark(&self, h: &RecordHash) -> Result<Option<Vec<u8>>> {
        self.kv.get(Cf::Proven, h.as_bytes())
    }

    pub fn attestation(&self, h: &RecordHash) -> Result<Option<Vec<u8>>> {
        self.kv.get(Cf::Attest, h.as_bytes())
    }

    /// Records in arrival order (oldest first), or newest first when `newest_first`.
    pub fn arrival_order(&self, newest_first: bool) -> Result<impl Iterator<Item = Result<RecordHash>> + '_> {
        Ok(self.kv.scan(Cf::Order, &[], newest_first)?.map(|e| hash_value(Cf::Order, &e?.1)))
    }

    /// The arrival number the next record gets.
    pub fn next_order(&self) -> Result<u64> {
        let Some(v) = self.kv.get(Cf::Meta, NEXT_ORDER_KEY)? else { return Ok(0) };
        let bytes: [u8; 8] = v.try_into().map_err(|_| bad_index(Cf::Meta, "next-order is not 8 bytes"))?;
        Ok(u64::from_be_bytes(bytes))
    }

    /// Equivocation evidence, one entry per conflicting record.
    pub fn evidence(&self) -> Result<Vec<Evidence>> {
        self.kv
            .scan(Cf::Evidence, &[], false)?
            .map(|e| {
                let (k, v) = e?;
                if k.len() != SEQ_KEY_LEN + 32 {
                    return Err(bad_index(Cf::Evidence, format!("key is not {} bytes", SEQ_KEY_LEN + 32)));
                }
                let (writer, device, seq) = seq_key_parts(Cf::Evidence, &k)?;
                let record = hash_value(Cf::Evidence, &k[SEQ_KEY_LEN..])?;
                let (record_bytes, anchor) = match v.strip_prefix(ANCHORED_EVIDENCE) {
                    Some(rest) => borsh::from_slice(rest).map_err(|e| bad_index(Cf::Evidence, e))?,
                    None => (v, Vec::new()),
                };
                Ok(Evidence { writer, device, seq, record, record_bytes, anchor })
            })
            .collect()
    }

    pub fn batch(&self) -> StoreBatch {
        StoreBatch { batch: Batch::default() }
    }

    /// Writes large sub-record values ahead of the batch that names them (`Kv::stage`).
    pub fn stage(&self, values: &[Vec<&[u8]>]) -> Result<Vec<Option<Staged>>> {
        self.kv.stage(values)
    }

    /// Gives back what was staged for a batch that named none of it (`Kv::unstage`).
    pub fn unstage(&self, staged: &[Staged]) -> Result<()> {
        self.kv.unstage(staged)
    }

    pub fn write(&self, batch: StoreBatch, durability: Durability) -> Result<()> {
        if batch.batch.is_empty() {
            return Ok(());
        }
        self.kv.write(batch.batch, durability)
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> Result<()> {
        self.kv.sync()
    }

    /// The raw backend, for tools and tests that must reach below the typed layer.
    pub fn kv(&self) -> &dyn Kv {
        &*self.kv
    }
}

/// A sub-record's stored bytes: whole, or as three pieces one after another (a received
/// payload between its length and its path, not copied to be joined unless the store keeps
/// it inline), or written ahead of the batch (`CapsuleStore::stage`).
pub enum SubValue {
    Bytes(Vec<u8>),
    Pieces { head: [u8; 4], body: Vec<u8>, tail: Vec<u8> },
    Staged(Staged),
}

impl SubValue {
    /// How many bytes it stores (a staged value, in its pack).
    pub fn stored_len(&self) -> usize {
        match self {
            SubValue::Bytes(bytes) => bytes.len(),
            SubValue::Pieces { head, body, tail } => head.len() + body.len() + tail.len(),
            SubValue::Staged(staged) => staged.loc.len as usize,
        }
    }

    /// The bytes to store, in order; none for a staged value.
    pub fn pieces(&self) -> Vec<&[u8]> {
        match self {
            SubValue::Bytes(bytes) => vec![bytes],
            SubValue::Pieces { head, body, tail } => vec![head, body, tail],
            SubValue::Staged(_) => Vec::new(),
        }
    }

    /// The payload alone, without its length and path; None if the bytes do not say where
    /// it ends, or are staged.
    pub fn payload(&self) -> Option<&[u8]> {
        match self {
            SubValue::Bytes(bytes) => {
                let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
                bytes.get(4..4 + len)
            }
            SubValue::Pieces { body, .. } => Some(body),
            SubValue::Staged(_) => None,
        }
    }
}

/// Typed writes, applied together by `CapsuleStore::write`.
pub struct StoreBatch {
    batch: Batch,
}

impl StoreBatch {
    pub fn put_metadata(&mut self, bytes: Vec<u8>) {
        self.batch.put(Cf::Meta, METADATA_KEY, bytes);
    }

    pub fn put_note(&mut self, name: &str, bytes: Vec<u8>) {
        self.batch.put(Cf::Meta, note_key(name), bytes);
    }

    pub fn put_device(&mut self, d: DeviceId) {
        self.batch.put(Cf::Meta, DEVICE_KEY, d.0.to_vec());
    }

    pub fn mark_sparse(&mut self) {
        self.batch.put(Cf::Meta, SPARSE_KEY, vec![1]);
    }

    /// A new record, made a head in place of its parents, as arrival number `order`; returns
    /// the new heads. `heads` are the current ones (`CapsuleStore::heads`, or a copy kept in
    /// memory by the one writer of the store).
    pub fn put_record(
        &mut self,
        h: &RecordHash,
        bytes: Vec<u8>,
        parents: &[RecordHash],
        mut heads: Vec<RecordHash>,
        order: u64,
    ) -> Vec<RecordHash> {
        self.batch.put(Cf::Records, h.as_bytes().to_vec(), bytes);
        heads.retain(|x| !parents.contains(x));
        if let Err(at) = heads.binary_search(h) {
            heads.insert(at, *h);
        }
        self.batch.put(Cf::Meta, HEADS_KEY, heads.iter().flat_map(|x| *x.as_bytes()).collect::<Vec<u8>>());
        self.batch.put(Cf::Order, order.to_be_bytes().to_vec(), h.as_bytes().to_vec());
        self.batch.put(Cf::Meta, NEXT_ORDER_KEY, (order + 1).to_be_bytes().to_vec());
        heads
    }

    pub fn put_sub_record(&mut self, h: &RecordHash, idx: SubIdx, value: SubValue) {
        match value {
            SubValue::Bytes(bytes) => self.batch.put(Cf::Subs, sub_key(h, idx), bytes),
            SubValue::Pieces { head, body, tail } => {
                self.batch.put_pieces(Cf::Subs, sub_key(h, idx), vec![head.to_vec(), body, tail])
            }
            SubValue::Staged(staged) => self.batch.put_staged(Cf::Subs, sub_key(h, idx), staged),
        }
    }

    pub fn put_frontier(&mut self, h: &RecordHash, kept: Vec<u8>) {
        self.batch.put(Cf::Frontiers, h.as_bytes().to_vec(), kept);
    }

    pub fn put_aside(&mut self, h: &RecordHash, record: Vec<u8>) {
        self.batch.put(Cf::Aside, h.as_bytes().to_vec(), record);
    }

    pub fn put_membership(&mut self, h: &RecordHash) {
        self.batch.put(Cf::Memberships, h.as_bytes().to_vec(), Vec::new());
    }

    pub fn put_height(&mut self, h: &RecordHash, height: u64) {
        self.batch.put(Cf::Heights, h.as_bytes().to_vec(), height.to_be_bytes().to_vec());
    }

    pub fn put_seq(&mut self, w: &WriterId, d: &DeviceId, seq: Seq, h: &RecordHash) {
        self.batch.put(Cf::Seqs, seq_key(w, d, seq), h.as_bytes().to_vec());
    }

    pub fn put_witness(&mut self, h: &RecordHash, writer: &WriterId, w: &Witness) {
        self.batch.put(
            Cf::Witness,
            witness_key(h, writer),
            borsh::to_vec(w).expect("borsh writes to a Vec cannot fail"),
        );
    }

    /// Drops an entry `CapsuleStore::derived_trust_keys` listed.
    pub fn delete_derived(&mut self, cf: Cf, key: Vec<u8>) {
        self.batch.delete(cf, key);
    }

    pub fn mark_witness_per_writer(&mut self) {
        self.batch.put(Cf::Meta, WITNESS_PER_WRITER_KEY, vec![1]);
    }

    pub fn mark_proven(&mut self, h: &RecordHash, mark: [u8; 32]) {
        self.batch.put(Cf::Proven, h.as_bytes().to_vec(), mark.to_vec());
    }

    pub fn put_attestation(&mut self, h: &RecordHash, mac: [u8; 32]) {
        self.batch.put(Cf::Attest, h.as_bytes().to_vec(), mac.to_vec());
    }

    pub fn put_evidence(
        &mut self,
        w: &WriterId,
        d: &DeviceId,
        seq: Seq,
        h: &RecordHash,
        record: Vec<u8>,
        anchor: &[Vec<u8>],
    ) {
        let value = match anchor {
            [] => record,
            _ => [ANCHORED_EVIDENCE, &borsh::to_vec(&(record, anchor)).expect("borsh writes to a Vec cannot fail")]
                .concat(),
        };
        self.batch.put(Cf::Evidence, [seq_key(w, d, seq), h.as_bytes().to_vec()].concat(), value);
    }
}
