//! The capsules a server holds: which creators may host one here (admission), what each
//! creator may take (quotas: capsules, bytes, names), and which stores are open (at most
//! `Limits::open_stores`, least recently used closed first, each closed once idle for
//! `STORE_IDLE`), so descriptors, threads and memory stay bounded however many capsules it
//! holds. Which capsules are held, and by whom, is read from the folders at start (a
//! `creator` file in each), so listing them opens no store.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use super::limits::STORE_IDLE;
use crate::capsule::{Capsule, check_metadata};
use crate::crypto::sign::TrustKey;
use crate::member::name::NameBinding;
use crate::record::{CapsuleId, WriterId};
use crate::replica::Replica;
use crate::store::rocks::RocksKv;
use crate::{Error, Result};

/// Who may create capsules here.
pub struct Admission {
    /// Any creator (a public server: its quotas protect it).
    open: bool,
    allowed: BTreeSet<WriterId>,
    /// One key a line (hex; `#` comments), re-read when it changes or on SIGHUP.
    file: Option<PathBuf>,
    from_file: Mutex<(Option<SystemTime>, BTreeSet<WriterId>)>,
}

impl Admission {
    pub fn open() -> Self {
        Self { open: true, allowed: BTreeSet::new(), file: None, from_file: Mutex::default() }
    }

    pub fn allow(allowed: impl IntoIterator<Item = WriterId>, file: Option<PathBuf>) -> Result<Self> {
        let admission = Self { open: false, allowed: allowed.into_iter().collect(), file, from_file: Mutex::default() };
        admission.reload()?;
        Ok(admission)
    }

    /// Reads the creators file again; how many keys it lists.
    pub fn reload(&self) -> Result<usize> {
        let Some(path) = &self.file else { return Ok(0) };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut keys = BTreeSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let key = WriterId::from_hex(line).map_err(|e| {
                Error::Invalid(format!("{} line {}: '{line}' is not a public key ({e})", path.display(), n + 1))
            })?;
            keys.insert(key);
        }
        let changed = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let count = keys.len();
        *self.from_file.lock().expect("no panics while locked") = (changed, keys);
        Ok(count)
    }

    /// Whether capsules created by `creator` may be held here. A creators file that changed
    /// is read again first (a bad one keeps the keys read before, and says why).
    pub fn admits(&self, creator: &WriterId) -> bool {
        if self.open || self.allowed.contains(creator) {
            return true;
        }
        let Some(path) = &self.file else { return false };
        let changed = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if changed != self.from_file.lock().expect("no panics while locked").0
            && let Err(e) = self.reload()
        {
            tracing::error!("keeping the creators read before: {e}");
        }
        self.from_file.lock().expect("no panics while locked").1.contains(creator)
    }

    /// What `/metrics` and the start line say of it.
    pub fn describe(&self) -> String {
        match (self.open, &self.file) {
            (true, _) => "open to any creator".to_owned(),
            (false, None) => format!("{} creators allowed", self.allowed.len()),
            (false, Some(f)) => format!(
                "{} creators allowed, and the {} in {}",
                self.allowed.len(),
                self.from_file.lock().expect("no panics while locked").1.len(),
                f.display()
            ),
        }
    }
}

/// What one creator's capsules may take here, together.
#[derive(Clone, Copy, Debug)]
pub struct Quotas {
    pub capsules: u64,
    pub bytes: u64,
    pub names: u64,
}

impl Quotas {
    /// For a server that hosts the creators it names: room enough to forget about.
    pub const ALLOWED: Quotas = Quotas { capsules: 1024, bytes: 1 << 40, names: 1024 };
    /// For a server open to anyone: what a stranger may take.
    pub const OPEN: Quotas = Quotas { capsules: 8, bytes: 1 << 30, names: 8 };
}

/// What one creator's capsules take here.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub capsules: u64,
    pub bytes: u64,
    pub names: u64,
}

struct Open {
    capsule: Arc<Capsule>,
    used: Instant,
}

