//! `capsulefs mount` and `umount`: a capsule as a folder.
//!
//! Without `--foreground`, `mount` starts itself again in the foreground in a new process
//! group, waits for its "ready" line (printed once the kernel mount exists) and returns; the
//! daemon logs to `$CAPSULEFS_HOME/logs/`. Each mount leaves `$CAPSULEFS_HOME/mounts/<key>`
//! (pid, capsule, folder) while it runs, so `umount` can wait for the final commit and
//! `status` can find it; `status` reads each mount's live figures from `.capsule/status`.

use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroUsize;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

use capsulefs::Error;
use capsulefs::capsule::{Capsule, PROOF_CACHE_RECORDS};
use capsulefs::crypto::keys::Identity;
use capsulefs::fs::Fs;
use capsulefs::fs::filesystem::{Followed, Signing};
use capsulefs::fs::node::ROOT_INO;
use capsulefs::fs::payload_cache::Caches;
use capsulefs::fuse::{CapsuleFs, MAX_READAHEAD};
use capsulefs::member::{Invitation, keyring, keystore::keyring_in};
use capsulefs::rights::{Level, Rights};
use capsulefs::store::Durability;
use capsulefs::sync::Take;
use capsulefs::sync::follower::Follower;
use capsulefs::sync::status::SyncStatus;
use capsulefs::sync::uploader::Uploader;
use fuser::{Config, MountOption, Notifier, SessionACL};

use super::home::Home;

const READY: &str = "ready";
const FUSE_THREADS: usize = 4;

#[derive(Parser, Debug)]
pub struct MountArgs {
    /// Capsule name or id, or a replica as URL#CAPSULE_ID: then headers come now (a sparse
    /// local copy, named by the id, made or brought up to date) and data as it is read.
    pub name: String,
    /// Folder to mount it on.
    pub dir: PathBuf,
    /// Stay attached (for systemd and tests); otherwise return once mounted.
    #[arg(long)]
    pub foreground: bool,
    /// FUSE options, comma-separated: allow_other, allow_root, ro, rw,
    /// exec, noexec, suid, nosuid, dev, nodev, atime, noatime, auto_unmount; others pass through.
    #[arg(short = 'o', value_delimiter = ',')]
    pub options: Vec<String>,
    /// Mount read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Show the capsule as of this record (read-only).
    #[arg(long, value_name = "RECORD")]
    pub at: Option<String>,
    /// Identity to read and write with.
    #[arg(long)]
    pub key: Option<String>,
    /// Memory for verified chunks and tree nodes (plaintext), in MiB; a quarter as much again
    /// holds decoded tree nodes.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub cache_mib: usize,
    /// Proven record headers kept in memory, so later proofs stop at them.
    #[arg(long, value_name = "N", default_value_t = NonZeroUsize::new(PROOF_CACHE_RECORDS).expect("non-zero"))]
    pub proof_cache_records: NonZeroUsize,
    /// Commit changes that no close or fsync has committed after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub commit_after: u64,
    /// Do not sync with the capsule's replicas (`capsulefs replica add`) in the background:
    /// commits wait for `capsulefs push`, and others' commits for `capsulefs pull`.
    #[arg(long)]
    pub no_sync: bool,
    /// At unmount, wait this long for the last commits to reach the replicas (0: do not
    /// wait; what is left goes with the next mount or `capsulefs push`).
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    pub push_wait: u64,
    /// fsync returns only once a write quorum of the capsule's replicas holds the commit (all
    /// but the faulty ones its `replica policy` allows; all of them by default): durability
    /// beyond this disk. Past --replicated-fsync-wait, fsync fails with EIO (the commit stays
    /// here and goes out when the replicas are back).
    #[arg(long)]
    pub replicated_fsync: bool,
    /// How long a --replicated-fsync waits for the replicas.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub replicated_fsync_wait: u64,
    /// How long the kernel may keep names and attributes (changes from elsewhere are told to
    /// it at once; longer only for tests that show it).
    #[arg(long, value_name = "SECS", default_value_t = capsulefs::fuse::TTL.as_secs(), hide = true)]
    pub attr_ttl: u64,
}

#[derive(Parser, Debug)]
pub struct UmountArgs {
    /// The mounted folder.
    pub dir: PathBuf,
}

