//! The one gate every record passes before a store holds it, whoever made it and whichever
//! path brought it (a server's upload, a pull, a clone, a relay, a local commit): encoding,
//! payloads, capsule and signature (`check_incoming` in `incoming`, no store needed), then, for a batch as
//! a whole, parents held or earlier in the batch, anchoring by each record's own writer, the
//! writer's rights as of the record's parents, and sequence numbers; then one atomic write.
//!
//! A signature vouches only for its signer's records: an unsigned record is taken only with a
//! descendant that its own writer signed (in the same batch, or, during a pull, in a later
//! answer of that pull), or, when it was made on this machine, with its writer's local
//! attestation. A batch is taken whole or not at all, and a refusal leaves the store as it was:
//! large payloads are written with the batch that names them, never ahead of its checks. The
//! only trace a refusal may leave is evidence: fork evidence, and records cut off by a
//! revocation (headers only, bounded).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::incoming::{
    Incoming, MAX_UNSIGNED_WRITERS, Pending, StagedBatch, anchored_within, parents_first, staged_in, with_descendants,
};
use super::membership::{Revocations, Scope, Tentative};
use super::{Capsule, HeadFacts, WriteState};
use crate::proof::witness::{Step, WitnessWalk};
use crate::record::{Record, RecordHash, RecordHeader, RecordKind, SubIdx, WriterId};
use crate::rights::MembershipEntry;
use crate::store::{Durability, Staged, StoreBatch, SubValue};
use crate::{Error, Result, VerifyError};

/// Most records kept aside (`Capsule::set_aside`): a removed writer cannot fill the store.
const MAX_ASIDE: usize = 1024;
/// What `ingest` did with a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    Stored(RecordHash),
    AlreadyPresent(RecordHash),
}

/// How a batch from elsewhere is taken.
pub enum Admission<'a> {
    /// Whole or not at all: an upload to a server, a relay's or a push's destination.
    Whole,
    /// An answer of a pull: records still waiting for their writer's anchor go to `Pending`
    /// (and join a later batch that brings it), records cut off by a revocation held here are
    /// kept out (`Admitted::revoked`), and the rest is taken.
    Pull(&'a mut Pending),
}

/// Where a batch comes from, and so what may anchor its unsigned records.
enum Origin<'a> {
    Elsewhere(Admission<'a>),
    /// Made here by a writer whose key this machine holds: attested by that key.
    Local {
        attestation: Option<[u8; 32]>,
    },
}

/// What a batch brought.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Records stored now, parents first.
    pub stored: Vec<RecordHash>,
    /// Records kept out because a revocation held here cuts them off (with their descendants).
    pub revoked: Vec<RecordHash>,
}

/// The records of a batch that passed so far, as history reads them.
struct BatchView<'a> {
    records: HashMap<RecordHash, &'a Incoming>,
}

impl Tentative for BatchView<'_> {
    fn header(&self, h: &RecordHash) -> Option<&RecordHeader> {
        self.records.get(h).map(|i| &i.record.header)
    }
    fn payloads(&self, h: &RecordHash) -> Option<Vec<&[u8]>> {
        self.records.get(h)?.subs.iter().map(SubValue::payload).collect()
    }
}

/// Why a batch stops short of passing.
enum Refusal {
    /// A record a revocation held here cuts off: fatal to a whole batch, kept out of a pull.
    Revoked(RecordHash, Box<Error>),
    Fatal(Box<Error>),
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal::Fatal(Box::new(e))
    }
}

/// The records of a batch that passed, each with what `History` keeps of it.
type Passed = Vec<(RecordHash, Arc<[RecordHash]>)>;

impl Capsule {
    /// Checks a record made elsewhere, with its sub-records' payloads, and stores it if the
    /// gate takes it alone (a signed record, or one already held).
    pub fn ingest(&self, record_bytes: &[u8], payloads: &[&[u8]], durability: Durability) -> Result<Ingested> {
        let incoming = self.check_incoming(record_bytes, payloads.iter().map(|p| p.to_vec()).collect())?;
        let h = incoming.hash;
        let admitted = self.admit(vec![incoming], Admission::Whole, durability)?;
        Ok(if admitted.stored.is_empty() { Ingested::AlreadyPresent(h) } else { Ingested::Stored(h) })
    }

