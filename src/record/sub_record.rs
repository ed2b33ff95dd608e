//! A sub-record as stored and served: its bytes with their Merkle path, provable on its own.

use std::ops::Deref;

use borsh::BorshSerialize;

use super::codec::{self, DecodeError};
use super::ids::NodeHash;
use super::merkle::{self, MerklePath};

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
        SubRecordBuf::copied(&self.data).finish(&self.path)
    }

    /// What goes before and after `payload` in its stored encoding (its length; its path):
    /// for a received payload written out in pieces rather than copied to be joined.
    pub fn around(payload: &[u8], path: &MerklePath) -> ([u8; LEN_PREFIX], Vec<u8>) {
        let len = u32::try_from(payload.len()).expect("payloads are far below 4 GiB");
        (len.to_le_bytes(), borsh::to_vec(path).expect("borsh writes to a Vec cannot fail"))
    }
}

/// A sub-record built in the buffer it will be stored from: length prefix, payload, then
/// (once the record's Merkle tree is known) the path. A payload written in place, as a commit
/// seals its chunks, is never copied to be encoded.
pub struct SubRecordBuf {
    bytes: Vec<u8>,
    /// The payload's Merkle leaf, hashed as it is made (possibly on another thread).
    leaf: NodeHash,
}

impl SubRecordBuf {
    /// Room kept after the payload for a path: its length and 32 bytes a level.
    const PATH_ROOM: usize = 4 + 32 * 32;

    /// A payload of `len` bytes, written by `fill`.
    pub fn filled(len: usize, fill: impl FnOnce(&mut [u8])) -> Self {
        let mut bytes = Vec::with_capacity(LEN_PREFIX + len + Self::PATH_ROOM);
        bytes.resize(LEN_PREFIX + len, 0);
        fill(&mut bytes[LEN_PREFIX..]);
        let leaf = merkle::leaf_hash(&bytes[LEN_PREFIX..]);
        Self { bytes, leaf }
    }

    pub fn copied(payload: &[u8]) -> Self {
        // Not `filled`: zero-filling 16 MiB only to overwrite it cost as much as the copy.
        let mut bytes = Vec::with_capacity(LEN_PREFIX + payload.len() + Self::PATH_ROOM);
        bytes.extend_from_slice(&[0; LEN_PREFIX]);
        bytes.extend_from_slice(payload);
        Self { bytes, leaf: merkle::leaf_hash(payload) }
    }

    pub fn leaf(&self) -> NodeHash {
        self.leaf
    }

    /// The stored encoding, equal to borsh's for `SubRecord { data: payload, path }`.
    pub fn finish(mut self, path: &MerklePath) -> Vec<u8> {
        let len = u32::try_from(self.bytes.len() - LEN_PREFIX).expect("payloads are far below 4 GiB");
        self.bytes[..LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
        path.serialize(&mut self.bytes).expect("borsh writes to a Vec cannot fail");
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::merkle;

    #[test]
    fn buffer_encoding_matches_borsh() {
        let leaves: Vec<_> = [&b"a"[..], b"bc", b"def"].iter().map(|p| merkle::leaf_hash(p)).collect();
        let (_, paths) = merkle::build(&leaves);
        let owned = SubRecord { data: b"bc".to_vec(), path: paths[1].clone() };
        let bytes = SubRecordBuf::copied(b"bc").finish(&paths[1]);
        assert_eq!(bytes, codec::encode(&owned));
        assert_eq!(SubRecord::decode(&bytes).unwrap(), owned);
        let (head, tail) = SubRecord::around(b"bc", &paths[1]);
        assert_eq!([&head[..], b"bc", &tail].concat(), bytes);
    }
}
