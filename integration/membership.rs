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
}
