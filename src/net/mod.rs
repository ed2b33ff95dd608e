//! The network edge: `capsulefs serve` (`server`), speaking the protocol of `wire`,
//! with its TLS (`tls`) and its bounds on connections and peers (`limits`).
//! Tokio runs only here. The server holds no content keys: it stores and serves bytes and
//! hashes, and checks signatures and writer rights, never contents.

pub mod limits;
mod names;
mod peers;
pub mod registry;
mod replies;
mod routes;
pub mod server;
mod shared;
mod streams;
pub mod tls;
