//! Reading objects ahead of a reader that says what it will read next, so that a clone or a
//! pull from a bucket keeps several GETs in flight and overlaps them with checking and
//! storing what came before. A bucket answers one GET at a few hundred MB/s at best and with
//! tens of milliseconds of latency; a few at once, read while the records before them are
//! being stored, are what lets a clone keep up with a parallel plain downloader.
//!
//! The bytes fetched are not believed here any more than elsewhere: this only moves them
//! earlier. Held bytes are bounded (`HELD_BYTES`, plus what the workers are fetching).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::objects::Objects;
use crate::Result;

/// GETs in flight at once.
const WORKERS: usize = 4;
/// Fetched bytes that may wait for the reader before the workers pause.
const HELD_BYTES: usize = 128 << 20;

#[derive(Default)]
struct State {
    /// Keys to fetch, in the order the reader will ask for them.
    wanted: VecDeque<String>,
    fetching: HashSet<String>,
    fetched: HashMap<String, Result<Option<Vec<u8>>>>,
    held: usize,
    workers: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("no panics while locked")
    }
}

/// Objects read ahead by up to `WORKERS` threads, which end when this is dropped.
pub struct ReadAhead<O: Objects> {
    objects: Arc<O>,
    shared: Arc<Shared>,
}

impl<O: Objects + 'static> ReadAhead<O> {
    pub fn new(objects: Arc<O>) -> Self {
        let shared = Arc::new(Shared { state: Mutex::default(), changed: Condvar::new() });
        Self { objects, shared }
    }

    /// The reader will ask for `keys`, in this order, next: start fetching them, and forget
    /// what was fetched for an earlier plan and is not in this one.
    pub fn plan(&self, keys: impl IntoIterator<Item = String>) {
        let mut state = self.shared.lock();
        let keys: Vec<String> = keys.into_iter().collect();
        let planned: HashSet<&String> = keys.iter().collect();
        let dropped: Vec<String> = state.fetched.keys().filter(|k| !planned.contains(k)).cloned().collect();
        for key in dropped {
            if let Some(Ok(Some(bytes))) = state.fetched.remove(&key) {
                state.held -= bytes.len();
            }
        }
        let fresh: VecDeque<String> =
            keys.into_iter().filter(|k| !state.fetching.contains(k) && !state.fetched.contains_key(k)).collect();
        state.wanted = fresh;
        while state.workers < WORKERS.min(state.wanted.len()) {
            state.workers += 1;
            let (objects, shared) = (self.objects.clone(), self.shared.clone());
            std::thread::spawn(move || work(&*objects, &shared));
        }
        self.shared.changed.notify_all();
    }

    /// Object `key`: from what was fetched ahead, or once its fetch ends, or fetched now if
    /// it was not planned or not started yet.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut state = self.shared.lock();
        loop {
            if let Some(got) = state.fetched.remove(key) {
                if let Ok(Some(bytes)) = &got {
                    state.held -= bytes.len();
                }
                self.shared.changed.notify_all();
                return got;
            }
            if !state.fetching.contains(key) {
                state.wanted.retain(|k| k != key);
                drop(state);
                return self.objects.get(key);
            }
            state = self.shared.changed.wait(state).expect("no panics while locked");
        }
    }
}

impl<O: Objects> Drop for ReadAhead<O> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

/// One worker: fetches the next wanted key while the held bytes allow, until closed.
fn work<O: Objects>(objects: &O, shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if state.closed {
            return;
        }
        let next = if state.held < HELD_BYTES { state.wanted.pop_front() } else { None };
        let Some(key) = next else {
            state = shared.changed.wait(state).expect("no panics while locked");
            continue;
        };
        state.fetching.insert(key.clone());
        drop(state);
        let got = objects.get(&key);
        state = shared.lock();
        state.fetching.remove(&key);
        if let Ok(Some(bytes)) = &got {
            state.held += bytes.len();
        }
        state.fetched.insert(key, got);
        shared.changed.notify_all();
    }
}
