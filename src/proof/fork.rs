//! Fork evidence that anyone can check: two signed records of one writer, device and sequence
//! number. Checking it takes the capsule's metadata alone (no content key, no other record),
//! so replicas keep it and serve it to every client, and clients pass it on to every replica
//! they talk to.

use borsh::{BorshDeserialize, BorshSerialize};

use super::verify::{check_record_bytes, check_record_claims};
use crate::record::{CapsuleId, Record};
use crate::{Fork, VerifyError};

/// The encodings of two signed records (header and signature each) that share a writer,
/// device and sequence number, the lower hash first.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct ForkEvidence {
    pub first: Vec<u8>,
    pub second: Vec<u8>,
}

/// Largest record encoding evidence may carry: a header with 1024 parents and a signature.
pub const MAX_RECORD_BYTES: usize = 64 << 10;

impl ForkEvidence {
    /// Evidence from two records, in canonical order.
    pub fn of(a: &Record, b: &Record) -> Self {
        let (first, second) = if a.hash() < b.hash() { (a, b) } else { (b, a) };
        Self { first: first.encode(), second: second.encode() }
    }

    /// The fork it proves, if it proves one in `capsule`: both records well formed, of this
    /// capsule, each signed by its writer, different, with one writer, device and sequence
    /// number, in canonical order. (Whether that writer is a member is the holder's question:
    /// `Capsule::take_evidence`.)
    pub fn check(&self, capsule: CapsuleId) -> Result<Fork, VerifyError> {
        let refuse = |why: &str| VerifyError::Metadata(format!("fork evidence refused: {why}"));
        if self.first.len() > MAX_RECORD_BYTES || self.second.len() > MAX_RECORD_BYTES {
            return Err(refuse("a record larger than any header"));
        }
        let decode = |bytes: &[u8]| -> Result<(crate::record::RecordHash, Record), VerifyError> {
            let record = Record::decode(bytes).map_err(|_| refuse("a record that does not decode"))?;
            let hash = record.hash();
            let record = check_record_bytes(hash, bytes)?;
            if record.signature.is_none() {
                return Err(refuse("an unsigned record proves nothing of its writer"));
            }
            check_record_claims(capsule, hash, &record)?;
            Ok((hash, record))
        };
        let ((h1, r1), (h2, r2)) = (decode(&self.first)?, decode(&self.second)?);
        let (a, b) = (&r1.header, &r2.header);
        if h1 >= h2 {
            return Err(refuse("not two different records in hash order"));
        }
        if (a.writer, a.device, a.seq) != (b.writer, b.device, b.seq) {
            return Err(refuse("the records do not share a writer, device and sequence number"));
        }
        Ok(Fork { writer: a.writer, device: a.device, seq: a.seq, first: h1, second: h2 })
    }
}
