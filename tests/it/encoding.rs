//! Canonical encoding: round trips, and every non-canonical byte string rejected.

use capsulefs::record::codec::{self, DecodeError, FORMAT_VERSION};
use capsulefs::record::{
    CapsuleId, DeviceId, KeyGen, Metadata, NodeHash, Params, Record, RecordHash, RecordHeader, RecordKind, Seq,
    Signature, SignedMetadata, SubRecord, WriterId,
};
use proptest::prelude::*;

fn header(parents: Vec<RecordHash>) -> RecordHeader {
    RecordHeader {
        version: FORMAT_VERSION,
        capsule: CapsuleId::from_bytes([1; 32]),
        parents,
        writer: WriterId::from_bytes([2; 32]),
        device: DeviceId([6; 16]),
        seq: Seq(7),
        time_ms: 1_700_000_000_000,
        kind: RecordKind::Data,
        key_gen: KeyGen(3),
        sub_count: 5,
        merkle_root: NodeHash::from_bytes([4; 32]),
    }
}

fn record(parents: Vec<RecordHash>, signed: bool) -> Record {
    Record { header: header(parents), signature: signed.then_some(Signature([9; 64])) }
}

fn rh(b: u8) -> RecordHash {
    RecordHash::from_bytes([b; 32])
}

/// Offset of the parents' u32 length prefix in an encoded record: version + capsule id.
const PARENTS_AT: usize = 1 + 32;

fn check_rejects(bytes: &[u8], expected: DecodeError) {
    assert_eq!(Record::decode(bytes).unwrap_err(), expected);
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut b = record(vec![rh(1)], true).encode();
    b.push(0);
    check_rejects(&b, DecodeError::TrailingBytes { extra: 1 });
}

#[test]
fn truncation_is_rejected_at_every_length() {
    let b = record(vec![rh(1), rh(2)], true).encode();
    for len in 0..b.len() {
        assert!(Record::decode(&b[..len]).is_err(), "prefix of {len} bytes decoded");
    }
    check_rejects(&[], DecodeError::Truncated);
    check_rejects(&b[..b.len() - 1], DecodeError::Truncated);
}

#[test]
fn unknown_versions_are_rejected() {
    let mut b = record(vec![rh(1)], false).encode();
    b[0] = FORMAT_VERSION + 1;
    check_rejects(&b, DecodeError::UnknownVersion(FORMAT_VERSION + 1));
    b[0] = 1; // before records named their device
    check_rejects(&b, DecodeError::UnknownVersion(1));
}

#[test]
fn unsorted_duplicate_or_missing_parents_are_rejected() {
    let bad = DecodeError::NonCanonical("parents must be sorted and unique");
    check_rejects(&record(vec![rh(2), rh(1)], false).encode(), bad.clone());
    check_rejects(&record(vec![rh(1), rh(1)], false).encode(), bad);
    check_rejects(&record(vec![], false).encode(), DecodeError::NonCanonical("a record has 1..=1024 parents"));
}

