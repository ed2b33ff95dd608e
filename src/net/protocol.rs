//! The replica protocol's routes and request bodies, shared by the server (`net::server`) and
//! the client (`replica::remote`). Bodies are borsh; the table is in ARCHITECTURE.md.

use borsh::{BorshDeserialize, BorshSerialize};

use crate::record::{CapsuleId, RecordHash, SubIdx};

/// One request of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// GET: the signed metadata; POST: start holding the capsule from it.
    Metadata,
    /// GET: `Vec<RecordHash>`.
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
    /// GET: one sub-record with its Merkle path, as stored.
    SubRecord(RecordHash, SubIdx),
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
            Route::SubRecord(..) => "sub-record",
        }
    }
}

/// The path of `route` for `capsule`, under the protocol's version prefix.
pub fn path(capsule: &CapsuleId, route: Route) -> String {
    match route {
        Route::SubRecord(record, idx) => format!("/v1/capsules/{capsule}/records/{record}/{}", idx.0),
        other => format!("/v1/capsules/{capsule}/{}", other.name()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct WalkRequest {
    pub from: Vec<RecordHash>,
    pub budget: u32,
}
