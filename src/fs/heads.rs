//! Where a filesystem's state is: the filesystem commits the capsule's heads descend from.
//!
//! Records of other kinds (raw appends, membership changes) may sit on top of a commit; they
//! carry no filesystem state, so a walk from the heads passes through them to the nearest
//! filesystem commits. The walks read only each record's shape (parents, kind), checked
//! against its hash; the commit finally opened is proven like every other read.

use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};

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

/// `nearest_commits` of one record at a time, each record walked once: `commit_parents` asks
/// it of many records that share what lies below them.
struct NearestOf<'a> {
    capsule: &'a Capsule,
    genesis: RecordHash,
    known: HashMap<RecordHash, BTreeSet<RecordHash>>,
}

impl<'a> NearestOf<'a> {
    fn new(capsule: &'a Capsule) -> Self {
        Self { capsule, genesis: RecordHash::genesis(capsule.id()), known: HashMap::new() }
    }

    /// A commit is its own nearest; any other record's are those of its parents.
    fn of(&mut self, record: RecordHash) -> Result<&BTreeSet<RecordHash>> {
        let mut parents_of: HashMap<RecordHash, Vec<RecordHash>> = HashMap::new();
        let mut stack = vec![record];
        while let Some(&h) = stack.last() {
            if self.known.contains_key(&h) {
                stack.pop();
                continue;
            }
            if h == self.genesis {
                self.known.insert(h, BTreeSet::new());
                continue;
            }
            let parents = match parents_of.get(&h) {
                Some(parents) => parents,
                None => {
                    let header = self.capsule.record(h)?.header;
                    match header.kind {
                        RecordKind::FsCommit => {
                            self.known.insert(h, BTreeSet::from([h]));
                            continue;
                        }
                        RecordKind::Data if header.key_gen != KeyGen(0) => return Err(older_format(h)),
                        RecordKind::Data | RecordKind::Membership => parents_of.entry(h).or_insert(header.parents),
                    }
                }
            };
            let waiting: Vec<RecordHash> = parents.iter().filter(|p| !self.known.contains_key(p)).copied().collect();
            if waiting.is_empty() {
                let nearest = parents.iter().flat_map(|p| self.known[p].iter().copied()).collect();
                self.known.insert(h, nearest);
            } else {
                stack.extend(waiting);
            }
        }
        Ok(&self.known[&record])
    }
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
    topmost(capsule, nearest_commits(capsule, &capsule.heads()?)?)
}

/// The newest filesystem commit at or below `starts` sealed under a generation `readable`
/// accepts, by height: what a member removed from the capsule can still open.
pub fn newest_readable(
    capsule: &Capsule,
    starts: &[RecordHash],
    readable: impl Fn(KeyGen) -> bool,
) -> Result<Option<RecordHash>> {
    let genesis = RecordHash::genesis(capsule.id());
    let height = |h: RecordHash| -> Result<u64> { Ok(capsule.height(&h)?.unwrap_or(0)) };
    let mut seen: HashSet<RecordHash> = HashSet::new();
    let mut queue = BinaryHeap::new();
    for &h in starts {
        queue.push((height(h)?, h));
    }
    while let Some((_, h)) = queue.pop() {
        if h == genesis || !seen.insert(h) {
            continue;
        }
        let header = capsule.record(h)?.header;
        if header.kind == RecordKind::FsCommit && readable(header.key_gen) {
            return Ok(Some(h));
        }
        for p in header.parents {
            queue.push((height(p)?, p));
        }
    }
    Ok(None)
}

/// Those of `commits` that no other of them descends from, in order.
fn topmost(capsule: &Capsule, commits: BTreeSet<RecordHash>) -> Result<Vec<RecordHash>> {
    let mut top = Vec::new();
    for &c in &commits {
        let mut below_another = false;
        for &other in &commits {
            if other != c && descends_from(capsule, other, c)? {
                below_another = true;
                break;
            }
        }
        if !below_another {
            top.push(c);
        }
    }
    Ok(top)
}

