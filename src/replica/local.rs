//! The local store as a replica: what `capsulefs serve` answers with, and what push and pull
//! read from and write to on this machine.

use std::collections::{HashSet, VecDeque};

use super::bloom::Bloom;
use super::{Replica, batch_of, payload_of};
use crate::capsule::{Admission, Capsule, StagedBatch};
use crate::proof::fork::ForkEvidence;
use crate::record::{RecordHash, SubIdx};
use crate::store::Durability;
use crate::wire::Announced;
use crate::wire::{
    Bundle, MAX_BATCH_BYTES, MAX_BLOOM_RECORDS, MAX_EVIDENCE, MAX_HASHES, MAX_SINCE_RECORDS, Node, Since,
};
use crate::{Error, Result, VerifyError};

impl Capsule {
    /// The poster's filter over every record held, with the asker's salt.
    /// Refused for a capsule of more than `MAX_BLOOM_RECORDS` records: the filter takes a
    /// scan of them all, which no one request may ask of a server.
    pub fn bloom(&self, salt: [u8; 16], bits_per_record: u8) -> Result<Bloom> {
        // Arrival numbers count every record stored, so this is the count, read in one get.
        let count = usize::try_from(self.store().next_order()?).unwrap_or(usize::MAX);
        if count > MAX_BLOOM_RECORDS {
            return Err(Error::Invalid(format!(
                "a Bloom filter over {count} records; this replica makes them for at most {MAX_BLOOM_RECORDS}"
            )));
        }
        let mut bloom = Bloom::new(salt, count, bits_per_record)?;
        for h in self.store().arrival_order(false)? {
            bloom.insert(&h?);
        }
        Ok(bloom)
    }

    /// Record `h` as replicas exchange it, with its payloads unless `header_only`; None if
    /// not held.
    fn bundle(&self, h: RecordHash, header_only: bool) -> Result<Option<Bundle>> {
        let Some(record) = self.store().record_bytes(&h)? else { return Ok(None) };
        let payloads = if header_only { Vec::new() } else { self.payloads(h, self.record(h)?.header.sub_count)? };
        Ok(Some(Bundle { record, payloads }))
    }

    /// About the bytes record `h` takes in a push: its encoding and its sub-records as stored
    /// (Merkle paths included), without reading the payloads.
    pub fn stored_size(&self, h: RecordHash) -> Result<u64> {
        let Some(record) = self.store().record_bytes(&h)? else { return Ok(0) };
        let mut size = record.len() as u64;
        for i in 0..self.record(h)?.header.sub_count {
            size += self.store().sub_record_len(&h, SubIdx(i))?.unwrap_or(0) as u64;
        }
        Ok(size)
    }

    /// The payloads of `record` as stored.
    fn payloads(&self, record: RecordHash, count: u32) -> Result<Vec<Vec<u8>>> {
        (0..count)
            .map(|i| {
                let idx = SubIdx(i);
                let stored = self
                    .store()
                    .sub_record_bytes(&record, idx)?
                    .ok_or(VerifyError::MissingSubRecord { record, idx })?;
                payload_of(record, idx, stored)
            })
            .collect()
    }

    /// Every check of a batch that needs no store: its size, and each record's encoding,
    /// payloads and signature (`check_incoming`); then its large payloads are staged if the
    /// batch looks taken (`Capsule::stage_ahead`). A server runs this for a stream's next
    /// batch while the one before goes through the gate (`put_checked`).
    pub fn check_alone(&self, bundles: Vec<Bundle>) -> Result<StagedBatch> {
        if bundles.iter().map(Bundle::size).sum::<usize>() > 2 * MAX_BATCH_BYTES {
            return Err(Error::Invalid(format!("a batch over {} MiB", MAX_BATCH_BYTES >> 20)));
        }
        let checked =
            bundles.into_iter().map(|b| self.check_incoming(&b.record, b.payloads)).collect::<Result<Vec<_>>>()?;
        self.stage_ahead(checked)
    }

