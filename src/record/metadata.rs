//! Capsule metadata: the DAG's root, naming the creator, writers, admins and parameters.
//!
//! `CapsuleId = blake3("capsulefs metadata v1\0" || canonical metadata)`, and the creator signs
//! the id. The id names the capsule everywhere, so it commits to everything in the metadata.

use borsh::{BorshDeserialize, BorshSerialize};

use super::codec::{self, Canonical, DecodeError, FORMAT_VERSION, strictly_ascending};
use super::ids::{CapsuleId, Signature, WriterId};

const ID_DOMAIN: &[u8] = b"capsulefs metadata v1\0";
const MAX_NAME: usize = 255;
const MAX_MEMBERS: usize = 4096;

/// Parameters fixed at creation that every writer and reader of the capsule agrees on.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Params {
    /// A writer signs at least every this many of its records (the K bound).
    pub sign_every_records: u32,
    /// ... and at least every this many seconds (the T bound).
    pub sign_every_secs: u32,
}

impl Default for Params {
    fn default() -> Self {
        Self { sign_every_records: 64, sign_every_secs: 30 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Metadata {
    pub version: u8,
    pub name: String,
    pub creator: WriterId,
    /// Writers besides the creator at creation; later changes go through the membership changelog.
    pub writers: Vec<WriterId>,
    pub admins: Vec<WriterId>,
    pub params: Params,
    pub created_ms: u64,
    /// Random, so two capsules with equal names, creators and times still differ.
    pub nonce: [u8; 16],
}

impl Canonical for Metadata {
    fn check(&self) -> Result<(), DecodeError> {
        if self.version != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion(self.version));
        }
        if self.name.is_empty() || self.name.len() > MAX_NAME {
            return Err(DecodeError::NonCanonical("capsule name must be 1..=255 bytes"));
        }
        for list in [&self.writers, &self.admins] {
            if list.len() > MAX_MEMBERS || !strictly_ascending(list) {
                return Err(DecodeError::NonCanonical("member lists must be sorted and unique"));
            }
            if list.contains(&self.creator) {
                return Err(DecodeError::NonCanonical("the creator is implicit in member lists"));
            }
        }
        Ok(())
    }
}

impl Metadata {
    pub fn id(&self) -> CapsuleId {
        let mut h = blake3::Hasher::new();
        h.update(ID_DOMAIN);
        h.update(&codec::encode(self));
        CapsuleId::from_bytes(*h.finalize().as_bytes())
    }

    /// Whether the metadata alone makes `w` an admin (the creator always is).
    pub fn is_admin(&self, w: &WriterId) -> bool {
        *w == self.creator || self.admins.binary_search(w).is_ok()
    }

    /// Whether the metadata alone lets `w` write (the creator always may).
    pub fn may_write(&self, w: &WriterId) -> bool {
        *w == self.creator || self.writers.binary_search(w).is_ok() || self.admins.binary_search(w).is_ok()
    }
}

/// Metadata plus the creator's signature over its id. Its encoding is what stores keep.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct SignedMetadata {
    pub metadata: Metadata,
    pub signature: Signature,
}

impl Canonical for SignedMetadata {
    fn check(&self) -> Result<(), DecodeError> {
        self.metadata.check()
    }
}

impl SignedMetadata {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        codec::decode(bytes)
    }
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }
}
