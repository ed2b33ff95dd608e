//! Tampered, swapped, missing, forged and equivocating data: each refused with its exact error.

use std::sync::Arc;

use capsulefs::capsule::{Capsule, EarlierProofs, NewCapsule};
use capsulefs::crypto::keys::Identity;
use capsulefs::crypto::sign::{self, TrustKey};
use capsulefs::record::{DeviceId, Record, RecordHash, Seq, SubIdx, SubRecord};
use capsulefs::store::mem::MemKv;
use capsulefs::store::{Batch, Cf, Durability, Kv, Witness};
use capsulefs::{Error, VerifyError};

use super::{Fixture, fixture, signed, unsigned};

fn sub_key(h: &RecordHash, i: u32) -> Vec<u8> {
    [&h.as_bytes()[..], &i.to_be_bytes()].concat()
}

fn overwrite(kv: &MemKv, cf: Cf, key: Vec<u8>, value: Option<Vec<u8>>) {
    let mut b = Batch::default();
    match value {
        Some(v) => b.put(cf, key, v),
        None => b.delete(cf, key),
    }
    kv.write(b, Durability::Buffered).unwrap();
}

fn three_subs(f: &Fixture) -> RecordHash {
    f.cap.append(&f.owner, &[b"zero", b"one", b"two"], signed()).unwrap()
}

fn verify_err(r: capsulefs::Result<impl std::fmt::Debug>) -> VerifyError {
    match r {
        Err(Error::Verify(v)) => v,
        other => panic!("expected a verification error, got {other:?}"),
    }
}

#[test]
fn a_flipped_bit_in_a_record_is_caught_by_audit_and_never_read() {
    let f = fixture();
    let h = three_subs(&f);
    let mut bytes = f.kv.get(Cf::Records, h.as_bytes()).unwrap().unwrap();
    bytes[40] ^= 0x01;
    overwrite(&f.kv, Cf::Records, h.as_bytes().to_vec(), Some(bytes));
    f.cap.clear_proof_cache().unwrap();
    // The flipped bit lands in the parents: still decodes, but hashes differently.
    assert!(
        matches!(verify_err(f.cap.read_sub_record(h, SubIdx(0))), VerifyError::RecordMismatch { record, .. } if record == h)
    );
    assert!(matches!(verify_err(f.cap.audit()), VerifyError::RecordMismatch { record, .. } if record == h));
}

#[test]
fn a_flipped_bit_in_a_sub_record_fails_only_that_sub_record() {
    let f = fixture();
    let h = three_subs(&f);
    let mut bytes = f.kv.get(Cf::Subs, &sub_key(&h, 1)).unwrap().unwrap();
    bytes[5] ^= 0x80;
    overwrite(&f.kv, Cf::Subs, sub_key(&h, 1), Some(bytes));
    assert!(matches!(
        verify_err(f.cap.read_sub_record(h, SubIdx(1))),
        VerifyError::MerkleMismatch { record, idx: SubIdx(1) } if record == h
    ));
    assert_eq!(f.cap.read_sub_record(h, SubIdx(0)).unwrap().0.get()[..], *b"zero");
    assert_eq!(f.cap.read_sub_record(h, SubIdx(2)).unwrap().0.get()[..], *b"two");
    assert!(matches!(verify_err(f.cap.audit()), VerifyError::MerkleMismatch { idx: SubIdx(1), .. }));
}

#[test]
fn swapped_sub_records_are_refused() {
    let f = fixture();
    let h = three_subs(&f);
    let one = f.kv.get(Cf::Subs, &sub_key(&h, 1)).unwrap();
    let two = f.kv.get(Cf::Subs, &sub_key(&h, 2)).unwrap();
    overwrite(&f.kv, Cf::Subs, sub_key(&h, 1), two);
    overwrite(&f.kv, Cf::Subs, sub_key(&h, 2), one);
    assert!(matches!(
        verify_err(f.cap.read_sub_record(h, SubIdx(1))),
        VerifyError::MerkleMismatch { idx: SubIdx(1), .. }
    ));
    assert!(matches!(
        verify_err(f.cap.read_sub_record(h, SubIdx(2))),
        VerifyError::MerkleMismatch { idx: SubIdx(2), .. }
    ));
}

