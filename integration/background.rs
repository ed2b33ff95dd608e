//! A mount's background push: commits reach the capsule's replicas without `capsulefs push`,
//! wait while a replica is down, and go when it returns; unmount sends the last ones.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::replicas::{copy_of_store, same_user};
use super::server::Server;
use super::{Home, Mounted, write_fsynced, xattr};

/// Waits (bounded) until the mount's `.capsule/status` has a line for the replica that
/// satisfies `ok`; returns that line.
pub(super) fn replica_line(mount: &Path, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = fs::read_to_string(mount.join(".capsule/status")).unwrap();
        if let Some(line) = status.lines().find(|l| l.starts_with("replica: ") && ok(l)) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "never {what}; the mount's status:\n{status}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A new capsule in `home` with `url` remembered as its replica, mounted (with `env` for the
/// daemon), and file `name` written there and pushed in the background: its id and the mount.
pub(super) fn pushed_mount<'h>(
    home: &'h Home,
    url: &str,
    env: &[(&str, &str)],
    (name, bytes): (&str, &[u8]),
) -> Option<(String, Mounted<'h>)> {
    let id = home.ok(&["create", "c"]).trim().to_owned();
    home.ok(&["replica", "add", "c", url]);
    let m = Mounted::with_env(home, "c", &[], env)?;
    write_fsynced(&m.path(name), bytes);
    replica_line(&m.dir, "pushed", |l| l.contains(" reachable, 0 records to push") && !l.contains("last push never"));
    Some((id, m))
}

#[test]
fn a_mount_pushes_its_commits_in_the_background_and_catches_up_after_an_outage() {
    let server = Server::start();
    let home = Home::default();
    let first = ("a.txt", &b"written while the server was up"[..]);
    let Some((id, m)) = pushed_mount(&home, &server.url(), &[], first) else { return };

    // The server down: commits wait, counted; the mount goes on working.
    let (store, addr) = server.kill();
    write_fsynced(&m.path("b.txt"), b"written while the server was down");
    let line = replica_line(&m.dir, "unreachable", |l| l.contains(" unreachable, "));
    assert!(line.contains("error: "), "{line}");
    let waiting = replica_line(&m.dir, "counting what waits", |l| !l.contains(" 0 records to push"));
    let bytes = waiting.split(" records to push (").nth(1).unwrap_or_default();
    assert!(!bytes.starts_with("0 B)") && bytes.contains("B)"), "the bytes waiting are counted too: {waiting}");

    // Back on the same address: the waiting commits go by themselves.
    let server = Server::start_on(store, &addr);
    replica_line(&m.dir, "caught up", |l| l.contains(" reachable, 0 records to push"));

    // Unmounting right after a write sends it with the final commit.
    fs::write(m.path("c.txt"), b"written just before unmount").unwrap();
    drop(m);
    let laptop = same_user(&home);
    laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    laptop.ok(&["verify", "c"]);
    let Some(copy) = Mounted::new(&laptop, "c", &["--read-only"]) else { return };
    assert_eq!(fs::read(copy.path("a.txt")).unwrap(), b"written while the server was up");
    assert_eq!(fs::read(copy.path("b.txt")).unwrap(), b"written while the server was down");
    assert_eq!(fs::read(copy.path("c.txt")).unwrap(), b"written just before unmount");
}

/// Waits (bounded) until `ok` holds.
pub(super) fn eventually(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "never {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_file_open_for_reading_keeps_its_old_content_until_reopened() {
    use std::os::unix::fs::FileExt;
    let server = Server::start();
    let desk = Home::default();
    let old: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let Some((id, a)) = pushed_mount(&desk, &server.url(), &[], ("report.txt", &old)) else { return };
    let laptop = same_user(&desk);
    laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    let Some(b) = Mounted::new(&laptop, "c", &[]) else { return };
    let reader = fs::File::open(b.path("report.txt")).unwrap();
    let mut start = vec![0; 1000];
    reader.read_exact_at(&mut start, 0).unwrap();
    assert_eq!(start, old[..1000]);
    // The desk rewrites the file in place (same size: the kernel keeps one size per inode).
    let new: Vec<u8> = (0..300_000u32).map(|i| (i % 13) as u8).collect();
    write_fsynced(&a.path("report.txt"), &new);
    eventually("the laptop read the desk's new version", || fs::read(b.path("report.txt")).is_ok_and(|c| c == new));
    // With the kernel's cached pages gone (as under memory pressure), every read through the
    // old handle reaches the mount, which answers with the version that handle opened.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let mut again = vec![0; old.len()];
    reader.read_exact_at(&mut again, 0).unwrap();
    assert!(again == old, "the old handle read the new version");
    drop(reader);
    assert_eq!(fs::read(b.path("report.txt")).unwrap(), new);
}

