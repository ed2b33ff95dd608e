//! The network edge: the replica protocol (`protocol`) `capsulefs serve` (`server`)
//! and its TLS (`tls`).
//! Tokio runs only here. The server holds no content keys: it stores and serves bytes and
//! hashes, and checks signatures and writer rights, never contents.

pub mod protocol;
pub mod server;
pub mod tls;
