//! DAG proofs: chains, branches, merges, several signed descendants, the witness index and the
//! proof cache (memory and persisted).

use std::sync::Arc;

use capsulefs::capsule::{Capsule, EarlierProofs, NewCapsule};
use capsulefs::crypto::keys::Identity;
use capsulefs::crypto::sign::TrustKey;
use capsulefs::proof::Anchor;
use capsulefs::record::{RecordHash, SubIdx};
use capsulefs::store::Kv;
use capsulefs::store::rocks::RocksKv;
use capsulefs::{Error, VerifyError};

use super::{Fixture, fixture, signed, unsigned};

#[test]
fn an_unsigned_chain_is_proven_by_its_signed_descendant() {
    let f = fixture();
    let a = f.make(&f.other, 1, &[f.genesis()], &[b"a"], false);
    let ha = Fixture::hash_of(&a);
    // Alone, an unsigned record is not taken: nothing of its writer's vouches for it.
    assert!(
        matches!(f.put_all(&[(a.clone(), b"a")]), Err(Error::Verify(VerifyError::Unanchored { record })) if record == ha)
    );
    let b = f.make(&f.other, 2, &[ha], &[b"b"], false);
    let c = f.make(&f.other, 3, &[Fixture::hash_of(&b)], &[b"c"], false);
    let s = f.make(&f.other, 4, &[Fixture::hash_of(&c)], &[b"s"], true);
    let stored = f.put_all(&[(a, b"a"), (b, b"b"), (c, b"c"), (s, b"s")]).unwrap();
    let [a, b, c, s] = stored[..] else { panic!("four records stored: {stored:?}") };
    let proof = f.cap.prove_record(a, EarlierProofs::Ignore).unwrap();
    assert_eq!(proof.chain, vec![a, b, c, s]);
    assert_eq!(proof.anchor, Anchor::Signed { record: s, writer: f.other.writer() });
    let w = f.cap.store().witness(&a, &f.other.writer()).unwrap().unwrap();
    assert_eq!((w.anchor, w.dist, w.via), (s, 3, b));
}

#[test]
fn a_signed_merge_proves_its_own_writer_s_side_only() {
    let f = fixture();
    let root = f.put(&f.owner, 1, &[f.genesis()], b"root", true);
    let left = f.make(&f.owner, 2, &[root], &[b"left"], false);
    let right = f.make(&f.other, 1, &[root], &[b"right"], false);
    let (hl, hr) = (Fixture::hash_of(&left), Fixture::hash_of(&right));
    let merge = f.make(&f.owner, 3, &[hl, hr], &[b"merge"], true);
    // The owner's signature vouches for the owner's left side, not for the other's right.
    let refused = f.put_all(&[(left.clone(), b"left"), (right, b"right"), (merge.clone(), b"merge")]);
    assert!(matches!(refused, Err(Error::Verify(VerifyError::Unanchored { record })) if record == hr));
    assert_eq!(f.cap.heads().unwrap(), vec![root], "a refused batch leaves nothing");
    let right = f.make(&f.other, 1, &[root], &[b"right"], true);
    let stored = f.put_all(&[(left, b"left"), (right, b"right"), (merge, b"merge")]).unwrap();
    assert_eq!(f.cap.heads().unwrap(), vec![Fixture::hash_of(&stored_bytes_last(&f, &stored))]);
    let proof = f.cap.prove_record(hl, EarlierProofs::Ignore).unwrap();
    assert_eq!(proof.chain, vec![hl, stored[2]]);
    // Signed records prove themselves.
    assert_eq!(f.cap.prove_record(hr, EarlierProofs::Ignore).unwrap().chain, vec![hr]);
    assert_eq!(f.cap.prove_record(root, EarlierProofs::Ignore).unwrap().chain, vec![root]);
}

/// The stored encoding of the last of `stored`.
fn stored_bytes_last(f: &super::Fixture, stored: &[RecordHash]) -> Vec<u8> {
    f.cap.store().record_bytes(stored.last().unwrap()).unwrap().unwrap()
}

