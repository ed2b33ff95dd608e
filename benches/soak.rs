//! `make bench-soak`: an honest client's push and pull latency against a `capsulefs serve`
//! while every flood `net::limits` bounds runs at once from loopback addresses of their own,
//! against the same client on the same server idle, in one run.
//!
//! The floods (each from its own 127.0.0.x addresses, for SOAK_SECS seconds, 45 by default):
//! idle sockets; record streams that trickle a byte every few seconds; long polls of the
//! heads; bodies that declare 60 MiB and send ten bytes a second; bodies over the size limit
//! and garbage; records signed by a stranger, 1 MiB each, pushed as bodies and as streams to
//! a capsule nobody else writes during the run. The honest client appends 256 KiB and pushes,
//! and its other machine pulls, SOAK_ROUNDS times (40) in each phase, and for at least
//! SOAK_SECS under the floods.
//!
//! Last line: `soak: honest_p99_vs_idle=X rss_mib=Y open_fds=Z refused_bytes_kept=W`: X the
//! worse of push's and pull's p99 under the floods over idle, Y the server's peak resident
//! memory (VmHWM), Z the most descriptors it held, W the bytes the capsule that took only
//! refused uploads grew by. Goals: X <= 3.0, Y <= 512, W = 0.

// The integration tests' server harness; the bench uses part of it.
#[allow(dead_code)]
#[path = "../integration/server.rs"]
mod server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capsulefs::crypto::keys::KeyFolder;
use capsulefs::record::codec;
use capsulefs::record::{CapsuleId, DeviceId, RecordHash};
use capsulefs::wire::Bundle;
use capsulefs::wire::protocol::{frame, heads_digest};
use server::Server;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A capsulefs home of the run's own.
struct Home(tempfile::TempDir);

impl Home {
    fn new() -> Self {
        Home(tempfile::tempdir().unwrap())
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_capsulefs"))
            .env("CAPSULEFS_HOME", self.0.path())
            .env_remove("CAPSULEFS_LOG")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "capsulefs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Another machine of the same person: the same keys, nothing else.
    fn same_user(&self) -> Home {
        let other = Home::new();
        let keys = other.0.path().join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        for key in std::fs::read_dir(self.0.path().join("keys")).unwrap() {
            let key = key.unwrap().path();
            if key.extension().is_some_and(|e| e == "key") {
                std::fs::copy(&key, keys.join(key.file_name().unwrap())).unwrap();
            }
        }
        other
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

/// Deterministic incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
    out
}

/// One phase's push and pull latencies, as the bench prints them.
fn latencies(push: &[f64], pull: &[f64]) -> String {
    let ms = |v: &[f64], p: f64| percentile(v, p) * 1e3;
    format!(
        "push p50 {:.0} ms p99 {:.0} ms, pull p50 {:.0} ms p99 {:.0} ms ({} rounds)",
        ms(push, 0.5),
        ms(push, 0.99),
        ms(pull, 0.5),
        ms(pull, 0.99),
        push.len()
    )
}

fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Apparent bytes of the files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() { bytes_under(&entry.path()) } else { meta.len() };
    }
    total
}

/// One honest round: append 256 KiB and push it; the other machine pulls. Seconds each.
fn honest_round(home: &Home, laptop: &Home, url: &str, round: u64) -> (f64, f64) {
    let file = home.file("round", &noise(round, 256 << 10));
    home.ok(&["append", "c", file.to_str().unwrap()]);
    let started = Instant::now();
    home.ok(&["push", "c"]);
    let push = started.elapsed().as_secs_f64();
    let started = Instant::now();
    laptop.ok(&["pull", "c", url]);
    (push, started.elapsed().as_secs_f64())
}

/// The honest client's rounds: at least `rounds`, and for at least `at_least`; the server's
/// descriptors sampled after each.
fn honest_phase(
    server: &Server,
    home: &Home,
    laptop: &Home,
    rounds: u64,
    at_least: Duration,
    first: u64,
) -> (Vec<f64>, Vec<f64>, usize) {
    let (mut pushes, mut pulls, mut most_fds) = (Vec::new(), Vec::new(), 0);
    let started = Instant::now();
    let mut round = first;
    while (round - first) < rounds || started.elapsed() < at_least {
        let (push, pull) = honest_round(home, laptop, &server.url(), round);
        pushes.push(push);
        pulls.push(pull);
        most_fds = most_fds.max(server.open_fds());
        round += 1;
    }
    (pushes, pulls, most_fds)
}

