//! Which commits are signed: the capsule's K-records / T-seconds bound on unsigned commits,
//! applied to every commit a mount makes, and the signed commits that make every commit so
//! far provable without the writer's key (fsync, unmount, and unsigned commits overdue).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::filesystem::{Fs, Signing};
use crate::Result;
use crate::record::Params;
use crate::store::Durability;

/// When unsigned commits must end with a signed one (the capsule's K and T bounds).
pub struct SignPolicy {
    every_records: u32,
    every: Duration,
    /// Commits since the last signed one, and when the first of them was made.
    unsigned: u32,
    since: Option<Instant>,
    /// Commits made by this mount, and how many of them signed (for `.capsule/status`).
    pub commits: u64,
    pub signed: u64,
}

impl SignPolicy {
    pub fn new(params: &Params) -> Self {
        Self {
            every_records: params.sign_every_records.max(1),
            every: Duration::from_secs(u64::from(params.sign_every_secs)),
            unsigned: 0,
            since: None,
            commits: 0,
            signed: 0,
        }
    }

    fn due(&self) -> bool {
        self.unsigned + 1 >= self.every_records || self.overdue()
    }

    /// Whether unsigned commits have waited T seconds for a signature.
    fn overdue(&self) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= self.every)
    }

    fn record(&mut self, sign: Signing) {
        self.commits += 1;
        match sign {
            Signing::Now => {
                self.signed += 1;
                (self.unsigned, self.since) = (0, None);
            }
            Signing::Later => {
                self.unsigned += 1;
                self.since.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// Commits pending changes: signed now when `asked` says so or the policy's bound is due.
pub fn commit(policy: &Mutex<SignPolicy>, fs: &mut Fs, asked: Signing, durability: Durability) -> Result<()> {
    if !fs.is_dirty() {
        return Ok(());
    }
    let mut policy = policy.lock().expect("no panics while locked");
    let sign = if policy.due() { Signing::Now } else { asked };
    if fs.commit(sign, durability)?.is_some() {
        policy.record(sign);
    }
    Ok(())
}

/// fsync, fsyncdir and unmount: everything pending in a signed commit; with nothing pending,
/// a signature for commits still unsigned (so every commit can be proven without the
/// writer's key); either way every commit so far durable before returning, including ones
/// that closes made, buffered, just before.
pub fn commit_durable(policy: &Mutex<SignPolicy>, fs: &mut Fs) -> Result<()> {
    if fs.is_dirty() {
        return commit(policy, fs, Signing::Now, Durability::Durable);
    }
    if !sign_waiting(policy, fs, Waited::AtAll, Durability::Durable)? {
        fs.sync()?;
    }
    Ok(())
}

/// How long unsigned commits must have waited for `sign_waiting` to sign them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// The policy's T seconds (the timer's tick).
    Overdue,
    /// Any time at all (fsync and unmount).
    AtAll,
}

/// Signs a commit of nothing when unsigned ones have waited as `waited` says. Returns whether
/// it signed.
pub fn sign_waiting(policy: &Mutex<SignPolicy>, fs: &mut Fs, waited: Waited, durability: Durability) -> Result<bool> {
    let mut policy = policy.lock().expect("no panics while locked");
    let waiting = match waited {
        Waited::Overdue => policy.overdue(),
        Waited::AtAll => policy.unsigned > 0,
    };
    if waiting {
        fs.sign_now(durability)?;
        policy.record(Signing::Now);
    }
    Ok(waiting)
}
