//! The closest-signed-descendant index, updated eagerly with every signed record stored.
//!
//! A breadth-first walk from the new signed record through its ancestors lowers each
//! ancestor's distance where the new record is closer. Distances only ever shrink, so the index
//! is monotonic and replicas can gossip it. Invariant: `w(r).dist == w(w(r).via).dist + 1`,
//! so following `via` from any record reaches its anchor in exactly `dist` hops.

use std::collections::{HashMap, VecDeque};

use crate::record::{CapsuleId, Record, RecordHash};
use crate::store::{CapsuleStore, StoreBatch, Witness};
use crate::{Result, VerifyError};

/// Stages into `batch` the witness updates that storing signed record `signed` brings.
/// Returns how many records got a closer anchor (including `signed` itself).
pub fn stage_signed(
    store: &CapsuleStore,
    batch: &mut StoreBatch,
    capsule: CapsuleId,
    signed: RecordHash,
    parents: &[RecordHash],
    known_signed: &dyn Fn(&RecordHash) -> bool,
) -> Result<usize> {
    let genesis = RecordHash::genesis(capsule);
    let mut staged: HashMap<RecordHash, Witness> = HashMap::new();
    let own = Witness { anchor: signed, dist: 0, via: signed };
    batch.put_witness(&signed, &own);
    staged.insert(signed, own);
    let mut queue: VecDeque<(RecordHash, u32, RecordHash)> = parents.iter().map(|p| (*p, 1, signed)).collect();
    while let Some((record, dist, via)) = queue.pop_front() {
        if record == genesis || staged.contains_key(&record) || known_signed(&record) {
            // BFS: a record staged earlier was reached at a distance no larger; a signed one
            // is its own witness, at distance 0.
            continue;
        }
        if store.witness(&record)?.is_some_and(|w| w.dist <= dist) {
            continue; // Already as close; so are its ancestors through it.
        }
        let w = Witness { anchor: signed, dist, via };
        batch.put_witness(&record, &w);
        staged.insert(record, w);
        let bytes = store.record_bytes(&record)?.ok_or(VerifyError::MissingRecord { record })?;
        let parsed = Record::decode(&bytes).map_err(|source| VerifyError::Malformed { record, source })?;
        queue.extend(parsed.header.parents.iter().map(|p| (*p, dist + 1, record)));
    }
    Ok(staged.len())
}