#[test]
fn a_length_prefix_longer_than_the_input_is_rejected() {
    // borsh lengths are fixed-width u32, so "non-minimal" lengths cannot exist; wrong ones can.
    let mut b = record(vec![rh(1)], false).encode();
    b[PARENTS_AT..PARENTS_AT + 4].copy_from_slice(&2u32.to_le_bytes());
    assert!(Record::decode(&b).is_err());
    b[PARENTS_AT..PARENTS_AT + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    check_rejects(&b, DecodeError::Truncated);
}

#[test]
fn bad_enum_and_option_tags_are_rejected() {
    let good = record(vec![rh(1)], true).encode();
    // kind sits after parents (4 + 32), writer (32), device (16), seq (8), time (8).
    let kind_at = PARENTS_AT + 4 + 32 + 32 + 16 + 8 + 8;
    let mut b = good.clone();
    b[kind_at] = 7;
    assert!(matches!(Record::decode(&b), Err(DecodeError::Malformed(_))));
    let option_at = good.len() - 65;
    let mut b = good;
    b[option_at] = 2;
    assert!(matches!(Record::decode(&b), Err(DecodeError::Malformed(_))));
}

#[test]
fn sequence_numbers_start_at_one() {
    let mut r = record(vec![rh(1)], false);
    r.header.seq = Seq(0);
    check_rejects(&r.encode(), DecodeError::NonCanonical("sequence numbers start at 1"));
}

fn metadata() -> Metadata {
    Metadata {
        version: FORMAT_VERSION,
        name: "notes".into(),
        creator: WriterId::from_bytes([5; 32]),
        writers: vec![WriterId::from_bytes([6; 32]), WriterId::from_bytes([7; 32])],
        admins: vec![],
        params: Params::default(),
        created_ms: 42,
        nonce: [8; 16],
    }
}

#[test]
fn metadata_member_lists_must_be_sorted_and_exclude_the_creator() {
    let signed = |m: Metadata| SignedMetadata { metadata: m, signature: Signature([0; 64]) }.encode();
    let ok = metadata();
    assert_eq!(SignedMetadata::decode(&signed(ok.clone())).unwrap().metadata, ok);
    let mut unsorted = metadata();
    unsorted.writers.reverse();
    assert!(matches!(SignedMetadata::decode(&signed(unsorted)), Err(DecodeError::NonCanonical(_))));
    let mut with_creator = metadata();
    with_creator.admins = vec![with_creator.creator];
    assert!(matches!(SignedMetadata::decode(&signed(with_creator)), Err(DecodeError::NonCanonical(_))));
    let mut empty_name = metadata();
    empty_name.name.clear();
    assert!(matches!(SignedMetadata::decode(&signed(empty_name)), Err(DecodeError::NonCanonical(_))));
}

#[test]
fn the_id_commits_to_every_field() {
    let base = metadata();
    let mut other = metadata();
    other.nonce[0] ^= 1;
    assert_ne!(base.id(), other.id());
    let mut other = metadata();
    other.params.sign_every_records += 1;
    assert_ne!(base.id(), other.id());
}

#[test]
fn hex_ids_parse_only_in_full() {
    let h = rh(0xab);
    assert_eq!(RecordHash::from_hex(&h.to_hex()).unwrap(), h);
    assert!(RecordHash::from_hex(&h.to_hex()[..63]).is_err());
    assert_eq!(format!("{h:?}"), "rec:abababababab");
}

fn arb_hash() -> impl Strategy<Value = RecordHash> {
    any::<[u8; 32]>().prop_map(RecordHash::from_bytes)
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        proptest::collection::btree_set(arb_hash(), 1..8),
        any::<[u8; 32]>(),
        1..u64::MAX,
        any::<u64>(),
        any::<bool>(),
        any::<u32>(),
        0..=(1u32 << 20),
        proptest::option::of(any::<[u8; 32]>()),
    )
        .prop_map(|(parents, w, seq, time_ms, membership, key_gen, sub_count, sig)| Record {
            header: RecordHeader {
                version: FORMAT_VERSION,
                capsule: CapsuleId::from_bytes([1; 32]),
                parents: parents.into_iter().collect(),
                writer: WriterId::from_bytes(w),
                device: DeviceId([6; 16]),
                seq: Seq(seq),
                time_ms,
                kind: if membership { RecordKind::Membership } else { RecordKind::Data },
                key_gen: KeyGen(key_gen),
                sub_count,
                merkle_root: NodeHash::from_bytes(w),
            },
            signature: sig.map(|s| Signature([s, s].concat().try_into().unwrap())),
        })
}

proptest! {
    #[test]
    fn records_round_trip(r in arb_record()) {
        let bytes = r.encode();
        prop_assert_eq!(Record::decode(&bytes).unwrap(), r);
    }

    /// The canonical property: whatever decodes re-encodes to exactly the input.
    #[test]
    fn mutated_records_decode_only_canonically(r in arb_record(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = r.encode();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(decoded) = Record::decode(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }

    #[test]
    fn random_bytes_decode_only_canonically(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(r) = Record::decode(&bytes) {
            prop_assert_eq!(r.encode(), bytes.clone());
        }
        if let Ok(s) = SubRecord::decode(&bytes) {
            prop_assert_eq!(codec::encode(&s), bytes.clone());
        }
        if let Ok(m) = SignedMetadata::decode(&bytes) {
            prop_assert_eq!(m.encode(), bytes);
        }
    }

    #[test]
    fn sub_records_round_trip(data in proptest::collection::vec(any::<u8>(), 0..200), n in 0usize..12) {
        let path = capsulefs::record::MerklePath(vec![NodeHash::from_bytes([3; 32]); n]);
        let s = SubRecord { data, path };
        prop_assert_eq!(SubRecord::decode(&s.encode()).unwrap(), s);
    }
}

/// The worked sizes in ARCHITECTURE.md ("Formats").
#[test]
fn encoded_sizes_match_architecture_md() {
    assert_eq!(record(vec![rh(1)], false).encode().len(), 175);
    assert_eq!(record(vec![rh(1)], true).encode().len(), 239);
    assert_eq!(record(vec![rh(1), rh(2)], true).encode().len(), 271);
    let m = Metadata { writers: vec![], ..metadata() };
    assert_eq!(SignedMetadata { metadata: m, signature: Signature([0; 64]) }.encode().len(), 146);
    let sub = |len: usize, path: usize| {
        SubRecord { data: vec![0; len], path: capsulefs::record::MerklePath(vec![NodeHash::from_bytes([0; 32]); path]) }
            .encode()
            .len()
    };
    assert_eq!((sub(0, 0), sub(1, 0), sub(5000, 10)), (8, 9, 5328));
}
