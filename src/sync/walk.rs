//! The slow, sure ways: walking a replica's DAG down to records held here (a pull's
//! fallback), and relaying between two replicas that this process believes neither of.

use std::collections::{HashMap, HashSet};

use crate::capsule::{Capsule, Pending};
use crate::record::{CapsuleId, Record, RecordHash};
use crate::replica::{AnchoredBatch, Replica, topological};
use crate::wire::{Bundle, MAX_HASHES, Node};
use crate::{Error, Result};

use super::take::{counted, take};
use super::{Progress, Report, Take, hashes_len};

/// The first slice of a fallback walk; each round asks about four times more.
const FIRST_BUDGET: usize = 16;

/// The slow, sure way: walks `remote`'s DAG from `heads` until records held here, then
/// fetches what it found, parents first.
pub(super) fn pull_walking(
    local: &Capsule,
    remote: &dyn Replica,
    heads: &[RecordHash],
    pending: &mut Pending,
    report: &mut Report,
    progress: &dyn Progress,
) -> Result<()> {
    let lacking = walk_remote_to(local, remote, heads, report)?;
    let order = topological(&lacking)?;
    progress.expect(order.len() as u64);
    let mut next = 0;
    while next < order.len() {
        let slice: Vec<(Bundle, Option<RecordHash>)> =
            fetch_slice(remote, &order[next..], report)?.into_iter().map(|(b, h)| (b, Some(h))).collect();
        next += slice.len();
        take(local, remote, slice, Take::Whole, pending, report, progress)?;
    }
    Ok(())
}

/// Fetches the first records of `order` from `remote`, as many as one answer holds, each
/// with the hash it was asked as. An answer with none of them is an error: the replica
/// listed them.
fn fetch_slice(remote: &dyn Replica, order: &[Node], report: &mut Report) -> Result<Vec<(Bundle, RecordHash)>> {
    let ask: Vec<RecordHash> = order.iter().take(MAX_HASHES).map(|n| n.record).collect();
    let bundles = remote.fetch(&ask)?;
    report.round_trips += 1;
    report.reconcile_sent += hashes_len(ask.len());
    if bundles.is_empty() {
        return Err(Error::NotFound(format!("{:?} on {}, which listed it", ask[0], remote.describe())));
    }
    Ok(bundles.into_iter().zip(ask).collect())
}

/// The records reachable from `heads` on `remote` that `lacks` says are lacking, with their
/// parents as the remote states them (checked later, when each record itself is). `lacks`
/// answers, for a list of records, the ones not held where they are going.
/// `walk_remote` down to the records `local` holds.
pub(super) fn walk_remote_to(
    local: &Capsule,
    remote: &dyn Replica,
    heads: &[RecordHash],
    report: &mut Report,
) -> Result<HashMap<RecordHash, Vec<RecordHash>>> {
    let mut lacks = |records: &[RecordHash]| -> Result<HashSet<RecordHash>> {
        let mut absent = HashSet::new();
        for r in records {
            if !local.holds(r)? {
                absent.insert(*r);
            }
        }
        Ok(absent)
    };
    walk_remote(remote, heads, RecordHash::genesis(local.id()), &mut lacks, report)
}

fn walk_remote(
    remote: &dyn Replica,
    heads: &[RecordHash],
    genesis: RecordHash,
    lacks: &mut dyn FnMut(&[RecordHash]) -> Result<HashSet<RecordHash>>,
    report: &mut Report,
) -> Result<HashMap<RecordHash, Vec<RecordHash>>> {
    let mut lacking: HashMap<RecordHash, Vec<RecordHash>> = HashMap::new();
    let mut held: HashSet<RecordHash> = HashSet::new();
    let absent = lacks(heads)?;
    let (mut frontier, present): (Vec<RecordHash>, Vec<RecordHash>) = heads.iter().partition(|h| absent.contains(h));
    held.extend(present);
    let mut budget = FIRST_BUDGET;
    while !frontier.is_empty() {
        let nodes = remote.walk(&frontier, budget)?;
        report.round_trips += 1;
        report.reconcile_sent += hashes_len(frontier.len()) + 4;
        report.reconcile_received += 4 + nodes.iter().map(|n| hashes_len(n.parents.len()) + 32).sum::<u64>();
        if nodes.is_empty() {
            return Err(Error::NotFound(format!("{:?} on {}, which named it", frontier[0], remote.describe())));
        }
        let fresh: Vec<RecordHash> = nodes
            .iter()
            .map(|n| n.record)
            .filter(|r| !lacking.contains_key(r) && !held.contains(r))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let absent = lacks(&fresh)?;
        for node in nodes {
            if absent.contains(&node.record) {
                lacking.insert(node.record, node.parents);
            } else if fresh.contains(&node.record) {
                held.insert(node.record);
            }
        }
        // The parents of what is lacking, and what this slice did not reach.
        frontier = lacking
            .values()
            .flatten()
            .chain(&frontier)
            .filter(|p| **p != genesis && !lacking.contains_key(p) && !held.contains(p))
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let absent = lacks(&frontier)?;
        held.extend(frontier.iter().filter(|p| !absent.contains(p)));
        frontier.retain(|p| absent.contains(p));
        budget = (budget * 4).min(MAX_HASHES);
    }
    Ok(lacking)
}

