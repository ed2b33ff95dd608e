//! What every handler shares: the server's state (its registry of capsules, metrics, bounds
//! and news of arrivals), and the one way store work runs, off the async threads and bounded
//! in time.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::limits::{Gate, REQUEST_TIME};
use super::registry::Registry;
use super::replies::{Metrics, refusal};
use crate::capsule::{Capsule, StagedBatch};
use crate::record::CapsuleId;
use crate::{Error, Result};

pub struct Server {
    pub(super) registry: Registry,
    pub(super) metrics: Metrics,
    pub(super) gate: Gate,
    /// Set when records arrive, so the peers hear of them without waiting a whole round.
    pub(super) news: (std::sync::Mutex<bool>, std::sync::Condvar),
    /// Wakes the long polls of `heads` when records arrive.
    pub(super) arrivals: tokio::sync::Notify,
}

pub(super) type Shared = State<Arc<Server>>;

impl Server {
    pub(super) fn held(&self, id: CapsuleId) -> Result<Arc<Capsule>> {
        self.registry.capsule(id)?.ok_or_else(|| Error::NotFound(format!("capsule {id:?} on this server")))
    }

    /// Stores one batch that `Capsule::check_alone` passed in `capsule` through the gate, if
    /// its creator's quota has room for it, and tells whoever waits for news; how many records
    /// were new. The creator is charged for the new records only.
    pub(super) fn store_checked(&self, capsule: &Capsule, checked: StagedBatch) -> Result<usize> {
        let reserved = self.registry.reserve(capsule.id(), checked.bytes())?;
        let (stored, bytes) = capsule.put_checked(checked)?;
        reserved.keep(bytes);
        if stored > 0 {
            *self.news.0.lock().expect("no panics while locked") = true;
            self.news.1.notify_all();
            self.arrivals.notify_waiters();
            self.metrics.count(&self.metrics.bytes_stored, bytes);
        }
        self.metrics.count(&self.metrics.records_stored, stored as u64);
        Ok(stored)
    }
}

/// Runs `work` on a blocking thread, bounded in time, and answers with its result.
pub(super) async fn blocking(
    server: Arc<Server>,
    work: impl FnOnce(&Server) -> Result<Response> + Send + 'static,
) -> Response {
    server.metrics.count(&server.metrics.requests, 1);
    let shared = server.clone();
    let task = tokio::task::spawn_blocking(move || work(&shared));
    match tokio::time::timeout(REQUEST_TIME, task).await {
        Ok(Ok(Ok(response))) => response,
        Ok(Ok(Err(e))) => refusal(&server.metrics, &e),
        Ok(Err(e)) => {
            tracing::error!("a request's worker failed: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the request took too long\n").into_response(),
    }
}

pub(super) fn capsule_id(text: &str) -> Result<CapsuleId> {
    CapsuleId::from_hex(text).map_err(|e| Error::Invalid(format!("capsule id: {e}")))
}