    /// Takes a batch of records from elsewhere (`check_incoming` passed each), as `how` says,
    /// in one atomic write; records already held are skipped.
    pub fn admit(&self, batch: Vec<Incoming>, how: Admission<'_>, durability: Durability) -> Result<Admitted> {
        let mut state = self.write_lock.lock().expect("no panics while locked");
        self.gate(&mut state, batch, Origin::Elsewhere(how), durability)
    }

    /// Writes the large payloads of `batch` (checked by `check_incoming`) to the store ahead
    /// of the gate, so that copying them overlaps the batch before it being stored and
    /// synced (a server's record stream). Only for a batch that looks taken: every unsigned
    /// record anchored within it by its own writer, every writer a member now or granted in
    /// it; nothing of a stranger's is ever staged. If the gate refuses it anyway (rights as
    /// of its parents, a fork), `admit_staged` gives the room back; if it never reaches the gate (a
    /// quota, a stream cut after it), dropping the `StagedBatch` does.
    pub fn stage_ahead(&self, batch: Vec<Incoming>) -> Result<StagedBatch> {
        // Made first, so that a failure part way gives back what was staged before it.
        let mut staged_batch = StagedBatch { batch, store: self.store.clone() };
        if !anchored_within(&staged_batch.batch) || !self.writers_known(&staged_batch.batch)? {
            return Ok(staged_batch);
        }
        for incoming in staged_batch.batch.iter_mut() {
            if incoming.record.header.kind == RecordKind::Membership || self.store.has_record(&incoming.hash)? {
                continue; // Membership entries are read from memory by the gate; held ones never stored.
            }
            let values: Vec<Vec<&[u8]>> = incoming.subs.iter().map(SubValue::pieces).collect();
            let staged = self.store.stage(&values)?;
            for (sub, staged) in incoming.subs.iter_mut().zip(staged) {
                if let Some(staged) = staged {
                    *sub = SubValue::Staged(staged);
                }
            }
        }
        Ok(staged_batch)
    }

    /// Takes a batch `stage_ahead` made through the gate (`admit`), and gives back what was
    /// staged for a record that is not stored.
    pub fn admit_staged(
        &self,
        mut staged: StagedBatch,
        how: Admission<'_>,
        durability: Durability,
    ) -> Result<Admitted> {
        let batch = std::mem::take(&mut staged.batch);
        let placed = staged_in(&batch);
        let admitted = self.admit(batch, how, durability);
        let stored: HashSet<RecordHash> =
            admitted.as_ref().map(|a| a.stored.iter().copied().collect()).unwrap_or_default();
        let unused: Vec<Staged> = placed.iter().filter(|(h, _)| !stored.contains(h)).map(|(_, s)| *s).collect();
        if !unused.is_empty() {
            self.store.unstage(&unused)?;
        }
        admitted
    }

    /// Whether every writer of `batch` holds a level now, or is granted one in the batch.
    fn writers_known(&self, batch: &[Incoming]) -> Result<bool> {
        // The heads as stored, not through the write lock, which the batch before may hold
        // for its sync.
        let rights = self.history.rights_of(&Scope::stored(self), &self.store.heads()?)?;
        let granted: HashSet<WriterId> = batch
            .iter()
            .filter(|i| i.record.header.kind == RecordKind::Membership)
            .flat_map(|i| i.subs.iter().filter_map(SubValue::payload))
            .filter_map(|p| match MembershipEntry::decode(p) {
                Ok(MembershipEntry::Grant { member, .. }) => Some(member),
                _ => None,
            })
            .collect();
        Ok(batch
            .iter()
            .all(|i| rights.level(&i.record.header.writer).is_some() || granted.contains(&i.record.header.writer)))
    }

    /// A record made here by `append_built`, attested by its writer's key unless signed.
    pub(super) fn admit_local(
        &self,
        state: &mut WriteState,
        h: RecordHash,
        record: Record,
        subs: Vec<SubValue>,
        attestation: Option<[u8; 32]>,
        durability: Durability,
    ) -> Result<()> {
        let incoming = Incoming { hash: h, record, subs };
        self.gate(state, vec![incoming], Origin::Local { attestation }, durability).map(drop)
    }

