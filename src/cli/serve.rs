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
}

pub fn serve(home: &Home, a: ServeArgs) -> anyhow::Result<()> {
    let store = a.store.unwrap_or_else(|| home.root().join("serve"));
    server::run(Config { listen: a.listen, store, peers: a.peers }, |addr| {
        // The readiness line scripts and tests wait for.
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
