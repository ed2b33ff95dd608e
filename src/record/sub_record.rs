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
        Self::encode_parts(&self.data, &self.path)
    }

    /// The encoding of `SubRecord { data, path }` without first copying `data` into one.
    pub fn encode_parts(data: &[u8], path: &MerklePath) -> Vec<u8> {
        codec::encode(&SubRecordRef { data, path })
    }
}

/// Borsh writes `&[u8]` exactly as `Vec<u8>`, so this encodes the same bytes as `SubRecord`.
#[derive(BorshSerialize)]
struct SubRecordRef<'a> {
    data: &'a [u8],
    path: &'a MerklePath,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::merkle;

    #[test]
    fn borrowed_encoding_matches_the_owned_one() {
        let leaves: Vec<_> = [&b"a"[..], b"bc", b"def"].iter().map(|p| merkle::leaf_hash(p)).collect();
        let (_, paths) = merkle::build(&leaves);
        let owned = SubRecord { data: b"bc".to_vec(), path: paths[1].clone() };
        let bytes = SubRecord::encode_parts(b"bc", &paths[1]);
        assert_eq!(bytes, codec::encode(&owned));
        assert_eq!(SubRecord::decode(&bytes).unwrap(), owned);
    }
}
