//! Real mounts on /dev/fuse: tools inside the mount, persistence, history views, kill -9.
//! Each test unmounts what it mounted and ends only the daemon it started.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use super::{Home, Mounted, renameat2, sh, write_fsynced, xattr};

#[test]
fn a_copied_tree_survives_unmount_and_verifies() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        sh(&format!("cp -a {} {}", src.display(), m.path("copy").display()));
        sh(&format!("diff -r {} {}", src.display(), m.path("copy").display()));
    }
    home.ok(&["verify", "c"]);
    // Closes committed unsigned; the unmount signed the end of the log.
    let newest = home.ok(&["log", "c"]).lines().next().unwrap().to_owned();
    assert!(newest.split(' ').any(|w| w == "signed"), "{newest}");
    // With the caches at their smallest every read is proven and opened afresh.
    let Some(m) = Mounted::new(&home, "c", &["--cache-mib", "0", "--proof-cache-records", "1"]) else { return };
    sh(&format!("diff -r {} {}", src.display(), m.path("copy").display()));
    sh(&format!("ls -lR {} > /dev/null", m.dir.display()));
}

#[test]
fn posix_operations_behave_like_a_local_disk() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    fs::create_dir_all(m.path("a/b")).unwrap();
    fs::write(m.path("a/x"), b"x data").unwrap();
    fs::write(m.path("a/b/y"), b"y data").unwrap();
    fs::rename(m.path("a/x"), m.path("a/b/y")).unwrap();
    assert_eq!(fs::read(m.path("a/b/y")).unwrap(), b"x data");
    assert!(!m.path("a/x").exists());
    fs::hard_link(m.path("a/b/y"), m.path("a/link")).unwrap();
    assert_eq!(fs::metadata(m.path("a/link")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("b/y", m.path("a/sym")).unwrap();
    assert_eq!(fs::read_link(m.path("a/sym")).unwrap(), Path::new("b/y"));
    assert_eq!(fs::read(m.path("a/sym")).unwrap(), b"x data");
    let err = fs::remove_dir(m.path("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    // Sparse write far out, then truncate.
    let mut f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(m.path("sparse")).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(5 << 20)).unwrap();
    f.write_all(b"end").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let data = fs::read(m.path("sparse")).unwrap();
    assert_eq!(data.len(), (5 << 20) + 3);
    assert!(data[..5 << 20].iter().all(|b| *b == 0));
    fs::OpenOptions::new().write(true).open(m.path("sparse")).unwrap().set_len(10).unwrap();
    assert_eq!(fs::metadata(m.path("sparse")).unwrap().len(), 10);
    fs::set_permissions(m.path("a/b/y"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(m.path("a/b/y")).unwrap().mode() & 0o777, 0o600);
    fs::remove_file(m.path("a/link")).unwrap();
    assert_eq!(fs::metadata(m.path("a/b/y")).unwrap().nlink(), 1);
    let exists = fs::OpenOptions::new().write(true).create_new(true).open(m.path("a/b/y")).unwrap_err();
    assert_eq!(exists.raw_os_error(), Some(libc::EEXIST));
    // O_APPEND from two handles, then O_TRUNC.
    let mut a = fs::OpenOptions::new().create(true).append(true).open(m.path("log")).unwrap();
    let mut b = fs::OpenOptions::new().append(true).open(m.path("log")).unwrap();
    a.write_all(b"one ").unwrap();
    b.write_all(b"two ").unwrap();
    a.write_all(b"three").unwrap();
    assert_eq!(fs::read(m.path("log")).unwrap(), b"one two three");
    drop((a, b));
    fs::OpenOptions::new().write(true).truncate(true).open(m.path("log")).unwrap().write_all(b"new").unwrap();
    assert_eq!(fs::read(m.path("log")).unwrap(), b"new");
    // renameat2: NOREPLACE refuses an existing name; EXCHANGE swaps a file and a directory.
    fs::write(m.path("other"), b"other").unwrap();
    let refused = renameat2(&m.path("other"), &m.path("a/b/y"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EEXIST));
    renameat2(&m.path("other"), &m.path("a/b"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.path("a/b")).unwrap(), b"other");
    assert_eq!(fs::read(m.path("other/y")).unwrap(), b"x data");
    let into_itself = renameat2(&m.path("other"), &m.path("other/y"), libc::RENAME_EXCHANGE).unwrap_err();
    assert_eq!(into_itself.raw_os_error(), Some(libc::EINVAL));
}

#[test]
fn a_past_record_mounts_read_only() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        fs::write(m.path("notes"), b"first").unwrap();
    }
    // The newest record: `log` lists newest first, hash first.
    let first = home.ok(&["log", "c"]).split(' ').next().unwrap().to_owned();
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        fs::write(m.path("notes"), b"second").unwrap();
    }
    let Some(m) = Mounted::new(&home, "c", &["--at", &first]) else { return };
    assert_eq!(fs::read(m.path("notes")).unwrap(), b"first");
    let err = fs::write(m.path("notes"), b"third").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn kill_9_of_the_daemon_loses_nothing_fsynced() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let synced = {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        let mut f = fs::File::create(m.path("log.txt")).unwrap();
        let mut synced = Vec::new();
        for i in 0..200 {
            let line = format!("line {i:04} {}\n", "x".repeat(i % 50));
            f.write_all(line.as_bytes()).unwrap();
            f.sync_all().unwrap();
            synced.extend_from_slice(line.as_bytes());
        }
        // Unsynced tail: may or may not survive.
        f.write_all(b"not synced\n").unwrap();
        let pid = m.daemon_pid();
        sh(&format!("kill -9 {pid}"));
        drop(f);
        synced
        // Dropping `m` unmounts the dead daemon's mount point.
    };
    home.ok(&["verify", "c"]);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    let got = fs::read(m.path("log.txt")).unwrap();
    assert!(got.starts_with(&synced), "fsynced bytes lost: have {} of {}", got.len(), synced.len());
}