    /// The gate: everything above, under the write lock.
    fn gate(
        &self,
        state: &mut WriteState,
        batch: Vec<Incoming>,
        mut origin: Origin<'_>,
        durability: Durability,
    ) -> Result<Admitted> {
        let waiting = match &mut origin {
            Origin::Elsewhere(Admission::Pull(pending)) => pending.take(),
            _ => Vec::new(),
        };
        let made_here = matches!(origin, Origin::Local { .. });
        let mut fresh = HashSet::new();
        let mut candidates = Vec::new();
        for incoming in waiting.into_iter().chain(batch) {
            // A record made here now has a number no stored record has: not looked up.
            if fresh.insert(incoming.hash) && (made_here || !self.store.has_record(&incoming.hash)?) {
                candidates.push(incoming);
            }
        }
        let order = parents_first(candidates);
        self.check_batch_parents(state, &order)?;
        let mut admitted = Admitted::default();
        // Kept out: records waiting for an anchor, and records a revocation cuts off.
        let (mut unanchored, mut revoked) = (HashSet::new(), HashSet::new());
        let (batch_writes, passed) = loop {
            let out: HashSet<RecordHash> = unanchored.union(&revoked).copied().collect();
            let out = with_descendants(&order, out);
            let live: Vec<&Incoming> = order.iter().filter(|i| !out.contains(&i.hash)).collect();
            let mut writes = self.store.batch();
            let lacking = self.anchor(&state.head_facts, &live, &origin, &mut writes)?;
            if !lacking.is_empty() {
                match &origin {
                    Origin::Elsewhere(Admission::Pull(_)) => {
                        unanchored.extend(lacking);
                        continue;
                    }
                    _ => return Err(VerifyError::Unanchored { record: lacking[0] }.into()),
                }
            }
            match self.check_rights_and_seqs(state, &live, &mut writes) {
                Ok(passed) => break (writes, passed),
                Err(Refusal::Revoked(h, e)) => {
                    let record = live.iter().find(|i| i.hash == h).map(|i| &i.record);
                    if let Some(record) = record {
                        self.keep_aside(h, record)?;
                    }
                    match &origin {
                        Origin::Elsewhere(Admission::Pull(_)) => {
                            tracing::warn!("kept out: {e}");
                            revoked.insert(h);
                        }
                        _ => return Err(*e),
                    }
                }
                Err(Refusal::Fatal(e)) => return Err(*e),
            }
        };
        let refused = with_descendants(&order, revoked.clone());
        admitted.revoked = order.iter().filter(|i| refused.contains(&i.hash)).map(|i| i.hash).collect();
        let passed_set: HashSet<RecordHash> = passed.iter().map(|(h, _)| *h).collect();
        let mut taken = Vec::new();
        let mut waiting = Vec::new();
        for incoming in order {
            if passed_set.contains(&incoming.hash) {
                taken.push(incoming);
            } else if !refused.contains(&incoming.hash) {
                waiting.push(incoming);
            }
        }
        if let Origin::Elsewhere(Admission::Pull(pending)) = &mut origin {
            pending.keep(waiting)?;
        }
        let attestation = match origin {
            Origin::Local { attestation } => attestation,
            Origin::Elsewhere(_) => None,
        };
        admitted.stored = self.write_batch(state, taken, passed, batch_writes, attestation, durability)?;
        Ok(admitted)
    }

    /// Every parent of the batch's records is the genesis, held, or earlier in the batch.
    fn check_batch_parents(&self, state: &WriteState, order: &[Incoming]) -> Result<()> {
        let genesis = crate::record::RecordHash::genesis(self.id);
        let mut earlier = HashSet::new();
        for incoming in order {
            for p in &incoming.record.header.parents {
                if *p != genesis
                    && !earlier.contains(p)
                    && !state.head_facts.contains_key(p)
                    && !self.store.has_record(p)?
                {
                    return Err(VerifyError::UnknownParent { record: incoming.hash, parent: *p }.into());
                }
            }
            earlier.insert(incoming.hash);
        }
        Ok(())
    }

