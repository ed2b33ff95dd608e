//! `capsulefs serve`: any number of capsule replicas, each a RocksDB store under
//! `<store>/capsules/<id>/`, over HTTP (axum) with borsh bodies.
//!
//! Everything a peer sends is checked before it is stored (`Replica::put` on the local
//! capsule: encoding, payloads against the Merkle root, capsule, writer rights, signatures,
//! parents, and an unsigned record only with a signed descendant in the same batch), so
//! nobody without an authorized writer's key can make the server store anything. Bounded:
//! request bodies (`MAX_BODY`), requests in flight (`MAX_IN_FLIGHT`, `MAX_PER_PEER` from one
//! address), connections (`MAX_CONNECTIONS`, each closed after `IDLE` without traffic), time
//! per request (`REQUEST_TIME`; a record stream's, per piece), record streams at once
//! (`MAX_STREAMS`), hashes per question (`MAX_HASHES`). Store work runs on blocking threads.
//! SIGTERM or SIGINT stop it gracefully: no new requests, those in flight finish.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use borsh::BorshSerialize;
use http_body_util::BodyExt;

use super::frames;
use super::limits::{Bounded, PeerAddr, PerPeer};
use super::protocol::{self, WalkRequest};
use super::tls;
use crate::capsule::{Capsule, Incoming};
use crate::crypto::sign::TrustKey;
use crate::member::name::{NameBinding, check_name};
use crate::proof::fork::ForkEvidence;
use crate::record::codec;
use crate::record::{CapsuleId, RecordHash, SubIdx};
use crate::replica::remote::Remote;
use crate::replica::{Announced, Bundle, MAX_BATCH_BYTES, MAX_HASHES, Replica, sketch, transfer};
use crate::store::rocks::RocksKv;
use crate::{Error, Result, VerifyError};

/// Largest request body: a batch of `MAX_BATCH_BYTES` plus one large record past it.
const MAX_BODY: usize = MAX_BATCH_BYTES * 2 + (1 << 20);
const MAX_IN_FLIGHT: usize = 64;
/// Requests in flight from one address: a quarter of the workers.
const MAX_PER_PEER: usize = 16;
/// Connections open at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;
/// A connection that moves no byte for this long is closed (above `protocol::MAX_WAIT`, so a
/// long poll is never cut).
pub const IDLE: Duration = Duration::from_secs(90);
const REQUEST_TIME: Duration = Duration::from_secs(120);
/// Bytes of a record stream read and dropped after one of its batches was refused.
const DRAIN: usize = protocol::MAX_FRAME * 2;
/// Record streams stored at once (each holds at most three frames of `protocol::MAX_FRAME`).
const MAX_STREAMS: usize = 4;

pub struct Config {
    pub listen: SocketAddr,
    pub store: PathBuf,
    /// Other servers (http://HOST:PORT) this one reconciles every capsule it holds with.
    pub peers: Vec<String>,
    /// A PEM certificate chain and its key: serve https instead of http.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How long a connection may move no byte before it is closed (`IDLE`).
    pub idle: Duration,
}

/// How often a server reconciles with its peers when nothing new arrived.
const PEER_ROUND: Duration = Duration::from_secs(2);

/// Counters for `/metrics`.
#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    records_stored: AtomicU64,
    bytes_stored: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

struct Server {
    dir: PathBuf,
    /// Authenticates what the capsules keep of their proofs and membership frontiers
    /// (`<store>/keys/local-trust.secret`), so a restart does not prove everything again.
    trust: TrustKey,
    capsules: Mutex<HashMap<CapsuleId, Arc<Capsule>>>,
    metrics: Metrics,
    /// Set when records arrive, so the peers hear of them without waiting a whole round.
    news: (Mutex<bool>, std::sync::Condvar),
    /// Wakes the long polls of `heads` when records arrive.
    arrivals: tokio::sync::Notify,
    per_peer: Arc<PerPeer>,
    /// Turns for record streams (`MAX_STREAMS` at once).
    streams: tokio::sync::Semaphore,
}

/// Why input was refused, as `/metrics` counts it.
fn reason(e: &Error) -> &'static str {
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
        Error::Invalid(_) => "invalid",
        _ => "other",
    }
}

