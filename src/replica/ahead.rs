//! Reading ahead of a reader that says what it will read next: record objects for a clone or
//! a pull from a bucket, sub-records for a sequential reader of a sparse replica. A bucket
//! answers one GET at a few hundred MB/s at best and with tens of milliseconds of latency,
//! a server one sub-record per round trip; several requests at once, made while the reader
//! checks and stores what came before, are what keep a clone or a cold read moving.
//!
//! The bytes fetched are not believed here any more than elsewhere: this only moves them
//! earlier. Held bytes are bounded (`held_bytes`, plus what the workers are fetching).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::Result;

/// How one item is fetched: its bytes, or None if the source does not have it.
pub type Fetch<K, V> = dyn Fn(&K) -> Result<Option<V>> + Send + Sync;

/// What an item weighs against the bound on held bytes.
pub trait Weigh {
    fn weight(&self) -> usize;
}

impl Weigh for Vec<u8> {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// A run of sub-records.
impl Weigh for Vec<Vec<u8>> {
    fn weight(&self) -> usize {
        self.iter().map(Vec::len).sum()
    }
}

struct State<K, V> {
    /// Keys to fetch, in the order the reader will ask for them.
    wanted: VecDeque<K>,
    fetching: HashSet<K>,
    fetched: HashMap<K, Result<Option<V>>>,
    held: usize,
    workers: usize,
    closed: bool,
}

struct Shared<K, V> {
    state: Mutex<State<K, V>>,
    changed: Condvar,
    /// Fetched bytes that may wait for the reader before the workers pause.
    held_bytes: usize,
}

impl<K, V> Shared<K, V> {
    fn lock(&self) -> MutexGuard<'_, State<K, V>> {
        self.state.lock().expect("no panics while locked")
    }
}

impl<K: Eq + Hash, V: Weigh> State<K, V> {
    /// What was fetched for `key`, no longer held.
    fn take(&mut self, key: &K) -> Option<Result<Option<V>>> {
        let got = self.fetched.remove(key)?;
        if let Ok(Some(item)) = &got {
            self.held -= item.weight();
        }
        Some(got)
    }
}

/// Items read ahead by up to `workers` threads, which end when this is dropped.
pub struct ReadAhead<K, V = Vec<u8>> {
    fetch: Arc<Fetch<K, V>>,
    workers: usize,
    shared: Arc<Shared<K, V>>,
}

impl<K: Clone + Eq + Hash + Send + 'static, V: Weigh + Send + 'static> ReadAhead<K, V> {
    pub fn new(fetch: Arc<Fetch<K, V>>, workers: usize, held_bytes: usize) -> Self {
        let state = State {
            wanted: VecDeque::new(),
            fetching: HashSet::new(),
            fetched: HashMap::new(),
            held: 0,
            workers: 0,
            closed: false,
        };
        let shared = Arc::new(Shared { state: Mutex::new(state), changed: Condvar::new(), held_bytes });
        Self { fetch, workers, shared }
    }

    /// The reader will ask for `keys`, in this order, next: fetch them instead of what an
    /// earlier plan still wanted. What was fetched for an earlier plan stays for the reader
    /// (one reader's plans interleave, e.g. a file's chunks and its chunk map's nodes) until
    /// the held bytes reach their bound; then what this plan does not name is let go.
    pub fn plan(&self, keys: impl IntoIterator<Item = K>) {
        let mut state = self.shared.lock();
        let keys: Vec<K> = keys.into_iter().collect();
        if state.held >= self.shared.held_bytes {
            let planned: HashSet<&K> = keys.iter().collect();
            let dropped: Vec<K> = state.fetched.keys().filter(|k| !planned.contains(k)).cloned().collect();
            for key in dropped {
                state.take(&key);
            }
        }
        let fresh: VecDeque<K> =
            keys.into_iter().filter(|k| !state.fetching.contains(k) && !state.fetched.contains_key(k)).collect();
        state.wanted = fresh;
        while state.workers < self.workers.min(state.wanted.len()) {
            state.workers += 1;
            let (fetch, shared) = (self.fetch.clone(), self.shared.clone());
            std::thread::spawn(move || work(&*fetch, &shared));
        }
        self.shared.changed.notify_all();
    }

    /// Object `key`: from what was fetched ahead, or once its fetch ends, or fetched now if
    /// it was not planned or not started yet.
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        let mut state = self.shared.lock();
        loop {
            if let Some(got) = state.take(key) {
                self.shared.changed.notify_all();
                return got;
            }
            if !state.fetching.contains(key) {
                state.wanted.retain(|k| k != key);
                drop(state);
                return (self.fetch)(key);
            }
            state = self.shared.changed.wait(state).expect("no panics while locked");
        }
    }
}

impl<K, V> Drop for ReadAhead<K, V> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

/// One worker: fetches the next wanted key while the held bytes allow, until closed.
fn work<K: Clone + Eq + Hash, V: Weigh>(fetch: &Fetch<K, V>, shared: &Shared<K, V>) {
    let mut state = shared.lock();
    loop {
        if state.closed {
            return;
        }
        let next = if state.held < shared.held_bytes { state.wanted.pop_front() } else { None };
        let Some(key) = next else {
            state = shared.changed.wait(state).expect("no panics while locked");
            continue;
        };
        state.fetching.insert(key.clone());
        drop(state);
        let got = fetch(&key);
        state = shared.lock();
        state.fetching.remove(&key);
        if let Ok(Some(item)) = &got {
            state.held += item.weight();
        }
        state.fetched.insert(key, got);
        shared.changed.notify_all();
    }
}
