//! Before replication: every file type, POSIX name limits, a mount that opens from the heads,
//! read commands beside a mount, history in commit order, and trust state nobody can forge.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::Arc;

use capsulefs::crypto::keys::KeyFolder;
use capsulefs::record::codec::FORMAT_VERSION;
use capsulefs::record::{
    DeviceId, KeyGen, MerklePath, Record, RecordHash, RecordHeader, RecordKind, Seq, SubRecord, merkle,
};
use capsulefs::store::rocks::RocksKv;
use capsulefs::store::{Batch, Cf, Durability, Kv};

use super::{Home, Mounted, last_line, sh, write_fsynced};

fn errno(r: std::io::Result<impl std::fmt::Debug>) -> i32 {
    r.expect_err("the operation must fail").raw_os_error().expect("an OS error")
}

fn mknod(path: &std::path::Path, mode: libc::mode_t, dev: libc::dev_t) {
    let status = Command::new("mknod")
        .arg(path)
        .args(match mode {
            libc::S_IFCHR => vec!["c".to_owned(), libc::major(dev).to_string(), libc::minor(dev).to_string()],
            libc::S_IFBLK => vec!["b".to_owned(), libc::major(dev).to_string(), libc::minor(dev).to_string()],
            _ => vec!["p".to_owned()],
        })
        .status()
        .unwrap();
    assert!(status.success(), "mknod {}", path.display());
}

#[test]
fn fifos_sockets_and_devices_are_stored_and_behave_as_on_a_local_disk() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let first_commit_count;
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        // A fifo between two processes: the kernel carries the bytes.
        mknod(&m.path("pipe"), libc::S_IFIFO, 0);
        assert!(fs::metadata(m.path("pipe")).unwrap().file_type().is_fifo());
        let writer = Command::new("sh")
            .arg("-c")
            .arg(format!("echo through the pipe > {}", m.path("pipe").display()))
            .spawn()
            .unwrap();
        let mut got = String::new();
        fs::File::open(m.path("pipe")).unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, "through the pipe\n");
        assert!(writer.wait_with_output().unwrap().status.success());
        // No reader: a non-blocking open for writing is ENXIO.
        let nonblocking = fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(m.path("pipe"));
        assert_eq!(errno(nonblocking), libc::ENXIO);

        // A unix socket server and client inside the mount.
        let listener = UnixListener::bind(m.path("sock")).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(&buf.map(|b| b.to_ascii_uppercase())).unwrap();
        });
        let mut client = UnixStream::connect(m.path("sock")).unwrap();
        client.write_all(b"hello").unwrap();
        let mut answer = [0u8; 5];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"HELLO");
        server.join().unwrap();
        assert!(fs::metadata(m.path("sock")).unwrap().file_type().is_socket());
        assert_eq!(errno(fs::File::open(m.path("sock"))), libc::ENXIO);

        // Device nodes (we are root): type and st_rdev kept.
        mknod(&m.path("null"), libc::S_IFCHR, libc::makedev(1, 3));
        mknod(&m.path("disk"), libc::S_IFBLK, libc::makedev(7, 0));
        assert_eq!(fs::metadata(m.path("null")).unwrap().rdev(), libc::makedev(1, 3));
        assert!(fs::metadata(m.path("disk")).unwrap().file_type().is_block_device());

        // Every name operation works on them as on a regular file.
        sh(&format!("chmod 600 {p} && chown 12:34 {p} && touch -d @1000000000 {p}", p = m.path("pipe").display()));
        let meta = fs::symlink_metadata(m.path("pipe")).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.mtime()), (0o600, 12, 34, 1_000_000_000));
        fs::hard_link(m.path("null"), m.path("null2")).unwrap();
        assert_eq!(fs::metadata(m.path("null")).unwrap().nlink(), 2);
        fs::rename(m.path("null2"), m.path("zero")).unwrap();
        fs::remove_file(m.path("zero")).unwrap();
        for name in ["pipe", "sock", "null", "disk"] {
            let exclusive = fs::OpenOptions::new().write(true).create_new(true).open(m.path(name));
            assert_eq!(errno(exclusive), libc::EEXIST, "{name}");
            assert_eq!(errno(fs::create_dir(m.path(name))), libc::EEXIST, "{name}");
            assert_eq!(errno(std::os::unix::fs::symlink("x", m.path(name))), libc::EEXIST, "{name}");
            fs::write(m.path("plain"), b"p").unwrap();
            assert_eq!(errno(fs::hard_link(m.path("plain"), m.path(name))), libc::EEXIST, "{name}");
        }
        first_commit_count = fs::read_dir(m.path(".capsule/history")).unwrap().count();
    }
    // They survive a remount and appear in history.
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    let kinds = |p: &std::path::Path| {
        let t = fs::symlink_metadata(p).unwrap().file_type();
        (t.is_fifo(), t.is_socket(), t.is_char_device(), t.is_block_device())
    };
    assert_eq!(kinds(&m.path("pipe")), (true, false, false, false));
    assert_eq!(kinds(&m.path("sock")), (false, true, false, false));
    assert_eq!(kinds(&m.path("null")), (false, false, true, false));
    assert_eq!(fs::metadata(m.path("disk")).unwrap().rdev(), libc::makedev(7, 0));
    let mut history: Vec<_> = fs::read_dir(m.path(".capsule/history")).unwrap().map(|e| e.unwrap().path()).collect();
    history.sort();
    assert!(history.len() >= first_commit_count);
    let newest = history.last().unwrap();
    assert_eq!(kinds(&newest.join("null")), (false, false, true, false));
    assert_eq!(fs::symlink_metadata(newest.join("null")).unwrap().rdev(), libc::makedev(1, 3));
}

