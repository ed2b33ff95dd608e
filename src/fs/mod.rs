//! POSIX meaning over capsule records, without FUSE types: `filesystem::Fs` and its operations,
//! `heads` (which commit the capsule's heads hold),
//! `node` (inodes, directory entries, superblock), `sealed` (proven reads and sealed commits),
//! `payload_cache` (verified plaintexts and decoded tree nodes, lrus bounded in bytes), and `trie`, the persistent map that the inode table, chunk maps and directories are made of.

pub mod filesystem;
pub mod heads;
pub mod node;
pub mod payload_cache;
pub mod sealed;
pub mod sealer;
pub mod trie;

pub use filesystem::Fs;