pub struct Registry {
    dir: PathBuf,
    /// Authenticates what the capsules keep of their proofs and membership frontiers.
    trust: TrustKey,
    admission: Admission,
    quotas: Quotas,
    /// Stores kept open at most (`Limits::open_stores`).
    open_stores: usize,
    /// Every capsule held, with its creator.
    held: Mutex<HashMap<CapsuleId, WriterId>>,
    usage: Mutex<HashMap<WriterId, Usage>>,
    open: Mutex<OpenStores>,
    /// Signalled when a store has been opened, or a capsule adopted (or either failed).
    settled: Condvar,
}

/// The stores open, and the capsules whose store is being opened or made (outside the lock:
/// opening one takes tens of milliseconds, which no other request waits for).
#[derive(Default)]
struct OpenStores {
    open: HashMap<CapsuleId, Open>,
    opening: HashSet<CapsuleId>,
}

/// The creator of the capsule whose folder this is, as kept beside its store.
const CREATOR_FILE: &str = "creator";

impl Registry {
    /// What `dir` holds: each capsule's creator and the bytes its folder takes, and the names
    /// each creator bound.
    pub fn load(dir: &Path, trust: TrustKey, admission: Admission, quotas: Quotas, open_stores: usize) -> Result<Self> {
        let capsules = dir.join("capsules");
        std::fs::create_dir_all(&capsules).map_err(|e| Error::io(&capsules, e))?;
        let registry = Self {
            dir: dir.to_owned(),
            trust,
            admission,
            quotas,
            open_stores,
            held: Mutex::default(),
            usage: Mutex::default(),
            open: Mutex::default(),
            settled: Condvar::new(),
        };
        for entry in std::fs::read_dir(&capsules).map_err(|e| Error::io(&capsules, e))? {
            let entry = entry.map_err(|e| Error::io(&capsules, e))?;
            let Some(id) = entry.file_name().to_str().and_then(|n| CapsuleId::from_hex(n).ok()) else { continue };
            // One damaged folder does not keep the server, and every other capsule, down.
            let creator = match registry.creator_on_disk(id) {
                Ok(creator) => creator,
                Err(e) => {
                    tracing::error!(
                        "not serving capsule {id:?}: {e} (move {} aside, or restore it from a replica)",
                        entry.path().display()
                    );
                    continue;
                }
            };
            let bytes = folder_bytes(&entry.path());
            registry.held().insert(id, creator);
            let mut usage = registry.usage();
            let used = usage.entry(creator).or_default();
            used.capsules += 1;
            used.bytes += bytes;
        }
        let names = dir.join("names");
        if let Ok(entries) = std::fs::read_dir(&names) {
            for entry in entries.flatten() {
                let binding = std::fs::read(entry.path()).ok().and_then(|b| borsh::from_slice::<NameBinding>(&b).ok());
                if let Some((_, creator)) = binding.and_then(|b| b.check().ok()) {
                    registry.usage().entry(creator).or_default().names += 1;
                }
            }
        }
        Ok(registry)
    }

