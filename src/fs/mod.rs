//! POSIX meaning over capsule records, without FUSE types: `filesystem::Fs` and its operations,
//! `signing` (which of its commits are signed), `heads` (which commits the capsule's heads
//! hold, and where branches parted), `state` (a filesystem state, one commit's or a merge's),
//! `merge` (the deterministic merge of branches into one state, built on `state`), `node`
//! (inodes, directory entries, superblock), `sealed` (proven reads and sealed commits),
//! `payload_cache` (verified plaintexts and decoded tree nodes, lrus bounded in bytes), and
//! `trie`, the persistent map that the inode table, chunk maps and directories are made of.

pub mod filesystem;
pub mod heads;
pub mod merge;
pub mod node;
pub mod payload_cache;
pub mod sealed;
pub mod sealer;
pub mod signing;
pub mod state;
pub mod trie;

pub use filesystem::Fs;
