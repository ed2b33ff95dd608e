//! Records already proven, kept in an lru in memory (the store persists the set as `Cf::Proven`).
//!
//! A proof may stop at any record found here (poster, observation 2): the chain from a record to
//! a proven one proves it, however that one was proven.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::record::{RecordHash, RecordHeader};

pub struct ProofCache {
    headers: Mutex<LruCache<RecordHash, Arc<RecordHeader>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

impl ProofCache {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self { headers: Mutex::new(LruCache::new(capacity)), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    /// The proven header of `h`, if cached.
    pub fn get(&self, h: &RecordHash) -> Option<Arc<RecordHeader>> {
        let found = self.headers.lock().expect("no panics while locked").get(h).cloned();
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    pub(in crate::proof) fn insert(&self, h: RecordHash, header: Arc<RecordHeader>) {
        self.headers.lock().expect("no panics while locked").put(h, header);
    }

    pub fn clear(&self) {
        self.headers.lock().expect("no panics while locked").clear();
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats { hits: self.hits.load(Ordering::Relaxed), misses: self.misses.load(Ordering::Relaxed) }
    }
}