#[test]
fn names_longer_than_255_bytes_are_enametoolong_everywhere() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    let long = "n".repeat(256);
    let longest = "n".repeat(255);
    fs::write(m.path(&longest), b"fits").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("f"), b"f").unwrap();
    let too_long = m.path(&long);
    assert_eq!(errno(fs::write(&too_long, b"x")), libc::ENAMETOOLONG, "create");
    assert_eq!(errno(fs::create_dir(&too_long)), libc::ENAMETOOLONG, "mkdir");
    let mknod = Command::new("mknod").arg(&too_long).arg("p").output().unwrap();
    assert!(String::from_utf8_lossy(&mknod.stderr).contains("File name too long"), "mknod");
    assert_eq!(errno(std::os::unix::fs::symlink("f", &too_long)), libc::ENAMETOOLONG, "symlink");
    assert_eq!(errno(fs::hard_link(m.path("f"), &too_long)), libc::ENAMETOOLONG, "link");
    assert_eq!(errno(fs::rename(m.path("f"), &too_long)), libc::ENAMETOOLONG, "rename to");
    assert_eq!(errno(fs::rename(&too_long, m.path("g"))), libc::ENAMETOOLONG, "rename from");
    assert_eq!(errno(fs::remove_file(&too_long)), libc::ENAMETOOLONG, "unlink");
    assert_eq!(errno(fs::remove_dir(&too_long)), libc::ENAMETOOLONG, "rmdir");
    assert_eq!(errno(fs::metadata(&too_long)), libc::ENAMETOOLONG, "lookup");
    let truncate = fs::OpenOptions::new().write(true).open(&too_long).map(|f| f.set_len(0));
    assert_eq!(errno(truncate), libc::ENAMETOOLONG, "truncate by path");
    assert_eq!(errno(fs::write(m.path("d").join(&long), b"x")), libc::ENAMETOOLONG, "in a subfolder");
    // Symlink targets: 4095 bytes is the longest a local disk takes.
    let target = "t/".repeat(2047) + "t";
    std::os::unix::fs::symlink(&target, m.path("longlink")).unwrap();
    assert_eq!(fs::read_link(m.path("longlink")).unwrap().as_os_str().len(), 4095);
    assert_eq!(errno(std::os::unix::fs::symlink(target + "t", m.path("toolong"))), libc::ENAMETOOLONG);
    assert_eq!(fs::read(m.path(&longest)).unwrap(), b"fits");
}

#[test]
fn raw_appends_never_break_a_mount() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let raw = home.file("raw", b"appended bytes, not a superblock");
    home.ok(&["append", "c", raw.to_str().unwrap()]);
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        assert_eq!(fs::read_dir(&m.dir).unwrap().count(), 0);
        write_fsynced(&m.path("file"), b"kept");
    }
    home.ok(&["append", "c", "--sign", raw.to_str().unwrap()]);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    assert_eq!(fs::read(m.path("file")).unwrap(), b"kept");
    let log = home.ok(&["log", "c"]);
    assert!(log.lines().any(|l| l.ends_with(" fs-commit")), "{log}");
}

