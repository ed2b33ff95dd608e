//! Fork evidence between the local capsule and a replica: learnt from a refusal or a
//! replica's store, checked against the metadata, and passed on to every replica.

use crate::capsule::Capsule;
use crate::proof::fork::ForkEvidence;
use crate::replica::Replica;
use crate::{Error, Result, VerifyError};

use super::Report;

/// Whether `e` refuses records as a fork: met here, or said by a replica.
pub fn is_fork(e: &Error) -> bool {
    match e {
        Error::Verify(VerifyError::Equivocation(_)) => true,
        Error::Verify(VerifyError::Refused { reason, .. }) => reason == "equivocation",
        _ => false,
    }
}

/// A replica refused a push as a fork, and kept the evidence: this capsule takes it too, to
/// pass on to every other replica.
pub(super) fn learn_fork(local: &Capsule, remote: &dyn Replica, e: &Error) {
    if is_fork(e)
        && let Err(learning) = learn_evidence(local, remote, &mut Report::default())
    {
        tracing::warn!("{} refused a fork, but its evidence could not be read: {learning}", remote.describe());
    }
}

/// A pull met a fork in what `remote` served, and this capsule kept the evidence: the
/// replica gets it too, to serve to every other client.
pub(super) fn tell_fork(local: &Capsule, remote: &dyn Replica, e: &Error) {
    if is_fork(e)
        && let Err(telling) = pass_evidence(local, remote, &mut Report::default())
    {
        tracing::warn!("passing fork evidence on to {}: {telling}", remote.describe());
    }
}

/// Gives `remote` the fork evidence this capsule keeps (nothing, and no request, when it
/// keeps none), so that the replica serves it to every other client.
pub fn pass_evidence(local: &Capsule, remote: &dyn Replica, report: &mut Report) -> Result<()> {
    let evidence = local.fork_evidence()?;
    if !evidence.is_empty() {
        remote.put_evidence(&evidence)?;
        report.round_trips += 1;
    }
    Ok(())
}

/// Takes the fork evidence `remote` keeps, each piece checked against the metadata; what was
/// new here goes in `report.forks_learned`. Evidence that does not check is refused and
/// logged: a replica that sends it lies, but cannot make this capsule believe a fork.
pub fn learn_evidence(local: &Capsule, remote: &dyn Replica, report: &mut Report) -> Result<()> {
    let evidence = remote.evidence()?;
    report.round_trips += 1;
    take_evidence(local, remote, &evidence, report);
    Ok(())
}

/// Keeps the fork evidence `remote` gave, each piece once it checks.
pub fn take_evidence(local: &Capsule, remote: &dyn Replica, evidence: &[ForkEvidence], report: &mut Report) {
    for e in evidence {
        match local.take_evidence(e) {
            Ok(Some(fork)) => report.forks_learned.push(fork),
            Ok(None) => {}
            Err(err) => tracing::warn!("{} sent fork evidence that does not check: {err}", remote.describe()),
        }
    }
}
