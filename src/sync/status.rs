//! What a mount knows of each replica it syncs with, written by the background push and pull
//! threads and read by `.capsule/status`.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use super::Lacking;
use crate::record::{DeviceId, RecordHash, Seq, WriterId};

/// One replica, as this mount last saw it.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    pub url: String,
    /// None until the first attempt.
    pub reachable: Option<bool>,
    /// Local records the replica lacks, as of the last look, and about their bytes.
    pub to_push: usize,
    /// The replica holds every record this process had stored when its last complete push
    /// began (a count of `Capsule::records_stored`).
    pub holds_through: u64,
    pub to_push_bytes: u64,
    pub last_push: Option<SystemTime>,
    pub last_pull: Option<SystemTime>,
    /// Records pulled from it since the mount started, and their bytes.
    pub pulled: u64,
    pub pulled_bytes: u64,
    /// The last failure, while it lasts.
    pub error: Option<String>,
    /// What it did that no honest, up-to-date replica does (went back, served a fork); kept
    /// until the mount ends, even once a push repaired it.
    pub alarm: Option<String>,
    /// Its heads as the last pull found them.
    pub heads: Vec<RecordHash>,
    /// Set when a pull found it lacking signed records held here (behind, or rolled back):
    /// the background push sends them without waiting for the next commit.
    needs_push: bool,
    /// By writer and device, the highest signed sequence number it has been seen to hold.
    held: Seen,
}

/// By writer and device, the highest signed sequence number a replica was seen to hold.
pub type Seen = HashMap<(WriterId, DeviceId), Seq>;

/// What `lacks` (what a pull or push found a replica lacking) says of a replica that was
/// seen holding `seen`: lacking a record at or below a number it held means it went back.
pub fn rolled_back(lacks: &[Lacking], seen: &Seen) -> Option<String> {
    let l = lacks.iter().find(|l| seen.get(&(l.writer, l.device)).is_some_and(|held| l.lowest <= *held))?;
    Some(format!(
        "rolled back: it lacks {} signed records of writer {} (device {}) from seq {}, though it held seq {} before",
        l.count,
        l.writer.short(),
        l.device.short(),
        l.lowest.0,
        seen[&(l.writer, l.device)].0
    ))
}

/// Bytes as a person reads them: `512 B`, `12.3 KiB`, `4.0 MiB`.
fn shown_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let (mut value, mut unit) = (n as f64 / 1024.0, 0);
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        (value, unit) = (value / 1024.0, unit + 1);
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn ago(t: Option<SystemTime>) -> String {
    t.and_then(|t| t.elapsed().ok()).map_or_else(|| "never".to_owned(), |d| format!("{} s ago", d.as_secs()))
}

impl ReplicaStatus {
    fn new(url: String) -> Self {
        Self {
            url,
            reachable: None,
            to_push: 0,
            holds_through: 0,
            to_push_bytes: 0,
            last_push: None,
            last_pull: None,
            pulled: 0,
            pulled_bytes: 0,
            error: None,
            alarm: None,
            heads: Vec::new(),
            needs_push: false,
            held: HashMap::new(),
        }
    }

    /// After a pull: `heads` are its heads, `at_heads` (writer, device, seq) of the signed
    /// ones held here, and `lacks` what it lacks of this capsule. A replica that lacks a
    /// record at or below a number it was seen to hold has gone back: an alarm, logged.
    /// Returns the watermarks when they moved (for the capsule to keep across mounts).
    pub fn pulled_from(
        &mut self,
        heads: &[RecordHash],
        at_heads: &[(WriterId, DeviceId, Seq)],
        lacks: &[Lacking],
    ) -> Option<Vec<(WriterId, DeviceId, Seq)>> {
        self.heads = heads.to_vec();
        self.needs_push |= !lacks.is_empty();
        if let Some(alarm) = rolled_back(lacks, &self.held) {
            self.raise(alarm);
        }
        let mut moved = false;
        for &(writer, device, seq) in at_heads {
            let held = self.held.entry((writer, device)).or_insert(Seq(0));
            moved |= seq > *held;
            *held = (*held).max(seq);
        }
        moved.then(|| self.watermarks())
    }