#[test]
fn a_reader_of_the_old_version_reads_none_of_the_pages_a_new_reader_cached() {
    use std::os::unix::fs::FileExt;
    let server = Server::start();
    let desk = Home::default();
    let old: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let Some((id, a)) = pushed_mount(&desk, &server.url(), &[], ("video.bin", &old)) else { return };
    let laptop = same_user(&desk);
    laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    let Some(b) = Mounted::new(&laptop, "c", &[]) else { return };
    let reader = fs::File::open(b.path("video.bin")).unwrap();
    let mut start = vec![0; 1000];
    reader.read_exact_at(&mut start, 0).unwrap();
    // The desk rewrites it in place, same size; the laptop shows that without reading it.
    let new: Vec<u8> = (0..4_000_000u32).map(|i| (i % 13) as u8).collect();
    write_fsynced(&a.path("video.bin"), &new);
    let commit = xattr(&a.path("video.bin"), "user.capsule.record");
    eventually("the laptop showed the desk's commit", || {
        let status = fs::read_to_string(b.path(".capsule/status")).unwrap();
        status.lines().any(|l| l.starts_with("head: ") && l.contains(&commit))
    });
    // A new reader reads the start of the new version: the kernel keeps one page cache per
    // file, so what it reads must not be served to the old reader, whose read would get
    // pages of both versions.
    let mut head = vec![0; 64 << 10];
    fs::File::open(b.path("video.bin")).unwrap().read_exact_at(&mut head, 0).unwrap();
    assert!(head == new[..64 << 10]);
    let mut again = vec![0; old.len()];
    reader.read_exact_at(&mut again, 0).unwrap();
    let from_new = (0..old.len() / 4096).filter(|p| again[p * 4096..][..4096] == new[p * 4096..][..4096]).count();
    assert!(again == old, "the old reader read {from_new} pages of the new version");
}

#[test]
fn a_file_open_for_writing_keeps_what_it_wrote_until_closed() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let server = Server::start();
    let desk = Home::default();
    let Some((id, a)) = pushed_mount(&desk, &server.url(), &[], ("report.txt", b"first")) else { return };
    let laptop = same_user(&desk);
    laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    let Some(b) = Mounted::new(&laptop, "c", &[]) else { return };
    // What the chaos run does: rewrite through a handle, fsync, read back through it. A full
    // first page and a partial second one: the kernel keeps the first, asks for the second.
    let mut f = fs::OpenOptions::new().read(true).write(true).truncate(true).open(b.path("report.txt")).unwrap();
    let mine: Vec<u8> = (0..6383u32).map(|i| (i % 251) as u8).collect();
    f.write_all(&mine).unwrap();
    f.sync_all().unwrap();
    // The desk takes that version and writes its own on top, while the laptop's is open.
    eventually("the desk read the laptop's version", || fs::read(a.path("report.txt")).is_ok_and(|c| c == mine));
    let theirs: Vec<u8> = (0..7562u32).map(|i| (i % 13) as u8).collect();
    write_fsynced(&a.path("report.txt"), &theirs);
    let commit = xattr(&a.path("report.txt"), "user.capsule.record");
    let status = || fs::read_to_string(b.path(".capsule/status")).unwrap();
    eventually("the laptop held the desk's commit back, or showed it", || {
        let status = status();
        status.contains("held_back_by: 1 file")
            || status.lines().any(|l| l.starts_with("head: ") && l.contains(&commit))
    });
    // Every read through the open handle reaches the mount, which answers with what it wrote.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let mut read = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut read).unwrap();
    assert!(read == mine, "the writer read back {} bytes of another version", read.len());
    // Closed, the mount shows the desk's version at once.
    drop(f);
    eventually("the laptop read the desk's version", || fs::read(b.path("report.txt")).is_ok_and(|c| c == theirs));
    assert!(!status().contains("held_back_by"), "{}", status());
}

