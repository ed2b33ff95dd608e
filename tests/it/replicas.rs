//! Push and pull between in-memory capsules through the `Replica` trait, including a replica
//! that lies about what it holds.

use std::sync::Arc;

use capsulefs::VerifyError;
use capsulefs::capsule::{Capsule, Parents};
use capsulefs::proof::fork::ForkEvidence;
use capsulefs::record::{RecordHash, SubIdx, SubRecordBuf};
use capsulefs::replica::Replica;
use capsulefs::replica::prefetch::SubRecordSource;
use capsulefs::store::mem::MemKv;
use capsulefs::store::{Batch, Cf, Durability, Kv};
use capsulefs::sync::Take;
use capsulefs::sync::transfer::{pull, pull_taking, push};
use capsulefs::wire::{Bundle, Node, Since};

use super::{fixture, signed, unsigned};

/// A second, empty replica of the fixture's capsule.
fn empty_replica_of(cap: &Capsule) -> Capsule {
    Capsule::adopt(Arc::new(MemKv::new()) as Arc<dyn Kv>, cap.id(), &cap.metadata_bytes(), Vec::new()).unwrap()
}

/// A replica with a fault: its `since` answers drop the newer half of the records (a pull
/// must notice and walk), or its `walk` fails (as a server killed part way does).
struct Faulty<'a>(&'a Capsule, Fault);

#[derive(PartialEq)]
enum Fault {
    ForgetsHalf,
    WalkFails,
}

impl Replica for Faulty<'_> {
    fn describe(&self) -> String {
        "a faulty replica".into()
    }
    fn metadata(&self) -> capsulefs::Result<Option<Vec<u8>>> {
        Replica::metadata(self.0)
    }
    fn put_metadata(&self, signed: &[u8]) -> capsulefs::Result<()> {
        self.0.put_metadata(signed)
    }
    fn heads(&self) -> capsulefs::Result<Vec<RecordHash>> {
        Replica::heads(self.0)
    }
    fn missing(&self, records: &[RecordHash]) -> capsulefs::Result<Vec<RecordHash>> {
        self.0.missing(records)
    }
    fn walk(&self, from: &[RecordHash], budget: usize) -> capsulefs::Result<Vec<Node>> {
        if self.1 == Fault::WalkFails {
            return Err(capsulefs::Error::Replica("connection reset while walking".into()));
        }
        self.0.walk(from, budget)
    }
    fn fetch(&self, records: &[RecordHash]) -> capsulefs::Result<Vec<Bundle>> {
        self.0.fetch(records)
    }
    fn since(&self, heads: &[RecordHash], headers_only: bool) -> capsulefs::Result<Since> {
        let mut answer = self.0.since(heads, headers_only)?;
        if self.1 == Fault::ForgetsHalf {
            answer.bundles.truncate(answer.bundles.len() / 2); // the oldest half: parents first
        }
        Ok(answer)
    }
    fn sub_record(&self, record: RecordHash, idx: SubIdx) -> capsulefs::Result<Option<Vec<u8>>> {
        self.0.sub_record(record, idx)
    }
    fn put(&self, bundles: Vec<Bundle>, settles: Option<&[RecordHash]>) -> capsulefs::Result<usize> {
        self.0.put(bundles, settles)
    }
    fn evidence(&self) -> capsulefs::Result<Vec<ForkEvidence>> {
        self.0.evidence()
    }
    fn put_evidence(&self, evidence: &[ForkEvidence]) -> capsulefs::Result<()> {
        self.0.put_evidence(evidence)
    }
}

#[test]
fn push_then_pull_moves_exactly_the_difference() {
    let f = fixture();
    for i in 0..20u8 {
        f.cap.append(&f.owner, &[&[i]], if i % 5 == 4 { signed() } else { unsigned() }).unwrap();
    }
    let server = empty_replica_of(&f.cap);
    let pushed = push(&f.cap, &server, &()).unwrap();
    assert_eq!(pushed.records, 20, "every record is covered by a signed one");
    assert_eq!(pushed.waiting_for_signature, 0);
    assert_eq!(Replica::heads(&server).unwrap(), f.cap.heads().unwrap());
    // An unsigned tail of ours: push signs it (this machine holds the key). Another writer's
    // unsigned record never gets this far: no store takes it without that writer's signature.
    f.cap.append(&f.owner, &[b"tail"], unsigned()).unwrap();
    let head = f.cap.heads().unwrap()[0];
    let theirs = f.make(&f.other, 1, &[head], &[b"theirs, unsigned"], false);
    assert!(matches!(
        f.cap.ingest(&theirs, &[b"theirs, unsigned"], Durability::Buffered),
        Err(capsulefs::Error::Verify(VerifyError::Unanchored { .. }))
    ));
    let again = push(&f.cap, &server, &()).unwrap();
    assert_eq!((again.records, again.waiting_for_signature), (1, 0));
    assert_eq!(again.reconcile_received, 4 + 32, "finding them took one head");
    assert!(server.store().has_record(&head).unwrap());
    let laptop = empty_replica_of(&f.cap);
    let pulled = pull(&laptop, &server, &()).unwrap();
    assert_eq!(pulled.records, 21);
    assert_eq!(pulled.round_trips, 2, "heads, then one since");
    // Nothing new: the replica's heads, and no more.
    let again = pull(&laptop, &server, &()).unwrap();
    assert_eq!((again.records, again.round_trips), (0, 1));
    // A commit made here and not pushed yet does not make the replica resend what lies below
    // its heads: only the one new record comes.
    laptop.append(&f.other, &[b"only here"], signed()).unwrap();
    let parents = [head];
    f.cap
        .append_built(&f.owner, Parents::These(&parents), vec![SubRecordBuf::copied(b"only there")], signed())
        .unwrap();
    push(&f.cap, &server, &()).unwrap();
    let both = pull(&laptop, &server, &()).unwrap();
    assert_eq!(both.records, 1);
    assert!(both.bytes < 1000, "{} bytes came for one small record", both.bytes);
    assert_eq!(laptop.audit().unwrap().records, 23, "the pushed tail is signed, so it proves anywhere");
}