    /// Stages the witness entries that the signed records of `live` (parents first) bring:
    /// through the batch, and into the signer's own stored records, where each is closer.
    /// Returns the unsigned records that neither a descendant their own writer signed within
    /// the batch anchors, nor (for a record made here) an attestation.
    fn anchor(
        &self,
        facts: &HashMap<RecordHash, HeadFacts>,
        live: &[&Incoming],
        origin: &Origin<'_>,
        writes: &mut StoreBatch,
    ) -> Result<Vec<RecordHash>> {
        let mut unsigned_writers: Vec<WriterId> =
            live.iter().filter(|i| i.record.signature.is_none()).map(|i| i.record.header.writer).collect();
        unsigned_writers.sort();
        unsigned_writers.dedup();
        if unsigned_writers.len() > MAX_UNSIGNED_WRITERS {
            return Err(Error::Invalid(format!(
                "a batch with unsigned records of {} writers; at most {MAX_UNSIGNED_WRITERS}: send it in smaller batches",
                unsigned_writers.len()
            )));
        }
        let index: HashMap<RecordHash, &Incoming> = live.iter().map(|i| (i.hash, *i)).collect();
        let genesis = crate::record::RecordHash::genesis(self.id);
        let mut walk = WitnessWalk::new(&self.store, genesis, index.keys().copied().collect());
        for s in live.iter().filter(|i| i.record.signature.is_some()) {
            let writer = s.record.header.writer;
            let mut step = |h: &RecordHash| -> Result<Option<Step>> {
                if let Some(i) = index.get(h) {
                    let (header, signed) = (&i.record.header, i.record.signature.is_some());
                    return Ok(Some(Step { writer: header.writer, signed, parents: header.parents.clone() }));
                }
                // A head this process stored, signed by this writer: the walk ends there, and
                // an fsync'ed commit on it reads nothing back.
                if facts.get(h).is_some_and(|f| f.writer == writer && f.signed) {
                    return Ok(Some(Step { writer, signed: true, parents: Vec::new() }));
                }
                // Stored records were anchored when they came; only their own writer's get
                // closer anchors, so a signature costs a walk of its signer's records alone.
                let Some(bytes) = self.store.record_bytes(h)? else { return Ok(None) };
                let parsed = Record::decode(&bytes).map_err(|source| VerifyError::Malformed { record: *h, source })?;
                Ok((parsed.header.writer == writer).then(|| Step {
                    writer,
                    signed: parsed.signature.is_some(),
                    parents: parsed.header.parents,
                }))
            };
            walk.from_signed(writes, writer, s.hash, &s.record.header.parents, &mut step)?;
        }
        let attested = matches!(origin, Origin::Local { attestation: Some(_) });
        let mut lacking = Vec::new();
        for i in live.iter().filter(|i| i.record.signature.is_none() && !attested) {
            if walk.witness(&i.hash, &i.record.header.writer)?.is_none() {
                lacking.push(i.hash);
            }
        }
        Ok(lacking)
    }

    /// The rights of each record's writer as of its parents (and revocations held here), and
    /// its sequence number, in order; each record that passes is seen by the ones after it.
    /// Returns each record with what `History` keeps of it.
    fn check_rights_and_seqs(
        &self,
        state: &mut WriteState,
        live: &[&Incoming],
        writes: &mut StoreBatch,
    ) -> Result<Passed, Refusal> {
        let mut view = BatchView { records: HashMap::new() };
        let mut passed = Vec::with_capacity(live.len());
        let mut lanes = HashMap::new();
        for incoming in live {
            let (h, header) = (incoming.hash, &incoming.record.header);
            let frontier = {
                let scope = Scope::with(self, &view);
                match self.history.check_writer(&scope, h, header, Revocations::Apply) {
                    Err(e @ Error::Verify(VerifyError::Revoked { .. })) => {
                        return Err(Refusal::Revoked(h, Box::new(e)));
                    }
                    checked => checked?,
                }
            };
            if let Some(first) = lanes.insert((header.writer, header.device, header.seq), h) {
                state.forks_held = None;
                return Err(self.fork_found(first, incoming, live)?.into());
            }
            let past_last =
                state.last_seq(&self.store, &header.writer, &header.device)?.is_some_and(|last| header.seq > last);
            if !past_last && let Some(first) = self.store.record_at(&header.writer, &header.device, header.seq)? {
                self.check_seq_entry(first, header)?;
                state.forks_held = None;
                return Err(self.fork_found(first, incoming, live)?.into());
            }
            view.records.insert(h, incoming);
            let scope = Scope::with(self, &view);
            let upto = self.history.passed(&scope, writes, h, header, frontier)?;
            passed.push((h, upto));
        }
        Ok(passed)
    }

