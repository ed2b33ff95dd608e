//! `capsulefs serve`: replicas for others, on a TCP address (see `net::server`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use capsulefs::net::server::{self, Config};

use super::home::Home;

#[derive(Parser, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Folder of the replicas (default: serve/ in the capsulefs home).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Another server (http://HOST:PORT) to reconcile every capsule with, in the background;
    /// repeatable.
    #[arg(long = "peer", value_name = "URL")]
    pub peers: Vec<String>,
    /// Serve https with this PEM certificate chain (with --tls-key). Clients trust it through
    /// the public roots, or through CAPSULEFS_TLS_CA=FILE.pem (e.g. this very certificate).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

pub fn serve(home: &Home, a: ServeArgs) -> anyhow::Result<()> {
    let store = a.store.unwrap_or_else(|| home.root().join("serve"));
    let tls = a.tls_cert.zip(a.tls_key);
    server::run(Config { listen: a.listen, store, peers: a.peers, tls }, |addr| {
        // The readiness line scripts and tests wait for.
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
