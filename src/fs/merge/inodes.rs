//! One inode both sides changed: its attributes merged field by field, and its contents
//! kept from one side, the other's made a conflict copy when both changed them.

use super::{Merge, Side};
use crate::Result;
use crate::fs::node::{Inode, Kind, Time};
use crate::fs::trie::Ref;

impl Merge<'_> {
    pub(super) fn merge_inode(&mut self, ino: u64) -> Result<()> {
        let [in_loser, in_winner] = [0, 1].map(|s| self.changed[s].contains(&ino));
        let loser = self.side(Side::Loser).inode(self.sealed, ino)?;
        if !in_winner {
            return self.take(ino, Side::Loser, loser);
        }
        if !in_loser {
            return Ok(()); // the winner's, already in place
        }
        let winner = self.side(Side::Winner).inode(self.sealed, ino)?;
        match (loser, winner) {
            // A delete against a change keeps the change.
            (Some(l), None) => self.take(ino, Side::Loser, Some(l)),
            (Some(l), Some(w)) if l != w => {
                let base = self.base.inode(self.sealed, ino)?;
                let (merged, conflict) = merge_attributes(base.as_ref(), &l, &w);
                if conflict {
                    self.copies.push((ino, l));
                }
                self.put(ino, merged)
            }
            _ => Ok(()),
        }
    }
}

/// A field merged three ways: the loser's when only it changed, else the winner's.
fn pick<T: PartialEq + Clone>(base: Option<&T>, loser: &T, winner: &T) -> T {
    if base == Some(winner) && base != Some(loser) { loser.clone() } else { winner.clone() }
}

/// A time merged three ways: the later when both changed.
fn pick_time(base: Option<&Time>, loser: &Time, winner: &Time) -> Time {
    if base != Some(loser) && base != Some(winner) {
        let key = |t: &Time| (t.secs, t.nanos);
        return if key(loser) > key(winner) { *loser } else { *winner };
    }
    pick(base, loser, winner)
}

/// Whether a file's inode changed in more than its names (link count, ctime, provenance).
pub(super) fn edited(now: &Inode, base: &Inode) -> bool {
    contents(now) != contents(base)
        || (now.perm, now.uid, now.gid, now.mtime) != (base.perm, base.uid, base.gid, base.mtime)
        || now.xattrs != base.xattrs
}

/// What a non-directory holds: its bytes (and where they are sealed), target or device.
fn contents(i: &Inode) -> (Option<Ref>, u64, &[u8], u32, Option<u64>) {
    (i.content, i.size, &i.target, i.rdev, i.sealed_as)
}

/// The inode both sides changed, field by field; and whether the contents of a
/// non-directory conflict (both changed them differently), when the winner's stay.
fn merge_attributes(base: Option<&Inode>, l: &Inode, w: &Inode) -> (Inode, bool) {
    let mut m = w.clone();
    m.perm = pick(base.map(|b| &b.perm), &l.perm, &w.perm);
    (m.uid, m.gid) = pick(base.map(|b| (b.uid, b.gid)).as_ref(), &(l.uid, l.gid), &(w.uid, w.gid));
    m.xattrs = pick(base.map(|b| &b.xattrs), &l.xattrs, &w.xattrs);
    m.atime = pick_time(base.map(|b| &b.atime), &l.atime, &w.atime);
    m.mtime = pick_time(base.map(|b| &b.mtime), &l.mtime, &w.mtime);
    m.ctime = pick_time(base.map(|b| &b.ctime), &l.ctime, &w.ctime);
    if w.kind == Kind::Dir {
        return (m, false); // its names merge one by one
    }
    let (cb, cl, cw) = (base.map(contents), contents(l), contents(w));
    if cl == cw || cb.as_ref() == Some(&cl) {
        return (m, false);
    }
    if cb.as_ref() == Some(&cw) {
        (m.content, m.size, m.target, m.rdev, m.sealed_as) = (l.content, l.size, l.target.clone(), l.rdev, l.sealed_as);
        return (m, false);
    }
    (m, true)
}
