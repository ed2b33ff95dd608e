//! The one gate: a signature vouches for its own writer's records only, a batch is taken whole
//! or not at all and a refusal leaves the store as it was, forged sequence numbers block
//! nobody, and nothing unproven is built upon. Each case asserts the exact refusal.

use std::collections::BTreeMap;
use std::sync::Arc;

use capsulefs::capsule::{Admission, Capsule, Parents, Pending};
use capsulefs::crypto::keys::Identity;
use capsulefs::crypto::sign;
use capsulefs::record::codec::FORMAT_VERSION;
use capsulefs::record::{DeviceId, KeyGen, Record, RecordHash, RecordHeader, RecordKind, Seq, SubRecordBuf, merkle};
use capsulefs::replica::Replica;
use capsulefs::rights::{Level, MembershipEntry};
use capsulefs::store::mem::MemKv;
use capsulefs::store::{Cf, Durability, Kv};
use capsulefs::sync::transfer::pull;
use capsulefs::wire::{Bundle, Node, Since};
use capsulefs::{Error, VerifyError};
use proptest::prelude::*;

use super::{Fixture, fixture, signed, unsigned};

/// Every key and value of every column family: what "the store is unchanged" compares.
fn dump(kv: &MemKv) -> BTreeMap<(String, Vec<u8>), Vec<u8>> {
    let mut all = BTreeMap::new();
    for cf in Cf::ALL {
        for entry in kv.scan(cf, &[], false).unwrap() {
            let (k, v) = entry.unwrap();
            all.insert((cf.name().to_owned(), k), v);
        }
    }
    all
}