/// A record of capsule `capsule` signed by `stranger`, who holds no right in it, with one
/// payload of 1 MiB: refused by the gate, whatever way it comes.
fn stranger_record(
    stranger: &capsulefs::crypto::keys::Identity,
    capsule: CapsuleId,
    parent: RecordHash,
    seq: u64,
) -> Bundle {
    server::data_record(stranger, capsule, DeviceId([7; 16]), (parent, seq), noise(seq, 1 << 20), true)
}

/// Hostile clients running until `stop`, each flood on its own thread, counting what they
/// sent.
struct Floods {
    stop: Arc<AtomicBool>,
    threads: Vec<(&'static str, std::thread::JoinHandle<()>)>,
    sent: Arc<AtomicU64>,
}

/// Whether the server has closed `s` (or answered on it).
fn ended(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let ended = !matches!(s.peek(&mut [0]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    ended
}

/// Keeps `count` connections from each of `addrs` open, made by `open` and fed by `feed`
/// every `every`; one the server ended is opened again.
fn hold(
    server: &Server,
    stop: &AtomicBool,
    addrs: &[[u8; 4]],
    count: usize,
    every: Duration,
    open: impl Fn(&mut TcpStream),
    feed: impl Fn(&mut TcpStream),
) {
    let connect = |addr: [u8; 4]| {
        let mut s = server.connect_from(addr);
        open(&mut s);
        s
    };
    let mut held: Vec<([u8; 4], TcpStream)> =
        addrs.iter().flat_map(|&a| (0..count).map(move |_| a)).map(|a| (a, connect(a))).collect();
    while !stop.load(Ordering::Relaxed) {
        for (addr, s) in held.iter_mut() {
            if ended(s) {
                *s = connect(*addr);
            } else {
                feed(s);
            }
        }
        std::thread::sleep(every);
    }
}

fn start_floods(server: &Arc<Server>, target: &str, target_head: RecordHash, polled: &str) -> Floods {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let addrs = |first: u8| -> Vec<[u8; 4]> { (first..first + 4).map(|d| [127, 0, 0, d]).collect() };
    let nothing = |_: &mut TcpStream| {};
    let spawn = |name: &'static str, work: Box<dyn FnOnce() + Send>| (name, std::thread::spawn(work));
    {
        let (server, stop) = (server.clone(), stop.clone());
        threads.push(spawn(
            "idle sockets (4 addresses x 100)",
            Box::new(move || hold(&server, &stop, &addrs(2), 100, Duration::from_secs(1), nothing, nothing)),
        ));
    }
    {
        let (server, stop, path) = (server.clone(), stop.clone(), format!("/v1/capsules/{target}/record-stream"));
        threads.push(spawn(
            "trickling record streams (4 addresses x 3)",
            Box::new(move || {
                let open = |s: &mut TcpStream| {
                    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
                    let _ = s.write_all(head.as_bytes());
                };
                let feed = |s: &mut TcpStream| {
                    let _ = s.write_all(b"1\r\n\0\r\n");
                };
                hold(&server, &stop, &addrs(6), 3, Duration::from_secs(5), open, feed)
            }),
        ));
    }
    {
        let (server, stop) = (server.clone(), stop.clone());
        let path = format!("/v1/capsules/{}/heads?known={polled}&wait=60", target);
        threads.push(spawn(
            "long polls (4 addresses x 20)",
            Box::new(move || {
                let open = |s: &mut TcpStream| {
                    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
                };
                hold(&server, &stop, &addrs(10), 20, Duration::from_secs(1), open, nothing)
            }),
        ));
    }
    {
        let (server, stop, path) = (server.clone(), stop.clone(), format!("/v1/capsules/{target}/records"));
        threads.push(spawn(
            "slow bodies declaring 60 MiB (4 addresses x 20)",
            Box::new(move || {
                let open = |s: &mut TcpStream| {
                    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", 60 << 20);
                    let _ = s.write_all(head.as_bytes());
                };
                let feed = |s: &mut TcpStream| {
                    let _ = s.write_all(b"0123456789");
                };
                hold(&server, &stop, &addrs(14), 20, Duration::from_secs(1), open, feed)
            }),
        ));
    }
    {
        let (server, stop, sent, path) =
            (server.clone(), stop.clone(), sent.clone(), format!("/v1/capsules/{target}/records"));
        threads.push(spawn(
            "bodies over the limit, and garbage",
            Box::new(move || {
                while !stop.load(Ordering::Relaxed) {
                    server.raw_from([127, 0, 0, 18], "POST", &path, 100 << 20, &[0; 4096]);
                    server.raw_from([127, 0, 0, 18], "POST", &path, 64 << 10, &noise(1, 64 << 10));
                    sent.fetch_add(2, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }),
        ));
    }
    {
        let (server, stop, sent, target) = (server.clone(), stop.clone(), sent.clone(), target.to_owned());
        threads.push(spawn(
            "a stranger's 1 MiB records, as bodies and streams",
            Box::new(move || {
                let stranger = Home::new();
                stranger.ok(&["key", "new"]);
                let me = KeyFolder::load(&stranger.0.path().join("keys")).unwrap().identities()[0].clone();
                let capsule = CapsuleId::from_hex(&target).unwrap();
                let mut seq = 1;
                while !stop.load(Ordering::Relaxed) {
                    let batch = vec![stranger_record(&me, capsule, target_head, seq), stranger_record(&me, capsule, target_head, seq + 1)];
                    seq += 2;
                    let body = codec::encode(&batch);
                    server.raw_from([127, 0, 0, 19], "POST", &format!("/v1/capsules/{target}/records"), body.len(), &body);
                    let framed = frame(&body);
                    let mut s = server.connect_from([127, 0, 0, 19]);
                    let head = format!(
                        "POST /v1/capsules/{target}/record-stream HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        framed.len()
                    );
                    let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(&framed));
                    let _ = s.read_to_end(&mut Vec::new());
                    sent.fetch_add(2, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }),
        ));
    }
    Floods { stop, threads, sent }
}

fn main() {
    let rounds = env_number("SOAK_ROUNDS", 40);
    let flood_secs = Duration::from_secs(env_number("SOAK_SECS", 45));
    let home = Home::new();
    home.ok(&["key", "new"]);
    let key = home.ok(&["key", "show"]).trim().to_owned();
    // A server for the creators its operator names: this client.
    let server =
        Arc::new(Server::start_with(tempfile::tempdir().unwrap(), "127.0.0.1:0", &["--allow-creator".into(), key]));
    let url = server.url();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    let target = home.ok(&["create", "x"]).trim().to_owned();
    for name in ["c", "x"] {
        home.ok(&["replica", "add", name, &url]);
        home.ok(&["push", name]);
    }
    let laptop = home.same_user();
    laptop.ok(&["clone", &format!("{url}#{id}")]);
    let target_heads = server.heads(&target);
    let target_packs = server.capsule_store(&target).join("packs");

    honest_phase(&server, &home, &laptop, 3, Duration::ZERO, 0); // warm up
    let (idle_push, idle_pull, idle_fds) = honest_phase(&server, &home, &laptop, rounds, Duration::ZERO, 100);
    println!("idle server: {}, {idle_fds} descriptors", latencies(&idle_push, &idle_pull));

    let kept_before = bytes_under(&target_packs);
    let floods = start_floods(&server, &target, target_heads[0], &heads_digest(&target_heads));
    // The floods are in once the idle sockets are: 4 addresses x 64 kept.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.open_fds() < idle_fds + 4 * 64 {
        assert!(Instant::now() < deadline, "the floods never got going");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (flood_push, flood_pull, flood_fds) = honest_phase(&server, &home, &laptop, rounds, flood_secs, 1000);
    floods.stop.store(true, Ordering::Relaxed);
    for (name, thread) in floods.threads {
        thread.join().unwrap_or_else(|_| panic!("the flood '{name}' failed"));
        println!("flood: {name}");
    }
    let kept = bytes_under(&target_packs).saturating_sub(kept_before);
    assert_eq!(server.heads(&target), target_heads, "a refused upload moved the heads");
    println!(
        "flooded server: {}, {} refused uploads sent",
        latencies(&flood_push, &flood_pull),
        floods.sent.load(Ordering::Relaxed)
    );
    let metrics = server.metrics();
    for line in metrics.lines().filter(|l| l.starts_with("capsulefs_rejected_total{")) {
        println!("refused: {line}");
    }
    let ratio = (percentile(&flood_push, 0.99) / percentile(&idle_push, 0.99))
        .max(percentile(&flood_pull, 0.99) / percentile(&idle_pull, 0.99));
    println!(
        "soak: honest_p99_vs_idle={ratio:.2} rss_mib={} open_fds={} refused_bytes_kept={kept}",
        server.status("VmHWM") >> 10,
        flood_fds.max(idle_fds)
    );
}