#[test]
fn read_commands_work_while_mounted_and_writes_name_the_mount() {
    let home = Home::default();
    let id = home.ok(&["create", "c"]);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    write_fsynced(&m.path("a"), b"first");
    fs::write(m.path("b"), b"second, committed by the close").unwrap();
    // A close's commit comes a few milliseconds later; .capsule/status shows it done.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::read_to_string(m.path(".capsule/status")).unwrap().contains("uncommitted_changes: yes") {
        assert!(std::time::Instant::now() < deadline, "the close was never committed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let head = fs::read_to_string(m.path(".capsule/status")).unwrap();
    let head = head.lines().find_map(|l| l.strip_prefix("head: ")).unwrap().to_owned();
    let log = home.ok(&["log", "c"]);
    assert!(log.starts_with(&head), "log shows the newest commit:\n{log}\nhead {head}");
    let verify = home.run(&["verify", id.trim()]);
    assert!(String::from_utf8_lossy(&verify.stdout).starts_with("ok: "), "{verify:?}");
    let keystore = log.lines().last().unwrap().split(' ').next().unwrap().to_owned();
    let cat = home.run(&["cat", "c", &format!("{keystore}:0")]);
    assert!(!cat.stdout.is_empty());
    // Nothing was altered, so nothing may say so.
    for out in [&verify, &cat] {
        assert!(!String::from_utf8_lossy(&out.stderr).contains("WARN"), "a false alarm: {out:?}");
    }
    home.ok(&["prove", "c", &head]);
    let out = home.run(&["append", "c", home.file("x", b"x").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("mounted at {}", m.dir.display())) && err.contains("capsulefs umount"), "{err}");
    // A read-only mount beside the writable one.
    let ro_dir = home.path().join("ro");
    fs::create_dir(&ro_dir).unwrap();
    home.ok(&["mount", "c", ro_dir.to_str().unwrap(), "--read-only"]);
    let seen = fs::read(ro_dir.join("a"));
    home.ok(&["umount", ro_dir.to_str().unwrap()]);
    assert_eq!(seen.unwrap(), b"first");
}

#[test]
fn history_lists_commits_oldest_first_by_name() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    for i in 0..3 {
        write_fsynced(&m.path("f"), format!("version {i}").as_bytes());
    }
    let out = Command::new("ls").arg(m.path(".capsule/history")).output().unwrap();
    let names: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for (i, name) in names.iter().enumerate() {
        assert!(name.starts_with(&format!("{:06}-", i + 1)), "{name}");
        let listed = m.path(".capsule/history").join(name).join("f");
        assert_eq!(fs::read_to_string(listed).unwrap(), format!("version {i}"));
        // The hash part alone, or a prefix of it, still finds the commit.
        let by_prefix = m.path(".capsule/history").join(&name[7..15]).join("f");
        assert_eq!(fs::read_to_string(by_prefix).unwrap(), format!("version {i}"));
    }
}

/// Whoever can write a store folder, but not read the key files, plants a record of a legitimate
/// writer's with a proven mark, an attestation and a sequence entry: none of it is believed.
#[test]
fn forged_trust_state_in_a_real_store_is_refused() {
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let f = home.file("a", b"genuine");
    let genuine = last_line(&home.ok(&["append", "c", "--sign", f.to_str().unwrap()]));
    home.ok(&["cat", "c", &format!("{genuine}:0")]); // proven, and marked in the store
    let owner = KeyFolder::load(&home.path().join("keys")).unwrap().identities()[0].writer();
    let kv = Arc::new(RocksKv::open(&home.store_path(&id), false).unwrap());
    let genuine_hash = RecordHash::from_hex(&genuine).unwrap();
    let valid_mark = kv.get(Cf::Proven, genuine_hash.as_bytes()).unwrap().expect("a persisted proven mark");
    let payload = b"planted content key";
    let header = RecordHeader {
        version: FORMAT_VERSION,
        capsule: capsulefs::record::CapsuleId::from_hex(&id).unwrap(),
        parents: vec![genuine_hash],
        writer: owner,
        device: DeviceId([6; 16]),
        seq: Seq(9),
        time_ms: 1,
        kind: RecordKind::Membership,
        key_gen: KeyGen(0),
        sub_count: 1,
        merkle_root: merkle::build(&[merkle::leaf_hash(payload)]).0,
    };
    let forged = header.hash();
    let mut batch = Batch::default();
    batch.put(Cf::Records, forged.as_bytes().to_vec(), Record { header, signature: None }.encode());
    let sub = SubRecord { data: payload.to_vec(), path: MerklePath(Vec::new()) };
    batch.put(Cf::Subs, [&forged.as_bytes()[..], &0u32.to_be_bytes()].concat(), sub.encode());
    batch.put(Cf::Proven, forged.as_bytes().to_vec(), valid_mark);
    batch.put(Cf::Attest, forged.as_bytes().to_vec(), vec![7; 32]);
    batch.put(Cf::Order, 1_000_000u64.to_be_bytes().to_vec(), forged.as_bytes().to_vec());
    kv.write(batch, Durability::Durable).unwrap();
    drop(kv);
    let out = home.run(&["cat", "c", &format!("{forged}:0")]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "nothing forged is served");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no signed descendant"));
    assert_eq!(home.run(&["verify", "c"]).status.code(), Some(1));
}
