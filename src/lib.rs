//! capsulefs: a secure filesystem for untrusted storage, built on DataCapsules.
//!
//! # Concepts
//! A *capsule* is a DAG of immutable *records* rooted in signed *metadata*; its id is the hash
//! of that metadata. Each record names its parents by hash, its writer and per-writer sequence
//! number, and the Merkle root of its *sub-records*; writers may sign records with ed25519.
//! A sub-record is provable alone: its Merkle path leads to its record, and a hash chain leads
//! from the record to a signed descendant (or to any record proven before).
//!
//! # The read path
//! `Capsule::read_sub_record` -> `proof::Prover::prove_record` (closest-signed-descendant links,
//! proof cache) -> `proof::verify::check_sub_record` (Merkle path) -> `Verified<Vec<u8>>`.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use capsulefs::capsule::{AppendOptions, Capsule, NewCapsule};
//! use capsulefs::crypto::keys::Identity;
//! use capsulefs::record::SubIdx;
//! use capsulefs::store::mem::MemKv;
//!
//! let me = Identity::generate("me").unwrap();
//! let cap = Capsule::create(Arc::new(MemKv::new()), NewCapsule::new("notes", &me), vec![me.clone()]).unwrap();
//! let rec = cap.append(&me, &[b"hello", b"world"], AppendOptions { sign: true, ..Default::default() }).unwrap();
//! let (bytes, proof) = cap.read_sub_record(rec, SubIdx(1)).unwrap();
//! assert_eq!(&bytes.get()[..], b"world");
//! assert_eq!(proof.record.anchor.record(), rec);
//! ```

#![deny(unsafe_code)]

pub mod capsule;
pub mod crypto;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod member;
pub mod net;
pub mod proof;
pub mod record;
pub mod replica;
pub mod rights;
pub mod store;
pub mod sync;
pub mod wire;

pub use error::{Error, Fork, Result, StoreError, VerifyError};
