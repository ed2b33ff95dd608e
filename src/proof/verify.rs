//! Checking proofs. `Verified<T>` is made only here, so code that takes one cannot be handed
//! unproven bytes, and no flag skips a proof.

use std::sync::Arc;

use super::cache::ProofCache;
use crate::crypto::keys::Identity;
use crate::crypto::sign::{self, TrustKey};
use crate::record::merkle;
use crate::record::{CapsuleId, KeyGen, Payload, Record, RecordHash, RecordHeader, SubIdx, SubRecord, WriterId};
use crate::store::{CapsuleStore, Durability};
use crate::{Result, VerifyError};

/// A value whose bytes were proven to come, unaltered, from an authorized writer.
#[derive(Debug)]
pub struct Verified<T> {
    inner: T,
    proven_by: RecordHash,
}

impl<T> Verified<T> {
    fn new(inner: T, proven_by: RecordHash) -> Self {
        Self { inner, proven_by }
    }
    pub fn get(&self) -> &T {
        &self.inner
    }
    pub fn into_inner(self) -> T {
        self.inner
    }
    /// The record whose Merkle root covers this value.
    pub fn proven_by(&self) -> RecordHash {
        self.proven_by
    }
}

/// Where a record proof ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    /// A record of the proven record's writer carrying that writer's valid signature.
    Signed { record: RecordHash, writer: WriterId },
    /// A record of the proven record's writer proven before (memory lru or the persisted
    /// proven set).
    Cached { record: RecordHash },
    /// An unsigned record of a writer whose key this machine holds, attested by that key.
    Attested { record: RecordHash, writer: WriterId },
}

impl Anchor {
    pub fn record(&self) -> RecordHash {
        match *self {
            Anchor::Signed { record, .. } | Anchor::Cached { record } | Anchor::Attested { record, .. } => record,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RecordProof {
    /// From the record proven to the anchor, each a parent of the next.
    pub chain: Vec<RecordHash>,
    pub anchor: Anchor,
}

#[derive(Clone, Debug)]
pub struct SubRecordProof {
    pub record: RecordProof,
    pub idx: SubIdx,
    pub count: u32,
    pub path_len: usize,
    /// The content key generation the record names (what opens a sealed payload).
    pub key_gen: KeyGen,
}

/// Which earlier proofs a prover may stop at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// The memory lru and the store's persisted proven set (normal reads).
    MemoryAndStore,
    /// Only proofs made through this prover's own cache (a full audit trusts nothing older).
    MemoryOnly,
}

/// Where a prover reads record and sub-record bytes. Untrusted, whatever the source (the
/// local store, a replica): every byte is checked before anything is believed.
pub trait RecordSource {
    fn record_bytes(&self, h: &RecordHash) -> Result<Option<Vec<u8>>>;
    fn sub_record_bytes(&self, h: &RecordHash, idx: SubIdx) -> Result<Option<Vec<u8>>>;
}

impl RecordSource for CapsuleStore {
    fn record_bytes(&self, h: &RecordHash) -> Result<Option<Vec<u8>>> {
        CapsuleStore::record_bytes(self, h)
    }
    fn sub_record_bytes(&self, h: &RecordHash, idx: SubIdx) -> Result<Option<Vec<u8>>> {
        CapsuleStore::sub_record_bytes(self, h, idx)
    }
}

/// What this machine trusts beyond signatures, kept in its store: proven marks (a MAC under
/// the local `TrustKey`; without one, none are read or written), attestations of its own
/// writers' unsigned records (a MAC under the writer's key), and the closest-signed-descendant
/// index (only hints: every hop it gives is checked). Nothing here can be forged by someone
/// who can write the store but not read the key files.
#[derive(Clone, Copy)]
pub struct TrustState<'a> {
    pub capsule: CapsuleId,
    pub store: &'a CapsuleStore,
    pub key: Option<&'a TrustKey>,
    /// Identities whose keys this machine holds: they attest their own unsigned records.
    pub local: &'a [Identity],
}

impl TrustState<'_> {
    /// Whether `record` carries a valid proven mark. A mark that does not verify was not made
    /// here: it is ignored (and logged), and the record is proven afresh.
    pub fn is_proven(&self, record: &RecordHash) -> Result<bool> {
        let Some(key) = self.key else { return Ok(false) };
        let Some(mark) = self.store.proven_mark(record)? else { return Ok(false) };
        let valid = key.check_mark(&self.capsule, record, &mark);
        if !valid {
            tracing::warn!(?record, "ignoring a proven mark this machine did not make (the store was altered)");
        }
        Ok(valid)
    }

