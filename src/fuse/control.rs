//! The `.capsule` folder at the root of a mount: `status` (live figures of this mount) and
//! `history/<record>/` (each past commit as a read-only tree, every read proven like any
//! other). It is left out of the root's listing, as ZFS hides `.zfs`, so `cp -a`, `find` and
//! `du` do not walk the whole history; it is reached by name.
//!
//! Kernel inode numbers carry the tree they belong to: the live filesystem's own numbers
//! (below `VIEW_BASE`), the three control nodes, and views, `VIEW_BASE | slot << 40 | n`,
//! where `n` is the inode number itself below 2^32 (the root) and otherwise a number the
//! view gives out as the kernel meets its inodes (`Numbering`), since per-device inode
//! numbers take more than 40 bits.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::fs::Fs;
use crate::proof::CacheStats;
use crate::record::{DeviceId, KeyGen, RecordHash, Seq, WriterId};
use crate::sync::status::ReplicaStatus;
use crate::{Error, Result};

pub const CONTROL_NAME: &[u8] = b".capsule";
const CONTROL_BASE: u64 = 1 << 63;
const VIEW_BASE: u64 = 1 << 62;
const SLOT_SHIFT: u32 = 40;
const INO_MASK: u64 = (1 << SLOT_SHIFT) - 1;
const MAX_SLOTS: usize = 1 << (62 - SLOT_SHIFT);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    Live(u64),
    ControlDir,
    Status,
    History,
    /// Node `ino` of the view in `slot`, in the view's numbering (see `Numbering`).
    View {
        slot: u32,
        ino: u64,
    },
}

impl Node {
    pub fn decode(ino: u64) -> Node {
        match ino {
            i if i == CONTROL_BASE | 1 => Node::ControlDir,
            i if i == CONTROL_BASE | 2 => Node::Status,
            i if i == CONTROL_BASE | 3 => Node::History,
            i if i & VIEW_BASE != 0 && i & CONTROL_BASE == 0 => {
                Node::View { slot: ((i & !VIEW_BASE) >> SLOT_SHIFT) as u32, ino: i & INO_MASK }
            }
            i => Node::Live(i),
        }
    }

    pub fn encode(self) -> u64 {
        match self {
            Node::Live(i) => i,
            Node::ControlDir => CONTROL_BASE | 1,
            Node::Status => CONTROL_BASE | 2,
            Node::History => CONTROL_BASE | 3,
            Node::View { slot, ino } => VIEW_BASE | u64::from(slot) << SLOT_SHIFT | ino,
        }
    }
}

/// A commit's folder name in `.capsule/history`: its place among the commits, oldest first,
/// then the first 12 hex digits of its hash (`000042-1a2b3c4d5e6f`).
pub fn history_name(position: usize, record: RecordHash) -> String {
    format!("{position:06}-{}", record.short())
}

/// Views of past commits, one slot each, kept for the life of the mount so their inode
/// numbers stay stable. A slot is given out when a commit is listed or looked up; its view
/// is opened on first use, so listing thousands of commits opens none of them.
#[derive(Default)]
pub struct Views {
    slots: Vec<ViewSlot>,
    by_record: HashMap<RecordHash, u32>,
}

struct ViewSlot {
    record: RecordHash,
    view: Option<Fs>,
    numbers: RefCell<Numbering>,
}

/// Where a view's inode numbers of 32 bits and more are given short numbers for the kernel:
/// 2^32 and up, in the order the kernel meets them, for the life of the mount.
#[derive(Default)]
pub struct Numbering {
    to_short: HashMap<u64, u64>,
    to_ino: Vec<u64>,
}

const SHORT_BASE: u64 = 1 << 32;

impl Numbering {
    /// The kernel's number (within the view) for inode `ino`.
    pub fn short(&mut self, ino: u64) -> u64 {
        if ino < SHORT_BASE {
            return ino;
        }
        let next = SHORT_BASE + self.to_ino.len() as u64;
        *self.to_short.entry(ino).or_insert_with(|| {
            self.to_ino.push(ino);
            next
        })
    }

    /// The inode a kernel number given out by `short` stands for.
    pub fn ino(&self, short: u64) -> Result<u64> {
        match short.checked_sub(SHORT_BASE) {
            None => Ok(short),
            Some(i) => {
                self.to_ino.get(i as usize).copied().ok_or_else(|| Error::NotFound(format!("history inode {short}")))
            }
        }
    }
}

impl Views {
    /// The slot of the view of `record`.
    pub fn slot_for(&mut self, record: RecordHash) -> Result<u32> {
        if let Some(slot) = self.by_record.get(&record) {
            return Ok(*slot);
        }
        if self.slots.len() >= MAX_SLOTS {
            return Err(Error::Invalid(format!("more than {MAX_SLOTS} past commits in use; remount")));
        }
        self.slots.push(ViewSlot { record, view: None, numbers: RefCell::default() });
        let slot = (self.slots.len() - 1) as u32;
        self.by_record.insert(record, slot);
        Ok(slot)
    }

    /// The view in `slot`, opened from `live` if this is its first use, with its numbering.
    pub fn open(&mut self, live: &Fs, slot: u32) -> Result<(&Fs, &RefCell<Numbering>)> {
        let ViewSlot { record, view, numbers } =
            self.slots.get_mut(slot as usize).ok_or_else(|| Error::NotFound(format!("history view {slot}")))?;
        let fs = match view {
            Some(fs) => fs,
            None => view.insert(live.view_at(*record)?),
        };
        Ok((fs, numbers))
    }

    pub fn open_count(&self) -> usize {
        self.slots.iter().filter(|s| s.view.is_some()).count()
    }
}

