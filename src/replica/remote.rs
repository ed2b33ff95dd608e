//! A `capsulefs serve` replica, over HTTP with borsh bodies (routes in `wire::protocol`).
//!
//! Blocking (ureq): the transfer code above the trait is synchronous like the rest of the
//! core, so no runtime is needed on the client side. Every answer is size-capped before it is
//! read and decoded strictly; what it says is then checked like anything else from a replica.

use std::sync::mpsc;
use std::time::Duration;

use borsh::BorshDeserialize;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};

use super::bloom::Bloom;
use super::sketch;
use super::{PutStream, Replica};
use crate::member::name::NameBinding;
use crate::proof::fork::ForkEvidence;
use crate::record::codec;
use crate::record::{CapsuleId, RecordHash, SubIdx};
use crate::wire::Announced;
use crate::wire::frames::EncodedFrame;
use crate::wire::protocol::{self, Route};
use crate::wire::{Bundle, MAX_BATCH_BYTES, MAX_EVIDENCE, MAX_HASHES, Node, Since};
use crate::{Error, Result, VerifyError};

/// Largest answer read from a server: a fetch of `MAX_BATCH_BYTES` plus one record past it.
pub(super) const MAX_ANSWER: u64 = (MAX_BATCH_BYTES as u64) * 2 + (1 << 20);
/// A request that makes no progress for this long fails (the replica is then unreachable).
const STALL: Duration = Duration::from_secs(60);

/// The certificates that `https://` replicas are checked against instead of the public roots:
/// a private CA, or a server's own self-signed certificate.
pub const TLS_CA_ENV: &str = "CAPSULEFS_TLS_CA";

/// rustls, checking servers against the public web roots, or against the certificates in the
/// PEM file `CAPSULEFS_TLS_CA` names.
fn tls_config() -> Result<TlsConfig> {
    let builder = TlsConfig::builder().provider(TlsProvider::Rustls);
    let Some(path) = std::env::var_os(TLS_CA_ENV).map(std::path::PathBuf::from) else {
        return Ok(builder.build());
    };
    let pem = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(cert)) => Some(Ok(cert)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Invalid(format!("{TLS_CA_ENV}={}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Invalid(format!(
            "{TLS_CA_ENV}={}: no CERTIFICATE block; give it the server's certificate or its CA's, in PEM",
            path.display()
        )));
    }
    Ok(builder.root_certs(RootCerts::new_with_certs(&certs)).build())
}

/// The HTTP client every replica kind that speaks HTTP uses: statuses as answers (not
/// errors), 10 s to connect, `STALL` without progress, the TLS roots above.
pub(super) fn agent(https_only: bool) -> Result<ureq::Agent> {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .https_only(https_only)
        .tls_config(tls_config()?)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_per_read(Some(STALL))
        .timeout_per_write(Some(STALL))
        // Read-ahead keeps several requests in flight to one server: with ureq's default of
        // 3 idle connections a host, most of a cold read's requests opened a new connection.
        .max_idle_connections_per_host(16)
        .max_idle_connections(64)
        .build();
    Ok(config.into())
}

/// A request that did not get an answer, as an error that says what to check.
fn unreachable(base: &str, e: ureq::Error) -> Error {
    let tls_failed = match &e {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) => true,
        ureq::Error::Io(io) => io.get_ref().is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()),
        _ => false,
    };
    let hint = if tls_failed {
        format!("does {TLS_CA_ENV} name the server's certificate or its CA?")
    } else if matches!(e, ureq::Error::Protocol(_)) {
        "is it a `capsulefs serve`, and does it speak https:// (--tls-cert)?".to_owned()
    } else {
        "is the server running?".to_owned()
    };
    Error::Replica(format!("{base}: {e} ({hint})"))
}

/// The body of `response` for a 2xx, None for a 404, with its `header` if asked for and
/// sent as text; `what` names the request in messages.
fn answer(
    base: &str,
    what: &str,
    mut response: ureq::http::Response<ureq::Body>,
    header: Option<&str>,
) -> Result<(Option<Vec<u8>>, Option<String>)> {
    let status = response.status().as_u16();
    let text = |name: &str| response.headers().get(name)?.to_str().ok().map(str::to_owned);
    let (header, refusal) = (header.and_then(text), text(protocol::REFUSAL_HEADER));
    let answer = response.body_mut().with_config().limit(MAX_ANSWER).read_to_vec().map_err(|e| unreachable(base, e))?;
    match (status, refusal) {
        (200..=299, _) => Ok((Some(answer), header)),
        (404, _) => Ok((None, header)),
        (409, _) => Err(Error::Exists(format!("{base}: {}", String::from_utf8_lossy(&answer).trim()))),
        (400, Some(reason)) => Err(VerifyError::Refused {
            replica: base.to_owned(),
            reason,
            message: String::from_utf8_lossy(&answer).trim().to_owned(),
        }
        .into()),
        _ => {
            Err(Error::Replica(format!("{base} refused {what}: {status} {}", String::from_utf8_lossy(&answer).trim())))
        }
    }
}

