//! The replica protocol's routes (ARCHITECTURE.md lists them): each decodes its request,
//! runs its store work on a blocking thread (`blocking`) and answers in borsh; the router
//! puts every bound of `limits` in front of them (`bounds`).

use std::net::IpAddr;
use std::time::Duration;

use http_body_util::BodyExt;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path as UrlPath, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::limits::{MAX_BODY, Paced, PeerAddr, Room};
use super::names::{get_name, put_name};
use super::replies::{borsh_body, busy, decode, refusal};
use super::shared::{Server, Shared, blocking, capsule_id};
use super::streams::put_record_stream;
use crate::proof::fork::ForkEvidence;
use crate::record::codec;
use crate::record::{RecordHash, SubIdx};
use crate::replica::{Replica, sketch};
use crate::wire::Announced;
use crate::wire::protocol::{self, WalkRequest};
use crate::wire::{Bundle, MAX_HASHES};
use crate::{Error, Result};

async fn get_metadata(State(s): Shared, UrlPath(id): UrlPath<String>) -> Response {
    blocking(s, move |s| {
        let capsule = s.held(capsule_id(&id)?)?;
        Ok(capsule.metadata_bytes().into_response())
    })
    .await
}

async fn put_metadata(State(s): Shared, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| {
        s.registry.adopt(capsule_id(&id)?, &body)?;
        Ok(StatusCode::OK.into_response())
    })
    .await
}

/// The routes `bounds` treats apart: a record stream is read as it comes, and a heads request
/// that waits takes a long poll's place instead of a turn.
const HEADS: &str = "/v1/capsules/{id}/heads";
const RECORD_STREAM: &str = "/v1/capsules/{id}/record-stream";

/// Marks a heads request that holds a long poll's place and may wait.
#[derive(Clone, Copy)]
struct Polling;

#[derive(serde::Deserialize)]
struct HeadsQuery {
    known: Option<String>,
    wait: Option<u64>,
}

/// The heads, at once, or (a long poll) once they no longer have the digest `known`, or
/// after `wait` seconds. A poll past `MAX_LONG_POLLS` (or `MAX_LONG_POLLS_PER_ADDR` from its
/// address) is answered at once (`bounds` gave it no `Polling` place): the client polls again
/// later, and nobody's heads wait.
async fn heads(
    State(s): Shared,
    polling: Option<axum::Extension<Polling>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<HeadsQuery>,
) -> Response {
    let wait = if polling.is_some() { q.wait.unwrap_or(0).min(protocol::MAX_WAIT) } else { 0 };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        // Registered before the heads are read, so an arrival in between still wakes it.
        let arrival = s.arrivals.notified();
        // Answered here when the heads are in memory: a hand-off to a blocking thread and
        // back was most of what a heads request cost.
        let at_hand = capsule_id(&id).ok().and_then(|id| s.registry.open_now(id)).and_then(|c| c.announced_at_hand());
        let Announced { heads: current, forks } = match at_hand {
            Some(announced) => announced,
            None => {
                let (server, id) = (s.clone(), id.clone());
                let read = move || Replica::announce(&*server.held(capsule_id(&id)?)?);
                match tokio::task::spawn_blocking(read).await {
                    Ok(Ok(announced)) => announced,
                    Ok(Err(e)) => return refusal(&s.metrics, &e),
                    Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        };
        let unchanged = q.known.as_deref() == Some(protocol::heads_digest(&current).as_str());
        if !unchanged || tokio::time::timeout_at(deadline, arrival).await.is_err() {
            s.metrics.count(&s.metrics.requests, 1);
            let forks = forks.unwrap_or_default().to_string();
            return ([(protocol::FORKS_HEADER, forks)], codec::encode(&current)).into_response();
        }
    }
}

fn hashes(body: &[u8]) -> Result<Vec<RecordHash>> {
    let list: Vec<RecordHash> = decode(body)?;
    if list.len() > MAX_HASHES {
        return Err(Error::Invalid(format!("{} hashes in one request; at most {MAX_HASHES}", list.len())));
    }
    Ok(list)
}

async fn missing(State(s): Shared, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| Ok(borsh_body(&s.held(capsule_id(&id)?)?.missing(&hashes(&body)?)?))).await
}

async fn walk(State(s): Shared, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| {
        let request: WalkRequest = decode(&body)?;
        if request.from.len() > MAX_HASHES {
            return Err(Error::Invalid(format!("a walk from {} records; at most {MAX_HASHES}", request.from.len())));
        }
        Ok(borsh_body(&s.held(capsule_id(&id)?)?.walk(&request.from, request.budget as usize)?))
    })
    .await
}

async fn fetch(State(s): Shared, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| Ok(borsh_body(&s.held(capsule_id(&id)?)?.fetch(&hashes(&body)?)?))).await
}

