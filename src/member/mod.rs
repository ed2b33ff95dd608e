//! Membership: who may read and write a capsule, and the keystore that gives readers the
//! content key. Entries live in signed `RecordKind::Membership` records; the rights in force
//! at a record are those its ancestors' entries give (`history`, `rights`), and an entry whose
//! writer lacks the level to make it is kept but never applied (Massolit's changelog rule).
//! `name` binds human-readable names to capsules, signed by their creators.

pub mod history;
pub mod invite;
pub mod keystore;
pub mod name;
pub mod rights;

pub use invite::Invitation;
pub use keystore::{KeyRing, Level, MembershipEntry, content_key, create_keystore, grant, keyring, revoke};
pub use rights::{Member, Rights};
