//! Library-level tests: in-process, no FUSE.
