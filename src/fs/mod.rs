//! POSIX meaning over capsule records, without FUSE types: `filesystem::Fs` and its operations,
//! `node` (inodes, directory entries, superblock), `sealed` (proven reads and sealed commits),
//! and `trie`, the persistent map that the inode table, chunk maps and directories are made of.

pub mod filesystem;
pub mod node;
pub mod sealed;
pub mod trie;

pub use filesystem::Fs;
