//! Quorums over replicas that may lie (BFTKV's read and write quorums, applied to capsules).
//!
//! A capsule with `n` replicas of which at most `B` may be faulty (`n >= 3B + 1`) reads heads
//! from every replica and goes on once `q = n - B` answered, and counts a write as replicated
//! once `q` acknowledged it. Records are self-verifying: a faulty replica cannot forge one, only
//! withhold, serve an old state, or show different histories to different readers. So a read
//! needs one honest replica of the last write quorum, not a majority of matching answers:
//! two sets of `q` among `n` share at least `2q - n = n - 2B >= B + 1` replicas, of which at
//! least one is honest, and its heads, taken with everyone else's (the union, each record then
//! proven as in any pull), hold what the write quorum acknowledged. BFTKV's masking quorums
//! need `(n + 2B + 1) / 2` matching answers because its values are not self-verifying; we need
//! none to match.
//!
//! A pull through a quorum (`Quorum::pull`) asks every replica for its heads at once, pulls
//! from each that announced a record held nowhere here, then sends each replica that answered
//! what it lacks (write-back), so one reader heals the set.

use super::Replica;
use super::transfer::{Progress, Report, pull, push};
use crate::capsule::Capsule;
use crate::record::RecordHash;
use crate::{Error, Result};

/// Replicas of one capsule of which at most `faulty` may lie.
pub struct Quorum {
    members: Vec<Box<dyn Replica>>,
    faulty: usize,
}

/// What a round through a quorum did at one replica.
pub struct Outcome {
    pub replica: String,
    /// The pull from it or push to it; the error, if it failed.
    pub transfer: std::result::Result<Report, String>,
    /// What a pull sent back to it because it lacked records held here.
    pub written_back: Option<std::result::Result<Report, String>>,
}

impl Outcome {
    fn acknowledged(&self) -> bool {
        self.transfer.is_ok()
    }
}

/// Every replica's outcome, and how many had to succeed.
pub struct Round {
    pub outcomes: Vec<Outcome>,
    pub quorum: usize,
}

impl Round {
    pub fn acknowledged(&self) -> usize {
        self.outcomes.iter().filter(|o| o.acknowledged()).count()
    }

    /// An error when fewer than a quorum answered (`doing`: what the round was for).
    fn check(self, doing: &str) -> Result<Round> {
        if self.acknowledged() >= self.quorum {
            return Ok(self);
        }
        let failures: Vec<String> = self
            .outcomes
            .iter()
            .filter_map(|o| o.transfer.as_ref().err().map(|e| format!("{}: {e}", o.replica)))
            .collect();
        Err(Error::Replica(format!(
            "{doing}: {} of {} replicas answered, a quorum is {} (at most {} may be faulty); bring replicas \
             back or lower `capsulefs replica policy --faulty`. {}",
            self.acknowledged(),
            self.outcomes.len(),
            self.quorum,
            self.outcomes.len() - self.quorum,
            failures.join("; ")
        )))
    }
}

/// Whether `n` replicas can tolerate `faulty` liars: `n >= 3 * faulty + 1`.
pub fn check_policy(n: usize, faulty: usize) -> Result<()> {
    if n < 3 * faulty + 1 {
        return Err(Error::Invalid(format!(
            "{n} replicas cannot outvote {faulty} faulty ones: that takes at least {} (3 x {faulty} + 1); add \
             replicas with `capsulefs replica add`, or lower --faulty",
            3 * faulty + 1
        )));
    }
    Ok(())
}

impl Quorum {
    pub fn new(members: Vec<Box<dyn Replica>>, faulty: usize) -> Result<Self> {
        check_policy(members.len(), faulty)?;
        Ok(Self { members, faulty })
    }

    /// How many replicas must answer a read or acknowledge a write.
    pub fn size(&self) -> usize {
        self.members.len() - self.faulty
    }

    /// `op` on every replica at once (a thread each), results in replica order.
    fn each<T: Send>(&self, op: impl Fn(&dyn Replica) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let running: Vec<_> = self.members.iter().map(|m| s.spawn(|| op(&**m))).collect();
            running.into_iter().map(|t| t.join().expect("a replica call panicked")).collect()
        })
    }

    /// Pulls the newest state a read quorum shows: every replica's heads, the records any of
    /// them has that are held nowhere here (each proven before it is stored), then the
    /// write-back of what each replica that answered lacks.
    pub fn pull(&self, local: &Capsule, progress: &dyn Progress) -> Result<Round> {
        let heads = self.each(|m| m.heads());
        let mut outcomes = Vec::new();
        for (member, heads) in self.members.iter().zip(heads) {
            let transfer = match heads {
                Err(e) => Err(e),
                Ok(heads) if holds_all(local, &heads)? => Ok(Report::default()),
                Ok(_) => pull(local, &**member, progress),
            };
            outcomes.push(Outcome {
                replica: member.describe(),
                transfer: transfer.map_err(|e| e.to_string()),
                written_back: None,
            });
        }
        let round = Round { outcomes, quorum: self.size() }.check("reading heads")?;
        let held = local.heads()?;
        let mut outcomes = round.outcomes;
        let lacking = self.each(|m| m.missing(&held).map(|missing| !missing.is_empty()));
        for ((outcome, member), lacks) in outcomes.iter_mut().zip(&self.members).zip(lacking) {
            if outcome.acknowledged() && lacks.unwrap_or(false) {
                outcome.written_back = Some(push(local, &**member, &()).map_err(|e| e.to_string()));
            }
        }
        Ok(Round { outcomes, quorum: round.quorum })
    }

    /// Pushes to every replica at once; replicated once a write quorum acknowledged.
    pub fn push(&self, local: &Capsule) -> Result<Round> {
        let results = self.each(|m| push(local, m, &()));
        let outcomes = self
            .members
            .iter()
            .zip(results)
            .map(|(m, r)| Outcome { replica: m.describe(), transfer: r.map_err(|e| e.to_string()), written_back: None })
            .collect();
        Round { outcomes, quorum: self.size() }.check("pushing")
    }
}

/// Whether every one of `heads` is held here.
fn holds_all(local: &Capsule, heads: &[RecordHash]) -> Result<bool> {
    for h in heads {
        if !local.store().has_record(h)? {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::check_policy;

    #[test]
    fn a_policy_takes_3b_plus_1_replicas() {
        for (n, b, ok) in [(1, 0, true), (3, 1, false), (4, 1, true), (6, 2, false), (7, 2, true), (10, 3, true)] {
            assert_eq!(check_policy(n, b).is_ok(), ok, "n = {n}, B = {b}");
        }
    }
}
