//! A seeded fault-injection run of syncing mounts (`make chaos SEED=S DURATION=SECS`).
//!
//! Three mounts of one capsule through one `capsulefs serve`: two devices of one person (home
//! B holds A's keys and cloned the capsule) and a second member (C, granted write). Each round,
//! every mount runs a script of random file operations at once (create, write and append with
//! fsync, overwrite, truncate, rename, unlink, mkdir, rmdir, symlink); between rounds, a random
//! fault: the server killed with -9 and restarted on its store, a mount's daemon killed with -9
//! and remounted, or the server down for a whole round (the mounts diverge, then heal). At the
//! end every process is brought back, the mounts are given time to converge, and the run checks
//! prints `chaos: seed=S misread=N stale=N`, and last, the verdict:
//!
//! `chaos: seed=S rounds=R ops=O faults=F converged=yes|no dangling=N verify=ok|fail
//! lost_fsynced=N unexpected_errno=N panics=N`
//!
//! `lost_fsynced` counts every successful fsync whose content is found neither in place, nor in
//! a conflict copy, nor in `.capsule/history`. `misread` (which fails the run too) counts
//! whole-file writes whose read-back, through the handle that wrote and fsynced them, gave
//! other bytes (a change from
//! elsewhere waits for a file open for writing to be closed, so its writer reads what it
//! wrote; seed 8761656951902955914 once read a page of each of two versions). Every operation
//! and fault goes to a log (`target/chaos/SEED.log`), and the scripts depend on the seed alone,
//! so a failing seed replays.
//! With no seed given, one fixed seed and one random seed (printed) run, each for
//! `CHAOS_DURATION` seconds (30 by default).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Home;
use super::replicas::same_user;
use super::server::Server;

/// The seed CI always runs (the one whose run found the first bugs).
const FIXED_SEED: u64 = 1363204052;
const OPS_PER_ROUND: usize = 30;
const CONVERGE_WITHIN: Duration = Duration::from_secs(120);
const DIRS: [&str; 4] = ["", "d0", "d1", "d0/e"];
const NAMES: [&str; 6] = ["g0", "g1", "g2", "g3", "g4", "g5"];

/// SplitMix64: small, and the same everywhere, so a seed is a script.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn path(&mut self) -> String {
        let dir = DIRS[self.below(DIRS.len())];
        let name = NAMES[self.below(NAMES.len())];
        if dir.is_empty() { name.to_owned() } else { format!("{dir}/{name}") }
    }
    /// One of the folders, mostly; now and then a name a file may hold too.
    fn dir(&mut self) -> String {
        match self.below(4) {
            0 => self.path(),
            _ => DIRS[1 + self.below(DIRS.len() - 1)].to_owned(),
        }
    }

    /// Mostly small files, now and then one of 1 to 4 MiB.
    fn len(&mut self) -> usize {
        if self.below(40) == 0 { (1 << 20) + self.below(3 << 20) } else { self.below(16 << 10) }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write { path: String, len: usize, fill: u64 },
    Append { path: String, len: usize, fill: u64 },
    Overwrite { path: String, at: u64, len: usize, fill: u64 },
    Truncate { path: String, len: u64 },
    Rename { from: String, to: String },
    Unlink { path: String },
    Mkdir { path: String },
    Rmdir { path: String },
    Symlink { target: String, path: String },
}

fn op(rng: &mut Rng) -> Op {
    let fill = rng.next();
    match rng.below(20) {
        0..=5 => Op::Write { path: rng.path(), len: rng.len(), fill },
        6..=8 => Op::Append { path: rng.path(), len: rng.below(4096) + 1, fill },
        9..=10 => Op::Overwrite { path: rng.path(), at: rng.below(20_000) as u64, len: rng.below(8192) + 1, fill },
        11 => Op::Truncate { path: rng.path(), len: rng.below(20_000) as u64 },
        12..=14 => Op::Rename { from: rng.path(), to: rng.path() },
        15..=16 => Op::Unlink { path: rng.path() },
        17 => Op::Mkdir { path: rng.dir() },
        18 => Op::Rmdir { path: rng.dir() },
        _ => Op::Symlink { target: NAMES[rng.below(NAMES.len())].to_owned(), path: rng.path() },
    }
}

