//! Membership: who may read and write a capsule, and the keystore that gives readers the
//! content key. Entries live in signed `RecordKind::Membership` records; an entry in a record
//! whose writer lacks the level to make it is ignored (Massolit's changelog rule). `name`
//! binds human-readable names to capsules, signed by their creators.

pub mod invite;
pub mod keystore;
pub mod name;
pub mod roster;

pub use invite::Invitation;
pub use keystore::{Level, MembershipEntry, content_key, create_keystore, grant_read};
pub use roster::{Member, Roster, members};