#[test]
fn the_closest_signed_descendant_only_gets_closer() {
    let f = fixture();
    let a = f.make(&f.other, 1, &[f.genesis()], &[b"a"], false);
    let ha = Fixture::hash_of(&a);
    let x = f.make(&f.other, 2, &[ha], &[b"x"], false);
    let y = f.make(&f.other, 3, &[Fixture::hash_of(&x)], &[b"y"], false);
    let far = f.make(&f.other, 4, &[Fixture::hash_of(&y)], &[b"far"], true);
    let stored = f.put_all(&[(a, b"a"), (x, b"x"), (y, b"y"), (far, b"far")]).unwrap();
    let (hx, hy, hfar) = (stored[1], stored[2], stored[3]);
    let other = f.other.writer();
    assert_eq!(f.cap.store().witness(&ha, &other).unwrap().unwrap().dist, 3);
    // A signed child of `a` on another branch, by the same writer, is closer: the index moves.
    let near = f.put(&f.other, 5, &[ha], b"near", true);
    let w = f.cap.store().witness(&ha, &other).unwrap().unwrap();
    assert_eq!((w.anchor, w.dist, w.via), (near, 1, near));
    // Another writer's signature changes nothing for `a`: it vouches for its own records only.
    let later = f.put(&f.owner, 1, &[hfar, near], b"later", true);
    assert_eq!(f.cap.store().witness(&ha, &other).unwrap().unwrap().anchor, near);
    assert!(f.cap.store().witness(&ha, &f.owner.writer()).unwrap().is_none());
    assert!(f.cap.store().witness(&later, &f.owner.writer()).unwrap().is_none(), "a signed record is its own anchor");
    assert_eq!(f.cap.prove_record(ha, EarlierProofs::Ignore).unwrap().chain, vec![ha, near]);
    assert_eq!(f.cap.prove_record(hx, EarlierProofs::Ignore).unwrap().chain, vec![hx, hy, hfar]);
}

#[test]
fn own_unsigned_tail_is_attested_locally_and_others_are_not() {
    let f = fixture();
    let mine = f.cap.append(&f.owner, &[b"tail"], unsigned()).unwrap();
    let proof = f.cap.prove_record(mine, EarlierProofs::Ignore).unwrap();
    assert_eq!(proof.anchor, Anchor::Attested { record: mine, writer: f.owner.writer() });
    // The same capsule opened without the owner's key cannot prove that tail.
    let without_key = Capsule::open(f.kv.clone() as Arc<dyn Kv>, vec![]).unwrap();
    assert!(matches!(
        without_key.prove_record(mine, EarlierProofs::Ignore),
        Err(Error::Verify(VerifyError::Unanchored { record })) if record == mine
    ));
    // Once the tail has a signed descendant, anyone can.
    let s = f.cap.append(&f.owner, &[b"sign"], signed()).unwrap();
    assert_eq!(without_key.prove_record(mine, EarlierProofs::Ignore).unwrap().chain, vec![mine, s]);
}

#[test]
fn many_sub_records_are_each_provable_alone() {
    let f = fixture();
    let payloads: Vec<Vec<u8>> = (0..1000u32).map(|i| i.to_le_bytes().repeat(i as usize % 7)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let h = f.cap.append(&f.owner, &refs, signed()).unwrap();
    for i in [0u32, 1, 511, 512, 998, 999] {
        let (data, proof) = f.cap.read_sub_record(h, SubIdx(i)).unwrap();
        assert_eq!(&data.get()[..], &payloads[i as usize][..]);
        assert_eq!(data.proven_by(), h);
        assert!(proof.path_len <= 10);
    }
    assert!(matches!(
        f.cap.read_sub_record(h, SubIdx(1000)),
        Err(Error::Verify(VerifyError::IndexOutOfRange { count: 1000, .. }))
    ));
}

#[test]
fn proofs_stop_at_cached_records() {
    let f = fixture();
    let hashes: Vec<_> = (0..10).map(|i| f.cap.append(&f.owner, &[&[i]], unsigned()).unwrap()).collect();
    let top = f.cap.append(&f.owner, &[b"top"], signed()).unwrap();
    // Reverse order: each proof stops at the record proven just before it.
    for (i, h) in hashes.iter().enumerate().rev() {
        let proof = f.cap.prove_record(*h, EarlierProofs::Use).unwrap();
        let next = hashes.get(i + 1).copied().unwrap_or(top);
        assert_eq!(proof.chain, vec![*h, next], "record {i}");
        if i < 9 {
            assert_eq!(proof.anchor, Anchor::Cached { record: next });
        }
    }
    let before = f.cap.cache_stats();
    assert_eq!(f.cap.prove_record(hashes[0], EarlierProofs::Use).unwrap().chain, vec![hashes[0]]);
    assert_eq!(f.cap.cache_stats().hits, before.hits + 1);
}

#[test]
fn the_proven_set_survives_a_reopen_with_its_trust_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let me = Identity::generate("me").unwrap();
    let trust = TrustKey::generate();
    let (a, s) = {
        let kv = Arc::new(RocksKv::open(dir.path(), true).unwrap());
        let cap = Capsule::create(kv, NewCapsule::new("p", &me), vec![]).unwrap().with_trust_key(trust.clone());
        let a = cap.append(&me, &[b"a"], unsigned()).unwrap();
        let s = cap.append(&me, &[b"s"], signed()).unwrap();
        assert_eq!(cap.prove_record(a, EarlierProofs::Use).unwrap().chain, vec![a, s]);
        (a, s)
    };
    let open = |key: TrustKey| {
        Capsule::open(Arc::new(RocksKv::open(dir.path(), false).unwrap()), vec![]).unwrap().with_trust_key(key)
    };
    let cap = open(trust);
    assert_eq!(cap.prove_record(a, EarlierProofs::Use).unwrap().anchor, Anchor::Cached { record: a });
    let fresh = cap.prove_record(a, EarlierProofs::Ignore).unwrap();
    assert_eq!(fresh.anchor, Anchor::Signed { record: s, writer: me.writer() });
    drop(cap);
    // Another machine's key (or none) does not take these marks: the proof walks again.
    let elsewhere = open(TrustKey::generate());
    assert_eq!(
        elsewhere.prove_record(a, EarlierProofs::Use).unwrap().anchor,
        Anchor::Signed { record: s, writer: me.writer() }
    );
}