/// How long a request waits in all for a busy server before its refusal is the answer.
const BUSY_PATIENCE: Duration = Duration::from_secs(30);

/// The pause a busy answer (429 or 503) asks for in `Retry-After`, one second if it names
/// none, at most five; None for any other answer.
fn busy_pause(response: &ureq::http::Response<ureq::Body>) -> Option<Duration> {
    if !matches!(response.status().as_u16(), 429 | 503) {
        return None;
    }
    let named = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    Some(Duration::from_secs(named.unwrap_or(1).clamp(1, 5)))
}

pub struct Remote {
    base: String,
    capsule: CapsuleId,
    agent: ureq::Agent,
}

impl Remote {
    /// Every capsule the server at `url` holds.
    pub fn capsules_at(url: &str) -> Result<Vec<CapsuleId>> {
        let server = Self::new(url, CapsuleId::from_bytes([0; 32]))?;
        let what = "the capsule list";
        match server.request(protocol::CAPSULES, what, None)? {
            Some(bytes) => server.decode(what, &bytes),
            None => Err(Error::Replica(format!("{} does not list capsules: is it a `capsulefs serve`?", server.base))),
        }
    }

    /// The replica of `capsule` at `url` (`http://HOST:PORT` or `https://HOST:PORT`).
    pub fn new(url: &str, capsule: CapsuleId) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "replica URL '{url}': this build speaks http:// and https:// to `capsulefs serve` (file:///PATH for a folder, s3://BUCKET/PREFIX for a bucket)"
            )));
        }
        let agent = agent(base.starts_with("https://"))?;
        Ok(Self { base, capsule, agent })
    }

    /// Sends `body` (or none: a GET) and returns the answer's body for a 2xx, None for a 404.
    fn call(&self, route: Route, body: Option<Vec<u8>>) -> Result<Option<Vec<u8>>> {
        self.call_with(route, "", body)
    }

    /// `call`, with a query string (`?...`) after the route's path.
    fn call_with(&self, route: Route, query: &str, body: Option<Vec<u8>>) -> Result<Option<Vec<u8>>> {
        self.request(&format!("{}{query}", protocol::path(&self.capsule, route)), route.name(), body)
    }

    /// Sends `body` (or none: a GET) to `path` on the server and returns the answer's body for
    /// a 2xx, None for a 404; `what` names the request in messages.
    fn request(&self, path: &str, what: &str, body: Option<Vec<u8>>) -> Result<Option<Vec<u8>>> {
        Ok(self.request_reading(path, what, body, None)?.0)
    }

    /// `request`, also returning the answer's `header`, if asked for and sent as text.
    fn request_reading(
        &self,
        path: &str,
        what: &str,
        body: Option<Vec<u8>>,
        header: Option<&str>,
    ) -> Result<(Option<Vec<u8>>, Option<String>)> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e| unreachable(&self.base, e);
        let mut waited = Duration::ZERO;
        loop {
            let response = match &body {
                Some(bytes) => self.agent.post(&url).send(&bytes[..]).map_err(unreachable)?,
                None => self.agent.get(&url).call().map_err(unreachable)?,
            };
            // A busy server (429: this client's share is taken; 503: everyone's) is asked
            // again after the pause it names, for at most `BUSY_PATIENCE` in all.
            match busy_pause(&response) {
                Some(pause) if waited + pause <= BUSY_PATIENCE => {
                    tracing::debug!("{} is busy ({}): asking again in {pause:?}", self.base, response.status());
                    std::thread::sleep(pause);
                    waited += pause;
                }
                _ => return answer(&self.base, what, response, header),
            }
        }
    }

    /// The binding of `name` the server took first (unchecked: see `NameBinding::check`).
    pub fn name(&self, name: &str) -> Result<Option<NameBinding>> {
        match self.request(&format!("/v1/names/{name}"), "name", None)? {
            Some(bytes) => self.decode("name", &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Asks the server to bind `binding`'s name to its capsule (refused if taken otherwise).
    pub fn bind_name(&self, binding: &NameBinding) -> Result<()> {
        self.request(&format!("/v1/names/{}", binding.name), "name", Some(codec::encode(binding)))?;
        Ok(())
    }

    /// The poster's Bloom filter over every record the server holds, salted by the asker.
    pub fn bloom(&self, salt: [u8; 16], bits_per_record: u8) -> Result<Bloom> {
        let query = format!("?salt={}&bits={bits_per_record}", hex::encode(salt));
        match self.call_with(Route::Bloom, &query, None)? {
            Some(bytes) => Bloom::decode(&bytes).map_err(|e| Error::Replica(format!("{}: {e}", self.base))),
            None => Err(self.not_held()),
        }
    }

    /// The error for a 404 on one of the capsule's routes.
    fn not_held(&self) -> Error {
        Error::NotFound(format!("capsule {:?} on {}", self.capsule, self.base))
    }

    fn decode<T: BorshDeserialize>(&self, what: &str, bytes: &[u8]) -> Result<T> {
        borsh::from_slice(bytes)
            .map_err(|e| Error::Replica(format!("{} sent an undecodable answer to {what}: {e}", self.base)))
    }

    fn expect<T: BorshDeserialize>(&self, route: Route, body: Option<Vec<u8>>) -> Result<T> {
        self.expect_with(route, "", body)
    }

    fn expect_with<T: BorshDeserialize>(&self, route: Route, query: &str, body: Option<Vec<u8>>) -> Result<T> {
        match self.call_with(route, query, body)? {
            Some(bytes) => self.decode(route.name(), &bytes),
            None => Err(self.not_held()),
        }
    }
}

impl Replica for Remote {
    fn describe(&self) -> String {
        self.base.clone()
    }

    fn metadata(&self) -> Result<Option<Vec<u8>>> {
        self.call(Route::Metadata, None)
    }

    fn put_metadata(&self, signed: &[u8]) -> Result<()> {
        self.call(Route::Metadata, Some(signed.to_vec())).map(drop)
    }

    fn heads(&self) -> Result<Vec<RecordHash>> {
        self.expect(Route::Heads, None)
    }

    fn announce(&self) -> Result<Announced> {
        let path = protocol::path(&self.capsule, Route::Heads);
        let (answer, forks) = self.request_reading(&path, Route::Heads.name(), None, Some(protocol::FORKS_HEADER))?;
        let Some(bytes) = answer else {
            return Err(self.not_held());
        };
        let forks = forks.map(|count| {
            count
                .parse()
                .map_err(|_| Error::Replica(format!("{} sent {}: {count:?}", self.base, protocol::FORKS_HEADER)))
        });
        Ok(Announced { heads: self.decode(Route::Heads.name(), &bytes)?, forks: forks.transpose()? })
    }

    fn watch_heads(&self, known: &[RecordHash], wait: Duration) -> Result<Vec<RecordHash>> {
        let query = format!("?known={}&wait={}", protocol::heads_digest(known), wait.as_secs().min(protocol::MAX_WAIT));
        self.expect_with(Route::Heads, &query, None)
    }

    fn missing(&self, records: &[RecordHash]) -> Result<Vec<RecordHash>> {
        let mut lacking = Vec::new();
        for slice in records.chunks(MAX_HASHES) {
            let answer: Vec<RecordHash> = self.expect(Route::Missing, Some(codec::encode(&slice.to_vec())))?;
            lacking.extend(answer);
        }
        Ok(lacking)
    }

    fn walk(&self, from: &[RecordHash], budget: usize) -> Result<Vec<Node>> {
        let request =
            protocol::WalkRequest { from: from.iter().take(MAX_HASHES).copied().collect(), budget: budget as u32 };
        self.expect(Route::Walk, Some(codec::encode(&request)))
    }

    fn fetch(&self, records: &[RecordHash]) -> Result<Vec<Bundle>> {
        let ask: Vec<RecordHash> = records.iter().take(MAX_HASHES).copied().collect();
        self.expect(Route::Fetch, Some(codec::encode(&ask)))
    }

    fn since(&self, heads: &[RecordHash], headers_only: bool) -> Result<Since> {
        let heads: Vec<RecordHash> = heads.iter().take(MAX_HASHES).copied().collect();
        let query = if headers_only { "?headers=1" } else { "" };
        self.expect_with(Route::Since, query, Some(codec::encode(&heads)))
    }

    fn sub_record(&self, record: RecordHash, idx: SubIdx) -> Result<Option<Vec<u8>>> {
        self.call(Route::SubRecord(record, idx), None)
    }

    fn sub_record_run(&self, record: RecordHash, from: SubIdx, count: u32) -> Result<Vec<Vec<u8>>> {
        let run: Vec<Vec<u8>> =
            self.expect_with(Route::SubRecordRun(record, from), &format!("?count={count}"), None)?;
        if run.len() > count as usize {
            return Err(Error::Replica(format!("{}: {} sub-records for a run of {count}", self.base, run.len())));
        }
        Ok(run)
    }

    fn heads_difference(&self, salt: &[u8; 16], cells: &[sketch::Cell]) -> Result<sketch::Answer> {
        let request = sketch::Request { salt: *salt, cells: cells[..cells.len().min(sketch::MAX_CELLS)].to_vec() };
        self.expect(Route::HeadsSketch, Some(codec::encode(&request)))
    }

    fn evidence(&self) -> Result<Vec<ForkEvidence>> {
        let evidence: Vec<ForkEvidence> = self.expect(Route::Evidence, None)?;
        Ok(evidence.into_iter().take(MAX_EVIDENCE).collect())
    }

    fn put_evidence(&self, evidence: &[ForkEvidence]) -> Result<()> {
        for slice in evidence.chunks(MAX_EVIDENCE) {
            self.expect::<()>(Route::Evidence, Some(codec::encode(&slice.to_vec())))?;
        }
        Ok(())
    }

    fn put(&self, bundles: Vec<Bundle>, _settles: Option<&[RecordHash]>) -> Result<usize> {
        let stored: u64 = self.expect(Route::Records, Some(codec::encode(&bundles)))?;
        Ok(stored as usize)
    }

    fn put_stream(&self) -> Box<dyn PutStream + '_> {
        Box::new(Stream { remote: self, frames: None, sending: None })
    }
}

/// A transfer's batches as one `RecordStream` request: a thread sends the frames as they are
/// handed over, one waiting at most, so reading the next batch here overlaps sending this
/// one, and the server stores each while the next arrives (one request, not one a batch,
/// and no batch waits for the one before it to be stored before it starts moving).
struct Stream<'a> {
    remote: &'a Remote,
    frames: Option<mpsc::SyncSender<Vec<Bundle>>>,
    sending: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Stream<'_> {
    /// The request, started at the first batch.
    fn start(&mut self) -> &mpsc::SyncSender<Vec<Bundle>> {
        self.frames.get_or_insert_with(|| {
            let (frames, taken) = mpsc::sync_channel(1);
            let (agent, base) = (self.remote.agent.clone(), self.remote.base.clone());
            let url = format!("{base}{}", protocol::path(&self.remote.capsule, Route::RecordStream));
            self.sending = Some(std::thread::spawn(move || {
                let body = ureq::SendBody::from_owned_reader(FrameReader { taken, current: None });
                let response = agent.post(&url).send(body).map_err(|e| match e {
                    // The server stopped reading: it read a while past a refused batch, then
                    // closed (its answer, which says why, came too late for this client).
                    ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe => Error::Replica(format!(
                        "{base} closed the record stream before taking every batch: it refused one (its log \
                         and /metrics say which and why) or stopped; what it took is kept, retry the push"
                    )),
                    e => unreachable(&base, e),
                })?;
                answer(&base, Route::RecordStream.name(), response, None).map(drop)
            }));
            frames
        })
    }

    /// How the request ended: its error, if the server refused a batch or went away.
    fn ended(&mut self) -> Result<()> {
        self.frames = None;
        match self.sending.take() {
            Some(sending) => sending.join().expect("the sending thread does not panic"),
            None => Ok(()),
        }
    }
}

impl PutStream for Stream<'_> {
    fn send(&mut self, bundles: Vec<Bundle>) -> Result<()> {
        if bundles.is_empty() {
            return Ok(());
        }
        if self.start().send(bundles).is_err() {
            // The request ended early: its answer says why.
            self.ended()?;
            return Err(Error::Replica(format!("{} ended the record stream early", self.remote.base)));
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, last: Vec<Bundle>, _settles: Option<&[RecordHash]>) -> Result<u32> {
        self.send(last)?;
        let requests = u32::from(self.sending.is_some());
        self.ended()?;
        Ok(requests)
    }
}

/// The frames handed to a `Stream`, as the request body, each read from its bundles
/// (`EncodedFrame`): ends when the stream is finished.
struct FrameReader {
    taken: mpsc::Receiver<Vec<Bundle>>,
    current: Option<EncodedFrame>,
}

impl std::io::Read for FrameReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(frame) = &mut self.current {
                let n = frame.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
            }
            match self.taken.recv() {
                Ok(next) => self.current = Some(EncodedFrame::new(next)),
                Err(_) => return Ok(0),
            }
        }
    }
}