fn bytes(len: usize, fill: u64) -> Vec<u8> {
    let mut rng = Rng(fill);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A successful fsync: its content, and the commit the mount said holds it (a hint: a merge
/// shown in between may name another).
#[derive(Clone, Debug)]
struct Synced {
    path: String,
    len: u64,
    hash: blake3::Hash,
    record: String,
}

/// What errno an operation may meet when three machines change one tree at once. ESTALE
/// among them: a lookup that would move a directory's cached entry to where a follow put it,
/// made while a rename holds the kernel's rename lock, fails so (fs/dcache.c `__d_unalias`),
/// in the moment between the mount's move and the kernel hearing of it (`fuse::forget`), as
/// on NFS; the harness counts them (`stale=N`) so that a rise shows.
fn expected(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOENT
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::EINVAL
                | libc::ELOOP
                | libc::EBUSY
                | libc::ESTALE
        )
    )
}

/// Runs `op` in the mount at `root`; a successful fsync is returned.
fn apply(root: &Path, op: &Op) -> std::io::Result<Option<Synced>> {
    let at = |p: &str| root.join(p);
    let open = |p: &str, truncate: bool| {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .custom_flags(libc::O_NOFOLLOW)
            .open(at(p))
    };
    // After an fsync: the content as this open file sees it, and the commit holding it. A file
    // another machine removed or renamed over meanwhile (a merge applied between the open and
    // the fsync) has no name left, as on a local disk when another process does it: what was
    // written to it is not expected anywhere, and is not counted.
    let synced = |path: &str, f: &mut fs::File| -> std::io::Result<Option<Synced>> {
        f.sync_all()?;
        let mut content = Vec::new();
        f.seek(SeekFrom::Start(0))?;
        f.read_to_end(&mut content)?;
        let record = xattr(&at(path), "user.capsule.record").unwrap_or_default();
        let named = fs::symlink_metadata(at(path)).is_ok_and(|m| m.ino() == f.metadata().map_or(0, |o| o.ino()));
        if !named {
            return Ok(None);
        }
        Ok(Some(Synced { path: path.to_owned(), len: content.len() as u64, hash: blake3::hash(&content), record }))
    };
    match op {
        Op::Write { path, len, fill } => {
            let mut f = open(path, true)?;
            f.write_all(&bytes(*len, *fill))?;
            synced(path, &mut f)
        }
        Op::Append { path, len, fill } => {
            let mut f = open(path, false)?;
            f.seek(SeekFrom::End(0))?;
            f.write_all(&bytes(*len, *fill))?;
            synced(path, &mut f)
        }
        Op::Overwrite { path, at: offset, len, fill } => {
            let mut f = open(path, false)?;
            f.write_all_at(&bytes(*len, *fill), *offset)?;
            synced(path, &mut f)
        }
        Op::Truncate { path, len } => {
            let mut f = open(path, false)?;
            f.set_len(*len)?;
            synced(path, &mut f)
        }
        Op::Rename { from, to } => fs::rename(at(from), at(to)).map(|()| None),
        Op::Unlink { path } => fs::remove_file(at(path)).map(|()| None),
        Op::Mkdir { path } => fs::create_dir(at(path)).map(|()| None),
        Op::Rmdir { path } => fs::remove_dir(at(path)).map(|()| None),
        Op::Symlink { target, path } => std::os::unix::fs::symlink(target, at(path)).map(|()| None),
    }
}

