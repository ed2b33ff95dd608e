//! A mount's background pull: a thread per replica that pulls what it has (every record
//! checked by the capsule before it is stored, as in any pull), then waits for its heads to
//! change (a server's long poll) or, for a folder or bucket that cannot wait, looks again
//! after `POLL_EVERY`. One more thread calls `arrived` whenever the capsule stored records,
//! pulled or committed here, which moves the live filesystem forward: to a newer commit, or
//! to the merge of branches (also when a commit here ends changes that kept it from
//! following what arrived before). While `arrived` answers that it wants to be called again
//! (files open for writing held the move back), it is also called every `WATCH_TICK`, and
//! when `Capsule::wake_waiters` is called (the last of those files was closed).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::Report;
use super::evidence::{is_fork, learn_evidence, pass_evidence};
use super::status::SyncStatus;
use super::transfer::pull;
use crate::capsule::Capsule;
use crate::record::{DeviceId, RecordHash, Seq, WriterId};
use crate::replica::Replica;

/// How long a long poll may wait for new heads.
const WAIT: Duration = Duration::from_secs(30);
/// How often the thread calling `arrived` looks whether it is stopped, or calls it again when
/// it asked to be.
const WATCH_TICK: Duration = Duration::from_secs(1);
/// How often a replica that cannot wait (a folder, a bucket) is looked at: each look is a
/// listing and a read per device, so not too often for a bucket that bills requests.
const POLL_EVERY: Duration = Duration::from_secs(2);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl Stop {
    /// Sleeps `d` unless stopped first; whether to go on.
    fn sleep(&self, d: Duration) -> bool {
        let stopped = self.stopped.lock().expect("no panics while locked");
        let (stopped, _) = self.changed.wait_timeout_while(stopped, d, |s| !*s).expect("no panics while locked");
        !*stopped
    }

    fn is_set(&self) -> bool {
        *self.stopped.lock().expect("no panics while locked")
    }
}

/// The pulling threads; they end at the next chance once this is dropped (a long poll ends
/// within `WAIT`, and the process usually ends before).
pub struct Follower {
    stop: Arc<Stop>,
}

impl Follower {
    /// Starts pulling from `replicas` (in the order `status` lists them) into `capsule`.
    pub fn start(
        capsule: Arc<Capsule>,
        replicas: Vec<Box<dyn Replica>>,
        status: SyncStatus,
        arrived: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        let stop = Arc::new(Stop::default());
        for (i, replica) in replicas.into_iter().enumerate() {
            let (capsule, status, stop) = (capsule.clone(), status.clone(), stop.clone());
            std::thread::Builder::new()
                .name("capsulefs-pull".into())
                .spawn(move || follow(&capsule, &*replica, i, &status, &stop))
                .expect("spawning a pull thread");
        }
        let watching = stop.clone();
        std::thread::Builder::new()
            .name("capsulefs-follow".into())
            .spawn(move || {
                let mut seen = capsule.records_stored();
                let mut again = false;
                while !watching.is_set() {
                    let now = capsule.wait_for_records(seen, WATCH_TICK);
                    if now != seen || again {
                        seen = now;
                        again = arrived();
                    }
                }
            })
            .expect("spawning the follow thread");
        Self { stop }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        *self.stop.stopped.lock().expect("no panics while locked") = true;
        self.stop.changed.notify_all();
    }
}

fn follow(capsule: &Capsule, replica: &dyn Replica, i: usize, status: &SyncStatus, stop: &Stop) {
    // What an earlier mount saw the replica hold: a replica that went back meanwhile is
    // noticed at the first pull.
    let url = status.update(i, |s| s.url.clone());
    match capsule.replica_watermarks(&url) {
        Ok(marks) => status.update(i, |s| s.remember(&marks)),
        Err(e) => tracing::warn!("reading what was noted of {url}: {e}"),
    }
    let mut retry = FIRST_RETRY;
    let mut forks_passed = 0;
    while !stop.is_set() {
        let pulled = pull(capsule, replica, &());
        // Every fork known here reaches this replica as evidence, however it was learned.
        match capsule.fork_count() {
            Ok(forks) if forks > forks_passed => match pass_evidence(capsule, replica, &mut Report::default()) {
                Ok(()) => forks_passed = forks,
                Err(e) => tracing::debug!("passing fork evidence on to {}: {e}", replica.describe()),
            },
            _ => {}
        }
        match pulled {
            Ok(mut report) => {
                // Records came: the replica may have learned of a fork with them.
                if report.records > 0
                    && let Err(e) = learn_evidence(capsule, replica, &mut report)
                {
                    tracing::debug!("asking {} for fork evidence: {e}", replica.describe());
                }
                for fork in &report.forks_learned {
                    status.update(i, |s| s.raise(format!("holds evidence of a fork: {fork}")));
                }
                let at_heads = signed_lanes(capsule, &report.replica_heads);
                let moved = status.update(i, |s| {
                    (s.reachable, s.last_pull, s.error) = (Some(true), Some(SystemTime::now()), None);
                    s.pulled += report.records as u64;
                    s.pulled_bytes += report.bytes;
                    s.pulled_from(&report.replica_heads, &at_heads, &report.replica_lacks)
                });
                if let Some(marks) = moved
                    && let Err(e) = capsule.keep_replica_watermarks(&url, &marks)
                {
                    tracing::debug!("noting what {url} holds (a read-only mount cannot): {e}");
                }
                if report.records > 0 {
                    tracing::info!("background pull: {} records from {}", report.records, replica.describe());
                }
                retry = FIRST_RETRY;
                let asked = Instant::now();
                match replica.watch_heads(&report.replica_heads, WAIT) {
                    // A replica that answers at once cannot wait: look again later.
                    Ok(heads) if heads == report.replica_heads && asked.elapsed() < POLL_EVERY / 2 => {
                        stop.sleep(POLL_EVERY);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("waiting for new heads at {}: {e}", replica.describe());
                        stop.sleep(POLL_EVERY);
                    }
                }
            }
            Err(e) => {
                status.update(i, |s| {
                    if is_fork(&e) {
                        s.raise(format!("serves a forked writer: {e}"));
                    }
                    if s.reachable != Some(false) {
                        tracing::warn!("background pull from {} failed (retrying): {e}", replica.describe());
                    }
                    (s.reachable, s.error) = (Some(false), Some(e.to_string()));
                });
                stop.sleep(retry);
                retry = (retry * 2).min(LAST_RETRY);
            }
        }
    }
}

/// (writer, device, seq) of the signed records among `heads` held here: what a replica with
/// those heads holds at least, lane by lane.
fn signed_lanes(capsule: &Capsule, heads: &[RecordHash]) -> Vec<(WriterId, DeviceId, Seq)> {
    heads
        .iter()
        .filter_map(|h| capsule.record(*h).ok())
        .filter(|r| r.signature.is_some())
        .map(|r| (r.header.writer, r.header.device, r.header.seq))
        .collect()
}
