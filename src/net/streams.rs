//! A push's batches in one request (`Route::RecordStream`): frames are decoded as they
//! arrive, each batch's records are checked on their own (`Capsule::check_alone`) on a
//! blocking thread while the batch before goes through the gate on another
//! (`Capsule::put_checked`), so the transfer, the checks and the disk overlap. One batch at
//! most waits between them. The bytes of a stream take room in the server's byte budget as
//! they arrive and hold it until the batch they make is stored; a stream holds one of
//! `MAX_STREAMS` turns (`MAX_STREAMS_PER_ADDR` by address), and its body is held to
//! `MIN_BODY_RATE`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::wire::frames;
use std::net::IpAddr;

use super::limits::{Busy, DRAIN, PeerAddr, REQUEST_TIME, Room};
use super::replies::{borsh_body, busy, refusal};
use super::shared::{Server, Shared, capsule_id};
use crate::capsule::{Capsule, StagedBatch};
use crate::{Error, Result};

/// A batch of a record stream being checked (`Capsule::check_alone`), with the room it holds.
type Checking = tokio::task::JoinHandle<Result<(StagedBatch, Room)>>;

pub async fn put_record_stream(
    State(s): Shared,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
    UrlPath(id): UrlPath<String>,
    body: Body,
) -> Response {
    s.metrics.count(&s.metrics.requests, 1);
    let _turn = match s.gate.stream(peer.ip()).await {
        Ok(turn) => turn,
        Err(why) => return busy(&s.metrics, why),
    };
    let (server, hex) = (s.clone(), id.clone());
    let capsule = match tokio::task::spawn_blocking(move || server.held(capsule_id(&hex)?)).await {
        Ok(Ok(capsule)) => capsule,
        Ok(Err(e)) => return refusal(&s.metrics, &e),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let (batches, mut incoming) = tokio::sync::mpsc::channel::<Checking>(1);
    let (server, held, runtime) = (s.clone(), capsule.clone(), tokio::runtime::Handle::current());
    let storing = tokio::task::spawn_blocking(move || {
        let mut stored = 0;
        while let Some(checking) = incoming.blocking_recv() {
            let (checked, _room) =
                runtime.block_on(checking).map_err(|e| Error::Invalid(format!("checking a batch: {e}")))??;
            stored += server.store_checked(&held, checked)?;
        }
        Ok::<_, Error>(stored)
    });
    let read = read_frames(&s, peer.ip(), body, &capsule, &batches).await;
    drop(batches);
    match (storing.await, read) {
        // A refused batch explains the end of the stream better than the stream does.
        (Ok(Err(e)), _) | (Ok(Ok(_)), Err(Cut::Refused(e))) => refusal(&s.metrics, &e),
        (Ok(Ok(_)), Err(Cut::Busy(why))) => busy(&s.metrics, why),
        (Ok(Ok(stored)), Ok(())) => borsh_body(&(stored as u64)),
        (Err(_), _) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Why a record stream was read no further.
enum Cut {
    Refused(Error),
    /// No room for its bytes.
    Busy(Busy),
}

impl From<Error> for Cut {
    fn from(e: Error) -> Self {
        Cut::Refused(e)
    }
}

/// Reads `body` as frames (`frames::FrameDecoder`: each piece is copied once, into the record
/// or payload it belongs to), each piece taking room from `peer`'s share as it comes; starts
/// each batch's checks and hands them, with the room taken so far, to `batches`; ends at
/// the end of the body, or when `batches` is closed (its taker refused a batch), or on a body
/// cut inside a frame, an oversized or undecodable frame, or `REQUEST_TIME` without a piece.
/// After a refusal the rest is read and dropped, up to `DRAIN` bytes, so that a client still
/// sending gets the answer that says why.
async fn read_frames(
    s: &Arc<Server>,
    peer: IpAddr,
    mut body: Body,
    capsule: &Arc<Capsule>,
    batches: &tokio::sync::mpsc::Sender<Checking>,
) -> std::result::Result<(), Cut> {
    let mut decoder = frames::FrameDecoder::default();
    let mut next_piece = async || -> Result<Option<Bytes>> {
        loop {
            let piece = tokio::time::timeout(REQUEST_TIME, body.frame())
                .await
                .map_err(|_| Error::Invalid(format!("no part of the record stream came for {REQUEST_TIME:?}")))?;
            let Some(piece) = piece else { return Ok(None) };
            let piece = piece.map_err(|e| Error::Invalid(format!("reading the record stream: {e}")))?;
            if let Ok(data) = piece.into_data() {
                return Ok(Some(data));
            }
        }
    };
    let mut room = Room::default();
    while let Some(data) = next_piece().await? {
        room.grow(s.gate.room(peer, data.len()).await.map_err(Cut::Busy)?);
        for batch in decoder.take(&data).map_err(|e| Error::Invalid(format!("record stream: {e}")))? {
            let capsule = capsule.clone();
            let room = std::mem::take(&mut room);
            let checking = tokio::task::spawn_blocking(move || Ok((capsule.check_alone(batch)?, room)));
            if batches.send(checking).await.is_err() {
                let mut dropped = 0;
                while dropped < DRAIN
                    && let Ok(Some(data)) = next_piece().await
                {
                    dropped += data.len();
                }
                return Ok(());
            }
        }
    }
    if !decoder.at_boundary() {
        return Err(Error::Invalid("the record stream ended inside a frame".into()).into());
    }
    Ok(())
}
