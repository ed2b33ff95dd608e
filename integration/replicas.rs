//! `capsulefs serve` and the client commands on loopback: push, clone, pull, a server killed
//! mid-push, hostile input, and a tampered replica. Each test starts its own servers on free
//! ports and ends only those, by pid.

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsulefs::crypto::keys::KeyFolder;
use capsulefs::record::codec;
use capsulefs::record::{CapsuleId, DeviceId, Record, RecordHash};
use capsulefs::wire::Bundle;

use super::server::{Server, data_record};
use super::{Home, Mounted, sh};

/// A capsule holding a copy of this crate's src/ tree, unmounted (the unmount signs the end).
pub(super) fn capsule_with_tree(home: &Home) -> Option<String> {
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let m = Mounted::new(home, "c", &[])?;
    sh(&format!("cp -a {} {}", src.display(), m.path("tree").display()));
    Some(id)
}

/// A copy of server store `store` as it is now, for putting back later.
pub(super) fn copy_of_store(store: &tempfile::TempDir) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    super::sh(&format!("cp -a {}/. {}", store.path().display(), copy.path().display()));
    copy
}

/// A second home with the same identity (a user's other machine).
pub(super) fn same_user(home: &Home) -> Home {
    let other = Home::default();
    fs::create_dir_all(other.path().join("keys")).unwrap();
    for key in fs::read_dir(home.path().join("keys")).unwrap() {
        let key = key.unwrap().path();
        if key.extension().is_some_and(|e| e == "key") {
            fs::copy(&key, other.path().join("keys").join(key.file_name().unwrap())).unwrap();
        }
    }
    other
}

#[test]
fn a_pushed_tree_clones_verifies_and_mounts_elsewhere() {
    let server = Server::start();
    let home = Home::default();
    let Some(id) = capsule_with_tree(&home) else { return };
    home.ok(&["replica", "add", "c", &server.url()]);
    assert_eq!(home.ok(&["replica", "list", "c"]).trim(), server.url());
    let pushed = home.ok(&["push", "c"]);
    assert!(pushed.starts_with("pushed ") && !pushed.starts_with("pushed 0 "), "{pushed}");
    assert!(home.ok(&["push", "c"]).starts_with("pushed 0 records"), "a second push has nothing to send");

    let laptop = same_user(&home);
    let cloned = laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    assert_eq!(cloned.lines().last(), Some(id.as_str()), "{cloned}");
    assert!(laptop.ok(&["verify", "c"]).starts_with("ok: "));
    {
        let Some(m) = Mounted::new(&laptop, "c", &["--read-only"]) else { return };
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        sh(&format!("diff -r {} {}", src.display(), m.path("tree").display()));
    }
    // New commits on the first machine reach the second by push and pull.
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        fs::write(m.path("later.txt"), b"written after the clone").unwrap();
    }
    home.ok(&["push", "c"]);
    let pulled = laptop.ok(&["pull", "c"]);
    assert!(!pulled.starts_with("pulled 0 "), "{pulled}");
    let Some(m) = Mounted::new(&laptop, "c", &["--read-only"]) else { return };
    assert_eq!(fs::read(m.path("later.txt")).unwrap(), b"written after the clone");
}

