//! The crate's error type: one variant family per layer, each naming the record it concerns.

use std::path::{Path, PathBuf};

use crate::record::{CapsuleId, DecodeError, DeviceId, RecordHash, Seq, SubIdx, WriterId};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is longer than a name (255 bytes) or a symlink target (4095 bytes) may be")]
    NameTooLong(String),
    #[error("{0} is not empty")]
    NotEmpty(String),
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("{0} is a directory")]
    IsADirectory(String),
    #[error("this view of the capsule is read-only")]
    ReadOnlyView,
    #[error("no extended attribute {0}")]
    NoAttribute(String),
    #[error("{0} is read-only")]
    NotPermitted(String),
    #[error("{0} is not supported")]
    Unsupported(String),
    #[error("{0}")]
    NoKey(String),
    #[error("replica {0}")]
    Replica(String),
    /// A server's: the request is not for this client to make (a creator it does not host).
    #[error("{0}")]
    Forbidden(String),
    /// A server's: the request would take more than its quota.
    #[error("over quota: {0}")]
    OverQuota(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_owned(), source }
    }
}

/// Why data was refused. Every variant names the record, so the line can be pasted into
/// `capsulefs prove` or `capsulefs verify`.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{record:?} is stored but its bytes hash to {actual:?}")]
    RecordMismatch { record: RecordHash, actual: RecordHash },
    #[error("record bytes do not decode: {0}")]
    Undecodable(DecodeError),
    #[error("{record:?} does not decode: {source}")]
    Malformed { record: RecordHash, source: DecodeError },
    #[error("sub-record {idx:?} of {record:?} does not match its Merkle path")]
    MerkleMismatch { record: RecordHash, idx: SubIdx },
    #[error("sub-record {idx:?} of {record:?} does not decode: {source}")]
    MalformedSubRecord { record: RecordHash, idx: SubIdx, source: DecodeError },
    #[error(
        "sub-record {idx:?} of {record:?} does not open with the content key at its place: moved, replayed or sealed with another key"
    )]
    SealBroken { record: RecordHash, idx: SubIdx },
    #[error("sub-record {idx:?} of {record:?} holds {actual} bytes of a chunk where its chunk map says {expected}")]
    PieceLength { record: RecordHash, idx: SubIdx, expected: u32, actual: usize },
    #[error("sub-record {idx:?} of {record:?} is a tree node that does not belong where it is referenced")]
    MisplacedNode { record: RecordHash, idx: SubIdx },
    #[error("{record:?} has no sub-record {idx:?} (it has {count})")]
    IndexOutOfRange { record: RecordHash, idx: SubIdx, count: u32 },
    #[error("{record:?} is missing from the store")]
    MissingRecord { record: RecordHash },
    #[error("sub-record {idx:?} of {record:?} is missing from the store")]
    MissingSubRecord { record: RecordHash, idx: SubIdx },
    #[error("{record:?} carries a signature that does not verify for {writer:?}")]
    BadSignature { record: RecordHash, writer: WriterId },
    #[error(
        "{record:?} is by {writer:?}, who did not hold the write level as of its parents (an admin gives it with \
         `capsulefs grant NAME {writer} --level write`)"
    )]
    UnauthorizedWriter { record: RecordHash, writer: WriterId },
    #[error(
        "{record:?} is by {writer:?}, numbered past the cut-off of their revocation in {revocation:?}: \
         refused (the writer was removed from the capsule before making it)"
    )]
    Revoked { record: RecordHash, writer: WriterId, revocation: RecordHash },
    #[error("{record:?} belongs to capsule {capsule:?}, not this one")]
    WrongCapsule { record: RecordHash, capsule: CapsuleId },
    #[error("{record:?} points at {parent:?}, which this store does not have")]
    UnknownParent { record: RecordHash, parent: RecordHash },
    #[error("{child:?} does not list {record:?} as a parent: the chain is broken")]
    BrokenChain { record: RecordHash, child: RecordHash },
    #[error(
        "{record:?} has no signed descendant by its own writer that we can reach, and no local key attests it: \
         another writer's signature vouches for nothing of it"
    )]
    Unanchored { record: RecordHash },
    #[error(
        "{record:?} claims {count} sub-records with root {root}, but its payloads give {actual_count} with another root"
    )]
    PayloadMismatch { record: RecordHash, count: u32, actual_count: usize, root: String },
    #[error(transparent)]
    Equivocation(Box<Fork>),
    #[error("{replica} refused the records as unverified ({reason}): {message}")]
    Refused { replica: String, reason: String, message: String },
    #[error("capsule metadata does not verify: {0}")]
    Metadata(String),
}

/// Two different signed records with one writer, device and sequence number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{writer:?} signed two different records with sequence number {} of device {device:?}, {first:?} and \
     {second:?}: a fork (one key writing from two copies of the same store, e.g. a restored backup); the \
     second is kept aside as evidence, not merged (`capsulefs verify` lists it)",
    seq.0
)]
pub struct Fork {
    pub writer: WriterId,
    pub device: DeviceId,
    pub seq: Seq,
    pub first: RecordHash,
    pub second: RecordHash,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Backend(String),
    #[error("the store is corrupted ({0}); it was not repaired: restore it from a replica or backup")]
    Corrupted(String),
    #[error("index entry in {cf} is malformed: {detail}")]
    BadIndex { cf: &'static str, detail: String },
}