#[test]
fn a_sub_record_moved_between_records_is_refused() {
    let f = fixture();
    let a = three_subs(&f);
    let b = f.cap.append(&f.owner, &[b"other", b"one"], signed()).unwrap();
    let moved = f.kv.get(Cf::Subs, &sub_key(&a, 1)).unwrap();
    overwrite(&f.kv, Cf::Subs, sub_key(&b, 1), moved);
    assert!(matches!(verify_err(f.cap.read_sub_record(b, SubIdx(1))), VerifyError::MerkleMismatch { .. }));
}

#[test]
fn a_tampered_merkle_path_is_refused() {
    let f = fixture();
    let h = three_subs(&f);
    let bytes = f.kv.get(Cf::Subs, &sub_key(&h, 0)).unwrap().unwrap();
    let mut sub = SubRecord::decode(&bytes).unwrap();
    sub.path.0.pop();
    overwrite(&f.kv, Cf::Subs, sub_key(&h, 0), Some(sub.encode()));
    assert!(matches!(verify_err(f.cap.read_sub_record(h, SubIdx(0))), VerifyError::MerkleMismatch { .. }));
}

#[test]
fn missing_data_is_named() {
    let f = fixture();
    let h = three_subs(&f);
    overwrite(&f.kv, Cf::Subs, sub_key(&h, 2), None);
    assert!(matches!(
        verify_err(f.cap.read_sub_record(h, SubIdx(2))),
        VerifyError::MissingSubRecord { idx: SubIdx(2), .. }
    ));
    overwrite(&f.kv, Cf::Records, h.as_bytes().to_vec(), None);
    f.cap.clear_proof_cache().unwrap();
    assert!(
        matches!(verify_err(f.cap.read_sub_record(h, SubIdx(0))), VerifyError::MissingRecord { record } if record == h)
    );
    assert!(matches!(verify_err(f.cap.audit()), VerifyError::MissingRecord { .. }));
}

#[test]
fn a_corrupted_witness_index_cannot_forge_a_chain() {
    let f = fixture();
    let a = f.cap.append(&f.owner, &[b"a"], unsigned()).unwrap();
    let _s = f.cap.append(&f.owner, &[b"s"], signed()).unwrap();
    // Point `a`'s witness at an unrelated signed record that is not its child.
    let stranger = f.put(&f.other, 1, &[f.genesis()], b"stranger", true);
    let fake = Witness { anchor: stranger, dist: 1, via: stranger };
    let key = [&a.as_bytes()[..], &f.owner.writer().as_bytes()[..]].concat();
    overwrite(&f.kv, Cf::Witness, key, Some(borsh::to_vec(&fake).unwrap()));
    assert!(matches!(
        verify_err(f.cap.prove_record(a, EarlierProofs::Ignore)),
        VerifyError::BrokenChain { record, child } if record == a && child == stranger
    ));
}

#[test]
fn ingest_refuses_unauthorized_writers_and_bad_signatures() {
    let f = fixture();
    let stranger = Identity::generate("stranger").unwrap();
    let bytes = f.make(&stranger, 1, &[f.genesis()], &[b"x"], true);
    assert!(matches!(
        verify_err(f.cap.ingest(&bytes, &[b"x"], Durability::Buffered)),
        VerifyError::UnauthorizedWriter { .. }
    ));
    // A record claiming to be the owner's but signed by `other`.
    let mut rec = Record::decode(&f.make(&f.owner, 1, &[f.genesis()], &[b"x"], false)).unwrap();
    rec.signature = Record::decode(&f.make(&f.other, 1, &[f.genesis()], &[b"x"], true)).unwrap().signature;
    assert!(matches!(
        verify_err(f.cap.ingest(&rec.encode(), &[b"x"], Durability::Buffered)),
        VerifyError::BadSignature { writer, .. } if writer == f.owner.writer()
    ));
}

