//! Records from elsewhere before the gate: each checked alone, with no store
//! (`check_incoming`: encoding, payloads against the Merkle root, capsule, signature), and the
//! batches they travel in: staged ahead (`StagedBatch`), held while a pull waits for their
//! writer's anchor (`Pending`), ordered parents first, and looked at as a whole (anchored
//! within the batch, descendants of a refused record). The gate itself is `ingest`.

use std::collections::{HashMap, HashSet};

use super::Capsule;
use crate::proof::verify::check_record_claims;
use crate::record::merkle;
use crate::record::{NodeHash, Record, RecordHash, SubRecord, WriterId};
use crate::store::{CapsuleStore, Staged, SubValue};
use crate::{Error, Result, VerifyError};

/// Most records and bytes a pull holds while they wait for their writer's anchor, so a
/// replica that sends unsigned records without end cannot fill this machine's memory.
const MAX_PENDING_RECORDS: usize = 8192;
const MAX_PENDING_BYTES: usize = 64 << 20;
/// Most writers with unsigned records in one batch: anchoring walks the batch once for each.
pub(super) const MAX_UNSIGNED_WRITERS: usize = 64;

/// A record from elsewhere that passed every check needing no store (`check_incoming`).
pub struct Incoming {
    pub(super) hash: RecordHash,
    pub(super) record: Record,
    pub(super) subs: Vec<SubValue>,
}

impl Incoming {
    pub fn hash(&self) -> RecordHash {
        self.hash
    }
    pub fn record(&self) -> &Record {
        &self.record
    }
    pub(super) fn bytes(&self) -> usize {
        self.subs.iter().map(SubValue::stored_len).sum::<usize>() + 256
    }
    /// A header taken without its sub-records (by a sparse replica).
    pub(super) fn header_only(&self) -> bool {
        self.subs.len() != self.record.header.sub_count as usize
    }
}

/// The payloads `stage_ahead` wrote for `batch`, with the record each belongs to.
pub(super) fn staged_in(batch: &[Incoming]) -> Vec<(RecordHash, Staged)> {
    batch
        .iter()
        .flat_map(|i| {
            i.subs.iter().filter_map(move |s| match s {
                SubValue::Staged(staged) => Some((i.hash, *staged)),
                _ => None,
            })
        })
        .collect()
}

/// A checked batch whose payloads may be staged in the store ahead of the gate
/// (`Capsule::stage_ahead`): dropped without going through the gate, it gives back what it
/// staged, so a batch refused before the gate (a quota) or abandoned (a stream cut after it)
/// leaves nothing behind.
pub struct StagedBatch {
    pub(super) batch: Vec<Incoming>,
    pub(super) store: CapsuleStore,
}

impl StagedBatch {
    /// Bytes the batch will take once stored.
    pub fn bytes(&self) -> u64 {
        self.batch.iter().map(|i| i.bytes() as u64).sum()
    }

    /// Bytes each record of the batch will take once stored.
    pub fn sizes(&self) -> HashMap<RecordHash, u64> {
        self.batch.iter().map(|i| (i.hash, i.bytes() as u64)).collect()
    }
}

impl Drop for StagedBatch {
    fn drop(&mut self) {
        let staged: Vec<Staged> = staged_in(&self.batch).into_iter().map(|(_, s)| s).collect();
        if !staged.is_empty()
            && let Err(e) = self.store.unstage(&staged)
        {
            tracing::warn!("giving back the room staged for a batch not taken: {e}");
        }
    }
}

/// Records a pull received before their writer's anchor: held in memory, within bounds, until
/// a later answer of the same pull brings the anchor (then they are stored with it).
#[derive(Default)]
pub struct Pending {
    records: Vec<Incoming>,
    bytes: usize,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.records.len()
    }
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
    /// The records still waiting, parents first.
    pub fn hashes(&self) -> Vec<RecordHash> {
        self.records.iter().map(|i| i.hash).collect()
    }
    pub(super) fn take(&mut self) -> Vec<Incoming> {
        self.bytes = 0;
        std::mem::take(&mut self.records)
    }
    pub(super) fn keep(&mut self, records: Vec<Incoming>) -> Result<()> {
        self.bytes += records.iter().map(Incoming::bytes).sum::<usize>();
        self.records.extend(records);
        if self.records.len() > MAX_PENDING_RECORDS || self.bytes > MAX_PENDING_BYTES {
            let first = self.records[0].hash;
            self.take();
            return Err(Error::Replica(format!(
                "sent more than {MAX_PENDING_RECORDS} records or {} MiB without a signature of their writers \
                 (the first: {first:?}): nothing of them is kept; pull from another replica",
                MAX_PENDING_BYTES >> 20
            )));
        }
        Ok(())
    }
}

impl Capsule {
    /// Every check of a record from elsewhere that needs no store: encoding, payloads against
    /// its Merkle root, capsule and signature. Each payload becomes its sub-record where it
    /// lies, between its length and its Merkle path (`SubValue::Pieces`), not copied into a
    /// buffer of its own.
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

