//! `capsulefs bench sync` (`make bench-sync`): how many bytes and round trips finding the
//! difference between two replicas costs, over a real loopback connection to `capsulefs
//! serve`, and how fast a push moves a 512 MiB tree against rsync to an rsync daemon.
//!
//! Two replicas of N records differ by d: the local capsule has d records the server lacks,
//! either as its newest d records (one replica lagging) or as d side branches off random
//! earlier records (the difference scattered). Each method finds what the server lacks; the
//! set it finds is checked against the true difference. Reconciliation bytes are the message
//! bodies of that exchange, both ways; the records themselves and the HTTP framing, counted
//! by a byte-counting proxy between the two, are reported in their own columns.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;

use capsulefs::capsule::{AppendOptions, Capsule, NewCapsule, Parents};
use capsulefs::crypto::keys::Identity;
use capsulefs::crypto::random_bytes;
use capsulefs::fs::Fs;
use capsulefs::fs::filesystem::Signing;
use capsulefs::fs::node::{Inode, Kind, ROOT_INO};
use capsulefs::member::{content_key, create_keystore};
use capsulefs::record::{RecordHash, SubRecordBuf};
use capsulefs::replica::Replica;
use capsulefs::replica::bloom::POSTER_BITS_PER_RECORD;
use capsulefs::replica::remote::Remote;
use capsulefs::store::Durability;
use capsulefs::store::rocks::RocksKv;
use capsulefs::sync::{heads, transfer};
use capsulefs::wire::MAX_HASHES;

use super::served::Served;

#[derive(Parser, Debug)]
pub struct SyncBenchArgs {
    /// Records in each replica.
    #[arg(long, default_value_t = 100_000)]
    pub records: usize,
    /// Size of the tree pushed against rsync, in MiB.
    #[arg(long, default_value_t = 512)]
    pub mib: usize,
    /// Only the push against rsync (for working on push speed).
    #[arg(long, hide = true)]
    pub push_only: bool,
    /// Only the mount-to-mount figures (for working on them).
    #[arg(long, hide = true)]
    pub mountsync_only: bool,
}

const DIFFERENCES: [usize; 3] = [1, 100, 10_000];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Lagging,
    Scattered,
    /// Both replicas hold `SHARED_BRANCHES` concurrent heads, and the local one has d more
    /// branches: where listing heads costs 32 bytes a head and a sketch wins.
    ManyHeads,
}

/// Concurrent heads both replicas hold in the many-heads shape.
const SHARED_BRANCHES: usize = 1000;

impl Shape {
    const ALL: [Shape; 3] = [Shape::Lagging, Shape::Scattered, Shape::ManyHeads];

    fn name(self) -> &'static str {
        match self {
            Shape::Lagging => "lagging",
            Shape::Scattered => "scattered",
            Shape::ManyHeads => "many-heads",
        }
    }
}

/// One method's cost on one scenario.
#[derive(Default, Clone, Copy)]
struct Cost {
    sent: u64,
    received: u64,
    round_trips: u32,
}

/// Counts the bytes a TCP connection carries each way, between the client and the server.
struct Proxy {
    addr: String,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, counter: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Proxy {
    fn start(server: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (u, d) = (up.clone(), down.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(&server) else { continue };
                let (c2, u2) = (client.try_clone().expect("socket clone"), upstream.try_clone().expect("socket clone"));
                let (uc, dc) = (u.clone(), d.clone());
                std::thread::spawn(move || pump(client, upstream, uc));
                std::thread::spawn(move || pump(u2, c2, dc));
            }
        });
        Ok(Self { addr, up, down })
    }

    fn wire(&self) -> u64 {
        self.up.load(Ordering::Relaxed) + self.down.load(Ordering::Relaxed)
    }
}

fn signed() -> AppendOptions {
    AppendOptions { sign: true, durability: Durability::Buffered, ..Default::default() }
}