#[test]
fn ingest_refuses_unknown_parents_wrong_payloads_and_garbage() {
    let f = fixture();
    let ghost = RecordHash::from_bytes([7; 32]);
    let bytes = f.make(&f.owner, 1, &[ghost], &[b"x"], true);
    assert!(matches!(
        verify_err(f.cap.ingest(&bytes, &[b"x"], Durability::Buffered)),
        VerifyError::UnknownParent { parent, .. } if parent == ghost
    ));
    let bytes = f.make(&f.owner, 1, &[f.genesis()], &[b"x"], true);
    assert!(matches!(
        verify_err(f.cap.ingest(&bytes, &[b"y"], Durability::Buffered)),
        VerifyError::PayloadMismatch { .. }
    ));
    assert!(matches!(
        verify_err(f.cap.ingest(&bytes[1..], &[b"x"], Durability::Buffered)),
        VerifyError::Undecodable(_)
    ));
    assert!(f.cap.heads().unwrap().is_empty(), "nothing refused was stored");
}

#[test]
fn records_of_another_capsule_are_refused() {
    let f = fixture();
    let other_cap = Capsule::create(Arc::new(MemKv::new()), NewCapsule::new("elsewhere", &f.owner), vec![]).unwrap();
    let h = other_cap.append(&f.owner, &[b"x"], signed()).unwrap();
    let bytes = other_cap.store().record_bytes(&h).unwrap().unwrap();
    assert!(matches!(
        verify_err(f.cap.ingest(&bytes, &[b"x"], Durability::Buffered)),
        VerifyError::WrongCapsule { .. }
    ));
}

#[test]
fn a_reused_sequence_number_is_kept_as_evidence() {
    let f = fixture();
    let first = f.put(&f.other, 1, &[f.genesis()], b"first", true);
    assert_eq!(f.cap.fork_count().unwrap(), 0);
    let bytes = f.make(&f.other, 1, &[f.genesis()], &[b"second"], true);
    let err = verify_err(f.cap.ingest(&bytes, &[b"second"], Durability::Buffered));
    let VerifyError::Equivocation(fork) = err else { panic!("{err:?}") };
    let capsulefs::Fork { writer, seq, first: got_first, second, .. } = *fork;
    assert_eq!((writer, seq.0, got_first), (f.other.writer(), 1, first));
    let evidence = f.cap.store().evidence().unwrap();
    let mut recorded: Vec<_> = evidence.iter().map(|e| e.record).collect();
    recorded.sort();
    let mut expected = vec![first, second];
    expected.sort();
    assert_eq!(recorded, expected);
    assert!(evidence.iter().all(|e| Record::decode(&e.record_bytes).unwrap().hash() == e.record));
    assert_eq!(f.cap.heads().unwrap(), vec![first], "the second record was not stored");
    assert_eq!(f.cap.fork_count().unwrap(), 1, "the count kept in memory follows the evidence");
    // The same record again is not equivocation.
    let again = f.make(&f.other, 1, &[f.genesis()], &[b"first"], true);
    assert!(f.cap.ingest(&again, &[b"first"], Durability::Buffered).is_ok());
}