    /// Adds records to the persisted proven set. A lost mark costs only a re-proof, so the
    /// write need not be durable.
    pub fn save_proven(&self, records: &[RecordHash]) -> Result<()> {
        let Some(key) = self.key else { return Ok(()) };
        let mut batch = self.store.batch();
        records.iter().for_each(|h| batch.mark_proven(h, key.mark(&self.capsule, h)));
        self.store.write(batch, Durability::Buffered)
    }

    /// The local writer whose key attests unsigned `record`, if one does.
    fn attested_by_local_key(&self, record: RecordHash, header: &RecordHeader) -> Result<Option<WriterId>> {
        let Some(identity) = self.local.iter().find(|i| i.writer() == header.writer) else { return Ok(None) };
        let Some(mac) = self.store.attestation(&record)? else { return Ok(None) };
        Ok(sign::check_attestation(identity.key(), &self.capsule, &record, &mac).then_some(header.writer))
    }
}

/// Proves records and sub-records of one capsule: bytes from `source`, checked against
/// signatures, the writers' rights `authority` gives, the local `trust` state and earlier
/// proofs in `cache`.
pub struct Prover<'a> {
    pub authority: &'a dyn Authority,
    pub source: &'a dyn RecordSource,
    pub trust: TrustState<'a>,
    pub cache: &'a ProofCache,
    pub cache_use: CacheUse,
}

/// Decodes stored record bytes, checking that they hash to the key they were stored under.
pub fn check_record_bytes(record: RecordHash, bytes: &[u8]) -> Result<Record, VerifyError> {
    let parsed = Record::decode(bytes).map_err(|source| VerifyError::Malformed { record, source })?;
    let actual = parsed.hash();
    if actual != record {
        return Err(VerifyError::RecordMismatch { record, actual });
    }
    Ok(parsed)
}

/// Checks what a record claims about itself that needs nothing else: its capsule and its
/// signature. Its writer's rights depend on its parents (`Authority`).
pub fn check_record_claims(capsule: CapsuleId, record: RecordHash, parsed: &Record) -> Result<(), VerifyError> {
    let h = &parsed.header;
    if h.capsule != capsule {
        return Err(VerifyError::WrongCapsule { record, capsule: h.capsule });
    }
    if let Some(sig) = &parsed.signature
        && !sign::verify_record(&h.writer, &record, sig)
    {
        return Err(VerifyError::BadSignature { record, writer: h.writer });
    }
    Ok(())
}

/// Whether a record's writer was allowed to make it: the rights as of its parents, which the
/// membership records among its ancestors set (`capsule::membership`).
pub trait Authority {
    fn check_writer(&self, record: RecordHash, header: &RecordHeader) -> Result<()>;
}