    /// Takes a batch `check_alone` passed through the gate, whole or not at all
    /// (`Capsule::admit`). Acknowledged means durable: one sync for the whole batch. Returns
    /// how many records were new, and the bytes they take.
    pub fn put_checked(&self, checked: StagedBatch) -> Result<(usize, u64)> {
        let sizes = checked.sizes();
        let admitted = self.admit_staged(checked, Admission::Whole, Durability::Buffered)?;
        self.sync_to_disk()?;
        let bytes = admitted.stored.iter().filter_map(|h| sizes.get(h)).sum();
        Ok((admitted.stored.len(), bytes))
    }
}

impl Replica for Capsule {
    fn describe(&self) -> String {
        format!("the local store of {:?}", self.id())
    }

    fn metadata(&self) -> Result<Option<Vec<u8>>> {
        Ok(Some(self.metadata_bytes()))
    }

    fn put_metadata(&self, signed: &[u8]) -> Result<()> {
        if signed == self.metadata_bytes() {
            Ok(())
        } else {
            Err(VerifyError::Metadata(format!("not the metadata of {:?}", self.id())).into())
        }
    }

    fn heads(&self) -> Result<Vec<RecordHash>> {
        Capsule::heads(self)
    }

    fn announce(&self) -> Result<Announced> {
        Ok(Announced { heads: Capsule::heads(self)?, forks: Some(self.fork_count()?) })
    }

    fn missing(&self, records: &[RecordHash]) -> Result<Vec<RecordHash>> {
        let mut lacking = Vec::new();
        for h in records.iter().take(MAX_HASHES) {
            if !self.holds(h)? {
                lacking.push(*h);
            }
        }
        Ok(lacking)
    }

    fn walk(&self, from: &[RecordHash], budget: usize) -> Result<Vec<Node>> {
        let genesis = RecordHash::genesis(self.id());
        let budget = budget.min(MAX_HASHES);
        let mut seen: HashSet<RecordHash> = HashSet::new();
        let mut queue: VecDeque<RecordHash> = from.iter().copied().collect();
        let mut nodes = Vec::new();
        while let Some(h) = queue.pop_front() {
            if nodes.len() >= budget {
                break;
            }
            if h == genesis || !seen.insert(h) || !self.holds(&h)? {
                continue;
            }
            let parents = self.record(h)?.header.parents;
            queue.extend(parents.iter().copied());
            nodes.push(Node { record: h, parents });
        }
        Ok(nodes)
    }

    fn fetch(&self, records: &[RecordHash]) -> Result<Vec<Bundle>> {
        Ok(batch_of(records.iter().take(MAX_HASHES).copied(), |h| self.bundle(h, false))?.0)
    }

    /// A difference that would take the walk past `MAX_SINCE_RECORDS` records is answered
    /// with the heads alone: the asker then walks the DAG down from them (`missing`, `walk`,
    /// `fetch`), each request bounded.
    fn since(&self, heads: &[RecordHash], headers_only: bool) -> Result<Since> {
        let Some(lacking) = self.difference_within(&heads[..heads.len().min(MAX_HASHES)], MAX_SINCE_RECORDS)? else {
            return Ok(Since { heads: Capsule::heads(self)?, bundles: Vec::new(), more: false });
        };
        let (bundles, more) = batch_of(lacking, |h| {
            self.bundle(h, headers_only)?.map(Some).ok_or(VerifyError::MissingRecord { record: h }.into())
        })?;
        Ok(Since { heads: Capsule::heads(self)?, bundles, more })
    }

    fn sub_record(&self, record: RecordHash, idx: SubIdx) -> Result<Option<Vec<u8>>> {
        self.store().sub_record_bytes(&record, idx)
    }

    fn evidence(&self) -> Result<Vec<ForkEvidence>> {
        let mut evidence = self.fork_evidence()?;
        evidence.truncate(MAX_EVIDENCE);
        Ok(evidence)
    }

    fn put_evidence(&self, evidence: &[ForkEvidence]) -> Result<()> {
        if evidence.len() > MAX_EVIDENCE {
            return Err(Error::Invalid(format!(
                "{} pieces of fork evidence at once; at most {MAX_EVIDENCE}",
                evidence.len()
            )));
        }
        for e in evidence {
            self.take_evidence(e)?;
        }
        Ok(())
    }

    fn put(&self, bundles: Vec<Bundle>, _settles: Option<&[RecordHash]>) -> Result<usize> {
        Ok(self.put_checked(self.check_alone(bundles)?)?.0)
    }
}