#[test]
fn a_server_killed_mid_push_loses_nothing_acknowledged_and_the_push_resumes() {
    let server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    // Many signed records, so the push takes several batches and round trips.
    let payload = home.file("p", &vec![0x5a; 3 << 20]);
    for _ in 0..24 {
        home.ok(&["append", "c", "--sign", payload.to_str().unwrap()]);
    }
    let mut push =
        home.command().args(["push", "c", &server.url()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Kill the server once it has stored something (or the push ended), bounded in time.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server.metrics().contains("capsulefs_records_stored_total 1")
        && !server.metrics().contains("capsulefs_records_stored_total 2")
        && push.try_wait().unwrap().is_none()
    {
        assert!(Instant::now() < deadline, "the push never started storing");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (store, addr) = server.kill();
    let _ = push.wait();
    let server = Server::start_on(store, &addr);
    let again = home.ok(&["push", "c", &server.url()]);
    assert!(again.starts_with("pushed "), "{again}");
    let other = same_user(&home);
    other.ok(&["clone", &format!("{}#{id}", server.url())]);
    let verify = other.ok(&["verify", "c"]);
    assert!(verify.starts_with("ok: 25 records"), "every record arrived: {verify}");
}

/// A record of capsule `id` by the home's own key, as raw bytes, and its one payload.
fn record_bytes(home: &Home, id: &str, parent: RecordHash, seq: u64, signed: bool) -> Bundle {
    let me = KeyFolder::load(&home.path().join("keys")).unwrap().identities()[0].clone();
    let payload = format!("payload {seq}").into_bytes();
    data_record(&me, CapsuleId::from_hex(id).unwrap(), DeviceId([6; 16]), (parent, seq), payload, signed)
}

#[test]
fn hostile_input_is_refused_and_the_server_stays_up_and_small() {
    let mut server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    home.ok(&["push", "c", &server.url()]);
    let records = format!("/v1/capsules/{id}/records");
    let genesis = RecordHash::from_hex(&id).unwrap();
    let head = RecordHash::from_hex(home.ok(&["log", "c"]).split(' ').next().unwrap()).unwrap();
    let rss_before = server.status("VmRSS");
    for i in 0..20u8 {
        assert_eq!(server.raw("POST", &records, &vec![i; 1000]), 400, "garbage");
        assert_eq!(server.raw("POST", &records, &[1, 0, 0]), 400, "truncated");
    }
    assert_eq!(server.raw_declaring("POST", &records, 80 << 20, &[0; 4096]), 413, "oversized");
    assert_eq!(server.raw("GET", &format!("/v1/capsules/{}/heads", "ab".repeat(32)), b""), 404, "unknown capsule");
    assert_eq!(server.raw("POST", "/v1/capsules/not-a-capsule/records", b""), 400);
    // Sketches: garbage, and more cells than a request may carry.
    let sketch = format!("/v1/capsules/{id}/heads-sketch");
    assert_eq!(server.raw("POST", &sketch, &[7; 100]), 400, "garbage sketch");
    let too_many = capsulefs::replica::sketch::Request {
        salt: [0; 16],
        cells: vec![Default::default(); capsulefs::replica::sketch::MAX_CELLS + 1],
    };
    assert_eq!(server.raw("POST", &sketch, &borsh::to_vec(&too_many).unwrap()), 400, "oversized sketch");
    // An unsigned record alone: nobody may fill a replica without a writer's signature.
    let unsigned = codec::encode(&vec![record_bytes(&home, &id, head, 2, false)]);
    assert_eq!(server.raw("POST", &records, &unsigned), 400, "unsigned");
    // A signed record whose signature was made over another record.
    let mut forged = record_bytes(&home, &id, head, 2, true);
    let other = Record::decode(&record_bytes(&home, &id, genesis, 3, true).record).unwrap();
    let mut rec = Record::decode(&forged.record).unwrap();
    rec.signature = other.signature;
    forged.record = rec.encode();
    assert_eq!(server.raw("POST", &records, &codec::encode(&vec![forged])), 400, "bad signature");
    // A record of a writer the capsule does not know.
    let stranger = Home::default();
    stranger.ok(&["create", "elsewhere"]);
    let strange = codec::encode(&vec![record_bytes(&stranger, &id, head, 1, true)]);
    assert_eq!(server.raw("POST", &records, &strange), 400, "unauthorized writer");
    // A flood of connections that send nothing, from one address: another's request still
    // answers (`serving` tests each bound under load).
    let idle: Vec<TcpStream> = (0..300).map(|_| server.connect_from([127, 0, 0, 9])).collect();
    assert_eq!(server.raw("GET", &format!("/v1/capsules/{id}/heads"), b""), 200);
    drop(idle);
    assert!(server.alive());
    let metrics = server.metrics();
    for reason in ["malformed", "unsigned_without_signed_descendant", "bad_signature", "unauthorized_writer"] {
        assert!(metrics.contains(&format!("reason=\"{reason}\"")), "{reason} counted:\n{metrics}");
    }
    // Only the keystore record of the first push.
    assert!(metrics.contains("capsulefs_records_stored_total 1\n"), "nothing hostile stored:\n{metrics}");
    // An 80 MiB body was refused before any of it was read: memory stays near where it was.
    let grown = server.status("VmRSS").saturating_sub(rss_before);
    assert!(grown < 64 << 10, "the server grew by {grown} KiB");
    // A signed record with its unsigned parent, in one batch, is taken.
    let parent = record_bytes(&home, &id, head, 2, false);
    let parent_hash = Record::decode(&parent.record).unwrap().hash();
    let child = record_bytes(&home, &id, parent_hash, 3, true);
    let child_hash = Record::decode(&child.record).unwrap().hash();
    assert_eq!(server.raw("POST", &records, &codec::encode(&vec![parent, child])), 200);
    // A record stream (`Records` bodies as frames of one request): an oversized frame, one cut
    // short, an undecodable one, each refused; a good frame then a refused one: the first is
    // stored, the answer is the refusal.
    use capsulefs::wire::protocol::frame;
    let stream = format!("/v1/capsules/{id}/record-stream");
    assert_eq!(server.raw("POST", &stream, &u32::MAX.to_le_bytes()), 400, "oversized frame");
    assert_eq!(server.raw("POST", &stream, &[&100u32.to_le_bytes()[..], &[0; 10]].concat()), 400, "cut short");
    assert_eq!(server.raw("POST", &stream, &frame(&[9; 50])), 400, "undecodable frame");
    let good = frame(&codec::encode(&vec![record_bytes(&home, &id, child_hash, 4, true)]));
    let refused = frame(&codec::encode(&vec![record_bytes(&home, &id, child_hash, 5, false)]));
    assert!(server.metrics().contains("capsulefs_records_stored_total 3\n"));
    assert_eq!(server.raw("POST", &stream, &[good, refused].concat()), 400, "a refused frame after a good one");
    assert!(server.metrics().contains("capsulefs_records_stored_total 4\n"), "the good frame was stored");
    assert!(server.alive());
}

#[test]
fn a_tampered_replica_is_refused_and_nothing_wrong_is_stored() {
    let server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let f = home.file("a", b"the genuine bytes");
    home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    home.ok(&["push", "c", &server.url()]);
    let (store, addr) = server.kill();
    // Damage the server's copy: every stored sub-record value has a byte flipped.
    {
        let path = store.path().join("capsules").join(&id).join("store");
        let kv = capsulefs::store::rocks::RocksKv::open(&path, false).unwrap();
        use capsulefs::store::{Batch, Cf, Durability, Kv};
        let entries: Vec<_> = kv.scan(Cf::Subs, &[], false).unwrap().map(Result::unwrap).collect();
        let mut batch = Batch::default();
        for (k, mut v) in entries {
            v[4] ^= 1; // the payload's first byte, after its length
            batch.put(Cf::Subs, k, v);
        }
        kv.write(batch, Durability::Durable).unwrap();
    }
    let server = Server::start_on(store, &addr);
    let other = same_user(&home);
    let out = other.run(&["clone", &format!("{}#{id}", server.url())]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("payloads give"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(other.run(&["log", "c"]).status.code() == Some(3), "no capsule was registered from bad data");
}

#[test]
fn a_rolled_back_server_is_reported_and_nothing_moves_back() {
    let server = Server::start();
    let home = Home::default();
    home.ok(&["create", "c"]);
    let f = home.file("a", b"a");
    home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    home.ok(&["push", "c", &server.url()]);
    // An old copy of the server's store, taken while it is stopped.
    let (store, addr) = server.kill();
    let old = tempfile::tempdir().unwrap();
    sh(&format!("cp -a {}/. {}", store.path().display(), old.path().display()));
    let server = Server::start_on(store, &addr);
    for _ in 0..3 {
        home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    }
    home.ok(&["push", "c", &server.url()]);
    let before = home.ok(&["log", "c"]);
    // The server comes back from the old copy: three signed records fewer.
    drop(server);
    let server = Server::start_on(old, &addr);
    let out = home.run(&["pull", "c", &server.url()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(warning.contains("lacks 3 signed records") && warning.contains("rolled back"), "{warning}");
    assert_eq!(home.ok(&["log", "c"]), before, "the local capsule did not move back");
    // A push repairs it.
    home.ok(&["push", "c", &server.url()]);
    let again = home.run(&["pull", "c", &server.url()]);
    assert!(!String::from_utf8_lossy(&again.stderr).contains("lacks"), "repaired");
}

/// A free loopback port (bound, then released for the server that is about to take it).
fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn peered_servers_converge_on_what_one_of_them_was_pushed() {
    let (a_addr, b_addr) = (free_port(), free_port());
    let a = Server::start_peered(tempfile::tempdir().unwrap(), &a_addr, &[format!("http://{b_addr}")]);
    let b = Server::start_peered(tempfile::tempdir().unwrap(), &b_addr, &[format!("http://{a_addr}")]);
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let f = home.file("a", b"for both servers");
    for _ in 0..5 {
        home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    }
    home.ok(&["push", "c", &a.url()]);
    // B learns the capsule from A, bounded in time.
    let heads_url = |s: &Server| format!("{}/v1/capsules/{id}/heads", s.url());
    let heads =
        |url: String| Command::new("curl").args(["-s", "-o", "-", "-w", "%{http_code}", &url]).output().unwrap().stdout;
    let deadline = Instant::now() + Duration::from_secs(30);
    while heads(heads_url(&b)) != heads(heads_url(&a)) {
        assert!(Instant::now() < deadline, "B never caught up with A");
        std::thread::sleep(Duration::from_millis(50));
    }
    // And what is pushed to B reaches A.
    home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    home.ok(&["push", "c", &b.url()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while heads(heads_url(&a)) != heads(heads_url(&b)) {
        assert!(Instant::now() < deadline, "A never caught up with B");
        std::thread::sleep(Duration::from_millis(50));
    }
    let other = same_user(&home);
    other.ok(&["clone", &format!("{}#{id}", a.url())]);
    assert!(other.ok(&["verify", "c"]).starts_with("ok: 7 records"));
}

#[test]
fn a_follower_pulls_new_records_as_they_reach_the_server() {
    let server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    home.ok(&["push", "c", &server.url()]);
    let laptop = same_user(&home);
    laptop.ok(&["clone", &format!("{}#{id}", server.url())]);
    let mut follower =
        laptop.command().args(["pull", "c", "--follow"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let f = home.file("a", b"news");
    let record = super::last_line(&home.ok(&["append", "c", "--sign", f.to_str().unwrap()]));
    home.ok(&["push", "c", &server.url()]);
    // The follower waits on the server's heads (a long poll) and pulls the new record; the
    // laptop's log, read beside the follower, shows it within a bounded wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !laptop.run(&["log", "c"]).stdout.starts_with(record.as_bytes()) {
        assert!(Instant::now() < deadline, "the follower never pulled {record}");
        std::thread::sleep(Duration::from_millis(50));
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
}

#[test]
fn sync_between_two_servers_carries_each_ones_records_to_the_other() {
    let (a, b) = (Server::start(), Server::start());
    let home = Home::default();
    let Some(id) = capsule_with_tree(&home) else { return };
    home.ok(&["push", "c", &a.url()]);
    // No id: every capsule either server holds. B learns the capsule whole.
    let out = home.ok(&["sync", &a.url(), &b.url()]);
    assert!(out.contains(&format!("of {id} from {} to {}", a.url(), b.url())), "{out}");
    let heads = |s: &Server| {
        let url = format!("{}/v1/capsules/{id}/heads", s.url());
        Command::new("curl").args(["-sf", &url]).output().unwrap().stdout
    };
    assert_eq!(heads(&a), heads(&b));
    // New records on B only, and the capsule named: they reach A, and only they move.
    let f = home.file("a", b"for B first");
    home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    home.ok(&["push", "c", &b.url()]);
    let out = home.ok(&["sync", &format!("{}#{id}", a.url()), &b.url()]);
    assert!(out.contains("relayed 1 records (") && out.contains(&format!("from {} to {}", b.url(), a.url())), "{out}");
    assert!(out.contains(&format!("relayed 0 records (0 bytes) of {id} from {} to {}", a.url(), b.url())), "{out}");
    assert_eq!(heads(&a), heads(&b));
    let other = same_user(&home);
    other.ok(&["clone", &format!("{}#{id}", a.url())]);
    assert_eq!(other.ok(&["log", "c"]), home.ok(&["log", "c"]));
    other.ok(&["verify", "c"]);
    // Two URLs naming different capsules, or one URL alone, are refused with a message.
    let wrong = home.run(&["sync", &format!("{}#{}", a.url(), "00".repeat(32)), &format!("{}#{id}", b.url())]);
    assert_eq!(wrong.status.code(), Some(5), "{}", String::from_utf8_lossy(&wrong.stderr));
    let alone = home.run(&["sync", &a.url()]);
    assert!(String::from_utf8_lossy(&alone.stderr).contains("two server URLs"), "{alone:?}");
}

#[test]
fn a_tls_server_is_reached_with_its_certificate_and_refused_without() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    sh(&format!(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
         -addext subjectAltName=IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE \
         -keyout {} -out {} 2>/dev/null",
        key.display(),
        cert.display()
    ));
    let tls_args =
        ["--tls-cert".to_owned(), cert.display().to_string(), "--tls-key".to_owned(), key.display().to_string()];
    let server = Server::start_with(tempfile::tempdir().unwrap(), "127.0.0.1:0", &tls_args);
    let url = format!("https://{}", server.addr);
    // A client that connects and never says anything holds no one else up.
    let _silent = TcpStream::connect(&server.addr).unwrap();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let f = home.file("a", b"over TLS");
    home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    // Without the certificate: refused, with what to do.
    let refused = home.run(&["push", "c", &url]);
    assert_eq!(refused.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("CAPSULEFS_TLS_CA"), "{refused:?}");
    // Plain http to it: refused too.
    assert_eq!(home.run(&["push", "c", &format!("http://{}", server.addr)]).status.code(), Some(6));
    // With it: push, clone, verify.
    let with_ca = |h: &Home, args: &[&str]| {
        let out = h.command().args(args).env("CAPSULEFS_TLS_CA", &cert).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let pushed = with_ca(&home, &["push", "c", &url]);
    assert!(pushed.starts_with("pushed "), "{pushed}");
    let other = same_user(&home);
    with_ca(&other, &["clone", &format!("{url}#{id}")]);
    other.ok(&["verify", "c"]);
    assert_eq!(other.ok(&["log", "c"]), home.ok(&["log", "c"]));
    let metrics =
        Command::new("curl").args(["-sf", "--cacert"]).arg(&cert).arg(format!("{url}/metrics")).output().unwrap();
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("capsulefs_records_stored"), "{metrics:?}");
}

/// The number before `what` in `text` (e.g. "229 sub-records not held"); 0 when no line says
/// it (`verify` prints no "not held" line for none).
fn count_before(text: &str, what: &str) -> u64 {
    text.lines().find(|l| l.contains(what)).map_or(0, |line| line.split_whitespace().next().unwrap().parse().unwrap())
}

#[test]
fn a_sparse_clone_holds_headers_and_fetches_each_sub_record_when_read() {
    let server = Server::start();
    let home = Home::default();
    let Some(id) = capsule_with_tree(&home) else { return };
    home.ok(&["push", "c", &server.url()]);
    let laptop = same_user(&home);
    let cloned = laptop.ok(&["clone", "--sparse", &format!("{}#{id}", server.url())]);
    assert_eq!(cloned.lines().last(), Some(id.as_str()), "{cloned}");
    // Every header is there and proven; no sub-record yet but the keystore's one entry
    // (membership records come whole: every later record's rights are read from them).
    let before = laptop.ok(&["verify", "c"]);
    assert!(before.starts_with("ok: ") && before.contains(" 1 sub-records (118 bytes) verified"), "{before}");
    let not_held = count_before(&before, "sub-records not held");
    assert!(not_held > 100, "{before}");
    assert_eq!(laptop.ok(&["log", "c"]), home.ok(&["log", "c"]));
    // Reading the tree fetches what it needs, each sub-record proven, and keeps it.
    {
        let Some(m) = Mounted::new(&laptop, "c", &["--read-only"]) else { return };
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        sh(&format!("diff -r {} {}", src.display(), m.path("tree").display()));
    }
    let after = laptop.ok(&["verify", "c"]);
    assert!(count_before(&after, "sub-records not held") < not_held, "{after}");
    // With the server gone, what was read is still readable.
    drop(server);
    let Some(m) = Mounted::new(&laptop, "c", &["--read-only"]) else { return };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    sh(&format!("diff -r {} {}", src.display(), m.path("tree").display()));
}

/// A new capsule of `home` pushed to servers `a` and `b`, then one writer, device and sequence
/// number (1000) given to two different signed records: one on each server. Its id.
pub(super) fn forked_on(home: &Home, a: &Server, b: &Server) -> String {
    let id = home.ok(&["create", "c"]).trim().to_owned();
    home.ok(&["push", "c", &a.url()]);
    home.ok(&["push", "c", &b.url()]);
    let genesis = RecordHash::from_hex(&id).unwrap();
    let head = RecordHash::from_hex(home.ok(&["log", "c"]).split(' ').next().unwrap()).unwrap();
    let records = format!("/v1/capsules/{id}/records");
    let first = record_bytes(home, &id, head, 1000, true);
    let second = record_bytes(home, &id, genesis, 1000, true);
    assert_eq!(a.raw("POST", &records, &codec::encode(&vec![first])), 200);
    assert_eq!(b.raw("POST", &records, &codec::encode(&vec![second])), 200);
    id
}

#[test]
fn a_replica_serving_a_forked_writer_is_refused_and_the_fork_kept_as_evidence() {
    let (a, b) = (Server::start(), Server::start());
    let home = Home::default();
    let id = forked_on(&home, &a, &b);
    let laptop = same_user(&home);
    laptop.ok(&["clone", &format!("{}#{id}", a.url())]);
    let before = laptop.ok(&["log", "c"]);
    let out = laptop.run(&["pull", "c", &b.url()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "a fork has an exit code of its own: {stderr}");
    assert!(stderr.contains("sequence number 1000") && stderr.contains("a fork"), "the fork is named: {stderr}");
    assert_eq!(laptop.ok(&["log", "c"]), before, "the second record is not taken into the DAG");
    let verify = laptop.run(&["verify", "c"]);
    assert_eq!(verify.status.code(), Some(7), "{verify:?}");
    assert!(String::from_utf8_lossy(&verify.stderr).contains("equivocation evidence"), "{verify:?}");
}

#[test]
fn a_folder_replica_takes_pushes_and_gives_clones_whole_or_sparse() {
    let home = Home::default();
    let Some(id) = capsule_with_tree(&home) else { return };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    home.ok(&["replica", "add", "c", &url]);
    let pushed = home.ok(&["push", "c"]);
    assert!(pushed.starts_with("pushed ") && !pushed.starts_with("pushed 0 "), "{pushed}");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for how in [&[][..], &["--sparse"][..]] {
        let laptop = same_user(&home);
        let source = format!("{url}#{id}");
        laptop.ok(&[&["clone"][..], how, &[source.as_str()]].concat());
        assert!(laptop.ok(&["verify", "c"]).starts_with("ok: "));
        assert_eq!(laptop.ok(&["log", "c"]), home.ok(&["log", "c"]));
        let Some(m) = Mounted::new(&laptop, "c", &["--read-only"]) else { return };
        sh(&format!("diff -r {} {}", src.display(), m.path("tree").display()));
    }
    // One round between the folder and a server, by hand: the server learns the capsule.
    let server = Server::start();
    let relayed = home.ok(&["sync", &url, &server.url()]);
    assert!(relayed.contains(&format!("of {id} from {url} to {}", server.url())), "{relayed}");
    let from_server = same_user(&home);
    from_server.ok(&["clone", &format!("{}#{id}", server.url())]);
    assert_eq!(from_server.ok(&["log", "c"]), home.ok(&["log", "c"]));
    // What the first machine writes later reaches a clone through the folder.
    let laptop = same_user(&home);
    laptop.ok(&["clone", &format!("{url}#{id}")]);
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        fs::write(m.path("later.txt"), b"through the folder").unwrap();
    }
    home.ok(&["push", "c"]);
    assert!(!laptop.ok(&["pull", "c"]).starts_with("pulled 0 "));
    let Some(m) = Mounted::new(&laptop, "c", &["--read-only"]) else { return };
    assert_eq!(fs::read(m.path("later.txt")).unwrap(), b"through the folder");
}

#[test]
fn a_replica_url_mounts_directly_and_shows_what_was_pushed_since() {
    let server = Server::start();
    let home = Home::default();
    let Some(id) = capsule_with_tree(&home) else { return };
    home.ok(&["push", "c", &server.url()]);
    let desktop = same_user(&home);
    let source = format!("{}#{id}", server.url());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    // A sparse local copy, named by the id: headers all there, data only as read (a mount
    // that reads nothing but its root leaves most of it on the server).
    if Mounted::new(&desktop, &source, &["--read-only"]).is_none() {
        return;
    }
    let verify = desktop.ok(&["verify", &id]);
    assert!(verify.contains("not held"), "{verify}");
    {
        let Some(m) = Mounted::new(&desktop, &source, &["--read-only"]) else { return };
        sh(&format!("diff -r {} {}", src.display(), m.path("tree").display()));
    }
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        fs::write(m.path("later.txt"), b"pushed after the first mount").unwrap();
    }
    home.ok(&["push", "c", &server.url()]);
    // Mounting the URL again brings the local copy up to the replica's heads first.
    let Some(m) = Mounted::new(&desktop, &source, &["--read-only"]) else { return };
    assert_eq!(fs::read(m.path("later.txt")).unwrap(), b"pushed after the first mount");
}

#[test]
fn an_old_head_object_put_back_in_a_folder_is_reported_and_nothing_moves_back() {
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    let f = home.file("a", b"a");
    home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    home.ok(&["push", "c", &url]);
    let device = fs::read_to_string(home.path().join("device")).unwrap().trim().to_owned();
    let head_object = dir.path().join(&id).join("heads").join(&device);
    let old = fs::read(&head_object).unwrap();
    for _ in 0..2 {
        home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    }
    home.ok(&["push", "c", &url]);
    let before = home.ok(&["log", "c"]);
    // Someone with write access to the folder puts the old statement back (a validly signed
    // object, only older): the reader is told, and keeps what it has.
    fs::write(&head_object, old).unwrap();
    let out = home.run(&["pull", "c", &url]);
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{warning}");
    assert!(warning.contains("lacks 2 signed records") && warning.contains("rolled back"), "{warning}");
    assert_eq!(home.ok(&["log", "c"]), before);
}

#[test]
fn a_remote_only_mount_fetches_about_what_is_read_not_the_whole_file() {
    let server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let big: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        super::write_fsynced(&m.path("big"), &big);
    }
    home.ok(&["push", "c", &server.url()]);
    // 1 MiB from the middle of a 32 MiB file (512 chunks of 64 KiB) through `mount URL#ID`.
    let laptop = same_user(&home);
    let source = format!("{}#{id}", server.url());
    {
        let Some(m) = Mounted::new(&laptop, &source, &["--read-only"]) else { return };
        let mut f = fs::File::open(m.path("big")).unwrap();
        let mut got = vec![0u8; 1 << 20];
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(16 << 20)).unwrap();
        std::io::Read::read_exact(&mut f, &mut got).unwrap();
        assert_eq!(got, big[16 << 20..17 << 20]);
    }
    let verify = laptop.ok(&["verify", &id]);
    // "ok: N records (S signed), M sub-records (B bytes) verified"
    let held: u64 = verify.split(" sub-records (").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    let not_held = count_before(&verify, "sub-records not held");
    // The 16 chunks read, what a reader reads ahead (the kernel's readahead, and the runs of
    // 16 sub-records holding what was read), and tree nodes: far from the file's 512 chunks.
    assert!((16..128).contains(&held) && not_held > 400, "{verify}");
}

#[test]
fn a_damaged_kept_copy_is_fetched_again_and_never_returned() {
    use std::os::unix::fs::FileExt;
    let server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    {
        let Some(m) = Mounted::new(&home, "c", &[]) else { return };
        super::write_fsynced(&m.path("big"), &big);
    }
    home.ok(&["push", "c", &server.url()]);
    let laptop = same_user(&home);
    laptop.ok(&["clone", "--sparse", &format!("{}#{id}", server.url())]);
    let read_big = || {
        let m = Mounted::new(&laptop, "c", &["--read-only"]).expect("mounted before");
        fs::read(m.path("big"))
    };
    // Kept copies of what was read, each garbled past the pack's magic (or a power cut that
    // kept their locations but not the bytes).
    let garble = || {
        for pack in fs::read_dir(laptop.store_path(&id).join("packs")).unwrap() {
            let pack = pack.unwrap().path();
            let len = fs::metadata(&pack).unwrap().len();
            fs::File::options()
                .write(true)
                .open(&pack)
                .unwrap()
                .write_all_at(&vec![0x5a; len as usize - 8], 8)
                .unwrap();
        }
    };
    if Mounted::new(&laptop, "c", &["--read-only"]).is_none() {
        return; // no FUSE here
    }
    assert_eq!(read_big().unwrap(), big);
    garble();
    // Each damaged copy fails its proof and comes again from the server.
    assert_eq!(read_big().unwrap(), big);
    // With no replica to ask, a damaged copy is EIO, never wrong bytes.
    garble();
    drop(server);
    let err = read_big().expect_err("damaged copies with no replica to fetch them from");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

#[test]
fn two_devices_of_one_key_are_branches_and_a_restored_backup_is_a_fork() {
    let server = Server::start();
    let laptop = Home::default();
    let id = laptop.ok(&["create", "c"]).trim().to_owned();
    let note = laptop.file("note", b"from the laptop");
    laptop.ok(&["append", "c", "--sign", note.to_str().unwrap()]);
    laptop.ok(&["push", "c", &server.url()]);
    let desktop = same_user(&laptop);
    desktop.ok(&["clone", &format!("{}#{id}", server.url())]);
    let write = |home: &Home, text: &str| {
        let f = home.file("edit", text.as_bytes());
        home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    };

    // Apart, each device writes with the same key; both pushes are taken.
    write(&laptop, "laptop, offline");
    write(&desktop, "desktop, offline");
    laptop.ok(&["push", "c", &server.url()]);
    desktop.ok(&["push", "c", &server.url()]);
    for home in [&laptop, &desktop] {
        home.ok(&["pull", "c", &server.url()]);
        let verify = home.run(&["verify", "c"]);
        assert!(verify.status.success(), "{verify:?}");
        assert!(!String::from_utf8_lossy(&verify.stderr).contains("equivocation"), "{verify:?}");
    }
    let sorted = |home: &Home| {
        let mut lines: Vec<String> = home.ok(&["log", "c"]).lines().map(str::to_owned).collect();
        lines.sort();
        lines
    };
    assert_eq!(sorted(&laptop), sorted(&desktop), "both devices hold both branches");
    let log = laptop.ok(&["log", "c"]);
    let devices: std::collections::HashSet<&str> =
        log.lines().filter_map(|l| l.split(' ').find(|w| w.starts_with("device="))).collect();
    assert_eq!(devices.len(), 2, "the laptop's records and the desktop's: {log}");

    // The desktop's home is backed up, writes on, and is later restored from the backup: the
    // restored copy numbers its next record as the desktop already did, which is a fork.
    let restored = Home::default();
    let copied = Command::new("cp").arg("-a").arg(desktop.path().join(".")).arg(restored.path()).status().unwrap();
    assert!(copied.success());
    write(&desktop, "desktop, later");
    desktop.ok(&["push", "c", &server.url()]);
    write(&restored, "desktop, restored");
    let out = restored.run(&["push", "c", &server.url()]);
    assert!(!out.status.success(), "a fork was taken: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("a fork"), "{out:?}");
    // The server kept the forked record out, and its evidence: a pull takes the desktop's
    // new record, learns of the fork, and says so (exit 7).
    let out = laptop.run(&["pull", "c", &server.url()]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pulled 1 records"), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ALARM: a replica holds evidence of a fork"), "{out:?}");
}

#[test]
fn a_record_stream_refused_part_way_says_why() {
    let mut server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    home.ok(&["push", "c", &server.url()]);
    let head = RecordHash::from_hex(home.ok(&["log", "c"]).split(' ').next().unwrap()).unwrap();
    let remote = capsulefs::replica::remote::Remote::new(&server.url(), CapsuleId::from_hex(&id).unwrap()).unwrap();
    use capsulefs::replica::Replica;
    // A refused batch (an unsigned record alone), then batches the client goes on sending
    // before it hears: the server reads on past the refusal, so the answer says why ...
    let big = |i: u8| vec![Bundle { record: vec![1; 100], payloads: vec![vec![i; 30 << 20]] }];
    let mut stream = remote.put_stream();
    stream.send(vec![record_bytes(&home, &id, head, 5, false)]).unwrap();
    let mut said = Ok(());
    for i in 0..3 {
        said = said.and_then(|()| stream.send(big(i)));
    }
    let said = said.and_then(|()| stream.finish(Vec::new(), None)).unwrap_err().to_string();
    assert!(said.contains("refused the records as unverified") && said.contains("no signed descendant"), "{said}");
    // ... and past what it reads on, the client says the stream was cut and where to look.
    let mut stream = remote.put_stream();
    stream.send(vec![record_bytes(&home, &id, head, 5, false)]).unwrap();
    let cut = match (0..12).try_for_each(|i| stream.send(big(i))) {
        Ok(()) => stream.finish(Vec::new(), None).unwrap_err(),
        Err(e) => e,
    };
    assert!(cut.to_string().contains("closed the record stream before taking every batch"), "{cut}");
    assert!(server.alive());
    assert!(server.log().contains("refused"), "the server logs why");
}
