//! Who holds which level of a capsule: the members its metadata names, then the grants in
//! membership records by admins. Today a grant only adds or raises a level (read access is
//! what can be granted), so the result does not depend on the order records arrived in;
//! revocations will need the DAG's order (issue 13).

use std::collections::BTreeMap;

use super::keystore::{Level, MembershipEntry, changelog};
use crate::Result;
use crate::capsule::Capsule;
use crate::record::{RecordHash, WriterId};

/// One member and where their level comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub key: WriterId,
    pub level: Level,
    pub granted_by: WriterId,
    /// The membership record that granted it; None when the metadata did.
    pub record: Option<RecordHash>,
}

/// The members of a capsule, and what was left out.
pub struct Roster {
    /// Every member at their highest level, by key.
    pub members: Vec<Member>,
    /// Membership records not applied, with their writers: by someone who is not an admin,
    /// or granting more than read.
    pub not_applied: Vec<(RecordHash, WriterId)>,
}

pub fn members(capsule: &Capsule) -> Result<Roster> {
    let metadata = capsule.metadata();
    let creator = metadata.creator;
    let mut roster: BTreeMap<WriterId, Member> = BTreeMap::new();
    let mut raise = |key: WriterId, level: Level, granted_by: WriterId, record: Option<RecordHash>| {
        let member = roster.entry(key).or_insert(Member { key, level, granted_by, record });
        if level > member.level {
            *member = Member { key, level, granted_by, record };
        }
    };
    raise(creator, Level::Superadmin, creator, None);
    metadata.admins.iter().for_each(|w| raise(*w, Level::Admin, creator, None));
    metadata.writers.iter().for_each(|w| raise(*w, Level::Write, creator, None));
    let mut log = changelog(capsule)?;
    for admin in &log.by_admins {
        for entry in &admin.entries {
            match entry {
                MembershipEntry::Grant { member, level: Level::Read } => {
                    raise(*member, Level::Read, admin.writer, Some(admin.record));
                }
                // Writing rights still come from the metadata alone: every acceptance check
                // reads them there, so a grant of more than read is not applied (yet).
                MembershipEntry::Grant { .. } => log.ignored.push((admin.record, admin.writer)),
                MembershipEntry::WrappedKey { .. } => {}
            }
        }
    }
    Ok(Roster { members: roster.into_values().collect(), not_applied: log.ignored })
}