#[test]
fn a_tampered_chunk_gives_eio_for_its_file_only_and_the_log_names_the_record() {
    let home = Home::default();
    let id = home.ok(&["create", "c"]);
    let newest = {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        write_fsynced(&m.path("b"), b"bravo"); // one record
        write_fsynced(&m.path("a"), b"alpha"); // another, whose sub-record 0 is a's chunk
        xattr(&m.path("a"), "user.capsule.record")
    };
    flip_bits(&home, &id, capsulefs::store::Cf::Subs, &[sub_key(&newest, 0)]); // inside a's sealed chunk
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    let err = fs::read(m.path("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(fs::read(m.path("b")).unwrap(), b"bravo");
    let log = fs::read_to_string(home.path().join("logs/mount-c.log")).unwrap();
    assert!(log.contains(&newest[..12]) && log.contains("refusing unverified data"), "{log}");
}

#[test]
fn an_unlinked_open_file_lives_until_closed() {
    use std::io::{Read, Seek, SeekFrom};

    let home = Home::default();
    home.ok(&["create", "c"]);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    let mut f = fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(m.path("tmp")).unwrap();
    f.write_all(b"before unlink, ").unwrap();
    fs::remove_file(m.path("tmp")).unwrap();
    assert!(!m.path("tmp").exists());
    f.write_all(b"after unlink").unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    let mut back = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut back).unwrap();
    assert_eq!(back, "before unlink, after unlink");
    drop(f);
    assert_eq!(fs::read_dir(&m.dir).unwrap().count(), 0);
}

#[test]
fn umount_waits_until_the_capsule_can_be_opened_again() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    for round in 0..5 {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        fs::write(m.path(&format!("round-{round}")), b"x").unwrap();
        drop(m);
        // Right after umount returns, the store must be free for the next open.
        home.ok(&["log", "c"]);
    }
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    assert_eq!(fs::read_dir(&m.dir).unwrap().count(), 5);
}

#[test]
fn xattrs_are_stored_and_provenance_names_the_commit() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let value = {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        let f = m.path("doc");
        fs::write(&f, b"text").unwrap();
        sh(&format!("setfattr -n user.color -v blue {}", f.display()));
        fs::File::open(&f).unwrap().sync_all().unwrap();
        assert_eq!(xattr(&f, "user.color"), "blue");
        assert!(xattr(&f, "user.capsule.verified").starts_with("signed "));
        xattr(&f, "user.capsule.record")
    };
    // The named record is the newest one with changes: anything after it is a signature
    // record of just the superblock (when the close's commit came before the fsync).
    let log = home.ok(&["log", "c"]);
    let newer: Vec<&str> = log.lines().take_while(|l| !l.starts_with(&value)).collect();
    assert!(newer.len() < log.lines().count(), "{value} is not in the log:\n{log}");
    assert!(newer.iter().all(|l| l.ends_with(" signed subs=1 fs-commit")), "{log}");
}