#[test]
fn the_kernel_forgets_at_once_what_a_change_from_elsewhere_made_stale() {
    let server = Server::start();
    let desk = Home::default();
    let Some((id, a)) = pushed_mount(&desk, &server.url(), &[], ("notes.txt", b"short")) else { return };
    let laptop = same_user(&desk);
    laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    // The laptop's kernel may keep names and attributes for ten minutes, far longer than this
    // test waits: only being told what changed can make it see the desk's changes.
    let Some(b) = Mounted::new(&laptop, "c", &["--attr-ttl", "600"]) else { return };
    assert_eq!(fs::read(b.path("notes.txt")).unwrap(), b"short");
    let longer = b"a much longer second version";
    write_fsynced(&a.path("notes.txt"), longer);
    // A kept size of 5 would cut the new version short.
    eventually("the laptop read the whole new version", || fs::read(b.path("notes.txt")).is_ok_and(|c| c == longer));
    fs::remove_file(a.path("notes.txt")).unwrap();
    fsync_dir(&a.dir);
    eventually("the laptop's kernel forgot the removed name", || fs::metadata(b.path("notes.txt")).is_err());
}

/// Commits a mount's pending changes durably (fsync on its root: a signed commit).
/// The files in `dir` with their bytes, by name.
fn files_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .map(|name| (name.clone(), fs::read(dir.join(&name)).unwrap_or_default()))
        .collect();
    files.sort();
    files
}

fn fsync_dir(dir: &Path) {
    fs::File::open(dir).unwrap().sync_all().unwrap();
}

#[test]
fn two_mounts_through_one_server_see_each_others_changes_without_remounting() {
    let server = Server::start();
    let desk = Home::default();
    let Some((id, a)) = pushed_mount(&desk, &server.url(), &[], ("notes.txt", b"first draft")) else { return };
    let laptop = same_user(&desk);
    laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    let Some(b) = Mounted::new(&laptop, "c", &[]) else { return };
    assert_eq!(fs::read(b.path("notes.txt")).unwrap(), b"first draft");

    write_fsynced(&a.path("notes.txt"), b"from the desk");
    eventually("the laptop read the desk's change", || {
        fs::read(b.path("notes.txt")).is_ok_and(|c| c == b"from the desk")
    });
    // A shell that listed the folder before sees the new name and, later, its removal.
    fs::remove_file(a.path("notes.txt")).unwrap();
    fsync_dir(&a.dir);
    let listed = |dir: &Path| fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect::<Vec<_>>();
    eventually("the laptop saw the removal", || !listed(&b.dir).iter().any(|n| n == "notes.txt"));

    // And back: the laptop writes, the desk sees it, on top of what it had.
    write_fsynced(&b.path("reply.txt"), b"from the laptop");
    eventually("the desk read the laptop's file", || {
        fs::read(a.path("reply.txt")).is_ok_and(|c| c == b"from the laptop")
    });
    let status = fs::read_to_string(a.path(".capsule/status")).unwrap();
    assert!(status.lines().any(|l| l.starts_with("replica: ") && !l.contains(" 0 records pulled")), "{status}");
    drop((a, b));
    desk.ok(&["verify", "c"]);
    laptop.ok(&["verify", "c"]);
}

#[test]
fn two_mounts_that_changed_apart_show_the_same_merge_once_the_server_returns() {
    let server = Server::start();
    let desk = Home::default();
    let Some((id, a)) = pushed_mount(&desk, &server.url(), &[], ("shared.txt", b"base")) else { return };
    write_fsynced(&a.path("edited-on-laptop.txt"), b"base");
    write_fsynced(&a.path("gone.txt"), b"base");
    replica_line(&a.dir, "pushed", |l| l.contains(" reachable, 0 records to push"));
    let laptop = same_user(&desk);
    laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    let Some(b) = Mounted::new(&laptop, "c", &[]) else { return };
    assert_eq!(fs::read(b.path("gone.txt")).unwrap(), b"base");

    // The server down, both machines change the capsule.
    let (store, addr) = server.kill();
    write_fsynced(&a.path("shared.txt"), b"the desk's version");
    write_fsynced(&a.path("desk-only.txt"), b"desk");
    fs::remove_file(a.path("edited-on-laptop.txt")).unwrap();
    fs::remove_file(a.path("gone.txt")).unwrap();
    fsync_dir(&a.dir);
    write_fsynced(&b.path("shared.txt"), b"the laptop's version");
    write_fsynced(&b.path("laptop-only.txt"), b"laptop");
    write_fsynced(&b.path("edited-on-laptop.txt"), b"edited on the laptop");

    // Back: each pulls the other's branch and shows the merge, the same on both.
    let _server = Server::start_on(store, &addr);
    eventually("both mounts showed the same merge", || {
        let t = files_in(&a.dir);
        t.len() == 5 && t == files_in(&b.dir)
    });
    let merged = files_in(&a.dir);
    let names: Vec<&str> = merged.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"desk-only.txt") && names.contains(&"laptop-only.txt"), "{names:?}");
    assert!(!names.contains(&"gone.txt"), "{names:?}");
    let content = |name: &str| merged.iter().find(|(n, _)| n == name).map(|(_, c)| c.clone()).unwrap();
    assert_eq!(content("edited-on-laptop.txt"), b"edited on the laptop", "an edit outlives a delete");
    let copy =
        names.iter().find(|n| n.starts_with("shared.conflict-") && n.ends_with(".txt")).expect("a conflict copy");
    let mut versions = [content("shared.txt"), content(copy)];
    versions.sort();
    assert_eq!(versions, [b"the desk's version".to_vec(), b"the laptop's version".to_vec()]);

    // The next change on either side commits the merge; the other follows it.
    write_fsynced(&b.path("after.txt"), b"after the merge");
    eventually("the desk saw the change made on the merge", || {
        fs::read(a.path("after.txt")).is_ok_and(|c| c == b"after the merge") && files_in(&a.dir) == files_in(&b.dir)
    });
    drop((a, b));
    desk.ok(&["verify", "c"]);
    laptop.ok(&["verify", "c"]);
}

