//! Membership in the DAG: rights as of a record's parents, forged changes ignored everywhere,
//! revocations with a cut-off, and the same rights on every replica whatever the order of
//! arrival.

use std::sync::Arc;

use capsulefs::capsule::{AppendOptions, Capsule, NewCapsule};
use capsulefs::crypto::keys::Identity;
use capsulefs::member;
use capsulefs::record::{KeyGen, RecordKind};
use capsulefs::rights::{Level, MembershipEntry};
use capsulefs::store::mem::MemKv;
use capsulefs::store::{Durability, Kv};
use capsulefs::sync::transfer::pull;
use capsulefs::{Error, VerifyError};

struct Team {
    alice: Identity,
    people: Vec<Identity>,
    first: Capsule,
}

/// A capsule alice made, with its keystore, and `n` more identities.
fn team(n: usize) -> Team {
    let alice = Identity::generate("alice").unwrap();
    let people = (0..n).map(|i| Identity::generate(&format!("p{i}")).unwrap()).collect();
    let kv = Arc::new(MemKv::new()) as Arc<dyn Kv>;
    let first = Capsule::create(kv, NewCapsule::new("team", &alice), vec![alice.clone()]).unwrap();
    member::create_keystore(&first, &alice).unwrap();
    Team { alice, people, first }
}

/// An empty replica of `capsule`.
fn replica_of(capsule: &Capsule) -> Capsule {
    Capsule::adopt(Arc::new(MemKv::new()) as Arc<dyn Kv>, capsule.id(), &capsule.metadata_bytes(), Vec::new()).unwrap()
}

fn members(capsule: &Capsule) -> Vec<(String, Level)> {
    capsule.rights().unwrap().members().map(|m| (m.key.to_hex(), m.level)).collect()
}

fn membership_record(capsule: &Capsule, by: &Identity, entries: &[MembershipEntry]) -> capsulefs::Result<()> {
    let encoded: Vec<Vec<u8>> = entries.iter().map(MembershipEntry::encode).collect();
    let payloads: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    let opts = AppendOptions { sign: true, kind: RecordKind::Membership, ..Default::default() };
    capsule.append(by, &payloads, opts).map(drop)
}

#[test]
fn a_change_by_someone_without_the_level_is_kept_and_ignored_everywhere() {
    let t = team(2);
    let (bob, carol) = (&t.people[0], &t.people[1]);
    member::grant(&t.first, &t.alice, &bob.writer(), Level::Write).unwrap();
    // Bob may write records, so his membership record is stored; none of it applies.
    let forged = [
        MembershipEntry::Grant { member: bob.writer(), level: Level::Superadmin },
        MembershipEntry::Grant { member: carol.writer(), level: Level::Write },
        MembershipEntry::Revoke { member: t.alice.writer(), seen: Vec::new() },
    ];
    membership_record(&t.first, bob, &forged).unwrap();
    let rights = t.first.rights().unwrap();
    assert_eq!(rights.level(&bob.writer()), Some(Level::Write));
    assert_eq!(rights.level(&carol.writer()), None);
    assert_eq!(rights.level(&t.alice.writer()), Some(Level::Superadmin));
    assert_eq!(rights.not_applied.len(), 3, "{:?}", rights.not_applied);
    // The `grant` command refuses it before signing.
    let refused = member::grant(&t.first, bob, &carol.writer(), Level::Write).unwrap_err();
    assert!(refused.to_string().contains("takes the admin level"), "{refused}");
    // A replica that takes the same records reaches the same rights.
    let copy = replica_of(&t.first);
    pull(&copy, &t.first, &()).unwrap();
    assert_eq!(members(&copy), members(&t.first));
    // Carol, given nothing, cannot write.
    let refused = t.first.append(carol, &[b"x"], AppendOptions::default()).unwrap_err();
    assert!(matches!(refused, Error::Verify(VerifyError::UnauthorizedWriter { .. })), "{refused}");
}

#[test]
fn rights_are_those_as_of_the_parents_not_of_what_arrived_since() {
    let t = team(1);
    let bob = &t.people[0];
    // Bob's record made before his grant: refused, and still refused once the grant exists,
    // since the grant is not among its parents.
    let early = t.first.heads().unwrap();
    member::grant(&t.first, &t.alice, &bob.writer(), Level::Write).unwrap();
    let copy = replica_of(&t.first);
    pull(&copy, &t.first, &()).unwrap();
    let opts = AppendOptions { sign: true, ..Default::default() };
    let before_grant = t.first.append_built(
        bob,
        capsulefs::capsule::Parents::These(&early),
        vec![capsulefs::record::SubRecordBuf::copied(b"x")],
        opts,
    );
    assert!(matches!(before_grant, Err(Error::Verify(VerifyError::UnauthorizedWriter { .. }))), "{before_grant:?}");
    // On top of the grant he writes.
    t.first.append(bob, &[b"y"], opts).unwrap();
}

