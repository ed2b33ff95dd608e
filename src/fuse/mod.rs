//! The kernel edge: `fuser::Filesystem` over `fs::Fs`, one short method per operation.
//!
//! Commits: `fsync`/`fsyncdir` make a signed commit durable before replying; closing a written
//! file asks `commit_timer` for a commit (buffered, signed when the capsule's K-records /
//! T-seconds bound is due), which it makes a few milliseconds later, shared by the closes in
//! between; more than `PENDING_LIMIT` bytes of written chunks commit at once; the timer also
//! commits what has waited too long, and its `finish` makes the unmount's commit once the
//! session (run by `cli::mount`) has ended.
//!
//! The `Filesystem` impl, one impl block, is in `ops`; what its methods share is beside it:
//! `kernel` (the kernel's types from the filesystem's, and replies), `nodes` (which tree a
//! kernel inode is in, and the `.capsule` folder's nodes), `listing` (directory listings kept
//! per handle), `commit` (the commit timer) and `control` (the `.capsule` folder's contents).

mod commit;
mod control;
mod errno;
mod kernel;
mod listing;
mod nodes;
mod ops;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use fuser::{FileType, INodeNo};

use crate::fs::Fs;
use crate::fs::filesystem::Changes;
use crate::fs::signing::{SignPolicy, commit_durable};
use crate::record::Params;
use crate::sync::status::SyncStatus;
use crate::{Error, Result};
pub use commit::CommitTimer;
use commit::Wakeups;
use control::{Node, Views};

/// How long the kernel may keep names and attributes by default. Changes from elsewhere are
/// also told to it at once (`Changes`, through fuser's notifier), so this bounds only what a
/// lost notification could leave stale.
pub const TTL: Duration = Duration::from_secs(1);
/// Written but uncommitted bytes that force a commit: the fastest of 4 to 32 MiB on a 512 MiB
/// `dd conv=fsync` (BENCHMARKS.md, "Smaller figures"); past it, fresh memory and longer
/// stalls cost more than fewer commits save.
const PENDING_LIMIT: usize = 16 << 20;
const MAX_WRITE: u32 = 1 << 20;
/// Readahead asked of the kernel; `cli::mount` raises the mount's bdi window to match.
pub const MAX_READAHEAD: u32 = 1 << 20;

/// A folder's entries as (kernel inode, type, name), without `.` and `..`.
type Listing = Vec<(u64, FileType, Vec<u8>)>;

pub struct CapsuleFs {
    fs: Arc<RwLock<Fs>>,
    policy: Arc<Mutex<SignPolicy>>,
    /// How closes ask the commit timer for a commit.
    wakeups: Arc<Wakeups>,
    views: Mutex<Views>,
    /// Listings taken by a handle's first readdir and served to its later ones until
    /// releasedir: one walk of a directory per pass, however many replies a large one takes.
    listings: Mutex<HashMap<u64, Arc<Listing>>>,
    /// Numbers for listings and reading handles; 0 is a handle with no state of its own.
    next_handle: AtomicU64,
    /// How long the kernel may keep names and attributes.
    ttl: Duration,
    /// The background push's replicas, when the mount pushes.
    replicas: Option<SyncStatus>,
    /// `--replicated-fsync`: fsync returns once this many replicas hold the commit, or fails
    /// with EIO after waiting this long.
    replicated_fsync: Option<(usize, Duration)>,
    /// With a replica policy: how many replicas a read quorum is.
    read_quorum: Option<usize>,
}

/// Tells the kernel to forget what `changes` made stale: each changed inode's attributes and
/// cached pages, and each changed name's entry. An inode or name it never cached is refused
/// (ENOENT), which is no error here.
pub fn forget(notifier: &fuser::Notifier, changes: &Changes) {
    let told = |what: String, result: std::io::Result<()>| match result {
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => tracing::debug!("telling the kernel {what} changed: {e}"),
        _ => {}
    };
    for &ino in &changes.inodes {
        told(format!("inode {ino}"), notifier.inval_inode(INodeNo(Node::Live(ino).encode()), 0, 0));
    }
    for (dir, name) in &changes.names {
        let parent = INodeNo(Node::Live(*dir).encode());
        told(format!("a name in {dir}"), notifier.inval_entry(parent, OsStr::from_bytes(name)));
    }
}

impl CapsuleFs {
    pub fn new(fs: Arc<RwLock<Fs>>, params: &Params) -> Self {
        Self {
            fs,
            policy: Arc::new(Mutex::new(SignPolicy::new(params))),
            wakeups: Arc::default(),
            views: Mutex::new(Views::default()),
            listings: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            replicas: None,
            replicated_fsync: None,
            read_quorum: None,
            ttl: TTL,
        }
    }

    /// Makes fsync wait until `needed` of the replicas hold the commit, at most `wait`.
    pub fn with_replicated_fsync(mut self, needed: usize, wait: Duration) -> Self {
        self.replicated_fsync = Some((needed, wait));
        self
    }

    /// An fsync: the durable commit, then, with `--replicated-fsync`, the wait for a write
    /// quorum of replicas to hold it.
    fn sync_durably(&self) -> Result<()> {
        commit_durable(&self.policy, &mut self.fs_mut())?;
        let (Some((needed, wait)), Some(replicas)) = (self.replicated_fsync, &self.replicas) else { return Ok(()) };
        let mark = self.fs().capsule().records_stored();
        if replicas.wait_replicated(mark, needed, wait) {
            return Ok(());
        }
        let held = replicas.holding(mark);
        tracing::error!(
            "fsync: the commit reached {held} of {} replicas within {} s, and --replicated-fsync needs {needed}:              failing with EIO (it stays committed here and goes out when the replicas are back)",
            replicas.replicas().len(),
            wait.as_secs()
        );
        Err(Error::Replica(format!("the commit reached {held} replicas, {needed} needed")))
    }

    /// Shows in `.capsule/status` whether `needed` replicas answer the background pulls.
    pub fn with_read_quorum(mut self, needed: usize) -> Self {
        self.read_quorum = Some(needed);
        self
    }

    /// Lets the kernel keep names and attributes for `ttl` instead of `TTL`.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Shows the background push's replicas in `.capsule/status`.
    pub fn with_replicas(mut self, replicas: SyncStatus) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Makes the commits that closes ask for, and commits whatever has waited `after`, until
    /// the returned timer is dropped.
    pub fn commit_timer(&self, after: Duration) -> CommitTimer {
        CommitTimer::start(self.fs.clone(), self.policy.clone(), self.wakeups.clone(), after)
    }

    /// Reads share the filesystem across FUSE threads; changes and commits take it alone.
    fn fs(&self) -> RwLockReadGuard<'_, Fs> {
        self.fs.read().expect("a filesystem operation panicked; the mount cannot go on")
    }

    fn fs_mut(&self) -> RwLockWriteGuard<'_, Fs> {
        self.fs.write().expect("a filesystem operation panicked; the mount cannot go on")
    }

    fn views(&self) -> MutexGuard<'_, Views> {
        self.views.lock().expect("a history operation panicked; the mount cannot go on")
    }
}
