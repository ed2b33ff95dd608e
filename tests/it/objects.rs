//! The folder replica (`replica::objects` over `replica::folder`): two devices pushing through
//! one folder at once, and objects altered in the folder.

use std::sync::Arc;

use capsulefs::capsule::Capsule;
use capsulefs::crypto::keys::Identity;
use capsulefs::record::{RecordHash, SubIdx};
use capsulefs::replica::Replica;
use capsulefs::replica::folder::Folder;
use capsulefs::replica::objects::{ObjectReplica, Pusher};
use capsulefs::replica::prefetch::SubRecordSource;
use capsulefs::store::Kv;
use capsulefs::store::mem::MemKv;
use capsulefs::sync::Take;
use capsulefs::sync::transfer::{pull, pull_taking, push};

use super::{fixture, signed};

fn folder(dir: &std::path::Path, cap: &Capsule, pusher: Option<(&Identity, u8)>) -> ObjectReplica<Folder> {
    let folder = Folder::from_url(&format!("file://{}", dir.display())).unwrap();
    let pusher =
        pusher.map(|(identity, device)| Pusher { identity: identity.clone(), device: [device; 16], turn: None });
    ObjectReplica::new(folder, cap.id(), pusher)
}

fn copy_of(cap: &Capsule, me: &Identity) -> Capsule {
    Capsule::adopt(Arc::new(MemKv::new()) as Arc<dyn Kv>, cap.id(), &cap.metadata_bytes(), vec![me.clone()]).unwrap()
}

#[test]
fn two_devices_pushing_at_once_never_lose_each_others_records() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    push(&f.cap, &folder(dir.path(), &f.cap, Some((&f.owner, 1))), &()).unwrap();
    let desktop = copy_of(&f.cap, &f.other);
    pull(&desktop, &folder(dir.path(), &desktop, None), &()).unwrap();
    // Each device writes and pushes twenty times, both at once, each to its own head object.
    let path = dir.path();
    std::thread::scope(|s| {
        for (cap, me, device) in [(&f.cap, &f.owner, 1u8), (&desktop, &f.other, 2u8)] {
            s.spawn(move || {
                let replica = folder(path, cap, Some((me, device)));
                for i in 0..20u32 {
                    cap.append(me, &[&i.to_le_bytes()], signed()).unwrap();
                    push(cap, &replica, &()).unwrap();
                }
            });
        }
    });
    // A reader that knows nothing sees both devices' work: the union of their statements.
    let reader = copy_of(&f.cap, &f.owner);
    let got = pull(&reader, &folder(dir.path(), &reader, None), &()).unwrap();
    let mut expected: Vec<RecordHash> = f.cap.heads().unwrap();
    expected.extend(desktop.heads().unwrap());
    expected.sort();
    expected.dedup();
    assert_eq!(reader.heads().unwrap(), expected);
    assert_eq!(got.records as u64, reader.audit().unwrap().records);
    assert_eq!(reader.audit().unwrap().records, f.cap.audit().unwrap().records + 20);
}

#[test]
fn two_pushes_of_one_device_at_once_take_turns_and_lose_nothing() {
    // A mount's background push and `capsulefs push` in one home: one device, two processes,
    // each with its own view of the index, sharing the home's turn file. Both read the index,
    // then each writes a segment: the second must see the first's, not write the same one.
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let turn = dir.path().join("device.lock");
    let replica = || {
        let folder = Folder::from_url(&format!("file://{}", dir.path().join("replica").display())).unwrap();
        let pusher = Pusher { identity: f.owner.clone(), device: [1; 16], turn: Some(turn.clone()) };
        ObjectReplica::new(folder, f.cap.id(), Some(pusher))
    };
    push(&f.cap, &replica(), &()).unwrap();
    let (mount, command) = (replica(), replica());
    mount.heads().unwrap();
    command.heads().unwrap();
    for pusher in [&mount, &command] {
        let h = f.cap.append(&f.owner, &[&pusher.describe().len().to_le_bytes()[..1]], signed()).unwrap();
        assert_eq!(pusher.put(f.cap.fetch(&[h]).unwrap(), None).unwrap(), 1);
    }
    let reader = copy_of(&f.cap, &f.owner);
    pull(&reader, &replica(), &()).unwrap();
    assert_eq!(reader.heads().unwrap(), f.cap.heads().unwrap());
    assert_eq!(reader.audit().unwrap().records, f.cap.audit().unwrap().records);
}