fn xattr(path: &Path, name: &str) -> Option<String> {
    let out =
        std::process::Command::new("getfattr").args(["-h", "--only-values", "-n", name]).arg(path).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One machine of the run: its home, its mount folder, whether it is mounted.
struct Machine {
    name: &'static str,
    home: Home,
    dir: PathBuf,
    mounted: bool,
}

impl Machine {
    fn mount(&mut self) {
        fs::create_dir_all(&self.dir).unwrap();
        self.home.ok(&["mount", "c", self.dir.to_str().unwrap(), "--push-wait", "0"]);
        self.mounted = true;
    }

    fn unmount(&mut self) {
        if self.mounted {
            let out = self.home.run(&["umount", self.dir.to_str().unwrap()]);
            assert!(out.status.success(), "umount {}: {out:?}", self.name);
            self.mounted = false;
        }
    }

    fn daemon_pid(&self) -> u32 {
        let mounts = self.home.path().join("mounts");
        let entry = fs::read_dir(mounts)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_none())
            .expect("a registry entry");
        fs::read_to_string(entry).unwrap().lines().next().unwrap().parse().unwrap()
    }

    /// Every name in the mount with what it holds (a file's content hash, a symlink's target),
    /// and the names readdir lists that cannot be looked up.
    fn listing(&self) -> (Vec<(String, String)>, Vec<String>) {
        let (mut all, mut dangling) = (Vec::new(), Vec::new());
        let mut stack = vec![self.dir.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let path = e.path();
                let rel = path.strip_prefix(&self.dir).unwrap().to_string_lossy().into_owned();
                if rel == ".capsule" {
                    continue;
                }
                match fs::symlink_metadata(&path) {
                    Err(_) => dangling.push(rel),
                    Ok(m) if m.is_dir() => {
                        all.push((rel, "dir".into()));
                        stack.push(path);
                    }
                    Ok(m) if m.file_type().is_symlink() => {
                        all.push((rel, format!("-> {}", fs::read_link(&path).unwrap().display())))
                    }
                    Ok(_) => match fs::read(&path) {
                        Ok(content) => all.push((rel, blake3::hash(&content).to_hex().to_string())),
                        Err(_) => dangling.push(rel),
                    },
                }
            }
        }
        all.sort();
        (all, dangling)
    }
}

/// What a run found.
#[derive(Default)]
struct Summary {
    rounds: usize,
    ops: usize,
    faults: usize,
    converged: bool,
    dangling: usize,
    verify_ok: bool,
    lost_fsynced: usize,
    misread: usize,
    /// ESTALE met (expected, see `expected`), shown beside `misread`.
    stale: usize,
    unexpected_errno: usize,
    panics: usize,
}

impl Summary {
    fn line(&self, seed: u64) -> String {
        let yes = |b: bool, y: &'static str, n: &'static str| if b { y } else { n };
        format!(
            "chaos: seed={seed} rounds={} ops={} faults={} converged={} dangling={} verify={} lost_fsynced={} \
             unexpected_errno={} panics={}",
            self.rounds,
            self.ops,
            self.faults,
            yes(self.converged, "yes", "no"),
            self.dangling,
            yes(self.verify_ok, "ok", "fail"),
            self.lost_fsynced,
            self.unexpected_errno,
            self.panics
        )
    }

    /// The line before the verdict: read-backs that gave other bytes than were written, and
    /// ESTALE met.
    fn misread_line(&self, seed: u64) -> String {
        format!("chaos: seed={seed} misread={} stale={}", self.misread, self.stale)
    }

    fn clean(&self) -> bool {
        self.converged
            && self.dangling == 0
            && self.verify_ok
            && self.lost_fsynced == 0
            && self.misread == 0
            && self.unexpected_errno == 0
            && self.panics == 0
    }
}

/// The run's log, for replaying a seed: every operation, its outcome, and every fault.
struct Log(Mutex<fs::File>);

impl Log {
    fn say(&self, line: &str) {
        let _ = writeln!(self.0.lock().unwrap(), "{line}");
    }
}

