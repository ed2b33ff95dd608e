//! Local persistence: ciphertext-agnostic bytes and hashes, never keys or plaintext.
//!
//! `Kv` is the backend interface (`rocks::RocksKv` on disk, `mem::MemKv` in tests);
//! `CapsuleStore` gives the column families their typed keys and values.

mod applier;
pub mod capsule_store;
pub mod journal;
pub mod kv;
pub mod mem;
pub mod packs;
pub mod rocks;

pub use capsule_store::{CapsuleStore, Evidence, StoreBatch, SubValue, Witness};
pub use kv::{Batch, Cf, Durability, Kv, Staged};