#[test]
fn an_altered_object_is_refused_and_a_forged_statement_ignored() {
    let f = fixture();
    let h = f.cap.append(&f.owner, &[b"kept whole"], signed()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    push(&f.cap, &folder(dir.path(), &f.cap, Some((&f.owner, 1))), &()).unwrap();
    let root = dir.path().join(f.cap.id().to_hex());
    // A head object nobody signed: ignored, the valid one still read.
    std::fs::write(root.join("heads").join("ab".repeat(16)), b"forged statement").unwrap();
    let reader = copy_of(&f.cap, &f.owner);
    pull(&reader, &folder(dir.path(), &reader, None), &()).unwrap();
    assert_eq!(reader.heads().unwrap(), f.cap.heads().unwrap());
    // One byte of a record's payload altered in the folder: refused, nothing stored.
    let object = root.join("records").join(h.to_hex());
    let mut bytes = std::fs::read(&object).unwrap();
    let at = bytes.windows(10).position(|w| w == b"kept whole").unwrap();
    bytes[at] ^= 1;
    std::fs::write(&object, bytes).unwrap();
    let fresh = copy_of(&f.cap, &f.owner);
    let refused = pull(&fresh, &folder(dir.path(), &fresh, None), &());
    assert!(matches!(refused, Err(capsulefs::Error::Verify(_))), "{refused:?}");
    assert!(!fresh.store().has_record(&h).unwrap());
    // A sparse copy takes the intact header; the sub-record, read alone with its Merkle path
    // by one ranged read, fails its proof and is not kept.
    let sparse = copy_of(&f.cap, &f.owner);
    pull_taking(&sparse, &folder(dir.path(), &sparse, None), Take::Headers, &()).unwrap();
    sparse.fill_from(SubRecordSource::new(Arc::new(folder(dir.path(), &sparse, None))));
    assert!(matches!(sparse.read_sub_record(h, SubIdx(0)), Err(capsulefs::Error::Verify(_))));
    assert!(sparse.store().sub_record_bytes(&h, SubIdx(0)).unwrap().is_none());
    // Another genuine record's object put under this record's name (swapped): refused by name.
    let later = f.cap.append(&f.owner, &[b"a later record"], signed()).unwrap();
    push(&f.cap, &folder(dir.path(), &f.cap, Some((&f.owner, 1))), &()).unwrap();
    std::fs::copy(root.join("records").join(later.to_hex()), &object).unwrap();
    let fresh = copy_of(&f.cap, &f.owner);
    let refused = pull(&fresh, &folder(dir.path(), &fresh, None), &());
    assert!(matches!(&refused, Err(capsulefs::Error::Replica(m)) if m.contains("another record")), "{refused:?}");
    assert!(!fresh.store().has_record(&h).unwrap());
}

#[test]
fn a_folder_holds_no_traps_for_its_readers_or_writers() {
    use capsulefs::replica::folder::Folder;
    use capsulefs::replica::objects::Objects;
    let root = tempfile::tempdir().unwrap();
    let folder = Folder::from_url(&format!("file://{}", root.path().display())).unwrap();
    std::fs::create_dir_all(root.path().join("c/records")).unwrap();
    // A record object that is a symlink to an endless device, or a fifo, is refused at once.
    std::os::unix::fs::symlink("/dev/zero", root.path().join("c/records/zero")).unwrap();
    assert!(folder.get("c/records/zero").is_err());
    let fifo = root.path().join("c/records/fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    assert!(folder.get("c/records/fifo").is_err(), "a fifo is no object, and reading it does not hang");
    // A folder of the layout planted as a symlink elsewhere is not written through.
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), root.path().join("c/index")).unwrap();
    assert!(folder.put("c/index/dev/0", b"segment").is_err());
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    // A planted symlink at an object's own name is replaced, not followed.
    let target = elsewhere.path().join("target");
    std::fs::write(&target, b"keep").unwrap();
    std::os::unix::fs::symlink(&target, root.path().join("c/records/obj")).unwrap();
    folder.put("c/records/obj", b"object").unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert_eq!(folder.get("c/records/obj").unwrap().unwrap(), b"object");
}