#[test]
fn a_replica_that_withholds_records_is_walked_to_the_end() {
    let f = fixture();
    for i in 0..30u8 {
        f.cap.append(&f.owner, &[&[i]], signed()).unwrap();
    }
    let server = empty_replica_of(&f.cap);
    push(&f.cap, &server, &()).unwrap();
    let laptop = empty_replica_of(&f.cap);
    let report = pull(&laptop, &Faulty(&server, Fault::ForgetsHalf), &()).unwrap();
    assert_eq!(report.records, 30, "the walk fetched what `since` held back");
    assert_eq!(laptop.heads().unwrap(), f.cap.heads().unwrap());
}

#[test]
fn a_walk_from_many_heads_loses_none_of_them() {
    let f = fixture();
    let root = f.put(&f.owner, 1, &[f.genesis()], b"root", true);
    // Forty heads: more than the walk's first slice.
    for i in 0..40u64 {
        f.put(&f.other, i + 1, &[root], &i.to_le_bytes(), true);
    }
    let server = empty_replica_of(&f.cap);
    push(&f.cap, &server, &()).unwrap();
    let laptop = empty_replica_of(&f.cap);
    let report = pull(&laptop, &Faulty(&server, Fault::ForgetsHalf), &()).unwrap();
    assert_eq!(report.records, 41);
    assert_eq!(laptop.heads().unwrap(), f.cap.heads().unwrap());
}

#[test]
fn a_sparse_replica_proves_each_fetched_sub_record_and_refuses_a_tampered_one() {
    let f = fixture();
    let h = f.cap.append(&f.owner, &[b"first", b"second"], signed()).unwrap();
    let server_kv = Arc::new(MemKv::new());
    let server = Arc::new(
        Capsule::adopt(server_kv.clone() as Arc<dyn Kv>, f.cap.id(), &f.cap.metadata_bytes(), Vec::new()).unwrap(),
    );
    push(&f.cap, &*server, &()).unwrap();
    let laptop = empty_replica_of(&f.cap);
    let report = pull_taking(&laptop, &*server, Take::Headers, &()).unwrap();
    assert!(report.bytes < 1000, "headers only: {} bytes", report.bytes);
    assert!(laptop.store().is_sparse().unwrap());
    assert_eq!(laptop.heads().unwrap(), f.cap.heads().unwrap());
    // Without a replica to fetch from, a sub-record not held is an error, never empty bytes.
    assert!(matches!(
        laptop.read_sub_record(h, SubIdx(0)),
        Err(capsulefs::Error::Verify(VerifyError::MissingSubRecord { .. }))
    ));
    // The server's copy of the second sub-record is altered (before any fetch: a read of the
    // first reads the second ahead): the first is proven and kept, the second refused and
    // not kept.
    let mut altered = server.store().sub_record_bytes(&h, SubIdx(1)).unwrap().unwrap();
    *altered.last_mut().unwrap() ^= 1;
    let mut batch = Batch::default();
    batch.put(Cf::Subs, [&h.as_bytes()[..], &1u32.to_be_bytes()].concat(), altered);
    server_kv.write(batch, Durability::Buffered).unwrap();
    laptop.fill_from(SubRecordSource::new(server.clone()));
    assert_eq!(&laptop.read_sub_record(h, SubIdx(0)).unwrap().0.get()[..], b"first");
    assert!(laptop.store().sub_record_bytes(&h, SubIdx(0)).unwrap().is_some(), "kept once fetched");
    assert!(matches!(laptop.read_sub_record(h, SubIdx(1)), Err(capsulefs::Error::Verify(_))));
    assert!(laptop.store().sub_record_bytes(&h, SubIdx(1)).unwrap().is_none());
    let audit = laptop.audit().unwrap();
    assert_eq!((audit.sub_records, audit.not_held), (1, 1), "one fetched, one refused");
}

