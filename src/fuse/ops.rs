//! `fuser::Filesystem` for `CapsuleFs`: one short method per operation.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::control::{CONTROL_NAME, Node};
use super::errno::to_errno;
use super::kernel::{
    attr, capsule_time, live, new_name, perm, reply_attr, reply_data, reply_empty, reply_entry, reply_xattr,
};
use super::listing::with_dots;
use super::{CapsuleFs, MAX_READAHEAD, MAX_WRITE, PENDING_LIMIT};
use crate::fs::Fs;
use crate::fs::filesystem::{Signing, XattrMode};
use crate::fs::node::{Inode, Kind, ROOT_INO};
use crate::fs::signing;
use crate::store::Durability;
use crate::{Error, Result};

/// How a new handle to live file `ino` reads: through the kernel's page cache, unless readers
/// pinned to an older version of the file are open. The kernel keeps one page cache per file,
/// which those readers' pages fill (and their reads take pages from): a new handle's pages
/// there would give an old reader's read pages of both versions, so it reads around the cache
/// until they are closed.
fn page_cache(fs: &Fs, ino: u64) -> FopenFlags {
    if fs.has_pinned_readers(ino) { FopenFlags::FOPEN_DIRECT_IO } else { FopenFlags::empty() }
}

impl CapsuleFs {
    fn make(&self, req: &Request, parent: INodeNo, name: &OsStr, kind: Kind, perm: u16, rdev: u32) -> Result<FileAttr> {
        made(&mut self.fs_mut(), req, parent, name, kind, perm, rdev)
    }
}

/// Makes `name` in `parent`, owned by the caller of `req`.
fn made(
    fs: &mut Fs,
    req: &Request,
    parent: INodeNo,
    name: &OsStr,
    kind: Kind,
    perm: u16,
    rdev: u32,
) -> Result<FileAttr> {
    let parent = live(parent)?;
    let mut inode = Inode::new(kind, perm, req.uid(), req.gid());
    inode.rdev = rdev;
    let (ino, inode) = fs.make(parent, new_name(parent, name)?, inode)?;
    Ok(attr(ino, &inode))
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
                signing::commit(&self.policy, &mut fs, Signing::Later, Durability::Buffered)
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
        // One write lock for the file and its open: a `tar x` creates files by the thousand.
        let created = {
            let mut fs = self.fs_mut();
            made(&mut fs, req, parent, name, Kind::File, perm(mode, umask), 0).inspect(|a| fs.opened(a.ino.0))
        };
        match created {
            Ok(a) => reply.created(&self.ttl, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(to_errno(&e)),
        }
    }
}
