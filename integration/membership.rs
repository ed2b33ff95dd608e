//! Membership: read access given to another person's key by the capsule's creator, carried
//! by a replica like any record.

use std::fs;

use super::replicas::Server;
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
    carol.ok(&["key", "new"]);
    let carol_key = carol.ok(&["key", "show"]).trim().to_owned();
    assert_eq!(carol_key.len(), 64, "{carol_key}");

    // Before the grant carol's copy holds every record, and no key for her.
    carol.ok(&["clone", &format!("{}#{id}", server.url())]);
    let dir = tempfile::tempdir().unwrap();
    let refused = carol.run(&["mount", "c", dir.path().to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is this identity a member"), "{refused:?}");

    // Only read can be granted so far; writing rights come from the metadata.
    let write = alice.run(&["grant", "c", &carol_key, "--level", "write"]);
    assert_eq!(write.status.code(), Some(5), "{write:?}");
    assert!(String::from_utf8_lossy(&write.stderr).contains("only read can be granted"), "{write:?}");
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
    carol.ok(&["key", "new"]);
    let carol_key = carol.ok(&["key", "show"]).trim().to_owned();
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
    carol.ok(&["key", "new"]);
    let carol_key = carol.ok(&["key", "show"]).trim().to_owned();
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
    // A request the mount does not carry out is refused with a reason.
    let refused = alice.run(&["grant", "c", &carol_key, "--level", "admin"]);
    assert!(!refused.status.success(), "{refused:?}");
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