fn run(seed: u64, duration: Duration) -> Summary {
    let logs = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos");
    fs::create_dir_all(&logs).unwrap();
    let log_path = logs.join(format!("{seed}.log"));
    let log = Log(Mutex::new(fs::File::create(&log_path).unwrap()));
    eprintln!("chaos: seed {seed}, log in {}", log_path.display());
    let mut server = Some(Server::start());
    let url = server.as_ref().unwrap().url();
    let a = Home::default();
    let id = a.ok(&["create", "c"]).trim().to_owned();
    a.ok(&["replica", "add", "c", &url]);
    let c = Home::default();
    c.ok(&["key", "new"]);
    let c_key = c.ok(&["key", "show"]).trim().to_owned();
    a.ok(&["grant", "c", &c_key, "--level", "write"]);
    a.ok(&["push", "c"]);
    let b = same_user(&a);
    for h in [&b, &c] {
        h.ok(&["clone", &format!("{url}#{id}"), "--name", "c"]);
    }
    let mut machines: Vec<Machine> = [("A", a), ("B", b), ("C", c)]
        .into_iter()
        .map(|(name, home)| {
            let dir = home.path().join("mnt");
            Machine { name, home, dir, mounted: false }
        })
        .collect();
    machines.iter_mut().for_each(Machine::mount);

    let mut summary = Summary::default();
    let mut rng = Rng(seed);
    let synced: Mutex<Vec<(usize, Synced)>> = Mutex::new(Vec::new());
    let start = Instant::now();
    let mut server_down: Option<(tempfile::TempDir, String)> = None;
    while start.elapsed() < duration {
        summary.rounds += 1;
        let round = summary.rounds;
        let scripts: Vec<Vec<Op>> =
            machines.iter().map(|_| (0..OPS_PER_ROUND).map(|_| op(&mut rng)).collect()).collect();
        let (unexpected, misread, stale) = (Mutex::new(0usize), Mutex::new(0usize), Mutex::new(0usize));
        std::thread::scope(|s| {
            for (m, script) in machines.iter().enumerate().zip(scripts) {
                let (i, machine) = m;
                let (log, synced, unexpected, misread, stale) = (&log, &synced, &unexpected, &misread, &stale);
                s.spawn(move || {
                    for op in script {
                        let outcome = apply(&machine.dir, &op);
                        log.say(&format!("round {round} {} {op:?} -> {outcome:?}", machine.name));
                        match outcome {
                            Ok(Some(done)) => {
                                if let Op::Write { path, len, fill } = &op
                                    && done.hash != blake3::hash(&bytes(*len, *fill))
                                {
                                    let (who, got) = (machine.name, done.len);
                                    log.say(&format!(
                                        "misread: {who} {path}: read back other bytes ({got}) than the {len} it wrote"
                                    ));
                                    *misread.lock().unwrap() += 1;
                                }
                                synced.lock().unwrap().push((i, done));
                            }
                            Ok(None) => {}
                            Err(e) if expected(&e) => {
                                if e.raw_os_error() == Some(libc::ESTALE) {
                                    *stale.lock().unwrap() += 1;
                                }
                            }
                            Err(_) => *unexpected.lock().unwrap() += 1,
                        }
                    }
                });
            }
        });
        summary.ops += machines.len() * OPS_PER_ROUND;
        summary.unexpected_errno += unexpected.into_inner().unwrap();
        summary.misread += misread.into_inner().unwrap();
        summary.stale += stale.into_inner().unwrap();
        // A partition lasts one round: the server comes back now.
        if let Some((store, addr)) = server_down.take() {
            server = Some(Server::start_on(store, &addr));
            log.say(&format!("round {round}: the server is back"));
        }
        match rng.below(5) {
            0 => {
                let (store, addr) = server.take().unwrap().kill();
                server = Some(Server::start_on(store, &addr));
                log.say(&format!("round {round}: kill -9 of the server, restarted"));
                summary.faults += 1;
            }
            1 => {
                let m = &mut machines[rng.below(3)];
                let pid = m.daemon_pid();
                super::sh(&format!("kill -9 {pid}"));
                m.unmount();
                m.mount();
                log.say(&format!("round {round}: kill -9 of {}'s daemon, remounted", m.name));
                summary.faults += 1;
            }
            2 => {
                server_down = Some(server.take().unwrap().kill());
                log.say(&format!("round {round}: the server is down for a round"));
                summary.faults += 1;
            }
            _ => {}
        }
    }
    if let Some((store, addr)) = server_down.take() {
        server = Some(Server::start_on(store, &addr));
    }

    // Heal and converge: the mounts keep syncing in the background; each writes a marker
    // so every one of them has something to push and pull.
    for m in &machines {
        super::write_fsynced(&m.dir.join(format!("marker-{}", m.name)), m.name.as_bytes());
    }
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let listings: Vec<_> = machines.iter().map(|m| m.listing().0).collect();
        let markers = listings[0].iter().filter(|(n, _)| n.starts_with("marker-")).count() == machines.len();
        if markers && listings.windows(2).all(|w| w[0] == w[1]) && listings == last {
            summary.converged = true;
            break;
        }
        last = listings;
        std::thread::sleep(Duration::from_millis(500));
    }
    for m in &machines {
        let dangling = m.listing().1;
        for d in &dangling {
            log.say(&format!("dangling in {}: {d}", m.name));
        }
        summary.dangling += dangling.len();
    }
    summary.lost_fsynced = lost(&machines, &synced.into_inner().unwrap(), &log);
    for m in &mut machines {
        m.unmount();
    }
    summary.verify_ok = machines.iter().all(|m| {
        let out = m.home.run(&["verify", "c"]);
        log.say(&format!("verify {}: {out:?}", m.name));
        out.status.success()
    });
    for dir in machines.iter().map(|m| m.home.path().join("logs")) {
        summary.panics += panics_in(&dir);
    }
    drop(server);
    log.say(&summary.misread_line(seed));
    log.say(&summary.line(seed));
    if !summary.clean() {
        for m in machines {
            log.say(&format!("{}'s home kept at {}", m.name, m.home.keep().display()));
        }
    }
    summary
}

