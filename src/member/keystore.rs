//! The keystore: each generation of the content key, wrapped for every member who may read.
//!
//! A keystore is a signed membership record whose sub-records are `MembershipEntry::WrappedKey`
//! entries (see ARCHITECTURE.md, "Membership entries"). A reader finds the newest generation
//! wrapped for it in a record by an admin, reading every entry through the usual proofs.

use borsh::{BorshDeserialize, BorshSerialize};

use crate::capsule::{AppendOptions, Capsule};
use crate::crypto::aead::ContentKey;
use crate::crypto::keys::Identity;
use crate::crypto::wrap::{self, WRAPPED_LEN};
use crate::record::codec::{self, Canonical, DecodeError, FORMAT_VERSION};
use crate::record::{KeyGen, RecordHash, RecordKind, SubIdx, WriterId};
use crate::{Error, Result, VerifyError};

/// The first generation of a capsule's content key.
pub const FIRST_GENERATION: KeyGen = KeyGen(1);

#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub enum MembershipEntry {
    /// Generation `generation` of the content key, wrapped for `member` (crypto::wrap).
    WrappedKey { generation: KeyGen, member: WriterId, wrapped: [u8; WRAPPED_LEN] },
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
        match self.entry {
            MembershipEntry::WrappedKey { generation: KeyGen(0), .. } => {
                Err(DecodeError::NonCanonical("key generations start at 1"))
            }
            MembershipEntry::WrappedKey { .. } => Ok(()),
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

/// Makes generation 1 of the content key and stores it wrapped for `owner`, in a signed
/// membership record. Returns the key and the record.
pub fn create_keystore(capsule: &Capsule, owner: &Identity) -> Result<(ContentKey, RecordHash)> {
    let key = ContentKey::generate(FIRST_GENERATION);
    let wrapped = wrap::wrap(&key, &capsule.id(), &owner.writer()).map_err(|e| Error::Invalid(e.to_string()))?;
    let entry = MembershipEntry::WrappedKey { generation: key.generation(), member: owner.writer(), wrapped };
    let opts = AppendOptions { sign: true, kind: RecordKind::Membership, ..Default::default() };
    let record = capsule.append(owner, &[&entry.encode()], opts)?;
    Ok((key, record))
}

/// The newest content key generation wrapped for `me` by an admin, read through proofs.
pub fn content_key(capsule: &Capsule, me: &Identity) -> Result<ContentKey> {
    let mut best: Option<(KeyGen, [u8; WRAPPED_LEN])> = None;
    // A record that fails its own check cannot say what it holds: left out, not fatal, so
    // one damaged data record does not lock the owner out of the whole capsule.
    for entry in capsule.intact_log("keystore")? {
        let (h, record) = entry?;
        let header = &record.header;
        if header.kind != RecordKind::Membership || !capsule.metadata().is_admin(&header.writer) {
            continue;
        }
        for idx in 0..header.sub_count {
            let (bytes, _) = capsule.read_sub_record(h, SubIdx(idx))?;
            let entry = MembershipEntry::decode(bytes.get()).map_err(|source| VerifyError::MalformedSubRecord {
                record: h,
                idx: SubIdx(idx),
                source,
            })?;
            let MembershipEntry::WrappedKey { generation, member, wrapped } = entry;
            if member == me.writer() && best.is_none_or(|(g, _)| generation > g) {
                best = Some((generation, wrapped));
            }
        }
    }
    let (generation, wrapped) = best.ok_or_else(|| {
        Error::NotFound(format!(
            "a content key for {:?} in capsule {:?} (is this identity a member?)",
            me.writer(),
            capsule.id()
        ))
    })?;
    wrap::unwrap(&wrapped, &capsule.id(), generation, me).map_err(|e| Error::Invalid(e.to_string()))
}
