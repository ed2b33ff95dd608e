//! What a mount keeps of payloads it has verified, in lrus bounded in bytes, keyed by
//! sub-record and place:
//! - `PlainCache`: plaintexts of chunks and tree nodes. A payload enters only after its proof
//!   passed and its seal opened at its place, or, for tree nodes this mount just committed,
//!   as the plaintext it sealed itself.
//! - `NodeCache`: tree nodes decoded from those plaintexts, so that an inode or directory
//!   lookup does not decode the same node again on every operation (it was a seventh of the
//!   daemon's time extracting a tar, perf).
//!
//! Records never change, so an entry stays true for as long as it is kept. The key holds the
//! place too: the same sub-record asked for at another place misses, and is refused as usual.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::trie::Loc;
use crate::crypto::aead::Place;
use crate::proof::CacheStats;

/// Default budget: 256 MiB of plaintext.
pub const DEFAULT_BYTES: usize = 256 << 20;

/// An lru of verified payloads in some form, bounded by the sum of their weights in bytes.
pub struct PayloadCache<T> {
    inner: Mutex<Inner<T>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Inner<T> {
    lru: LruCache<(Loc, Place), (T, usize)>,
    bytes: usize,
    budget: usize,
}

pub type PlainCache = PayloadCache<Arc<Vec<u8>>>;
/// Decoded tree nodes, weighed by the length of the plaintext they came from.
pub type NodeCache = PayloadCache<Arc<dyn Any + Send + Sync>>;

/// The caches of one mount, shared by its views of the past.
pub struct Caches {
    pub plain: PlainCache,
    pub nodes: NodeCache,
}

impl Caches {
    /// `budget` bytes of plaintexts, and a quarter of that for decoded nodes.
    pub fn new(budget: usize) -> Self {
        Self { plain: PayloadCache::new(budget), nodes: PayloadCache::new(budget / 4) }
    }
}

impl Default for Caches {
    fn default() -> Self {
        Self::new(DEFAULT_BYTES)
    }
}

impl<T: Clone> PayloadCache<T> {
    /// A cache holding at most `budget` bytes (0 keeps nothing).
    pub fn new(budget: usize) -> Self {
        let inner = Inner { lru: LruCache::unbounded(), bytes: 0, budget };
        Self { inner: Mutex::new(inner), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    pub fn get(&self, at: Loc, place: &Place) -> Option<T> {
        let found = self.lock().lru.get(&(at, *place)).map(|(value, _)| value.clone());
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `value`, which must come from a payload proven and opened at `place`.
    pub fn insert(&self, at: Loc, place: Place, value: T, weight: usize) {
        let mut inner = self.lock();
        if weight > inner.budget {
            return;
        }
        inner.bytes += weight;
        if let Some((_, old)) = inner.lru.put((at, place), (value, weight)) {
            inner.bytes -= old;
        }
        while inner.bytes > inner.budget {
            let Some((_, (_, evicted))) = inner.lru.pop_lru() else { break };
            inner.bytes -= evicted;
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats { hits: self.hits.load(Ordering::Relaxed), misses: self.misses.load(Ordering::Relaxed) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<T>> {
        self.inner.lock().expect("no panics while locked")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::aead::SealedKind;
    use crate::record::{CapsuleId, RecordHash, SubIdx};

    fn at(i: u32) -> (Loc, Place) {
        let loc = Loc { record: RecordHash::from_bytes([7; 32]), idx: SubIdx(i) };
        let place =
            Place { capsule: CapsuleId::from_bytes([1; 32]), kind: SealedKind::Chunk, object: 2, offset: 0, level: 0 };
        (loc, place)
    }

    #[test]
    fn stays_within_its_byte_budget_and_keys_by_place() {
        let cache = PlainCache::new(100);
        for i in 0..5 {
            let (loc, place) = at(i);
            cache.insert(loc, place, Arc::new(vec![i as u8; 40]), 40);
        }
        assert_eq!(cache.lock().bytes, 80, "two of 40 bytes fit in 100");
        let (loc, mut place) = at(4);
        assert_eq!(cache.get(loc, &place).unwrap()[0], 4);
        assert!(cache.get(at(0).0, &at(0).1).is_none(), "the oldest went first");
        place.offset = 65536;
        assert!(cache.get(loc, &place).is_none(), "another place is another entry");
        cache.insert(loc, place, Arc::new(vec![0; 101]), 101);
        assert_eq!(cache.stats(), CacheStats { hits: 1, misses: 2 });
        assert_eq!(cache.lock().bytes, 80, "larger than the budget: not kept");
    }
}