#[derive(serde::Deserialize)]
struct SinceQuery {
    headers: Option<u8>,
}

async fn since(State(s): Shared, UrlPath(id): UrlPath<String>, Query(q): Query<SinceQuery>, body: Bytes) -> Response {
    let headers_only = q.headers == Some(1);
    blocking(s, move |s| Ok(borsh_body(&s.held(capsule_id(&id)?)?.since(&hashes(&body)?, headers_only)?))).await
}

async fn put_records(State(s): Shared, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| {
        let capsule = s.held(capsule_id(&id)?)?;
        let bundles: Vec<Bundle> = decode(&body)?;
        // Refused before any payload is staged when it could not fit.
        drop(s.registry.reserve(capsule.id(), bundles.iter().map(|b| b.size() as u64).sum())?);
        let stored = s.store_checked(&capsule, capsule.check_alone(bundles)?)?;
        Ok(borsh_body(&(stored as u64)))
    })
    .await
}

async fn get_evidence(State(s): Shared, UrlPath(id): UrlPath<String>) -> Response {
    blocking(s, move |s| Ok(borsh_body(&s.held(capsule_id(&id)?)?.evidence()?))).await
}

async fn put_evidence(State(s): Shared, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| {
        let evidence: Vec<ForkEvidence> = decode(&body)?;
        s.held(capsule_id(&id)?)?.put_evidence(&evidence)?;
        Ok(borsh_body(&()))
    })
    .await
}

async fn sub_record(State(s): Shared, UrlPath((id, record, idx)): UrlPath<(String, String, u32)>) -> Response {
    blocking(s, move |s| {
        let record = RecordHash::from_hex(&record).map_err(|e| Error::Invalid(format!("record: {e}")))?;
        match s.held(capsule_id(&id)?)?.sub_record(record, SubIdx(idx))? {
            Some(bytes) => Ok(bytes.into_response()),
            None => Err(Error::NotFound(format!("sub-record {idx} of {record:?}"))),
        }
    })
    .await
}

#[derive(serde::Deserialize)]
struct RunQuery {
    count: u32,
}

async fn sub_record_run(
    State(s): Shared,
    UrlPath((id, record, idx)): UrlPath<(String, String, u32)>,
    Query(q): Query<RunQuery>,
) -> Response {
    blocking(s, move |s| {
        let record = RecordHash::from_hex(&record).map_err(|e| Error::Invalid(format!("record: {e}")))?;
        let held = s.held(capsule_id(&id)?)?;
        let (mut run, mut bytes) = (Vec::new(), 0);
        for i in (idx..).take(q.count.min(protocol::MAX_RUN) as usize) {
            match held.sub_record(record, SubIdx(i))? {
                Some(sub) if run.is_empty() || bytes + sub.len() <= protocol::MAX_RUN_BYTES => {
                    bytes += sub.len();
                    run.push(sub);
                }
                _ => break,
            }
        }
        Ok(borsh_body(&run))
    })
    .await
}

async fn heads_sketch(State(s): Shared, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| {
        let request: sketch::Request = decode(&body)?;
        if request.cells.len() > sketch::MAX_CELLS {
            return Err(Error::Invalid(format!("a sketch of more than {} cells", sketch::MAX_CELLS)));
        }
        Ok(borsh_body(&s.held(capsule_id(&id)?)?.heads_difference(&request.salt, &request.cells)?))
    })
    .await
}

#[derive(serde::Deserialize)]
struct BloomQuery {
    salt: String,
    bits: u8,
}

async fn bloom(State(s): Shared, UrlPath(id): UrlPath<String>, Query(q): Query<BloomQuery>) -> Response {
    blocking(s, move |s| {
        let salt: [u8; 16] = hex::decode(&q.salt)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::Invalid("bloom: the salt is 16 bytes in hex".into()))?;
        Ok(borsh_body(&s.held(capsule_id(&id)?)?.bloom(salt, q.bits)?))
    })
    .await
}

async fn capsules(State(s): Shared) -> Response {
    // Listed from the folders: no store is opened.
    borsh_body(&s.registry.ids())
}

async fn metrics(State(s): Shared) -> Response {
    let mut text = format!(
        "# TYPE capsulefs_capsules_held gauge\ncapsulefs_capsules_held {}\n\
         # TYPE capsulefs_capsules_open gauge\ncapsulefs_capsules_open {}\n",
        s.registry.ids().len(),
        s.registry.open_count()
    );
    text.push_str(&s.metrics.text());
    text.push_str(
        "# TYPE capsulefs_creator_capsules gauge\n# TYPE capsulefs_creator_bytes gauge\n\
         # TYPE capsulefs_creator_names gauge\n",
    );
    for (creator, used) in s.registry.usage_by_creator() {
        let c = creator.to_hex();
        text.push_str(&format!(
            "capsulefs_creator_capsules{{creator=\"{c}\"}} {}\ncapsulefs_creator_bytes{{creator=\"{c}\"}} {}\n\
             capsulefs_creator_names{{creator=\"{c}\"}} {}\n",
            used.capsules, used.bytes, used.names
        ));
    }
    text.into_response()
}