/// An error as the peer sees it: a status and one line saying what was wrong.
fn refusal(server: &Server, e: &Error) -> Response {
    let status = match e {
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Verify(_) | Error::Invalid(_) => StatusCode::BAD_REQUEST,
        Error::Exists(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!("store failure: {e}");
    } else if status == StatusCode::NOT_FOUND {
        tracing::debug!("not held: {e}"); // asking is how a client learns what to send
    } else {
        *server.metrics.rejected.lock().expect("no panics while locked").entry(reason(e)).or_default() += 1;
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

fn borsh_body<T: BorshSerialize>(value: &T) -> Response {
    codec::encode(value).into_response()
}

fn decode<T: borsh::BorshDeserialize>(body: &[u8]) -> Result<T> {
    borsh::from_slice(body).map_err(|e| {
        VerifyError::Undecodable(crate::record::DecodeError::Malformed(format!("request body: {e}"))).into()
    })
}

impl Server {
    fn open_store(&self, path: &Path) -> Result<Capsule> {
        Ok(Capsule::open(Arc::new(RocksKv::open(path, false)?), Vec::new())?.with_trust_key(self.trust.clone()))
    }

    fn store_path(&self, id: &CapsuleId) -> PathBuf {
        self.dir.join("capsules").join(id.to_hex()).join("store")
    }

    /// The binding of `name` this server took first, as stored.
    fn name(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_name(name)?;
        let path = self.dir.join("names").join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Takes `binding` if its name is free here, or already bound to the same capsule by the
    /// same creator; any other binding of a name taken is refused (trust on first use). The
    /// file appears whole or not at all: written aside, then linked in place, which fails if
    /// another request linked first.
    fn bind(&self, binding: &NameBinding, bytes: &[u8]) -> Result<()> {
        let wanted = binding.check()?;
        let dir = self.dir.join("names");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(&binding.name);
        let taken = |held: Vec<u8>| -> Result<()> {
            let held: NameBinding = decode(&held)?;
            if held.check()? == wanted {
                return Ok(());
            }
            Err(Error::Exists(format!(
                "the name '{}' is bound to another capsule or creator on this server; a name is bound once",
                binding.name
            )))
        };
        if let Some(held) = self.name(&binding.name)? {
            return taken(held);
        }
        let aside = dir.join(format!(".{}.{}", binding.name, hex::encode(crate::crypto::random_bytes::<8>())));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&aside)?;
            std::io::Write::write_all(&mut f, bytes)?;
            f.sync_all()
        };
        write().map_err(|e| Error::io(&aside, e))?;
        let linked = std::fs::hard_link(&aside, &path);
        let _ = std::fs::remove_file(&aside);
        match linked {
            Ok(()) => {
                std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(&dir, e))?;
                tracing::info!("bound the name '{}' to {:?}", binding.name, wanted.0);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                taken(std::fs::read(&path).map_err(|e| Error::io(&path, e))?)
            }
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// The replica of `id`, opened on first use; None if this server does not hold it.
    fn capsule(&self, id: CapsuleId) -> Result<Option<Arc<Capsule>>> {
        let mut open = self.capsules.lock().expect("no panics while locked");
        if let Some(c) = open.get(&id) {
            return Ok(Some(c.clone()));
        }
        let path = self.store_path(&id);
        if !path.exists() {
            return Ok(None);
        }
        let capsule = Arc::new(self.open_store(&path)?);
        if capsule.id() != id {
            return Err(crate::StoreError::Corrupted(format!("{} holds {:?}", path.display(), capsule.id())).into());
        }
        open.insert(id, capsule.clone());
        Ok(Some(capsule))
    }

    /// `id`'s capsule if it is open and the map free now, without waiting (async handlers).
    fn open_now(&self, id: CapsuleId) -> Option<Arc<Capsule>> {
        self.capsules.try_lock().ok()?.get(&id).cloned()
    }

    /// Stores one batch of `bytes` that `Capsule::check_alone` passed in `capsule` (after the
    /// checks that need the store), and tells whoever waits for news; how many records were
    /// new.
    fn store_checked(&self, capsule: &Capsule, checked: Vec<Incoming>, bytes: u64) -> Result<usize> {
        let stored = capsule.put_checked(checked)?;
        if stored > 0 {
            *self.news.0.lock().expect("no panics while locked") = true;
            self.news.1.notify_all();
            self.arrivals.notify_waiters();
        }
        self.metrics.records_stored.fetch_add(stored as u64, Ordering::Relaxed);
        self.metrics.bytes_stored.fetch_add(bytes, Ordering::Relaxed);
        Ok(stored)
    }

    /// Every capsule this server holds, opened.
    fn all_held(&self) -> Result<Vec<Arc<Capsule>>> {
        let dir = self.dir.join("capsules");
        let mut held = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let name = entry.map_err(|e| Error::io(&dir, e))?.file_name();
            if let Some(id) = name.to_str().and_then(|n| CapsuleId::from_hex(n).ok())
                && let Some(capsule) = self.capsule(id)?
            {
                held.push(capsule);
            }
        }
        Ok(held)
    }

    /// One anti-entropy round with every peer, for every capsule held here: pull what the
    /// peer has (checked like any replica's records), then push what it lacks. A peer that
    /// does not hold a capsule yet gets it whole.
    fn reconcile(&self, peers: &[String]) {
        let held = match self.all_held() {
            Ok(held) => held,
            Err(e) => return tracing::error!("listing the capsules held here: {e}"),
        };
        for capsule in held {
            for peer in peers {
                let round = Remote::new(peer, capsule.id()).and_then(|remote| {
                    if remote.metadata()?.is_some() {
                        transfer::pull(&capsule, &remote, &())?;
                    }
                    transfer::push(&capsule, &remote, &())
                });
                match round {
                    Ok(r) if r.records > 0 => {
                        tracing::info!("sent {} records of {:?} to {peer}", r.records, capsule.id())
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("anti-entropy with {peer} for {:?}: {e} (retried next round)", capsule.id())
                    }
                }
            }
        }
    }

    /// Reconciles with `peers` every `PEER_ROUND`, and soon after new records arrive, until
    /// `stop` is set.
    fn peer_loop(&self, peers: &[String], stop: &std::sync::atomic::AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            self.reconcile(peers);
            let (news, arrived) = &self.news;
            let mut waiting = news.lock().expect("no panics while locked");
            if !*waiting {
                waiting = arrived.wait_timeout(waiting, PEER_ROUND).expect("no panics while locked").0;
            }
            *waiting = false;
        }
    }

    fn held(&self, id: CapsuleId) -> Result<Arc<Capsule>> {
        self.capsule(id)?.ok_or_else(|| Error::NotFound(format!("capsule {id:?} on this server")))
    }

    /// Starts holding `id` from its signed metadata, checked first; the same metadata again
    /// is a no-op.
    fn adopt(&self, id: CapsuleId, metadata: &[u8]) -> Result<()> {
        if let Some(held) = self.capsule(id)? {
            return held.put_metadata(metadata);
        }
        let mut open = self.capsules.lock().expect("no panics while locked");
        if let Some(held) = open.get(&id) {
            // Another request adopted it between the look above and this lock.
            return held.put_metadata(metadata);
        }
        let path = self.store_path(&id);
        let parent = path.parent().expect("a store path has a parent");
        let staging = parent.with_extension("new");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        let made = RocksKv::open(&staging.join("store"), true)
            .and_then(|kv| Capsule::adopt(Arc::new(kv), id, metadata, Vec::new()));
        match made {
            Ok(capsule) => drop(capsule),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        }
        std::fs::rename(&staging, parent).map_err(|e| Error::io(parent, e))?;
        let capsule = Arc::new(self.open_store(&path)?);
        open.insert(id, capsule);
        tracing::info!("now holding capsule {id:?}");
        Ok(())
    }
}

type Shared = State<Arc<Server>>;

/// Runs `work` on a blocking thread, bounded in time, and answers with its result.
async fn blocking(server: Arc<Server>, work: impl FnOnce(&Server) -> Result<Response> + Send + 'static) -> Response {
    server.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let shared = server.clone();
    let task = tokio::task::spawn_blocking(move || work(&shared));
    match tokio::time::timeout(REQUEST_TIME, task).await {
        Ok(Ok(Ok(response))) => response,
        Ok(Ok(Err(e))) => refusal(&server, &e),
        Ok(Err(e)) => {
            tracing::error!("a request's worker failed: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the request took too long\n").into_response(),
    }
}

fn capsule_id(text: &str) -> Result<CapsuleId> {
    CapsuleId::from_hex(text).map_err(|e| Error::Invalid(format!("capsule id: {e}")))
}

async fn get_metadata(State(s): Shared, UrlPath(id): UrlPath<String>) -> Response {
    blocking(s, move |s| {
        let capsule = s.held(capsule_id(&id)?)?;
        Ok(capsule.metadata_bytes().into_response())
    })
    .await
}

async fn put_metadata(State(s): Shared, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| {
        s.adopt(capsule_id(&id)?, &body)?;
        Ok(StatusCode::OK.into_response())
    })
    .await
}

#[derive(serde::Deserialize)]
struct HeadsQuery {
    known: Option<String>,
    wait: Option<u64>,
}

/// The heads, at once, or (a long poll) once they no longer have the digest `known`, or
/// after `wait` seconds.
async fn heads(State(s): Shared, UrlPath(id): UrlPath<String>, Query(q): Query<HeadsQuery>) -> Response {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(0).min(protocol::MAX_WAIT));
    loop {
        // Registered before the heads are read, so an arrival in between still wakes it.
        let arrival = s.arrivals.notified();
        // Answered here when the heads are in memory: a hand-off to a blocking thread and
        // back was most of what a heads request cost.
        let at_hand = capsule_id(&id).ok().and_then(|id| s.open_now(id)).and_then(|c| c.announced_at_hand());
        let Announced { heads: current, forks } = match at_hand {
            Some(announced) => announced,
            None => {
                let (server, id) = (s.clone(), id.clone());
                let read = move || Replica::announce(&*server.held(capsule_id(&id)?)?);
                match tokio::task::spawn_blocking(read).await {
                    Ok(Ok(announced)) => announced,
                    Ok(Err(e)) => return refusal(&s, &e),
                    Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        };
        let unchanged = q.known.as_deref() == Some(protocol::heads_digest(&current).as_str());
        if !unchanged || tokio::time::timeout_at(deadline, arrival).await.is_err() {
            s.metrics.requests.fetch_add(1, Ordering::Relaxed);
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
        let bytes = batch_bytes(&bundles);
        let stored = s.store_checked(&capsule, capsule.check_alone(bundles)?, bytes)?;
        Ok(borsh_body(&(stored as u64)))
    })
    .await
}

/// A push's batches in one request (`Route::RecordStream`): frames are decoded as they
/// arrive, each batch's records are checked on their own (hashes, signatures:
/// `Capsule::check_alone`) on a blocking thread while the batch before is stored on another
/// (`Capsule::put_checked`), so the transfer, the checks and the disk overlap. One batch at
/// most waits between them.
async fn put_record_stream(State(s): Shared, UrlPath(id): UrlPath<String>, body: Body) -> Response {
    s.metrics.requests.fetch_add(1, Ordering::Relaxed);
    // Each stream holds up to three frames; a few at once bound what streams hold.
    let Ok(Ok(_turn)) = tokio::time::timeout(REQUEST_TIME, s.streams.acquire()).await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many record streams at once; try again\n").into_response();
    };
    let (server, hex) = (s.clone(), id.clone());
    let capsule = match tokio::task::spawn_blocking(move || server.held(capsule_id(&hex)?)).await {
        Ok(Ok(capsule)) => capsule,
        Ok(Err(e)) => return refusal(&s, &e),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    let (batches, mut incoming) = tokio::sync::mpsc::channel::<Checking>(1);
    let (server, held, runtime) = (s.clone(), capsule.clone(), tokio::runtime::Handle::current());
    let storing = tokio::task::spawn_blocking(move || {
        let mut stored = 0;
        while let Some(checking) = incoming.blocking_recv() {
            let (checked, bytes) =
                runtime.block_on(checking).map_err(|e| Error::Invalid(format!("checking a batch: {e}")))??;
            stored += server.store_checked(&held, checked, bytes)?;
        }
        Ok::<_, Error>(stored)
    });
    let read = read_frames(body, &capsule, &batches).await;
    drop(batches);
    match (storing.await, read) {
        // A refused batch explains the end of the stream better than the stream does.
        (Ok(Err(e)), _) | (Ok(Ok(_)), Err(e)) => refusal(&s, &e),
        (Ok(Ok(stored)), Ok(())) => borsh_body(&(stored as u64)),
        (Err(_), _) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// A batch of a record stream being checked (`Capsule::check_alone`), with its size.
type Checking = tokio::task::JoinHandle<Result<(Vec<Incoming>, u64)>>;

fn batch_bytes(bundles: &[Bundle]) -> u64 {
    bundles.iter().map(|b| b.size() as u64).sum()
}

/// Reads `body` as frames (`frames::FrameDecoder`: each piece is copied once, into the record
/// or payload it belongs to), starts each batch's checks and hands them to `batches`; ends at
/// the end of the body, or when `batches` is closed (its taker refused a batch), or on a body
/// cut inside a frame, an oversized or undecodable frame, or `REQUEST_TIME` without a piece.
/// After a refusal the rest is read and dropped, up to `DRAIN` bytes, so that a client still
/// sending gets the answer that says why.
async fn read_frames(
    mut body: Body,
    capsule: &Arc<Capsule>,
    batches: &tokio::sync::mpsc::Sender<Checking>,
) -> Result<()> {
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
    while let Some(data) = next_piece().await? {
        for batch in decoder.take(&data).map_err(|e| Error::Invalid(format!("record stream: {e}")))? {
            let capsule = capsule.clone();
            let bytes = batch_bytes(&batch);
            let checking = tokio::task::spawn_blocking(move || Ok((capsule.check_alone(batch)?, bytes)));
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
        return Err(Error::Invalid("the record stream ended inside a frame".into()));
    }
    Ok(())
}

async fn get_name(State(s): Shared, UrlPath(name): UrlPath<String>) -> Response {
    blocking(s, move |s| match s.name(&name)? {
        Some(bytes) => Ok(bytes.into_response()),
        None => Err(Error::NotFound(format!("the name '{name}' on this server"))),
    })
    .await
}

async fn put_name(State(s): Shared, UrlPath(name): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| {
        let binding: NameBinding = decode(&body)?;
        if binding.name != name {
            return Err(Error::Invalid(format!("a binding of '{}' sent to the name '{name}'", binding.name)));
        }
        s.bind(&binding, &body)?;
        Ok(borsh_body(&()))
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
    blocking(s, |s| {
        let ids: Vec<CapsuleId> = s.all_held()?.iter().map(|c| c.id()).collect();
        Ok(borsh_body(&ids))
    })
    .await
}

async fn metrics(State(s): Shared) -> Response {
    let m = &s.metrics;
    let capsules = s.capsules.lock().expect("no panics while locked").len();
    let mut text = format!(
        "# TYPE capsulefs_capsules_open gauge\ncapsulefs_capsules_open {capsules}\n\
         # TYPE capsulefs_requests_total counter\ncapsulefs_requests_total {}\n\
         # TYPE capsulefs_records_stored_total counter\ncapsulefs_records_stored_total {}\n\
         # TYPE capsulefs_bytes_stored_total counter\ncapsulefs_bytes_stored_total {}\n\
         # TYPE capsulefs_rejected_total counter\n",
        m.requests.load(Ordering::Relaxed),
        m.records_stored.load(Ordering::Relaxed),
        m.bytes_stored.load(Ordering::Relaxed),
    );
    for (reason, count) in m.rejected.lock().expect("no panics while locked").iter() {
        text.push_str(&format!("capsulefs_rejected_total{{reason=\"{reason}\"}} {count}\n"));
    }
    text.into_response()
}

/// Refuses a body declared larger than `MAX_BODY` before reading any of it.
async fn declared_size(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return (StatusCode::PAYLOAD_TOO_LARGE, format!("bodies are at most {MAX_BODY} bytes\n")).into_response();
    }
    next.run(request).await
}

/// One address may have `MAX_PER_PEER` requests in flight; past that it is told to wait.
async fn per_peer_limit(
    State(s): Shared,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(_counted) = s.per_peer.enter(peer.ip(), MAX_PER_PEER) else {
        *s.metrics.rejected.lock().expect("no panics while locked").entry("peer_busy").or_default() += 1;
        tracing::info!("refused a request from {peer}: {MAX_PER_PEER} of its requests are in flight");
        let reason = format!("{MAX_PER_PEER} of your requests are in flight: wait for one to finish\n");
        return (StatusCode::TOO_MANY_REQUESTS, reason).into_response();
    };
    next.run(request).await
}

fn router(server: Arc<Server>) -> Router {
    Router::new()
        .route(protocol::CAPSULES, get(capsules))
        .route("/v1/names/{name}", get(get_name).post(put_name))
        .route("/v1/capsules/{id}/metadata", get(get_metadata).post(put_metadata))
        .route("/v1/capsules/{id}/heads", get(heads))
        .route("/v1/capsules/{id}/missing", axum::routing::post(missing))
        .route("/v1/capsules/{id}/walk", axum::routing::post(walk))
        .route("/v1/capsules/{id}/fetch", axum::routing::post(fetch))
        .route("/v1/capsules/{id}/since", axum::routing::post(since))
        .route("/v1/capsules/{id}/records", axum::routing::post(put_records))
        .route("/v1/capsules/{id}/record-stream", axum::routing::post(put_record_stream))
        .route("/v1/capsules/{id}/records/{record}/{idx}", get(sub_record))
        .route("/v1/capsules/{id}/records/{record}/{idx}/run", get(sub_record_run))
        .route("/v1/capsules/{id}/bloom", get(bloom))
        .route("/v1/capsules/{id}/evidence", get(get_evidence).post(put_evidence))
        .route("/v1/capsules/{id}/heads-sketch", axum::routing::post(heads_sketch))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(declared_size))
        .layer(tower::limit::ConcurrencyLimitLayer::new(MAX_IN_FLIGHT))
        .layer(axum::middleware::from_fn_with_state(server.clone(), per_peer_limit))
        .with_state(server)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: finishing the requests in flight");
}

/// Serves until SIGTERM or SIGINT. `ready` is called with the bound address once the server
/// accepts connections.
pub fn run(config: Config, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    std::fs::create_dir_all(config.store.join("capsules")).map_err(|e| Error::io(&config.store, e))?;
    let trust = crate::crypto::keys::Keyring::load(&config.store.join("keys"))?.trust_key()?;
    let server = Arc::new(Server {
        dir: config.store.clone(),
        trust,
        capsules: Mutex::default(),
        metrics: Metrics::default(),
        news: Default::default(),
        arrivals: tokio::sync::Notify::new(),
        per_peer: Arc::default(),
        streams: tokio::sync::Semaphore::new(MAX_STREAMS),
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peering = (!config.peers.is_empty()).then(|| {
        let (server, stop, peers) = (server.clone(), stop.clone(), config.peers.clone());
        std::thread::spawn(move || server.peer_loop(&peers, &stop))
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(MAX_IN_FLIGHT)
        .enable_all()
        .build()
        .map_err(|e| Error::io(Path::new("tokio runtime"), e))?;
    let tls = match &config.tls {
        Some((cert, key)) => Some(tls::acceptor(cert, key)?),
        None => None,
    };
    let waker = server.clone();
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::io(Path::new(&config.listen.to_string()), e))?;
        let addr = listener.local_addr().map_err(|e| Error::io(Path::new("listener"), e))?;
        let app = router(server).into_make_service_with_connect_info::<PeerAddr>();
        let served = match tls {
            Some(acceptor) => {
                let listener =
                    tls::TlsListener::new(listener, acceptor).map_err(|e| Error::io(Path::new("listener"), e))?;
                ready(addr);
                let listener = Bounded::new(listener, MAX_CONNECTIONS, config.idle);
                axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await
            }
            None => {
                ready(addr);
                let listener = Bounded::new(listener, MAX_CONNECTIONS, config.idle);
                axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await
            }
        };
        served.map_err(|e| Error::io(Path::new(&addr.to_string()), e))
    });
    stop.store(true, Ordering::Relaxed);
    waker.news.1.notify_all();
    if let Some(thread) = peering {
        let _ = thread.join();
    }
    served
}
