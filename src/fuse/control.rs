//! The `.capsule` folder at the root of a mount: `status` (live figures of this mount) and
//! `history/<record>/` (each past commit as a read-only tree, every read proven like any
//! other). It is left out of the root's listing, as ZFS hides `.zfs`, so `cp -a`, `find` and
//! `du` do not walk the whole history; it is reached by name.
//!
//! Kernel inode numbers carry the tree they belong to: the live filesystem's own numbers
//! (below `VIEW_BASE`), the three control nodes, and views, `VIEW_BASE | slot << 40 | ino`.

use std::collections::HashMap;

use crate::fs::Fs;
use crate::proof::CacheStats;
use crate::record::{DeviceId, RecordHash, Seq, WriterId};
use crate::replica::status::ReplicaStatus;
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
    /// Inode `ino` of the view in `slot`.
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
    format!("{position:06}-{}", &record.to_hex()[..12])
}

/// Views of past commits, one slot each, kept for the life of the mount so their inode
/// numbers stay stable. A slot is given out when a commit is listed or looked up; its view
/// is opened on first use, so listing thousands of commits opens none of them.
#[derive(Default)]
pub struct Views {
    slots: Vec<(RecordHash, Option<Fs>)>,
    by_record: HashMap<RecordHash, u32>,
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
        self.slots.push((record, None));
        let slot = (self.slots.len() - 1) as u32;
        self.by_record.insert(record, slot);
        Ok(slot)
    }

    /// The view in `slot`, opened from `live` if this is its first use.
    pub fn open(&mut self, live: &Fs, slot: u32) -> Result<&Fs> {
        let (record, view) =
            self.slots.get_mut(slot as usize).ok_or_else(|| Error::NotFound(format!("history view {slot}")))?;
        match view {
            Some(fs) => Ok(fs),
            None => Ok(view.insert(live.view_at(*record)?)),
        }
    }

    pub fn open_count(&self) -> usize {
        self.slots.iter().filter(|(_, v)| v.is_some()).count()
    }
}

/// What `.capsule/status` says, one `key: value` line each.
pub struct Status {
    pub capsule: String,
    pub head: Option<RecordHash>,
    pub read_only: bool,
    pub pending_bytes: usize,
    pub uncommitted: bool,
    pub commits: u64,
    pub signed_commits: u64,
    pub proof_cache: CacheStats,
    pub plain_cache: CacheStats,
    pub node_cache: CacheStats,
    pub history_views: usize,
    /// The replicas the mount pushes to in the background, one line each.
    pub replicas: Vec<ReplicaStatus>,
    /// Forks this capsule keeps evidence of: (writer, device, seq), each once.
    pub forks: Vec<(WriterId, DeviceId, Seq)>,
}

fn hit_rate(s: CacheStats) -> String {
    let lookups = s.hits + s.misses;
    let rate = if lookups == 0 { 0.0 } else { 100.0 * s.hits as f64 / lookups as f64 };
    format!("{} hits, {} misses, {rate:.1}% hit rate", s.hits, s.misses)
}

impl Status {
    pub fn render(&self) -> String {
        let head = self.head.map_or_else(|| "none".to_owned(), |h| h.to_hex());
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
        ) + &self.replicas.iter().map(|r| r.render() + "\n").collect::<String>()
            + &self
                .forks
                .iter()
                .map(|(w, d, seq)| {
                    format!(
                        "ALARM: writer {} (device {}) signed two records as seq {}: a fork; the second is kept \
                         aside as evidence (`capsulefs verify` lists both), not merged\n",
                        &w.to_hex()[..12],
                        &hex::encode(d.0)[..8],
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