#[test]
fn a_revoked_writers_later_records_are_refused_and_the_key_rotates_for_the_rest() {
    let t = team(3);
    let (bob, carol) = (&t.people[0], &t.people[1]);
    member::grant(&t.first, &t.alice, &bob.writer(), Level::Write).unwrap();
    member::grant(&t.first, &t.alice, &carol.writer(), Level::Read).unwrap();
    // Bob's copy, where he goes on writing offline.
    let bobs = replica_of(&t.first);
    pull(&bobs, &t.first, &()).unwrap();
    let opts = AppendOptions { sign: true, durability: Durability::Buffered, ..Default::default() };
    bobs.append(bob, &[b"before"], opts).unwrap();
    pull(&t.first, &bobs, &()).unwrap();
    member::revoke(&t.first, &t.alice, &bob.writer()).unwrap();
    bobs.append(bob, &[b"after the cut-off"], opts).unwrap();
    // Offered, kept out, reported; the rest of the pull goes on.
    let late = bobs.heads().unwrap();
    let report = pull(&t.first, &bobs, &()).unwrap();
    assert_eq!(report.revoked, late);
    let refused =
        t.first.ingest(&bobs.record(late[0]).unwrap().encode(), &[b"after the cut-off"], Durability::Buffered);
    assert!(matches!(refused, Err(Error::Verify(VerifyError::Revoked { .. }))), "{refused:?}");
    // Kept aside as evidence of what the removed writer tried, once.
    let aside: Vec<_> = t.first.set_aside().unwrap().into_iter().map(|(h, r)| (h, r.header.writer)).collect();
    assert_eq!(aside, vec![(late[0], bob.writer())]);
    // A new generation, wrapped for alice and carol, opens the old one too; bob has none.
    let ring = member::keyring(&t.first, carol).unwrap();
    assert_eq!(ring.newest().map(|g| g.0), Some(2));
    assert_eq!(ring.get(KeyGen(1)).len(), 1, "the previous generation opens from the new one");
    assert_eq!(member::keyring(&t.first, bob).unwrap().newest().map(|g| g.0), Some(1));
    // Someone added after the rotation reads the history before it too.
    let dave = &t.people[2];
    member::grant(&t.first, &t.alice, &dave.writer(), Level::Read).unwrap();
    let ring = member::keyring(&t.first, dave).unwrap();
    assert_eq!((ring.get(KeyGen(1)).len(), ring.get(KeyGen(2)).len()), (1, 1));
    // Granted again later, he writes again.
    member::grant(&t.first, &t.alice, &bob.writer(), Level::Write).unwrap();
    t.first.append(bob, &[b"welcome back"], opts).unwrap();
}

mod ordering {
    use proptest::prelude::*;

    use super::*;

    /// What one step does: a change signed by someone (0 = alice) on replica `at`, or a pull
    /// from one replica into another.
    #[derive(Clone, Debug)]
    enum Step {
        Grant { at: usize, by: usize, to: usize, level: u8 },
        Revoke { at: usize, by: usize, to: usize },
        Pull { into: usize, from: usize },
    }

    const REPLICAS: usize = 3;
    const PEOPLE: usize = 4;

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..REPLICAS, 0..PEOPLE, 1..PEOPLE, 0u8..4).prop_map(|(at, by, to, level)| Step::Grant {
                at,
                by,
                to,
                level
            }),
            (0..REPLICAS, 0..PEOPLE, 1..PEOPLE).prop_map(|(at, by, to)| Step::Revoke { at, by, to }),
            (0..REPLICAS, 0..REPLICAS).prop_map(|(into, from)| Step::Pull { into, from }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Concurrent changes made on replicas apart, then exchanged in any order: replicas
        /// that end with the same records end with the same members.
        #[test]
        fn concurrent_changes_give_the_same_rights_on_every_replica(steps in proptest::collection::vec(step(), 1..20)) {
            let t = team(PEOPLE - 1);
            let who = |i: usize| if i == 0 { &t.alice } else { &t.people[i - 1] };
            let replicas: Vec<Capsule> = (0..REPLICAS).map(|_| replica_of(&t.first)).collect();
            for r in &replicas {
                pull(r, &t.first, &()).unwrap();
            }
            let levels = [Level::Read, Level::Write, Level::Admin, Level::Superadmin];
            for s in &steps {
                // A signer without the level is refused by `grant`; entries are written
                // directly too, so that ignored changes travel as well.
                let _ = match s {
                    Step::Grant { at, by, to, level } => {
                        let entry = MembershipEntry::Grant { member: who(*to).writer(), level: levels[*level as usize] };
                        membership_record(&replicas[*at], who(*by), &[entry])
                    }
                    Step::Revoke { at, by, to } => {
                        let seen = replicas[*at].last_seqs_of(&who(*to).writer()).unwrap();
                        membership_record(&replicas[*at], who(*by), &[MembershipEntry::Revoke { member: who(*to).writer(), seen }])
                    }
                    Step::Pull { into, from } if into != from => pull(&replicas[*into], &replicas[*from], &()).map(drop),
                    Step::Pull { .. } => Ok(()),
                };
            }
            // Everyone pulls from everyone, in one order; a fresh replica in the other.
            for _ in 0..2 {
                for into in 0..REPLICAS {
                    for from in 0..REPLICAS {
                        if into != from {
                            let _ = pull(&replicas[into], &replicas[from], &());
                        }
                    }
                }
            }
            // Two fresh replicas take everything in opposite orders of replicas.
            let (fresh, backwards) = (replica_of(&t.first), replica_of(&t.first));
            for from in 0..REPLICAS {
                let _ = pull(&fresh, &replicas[from], &());
                let _ = pull(&backwards, &replicas[REPLICAS - 1 - from], &());
            }
            // Replicas that hold the same records hold the same rights, however those arrived.
            // (Records can differ: one that took a record before the revocation cutting it off
            // keeps it, and records built on it, which replicas knowing the revocation refuse.)
            let all: Vec<&Capsule> = replicas.iter().chain([&fresh, &backwards]).collect();
            for a in &all {
                for b in &all {
                    if a.heads().unwrap() == b.heads().unwrap() {
                        prop_assert_eq!(members(a), members(b));
                    }
                }
            }
        }
    }
}
