//! A sub-record as stored and served: its bytes with their Merkle path, provable on its own.

use borsh::{BorshDeserialize, BorshSerialize};

use super::codec::{self, Canonical, DecodeError};
use super::merkle::MerklePath;

/// Largest payload one sub-record may carry.
pub const MAX_SUB_RECORD_LEN: usize = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct SubRecord {
    pub data: Vec<u8>,
    pub path: MerklePath,
}

impl Canonical for SubRecord {
    fn check(&self) -> Result<(), DecodeError> {
        if self.data.len() > MAX_SUB_RECORD_LEN {
            return Err(DecodeError::NonCanonical("sub-record larger than 16 MiB"));
        }
        self.path.check()
    }
}

impl SubRecord {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        codec::decode_unversioned(bytes)
    }
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }
}
