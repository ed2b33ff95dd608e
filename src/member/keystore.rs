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

/// Makes generation 1 of the content key and stores it wrapped for `owner`, in a signed
/// membership record. Returns the key and the record.
pub fn create_keystore(capsule: &Capsule, owner: &Identity) -> Result<(ContentKey, RecordHash)> {
    let key = ContentKey::generate(FIRST_GENERATION);
    let record = append_entries(capsule, owner, &[wrapped_for(capsule, &key, &owner.writer())?])?;
    Ok((key, record))
}

/// `key` wrapped for `member`, as an entry.
fn wrapped_for(capsule: &Capsule, key: &ContentKey, member: &WriterId) -> Result<MembershipEntry> {
    let wrapped = wrap::wrap(key, &capsule.id(), member).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(MembershipEntry::WrappedKey { generation: key.generation(), member: *member, wrapped })
}

/// One signed membership record by `signer` holding `entries`.
fn append_entries(capsule: &Capsule, signer: &Identity, entries: &[MembershipEntry]) -> Result<RecordHash> {
    let encoded: Vec<Vec<u8>> = entries.iter().map(MembershipEntry::encode).collect();
    let payloads: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    let opts = AppendOptions { sign: true, kind: RecordKind::Membership, ..Default::default() };
    capsule.append(signer, &payloads, opts)
}

/// One membership record made by an admin (as the metadata names them): its hash, its
/// writer, and its entries, read through proofs.
pub struct AdminRecord {
    pub record: RecordHash,
    pub writer: WriterId,
    pub entries: Vec<MembershipEntry>,
}

/// The membership records of a capsule: those by admins, which count, and those by anyone
/// else, which are kept (they are valid records) but never applied.
pub struct Changelog {
    pub by_admins: Vec<AdminRecord>,
    pub ignored: Vec<(RecordHash, WriterId)>,
}

/// Reads every membership record. A record that fails its own check cannot say what it
/// holds: it is left out (logged), not fatal, so one damaged data record does not lock the
/// owner out of the whole capsule.
pub fn changelog(capsule: &Capsule) -> Result<Changelog> {
    let mut log = Changelog { by_admins: Vec::new(), ignored: Vec::new() };
    for entry in capsule.intact_log("keystore")? {
        let (h, record) = entry?;
        let header = &record.header;
        if header.kind != RecordKind::Membership {
            continue;
        }
        if !capsule.metadata().is_admin(&header.writer) {
            log.ignored.push((h, header.writer));
            continue;
        }
        let mut entries = Vec::new();
        for idx in 0..header.sub_count {
            let (bytes, _) = capsule.read_sub_record(h, SubIdx(idx))?;
            entries.push(MembershipEntry::decode(bytes.get()).map_err(|source| VerifyError::MalformedSubRecord {
                record: h,
                idx: SubIdx(idx),
                source,
            })?);
        }
        log.by_admins.push(AdminRecord { record: h, writer: header.writer, entries });
    }
    Ok(log)
}

/// The newest content key generation wrapped for `me` by an admin, read through proofs.
pub fn content_key(capsule: &Capsule, me: &Identity) -> Result<ContentKey> {
    let mut best: Option<(KeyGen, [u8; WRAPPED_LEN])> = None;
    for entry in changelog(capsule)?.by_admins.into_iter().flat_map(|r| r.entries) {
        if let MembershipEntry::WrappedKey { generation, member, wrapped } = entry
            && member == me.writer()
            && best.is_none_or(|(g, _)| generation > g)
        {
            best = Some((generation, wrapped));
        }
    }
    let (generation, wrapped) = best.ok_or_else(|| {
        Error::NotFound(format!(
            "a content key for {:?} in capsule {:?} (is this identity a member? an admin gives \
             read access with `capsulefs grant NAME {} --level read`)",
            me.writer(),
            capsule.id(),
            me.writer()
        ))
    })?;
    wrap::unwrap(&wrapped, &capsule.id(), generation, me).map_err(|e| Error::Invalid(e.to_string()))
}

/// Grants `member` read access: a signed membership record by `admin` holding the grant and
/// the current content key wrapped for the member. Returns the record.
pub fn grant_read(capsule: &Capsule, admin: &Identity, member: &WriterId) -> Result<RecordHash> {
    if !capsule.metadata().is_admin(&admin.writer()) {
        return Err(Error::Invalid(format!(
            "granting access to capsule {:?}: {:?} is not one of its admins, and only an admin may grant \
             (sign with an admin's key: --key NAME)",
            capsule.id(),
            admin.writer()
        )));
    }
    let key = content_key(capsule, admin)?;
    let grant = MembershipEntry::Grant { member: *member, level: Level::Read };
    append_entries(capsule, admin, &[grant, wrapped_for(capsule, &key, member)?])
}