#[derive(Parser, Debug)]
pub struct StatusArgs {
    /// One mounted folder; without it, every mount made from this home.
    pub dir: Option<PathBuf>,
}

fn fuse_config(a: &MountArgs) -> Config {
    let mut config = Config::default();
    // Reads share the filesystem (a read lock), so parallel threads overlap store reads,
    // proofs and decryption; each thread gets its own /dev/fuse fd.
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    // The kernel checks mode bits, owners and groups on every access (capsulefs does not
    // repeat them), so `-o allow_other` shares a folder without opening every file to all.
    config.mount_options = vec![
        MountOption::FSName(format!("capsulefs:{}", a.name)),
        MountOption::Subtype("capsulefs".into()),
        MountOption::DefaultPermissions,
    ];
    for o in &a.options {
        let option = match o.as_str() {
            "allow_other" => {
                config.acl = SessionACL::All;
                continue;
            }
            "allow_root" => {
                config.acl = SessionACL::RootAndOwner;
                continue;
            }
            "default_permissions" => continue, // always on
            "ro" => MountOption::RO,
            "rw" => MountOption::RW,
            "exec" => MountOption::Exec,
            "noexec" => MountOption::NoExec,
            "suid" => MountOption::Suid,
            "nosuid" => MountOption::NoSuid,
            "dev" => MountOption::Dev,
            "nodev" => MountOption::NoDev,
            "atime" => MountOption::Atime,
            "noatime" => MountOption::NoAtime,
            "auto_unmount" => MountOption::AutoUnmount,
            other => MountOption::CUSTOM(other.to_owned()),
        };
        config.mount_options.push(option);
    }
    if a.read_only || a.at.is_some() {
        config.mount_options.push(MountOption::RO);
    }
    config
}

pub fn mount(home: &Home, mut a: MountArgs) -> anyhow::Result<()> {
    if !a.dir.is_dir() {
        bail!(Error::NotFound(format!("mount point {} (make the folder first)", a.dir.display())));
    }
    if Invitation::is_token(&a.name) {
        let invitation = super::members::read_token(home, &a.name, a.key.as_deref())?;
        a.name = match home.resolve(&invitation.capsule.to_hex()) {
            Ok(_) => invitation.capsule.to_hex(),
            // Headers only, as for `mount URL#ID`: sub-records come when read.
            Err(_) => super::members::join_as(home, &invitation, None, Take::Headers)?,
        };
    } else if a.name.contains("://") {
        a.name = super::replicas::local_for_mount(home, &a.name)?;
    }
    if a.foreground { serve(home, &a) } else { spawn_daemon(home, &a) }
}

