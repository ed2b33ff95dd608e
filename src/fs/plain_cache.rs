//! Verified plaintexts of filesystem payloads (chunks and tree nodes), kept in an lru bounded
//! in bytes. A payload enters only after its proof passed and its seal opened at its place,
//! or, for tree nodes this mount just committed, as the plaintext it sealed itself; records
//! never change, so an entry stays true for as long as it is kept. The key holds the
//! place too: the same sub-record asked for at another place misses, and is refused as usual.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::trie::Loc;
use crate::crypto::aead::Place;
use crate::proof::CacheStats;

/// Default budget: 256 MiB of plaintext.
pub const DEFAULT_BYTES: usize = 256 << 20;

pub struct PlainCache {
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

struct Inner {
    lru: LruCache<(Loc, Place), Arc<Vec<u8>>>,
    bytes: usize,
    budget: usize,
}

impl PlainCache {
    /// A cache holding at most `budget` bytes of plaintext (0 keeps nothing).
    pub fn new(budget: usize) -> Self {
        let inner = Inner { lru: LruCache::unbounded(), bytes: 0, budget };
        Self { inner: Mutex::new(inner), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    pub fn get(&self, at: Loc, place: &Place) -> Option<Arc<Vec<u8>>> {
        let found = self.lock().lru.get(&(at, *place)).cloned();
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `plain`, which must have been proven and opened at `place`.
    pub fn insert(&self, at: Loc, place: Place, plain: Arc<Vec<u8>>) {
        let mut inner = self.lock();
        if plain.len() > inner.budget {
            return;
        }
        inner.bytes += plain.len();
        if let Some(old) = inner.lru.put((at, place), plain) {
            inner.bytes -= old.len();
        }
        while inner.bytes > inner.budget {
            let Some((_, evicted)) = inner.lru.pop_lru() else { break };
            inner.bytes -= evicted.len();
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats { hits: self.hits.load(Ordering::Relaxed), misses: self.misses.load(Ordering::Relaxed) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("no panics while locked")
    }
}

impl Default for PlainCache {
    fn default() -> Self {
        Self::new(DEFAULT_BYTES)
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
            cache.insert(loc, place, Arc::new(vec![i as u8; 40]));
        }
        assert_eq!(cache.lock().bytes, 80, "two of 40 bytes fit in 100");
        let (loc, mut place) = at(4);
        assert_eq!(cache.get(loc, &place).unwrap()[0], 4);
        assert!(cache.get(at(0).0, &at(0).1).is_none(), "the oldest went first");
        place.offset = 65536;
        assert!(cache.get(loc, &place).is_none(), "another place is another entry");
        cache.insert(loc, place, Arc::new(vec![0; 101]));
        assert_eq!(cache.stats(), CacheStats { hits: 1, misses: 2 });
        assert_eq!(cache.lock().bytes, 80, "larger than the budget: not kept");
    }
}
