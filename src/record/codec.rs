//! Canonical encoding: borsh bytes, plus the checks that make each value have exactly one encoding.
//!
//! borsh already rejects bad tags, non-UTF-8 strings and short input; here we add trailing-byte
//! and version checks, each type's own invariants (`Canonical`), and a final re-encode compare.

use borsh::{BorshDeserialize, BorshSerialize};

/// The only format version this build reads and writes. 2: record headers name the device
/// whose sequence space numbers them. 3: filesystem inode numbers are handed out per device
/// (superblocks keep a counter per range) and inodes may name where their chunks were sealed.
/// 4: tree nodes index 4 key bits a level (16 children, not 64) and inode-table leaves hold 16
/// inodes, so a commit's path through a big inode table is about a third of the bytes.
pub const FORMAT_VERSION: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("input ends before the value does")]
    Truncated,
    #[error("{extra} trailing bytes after the value")]
    TrailingBytes { extra: usize },
    #[error("format version {0} is not supported (this build reads version {FORMAT_VERSION})")]
    UnknownVersion(u8),
    #[error("not canonical: {0}")]
    NonCanonical(&'static str),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("'{0}' is not a 64-digit hex hash")]
    BadHex(String),
}

const BORSH_SHORT_INPUT: &str = "Unexpected length of input";

/// Invariants a decoded value must hold beyond what its borsh layout enforces.
pub trait Canonical {
    fn check(&self) -> Result<(), DecodeError>;
}

pub fn encode<T: BorshSerialize>(value: &T) -> Vec<u8> {
    borsh::to_vec(value).expect("borsh writes to a Vec cannot fail")
}

/// Decodes a value whose encoding starts with a format-version byte.
pub fn decode<T: BorshDeserialize + BorshSerialize + Canonical>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.first() {
        None => return Err(DecodeError::Truncated),
        Some(&v) if v != FORMAT_VERSION => return Err(DecodeError::UnknownVersion(v)),
        Some(_) => {}
    }
    decode_unversioned(bytes)
}

/// Decodes a value that carries no version byte of its own (it lives inside a versioned one).
pub fn decode_unversioned<T: BorshDeserialize + BorshSerialize + Canonical>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut rest = bytes;
    let value = T::deserialize(&mut rest).map_err(|e| {
        // borsh reports short input either as UnexpectedEof or as InvalidData with this text.
        if e.kind() == std::io::ErrorKind::UnexpectedEof || e.to_string() == BORSH_SHORT_INPUT {
            DecodeError::Truncated
        } else {
            DecodeError::Malformed(e.to_string())
        }
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { extra: rest.len() });
    }
    value.check()?;
    // Independent of the layout rules above: one value, one byte string.
    if encode(&value) != bytes {
        return Err(DecodeError::NonCanonical("re-encoding differs"));
    }
    Ok(value)
}

/// True when `items` is strictly ascending (sorted, no duplicates).
pub fn strictly_ascending<T: Ord>(items: &[T]) -> bool {
    items.windows(2).all(|w| w[0] < w[1])
}