fn refusal(r: capsulefs::Result<impl std::fmt::Debug>) -> VerifyError {
    match r {
        Err(Error::Verify(v)) => v,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A record by `by` numbered `at` (any device and seq), of any kind and parents, signed or not.
fn record(
    f: &Fixture,
    by: &Identity,
    (device, seq): (DeviceId, u64),
    parents: &[RecordHash],
    kind: RecordKind,
    payloads: &[&[u8]],
    sign_it: bool,
) -> Vec<u8> {
    let leaves: Vec<_> = payloads.iter().map(|p| merkle::leaf_hash(p)).collect();
    let mut parents = parents.to_vec();
    parents.sort();
    let header = RecordHeader {
        version: FORMAT_VERSION,
        capsule: f.cap.id(),
        parents,
        writer: by.writer(),
        device,
        seq: Seq(seq),
        time_ms: 1,
        kind,
        key_gen: KeyGen(0),
        sub_count: payloads.len() as u32,
        merkle_root: merkle::build(&leaves).0,
    };
    let signature = sign_it.then(|| sign::sign_record(by.key(), &header.hash()));
    Record { header, signature }.encode()
}

/// The owner's honest work goes on: an append on top of every head, signed, that proves.
fn owner_still_writes(f: &Fixture) {
    let h = f.cap.append(&f.owner, &[b"honest"], signed()).unwrap();
    assert_eq!(f.cap.heads().unwrap(), vec![h]);
    f.cap.audit().unwrap();
}

#[test]
fn a_strangers_signature_launders_nothing_and_leaves_no_trace() {
    let f = fixture();
    let base = f.cap.append(&f.owner, &[b"base"], signed()).unwrap();
    let before = dump(&f.kv);
    let stranger = Identity::generate("stranger").unwrap();
    let r1 = f.make(&f.owner, 7, &[base], &[b"the stranger's bytes"], false);
    let r2 = f.make(&stranger, 1, &[Fixture::hash_of(&r1)], &[b"anchor?"], true);
    let refused = f.put_all(&[(r1.clone(), b"the stranger's bytes"), (r2.clone(), b"anchor?")]);
    assert!(matches!(refusal(refused), VerifyError::Unanchored { record } if record == Fixture::hash_of(&r1)));
    assert_eq!(dump(&f.kv), before, "a refused batch leaves the store as it was");
    // The stranger's own record alone: not a member.
    let alone = f.make(&stranger, 1, &[base], &[b"x"], true);
    assert!(matches!(refusal(f.put_all(&[(alone, b"x")])), VerifyError::UnauthorizedWriter { .. }));
    assert_eq!(dump(&f.kv), before);
    owner_still_writes(&f);
}

#[test]
fn another_members_signature_vouches_for_their_records_only() {
    let f = fixture();
    let base = f.cap.append(&f.owner, &[b"base"], signed()).unwrap();
    let before = dump(&f.kv);
    let r1 = f.make(&f.owner, 7, &[base], &[b"attributed to the owner"], false);
    let r2 = f.make(&f.other, 1, &[Fixture::hash_of(&r1)], &[b"vouched by other"], true);
    let refused = f.put_all(&[(r1.clone(), b"attributed to the owner"), (r2, b"vouched by other")]);
    assert!(matches!(refusal(refused), VerifyError::Unanchored { record } if record == Fixture::hash_of(&r1)));
    assert_eq!(dump(&f.kv), before);
    owner_still_writes(&f);
}

#[test]
fn a_forged_last_sequence_number_neither_stops_the_writer_nor_wraps() {
    let f = fixture();
    let base = f.cap.append(&f.owner, &[b"base"], signed()).unwrap();
    let device = f.cap.device().unwrap();
    let forged = record(&f, &f.owner, (device, u64::MAX), &[base], RecordKind::Data, &[b"max"], false);
    assert!(matches!(refusal(f.put_all(&[(forged, b"max")])), VerifyError::Unanchored { .. }));
    owner_still_writes(&f);
    // Were the writer itself to reach the last number, the next record takes a new device.
    let mut f = fixture();
    let base = f.cap.append(&f.owner, &[b"base"], signed()).unwrap();
    let device = f.cap.device().unwrap();
    let last = record(&f, &f.owner, (device, u64::MAX), &[base], RecordKind::Data, &[b"max"], true);
    f.put_all(&[(last, b"max")]).unwrap();
    let next = f.cap.append(&f.owner, &[b"next"], signed()).unwrap();
    let header = f.cap.record(next).unwrap().header;
    assert_ne!(header.device, device);
    assert_eq!(header.seq, Seq(1));
    f.cap = Capsule::open(f.kv.clone() as Arc<dyn Kv>, vec![f.owner.clone()]).unwrap();
    assert_eq!(f.cap.device().unwrap(), header.device, "the new device is kept");
}

#[test]
fn a_forged_record_on_the_writers_next_number_is_no_fork() {
    let f = fixture();
    let base = f.cap.append(&f.owner, &[b"base"], signed()).unwrap();
    let device = f.cap.device().unwrap();
    let forged = record(&f, &f.owner, (device, 2), &[base], RecordKind::Data, &[b"forged"], false);
    assert!(matches!(refusal(f.put_all(&[(forged, b"forged")])), VerifyError::Unanchored { .. }));
    let honest = f.cap.append(&f.owner, &[b"honest"], signed()).unwrap();
    assert_eq!(f.cap.record(honest).unwrap().header.seq, Seq(2));
    assert_eq!(f.cap.fork_count().unwrap(), 0);
    // A replica holding the honest record takes it too.
    let server = Capsule::adopt(Arc::new(MemKv::new()), f.cap.id(), &f.cap.metadata_bytes(), vec![]).unwrap();
    capsulefs::sync::transfer::push(&f.cap, &server, &()).unwrap();
    assert_eq!(server.heads().unwrap(), vec![honest]);
}

#[test]
fn a_forged_membership_record_changes_no_rights_and_blocks_nobody() {
    let f = fixture();
    let base = f.cap.append(&f.owner, &[b"base"], signed()).unwrap();
    let stranger = Identity::generate("stranger").unwrap();
    let grant = MembershipEntry::Grant { member: stranger.writer(), level: Level::Superadmin }.encode();
    let forged = record(&f, &f.owner, (DeviceId([9; 16]), 1), &[base], RecordKind::Membership, &[&grant], false);
    let batch = vec![f.cap.check_incoming(&forged, vec![grant.clone()]).unwrap()];
    assert!(matches!(
        refusal(f.cap.admit(batch, Admission::Whole, Durability::Buffered)),
        VerifyError::Unanchored { .. }
    ));
    assert_eq!(f.cap.rights().unwrap().level(&stranger.writer()), None);
    owner_still_writes(&f);
}

#[test]
fn a_batch_with_one_bad_record_is_refused_whole() {
    let f = fixture();
    let base = f.cap.append(&f.owner, &[b"base"], signed()).unwrap();
    let before = dump(&f.kv);
    let good = f.make(&f.other, 1, &[base], &[b"good"], true);
    let stranger = Identity::generate("stranger").unwrap();
    let bad = f.make(&stranger, 1, &[Fixture::hash_of(&good)], &[b"bad"], true);
    let refused = f.put_all(&[(good.clone(), b"good"), (bad, b"bad")]);
    assert!(matches!(refusal(refused), VerifyError::UnauthorizedWriter { .. }));
    assert_eq!(dump(&f.kv), before, "the good record was not stored either");
    assert_eq!(f.put_all(&[(good, b"good")]).unwrap().len(), 1);
}

#[test]
fn records_made_here_never_name_a_head_that_does_not_prove() {
    let f = fixture();
    let base = f.cap.append(&f.owner, &[b"base"], signed()).unwrap();
    // A record planted in the store by someone who can write its files but not read the keys.
    let planted = f.make(&f.other, 1, &[base], &[b"planted"], false);
    let h = Fixture::hash_of(&planted);
    let mut b = capsulefs::store::Batch::default();
    b.put(Cf::Records, h.as_bytes().to_vec(), planted);
    let mut heads = [base, h];
    heads.sort();
    b.put(Cf::Meta, b"heads".to_vec(), heads.iter().flat_map(|x| *x.as_bytes()).collect::<Vec<u8>>());
    f.kv.write(b, Durability::Buffered).unwrap();
    let cap = Capsule::open(f.kv.clone() as Arc<dyn Kv>, vec![f.owner.clone()]).unwrap();
    let next = cap.append(&f.owner, &[b"next"], signed()).unwrap();
    assert_eq!(cap.record(next).unwrap().header.parents, vec![base], "the planted head is left out");
    let named = cap.append_built(&f.owner, Parents::These(&[h]), vec![SubRecordBuf::copied(b"x")], signed());
    assert!(matches!(refusal(named), VerifyError::Unanchored { record } if record == h));
}

/// A replica that serves what a real one holds, plus forged records of its own on top.
struct Lying<'a> {
    inner: &'a Capsule,
    forged: Vec<Bundle>,
}

impl Replica for Lying<'_> {
    fn describe(&self) -> String {
        "a lying replica".into()
    }
    fn metadata(&self) -> capsulefs::Result<Option<Vec<u8>>> {
        Replica::metadata(self.inner)
    }
    fn put_metadata(&self, signed: &[u8]) -> capsulefs::Result<()> {
        self.inner.put_metadata(signed)
    }
    fn heads(&self) -> capsulefs::Result<Vec<RecordHash>> {
        let last = Record::decode(&self.forged.last().unwrap().record).unwrap().hash();
        Ok(vec![last])
    }
    fn missing(&self, records: &[RecordHash]) -> capsulefs::Result<Vec<RecordHash>> {
        self.inner.missing(records)
    }
    fn walk(&self, from: &[RecordHash], budget: usize) -> capsulefs::Result<Vec<Node>> {
        let mut nodes: Vec<Node> = self
            .forged
            .iter()
            .map(|b| Record::decode(&b.record).unwrap())
            .map(|r| Node { record: r.hash(), parents: r.header.parents.clone() })
            .collect();
        nodes.extend(self.inner.walk(from, budget)?);
        Ok(nodes)
    }
    fn fetch(&self, records: &[RecordHash]) -> capsulefs::Result<Vec<Bundle>> {
        let mut found = Vec::new();
        for h in records {
            match self.forged.iter().find(|b| Record::decode(&b.record).unwrap().hash() == *h) {
                Some(b) => found.push(b.clone()),
                None => found.extend(self.inner.fetch(&[*h])?),
            }
        }
        Ok(found)
    }
    fn since(&self, heads: &[RecordHash], headers_only: bool) -> capsulefs::Result<Since> {
        let mut answer = self.inner.since(heads, headers_only)?;
        answer.bundles.extend(self.forged.iter().cloned());
        answer.heads = self.heads()?;
        Ok(answer)
    }
    fn sub_record(&self, record: RecordHash, idx: capsulefs::record::SubIdx) -> capsulefs::Result<Option<Vec<u8>>> {
        self.inner.sub_record(record, idx)
    }
    fn put(&self, bundles: Vec<Bundle>, settles: Option<&[RecordHash]>) -> capsulefs::Result<usize> {
        self.inner.put(bundles, settles)
    }
    fn evidence(&self) -> capsulefs::Result<Vec<capsulefs::proof::fork::ForkEvidence>> {
        self.inner.evidence()
    }
    fn put_evidence(&self, e: &[capsulefs::proof::fork::ForkEvidence]) -> capsulefs::Result<()> {
        self.inner.put_evidence(e)
    }
}

