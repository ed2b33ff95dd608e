//! Membership entries as stored: Massolit's levels and the changes of membership (wrapped
//! content keys, grants, revocations, previous keys), each a canonical, versioned sub-record
//! of a `RecordKind::Membership` record.

use borsh::{BorshDeserialize, BorshSerialize};

use crate::crypto::aead;
use crate::crypto::wrap::WRAPPED_LEN;
use crate::record::codec::{self, Canonical, DecodeError, FORMAT_VERSION};
use crate::record::{DeviceId, KeyGen, Seq, WriterId};

/// Most devices a revocation names.
const MAX_DEVICES: usize = 4096;

/// Massolit's levels: each includes the rights of those below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, BorshSerialize, BorshDeserialize)]
#[borsh(use_discriminant = true)]
#[repr(u8)]
pub enum Level {
    Read = 1,
    Write = 2,
    Admin = 16,
    Superadmin = 32,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
            Level::Superadmin => "superadmin",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum MembershipEntry {
    /// Generation `generation` of the content key, wrapped for `member` (crypto::wrap).
    WrappedKey { generation: KeyGen, member: WriterId, wrapped: [u8; WRAPPED_LEN] },
    /// `member` holds `level` from this record on.
    Grant { member: WriterId, level: Level },
    /// `member` holds no level from this record on. `seen` is, per device, the highest
    /// sequence number of theirs the revoker held: their records past it are refused
    /// everywhere once this entry is known (the cut-off; a device not named had none).
    Revoke { member: WriterId, seen: Vec<(DeviceId, Seq)> },
    /// Generation `generation - 1` of the content key sealed under generation `generation`
    /// (`aead::seal_previous`): who holds a generation opens the ones before it.
    PreviousKey { generation: KeyGen, sealed: Vec<u8> },
}

/// One entry as stored: a version byte, then the entry.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
struct StoredEntry {
    version: u8,
    entry: MembershipEntry,
}

impl Canonical for StoredEntry {
    fn check(&self) -> Result<(), DecodeError> {
        if self.version != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion(self.version));
        }
        match &self.entry {
            MembershipEntry::WrappedKey { generation: KeyGen(0), .. } => {
                Err(DecodeError::NonCanonical("key generations start at 1"))
            }
            MembershipEntry::PreviousKey { generation, sealed } => {
                if generation.0 < 2 || sealed.len() != 32 + aead::SEAL_OVERHEAD {
                    return Err(DecodeError::NonCanonical(
                        "a previous key is one sealed 32-byte key, from generation 2",
                    ));
                }
                Ok(())
            }
            MembershipEntry::Revoke { seen, .. } => {
                if seen.len() > MAX_DEVICES || !seen.windows(2).all(|w| w[0].0 < w[1].0) {
                    return Err(DecodeError::NonCanonical("a revocation names each device once, in order"));
                }
                Ok(())
            }
            MembershipEntry::WrappedKey { .. } | MembershipEntry::Grant { .. } => Ok(()),
        }
    }
}

impl MembershipEntry {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(&StoredEntry { version: FORMAT_VERSION, entry: self.clone() })
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(codec::decode::<StoredEntry>(bytes)?.entry)
    }
}