    fn held(&self) -> MutexGuard<'_, HashMap<CapsuleId, WriterId>> {
        self.held.lock().expect("no panics while locked")
    }

    fn usage(&self) -> MutexGuard<'_, HashMap<WriterId, Usage>> {
        self.usage.lock().expect("no panics while locked")
    }

    fn folder(&self, id: &CapsuleId) -> PathBuf {
        self.dir.join("capsules").join(id.to_hex())
    }

    fn store_path(&self, id: &CapsuleId) -> PathBuf {
        self.folder(id).join("store")
    }

    /// The creator kept beside capsule `id`'s store; a folder from before it was kept is read
    /// once (its store opened and closed) and the file written.
    fn creator_on_disk(&self, id: CapsuleId) -> Result<WriterId> {
        let path = self.folder(&id).join(CREATOR_FILE);
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(creator) = WriterId::from_hex(text.trim())
        {
            return Ok(creator);
        }
        let creator = self.open_store(&id)?.metadata().creator;
        std::fs::write(&path, creator.to_hex()).map_err(|e| Error::io(&path, e))?;
        Ok(creator)
    }

    fn open_store(&self, id: &CapsuleId) -> Result<Capsule> {
        let capsule = Capsule::open(Arc::new(RocksKv::open(&self.store_path(id), false)?), Vec::new())?
            .with_trust_key(self.trust.clone());
        if capsule.id() != *id {
            let detail = format!("{} holds {:?}", self.store_path(id).display(), capsule.id());
            return Err(crate::StoreError::Corrupted(detail).into());
        }
        Ok(capsule)
    }

    /// Every capsule held, without opening any.
    pub fn ids(&self) -> Vec<CapsuleId> {
        let mut ids: Vec<CapsuleId> = self.held().keys().copied().collect();
        ids.sort();
        ids
    }

    /// The replica of `id`, opened if it is not (closing the least recently used idle one
    /// when `open_stores` are); None if this server does not hold it.
    pub fn capsule(&self, id: CapsuleId) -> Result<Option<Arc<Capsule>>> {
        if !self.held().contains_key(&id) {
            return Ok(None);
        }
        let _opening = match self.take_turn(id, |open| {
            open.open.get_mut(&id).map(|o| {
                o.used = Instant::now();
                o.capsule.clone()
            })
        }) {
            Turn::Ready(capsule) => return Ok(Some(capsule)),
            Turn::Mine(opening) => opening,
        };
        let capsule = Arc::new(self.open_store(&id)?);
        let closing = {
            let mut open = self.lock_open();
            let closing = if open.open.len() >= self.open_stores { self.take_idlest(&mut open) } else { None };
            open.open.insert(id, Open { capsule: capsule.clone(), used: Instant::now() });
            closing
        };
        drop(closing);
        Ok(Some(capsule))
    }

    /// Takes out the least recently used store nobody holds now (if any), to be closed by the
    /// caller outside the lock (closing flushes it): the capsule counts as being opened until
    /// then, so that nobody opens its store while this one still holds the store's lock.
    fn take_idlest(&self, open: &mut OpenStores) -> Option<Closing<'_>> {
        let idlest = open.open.iter().filter(|(_, o)| Arc::strong_count(&o.capsule) == 1).min_by_key(|(_, o)| o.used);
        let id = idlest.map(|(id, _)| *id)?;
        self.closing(open, id)
    }

    /// Takes store `id` out of `open` to be closed, marking it as being opened meanwhile.
    fn closing(&self, open: &mut OpenStores, id: CapsuleId) -> Option<Closing<'_>> {
        let store = open.open.remove(&id)?;
        open.opening.insert(id);
        Some(Closing { _store: store, _turn: Opening { registry: self, id } })
    }

    /// Waits while another request opens or adopts `id`; then returns what `ready` finds, or
    /// marks `id` as being worked on by this caller until the returned guard is dropped.
    fn take_turn<T>(&self, id: CapsuleId, ready: impl Fn(&mut OpenStores) -> Option<T>) -> Turn<'_, T> {
        let mut open = self.lock_open();
        loop {
            if let Some(found) = ready(&mut open) {
                return Turn::Ready(found);
            }
            if open.opening.insert(id) {
                return Turn::Mine(Opening { registry: self, id });
            }
            open = self.settled.wait(open).expect("no panics while locked");
        }
    }

    fn lock_open(&self) -> MutexGuard<'_, OpenStores> {
        self.open.lock().expect("no panics while locked")
    }

    /// `id`'s capsule if it is open and the registry free now, without waiting (async
    /// handlers).
    pub fn open_now(&self, id: CapsuleId) -> Option<Arc<Capsule>> {
        self.open.try_lock().ok()?.open.get(&id).map(|o| o.capsule.clone())
    }

    /// Closes the stores nobody used for `STORE_IDLE` (and nobody holds now).
    pub fn close_idle(&self) {
        let closing: Vec<Closing> = {
            let mut open = self.lock_open();
            let idle: Vec<CapsuleId> = open
                .open
                .iter()
                .filter(|(_, o)| o.used.elapsed() >= STORE_IDLE && Arc::strong_count(&o.capsule) == 1)
                .map(|(id, _)| *id)
                .collect();
            idle.into_iter().filter_map(|id| self.closing(&mut open, id)).collect()
        };
        drop(closing);
    }

    /// How many stores are open.
    pub fn open_count(&self) -> usize {
        self.lock_open().open.len()
    }

    /// Starts holding `id` from its signed metadata, checked first, if its creator may host
    /// capsules here and has room for one more; the same metadata again is a no-op.
    pub fn adopt(&self, id: CapsuleId, metadata: &[u8]) -> Result<()> {
        if let Some(held) = self.capsule(id)? {
            return held.put_metadata(metadata);
        }
        let signed = check_metadata(metadata)?;
        let creator = signed.metadata.creator;
        if signed.metadata.id() != id {
            return Err(Error::Invalid(format!("the metadata of {:?} sent for {id:?}", signed.metadata.id())));
        }
        if !self.admission.admits(&creator) {
            return Err(Error::Forbidden(format!(
                "this server hosts capsules of the creators its operator allows, and {creator} is not one: ask \
                 them to add it (capsulefs serve --allow-creator {creator})"
            )));
        }
        // One adoption of `id` at a time; another request for it waits, then finds it held.
        let _adopting = match self.take_turn(id, |_| self.held().contains_key(&id).then_some(())) {
            Turn::Mine(adopting) => adopting,
            Turn::Ready(()) => {
                return match self.capsule(id)? {
                    Some(held) => held.put_metadata(metadata),
                    None => Err(Error::NotFound(format!("capsule {id:?}, adopted and gone meanwhile"))),
                };
            }
        };
        // The capsule is counted before it is made, so that adoptions at once cannot pass the
        // quota; one that fails gives its place back (when `place` is dropped).
        let place = self.take_capsule_place(creator)?;
        // Made aside and moved into place, so a half-made capsule is never held.
        let folder = self.folder(&id);
        let staging = folder.with_extension("new");
        let made = self.make_capsule(&staging, id, metadata, creator);
        let moved = made.and_then(|()| std::fs::rename(&staging, &folder).map_err(|e| Error::io(&folder, e)));
        if let Err(e) = moved {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        place.keep();
        self.held().insert(id, creator);
        self.usage().entry(creator).or_default().bytes += folder_bytes(&folder);
        tracing::info!("now holding capsule {id:?} of {creator}");
        Ok(())
    }

    /// Counts one more capsule of `creator`, or refuses it past the quota.
    fn take_capsule_place(&self, creator: WriterId) -> Result<CapsulePlace<'_>> {
        let mut usage = self.usage();
        let used = usage.entry(creator).or_default();
        if used.capsules >= self.quotas.capsules {
            return Err(Error::OverQuota(format!(
                "{creator} holds {} capsules here, its quota: remove one, or ask the operator for more",
                used.capsules
            )));
        }
        used.capsules += 1;
        Ok(CapsulePlace { registry: self, creator })
    }

    /// Makes capsule `id`'s folder at `staging`: its store, from the metadata, and its creator.
    fn make_capsule(&self, staging: &Path, id: CapsuleId, metadata: &[u8], creator: WriterId) -> Result<()> {
        let _ = std::fs::remove_dir_all(staging);
        std::fs::create_dir_all(staging).map_err(|e| Error::io(staging, e))?;
        drop(Capsule::adopt(Arc::new(RocksKv::open(&staging.join("store"), true)?), id, metadata, Vec::new())?);
        let file = staging.join(CREATOR_FILE);
        std::fs::write(&file, creator.to_hex()).map_err(|e| Error::io(&file, e))
    }

    /// Reserves `bytes` more in capsule `id` against its creator's quota, or refuses them
    /// when they would pass it. Reserved at once, so that batches stored at the same time
    /// cannot pass the quota together; what the reservation does not `keep` is given back.
    pub fn reserve(&self, id: CapsuleId, bytes: u64) -> Result<Reserved<'_>> {
        let Some(creator) = self.held().get(&id).copied() else {
            return Ok(Reserved { registry: self, creator: None, bytes: 0 });
        };
        let mut usage = self.usage();
        let used = usage.entry(creator).or_default();
        if used.bytes + bytes > self.quotas.bytes {
            return Err(Error::OverQuota(format!(
                "the capsules of {creator} take {} MiB here, and this would pass their quota of {} MiB: ask the \
                 operator for more room",
                used.bytes >> 20,
                self.quotas.bytes >> 20
            )));
        }
        used.bytes += bytes;
        Ok(Reserved { registry: self, creator: Some(creator), bytes })
    }

    /// Counts `bytes` stored in capsule `id` against its creator, past its quota if need be
    /// (records pulled from this server's peers, which it does not refuse).
    pub fn stored(&self, id: CapsuleId, bytes: u64) {
        let Some(creator) = self.held().get(&id).copied() else { return };
        self.usage().entry(creator).or_default().bytes += bytes;
    }

    /// Refuses a new name binding by `creator` when it is not allowed here or has bound its
    /// quota of names; counts it otherwise (call `unbind` if it then fails).
    pub fn take_name(&self, creator: WriterId) -> Result<()> {
        if !self.admission.admits(&creator) {
            return Err(Error::Forbidden(format!(
                "{creator} may not bind names on this server: its operator allows other creators"
            )));
        }
        let mut usage = self.usage();
        let used = usage.entry(creator).or_default();
        if used.names >= self.quotas.names {
            return Err(Error::OverQuota(format!("{creator} bound {} names here, its quota", used.names)));
        }
        used.names += 1;
        Ok(())
    }

    /// Gives back a name `take_name` counted for a binding that was not made.
    pub fn untake_name(&self, creator: WriterId) {
        let mut usage = self.usage();
        let used = usage.entry(creator).or_default();
        used.names = used.names.saturating_sub(1);
    }

    /// Per-creator usage, for `/metrics`.
    pub fn usage_by_creator(&self) -> Vec<(WriterId, Usage)> {
        let mut all: Vec<(WriterId, Usage)> = self.usage().iter().map(|(w, u)| (*w, *u)).collect();
        all.sort_by_key(|(w, _)| *w);
        all
    }

    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A capsule counted against its creator's quota before it is made; given back when dropped
