//! Push and pull between the local capsule and any replica.
//!
//! Finding what to send costs heads, not ids: a replica holds a record only with all its
//! ancestors, so its heads say everything it holds. Push reads the replica's heads and sends
//! `Capsule::difference` of them; pull reads the replica's heads, stops there when it holds
//! them all, and otherwise sends its own heads with the replica's heads it holds, and the
//! replica answers with the records they do not cover (`Replica::since`). Neither side believes the other: everything
//! pulled is checked by `Capsule::check_incoming` before it is stored, and a pull that ends
//! with one of the replica's heads still unknown here (a replica that lied or lost something)
//! falls back to walking the replica's DAG from that head, so a miss costs round trips, never
//! a silent divergence.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{AnchoredBatch, Replica, sketch};
use crate::capsule::{Admission, Capsule, Pending};
use crate::proof::fork::ForkEvidence;
use crate::record::{CapsuleId, DeviceId, Record, RecordHash, RecordHeader, RecordKind, Seq, SubIdx, WriterId};
use crate::store::Durability;
use crate::wire::{Bundle, MAX_HASHES, Node};
use crate::{Error, Fork, Result, VerifyError};

/// The first slice of a fallback walk; each round asks about four times more.
const FIRST_BUDGET: usize = 16;

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

/// Signed records of one writer's device that a replica lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lacking {
    pub writer: WriterId,
    pub device: DeviceId,
    /// The highest sequence number among them, and the lowest.
    pub seq: Seq,
    pub lowest: Seq,
    pub count: usize,
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
fn hashes_len(n: usize) -> u64 {
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

/// Whether `e` refuses records as a fork: met here, or said by a replica.
pub fn is_fork(e: &Error) -> bool {
    match e {
        Error::Verify(VerifyError::Equivocation(_)) => true,
        Error::Verify(VerifyError::Refused { reason, .. }) => reason == "equivocation",
        _ => false,
    }
}

/// A replica refused a push as a fork, and kept the evidence: this capsule takes it too, to
/// pass on to every other replica.
fn learn_fork(local: &Capsule, remote: &dyn Replica, e: &Error) {
    if is_fork(e)
        && let Err(learning) = learn_evidence(local, remote, &mut Report::default())
    {
        tracing::warn!("{} refused a fork, but its evidence could not be read: {learning}", remote.describe());
    }
}

/// A pull met a fork in what `remote` served, and this capsule kept the evidence: the
/// replica gets it too, to serve to every other client.
fn tell_fork(local: &Capsule, remote: &dyn Replica, e: &Error) {
    if is_fork(e)
        && let Err(telling) = pass_evidence(local, remote, &mut Report::default())
    {
        tracing::warn!("passing fork evidence on to {}: {telling}", remote.describe());
    }
}

/// Gives `remote` the fork evidence this capsule keeps (nothing, and no request, when it
/// keeps none), so that the replica serves it to every other client.
pub fn pass_evidence(local: &Capsule, remote: &dyn Replica, report: &mut Report) -> Result<()> {
    let evidence = local.fork_evidence()?;
    if !evidence.is_empty() {
        remote.put_evidence(&evidence)?;
        report.round_trips += 1;
    }
    Ok(())
}

/// Takes the fork evidence `remote` keeps, each piece checked against the metadata; what was
/// new here goes in `report.forks_learned`. Evidence that does not check is refused and
/// logged: a replica that sends it lies, but cannot make this capsule believe a fork.
pub fn learn_evidence(local: &Capsule, remote: &dyn Replica, report: &mut Report) -> Result<()> {
    let evidence = remote.evidence()?;
    report.round_trips += 1;
    take_evidence(local, remote, &evidence, report);
    Ok(())
}

/// Keeps the fork evidence `remote` gave, each piece once it checks.
pub fn take_evidence(local: &Capsule, remote: &dyn Replica, evidence: &[ForkEvidence], report: &mut Report) {
    for e in evidence {
        match local.take_evidence(e) {
            Ok(Some(fork)) => report.forks_learned.push(fork),
            Ok(None) => {}
            Err(err) => tracing::warn!("{} sent fork evidence that does not check: {err}", remote.describe()),
        }
    }
}

/// `batch`, counted in `report` and shown as moved, on its way to a replica.
fn counted(batch: Vec<Bundle>, report: &mut Report, progress: &dyn Progress) -> Vec<Bundle> {
    report.bytes += batch.iter().map(|b| b.size() as u64).sum::<u64>();
    report.records += batch.len();
    progress.moved(report.records as u64, report.bytes);
    batch
}

/// Checks one answer's `bundles` (each as the record it was asked as, if given) and hands
/// them to the gate together (without payloads when `taking` headers, except a membership
/// record's: the rights every later record is checked against are read from them); counts
/// what it stored. Records still waiting for their writer's signature wait in `pending`.
fn take(
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
    run.into_iter().enumerate().map(|(i, stored)| super::payload_of(h, SubIdx(i as u32), stored)).collect()
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

/// The replica's heads as this capsule can place them: a head not held here (another
/// device's newest record, not pulled yet; or one kept out) stands for the records held here
/// that lie below it on the replica, found by walking the replica's DAG down to them. So a
/// push sends, and a lacking count counts, only what the replica truly lacks.
fn placed_heads(
    local: &Capsule,
    remote: &dyn Replica,
    theirs: Vec<RecordHash>,
    report: &mut Report,
) -> Result<Vec<RecordHash>> {
    let mut placed = Vec::with_capacity(theirs.len());
    let mut unknown = Vec::new();
    for h in theirs {
        if local.store().has_record(&h)? {
            placed.push(h);
        } else {
            unknown.push(h);
        }
    }
    if unknown.is_empty() {
        return Ok(placed);
    }
    let genesis = RecordHash::genesis(local.id());
    let mut lacks = |records: &[RecordHash]| -> Result<HashSet<RecordHash>> {
        let mut absent = HashSet::new();
        for r in records {
            if !local.store().has_record(r)? {
                absent.insert(*r);
            }
        }
        Ok(absent)
    };
    // A walk that fails ends the round: taking the replica to hold only the heads placed
    // would count all it holds below the others as lacking, a rollback that never happened.
    let lacking = walk_remote(remote, &unknown, genesis, &mut lacks, report)
        .inspect_err(|e| tracing::warn!("walking {} below heads not held here: {e}", remote.describe()))?;
    for p in lacking.values().flatten() {
        if *p != genesis && !lacking.contains_key(p) && local.store().has_record(p)? {
            placed.push(*p);
        }
    }
    placed.sort();
    placed.dedup();
    Ok(placed)
}

/// Up to this many local heads, listing the replica's heads costs less than a sketch.
const SKETCH_ABOVE: usize = 16;
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
fn signed_lacking(local: &Capsule, theirs: &[RecordHash]) -> Result<Vec<Lacking>> {
    let mut lanes = Lanes::default();
    for h in local.difference(theirs)? {
        lanes.add(&local.record(h)?);
    }
    Ok(lanes.into_vec())
}

/// Signed records counted by writer and device, as `Lacking`.
#[derive(Default)]
struct Lanes(BTreeMap<(WriterId, DeviceId), Lacking>);

impl Lanes {
    fn add(&mut self, record: &Record) {
        if record.signature.is_none() {
            return;
        }
        let RecordHeader { writer, device, seq, .. } = record.header;
        let entry = self.0.entry((writer, device)).or_insert(Lacking { writer, device, seq, lowest: seq, count: 0 });
        (entry.seq, entry.lowest, entry.count) = (entry.seq.max(seq), entry.lowest.min(seq), entry.count + 1);
    }

    fn into_vec(self) -> Vec<Lacking> {
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
fn haves(local: &Capsule) -> Result<Vec<RecordHash>> {
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

/// The slow, sure way: walks `remote`'s DAG from `heads` until records held here, then
/// fetches what it found, parents first.
fn pull_walking(
    local: &Capsule,
    remote: &dyn Replica,
    heads: &[RecordHash],
    pending: &mut Pending,
    report: &mut Report,
    progress: &dyn Progress,
) -> Result<()> {
    let mut lacks = |records: &[RecordHash]| -> Result<HashSet<RecordHash>> {
        let mut absent = HashSet::new();
        for r in records {
            if !local.store().has_record(r)? {
                absent.insert(*r);
            }
        }
        Ok(absent)
    };
    let lacking = walk_remote(remote, heads, RecordHash::genesis(local.id()), &mut lacks, report)?;
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

/// `nodes` ordered parents first. The parent lists may come from a replica, so a cycle (which
/// hashes cannot form) is refused rather than followed.
pub(super) fn topological(nodes: &HashMap<RecordHash, Vec<RecordHash>>) -> Result<Vec<Node>> {
    let mut order = Vec::with_capacity(nodes.len());
    let mut done: HashSet<RecordHash> = HashSet::new();
    let mut sorted: Vec<&RecordHash> = nodes.keys().collect();
    sorted.sort(); // the same order on every run
    for &start in sorted {
        let mut on_path: HashSet<RecordHash> = HashSet::new();
        let mut stack: Vec<(RecordHash, bool)> = vec![(start, false)];
        while let Some((h, expanded)) = stack.pop() {
            if done.contains(&h) {
                continue;
            }
            let parents = &nodes[&h];
            if expanded {
                on_path.remove(&h);
                done.insert(h);
                order.push(Node { record: h, parents: parents.clone() });
                continue;
            }
            if !on_path.insert(h) {
                return Err(Error::Invalid(format!("the parent links given for {h:?} form a cycle")));
            }
            stack.push((h, true));
            for p in parents {
                if nodes.contains_key(p) && !done.contains(p) {
                    if on_path.contains(p) {
                        return Err(Error::Invalid(format!("the parent links given for {p:?} form a cycle")));
                    }
                    stack.push((*p, false));
                }
            }
        }
    }
    Ok(order)
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
