//! Membership: levels given to other people's keys and taken away, carried by a replica like
//! any record; a revocation cuts the member off and rotates the content key on live mounts.

use std::fs;

use super::background::eventually;
use super::server::Server;
use super::{Home, Mounted, write_fsynced};

#[test]
fn a_reader_granted_by_the_creator_reads_through_a_replica_and_cannot_write() {
    let server = Server::start();
    let alice = Home::default();
    let id = alice.ok(&["create", "c"]).trim().to_owned();
    {
        let Some(m) = Mounted::new(&alice, "c", &[]) else { return };
        write_fsynced(&m.path("plan.txt"), b"for carol's eyes");
    }
    alice.ok(&["push", "c", &server.url()]);
    let alice_key = alice.ok(&["key", "show"]).trim().to_owned();
    let carol = Home::default();
    let carol_key = new_key(&carol);
    assert_eq!(carol_key.len(), 64, "{carol_key}");

    // Before the grant carol's copy holds every record, and no key for her.
    carol.ok(&["clone", &format!("{}#{id}", server.url())]);
    let dir = tempfile::tempdir().unwrap();
    let refused = carol.run(&["mount", "c", dir.path().to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is this identity a member"), "{refused:?}");

    let record = alice.ok(&["grant", "c", &carol_key, "--level", "read"]).trim().to_owned();
    alice.ok(&["push", "c", &server.url()]);
    let members = alice.ok(&["members", "c"]);
    assert!(members.contains(&format!("{alice_key} superadmin (creator)")), "{members}");
    assert!(members.contains(&format!("{carol_key} read granted by {alice_key} in record {record}")), "{members}");

    // The grant reaches carol like any record; her mount reads, and is read-only for her.
    carol.ok(&["pull", "c"]);
    assert_eq!(carol.ok(&["members", "c"]), members);
    let Some(m) = Mounted::new(&carol, "c", &[]) else { return };
    assert_eq!(fs::read(m.path("plan.txt")).unwrap(), b"for carol's eyes");
    let err = fs::write(m.path("mine.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // The mount's log says why, naming the level she holds and the one writing needs.
    let log = fs::read_to_string(carol.path().join("logs/mount-c.log")).unwrap();
    assert!(log.contains("holds the read level") && log.contains("not the write level"), "{log}");
}

#[test]
fn an_invitation_token_joins_and_mounts_and_one_naming_another_creator_is_refused() {
    use capsulefs::member::Invitation;
    use capsulefs::record::{CapsuleId, WriterId};
    let server = Server::start();
    let alice = Home::default();
    let id = alice.ok(&["create", "c"]).trim().to_owned();
    let carol = Home::default();
    let carol_key = new_key(&carol);
    // A token needs a replica to join through.
    let nowhere = alice.run(&["invite", "c", &carol_key, "--level", "read"]);
    assert_eq!(nowhere.status.code(), Some(5), "{nowhere:?}");
    alice.ok(&["replica", "add", "c", &server.url()]);
    {
        let Some(m) = Mounted::new(&alice, "c", &["--no-sync"]) else { return };
        write_fsynced(&m.path("hello.txt"), b"welcome, carol");
    }
    // invite grants, pushes the grant with everything else, and prints the token last.
    let out = alice.ok(&["invite", "c", &carol_key, "--level", "read"]);
    let token = out.lines().last().unwrap().to_owned();
    assert!(Invitation::is_token(&token), "{out}");
    assert_eq!(Invitation::from_token(&token, &[]).unwrap().capsule, CapsuleId::from_hex(&id).unwrap());

    // The same capsule and replica, but another creator: whoever altered the token (or the
    // replica's metadata) is caught before anything is kept.
    let forged = Invitation { creator: WriterId::from_bytes([1; 32]), ..Invitation::from_token(&token, &[]).unwrap() };
    let refused = carol.run(&["join", &forged.token()]);
    assert_eq!(refused.status.code(), Some(6), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("as the invitation says"), "{refused:?}");
    assert!(carol.run(&["members", &id]).status.code() == Some(3), "nothing was kept");

    // `mount TOKEN DIR` joins (headers only, as `mount URL#ID`) and reads.
    let Some(m) = Mounted::new(&carol, &token, &[]) else { return };
    assert_eq!(fs::read(m.path("hello.txt")).unwrap(), b"welcome, carol");
    // A reader's mount pulls in the background too: alice's next file appears in it.
    {
        let Some(a) = Mounted::new(&alice, "c", &[]) else { return };
        write_fsynced(&a.path("news.txt"), b"pushed by alice's mount");
        super::background::eventually("carol's mount showed alice's new file", || {
            fs::read(m.path("news.txt")).is_ok_and(|c| c == b"pushed by alice's mount")
        });
    }
    drop(m);
    let members = carol.ok(&["members", &id]);
    assert!(members.contains(&format!("{carol_key} read granted by ")), "{members}");

    // A sealed token shows nothing of the capsule or its replicas, and opens for carol alone.
    let sealed = alice.ok(&["invite", "c", &carol_key, "--level", "read", "--encrypt"]);
    let sealed = sealed.lines().last().unwrap();
    assert!(Invitation::is_token(sealed) && !sealed.contains(&id) && !sealed.contains("127.0.0.1"), "{sealed}");
    let eve = Home::default();
    eve.ok(&["key", "new"]);
    let refused = eve.run(&["join", sealed]);
    assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("sealed for another key"), "{refused:?}");
    let carol_laptop = super::replicas::same_user(&carol);
    assert_eq!(carol_laptop.ok(&["join", sealed]).lines().last(), Some(id.as_str()));
}

#[test]
fn an_invitation_made_while_the_capsule_is_mounted_goes_through_the_mount() {
    let server = Server::start();
    let alice = Home::default();
    alice.ok(&["create", "c"]);
    alice.ok(&["replica", "add", "c", &server.url()]);
    let carol = Home::default();
    let carol_key = new_key(&carol);
    let Some(m) = Mounted::new(&alice, "c", &[]) else { return };
    write_fsynced(&m.path("hello.txt"), b"written in a mount that stays up");
    // The mount holds the store: the grant is appended by its daemon, and the invitation's
    // push reads the store beside it.
    let out = alice.ok(&["invite", "c", &carol_key, "--level", "read"]);
    let token = out.lines().last().unwrap().to_owned();
    let members = alice.ok(&["members", "c"]);
    assert!(members.contains(&format!("{carol_key} read granted by")), "{members}");
    // The mount goes on writing on top of the grant.
    write_fsynced(&m.path("later.txt"), b"after the grant");
    let dir = tempfile::tempdir().unwrap();
    carol.ok(&["mount", &token, dir.path().to_str().unwrap()]);
    let hello = fs::read(dir.path().join("hello.txt"));
    carol.ok(&["umount", dir.path().to_str().unwrap()]);
    assert_eq!(hello.unwrap(), b"written in a mount that stays up");
    // A change the rights do not allow is refused with a reason, through the mount too.
    let alice_key = alice.ok(&["key", "show"]).trim().to_owned();
    let refused = alice.run(&["revoke", "c", &alice_key]);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("stays its superadmin"), "{refused:?}");
    drop(m);
    assert!(
        !alice
            .path()
            .join("mounts")
            .read_dir()
            .unwrap()
            .any(|e| { e.unwrap().path().extension().is_some_and(|x| x == "sock") }),
        "the request socket is removed at unmount"
    );
}

/// A new identity in `home`: its public key, as `capsulefs key show` prints it.
fn new_key(home: &Home) -> String {
    home.ok(&["key", "new"]);
    home.ok(&["key", "show"]).trim().to_owned()
}

/// One line of `capsulefs members`, for `key`.
fn member_line(home: &Home, key: &str) -> Option<String> {
    home.ok(&["members", "c"]).lines().find(|l| l.starts_with(key)).map(str::to_owned)
}

#[test]
fn three_people_share_a_capsule_and_a_revocation_locks_one_out_of_what_follows() {
    let (server, second) = (Server::start(), Server::start());
    let (alice, bob, carol) = (Home::default(), Home::default(), Home::default());
    alice.ok(&["create", "c"]);
    alice.ok(&["replica", "add", "c", &server.url()]);
    alice.ok(&["replica", "add", "c", &second.url()]);
    let (bob_key, carol_key) = (new_key(&bob), new_key(&carol));
    let Some(a) = Mounted::new(&alice, "c", &[]) else { return };
    write_fsynced(&a.path("plan.txt"), b"alice's plan");
    // Invitations go through alice's mount, which holds the store.
    let bob_token = last(&alice.ok(&["invite", "c", &bob_key, "--level", "write"]));
    let carol_token = last(&alice.ok(&["invite", "c", &carol_key, "--level", "read"]));
    assert!(member_line(&alice, &bob_key).unwrap().starts_with(&format!("{bob_key} write granted by")));
    bob.ok(&["join", &bob_token, "--name", "c"]);
    carol.ok(&["join", &carol_token, "--name", "c"]);

    // Bob writes; his mount pushes, alice's pulls and shows it.
    let Some(b) = Mounted::new(&bob, "c", &[]) else { return };
    assert_eq!(fs::read(b.path("plan.txt")).unwrap(), b"alice's plan");
    write_fsynced(&b.path("bob.txt"), b"bob's notes");
    eventually("alice's mount shows bob's file", || fs::read(a.path("bob.txt")).is_ok_and(|c| c == b"bob's notes"));

    // Carol reads bob's file; she writes nothing, in a mount or with `append`.
    carol.ok(&["pull", "c"]);
    let note = carol.file("note", b"carol was here");
    let refused = carol.run(&["append", "c", note.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("did not hold the write level"), "{refused:?}");
    // Her mount stays up, syncing, through what follows.
    let Some(c) = Mounted::new(&carol, "c", &[]) else { return };
    assert_eq!(fs::read(c.path("bob.txt")).unwrap(), b"bob's notes");
    let err = fs::write(c.path("carol.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    // Alice removes carol: a new key generation, taken by both live mounts.
    alice.ok(&["revoke", "c", &carol_key]);
    assert!(member_line(&alice, &carol_key).is_none());
    let status = |m: &Mounted| fs::read_to_string(m.path(".capsule/status")).unwrap();
    eventually("alice's mount seals with generation 2", || status(&a).contains("content_key: generation 2 held"));
    write_fsynced(&a.path("after.txt"), b"not for carol");
    let head_line = status(&a).lines().find_map(|l| l.strip_prefix("head: ").map(str::to_owned)).unwrap();
    eventually("bob's mount reads what alice wrote after the rotation", || {
        fs::read(b.path("after.txt")).is_ok_and(|c| c == b"not for carol")
    });
    assert!(status(&b).contains("content_key: generation 2 held, newest 2"), "{}", status(&b));
    write_fsynced(&b.path("bob2.txt"), b"bob after the rotation");
    eventually("alice's mount reads bob's newer file", || {
        fs::read(a.path("bob2.txt")).is_ok_and(|c| c == b"bob after the rotation")
    });

    // Carol's live mount stops at what she holds the key for, and says so.
    eventually("carol's mount raises the alarm", || {
        status(&c).contains("ALARM: the capsule's newer records are sealed")
    });
    let log = || fs::read_to_string(carol.path().join("logs/mount-c.log")).unwrap();
    eventually("carol's mount meets the new generation", || {
        log().contains("sealed under generation 2 of the content key")
    });
    assert!(log().contains("was removed from capsule"), "{}", log());
    assert!(!c.path("after.txt").exists());
    assert_eq!(fs::read(c.path("bob.txt")).unwrap(), b"bob's notes");
    drop(c);

    // Carol still reads everything from before, and nothing after: her client says why.
    carol.ok(&["pull", "c"]);
    let members = carol.ok(&["members", "c"]);
    assert!(!members.contains(&carol_key), "{members}");
    {
        let Some(c) = Mounted::new(&carol, "c", &["--no-sync"]) else { return };
        assert_eq!(fs::read(c.path("plan.txt")).unwrap(), b"alice's plan");
        assert_eq!(fs::read(c.path("bob.txt")).unwrap(), b"bob's notes");
        // Her mount shows the newest state she holds the key for; a view of a later commit
        // is refused.
        assert!(!c.path("after.txt").exists());
        let later = c.path(&format!(".capsule/history/{head_line}/after.txt"));
        let err = fs::read(later).map(|_| ()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
        assert!(status(&c).contains("ALARM: the capsule's newer records are sealed"), "{}", status(&c));
    }
    let log = fs::read_to_string(carol.path().join("logs/mount-c.log")).unwrap();
    assert!(log.contains("sealed under generation 2 of the content key"), "{log}");

    // Bob is removed while offline: what he writes after the cut-off is refused by both
    // replicas alike, and reported; what he wrote before stays.
    drop(b);
    let bob_revoked = alice.ok(&["revoke", "c", &bob_key]).trim().to_owned();
    for url in [server.url(), second.url()] {
        eventually("the revocation reaches the replica", || {
            carol.ok(&["pull", "c", &url]);
            carol.ok(&["members", "c"]).lines().all(|l| !l.starts_with(&bob_key))
        });
    }
    let late = bob.file("late", b"written after the cut-off");
    bob.ok(&["append", "c", "--sign", late.to_str().unwrap()]);
    for replica in [&server, &second] {
        let pushed = bob.run(&["push", "c", &replica.url()]);
        assert!(!pushed.status.success(), "{pushed:?}");
        let said = String::from_utf8_lossy(&pushed.stderr);
        assert!(
            said.contains("past the cut-off of their revocation in rec:") && said.contains(&bob_revoked[..12]),
            "{said}"
        );
        assert!(replica.metrics().contains("capsulefs_rejected_total{reason=\"revoked_writer\"}"));
    }
    assert!(bob.ok(&["verify", "c"]).starts_with("ok: "), "bob's own copy keeps his records");
    drop(a);
}

fn last(out: &str) -> String {
    out.lines().last().unwrap_or_default().to_owned()
}

#[test]
fn a_revocation_made_through_a_mount_without_replicas_rotates_its_key_at_once() {
    let alice = Home::default();
    alice.ok(&["create", "c"]);
    let carol = Home::default();
    let carol_key = new_key(&carol);
    alice.ok(&["grant", "c", &carol_key, "--level", "read"]);
    {
        let Some(m) = Mounted::new(&alice, "c", &["--no-sync"]) else { return };
        write_fsynced(&m.path("before.txt"), b"generation 1");
        let status = || fs::read_to_string(m.path(".capsule/status")).unwrap();
        assert!(status().contains("content_key: generation 1 held, newest 1"), "{}", status());
        alice.ok(&["revoke", "c", &carol_key]);
        assert!(status().contains("content_key: generation 2 held, newest 2"), "{}", status());
        write_fsynced(&m.path("after.txt"), b"generation 2");
    }
    // Both generations open after a remount.
    let Some(m) = Mounted::new(&alice, "c", &["--read-only"]) else { return };
    assert_eq!(fs::read(m.path("before.txt")).unwrap(), b"generation 1");
    assert_eq!(fs::read(m.path("after.txt")).unwrap(), b"generation 2");
}

#[test]
fn a_writer_removed_while_mounted_gets_a_read_only_mount() {
    let server = Server::start();
    let alice = Home::default();
    alice.ok(&["create", "c"]);
    alice.ok(&["replica", "add", "c", &server.url()]);
    let bob = Home::default();
    let bob_key = new_key(&bob);
    let token = last(&alice.ok(&["invite", "c", &bob_key, "--level", "write"]));
    bob.ok(&["join", &token, "--name", "c"]);
    let Some(b) = Mounted::new(&bob, "c", &[]) else { return };
    write_fsynced(&b.path("mine.txt"), b"while a writer");
    alice.ok(&["revoke", "c", &bob_key]);
    alice.ok(&["push", "c"]);
    let status = || fs::read_to_string(b.path(".capsule/status")).unwrap();
    eventually("bob's mount turns read-only", || status().contains("mode: read-only"));
    let err = fs::write(b.path("later.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(fs::read(b.path("mine.txt")).unwrap(), b"while a writer");
    let log = fs::read_to_string(bob.path().join("logs/mount-c.log")).unwrap();
    assert!(log.contains("no longer holds the write level"), "{log}");
}
