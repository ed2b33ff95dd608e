//! What a replica answered, on its way to the gate: checked bundle by bundle, then admitted
//! together; and what is sent, counted as it goes.

use super::{Progress, Report, Take};
use crate::capsule::{Admission, Capsule, Pending};
use crate::record::{Record, RecordHash, RecordKind, SubIdx};
use crate::replica::Replica;
use crate::store::Durability;
use crate::wire::Bundle;
use crate::{Error, Result, VerifyError};

/// `batch`, counted in `report` and shown as moved, on its way to a replica.
pub(super) fn counted(batch: Vec<Bundle>, report: &mut Report, progress: &dyn Progress) -> Vec<Bundle> {
    report.bytes += batch.iter().map(|b| b.size() as u64).sum::<u64>();
    report.records += batch.len();
    progress.moved(report.records as u64, report.bytes);
    batch
}

/// Checks one answer's `bundles` (each as the record it was asked as, if given) and hands
/// them to the gate together (without payloads when `taking` headers, except a membership
/// record's: the rights every later record is checked against are read from them); counts
/// what it stored. Records still waiting for their writer's signature wait in `pending`.
pub(super) fn take(
    local: &Capsule,
    remote: &dyn Replica,
    bundles: Vec<(Bundle, Option<RecordHash>)>,
    taking: Take,
    pending: &mut Pending,
    report: &mut Report,
    progress: &dyn Progress,
) -> Result<()> {
    let mut batch = Vec::with_capacity(bundles.len());
    for (mut bundle, expected) in bundles {
        if taking == Take::Headers && bundle.payloads.is_empty() {
            bundle.payloads = membership_payloads(remote, &bundle.record)?;
        }
        let size = bundle.size() as u64;
        let incoming = if taking == Take::Headers && bundle.payloads.is_empty() {
            local.check_incoming_header(&bundle.record)?
        } else {
            local.check_incoming(&bundle.record, bundle.payloads)?
        };
        if let Some(expected) = expected
            && incoming.hash() != expected
        {
            return Err(Error::Invalid(format!(
                "{} answered {:?} when asked for {expected:?}",
                remote.describe(),
                incoming.hash()
            )));
        }
        report.bytes += size;
        batch.push(incoming);
    }
    let admitted = local.admit(batch, Admission::Pull(pending), Durability::Buffered)?;
    report.records += admitted.stored.len();
    for h in admitted.revoked {
        if !report.revoked.contains(&h) {
            tracing::warn!("{}: kept out {h:?}: a revocation held here cuts it off", remote.describe());
            report.revoked.push(h);
        }
    }
    progress.moved(report.records as u64, report.bytes);
    Ok(())
}

/// The payloads of `record` when it is a membership record (fetched from `remote`); none else.
fn membership_payloads(remote: &dyn Replica, record: &[u8]) -> Result<Vec<Vec<u8>>> {
    let parsed = Record::decode(record).map_err(VerifyError::Undecodable)?;
    let header = &parsed.header;
    if header.kind != RecordKind::Membership || header.sub_count == 0 {
        return Ok(Vec::new());
    }
    let h = parsed.hash();
    let run = remote.sub_record_run(h, SubIdx(0), header.sub_count)?;
    if run.len() != header.sub_count as usize {
        return Err(Error::Replica(format!(
            "{} holds {} of the {} entries of membership record {h:?}: pull it whole from another replica",
            remote.describe(),
            run.len(),
            header.sub_count
        )));
    }
    run.into_iter().enumerate().map(|(i, stored)| crate::replica::payload_of(h, SubIdx(i as u32), stored)).collect()
}
