//! A mount's background push: one thread, woken by each record the capsule stores, that
//! sends new local commits to every replica the capsule remembers, retries unreachable ones
//! with back-off, and keeps a per-replica status for `.capsule/status`. Commits made offline wait as what they are, local records
//! not yet pushed; nothing else is queued, so nothing is lost if the process dies.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::status::{ReplicaStatus, SyncStatus, rolled_back};
use super::transfer::push;
use crate::capsule::Capsule;
use crate::record::RecordHash;
use crate::replica::Replica;

/// How often the thread looks at replicas waiting for a retry when no commit woke it.
const RETRY_CHECK: Duration = Duration::from_secs(1);
/// Waits before retrying a replica that failed: doubling from the first to the last.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Control {
    stop: bool,
    /// Set by `finish`: the thread ends after one more round, or at `stop`.
    last_round: bool,
}

struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    status: SyncStatus,
}

impl Shared {
    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().expect("no panics while locked")
    }
}

pub struct Uploader {
    capsule: Arc<Capsule>,
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

struct Target {
    replica: Box<dyn Replica>,
    /// The local heads last pushed whole; None until a push succeeds.
    pushed: Option<Vec<RecordHash>>,
    /// Push at the next chance even if the heads did not move: a pull found the replica
    /// lacking what was pushed. `pushed` stays, to count what waits meanwhile.
    again: bool,
    /// The local heads `to_push` was last counted at, while waiting to retry.
    counted: Vec<RecordHash>,
    /// Sizes of the records counted as waiting, so each is sized once per outage.
    sizes: HashMap<RecordHash, u64>,
    retry: Duration,
    next_try: Instant,
}

impl Uploader {
    /// Starts pushing `capsule` to `replicas`, in the order `status` lists them, now and
    /// after every commit.
    pub fn start(capsule: Arc<Capsule>, replicas: Vec<Box<dyn Replica>>, status: SyncStatus) -> Self {
        let shared = Arc::new(Shared { control: Mutex::default(), changed: Condvar::new(), status });
        let targets = replicas
            .into_iter()
            .map(|replica| Target {
                replica,
                pushed: None,
                again: false,
                counted: Vec::new(),
                sizes: HashMap::new(),
                retry: FIRST_RETRY,
                next_try: Instant::now(),
            })
            .collect();
        let watched = capsule.clone();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("capsulefs-push".into())
                .spawn(move || run(&capsule, targets, &shared))
                .expect("spawning the push thread")
        };
        Self { capsule: watched, shared, thread }
    }

    /// After the final commit: one more round to every replica, waited for up to `wait`.
    /// Returns the replicas still lacking records (their statuses) if it did not end in time
    /// or some push failed; those records go with the next mount or `capsulefs push`.
    pub fn finish(self, wait: Duration) -> Vec<ReplicaStatus> {
        self.shared.control().last_round = true;
        self.shared.changed.notify_all();
        self.capsule.wake_waiters();
        let deadline = Instant::now() + wait;
        while !self.thread.is_finished() && Instant::now() < deadline {
            let control = self.shared.control();
            let _ = self.shared.changed.wait_timeout(control, Duration::from_millis(50));
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        } else {
            self.shared.control().stop = true;
        }
        self.shared.status.replicas().into_iter().filter(|s| s.to_push > 0 || s.reachable != Some(true)).collect()
    }
}

fn run(capsule: &Capsule, mut targets: Vec<Target>, shared: &Shared) {
    let mut seen = capsule.records_stored();
    loop {
        let last_round = {
            let control = shared.control();
            if control.stop {
                return;
            }
            control.last_round
        };
        let heads = match capsule.heads() {
            Ok(heads) => heads,
            Err(e) => {
                tracing::warn!("background push: reading the local heads: {e}");
                Vec::new()
            }
        };
        for (i, target) in targets.iter_mut().enumerate() {
            // A pull found it lacking what was pushed (rolled back, or a push raced it).
            if shared.status.take_needs_push(i) {
                target.again = true;
            }
            if !target.again && target.pushed.as_ref() == Some(&heads) {
                continue;
            }
            if last_round || Instant::now() >= target.next_try {
                round(capsule, target, &heads, &shared.status, i);
            } else if let Some(theirs) = target.pushed.as_deref().filter(|_| target.counted != heads) {
                // Waiting to retry: commits made meanwhile are counted as waiting.
                if let Some(waiting) = waiting(capsule, theirs, &mut target.sizes) {
                    shared.status.update(i, |s| (s.to_push, s.to_push_bytes) = waiting);
                }
                target.counted = heads.clone();
            }
        }
        if last_round {
            shared.changed.notify_all();
            return;
        }
        // Woken by the next record stored (a commit), by `finish`, or to retry.
        seen = capsule.wait_for_records(seen, RETRY_CHECK);
    }
}

/// One push to `target`, its outcome written to replica `i` of `status` (once it ended: a
/// push may take seconds, a status read must not wait for it).
fn round(capsule: &Capsule, target: &mut Target, heads: &[RecordHash], status: &SyncStatus, i: usize) {
    let url = target.replica.describe();
    // A push that ends with nothing waiting holds every record stored before it began.
    let began_at = capsule.records_stored();
    let seen = status.update(i, |s| s.seen());
    match push(capsule, &*target.replica, &()) {
        Ok(report) => {
            if report.records > 0 {
                tracing::info!("background push: {} records to {url}", report.records);
            }
            // Records waiting for a signature are pushed once the mount signs them.
            target.pushed = (report.waiting_for_signature == 0).then(|| heads.to_vec());
            (target.retry, target.next_try, target.again) = (FIRST_RETRY, Instant::now(), false);
            target.sizes.clear();
            status.update(i, |s| {
                if s.reachable == Some(false) {
                    tracing::info!("background push: {url} is reachable again");
                }
                (s.reachable, s.to_push, s.to_push_bytes, s.last_push, s.error) =
                    (Some(true), report.waiting_for_signature, 0, Some(SystemTime::now()), None);
                if report.waiting_for_signature == 0 {
                    s.holds_through = s.holds_through.max(began_at);
                }
                // What it lacked before this push: a replica that went back is noticed here
                // too, whichever thread reaches it first.
                if let Some(alarm) = rolled_back(&report.replica_lacks, &seen) {
                    s.raise(alarm);
                }
            });
        }
        Err(e) => {
            target.next_try = Instant::now() + target.retry;
            target.retry = (target.retry * 2).min(LAST_RETRY);
            let lacking = target.pushed.as_deref().and_then(|theirs| waiting(capsule, theirs, &mut target.sizes));
            status.update(i, |s| {
                if s.reachable != Some(false) {
                    tracing::warn!("background push to {url} failed (retrying, at most every minute): {e}");
                }
                s.reachable = Some(false);
                (s.to_push, s.to_push_bytes) = lacking.unwrap_or((s.to_push, s.to_push_bytes));
                s.error = Some(e.to_string());
            });
        }
    }
}

/// Records (and about their bytes) held here that a replica holding `theirs` lacks; each
/// record is sized once (`sizes`). None if the store could not be read.
fn waiting(capsule: &Capsule, theirs: &[RecordHash], sizes: &mut HashMap<RecordHash, u64>) -> Option<(usize, u64)> {
    let lacking = capsule.difference(theirs).ok()?;
    let mut bytes = 0;
    for h in &lacking {
        bytes += match sizes.get(h) {
            Some(size) => *size,
            None => *sizes.entry(*h).or_insert(capsule.stored_size(*h).ok()?),
        };
    }
    Some((lacking.len(), bytes))
}