fn append_chain(capsule: &Capsule, me: &Identity, count: usize, tag: u64) -> anyhow::Result<()> {
    for i in 0..count as u64 {
        capsule.append(me, &[&[tag.to_le_bytes(), i.to_le_bytes()].concat()], signed())?;
    }
    Ok(())
}

/// The scenario: `(local, server store folder, the true difference)`.
fn scenario(
    dir: &Path,
    me: &Identity,
    records: usize,
    d: usize,
    shape: Shape,
) -> anyhow::Result<(Capsule, PathBuf, Vec<RecordHash>)> {
    let local_path = dir.join(format!("{}-{d}-local", shape.name()));
    let capsule = Capsule::create(Arc::new(RocksKv::open(&local_path, true)?), NewCapsule::new("bench", me), vec![])?;
    let shared_branches = if shape == Shape::ManyHeads { SHARED_BRANCHES } else { 0 };
    append_chain(&capsule, me, records - d - shared_branches, 0)?;
    let chain: Vec<RecordHash> = capsule.log()?.map(|e| e.map(|(h, _)| h)).collect::<capsulefs::Result<_>>()?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ d as u64;
    let mut side_branch = |capsule: &Capsule, tag: u8, i: u64| -> anyhow::Result<RecordHash> {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let parent = chain[(seed >> 33) as usize % chain.len()];
        let payload = SubRecordBuf::copied(&[[tag; 8], i.to_le_bytes()].concat());
        Ok(capsule.append_built(me, Parents::These(&[parent]), vec![payload], signed())?)
    };
    for i in 0..shared_branches as u64 {
        side_branch(&capsule, 3, i)?;
    }
    capsule.sync_to_disk()?;
    let server_dir = dir.join(format!("{}-{d}-server", shape.name()));
    let server_store = server_dir.join("capsules").join(capsule.id().to_hex());
    std::fs::create_dir_all(&server_store)?;
    let copied = Command::new("cp").arg("-a").arg(&local_path).arg(server_store.join("store")).status()?;
    ensure!(copied.success(), "copying the store for the server");
    let mut difference = Vec::with_capacity(d);
    for i in 0..d as u64 {
        let h = match shape {
            Shape::Lagging => capsule.append(me, &[&[[1u8; 8], i.to_le_bytes()].concat()], signed())?,
            Shape::Scattered | Shape::ManyHeads => side_branch(&capsule, 2, i)?,
        };
        difference.push(h);
    }
    Ok((capsule, server_dir, difference))
}

/// Ours, as push does it: the server's heads (listed, or, with many heads here, rebuilt from
/// a sketch of the difference), then the local difference.
fn by_heads(local: &Capsule, remote: &Remote) -> anyhow::Result<(Vec<RecordHash>, Cost)> {
    let mut report = capsulefs::sync::Report::default();
    let heads = heads::replica_heads(local, remote, &mut report)?;
    let cost =
        Cost { sent: report.reconcile_sent, received: report.reconcile_received, round_trips: report.round_trips };
    Ok((local.difference(&heads)?, cost))
}

/// Every local id sent; the server answers which it lacks.
fn all_ids(local: &Capsule, remote: &Remote) -> anyhow::Result<(Vec<RecordHash>, Cost)> {
    let ids: Vec<RecordHash> = local.log()?.map(|e| e.map(|(h, _)| h)).collect::<capsulefs::Result<_>>()?;
    let mut cost = Cost::default();
    let mut lacking = Vec::new();
    for slice in ids.chunks(MAX_HASHES) {
        let answer = remote.missing(slice)?;
        cost.sent += 4 + 32 * slice.len() as u64;
        cost.received += 4 + 32 * answer.len() as u64;
        cost.round_trips += 1;
        lacking.extend(answer);
    }
    Ok((lacking, cost))
}

/// Deterministic, from the DAG's sinks toward its sources: local heads first, then the parents
/// of what the server lacks, asked in breadth-first slices growing fourfold.
fn walking(local: &Capsule, remote: &Remote) -> anyhow::Result<(Vec<RecordHash>, Cost)> {
    let mut cost = Cost::default();
    let lacking = walk_from(local, remote, local.heads()?, HashSet::new(), &mut cost)?;
    Ok((lacking.into_iter().collect(), cost))
}

