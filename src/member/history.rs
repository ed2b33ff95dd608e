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

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use super::keystore::MembershipEntry;
use super::rights::{NotApplied, Revocation, Rights};
use crate::capsule::Capsule;
use crate::record::{RecordHash, RecordHeader, RecordKind, SubIdx};
use crate::store::StoreBatch;
use crate::{Result, VerifyError};

const FRONTIER_CONTEXT: &str = "capsulefs membership frontier v1";
/// Records whose frontiers are kept in memory, and frontiers whose rights are.
const REMEMBERED: usize = 1 << 16;
const RIGHTS_REMEMBERED: usize = 256;

/// One membership record's writer and entries, read through proofs; entries that do not
/// decode are noted, not applied.
struct Entries {
    header: RecordHeader,
    entries: Vec<MembershipEntry>,
    undecodable: usize,
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

impl History {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("no panics while locked")
    }

    /// The rights as of `header`'s parents let its writer make record `record`: they hold the
    /// write level there, and, with `cut_off` (a record arriving), no revocation held here
    /// cuts the record off. Records held before their writer's revocation arrived stay
    /// readable here; they travel to no replica that knows it. Returns the parents' frontier.
    pub fn check_writer(
        &self,
        capsule: &Capsule,
        record: RecordHash,
        header: &RecordHeader,
        cut_off: bool,
    ) -> Result<Vec<RecordHash>> {
        let frontier = self.frontier_of(capsule, &header.parents)?;
        let rights = self.rights_at(capsule, &frontier)?;
        if !rights.may_write(&header.writer) {
            let level = rights.level(&header.writer).map_or("no level", |l| l.name());
            tracing::warn!(?record, writer = %header.writer, "refused: its writer held {level} as of its parents, not write");
            return Err(VerifyError::UnauthorizedWriter { record, writer: header.writer }.into());
        }
        let known = if cut_off { self.revocations(capsule)? } else { Arc::default() };
        if let Some(r) = rights.refused_by(&known, record, &header.writer, &header.device, header.seq) {
            return Err(VerifyError::Revoked { record, writer: header.writer, revocation: r.record }.into());
        }
        Ok(frontier)
    }

    /// What to keep of record `record`, just checked with `frontier`, in the batch that
    /// stores it; remembered here once `stored` is called.
    pub fn keep(
        &self,
        capsule: &Capsule,
        batch: &mut StoreBatch,
        record: RecordHash,
        header: &RecordHeader,
        frontier: Vec<RecordHash>,
    ) -> Arc<[RecordHash]> {
        let upto: Arc<[RecordHash]> =
            if header.kind == RecordKind::Membership { Arc::from([record]) } else { Arc::from(frontier) };
        if header.kind == RecordKind::Membership {
            batch.put_membership(&record);
        }
        if let Some(kept) = seal_frontier(capsule, record, &upto) {
            batch.put_frontier(&record, kept);
        }
        upto
    }

    /// Record `record` is stored with `upto` (from `keep`): a membership record's
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
        let applied = self.revocations_in(capsule, record)?;
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
    pub fn rights_of(&self, capsule: &Capsule, heads: &[RecordHash]) -> Result<Arc<Rights>> {
        let frontier = self.frontier_of(capsule, heads)?;
        self.rights_at(capsule, &frontier)
    }

    /// The newest membership records among `parents` and their ancestors.
    fn frontier_of(&self, capsule: &Capsule, parents: &[RecordHash]) -> Result<Vec<RecordHash>> {
        let mut all = BTreeSet::new();
        for p in parents {
            all.extend(self.upto(capsule, *p)?.iter().copied());
        }
        if all.len() < 2 {
            return Ok(all.into_iter().collect());
        }
        let mut below_any = BTreeSet::new();
        for m in &all {
            below_any.extend(self.below(capsule, *m)?.iter().copied());
        }
        Ok(all.into_iter().filter(|m| !below_any.contains(m)).collect())
    }

    /// The membership records below membership record `m`.
    fn below(&self, capsule: &Capsule, m: RecordHash) -> Result<Arc<BTreeSet<RecordHash>>> {
        if let Some(below) = self.lock().below.get(&m) {
            return Ok(below.clone());
        }
        let parents = capsule.record(m)?.header.parents;
        let mut below = BTreeSet::new();
        for f in self.frontier_of(capsule, &parents)? {
            below.insert(f);
            below.extend(self.below(capsule, f)?.iter().copied());
        }
        let below = Arc::new(below);
        self.lock().below.insert(m, below.clone());
        Ok(below)
    }

