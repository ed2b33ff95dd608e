//! The kernel edge: `fuser::Filesystem` over `fs::Fs`, one short method per operation.
//!
//! Commits: `fsync`/`fsyncdir` make a signed commit durable before replying; closing a written
//! file asks `commit_timer` for a commit (buffered, signed when the capsule's K-records /
//! T-seconds bound is due), which it makes a few milliseconds later, shared by the closes in
//! between; more than `PENDING_LIMIT` bytes of written chunks commit at once; the timer also
//! commits what has waited too long, and its `finish` makes the unmount's commit once the
//! session (run by `cli::mount`) has ended.

mod commit;
mod control;
mod errno;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::Fs;
use crate::fs::filesystem::{Changes, Signing, XattrMode};
use crate::fs::node::{Inode, Kind, ROOT_INO, Time};
use crate::fs::signing::{SignPolicy, commit, commit_durable};
use crate::record::Params;
use crate::replica::status::SyncStatus;
use crate::store::Durability;
use crate::{Error, Result};
pub use commit::CommitTimer;
use commit::Wakeups;
use control::{CONTROL_NAME, Node, Status, Views};
use errno::to_errno;

/// How long the kernel may keep names and attributes by default. Changes from elsewhere are
/// also told to it at once (`Changes`, through fuser's notifier), so this bounds only what a
/// lost notification could leave stale.
pub const TTL: Duration = Duration::from_secs(1);
/// Written but uncommitted bytes that force a commit. Measured, 512 MiB `dd conv=fsync`, three
/// runs each: 4 MiB 1.42-1.46 s, 8 MiB 1.20-1.45 s, 16 MiB 1.08-1.26 s, 32 MiB 1.40-1.86 s
/// (with chunks sealed as they fill; at 32 MiB and more, fresh memory and longer stalls win).
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

fn system_time(t: Time) -> SystemTime {
    let d = Duration::new(t.secs.unsigned_abs(), t.nanos);
    if t.secs >= 0 { UNIX_EPOCH + d } else { UNIX_EPOCH - d }
}

