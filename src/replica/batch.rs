//! Batches of records on their way to a replica, cut where every unsigned record in them has
//! its writer's signed descendant with it: the one gate takes nothing less.

use std::collections::{HashMap, HashSet};

use crate::record::{Record, RecordHash, WriterId};
use crate::wire::{Bundle, MAX_BATCH_BYTES};
use crate::{Result, VerifyError};

/// How far past its size a batch may grow while it waits for a signature.
const SLACK: usize = 16 << 20;

/// Bundles on their way to a replica that takes an unsigned record only with a descendant
/// its own writer signed in the same call: `uncovered` holds the unsigned ones still waiting
/// for theirs. Push and relay both cut their batches here, at the receiving replica's
/// `batch_bytes`.
pub(crate) struct AnchoredBatch {
    pub(crate) bytes: usize,
    pub(crate) limit: usize,
    bundles: Vec<Bundle>,
    parents: HashMap<RecordHash, Vec<RecordHash>>,
    uncovered: HashMap<RecordHash, WriterId>,
    /// Records of the batch whose ancestors here a writer's signature already covers.
    covered: HashSet<(RecordHash, WriterId)>,
}

impl AnchoredBatch {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            bundles: Vec::new(),
            bytes: 0,
            limit,
            parents: HashMap::new(),
            uncovered: HashMap::new(),
            covered: HashSet::new(),
        }
    }

    pub(crate) fn add(&mut self, bundle: Bundle, record: &Record) {
        let hash = record.hash();
        let writer = record.header.writer;
        self.bytes += bundle.size();
        self.bundles.push(bundle);
        self.parents.insert(hash, record.header.parents.clone());
        if record.signature.is_none() {
            self.uncovered.insert(hash, writer);
            return;
        }
        // A signature covers every ancestor of its writer's: clear those waiting in this batch,
        // through records of anyone, once per record and writer.
        if !self.uncovered.values().any(|w| *w == writer) {
            return;
        }
        let mut stack = record.header.parents.clone();
        while let Some(p) = stack.pop() {
            if !self.parents.contains_key(&p) || !self.covered.insert((p, writer)) {
                continue;
            }
            if self.uncovered.get(&p) == Some(&writer) {
                self.uncovered.remove(&p);
            }
            stack.extend(self.parents[&p].iter().copied());
        }
    }

    /// Past the batch size, and at a point where it may end: every unsigned record in it has
    /// its writer's signed descendant in it. Past the size and `SLACK` it ends anyway: the
    /// receiver holds back (or refuses) what is left uncovered.
    pub(crate) fn full(&self) -> bool {
        self.bytes >= self.limit && (self.uncovered.is_empty() || self.bytes >= self.limit + SLACK)
    }

    pub(crate) fn take(&mut self) -> Vec<Bundle> {
        std::mem::replace(self, Self::new(self.limit)).bundles
    }
}

/// Bundles of `records` in order, each from `bundle_of` (None: not held, skipped), until
/// `MAX_BATCH_BYTES` is passed at a point where the batch is anchored; and whether some were
/// left for a next answer. How every replica cuts `fetch` and `since` answers.
pub(crate) fn batch_of(
    records: impl IntoIterator<Item = RecordHash>,
    mut bundle_of: impl FnMut(RecordHash) -> Result<Option<Bundle>>,
) -> Result<(Vec<Bundle>, bool)> {
    let mut batch = AnchoredBatch::new(MAX_BATCH_BYTES);
    for h in records {
        if batch.full() {
            return Ok((batch.take(), true));
        }
        if let Some(bundle) = bundle_of(h)? {
            let record =
                Record::decode(&bundle.record).map_err(|source| VerifyError::Malformed { record: h, source })?;
            batch.add(bundle, &record);
        }
    }
    Ok((batch.take(), false))
}
