//! The rights in force at a point of a capsule's DAG: the members its metadata names, then the
//! entries of the membership records among that point's ancestors, applied in one
//! deterministic topological order (`history` finds the records and the order). Pure: the same
//! records give the same rights on every machine, whatever order they arrived in.

use std::collections::BTreeMap;

use super::entry::{Level, MembershipEntry};
use crate::crypto::wrap::WRAPPED_LEN;
use crate::record::{DeviceId, KeyGen, Metadata, RecordHash, Seq, WriterId};

/// One member and where their level comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub key: WriterId,
    pub level: Level,
    pub granted_by: WriterId,
    /// The membership record that granted it; None when the metadata did.
    pub record: Option<RecordHash>,
    /// Revocations of this member that this grant came after: records past their cut-offs
    /// are this grant's, not late records of the revoked member.
    pub after: Vec<RecordHash>,
}

/// A member's removal: their records numbered past `seen` (per device; a device not named
/// had none) are refused everywhere once the revocation is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub member: WriterId,
    pub seen: Vec<(DeviceId, Seq)>,
    pub by: WriterId,
    pub record: RecordHash,
}

impl Revocation {
    /// Whether record number `seq` of `device` comes after the cut-off.
    pub fn cuts_off(&self, device: &DeviceId, seq: Seq) -> bool {
        let last = self.seen.iter().find(|(d, _)| d == device).map_or(Seq(0), |(_, s)| *s);
        seq > last
    }
}

/// A membership record, or one of its entries, that was not applied, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotApplied {
    pub record: RecordHash,
    pub writer: WriterId,
    pub why: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rights {
    members: BTreeMap<WriterId, Member>,
    /// Revocations applied so far, in order.
    pub revocations: Vec<Revocation>,
    pub not_applied: Vec<NotApplied>,
    /// Applied `WrappedKey` entries: generation, member, wrapped key.
    wrapped: Vec<(KeyGen, WriterId, [u8; WRAPPED_LEN])>,
    /// Applied `PreviousKey` entries: generation, the one before sealed under it.
    previous: Vec<(KeyGen, Vec<u8>)>,
}

impl Rights {
    /// The rights the metadata gives: its creator is superadmin, its admins and writers hold
    /// those levels.
    pub fn of_metadata(metadata: &Metadata) -> Self {
        let creator = metadata.creator;
        let mut rights = Self::default();
        let mut set = |key: WriterId, level: Level| {
            rights.members.insert(key, Member { key, level, granted_by: creator, record: None, after: Vec::new() });
        };
        metadata.writers.iter().for_each(|w| set(*w, Level::Write));
        metadata.admins.iter().for_each(|w| set(*w, Level::Admin));
        set(creator, Level::Superadmin);
        rights
    }

    pub fn level(&self, key: &WriterId) -> Option<Level> {
        self.members.get(key).map(|m| m.level)
    }

