//! The kernel edge: `fuser::Filesystem` over `fs::Fs`, one short method per operation.
//!
//! Commits: `fsync`/`fsyncdir` make a signed commit durable before replying; closing a written
//! file commits (buffered, signed when the capsule's K-records / T-seconds bound is due); more
//! than `PENDING_LIMIT` bytes of written chunks commit at once. The final durable commit at
//! unmount is made by whoever runs the session (`cli::mount`), after it ends.

mod errno;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::Result;
use crate::fs::Fs;
use crate::fs::filesystem::XattrMode;
use crate::fs::node::{Inode, Kind, Time};
use crate::record::Params;
use crate::store::Durability;
use errno::to_errno;

const TTL: Duration = Duration::from_secs(1);
/// Written but uncommitted bytes that force a commit.
const PENDING_LIMIT: usize = 64 << 20;
const MAX_WRITE: u32 = 1 << 20;

/// When unsigned commits must end with a signed one (the capsule's K and T bounds).
struct SignPolicy {
    every_records: u32,
    every: Duration,
    unsigned: u32,
    since: Option<Instant>,
}

impl SignPolicy {
    fn due(&self) -> bool {
        self.unsigned + 1 >= self.every_records || self.since.is_some_and(|t| t.elapsed() >= self.every)
    }

    fn record(&mut self, signed: bool) {
        if signed {
            (self.unsigned, self.since) = (0, None);
        } else {
            self.unsigned += 1;
            self.since.get_or_insert_with(Instant::now);
        }
    }
}

pub struct CapsuleFs {
    fs: Arc<Mutex<Fs>>,
    policy: Mutex<SignPolicy>,
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
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl CapsuleFs {
    pub fn new(fs: Arc<Mutex<Fs>>, params: &Params) -> Self {
        let policy = SignPolicy {
            every_records: params.sign_every_records.max(1),
            every: Duration::from_secs(u64::from(params.sign_every_secs)),
            unsigned: 0,
            since: None,
        };
        Self { fs, policy: Mutex::new(policy) }
    }

    fn fs(&self) -> MutexGuard<'_, Fs> {
        self.fs.lock().expect("a filesystem operation panicked; the mount cannot go on")
    }

    /// Commits pending changes; signed when asked or when the policy says so.
    fn commit(&self, fs: &mut Fs, force_sign: bool, durability: Durability) -> Result<()> {
        if !fs.is_dirty() {
            return Ok(());
        }
        let mut policy = self.policy.lock().expect("no panics while locked");
        let sign = force_sign || policy.due();
        if fs.commit(sign, durability)?.is_some() {
            policy.record(sign);
        }
        Ok(())
    }

    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr> {
        let perm = (mode & !umask & 0o7777) as u16;
        let inode = Inode::new(kind, perm, req.uid(), req.gid());
        let (ino, inode) = self.fs().make(parent.0, name.as_bytes(), inode)?;
        Ok(attr(ino, &inode))
    }
}

fn reply_entry(r: Result<FileAttr>, reply: ReplyEntry) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, Generation(0)),
        Err(e) => reply.error(to_errno(&e)),
    }
}

/// Size probe (size 0), the value, or ERANGE when the caller's buffer is too small.
fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    match size {
        0 => reply.size(value.len() as u32),
        s if (s as usize) < value.len() => reply.error(Errno::from_i32(libc::ERANGE)),
        _ => reply.data(value),
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
        let _ = config.set_max_readahead(MAX_WRITE);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(self.fs().lookup(parent.0, name.as_bytes()).map(|(ino, i)| attr(ino, &i)), reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs().getattr(ino.0) {
            Ok(i) => reply.attr(&TTL, &attr(ino.0, &i)),
            Err(e) => reply.error(to_errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
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
        let mut fs = self.fs();
        let result = size.map_or(Ok(()), |s| fs.truncate(ino.0, s)).and_then(|()| {
            fs.set_attr(ino.0, |i| {
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
            })
        });
        match result {
            Ok(i) => reply.attr(&TTL, &attr(ino.0, &i)),
            Err(e) => reply.error(to_errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs().getattr(ino.0) {
            Ok(i) if i.kind == Kind::Symlink => reply.data(&i.target),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(to_errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM); // devices, fifos and sockets are not stored
        }
        reply_entry(self.make(req, parent, name, Kind::File, mode, umask), reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        reply_entry(self.make(req, parent, name, Kind::Dir, mode, umask), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.fs().unlink(parent.0, name.as_bytes()), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.fs().rmdir(parent.0, name.as_bytes()), reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let mut inode = Inode::new(Kind::Symlink, 0o777, req.uid(), req.gid());
        inode.target = target.as_os_str().as_bytes().to_vec();
        reply_entry(self.fs().make(parent.0, link_name.as_bytes(), inode).map(|(ino, i)| attr(ino, &i)), reply);
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
        let mut fs = self.fs();
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply_empty(fs.exchange(parent.0, name.as_bytes(), newparent.0, newname.as_bytes()), reply);
        }
        if flags.contains(RenameFlags::RENAME_NOREPLACE) && fs.lookup(newparent.0, newname.as_bytes()).is_ok() {
            return reply.error(Errno::EEXIST);
        }
        reply_empty(fs.rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes()), reply);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        reply_entry(self.fs().link(ino.0, newparent.0, newname.as_bytes()).map(|i| attr(ino.0, &i)), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: fuser::ReplyOpen) {
        self.fs().opened(ino.0);
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs().read(ino.0, offset, size) {
            Ok(bytes) => reply.data(&bytes),
            Err(e) => reply.error(to_errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut fs = self.fs();
        let result = fs.write(ino.0, offset, data).and_then(|()| {
            if fs.pending_bytes() > PENDING_LIMIT { self.commit(&mut fs, false, Durability::Buffered) } else { Ok(()) }
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
        _fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let written = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let mut fs = self.fs();
        let result = fs
            .released(ino.0)
            .and_then(|()| if written { self.commit(&mut fs, false, Durability::Buffered) } else { Ok(()) });
        reply_empty(result, reply);
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut fs = self.fs();
        reply_empty(self.commit(&mut fs, true, Durability::Durable), reply);
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut fs = self.fs();
        reply_empty(self.commit(&mut fs, true, Durability::Durable), reply);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.fs().readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(to_errno(&e)),
        };
        // Offsets are positions in [".", "..", entries...]; the kernel passes back the last one.
        let dots = [(ino.0, FileType::Directory, &b"."[..]), (ino.0, FileType::Directory, &b".."[..])];
        let all = dots.into_iter().chain(entries.iter().map(|e| (e.ino, file_type(e.kind), e.name.as_slice())));
        for (i, (child, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs().get_xattr(ino.0, name.as_bytes()) {
            Ok(value) => reply_xattr(&value, size, reply),
            Err(e) => reply.error(to_errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs().list_xattrs(ino.0) {
            Ok(names) => {
                reply_xattr(&names.iter().flat_map(|n| n.iter().copied().chain([0])).collect::<Vec<u8>>(), size, reply)
            }
            Err(e) => reply.error(to_errno(&e)),
        }
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
        reply_empty(self.fs().set_xattr(ino.0, name.as_bytes(), Some(value), mode), reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.fs().set_xattr(ino.0, name.as_bytes(), None, XattrMode::Any), reply);
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
        match self.make(req, parent, name, Kind::File, mode, umask) {
            Ok(a) => {
                self.fs().opened(a.ino.0);
                reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty())
            }
            Err(e) => reply.error(to_errno(&e)),
        }
    }
}
