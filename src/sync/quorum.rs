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

use std::sync::mpsc;

use super::evidence::{is_fork, learn_evidence, pass_evidence};
use super::transfer::{pull_announced, push};
use super::{Progress, Report};
use crate::capsule::Capsule;
use crate::record::RecordHash;
use crate::replica::Replica;
use crate::wire::Announced;
use crate::{Error, Fork, Result};

/// Replicas of one capsule of which at most `faulty` may lie.
pub struct Quorum {
    members: Vec<Box<dyn Replica>>,
    faulty: usize,
    /// Threads that call the replicas at once, kept for the quorum's life: spawning a thread
    /// per call took 50 to 100 us each on a 2-core VM, a fifth of a quorum read.
    callers: rayon::ThreadPool,
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
        let forked = transfer.as_ref().is_err_and(is_fork);
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
        let callers = rayon::ThreadPoolBuilder::new()
            .num_threads(members.len())
            .thread_name(|i| format!("quorum-caller-{i}"))
            .build()
            .map_err(|e| Error::Replica(format!("starting the threads that call the replicas: {e}")))?;
        Ok(Self { members, faulty, callers })
    }

    /// How many replicas must answer a read or acknowledge a write.
    pub fn size(&self) -> usize {
        self.members.len() - self.faulty
    }

    /// `op(i, replica i)` on every replica at once (one caller thread each), results in
    /// replica order.
    fn each<T: Send>(&self, op: impl Fn(usize, &dyn Replica) -> T + Sync) -> Vec<T> {
        let mut results: Vec<Option<T>> = self.members.iter().map(|_| None).collect();
        self.callers.in_place_scope(|s| {
            for ((i, member), slot) in self.members.iter().enumerate().zip(&mut results) {
                let op = &op;
                s.spawn(move |_| *slot = Some(op(i, &**member)));
            }
        });
        results.into_iter().map(|r| r.expect("a scope ends when every call has")).collect()
    }

    /// Pulls the newest state a read quorum shows: every replica is asked for its heads at
    /// once, then each replica in turn whose heads are not all held here is pulled from,
    /// below those heads (each record proven before it is stored; once one replica gave the
    /// news the others' heads are usually held), then each replica that answered is sent
    /// what it lacks (write-back), and fork evidence is learned and passed on.
    pub fn pull(&self, local: &Capsule, progress: &dyn Progress) -> Result<Round> {
        let known_forks = if local.fork_count()? > 0 { local.forks()? } else { Vec::new() };
        // The heads round is the quorum read itself; no metadata round trip is needed, since
        // every record is checked against this capsule's own metadata (its id) as it arrives.
        // The first replica is asked from this thread (a hand-off to a caller and back cost
        // a tenth of a pull), the others by the callers at the same time; their answers are
        // taken as they come, so a replica with news is pulled from while the rest answer.
        // By replica: what it announced, and the pull below its heads.
        type Answer = (std::result::Result<Announced, String>, Result<Report>);
        let mut answered: Vec<Option<Answer>> = self.members.iter().map(|_| None).collect();
        self.callers.in_place_scope(|s| {
            let (answering, answers) = mpsc::channel();
            for (i, member) in self.members.iter().enumerate().skip(1) {
                let answering = answering.clone();
                s.spawn(move |_| drop(answering.send((i, member.announce().map_err(|e| e.to_string())))));
            }
            drop(answering);
            let first = (0, self.members[0].announce().map_err(|e| e.to_string()));
            for (i, said) in std::iter::once(first).chain(answers) {
                let transfer = match &said {
                    Err(e) => Err(Error::Replica(e.clone())),
                    Ok(said) => match holds_all(local, &said.heads) {
                        Ok(true) => Ok(Report::default()),
                        Ok(false) => pull_announced(local, &*self.members[i], said.heads.clone(), progress),
                        Err(e) => Err(e),
                    },
                };
                answered[i] = Some((said, transfer));
            }
        });
        let (announced, outcomes): (Vec<_>, Vec<_>) = answered
            .into_iter()
            .zip(&self.members)
            .map(|(answer, member)| {
                let (said, transfer) = answer.expect("a scope ends when every call has");
                (said, Outcome::new(&**member, transfer))
            })
            .unzip();
        let mut round = Round { outcomes, quorum: self.size(), forks_learned: Vec::new() }.check("reading heads")?;
        // A replica that announced exactly the heads held now lacks nothing; the others are
        // asked, all at once, and sent what they lack.
        let held = local.heads()?;
        let behind: Vec<bool> = (0..self.members.len())
            .map(|i| round.outcomes[i].transfer.is_ok() && announced[i].as_ref().is_ok_and(|said| said.heads != held))
            .collect();
        // Calls only when some replica is to be asked.
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
        // Fork evidence: learned from each replica that says it keeps some, and from one that
        // does not say (a bucket) when it is the first or gave records or a forked branch.
        let asked: Vec<bool> = round
            .outcomes
            .iter()
            .zip(&announced)
            .enumerate()
            .map(|(i, (outcome, said))| match said.as_ref().ok().and_then(|said| said.forks) {
                Some(forks) => forks > 0,
                None => i == 0 || outcome.forked || outcome.transfer.as_ref().is_ok_and(|r| r.records > 0),
            })
            .collect();
        if asked.contains(&true) {
            let learned =
                self.each(|i, m| if asked[i] { learn_evidence(local, m, &mut Report::default()) } else { Ok(()) });
            for (outcome, learned) in round.outcomes.iter().zip(learned) {
                if let Err(e) = learned {
                    tracing::warn!("asking {} for fork evidence: {e}", outcome.replica);
                }
            }
        }
        // Forks new here (learned from evidence, or met as a replica's record was refused),
        // when the capsule keeps any: passed on to every replica, and reported.
        if local.fork_count()? > 0 {
            self.pass_evidence(local, &round);
            for evidence in local.fork_evidence()? {
                let fork = evidence.check(local.id())?;
                if !known_forks.contains(&(fork.writer, fork.device, fork.seq)) && !round.forks_learned.contains(&fork)
                {
                    round.forks_learned.push(fork);
                }
            }
        }
        Ok(round)
    }

    /// Pushes to every replica at once; replicated once a write quorum acknowledged. A fork
    /// a replica refused reaches every replica as evidence.
    pub fn push(&self, local: &Capsule) -> Result<Round> {
        let known_forks = local.fork_count()?;
        let results = self.each(|_, m| push(local, m, &()));
        let outcomes = self.members.iter().zip(results).map(|(m, r)| Outcome::new(&**m, r)).collect();
        let round = Round { outcomes, quorum: self.size(), forks_learned: Vec::new() };
        if local.fork_count()? > known_forks {
            self.pass_evidence(local, &round);
        }
        round.check("pushing")
    }

    /// Gives every replica the fork evidence this capsule keeps.
    fn pass_evidence(&self, local: &Capsule, round: &Round) {
        let passed = self.each(|_, m| pass_evidence(local, m, &mut Report::default()));
        for (outcome, passed) in round.outcomes.iter().zip(passed) {
            if let Err(e) = passed {
                tracing::warn!("passing fork evidence on to {}: {e}", outcome.replica);
            }
        }
    }
}

/// Whether every one of `heads` is held here.
fn holds_all(local: &Capsule, heads: &[RecordHash]) -> Result<bool> {
    for h in heads {
        if !local.holds(h)? {
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
