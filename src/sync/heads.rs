//! What a replica holds, as this capsule can place it: the replica's heads (listed, or
//! reconciled through a sketch when there are many), walked down to records held here, and
//! the signed records it lacks per writer and device.

use std::collections::{BTreeMap, HashSet};

use crate::Result;
use crate::capsule::Capsule;
use crate::record::{DeviceId, Record, RecordHash, RecordHeader, WriterId};
use crate::replica::{Replica, sketch};
use crate::wire::MAX_HASHES;

use super::walk::walk_remote_to;
use super::{Lacking, Report, hashes_len};

/// The replica's heads as this capsule can place them: a head not held here (another
/// device's newest record, not pulled yet; or one kept out) stands for the records held here
/// that lie below it on the replica, found by walking the replica's DAG down to them. So a
/// push sends, and a lacking count counts, only what the replica truly lacks.
pub(super) fn placed_heads(
    local: &Capsule,
    remote: &dyn Replica,
    theirs: Vec<RecordHash>,
    report: &mut Report,
) -> Result<Vec<RecordHash>> {
    let mut placed = Vec::with_capacity(theirs.len());
    let mut unknown = Vec::new();
    for h in theirs {
        if local.holds(&h)? {
            placed.push(h);
        } else {
            unknown.push(h);
        }
    }
    if unknown.is_empty() {
        return Ok(placed);
    }
    // A walk that fails ends the round: taking the replica to hold only the heads placed
    // would count all it holds below the others as lacking, a rollback that never happened.
    let lacking = walk_remote_to(local, remote, &unknown, report)
        .inspect_err(|e| tracing::warn!("walking {} below heads not held here: {e}", remote.describe()))?;
    let genesis = RecordHash::genesis(local.id());
    for p in lacking.values().flatten() {
        if *p != genesis && !lacking.contains_key(p) && local.holds(p)? {
            placed.push(*p);
        }
    }
    placed.sort();
    placed.dedup();
    Ok(placed)
}

/// Up to this many local heads, listing the replica's heads costs less than a sketch.
pub(super) const SKETCH_ABOVE: usize = 16;
/// The first sketch's cells (one difference peels from cell 0 alone); each further round
/// sends at least twice as many.
const FIRST_CELLS: usize = 4;

/// The replica's heads. With few local heads, it lists them (32 bytes a head). With many,
/// it sends a sketch of the local heads, doubling it (or more, from the difference in head
/// counts the replica reports) until the replica can peel the difference or answers with a
/// list no longer than the sketch, and rebuilds the replica's heads from its own and that
/// difference; past the point where the sketch would cost more than the list, it lists them. A decoded difference is as sure as a listing: an
/// element is peeled only when its 64-bit check, keyed by this exchange's salt, matches, and
/// only when every cell empties.
pub fn replica_heads(local: &Capsule, remote: &dyn Replica, report: &mut Report) -> Result<Vec<RecordHash>> {
    let ours = local.heads()?;
    if ours.len() > SKETCH_ABOVE {
        let salt = crate::crypto::random_bytes::<16>();
        let mut cells = FIRST_CELLS;
        while cells * sketch::CELL_BYTES < 32 * ours.len() && cells <= sketch::MAX_CELLS {
            let answer = remote.heads_difference(&salt, &sketch::encode(&ours, &salt, cells))?;
            report.round_trips += 1;
            report.reconcile_sent += 16 + 4 + (cells * sketch::CELL_BYTES) as u64;
            report.reconcile_received += answer.size();
            match answer {
                sketch::Answer::Heads(theirs) => return Ok(theirs),
                sketch::Answer::Difference(d) => {
                    let not_theirs: HashSet<RecordHash> = d.asker_only.into_iter().collect();
                    let mut theirs: Vec<RecordHash> =
                        ours.into_iter().filter(|h| !not_theirs.contains(h)).chain(d.answerer_only).collect();
                    theirs.sort();
                    theirs.dedup();
                    return Ok(theirs);
                }
                sketch::Answer::More { heads } => cells = (cells * 2).max(2 * ours.len().abs_diff(heads as usize)),
            }
        }
    }
    let theirs = remote.heads()?;
    report.round_trips += 1;
    report.reconcile_received += hashes_len(theirs.len());
    Ok(theirs)
}

/// The signed records this capsule holds that a replica with heads `theirs` lacks, by writer
/// and device.
pub(super) fn signed_lacking(local: &Capsule, theirs: &[RecordHash]) -> Result<Vec<Lacking>> {
    let mut lanes = Lanes::default();
    for h in local.difference(theirs)? {
        lanes.add(&local.record(h)?);
    }
    Ok(lanes.into_vec())
}

/// Signed records counted by writer and device, as `Lacking`.
#[derive(Default)]
pub(super) struct Lanes(BTreeMap<(WriterId, DeviceId), Lacking>);

impl Lanes {
    pub(super) fn add(&mut self, record: &Record) {
        if record.signature.is_none() {
            return;
        }
        let RecordHeader { writer, device, seq, .. } = record.header;
        let entry = self.0.entry((writer, device)).or_insert(Lacking { writer, device, seq, lowest: seq, count: 0 });
        (entry.seq, entry.lowest, entry.count) = (entry.seq.max(seq), entry.lowest.min(seq), entry.count + 1);
    }

    pub(super) fn into_vec(self) -> Vec<Lacking> {
        self.0.into_values().collect()
    }
}

/// How far below each head `haves` looks.
const HAVES_DEPTH: u64 = 1024;

/// What to tell a replica this capsule holds: its heads, and below each head the records at
/// depth 1, 2, 4, ... 1024 along first parents. The replica may not know our newest records
/// (commits not pushed yet); it skips what it does not know and takes the first one it does,
/// so it resends at most about as many records as lie between that one and the head (all of
/// them if more than 1024 of ours are unpushed; correct, only slower).
pub(super) fn haves(local: &Capsule) -> Result<Vec<RecordHash>> {
    let genesis = RecordHash::genesis(local.id());
    let mut haves = local.heads()?;
    for head in haves.clone() {
        let (mut current, mut depth, mut next_kept) = (head, 0u64, 1u64);
        while depth < HAVES_DEPTH && haves.len() < MAX_HASHES {
            let Some(&parent) = local.record(current)?.header.parents.first() else { break };
            if parent == genesis {
                break;
            }
            depth += 1;
            current = parent;
            if depth == next_kept {
                haves.push(current);
                next_kept *= 2;
            }
        }
    }
    haves.sort();
    haves.dedup();
    Ok(haves)
}
