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

use crate::capsule::{Admission, Capsule, Pending};
use crate::record::{Record, RecordHash, RecordKind, SubIdx, WriterId};
use crate::replica::{AnchoredBatch, Replica};
use crate::store::Durability;
use crate::wire::{Bundle, Node};
use crate::{Error, Fork, Result, VerifyError};

use super::evidence::{learn_fork, pass_evidence, tell_fork};
use super::heads::{Lacking, Lanes, SKETCH_ABOVE, haves, placed_heads, replica_heads, signed_lacking};
use super::walk::pull_walking;

/// What one push or pull moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub records: usize,
    /// Record bytes (encodings and payloads).
    pub bytes: u64,
    /// Bytes of the messages that found what to send (heads, walks, requests), each way.
    pub reconcile_sent: u64,
    pub reconcile_received: u64,
    pub round_trips: u32,
    /// Local unsigned records no signed record covers yet: a replica takes them only with a
    /// signed descendant, so they wait for the next signature (a mount signs within T seconds).
    pub waiting_for_signature: usize,
    /// Signed records this capsule holds that the replica did not (before a push, after a
    /// pull), by writer and device. The local capsule never moves back (it
    /// only ever adds records); a replica that offers less is behind, or was rolled back.
    pub replica_lacks: Vec<Lacking>,
    /// After a pull: the replica's heads as it last gave them (a follower waits for them
    /// to change).
    pub replica_heads: Vec<RecordHash>,
    /// Forks this capsule learned of from the replica's evidence.
    pub forks_learned: Vec<Fork>,
    /// Records the replica offered that a revocation held here cuts off: kept out, the rest
    /// taken.
    pub revoked: Vec<RecordHash>,
    /// Unsigned records the replica offered without a descendant their writer signed (and
    /// their descendants): kept out, as unverified (a replica that holds them honestly holds
    /// that descendant too).
    pub unanchored: Vec<RecordHash>,
}

/// Told as records move, for a progress bar; `&()` ignores it.
pub trait Progress {
    /// How many records are still to come, once a transfer knows (a pull through `since`
    /// does not).
    fn expect(&self, records: u64) {
        let _ = records;
    }
    /// Records and bytes moved so far.
    fn moved(&self, records: u64, bytes: u64);
}

impl Progress for () {
    fn moved(&self, _: u64, _: u64) {}
}

/// Bytes of a list of hashes on the wire (borsh: u32 length, then 32 bytes each).
pub(super) fn hashes_len(n: usize) -> u64 {
    4 + 32 * n as u64
}

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

/// `batch`, counted in `report` and shown as moved, on its way to a replica.
pub(super) fn counted(batch: Vec<Bundle>, report: &mut Report, progress: &dyn Progress) -> Vec<Bundle> {
    report.bytes += batch.iter().map(|b| b.size() as u64).sum::<u64>();
    report.records += batch.len();
    progress.moved(report.records as u64, report.bytes);
    batch
}

/// Checks one answer's `bundles` (each as the record it was asked as, if given) and hands
/// them to the gate together (without payloads when `taking` headers, except a membership
/// record's: the rights every later record is checked against are read from them); counts
/// what it stored. Records still waiting for their writer's signature wait in `pending`.
pub(super) fn take(
    local: &Capsule,
    remote: &dyn Replica,
    bundles: Vec<(Bundle, Option<RecordHash>)>,
    taking: Take,
    pending: &mut Pending,
    report: &mut Report,
    progress: &dyn Progress,
) -> Result<()> {
    let mut batch = Vec::with_capacity(bundles.len());
    for (mut bundle, expected) in bundles {
        if taking == Take::Headers && bundle.payloads.is_empty() {
            bundle.payloads = membership_payloads(remote, &bundle.record)?;
        }
        let size = bundle.size() as u64;
        let incoming = if taking == Take::Headers && bundle.payloads.is_empty() {
            local.check_incoming_header(&bundle.record)?
        } else {
            local.check_incoming(&bundle.record, bundle.payloads)?
        };
        if let Some(expected) = expected
            && incoming.hash() != expected
        {
            return Err(Error::Invalid(format!(
                "{} answered {:?} when asked for {expected:?}",
                remote.describe(),
                incoming.hash()
            )));
        }
        report.bytes += size;
        batch.push(incoming);
    }
    let admitted = local.admit(batch, Admission::Pull(pending), Durability::Buffered)?;
    report.records += admitted.stored.len();
    for h in admitted.revoked {
        if !report.revoked.contains(&h) {
            tracing::warn!("{}: kept out {h:?}: a revocation held here cuts it off", remote.describe());
            report.revoked.push(h);
        }
    }
    progress.moved(report.records as u64, report.bytes);
    Ok(())
}

/// The payloads of `record` when it is a membership record (fetched from `remote`); none else.
fn membership_payloads(remote: &dyn Replica, record: &[u8]) -> Result<Vec<Vec<u8>>> {
    let parsed = Record::decode(record).map_err(VerifyError::Undecodable)?;
    let header = &parsed.header;
    if header.kind != RecordKind::Membership || header.sub_count == 0 {
        return Ok(Vec::new());
    }
    let h = parsed.hash();
    let run = remote.sub_record_run(h, SubIdx(0), header.sub_count)?;
    if run.len() != header.sub_count as usize {
        return Err(Error::Replica(format!(
            "{} holds {} of the {} entries of membership record {h:?}: pull it whole from another replica",
            remote.describe(),
            run.len(),
            header.sub_count
        )));
    }
    run.into_iter().enumerate().map(|(i, stored)| crate::replica::payload_of(h, SubIdx(i as u32), stored)).collect()
}

/// What a pull takes of each record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Take {
    /// Header and sub-records.
    Whole,
    /// The header only: a sparse replica, which fetches sub-records when they are read.
    Headers,
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
        if local.store().has_record(&h)? {
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
        if !local.store().has_record(&h)? {
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
    local.store().sync()?;
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
