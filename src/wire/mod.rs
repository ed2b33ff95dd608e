//! What client and server exchange, and nothing else: the records' wire form (`Bundle`), the
//! DAG's nodes and `since` answers, the bounds every request and answer is held to (one
//! definition each, both ends hold them), the protocol's routes (`protocol`) and the
//! `RecordStream` frame codec (`frames`). Pure: no I/O, no tokio, no store.

pub mod frames;
pub mod protocol;

use borsh::{BorshDeserialize, BorshSerialize};

use crate::record::RecordHash;

/// One record as replicas exchange it: its encoding (header and signature) and its
/// sub-records' payloads, in order. The receiver recomputes the Merkle tree.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Bundle {
    pub record: Vec<u8>,
    pub payloads: Vec<Vec<u8>>,
}

impl Bundle {
    /// Bytes this bundle carries.
    pub fn size(&self) -> usize {
        self.record.len() + self.payloads.iter().map(Vec::len).sum::<usize>()
    }
}

/// A record's place in the DAG as a replica describes it: its hash and its parents.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Node {
    pub record: RecordHash,
    pub parents: Vec<RecordHash>,
}

/// What a replica answers to `since`: its heads, then the records a holder of the asker's
/// heads lacks, parents first, as many as fit in `MAX_BATCH_BYTES`; `more` when some did not.
#[derive(Clone, Debug, Default, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Since {
    pub heads: Vec<RecordHash>,
    pub bundles: Vec<Bundle>,
    pub more: bool,
}

/// What a replica says of itself in one answer (`Replica::announce`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announced {
    pub heads: Vec<RecordHash>,
    /// How many forks it keeps evidence of, if it says.
    pub forks: Option<usize>,
}

/// Most hashes one `missing` or `walk` call carries, and most bytes one `fetch` or `put`
/// carries: both ends hold them to it, so no request or answer grows without bound.
pub const MAX_HASHES: usize = 8192;
pub const MAX_BATCH_BYTES: usize = 32 << 20;
/// Most pieces of fork evidence one answer or request carries.
pub const MAX_EVIDENCE: usize = 1024;
/// Records one `since` answer may walk before it answers with the heads alone (the asker then
/// walks, a bounded request at a time), and records a capsule may hold for a Bloom filter
/// over all of them to be made: no one request makes a replica scan a whole large capsule.
pub const MAX_SINCE_RECORDS: usize = 1 << 16;
pub const MAX_BLOOM_RECORDS: usize = 1 << 20;
