//! The replica protocol's routes and request bodies, shared by the server (`net::server`) and
//! the client (`replica::remote`). Bodies are borsh; the table is in ARCHITECTURE.md.

use borsh::{BorshDeserialize, BorshSerialize};

use crate::record::{CapsuleId, RecordHash, SubIdx};

/// One request of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// GET: the signed metadata; POST: start holding the capsule from it.
    Metadata,
    /// GET: `Vec<RecordHash>`. With `?known=DIGEST&wait=SECS` (see `heads_digest`), the
    /// answer waits up to SECS (at most `MAX_WAIT`) while the heads still have that digest:
    /// a long poll, so a follower hears of new records as they arrive. The answer's header
    /// `FORKS_HEADER` says how many forks the server keeps evidence of, so a reader asks for
    /// the evidence only when there is some.
    Heads,
    /// POST `Vec<RecordHash>` (at most `MAX_HASHES`): the ones not held.
    Missing,
    /// POST `WalkRequest`: `Vec<Node>`, breadth first from `from`.
    Walk,
    /// POST `Vec<RecordHash>`: `Vec<Bundle>` of those held, in order, size-capped.
    Fetch,
    /// POST `Vec<RecordHash>` (the asker's heads): `Since`, the records they lack.
    Since,
    /// POST `Vec<Bundle>`, parents first: stored after all are checked; answers `u64` new.
    Records,
    /// POST a stream of frames, each a `u32` (little-endian) length and a `Records` body of at
    /// most `MAX_FRAME` bytes, in one request (chunked): each frame is checked and stored as
    /// a `Records` request, while the next ones arrive; answers `u64` new once all are stored
    /// and synced. A push of many batches pays one round trip, not one each.
    RecordStream,
    /// GET: one sub-record with its Merkle path, as stored.
    SubRecord(RecordHash, SubIdx),
    /// GET `?count=N`: `Vec<Vec<u8>>`, sub-records from this one on, each as stored: as many
    /// in a row as the server holds, at most N (capped at `MAX_RUN`) and `MAX_RUN_BYTES` (at
    /// least one, if held). A sequential reader's run of chunks in one round trip.
    SubRecordRun(RecordHash, SubIdx),
    /// POST `sketch::Request` (a sketch of the asker's heads): `sketch::Answer`.
    HeadsSketch,
    /// GET: `Vec<ForkEvidence>` the server keeps; POST `Vec<ForkEvidence>`: each checked
    /// against the metadata, then kept and served (answers `()`).
    Evidence,
    /// GET `?salt=HEX&bits=N`: the poster's Bloom filter over every record held
    /// (`replica::bloom`), for the comparison in `make bench-sync`.
    Bloom,
}

impl Route {
    pub fn name(&self) -> &'static str {
        match self {
            Route::Metadata => "metadata",
            Route::Heads => "heads",
            Route::Missing => "missing",
            Route::Walk => "walk",
            Route::Fetch => "fetch",
            Route::Since => "since",
            Route::Records => "records",
            Route::RecordStream => "record-stream",
            Route::SubRecord(..) => "sub-record",
            Route::SubRecordRun(..) => "sub-record-run",
            Route::Bloom => "bloom",
            Route::Evidence => "evidence",
            Route::HeadsSketch => "heads-sketch",
        }
    }
}

/// GET: `Vec<CapsuleId>`, every capsule the server holds (for `capsulefs sync URL_A URL_B`).
pub const CAPSULES: &str = "/v1/capsules";

/// The path of `route` for `capsule`, under the protocol's version prefix.
pub fn path(capsule: &CapsuleId, route: Route) -> String {
    match route {
        Route::SubRecord(record, idx) => format!("/v1/capsules/{capsule}/records/{record}/{}", idx.0),
        Route::SubRecordRun(record, idx) => format!("/v1/capsules/{capsule}/records/{record}/{}/run", idx.0),
        other => format!("/v1/capsules/{capsule}/{}", other.name()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct WalkRequest {
    pub from: Vec<RecordHash>,
    pub budget: u32,
}

/// Most sub-records, and most bytes of them, in one `SubRecordRun` answer.
pub const MAX_RUN: u32 = 64;
pub const MAX_RUN_BYTES: usize = 8 << 20;

/// Largest frame of a `RecordStream`: a batch of `MAX_BATCH_BYTES`, one record past it and
/// room for the encoding.
pub const MAX_FRAME: usize = crate::wire::MAX_BATCH_BYTES * 2 + (1 << 20);

/// Longest a `heads` long poll waits, in seconds.
pub const MAX_WAIT: u64 = 60;
/// The heads answer's header: the number of forks the server keeps evidence of.
pub const FORKS_HEADER: &str = "x-capsulefs-forks";
/// On a 400 that refuses records as unverified: why, as one word of `/metrics`'s reasons
/// (`unauthorized_writer`, `unsigned_without_signed_descendant`, `unknown_parent`,
/// `revoked_writer`, `equivocation`, ...), so the client reports it as a verification failure.
pub const REFUSAL_HEADER: &str = "x-capsulefs-refusal";

/// A short name for a set of heads, for `heads?known=`: the first 16 bytes of a blake3 over
/// them, in hex.
pub fn heads_digest(heads: &[RecordHash]) -> String {
    let mut h = blake3::Hasher::new();
    heads.iter().for_each(|r| {
        h.update(r.as_bytes());
    });
    hex::encode(&h.finalize().as_bytes()[..16])
}

/// `body` as one frame of a `RecordStream`: its length, then itself.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("a frame is at most MAX_FRAME bytes");
    [&len.to_le_bytes()[..], body].concat()
}
