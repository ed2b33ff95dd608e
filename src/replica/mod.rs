//! Untrusted replicas of a capsule behind one trait: the local store (`local`), a remote
//! `capsulefs serve` (`remote`), and objects in a folder or an S3 bucket (`objects` over
//! `folder` and `bucket`); `open` picks the kind from a URL. Moving records between them is
//! `sync`'s job.
//!
//! Nothing a replica answers is believed: heads, walks and missing-lists are hints that only
//! steer what is asked for next, and every record and payload goes through the capsule's one
//! gate (`Capsule::admit`) before it is stored.

mod ahead;
mod batch;
pub mod bloom;
pub mod bucket;
pub mod folder;
pub mod local;
pub mod objects;
pub mod prefetch;
pub mod remote;
pub mod sketch;

use std::collections::{HashMap, HashSet};

use crate::proof::fork::ForkEvidence;
use crate::record::{RecordHash, SubIdx, SubRecord};
use crate::wire::{Announced, Bundle, MAX_BATCH_BYTES, Node, Since};
use crate::{Error, Result, VerifyError};
pub(crate) use batch::{AnchoredBatch, batch_of};
use objects::{ObjectReplica, Pusher};

/// The batches of one transfer on their way to a replica, each anchored as `Replica::put`
/// requires (an unsigned record only with its signed descendant in the same batch).
pub trait PutStream {
    /// Hands over the next batch. An error may be the replica refusing an earlier one.
    fn send(&mut self, bundles: Vec<Bundle>) -> Result<()>;
    /// Hands over the last batch (`settles` as `put` takes it) and returns once the replica
    /// holds every batch durably; how many requests the transfer took.
    fn finish(self: Box<Self>, last: Vec<Bundle>, settles: Option<&[RecordHash]>) -> Result<u32>;
}

/// A `PutStream` made of one `put` a batch.
struct Puts<'a, R: Replica + ?Sized> {
    replica: &'a R,
    requests: u32,
}

impl<R: Replica + ?Sized> PutStream for Puts<'_, R> {
    fn send(&mut self, bundles: Vec<Bundle>) -> Result<()> {
        if !bundles.is_empty() {
            self.replica.put(bundles, None)?;
            self.requests += 1;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, last: Vec<Bundle>, settles: Option<&[RecordHash]>) -> Result<u32> {
        if !last.is_empty() {
            self.replica.put(last, settles)?;
            self.requests += 1;
        }
        Ok(self.requests)
    }
}