/// How many successful fsyncs left content found nowhere: not in any file of the mount that
/// made it (in place, renamed, or a conflict copy), nor anywhere in its `.capsule/history`.
fn lost(machines: &[Machine], synced: &[(usize, Synced)], log: &Log) -> usize {
    let mut lost = 0;
    for (i, m) in machines.iter().enumerate() {
        let present: std::collections::HashSet<String> = m.listing().0.into_iter().map(|(_, h)| h).collect();
        let history = m.dir.join(".capsule/history");
        // First where the mount said the content went; then every commit, reading only files
        // of a size still looked for.
        let mut missing: Vec<&Synced> = synced
            .iter()
            .filter(|(j, s)| *j == i && !present.contains(&s.hash.to_hex().to_string()))
            .map(|(_, s)| s)
            .filter(|s| {
                let at = history.join(s.record.get(..16).unwrap_or("-")).join(&s.path);
                !fs::read(at).is_ok_and(|c| blake3::hash(&c) == s.hash)
            })
            .collect();
        if !missing.is_empty() {
            let commits: Vec<PathBuf> =
                fs::read_dir(&history).map_or(Vec::new(), |d| d.flatten().map(|e| e.path()).collect());
            for commit in commits {
                let mut stack = vec![commit];
                while let Some(dir) = stack.pop() {
                    for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                        let Ok(meta) = fs::symlink_metadata(e.path()) else { continue };
                        if meta.is_dir() {
                            stack.push(e.path());
                        } else if meta.is_file() && missing.iter().any(|s| s.len == meta.len()) {
                            let hash = fs::read(e.path()).map(|c| blake3::hash(&c)).ok();
                            missing.retain(|s| Some(s.hash) != hash);
                        }
                    }
                }
                if missing.is_empty() {
                    break;
                }
            }
        }
        for s in &missing {
            log.say(&format!("lost: {} {s:?}", m.name));
        }
        lost += missing.len();
    }
    lost
}

/// Panics logged in the files of `dir`.
fn panics_in(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| fs::read_to_string(e.path()).unwrap_or_default().matches("panicked").count()).sum()
}

#[test]
fn chaos() {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: no /dev/fuse");
        return;
    }
    let duration = Duration::from_secs(std::env::var("CHAOS_DURATION").ok().and_then(|d| d.parse().ok()).unwrap_or(30));
    let seeds = match std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            vec![FIXED_SEED, Rng(now.as_nanos() as u64 ^ u64::from(std::process::id())).next()]
        }
    };
    for seed in seeds {
        let summary = run(seed, duration);
        println!("{}\n{}", summary.misread_line(seed), summary.line(seed));
        assert!(summary.clean(), "{} misread={} (replay: make chaos SEED={seed})", summary.line(seed), summary.misread);
    }
}
