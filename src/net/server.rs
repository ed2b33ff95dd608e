//! `capsulefs serve`: any number of capsule replicas, each a RocksDB store under
//! `<store>/capsules/<id>/`, over HTTP (hyper, routed by axum) with borsh bodies.
//!
//! Everything a peer sends goes through the gate before it is stored (`Capsule::admit`), so
//! nobody without an authorized writer's key can make the server store anything. Who may
//! host a capsule here, what each creator may take, and which stores are open is the
//! `registry`'s; every bound on what a client can hold of the server is in `limits`. Store
//! work runs on blocking threads. SIGTERM or SIGINT stop it gracefully (no new requests,
//! those in flight finish); SIGHUP reads the creators file again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tower::ServiceExt;

use super::limits::{Bounded, Gate, HEADER_READ, Limits, PeerAddr, REQUEST_TIME, STORE_IDLE};
use super::registry::{Admission, Quotas, Registry};
use super::replies::Metrics;
use super::shared::Server;
use super::{routes, tls};
use crate::{Error, Result};

pub struct Config {
    pub listen: SocketAddr,
    pub store: PathBuf,
    /// Other servers (http://HOST:PORT) this one reconciles every capsule it holds with.
    pub peers: Vec<String>,
    /// A PEM certificate chain and its key: serve https instead of http.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The bounds its operator may set.
    pub limits: Limits,
    /// Who may create capsules here, and what each creator may take.
    pub admission: Admission,
    pub quotas: Quotas,
}

/// SIGTERM or SIGINT: stop. SIGHUP: read the creators file again.
async fn signals(server: Arc<Server>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup())) else {
        tracing::error!("cannot listen for signals: stop the server with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => match server.registry.admission().reload() {
                Ok(n) => tracing::info!("read the creators file again: {n} keys"),
                Err(e) => tracing::error!("keeping the creators read before: {e}"),
            },
        }
    }
    tracing::info!("stopping: finishing the requests in flight");
}

/// Serves the connections `listener` accepts until `stop` resolves, then lets those open
/// finish their requests. Each request's head must come whole within `HEADER_READ`, and each
/// request carries its peer's address (`PeerAddr`) for the bounds by address.
async fn serve<L>(mut listener: Bounded<L>, app: axum::Router, stop: impl std::future::Future<Output = ()>)
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let (closing, _) = tokio::sync::watch::channel(false);
    // One clone per connection being served: the count falls to one when all have finished.
    let connections = Arc::new(());
    tokio::pin!(stop);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => break,
        };
        let service = app.clone().map_request(move |mut request: axum::extract::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(PeerAddr(peer));
            request.map(axum::body::Body::new)
        });
        let service = hyper_util::service::TowerToHyperService::new(service);
        let mut closing = closing.subscribe();
        let done = connections.clone();
        tokio::spawn(async move {
            // HTTP/1.1 only: its header-read timeout holds from the first byte, where HTTP/2
            // would take a connection with a preface and nothing more, and run many requests
            // on it against bounds counted per connection.
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ)
                .serve_connection(TokioIo::new(io), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = closing.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(done);
        });
    }
    let _ = closing.send(true);
    let deadline = tokio::time::Instant::now() + REQUEST_TIME;
    while Arc::strong_count(&connections) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Serves until SIGTERM or SIGINT. `ready` is called with the bound address once the server
/// accepts connections.
pub fn run(config: Config, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    std::fs::create_dir_all(config.store.join("capsules")).map_err(|e| Error::io(&config.store, e))?;
    let trust = crate::crypto::keys::KeyFolder::load(&config.store.join("keys"))?.trust_key()?;
    raise_descriptor_limit();
    let registry = Registry::load(&config.store, trust, config.admission, config.quotas, config.limits.open_stores)?;
    tracing::info!("{} capsules held; {}", registry.ids().len(), registry.admission().describe());
    let server = Arc::new(Server {
        registry,
        metrics: Metrics::default(),
        gate: Gate::default(),
        news: Default::default(),
        arrivals: tokio::sync::Notify::new(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let peering = (!config.peers.is_empty()).then(|| {
        let (server, stop, peers) = (server.clone(), stop.clone(), config.peers.clone());
        std::thread::spawn(move || server.peer_loop(&peers, &stop))
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(super::limits::MAX_IN_FLIGHT + super::limits::MAX_STREAMS * 2 + 8)
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
        let closer = server.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(STORE_IDLE / 2);
            loop {
                every.tick().await;
                let registry = closer.clone();
                let _ = tokio::task::spawn_blocking(move || registry.registry.close_idle()).await;
            }
        });
        let app = routes::router(server.clone());
        let stop = signals(server);
        match tls {
            Some(acceptor) => {
                let listener =
                    tls::TlsListener::new(listener, acceptor).map_err(|e| Error::io(Path::new("listener"), e))?;
                ready(addr);
                serve(Bounded::new(listener, &config.limits), app, stop).await;
            }
            None => {
                ready(addr);
                serve(Bounded::new(listener, &config.limits), app, stop).await;
            }
        }
        Ok::<_, Error>(())
    });
    stop.store(true, Ordering::Relaxed);
    waker.news.1.notify_all();
    if let Some(thread) = peering {
        let _ = thread.join();
    }
    served
}

/// Raises this process's soft limit on open files to its hard limit: each open store takes
/// several, and the bounds of `limits` are set for a server that may use them all.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!("open file limit raised from {soft} to {hard}"),
            Err(e) => tracing::warn!("could not raise the open file limit from {soft}: {e}"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("could not read the open file limit: {e}"),
    }
}