/// A replica of one capsule. Implementations: `Capsule` (the local store) and
/// `remote::Remote` (a `capsulefs serve`); object stores come next, as more implementations.
pub trait Replica: Send + Sync {
    /// Where it is, for messages.
    fn describe(&self) -> String;
    /// The capsule's signed metadata, if this replica holds the capsule.
    fn metadata(&self) -> Result<Option<Vec<u8>>>;
    /// Starts holding the capsule, from its signed metadata (checked by the replica).
    fn put_metadata(&self, signed: &[u8]) -> Result<()>;
    fn heads(&self) -> Result<Vec<RecordHash>>;
    /// Its heads, and how many forks it keeps evidence of where it says so in the same answer
    /// (a server and the local store do; elsewhere None: the evidence is asked when it matters).
    fn announce(&self) -> Result<Announced> {
        Ok(Announced { heads: self.heads()?, forks: None })
    }
    /// The heads once they differ from `known`, or after `wait`: how a follower hears of new
    /// records. A replica that cannot wait answers at once.
    fn watch_heads(&self, known: &[RecordHash], wait: std::time::Duration) -> Result<Vec<RecordHash>> {
        let _ = (known, wait);
        self.heads()
    }
    /// Which of `records` (at most `MAX_HASHES`) it does not hold. A replica holds a record
    /// only with all its ancestors.
    fn missing(&self, records: &[RecordHash]) -> Result<Vec<RecordHash>>;
    /// Records reachable from `from` through parent links, breadth first, at most `budget`
    /// (capped at `MAX_HASHES`), each with its parents; `from` included.
    fn walk(&self, from: &[RecordHash], budget: usize) -> Result<Vec<Node>>;
    /// Bundles of the records it holds among `records`, in that order, stopping once
    /// `MAX_BATCH_BYTES` is passed (at least one is returned if any is held).
    fn fetch(&self, records: &[RecordHash]) -> Result<Vec<Bundle>>;
    /// The records it holds that a holder of `heads` (at most `MAX_HASHES`) lacks, with its
    /// own heads, in one answer: heads go one way and records the other, so finding what to
    /// send costs 32 bytes a head, whatever the difference. With `headers_only`, the bundles
    /// carry no payloads (for a sparse replica, which fetches sub-records when they are read).
    fn since(&self, heads: &[RecordHash], headers_only: bool) -> Result<Since>;
    /// The difference between this replica's heads and the asker's, given as a sketch of
    /// them (`sketch::encode` under `salt`): with many heads on both sides, finding the few
    /// that differ costs cells in proportion to those, not 32 bytes a head. A replica with
    /// a list no longer than the sketch answers with the list.
    fn heads_difference(&self, salt: &[u8; 16], cells: &[sketch::Cell]) -> Result<sketch::Answer> {
        Ok(sketch::Answer::to(cells, self.heads()?, salt))
    }
    /// Sub-record `idx` of `record` with its Merkle path, as stored.
    fn sub_record(&self, record: RecordHash, idx: SubIdx) -> Result<Option<Vec<u8>>>;
    /// Sub-records `from`, `from + 1`, ... of `record` as stored: as many in a row as the
    /// replica holds, at most `count` (empty when it lacks even `from`). One request where the
    /// replica can answer so; else one per sub-record.
    fn sub_record_run(&self, record: RecordHash, from: SubIdx, count: u32) -> Result<Vec<Vec<u8>>> {
        let mut run = Vec::new();
        for i in (from.0..).take(count as usize) {
            match self.sub_record(record, SubIdx(i))? {
                Some(sub) => run.push(sub),
                None => break,
            }
        }
        Ok(run)
    }
    /// How many bytes of records one `put` should carry. A server bounds what it takes at
    /// `MAX_BATCH_BYTES`; an object store may take more, since each batch costs it an index
    /// segment and a statement, written one after the other, on top of the records.
    fn batch_bytes(&self) -> usize {
        MAX_BATCH_BYTES
    }
    /// Stores bundles given parents first. A replica checks every one before storing any,
    /// and takes an unsigned record only with a signed descendant in the same call.
    /// Returns how many were new. `settles`: on the last batch of a transfer that leaves the
    /// replica holding everything the sender holds, the sender's heads; an object store names
    /// them in its head statement (a server finds its heads itself).
    fn put(&self, bundles: Vec<Bundle>, settles: Option<&[RecordHash]>) -> Result<usize>;
    /// A transfer's batches, handed over one after the other (see `PutStream`): by default
    /// each is a `put`; a server takes them all in one request and stores each while the
    /// next arrives.
    fn put_stream(&self) -> Box<dyn PutStream + '_> {
        Box::new(Puts { replica: self, requests: 0 })
    }
    /// The fork evidence it keeps (`proof::fork`), at most `MAX_EVIDENCE`; whoever takes it
    /// checks each piece against the metadata first.
    fn evidence(&self) -> Result<Vec<ForkEvidence>>;
    /// Gives it evidence of forks (at most `MAX_EVIDENCE`), which it checks before keeping,
    /// so that it serves the evidence to every client.
    fn put_evidence(&self, evidence: &[ForkEvidence]) -> Result<()>;
    /// Whether pulls should walk down from its heads rather than ask `since`: true where
    /// answering `since` means reading the replica's whole index (object stores), while a
    /// walk reads only as far as the records the asker lacks.
    fn prefers_walking(&self) -> bool {
        false
    }
}

/// The payload of a sub-record as a replica stores it (encoded with its Merkle path), for a
/// `Bundle`, in the buffer it was read into. Not proven here: the receiver checks payloads
/// against the record's Merkle root.
pub(crate) fn payload_of(record: RecordHash, idx: SubIdx, stored: Vec<u8>) -> Result<Vec<u8>> {
    let (payload, _) =
        SubRecord::decode_in_place(stored).map_err(|source| VerifyError::MalformedSubRecord { record, idx, source })?;
    Ok(payload.into_vec())
}

/// Every capsule the replica location at `url` holds: a server's list, or a folder's
/// capsule folders.
pub fn capsules_at(url: &str) -> Result<Vec<crate::record::CapsuleId>> {
    use objects::Objects;
    let names = match url {
        u if u.starts_with("file://") => folder::Folder::from_url(url)?.list("")?,
        u if u.starts_with("s3://") => bucket::Bucket::from_url(url)?.list("")?,
        _ => return remote::Remote::capsules_at(url),
    };
    Ok(names.iter().filter_map(|n| crate::record::CapsuleId::from_hex(n).ok()).collect())
}

/// The replica of `capsule` at `url`: `http://` or `https://` for a `capsulefs serve`,
/// `file:///PATH` for a folder, `s3://BUCKET/PREFIX` for a bucket. `pusher` (this machine's writer key and device id) is needed
/// only to push to a folder, which keeps one signed head object per device.
pub fn open(url: &str, capsule: crate::record::CapsuleId, pusher: Option<Pusher>) -> Result<Box<dyn Replica>> {
    if url.starts_with("file://") {
        return Ok(Box::new(ObjectReplica::new(folder::Folder::from_url(url)?, capsule, pusher)));
    }
    if url.starts_with("s3://") {
        return Ok(Box::new(ObjectReplica::new(bucket::Bucket::from_url(url)?, capsule, pusher)));
    }
    Ok(Box::new(remote::Remote::new(url, capsule)?))
}

/// `nodes` ordered parents first. The parent lists may come from a replica, so a cycle (which
/// hashes cannot form) is refused rather than followed.
pub(crate) fn topological(nodes: &HashMap<RecordHash, Vec<RecordHash>>) -> Result<Vec<Node>> {
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