/// One way of an anti-entropy round between two replicas, carried by this process: what `to`
/// lacks of `from`, found by walking `from`'s DAG down to records `to` holds (so the cost
/// grows with the difference), fetched from `from` and put to `to` in batches `to` can check
/// whole. This process believes neither: each record must hash to what it was asked as, and
/// `to` checks everything before it stores it, as from any sender.
pub fn relay(from: &dyn Replica, to: &dyn Replica, capsule: CapsuleId, progress: &dyn Progress) -> Result<Report> {
    let mut report = Report { round_trips: 2, ..Report::default() };
    let Some(metadata) = from.metadata()? else {
        return Ok(report);
    };
    match to.metadata()? {
        None => {
            to.put_metadata(&metadata)?;
            report.round_trips += 1;
        }
        Some(m) if m != metadata => {
            return Err(Error::Invalid(format!(
                "{} and {} hold different metadata for {capsule:?}: one of them is not a replica of it",
                from.describe(),
                to.describe()
            )));
        }
        Some(_) => {}
    }
    let heads = from.heads()?;
    report.round_trips += 1;
    report.reconcile_received += hashes_len(heads.len());
    let missing_calls = std::cell::Cell::new((0u32, 0u64, 0u64));
    let mut lacks = |records: &[RecordHash]| -> Result<HashSet<RecordHash>> {
        if records.is_empty() {
            return Ok(HashSet::new());
        }
        let absent = to.missing(records)?;
        let (calls, sent, received) = missing_calls.get();
        missing_calls.set((
            calls + records.len().div_ceil(MAX_HASHES) as u32,
            sent + hashes_len(records.len()),
            received + hashes_len(absent.len()),
        ));
        Ok(absent.into_iter().collect())
    };
    let lacking = walk_remote(from, &heads, RecordHash::genesis(capsule), &mut lacks, &mut report)?;
    let (calls, sent, received) = missing_calls.get();
    report.round_trips += calls;
    report.reconcile_sent += sent;
    report.reconcile_received += received;
    let order = topological(&lacking)?;
    progress.expect(order.len() as u64);
    let mut batch = AnchoredBatch::new(to.batch_bytes());
    let mut stream = to.put_stream();
    let mut next = 0;
    while next < order.len() {
        for (bundle, expected) in fetch_slice(from, &order[next..], &mut report)? {
            let record = Record::decode(&bundle.record)
                .map_err(|e| Error::Replica(format!("{} sent an undecodable record: {e}", from.describe())))?;
            if record.hash() != expected {
                return Err(Error::Replica(format!(
                    "{} answered {:?} when asked for {expected:?}",
                    from.describe(),
                    record.hash()
                )));
            }
            if batch.full() {
                stream.send(counted(batch.take(), &mut report, progress))?;
            }
            batch.add(bundle, &record);
            next += 1;
        }
    }
    // `to` now holds everything `from`'s heads cover.
    let last = counted(batch.take(), &mut report, progress);
    report.round_trips += stream.finish(last, Some(&heads))?;
    // Fork evidence travels with the records; `to` checks it before keeping it.
    let evidence = from.evidence()?;
    report.round_trips += 1;
    if !evidence.is_empty() {
        to.put_evidence(&evidence)?;
        report.round_trips += 1;
    }
    Ok(report)
}