#[test]
fn fork_evidence_checks_without_keys_and_travels_between_replicas() {
    use capsulefs::proof::fork::{ForkEvidence, Vouched};
    use capsulefs::replica::Replica;
    let f = fixture();
    let first = f.make(&f.other, 1, &[f.genesis()], &[b"first"], true);
    let second = f.make(&f.other, 1, &[f.genesis()], &[b"second"], true);
    let (a, b) = (Record::decode(&first).unwrap(), Record::decode(&second).unwrap());
    let evidence = ForkEvidence::of(Vouched::signed(&a), Vouched::signed(&b));
    let first = Vouched::signed(&a);
    let fork = evidence.check(f.cap.id()).unwrap();
    assert_eq!((fork.writer, fork.seq.0), (f.other.writer(), 1));
    // What does not prove a fork is refused: one record twice, the wrong order, another
    // number, an unsigned record, a signature by someone else, another capsule's metadata.
    let refused = |e: &ForkEvidence| e.check(f.cap.id()).is_err();
    assert!(refused(&ForkEvidence { first: first.clone(), second: first.clone() }));
    assert!(refused(&ForkEvidence { first: evidence.second.clone(), second: evidence.first.clone() }));
    let other_seq = Record::decode(&f.make(&f.other, 2, &[f.genesis()], &[b"x"], true)).unwrap();
    assert!(refused(&ForkEvidence::of(first.clone(), Vouched::signed(&other_seq))));
    let unsigned = Record::decode(&f.make(&f.other, 1, &[f.genesis()], &[b"u"], false)).unwrap();
    assert!(refused(&ForkEvidence::of(first.clone(), Vouched::signed(&unsigned))));
    let mut forged = b.clone();
    forged.signature = Some(sign::sign_record(f.owner.key(), &forged.hash()));
    assert!(refused(&ForkEvidence::of(first.clone(), Vouched::signed(&forged))));
    // An unsigned record vouched for by a chain to its writer's signature proves a fork; a
    // chain ending at someone else's signature, or not linked, does not.
    let child = |by: &Identity, parent: RecordHash| Record::decode(&f.make(by, 2, &[parent], &[b"c"], true)).unwrap();
    let vouched = |anchor: &Record| Vouched { record: unsigned.encode(), anchor: vec![anchor.encode()] };
    assert!(!refused(&ForkEvidence::of(first.clone(), vouched(&child(&f.other, unsigned.hash())))));
    assert!(refused(&ForkEvidence::of(first.clone(), vouched(&child(&f.owner, unsigned.hash())))));
    assert!(refused(&ForkEvidence::of(first.clone(), vouched(&child(&f.other, f.genesis())))));
    let elsewhere = Capsule::create(Arc::new(MemKv::new()), NewCapsule::new("elsewhere", &f.owner), vec![]).unwrap();
    assert!(evidence.check(elsewhere.id()).is_err());

    // A replica takes it once, serves it (and says it keeps one fork, in its heads answer),
    // and a client learns it from there.
    let forks_announced = |c: &Capsule| c.announce().unwrap().forks;
    assert_eq!(forks_announced(&f.cap), Some(0));
    f.cap.put_evidence(std::slice::from_ref(&evidence)).unwrap();
    assert_eq!(forks_announced(&f.cap), Some(1), "the count kept in memory follows the evidence");
    assert_eq!(f.cap.forks().unwrap(), vec![(f.other.writer(), fork.device, fork.seq)]);
    assert_eq!(f.cap.take_evidence(&evidence).unwrap(), None, "known already");
    let client = Capsule::adopt(Arc::new(MemKv::new()), f.cap.id(), &f.cap.metadata_bytes(), Vec::new()).unwrap();
    assert_eq!(forks_announced(&client), Some(0));
    for e in f.cap.evidence().unwrap() {
        assert_eq!(client.take_evidence(&e).unwrap(), Some(fork.clone()));
    }
    assert_eq!(client.fork_evidence().unwrap(), vec![evidence.clone()]);
    assert_eq!(forks_announced(&client), Some(1));
    // Bad evidence from a replica is refused and nothing is kept.
    let bad = ForkEvidence { first: first.clone(), second: first };
    assert!(client.put_evidence(&[bad]).is_err());
    assert_eq!(client.fork_evidence().unwrap(), vec![evidence]);
}

#[test]
fn a_forged_metadata_signature_fails_the_open() {
    let f = fixture();
    let mut bytes = f.kv.get(Cf::Meta, b"metadata").unwrap().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    overwrite(&f.kv, Cf::Meta, b"metadata".to_vec(), Some(bytes));
    assert!(matches!(Capsule::open(f.kv.clone(), vec![]), Err(Error::Verify(VerifyError::Metadata(_)))));
}

/// A record someone with write access to the store (but no key files) plants: unsigned, with
/// its sub-record, as if it were `by`'s.
fn plant(f: &Fixture, by: &Identity, payload: &[u8]) -> RecordHash {
    let bytes = f.make(by, 7, &[f.genesis()], &[payload], false);
    let h = Record::decode(&bytes).unwrap().hash();
    overwrite(&f.kv, Cf::Records, h.as_bytes().to_vec(), Some(bytes));
    let sub = SubRecord { data: payload.to_vec(), path: capsulefs::record::MerklePath(Vec::new()) };
    overwrite(&f.kv, Cf::Subs, sub_key(&h, 0), Some(sub.encode()));
    h
}

