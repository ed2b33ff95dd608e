//! When a mount commits: the commits that closes of written files ask for, and the time bound
//! on changes that nothing committed. The timer thread makes the close commits and enforces
//! both the time bound and the signing bound (`fs::signing`) when nothing else happens: it
//! commits changes that waited, and signs unsigned commits that waited T seconds.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Result;
use crate::fs::Fs;
use crate::fs::filesystem::Signing;
use crate::fs::signing::{SignPolicy, Waited, commit, commit_durable, sign_waiting};
use crate::store::Durability;

/// How long a commit asked for by a close waits for more closes to share it. Committing on
/// every close, inline, was half the time of extracting 5000 small files (one record each);
/// within this window the closes of a burst (`tar x`, `cp -r`) share one record.
const CLOSE_BATCH: Duration = Duration::from_millis(5);

/// What the timer thread waits for: closes asking for a commit, and the end of the mount.
#[derive(Default)]
pub struct Wakeups {
    state: Mutex<WakeState>,
    changed: Condvar,
}

#[derive(Default)]
struct WakeState {
    commit_wanted: bool,
    stopping: bool,
}

enum Wake {
    Commit,
    Tick,
    Stop,
}

impl Wakeups {
    /// A written file was closed: its changes are committed within `CLOSE_BATCH`.
    pub fn commit_soon(&self) {
        self.lock().commit_wanted = true;
        self.changed.notify_one();
    }

    fn stop(&self) {
        self.lock().stopping = true;
        self.changed.notify_one();
    }

    fn wait(&self, tick: Duration) -> Wake {
        let mut state = self.lock();
        if !state.stopping && !state.commit_wanted {
            state = self.changed.wait_timeout(state, tick).expect("no panics while locked").0;
        }
        match (state.stopping, std::mem::take(&mut state.commit_wanted)) {
            (true, _) => Wake::Stop,
            (false, true) => Wake::Commit,
            (false, false) => Wake::Tick,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WakeState> {
        self.state.lock().expect("no panics while locked")
    }
}

/// A thread that makes the commits closes ask for, commits changes once they have waited
/// `after` (seen dirty on a once-a-second check), so an editor that keeps a file open loses
/// at most that much in a crash, and signs unsigned commits that waited T seconds. `finish`
/// stops it and makes the unmount's commit; dropping it only stops it.
pub struct CommitTimer {
    fs: Arc<RwLock<Fs>>,
    policy: Arc<Mutex<SignPolicy>>,
    wakeups: Arc<Wakeups>,
    thread: Option<JoinHandle<()>>,
}

impl CommitTimer {
    pub fn start(fs: Arc<RwLock<Fs>>, policy: Arc<Mutex<SignPolicy>>, wakeups: Arc<Wakeups>, after: Duration) -> Self {
        let tick = after.min(Duration::from_secs(1));
        let (shared_fs, shared_policy, shared_wakeups) = (fs.clone(), policy.clone(), wakeups.clone());
        let thread = std::thread::spawn(move || {
            let mut dirty_since: Option<Instant> = None;
            loop {
                let wake = wakeups.wait(tick);
                match wake {
                    Wake::Stop => return,
                    Wake::Commit => std::thread::sleep(CLOSE_BATCH),
                    Wake::Tick => {}
                }
                let Ok(mut fs) = fs.write() else { return };
                if !fs.is_dirty() {
                    dirty_since = None;
                    if let Err(e) = sign_waiting(&policy, &mut fs, Waited::Overdue, Durability::Buffered) {
                        tracing::error!("signing overdue commits failed (retried in a second): {e}");
                    }
                    continue;
                }
                let waited = dirty_since.get_or_insert_with(Instant::now).elapsed() >= after;
                if matches!(wake, Wake::Commit) || waited {
                    dirty_since = None;
                    if let Err(e) = commit(&policy, &mut fs, Signing::Later, Durability::Buffered) {
                        tracing::error!(
                            "commit after a close or the time bound failed (changes stay pending; fsync to retry): {e}"
                        );
                    }
                }
            }
        });
        Self { fs: shared_fs, policy: shared_policy, wakeups: shared_wakeups, thread: Some(thread) }
    }

    fn stop(&mut self) {
        self.wakeups.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The unmount's commit, after the session ended: everything pending, signed and
    /// durable; with nothing pending, a signature for unsigned commits, so every commit can
    /// be proven without the writer's key.
    pub fn finish(mut self) -> Result<()> {
        self.stop();
        let mut fs = self.fs.write().expect("no operation is running after the session ended");
        commit_durable(&self.policy, &mut fs)
    }
}

impl Drop for CommitTimer {
    fn drop(&mut self) {
        self.stop();
    }
}