#[test]
fn a_pull_from_a_lying_replica_takes_the_honest_records_and_keeps_the_forged_out() {
    let f = fixture();
    let base = f.cap.append(&f.owner, &[b"base"], signed()).unwrap();
    let tail = f.cap.append(&f.owner, &[b"tail"], unsigned()).unwrap();
    let top = f.cap.append(&f.owner, &[b"top"], signed()).unwrap();
    let stranger = Identity::generate("stranger").unwrap();
    let r1 = f.make(&f.owner, 9, &[top], &[b"forged"], false);
    let r2 = f.make(&stranger, 1, &[Fixture::hash_of(&r1)], &[b"vouching"], true);
    let bundle = |bytes: &Vec<u8>, p: &[u8]| Bundle { record: bytes.clone(), payloads: vec![p.to_vec()] };
    let lying = Lying { inner: &f.cap, forged: vec![bundle(&r1, b"forged"), bundle(&r2, b"vouching")] };
    let laptop = Capsule::adopt(Arc::new(MemKv::new()), f.cap.id(), &f.cap.metadata_bytes(), vec![]).unwrap();
    let report = pull(&laptop, &lying, &()).unwrap();
    assert_eq!(report.records, 3, "the honest three, the unsigned tail with its signed descendant");
    assert_eq!(report.unanchored, vec![Fixture::hash_of(&r1), Fixture::hash_of(&r2)]);
    assert_eq!(laptop.heads().unwrap(), vec![top]);
    assert!(!laptop.store().has_record(&Fixture::hash_of(&r1)).unwrap());
    for h in [base, tail, top] {
        laptop.prove_record(h, capsulefs::capsule::EarlierProofs::Ignore).unwrap();
    }
    laptop.audit().unwrap();
}

