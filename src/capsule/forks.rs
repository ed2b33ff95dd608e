//! Forks: a writer's two records with one device and sequence number, and the evidence of
//! them that anyone can check and every replica passes on.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{Capsule, Incoming};
use crate::crypto::sign;
use crate::proof::fork::{ForkEvidence, MAX_ANCHOR_LINKS, Vouched};
use crate::proof::verify::check_record_bytes;
use crate::record::{DeviceId, Record, RecordHash, RecordHeader, Seq, WriterId};
use crate::store::Durability;
use crate::{Error, Fork, Result, StoreError, VerifyError};

impl Capsule {
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

    /// The forks this capsule keeps evidence of, as evidence anyone can check: for each
    /// writer, device and sequence number, the first record its writer vouches for with each
    /// other one.
    pub fn fork_evidence(&self) -> Result<Vec<ForkEvidence>> {
        let mut groups: BTreeMap<_, Vec<Vouched>> = BTreeMap::new();
        for e in self.store.evidence()? {
            let record = check_record_bytes(e.record, &e.record_bytes)?;
            if record.signature.is_some() || !e.anchor.is_empty() {
                let side = Vouched { record: e.record_bytes, anchor: e.anchor };
                groups.entry((e.writer, e.device, e.seq)).or_default().push(side);
            }
        }
        let mut evidence = Vec::new();
        for sides in groups.into_values() {
            if let [first, rest @ ..] = sides.as_slice() {
                evidence.extend(rest.iter().map(|r| ForkEvidence::of(first.clone(), r.clone())));
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
        for (h, side) in [(fork.first, &evidence.first), (fork.second, &evidence.second)] {
            batch.put_evidence(&fork.writer, &fork.device, fork.seq, &h, side.record.clone(), &side.anchor);
        }
        self.store.write(batch, Durability::Durable)?;
        self.write_lock.lock().expect("no panics while locked").forks_held = None;
        tracing::error!("a replica passed on evidence of a fork: {fork}");
        Ok(Some(fork))
    }

    /// `second` (of a batch whose records all passed the anchoring check, `live`) has the
    /// writer, device and sequence number of `first` (held, or earlier in the batch): keeps
    /// both as evidence, even though the batch is refused, and returns the error that refuses
    /// it.
    pub(super) fn fork_found(&self, first: RecordHash, second: &Incoming, live: &[&Incoming]) -> Result<Error> {
        let header = &second.record().header;
        let (writer, device, seq) = (header.writer, header.device, header.seq);
        let fork = Fork { writer, device, seq, first, second: second.hash() };
        tracing::error!(?writer, ?device, seq = seq.0, ?first, second = ?fork.second, "writer equivocated: two records share a sequence number");
        let first_side = match live.iter().find(|i| i.hash() == first) {
            Some(earlier) => self.vouched_in_batch(earlier, live)?,
            None => self.vouched_stored(first)?,
        };
        match (first_side, self.vouched_in_batch(second, live)?) {
            (Some(a), Some(b)) => {
                let mut batch = self.store.batch();
                for (h, side) in [(first, &a), (fork.second, &b)] {
                    batch.put_evidence(&writer, &device, seq, &h, side.record.clone(), &side.anchor);
                }
                self.store.write(batch, Durability::Durable)?;
            }
            _ => tracing::warn!(
                "no evidence of the fork in {:?} can be made: a record of it is not vouched for",
                fork.first
            ),
        }
        Ok(VerifyError::Equivocation(Box::new(fork)).into())
    }

    /// A record of a batch, with the records of the batch up to its writer's nearest signed
    /// descendant there, or signed here if this machine holds the writer's key.
    fn vouched_in_batch(&self, record: &Incoming, live: &[&Incoming]) -> Result<Option<Vouched>> {
        if record.record().signature.is_some() {
            return Ok(Some(Vouched::signed(record.record())));
        }
        let writer = record.record().header.writer;
        let mut children: HashMap<RecordHash, Vec<&Incoming>> = HashMap::new();
        for i in live {
            for p in &i.record().header.parents {
                children.entry(*p).or_default().push(i);
            }
        }
        // Breadth first down the batch; `via` leads back up to `record`.
        let mut via: HashMap<RecordHash, RecordHash> = HashMap::new();
        let mut queue = VecDeque::from([record.hash()]);
        while let Some(h) = queue.pop_front() {
            for child in children.get(&h).into_iter().flatten() {
                if via.contains_key(&child.hash()) {
                    continue;
                }
                via.insert(child.hash(), h);
                if child.record().header.writer == writer && child.record().signature.is_some() {
                    let mut chain = vec![child.hash()];
                    while let Some(up) = via.get(chain.last().expect("not empty")).filter(|up| **up != record.hash()) {
                        chain.push(*up);
                    }
                    chain.reverse();
                    let bytes = |h: &RecordHash| live.iter().find(|i| i.hash() == *h).map(|i| i.record().encode());
                    let anchor = chain.iter().filter_map(bytes).collect();
                    return Ok(Some(Vouched { record: record.record().encode(), anchor }));
                }
                queue.push_back(child.hash());
            }
        }
        Ok(self.signed_here(record.record()))
    }

    /// A held record, with the records up to its writer's signed descendant that the witness
    /// index names (each checked), or signed here if this machine holds the writer's key.
    fn vouched_stored(&self, h: RecordHash) -> Result<Option<Vouched>> {
        let record = self.record(h)?;
        if record.signature.is_some() {
            return Ok(Some(Vouched::signed(&record)));
        }
        let writer = record.header.writer;
        let (mut anchor, mut current) = (Vec::new(), h);
        while let Some(w) = self.store.witness(&current, &writer)?.filter(|w| w.dist > 0) {
            let child = self.record(w.via)?;
            if child.header.parents.binary_search(&current).is_err() || anchor.len() >= MAX_ANCHOR_LINKS {
                break;
            }
            let signed_by_writer = child.header.writer == writer && child.signature.is_some();
            anchor.push(child.encode());
            if signed_by_writer {
                return Ok(Some(Vouched { record: record.encode(), anchor }));
            }
            current = w.via;
        }
        Ok(self.signed_here(&record))
    }

    /// `record` signed now, if this machine holds its writer's key.
    fn signed_here(&self, record: &Record) -> Option<Vouched> {
        let identity = self.local.iter().find(|i| i.writer() == record.header.writer)?;
        let signed = Record {
            header: record.header.clone(),
            signature: Some(sign::sign_record(identity.key(), &record.hash())),
        };
        Some(Vouched::signed(&signed))
    }

    /// A sequence index entry is a claim of the store's, not evidence: before two records are
    /// called a fork, the indexed one must really be that writer's record with that number.
    pub(super) fn check_seq_entry(&self, indexed: RecordHash, header: &RecordHeader) -> Result<()> {
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
}