#[test]
fn a_mount_killed_mid_sync_catches_up_after_a_remount_and_loses_nothing_fsynced() {
    let server = Server::start();
    let desk = Home::default();
    let Some((id, a)) = pushed_mount(&desk, &server.url(), &[], ("start.txt", b"start")) else { return };
    let laptop = same_user(&desk);
    laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    let mut wanted = vec![("start.txt".to_owned(), b"start".to_vec())];
    {
        let Some(b) = Mounted::new(&laptop, "c", &[]) else { return };
        // Both write while syncing; the laptop's daemon dies in the middle of it.
        for i in 0..5 {
            for (m, who) in [(&a, "desk"), (&b, "laptop")] {
                let (name, bytes) = (format!("{who}-{i}.txt"), format!("{who} wrote {i}").into_bytes());
                write_fsynced(&m.path(&name), &bytes);
                wanted.push((name, bytes));
            }
        }
        super::sh(&format!("kill -9 {}", b.daemon_pid()));
    }
    for i in 5..8 {
        let (name, bytes) = (format!("desk-{i}.txt"), format!("desk wrote {i}").into_bytes());
        write_fsynced(&a.path(&name), &bytes);
        wanted.push((name, bytes));
    }
    let Some(b) = Mounted::new(&laptop, "c", &[]) else { return };
    wanted.sort();
    eventually("both mounts hold every fsynced file", || files_in(&a.dir) == wanted && files_in(&b.dir) == wanted);
    drop((a, b));
    desk.ok(&["verify", "c"]);
    laptop.ok(&["verify", "c"]);
}

#[test]
fn replicated_fsync_returns_once_the_replicas_hold_the_commit_and_fails_when_they_cannot() {
    let server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    home.ok(&["replica", "add", "c", &server.url()]);
    let Some(m) = Mounted::new(&home, "c", &["--replicated-fsync", "--replicated-fsync-wait", "2"]) else { return };
    write_fsynced(&m.path("a.txt"), b"on the server before fsync returned");
    // Read at once: fsync waited for the push.
    let status = fs::read_to_string(m.path(".capsule/status")).unwrap();
    assert!(status.contains("replicated: 1 of 1 replicas hold every commit made here"), "{status}");
    let other = same_user(&home);
    other.ok(&["clone", &format!("{}#{id}", server.url())]);
    assert_eq!(other.ok(&["log", "c"]).lines().count(), home.ok(&["log", "c"]).lines().count());

    // With the replica gone, fsync fails after the wait, and the file stays written here.
    let _stopped = server.kill();
    let mut f = fs::File::create(m.path("b.txt")).unwrap();
    std::io::Write::write_all(&mut f, b"only here").unwrap();
    let err = f.sync_all().expect_err("no replica holds it");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(m.path("b.txt")).unwrap(), b"only here");
    let status = fs::read_to_string(m.path(".capsule/status")).unwrap();
    assert!(status.contains("replicated: 0 of 1 replicas"), "{status}");
}