#[test]
fn a_pull_takes_an_unsigned_record_once_its_anchor_comes_in_a_later_answer() {
    let f = fixture();
    let a = f.make(&f.other, 1, &[f.genesis()], &[b"a"], false);
    let s = f.make(&f.other, 2, &[Fixture::hash_of(&a)], &[b"s"], true);
    let laptop = Capsule::adopt(Arc::new(MemKv::new()), f.cap.id(), &f.cap.metadata_bytes(), vec![]).unwrap();
    let mut pending = Pending::default();
    let first = vec![laptop.check_incoming(&a, vec![b"a".to_vec()]).unwrap()];
    let taken = laptop.admit(first, Admission::Pull(&mut pending), Durability::Buffered).unwrap();
    assert!(taken.stored.is_empty());
    assert_eq!(pending.len(), 1);
    assert!(laptop.heads().unwrap().is_empty(), "a waiting record is no head");
    let second = vec![laptop.check_incoming(&s, vec![b"s".to_vec()]).unwrap()];
    let taken = laptop.admit(second, Admission::Pull(&mut pending), Durability::Buffered).unwrap();
    assert_eq!(taken.stored, vec![Fixture::hash_of(&a), Fixture::hash_of(&s)]);
    assert!(pending.is_empty());
}

#[test]
fn a_fork_of_unsigned_records_is_evidence_through_their_writers_signatures() {
    let f = fixture();
    let d = DeviceId([5; 16]);
    let left = record(&f, &f.other, (d, 1), &[f.genesis()], RecordKind::Data, &[b"left"], false);
    let left_top = record(&f, &f.other, (d, 2), &[Fixture::hash_of(&left)], RecordKind::Data, &[b"lt"], true);
    f.put_all(&[(left, b"left"), (left_top, b"lt")]).unwrap();
    // A restored copy of that device numbered other records the same.
    let right = record(&f, &f.other, (d, 1), &[f.genesis()], RecordKind::Data, &[b"right"], false);
    let right_top = record(&f, &f.other, (d, 3), &[Fixture::hash_of(&right)], RecordKind::Data, &[b"rt"], true);
    let refused = f.put_all(&[(right.clone(), b"right"), (right_top, b"rt")]);
    assert!(matches!(refusal(refused), VerifyError::Equivocation(fork) if fork.seq == Seq(1)));
    assert!(!f.cap.store().has_record(&Fixture::hash_of(&right)).unwrap(), "the forked branch is not stored");
    // The evidence carries each unsigned record's way to its writer's signature, and checks
    // anywhere.
    let evidence = f.cap.fork_evidence().unwrap();
    assert_eq!(evidence.len(), 1);
    assert!(!evidence[0].first.anchor.is_empty() && !evidence[0].second.anchor.is_empty());
    let elsewhere = Capsule::adopt(Arc::new(MemKv::new()), f.cap.id(), &f.cap.metadata_bytes(), vec![]).unwrap();
    assert!(elsewhere.take_evidence(&evidence[0]).unwrap().is_some());
    assert_eq!(elsewhere.fork_count().unwrap(), 1);
}

