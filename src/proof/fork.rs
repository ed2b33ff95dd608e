//! Fork evidence that anyone can check: two records of one writer, device and sequence number,
//! each vouched for by that writer (signed, or an ancestor of a record the writer signed, with
//! the chain of records between). Checking it takes the capsule's metadata alone (no content
//! key, no other record), so replicas keep it and serve it to every client, and clients pass it
//! on to every replica they talk to.

use borsh::{BorshDeserialize, BorshSerialize};

use super::verify::{check_record_bytes, check_record_claims};
use crate::record::{CapsuleId, Record, RecordHash};
use crate::{Fork, VerifyError};

/// One record of a fork, with what makes its writer vouch for it: nothing when it is signed;
/// else the records from its child up to a record its writer signed, each naming the one
/// before it as a parent.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct Vouched {
    pub record: Vec<u8>,
    pub anchor: Vec<Vec<u8>>,
}

impl Vouched {
    pub fn signed(record: &Record) -> Self {
        Self { record: record.encode(), anchor: Vec::new() }
    }
}

/// Two records of one writer, device and sequence number, the lower hash first.
#[derive(Clone, Debug, PartialEq, Eq, BorshSerialize, BorshDeserialize)]
pub struct ForkEvidence {
    pub first: Vouched,
    pub second: Vouched,
}

/// Largest record encoding evidence may carry: a header with 1024 parents and a signature.
pub const MAX_RECORD_BYTES: usize = 64 << 10;
/// Most records between an unsigned record of a fork and its writer's signature.
pub const MAX_ANCHOR_LINKS: usize = 256;

impl ForkEvidence {
    /// Evidence from two records, in canonical order (by the hash of their encodings).
    pub fn of(a: Vouched, b: Vouched) -> Self {
        let hash = |v: &Vouched| Record::decode(&v.record).map(|r| r.hash()).ok();
        if hash(&a) < hash(&b) { Self { first: a, second: b } } else { Self { first: b, second: a } }
    }

    /// The fork it proves, if it proves one in `capsule`: both records well formed, of this
    /// capsule, each vouched for by its writer, different, with one writer, device and
    /// sequence number, in canonical order. (Whether that writer is a member is the holder's
    /// question: `Capsule::take_evidence`.)
    pub fn check(&self, capsule: CapsuleId) -> Result<Fork, VerifyError> {
        let (h1, r1) = vouched(capsule, &self.first)?;
        let (h2, r2) = vouched(capsule, &self.second)?;
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

fn refuse(why: &str) -> VerifyError {
    VerifyError::Metadata(format!("fork evidence refused: {why}"))
}

fn decode(capsule: CapsuleId, bytes: &[u8]) -> Result<(RecordHash, Record), VerifyError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(refuse("a record larger than any header"));
    }
    let record = Record::decode(bytes).map_err(|_| refuse("a record that does not decode"))?;
    let hash = record.hash();
    let record = check_record_bytes(hash, bytes)?;
    check_record_claims(capsule, hash, &record)?;
    Ok((hash, record))
}

/// The record of one side, once its writer's signature is found to cover it.
fn vouched(capsule: CapsuleId, side: &Vouched) -> Result<(RecordHash, Record), VerifyError> {
    let (hash, record) = decode(capsule, &side.record)?;
    if record.signature.is_some() {
        return match side.anchor.is_empty() {
            true => Ok((hash, record)),
            false => Err(refuse("a signed record with an anchor chain")),
        };
    }
    if side.anchor.is_empty() {
        return Err(refuse("an unsigned record without its writer's signed descendant proves nothing"));
    }
    if side.anchor.len() > MAX_ANCHOR_LINKS {
        return Err(refuse("an anchor chain longer than any writer leaves records unsigned"));
    }
    let mut previous = hash;
    let mut last = None;
    for link in &side.anchor {
        let (h, parsed) = decode(capsule, link)?;
        if parsed.header.parents.binary_search(&previous).is_err() {
            return Err(refuse("an anchor chain whose records do not name the one before"));
        }
        previous = h;
        last = Some(parsed);
    }
    match last {
        Some(end) if end.signature.is_some() && end.header.writer == record.header.writer => Ok((hash, record)),
        _ => Err(refuse("an anchor chain that does not end at a record its writer signed")),
    }
}