/// (the adoption failed), forgotten once the capsule is held.
struct CapsulePlace<'a> {
    registry: &'a Registry,
    creator: WriterId,
}

impl CapsulePlace<'_> {
    /// The capsule is held: its place stays counted.
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for CapsulePlace<'_> {
    fn drop(&mut self) {
        let mut usage = self.registry.usage();
        let used = usage.entry(self.creator).or_default();
        used.capsules = used.capsules.saturating_sub(1);
    }
}

/// Bytes reserved against a creator's quota (`Registry::reserve`): given back when dropped,
/// but for what `keep` keeps.
pub struct Reserved<'a> {
    registry: &'a Registry,
    creator: Option<WriterId>,
    bytes: u64,
}

impl Reserved<'_> {
    /// Keeps `bytes` of the reservation (what was stored), giving back the rest.
    pub fn keep(mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Some(creator) = self.creator {
            let mut usage = self.registry.usage();
            let used = usage.entry(creator).or_default();
            used.bytes = used.bytes.saturating_sub(self.bytes);
        }
    }
}

/// A store taken out to be closed: closed first, then its turn ends (fields drop in order).
struct Closing<'a> {
    _store: Open,
    _turn: Opening<'a>,
}

/// What `Registry::take_turn` found: what was wanted, or the caller's turn to make it.
enum Turn<'a, T> {
    Ready(T),
    Mine(Opening<'a>),
}

/// A capsule whose store a request is opening or making; others wait for it to be dropped.
struct Opening<'a> {
    registry: &'a Registry,
    id: CapsuleId,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.registry.lock_open().opening.remove(&self.id);
        self.registry.settled.notify_all();
    }
}

/// Bytes the files under `dir` take on disk.
fn folder_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                // The lesser of length and blocks: what a refusal staged and gave back is a
                // hole in a pack, and space a log preallocates holds nothing yet.
                Ok(m) => total += m.len().min(std::os::unix::fs::MetadataExt::blocks(&m) * 512),
                Err(_) => {}
            }
        }
    }
    total
}