/// What a record of the property test is.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// The owner's, signed or anchored by a later signed record of the owner.
    Honest,
    /// Claims the owner, signed by a stranger (no valid signature at all: refused at decode).
    StrangerSigned,
    /// Claims the owner, unsigned, vouched for by the other member's signed child.
    OtherVouched,
    /// Claims the owner, unsigned, with nothing after it.
    Unanchored,
    /// Claims the owner's device at the last sequence number, unsigned.
    Overflowing,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        3 => Just(Kind::Honest),
        1 => Just(Kind::StrangerSigned),
        1 => Just(Kind::OtherVouched),
        1 => Just(Kind::Unanchored),
        1 => Just(Kind::Overflowing),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random mixes of honest and hostile records, offered to a server in random splits and
    /// orders: what an honest client reads back is exactly the honest records, and an audit
    /// is clean on both.
    #[test]
    fn only_honest_records_ever_get_in(kinds in prop::collection::vec(kind(), 1..24), cuts in prop::collection::vec(any::<u8>(), 0..6), seed in any::<u64>()) {
        let f = fixture();
        let stranger = Identity::generate("stranger").unwrap();
        let owner_device = DeviceId([1; 16]);
        let mut honest: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut hostile: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut parent = f.genesis();
        let mut seq = 0;
        let last_honest = kinds.iter().rposition(|k| matches!(k, Kind::Honest));
        for (i, k) in kinds.iter().enumerate() {
            let payload = format!("record {i}").into_bytes();
            match k {
                Kind::Honest => {
                    seq += 1;
                    let sign_it = i % 3 == 2 || Some(i) == last_honest;
                    let bytes = record(&f, &f.owner, (owner_device, seq), &[parent], RecordKind::Data, &[&payload], sign_it);
                    parent = Fixture::hash_of(&bytes);
                    honest.push((bytes, payload));
                }
                Kind::StrangerSigned => {
                    let mut r = Record::decode(&record(&f, &f.owner, (DeviceId([2; 16]), 1), &[parent], RecordKind::Data, &[&payload], false)).unwrap();
                    r.signature = Some(sign::sign_record(stranger.key(), &r.hash()));
                    hostile.push((r.encode(), payload));
                }
                Kind::OtherVouched => {
                    let r = record(&f, &f.owner, (DeviceId([3; 16]), i as u64 + 1), &[parent], RecordKind::Data, &[&payload], false);
                    let child = record(&f, &f.other, (DeviceId([4; 16]), i as u64 + 1), &[Fixture::hash_of(&r)], RecordKind::Data, &[b"v"], true);
                    hostile.push((r, payload));
                    hostile.push((child, b"v".to_vec()));
                }
                Kind::Unanchored => {
                    let r = record(&f, &f.owner, (DeviceId([5; 16]), i as u64 + 1), &[parent], RecordKind::Data, &[&payload], false);
                    hostile.push((r, payload));
                }
                Kind::Overflowing => {
                    let r = record(&f, &f.owner, (owner_device, u64::MAX), &[parent], RecordKind::Data, &[&payload], false);
                    hostile.push((r, payload));
                }
            }
        }
        // Honest records last come signed, so every honest batch that ends at a signature is
        // taken; everything is offered in random splits, hostile records mixed in.
        let server = Capsule::adopt(Arc::new(MemKv::new()), f.cap.id(), &f.cap.metadata_bytes(), vec![]).unwrap();
        let mut offers: Vec<(Vec<u8>, Vec<u8>)> = honest.clone();
        let mut state = seed;
        for h in hostile {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (state >> 33) as usize % (offers.len() + 1);
            offers.insert(at, h);
        }
        let mut start = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| *c as usize % (offers.len() + 1)).collect();
        cuts.push(offers.len());
        cuts.sort();
        for cut in cuts {
            let batch: Vec<_> = offers[start..cut.max(start)]
                .iter()
                .filter_map(|(bytes, payload)| server.check_incoming(bytes, vec![payload.clone()]).ok())
                .collect();
            let _ = server.admit(batch, Admission::Whole, Durability::Buffered);
            start = cut.max(start);
        }
        // Then the honest records alone, whole: they all get in whatever was refused before.
        let batch = honest.iter().map(|(b, p)| server.check_incoming(b, vec![p.clone()]).unwrap()).collect();
        server.admit(batch, Admission::Whole, Durability::Buffered).unwrap();
        let mut held: Vec<RecordHash> = server.log().unwrap().map(|e| e.unwrap().0).collect();
        held.sort();
        let mut expected: Vec<RecordHash> = honest.iter().map(|(b, _)| Fixture::hash_of(b)).collect();
        expected.sort();
        prop_assert_eq!(held, expected);
        server.audit().unwrap();
        // An honest client pulls the same, and its audit is clean.
        let client = Capsule::adopt(Arc::new(MemKv::new()), f.cap.id(), &f.cap.metadata_bytes(), vec![]).unwrap();
        let report = pull(&client, &server, &()).unwrap();
        prop_assert_eq!(report.records, honest.len());
        client.audit().unwrap();
    }
}

