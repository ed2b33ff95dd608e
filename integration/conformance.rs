//! One suite of replica behaviour, run against every kind: the local store, a `capsulefs
//! serve`, a folder and an S3 bucket (moto). A new kind is one more line in the test below.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use capsulefs::capsule::{AppendOptions, Capsule, NewCapsule};
use capsulefs::crypto::keys::Identity;
use capsulefs::record::{RecordHash, SubIdx};
use capsulefs::replica::bucket::{Bucket, Settings};
use capsulefs::replica::folder::Folder;
use capsulefs::replica::objects::{ObjectReplica, Objects, Pusher};
use capsulefs::replica::prefetch::SubRecordSource;
use capsulefs::replica::{self, Replica};
use capsulefs::store::mem::MemKv;
use capsulefs::store::{Durability, Kv};
use capsulefs::sync::Take;
use capsulefs::sync::transfer::{pull, pull_taking, push};

use super::buckets::S3;
use super::garage::Garage;
use super::server::Server;

/// An empty copy of `source`'s capsule: its metadata and nothing else.
fn copy_of(source: &Capsule, me: &Identity) -> Capsule {
    Capsule::adopt(Arc::new(MemKv::new()) as Arc<dyn Kv>, source.id(), &source.metadata_bytes(), vec![me.clone()])
        .unwrap()
}

/// A capsule with an unsigned record and a signed one on it.
fn source(me: &Identity) -> Capsule {
    let capsule = Capsule::create(Arc::new(MemKv::new()), NewCapsule::new("c", me), vec![me.clone()]).unwrap();
    let unsigned = AppendOptions { sign: false, durability: Durability::Buffered, ..Default::default() };
    capsule.append(me, &[b"first record"], unsigned).unwrap();
    let signed = AppendOptions { sign: true, ..unsigned };
    capsule.append(me, &[b"second record, payload 0", b"second record, payload 1"], signed).unwrap();
    capsule
}

/// What every replica kind must do, given one that holds nothing of `capsule` yet.
fn conforms(kind: &str, capsule: &Capsule, me: &Identity, replica: Arc<dyn Replica>) {
    // Metadata: held once put; the same again is fine, another capsule's is refused.
    if replica.metadata().unwrap().is_none() {
        replica.put_metadata(&capsule.metadata_bytes()).unwrap();
    }
    replica.put_metadata(&capsule.metadata_bytes()).unwrap();
    assert_eq!(replica.metadata().unwrap(), Some(capsule.metadata_bytes()), "{kind}");
    let other = Capsule::create(Arc::new(MemKv::new()), NewCapsule::new("other", me), vec![]).unwrap();
    assert!(replica.put_metadata(&other.metadata_bytes()).is_err(), "{kind}: another capsule's metadata taken");
    // Records: everything pushed once; heads and membership as the source says.
    let all: Vec<RecordHash> = capsule.log().unwrap().map(|e| e.unwrap().0).collect();
    assert_eq!(push(capsule, replica.as_ref(), &()).unwrap().records, all.len(), "{kind}");
    assert_eq!(push(capsule, replica.as_ref(), &()).unwrap().records, 0, "{kind}: nothing twice");
    assert_eq!(replica.heads().unwrap(), capsule.heads().unwrap(), "{kind}");
    assert!(replica.missing(&all).unwrap().is_empty(), "{kind}");
    let unknown = RecordHash::from_bytes([7; 32]);
    assert_eq!(replica.missing(&[unknown]).unwrap(), vec![unknown], "{kind}");
    // Walks start where they are told and keep to the budget.
    let head = capsule.heads().unwrap()[0];
    let nodes = replica.walk(&[head], 1).unwrap();
    assert_eq!(nodes.len(), 1, "{kind}");
    assert_eq!(nodes[0].record, head, "{kind}");
    // Fetch and since: records that check, parents first; headers alone when asked.
    let bundle = replica.fetch(&[head]).unwrap().pop().unwrap();
    assert_eq!(capsule.check_incoming(&bundle.record, bundle.payloads).unwrap().hash(), head, "{kind}");
    assert_eq!(replica.since(&[], false).unwrap().bundles.len(), all.len(), "{kind}");
    assert!(replica.since(&[], true).unwrap().bundles.iter().all(|b| b.payloads.is_empty()), "{kind}");
    assert!(replica.since(&[head], false).unwrap().bundles.is_empty(), "{kind}");
    // Sub-records, one at a time with their Merkle paths; none past the last.
    assert!(replica.sub_record(head, SubIdx(1)).unwrap().is_some(), "{kind}");
    assert!(replica.sub_record(head, SubIdx(2)).unwrap().is_none(), "{kind}");
    // A whole pull, and a sparse one whose sub-records come from the replica and prove.
    let whole = copy_of(capsule, me);
    pull(&whole, replica.as_ref(), &()).unwrap();
    assert_eq!(whole.heads().unwrap(), capsule.heads().unwrap(), "{kind}");
    let sparse = copy_of(capsule, me);
    pull_taking(&sparse, replica.as_ref(), Take::Headers, &()).unwrap();
    sparse.fill_from(SubRecordSource::new(replica));
    assert_eq!(&sparse.read_sub_record(head, SubIdx(1)).unwrap().0.get()[..], b"second record, payload 1", "{kind}");
}

