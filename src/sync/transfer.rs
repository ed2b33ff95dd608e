//! Push and pull between the local capsule and any replica.
//!
//! Finding what to send costs heads, not ids: a replica holds a record only with all its
//! ancestors, so its heads say everything it holds. Push reads the replica's heads and sends
//! `Capsule::difference` of them; pull reads the replica's heads, stops there when it holds
//! them all, and otherwise sends its own heads with the replica's heads it holds, and the
//! replica answers with the records they do not cover (`Replica::since`). Neither side believes the other: everything
//! pulled is checked by the one gate (`Capsule::admit`) before it is stored, and a pull that ends
//! with one of the replica's heads still unknown here (a replica that lied or lost something)
//! falls back to walking the replica's DAG from that head, so a miss costs round trips, never
//! a silent divergence.

use std::collections::{HashMap, HashSet};

use crate::capsule::{Capsule, Pending};
use crate::record::{Record, RecordHash, WriterId};
use crate::replica::{AnchoredBatch, Replica};
use crate::wire::Node;
use crate::{Error, Result, VerifyError};

use super::evidence::{learn_fork, pass_evidence, tell_fork};
use super::heads::{Lanes, SKETCH_ABOVE, haves, placed_heads, replica_heads, signed_lacking};
use super::take::{counted, take};
use super::walk::pull_walking;
use super::{Progress, Report, Take, hashes_len};

/// Pushes every local record `remote` lacks, parents first, in batches it can check whole.
pub fn push(local: &Capsule, remote: &dyn Replica, progress: &dyn Progress) -> Result<Report> {
    let mut report = Report { round_trips: 1, ..Report::default() };
    if remote.metadata()?.is_none() {
        remote.put_metadata(&local.metadata_bytes())?;
        report.round_trips += 1;
    }
    let theirs = replica_heads(local, remote, &mut report)?;
    let theirs = placed_heads(local, remote, theirs, &mut report)?;
    let mut lanes = Lanes::default();
    let order: Vec<Node> = local
        .difference(&theirs)?
        .into_iter()
        .map(|h| {
            let record = local.record(h)?;
            lanes.add(&record);
            Ok(Node { record: h, parents: record.header.parents })
        })
        .collect::<Result<_>>()?;
    progress.expect(order.len() as u64);
    report.replica_lacks = lanes.into_vec();
    let mut signed_here: HashSet<RecordHash> = HashSet::new();
    let mut anchored = anchored_positions(local, &order, &signed_here)?;
    let mut batch = AnchoredBatch::new(remote.batch_bytes());
    let mut stream = remote.put_stream();
    for (i, node) in order.iter().enumerate() {
        let mut bundle =
            local.fetch(&[node.record])?.pop().ok_or(VerifyError::MissingRecord { record: node.record })?;
        // An unsigned record of ours that nothing signed covers yet, or that would hold a full
        // batch open waiting for its signed descendant: this machine holds the writer's key,
        // so it signs the record now (a signature does not change its hash).
        let stuck = anchored[i].is_none_or(|a| a > i && batch.bytes + bundle.size() >= batch.limit);
        if stuck && let Some(signed) = local.sign_own(node.record)? {
            bundle.record = signed;
            signed_here.insert(node.record);
            anchored = anchored_positions(local, &order, &signed_here)?;
        }
        if anchored[i].is_none() {
            report.waiting_for_signature += 1;
            continue;
        }
        let record = Record::decode(&bundle.record).map_err(VerifyError::Undecodable)?;
        // A full batch goes once the next record is known, so that the last one sent is
        // always the one that settles the push.
        if batch.full() {
            stream.send(counted(batch.take(), &mut report, progress)).inspect_err(|e| learn_fork(local, remote, e))?;
        }
        batch.add(bundle, &record);
    }
    // Once every record went, the replica holds everything this capsule does.
    let settles = if report.waiting_for_signature == 0 { Some(local.heads()?) } else { None };
    let last = counted(batch.take(), &mut report, progress);
    report.round_trips += stream.finish(last, settles.as_deref()).inspect_err(|e| learn_fork(local, remote, e))?;
    pass_evidence(local, remote, &mut report)?;
    Ok(report)
}

/// Pulls every record of `remote` the local capsule lacks, checking each before storing it.
pub fn pull(local: &Capsule, remote: &dyn Replica, progress: &dyn Progress) -> Result<Report> {
    pull_taking(local, remote, Take::Whole, progress)
}

/// `pull`, taking of each record what `take` says.
pub fn pull_taking(local: &Capsule, remote: &dyn Replica, taking: Take, progress: &dyn Progress) -> Result<Report> {
    let mut report = Report::default();
    // The replica's heads first: when this capsule holds them all, it holds everything the
    // replica does, and nothing more is asked. Otherwise the heads held here go with our own
    // in `since`: the replica may not know our newest records (local commits not pushed yet),
    // but it knows its own heads, so it does not resend what lies below them.
    let theirs = replica_heads(local, remote, &mut report)?;
    // A replica with records of this capsule holds it (each record is checked against the
    // local metadata as it comes, so another capsule's are refused); one with none is asked
    // for the metadata, to tell an empty replica from one that does not hold the capsule (a
    // bucket answers both with no heads).
    if theirs.is_empty() {
        report.round_trips += 1;
        match remote.metadata()? {
            Some(m) if m == local.metadata_bytes() => {}
            Some(_) => {
                let holder = remote.describe();
                return Err(Error::Invalid(format!("{holder} holds another capsule under {:?}", local.id())));
            }
            None => return Err(Error::NotFound(format!("capsule {:?} on {}", local.id(), remote.describe()))),
        }
    }
    pull_below(local, remote, theirs, taking, report, progress)
}

