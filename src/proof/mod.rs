//! Proofs: sub-record -> Merkle path -> record -> hash chain -> signed (or already proven) descendant.
//!
//! `witness` keeps every record's closest signed descendant, `cache` the records already proven,
//! and `verify` is the only place that checks a proof and the only maker of `Verified<T>`.

pub mod cache;
pub mod verify;
pub mod witness;

pub use cache::{CacheStats, ProofCache};
pub use verify::{Anchor, CacheUse, Prover, RecordProof, RecordSource, SubRecordProof, TrustState, Verified};