#[test]
fn forged_proven_marks_are_refused() {
    let f = fixture();
    let trust = TrustKey::generate();
    let cap = Capsule::open(f.kv.clone(), vec![f.owner.clone()]).unwrap().with_trust_key(trust.clone());
    let genuine = cap.append(&f.owner, &[b"real"], signed()).unwrap();
    cap.prove_record(genuine, EarlierProofs::Use).unwrap();
    cap.save_proven().unwrap();
    let valid_elsewhere = f.kv.get(Cf::Proven, genuine.as_bytes()).unwrap().unwrap();
    assert!(trust.check_mark(&cap.id(), &genuine, &valid_elsewhere), "marks are persisted authenticated");
    let forged = plant(&f, &f.other, b"planted content key");
    let marks = [Vec::new(), vec![0x5a; 32], valid_elsewhere, TrustKey::generate().mark(&cap.id(), &forged).to_vec()];
    for mark in marks {
        overwrite(&f.kv, Cf::Proven, forged.as_bytes().to_vec(), Some(mark.clone()));
        let reopened = Capsule::open(f.kv.clone(), vec![f.owner.clone()]).unwrap().with_trust_key(trust.clone());
        assert!(
            matches!(verify_err(reopened.read_sub_record(forged, SubIdx(0))), VerifyError::Unanchored { record } if record == forged),
            "mark {mark:?}"
        );
    }
}

#[test]
fn forged_attestations_are_refused() {
    let f = fixture();
    let forged = plant(&f, &f.owner, b"as if the owner wrote it");
    overwrite(&f.kv, Cf::Attest, forged.as_bytes().to_vec(), Some(vec![0x11; 32]));
    assert!(matches!(
        verify_err(f.cap.read_sub_record(forged, SubIdx(0))),
        VerifyError::Unanchored { record } if record == forged
    ));
}

#[test]
fn a_forged_sequence_entry_is_not_taken_for_a_fork() {
    let f = fixture();
    let unrelated = f.cap.append(&f.owner, &[b"owner's"], signed()).unwrap();
    let mut key = f.other.writer().as_bytes().to_vec();
    key.extend_from_slice(&[6; 16]); // the device of records made by hand
    key.extend_from_slice(&1u64.to_be_bytes());
    overwrite(&f.kv, Cf::Seqs, key, Some(unrelated.as_bytes().to_vec()));
    let bytes = f.make(&f.other, 1, &[f.genesis()], &[b"honest"], true);
    let err = f.cap.ingest(&bytes, &[b"honest"], Durability::Buffered).unwrap_err();
    assert!(matches!(err, Error::Store(capsulefs::StoreError::BadIndex { cf: "seqs", .. })), "{err}");
    assert!(f.cap.store().evidence().unwrap().is_empty(), "no evidence against an honest writer");
}

#[test]
fn what_a_replica_was_seen_to_hold_is_believed_only_with_this_machines_mac() {
    let f = fixture();
    let trust = TrustKey::generate();
    let cap = Capsule::open(f.kv.clone(), vec![f.owner.clone()]).unwrap().with_trust_key(trust.clone());
    let marks = vec![(f.owner.writer(), DeviceId([1; 16]), Seq(7))];
    cap.keep_replica_watermarks("http://r:7070", &marks).unwrap();
    assert_eq!(cap.replica_watermarks("http://r:7070").unwrap(), marks);
    assert!(cap.replica_watermarks("http://other:7070").unwrap().is_empty());
    // Another machine's key, or an altered note: ignored, never believed.
    let elsewhere = Capsule::open(f.kv.clone(), vec![f.owner.clone()]).unwrap().with_trust_key(TrustKey::generate());
    assert!(elsewhere.replica_watermarks("http://r:7070").unwrap().is_empty());
    let (key, mut note) = f.kv.scan(Cf::Meta, b"note/", false).unwrap().next().unwrap().unwrap();
    note[55] ^= 1; // in the sequence number
    overwrite(&f.kv, Cf::Meta, key, Some(note));
    assert!(cap.replica_watermarks("http://r:7070").unwrap().is_empty());
}