/// `pull` from a replica whose heads were just read (`theirs`, by a quorum's read), without
/// asking for them again. Every record is checked as in any pull: a replica serving another
/// capsule's records gets them refused by their capsule id.
pub fn pull_announced(
    local: &Capsule,
    remote: &dyn Replica,
    theirs: Vec<RecordHash>,
    progress: &dyn Progress,
) -> Result<Report> {
    pull_below(local, remote, theirs, Take::Whole, Report::default(), progress)
}

/// The rest of a pull once the replica's heads are known: what lies below them that is not
/// held here.
fn pull_below(
    local: &Capsule,
    remote: &dyn Replica,
    mut theirs: Vec<RecordHash>,
    taking: Take,
    mut report: Report,
    progress: &dyn Progress,
) -> Result<Report> {
    let mut pending = Pending::default();
    let mut shared = Vec::new();
    for &h in &theirs {
        if local.holds(&h)? {
            shared.push(h);
        }
    }
    // With many heads here, telling the replica what this capsule holds costs more than
    // walking down from the replica's heads it lacks (the hole frontier) to records it holds.
    // Where `since` reads the replica's whole index (an object store), walking down from
    // its heads reads only what is new, except for a sparse pull, which takes headers alone.
    let walk_first = remote.prefers_walking() && taking == Take::Whole;
    let by_since = shared.len() < theirs.len() && local.heads()?.len() <= SKETCH_ABOVE && !walk_first;
    if by_since {
        let mut known = haves(local)?;
        known.extend(&shared);
        loop {
            let answer = remote.since(&known, taking == Take::Headers)?;
            report.round_trips += 1;
            report.reconcile_sent += hashes_len(known.len());
            report.reconcile_received += hashes_len(answer.heads.len()) + 1;
            let before = report.records;
            let answer_bundles = answer.bundles.into_iter().map(|b| (b, None)).collect();
            take(local, remote, answer_bundles, taking, &mut pending, &mut report, progress)
                .inspect_err(|e| tell_fork(local, remote, e))?;
            theirs = answer.heads;
            // An answer that stored nothing new cannot be followed by a better one.
            if !answer.more || report.records == before {
                break;
            }
            known = haves(local)?;
        }
    }
    let mut unknown = Vec::new();
    for &h in &theirs {
        if !local.holds(&h)? {
            unknown.push(h);
        }
    }
    if !unknown.is_empty() {
        if by_since {
            tracing::warn!(
                "{} did not send everything its heads cover; walking its DAG for the rest",
                remote.describe()
            );
        }
        pull_walking(local, remote, &unknown, &mut pending, &mut report, progress)
            .inspect_err(|e| tell_fork(local, remote, e))?;
    }
    local.sync_to_disk()?;
    report.unanchored = pending.hashes();
    if let Some(first) = report.unanchored.first() {
        tracing::warn!(
            "{} offered {} records whose writers' signatures it did not send (the first: {first:?}): kept out",
            remote.describe(),
            report.unanchored.len()
        );
    }
    let placed = placed_heads(local, remote, theirs.clone(), &mut report)?;
    report.replica_lacks = signed_lacking(local, &placed)?;
    report.replica_heads = theirs;
    Ok(report)
}

/// For each record of `order` (parents first), the position of the first record its own
/// writer signed at or after it that covers it (itself, or a descendant within `order`), or
/// None: an unsigned record no signature of its writer in `order` covers. Records in
/// `signed_here` count as signed.
fn anchored_positions(
    local: &Capsule,
    order: &[Node],
    signed_here: &HashSet<RecordHash>,
) -> Result<Vec<Option<usize>>> {
    let position: HashMap<RecordHash, usize> = order.iter().enumerate().map(|(i, n)| (n.record, i)).collect();
    // Per record: for each writer, the first position of that writer's signature below it.
    let mut below: Vec<HashMap<WriterId, usize>> = vec![HashMap::new(); order.len()];
    let mut anchor: Vec<Option<usize>> = vec![None; order.len()];
    for i in (0..order.len()).rev() {
        let record: Record = local.record(order[i].record)?;
        let writer = record.header.writer;
        let mut here = std::mem::take(&mut below[i]);
        if record.signature.is_some() || signed_here.contains(&order[i].record) {
            here.insert(writer, i);
        }
        anchor[i] = here.get(&writer).copied();
        for p in &order[i].parents {
            if let Some(&j) = position.get(p) {
                for (w, a) in &here {
                    let first = below[j].entry(*w).or_insert(*a);
                    *first = (*first).min(*a);
                }
            }
        }
    }
    Ok(anchor)
}
