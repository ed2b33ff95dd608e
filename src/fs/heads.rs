//! Where a filesystem's state is: the filesystem commits the capsule's heads descend from.
//!
//! Records of other kinds (raw appends, membership changes) may sit on top of a commit; they
//! carry no filesystem state, so a walk from the heads passes through them to the nearest
//! filesystem commits. The walks read only each record's shape (parents, kind), checked
//! against its hash; the commit finally opened is proven like every other read.

use std::collections::{BTreeSet, HashSet, VecDeque};

use crate::capsule::Capsule;
use crate::record::{KeyGen, RecordHash, RecordKind};
use crate::{Error, Result};

/// The nearest filesystem commits reached from `starts` through records of other kinds
/// (a start that is a commit is its own nearest).
pub fn nearest_commits(capsule: &Capsule, starts: &[RecordHash]) -> Result<BTreeSet<RecordHash>> {
    let genesis = RecordHash::genesis(capsule.id());
    let mut found = BTreeSet::new();
    let mut seen: HashSet<RecordHash> = HashSet::new();
    let mut queue: VecDeque<RecordHash> = starts.iter().copied().collect();
    while let Some(h) = queue.pop_front() {
        if h == genesis || !seen.insert(h) {
            continue;
        }
        let header = capsule.record(h)?.header;
        match header.kind {
            RecordKind::FsCommit => {
                found.insert(h);
            }
            RecordKind::Data if header.key_gen != KeyGen(0) => return Err(older_format(h)),
            RecordKind::Data | RecordKind::Membership => queue.extend(header.parents),
        }
    }
    Ok(found)
}

/// Sealed data records were the filesystem commits of builds before `RecordKind::FsCommit`.
fn older_format(h: RecordHash) -> Error {
    Error::Invalid(format!(
        "{h:?} is a filesystem commit written by an older capsulefs, whose format this build does not read; \
         mount the capsule with the build that made it and copy the files into a new capsule"
    ))
}

/// Whether `ancestor` is reachable from `descendant` through parent links.
fn descends_from(capsule: &Capsule, descendant: RecordHash, ancestor: RecordHash) -> Result<bool> {
    let genesis = RecordHash::genesis(capsule.id());
    let mut seen: HashSet<RecordHash> = HashSet::new();
    let mut queue: VecDeque<RecordHash> = capsule.record(descendant)?.header.parents.into();
    while let Some(h) = queue.pop_front() {
        if h == ancestor {
            return Ok(true);
        }
        if h != genesis && seen.insert(h) {
            queue.extend(capsule.record(h)?.header.parents);
        }
    }
    Ok(false)
}

/// The filesystem heads: the commits nearest to the capsule's heads that no other of them
/// descends from. One in the normal case; two or more when writers or devices branched.
pub fn filesystem_heads(capsule: &Capsule) -> Result<Vec<RecordHash>> {
    let candidates: Vec<RecordHash> = nearest_commits(capsule, &capsule.heads()?)?.into_iter().collect();
    if candidates.len() < 2 {
        return Ok(candidates);
    }
    let mut heads = Vec::new();
    for &c in &candidates {
        let mut covered = false;
        for &other in &candidates {
            if other != c && descends_from(capsule, other, c)? {
                covered = true;
                break;
            }
        }
        if !covered {
            heads.push(c);
        }
    }
    Ok(heads)
}

/// The newest of several filesystem heads by a rule every replica applies alike: the
/// writer's commit time, then the hash.
pub fn newest(capsule: &Capsule, heads: &[RecordHash]) -> Result<Option<RecordHash>> {
    let mut best: Option<(u64, RecordHash)> = None;
    for &h in heads {
        let key = (capsule.record(h)?.header.time_ms, h);
        best = best.max(Some(key));
    }
    Ok(best.map(|(_, h)| h))
}

/// The parents of a commit built on `base`: every current head whose filesystem state is
/// `base` (`base` itself, and records of other kinds on top of it), never a head holding
/// another state, which the commit has not merged. `base` is always among them or below them.
pub fn commit_parents(capsule: &Capsule, base: Option<RecordHash>) -> Result<Vec<RecordHash>> {
    let state: BTreeSet<RecordHash> = base.into_iter().collect();
    let mut parents = Vec::new();
    for head in capsule.heads()? {
        if Some(head) == base || nearest_commits(capsule, &[head])? == state {
            parents.push(head);
        }
    }
    if parents.is_empty()
        && let Some(base) = base
    {
        parents.push(base);
    }
    Ok(parents)
}
