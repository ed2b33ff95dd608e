//! Which tree a kernel inode is in (the live one, or a view of the past in
//! `.capsule/history`), and the attributes of the `.capsule` folder's own nodes.

use std::ffi::OsStr;

use fuser::FileAttr;

use super::CapsuleFs;
use super::control::{Node, Status};
use super::kernel::attr;
use crate::fs::Fs;
use crate::fs::node::{Inode, Kind, ROOT_INO};
use crate::sync::status::SyncStatus;
use crate::{Error, Result};

/// Maps an inode number of the tree being read to the kernel's number for it.
type Encode<'a> = &'a dyn Fn(u64) -> u64;

impl CapsuleFs {
    /// Runs a read-only operation on the tree that holds kernel inode `ino`, the live one or
    /// a view of the past, with `ino` in that tree's numbering and a way back.
    pub(super) fn on_tree<T>(&self, ino: u64, op: impl FnOnce(&Fs, u64, Encode<'_>) -> Result<T>) -> Result<T> {
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

    pub(super) fn status(&self) -> Status {
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
    pub(super) fn control_attr(&self, node: Node) -> Result<FileAttr> {
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
    pub(super) fn history_entry(&self, name: &OsStr) -> Result<FileAttr> {
        let name = name.to_string_lossy();
        let hash = name.split_once('-').map_or(&*name, |(_, hash)| hash);
        let record = self.fs().capsule().resolve(hash)?;
        let slot = self.views().slot_for(record)?;
        self.tree_attr(Node::View { slot, ino: ROOT_INO }.encode())
    }

    /// Attributes of any kernel inode: a control node or a node of a tree.
    pub(super) fn any_attr(&self, ino: u64) -> Result<FileAttr> {
        match Node::decode(ino) {
            node @ (Node::ControlDir | Node::Status | Node::History) => self.control_attr(node),
            _ => self.tree_attr(ino),
        }
    }
}
