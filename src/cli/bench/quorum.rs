//! `capsulefs bench quorum`: what reading through a quorum of replicas costs, and how often a
//! forked writer is caught.
//!
//! Latency: four `capsulefs serve` and a fifth alone, all holding the same capsule. Each round
//! a writer appends one signed record and pushes it to all five (not timed); a reader pulls
//! it once from the lone server and once through the quorum of four (`Quorum::pull`, with
//! write-back), in alternating order. Medians of `--rounds` rounds.
//!
//! Detection: a simulation of a writer that equivocates (signs two records with one sequence
//! number) and `f` colluding replicas among `n`: the writer gives branch A to half of the
//! honest replicas and branch B to the other half, the colluders show A only. A reader hears
//! the first `q = n - B` replicas to answer (a random set; the others are slow or silent), B
//! the most the policy allows (`(n - 1) / 3`), and catches the fork when an honest replica
//! holding B is among them (the pull of B's record is refused as equivocation). Against
//! BFTKV's formula for a quorum of that size, `1 - ((n + f) / 2n)^q`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use capsulefs::capsule::{AppendOptions, Capsule, NewCapsule};
use capsulefs::crypto::keys::Identity;
use capsulefs::replica::Replica;
use capsulefs::replica::remote::Remote;
use capsulefs::store::Durability;
use capsulefs::store::mem::MemKv;
use capsulefs::sync::quorum::Quorum;
use capsulefs::sync::transfer::{pull, push};

use super::served::Served;

/// Simulated reads per (n, f).
const TRIALS: u32 = 200_000;

#[derive(Parser, Debug)]
pub struct QuorumBenchArgs {
    /// Records every replica holds before the rounds start.
    #[arg(long, default_value_t = 500)]
    pub records: usize,
    /// Rounds timed (each pulls one record from the lone server and one through the quorum).
    #[arg(long, default_value_t = 100)]
    pub rounds: usize,
}

pub fn run(a: QuorumBenchArgs) -> anyhow::Result<()> {
    let (single, quorum) = latency(a.records, a.rounds)?;
    println!(
        "pull of one new record ({} rounds, {} records held): one replica {:.2} ms, a quorum of 4 (B = 1) {:.2} ms",
        a.rounds,
        a.records,
        single.as_secs_f64() * 1e3,
        quorum.as_secs_f64() * 1e3
    );
    println!("fork detection by simulation ({TRIALS} reads each), against BFTKV's 1 - ((n+f)/2n)^q:");
    println!("{:>3} {:>3} {:>3} {:>10} {:>10}", "n", "f", "q", "ours", "formula");
    let mut n4_f2 = 0.0;
    for n in [4, 7] {
        for f in 1..=3 {
            let q = n - (n - 1) / 3;
            let (ours, formula) = (detection_rate(n, f, q), 1.0 - ((n + f) as f64 / (2 * n) as f64).powi(q as i32));
            println!("{n:>3} {f:>3} {q:>3} {ours:>10.3} {formula:>10.3}");
            if (n, f) == (4, 2) {
                n4_f2 = ours;
            }
        }
    }
    println!("quorum: pull_vs_single={:.2} detect_rate_n4_f2={n4_f2:.3}", quorum.as_secs_f64() / single.as_secs_f64());
    Ok(())
}

fn signed() -> AppendOptions {
    AppendOptions { sign: true, durability: Durability::Buffered, ..Default::default() }
}

/// Median pull times of one new record: from one server, and through a quorum of four.
fn latency(records: usize, rounds: usize) -> anyhow::Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let me = Identity::generate("bench")?;
    let writer = Capsule::create(Arc::new(MemKv::new()), NewCapsule::new("bench", &me), vec![me.clone()])?;
    for i in 0..records as u64 {
        writer.append(&me, &[&i.to_le_bytes()], signed())?;
    }
    let servers: Vec<Served> =
        (0..5).map(|i| Served::start(&dir.path().join(format!("server-{i}")))).collect::<anyhow::Result<_>>()?;
    let remote = |s: &Served| Remote::new(&format!("http://{}", s.addr), writer.id());
    let all: Vec<Remote> = servers.iter().map(remote).collect::<capsulefs::Result<_>>()?;
    for r in &all {
        push(&writer, r, &())?;
    }
    let reader = Capsule::adopt(Arc::new(MemKv::new()), writer.id(), &writer.metadata_bytes(), Vec::new())?;
    pull(&reader, &all[4], &())?;
    let lone = remote(&servers[4])?;
    let members = servers[..4].iter().map(|s| Ok(Box::new(remote(s)?) as Box<dyn Replica>));
    let quorum = Quorum::new(members.collect::<capsulefs::Result<_>>()?, 1)?;
    let (mut single, mut through) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Two new records a round, so both reads have one to fetch.
        for side in 0..2u64 {
            writer.append(&me, &[&[round as u64, side].map(u64::to_le_bytes).concat()], signed())?;
            for r in &all {
                push(&writer, r, &())?;
            }
            let timed = Instant::now();
            if (round as u64 + side).is_multiple_of(2) {
                pull(&reader, &lone, &())?;
                single.push(timed.elapsed());
            } else {
                quorum.pull(&reader, &())?;
                through.push(timed.elapsed());
            }
        }
    }
    Ok((median(single), median(through)))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// How often a reader of `q` random replicas among `n`, `f` of them colluding with a forked
/// writer, hears an honest replica holding the branch the colluders hide.
fn detection_rate(n: usize, f: usize, q: usize) -> f64 {
    let mut rng = SplitMix(0x5eed ^ (n as u64) << 8 ^ f as u64);
    let honest = n - f;
    let mut caught = 0u32;
    for _ in 0..TRIALS {
        // Replicas 0..f collude; of the honest ones, the first half (rounded down) hold B.
        let holds_b = |replica: usize| replica >= f && replica - f < honest / 2;
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        if order[..q].iter().any(|&r| holds_b(r)) {
            caught += 1;
        }
    }
    f64::from(caught) / f64::from(TRIALS)
}

/// A small deterministic generator, so the table is the same on every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