#[test]
fn a_home_restored_from_a_backup_takes_its_own_later_records_before_it_writes() {
    let server = Server::start();
    let home = Home::default();
    let Some((id, m)) = pushed_mount(&home, &server.url(), &[], ("first.txt", b"before the backup")) else { return };
    drop(m);
    let backup = Home::default();
    super::sh(&format!("cp -a {}/. {}", home.path().display(), backup.path().display()));
    {
        // The original goes on writing, and its unmount pushes.
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        write_fsynced(&m.path("second.txt"), b"after the backup");
    }
    // The backup, restored and mounted, pulls this device's later records before it writes,
    // so its next record follows them instead of reusing their numbers.
    let Some(m) = Mounted::new(&backup, "c", &[]) else { return };
    assert_eq!(fs::read(m.path("second.txt")).unwrap(), b"after the backup");
    write_fsynced(&m.path("third.txt"), b"from the restored copy");
    let line = replica_line(&m.dir, "pushed", |l| l.contains(" reachable, 0 records to push"));
    assert!(!line.contains("ALARM"), "{line}");
    drop(m);
    backup.ok(&["verify", "c"]);
    let other = same_user(&home);
    other.ok(&["clone", &format!("{}#{id}", server.url())]);
    other.ok(&["verify", "c"]);
    let log = fs::read_to_string(backup.path().join("logs/mount-c.log")).unwrap();
    assert!(log.contains("a store restored from a backup?"), "{log}");
}

/// A server that will lose a commit: a mount of a new capsule in `home` pushes a.txt, the
/// server's store is copied aside, then b.txt is pushed and the mount's pull sees the server
/// hold its commit. Returns the capsule id, the mount, the server, the copy, and the first 12
/// hex digits of b.txt's commit.
struct Losing<'h> {
    id: String,
    mount: Mounted<'h>,
    server: Server,
    older: tempfile::TempDir,
    newest: String,
}

fn losing(home: &Home) -> Option<Losing<'_>> {
    let server = Server::start();
    let (id, mount) = pushed_mount(home, &server.url(), &[], ("a.txt", b"first"))?;
    let (store, addr) = server.kill();
    let older = copy_of_store(&store);
    let server = Server::start_on(store, &addr);
    write_fsynced(&mount.path("b.txt"), b"second");
    let newest = home.ok(&["log", "c"]).lines().next().unwrap()[..12].to_owned();
    replica_line(&mount.dir, "b.txt's commit among the server's heads", |l| l.contains(&newest));
    Some(Losing { id, mount, server, older, newest })
}

#[test]
fn a_replica_put_back_to_an_older_state_raises_an_alarm_in_the_mount() {
    let home = Home::default();
    let Some(Losing { id, mount: m, server, older, newest }) = losing(&home) else { return };
    // The server put back to the copy: it lacks a commit it held; the mount says so.
    let (_, addr) = server.kill();
    let server = Server::start_on(older, &addr);
    let line = replica_line(&m.dir, "the alarm", |l| l.contains("ALARM: rolled back"));
    assert!(line.contains("signed records of writer"), "{line}");
    // The background push sends the lost commit again, without waiting for a new one; the
    // alarm stays for the rest of the mount.
    eventually("the lost commit pushed again", || {
        let laptop = same_user(&home);
        laptop.run(&["clone", &format!("{}#{id}", server.url())]).status.success()
            && laptop.ok(&["log", "c"]).lines().any(|l| l.starts_with(&newest))
    });
    assert!(fs::read_to_string(m.path(".capsule/status")).unwrap().contains("ALARM: rolled back"));
}

#[test]
fn a_replica_serving_a_fork_raises_an_alarm_in_the_mount() {
    let (a, b) = (Server::start(), Server::start());
    let home = Home::default();
    let id = super::replicas::forked_on(&home, &a, &b);
    let laptop = same_user(&home);
    laptop.ok(&["clone", &format!("{}#{id}", a.url())]);
    laptop.ok(&["replica", "add", "c", &b.url()]);
    let Some(m) = Mounted::new(&laptop, "c", &[]) else { return };
    let line = replica_line(&m.dir, "the fork alarm", |l| l.contains("ALARM: serves a forked writer"));
    assert!(line.starts_with(&format!("replica: {} ", b.url())) && line.contains("sequence number 1000"), "{line}");
    let status = fs::read_to_string(m.path(".capsule/status")).unwrap();
    assert!(status.lines().any(|l| l.starts_with("ALARM: writer ") && l.contains("as seq 1000: a fork")), "{status}");
}

#[test]
fn a_replica_that_went_back_while_unmounted_is_noticed_at_the_next_mount() {
    let home = Home::default();
    let Some(Losing { mount, server, older, .. }) = losing(&home) else { return };
    drop(mount);
    // Put back while no mount was watching; the next mount knows what it had seen.
    let (_, addr) = server.kill();
    let _server = Server::start_on(older, &addr);
    let Some(m) = Mounted::new(&home, "c", &[]) else { return };
    replica_line(&m.dir, "the alarm", |l| l.contains("ALARM: rolled back"));
}
