//! Who may do what in a capsule, as pure data: the levels and membership entries (`entry`)
//! and the fold of applied entries into the rights in force (`fold`), with its revocations.
//! No store and no capsule here: `capsule::membership` applies this to the DAG.

mod entry;
mod fold;

pub use entry::{Level, MembershipEntry};
pub use fold::{Member, NotApplied, Revocation, Rights};