    /// `upto` of a stored record: remembered, kept in the store, or found from its parents.
    fn upto(&self, capsule: &Capsule, h: RecordHash) -> Result<Arc<[RecordHash]>> {
        if h == crate::record::RecordHash::genesis(capsule.id()) {
            return Ok(Arc::from([]));
        }
        let mut found: HashMap<RecordHash, Arc<[RecordHash]>> = HashMap::new();
        let mut stack = vec![h];
        while let Some(&top) = stack.last() {
            if found.contains_key(&top) {
                stack.pop();
                continue;
            }
            if let Some(known) = self.known_upto(capsule, top)? {
                found.insert(top, known);
                stack.pop();
                continue;
            }
            let header = capsule.record(top)?.header;
            let genesis = crate::record::RecordHash::genesis(capsule.id());
            let mut missing = Vec::new();
            for p in &header.parents {
                if *p == genesis || found.contains_key(p) {
                    continue;
                }
                match self.known_upto(capsule, *p)? {
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
                Arc::from(self.frontier_of(capsule, &header.parents)?)
            };
            self.remember(capsule, top, &upto);
            found.insert(top, upto);
            stack.pop();
        }
        Ok(found.remove(&h).expect("the walk ends with it"))
    }

    /// `upto` of `h` if remembered or kept (with a MAC that checks).
    fn known_upto(&self, capsule: &Capsule, h: RecordHash) -> Result<Option<Arc<[RecordHash]>>> {
        if let Some(upto) = self.lock().upto.get(&h) {
            return Ok(Some(upto.clone()));
        }
        let Some(kept) = capsule.store().frontier(&h)? else { return Ok(None) };
        let Some(upto) = open_frontier(capsule, h, &kept) else {
            tracing::warn!(?h, "ignoring a membership frontier this machine did not keep (the store was altered)");
            return Ok(None);
        };
        let upto: Arc<[RecordHash]> = Arc::from(upto);
        self.lock().upto.put(h, upto.clone());
        Ok(Some(upto))
    }

    /// Remembers a frontier found by a walk, and keeps it (not durably: it can be found again).
    fn remember(&self, capsule: &Capsule, h: RecordHash, upto: &Arc<[RecordHash]>) {
        self.lock().upto.put(h, upto.clone());
        if let Some(kept) = seal_frontier(capsule, h, upto) {
            let mut batch = capsule.store().batch();
            batch.put_frontier(&h, kept);
            if let Err(e) = capsule.store().write(batch, crate::store::Durability::Buffered) {
                tracing::debug!("not keeping a membership frontier: {e}");
            }
        }
    }

    /// The rights at `frontier`: the metadata's, then every membership record at or below it.
    fn rights_at(&self, capsule: &Capsule, frontier: &[RecordHash]) -> Result<Arc<Rights>> {
        if let Some(rights) = self.lock().rights.get(frontier) {
            return Ok(rights.clone());
        }
        let mut all: BTreeSet<RecordHash> = frontier.iter().copied().collect();
        for m in frontier {
            all.extend(self.below(capsule, *m)?.iter().copied());
        }
        let mut ordered = Vec::with_capacity(all.len());
        for m in all {
            ordered.push((self.below(capsule, m)?.len(), m));
        }
        ordered.sort();
        let mut rights = Rights::of_metadata(capsule.metadata());
        for (_, m) in &ordered {
            self.apply(capsule, &mut rights, *m, &[])?;
        }
        // Changes made past a cut-off that this history holds are taken back: the same
        // records give the same rights whichever arrived first.
        if !rights.revocations.is_empty() {
            let cut = std::mem::take(&mut rights.revocations);
            rights = Rights::of_metadata(capsule.metadata());
            for (_, m) in &ordered {
                self.apply(capsule, &mut rights, *m, &cut)?;
            }
        }
        let rights = Arc::new(rights);
        self.lock().rights.put(frontier.to_vec(), rights.clone());
        Ok(rights)
    }

    /// Applies membership record `m`, unless one of the revocations `cut` cuts it off (a
    /// record its writer made past a revocation they had not seen: kept, never applied).
    fn apply(&self, capsule: &Capsule, rights: &mut Rights, m: RecordHash, cut: &[Revocation]) -> Result<()> {
        let entries = self.entries(capsule, m)?;
        let h = &entries.header;
        let writer = h.writer;
        if !cut.is_empty() {
            let as_of_parents = self.rights_of(capsule, &h.parents)?;
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

    /// The entries of membership record `m`, each read through its proof.
    fn entries(&self, capsule: &Capsule, m: RecordHash) -> Result<Arc<Entries>> {
        if let Some(entries) = self.lock().entries.get(&m) {
            return Ok(entries.clone());
        }
        let header = capsule.record(m)?.header;
        let mut read = Entries { header: header.clone(), entries: Vec::new(), undecodable: 0 };
        for idx in 0..header.sub_count {
            let (bytes, _) = capsule.read_sub_record(m, SubIdx(idx))?;
            match MembershipEntry::decode(bytes.get()) {
                Ok(entry) => read.entries.push(entry),
                Err(e) => {
                    tracing::warn!(record = ?m, idx, "a membership entry does not decode, so it is not applied: {e}");
                    read.undecodable += 1;
                }
            }
        }
        let read = Arc::new(read);
        self.lock().entries.insert(m, read.clone());
        Ok(read)
    }

    /// The revocations that membership record `m` applies.
    fn revocations_in(&self, capsule: &Capsule, m: RecordHash) -> Result<Vec<Revocation>> {
        let parents = capsule.record(m)?.header.parents;
        let mut rights = (*self.rights_of(capsule, &parents)?).clone();
        let before = rights.revocations.len();
        self.apply(capsule, &mut rights, m, &[])?;
        Ok(rights.revocations.split_off(before))
    }

    /// Every revocation applied by a membership record held here, read once. Only inserts
    /// ask (under the capsule's write lock, so one at a time, and `stored` adds to them
    /// under it too); the proofs that reading them makes do not.
    fn revocations(&self, capsule: &Capsule) -> Result<Arc<Vec<Revocation>>> {
        if let Some(known) = &self.lock().revocations {
            return Ok(known.clone());
        }
        let mut known = Vec::new();
        for m in capsule.store().memberships()? {
            known.extend(self.revocations_in(capsule, m)?);
        }
        let known = Arc::new(known);
        self.lock().revocations = Some(known.clone());
        Ok(known)
    }
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
