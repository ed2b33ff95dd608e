//! What a mount knows of each replica it syncs with, written by the background push and pull
//! threads and read by `.capsule/status`.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// One replica, as this mount last saw it.
#[derive(Clone, Debug)]
pub struct ReplicaStatus {
    pub url: String,
    /// None until the first attempt.
    pub reachable: Option<bool>,
    /// Local records the replica lacks, as of the last look.
    pub to_push: usize,
    pub last_push: Option<SystemTime>,
    pub last_pull: Option<SystemTime>,
    /// Records pulled from it since the mount started.
    pub pulled: u64,
    /// The last failure, while it lasts.
    pub error: Option<String>,
}

fn ago(t: Option<SystemTime>) -> String {
    t.and_then(|t| t.elapsed().ok()).map_or_else(|| "never".to_owned(), |d| format!("{} s ago", d.as_secs()))
}

impl ReplicaStatus {
    fn new(url: String) -> Self {
        Self { url, reachable: None, to_push: 0, last_push: None, last_pull: None, pulled: 0, error: None }
    }

    /// One line of `.capsule/status`.
    pub fn render(&self) -> String {
        let reachable = match self.reachable {
            None => "not tried yet",
            Some(true) => "reachable",
            Some(false) => "unreachable",
        };
        let error = self.error.as_ref().map(|e| format!(", error: {e}")).unwrap_or_default();
        format!(
            "replica: {} {reachable}, {} records to push, last push {}, {} records pulled, last pull {}{error}",
            self.url,
            self.to_push,
            ago(self.last_push),
            self.pulled,
            ago(self.last_pull)
        )
    }
}

/// The statuses of a mount's replicas, shared by the threads that sync them.
#[derive(Clone)]
pub struct SyncStatus(Arc<Mutex<Vec<ReplicaStatus>>>);

impl SyncStatus {
    pub fn new(urls: impl IntoIterator<Item = String>) -> Self {
        Self(Arc::new(Mutex::new(urls.into_iter().map(ReplicaStatus::new).collect())))
    }

    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.0.lock().expect("no panics while locked").clone()
    }

    pub(super) fn update(&self, i: usize, change: impl FnOnce(&mut ReplicaStatus)) {
        change(&mut self.0.lock().expect("no panics while locked")[i]);
    }
}