fn serve(home: &Home, a: &MountArgs) -> anyhow::Result<()> {
    // A read-only mount may sit beside a writable one (the store is then opened read-only).
    let opened = if a.read_only || a.at.is_some() { home.open_for_reading(&a.name) } else { home.open(&a.name) };
    let capsule = Arc::new(opened?.with_proof_cache(a.proof_cache_records));
    let me = home.identity(a.key.as_deref(), false)?;
    let key = keyring(&capsule, &me).context("reading the capsule's content key")?;
    let fs = match &a.at {
        Some(at) => Fs::open_at(capsule.clone(), key, None, capsule.resolve(at)?)?,
        None => {
            let level = capsule.rights()?.level(&me.writer());
            let writer = (!a.read_only && level.is_some_and(|l| l >= Level::Write)).then(|| me.clone());
            if !a.read_only && writer.is_none() {
                tracing::warn!(
                    "{:?} holds the {} level of capsule {:?}, not the write level: mounted read-only, \
                     writes fail with EROFS (an admin gives it with `capsulefs grant NAME {} --level write`)",
                    me.writer(),
                    level.map_or("no", Level::name),
                    capsule.id(),
                    me.writer()
                );
            }
            if let Some(me) = &writer
                && !a.no_sync
            {
                catch_up(home, &capsule, me);
            }
            let mut fs = Fs::open(capsule.clone(), key, writer)?;
            if fs.heads().is_empty() && !a.read_only {
                // A new filesystem's root takes the owner and mode of the folder it is mounted on.
                let m = std::fs::metadata(&a.dir)?;
                fs.set_attr(ROOT_INO, |i| {
                    (i.uid, i.gid, i.perm) = (m.uid(), m.gid(), (m.mode() & 0o7777) as u16);
                })?;
            }
            fs
        }
    };
    let mut fs = fs.with_cache(Arc::new(Caches::new(a.cache_mib << 20)));
    // Present while a writable mount runs: found at the start, the last one ended uncleanly.
    let marker = (!fs.is_read_only()).then(|| home.store_path(&capsule.id()).with_file_name("mounted"));
    if let Some(marker) = &marker {
        if marker.exists() {
            let swept = fs.sweep_orphans().context("removing files left unlinked by a crash")?;
            if swept > 0 {
                fs.commit(Signing::Now, Durability::Durable)?;
                tracing::warn!("the last mount ended uncleanly: removed {swept} unlinked file(s) it still held open");
            }
        }
        std::fs::write(marker, format!("{}\n", std::process::id()))?;
    }
    // Whenever this mount holds the store: a reader's mount pulls too, and has nothing to push.
    let syncing = !(a.read_only || a.at.is_some() || a.no_sync);
    let shared = Arc::new(RwLock::new(fs));
    // Set once the session exists; the follower tells the kernel through it what changed.
    let notifier = Arc::new(OnceLock::new());
    // A change of membership, pulled or made here through the requests socket, may bring a
    // new generation of the content key: the mount takes it at once.
    let rekey: Arc<dyn Fn() + Send + Sync> = {
        let (live, held, me, seen) = (shared.clone(), capsule.clone(), me.clone(), Arc::new(Mutex::new(None)));
        Arc::new(move || take_new_keys(&live, &held, &me, &seen))
    };
    let background = if syncing { background(home, &capsule, &shared, &notifier, rekey.clone())? } else { None };
    let mut adapter =
        CapsuleFs::new(shared.clone(), &capsule.metadata().params).with_ttl(Duration::from_secs(a.attr_ttl));
    if let Some(background) = &background {
        adapter = adapter.with_replicas(background.status.clone());
        let faulty = home.replica_policy(&capsule.id())?;
        if faulty > 0 {
            adapter = adapter.with_read_quorum(background.status.replicas().len().saturating_sub(faulty));
        }
    }
    if a.replicated_fsync {
        let Some(background) = &background else {
            bail!(Error::Invalid(
                "--replicated-fsync needs replicas to sync with in the background (`capsulefs replica add`, and \
                 not --no-sync or --read-only)"
                    .into()
            ));
        };
        let n = background.status.replicas().len();
        let needed = n - home.replica_policy(&capsule.id())?.min(n - 1);
        adapter = adapter.with_replicated_fsync(needed, Duration::from_secs(a.replicated_fsync_wait));
    }
    let timer = adapter.commit_timer(Duration::from_secs(a.commit_after));
    // Resolved before mounting, while the path still ends in the folder underneath.
    let mount_point = a.dir.canonicalize().with_context(|| format!("{} is not an existing folder", a.dir.display()))?;
    let session = fuser::Session::new(adapter, &a.dir, &fuse_config(a)).with_context(|| {
        format!("mounting on {} (is /dev/fuse there, and the folder not mounted already?)", a.dir.display())
    })?;
    let _ = notifier.set(session.notifier());
    super::readahead::raise(&mount_point, MAX_READAHEAD >> 10);
    let entry = home.mount_entry(&a.dir)?;
    std::fs::create_dir_all(entry.parent().expect("entry has a parent"))?;
    std::fs::write(&entry, format!("{}\n{}\n{}\n", std::process::id(), a.name, a.dir.display()))?;
    // A writable mount holds the store: commands that append to it (a grant) ask it here.
    let requests = marker
        .as_ref()
        .map(|_| {
            super::requests::Requests::serve(entry.with_extension("sock"), home.root(), capsule.clone(), rekey.clone())
        })
        .transpose()?;
    tracing::info!("mounted {} at {} (daemon pid {})", a.name, a.dir.display(), std::process::id());
    println!("{READY}");
    std::io::stdout().flush()?;
    let served = session.run();
    let committed = timer.finish();
    if let Some(background) = background {
        for left in background.uploader.finish(Duration::from_secs(a.push_wait)) {
            tracing::warn!(
                "at unmount, {} still lacks commits of this mount ({}): `capsulefs push {}` sends them",
                left.url,
                left.error.as_deref().unwrap_or("the push did not end in time"),
                a.name
            );
        }
    }
    // Close the store (and release its lock) before saying we are gone.
    drop(requests);
    drop(shared);
    drop(capsule);
    let _ = std::fs::remove_file(&entry);
    if let (Some(marker), Ok(())) = (&marker, &committed) {
        let _ = std::fs::remove_file(marker);
    }
    served.context("serving the mount")?;
    committed.context("final commit at unmount")?;
    Ok(())
}

