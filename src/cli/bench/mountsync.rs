//! The mount-to-mount part of `capsulefs bench sync`: two homes' mounts of one capsule through
//! one `capsulefs serve` on loopback, each syncing in the background. How long a 4 KiB file
//! written and fsynced in mount A takes to be readable, whole, in mount B (100 files), against
//! the same through Syncthing when it is installed (two instances on loopback, a shared
//! folder, its file watcher on), else against an `rsync -a` loop every second (the floor a
//! user would script); and a cold sequential read of a 256 MiB file through a mount of the
//! server alone (`mount URL#ID`: fetched on demand) against the same read in a local mount.
//! Both reads are cold: the mounts are fresh and the kernel's page cache is dropped first.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

const PROBES: usize = 100;
const PROBE_BYTES: usize = 4096;
/// How long one probe may take to arrive before the benchmark gives up.
const PROBE_LIMIT: Duration = Duration::from_secs(60);

pub struct MountSync {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cold_read_ratio: f64,
}

/// `capsulefs` with `home` as its home, from this very binary.
fn capsulefs(home: &Path) -> anyhow::Result<Command> {
    let mut c = Command::new(std::env::current_exe()?);
    c.env("CAPSULEFS_HOME", home).env_remove("CAPSULEFS_LOG");
    Ok(c)
}

fn exec(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A mount made with `capsulefs mount`, unmounted when dropped.
struct Mount {
    home: PathBuf,
    dir: PathBuf,
}

impl Mount {
    fn new(home: &Path, what: &str, dir: PathBuf, extra: &[&str]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        exec(capsulefs(home)?.arg("mount").arg(what).arg(&dir).args(extra))?;
        Ok(Self { home: home.to_owned(), dir })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Ok(mut c) = capsulefs(&self.home) {
            let _ = c.arg("umount").arg(&self.dir).output();
        }
    }
}

/// A process ended when dropped.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A second home with the first one's keys: the same person on another machine.
fn same_user(home: &Path, other: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(other.join("keys"))?;
    for key in std::fs::read_dir(home.join("keys"))? {
        let key = key?.path();
        if key.extension().is_some_and(|e| e == "key") {
            std::fs::copy(&key, other.join("keys").join(key.file_name().expect("a file")))?;
        }
    }
    Ok(())
}

fn probe_bytes(i: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; PROBE_BYTES];
    blake3::Hasher::new().update(&(i as u64).to_le_bytes()).finalize_xof().fill(&mut bytes);
    bytes
}

