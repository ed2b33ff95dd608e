//! POSIX meaning over capsule records, without FUSE types. So far: `trie`, the persistent map
//! that the inode table, file chunk maps and directories are built from.

pub mod trie;
