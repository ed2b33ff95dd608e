//! A capsule replica kept as plain objects, in a folder (`folder.rs`) or a bucket
//! (`bucket.rs`): no capsule server, nothing on the far side that runs code. The layout, under
//! `<capsule id hex>/` (bytes in ARCHITECTURE.md):
//!
//! - `metadata`: the signed metadata.
//! - `records/<record hex>`: one record and its sub-records, each with its Merkle path, behind
//!   a table of lengths, so that sub-record i is one ranged read once the table is known.
//! - `index/<device hex>/<n, 16 hex digits>`: segment n of one device's pushes, the records it
//!   wrote with their parents.
//! - `heads/<device hex>`: that device's statement, signed by its writer: how many segments it
//!   wrote and heads that cover everything it pushed.
//! - `evidence/<32 hex>`: fork evidence (`proof::fork`), named by a hash of its bytes.
//!
//! Records and segments are named by what they hold and never rewritten; a head object has
//! exactly one writer, the device it names, so two devices pushing at once cannot lose each
//! other's work on any store, whatever it does with conditional writes. Readers take the union
//! of every valid statement as the heads, and read segments, newest first, only as far as a
//! walk from the heads they lack needs, so finding what changed costs the number of devices
//! plus what changed, not the capsule's size.
//! Nothing here is believed: a statement counts only with a valid signature of an authorized
//! writer, and every record read goes through the capsule's own checks before it is stored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use borsh::{BorshDeserialize, BorshSerialize};

use super::ahead::ReadAhead;
use super::{Replica, batch_of, payload_of};
use crate::capsule::{check_metadata, sub_records};
use crate::crypto::keys::Identity;
use crate::crypto::sign;
use crate::proof::fork::ForkEvidence;
use crate::record::{CapsuleId, Record, RecordHash, Signature, SignedMetadata, SubIdx, SubRecordBuf, WriterId};
use crate::wire::{Bundle, MAX_EVIDENCE, MAX_HASHES, Node, Since};
use crate::{Error, Result, VerifyError};

/// The first bytes of every record object.
const RECORD_MAGIC: &[u8; 8] = b"capsrec1";
/// How much of a record object one read takes to find a sub-record: the table of a record
/// with up to ~16 000 sub-records, and often the sub-record itself.
const TABLE_READ: u64 = 64 << 10;
/// Most sub-records a record object may claim (a sealed commit has at most 65 536).
const MAX_SUBS: u32 = 1 << 17;
/// Record objects a push writes at once: a bucket takes one PUT at tens of milliseconds of
/// latency, so a batch of small records goes several at a time.
const PUTS_AT_ONCE: usize = 4;
/// Record objects a clone or pull reads ahead at once, and the bytes they may hold waiting.
const GETS_AT_ONCE: usize = 4;
/// Record bytes one push batch carries to a folder or bucket: four times a server's, so that
/// a batch of 16 MiB records keeps `PUTS_AT_ONCE` busy, and the segment and statement each
/// batch ends with are written a quarter as often (held twice in memory while written).
const PUT_BATCH_BYTES: usize = 4 * crate::wire::MAX_BATCH_BYTES;
const AHEAD_BYTES: usize = 128 << 20;

/// The objects a replica is kept in: a folder, or a bucket.
pub trait Objects: Send + Sync {
    fn describe(&self) -> String;
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Up to `len` bytes from `start` (fewer at the end); None if there is no such object.
    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Option<Vec<u8>>>;
    /// Writes an object whole and durably: a reader sees the old bytes or the new, never a mix.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// The names directly under `prefix` (a folder's entries, a bucket's delimited listing).
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
}

/// This machine, when it pushes: its writer identity and its device id (one head object each).
#[derive(Clone)]
pub struct Pusher {
    pub identity: Identity,
    pub device: [u8; 16],
    /// A file this device's pushes lock while they write a segment and the statement, so
    /// that two processes of one home (a mount's background push and `capsulefs push`) take
    /// turns instead of writing the same segment number.
    pub turn: Option<PathBuf>,
}

/// What a device says it pushed.
#[derive(BorshSerialize, BorshDeserialize)]
struct Statement {
    capsule: CapsuleId,
    device: [u8; 16],
    writer: WriterId,
    segments: u64,
    heads: Vec<RecordHash>,
}