/// How long a writable mount waits, at its start, for one pull from each replica.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Before a writable mount writes: one pull from every replica (each checked as any pull),
/// for at most `CATCH_UP`; those still running go on in the background. A store restored from
/// an old backup thus takes its own device's later records first and numbers its next record
/// after them, instead of signing a second record with a number it already used (a fork).
fn catch_up(home: &Home, capsule: &Arc<Capsule>, me: &Identity) {
    let urls = home.replicas(&capsule.id()).unwrap_or_default();
    let own_last = || {
        let device = capsule.device().ok()?;
        capsule.last_seq(&me.writer(), &device).ok().flatten()
    };
    let before = own_last();
    let (done, finished) = std::sync::mpsc::channel();
    let mut asked: usize = 0;
    for url in urls {
        let Ok(replica) = home.replica(&url, capsule) else { continue };
        let (capsule, done) = (capsule.clone(), done.clone());
        asked += 1;
        std::thread::spawn(move || {
            let _ = done.send((url, capsulefs::sync::transfer::pull(&capsule, &*replica, &())));
        });
    }
    let deadline = Instant::now() + CATCH_UP;
    let mut answered = 0;
    for _ in 0..asked {
        match finished.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((url, Ok(report))) => {
                answered += 1;
                if report.records > 0 {
                    tracing::info!("before writing: pulled {} records from {url}", report.records)
                }
            }
            Ok((url, Err(e))) => tracing::warn!("before writing: pulling from {url}: {e}"),
            Err(_) => {
                tracing::warn!("replicas still answering after {} s: mounting without them", CATCH_UP.as_secs());
                break;
            }
        }
    }
    let faulty = home.replica_policy(&capsule.id()).unwrap_or(0);
    if faulty > 0 && answered < asked.saturating_sub(faulty) {
        tracing::warn!(
            "only {answered} of {asked} replicas answered at mount start, fewer than a read quorum ({}): the newest \
             state may not be here yet",
            asked - faulty
        );
    }
    let after = own_last();
    if after > before {
        tracing::warn!(
            "the replicas held records this device wrote after this store's copy of it (through seq {}, here {}): \
             a store restored from a backup? Caught up before writing, so nothing forks",
            after.map_or(0, |s| s.0),
            before.map_or(0, |s| s.0)
        );
    }
}

/// A writable mount's background sync with the capsule's remembered replicas: its commits
/// pushed, theirs pulled and shown. None when it remembers none. A replica that cannot be
/// opened (a bad URL, missing bucket settings) is skipped with a warning.
struct Background {
    uploader: Uploader,
    /// Stops the pulling threads when dropped.
    _follower: Follower,
    status: SyncStatus,
}

fn background(
    home: &Home,
    capsule: &Arc<Capsule>,
    live: &Arc<RwLock<Fs>>,
    notifier: &Arc<OnceLock<Notifier>>,
    rekey: Arc<dyn Fn() + Send + Sync>,
) -> anyhow::Result<Option<Background>> {
    let (mut urls, mut pushing, mut pulling) = (Vec::new(), Vec::new(), Vec::new());
    for url in home.replicas(&capsule.id())? {
        match (home.replica(&url, capsule), home.replica(&url, capsule)) {
            (Ok(push), Ok(pull)) => {
                urls.push(url);
                pushing.push(push);
                pulling.push(pull);
            }
            (Err(e), _) | (_, Err(e)) => tracing::warn!("not syncing with {url} in the background: {e:#}"),
        }
    }
    if urls.is_empty() {
        return Ok(None);
    }
    let status = SyncStatus::new(urls);
    let (live, notifier) = (live.clone(), notifier.clone());
    let arrived = Arc::new(move || {
        rekey();
        follow_live(&live, notifier.get())
    });
    Ok(Some(Background {
        uploader: Uploader::start(capsule.clone(), pushing, status.clone()),
        _follower: Follower::start(capsule.clone(), pulling, status.clone(), arrived),
        status,
    }))
}

