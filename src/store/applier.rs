//! Durable journaled batches go to RocksDB on a thread of their own. Once a batch's
//! fsync-journal entry is written and being synced a crash cannot lose it, so the caller need
//! not wait for RocksDB's WAL write and memtable insert: they run while the journal's
//! fdatasync does (about 120 us and 250 us per one-append commit on this VM, one after the
//! other before). Every later read or write of the store waits for the batch first
//! (`Applier::settle`), so nothing in this process reads past it; another process reading the
//! store (`RocksKv::open_read_only`) sees it once its WAL write is done, microseconds later.
//! A buffered batch has no fdatasync to overlap: the caller writes it (`Applier::write_now`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rocksdb::{DB, WriteBatch, WriteOptions};

use crate::{Result, StoreError};

pub struct Applier {
    db: Arc<DB>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    path: PathBuf,
    state: Mutex<State>,
    handed: Condvar,
    applied: Condvar,
}

#[derive(Default)]
struct State {
    next: Option<WriteBatch>,
    applying: bool,
    /// A batch the journal holds that RocksDB refused: this process's view of the store now
    /// lacks it, so every later operation fails until a reopen replays it from the journal.
    failed: Option<String>,
    stopping: bool,
}

impl Applier {
    /// Starts the applier's thread; fails (without a panic under any lock) when no thread can
    /// be started (out of memory or of the process's thread limit).
    pub fn start(db: Arc<DB>, path: &Path) -> Result<Self> {
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            state: Mutex::default(),
            handed: Condvar::new(),
            applied: Condvar::new(),
        });
        let (running, applying) = (shared.clone(), db.clone());
        let thread = std::thread::Builder::new()
            .name("capsulefs-apply".into())
            .spawn(move || running.run(&applying))
            .map_err(|e| crate::Error::io(path, e))?;
        Ok(Self { db, shared, thread: Some(thread) })
    }

    /// Writes `batch` on the caller's thread, after the batch handed over before it: for a
    /// batch no fdatasync waits on, where handing it over would only add a thread's wake-up.
    pub fn write_now(&self, batch: WriteBatch) -> Result<()> {
        self.settle()?;
        self.db.write_opt(batch, &WriteOptions::default()).map_err(|e| self.failure(&self.shared.refused(e)))
    }

    /// Hands `batch` over to be written, once the batch handed over before it is written.
    pub fn apply(&self, batch: WriteBatch) -> Result<()> {
        let mut state = self.settled()?;
        state.next = Some(batch);
        self.shared.handed.notify_one();
        Ok(())
    }

    /// Returns once every batch handed over is in the database.
    pub fn settle(&self) -> Result<()> {
        self.settled().map(drop)
    }

    fn settled(&self) -> Result<MutexGuard<'_, State>> {
        let mut state = self.shared.lock();
        while state.next.is_some() || state.applying {
            state = self.shared.applied.wait(state).expect("no panics while locked");
        }
        match &state.failed {
            Some(e) => Err(self.failure(e)),
            None => Ok(state),
        }
    }

    fn failure(&self, e: &str) -> crate::Error {
        StoreError::Backend(format!(
            "{}: a batch that is safe in the fsync journal could not be written to the database ({e}); \
             reopen the store (unmount and mount again) to replay it",
            self.shared.path.display()
        ))
        .into()
    }
}

impl Shared {
    fn run(&self, db: &DB) {
        loop {
            let batch = {
                let mut state = self.lock();
                while state.next.is_none() && !state.stopping {
                    state = self.handed.wait(state).expect("no panics while locked");
                }
                let Some(batch) = state.next.take() else { return };
                state.applying = true;
                batch
            };
            let result = db.write_opt(batch, &WriteOptions::default());
            if let Err(e) = result {
                self.refused(e);
            }
            self.lock().applying = false;
            self.applied.notify_all();
        }
    }

    /// Marks the store failed by RocksDB's refusal of a journaled batch; returns the reason.
    fn refused(&self, e: rocksdb::Error) -> String {
        tracing::error!("{}: a journaled batch could not be written to the database: {e}", self.path.display());
        self.lock().failed.get_or_insert(e.into_string()).clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("no panics while locked")
    }
}

impl Drop for Applier {
    /// Writes the batch still in hand, then stops the thread.
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.handed.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
