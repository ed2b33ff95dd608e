//! Seals written chunks on a thread of its own while writes go on.
//!
//! Sealing and hashing a chunk (AES-GCM and blake3) is a large share of a sequential write's
//! CPU; done inside the commit, on the FUSE thread, it would all fall between one write(2)
//! and the next. So a write that completes a chunk hands it here, the commit takes the seals
//! made meanwhile, and it seals inline only chunks changed since (or never handed over).

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use crate::crypto::aead::{self, ContentKey, Place};
use crate::record::SubRecordBuf;

/// A chunk by (inode, chunk number).
pub type ChunkKey = (u64, u64);

struct Job {
    chunk: ChunkKey,
    version: u64,
    data: Arc<Vec<u8>>,
    place: Place,
}

#[derive(Default)]
struct Done {
    outstanding: usize,
    sealed: HashMap<ChunkKey, (u64, SubRecordBuf)>,
}

pub struct Sealer {
    jobs: mpsc::Sender<Job>,
    done: Arc<(Mutex<Done>, Condvar)>,
}

impl Sealer {
    /// Starts the sealing thread; it ends when the sealer is dropped.
    pub fn start(key: ContentKey) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let done = Arc::new((Mutex::new(Done::default()), Condvar::new()));
        let shared = done.clone();
        std::thread::spawn(move || {
            for job in queue {
                let sub = SubRecordBuf::filled(aead::sealed_len(job.data.len()), |out| {
                    aead::seal_into(&key, &job.place, &job.data, out)
                });
                let (lock, changed) = &*shared;
                let mut done = lock.lock().expect("no panics while locked");
                done.sealed.insert(job.chunk, (job.version, sub));
                done.outstanding -= 1;
                changed.notify_all();
            }
        });
        Self { jobs, done }
    }

    /// Seals `data`, the bytes of `chunk` at `version`, to be sealed at `place`.
    pub fn submit(&self, chunk: ChunkKey, version: u64, data: Arc<Vec<u8>>, place: Place) {
        self.lock().outstanding += 1;
        if self.jobs.send(Job { chunk, version, data, place }).is_err() {
            // The thread is gone (it cannot panic short of allocation failure): seal inline.
            self.lock().outstanding -= 1;
        }
    }

    /// Every seal made since the last call, each with the version it sealed, once the ones
    /// still under way are done.
    pub fn take(&self) -> HashMap<ChunkKey, (u64, SubRecordBuf)> {
        let (lock, changed) = &*self.done;
        let mut done = lock.lock().expect("no panics while locked");
        while done.outstanding > 0 {
            done = changed.wait(done).expect("no panics while locked");
        }
        std::mem::take(&mut done.sealed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Done> {
        self.done.0.lock().expect("no panics while locked")
    }
}
