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
//! A pull through a quorum (`Quorum::pull`) pulls from the first replica (and asks it for its
//! fork evidence) while asking the others for their heads, pulls from each that announced a record held nowhere here, then
//! sends each replica that answered what it lacks (write-back), so one reader heals the set.

use super::Replica;
use super::transfer::{Progress, Report, learn_evidence, pass_evidence, pull, pull_announced, push, take_evidence};
use crate::capsule::Capsule;
use crate::record::RecordHash;
use crate::{Error, Fork, Result, VerifyError};

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
    /// Its records were refused as a fork: it answered, with the other branch of a writer
    /// that signed two records with one number.
    pub forked: bool,
}

impl Outcome {
    fn new(replica: &dyn Replica, transfer: Result<Report>) -> Self {
        let forked = matches!(&transfer, Err(Error::Verify(VerifyError::Equivocation(_))));
        Self { replica: replica.describe(), transfer: transfer.map_err(|e| e.to_string()), written_back: None, forked }
    }

    /// Whether it answered: with what was asked, or with a forked branch.
    fn acknowledged(&self) -> bool {
        self.transfer.is_ok() || self.forked
    }
}

/// Every replica's outcome, and how many had to succeed.
pub struct Round {
    pub outcomes: Vec<Outcome>,
    pub quorum: usize,
    /// Forks this round found that were not known here before: from the replicas' evidence,
    /// or met when a replica's record was refused as equivocation.
    pub forks_learned: Vec<Fork>,
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

    /// `op(i, replica i)` on every replica at once (a thread each), results in replica order.
    fn each<T: Send>(&self, op: impl Fn(usize, &dyn Replica) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let op = &op;
            let running: Vec<_> = self.members.iter().enumerate().map(|(i, m)| s.spawn(move || op(i, &**m))).collect();
            running.into_iter().map(|t| t.join().expect("a replica call panicked")).collect()
        })
    }

    /// Pulls the newest state a read quorum shows: a plain pull from the first replica while
    /// the others are asked for their heads (so a quorum costs little more than one replica
    /// when they agree), then from each of them whatever its heads cover that is held nowhere
    /// here (each record proven before it is stored), then the write-back of what each
    /// replica that answered lacks.
    pub fn pull(&self, local: &Capsule, progress: &dyn Progress) -> Result<Round> {
        let known_forks = local.forks()?;
        let (first, others) = self.members.split_first().expect("a policy has replicas");
        // The first replica's fork evidence is asked alongside its pull: the pull usually
        // brings records, and one more request after it was a fifth of a quorum pull's time.
        let (first_pull, first_evidence, others_heads) = std::thread::scope(|s| {
            let asked: Vec<_> = others.iter().map(|m| s.spawn(|| m.heads())).collect();
            let evidence = s.spawn(|| first.evidence());
            let first_pull = pull(local, &**first, progress);
            let heads = asked.into_iter().map(|t| t.join().expect("a replica call panicked")).collect::<Vec<_>>();
            (first_pull, evidence.join().expect("a replica call panicked"), heads)
        });
        let mut announced = vec![first_pull.as_ref().map(|r| r.replica_heads.clone()).map_err(|e| e.to_string())];
        let mut outcomes = vec![Outcome::new(&**first, first_pull)];
        for (member, heads) in others.iter().zip(others_heads) {
            let transfer = match &heads {
                Err(e) => Err(Error::Replica(e.to_string())),
                Ok(heads) if holds_all(local, heads)? => Ok(Report::default()),
                Ok(heads) => pull_announced(local, &**member, heads.clone(), progress),
            };
            announced.push(heads.map_err(|e| e.to_string()));
            outcomes.push(Outcome::new(&**member, transfer));
        }
        let mut round = Round { outcomes, quorum: self.size(), forks_learned: Vec::new() }.check("reading heads")?;
        // A replica that announced exactly the heads held now lacks nothing; the others are
        // asked, all at once, and sent what they lack.
        let held = local.heads()?;
        let behind: Vec<bool> = (0..self.members.len())
            .map(|i| round.outcomes[i].transfer.is_ok() && announced[i].as_ref().is_ok_and(|heads| *heads != held))
            .collect();
        // Threads only when some replica is to be asked: spawning four was a tenth of a pull.
        let lacking = if behind.contains(&true) {
            self.each(|i, m| behind[i] && m.missing(&held).map(|missing| !missing.is_empty()).unwrap_or(false))
        } else {
            vec![false; self.members.len()]
        };
        for ((outcome, member), lacks) in round.outcomes.iter_mut().zip(&self.members).zip(lacking) {
            if lacks {
                outcome.written_back = Some(push(local, &**member, &()).map_err(|e| e.to_string()));
            }
        }
        // Fork evidence: learned from each replica that gave records or a forked branch (one
        // that gave nothing new is asked at a later pull that brings records), then, when this
        // capsule keeps any, passed on to every replica, so a fork one of them saw reaches all.
        match first_evidence {
            Ok(evidence) => take_evidence(local, &**first, &evidence, &mut Report::default()),
            Err(e) => tracing::warn!("asking {} for fork evidence: {e}", first.describe()),
        }
        for (outcome, member) in round.outcomes.iter().zip(&self.members).skip(1) {
            let gave = outcome.forked || outcome.transfer.as_ref().is_ok_and(|r| r.records > 0);
            if gave && let Err(e) = learn_evidence(local, &**member, &mut Report::default()) {
                tracing::warn!("asking {} for fork evidence: {e}", outcome.replica);
            }
        }
        if !local.fork_evidence()?.is_empty() {
            let passed = self.each(|_, m| pass_evidence(local, m, &mut Report::default()));
            for (outcome, passed) in round.outcomes.iter().zip(passed) {
                if let Err(e) = passed {
                    tracing::warn!("passing fork evidence on to {}: {e}", outcome.replica);
                }
            }
        }
        // Forks new here: learned from evidence, or met as a replica's record was refused.
        for evidence in local.fork_evidence()? {
            let fork = evidence.check(local.id())?;
            if !known_forks.contains(&(fork.writer, fork.device, fork.seq)) && !round.forks_learned.contains(&fork) {
                round.forks_learned.push(fork);
            }
        }
        Ok(round)
    }

    /// Pushes to every replica at once; replicated once a write quorum acknowledged.
    pub fn push(&self, local: &Capsule) -> Result<Round> {
        let results = self.each(|_, m| push(local, m, &()));
        let outcomes = self.members.iter().zip(results).map(|(m, r)| Outcome::new(&**m, r)).collect();
        Round { outcomes, quorum: self.size(), forks_learned: Vec::new() }.check("pushing")
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