impl Prover<'_> {
    fn load(&self, record: RecordHash) -> Result<Record> {
        let bytes = self.source.record_bytes(&record)?.ok_or(VerifyError::MissingRecord { record })?;
        Ok(check_record_bytes(record, &bytes)?)
    }

    /// Proves `target` and returns its header. A record is proven by its own writer only: by
    /// that writer's signature on it or on a descendant (reached through closest-signed-
    /// descendant links, any records in between), by a record of that writer proven before,
    /// or by that writer's local attestation. Every record of that writer on the way becomes
    /// proven (cached in memory, and persisted in the store's proven set); records of other
    /// writers passed through are checked but not proven by it.
    pub fn prove_record(&self, target: RecordHash) -> Result<(Arc<RecordHeader>, RecordProof)> {
        if let Some(header) = self.cache.get(&target) {
            return Ok((header, RecordProof { chain: vec![target], anchor: Anchor::Cached { record: target } }));
        }
        let mut chain: Vec<RecordHash> = Vec::new();
        let mut headers: Vec<Arc<RecordHeader>> = Vec::new();
        let mut current = target;
        let mut writer = None;
        let anchor = loop {
            let cached = if chain.is_empty() { None } else { self.cache.get(&current) };
            // A record proven before (memory, or the persisted set) needs only its hash check:
            // the hash commits to everything its earlier proof checked.
            let (header, signature, proven_before) = match cached {
                Some(h) => (h, None, true),
                None => {
                    let parsed = self.load(current)?;
                    let persisted = self.cache_use == CacheUse::MemoryAndStore && self.trust.is_proven(&current)?;
                    if !persisted {
                        check_record_claims(self.trust.capsule, current, &parsed)?;
                        self.authority.check_writer(current, &parsed.header)?;
                    }
                    (Arc::new(parsed.header), parsed.signature, persisted)
                }
            };
            if let Some(prev) = chain.last()
                && header.parents.binary_search(prev).is_err()
            {
                return Err(VerifyError::BrokenChain { record: *prev, child: current }.into());
            }
            let own = *writer.get_or_insert(header.writer);
            chain.push(current);
            headers.push(header.clone());
            if header.writer == own {
                if proven_before {
                    break Anchor::Cached { record: current };
                }
                if signature.is_some() {
                    // check_record_claims verified it.
                    break Anchor::Signed { record: current, writer: own };
                }
            }
            match self.trust.store.witness(&current, &own)? {
                Some(w) if w.dist > 0 => current = w.via,
                _ if header.writer != own => return Err(VerifyError::Unanchored { record: target }.into()),
                _ => match self.trust.attested_by_local_key(current, &header)? {
                    Some(writer) => break Anchor::Attested { record: current, writer },
                    None => return Err(VerifyError::Unanchored { record: target }.into()),
                },
            }
        };
        self.remember(&chain, &headers, anchor)?;
        Ok((headers.swap_remove(0), RecordProof { chain, anchor }))
    }

    /// Caches the records of `chain` that its anchor proves: those of the anchor's writer.
    fn remember(&self, chain: &[RecordHash], headers: &[Arc<RecordHeader>], anchor: Anchor) -> Result<()> {
        let own = headers[0].writer;
        for (h, header) in chain.iter().zip(headers).filter(|(_, header)| header.writer == own) {
            self.cache.insert(*h, header.clone());
            let marked_already = matches!(anchor, Anchor::Cached { record } if record == *h);
            if self.cache_use == CacheUse::MemoryAndStore
                && !marked_already
                && let Some(due) = self.cache.queue_mark(*h)
            {
                self.trust.save_proven(&due)?;
            }
        }
        Ok(())
    }

    /// Checks a sub-record's bytes against the Merkle root of its proven record header,
    /// stopping at subtrees verified before.
    fn check_sub_record_of(
        &self,
        record: RecordHash,
        header: &RecordHeader,
        idx: SubIdx,
        bytes: Vec<u8>,
    ) -> Result<Verified<Payload>, VerifyError> {
        let (data, path) = SubRecord::decode_in_place(bytes).map_err(|source| VerifyError::MalformedSubRecord {
            record,
            idx,
            source,
        })?;
        let leaf = merkle::leaf_hash(&data);
        let known = |start, end| self.cache.node(record, start, end);
        let proven = merkle::verify_path(idx.0, header.sub_count, leaf, &path, header.merkle_root, known)
            .ok_or(VerifyError::MerkleMismatch { record, idx })?;
        self.cache.insert_nodes(record, &proven);
        Ok(Verified::new(data, record))
    }

    /// Reads sub-record `idx` of `record` from the source, returning its bytes only once proven.
    pub fn read_sub_record(&self, record: RecordHash, idx: SubIdx) -> Result<(Verified<Payload>, SubRecordProof)> {
        let (header, proof) = self.prove_index(record, idx)?;
        let bytes = self.source.sub_record_bytes(&record, idx)?.ok_or(VerifyError::MissingSubRecord { record, idx })?;
        self.finish_sub_record(record, idx, &header, proof, bytes)
    }

    /// Proves sub-record bytes obtained anywhere (a replica's answer, say) as sub-record `idx`
    /// of `record`, whose header is proven first.
    pub fn check_sub_record(
        &self,
        record: RecordHash,
        idx: SubIdx,
        bytes: Vec<u8>,
    ) -> Result<(Verified<Payload>, SubRecordProof)> {
        let (header, proof) = self.prove_index(record, idx)?;
        self.finish_sub_record(record, idx, &header, proof, bytes)
    }

    /// Proves `record` and checks that it has a sub-record `idx`.
    fn prove_index(&self, record: RecordHash, idx: SubIdx) -> Result<(Arc<RecordHeader>, RecordProof)> {
        let (header, proof) = self.prove_record(record)?;
        if idx.0 >= header.sub_count {
            return Err(VerifyError::IndexOutOfRange { record, idx, count: header.sub_count }.into());
        }
        Ok((header, proof))
    }

    fn finish_sub_record(
        &self,
        record: RecordHash,
        idx: SubIdx,
        header: &RecordHeader,
        proof: RecordProof,
        bytes: Vec<u8>,
    ) -> Result<(Verified<Payload>, SubRecordProof)> {
        let verified = self.check_sub_record_of(record, header, idx, bytes)?;
        let path_len = merkle::path_len(idx.0, header.sub_count);
        Ok((
            verified,
            SubRecordProof { record: proof, idx, count: header.sub_count, path_len, key_gen: header.key_gen },
        ))
    }
}