#[derive(BorshSerialize, BorshDeserialize)]
struct SignedStatement {
    statement: Statement,
    signature: Signature,
}

impl Statement {
    fn digest(&self) -> [u8; 32] {
        *blake3::hash(&borsh::to_vec(self).expect("encoding to memory")).as_bytes()
    }
}

/// What this process has read of the replica's index. Statements are read every round;
/// segments only when a question needs them, newest first, so that finding a few new records
/// reads the few segments that name them, not the whole index.
#[derive(Default)]
struct Index {
    parents: HashMap<RecordHash, Vec<RecordHash>>,
    /// Records some record names as a parent: the heads are the others.
    has_child: HashSet<RecordHash>,
    /// By device, the heads its statement names: together they cover everything pushed.
    stated: HashMap<[u8; 16], Vec<RecordHash>>,
    /// By device, the segments its statement counts.
    segments: HashMap<[u8; 16], u64>,
    /// By device, the segments not read yet, the newest last.
    unread: HashMap<[u8; 16], Vec<u64>>,
    /// Whether the statements were read at all.
    read: bool,
}

impl Index {
    fn add(&mut self, node: Node) {
        if self.parents.contains_key(&node.record) {
            return;
        }
        self.has_child.extend(node.parents.iter().copied());
        self.parents.insert(node.record, node.parents);
    }

    /// The records the statements name that no record read so far names as a parent: every
    /// head of the replica, and perhaps some of their ancestors (which a holder of the heads
    /// holds anyway).
    fn heads(&self) -> Vec<RecordHash> {
        let mut heads: Vec<RecordHash> =
            self.stated.values().flatten().filter(|h| !self.has_child.contains(h)).copied().collect();
        heads.sort();
        heads.dedup();
        heads
    }

    /// Takes note of a device's statement: its heads, and its segments not seen before as
    /// unread.
    fn state(&mut self, statement: Statement) {
        let seen = self.segments.get(&statement.device).copied().unwrap_or(0);
        if statement.segments > seen {
            self.unread.entry(statement.device).or_default().extend(seen..statement.segments);
            self.segments.insert(statement.device, statement.segments);
        }
        self.stated.insert(statement.device, statement.heads);
    }

    /// The next segments to read: the newest unread one of each device.
    fn next_unread(&mut self) -> Vec<([u8; 16], u64)> {
        self.unread.iter_mut().filter_map(|(device, unread)| Some((*device, unread.pop()?))).collect()
    }

    /// Every record of the index reachable from `from` (those it holds), `from` included.
    fn ancestors(&self, from: &[RecordHash]) -> HashSet<RecordHash> {
        let mut seen = HashSet::new();
        let mut stack: Vec<RecordHash> = from.iter().filter(|h| self.parents.contains_key(h)).copied().collect();
        while let Some(h) = stack.pop() {
            if seen.insert(h) {
                stack.extend(self.parents[&h].iter().filter(|p| self.parents.contains_key(p)));
            }
        }
        seen
    }
}

/// The records of `index` that `heads` do not cover, with their parents; and the index's
/// heads.
fn not_covered(index: &Index, heads: &[RecordHash]) -> (HashMap<RecordHash, Vec<RecordHash>>, Vec<RecordHash>) {
    let covered = index.ancestors(&heads[..heads.len().min(MAX_HASHES)]);
    let lacking = index.parents.iter().filter(|(h, _)| !covered.contains(h)).map(|(h, p)| (*h, p.clone())).collect();
    (lacking, index.heads())
}

/// A record object's contents: the record's encoding, and its sub-records, each encoded with
/// its Merkle path as a store keeps it.
struct RecordObject {
    record: Vec<u8>,
    subs: Vec<Vec<u8>>,
}

/// The first bytes of a record object as read (the whole object when its table is longer
/// than `TABLE_READ`), and its table.
struct Head {
    bytes: Vec<u8>,
    record_len: usize,
    lens: Vec<usize>,
    /// Where the record starts; its sub-records follow it.
    start: usize,
}