/// The filesystem commits a merge of `ours` (taken together) with `theirs` starts from: the
/// nearest commits that both descend from, none below another. Empty when the two share no
/// commit (each made its own first one). The walk goes down by height, highest first, and
/// stops once every record still to visit lies below a common one already found, so it reads what the two
/// made since they parted, not all of history. Heights are a local index: a wrong one only
/// makes the walk longer, never its answer wrong, since a record counts as common only when
/// parent links from both sides reach it.
pub fn merge_bases(capsule: &Capsule, ours: &[RecordHash], theirs: RecordHash) -> Result<Vec<RecordHash>> {
    const OURS: u8 = 1;
    const THEIRS: u8 = 2;
    const BOTH: u8 = OURS | THEIRS;
    /// Below a common record: no record reached from here is a nearest one.
    const BELOW: u8 = 4;
    let genesis = RecordHash::genesis(capsule.id());
    let height = |h: RecordHash| -> Result<u64> { Ok(capsule.height(&h)?.unwrap_or(0)) };
    let mut flags: HashMap<RecordHash, u8> = HashMap::new();
    let mut done: HashMap<RecordHash, u8> = HashMap::new();
    let mut queue = BinaryHeap::new();
    for (&h, side) in ours.iter().map(|h| (h, OURS)).chain([(&theirs, THEIRS)]) {
        *flags.entry(h).or_default() |= side;
        queue.push((height(h)?, h));
    }
    let mut common = Vec::new();
    while queue.iter().any(|(_, h)| flags[h] & BELOW == 0) {
        let Some((_, h)) = queue.pop() else { break };
        let f = flags[&h];
        if done.get(&h) == Some(&f) {
            continue;
        }
        done.insert(h, f);
        let passed = if f & BOTH == BOTH {
            if f & BELOW == 0 {
                common.push(h);
            }
            BOTH | BELOW
        } else {
            f
        };
        for p in capsule.record(h)?.header.parents {
            let before = flags.get(&p).copied().unwrap_or(0);
            if p != genesis && before | passed != before {
                flags.insert(p, before | passed);
                queue.push((height(p)?, p));
            }
        }
    }
    // Records of other kinds stand for the commits below them.
    topmost(capsule, nearest_commits(capsule, &common)?)
}

/// The parents of a commit of a state that holds the filesystem heads `held` (one commit, or
/// the branches a merge combined): every current head whose filesystem state lies within
/// `held` (a held commit, or records of other kinds on top of held commits), the records of
/// other kinds on `held` under the other heads (`resting_on`), and each held commit that none
/// of those covers. Never a head holding another state, which the commit has not merged.
pub fn commit_parents(capsule: &Capsule, held: &[RecordHash]) -> Result<Vec<RecordHash>> {
    let held: BTreeSet<RecordHash> = held.iter().copied().collect();
    let mut nearest = NearestOf::new(capsule);
    let mut parents = BTreeSet::new();
    let mut covered = BTreeSet::new();
    let mut beyond = Vec::new();
    for head in capsule.heads()? {
        let state = if held.contains(&head) { BTreeSet::from([head]) } else { nearest.of(head)?.clone() };
        if state.is_subset(&held) {
            parents.insert(head);
            covered.extend(state);
        } else {
            beyond.push(head);
        }
    }
    for record in resting_on(capsule, &mut nearest, &held, beyond)? {
        covered.extend(nearest.of(record)?.iter().copied());
        parents.insert(record);
    }
    parents.extend(held.difference(&covered));
    Ok(parents.into_iter().collect())
}

/// Below `heads`, which hold states other than `held`, the nearest records of other kinds that
/// sit on `held` alone. A member's grant that arrived under a commit not shown here yet (the
/// state here has changes pending, so it did not move) is one: without it among the parents,
/// the rights as of them do not let the member write, and the commit is refused. The walk
/// stops at the held commits, and at heights not above the lowest of them: a record sitting
/// on them lies higher. One found may lie below another parent, which changes nothing.
fn resting_on(
    capsule: &Capsule,
    nearest: &mut NearestOf<'_>,
    held: &BTreeSet<RecordHash>,
    heads: Vec<RecordHash>,
) -> Result<Vec<RecordHash>> {
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    let genesis = RecordHash::genesis(capsule.id());
    let height = |h: &RecordHash| -> Result<u64> { Ok(capsule.height(h)?.unwrap_or(u64::MAX)) };
    let floor = held.iter().map(height).collect::<Result<Vec<_>>>()?.into_iter().min().unwrap_or(0);
    let mut found = Vec::new();
    let mut seen: HashSet<RecordHash> = HashSet::new();
    let mut queue: VecDeque<RecordHash> = heads.into();
    while let Some(h) = queue.pop_front() {
        if h == genesis || held.contains(&h) || !seen.insert(h) || height(&h)? <= floor {
            continue;
        }
        let header = capsule.record(h)?.header;
        if header.kind != RecordKind::FsCommit && nearest.of(h)?.is_subset(held) {
            found.push(h);
        } else {
            queue.extend(header.parents);
        }
    }
    Ok(found)
}
