//! Keeping the local capsule and its replicas in step: push and pull (`transfer`), what a
//! replica holds as this capsule places it (`heads`), the slow walk and relay between two
//! replicas (`walk`), fork evidence passed on (`evidence`), reads and writes through a
//! Byzantine quorum of replicas (`quorum`), and the background threads of a mount: the
//! uploader and the follower, with the status they report (`status`).
//!
//! Nothing a replica answers is believed here either: every record goes through the
//! capsule's one gate (`Capsule::admit`) before it is stored.

pub mod evidence;
pub mod follower;
pub mod heads;
pub mod quorum;
pub mod status;
pub mod transfer;
pub mod uploader;
pub mod walk;