#[test]
fn many_heads_on_both_sides_cost_a_sketch_of_the_difference_not_a_list() {
    let f = fixture();
    let root = f.put(&f.owner, 1, &[f.genesis()], b"root", true);
    for i in 0..200u64 {
        f.put(&f.other, i + 1, &[root], &i.to_le_bytes(), true);
    }
    let server = empty_replica_of(&f.cap);
    push(&f.cap, &server, &()).unwrap();
    let laptop = empty_replica_of(&f.cap);
    pull(&laptop, &server, &()).unwrap();
    // One more head here: the server's 200 heads are learned from a sketch, not a list.
    f.put(&f.owner, 2, &[root], b"one more", true);
    let pushed = push(&f.cap, &server, &()).unwrap();
    assert_eq!(pushed.records, 1);
    let list_cost = 4 + 32 * 200;
    assert!(pushed.reconcile_sent + pushed.reconcile_received < list_cost / 4, "{pushed:?}");
    assert_eq!(server.heads().unwrap(), f.cap.heads().unwrap());
    // The other way: the laptop, with 200 heads, pulls two new ones by the sketch and a walk
    // down from the heads it lacks.
    for i in 0..2u64 {
        f.put(&f.other, 1000 + i, &[root], b"later", true);
    }
    push(&f.cap, &server, &()).unwrap();
    let pulled = pull(&laptop, &server, &()).unwrap();
    assert_eq!(pulled.records, 3);
    assert!(pulled.reconcile_sent + pulled.reconcile_received < list_cost / 2, "{pulled:?}");
    assert_eq!(laptop.heads().unwrap(), server.heads().unwrap());
}

/// Bytes in the pack files of a RocksDB store at `dir`.
fn pack_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("packs")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

#[test]
fn a_rocksdb_replica_writes_ahead_only_what_it_will_keep() {
    // On RocksDB, a batch's large sub-records go to a pack before the batch is stored
    // (`Capsule::stage`): a record already held, or one nobody authorized anchors, must not
    // put bytes there, or re-sent batches and strangers would fill the disk.
    let f = fixture();
    let big = vec![7u8; 64 << 10];
    f.cap.append(&f.owner, &[&big, b"small"], signed()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kv = Arc::new(capsulefs::store::rocks::RocksKv::open(dir.path(), true).unwrap()) as Arc<dyn Kv>;
    let server = Capsule::adopt(kv, f.cap.id(), &f.cap.metadata_bytes(), Vec::new()).unwrap();
    let empty = pack_bytes(dir.path());
    assert_eq!(push(&f.cap, &server, &()).unwrap().records, 1);
    let once = pack_bytes(dir.path());
    assert!(once >= empty + big.len() as u64, "the large sub-record went to a pack");
    assert_eq!(server.audit().unwrap().records, 1, "and is proven from there");
    let head = f.cap.heads().unwrap()[0];
    let batch = Replica::fetch(&f.cap, &[head]).unwrap();
    assert_eq!(server.put(batch, None).unwrap(), 0, "already held");
    assert_eq!(pack_bytes(dir.path()), once, "a batch sent twice is written once");
    let stranger = f.make(&f.other, 1, &[head], &[&big], false);
    let refused = server.put(vec![Bundle { record: stranger, payloads: vec![big.clone()] }], None);
    assert!(matches!(refused, Err(capsulefs::Error::Verify(VerifyError::Unanchored { .. }))), "{refused:?}");
    assert_eq!(pack_bytes(dir.path()), once, "an unanchored record writes nothing");
}

#[test]
fn a_push_past_a_head_not_held_here_sends_only_what_the_replica_lacks() {
    let f = fixture();
    for i in 0..20u8 {
        f.cap.append(&f.owner, &[&[i]], signed()).unwrap();
    }
    let server = empty_replica_of(&f.cap);
    push(&f.cap, &server, &()).unwrap();
    // The same person's other device takes everything, adds one record and pushes it.
    let laptop =
        Capsule::adopt(Arc::new(MemKv::new()), f.cap.id(), &f.cap.metadata_bytes(), vec![f.owner.clone()]).unwrap();
    pull(&laptop, &server, &()).unwrap();
    laptop.append(&f.owner, &[b"from the laptop"], signed()).unwrap();
    push(&laptop, &server, &()).unwrap();
    // This device has not pulled that record: its push sends its one new record, and counts
    // only that one as lacking (no false rollback alarm). A walk below the laptop's head that
    // fails ends the push, rather than count all twenty records as lacking.
    f.cap.append(&f.owner, &[b"from the desk"], signed()).unwrap();
    let cut = push(&f.cap, &Faulty(&server, Fault::WalkFails), &());
    assert!(cut.is_err(), "{:?}", cut.map(|r| r.replica_lacks));
    let pushed = push(&f.cap, &server, &()).unwrap();
    assert_eq!(pushed.records, 1);
    assert_eq!(pushed.replica_lacks.iter().map(|l| l.count).sum::<usize>(), 1, "{:?}", pushed.replica_lacks);
}