#[test]
fn a_batch_refused_after_its_payloads_were_staged_gives_the_room_back() {
    use capsulefs::replica::Replica;
    use capsulefs::store::rocks::RocksKv;
    use capsulefs::wire::Bundle;
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let server = Capsule::adopt(
        Arc::new(RocksKv::open(&dir.path().join("store"), true).unwrap()),
        f.cap.id(),
        &f.cap.metadata_bytes(),
        vec![],
    )
    .unwrap();
    let big = vec![7u8; 1 << 20];
    let d = DeviceId([5; 16]);
    let first = record(&f, &f.other, (d, 1), &[f.genesis()], RecordKind::Data, &[&big], true);
    server.put(vec![Bundle { record: first, payloads: vec![big.clone()] }], None).unwrap();
    let packs = || {
        let mut sizes: Vec<(String, u64)> = std::fs::read_dir(dir.path().join("store/packs"))
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
            .collect();
        sizes.sort();
        sizes
    };
    let before = packs();
    // A member's batch that looks taken (so it is staged), and is refused as a fork.
    let other = vec![8u8; 1 << 20];
    let fork = record(&f, &f.other, (d, 1), &[f.genesis()], RecordKind::Data, &[&other], true);
    let refused = server.put(vec![Bundle { record: fork, payloads: vec![other] }], None);
    assert!(matches!(refused, Err(Error::Verify(VerifyError::Equivocation(_)))), "{refused:?}");
    assert_eq!(packs(), before, "the staged payload was cut back out of the pack");
}
