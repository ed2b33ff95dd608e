//! Records made on this machine: `append` and the commits built on it.

use super::{Capsule, WriteState, now_ms};
use crate::crypto::keys::Identity;
use crate::crypto::sign;
use crate::record::codec::{Canonical, FORMAT_VERSION};
use crate::record::{
    DeviceId, KeyGen, NodeHash, Record, RecordHash, RecordHeader, RecordKind, Seq, SubRecordBuf, merkle,
};
use crate::store::{Durability, SubValue};
use crate::{Error, Result};

/// How `Capsule::append` writes a record.
#[derive(Clone, Copy, Debug)]
pub struct AppendOptions {
    pub sign: bool,
    pub kind: RecordKind,
    pub key_gen: KeyGen,
    pub durability: Durability,
}

impl Default for AppendOptions {
    fn default() -> Self {
        Self { sign: false, kind: RecordKind::Data, key_gen: KeyGen(0), durability: Durability::Durable }
    }
}

/// Which records a new record names as its parents.
#[derive(Clone, Copy, Debug)]
pub enum Parents<'a> {
    /// Every current head: the record merges everything this store holds.
    AllHeads,
    /// Exactly these (a filesystem commit names the records whose state it contains).
    These(&'a [RecordHash]),
}

/// The Merkle root over the payloads, and each sub-record encoded with its path.
pub(crate) fn sub_records(subs: Vec<SubRecordBuf>) -> (NodeHash, Vec<Vec<u8>>) {
    let leaves: Vec<_> = subs.iter().map(SubRecordBuf::leaf).collect();
    let (root, paths) = merkle::build(&leaves);
    (root, subs.into_iter().zip(paths).map(|(s, path)| s.finish(&path)).collect())
}

fn copied(payloads: &[&[u8]]) -> Vec<SubRecordBuf> {
    payloads.iter().map(|p| SubRecordBuf::copied(p)).collect()
}

impl Capsule {
    /// Appends one record holding `payloads` as sub-records, on top of every current head.
    pub fn append(&self, writer: &Identity, payloads: &[&[u8]], opts: AppendOptions) -> Result<RecordHash> {
        self.append_built(writer, Parents::AllHeads, copied(payloads), opts)
    }

    /// `append` of sub-records whose payloads were written in place (see `SubRecordBuf`), on
    /// top of `parents`.
    pub fn append_built(
        &self,
        writer: &Identity,
        parents: Parents<'_>,
        subs: Vec<SubRecordBuf>,
        opts: AppendOptions,
    ) -> Result<RecordHash> {
        let sub_count = u32::try_from(subs.len()).map_err(|_| Error::Invalid("too many sub-records".into()))?;
        let mut state = self.write_lock.lock().expect("no panics while locked");
        let mut parents = match parents {
            Parents::AllHeads => self.proven_heads(&mut state)?,
            Parents::These(given) => {
                let mut given = given.to_vec();
                given.sort();
                given.dedup();
                for p in &given {
                    self.check_proven_parent(&state, *p)?;
                }
                given
            }
        };
        if parents.is_empty() {
            parents.push(RecordHash::genesis(self.id));
        }
        let w = writer.writer();
        let (device, seq) = self.next_number(&mut state, &w)?;
        let (merkle_root, subs) = sub_records(subs);
        let header = RecordHeader {
            version: FORMAT_VERSION,
            capsule: self.id,
            parents,
            writer: w,
            device,
            seq,
            time_ms: now_ms(),
            kind: opts.kind,
            key_gen: opts.key_gen,
            sub_count,
            merkle_root,
        };
        header.check().map_err(|e| Error::Invalid(format!("record: {e}")))?;
        let h = header.hash();
        // Signed just above: verifying it again was a tenth of an fsync-heavy workload's CPU.
        let signature = opts.sign.then(|| sign::sign_record(writer.key(), &h));
        let attestation = (!opts.sign).then(|| sign::attest(writer.key(), &self.id, &h));
        let subs = subs.into_iter().map(SubValue::Bytes).collect();
        self.admit_local(&mut state, h, Record { header, signature }, subs, attestation, opts.durability)?;
        Ok(h)
    }

    /// The current heads that prove (those this process stored are known to); a head that
    /// does not is never built upon, and is logged.
    fn proven_heads(&self, state: &mut WriteState) -> Result<Vec<RecordHash>> {
        let mut proven = Vec::new();
        for head in state.heads(&self.store)? {
            match self.check_proven_parent(state, head) {
                Ok(()) => proven.push(head),
                Err(Error::Verify(e)) => tracing::error!("not building on head {head:?}, which does not prove: {e}"),
                Err(e) => return Err(e),
            }
        }
        Ok(proven)
    }

    /// Refuses a parent that does not prove: a new record vouches for its parents.
    fn check_proven_parent(&self, state: &WriteState, parent: RecordHash) -> Result<()> {
        if parent == RecordHash::genesis(self.id) || state.head_facts.contains_key(&parent) {
            return Ok(());
        }
        self.prover().prove_record(parent).map(drop)
    }

    /// The device and sequence number `writer`'s next record here gets. A device whose
    /// numbers would run out gives way to a new one.
    fn next_number(&self, state: &mut WriteState, writer: &crate::record::WriterId) -> Result<(DeviceId, Seq)> {
        let device = state.device(&self.store)?;
        match state.last_seq(&self.store, writer, &device)? {
            None => Ok((device, Seq(1))),
            Some(last) => match last.0.checked_add(1) {
                Some(next) => Ok((device, Seq(next))),
                None => {
                    let fresh = state.new_device(&self.store)?;
                    tracing::warn!("device {device:?} used up its sequence numbers; numbering from {fresh:?} on");
                    Ok((fresh, Seq(1)))
                }
            },
        }
    }
}