#[test]
fn every_kind_of_replica_behaves_alike() {
    let me = Identity::generate("me").unwrap();
    let pusher = Pusher { identity: me.clone(), device: [1; 16], turn: None };
    let capsule = source(&me);
    let server = Server::start();
    let folder = tempfile::tempdir().unwrap();
    let folder_url = format!("file://{}", folder.path().display());
    let local: Arc<dyn Replica> = Arc::new(copy_of(&capsule, &me));
    conforms("local store", &capsule, &me, local);
    conforms("capsulefs serve", &capsule, &me, Arc::from(replica::open(&server.url(), capsule.id(), None).unwrap()));
    let folder = replica::open(&folder_url, capsule.id(), Some(pusher.clone())).unwrap();
    conforms("folder", &capsule, &me, Arc::from(folder));
    // S3 buckets, when their servers can run here (always in CI): moto, and a Garage cluster.
    let bucket = |endpoint: &str, region: &str, key: &str, secret: &str| {
        let credentials = Some(rusty_s3::Credentials::new(key, secret));
        let settings = Settings { endpoint: Some(endpoint.to_owned()), region: region.to_owned(), credentials };
        let bucket = Bucket::with_settings("s3://conformance/p", settings).unwrap();
        Arc::new(ObjectReplica::new(bucket, capsule.id(), Some(pusher.clone())))
    };
    if let Some(s3) = S3::start("conformance") {
        conforms(
            "s3 (moto)",
            &capsule,
            &me,
            bucket(&s3.endpoint, "us-east-1", "capsulefs-test", "capsulefs-test-secret"),
        );
    }
    if let Some(garage) = Garage::start("conformance") {
        let replica = bucket(&garage.endpoints[0], "garage", &garage.key_id, &garage.secret);
        conforms("s3 (garage)", &capsule, &me, replica);
    }
}

/// A folder's objects, counting the reads made of them (gets, ranged gets and listings).
struct Counted {
    folder: Folder,
    reads: Arc<AtomicUsize>,
}

impl Objects for Counted {
    fn describe(&self) -> String {
        self.folder.describe()
    }
    fn get(&self, key: &str) -> capsulefs::Result<Option<Vec<u8>>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.folder.get(key)
    }
    fn get_range(&self, key: &str, start: u64, len: u64) -> capsulefs::Result<Option<Vec<u8>>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.folder.get_range(key, start, len)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> capsulefs::Result<()> {
        self.folder.put(key, bytes)
    }
    fn list(&self, prefix: &str) -> capsulefs::Result<Vec<String>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.folder.list(prefix)
    }
}

/// A replica of `capsule` in the folder at `url`, as a new process opens it, and the count
/// of reads made of it.
fn counted(url: &str, capsule: &Capsule) -> (ObjectReplica<Counted>, Arc<AtomicUsize>) {
    let reads = Arc::new(AtomicUsize::new(0));
    let folder = Folder::from_url(url).unwrap();
    (ObjectReplica::new(Counted { folder, reads: reads.clone() }, capsule.id(), None), reads)
}

#[test]
fn a_pull_from_a_folder_reads_what_changed_not_the_whole_index() {
    let me = Identity::generate("me").unwrap();
    let pusher = Pusher { identity: me.clone(), device: [1; 16], turn: None };
    let capsule = source(&me);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let signed = AppendOptions { sign: true, durability: Durability::Buffered, ..Default::default() };
    let push_one = |i: usize| {
        capsule.append(&me, &[format!("record {i}").as_bytes()], signed).unwrap();
        push(&capsule, replica::open(&url, capsule.id(), Some(pusher.clone())).unwrap().as_ref(), &()).unwrap();
    };
    // Forty pushes, each a segment of the device's index.
    (0..40).for_each(push_one);
    let copy = copy_of(&capsule, &me);
    let (replica, _) = counted(&url, &capsule);
    assert_eq!(pull(&copy, &replica, &()).unwrap().records, 42);
    // Nothing new: the metadata, the listing of statements, the one statement.
    let (replica, reads) = counted(&url, &capsule);
    assert_eq!(pull(&copy, &replica, &()).unwrap().records, 0);
    assert_eq!(reads.load(Ordering::Relaxed), 3, "reads for a pull that finds nothing new");
    // One new record: the newest segment and the record's object on top of that.
    push_one(40);
    let (replica, reads) = counted(&url, &capsule);
    assert_eq!(pull(&copy, &replica, &()).unwrap().records, 1);
    assert_eq!(reads.load(Ordering::Relaxed), 5, "reads for a pull of one new record");
    assert_eq!(copy.heads().unwrap(), capsule.heads().unwrap());
}

#[test]
fn head_statements_of_two_devices_taking_turns_stay_as_short_as_their_heads() {
    let me = Identity::generate("me").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let signed = AppendOptions { sign: true, durability: Durability::Buffered, ..Default::default() };
    let first = source(&me);
    let second = copy_of(&first, &me);
    let devices = [(&first, [1u8; 16]), (&second, [2u8; 16])];
    for round in 0..10 {
        for &(capsule, device) in &devices {
            if round > 0 || device != [1; 16] {
                pull(capsule, &counted(&url, capsule).0, &()).unwrap();
            }
            capsule.append(&me, &[format!("round {round}").as_bytes()], signed).unwrap();
            // Pushed by another process, which has read nothing of the index.
            let pusher = Pusher { identity: me.clone(), device, turn: None };
            push(capsule, replica::open(&url, capsule.id(), Some(pusher)).unwrap().as_ref(), &()).unwrap();
        }
    }
    // Each device's statement names its own heads, never the heads others built on since.
    let (replica, _) = counted(&url, &second);
    let heads = replica.heads().unwrap();
    assert!(heads.len() <= 2, "{} heads stated after 20 pushes", heads.len());
    assert!(heads.contains(&second.heads().unwrap()[0]));
}