#[test]
fn append_merges_every_head_and_numbers_each_writer() {
    let f = fixture();
    let root = f.put(&f.owner, 1, &[f.genesis()], b"root", true);
    let l = f.put(&f.other, 1, &[root], b"l", true);
    let r = f.put(&f.other, 2, &[root], b"r", true);
    let m = f.cap.append(&f.owner, &[b"m"], signed()).unwrap();
    let log: Vec<_> = f.cap.log().unwrap().map(Result::unwrap).collect();
    let (h, rec) = &log[0];
    assert_eq!(*h, m);
    let mut expected = vec![l, r];
    expected.sort();
    assert_eq!(rec.header.parents, expected);
    // The owner's root came from another device (made by hand): this store numbers its own.
    assert_ne!(rec.header.device, log[3].1.header.device);
    assert_eq!(rec.header.seq.0, 1);
    let next = f.cap.append(&f.owner, &[b"n"], signed()).unwrap();
    assert_eq!(f.cap.record(next).unwrap().header.seq.0, 2);
    assert_eq!(f.cap.audit().unwrap().records, 5);
}

/// Every record that is neither in `of` nor an ancestor of one: the obvious definition.
fn not_below(f: &super::Fixture, all: &[RecordHash], of: &[RecordHash]) -> std::collections::BTreeSet<RecordHash> {
    let mut below = std::collections::BTreeSet::new();
    let mut stack: Vec<RecordHash> = of.to_vec();
    while let Some(h) = stack.pop() {
        if h != f.genesis() && below.insert(h) {
            stack.extend(f.cap.record(h).unwrap().header.parents);
        }
    }
    all.iter().copied().filter(|h| !below.contains(h)).collect()
}

#[test]
fn difference_matches_the_definition_on_random_dags() {
    for seed in 0..20u64 {
        let f = fixture();
        let mut rng = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = |n: usize| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) as usize % n
        };
        let mut all: Vec<RecordHash> = Vec::new();
        for i in 0..60u64 {
            let mut parents: Vec<RecordHash> =
                (0..1 + next(3)).filter(|_| !all.is_empty()).map(|_| all[next(all.len())]).collect();
            parents.sort();
            parents.dedup();
            if parents.is_empty() {
                parents.push(f.genesis());
            }
            all.push(f.put(&f.owner, i + 1, &parents, &[i as u8], true));
        }
        let theirs: Vec<RecordHash> = (0..next(4)).map(|_| all[next(all.len())]).collect();
        let got = f.cap.difference(&theirs).unwrap();
        let expected = not_below(&f, &all, &theirs);
        assert_eq!(got.iter().copied().collect::<std::collections::BTreeSet<_>>(), expected, "seed {seed}");
        assert_eq!(got.len(), expected.len(), "no record twice");
        let position: std::collections::HashMap<_, _> = got.iter().enumerate().map(|(i, h)| (*h, i)).collect();
        for (i, h) in got.iter().enumerate() {
            for p in f.cap.record(*h).unwrap().header.parents {
                assert!(position.get(&p).is_none_or(|j| *j < i), "parents first (seed {seed})");
            }
        }
        // Heads the capsule does not hold are skipped.
        let unknown = RecordHash::from_bytes([9; 32]);
        assert_eq!(f.cap.difference(&[unknown]).unwrap().len(), all.len());
    }
}
