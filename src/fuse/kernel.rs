//! Between the filesystem's types and the kernel's: attributes, times and kinds, the live
//! inode behind a kernel inode number, a new name's checks, and replies from results.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileType, Generation, INodeNo, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyXattr, TimeOrNow,
};

use super::control::{CONTROL_NAME, Node};
use super::errno::to_errno;
use crate::fs::node::{Inode, Kind, ROOT_INO, Time};
use crate::{Error, Result};

fn system_time(t: Time) -> SystemTime {
    let d = Duration::new(t.secs.unsigned_abs(), t.nanos);
    if t.secs >= 0 { UNIX_EPOCH + d } else { UNIX_EPOCH - d }
}

pub(super) fn capsule_time(t: TimeOrNow) -> Time {
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

pub(super) fn file_type(kind: Kind) -> FileType {
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

pub(super) fn attr(ino: u64, i: &Inode) -> FileAttr {
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
pub(super) fn live(ino: INodeNo) -> Result<u64> {
    match Node::decode(ino.0) {
        Node::Live(i) => Ok(i),
        _ => Err(Error::ReadOnlyView),
    }
}

/// `name` as a new name in live directory `parent`: `.capsule` at the root is taken.
pub(super) fn new_name(parent: u64, name: &OsStr) -> Result<&[u8]> {
    if parent == ROOT_INO && name.as_bytes() == CONTROL_NAME {
        return Err(Error::Exists(".capsule (reserved by capsulefs for status and history)".into()));
    }
    Ok(name.as_bytes())
}

/// The permission bits a new node gets.
pub(super) fn perm(mode: u32, umask: u32) -> u16 {
    (mode & !umask & 0o7777) as u16
}

pub(super) fn reply_entry(ttl: Duration, r: Result<FileAttr>, reply: ReplyEntry) {
    match r {
        Ok(a) => reply.entry(&ttl, &a, Generation(0)),
        Err(e) => reply.error(to_errno(&e)),
    }
}

pub(super) fn reply_attr(ttl: Duration, r: Result<FileAttr>, reply: ReplyAttr) {
    match r {
        Ok(a) => reply.attr(&ttl, &a),
        Err(e) => reply.error(to_errno(&e)),
    }
}

pub(super) fn reply_data(r: Result<Vec<u8>>, reply: ReplyData) {
    match r {
        Ok(bytes) => reply.data(&bytes),
        Err(e) => reply.error(to_errno(&e)),
    }
}

/// Size probe (size 0), the value, or ERANGE when the caller's buffer is too small.
pub(super) fn reply_xattr(r: Result<Vec<u8>>, size: u32, reply: ReplyXattr) {
    match (r, size) {
        (Err(e), _) => reply.error(to_errno(&e)),
        (Ok(value), 0) => reply.size(value.len() as u32),
        (Ok(value), s) if (s as usize) < value.len() => reply.error(Errno::from_i32(libc::ERANGE)),
        (Ok(value), _) => reply.data(&value),
    }
}

pub(super) fn reply_empty(r: Result<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(to_errno(&e)),
    }
}
