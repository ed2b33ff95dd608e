//! Where membership records lie in a capsule's DAG, and the rights in force at each record.
//!
//! A record's *frontier* is the set of newest membership records among its ancestors (none an
//! ancestor of another). The rights as of a record's parents are the metadata's, with the
//! entries of every membership record at or below the parents' frontier applied in order of
//! how many membership records lie below each (an ancestor always has fewer), then by hash:
//! one topological order, the same on every machine whatever order records arrived in.
//!
//! Frontiers are kept in the store under a MAC of the local trust key, so that someone who
//! can write the store cannot move a record under other rights; one that is missing or does
//! not check is found again from the record's parents. The rest is memoized in memory.
//!
//! Everything is read through a `Scope`: the store, or the store with a batch being admitted
//! on top (`capsule::ingest`). What a batch's records imply stays in the scope, so a batch
//! that is refused leaves nothing behind in memory either.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use super::Capsule;
use crate::record::{RecordHash, RecordHeader, RecordKind, SubIdx};
use crate::rights::{MembershipEntry, NotApplied, Revocation, Rights};
use crate::store::StoreBatch;
use crate::{Error, Result, VerifyError};

const FRONTIER_CONTEXT: &str = "capsulefs membership frontier v1";
/// How `NotApplied::why` starts for a membership record that does not prove.
pub const UNPROVEN: &str = "it does not prove";
/// Records whose frontiers are kept in memory, and frontiers whose rights are.
const REMEMBERED: usize = 1 << 16;
const RIGHTS_REMEMBERED: usize = 256;

/// One membership record's writer and entries, read through proofs; entries that do not
/// decode are noted, not applied.
struct Entries {
    header: RecordHeader,
    entries: Vec<MembershipEntry>,
    undecodable: usize,
    /// Why the record could not be read through its proof, if it could not: then it applies
    /// nothing (only a store altered under this machine holds such a record).
    unproven: Option<String>,
}

/// Records being admitted, not stored yet: what history reads of them instead of the store.
pub trait Tentative {
    fn header(&self, h: &RecordHash) -> Option<&RecordHeader>;
    /// The payloads of a membership record among them, checked against its Merkle root.
    fn payloads(&self, h: &RecordHash) -> Option<Vec<&[u8]>>;
}

/// What history reads through: a capsule's store, with the records of a batch being
/// admitted on top. Facts about the batch's records are memoized here, not in `History`.
pub struct Scope<'a> {
    capsule: &'a Capsule,
    tentative: Option<&'a dyn Tentative>,
    memo: RefCell<Memo>,
}

#[derive(Default)]
struct Memo {
    upto: HashMap<RecordHash, Arc<[RecordHash]>>,
    below: HashMap<RecordHash, Arc<BTreeSet<RecordHash>>>,
    entries: HashMap<RecordHash, Arc<Entries>>,
    rights: HashMap<Vec<RecordHash>, Arc<Rights>>,
    /// Revocations of the batch's membership records that passed so far.
    revocations: Vec<Revocation>,
}

impl<'a> Scope<'a> {
    /// The capsule's store alone.
    pub fn stored(capsule: &'a Capsule) -> Self {
        Self { capsule, tentative: None, memo: RefCell::default() }
    }

    /// The store with `batch` on top.
    pub fn with(capsule: &'a Capsule, batch: &'a dyn Tentative) -> Self {
        Self { capsule, tentative: Some(batch), memo: RefCell::default() }
    }

    fn tentative_header(&self, h: &RecordHash) -> Option<&RecordHeader> {
        self.tentative.and_then(|t| t.header(h))
    }

    fn is_tentative(&self, h: &RecordHash) -> bool {
        self.tentative_header(h).is_some()
    }

    fn header(&self, h: RecordHash) -> Result<RecordHeader> {
        match self.tentative_header(&h) {
            Some(header) => Ok(header.clone()),
            None => Ok(self.capsule.record(h)?.header),
        }
    }
}

struct Inner {
    /// Per record: itself when it is a membership record, else its frontier.
    upto: LruCache<RecordHash, Arc<[RecordHash]>>,
    /// Per membership record: the membership records below it.
    below: HashMap<RecordHash, Arc<BTreeSet<RecordHash>>>,
    entries: HashMap<RecordHash, Arc<Entries>>,
    rights: LruCache<Vec<RecordHash>, Arc<Rights>>,
    /// Revocations applied by the membership records held; None until first read.
    revocations: Option<Arc<Vec<Revocation>>>,
}

