//! The network edge: the replica protocol (`protocol`) and `capsulefs serve` (`server`).
//! Tokio runs only here. The server holds no content keys: it stores and serves bytes and
//! hashes, and checks signatures and writer rights, never contents.

pub mod protocol;
pub mod server;