fn capsule_time(t: TimeOrNow) -> Time {
    match t {
        TimeOrNow::Now => Time::now(),
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => Time { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
            Err(e) => {
                let d = e.duration();
                let (secs, nanos) = if d.subsec_nanos() == 0 {
                    (-(d.as_secs() as i64), 0)
                } else {
                    (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
                };
                Time { secs, nanos }
            }
        },
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn attr(ino: u64, i: &Inode) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: i.size,
        blocks: i.size.div_ceil(512),
        atime: system_time(i.atime),
        mtime: system_time(i.mtime),
        ctime: system_time(i.ctime),
        crtime: system_time(i.ctime),
        kind: file_type(i.kind),
        perm: i.perm,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// The live inode behind `ino`; the `.capsule` folder and history views are read-only.
fn live(ino: INodeNo) -> Result<u64> {
    match Node::decode(ino.0) {
        Node::Live(i) => Ok(i),
        _ => Err(Error::ReadOnlyView),
    }
}

/// `name` as a new name in live directory `parent`: `.capsule` at the root is taken.
fn new_name(parent: u64, name: &OsStr) -> Result<&[u8]> {
    if parent == ROOT_INO && name.as_bytes() == CONTROL_NAME {
        return Err(Error::Exists(".capsule (reserved by capsulefs for status and history)".into()));
    }
    Ok(name.as_bytes())
}

/// The permission bits a new node gets.
fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
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

/// How a new handle to live file `ino` reads: through the kernel's page cache, unless readers
/// pinned to an older version of the file are open. The kernel keeps one page cache per file,
/// which those readers' pages fill (and their reads take pages from): a new handle's pages
/// there would give an old reader's read pages of both versions, so it reads around the cache
/// until they are closed.
fn page_cache(fs: &Fs, ino: u64) -> FopenFlags {
    if fs.has_pinned_readers(ino) { FopenFlags::FOPEN_DIRECT_IO } else { FopenFlags::empty() }
}

/// Maps an inode number of the tree being read to the kernel's number for it.
type Encode<'a> = &'a dyn Fn(u64) -> u64;

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

    fn commit(&self, fs: &mut Fs, asked: Signing, durability: Durability) -> Result<()> {
        commit(&self.policy, fs, asked, durability)
    }

    /// Runs a read-only operation on the tree that holds kernel inode `ino`, the live one or
    /// a view of the past, with `ino` in that tree's numbering and a way back.
    fn on_tree<T>(&self, ino: u64, op: impl FnOnce(&Fs, u64, Encode<'_>) -> Result<T>) -> Result<T> {
        match Node::decode(ino) {
            Node::Live(i) => op(&self.fs(), i, &|i| i),
            Node::View { slot, ino } => {
                let live = self.fs();
                let mut views = self.views();
                let (view, numbers) = views.open(&live, slot)?;
                let ino = numbers.borrow().ino(ino)?;
                op(view, ino, &|i| Node::View { slot, ino: numbers.borrow_mut().short(i) }.encode())
            }
            other => Err(Error::Invalid(format!("{other:?} is not in a file tree"))),
        }
    }

    fn tree_attr(&self, ino: u64) -> Result<FileAttr> {
        self.on_tree(ino, |fs, i, encode| fs.getattr(i).map(|n| attr(encode(i), &n)))
    }

    fn status(&self) -> Status {
        let fs = self.fs();
        let policy = self.policy.lock().expect("no panics while locked");
        Status {
            capsule: fs.capsule().id().to_hex(),
            heads: fs.heads().to_vec(),
            read_only: fs.is_read_only(),
            pending_bytes: fs.pending_bytes(),
            uncommitted: fs.is_dirty(),
            commits: policy.commits,
            signed_commits: policy.signed,
            proof_cache: fs.capsule().cache_stats(),
            plain_cache: fs.cache().plain.stats(),
            node_cache: fs.cache().nodes.stats(),
            history_views: self.views().open_count(),
            held_back_by: fs.held_back_by(),
            replicas: self.replicas.as_ref().map(SyncStatus::replicas).unwrap_or_default(),
            replicated: self.replicas.as_ref().map(|r| (r.holding(fs.capsule().records_stored()), r.replicas().len())),
            read_quorum: self.read_quorum.zip(self.replicas.as_ref()).map(|(needed, r)| {
                let all = r.replicas();
                (all.iter().filter(|s| s.reachable == Some(true)).count(), all.len(), needed)
            }),
            forks: fs.capsule().forks().unwrap_or_else(|e| {
                tracing::warn!("reading the fork evidence for .capsule/status: {e}");
                Vec::new()
            }),
            key_generations: (
                fs.sealing_key_generation(),
                fs.capsule().rights().ok().and_then(|r| r.newest_generation()),
            ),
        }
    }

    /// Attributes of the `.capsule` folder's own nodes: owned like the root, never writable.
    fn control_attr(&self, node: Node) -> Result<FileAttr> {
        let root = self.fs().getattr(ROOT_INO)?;
        let mut inode = Inode::new(Kind::Dir, 0o555, root.uid, root.gid);
        (inode.atime, inode.mtime, inode.ctime, inode.nlink) = (root.mtime, root.mtime, root.mtime, 2);
        if node == Node::Status {
            (inode.kind, inode.perm, inode.nlink) = (Kind::File, 0o444, 1);
            inode.size = self.status().render().len() as u64;
        }
        Ok(attr(node.encode(), &inode))
    }

    /// The view of the commit `name` in `.capsule/history`: a listed name (`000042-1a2b3c4d5e6f`)
    /// or a record hash or unique prefix.
    fn history_entry(&self, name: &OsStr) -> Result<FileAttr> {
        let name = name.to_string_lossy();
        let hash = name.split_once('-').map_or(&*name, |(_, hash)| hash);
        let record = self.fs().capsule().resolve(hash)?;
        let slot = self.views().slot_for(record)?;
        self.tree_attr(Node::View { slot, ino: ROOT_INO }.encode())
    }

    fn listings(&self) -> MutexGuard<'_, HashMap<u64, Arc<Listing>>> {
        self.listings.lock().expect("no panics while locked")
    }

    fn entries(&self, ino: u64) -> Result<Listing> {
        match Node::decode(ino) {
            Node::ControlDir => Ok(vec![
                (Node::Status.encode(), FileType::RegularFile, b"status".to_vec()),
                (Node::History.encode(), FileType::Directory, b"history".to_vec()),
            ]),
            // Oldest first, so offsets stay valid while new commits arrive, and named so that
            // `ls` sorts them that way too.
            Node::History => {
                let commits = self.fs().commits()?;
                let mut views = self.views();
                (1..)
                    .zip(commits)
                    .map(|(n, h)| {
                        let root = Node::View { slot: views.slot_for(h)?, ino: ROOT_INO };
                        Ok((root.encode(), FileType::Directory, control::history_name(n, h).into_bytes()))
                    })
                    .collect()
            }
            Node::Status => Err(Error::NotADirectory("status".into())),
            _ => self.on_tree(ino, |fs, dir, encode| {
                Ok(fs.readdir(dir)?.into_iter().map(|e| (encode(e.ino), file_type(e.kind), e.name)).collect())
            }),
        }
    }

    /// The listing of folder `ino` for directory handle `fh`. Offset 0 starts a pass
    /// (rewinddir included) and takes the folder as it is now; later offsets reuse it.
    fn listing(&self, ino: u64, fh: u64, offset: u64) -> Result<Arc<Listing>> {
        if offset != 0
            && let Some(listing) = self.listings().get(&fh).cloned()
        {
            return Ok(listing);
        }
        let listing = Arc::new(self.entries(ino)?);
        if let Some(kept) = self.listings().get_mut(&fh) {
            *kept = listing.clone();
        }
        Ok(listing)
    }

    /// Attributes of any kernel inode: a control node or a node of a tree.
    fn any_attr(&self, ino: u64) -> Result<FileAttr> {
        match Node::decode(ino) {
            node @ (Node::ControlDir | Node::Status | Node::History) => self.control_attr(node),
            _ => self.tree_attr(ino),
        }
    }

    fn make(&self, req: &Request, parent: INodeNo, name: &OsStr, kind: Kind, perm: u16, rdev: u32) -> Result<FileAttr> {
        let parent = live(parent)?;
        let mut inode = Inode::new(kind, perm, req.uid(), req.gid());
        inode.rdev = rdev;
        let (ino, inode) = self.fs_mut().make(parent, new_name(parent, name)?, inode)?;
        Ok(attr(ino, &inode))
    }
}

/// `.`, `..` and then `entries`, each with its offset: its position plus one, which the
/// kernel passes back to continue after it.
fn with_dots(ino: u64, entries: &Listing) -> impl Iterator<Item = (u64, (u64, FileType, &[u8]))> {
    let dots = [(ino, FileType::Directory, &b"."[..]), (ino, FileType::Directory, &b".."[..])];
    let all = dots.into_iter().chain(entries.iter().map(|(i, kind, name)| (*i, *kind, name.as_slice())));
    (1..).zip(all)
}

fn reply_entry(ttl: Duration, r: Result<FileAttr>, reply: ReplyEntry) {
    match r {
        Ok(a) => reply.entry(&ttl, &a, Generation(0)),
        Err(e) => reply.error(to_errno(&e)),
    }
}

fn reply_attr(ttl: Duration, r: Result<FileAttr>, reply: ReplyAttr) {
    match r {
        Ok(a) => reply.attr(&ttl, &a),
        Err(e) => reply.error(to_errno(&e)),
    }
}

fn reply_data(r: Result<Vec<u8>>, reply: ReplyData) {
    match r {
        Ok(bytes) => reply.data(&bytes),
        Err(e) => reply.error(to_errno(&e)),
    }
}

/// Size probe (size 0), the value, or ERANGE when the caller's buffer is too small.
fn reply_xattr(r: Result<Vec<u8>>, size: u32, reply: ReplyXattr) {
    match (r, size) {
        (Err(e), _) => reply.error(to_errno(&e)),
        (Ok(value), 0) => reply.size(value.len() as u32),
        (Ok(value), s) if (s as usize) < value.len() => reply.error(Errno::from_i32(libc::ERANGE)),
        (Ok(value), _) => reply.data(&value),
    }
}

fn reply_empty(r: Result<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(to_errno(&e)),
    }
}

impl Filesystem for CapsuleFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger writes mean fewer round trips; the kernel caps what it accepts.
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_READAHEAD);
        // readdirplus when the kernel sees lookups follow a listing; lookups in one folder
        // may run in parallel (they share the read lock).
        let _ = config.add_capabilities(
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO | InitFlags::FUSE_PARALLEL_DIROPS,
        );
        // Clearing set-user-ID and set-group-ID bits on write, truncate and chown is ours to do
        // (`write` and `setattr` below): otherwise the kernel asks for security.capability
        // before every write, one more round trip on each append.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = match (Node::decode(parent.0), name.as_bytes()) {
            (Node::Live(ROOT_INO), CONTROL_NAME) => self.control_attr(Node::ControlDir),
            (Node::ControlDir, b"status") => self.control_attr(Node::Status),
            (Node::ControlDir, b"history") => self.control_attr(Node::History),
            (Node::ControlDir, _) => Err(Error::NotFound(name.to_string_lossy().into_owned())),
            (Node::History, _) => self.history_entry(name),
            (Node::Status, _) => Err(Error::NotADirectory("status".into())),
            _ => self
                .on_tree(parent.0, |fs, dir, encode| fs.lookup(dir, name.as_bytes()).map(|(i, n)| attr(encode(i), &n))),
        };
        reply_entry(self.ttl, found, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(self.ttl, self.any_attr(ino.0), reply);
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The kernel leaves clearing set-ID bits to us (FUSE_HANDLE_KILLPRIV_V2): a chown of
        // anything but a folder clears them, and so does a truncate by a caller without
        // CAP_FSETID (taken to be any but root); a mode given in the same call wins.
        let owner_changes = uid.is_some() || gid.is_some();
        let truncate_drops = size.is_some() && req.uid() != 0;
        let result = live(ino).and_then(|ino| {
            let mut fs = self.fs_mut();
            size.map_or(Ok(()), |s| fs.truncate(ino, s))?;
            let inode = fs.set_attr(ino, |i| {
                if (truncate_drops || owner_changes && i.kind != Kind::Dir) && mode.is_none() {
                    i.drop_set_ids();
                }
                if let Some(m) = mode {
                    i.perm = (m & 0o7777) as u16;
                }
                i.uid = uid.unwrap_or(i.uid);
                i.gid = gid.unwrap_or(i.gid);
                if let Some(t) = atime {
                    i.atime = capsule_time(t);
                }
                if let Some(t) = mtime {
                    i.mtime = capsule_time(t);
                }
            })?;
            Ok(attr(ino, &inode))
        });
        reply_attr(self.ttl, result, reply);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let target = self.on_tree(ino.0, |fs, i, _| match fs.getattr(i)? {
            n if n.kind == Kind::Symlink => Ok(n.target),
            _ => Err(Error::Invalid("not a symbolic link".into())),
        });
        reply_data(target, reply);
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        // Only the inode is stored: the kernel carries a fifo's or socket's data and opens
        // devices itself, so none of their I/O reaches the mount.
        let (kind, rdev) = match mode & libc::S_IFMT {
            libc::S_IFREG => (Kind::File, 0),
            libc::S_IFIFO => (Kind::Fifo, 0),
            libc::S_IFSOCK => (Kind::Socket, 0),
            libc::S_IFCHR => (Kind::CharDevice, rdev),
            libc::S_IFBLK => (Kind::BlockDevice, rdev),
            _ => return reply.error(Errno::EINVAL),
        };
        reply_entry(self.ttl, self.make(req, parent, name, kind, perm(mode, umask), rdev), reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        reply_entry(self.ttl, self.make(req, parent, name, Kind::Dir, perm(mode, umask), 0), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(live(parent).and_then(|p| self.fs_mut().unlink(p, name.as_bytes())), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(live(parent).and_then(|p| self.fs_mut().rmdir(p, name.as_bytes())), reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let made = live(parent).and_then(|parent| {
            let mut inode = Inode::new(Kind::Symlink, 0o777, req.uid(), req.gid());
            inode.target = target.as_os_str().as_bytes().to_vec();
            let (ino, inode) = self.fs_mut().make(parent, new_name(parent, link_name)?, inode)?;
            Ok(attr(ino, &inode))
        });
        reply_entry(self.ttl, made, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = live(parent).and_then(|from| {
            let to = live(newparent)?;
            let (name, newname) = (name.as_bytes(), new_name(to, newname)?);
            let mut fs = self.fs_mut();
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return fs.exchange(from, name, to, newname);
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) && fs.lookup(to, newname).is_ok() {
                return Err(Error::Exists(String::from_utf8_lossy(newname).into_owned()));
            }
            fs.rename(from, name, to, newname)
        });
        reply_empty(result, reply);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let linked = live(ino).and_then(|ino| {
            let parent = live(newparent)?;
            Ok(attr(ino, &self.fs_mut().link(ino, parent, new_name(parent, newname)?)?))
        });
        reply_entry(self.ttl, linked, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: fuser::ReplyOpen) {
        match Node::decode(ino.0) {
            // A reader gets a handle of its own, which a change from elsewhere may pin to the
            // version it opened (`Fs::follow`).
            Node::Live(i) if flags.0 & libc::O_ACCMODE == libc::O_RDONLY => {
                let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
                let mut fs = self.fs_mut();
                fs.opened_reader(i, fh);
                return reply.opened(FileHandle(fh), page_cache(&fs, i));
            }
            Node::Live(i) => {
                let mut fs = self.fs_mut();
                fs.opened(i);
                return reply.opened(FileHandle(0), page_cache(&fs, i));
            }
            // Rendered afresh on every read: no page cache, no size limit from getattr.
            Node::Status => return reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            _ => {}
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if Node::decode(ino.0) == Node::Status {
            let text = self.status().render().into_bytes();
            let start = (offset as usize).min(text.len());
            return reply.data(&text[start..(start + size as usize).min(text.len())]);
        }
        reply_data(self.on_tree(ino.0, |fs, i, _| fs.read_handle(fh.0, i, offset, size)), reply);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = live(ino).and_then(|ino| {
            let mut fs = self.fs_mut();
            // Set by the kernel when the writer lacks CAP_FSETID (FUSE_HANDLE_KILLPRIV_V2).
            if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                fs.write_unprivileged(ino, offset, data)?;
            } else {
                fs.write(ino, offset, data)?;
            }
            if fs.pending_bytes() > PENDING_LIMIT {
                self.commit(&mut fs, Signing::Later, Durability::Buffered)
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(to_errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let Node::Live(ino) = Node::decode(ino.0) else { return reply.ok() };
        let written = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let mut fs = self.fs_mut();
        let result = match fh.0 {
            0 => fs.released(ino),
            reader => fs.released_reader(reader),
        };
        // The last file that kept newer commits from being shown is closed: the follow thread
        // (which waits for records) moves the mount now rather than at its next look.
        if fs.held_back_no_more() {
            fs.capsule().wake_waiters();
        }
        drop(fs);
        if written {
            self.wakeups.commit_soon();
        }
        reply_empty(result, reply);
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(self.sync_durably(), reply);
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(self.sync_durably(), reply);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: fuser::ReplyOpen) {
        // The listing is taken by the first readdir (offset 0) and kept for the later ones.
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.listings().insert(fh, Arc::new(Vec::new()));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.listings().remove(&fh.0);
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.listing(ino.0, fh.0, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(to_errno(&e)),
        };
        for (i, (child, kind, name)) in with_dots(ino.0, &entries).skip(offset as usize) {
            if reply.add(INodeNo(child), i, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    /// readdir with each entry's attributes, so `ls -l` and `find` need no lookup per entry.
    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let (entries, own) = match self.listing(ino.0, fh.0, offset).and_then(|e| Ok((e, self.any_attr(ino.0)?))) {
            Ok(found) => found,
            Err(e) => return reply.error(to_errno(&e)),
        };
        let in_history = Node::decode(ino.0) == Node::History;
        for (i, (child, kind, name)) in with_dots(ino.0, &entries).skip(offset as usize) {
            let attr = match (name, in_history) {
                (b"." | b"..", _) => Ok(own), // the kernel takes no attributes for these
                // A commit's folder, described without opening its view.
                (_, true) => Ok(FileAttr { ino: INodeNo(child), ..own }),
                _ => self.any_attr(child),
            };
            let full = match attr {
                Ok(attr) => reply.add(INodeNo(child), i, OsStr::from_bytes(name), &self.ttl, &attr, Generation(0)),
                // Listed, but not cached: a stat of it asks again and gets the error (EIO).
                Err(_) => {
                    let bare = FileAttr { ino: INodeNo(child), kind, perm: 0, size: 0, nlink: 1, ..own };
                    reply.add(INodeNo(child), i, OsStr::from_bytes(name), &Duration::ZERO, &bare, Generation(0))
                }
            };
            if full {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = match Node::decode(ino.0) {
            Node::ControlDir | Node::Status | Node::History => {
                Err(Error::NoAttribute(name.to_string_lossy().into_owned()))
            }
            _ => self.on_tree(ino.0, |fs, i, _| fs.get_xattr(i, name.as_bytes())),
        };
        reply_xattr(value, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names = match Node::decode(ino.0) {
            Node::ControlDir | Node::Status | Node::History => Ok(Vec::new()),
            _ => self.on_tree(ino.0, |fs, i, _| fs.list_xattrs(i)),
        };
        reply_xattr(names.map(|names| names.iter().flat_map(|n| n.iter().copied().chain([0])).collect()), size, reply);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = match flags {
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => XattrMode::Any,
        };
        reply_empty(live(ino).and_then(|i| self.fs_mut().set_xattr(i, name.as_bytes(), Some(value), mode)), reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(live(ino).and_then(|i| self.fs_mut().set_xattr(i, name.as_bytes(), None, XattrMode::Any)), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A capsule has no fixed size; report ample free space so tools do not refuse to write.
        reply.statfs(1 << 40, 1 << 39, 1 << 39, 1 << 32, 1 << 31, 4096, 255, 4096);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.make(req, parent, name, Kind::File, perm(mode, umask), 0) {
            Ok(a) => {
                self.fs_mut().opened(a.ino.0);
                reply.created(&self.ttl, &a, Generation(0), FileHandle(0), FopenFlags::empty())
            }
            Err(e) => reply.error(to_errno(&e)),
        }
    }
}