    /// Every check `check_incoming` makes that needs no payloads: for a sparse replica, which
    /// takes a record's header now and its sub-records when they are read (each proven against
    /// the header's Merkle root then).
    pub fn check_incoming_header(&self, record_bytes: &[u8]) -> Result<Incoming> {
        let record = Record::decode(record_bytes).map_err(VerifyError::Undecodable)?;
        let h = record.hash();
        check_record_claims(self.id, h, &record)?;
        Ok(Incoming { hash: h, record, subs: Vec::new() })
    }
}

/// `records` ordered parents before children (among themselves), otherwise as given.
pub(super) fn parents_first(records: Vec<Incoming>) -> Vec<Incoming> {
    let index: HashMap<RecordHash, usize> = records.iter().enumerate().map(|(i, r)| (r.hash, i)).collect();
    let mut placed = vec![false; records.len()];
    let mut order = Vec::with_capacity(records.len());
    for start in 0..records.len() {
        // Depth first, parents before the record; hashes cannot form a cycle, and a record
        // is placed once.
        let mut stack = vec![(start, false)];
        while let Some((i, expanded)) = stack.pop() {
            if placed[i] {
                continue;
            }
            if expanded {
                placed[i] = true;
                order.push(i);
                continue;
            }
            stack.push((i, true));
            for p in &records[i].record.header.parents {
                if let Some(&j) = index.get(p)
                    && !placed[j]
                {
                    stack.push((j, false));
                }
            }
        }
    }
    let mut slots: Vec<Option<Incoming>> = records.into_iter().map(Some).collect();
    order.into_iter().map(|i| slots[i].take().expect("each placed once")).collect()
}

/// Whether every unsigned record of `batch` has a descendant its own writer signed within
/// the batch (the gate's anchoring rule, looking at the batch alone).
pub(super) fn anchored_within(batch: &[Incoming]) -> bool {
    let index: HashMap<RecordHash, &Incoming> = batch.iter().map(|i| (i.hash, i)).collect();
    let mut writers: Vec<WriterId> =
        batch.iter().filter(|i| i.record.signature.is_none()).map(|i| i.record.header.writer).collect();
    writers.sort();
    writers.dedup();
    if writers.len() > MAX_UNSIGNED_WRITERS {
        return false;
    }
    for writer in writers {
        // Up from the writer's signed records through the batch: what is reached is anchored.
        let mut reached: HashSet<RecordHash> = HashSet::new();
        let mut stack: Vec<RecordHash> = batch
            .iter()
            .filter(|i| i.record.header.writer == writer && i.record.signature.is_some())
            .flat_map(|i| i.record.header.parents.iter().copied())
            .collect();
        while let Some(h) = stack.pop() {
            if let Some(i) = index.get(&h)
                && reached.insert(h)
            {
                stack.extend(i.record.header.parents.iter().copied());
            }
        }
        let lacking = batch
            .iter()
            .any(|i| i.record.header.writer == writer && i.record.signature.is_none() && !reached.contains(&i.hash));
        if lacking {
            return false;
        }
    }
    true
}

/// `out` with every record of `order` (parents first) that descends from one in it.
pub(super) fn with_descendants(order: &[Incoming], mut out: HashSet<RecordHash>) -> HashSet<RecordHash> {
    if out.is_empty() {
        return out;
    }
    for incoming in order {
        if incoming.record.header.parents.iter().any(|p| out.contains(p)) {
            out.insert(incoming.hash);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::codec::FORMAT_VERSION;
    use crate::record::{CapsuleId, DeviceId, KeyGen, RecordHeader, RecordKind, Seq};

    fn record(n: u8, parents: &[RecordHash]) -> Incoming {
        let mut parents = parents.to_vec();
        parents.sort();
        let header = RecordHeader {
            version: FORMAT_VERSION,
            capsule: CapsuleId::from_bytes([1; 32]),
            parents,
            writer: WriterId::from_bytes([2; 32]),
            device: DeviceId([3; 16]),
            seq: Seq(u64::from(n) + 1),
            time_ms: 0,
            kind: RecordKind::Data,
            key_gen: KeyGen(0),
            sub_count: 0,
            merkle_root: NodeHash::from_bytes([0; 32]),
        };
        let record = Record { header, signature: None };
        Incoming { hash: record.hash(), record, subs: Vec::new() }
    }

    #[test]
    fn children_come_after_their_parents_whatever_the_order_given() {
        let g = RecordHash::from_bytes([9; 32]);
        let a = record(1, &[g]);
        let b = record(2, &[a.hash]);
        let c = record(3, &[a.hash, b.hash]);
        let (ha, hb, hc) = (a.hash, b.hash, c.hash);
        let order: Vec<RecordHash> = parents_first(vec![c, b, a]).iter().map(|i| i.hash).collect();
        assert_eq!(order, vec![ha, hb, hc]);
        let out = with_descendants(&parents_first(vec![record(1, &[g]), record(2, &[ha])]), HashSet::from([ha]));
        assert!(out.contains(&hb));
    }
}