/// What every request passes before its route: a body declared over `MAX_BODY` is refused
/// before any of it is read; a body that is not a record stream must say its length, and is
/// received whole (`receive`) before the request takes one of the turns in flight, so that a
/// slow sender holds its connection and what it sent, never a turn. A long poll takes no turn
/// (it has places of its own); a record stream takes a stream's turn in its route, its body
/// held to the minimum rate.
async fn bounds(
    State(s): Shared,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        s.metrics.reject("too_large");
        return (StatusCode::PAYLOAD_TOO_LARGE, format!("bodies are at most {MAX_BODY} bytes\n")).into_response();
    }
    // Told apart by the route matched, never by what the path looks like.
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str());
    let stream = request.method() == Method::POST && route == Some(RECORD_STREAM);
    let wants_poll = request.method() == Method::GET
        && route == Some(HEADS)
        && Query::<HeadsQuery>::try_from_uri(request.uri()).is_ok_and(|q| q.wait.unwrap_or(0) > 0);
    if request.method() == Method::POST && !stream && declared.is_none() {
        s.metrics.reject("no_length");
        return (StatusCode::LENGTH_REQUIRED, "say the body's length (Content-Length)\n").into_response();
    }
    let (mut parts, body) = request.into_parts();
    if stream {
        return next.run(axum::extract::Request::from_parts(parts, Body::new(Paced::new(body, false)))).await;
    }
    let (body, _room) = match receive(&s, peer.ip(), body).await {
        Ok(received) => received,
        Err(response) => return response,
    };
    // A long poll waits in a place of its own, outside the turns; one that finds none is
    // answered at once, on a turn like any request.
    let poll = wants_poll.then(|| s.gate.long_poll(peer.ip())).flatten();
    let _turn = match poll {
        Some(place) => {
            parts.extensions.insert(Polling);
            place
        }
        None => match s.gate.turn(peer.ip()).await {
            Ok(turn) => turn,
            Err(why) => return busy(&s.metrics, why),
        },
    };
    next.run(axum::extract::Request::from_parts(parts, Body::from(body))).await
}

/// A request's whole body, held to `BODY_DEADLINE` and `MIN_BODY_RATE` (`Paced`), each piece
/// taking room from `peer`'s share of `MAX_BUFFERED` as it comes; the room is held until the
/// request is answered.
async fn receive(s: &Server, peer: IpAddr, body: Body) -> std::result::Result<(Bytes, Room), Response> {
    let mut paced = Paced::new(body, true);
    let (mut received, mut room) = (Vec::new(), Room::default());
    while let Some(frame) = paced.frame().await {
        let frame = frame.map_err(|e| {
            s.metrics.reject("slow_body");
            (StatusCode::REQUEST_TIMEOUT, format!("{e}\n")).into_response()
        })?;
        let Ok(data) = frame.into_data() else { continue };
        if received.len() + data.len() > MAX_BODY {
            s.metrics.reject("too_large");
            return Err(
                (StatusCode::PAYLOAD_TOO_LARGE, format!("bodies are at most {MAX_BODY} bytes\n")).into_response()
            );
        }
        room.grow(s.gate.room(peer, data.len()).await.map_err(|why| busy(&s.metrics, why))?);
        received.extend_from_slice(&data);
    }
    Ok((Bytes::from(received), room))
}

pub fn router(server: std::sync::Arc<Server>) -> Router {
    Router::new()
        .route(protocol::CAPSULES, get(capsules))
        .route("/v1/names/{name}", get(get_name).post(put_name))
        .route("/v1/capsules/{id}/metadata", get(get_metadata).post(put_metadata))
        .route(HEADS, get(heads))
        .route("/v1/capsules/{id}/missing", post(missing))
        .route("/v1/capsules/{id}/walk", post(walk))
        .route("/v1/capsules/{id}/fetch", post(fetch))
        .route("/v1/capsules/{id}/since", post(since))
        .route("/v1/capsules/{id}/records", post(put_records))
        .route(RECORD_STREAM, post(put_record_stream))
        .route("/v1/capsules/{id}/records/{record}/{idx}", get(sub_record))
        .route("/v1/capsules/{id}/records/{record}/{idx}/run", get(sub_record_run))
        .route("/v1/capsules/{id}/bloom", get(bloom))
        .route("/v1/capsules/{id}/evidence", get(get_evidence).post(put_evidence))
        .route("/v1/capsules/{id}/heads-sketch", post(heads_sketch))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .route_layer(axum::middleware::from_fn_with_state(server.clone(), bounds))
        .with_state(server)
}
