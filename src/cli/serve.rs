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
    /// Close a connection that moves no byte for this many seconds (at least 61, so a long
    /// poll of the heads is never cut; shorter only for tests).
    #[arg(long, value_name = "SECS", default_value_t = server::IDLE.as_secs(), hide = true)]
    pub idle_timeout: u64,
}

pub fn serve(home: &Home, a: ServeArgs) -> anyhow::Result<()> {
    let store = a.store.unwrap_or_else(|| home.root().join("serve"));
    let tls = a.tls_cert.zip(a.tls_key);
    let idle = std::time::Duration::from_secs(a.idle_timeout);
    server::run(Config { listen: a.listen, store, peers: a.peers, tls, idle }, |addr| {
        // The readiness line scripts and tests wait for.
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