    /// The highest signed sequence number it was seen to hold, by writer and device: taken
    /// before a push, so that what the push finds lacking is judged against what was known
    /// when it looked (a pull may raise the marks while the push runs).
    pub fn seen(&self) -> Seen {
        self.held.clone()
    }

    /// By writer and device, the highest signed sequence number it was seen to hold.
    pub fn watermarks(&self) -> Vec<(WriterId, DeviceId, Seq)> {
        let mut marks: Vec<_> = self.held.iter().map(|(&(w, d), &seq)| (w, d, seq)).collect();
        marks.sort();
        marks
    }

    /// Starts from watermarks kept by an earlier mount.
    pub fn remember(&mut self, marks: &[(WriterId, DeviceId, Seq)]) {
        self.held.extend(marks.iter().map(|&(w, d, seq)| ((w, d), seq)));
    }

    /// Raises `alarm` (logged once, shown in `.capsule/status` until the mount ends).
    pub fn raise(&mut self, alarm: String) {
        if self.alarm.as_deref() != Some(&alarm) {
            tracing::error!("replica {}: {alarm}", self.url);
            self.alarm = Some(alarm);
        }
    }

    /// One line of `.capsule/status`.
    pub fn render(&self) -> String {
        let reachable = match self.reachable {
            None => "not tried yet",
            Some(true) => "reachable",
            Some(false) => "unreachable",
        };
        let error = self.error.as_ref().map(|e| format!(", error: {e}")).unwrap_or_default();
        let alarm = self.alarm.as_ref().map(|a| format!(", ALARM: {a}")).unwrap_or_default();
        let heads: Vec<String> = self.heads.iter().take(4).map(|h| h.short()).collect();
        let more = if self.heads.len() > 4 { format!(" and {} more", self.heads.len() - 4) } else { String::new() };
        format!(
            "replica: {} {reachable}, {} records to push ({}), last push {}, {} records pulled ({}), last pull {}, \
             heads [{}{more}]{error}{alarm}",
            self.url,
            self.to_push,
            shown_bytes(self.to_push_bytes),
            ago(self.last_push),
            self.pulled,
            shown_bytes(self.pulled_bytes),
            ago(self.last_pull),
            heads.join(",")
        )
    }
}

/// The statuses of a mount's replicas, shared by the threads that sync them; the condition
/// variable tells waiters (`wait_replicated`) that a push succeeded.
#[derive(Clone)]
pub struct SyncStatus(Arc<(Mutex<Vec<ReplicaStatus>>, Condvar)>);

impl SyncStatus {
    pub fn new(urls: impl IntoIterator<Item = String>) -> Self {
        Self(Arc::new((Mutex::new(urls.into_iter().map(ReplicaStatus::new).collect()), Condvar::new())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ReplicaStatus>> {
        self.0.0.lock().expect("no panics while locked")
    }

    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.lock().clone()
    }

    pub(super) fn update<T>(&self, i: usize, change: impl FnOnce(&mut ReplicaStatus) -> T) -> T {
        let answer = change(&mut self.lock()[i]);
        self.0.1.notify_all();
        answer
    }

    /// Whether a pull found replica `i` lacking records held here since the last call.
    pub(super) fn take_needs_push(&self, i: usize) -> bool {
        std::mem::take(&mut self.lock()[i].needs_push)
    }

    /// How many replicas hold every record this process had stored when it had stored `mark`
    /// (`Capsule::records_stored`).
    pub fn holding(&self, mark: u64) -> usize {
        holding(&self.lock(), mark)
    }

    /// Waits until `needed` replicas hold what was stored up to `mark`, at most `wait`;
    /// whether they do.
    pub fn wait_replicated(&self, mark: u64, needed: usize, wait: Duration) -> bool {
        let guard = self.lock();
        let (guard, _) = self
            .0
            .1
            .wait_timeout_while(guard, wait, |all| holding(all, mark) < needed)
            .expect("no panics while locked");
        holding(&guard, mark) >= needed
    }
}

/// How many of `all` hold every record stored up to `mark`.
fn holding(all: &[ReplicaStatus], mark: u64) -> usize {
    all.iter().filter(|s| s.holds_through >= mark).count()
}
