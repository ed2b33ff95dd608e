//! How the server answers: bodies in borsh, refusals as a status and one line saying what was
//! wrong (with the reason's word in `x-capsulefs-refusal` when records are refused as
//! unverified), and the counters `/metrics` shows.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use borsh::BorshSerialize;

use super::limits::Busy;
use crate::record::codec;
use crate::wire::protocol;
use crate::{Error, Result, VerifyError};

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub records_stored: AtomicU64,
    pub bytes_stored: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn count(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn reject(&self, reason: &'static str) {
        *self.rejected.lock().expect("no panics while locked").entry(reason).or_default() += 1;
    }

    /// The counters as Prometheus text.
    pub fn text(&self) -> String {
        let mut text = format!(
            "# TYPE capsulefs_requests_total counter\ncapsulefs_requests_total {}\n\
             # TYPE capsulefs_records_stored_total counter\ncapsulefs_records_stored_total {}\n\
             # TYPE capsulefs_bytes_stored_total counter\ncapsulefs_bytes_stored_total {}\n\
             # TYPE capsulefs_rejected_total counter\n",
            self.requests.load(Ordering::Relaxed),
            self.records_stored.load(Ordering::Relaxed),
            self.bytes_stored.load(Ordering::Relaxed),
        );
        for (reason, count) in self.rejected.lock().expect("no panics while locked").iter() {
            text.push_str(&format!("capsulefs_rejected_total{{reason=\"{reason}\"}} {count}\n"));
        }
        text
    }
}

/// Why input was refused, as `/metrics` counts it.
pub fn reason(e: &Error) -> &'static str {
    match e {
        Error::Verify(v) => match v {
            VerifyError::Undecodable(_) | VerifyError::Malformed { .. } | VerifyError::MalformedSubRecord { .. } => {
                "malformed"
            }
            VerifyError::BadSignature { .. } => "bad_signature",
            VerifyError::UnauthorizedWriter { .. } => "unauthorized_writer",
            VerifyError::Revoked { .. } => "revoked_writer",
            VerifyError::WrongCapsule { .. } => "wrong_capsule",
            VerifyError::UnknownParent { .. } => "unknown_parent",
            VerifyError::Unanchored { .. } => "unsigned_without_signed_descendant",
            VerifyError::PayloadMismatch { .. } => "payload_mismatch",
            VerifyError::Equivocation(_) => "equivocation",
            VerifyError::Metadata(_) => "bad_metadata",
            _ => "unverified",
        },
        Error::NotFound(_) => "unknown_capsule",
        Error::Forbidden(_) => "creator_not_allowed",
        Error::OverQuota(_) => "over_quota",
        Error::Invalid(_) => "invalid",
        _ => "other",
    }
}

/// An error as the peer sees it: a status and one line saying what was wrong.
pub fn refusal(metrics: &Metrics, e: &Error) -> Response {
    let status = match e {
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Verify(_) | Error::Invalid(_) => StatusCode::BAD_REQUEST,
        Error::Exists(_) => StatusCode::CONFLICT,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::OverQuota(_) => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!("store failure: {e}");
    } else if status == StatusCode::NOT_FOUND {
        tracing::debug!("not held: {e}"); // asking is how a client learns what to send
    } else {
        metrics.reject(reason(e));
        tracing::info!("refused: {e}");
    }
    let mut response = (status, format!("{e}\n")).into_response();
    if let Error::Verify(_) = e
        && let Ok(value) = axum::http::HeaderValue::from_str(reason(e))
    {
        response.headers_mut().insert(protocol::REFUSAL_HEADER, value);
    }
    response
}

/// A request turned away because the server is full: 429 when its address holds its share,
/// 503 when everyone's is taken, with the reason and a pause to wait (`Retry-After`), counted.
pub fn busy(metrics: &Metrics, why: Busy) -> Response {
    metrics.reject(why.reason());
    let status = match why {
        Busy::PeerInFlight | Busy::PeerBuffered | Busy::PeerStreams => StatusCode::TOO_MANY_REQUESTS,
        Busy::InFlight | Busy::Buffered | Busy::Streams => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, [(axum::http::header::RETRY_AFTER, "1")], format!("{}\n", why.message())).into_response()
}

pub fn borsh_body<T: BorshSerialize>(value: &T) -> Response {
    codec::encode(value).into_response()
}

pub fn decode<T: borsh::BorshDeserialize>(body: &[u8]) -> Result<T> {
    borsh::from_slice(body).map_err(|e| {
        VerifyError::Undecodable(crate::record::DecodeError::Malformed(format!("request body: {e}"))).into()
    })
}
