//! The DAG's shape: stored records (checked against their hashes, not proven), the arrival
//! log, names of records, and what another replica lacks.

use std::collections::HashMap;

use super::Capsule;
use crate::proof::verify::check_record_bytes;
use crate::record::{Record, RecordHash};
use crate::{Error, Result, StoreError, VerifyError};

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

impl Capsule {
    /// The records this capsule holds that are not ancestors of `theirs` (nor among them),
    /// parents first: what a replica whose heads are `theirs` lacks, as far as this capsule
    /// can tell (heads it does not hold are skipped). Walks down from both sets of heads in
    /// order of height, so it stops once only the other side's records are left: the cost
    /// grows with the difference and the history above its lowest record, not with the
    /// capsule.
    pub fn difference(&self, theirs: &[RecordHash]) -> Result<Vec<RecordHash>> {
        Ok(self.difference_within(theirs, usize::MAX)?.expect("no bound to pass"))
    }

    /// `difference`, or None once the walk has visited more than `max_visited` records.
    pub fn difference_within(&self, theirs: &[RecordHash], max_visited: usize) -> Result<Option<Vec<RecordHash>>> {
        let mut walk = DifferenceWalk::default();
        for h in theirs {
            walk.enqueue(self, *h, true)?;
        }
        for h in self.heads()? {
            walk.enqueue(self, h, false)?;
        }
        let (mut missing, mut visited) = (Vec::new(), 0usize);
        while walk.mine_queued > 0 {
            let Some((_, h)) = walk.heap.pop() else { break };
            visited += 1;
            if visited > max_visited {
                return Ok(None);
            }
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
        Ok(Some(missing))
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
}