pub struct History {
    inner: Mutex<Inner>,
}

impl Default for History {
    fn default() -> Self {
        let n = |n: usize| NonZeroUsize::new(n).expect("not zero");
        Self {
            inner: Mutex::new(Inner {
                upto: LruCache::new(n(REMEMBERED)),
                below: HashMap::new(),
                entries: HashMap::new(),
                rights: LruCache::new(n(RIGHTS_REMEMBERED)),
                revocations: None,
            }),
        }
    }
}

/// Whether a writer check applies the revocations known here: to a record arriving, yes; to
/// one already held (proving a read), no, since records held before their writer's
/// revocation arrived stay readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revocations {
    Apply,
    Ignore,
}

impl History {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("no panics while locked")
    }

    /// The rights as of `header`'s parents let its writer make record `record`: they hold the
    /// write level there, and, for a record arriving (`Revocations::Apply`), no revocation held here
    /// (or passed earlier in the scope's batch) cuts the record off. Records held before
    /// their writer's revocation arrived stay readable here; they travel to no replica that
    /// knows it. Returns the parents' frontier.
    pub fn check_writer(
        &self,
        scope: &Scope<'_>,
        record: RecordHash,
        header: &RecordHeader,
        revocations: Revocations,
    ) -> Result<Vec<RecordHash>> {
        let frontier = self.frontier_of(scope, &header.parents)?;
        let rights = self.rights_at(scope, &frontier)?;
        if !rights.may_write(&header.writer) {
            let level = rights.level(&header.writer).map_or("no level", |l| l.name());
            tracing::warn!(?record, writer = %header.writer, "refused: its writer held {level} as of its parents, not write");
            return Err(VerifyError::UnauthorizedWriter { record, writer: header.writer }.into());
        }
        if revocations == Revocations::Apply {
            let held = self.revocations(scope.capsule)?;
            let passed = &scope.memo.borrow().revocations;
            for known in [&held[..], &passed[..]] {
                if let Some(r) = rights.refused_by(known, record, &header.writer, &header.device, header.seq) {
                    return Err(VerifyError::Revoked { record, writer: header.writer, revocation: r.record }.into());
                }
            }
        }
        Ok(frontier)
    }

    /// A record of the scope's batch passed with `frontier`: what to keep of it in the batch
    /// that stores it. Later records of the batch see it (its frontier, and a membership
    /// record's revocations); `History` remembers it once `stored` is called.
    pub fn passed(
        &self,
        scope: &Scope<'_>,
        batch: &mut StoreBatch,
        record: RecordHash,
        header: &RecordHeader,
        frontier: Vec<RecordHash>,
    ) -> Result<Arc<[RecordHash]>> {
        let upto: Arc<[RecordHash]> =
            if header.kind == RecordKind::Membership { Arc::from([record]) } else { Arc::from(frontier) };
        if header.kind == RecordKind::Membership {
            batch.put_membership(&record);
        }
        if let Some(kept) = seal_frontier(scope.capsule, record, &upto) {
            batch.put_frontier(&record, kept);
        }
        scope.memo.borrow_mut().upto.insert(record, upto.clone());
        if header.kind == RecordKind::Membership {
            let applied = self.revocations_in(scope, record)?;
            scope.memo.borrow_mut().revocations.extend(applied);
        }
        Ok(upto)
    }

    /// Record `record` is stored with `upto` (from `passed`): a membership record's
    /// revocations now hold for every record that arrives after it.
    pub fn stored(
        &self,
        capsule: &Capsule,
        record: RecordHash,
        header: &RecordHeader,
        upto: Arc<[RecordHash]>,
    ) -> Result<()> {
        self.lock().upto.put(record, upto);
        if header.kind != RecordKind::Membership || self.lock().revocations.is_none() {
            return Ok(());
        }
        let applied = self.revocations_in(&Scope::stored(capsule), record)?;
        let mut inner = self.lock();
        let known = Arc::make_mut(inner.revocations.get_or_insert_with(Arc::default));
        for r in applied {
            if !known.iter().any(|k| k.record == r.record && k.member == r.member) {
                known.push(r);
            }
        }
        Ok(())
    }

    /// The rights as of `heads` (all of them merged): the rights now, when they are a
    /// capsule's heads.
    pub fn rights_of(&self, scope: &Scope<'_>, heads: &[RecordHash]) -> Result<Arc<Rights>> {
        let frontier = self.frontier_of(scope, heads)?;
        self.rights_at(scope, &frontier)
    }

    /// The newest membership records among `parents` and their ancestors.
    fn frontier_of(&self, scope: &Scope<'_>, parents: &[RecordHash]) -> Result<Vec<RecordHash>> {
        let mut all = BTreeSet::new();
        for p in parents {
            all.extend(self.upto(scope, *p)?.iter().copied());
        }
        if all.len() < 2 {
            return Ok(all.into_iter().collect());
        }
        let mut below_any = BTreeSet::new();
        for m in &all {
            below_any.extend(self.below(scope, *m)?.iter().copied());
        }
        Ok(all.into_iter().filter(|m| !below_any.contains(m)).collect())
    }

    /// The membership records below membership record `m`.
    fn below(&self, scope: &Scope<'_>, m: RecordHash) -> Result<Arc<BTreeSet<RecordHash>>> {
        let tentative = scope.is_tentative(&m);
        let known = match tentative {
            true => scope.memo.borrow().below.get(&m).cloned(),
            false => self.lock().below.get(&m).cloned(),
        };
        if let Some(below) = known {
            return Ok(below);
        }
        let parents = scope.header(m)?.parents;
        let mut below = BTreeSet::new();
        for f in self.frontier_of(scope, &parents)? {
            below.insert(f);
            below.extend(self.below(scope, f)?.iter().copied());
        }
        let below = Arc::new(below);
        match tentative {
            true => drop(scope.memo.borrow_mut().below.insert(m, below.clone())),
            false => drop(self.lock().below.insert(m, below.clone())),
        }
        Ok(below)
    }

    /// `upto` of a stored (or scope's) record: remembered, kept in the store, or found from
    /// its parents.
    fn upto(&self, scope: &Scope<'_>, h: RecordHash) -> Result<Arc<[RecordHash]>> {
        let genesis = RecordHash::genesis(scope.capsule.id());
        if h == genesis {
            return Ok(Arc::from([]));
        }
        let mut found: HashMap<RecordHash, Arc<[RecordHash]>> = HashMap::new();
        let mut stack = vec![h];
        while let Some(&top) = stack.last() {
            if found.contains_key(&top) {
                stack.pop();
                continue;
            }
            if let Some(known) = self.known_upto(scope, top)? {
                found.insert(top, known);
                stack.pop();
                continue;
            }
            let header = scope.header(top)?;
            let mut missing = Vec::new();
            for p in &header.parents {
                if *p == genesis || found.contains_key(p) {
                    continue;
                }
                match self.known_upto(scope, *p)? {
                    Some(known) => drop(found.insert(*p, known)),
                    None => missing.push(*p),
                }
            }
            if !missing.is_empty() {
                stack.extend(missing);
                continue;
            }
            let upto: Arc<[RecordHash]> = if header.kind == RecordKind::Membership {
                Arc::from([top])
            } else {
                Arc::from(self.frontier_of(scope, &header.parents)?)
            };
            self.remember(scope, top, &upto);
            found.insert(top, upto);
            stack.pop();
        }
        Ok(found.remove(&h).expect("the walk ends with it"))
    }

    /// `upto` of `h` if remembered or kept (with a MAC that checks).
    fn known_upto(&self, scope: &Scope<'_>, h: RecordHash) -> Result<Option<Arc<[RecordHash]>>> {
        if scope.is_tentative(&h) {
            return Ok(scope.memo.borrow().upto.get(&h).cloned());
        }
        if let Some(upto) = self.lock().upto.get(&h) {
            return Ok(Some(upto.clone()));
        }
        let capsule = scope.capsule;
        // Without the trust key, a kept frontier cannot be told from a planted one: found again.
        if capsule.trust().key.is_none() {
            return Ok(None);
        }
        let Some(kept) = capsule.store.frontier(&h)? else { return Ok(None) };
        let Some(upto) = open_frontier(capsule, h, &kept) else {
            tracing::warn!(?h, "ignoring a membership frontier this machine did not keep (the store was altered)");
            return Ok(None);
        };
        let upto: Arc<[RecordHash]> = Arc::from(upto);
        self.lock().upto.put(h, upto.clone());
        Ok(Some(upto))
    }

    /// Remembers a frontier found by a walk, and keeps it (not durably: it can be found again).
    fn remember(&self, scope: &Scope<'_>, h: RecordHash, upto: &Arc<[RecordHash]>) {
        if scope.is_tentative(&h) {
            scope.memo.borrow_mut().upto.insert(h, upto.clone());
            return;
        }
        self.lock().upto.put(h, upto.clone());
        let capsule = scope.capsule;
        if let Some(kept) = seal_frontier(capsule, h, upto) {
            let mut batch = capsule.store.batch();
            batch.put_frontier(&h, kept);
            if let Err(e) = capsule.store.write(batch, crate::store::Durability::Buffered) {
                tracing::debug!("not keeping a membership frontier: {e}");
            }
        }
    }

    /// The rights at `frontier`: the metadata's, then every membership record at or below it.
    fn rights_at(&self, scope: &Scope<'_>, frontier: &[RecordHash]) -> Result<Arc<Rights>> {
        let tentative = frontier.iter().any(|m| scope.is_tentative(m));
        let known = match tentative {
            true => scope.memo.borrow().rights.get(frontier).cloned(),
            false => self.lock().rights.get(frontier).cloned(),
        };
        if let Some(rights) = known {
            return Ok(rights);
        }
        let mut all: BTreeSet<RecordHash> = frontier.iter().copied().collect();
        for m in frontier {
            all.extend(self.below(scope, *m)?.iter().copied());
        }
        let mut ordered = Vec::with_capacity(all.len());
        for m in all {
            ordered.push((self.below(scope, m)?.len(), m));
        }
        ordered.sort();
        let metadata = scope.capsule.metadata();
        let mut rights = Rights::of_metadata(metadata);
        for (_, m) in &ordered {
            self.apply(scope, &mut rights, *m, &[])?;
        }
        // Changes made past a cut-off that this history holds are taken back: the same
        // records give the same rights whichever arrived first.
        if !rights.revocations.is_empty() {
            let cut = std::mem::take(&mut rights.revocations);
            rights = Rights::of_metadata(metadata);
            for (_, m) in &ordered {
                self.apply(scope, &mut rights, *m, &cut)?;
            }
        }
        let rights = Arc::new(rights);
        match tentative {
            true => drop(scope.memo.borrow_mut().rights.insert(frontier.to_vec(), rights.clone())),
            false => drop(self.lock().rights.put(frontier.to_vec(), rights.clone())),
        }
        Ok(rights)
    }

    /// Applies membership record `m`, unless one of the revocations `cut` cuts it off (a
    /// record its writer made past a revocation they had not seen: kept, never applied).
    fn apply(&self, scope: &Scope<'_>, rights: &mut Rights, m: RecordHash, cut: &[Revocation]) -> Result<()> {
        let entries = self.entries(scope, m)?;
        let h = &entries.header;
        let writer = h.writer;
        if let Some(why) = &entries.unproven {
            rights.not_applied.push(NotApplied { record: m, writer, why: why.clone() });
            return Ok(());
        }
        if !cut.is_empty() {
            let as_of_parents = self.rights_of(scope, &h.parents)?;
            if let Some(r) = as_of_parents.refused_by(cut, m, &writer, &h.device, h.seq) {
                let why = format!("made past the cut-off of the revocation in {:?}", r.record);
                rights.not_applied.push(NotApplied { record: m, writer, why });
                return Ok(());
            }
        }
        if entries.undecodable > 0 {
            let why = format!("{} of its entries do not decode", entries.undecodable);
            rights.not_applied.push(NotApplied { record: m, writer, why });
        }
        rights.apply(m, writer, &entries.entries);
        Ok(())
    }

    /// The entries of membership record `m`, each read through its proof (a record of the
    /// scope's batch: checked against its Merkle root, and its proof is the batch's own).
    fn entries(&self, scope: &Scope<'_>, m: RecordHash) -> Result<Arc<Entries>> {
        if let Some(header) = scope.tentative_header(&m) {
            if let Some(entries) = scope.memo.borrow().entries.get(&m) {
                return Ok(entries.clone());
            }
            let payloads = scope.tentative.and_then(|t| t.payloads(&m)).unwrap_or_default();
            let read = Arc::new(decode_entries(m, header.clone(), payloads.into_iter()));
            scope.memo.borrow_mut().entries.insert(m, read.clone());
            return Ok(read);
        }
        if let Some(entries) = self.lock().entries.get(&m) {
            return Ok(entries.clone());
        }
        let capsule = scope.capsule;
        let header = capsule.record(m)?.header;
        let mut payloads = Vec::new();
        let mut unproven = None;
        for idx in 0..header.sub_count {
            match capsule.read_sub_record(m, SubIdx(idx)) {
                Ok((bytes, _)) => payloads.push(bytes.into_inner()),
                Err(Error::Verify(e)) => {
                    tracing::error!(record = ?m, "a membership record that does not prove applies nothing: {e}");
                    unproven = Some(format!("{UNPROVEN}: {e}"));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let mut read = decode_entries(m, header, payloads.iter().map(|p| &p[..]));
        read.unproven = unproven;
        let read = Arc::new(read);
        self.lock().entries.insert(m, read.clone());
        Ok(read)
    }

    /// The revocations that membership record `m` applies.
    fn revocations_in(&self, scope: &Scope<'_>, m: RecordHash) -> Result<Vec<Revocation>> {
        let parents = scope.header(m)?.parents;
        let mut rights = (*self.rights_of(scope, &parents)?).clone();
        let before = rights.revocations.len();
        self.apply(scope, &mut rights, m, &[])?;
        Ok(rights.revocations.split_off(before))
    }

    /// Every revocation applied by a membership record held here, read once. Only admissions
    /// ask (under the capsule's write lock, so one at a time, and `stored` adds to them
    /// under it too); the proofs that reading them makes do not.
    fn revocations(&self, capsule: &Capsule) -> Result<Arc<Vec<Revocation>>> {
        if let Some(known) = &self.lock().revocations {
            return Ok(known.clone());
        }
        let scope = Scope::stored(capsule);
        let mut known = Vec::new();
        for m in capsule.store.memberships()? {
            known.extend(self.revocations_in(&scope, m)?);
        }
        let known = Arc::new(known);
        self.lock().revocations = Some(known.clone());
        Ok(known)
    }
}

/// The entries of membership record `m` from its payloads; those that do not decode are
/// counted and logged.
fn decode_entries<'p>(m: RecordHash, header: RecordHeader, payloads: impl Iterator<Item = &'p [u8]>) -> Entries {
    let mut read = Entries { header, entries: Vec::new(), undecodable: 0, unproven: None };
    for (idx, bytes) in payloads.enumerate() {
        match MembershipEntry::decode(bytes) {
            Ok(entry) => read.entries.push(entry),
            Err(e) => {
                tracing::warn!(record = ?m, idx, "a membership entry does not decode, so it is not applied: {e}");
                read.undecodable += 1;
            }
        }
    }
    read
}

fn frontier_mac(capsule: &Capsule, h: RecordHash, upto: &[RecordHash]) -> Option<[u8; 32]> {
    let key = capsule.trust().key?;
    let mut bytes = Vec::with_capacity(64 + 32 * upto.len());
    bytes.extend_from_slice(capsule.id().as_bytes());
    bytes.extend_from_slice(h.as_bytes());
    upto.iter().for_each(|m| bytes.extend_from_slice(m.as_bytes()));
    Some(key.note_mac(FRONTIER_CONTEXT, &bytes))
}

/// `upto` with its MAC, as kept in the store; None without a trust key.
fn seal_frontier(capsule: &Capsule, h: RecordHash, upto: &[RecordHash]) -> Option<Vec<u8>> {
    let mac = frontier_mac(capsule, h, upto)?;
    let mut kept = mac.to_vec();
    upto.iter().for_each(|m| kept.extend_from_slice(m.as_bytes()));
    Some(kept)
}

fn open_frontier(capsule: &Capsule, h: RecordHash, kept: &[u8]) -> Option<Vec<RecordHash>> {
    let (mac, list) = kept.split_at_checked(32)?;
    if list.len() % 32 != 0 {
        return None;
    }
    let upto: Vec<RecordHash> = list.chunks(32).filter_map(|c| RecordHash::from_slice(c).ok()).collect();
    let expected = frontier_mac(capsule, h, &upto)?;
    let mac: [u8; 32] = mac.try_into().ok()?;
    // blake3::Hash compares in constant time.
    (blake3::Hash::from(expected) == blake3::Hash::from(mac)).then_some(upto)
}