    /// Writes the records that passed (parents first, with what `passed` says to keep of each)
    /// and everything staged in `writes`, in one batch; then tells the write state, history
    /// and waiters. Returns their hashes. `attestation`: of a record made on this machine.
    fn write_batch(
        &self,
        state: &mut WriteState,
        taken: Vec<Incoming>,
        passed: Passed,
        mut writes: StoreBatch,
        attestation: Option<[u8; 32]>,
        durability: Durability,
    ) -> Result<Vec<RecordHash>> {
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let mut order = state.next_order(&self.store)?;
        let mut heads = state.heads(&self.store)?;
        let mut heights: HashMap<RecordHash, u64> = HashMap::new();
        let mut stored = Vec::with_capacity(taken.len());
        for incoming in taken {
            if incoming.header_only() {
                writes.mark_sparse(); // a header without its sub-records (`check_incoming_header`)
            }
            let Incoming { hash: h, record, subs } = incoming;
            let header = &record.header;
            heads = writes.put_record(&h, record.encode(), &header.parents, heads, order);
            order += 1;
            for (i, sub) in subs.into_iter().enumerate() {
                writes.put_sub_record(&h, SubIdx(i as u32), sub);
            }
            writes.put_seq(&header.writer, &header.device, header.seq, &h);
            let height = self.height_of_child(&header.parents, state, &heights)?;
            writes.put_height(&h, height);
            heights.insert(h, height);
            if let Some(mac) = attestation {
                writes.put_attestation(&h, mac);
            }
            stored.push((h, record.header, record.signature.is_some()));
        }
        self.store.write(writes, durability)?;
        for ((h, header, _), (_, upto)) in stored.iter().zip(passed) {
            if let Err(e) = self.history.stored(self, *h, header, upto) {
                tracing::warn!(record = ?h, "stored, but its membership entries could not be read yet: {e}");
            }
            state.stored(header.writer, header.device, header.seq);
        }
        state.head_facts.retain(|k, _| heads.contains(k));
        for (h, header, signed) in &stored {
            if heads.contains(h) {
                let facts = HeadFacts { height: heights[h], writer: header.writer, signed: *signed };
                state.head_facts.insert(*h, facts);
            }
        }
        state.heads = Some(heads);
        state.next_order = Some(order);
        state.stored += stored.len() as u64;
        self.stored.notify_all();
        Ok(stored.into_iter().map(|(h, _, _)| h).collect())
    }

    /// The height a record with `parents` gets: one above the highest of them.
    fn height_of_child(
        &self,
        parents: &[RecordHash],
        state: &WriteState,
        batch: &HashMap<RecordHash, u64>,
    ) -> Result<u64> {
        let genesis = crate::record::RecordHash::genesis(self.id);
        let mut highest = 0;
        for p in parents.iter().filter(|p| **p != genesis) {
            let height = match (batch.get(p), state.head_facts.get(p)) {
                (Some(h), _) => *h,
                (None, Some(f)) => f.height,
                (None, None) => self.store.height(p)?.ok_or_else(|| crate::StoreError::BadIndex {
                    cf: "heights",
                    detail: format!("{p:?} has no height"),
                })?,
            };
            highest = highest.max(height);
        }
        Ok(highest + 1)
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
        self.store
            .aside()?
            .into_iter()
            .map(|(h, bytes)| Ok((h, crate::proof::verify::check_record_bytes(h, &bytes)?)))
            .collect()
    }
}
