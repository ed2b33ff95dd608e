//! Records already proven, kept in an lru in memory (the store persists the set as `Cf::Proven`).
//!
//! A proof may stop at any record found here (poster, observation 2): the chain from a record to
//! a proven one proves it, however that one was proven.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::record::merkle::Subtree;
use crate::record::{NodeHash, RecordHash, RecordHeader};

/// Verified subtrees of proven records kept in memory.
const NODES: usize = 1 << 18;

/// Proven marks are written to the store in batches of this many.
const MARKS_PER_WRITE: usize = 256;

pub struct ProofCache {
    headers: Mutex<LruCache<RecordHash, Arc<RecordHeader>>>,
    /// Merkle subtrees (record, first leaf, end leaf) proven part of a proven record's root, so
    /// a later path check stops where it meets one: observation 2 applied inside the tree.
    nodes: Mutex<LruCache<(RecordHash, u32, u32), NodeHash>>,
    /// Newly proven records not yet in the store's proven set.
    unsaved: Mutex<Vec<RecordHash>>,
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
        Self {
            headers: Mutex::new(LruCache::new(capacity)),
            nodes: Mutex::new(LruCache::new(NonZeroUsize::new(NODES.min(capacity.get() * 16)).expect("non-zero"))),
            unsaved: Mutex::new(Vec::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
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

    pub(in crate::proof) fn node(&self, record: RecordHash, start: u32, end: u32) -> Option<NodeHash> {
        self.nodes.lock().expect("no panics while locked").get(&(record, start, end)).copied()
    }

    pub(in crate::proof) fn insert_nodes(&self, record: RecordHash, subtrees: &[Subtree]) {
        let mut nodes = self.nodes.lock().expect("no panics while locked");
        for t in subtrees {
            nodes.put((record, t.start, t.end), t.hash);
        }
    }

    /// Queues `h` for the store's proven set; returns a full batch once one is due.
    pub(in crate::proof) fn queue_mark(&self, h: RecordHash) -> Option<Vec<RecordHash>> {
        let mut unsaved = self.unsaved.lock().expect("no panics while locked");
        unsaved.push(h);
        (unsaved.len() >= MARKS_PER_WRITE).then(|| std::mem::take(&mut *unsaved))
    }

    /// Every queued mark, for a final write.
    pub fn take_unsaved(&self) -> Vec<RecordHash> {
        std::mem::take(&mut *self.unsaved.lock().expect("no panics while locked"))
    }

    pub fn clear(&self) {
        self.headers.lock().expect("no panics while locked").clear();
        self.nodes.lock().expect("no panics while locked").clear();
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats { hits: self.hits.load(Ordering::Relaxed), misses: self.misses.load(Ordering::Relaxed) }
    }
}
