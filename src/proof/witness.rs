//! The closest-signed-descendant index, kept per writer and updated with every signed record
//! stored.
//!
//! A signature vouches only for its signer's records, so a record's witness for writer `w` is
//! the nearest descendant that `w` signed, reached through any records in between. A
//! breadth-first walk from a newly signed record through its ancestors lowers each
//! ancestor's distance where the new record is closer; distances only ever shrink, so the
//! index is monotonic and replicas can gossip it. Invariant: `w(r).dist == w(w(r).via).dist
//! + 1` for one writer, so following `via` from any record reaches that writer's anchor in
//! exactly `dist` hops.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::record::{Record, RecordHash, WriterId};
use crate::store::{CapsuleStore, Durability, StoreBatch, Witness};
use crate::{Result, VerifyError};

/// Signed records a reindex walks from before it writes what it found.
const REINDEX_CHUNK: usize = 4096;

/// What a walk needs of a record it passes.
pub struct Step {
    pub writer: WriterId,
    pub signed: bool,
    pub parents: Vec<RecordHash>,
}

/// Witness updates being staged into one store batch: later walks see earlier ones.
pub struct WitnessWalk<'a> {
    store: &'a CapsuleStore,
    genesis: RecordHash,
    /// Records not stored yet (a batch being admitted): the store can hold no true entries
    /// of them, and one planted there must not count.
    fresh: HashSet<RecordHash>,
    staged: HashMap<(RecordHash, WriterId), Witness>,
}

impl<'a> WitnessWalk<'a> {
    pub fn new(store: &'a CapsuleStore, genesis: RecordHash, fresh: HashSet<RecordHash>) -> Self {
        Self { store, genesis, fresh, staged: HashMap::new() }
    }

    /// The witness of `record` for `writer`: staged by this walk, or stored.
    pub fn witness(&self, record: &RecordHash, writer: &WriterId) -> Result<Option<Witness>> {
        match self.staged.get(&(*record, *writer)) {
            Some(w) => Ok(Some(*w)),
            None if self.fresh.contains(record) => Ok(None),
            None => self.store.witness(record, writer),
        }
    }

    /// Stages into `batch` what record `signed`, signed by `writer` and naming `parents`,
    /// brings: a closer anchor for every ancestor `step` walks through (None: the walk stops
    /// there). The walk also stops at the writer's other signed records (their ancestors are
    /// theirs to anchor) and where an anchor as close is known. Returns how many records got
    /// a closer anchor. Walk records parents first, so each region is walked about once.
    pub fn from_signed(
        &mut self,
        batch: &mut StoreBatch,
        writer: WriterId,
        signed: RecordHash,
        parents: &[RecordHash],
        step: &mut dyn FnMut(&RecordHash) -> Result<Option<Step>>,
    ) -> Result<usize> {
        let mut changed = 0;
        let mut queue: VecDeque<(RecordHash, u32, RecordHash)> = parents.iter().map(|p| (*p, 1, signed)).collect();
        while let Some((record, dist, via)) = queue.pop_front() {
            if record == self.genesis {
                continue;
            }
            let Some(node) = step(&record)? else { continue };
            if node.writer == writer && node.signed {
                continue;
            }
            if self.witness(&record, &writer)?.is_some_and(|w| w.dist <= dist) {
                continue; // Already as close; so are its ancestors through it.
            }
            let w = Witness { anchor: signed, dist, via };
            batch.put_witness(&record, &writer, &w);
            self.staged.insert((record, writer), w);
            changed += 1;
            queue.extend(node.parents.iter().map(|p| (*p, dist + 1, record)));
        }
        Ok(changed)
    }
}

/// Rebuilds the index of a store made before it was kept per writer, and drops the proven
/// marks made under the older rule (any signature anchoring any record): everything is
/// proven again by its own writer. Returns how many signed records were walked from.
pub fn reindex(store: &CapsuleStore, genesis: RecordHash) -> Result<usize> {
    let mut batch = store.batch();
    for (cf, key) in store.derived_trust_keys()? {
        batch.delete_derived(cf, key);
    }
    store.write(batch, Durability::Buffered)?;
    let mut step = |h: &RecordHash| -> Result<Option<Step>> {
        let Some(bytes) = store.record_bytes(h)? else { return Ok(None) };
        let parsed = Record::decode(&bytes).map_err(|source| VerifyError::Malformed { record: *h, source })?;
        Ok(Some(Step {
            writer: parsed.header.writer,
            signed: parsed.signature.is_some(),
            parents: parsed.header.parents,
        }))
    };
    let (mut walked, mut batch) = (0, store.batch());
    let mut walk = WitnessWalk::new(store, genesis, HashSet::new());
    for h in store.arrival_order(false)? {
        let h = h?;
        let Some(node) = step(&h)? else { continue };
        if !node.signed {
            continue;
        }
        walk.from_signed(&mut batch, node.writer, h, &node.parents, &mut step)?;
        walked += 1;
        if walked % REINDEX_CHUNK == 0 {
            store.write(std::mem::replace(&mut batch, store.batch()), Durability::Buffered)?;
            walk = WitnessWalk::new(store, genesis, HashSet::new());
        }
    }
    batch.mark_witness_per_writer();
    store.write(batch, Durability::Durable)?;
    Ok(walked)
}