/// The walk from `frontier` down to records the server holds, adding to `lacking` what it
/// finds the server lacks.
fn walk_from(
    local: &Capsule,
    remote: &Remote,
    mut frontier: Vec<RecordHash>,
    mut lacking: HashSet<RecordHash>,
    cost: &mut Cost,
) -> anyhow::Result<HashSet<RecordHash>> {
    let genesis = RecordHash::genesis(local.id());
    let mut held = HashSet::new();
    let mut budget = 16usize;
    while !frontier.is_empty() {
        let nodes: Vec<_> = Replica::walk(local, &frontier, budget)?
            .into_iter()
            .filter(|n| !lacking.contains(&n.record) && !held.contains(&n.record))
            .collect();
        if nodes.is_empty() {
            break;
        }
        let ask: Vec<RecordHash> = nodes.iter().map(|n| n.record).collect();
        let answer: HashSet<RecordHash> = remote.missing(&ask)?.into_iter().collect();
        cost.sent += 4 + 32 * ask.len() as u64;
        cost.received += 4 + 32 * answer.len() as u64;
        cost.round_trips += 1;
        // What the slice did not reach stays on the frontier.
        let mut next: HashSet<RecordHash> = frontier.iter().copied().collect();
        for n in nodes {
            if answer.contains(&n.record) {
                lacking.insert(n.record);
                next.extend(n.parents);
            } else {
                held.insert(n.record);
            }
        }
        frontier = next.into_iter().filter(|p| *p != genesis && !lacking.contains(p) && !held.contains(p)).collect();
        budget = (budget * 4).min(MAX_HASHES);
    }
    Ok(lacking)
}

/// The poster's: the server's Bloom filter over everything it holds (10 bits a record, salted
/// for this session); what fails it is surely lacking. Then the deterministic walk for what
/// the filter wrongly claimed: from the local heads and the parents of what was found that
/// the filter passed (the newest record of each run of false positives is one of those).
fn bloom_then_walk(local: &Capsule, remote: &Remote) -> anyhow::Result<(Vec<RecordHash>, Cost)> {
    let bloom = remote.bloom(random_bytes(), POSTER_BITS_PER_RECORD)?;
    // The query (salt and bits) counted as if it were a body.
    let mut cost = Cost { sent: 17, received: bloom.size() as u64, round_trips: 1 };
    let mut lacking = HashSet::new();
    let mut parents = HashSet::new();
    for entry in local.log()? {
        let (h, record) = entry?;
        if !bloom.may_hold(&h) {
            lacking.insert(h);
            parents.extend(record.header.parents);
        }
    }
    let genesis = RecordHash::genesis(local.id());
    let frontier: Vec<RecordHash> = local
        .heads()?
        .into_iter()
        .chain(parents)
        .filter(|h| *h != genesis && !lacking.contains(h))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let lacking = walk_from(local, remote, frontier, lacking, &mut cost)?;
    Ok((lacking.into_iter().collect(), cost))
}

type Method = fn(&Capsule, &Remote) -> anyhow::Result<(Vec<RecordHash>, Cost)>;

const METHODS: [(&str, Method); 4] =
    [("bloom+walk", bloom_then_walk), ("walk", walking), ("all ids", all_ids), ("heads (ours)", by_heads)];

