//! A sub-record as stored and served: its bytes with their Merkle path, provable on its own.

use std::ops::Deref;

use borsh::BorshSerialize;

use super::codec::{self, DecodeError};
use super::merkle::MerklePath;

/// Largest payload one sub-record may carry.
pub const MAX_SUB_RECORD_LEN: usize = 16 << 20;
/// Borsh's u32 (little-endian) length before the payload.
const LEN_PREFIX: usize = 4;

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize)]
pub struct SubRecord {
    pub data: Vec<u8>,
    pub path: MerklePath,
}

/// A sub-record's payload, left in the buffer it was stored in (after its length prefix):
/// a 64 KiB chunk read is not copied once more just to drop four bytes and the path.
#[derive(Debug, PartialEq, Eq)]
pub struct Payload {
    bytes: Vec<u8>,
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[LEN_PREFIX..]
    }
}

impl Payload {
    pub fn into_vec(mut self) -> Vec<u8> {
        self.bytes.drain(..LEN_PREFIX);
        self.bytes
    }
}

impl SubRecord {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (payload, path) = Self::decode_in_place(bytes.to_vec())?;
        Ok(Self { data: payload.into_vec(), path })
    }

    /// Decodes stored bytes, canonical only (as `codec` does), without copying the payload.
    pub fn decode_in_place(mut bytes: Vec<u8>) -> Result<(Payload, MerklePath), DecodeError> {
        let prefix: [u8; LEN_PREFIX] =
            bytes.get(..LEN_PREFIX).ok_or(DecodeError::Truncated)?.try_into().expect("LEN_PREFIX bytes");
        let len = u32::from_le_bytes(prefix) as usize;
        if len > MAX_SUB_RECORD_LEN {
            return Err(DecodeError::NonCanonical("sub-record larger than 16 MiB"));
        }
        let end = LEN_PREFIX + len;
        let path: MerklePath = codec::decode_unversioned(bytes.get(end..).ok_or(DecodeError::Truncated)?)?;
        bytes.truncate(end);
        Ok((Payload { bytes }, path))
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
