//! When a mount commits and signs: the capsule's K-records / T-seconds signing bound, the
//! commits that closes of written files ask for, and the time bound on changes that nothing
//! committed. The timer thread makes the close commits and enforces both bounds when nothing
//! else happens: it commits changes that waited, and signs unsigned commits that waited T
//! seconds.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Result;
use crate::fs::Fs;
use crate::record::Params;
use crate::store::Durability;

/// When unsigned commits must end with a signed one (the capsule's K and T bounds).
pub struct SignPolicy {
    every_records: u32,
    every: Duration,
    /// Commits since the last signed one, and when the first of them was made.
    unsigned: u32,
    since: Option<Instant>,
    /// Commits made by this mount, and how many of them signed (for `.capsule/status`).
    pub commits: u64,
    pub signed: u64,
}

impl SignPolicy {
    pub fn new(params: &Params) -> Self {
        Self {
            every_records: params.sign_every_records.max(1),
            every: Duration::from_secs(u64::from(params.sign_every_secs)),
            unsigned: 0,
            since: None,
            commits: 0,
            signed: 0,
        }
    }

    fn due(&self) -> bool {
        self.unsigned + 1 >= self.every_records || self.overdue()
    }

    /// Whether unsigned commits have waited T seconds for a signature.
    fn overdue(&self) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= self.every)
    }

    fn record(&mut self, signed: bool) {
        self.commits += 1;
        self.signed += u64::from(signed);
        if signed {
            (self.unsigned, self.since) = (0, None);
        } else {
            self.unsigned += 1;
            self.since.get_or_insert_with(Instant::now);
        }
    }
}

/// Commits pending changes; signed when asked or when the policy says so.
pub fn commit(policy: &Mutex<SignPolicy>, fs: &mut Fs, force_sign: bool, durability: Durability) -> Result<()> {
    if !fs.is_dirty() {
        return Ok(());
    }
    let mut policy = policy.lock().expect("no panics while locked");
    let sign = force_sign || policy.due();
    if fs.commit(sign, durability)?.is_some() {
        policy.record(sign);
    }
    Ok(())
}

/// fsync, fsyncdir and unmount: everything pending in a signed commit; with nothing pending,
/// a signature for commits still unsigned (so every commit can be proven without the
/// writer's key); either way every commit so far durable before returning, including ones
/// that closes made, buffered, just before.
pub fn commit_durable(policy: &Mutex<SignPolicy>, fs: &mut Fs) -> Result<()> {
    if fs.is_dirty() {
        return commit(policy, fs, true, Durability::Durable);
    }
    if !sign_waiting(policy, fs, false, Durability::Durable)? {
        fs.sync()?;
    }
    Ok(())
}

/// Signs a commit of nothing when unsigned ones wait for a signature: once they have waited
/// T seconds (`overdue_only`), or at all. Returns whether it signed.
fn sign_waiting(policy: &Mutex<SignPolicy>, fs: &mut Fs, overdue_only: bool, durability: Durability) -> Result<bool> {
    let mut policy = policy.lock().expect("no panics while locked");
    let waiting = if overdue_only { policy.overdue() } else { policy.unsigned > 0 };
    if waiting {
        fs.sign_now(durability)?;
        policy.record(true);
    }
    Ok(waiting)
}

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
                    if let Err(e) = sign_waiting(&policy, &mut fs, true, Durability::Buffered) {
                        tracing::error!("signing overdue commits failed (retried in a second): {e}");
                    }
                    continue;
                }
                let waited = dirty_since.get_or_insert_with(Instant::now).elapsed() >= after;
                if matches!(wake, Wake::Commit) || waited {
                    dirty_since = None;
                    if let Err(e) = commit(&policy, &mut fs, false, Durability::Buffered) {
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