/// A tree of `mib` MiB in 64 files, a capsule holding it, and the timings of pushing the
/// capsule to a fresh server against rsync -a of the tree to an rsync daemon (and with
/// --fsync).
fn push_against_rsync(dir: &Path, me: &Identity, mib: usize) -> anyhow::Result<Timings> {
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree)?;
    let file_mib = mib.div_ceil(64);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let capsule = Capsule::create(
        Arc::new(RocksKv::open(&dir.join("push-local"), true)?),
        NewCapsule::new("tree", me),
        vec![me.clone()],
    )?;
    create_keystore(&capsule, me)?;
    let capsule = Arc::new(capsule);
    let mut fs = Fs::open(capsule.clone(), content_key(&capsule, me)?, Some(me.clone()))?;
    let mut block = vec![0u8; 1 << 20];
    for f in 0..64 {
        let name = format!("file{f:02}");
        let (ino, _) = fs.make(ROOT_INO, name.as_bytes(), Inode::new(Kind::File, 0o644, 0, 0))?;
        let mut out = std::fs::File::create(tree.join(&name))?;
        for m in 0..file_mib {
            for w in block.chunks_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                w.copy_from_slice(&seed.to_le_bytes());
            }
            out.write_all(&block)?;
            fs.write(ino, (m << 20) as u64, &block)?;
            if fs.pending_bytes() >= 16 << 20 {
                fs.commit(Signing::Later, Durability::Buffered)?;
            }
        }
    }
    // The end signed, as an unmount leaves it, so every commit can go to a replica.
    if fs.commit(Signing::Now, Durability::Durable)?.is_none() {
        fs.sign_now(Durability::Durable)?;
    }
    drop(fs);
    let server_dir = dir.join("push-server");
    let served = Served::start(&server_dir)?;
    let remote = Remote::new(&format!("http://{}", served.addr), capsule.id())?;
    settle(&dir.join("push-local"))?;
    let start = Instant::now();
    let report = transfer::push(&capsule, &remote, &())?;
    let push = start.elapsed().as_secs_f64();
    ensure!(report.bytes >= (mib as u64) << 20, "the push moved {} bytes, less than the tree", report.bytes);
    println!("push: {} records, {} bytes, {} round trips", report.records, report.bytes, report.round_trips);
    drop(served);

    let module = dir.join("rsync-module");
    std::fs::create_dir_all(&module)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\npid file = {}\n[bench]\npath = {}\nread only = false\n",
            dir.join("rsyncd.pid").display(),
            module.display()
        ),
    )?;
    let mut daemon = Command::new("rsync")
        .args([
            "--daemon",
            "--no-detach",
            "--address=127.0.0.1",
            &format!("--port={port}"),
            &format!("--config={}", conf.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rsync --daemon (apt install rsync)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = daemon.kill();
            bail!("the rsync daemon did not start listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // rsync as the issue asks (into the page cache), then with `--fsync` into a fresh folder
    // of the module: the same promise the push keeps, every file durable before the end.
    let timed = |extra: &[&str], into: &str| -> anyhow::Result<f64> {
        settle(&tree)?;
        let start = Instant::now();
        let status = Command::new("rsync")
            .arg("-a")
            .args(extra)
            .arg(format!("{}/", tree.display()))
            .arg(format!("rsync://127.0.0.1:{port}/bench/{into}"))
            .status();
        let took = start.elapsed().as_secs_f64();
        ensure!(status?.success(), "rsync -a {} to the daemon failed", extra.join(" "));
        Ok(took)
    };
    let (rsync, rsync_fsync) = (timed(&[], ""), timed(&["--fsync"], "fsync/"));
    let _ = daemon.kill();
    let _ = daemon.wait();
    Ok(Timings { push, rsync: rsync?, rsync_fsync: rsync_fsync? })
}

/// Seconds each way of moving the tree took.
struct Timings {
    push: f64,
    rsync: f64,
    rsync_fsync: f64,
}

pub fn run(a: SyncBenchArgs) -> anyhow::Result<()> {
    ensure!(a.records > DIFFERENCES[2] * 2, "--records must be above {}", DIFFERENCES[2] * 2);
    let dir = tempfile::tempdir()?;
    if !a.mountsync_only {
        antientropy(&a, dir.path())?;
    }
    if a.push_only {
        return Ok(());
    }
    let m = super::mountsync::run(&dir.path().join("mountsync"))?;
    println!(
        "mountsync: propagate_p50_ms={:.0} propagate_p99_ms={:.0} remote_cold_read_vs_local={:.2}",
        m.p50_ms, m.p99_ms, m.cold_read_ratio
    );
    Ok(())
}

/// The anti-entropy table and the push against rsync, ending with the `antientropy:` line.
fn antientropy(a: &SyncBenchArgs, root: &Path) -> anyhow::Result<()> {
    let me = Identity::generate("bench")?;
    println!("{} records per replica; the local one has d more; bytes are message bodies, each way", a.records);
    println!(
        "{:>10} {:>6} {:>13} {:>10} {:>10} {:>6} {:>12} {:>10} {:>11}",
        "shape", "d", "method", "sent", "received", "trips", "record bytes", "wire", "per missing"
    );
    let mut worst = [0u64; 3];
    let mut max_trips = 0;
    let differences = if a.push_only { &[][..] } else { &DIFFERENCES[..] };
    for (i, &d) in differences.iter().enumerate() {
        for shape in Shape::ALL {
            let (local, server_dir, truth) = scenario(root, &me, a.records, d, shape)?;
            let mut truth_sorted = truth.clone();
            truth_sorted.sort();
            let record_bytes: u64 = truth
                .iter()
                .map(|h| Replica::fetch(&local, &[*h]).map(|b| b[0].size() as u64))
                .sum::<capsulefs::Result<u64>>()?;
            let served = Served::start(&server_dir)?;
            for (name, method) in METHODS {
                let proxy = Proxy::start(served.addr.clone())?;
                let remote = Remote::new(&format!("http://{}", proxy.addr), local.id())?;
                let (mut found, cost) = method(&local, &remote)?;
                found.sort();
                ensure!(
                    found == truth_sorted,
                    "{name} found {} records, the difference is {}",
                    found.len(),
                    truth.len()
                );
                let body = cost.sent + cost.received;
                println!(
                    "{:>10} {:>6} {:>13} {:>10} {:>10} {:>6} {:>12} {:>10} {:>11.2}",
                    shape.name(),
                    d,
                    name,
                    cost.sent,
                    cost.received,
                    cost.round_trips,
                    record_bytes,
                    proxy.wire(),
                    body as f64 / d as f64
                );
                // The last line's figures are over the two shapes; many-heads is in the table.
                if name == "heads (ours)" && shape != Shape::ManyHeads {
                    worst[i] = worst[i].max(body);
                    max_trips = max_trips.max(cost.round_trips);
                }
            }
        }
    }
    println!(
        "(wire: every byte both ways through a counting proxy, HTTP framing included; record bytes: what the difference weighs)"
    );
    let Timings { push, rsync, rsync_fsync } = push_against_rsync(root, &me, a.mib)?;
    println!(
        "push of a {} MiB tree (64 files) to capsulefs serve: {push:.2} s; rsync -a of the same tree to an rsync daemon: {rsync:.2} s",
        a.mib
    );
    println!(
        "rsync -a --fsync (every file durable, as a push's answer promises): {rsync_fsync:.2} s; push_vs_rsync_fsync={:.2}",
        push / rsync_fsync
    );
    println!(
        "antientropy: bytes_d1={} bytes_per_missing_d100={:.4} bytes_per_missing_d10000={:.4} max_round_trips={} push_vs_rsync={:.2}",
        worst[0],
        worst[1] as f64 / 100.0,
        worst[2] as f64 / 10_000.0,
        max_trips,
        push / rsync
    );
    Ok(())
}

/// Puts the machine in the same state before each timed transfer: every dirty page written
/// back, the page cache emptied (as root), then `source` read back in. Neither side pays
/// for what came before it (writing back the tree, the local capsule, the other side's
/// copy), and both write into free memory, not into a page cache that an earlier run filled
/// with gigabytes (reclaiming it would be timed as the transfer's).
fn settle(source: &Path) -> anyhow::Result<()> {
    ensure!(Command::new("sync").status().context("running sync")?.success(), "sync failed");
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("note: not root, so the page cache is not emptied before each timed part");
    }
    let mut dirs = vec![source.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                std::io::copy(&mut std::fs::File::open(&path)?, &mut std::io::sink())?;
            }
        }
    }
    Ok(())
}
