//! Proofs and proven reads: every byte a capsule returns comes through here.

use std::num::NonZeroUsize;
use std::sync::Arc;

use super::Capsule;
use super::membership::{Revocations, Scope};
use crate::crypto::sign;
use crate::proof::verify::{Authority, CacheUse, Prover};
use crate::proof::{ProofCache, RecordProof, SubRecordProof, Verified};
use crate::record::{Payload, RecordHash, RecordHeader, SubIdx};
use crate::store::{Durability, SubValue};
use crate::{Error, Result, VerifyError};

/// Capacity of the throw-away cache of a proof that ignores earlier proofs.
const FRESH_PROOF_RECORDS: NonZeroUsize = NonZeroUsize::new(256).expect("non-zero");

/// Where a sparse capsule gets the sub-records it does not hold (`Capsule::fill_from`): runs
/// of them, as some replica stores them. Nothing it answers is believed: each is proven
/// against the stored header before it is kept or returned.
pub trait SubRecordFill: Send + Sync {
    /// Names the source in messages.
    fn describe(&self) -> String;
    /// The run of `record`'s sub-records that holds `idx`, each with its index (those the
    /// source holds in a row; `idx` may be missing).
    fn run_holding(&self, record: RecordHash, idx: SubIdx) -> Result<Vec<(SubIdx, Vec<u8>)>>;
}

/// Whether a proof may stop at records proven before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlierProofs {
    Use,
    Ignore,
}

impl Authority for Capsule {
    fn check_writer(&self, record: RecordHash, header: &RecordHeader) -> Result<()> {
        self.history.check_writer(&Scope::stored(self), record, header, Revocations::Ignore).map(drop)
    }
}

impl Capsule {
    pub(super) fn prover(&self) -> Prover<'_> {
        self.prover_with(&self.cache, CacheUse::MemoryAndStore)
    }

    pub(super) fn prover_with<'a>(&'a self, cache: &'a ProofCache, cache_use: CacheUse) -> Prover<'a> {
        Prover { authority: self, source: &self.store, trust: self.trust(), cache, cache_use }
    }

    /// The encoding of `record` with a signature made now, if it is unsigned and its writer's
    /// key is one this machine holds; None otherwise. The hash stays the same: the signature
    /// lies outside it. (Push signs what a replica would otherwise have to wait for.)
    pub fn sign_own(&self, record: RecordHash) -> Result<Option<Vec<u8>>> {
        let mut parsed = self.record(record)?;
        if parsed.signature.is_some() {
            return Ok(None);
        }
        let Some(identity) = self.local.iter().find(|i| i.writer() == parsed.header.writer) else { return Ok(None) };
        parsed.signature = Some(sign::sign_record(identity.key(), &record));
        Ok(Some(parsed.encode()))
    }

    /// The header of `record`, proven.
    pub fn proven_header(&self, record: RecordHash) -> Result<Arc<RecordHeader>> {
        Ok(self.prover().prove_record(record)?.0)
    }

    /// Proves a record, stopping at earlier proofs or ignoring them.
    pub fn prove_record(&self, record: RecordHash, earlier: EarlierProofs) -> Result<RecordProof> {
        match earlier {
            EarlierProofs::Use => Ok(self.prover().prove_record(record)?.1),
            EarlierProofs::Ignore => {
                let fresh = ProofCache::new(FRESH_PROOF_RECORDS);
                Ok(self.prover_with(&fresh, CacheUse::MemoryOnly).prove_record(record)?.1)
            }
        }
    }

    /// Proves a sub-record without returning its bytes.
    pub fn prove_sub_record(&self, record: RecordHash, idx: SubIdx, earlier: EarlierProofs) -> Result<SubRecordProof> {
        match earlier {
            EarlierProofs::Use => Ok(self.prover().read_sub_record(record, idx)?.1),
            EarlierProofs::Ignore => {
                let fresh = ProofCache::new(FRESH_PROOF_RECORDS);
                Ok(self.prover_with(&fresh, CacheUse::MemoryOnly).read_sub_record(record, idx)?.1)
            }
        }
    }

    /// Sub-record `idx` of `record`, returned only after it is proven. A sparse replica that
    /// does not hold it fetches it from the replica `fill_from` named, proves it against the
    /// stored header, keeps it, and returns it.
    pub fn read_sub_record(&self, record: RecordHash, idx: SubIdx) -> Result<(Verified<Payload>, SubRecordProof)> {
        let read = self.prover().read_sub_record(record, idx);
        let Some(source) = self.filler.get() else { return read };
        match &read {
            Err(Error::Verify(VerifyError::MissingSubRecord { .. })) => {}
            // A kept copy that is damaged (or never reached the disk before a power cut: kept
            // copies are not synced) is fetched again, and proven like the first time.
            Err(
                e @ (Error::Verify(VerifyError::MerkleMismatch { .. } | VerifyError::MalformedSubRecord { .. })
                | Error::Store(_)),
            ) => tracing::warn!("{e}: fetching sub-record {} of {record:?} again from {}", idx.0, source.describe()),
            _ => return read,
        }
        let (prover, mut batch, mut asked) = (self.prover(), self.store.batch(), None);
        // The rest of the run is kept too, each proven first (a bad one is left out: a read
        // of it fetches it again, and fails then if it is still bad).
        for (i, bytes) in source.run_holding(record, idx)? {
            match prover.check_sub_record(record, i, bytes.clone()) {
                Ok(proven) => {
                    batch.put_sub_record(&record, i, SubValue::Bytes(bytes));
                    if i == idx {
                        asked = Some(proven);
                    }
                }
                Err(e) if i == idx => return Err(e),
                Err(e) => tracing::debug!("not keeping sub-record {} of {record:?}: {e}", i.0),
            }
        }
        let proven = asked.ok_or_else(|| {
            Error::Replica(format!(
                "{}: lost sub-record {} of {record:?}, which this sparse copy does not hold either: \
                 read it from another replica (`capsulefs pull NAME URL`)",
                source.describe(),
                idx.0
            ))
        })?;
        if let Err(e) = self.store.write(batch, Durability::Cache) {
            // A store opened read-only beside a mount: the next read fetches it again.
            tracing::debug!("not keeping fetched sub-records: {e}");
        }
        Ok(proven)
    }

    /// Makes this a sparse replica's capsule: sub-records it does not hold are fetched from
    /// `source` when read (and proven like any other). Set once; later calls are ignored.
    pub fn fill_from(&self, source: impl SubRecordFill + 'static) {
        let _ = self.filler.set(Box::new(source));
    }
}
