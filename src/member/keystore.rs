//! The keystore: each generation of the content key, wrapped for every member, in signed
//! membership records; and the changes of membership that admins sign (grant, revoke).
//!
//! Entries are `MembershipEntry` sub-records of `RecordKind::Membership` records (see
//! ARCHITECTURE.md, "Membership"). Which of them count is decided by `rights::Rights`, as of
//! the records' parents; a reader takes the generations wrapped for it in applied entries and
//! opens earlier ones through the `PreviousKey` chain.

use std::collections::BTreeMap;

use crate::capsule::membership::UNPROVEN;
use crate::capsule::{AppendOptions, Capsule};
use crate::crypto::aead::{self, ContentKey};
use crate::crypto::keys::Identity;
use crate::crypto::wrap;
use crate::record::{KeyGen, RecordHash, RecordKind, WriterId};
use crate::rights::{Level, MembershipEntry, Rights};
use crate::{Error, Result};

/// The first generation of a capsule's content key.
pub const FIRST_GENERATION: KeyGen = KeyGen(1);

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

/// The generations of the content key one identity can open.
#[derive(Clone, Default)]
pub struct ContentKeys {
    /// Per generation, every key found for it (two admins who rotate at once make two keys
    /// of one generation; a payload opens with the one its writer used).
    by_generation: BTreeMap<KeyGen, Vec<ContentKey>>,
}

impl ContentKeys {
    /// The key new records are sealed with: the newest generation (of two made at once, the
    /// one applied last).
    pub fn current(&self) -> Option<&ContentKey> {
        self.by_generation.values().next_back().and_then(|keys| keys.last())
    }

    /// The keys of `generation`.
    pub fn get(&self, generation: KeyGen) -> &[ContentKey] {
        self.by_generation.get(&generation).map_or(&[], Vec::as_slice)
    }

    pub fn newest(&self) -> Option<KeyGen> {
        self.by_generation.keys().next_back().copied()
    }

    fn add(&mut self, key: ContentKey) {
        let keys = self.by_generation.entry(key.generation()).or_default();
        if !keys.iter().any(|k| aead::same_key(k, &key)) {
            keys.push(key);
        }
    }
}

impl From<ContentKey> for ContentKeys {
    /// A ring of one key (a capsule made here, before any rotation).
    fn from(key: ContentKey) -> Self {
        let mut ring = ContentKeys::default();
        ring.add(key);
        ring
    }
}

/// Every generation `me` can open in `rights`: the ones wrapped for it by admins, and those
/// before each, through the `PreviousKey` chain.
pub fn keyring_in(capsule: &Capsule, rights: &Rights, me: &Identity) -> ContentKeys {
    let mut ring = ContentKeys::default();
    for (generation, wrapped) in rights.wrapped_for(&me.writer()) {
        match wrap::unwrap(wrapped, &capsule.id(), *generation, me) {
            Ok(key) => ring.add(key),
            Err(e) => tracing::warn!("a wrapped key of generation {} does not open: {e}", generation.0),
        }
    }
    let mut generation = ring.newest();
    while let Some(g) = generation.filter(|g| g.0 > 1) {
        let opened: Vec<ContentKey> = ring
            .get(g)
            .iter()
            .flat_map(|key| {
                rights.previous_of(g).filter_map(|sealed| aead::open_previous(key, capsule.id(), sealed).ok())
            })
            .collect();
        opened.into_iter().for_each(|k| ring.add(k));
        generation = Some(KeyGen(g.0 - 1));
    }
    ring
}