pub struct ObjectReplica<O: Objects> {
    objects: Arc<O>,
    /// Record objects read ahead of `since` and `fetch`.
    ahead: ReadAhead<String>,
    capsule: CapsuleId,
    pusher: Option<Pusher>,
    /// The signed metadata once read and checked: immutable, named by the capsule's id.
    metadata: OnceLock<SignedMetadata>,
    index: Mutex<Index>,
}

/// Waits for this device's turn to write its segment and statement: an exclusive lock on
/// `path`, held until the file is dropped.
fn take_turn(path: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.lock().map_err(|e| Error::io(path, e))?;
    Ok(file)
}

fn hex16(device: &[u8; 16]) -> String {
    hex::encode(device)
}

/// A record object: magic, sub-record count and record length (u32 LE each), each
/// sub-record's length (u32 LE), the record, the sub-records.
fn encode_object(record: &[u8], subs: &[Vec<u8>]) -> Vec<u8> {
    let total = 16 + 4 * subs.len() + record.len() + subs.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&(subs.len() as u32).to_le_bytes());
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    for s in subs {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(record);
    subs.iter().for_each(|s| out.extend_from_slice(s));
    out
}

/// A record object's table: (record length, sub-record lengths, where the record starts).
fn parse_table(bytes: &[u8]) -> Option<(usize, Vec<usize>, usize)> {
    let word = |at: usize| Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    if bytes.get(..8)? != RECORD_MAGIC {
        return None;
    }
    let (count, record_len) = (word(8)?, word(12)? as usize);
    if count > MAX_SUBS {
        return None;
    }
    let lens: Vec<usize> = (0..count as usize).map(|i| word(16 + 4 * i).map(|l| l as usize)).collect::<Option<_>>()?;
    Some((record_len, lens, 16 + 4 * count as usize))
}

