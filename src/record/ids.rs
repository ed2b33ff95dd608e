//! Newtypes for every hash, key and index in the format, so one kind cannot pose as another.

use std::fmt;

use borsh::{BorshDeserialize, BorshSerialize};

use super::codec::DecodeError;

macro_rules! digest_newtype {
    ($(#[$doc:meta])* $name:ident, $tag:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, BorshSerialize, BorshDeserialize)]
        pub struct $name([u8; 32]);

        impl $name {
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// Parses the full 64-digit hex form.
            pub fn from_hex(s: &str) -> Result<Self, DecodeError> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| DecodeError::BadHex(s.to_owned()))?;
                Ok(Self(out))
            }
            /// The first 12 hex digits: enough to tell ids apart in listings and logs.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..6])
            }
            /// Reads 32 bytes from the front of a storage key.
            pub fn from_slice(b: &[u8]) -> Result<Self, DecodeError> {
                let arr: [u8; 32] = b.get(..32).and_then(|s| s.try_into().ok()).ok_or(DecodeError::Truncated)?;
                Ok(Self(arr))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($tag, ":{}"), self.short())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
    };
}

digest_newtype!(
    /// blake3 of a record header's canonical encoding (domain-separated).
    RecordHash,
    "rec"
);
digest_newtype!(
    /// blake3 of the capsule's canonical metadata encoding (domain-separated).
    CapsuleId,
    "cap"
);
digest_newtype!(
    /// A writer's ed25519 public key; writers are named by their key.
    WriterId,
    "w"
);
digest_newtype!(
    /// A node of a record's sub-record Merkle tree (leaf or inner).
    NodeHash,
    "node"
);

impl RecordHash {
    /// The pointer a capsule's first records use for their parent: the metadata is the DAG's root.
    pub fn genesis(capsule: CapsuleId) -> Self {
        Self(capsule.0)
    }
}

/// Position of a sub-record inside its record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, BorshSerialize, BorshDeserialize)]
pub struct SubIdx(pub u32);

/// One store's sequence space: a writer's records from one device (a store, chosen at random
/// the first time it appends) are numbered 1, 2, 3, ... apart from the writer's other devices,
/// so two honest devices of one key are two branches, and only a number reused on one device
/// is a fork.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, BorshSerialize, BorshDeserialize)]
pub struct DeviceId(pub [u8; 16]);

impl DeviceId {
    /// The first 8 hex digits, as listings and logs show a device.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev:{}", self.short())
    }
}

/// Per-device sequence number; the first record of a writer's device has `Seq(1)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, BorshSerialize, BorshDeserialize)]
pub struct Seq(pub u64);

/// Generation of the content key that sealed a record's payloads; 0 means not encrypted.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, BorshSerialize, BorshDeserialize)]
pub struct KeyGen(pub u32);

/// An ed25519 signature, kept as bytes so the format layer needs no crypto.
#[derive(Clone, Copy, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Signature(pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sig:{}", &hex::encode(self.0)[..12])
    }
}
