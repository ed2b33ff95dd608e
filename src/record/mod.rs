//! The capsule format, pure and without IO: canonical encoding, ids, metadata, record headers and
//! the sub-record Merkle tree. Byte layouts are in ARCHITECTURE.md.

pub mod codec;
pub mod header;
pub mod ids;
pub mod merkle;
pub mod metadata;
pub mod sub_record;

pub use codec::DecodeError;
pub use header::{Record, RecordHeader, RecordKind};
pub use ids::{CapsuleId, DeviceId, KeyGen, NodeHash, RecordHash, Seq, Signature, SubIdx, WriterId};
pub use merkle::MerklePath;
pub use metadata::{Metadata, Params, SignedMetadata};
pub use sub_record::{Payload, SubRecord, SubRecordBuf};
