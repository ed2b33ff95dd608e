//! The keystore: the content key wrapped for members, found through proofs, admins only.

use capsulefs::Error;
use capsulefs::capsule::AppendOptions;
use capsulefs::crypto::aead::{ContentKey, Place, SealedKind, open, seal};
use capsulefs::crypto::keys::Identity;
use capsulefs::crypto::wrap;
use capsulefs::member::{content_key, create_keystore};
use capsulefs::record::{KeyGen, RecordKind};
use capsulefs::rights::MembershipEntry;
use capsulefs::store::{Batch, Cf, Durability, Kv};

use super::fixture;

fn membership() -> AppendOptions {
    AppendOptions { sign: true, kind: RecordKind::Membership, durability: Durability::Buffered, ..Default::default() }
}

#[test]
fn the_owner_gets_the_content_key_back() {
    let f = fixture();
    let (key, _) = create_keystore(&f.cap, &f.owner).unwrap();
    let place = Place { capsule: f.cap.id(), kind: SealedKind::Chunk, object: 2, offset: 0, level: 0 };
    let back = content_key(&f.cap, &f.owner).unwrap();
    assert_eq!(back.generation(), KeyGen(1));
    assert_eq!(open(&back, &place, &seal(&key, &place, b"file bytes")).unwrap(), b"file bytes");
    assert!(matches!(content_key(&f.cap, &f.other), Err(Error::NotFound(_))), "not a reader");
}

#[test]
fn the_newest_generation_by_an_admin_wins_and_others_are_ignored() {
    let f = fixture();
    create_keystore(&f.cap, &f.owner).unwrap();
    let next = ContentKey::generate(KeyGen(2));
    let entry = |k: &ContentKey, who: &Identity| MembershipEntry::WrappedKey {
        generation: k.generation(),
        member: who.writer(),
        wrapped: wrap::wrap(k, &f.cap.id(), &who.writer()).unwrap(),
    };
    f.cap.append(&f.owner, &[&entry(&next, &f.owner).encode()], membership()).unwrap();
    assert_eq!(content_key(&f.cap, &f.owner).unwrap().generation(), KeyGen(2));
    // `other` may write but is no admin: its keystore entry for itself is ignored.
    let own = ContentKey::generate(KeyGen(9));
    f.cap.append(&f.other, &[&entry(&own, &f.other).encode()], membership()).unwrap();
    assert!(matches!(content_key(&f.cap, &f.other), Err(Error::NotFound(_))));
    assert_eq!(content_key(&f.cap, &f.owner).unwrap().generation(), KeyGen(2));
}

#[test]
fn a_tampered_keystore_entry_is_refused() {
    let f = fixture();
    let (_, record) = create_keystore(&f.cap, &f.owner).unwrap();
    let key = [&record.as_bytes()[..], &0u32.to_be_bytes()].concat();
    let mut bytes = f.kv.get(Cf::Subs, &key).unwrap().unwrap();
    bytes[20] ^= 1;
    let mut b = Batch::default();
    b.put(Cf::Subs, key, bytes);
    f.kv.write(b, Durability::Buffered).unwrap();
    // Entries proven when they were stored stay believed in memory; a fresh open proves again,
    // and a membership record that does not prove applies nothing (and says why).
    let reopened = capsulefs::capsule::Capsule::open(f.kv.clone(), vec![f.owner.clone()]).unwrap();
    let read = content_key(&reopened, &f.owner).map(|k| k.generation());
    assert!(
        matches!(&read, Err(Error::NotFound(why)) if why.contains("does not prove") && why.contains("Merkle")),
        "{read:?}"
    );
    let not_applied = &reopened.rights().unwrap().not_applied;
    assert!(not_applied.iter().any(|n| n.record == record), "{not_applied:?}");
}

#[test]
fn entries_decode_canonically() {
    let e = MembershipEntry::WrappedKey {
        generation: KeyGen(3),
        member: Identity::generate("m").unwrap().writer(),
        wrapped: [7; 80],
    };
    let bytes = e.encode();
    assert_eq!(MembershipEntry::decode(&bytes).unwrap(), e);
    assert!(MembershipEntry::decode(&[&bytes[..], &[0]].concat()).is_err());
    let zero_gen = MembershipEntry::WrappedKey {
        generation: KeyGen(0),
        member: Identity::generate("m").unwrap().writer(),
        wrapped: [7; 80],
    };
    assert!(MembershipEntry::decode(&zero_gen.encode()).is_err());
}
