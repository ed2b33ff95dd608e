//! TLS for `capsulefs serve --tls-cert C --tls-key K`: rustls on the ring provider (no C build).
//!
//! TLS protects who talks to whom and what they ask; the data needs no such help (every
//! record is hashed, signed and checked by the receiver). Handshakes run in tasks of their own,
//! at most `MAX_HANDSHAKES` at once (`MAX_HANDSHAKES_PER_ADDR` from one address) and each
//! bounded in time, so a slow or silent client cannot hold up the others; finished
//! connections go to the server's accept loop through `TlsListener`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;

use super::limits::{HANDSHAKE_TIME, MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDR, PerAddr};
use crate::{Error, Result};

/// The server's TLS setup from a PEM certificate chain and a PEM private key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let bad = |path: &Path, what: &str, e: &dyn std::fmt::Display| {
        Error::Invalid(format!(
            "{}: not a PEM {what} ({e}); give --tls-cert a certificate chain and --tls-key its key",
            path.display()
        ))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<std::result::Result<_, _>>())
        .map_err(|e| bad(cert, "certificate", &e))?;
    if chain.is_empty() {
        return Err(bad(cert, "certificate", &"no CERTIFICATE block"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, "private key", &e))?;
    let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
        .map_err(|e| Error::Invalid(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Connections whose handshake has finished, for `axum::serve`.
pub struct TlsListener {
    done: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` from now on, handshaking with `acceptor`.
    pub fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, done) = mpsc::channel(MAX_HANDSHAKES);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let by_addr = Arc::new(PerAddr::default());
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, most likely: let some connections end first.
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(counted) = by_addr.enter(peer.ip(), MAX_HANDSHAKES_PER_ADDR) else {
                    tracing::info!(
                        "closed a connection from {peer}: {MAX_HANDSHAKES_PER_ADDR} of its handshakes are going on"
                    );
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIME, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!("TLS handshake with {peer} failed: {e}"),
                        Err(_) => tracing::info!("TLS handshake with {peer} took too long"),
                    }
                    drop((slot, counted));
                });
            }
        });
        Ok(Self { done, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.done.recv().await {
            Some(connection) => connection,
            // The accepting task ended (the runtime is stopping): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
