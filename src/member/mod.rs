//! The operations that append membership records: the keystore that gives readers the
//! content key, grants and revocations (`keystore`), invitations (`invite`), and the names
//! that bind human-readable names to capsules, signed by their creators (`name`). What an
//! entry means is `rights`; which entries are in force at a record is `capsule::membership`.

pub mod invite;
pub mod keystore;
pub mod name;

pub use invite::Invitation;
pub use keystore::{ContentKeys, content_key, create_keystore, grant, keyring, revoke};