    pub fn member(&self, key: &WriterId) -> Option<&Member> {
        self.members.get(key)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn may_write(&self, key: &WriterId) -> bool {
        self.level(key).is_some_and(|l| l >= Level::Write)
    }

    pub fn is_admin(&self, key: &WriterId) -> bool {
        self.level(key).is_some_and(|l| l >= Level::Admin)
    }

    /// The level `signer` needs to change `member` to `to` (None: remove): an admin changes
    /// readers and writers, a superadmin changes admins; nobody changes the creator, who is
    /// the only member at superadmin with no record behind it.
    pub(crate) fn needed_to_change(&self, member: &WriterId, to: Option<Level>) -> Option<Level> {
        let current = self.members.get(member);
        if current.is_some_and(|m| m.level == Level::Superadmin && m.record.is_none()) {
            return None;
        }
        let high = |l: Option<Level>| l.is_some_and(|l| l >= Level::Admin);
        Some(if high(to) || high(current.map(|m| m.level)) { Level::Superadmin } else { Level::Admin })
    }

    /// Applies the entries of membership record `record`, made by `writer`: each entry the
    /// writer had the level for, as of the entries before it; the others are noted.
    pub fn apply(&mut self, record: RecordHash, writer: WriterId, entries: &[MembershipEntry]) {
        for entry in entries {
            let signer = self.level(&writer);
            let (needed, what) = match entry {
                MembershipEntry::Grant { member, level } => (self.needed_to_change(member, Some(*level)), "grant"),
                MembershipEntry::Revoke { member, .. } => (self.needed_to_change(member, None), "revoke"),
                MembershipEntry::WrappedKey { .. } | MembershipEntry::PreviousKey { .. } => {
                    (Some(Level::Admin), "hand out keys")
                }
            };
            if needed.is_none_or(|needed| signer.is_none_or(|s| s < needed)) {
                let why = match needed {
                    None => format!("tries to {what} the capsule's creator"),
                    Some(needed) => format!(
                        "{writer} holds {} and needs {} to {what}",
                        signer.map_or("no level", Level::name),
                        needed.name()
                    ),
                };
                self.not_applied.push(NotApplied { record, writer, why });
                continue;
            }
            match entry {
                MembershipEntry::Grant { member, level } => {
                    let after = self.revocations.iter().filter(|r| r.member == *member).map(|r| r.record).collect();
                    let granted =
                        Member { key: *member, level: *level, granted_by: writer, record: Some(record), after };
                    self.members.insert(*member, granted);
                }
                MembershipEntry::Revoke { member, seen } => {
                    self.members.remove(member);
                    self.revocations.push(Revocation { member: *member, seen: seen.clone(), by: writer, record });
                }
                MembershipEntry::WrappedKey { generation, member, wrapped } => {
                    self.wrapped.push((*generation, *member, *wrapped));
                }
                MembershipEntry::PreviousKey { generation, sealed } => {
                    self.previous.push((*generation, sealed.clone()))
                }
            }
        }
    }

    /// The generations wrapped for `member`, in the order they were applied.
    pub fn wrapped_for<'a>(
        &'a self,
        member: &'a WriterId,
    ) -> impl Iterator<Item = (&'a KeyGen, &'a [u8; WRAPPED_LEN])> + 'a {
        self.wrapped.iter().filter(move |(_, m, _)| m == member).map(|(g, _, w)| (g, w))
    }

    /// The newest generation of the content key handed out to anyone.
    pub fn newest_generation(&self) -> Option<KeyGen> {
        self.wrapped.iter().map(|(g, _, _)| *g).max()
    }

    /// The sealed keys of generation `generation - 1` that generation `generation` opens.
    pub fn previous_of(&self, generation: KeyGen) -> impl Iterator<Item = &[u8]> {
        self.previous.iter().filter(move |(g, _)| *g == generation).map(|(_, s)| s.as_slice())
    }

    /// The revocation, among `known`, that refuses record `seq` of `device` by `writer` when
    /// these are the rights as of its parents: one past whose cut-off it is, unless the
    /// writer was granted again after it.
    pub fn refused_by<'a>(
        &self,
        known: &'a [Revocation],
        record: RecordHash,
        writer: &WriterId,
        device: &DeviceId,
        seq: Seq,
    ) -> Option<&'a Revocation> {
        let regranted_after = |r: &Revocation| self.members.get(writer).is_some_and(|m| m.after.contains(&r.record));
        // A revocation never cuts off its own record (a superadmin who steps down).
        known
            .iter()
            .find(|r| r.member == *writer && r.record != record && r.cuts_off(device, seq) && !regranted_after(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(n: u8) -> WriterId {
        WriterId::from_bytes([n; 32])
    }
    fn r(n: u8) -> RecordHash {
        RecordHash::from_bytes([n; 32])
    }
    fn metadata() -> Metadata {
        Metadata {
            version: crate::record::codec::FORMAT_VERSION,
            name: "t".into(),
            creator: w(1),
            writers: Vec::new(),
            admins: Vec::new(),
            params: Default::default(),
            created_ms: 0,
            nonce: [0; 16],
        }
    }
    fn grant(member: u8, level: Level) -> MembershipEntry {
        MembershipEntry::Grant { member: w(member), level }
    }

    #[test]
    fn levels_bound_who_may_change_whom() {
        let mut rights = Rights::of_metadata(&metadata());
        rights.apply(r(1), w(1), &[grant(2, Level::Admin), grant(3, Level::Write)]);
        assert_eq!(rights.level(&w(2)), Some(Level::Admin));
        // An admin adds readers, but not admins, and cannot touch the creator.
        rights.apply(r(2), w(2), &[grant(4, Level::Read), grant(5, Level::Admin), grant(1, Level::Read)]);
        assert_eq!(rights.level(&w(4)), Some(Level::Read));
        assert_eq!(rights.level(&w(5)), None);
        assert_eq!(rights.level(&w(1)), Some(Level::Superadmin));
        // A writer changes nothing.
        rights.apply(
            r(3),
            w(3),
            &[grant(3, Level::Superadmin), MembershipEntry::Revoke { member: w(4), seen: vec![] }],
        );
        assert_eq!((rights.level(&w(3)), rights.level(&w(4))), (Some(Level::Write), Some(Level::Read)));
        assert_eq!(rights.not_applied.len(), 4);
        // An admin cannot remove another admin; the creator can.
        rights.apply(r(4), w(2), &[MembershipEntry::Revoke { member: w(2), seen: vec![] }]);
        assert!(rights.is_admin(&w(2)));
        rights.apply(r(5), w(1), &[MembershipEntry::Revoke { member: w(2), seen: vec![] }]);
        assert_eq!(rights.level(&w(2)), None);
    }

    #[test]
    fn a_revocation_cuts_off_late_records_until_a_new_grant() {
        let device = DeviceId([7; 16]);
        let mut rights = Rights::of_metadata(&metadata());
        rights.apply(r(1), w(1), &[grant(3, Level::Write)]);
        rights.apply(r(2), w(1), &[MembershipEntry::Revoke { member: w(3), seen: vec![(device, Seq(5))] }]);
        let known = rights.revocations.clone();
        let before = Rights::of_metadata(&metadata());
        assert!(before.refused_by(&known, r(9), &w(3), &device, Seq(5)).is_none());
        assert!(before.refused_by(&known, r(9), &w(3), &device, Seq(6)).is_some());
        assert!(
            before.refused_by(&known, r(9), &w(3), &DeviceId([8; 16]), Seq(1)).is_some(),
            "a device the revoker never saw"
        );
        rights.apply(r(3), w(1), &[grant(3, Level::Write)]);
        assert!(
            rights.refused_by(&known, r(9), &w(3), &device, Seq(9)).is_none(),
            "granted again after the revocation"
        );
    }
}