/// Writes probe files into `from` (fsynced) and times each until `to` holds it whole.
fn propagation(from: &Path, to: &Path, name: &str) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::with_capacity(PROBES);
    for i in 0..PROBES {
        let bytes = probe_bytes(i);
        let file = format!("{name}-{i:03}");
        let start = Instant::now();
        let mut f = std::fs::File::create(from.join(&file))?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        loop {
            if std::fs::read(to.join(&file)).is_ok_and(|got| got == bytes) {
                break;
            }
            if start.elapsed() > PROBE_LIMIT {
                bail!("{file} written in {} never arrived whole in {}", from.display(), to.display());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One Syncthing instance's home, device id and ports.
struct Peer {
    home: PathBuf,
    folder: PathBuf,
    id: String,
    port: u16,
    gui: u16,
}

/// Two Syncthing instances on loopback sharing one folder, with nothing reaching outside it
/// (no discovery, relays or NAT), its file watcher at its shortest delay (1 s; 10 by
/// default). None when Syncthing is not installed (`make deps-bench`).
fn syncthing(root: &Path) -> anyhow::Result<Option<(String, Vec<f64>)>> {
    if Command::new("syncthing").arg("--version").output().is_err() {
        return Ok(None);
    }
    let mut peers = Vec::new();
    for name in ["st-a", "st-b"] {
        let home = root.join(name);
        let out = Command::new("syncthing")
            .args(["generate", "--no-default-folder", "--skip-port-probing"])
            .arg(format!("--home={}", home.display()))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        let id = text
            .lines()
            .find_map(|l| l.split_once("Device ID: ").map(|(_, id)| id.trim().to_owned()))
            .with_context(|| format!("no device id from syncthing generate: {text}"))?;
        let folder = root.join(format!("{name}-folder"));
        std::fs::create_dir_all(&folder)?;
        peers.push(Peer { home, folder, id, port: free_port()?, gui: free_port()? });
    }
    let mut running = Vec::new();
    for (me, peer) in [(&peers[0], &peers[1]), (&peers[1], &peers[0])] {
        let config = format!(
            r#"<configuration version="36">
    <folder id="bench" label="bench" path="{folder}" type="sendreceive" rescanIntervalS="3600" fsWatcherEnabled="true" fsWatcherDelayS="1">
        <device id="{me}"></device>
        <device id="{peer}"></device>
        <minDiskFree unit="%">0</minDiskFree>
    </folder>
    <device id="{me}" name="me" compression="metadata"><address>dynamic</address></device>
    <device id="{peer}" name="peer" compression="metadata"><address>tcp://127.0.0.1:{peer_port}</address></device>
    <gui enabled="true" tls="false"><address>127.0.0.1:{gui}</address><apikey>capsulefs-bench</apikey></gui>
    <options>
        <listenAddress>tcp://127.0.0.1:{port}</listenAddress>
        <globalAnnounceEnabled>false</globalAnnounceEnabled>
        <localAnnounceEnabled>false</localAnnounceEnabled>
        <relaysEnabled>false</relaysEnabled>
        <natEnabled>false</natEnabled>
        <urAccepted>-1</urAccepted>
        <autoUpgradeIntervalH>0</autoUpgradeIntervalH>
        <crashReportingEnabled>false</crashReportingEnabled>
        <startBrowser>false</startBrowser>
    </options>
</configuration>
"#,
            folder = me.folder.display(),
            me = me.id,
            peer = peer.id,
            peer_port = peer.port,
            gui = me.gui,
            port = me.port,
        );
        std::fs::write(me.home.join("config.xml"), config)?;
        let child = Command::new("syncthing")
            .args(["serve", "--no-browser", "--no-restart", "--no-upgrade"])
            .arg(format!("--home={}", me.home.display()))
            .env("STNOUPGRADE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting syncthing")?;
        running.push(Started(child));
    }
    // Readiness: each sees the other connected and the folder idle, bounded.
    let deadline = Instant::now() + Duration::from_secs(120);
    for peer in &peers {
        let ask = |path: &str| -> String {
            ureq::get(&format!("http://127.0.0.1:{}{path}", peer.gui))
                .header("X-API-Key", "capsulefs-bench")
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .unwrap_or_default()
        };
        while !(ask("/rest/system/connections").contains("\"connected\": true")
            && ask("/rest/db/status?folder=bench").contains("\"state\": \"idle\""))
        {
            ensure!(Instant::now() < deadline, "the two Syncthing instances never connected");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let times = propagation(&peers[0].folder, &peers[1].folder, "probe")?;
    drop(running);
    Ok(Some(("Syncthing 1.19 (watcher delay 1 s)".to_owned(), times)))
}

/// The plain comparison: `rsync -a A/ B/` every second, as a user would script it.
fn rsync_loop(root: &Path) -> anyhow::Result<(String, Vec<f64>)> {
    let (a, b) = (root.join("rsync-a"), root.join("rsync-b"));
    std::fs::create_dir_all(&a)?;
    std::fs::create_dir_all(&b)?;
    let script = format!("while true; do rsync -a {}/ {}/; sleep 1; done", a.display(), b.display());
    let _loop = Started(Command::new("sh").args(["-c", &script]).spawn().context("starting the rsync loop")?);
    let times = propagation(&a, &b, "probe")?;
    // The loop's shell ends with it; an rsync it started may outlive it by one pass.
    Ok(("an rsync -a loop every second".to_owned(), times))
}

fn cold_read(file: &Path) -> anyhow::Result<f64> {
    // Dropping the page cache needs root; without it the figure says so.
    if std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_err() {
        eprintln!("note: could not drop the page cache (not root?): the reads may be warm");
    }
    let start = Instant::now();
    let mut f = std::fs::File::open(file)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    ensure!(total == 256 << 20, "read {total} bytes of {}", file.display());
    Ok(start.elapsed().as_secs_f64())
}

pub fn run(root: &Path) -> anyhow::Result<MountSync> {
    let server = super::served::Served::start(&root.join("server"))?;
    let url = format!("http://{}", server.addr);
    let desk = root.join("desk");
    let id = exec(capsulefs(&desk)?.args(["create", "c"]))?.trim().to_owned();
    exec(capsulefs(&desk)?.args(["replica", "add", "c", &url]))?;
    // The 256 MiB file for the cold reads, written before the mounts sync with each other.
    {
        let a = Mount::new(&desk, "c", root.join("a"), &[])?;
        let mut f = std::fs::File::create(a.dir.join("big"))?;
        let mut block = vec![0u8; 1 << 20];
        for m in 0..256u64 {
            blake3::Hasher::new().update(&m.to_le_bytes()).finalize_xof().fill(&mut block);
            f.write_all(&block)?;
        }
        f.sync_all()?;
    }
    exec(capsulefs(&desk)?.args(["push", "c"]))?;
    let laptop = root.join("laptop");
    same_user(&desk, &laptop)?;
    exec(capsulefs(&laptop)?.args(["clone", &format!("{url}#{id}")]))?;

    let (p50, p99) = {
        let a = Mount::new(&desk, "c", root.join("a"), &[])?;
        let b = Mount::new(&laptop, "c", root.join("b"), &[])?;
        let ours = propagation(&a.dir, &b.dir, "probe")?;
        let (peer, theirs) = match syncthing(root)? {
            Some(measured) => measured,
            None => rsync_loop(root)?,
        };
        let (p50, p99) = (percentile(&ours, 0.5), percentile(&ours, 0.99));
        println!(
            "propagation of a 4 KiB write+fsync from mount A to a reader in mount B, {PROBES} files: \
             p50 {p50:.0} ms, p99 {p99:.0} ms; {peer}: p50 {:.0} ms, p99 {:.0} ms",
            percentile(&theirs, 0.5),
            percentile(&theirs, 0.99)
        );
        (p50, p99)
    };

    let local = {
        let a = Mount::new(&desk, "c", root.join("a"), &["--read-only"])?;
        cold_read(&a.dir.join("big"))?
    };
    let peek = root.join("peek");
    same_user(&desk, &peek)?;
    let remote = {
        let m = Mount::new(&peek, &format!("{url}#{id}"), root.join("remote"), &["--read-only"])?;
        cold_read(&m.dir.join("big"))?
    };
    println!(
        "cold sequential read of 256 MiB: local mount {local:.2} s, remote-only mount (mount URL#ID) {remote:.2} s"
    );
    Ok(MountSync { p50_ms: p50, p99_ms: p99, cold_read_ratio: remote / local })
}