impl<O: Objects + 'static> ObjectReplica<O> {
    pub fn new(objects: O, capsule: CapsuleId, pusher: Option<Pusher>) -> Self {
        let objects = Arc::new(objects);
        let source = objects.clone();
        let ahead = ReadAhead::new(Arc::new(move |key: &String| source.get(key)), GETS_AT_ONCE, AHEAD_BYTES);
        Self { ahead, objects, capsule, pusher, metadata: OnceLock::new(), index: Mutex::default() }
    }

    fn record_key(&self, h: &RecordHash) -> String {
        self.key(&format!("records/{}", h.to_hex()))
    }

    fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.capsule.to_hex())
    }

    fn malformed(&self, what: &str) -> Error {
        Error::Replica(format!("{}: {what} is malformed (altered or truncated?)", self.objects.describe()))
    }

    /// The signed metadata; an error if the replica does not hold the capsule.
    fn held_metadata(&self) -> Result<&SignedMetadata> {
        self.signed_metadata()?
            .ok_or_else(|| Error::NotFound(format!("capsule {:?} in {}", self.capsule, self.objects.describe())))
    }

    fn signed_metadata(&self) -> Result<Option<&SignedMetadata>> {
        if let Some(signed) = self.metadata.get() {
            return Ok(Some(signed));
        }
        self.objects.get(&self.key("metadata"))?.map(|bytes| self.keep_metadata(&bytes)).transpose()
    }

    /// `bytes` checked as this capsule's signed metadata, and kept.
    fn keep_metadata(&self, bytes: &[u8]) -> Result<&SignedMetadata> {
        let signed = check_metadata(bytes)?;
        if signed.metadata.id() != self.capsule {
            return Err(self.malformed("the metadata object"));
        }
        Ok(self.metadata.get_or_init(|| signed))
    }

    /// `refresh`, unless done already: a round reads the statements once, at its `heads` or
    /// `since`; the questions after it (`missing`, `walk`, `put`) use what that read, and
    /// `put` adds what it writes. Each read is a listing and a request per device.
    fn read_once(&self) -> Result<()> {
        if self.index.lock().expect("no panics while locked").read {
            return Ok(());
        }
        self.refresh()
    }

    /// Reads the statements of every device. A statement that does not verify is skipped
    /// with a warning: it cannot hide what valid ones name.
    fn refresh(&self) -> Result<()> {
        self.held_metadata()?;
        let mut index = self.index.lock().expect("no panics while locked");
        for name in self.objects.list(&self.key("heads"))? {
            self.read_device(&name, &mut index)?;
        }
        index.read = true;
        Ok(())
    }

    /// Reads device `name`'s statement into `index` (its segments are read when needed); a
    /// statement that does not verify is skipped with a warning. Whether its writer may write
    /// is not asked here: writers are granted in the capsule's own records, and every record
    /// a statement names is checked as it is taken.
    fn read_device(&self, name: &str, index: &mut Index) -> Result<()> {
        let Some(bytes) = self.objects.get(&self.key(&format!("heads/{name}")))? else { return Ok(()) };
        match borsh::from_slice::<SignedStatement>(&bytes) {
            Ok(s)
                if hex16(&s.statement.device) == name
                    && s.statement.capsule == self.capsule
                    && sign::verify_heads(&s.statement.writer, &s.statement.digest(), &s.signature) =>
            {
                index.state(s.statement);
            }
            _ => tracing::warn!("{}: ignoring heads/{name}: not a valid signed statement", self.objects.describe()),
        }
        Ok(())
    }

    /// Reads the newest unread segment of each device into `index`; false if none was left.
    fn read_more(&self, index: &mut Index) -> Result<bool> {
        let next = index.next_unread();
        for (device, n) in &next {
            let key = self.key(&format!("index/{}/{n:016x}", hex16(device)));
            let bytes = self.objects.get(&key)?.ok_or_else(|| {
                Error::Replica(format!(
                    "{}: {key} is missing, though the device's heads name it",
                    self.objects.describe()
                ))
            })?;
            let nodes: Vec<Node> = borsh::from_slice(&bytes).map_err(|_| self.malformed(&key))?;
            nodes.into_iter().for_each(|node| index.add(node));
        }
        Ok(!next.is_empty())
    }

    /// The statements (once a round) and every segment they count: the whole index, for the
    /// questions that need it (`missing`, `since`).
    fn read_whole(&self) -> Result<std::sync::MutexGuard<'_, Index>> {
        self.read_once()?;
        let mut index = self.index.lock().expect("no panics while locked");
        while self.read_more(&mut index)? {}
        Ok(index)
    }

    /// Record `h`'s object, parsed.
    fn read_object(&self, h: &RecordHash) -> Result<Option<RecordObject>> {
        let key = self.record_key(h);
        let Some(bytes) = self.ahead.get(&key)? else { return Ok(None) };
        let (record_len, lens, start) = parse_table(&bytes).ok_or_else(|| self.malformed(&key))?;
        let mut at = start;
        let mut take = |len: usize| -> Result<Vec<u8>> {
            let piece = bytes.get(at..at + len).ok_or_else(|| self.malformed(&key))?.to_vec();
            at += len;
            Ok(piece)
        };
        let record = take(record_len)?;
        self.check_named(h, &key, &record)?;
        let subs = lens.iter().map(|&l| take(l)).collect::<Result<_>>()?;
        Ok(Some(RecordObject { record, subs }))
    }

    /// Another record's object put under this name (swapped) is refused here, by name.
    fn check_named(&self, h: &RecordHash, key: &str, record: &[u8]) -> Result<()> {
        if Record::decode(record).map(|r| r.hash()).ok() != Some(*h) {
            return Err(Error::Replica(format!(
                "{}: {key} holds another record than its name says (swapped or altered)",
                self.objects.describe()
            )));
        }
        Ok(())
    }

    /// The head of the object at `key`: one ranged read, or the whole object when its
    /// table does not fit in it; None if there is no such object.
    fn head(&self, key: &str) -> Result<Option<Head>> {
        let Some(mut bytes) = self.objects.get_range(key, 0, TABLE_READ)? else { return Ok(None) };
        if parse_table(&bytes).is_none() && bytes.len() as u64 == TABLE_READ {
            let Some(whole) = self.objects.get(key)? else { return Ok(None) };
            bytes = whole;
        }
        let (record_len, lens, start) = parse_table(&bytes).ok_or_else(|| self.malformed(key))?;
        Ok(Some(Head { bytes, record_len, lens, start }))
    }

    /// `len` bytes at `offset` of the object at `key`: from `head` when it holds them, else
    /// by a ranged read (None if the object is gone).
    fn piece(&self, key: &str, head: &Head, offset: usize, len: usize) -> Result<Option<Vec<u8>>> {
        match head.bytes.get(offset..offset + len) {
            Some(bytes) => Ok(Some(bytes.to_vec())),
            None => self.objects.get_range(key, offset as u64, len as u64),
        }
    }

    /// Record `h`'s encoding alone, without reading its sub-records (a sparse clone's headers).
    fn read_header(&self, h: &RecordHash) -> Result<Option<Vec<u8>>> {
        let key = self.record_key(h);
        let Some(head) = self.head(&key)? else { return Ok(None) };
        let record = self.piece(&key, &head, head.start, head.record_len)?.unwrap_or_default();
        self.check_named(h, &key, &record)?;
        Ok(Some(record))
    }
}