/// What `.capsule/status` says, one `key: value` line each.
pub struct Status {
    pub capsule: String,
    /// The filesystem heads the mount shows: one commit, or the branches it merged.
    pub heads: Vec<RecordHash>,
    pub read_only: bool,
    pub pending_bytes: usize,
    pub uncommitted: bool,
    pub commits: u64,
    pub signed_commits: u64,
    pub proof_cache: CacheStats,
    pub plain_cache: CacheStats,
    pub node_cache: CacheStats,
    pub history_views: usize,
    /// Files open for writing here that newer commits change, which wait for them to close.
    pub held_back_by: usize,
    /// The replicas the mount pushes to in the background, one line each.
    pub replicas: Vec<ReplicaStatus>,
    /// How many of them hold everything this mount stored, of how many (with replicas).
    pub replicated: Option<(usize, usize)>,
    /// Forks this capsule keeps evidence of: (writer, device, seq), each once.
    pub forks: Vec<(WriterId, DeviceId, Seq)>,
    /// With a replica policy: replicas answering the background pulls, of how many, and how
    /// many a read quorum needs.
    pub read_quorum: Option<(usize, usize, usize)>,
    /// The newest generation of the content key this mount holds, and the capsule's newest.
    pub key_generations: (KeyGen, Option<KeyGen>),
}

fn hit_rate(s: CacheStats) -> String {
    let lookups = s.hits + s.misses;
    let rate = if lookups == 0 { 0.0 } else { 100.0 * s.hits as f64 / lookups as f64 };
    format!("{} hits, {} misses, {rate:.1}% hit rate", s.hits, s.misses)
}

impl Status {
    fn render_read_quorum(&self) -> String {
        let Some((answering, of, needed)) = self.read_quorum else { return String::new() };
        let mut lines = format!("read_quorum: {answering} of {of} replicas answer, a read needs {needed}\n");
        if answering < needed {
            lines += &format!(
                "ALARM: only {answering} of {of} replicas answer, fewer than a read quorum ({needed}): a newer state \
                 the others hold may not be shown; bring them back, or lower `capsulefs replica policy --faulty`\n"
            );
        }
        lines
    }

    fn render_held_back(&self) -> String {
        match self.held_back_by {
            0 => String::new(),
            n => format!(
                "held_back_by: {n} file(s) open for writing here, which newer commits change: shown once closed\n"
            ),
        }
    }

    fn render_keys(&self) -> String {
        let (held, newest) = self.key_generations;
        let mut lines = format!("content_key: generation {} held, newest {}\n", held.0, newest.map_or(held.0, |g| g.0));
        if newest.is_some_and(|n| n > held) {
            lines += "ALARM: the capsule's newer records are sealed under a generation of the content key this identity \
                      was not given: it was removed from the capsule (`capsulefs members NAME`); they do not open here\n";
        }
        lines
    }

    pub fn render(&self) -> String {
        let head = match self.heads.as_slice() {
            [] => "none".to_owned(),
            heads => heads.iter().map(RecordHash::to_hex).collect::<Vec<_>>().join(" + "),
        };
        format!(
            "capsule: {}\nhead: {head}\nmode: {}\npending_bytes: {}\nuncommitted_changes: {}\n\
             commits_this_mount: {} ({} signed)\nproof_cache: {}\nverified_payload_cache: {}\n\
             decoded_node_cache: {}\nhistory_views_open: {}\n",
            self.capsule,
            if self.read_only { "read-only" } else { "read-write" },
            self.pending_bytes,
            if self.uncommitted { "yes" } else { "no" },
            self.commits,
            self.signed_commits,
            hit_rate(self.proof_cache),
            hit_rate(self.plain_cache),
            hit_rate(self.node_cache),
            self.history_views,
        ) + &self.render_held_back()
            + &self.replicas.iter().map(|r| r.render() + "\n").collect::<String>()
            + &self
                .replicated
                .map(|(held, of)| format!("replicated: {held} of {of} replicas hold every commit made here\n"))
                .unwrap_or_default()
            + &self.render_read_quorum()
            + &self.render_keys()
            + &self
                .forks
                .iter()
                .map(|(w, d, seq)| {
                    format!(
                        "ALARM: writer {} (device {}) signed two records as seq {}: a fork; the second is kept \
                         aside as evidence (`capsulefs verify` lists both), not merged\n",
                        w.short(),
                        d.short(),
                        seq.0
                    )
                })
                .collect::<String>()
    }
}

#[cfg(test)]
mod tests {
    use super::Node;

    #[test]
    fn a_views_long_inode_numbers_get_short_ones_that_map_back() {
        let mut n = super::Numbering::default();
        assert_eq!(n.short(1), 1, "the root keeps its number");
        let (a, b) = (3 << 32 | 7, (1 << 61) | 12345);
        let (sa, sb) = (n.short(a), n.short(b));
        assert!(sa < 1 << 40 && sb < 1 << 40 && sa != sb);
        assert_eq!(n.short(a), sa, "stable");
        assert_eq!((n.ino(sa).unwrap(), n.ino(sb).unwrap(), n.ino(1).unwrap()), (a, b, 1));
        assert!(n.ino(sb + 1).is_err(), "never given out");
    }

    #[test]
    fn inode_numbers_round_trip_and_never_collide() {
        let nodes = [
            Node::Live(1),
            Node::Live((1 << 62) - 1),
            Node::ControlDir,
            Node::Status,
            Node::History,
            Node::View { slot: 0, ino: 1 },
            Node::View { slot: (1 << 22) - 1, ino: (1 << 40) - 1 },
        ];
        let mut seen = std::collections::HashSet::new();
        for n in nodes {
            assert_eq!(Node::decode(n.encode()), n);
            assert!(seen.insert(n.encode()), "{n:?} collides");
        }
    }
}
