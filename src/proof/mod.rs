//! Proofs: sub-record -> Merkle path -> record -> hash chain -> signed (or already proven) descendant.
//!
//! `witness` keeps every record's closest signed descendant, `cache` the records already proven,
//! `verify` is the only place that checks a proof and the only maker of `Verified<T>`, and
//! `fork` is evidence of equivocation that anyone can check with the metadata alone.

pub mod cache;
pub mod fork;
pub mod verify;
pub mod witness;

pub use cache::{CacheStats, ProofCache};
pub use verify::{Anchor, CacheUse, Prover, RecordProof, RecordSource, SubRecordProof, TrustState, Verified};