impl<O: Objects + 'static> Replica for ObjectReplica<O> {
    fn describe(&self) -> String {
        self.objects.describe()
    }

    fn metadata(&self) -> Result<Option<Vec<u8>>> {
        let bytes = self.objects.get(&self.key("metadata"))?;
        // Kept once checked, so that reading the statements next does not read it again; the
        // caller judges bytes that do not check.
        if let Some(bytes) = &bytes
            && self.metadata.get().is_none()
        {
            let _ = self.keep_metadata(bytes);
        }
        Ok(bytes)
    }

    fn prefers_walking(&self) -> bool {
        true
    }

    fn put_metadata(&self, signed: &[u8]) -> Result<()> {
        match self.objects.get(&self.key("metadata"))? {
            Some(held) if held == signed => Ok(()),
            Some(_) => Err(Error::Invalid(format!(
                "{} holds other metadata under {:?}",
                self.objects.describe(),
                self.capsule
            ))),
            None => {
                if check_metadata(signed)?.metadata.id() != self.capsule {
                    return Err(Error::Invalid(format!("not the metadata of {:?}", self.capsule)));
                }
                self.objects.put(&self.key("metadata"), signed)
            }
        }
    }

    /// Evidence objects, `evidence/<blake3 of the encoding, 32 hex digits>`: anyone may write
    /// one (it proves itself), so a malformed one is skipped, not believed.
    fn evidence(&self) -> Result<Vec<ForkEvidence>> {
        let mut evidence = Vec::new();
        for name in self.objects.list(&self.key("evidence"))?.into_iter().take(MAX_EVIDENCE) {
            let Some(bytes) = self.objects.get(&self.key(&format!("evidence/{name}")))? else { continue };
            match borsh::from_slice::<ForkEvidence>(&bytes) {
                Ok(e) => evidence.push(e),
                Err(_) => tracing::warn!("{}: ignoring evidence/{name}: malformed", self.objects.describe()),
            }
        }
        Ok(evidence)
    }

    fn put_evidence(&self, evidence: &[ForkEvidence]) -> Result<()> {
        for e in evidence.iter().take(MAX_EVIDENCE) {
            let bytes = borsh::to_vec(e).expect("encoding to memory cannot fail");
            let name = hex::encode(&blake3::hash(&bytes).as_bytes()[..16]);
            self.objects.put(&self.key(&format!("evidence/{name}")), &bytes)?;
        }
        Ok(())
    }

    fn heads(&self) -> Result<Vec<RecordHash>> {
        self.refresh()?;
        Ok(self.index.lock().expect("no panics while locked").heads())
    }

    fn missing(&self, records: &[RecordHash]) -> Result<Vec<RecordHash>> {
        let index = self.read_whole()?;
        Ok(records.iter().take(MAX_HASHES).filter(|h| !index.parents.contains_key(h)).copied().collect())
    }

    /// Reads segments, newest first, only until they name the records asked about; beyond
    /// them the walk goes as far as the segments read so far reach. An asker that walks from
    /// a few new heads down to records it holds reads the newest segments, not the index.
    fn walk(&self, from: &[RecordHash], budget: usize) -> Result<Vec<Node>> {
        self.read_once()?;
        let mut index = self.index.lock().expect("no panics while locked");
        let asked: HashSet<&RecordHash> = from.iter().collect();
        let mut seen = HashSet::new();
        let mut queue: VecDeque<RecordHash> = from.iter().copied().collect();
        let mut nodes = Vec::new();
        while let Some(h) = queue.pop_front() {
            if nodes.len() >= budget.min(MAX_HASHES) {
                break;
            }
            while asked.contains(&h) && !index.parents.contains_key(&h) && self.read_more(&mut index)? {}
            let Some(parents) = index.parents.get(&h) else { continue };
            if seen.insert(h) {
                queue.extend(parents.iter().copied());
                nodes.push(Node { record: h, parents: parents.clone() });
            }
        }
        Ok(nodes)
    }

    fn fetch(&self, records: &[RecordHash]) -> Result<Vec<Bundle>> {
        let records = &records[..records.len().min(MAX_HASHES)];
        self.ahead.plan(records.iter().map(|h| self.record_key(h)));
        // A record the index names must have its object; one it does not is simply not held.
        let bundle = |h: RecordHash| match self.bundle(&h, false)? {
            None if self.index.lock().expect("no panics while locked").parents.contains_key(&h) => {
                Err(self.missing_object(&h))
            }
            found => Ok(found),
        };
        Ok(batch_of(records.iter().copied(), bundle)?.0)
    }

    fn since(&self, heads: &[RecordHash], headers_only: bool) -> Result<Since> {
        // The index read so far answers while it has something the asker lacks (a pull
        // comes back for the rest batch by batch); once the asker has caught up with it,
        // the statements are read again for what was pushed since.
        let (mut lacking, mut own_heads) = not_covered(&*self.read_whole()?, heads);
        if lacking.is_empty() {
            self.refresh()?;
            (lacking, own_heads) = not_covered(&*self.read_whole()?, heads);
        }
        let order: Vec<RecordHash> = super::topological(&lacking)?.into_iter().map(|n| n.record).collect();
        // The next answers will hold these too, in this order: read them ahead (whole objects;
        // headers alone are small ranged reads).
        if !headers_only {
            self.ahead.plan(order.iter().map(|h| self.record_key(h)));
        }
        let (bundles, more) =
            batch_of(order, |h| self.bundle(&h, headers_only)?.map(Some).ok_or_else(|| self.missing_object(&h)))?;
        Ok(Since { heads: own_heads, bundles, more })
    }

    fn batch_bytes(&self) -> usize {
        PUT_BATCH_BYTES
    }

    fn sub_record(&self, record: RecordHash, idx: SubIdx) -> Result<Option<Vec<u8>>> {
        Ok(self.sub_record_run(record, idx, 1)?.pop())
    }

    /// A run of sub-records lies in one piece of the record's object: one ranged read.
    fn sub_record_run(&self, record: RecordHash, from: SubIdx, count: u32) -> Result<Vec<Vec<u8>>> {
        let key = self.record_key(&record);
        let Some(head) = self.head(&key)? else { return Ok(Vec::new()) };
        let first = (from.0 as usize).min(head.lens.len());
        let lens = &head.lens[first..(first + count as usize).min(head.lens.len())];
        if lens.is_empty() {
            return Ok(Vec::new());
        }
        let offset = head.start + head.record_len + head.lens[..first].iter().sum::<usize>();
        let Some(bytes) = self.piece(&key, &head, offset, lens.iter().sum())? else { return Ok(Vec::new()) };
        // A short answer (a truncated object) gives the sub-records it holds whole.
        let mut rest = &bytes[..];
        let mut run = Vec::new();
        for &len in lens {
            let Some((sub, after)) = rest.split_at_checked(len) else { break };
            run.push(sub.to_vec());
            rest = after;
        }
        Ok(run)
    }

    /// Writes the records that the replica lacks (a few at once), then one index segment
    /// naming them, then this device's statement: a reader that sees the statement finds
    /// every object it names. The records are checked against their Merkle roots; the rest
    /// of the checks are every reader's.
    fn put(&self, bundles: Vec<Bundle>, settles: Option<&[RecordHash]>) -> Result<usize> {
        let pusher = self.pusher.as_ref().ok_or_else(|| {
            Error::Invalid(format!("pushing to {} needs a writer key of this capsule here", self.objects.describe()))
        })?;
        self.read_once()?;
        let mut nodes = Vec::new();
        let mut objects = Vec::new();
        for bundle in &bundles {
            let record = Record::decode(&bundle.record).map_err(VerifyError::Undecodable)?;
            let h = record.hash();
            if self.index.lock().expect("no panics while locked").parents.contains_key(&h) {
                continue;
            }
            let (root, subs) = sub_records(bundle.payloads.iter().map(|p| SubRecordBuf::copied(p)).collect());
            if root != record.header.merkle_root || subs.len() != record.header.sub_count as usize {
                return Err(Error::Invalid(format!("{h:?}: its payloads do not match its Merkle root")));
            }
            objects.push((self.record_key(&h), encode_object(&bundle.record, &subs)));
            nodes.push(Node { record: h, parents: record.header.parents });
        }
        if nodes.is_empty() {
            return Ok(0);
        }
        self.put_all(&objects)?;
        let _turn = pusher.turn.as_deref().map(take_turn).transpose()?;
        let mut index = self.index.lock().expect("no panics while locked");
        let device = hex16(&pusher.device);
        // Another process of this device may have pushed since this one read the index.
        self.held_metadata()?;
        self.read_device(&device, &mut index)?;
        let n = index.segments.get(&pusher.device).copied().unwrap_or(0);
        self.objects.put(&self.key(&format!("index/{device}/{n:016x}")), &borsh::to_vec(&nodes).expect("to memory"))?;
        let stored = nodes.len();
        let pushed: Vec<RecordHash> = nodes.iter().map(|n| n.record).collect();
        nodes.into_iter().for_each(|node| index.add(node));
        // The statement's heads cover everything this device pushed: the sender's heads once
        // it says this batch settles the transfer, else the last statement's and this batch's
        // that no record known names as a parent.
        let mut heads: Vec<RecordHash> = match settles {
            Some(heads) => heads.to_vec(),
            None => {
                let before = index.stated.get(&pusher.device).into_iter().flatten();
                before.chain(&pushed).filter(|h| !index.has_child.contains(h)).copied().collect()
            }
        };
        heads.sort();
        heads.dedup();
        let statement = Statement {
            capsule: self.capsule,
            device: pusher.device,
            writer: pusher.identity.writer(),
            segments: n + 1,
            heads,
        };
        let signature = sign::sign_heads(pusher.identity.key(), &statement.digest());
        let signed = SignedStatement { statement, signature };
        self.objects.put(&self.key(&format!("heads/{device}")), &borsh::to_vec(&signed).expect("to memory"))?;
        index.segments.insert(pusher.device, n + 1);
        index.stated.insert(pusher.device, signed.statement.heads);
        Ok(stored)
    }
}

