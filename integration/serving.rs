//! `capsulefs serve` as it faces the internet: who may host a capsule here (403), what each
//! creator may take (507), a thousand capsules held with descriptors bounded, and each flood
//! `net::limits` bounds while an honest client pushes, pulls and long-polls. Hostile clients
//! connect from 127.0.0.x addresses of their own (the loopback answers every 127/8 address),
//! the honest one from 127.0.0.1. Each test ends only the servers it started.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use capsulefs::crypto::keys::KeyFolder;
use capsulefs::crypto::sign;
use capsulefs::record::metadata::SignedMetadata;

use super::Home;
use super::replicas::same_user;
use super::server::Server;

/// Each hostile client's address.
const IDLER: [u8; 4] = [127, 0, 0, 2];
const TRICKLERS: [[u8; 4]; 2] = [[127, 0, 0, 3], [127, 0, 0, 4]];
const POLLER: [u8; 4] = [127, 0, 0, 5];
const SLOW_SENDER: [u8; 4] = [127, 0, 0, 6];
const OVERSIZER: [u8; 4] = [127, 0, 0, 7];

fn public_key(home: &Home) -> String {
    home.ok(&["key", "show"]).trim().to_owned()
}

/// The capsule folders the server has, made or half-made.
fn folders(server: &Server) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(server.store_dir().join("capsules"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Bytes of the files under `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { bytes_under(&entry.path()) } else { meta.len() };
    }
    total
}

/// The status code of the answer on `s`, waiting at most `wait` for it (0: none came, or the
/// server closed without one).
fn status_within(s: &mut TcpStream, wait: Duration) -> u16 {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Says `said` on a new connection, then reads until the server closes it or `wait` passes:
/// how the read ended, and what came.
fn said_then_read(server: &Server, said: &[u8], wait: Duration) -> (std::io::Result<usize>, Vec<u8>) {
    let mut s = server.connect_from(super::server::LOOPBACK);
    s.write_all(said).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let mut answer = Vec::new();
    let closed = s.read_to_end(&mut answer);
    (closed, answer)
}

/// The hashes of capsule `c`'s records in `home`, newest first (a push may sign a head that
/// stays unsigned in the log of the home that pushed it).
fn record_hashes(home: &Home) -> Vec<String> {
    home.ok(&["log", "c"]).lines().map(|l| l.split(' ').next().unwrap().to_owned()).collect()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_allow_listed_server_hosts_its_creators_and_members_and_keeps_nothing_of_a_stranger() {
    let owner = Home::default();
    let id = owner.ok(&["create", "c"]).trim().to_owned();
    let creators = owner.file("creators", b"# who may create capsules here\n");
    let server = Server::start_with(
        tempfile::tempdir().unwrap(),
        "127.0.0.1:0",
        &["--allow-creator".into(), public_key(&owner), "--allow-creators".into(), creators.display().to_string()],
    );
    owner.ok(&["replica", "add", "c", &server.url()]);
    owner.ok(&["push", "c"]);

    // A stranger's capsule: 403 with what to do, and not a file of it left.
    let stranger = Home::default();
    let theirs = stranger.ok(&["create", "s"]).trim().to_owned();
    let refused = stranger.run(&["push", "s", &server.url()]);
    assert_eq!(refused.status.code(), Some(6), "{refused:?}");
    assert!(stderr(&refused).contains("--allow-creator"), "the refusal says what to do: {}", stderr(&refused));
    assert_eq!(folders(&server), vec![id.clone()]);
    assert!(server.metrics().contains("reason=\"creator_not_allowed\""));

    // A member the owner invited pushes to the owner's capsule: the gate checks their rights,
    // not the creators list.
    let member = Home::default();
    member.ok(&["key", "new"]);
    let token = super::last_line(&owner.ok(&["invite", "c", &public_key(&member), "--level", "write"]));
    member.ok(&["join", &token]);
    member.ok(&["append", "c", member.file("note", b"from a member").to_str().unwrap()]);
    member.ok(&["push", "c", &server.url()]);
    assert_eq!(server.heads(&id).len(), 1);
    owner.ok(&["pull", "c"]);
    assert_eq!(record_hashes(&owner), record_hashes(&member));

    // The operator adds the stranger to the file and sends SIGHUP (`systemctl reload`).
    fs::write(&creators, format!("# who may create capsules here\n{}\n", public_key(&stranger))).unwrap();
    assert_eq!(unsafe { libc::kill(server.pid() as i32, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stranger.run(&["push", "s", &server.url()]).status.success() {
        assert!(Instant::now() < deadline, "the reloaded list never let the stranger in:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(folders(&server), {
        let mut both = vec![id, theirs];
        both.sort();
        both
    });
}

#[test]
fn quotas_refuse_with_507_and_keep_nothing_of_what_they_refuse() {
    let server = Server::start_with(
        tempfile::tempdir().unwrap(),
        "127.0.0.1:0",
        &[
            "--open".into(),
            "--max-capsules-per-creator".into(),
            "1".into(),
            "--max-mib-per-creator".into(),
            "2".into(),
            "--max-names-per-creator".into(),
            "1".into(),
        ],
    );
    let home = Home::default();
    let id = home.ok(&["create", "c1"]).trim().to_owned();
    home.ok(&["replica", "add", "c1", &server.url()]);
    home.ok(&["push", "c1"]);

    // A second capsule of the same creator.
    home.ok(&["create", "c2"]);
    let refused = home.run(&["push", "c2", &server.url()]);
    assert_eq!(refused.status.code(), Some(6), "{refused:?}");
    assert!(stderr(&refused).contains("507 over quota"), "{}", stderr(&refused));
    assert_eq!(folders(&server), vec![id.clone()]);

    // A second name.
    home.ok(&["name", "register", "first", "--capsule", "c1"]);
    let refused = home.run(&["name", "register", "second", "--capsule", "c1"]);
    assert_eq!(refused.status.code(), Some(6), "{refused:?}");
    assert!(stderr(&refused).contains("quota"), "{}", stderr(&refused));

    // More bytes than the creator's share: the batch is refused whole, and the bytes the
    // server had written ahead of the gate are given back.
    let heads = server.heads(&id);
    let packs = server.capsule_store(&id).join("packs");
    let before = bytes_under(&packs);
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    home.ok(&["append", "c1", home.file("big", &big).to_str().unwrap()]);
    let refused = home.run(&["push", "c1"]);
    assert_eq!(refused.status.code(), Some(6), "{refused:?}");
    assert!(stderr(&refused).contains("quota"), "{}", stderr(&refused));
    assert_eq!(server.heads(&id), heads);
    assert_eq!(bytes_under(&packs), before, "refused bytes kept in {}", packs.display());

    // What each creator takes is in /metrics.
    let key = public_key(&home);
    let metrics = server.metrics();
    for line in [
        format!("capsulefs_creator_capsules{{creator=\"{key}\"}} 1"),
        format!("capsulefs_creator_names{{creator=\"{key}\"}} 1"),
    ] {
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    assert!(metrics.contains("reason=\"over_quota\""), "{metrics}");
}

#[test]
fn a_thousand_capsules_are_held_with_descriptors_threads_and_memory_bounded() {
    let mut server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    home.ok(&["push", "c", &server.url()]);
    // A thousand more capsules of one creator, each made, then read (which opens its store),
    // by four clients at once as a busy server sees them.
    let signed = more_capsules(&home, &server, &id, 1000);
    let server_ref = &server;
    std::thread::scope(|s| {
        for part in signed.chunks(250) {
            s.spawn(move || {
                for (hex, body) in part {
                    assert_eq!(server_ref.raw("POST", &format!("/v1/capsules/{hex}/metadata"), body), 200, "{hex}");
                }
            });
        }
    });
    let (mut most_fds, mut most_threads) = (0, 0);
    std::thread::scope(|s| {
        let readers: Vec<_> = signed
            .chunks(250)
            .map(|part| {
                s.spawn(move || {
                    for (hex, _) in part {
                        assert_eq!(server_ref.raw("GET", &format!("/v1/capsules/{hex}/heads"), b""), 200, "{hex}");
                    }
                })
            })
            .collect();
        while readers.iter().any(|r| !r.is_finished()) {
            most_fds = most_fds.max(server_ref.open_fds());
            most_threads = most_threads.max(server_ref.status("Threads"));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let metrics = server.metrics();
    assert!(metrics.contains("capsulefs_capsules_held 1001\n"), "{metrics}");
    let open: usize =
        metrics.lines().find_map(|l| l.strip_prefix("capsulefs_capsules_open ")).and_then(|n| n.parse().ok()).unwrap();
    assert!(open <= 64, "{open} stores open");
    // Each open store takes about nine descriptors and a thread: 64 of them, and the rest.
    assert!(most_fds < 900, "{most_fds} descriptors open");
    assert!(most_threads < 250, "{most_threads} threads");
    assert!(server.status("VmHWM") < 512 << 10, "{} KiB at most", server.status("VmHWM"));
    assert!(server.alive());
    // Restarted, the server lists them all without opening one.
    let (store, addr) = server.kill();
    let server = Server::start_on(store, &addr);
    let listed: Vec<capsulefs::record::CapsuleId> = server.get_borsh("/v1/capsules");
    assert_eq!(listed.len(), 1001);
    assert!(server.metrics().contains("capsulefs_capsules_open 0\n"));
}

/// A record stream that sends its head and one byte, then nothing (chunked: it says no length).
fn trickling_stream(server: &Server, from: [u8; 4], id: &str) -> TcpStream {
    let mut s = server.connect_from(from);
    let head = format!(
        "POST /v1/capsules/{id}/record-stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n\0\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    s
}

/// A request that declares `declared` bytes of body and sends ten.
fn slow_body(server: &Server, from: [u8; 4], path: &str, declared: usize) -> TcpStream {
    let mut s = server.connect_from(from);
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n0123456789");
    s.write_all(head.as_bytes()).unwrap();
    s
}

/// A long poll of the heads that waits up to `wait` seconds for them to change from `digest`.
fn long_poll(server: &Server, from: [u8; 4], id: &str, digest: &str, wait: u64) -> TcpStream {
    let mut s = server.connect_from(from);
    let head = format!("GET /v1/capsules/{id}/heads?known={digest}&wait={wait} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s
}

#[test]
fn every_flood_at_once_leaves_an_honest_client_served_and_the_server_small() {
    let mut server = Server::start();
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    home.ok(&["replica", "add", "c", &server.url()]);
    home.ok(&["push", "c"]);
    let digest = capsulefs::wire::protocol::heads_digest(&server.heads(&id));
    let fds_before = server.open_fds();

    // Idle sockets from one address: it keeps 64 of them; the rest are closed as they come.
    let idle: Vec<TcpStream> = (0..300).map(|_| server.connect_from(IDLER)).collect();
    // Trickling record streams: two an address hold their turns; a third is told to wait.
    let mut trickles: Vec<TcpStream> =
        TRICKLERS.iter().flat_map(|&from| [0, 1].map(|_| trickling_stream(&server, from, &id))).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.metrics().contains("reason=\"peer_streams_busy\"") {
        assert!(Instant::now() < deadline, "a third stream from one address was never refused");
        let mut third = trickling_stream(&server, TRICKLERS[0], &id);
        if status_within(&mut third, Duration::from_secs(2)) == 429 {
            break;
        }
    }
    // Long polls from one address: sixteen wait; the next is answered at once.
    let polls: Vec<TcpStream> = (0..16).map(|_| long_poll(&server, POLLER, &id, &digest, 60)).collect();
    let mut over = long_poll(&server, POLLER, &id, &digest, 60);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_within(&mut over, Duration::from_secs(2)) != 200 {
        assert!(Instant::now() < deadline, "the seventeenth poll was never answered before its wait");
        over = long_poll(&server, POLLER, &id, &digest, 60); // it may have beaten one of the sixteen
    }
    // Bodies that say 50 MiB and send ten bytes, bodies over the limit, bodies of no length.
    let records = format!("/v1/capsules/{id}/records");
    let mut slow: Vec<TcpStream> = (0..20).map(|_| slow_body(&server, SLOW_SENDER, &records, 50 << 20)).collect();
    assert_eq!(server.raw_from(OVERSIZER, "POST", &records, 100 << 20, &[0; 1024]), 413);
    let mut no_length = server.connect_from(OVERSIZER);
    no_length
        .write_all(format!("POST {records} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes())
        .unwrap();
    assert_eq!(status_within(&mut no_length, Duration::from_secs(30)), 411);

    // Meanwhile the honest client long-polls, pushes, and another of its machines clones and
    // pulls.
    let url = server.url();
    let honest_poll = {
        let (url, id, digest) = (url.clone(), id.clone(), digest.clone());
        std::thread::spawn(move || {
            std::process::Command::new("curl")
                .args(["-sf", "--max-time", "90", &format!("{url}/v1/capsules/{id}/heads?known={digest}&wait=60")])
                .output()
                .unwrap()
        })
    };
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    home.ok(&["append", "c", home.file("one", &data).to_str().unwrap()]);
    home.ok(&["push", "c"]);
    let laptop = same_user(&home);
    laptop.ok(&["clone", &format!("{url}#{id}")]);
    home.ok(&["append", "c", home.file("two", &data[..1000]).to_str().unwrap()]);
    home.ok(&["push", "c"]);
    laptop.ok(&["pull", "c", &url]);
    assert_eq!(record_hashes(&laptop), record_hashes(&home));
    let polled = honest_poll.join().unwrap();
    assert!(polled.status.success(), "{polled:?}");
    let polled: Vec<capsulefs::record::RecordHash> = borsh::from_slice(&polled.stdout).unwrap();
    assert_ne!(capsulefs::wire::protocol::heads_digest(&polled), digest, "the poll woke with the new heads");

    // What the floods hold of the server is bounded: descriptors by the per-address caps,
    // memory by the byte budget (the bodies said 1 GiB in all).
    let fds = server.open_fds();
    assert!(fds < fds_before + 64 + 4 + 16 + 20 + 40, "{fds} descriptors open ({fds_before} before)");
    assert!(server.status("VmHWM") < 512 << 10, "{} KiB at most", server.status("VmHWM"));

    // The trickles and the slow bodies are cut once they fall below the minimum rate.
    for s in trickles.iter_mut().chain(slow.iter_mut()) {
        assert_ne!(status_within(s, Duration::from_secs(60)), 0, "a trickle was never cut");
    }
    let metrics = server.metrics();
    assert!(metrics.contains("reason=\"slow_body\""), "{metrics}");
    assert!(server.log().contains("of its connections are open"), "idle sockets past the cap were closed");
    drop((idle, polls));
    assert!(server.alive());
}

#[test]
fn a_silent_connection_is_closed_after_the_idle_time_and_its_session_logged() {
    let mut server =
        Server::start_with(tempfile::tempdir().unwrap(), "127.0.0.1:0", &["--idle-timeout".into(), "1".into()]);
    for said in [&b""[..], b"POST /v1/capsules/x/records HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc"] {
        let (closed, _) = said_then_read(&server, said, Duration::from_secs(20));
        assert!(closed.is_ok(), "the server closed it (not our read timeout): {closed:?}");
    }
    // Each connection is one line of the server's log when it ends.
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.log().matches("closed after idling").count() < 2 {
        assert!(Instant::now() < deadline, "no session lines:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.log().contains("peer 127.0.0.1:"), "{}", server.log());
    assert!(server.alive());
}

#[test]
fn the_shipped_config_file_is_read_flags_win_and_a_server_runs_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().display().to_string();
    // The example as shipped, its /etc paths moved into the test's folder.
    let example =
        fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/serve-example.toml"))
            .unwrap()
            .replace("/etc/capsulefs", &at);
    let config = dir.path().join("serve.toml");
    fs::write(&config, &example).unwrap();
    let owner = Home::default();
    owner.ok(&["key", "new"]);
    fs::write(dir.path().join("creators"), format!("# the team\n{}\n", public_key(&owner))).unwrap();
    super::sh(&format!(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
         -keyout {at}/key.pem -out {at}/cert.pem 2>/dev/null"
    ));
    let config = config.to_str().unwrap();
    let checked = owner.ok(&["serve", "--config", config, "--check"]);
    for line in [
        "listen 0.0.0.0:7443".to_owned(),
        format!("tls certificate {at}/cert.pem, key {at}/key.pem"),
        format!("creators 0 creators allowed, and the 1 in {at}/creators"),
        "quotas 1024 capsules, 1048576 MiB, 1024 names a creator".to_owned(),
        "limits idle 90 s, 1024 connections (64 an address), 64 stores open".to_owned(),
    ] {
        assert!(checked.lines().any(|l| l == line), "'{line}' in:\n{checked}");
    }
    // Flags win over the file.
    let checked = owner.ok(&[
        "serve",
        "--config",
        config,
        "--check",
        "--listen",
        "127.0.0.1:0",
        "--max-open-stores",
        "8",
        "--open",
    ]);
    for line in ["listen 127.0.0.1:0", "creators open to any creator"] {
        assert!(checked.lines().any(|l| l == line), "'{line}' in:\n{checked}");
    }
    assert!(checked.contains("8 stores open"), "{checked}");
    // A key the file may not have is refused, naming the file.
    fs::write(dir.path().join("bad.toml"), "listen = \"127.0.0.1:0\"\nlisen = 1\n").unwrap();
    let bad = owner.run(&["serve", "--config", &format!("{at}/bad.toml"), "--check"]);
    assert!(!bad.status.success() && stderr(&bad).contains("bad.toml"), "{bad:?}");

    // A server run by a file alone (its listen address and store given as flags by the
    // harness): the creators it names push, a stranger is refused.
    let plain = example.split("[tls]").next().unwrap().to_owned() + &example[example.find("[quotas]").unwrap()..];
    fs::write(dir.path().join("plain.toml"), plain).unwrap();
    let server = Server::start_with(
        tempfile::tempdir().unwrap(),
        "127.0.0.1:0",
        &["--config".into(), format!("{at}/plain.toml")],
    );
    owner.ok(&["create", "c"]);
    owner.ok(&["push", "c", &server.url()]);
    let stranger = Home::default();
    stranger.ok(&["create", "s"]);
    assert_eq!(stranger.run(&["push", "s", &server.url()]).status.code(), Some(6));
}

/// `count` more capsules of the creator of `home`'s capsule `id` on `server`, as signed
/// metadata, each with its id in hex.
fn more_capsules(home: &Home, server: &Server, id: &str, count: u32) -> Vec<(String, Vec<u8>)> {
    let me = KeyFolder::load(&home.path().join("keys")).unwrap().identities()[0].clone();
    let out = std::process::Command::new("curl")
        .args(["-sf", &format!("{}/v1/capsules/{id}/metadata", server.url())])
        .output()
        .unwrap();
    let first = SignedMetadata::decode(&out.stdout).unwrap();
    (0..count)
        .map(|i| {
            let mut metadata = first.metadata.clone();
            metadata.name = format!("more{i}");
            metadata.nonce[..4].copy_from_slice(&i.to_le_bytes());
            let id = metadata.id();
            (id.to_hex(), SignedMetadata { signature: sign::sign_metadata(me.key(), &id), metadata }.encode())
        })
        .collect()
}

#[test]
fn stores_closed_while_others_open_them_again_fail_no_request() {
    let server = Server::start_with(
        tempfile::tempdir().unwrap(),
        "127.0.0.1:0",
        &["--open".into(), "--max-open-stores".into(), "1".into()],
    );
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    home.ok(&["push", "c", &server.url()]);
    let capsules = more_capsules(&home, &server, &id, 3);
    for (hex, body) in &capsules {
        assert_eq!(server.raw("POST", &format!("/v1/capsules/{hex}/metadata"), body), 200);
    }
    // Four clients over three capsules with one store kept open: each request closes the
    // store another one opens next.
    let failed = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for client in 0..4 {
            let (server, capsules, failed) = (&server, &capsules, &failed);
            s.spawn(move || {
                for i in 0..60 {
                    let (hex, _) = &capsules[(client + i) % capsules.len()];
                    if server.raw("GET", &format!("/v1/capsules/{hex}/heads"), b"") != 200 {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(failed.into_inner(), 0, "requests failed: {}", server.log());
}

/// The bytes `/metrics` says `creator`'s capsules take.
fn creator_bytes(server: &Server, creator: &str) -> u64 {
    let prefix = format!("capsulefs_creator_bytes{{creator=\"{creator}\"}} ");
    server.metrics().lines().find_map(|l| l.strip_prefix(&prefix).and_then(|n| n.parse().ok())).unwrap()
}

#[test]
fn pushes_racing_for_the_last_of_a_quota_never_pass_it() {
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let me = KeyFolder::load(&home.path().join("keys")).unwrap().identities()[0].clone();
    let creator = me.writer().to_hex();
    let server = Server::start();
    home.ok(&["push", "c", &server.url()]);
    // Restarted with room for two more records of 3 MiB (and what a restart adds to the
    // store), and four sent at once (each from a device of its own, on the capsule's head).
    let quota_mib = creator_bytes(&server, &creator).div_ceil(1 << 20) + 8;
    let (store, addr) = server.kill();
    let quota = ["--open", "--max-mib-per-creator", &quota_mib.to_string()].map(String::from);
    let server = Server::start_with(store, &addr, &quota);
    let (capsule, head) = (capsulefs::record::CapsuleId::from_hex(&id).unwrap(), server.heads(&id)[0]);
    let path = format!("/v1/capsules/{id}/records");
    let pushes: Vec<Vec<u8>> = (0..4u8)
        .map(|i| {
            let device = capsulefs::record::DeviceId([10 + i; 16]);
            let record = super::server::data_record(&me, capsule, device, (head, 1), vec![i; 3 << 20], true);
            capsulefs::record::codec::encode(&vec![record])
        })
        .collect();
    let answers: Vec<u16> = std::thread::scope(|s| {
        let sent: Vec<_> = pushes.iter().map(|body| s.spawn(|| server.raw("POST", &path, body))).collect();
        sent.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|a| *a == 200 || *a == 507), "{answers:?}");
    assert!(answers.contains(&200) && answers.contains(&507), "{answers:?}");
    assert!(creator_bytes(&server, &creator) <= quota_mib << 20, "{answers:?}");
}

#[test]
fn routes_are_told_apart_by_what_they_are_and_http2_is_not_spoken() {
    let server = Server::start();
    // A name that looks like a record stream is a body like any other: it must say its length.
    let mut s = server.connect_from(super::server::LOOPBACK);
    s.write_all(
        b"POST /v1/names/record-stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(status_within(&mut s, Duration::from_secs(30)), 411);
    // An HTTP/2 preface is not taken for a connection to hold: answered as HTTP/1.1, or
    // closed; and one left half-said is closed at the header-read time, not the idle time.
    for said in [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], b"PRI * HTTP/2.0\r\n"] {
        let (closed, answer) = said_then_read(&server, said, Duration::from_secs(45));
        assert!(closed.is_ok(), "closed by the server within 45 s, before its idle time: {closed:?}");
        assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 "), "{:?}", String::from_utf8_lossy(&answer));
    }
}
