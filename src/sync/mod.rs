//! Keeping the local capsule and its replicas in step: push and pull (`transfer`), what a
//! replica holds as this capsule places it (`heads`), the slow walk and relay between two
//! replicas (`walk`), fork evidence passed on (`evidence`), reads and writes through a
//! Byzantine quorum of replicas (`quorum`), and the background threads of a mount: the
//! uploader and the follower, with the status they report (`status`).
//!
//! Nothing a replica answers is believed here either: every record goes through the
//! capsule's one gate (`Capsule::admit`) before it is stored.

pub mod evidence;
pub mod follower;
pub mod heads;
pub mod quorum;
pub mod status;
mod take;
pub mod transfer;
pub mod uploader;
pub mod walk;

use crate::Fork;
use crate::record::{DeviceId, RecordHash, Seq, WriterId};

/// What one push or pull moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub records: usize,
    /// Record bytes (encodings and payloads).
    pub bytes: u64,
    /// Bytes of the messages that found what to send (heads, walks, requests), each way.
    pub reconcile_sent: u64,
    pub reconcile_received: u64,
    pub round_trips: u32,
    /// Local unsigned records no signed record covers yet: a replica takes them only with a
    /// signed descendant, so they wait for the next signature (a mount signs within T seconds).
    pub waiting_for_signature: usize,
    /// Signed records this capsule holds that the replica did not (before a push, after a
    /// pull), by writer and device. The local capsule never moves back (it
    /// only ever adds records); a replica that offers less is behind, or was rolled back.
    pub replica_lacks: Vec<Lacking>,
    /// After a pull: the replica's heads as it last gave them (a follower waits for them
    /// to change).
    pub replica_heads: Vec<RecordHash>,
    /// Forks this capsule learned of from the replica's evidence.
    pub forks_learned: Vec<Fork>,
    /// Records the replica offered that a revocation held here cuts off: kept out, the rest
    /// taken.
    pub revoked: Vec<RecordHash>,
    /// Unsigned records the replica offered without a descendant their writer signed (and
    /// their descendants): kept out, as unverified (a replica that holds them honestly holds
    /// that descendant too).
    pub unanchored: Vec<RecordHash>,
}

/// Told as records move, for a progress bar; `&()` ignores it.
pub trait Progress {
    /// How many records are still to come, once a transfer knows (a pull through `since`
    /// does not).
    fn expect(&self, records: u64) {
        let _ = records;
    }
    /// Records and bytes moved so far.
    fn moved(&self, records: u64, bytes: u64);
}

impl Progress for () {
    fn moved(&self, _: u64, _: u64) {}
}

/// Bytes of a list of hashes on the wire (borsh: u32 length, then 32 bytes each).
fn hashes_len(n: usize) -> u64 {
    4 + 32 * n as u64
}

/// Signed records of one writer's device that a replica lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lacking {
    pub writer: WriterId,
    pub device: DeviceId,
    /// The highest sequence number among them, and the lowest.
    pub seq: Seq,
    pub lowest: Seq,
    pub count: usize,
}

/// What a pull takes of each record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Take {
    /// Header and sub-records.
    Whole,
    /// The header only: a sparse replica, which fetches sub-records when they are read.
    Headers,
}