impl<O: Objects + 'static> ObjectReplica<O> {
    /// Writes `objects`, `PUTS_AT_ONCE` at a time; the first error, if any, once all ended.
    fn put_all(&self, objects: &[(String, Vec<u8>)]) -> Result<()> {
        let next = AtomicUsize::new(0);
        let put_some = || -> Result<()> {
            while let Some((key, bytes)) = objects.get(next.fetch_add(1, Ordering::Relaxed)) {
                self.objects.put(key, bytes)?;
            }
            Ok(())
        };
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..PUTS_AT_ONCE.min(objects.len())).map(|_| s.spawn(put_some)).collect();
            workers.into_iter().try_for_each(|w| w.join().expect("a PUT worker panicked"))
        })
    }

    /// Record `h` as replicas exchange it, with its payloads unless `header_only`; None if
    /// the folder has no object for it.
    fn bundle(&self, h: &RecordHash, header_only: bool) -> Result<Option<Bundle>> {
        if header_only {
            return Ok(self.read_header(h)?.map(|record| Bundle { record, payloads: Vec::new() }));
        }
        let Some(RecordObject { record, subs }) = self.read_object(h)? else { return Ok(None) };
        let payloads = subs
            .into_iter()
            .enumerate()
            .map(|(i, stored)| payload_of(*h, SubIdx(i as u32), stored))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Bundle { record, payloads }))
    }

    fn missing_object(&self, h: &RecordHash) -> Error {
        Error::Replica(format!(
            "{}: the object of {h:?} is missing, though the index names it",
            self.objects.describe()
        ))
    }
}