/// The generations of the content key `me` can open, as of every membership record held.
pub fn keyring(capsule: &Capsule, me: &Identity) -> Result<ContentKeys> {
    let rights = capsule.rights()?;
    let ring = keyring_in(capsule, &rights, me);
    if ring.current().is_none() {
        let unproven: Vec<String> = rights
            .not_applied
            .iter()
            .filter(|n| n.why.starts_with(UNPROVEN))
            .map(|n| format!("{:?} {}", n.record, n.why))
            .collect();
        let why = match unproven.as_slice() {
            [] => format!(
                "is this identity a member? an admin gives access with `capsulefs grant NAME {} --level read`",
                me.writer()
            ),
            some => format!(
                "membership records of this store were left out: {}; restore it from a replica",
                some.join("; ")
            ),
        };
        return Err(Error::NotFound(format!(
            "a content key for {:?} in capsule {:?} ({why})",
            me.writer(),
            capsule.id()
        )));
    }
    Ok(ring)
}

/// The newest generation of the content key `me` can open.
pub fn content_key(capsule: &Capsule, me: &Identity) -> Result<ContentKey> {
    Ok(keyring(capsule, me)?.current().expect("keyring has one").clone())
}

/// Refuses a change `admin` lacks the level for, saying which level it takes.
fn check_level(
    rights: &Rights,
    admin: &Identity,
    member: &WriterId,
    to: Option<Level>,
    capsule: &Capsule,
) -> Result<()> {
    match rights.needed_to_change(member, to) {
        None => Err(Error::Invalid("the capsule's creator stays its superadmin: nobody can change that".into())),
        Some(needed) if rights.level(&admin.writer()).is_none_or(|l| l < needed) => Err(Error::Invalid(format!(
            "changing {member} in capsule {:?} takes the {} level, and {:?} holds {} (sign with another \
             key: --key NAME)",
            capsule.id(),
            needed.name(),
            admin.writer(),
            rights.level(&admin.writer()).map_or("none", Level::name)
        ))),
        Some(_) => Ok(()),
    }
}

/// Grants `member` `level`: a signed membership record by `admin` with the grant and the
/// newest content key wrapped for the member (every level reads). A writer lowered to read
/// is revoked first, so that their records past what this machine holds are cut off.
pub fn grant(capsule: &Capsule, admin: &Identity, member: &WriterId, level: Level) -> Result<RecordHash> {
    let rights = capsule.rights()?;
    check_level(&rights, admin, member, Some(level), capsule)?;
    let key = keyring_in(capsule, &rights, admin)
        .current()
        .cloned()
        .ok_or_else(|| Error::NotFound(format!("a content key for {:?} to hand on", admin.writer())))?;
    let mut entries = Vec::new();
    if rights.may_write(member) && level < Level::Write {
        entries.push(MembershipEntry::Revoke { member: *member, seen: capsule.last_seqs_of(member)? });
    }
    entries.push(MembershipEntry::Grant { member: *member, level });
    entries.push(wrapped_for(capsule, &key, member)?);
    append_entries(capsule, admin, &entries)
}

/// Removes `member`: a signed membership record by `admin` with the revocation (cut off at
/// the member's records this machine holds) and a new generation of the content key, wrapped
/// for every remaining member, with the previous generation sealed under it.
pub fn revoke(capsule: &Capsule, admin: &Identity, member: &WriterId) -> Result<RecordHash> {
    let rights = capsule.rights()?;
    if rights.level(member).is_none() {
        return Err(Error::NotFound(format!("{member} among the members of capsule {:?}", capsule.id())));
    }
    check_level(&rights, admin, member, None, capsule)?;
    let ring = keyring_in(capsule, &rights, admin);
    let previous =
        ring.current().ok_or_else(|| Error::NotFound(format!("a content key for {:?} to rotate", admin.writer())))?;
    let next = ContentKey::generate(KeyGen(previous.generation().0 + 1));
    let mut entries = vec![
        MembershipEntry::Revoke { member: *member, seen: capsule.last_seqs_of(member)? },
        MembershipEntry::PreviousKey {
            generation: next.generation(),
            sealed: aead::seal_previous(&next, previous, capsule.id()),
        },
    ];
    for remaining in rights.members().filter(|m| m.key != *member) {
        entries.push(wrapped_for(capsule, &next, &remaining.key)?);
    }
    append_entries(capsule, admin, &entries)
}