/// After records were stored: when they changed the rights (a membership record), the live
/// filesystem takes the generations of the content key they now give `me`: a rotation's new
/// key, without a remount; none newer once `me` was removed, and the log says so.
fn take_new_keys(live: &RwLock<Fs>, capsule: &Capsule, me: &Identity, seen: &Mutex<Option<Arc<Rights>>>) {
    let rights = match capsule.rights() {
        Ok(rights) => rights,
        Err(e) => return tracing::warn!("reading the capsule's membership records: {e}"),
    };
    let mut seen = seen.lock().expect("no panics while locked");
    if seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &rights)) {
        return;
    }
    *seen = Some(rights.clone());
    if rights.level(&me.writer()).is_none() {
        tracing::error!(
            "{:?} was removed from capsule {:?}: records made from now on are sealed with a key it is not given, \
             and do not open here",
            me.writer(),
            capsule.id()
        );
    }
    let ring = keyring_in(capsule, &rights, me);
    let mut fs = live.write().expect("no panics while locked");
    if !rights.may_write(&me.writer()) {
        fs.lose_writer();
    }
    if ring.current().is_some() {
        fs.take_keys(ring);
    }
}

/// After records were stored (pulled from a replica, or committed here): the live filesystem
/// moves to the newer commit they made, or to the merge of the branches there now are, when
/// nothing is pending here, and the kernel forgets the names, attributes and pages that
/// changed (outside the filesystem's lock: the kernel may call back into it). Returns whether
/// to try again soon though nothing new arrives: files open for writing held the move back.
fn follow_live(live: &RwLock<Fs>, notifier: Option<&Notifier>) -> bool {
    match live.read().expect("no panics while locked").behind() {
        Ok(false) => return false,
        Ok(true) => {}
        Err(e) => {
            tracing::warn!("finding the capsule's filesystem heads: {e}");
            return false;
        }
    }
    let followed = live.write().expect("no panics while locked").follow();
    match followed {
        Ok(Followed::Moved(heads, changes)) => {
            match heads.as_slice() {
                [h] => tracing::info!("the mount now shows {h:?}, from a replica"),
                _ => tracing::info!(
                    "the mount now shows the merge of {} branches ({heads:?}); the next change here commits it",
                    heads.len()
                ),
            }
            if let Some(notifier) = notifier {
                capsulefs::fuse::forget(notifier, &changes);
            }
        }
        Ok(Followed::Pending) => {
            tracing::debug!("newer commits arrived while changes are pending here: merged after the next commit")
        }
        Ok(Followed::HeldBack(files)) => {
            tracing::debug!(
                "newer commits change {} file(s) open for writing here (inodes {files:?}): shown once they are closed",
                files.len()
            );
            return true;
        }
        Ok(Followed::Same) => {}
        Err(e) => tracing::warn!("moving the mount to the capsule's newest state: {e}"),
    }
    false
}

fn spawn_daemon(home: &Home, a: &MountArgs) -> anyhow::Result<()> {
    let logs = home.root().join("logs");
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("mount-{}.log", a.name.replace('/', "_")));
    let log = open_log(&log_path)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env("CAPSULEFS_HOME", home.root()).args(["mount", "--foreground"]).arg(&a.name).arg(&a.dir);
    if !a.options.is_empty() {
        cmd.arg("-o").arg(a.options.join(","));
    }
    if a.read_only {
        cmd.arg("--read-only");
    }
    if let Some(at) = &a.at {
        cmd.args(["--at", at]);
    }
    if let Some(key) = &a.key {
        cmd.args(["--key", key]);
    }
    cmd.args(["--commit-after", &a.commit_after.to_string(), "--cache-mib", &a.cache_mib.to_string()]);
    cmd.args(["--proof-cache-records", &a.proof_cache_records.to_string()]);
    cmd.args(["--push-wait", &a.push_wait.to_string(), "--attr-ttl", &a.attr_ttl.to_string()]);
    if a.no_sync {
        cmd.arg("--no-sync");
    }
    if a.replicated_fsync {
        cmd.args(["--replicated-fsync", "--replicated-fsync-wait", &a.replicated_fsync_wait.to_string()]);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the mount daemon")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout is piped")).read_line(&mut line)?;
    if line.trim() == READY {
        return Ok(());
    }
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    bail!("mount failed: {}", log.trim().lines().last().unwrap_or("(no message; see the log)"))
}