#[test]
fn status_and_history_show_the_mount_and_its_past() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    let head = || {
        let status = fs::read_to_string(m.path(".capsule/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("head: ")).unwrap().to_owned()
    };
    let mut f = fs::File::create(m.path("notes")).unwrap();
    f.write_all(b"first").unwrap();
    f.sync_all().unwrap();
    let first = head();
    f.write_all(b" and second").unwrap();
    f.sync_all().unwrap();
    f.write_all(b"!").unwrap(); // pending until close
    let all = home.ok(&["status"]);
    assert!(all.contains(&format!("folder: {}", m.dir.display())) && all.contains("name: c"), "{all}");
    // The pending chunk is held whole: all 17 bytes of the file.
    assert!(all.contains(&format!("head: {}", head())) && all.contains("pending_bytes: 17\n"), "{all}");
    assert!(all.contains("uncommitted_changes: yes"), "{all}");
    assert!(all.contains("commits_this_mount: 2 (2 signed)") && all.contains("hit rate"), "{all}");
    assert!(home.ok(&["status", m.dir.to_str().unwrap()]).contains("mode: read-write"));
    drop(f);

    // Each commit is a read-only folder under .capsule/history, by hash or unique prefix.
    let past = m.path(&format!(".capsule/history/{first}"));
    assert_eq!(fs::read(past.join("notes")).unwrap(), b"first");
    assert_eq!(fs::read(m.path(&format!(".capsule/history/{}/notes", &first[..8]))).unwrap(), b"first");
    assert_eq!(fs::read(m.path("notes")).unwrap(), b"first and second!");
    let listed: Vec<_> = fs::read_dir(m.path(".capsule/history")).unwrap().map(|e| e.unwrap().file_name()).collect();
    // Listed oldest first by place and hash prefix; the first commit of this mount is the first.
    assert!(listed.iter().any(|n| n.to_str() == Some(&format!("000001-{}", &first[..12]))), "{listed:?}");
    assert_eq!(xattr(&past.join("notes"), "user.capsule.record"), first);
    assert_eq!(fs::write(past.join("notes"), b"x").unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert_eq!(fs::write(m.path(".capsule/status"), b"x").unwrap_err().raw_os_error(), Some(libc::EROFS));

    // Reachable by name only, and the name is taken.
    let root: Vec<_> = fs::read_dir(&m.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(root, ["notes"]);
    assert_eq!(fs::create_dir(m.path(".capsule")).unwrap_err().raw_os_error(), Some(libc::EEXIST));
    let missing = home.run(&["status", home.path().to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(3));
}

#[test]
fn the_mount_helper_takes_fstab_options() {
    if !Path::new("/dev/fuse").exists() {
        return eprintln!("skipped: no /dev/fuse");
    }
    let home = Home::default();
    home.ok(&["create", "c"]);
    // mount(8) runs /sbin/mount.fuse.capsulefs (a link to capsulefs, from `make install`) as
    // `mount.fuse.capsulefs SPEC DIR -o OPTIONS`; here the link lives in the test's folder.
    let helper = home.path().join("mount.fuse.capsulefs");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_capsulefs"), &helper).unwrap();
    let dir = home.path().join("mnt");
    fs::create_dir_all(&dir).unwrap();
    let options = format!("defaults,nofail,_netdev,x-systemd.automount,home={},nodev", home.path().display());
    let mut mount = Command::new(&helper);
    mount.arg("c").arg(&dir).args(["-n", "-o", &options, "-t", "fuse.capsulefs"]).env_remove("CAPSULEFS_HOME");
    let out = mount.output().unwrap();
    assert!(out.status.success(), "helper: {}", String::from_utf8_lossy(&out.stderr));
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts.lines().find(|l| l.contains(dir.to_str().unwrap())).expect("mounted");
    assert!(line.contains("capsulefs:c") && line.contains("nodev"), "{line}");
    fs::write(dir.join("f"), b"through the helper").unwrap();
    home.ok(&["umount", dir.to_str().unwrap()]);
    let bad = Command::new(&helper).arg("c").output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("usage: mount.fuse.capsulefs"));
}

#[test]
fn changes_left_open_are_committed_by_the_timer() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    {
        let Some(m) = Mounted::new(&home, "c", &["--commit-after", "1"]) else { return };
        // An editor that keeps the file open: no close, no fsync.
        let mut f = fs::File::create(m.path("draft")).unwrap();
        f.write_all(b"kept open").unwrap();
        let status = m.path(".capsule/status");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while fs::read_to_string(&status).unwrap().contains("uncommitted_changes: yes") {
            assert!(std::time::Instant::now() < deadline, "no timed commit within 30 s");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        sh(&format!("kill -9 {}", m.daemon_pid()));
        drop(f);
    }
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    assert_eq!(fs::read(m.path("draft")).unwrap(), b"kept open");
}

/// Closes commit without fsync and without the timer (an hour away here): each close asks
/// for a commit, made moments later and shared by the closes in between; a kill -9 after it
/// loses nothing.
#[test]
fn closed_files_are_committed_without_fsync() {
    const FILES: usize = 200;
    let home = Home::default();
    home.ok(&["create", "c"]);
    {
        let Some(m) = Mounted::new(&home, "c", &["--commit-after", "3600"]) else { return };
        for i in 0..FILES {
            fs::write(m.path(&format!("f{i}")), format!("file {i}")).unwrap();
        }
        let status = m.path(".capsule/status");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let text = loop {
            let text = fs::read_to_string(&status).unwrap();
            if text.contains("uncommitted_changes: no") {
                break text;
            }
            assert!(std::time::Instant::now() < deadline, "closed files not committed within 30 s:\n{text}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let commits: usize =
            text.split("commits_this_mount: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert!((1..=FILES).contains(&commits), "{text}");
        assert_ne!(xattr(&m.path("f0"), "user.capsule.record"), "uncommitted");
        sh(&format!("kill -9 {}", m.daemon_pid()));
    }
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    for i in 0..FILES {
        assert_eq!(fs::read_to_string(m.path(&format!("f{i}"))).unwrap(), format!("file {i}"));
    }
}

#[test]
fn a_directory_of_100k_entries_lists_and_survives_a_remount() {
    const ENTRIES: usize = 100_000;
    let home = Home::default();
    home.ok(&["create", "c"]);
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        let big = m.path("big");
        fs::create_dir(&big).unwrap();
        // Folders: 100k inodes and entries without a commit per close.
        for i in 0..ENTRIES {
            fs::create_dir(big.join(i.to_string())).unwrap();
        }
        fs::File::open(&big).unwrap().sync_all().unwrap();
        assert_eq!(fs::read_dir(&big).unwrap().count(), ENTRIES);
        assert_eq!(fs::metadata(&big).unwrap().nlink(), ENTRIES as u64 + 2);
    }
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    let big = m.path("big");
    assert!(fs::metadata(big.join("99999")).unwrap().is_dir());
    fs::remove_dir(big.join("5")).unwrap();
    let mut names: Vec<usize> =
        fs::read_dir(&big).unwrap().map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names.len(), ENTRIES - 1);
    assert!(names.binary_search(&5).is_err() && names.binary_search(&6).is_ok());
}

/// Runs shell command `cmd` as the user nobody (uid and gid 65534, no other groups).
fn as_nobody(cmd: &str) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", cmd])
        .output()
        .unwrap()
}

#[test]
fn permissions_are_checked_for_other_users() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let Some(m) = Mounted::new(&home, "c", &["-o", "allow_other"]) else { return };
    fs::set_permissions(&m.dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(m.path("private"), b"secret").unwrap();
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.path("public"), b"hello").unwrap();
    fs::set_permissions(m.path("public"), fs::Permissions::from_mode(0o644)).unwrap();
    // The mount's parent folders must let 'nobody' through to reach it.
    fs::set_permissions(home.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let public = as_nobody(&format!("cat {}", m.path("public").display()));
    assert_eq!(public.stdout, b"hello", "{}", String::from_utf8_lossy(&public.stderr));
    let private = as_nobody(&format!("cat {}", m.path("private").display()));
    assert!(!private.status.success() && String::from_utf8_lossy(&private.stderr).contains("Permission denied"));
    let write = as_nobody(&format!("echo x > {}", m.path("public").display()));
    assert!(!write.status.success(), "nobody wrote to a 0644 file of root's");
    let create = as_nobody(&format!("touch {}", m.path("new").display()));
    assert!(!create.status.success(), "nobody created a file in root's 0755 folder");
}

#[test]
fn writes_truncates_and_chowns_clear_set_id_bits_as_on_a_local_disk() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let Some(m) = Mounted::new(&home, "c", &["-o", "allow_other"]) else { return };
    fs::set_permissions(&m.dir, fs::Permissions::from_mode(0o777)).unwrap();
    fs::set_permissions(home.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mode = |name: &str| fs::metadata(m.path(name)).unwrap().permissions().mode() & 0o7777;
    let file = |name: &str, mode: u32, owner: Option<u32>| {
        fs::write(m.path(name), b"program").unwrap();
        std::os::unix::fs::chown(m.path(name), owner, owner).unwrap();
        fs::set_permissions(m.path(name), fs::Permissions::from_mode(mode)).unwrap();
    };
    let as_nobody = |cmd: &str| {
        let out = as_nobody(cmd);
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // A write by an unprivileged owner clears set-user-ID, and set-group-ID with group execute.
    file("both", 0o6775, Some(65534));
    as_nobody(&format!("echo more >> {}", m.path("both").display()));
    assert_eq!(mode("both"), 0o775);
    // Without group execute, set-group-ID is not a privilege and stays.
    file("lock", 0o2666, Some(65534));
    as_nobody(&format!("echo more >> {}", m.path("lock").display()));
    assert_eq!(mode("lock"), 0o2666);
    // A truncate by the unprivileged owner clears them too.
    file("cut", 0o4755, Some(65534));
    as_nobody(&format!("truncate -s 1 {}", m.path("cut").display()));
    assert_eq!(mode("cut"), 0o755);
    // Root (CAP_FSETID) writes and truncates without clearing them.
    file("roots", 0o6755, None);
    fs::OpenOptions::new().append(true).open(m.path("roots")).unwrap().write_all(b"more").unwrap();
    fs::OpenOptions::new().write(true).open(m.path("roots")).unwrap().set_len(2).unwrap();
    assert_eq!(mode("roots"), 0o6755);
    // A chown clears them, even by root, except on a folder.
    std::os::unix::fs::chown(m.path("roots"), Some(1), Some(1)).unwrap();
    assert_eq!(mode("roots"), 0o755);
    fs::create_dir(m.path("shared")).unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    std::os::unix::fs::chown(m.path("shared"), Some(1), Some(1)).unwrap();
    assert_eq!(mode("shared"), 0o2775);
    // What was cleared stays cleared once committed and mounted again.
    drop(m);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    let modes: Vec<u32> = ["both", "lock", "cut", "roots"]
        .iter()
        .map(|n| fs::metadata(m.path(n)).unwrap().permissions().mode() & 0o7777)
        .collect();
    assert_eq!(modes, [0o775, 0o2666, 0o755, 0o755]);
}

#[test]
fn a_file_unlinked_while_open_is_removed_after_a_crash() {
    let home = Home::default();
    let id = home.ok(&["create", "c"]);
    let marker = home.store_path(&id).with_file_name("mounted");
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        assert!(marker.exists(), "a writable mount marks its capsule");
        let mut f = fs::File::create(m.path("scratch")).unwrap();
        f.write_all(b"temporary").unwrap();
        fs::remove_file(m.path("scratch")).unwrap();
        f.sync_all().unwrap(); // commits the nameless, still open file
        sh(&format!("kill -9 {}", m.daemon_pid()));
        drop(f);
    }
    {
        let Some(_m) = Mounted::new(&home, "c", &[]) else { return };
        let log = fs::read_to_string(home.path().join("logs/mount-c.log")).unwrap();
        assert!(log.contains("removed 1 unlinked file"), "{log}");
    }
    assert!(!marker.exists(), "a clean unmount clears the mark");
    home.ok(&["verify", "c"]);
}

#[test]
fn unsigned_commits_are_signed_within_the_capsules_t_bound() {
    let home = Home::default();
    home.ok(&["create", "c", "--sign-every-secs", "1"]);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    fs::write(m.path("note"), b"closed, not fsynced").unwrap(); // one unsigned commit
    let status = m.path(".capsule/status");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = fs::read_to_string(&status).unwrap();
        if text.contains("commits_this_mount: 2 (1 signed)") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no signature within 30 s:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(m);
    // The newest record is the signed one with nothing but a superblock in it.
    let log = home.ok(&["log", "c"]);
    let mut newest = log.lines().map(|l| l.split(' ').collect::<Vec<_>>());
    let (signed, unsigned) = (newest.next().unwrap(), newest.next().unwrap());
    assert!(signed.contains(&"signed") && signed.contains(&"subs=1"), "{log}");
    assert!(unsigned.contains(&"unsigned"), "{log}");
}

/// The store key of sub-record `idx` of the record with hex hash `record`.
fn sub_key(record: &str, idx: u32) -> Vec<u8> {
    let record = capsulefs::record::RecordHash::from_hex(record).unwrap();
    [&record.as_bytes()[..], &idx.to_be_bytes()].concat()
}

/// Flips one bit inside each stored value that `keys` names (sealed payloads, record
/// bytes); flipping the same keys again restores them.
fn flip_bits(home: &Home, id: &str, cf: capsulefs::store::Cf, keys: &[Vec<u8>]) {
    use capsulefs::store::rocks::RocksKv;
    use capsulefs::store::{Batch, Durability, Kv};
    let kv = RocksKv::open(&home.store_path(id), false).unwrap();
    let mut batch = Batch::default();
    for key in keys {
        let mut bytes = kv.get(cf, key).unwrap().expect("stored");
        bytes[10] ^= 0x40;
        batch.put(cf, key.clone(), bytes);
    }
    kv.write(batch, Durability::Durable).unwrap();
}

#[test]
fn tampered_nodes_and_records_fail_only_the_files_below_them() {
    use capsulefs::record::RecordHash;
    use capsulefs::store::Cf;

    let home = Home::default();
    let id = home.ok(&["create", "c"]);
    let older = {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        let status = m.path(".capsule/status");
        fs::create_dir(m.path("d1")).unwrap();
        fs::write(m.path("d1/x"), b"in the older record").unwrap();
        fs::File::open(m.path("d1")).unwrap().sync_all().unwrap();
        let older =
            fs::read_to_string(&status).unwrap().lines().find_map(|l| l.strip_prefix("head: ")).unwrap().to_owned();
        // The newer record rewrites the root folder and the inode table, not d1 or x.
        fs::create_dir(m.path("d2")).unwrap();
        fs::write(m.path("d2/y"), b"in the newer record").unwrap();
        fs::File::open(m.path("d2")).unwrap().sync_all().unwrap();
        older
    };
    let record = RecordHash::from_hex(&older).unwrap();
    let subs: Vec<Vec<u8>> = {
        use capsulefs::store::Kv;
        let kv = capsulefs::store::rocks::RocksKv::open(&home.store_path(&id), false).unwrap();
        (0u32..).map(|i| sub_key(&older, i)).take_while(|k| kv.get(Cf::Subs, k).unwrap().is_some()).collect()
    };
    assert!(subs.len() >= 3, "chunk, nodes and superblock: {}", subs.len());
    let check = |what: &str| {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        let listed = fs::read_dir(m.path("d1")).and_then(|d| d.collect::<Result<Vec<_>, _>>());
        assert_eq!(listed.err().and_then(|e| e.raw_os_error()), Some(libc::EIO), "{what}: ls d1");
        assert_eq!(fs::read(m.path("d1/x")).err().and_then(|e| e.raw_os_error()), Some(libc::EIO), "{what}: cat d1/x");
        assert_eq!(fs::read(m.path("d2/y")).unwrap(), b"in the newer record", "{what}");
        assert_eq!(fs::read_dir(&m.dir).unwrap().count(), 2, "{what}: the root lists");
        drop(m);
        let log = fs::read_to_string(home.path().join("logs/mount-c.log")).unwrap();
        assert!(log.contains(&older[..12]), "{what}: the log names the record:\n{log}");
    };
    // Every payload of the older record: its directory node, chunk map and chunk.
    flip_bits(&home, &id, Cf::Subs, &subs);
    check("tampered payloads");
    flip_bits(&home, &id, Cf::Subs, &subs); // restored
    // The record itself: its hash no longer matches, so nothing in it is proven.
    flip_bits(&home, &id, Cf::Records, &[record.as_bytes().to_vec()]);
    check("tampered record");
}

#[test]
fn a_remount_keeps_the_crashed_daemons_log_and_a_clean_unmount_warns_of_nothing() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let info = [("CAPSULEFS_LOG", "info")];
    {
        let Some(m) = Mounted::with_env(&home, "c", &[], &info) else { return };
        write_fsynced(&m.path("a"), b"before the crash");
        sh(&format!("kill -9 {}", m.daemon_pid()));
    }
    {
        let Some(m) = Mounted::with_env(&home, "c", &[], &info) else { return };
        assert_eq!(fs::read(m.path("a")).unwrap(), b"before the crash");
        // A reader that goes away early is no panic.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{} status | head -1", env!("CARGO_BIN_EXE_capsulefs")))
            .env("CAPSULEFS_HOME", home.path())
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{out:?}");
    }
    let log = fs::read_to_string(home.path().join("logs/mount-c.log")).unwrap();
    assert_eq!(log.matches("mounted c at").count(), 2, "the crashed daemon's log is kept:\n{log}");
    assert!(!log.contains("WARN"), "a clean unmount warns of nothing:\n{log}");
}
