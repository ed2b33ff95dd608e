//! Record headers: the DAG node a writer appends, naming parents and its sub-records' Merkle root.
//!
//! `RecordHash = blake3("capsulefs record v1\0" || canonical header)`. A signature, when present,
//! is over `"capsulefs record signature v1\0" || RecordHash` and lives outside the header, so a
//! record is the same DAG node whether or not it is signed.

use borsh::{BorshDeserialize, BorshSerialize};

use super::codec::{self, Canonical, DecodeError, FORMAT_VERSION, strictly_ascending};
use super::ids::{CapsuleId, DeviceId, KeyGen, NodeHash, RecordHash, Seq, Signature, WriterId};

const HASH_DOMAIN: &[u8] = b"capsulefs record v1\0";
pub const SIGNATURE_DOMAIN: &[u8] = b"capsulefs record signature v1\0";
pub const MAX_PARENTS: usize = 1024;
pub const MAX_SUB_RECORDS: u32 = 1 << 20;

/// What a record's sub-records mean to the layers above the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
#[borsh(use_discriminant = true)]
#[repr(u8)]
pub enum RecordKind {
    /// Payload bytes: whatever `append` was given.
    Data = 0,
    /// Entries of the signed membership changelog.
    Membership = 1,
    /// One filesystem commit (`fs::filesystem`): sealed chunks and tree nodes, superblock last.
    /// Its parents are exactly the records whose filesystem state it contains.
    FsCommit = 2,
}

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct RecordHeader {
    pub version: u8,
    /// Binds the record to one capsule, so it cannot be replayed into another.
    pub capsule: CapsuleId,
    /// Sorted, unique, at least one; a capsule's first records point at `RecordHash::genesis`.
    pub parents: Vec<RecordHash>,
    pub writer: WriterId,
    /// The writer's device that numbered this record: `seq` counts within it.
    pub device: DeviceId,
    pub seq: Seq,
    pub time_ms: u64,
    pub kind: RecordKind,
    pub key_gen: KeyGen,
    pub sub_count: u32,
    pub merkle_root: NodeHash,
}

impl Canonical for RecordHeader {
    fn check(&self) -> Result<(), DecodeError> {
        if self.version != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion(self.version));
        }
        if self.parents.is_empty() || self.parents.len() > MAX_PARENTS {
            return Err(DecodeError::NonCanonical("a record has 1..=1024 parents"));
        }
        if !strictly_ascending(&self.parents) {
            return Err(DecodeError::NonCanonical("parents must be sorted and unique"));
        }
        if self.seq.0 == 0 {
            return Err(DecodeError::NonCanonical("sequence numbers start at 1"));
        }
        if self.sub_count > MAX_SUB_RECORDS {
            return Err(DecodeError::NonCanonical("more than 2^20 sub-records"));
        }
        Ok(())
    }
}

impl RecordHeader {
    pub fn hash(&self) -> RecordHash {
        let mut h = blake3::Hasher::new();
        h.update(HASH_DOMAIN);
        h.update(&codec::encode(self));
        RecordHash::from_bytes(*h.finalize().as_bytes())
    }
}

/// A header with its optional signature: the unit stores keep and replicas exchange.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Record {
    pub header: RecordHeader,
    pub signature: Option<Signature>,
}

impl Canonical for Record {
    fn check(&self) -> Result<(), DecodeError> {
        self.header.check()
    }
}

impl Record {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        codec::decode(bytes)
    }
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }
    pub fn hash(&self) -> RecordHash {
        self.header.hash()
    }
}

/// The bytes a signature over `record` covers.
pub fn signing_message(record: &RecordHash) -> Vec<u8> {
    [SIGNATURE_DOMAIN, record.as_bytes()].concat()
}