/// A mount's log, appended to: a remount after a crash keeps what the crashed daemon said
/// (its panic, if any). Past `LOG_ROTATE_BYTES` it moves to `NAME.1` first (one kept).
fn open_log(path: &Path) -> anyhow::Result<std::fs::File> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(path, &old).with_context(|| format!("rotating {}", path.display()))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Size at which a mount's log is rotated when a mount starts.
const LOG_ROTATE_BYTES: u64 = 16 << 20;

/// Whether `pid` is alive: any of its threads has not ended (a zombie waiting to be reaped
/// has). Its first thread can end, and show the process as a zombie, while others still end
/// (one killed while it waits on the disk): they hold its files, the store's lock among them,
/// until the last one ends, and a mount started meanwhile found the capsule in use.
fn process_running(pid: u32) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    threads.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with(['Z', 'X'])))
    })
}

pub fn umount(home: &Home, a: UmountArgs) -> anyhow::Result<()> {
    let entry = home.mount_entry(&a.dir)?;
    let pid = std::fs::read_to_string(&entry).ok().and_then(|s| s.lines().next()?.parse::<u32>().ok());
    let unmounted = ["fusermount3", "fusermount"]
        .iter()
        .any(|tool| Command::new(tool).arg("-u").arg(&a.dir).stderr(Stdio::null()).status().is_ok_and(|s| s.success()))
        || Command::new("umount").arg(&a.dir).status().is_ok_and(|s| s.success());
    if !unmounted {
        bail!("could not unmount {} (is it mounted? is it busy?)", a.dir.display());
    }
    // Wait for the daemon to end (final commit made, store closed), so the capsule can be
    // opened again right away.
    if let Some(pid) = pid {
        let deadline = Instant::now() + Duration::from_secs(60);
        while process_running(pid) {
            if Instant::now() > deadline {
                bail!("the mount daemon (pid {pid}) has not finished its final commit after 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Live figures of one mount, from the daemon through its `.capsule/status` file.
fn mount_status(dir: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(dir.join(".capsule/status")).map_err(|e| {
        Error::NotFound(format!("{}/.capsule/status ({e}): is it a capsulefs mount?", dir.display())).into()
    })
}

pub fn status(home: &Home, a: StatusArgs) -> anyhow::Result<()> {
    // Written, not printed: a reader that goes away (`| head -3`) is an error to return, not
    // a panic.
    let mut out = std::io::stdout().lock();
    if let Some(dir) = a.dir {
        write!(out, "folder: {}\n{}", dir.display(), mount_status(&dir)?)?;
        return Ok(());
    }
    let mut entries: Vec<_> = match std::fs::read_dir(home.root().join("mounts")) {
        Ok(dir) => dir.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).context("reading the mount registry"),
    };
    entries.sort();
    let mut shown = 0;
    for entry in entries {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        let mut lines = text.lines();
        let (Some(pid), Some(name), Some(dir)) = (lines.next(), lines.next(), lines.next()) else { continue };
        if !pid.parse().is_ok_and(process_running) {
            continue; // a daemon killed before it could clean up
        }
        if shown > 0 {
            writeln!(out)?;
        }
        shown += 1;
        writeln!(out, "folder: {dir}\nname: {name}\ndaemon_pid: {pid}")?;
        match mount_status(Path::new(dir)) {
            Ok(s) => write!(out, "{s}")?,
            Err(e) => writeln!(out, "error: {e:#}")?,
        }
    }
    if shown == 0 {
        writeln!(out, "no capsule is mounted from {}", home.root().display())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_whose_first_thread_ended_runs_while_another_thread_does() {
        // python3 (which the tests need anyway) ends its first thread, another sleeping on.
        let script = "import threading, time, ctypes\n\
                      threading.Thread(target=time.sleep, args=(2,)).start()\n\
                      ctypes.CDLL(None).pthread_exit(None)\n";
        let Ok(mut child) = Command::new("python3").args(["-c", script]).spawn() else { return };
        let leader = format!("/proc/{}/stat", child.id());
        let deadline = Instant::now() + Duration::from_secs(2);
        while !std::fs::read_to_string(&leader).unwrap().contains(") Z") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(process_running(child.id()), "a thread still runs");
        child.wait().unwrap();
        assert!(!process_running(child.id()));
    }
}
