//! The network edge: the replica protocol (`protocol`) `capsulefs serve` (`server`)
//! with its TLS (`tls`) and its bounds on connections and peers (`limits`).
//! Tokio runs only here. The server holds no content keys: it stores and serves bytes and
//! hashes, and checks signatures and writer rights, never contents.

pub mod frames;
pub mod limits;
mod names;
mod peers;
pub mod protocol;
pub mod registry;
mod replies;
mod routes;
pub mod server;
mod streams;
pub mod tls;
