//! `capsulefs bench proofs`: the DataCapsule poster's figure 4, measured on this machine.
//!
//! Writes: `ops` sub-records appended as `ops/k` signed records of k sub-records each, into a
//! RocksDB store in a temporary folder. Proofs: every one of those sub-records read back through
//! a full proof, starting with an empty memory cache. Reverse-sequential: `ops` one-sub-record
//! records with a signature every `REVERSE_SIGN_EVERY`, proven newest to oldest, once ignoring
//! earlier proofs and once letting each proof stop at the previous one. Each row is the median
//! of `ROW_RUNS` runs in fresh capsules.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Subcommand;

use capsulefs::capsule::{AppendOptions, Capsule, EarlierProofs, NewCapsule};
use capsulefs::crypto::keys::Identity;
use capsulefs::crypto::sign::TrustKey;
use capsulefs::record::{RecordHash, SubIdx};
use capsulefs::store::Durability;
use capsulefs::store::rocks::RocksKv;

mod mountsync;
mod quorum;
mod served;
mod sync;

const SUB_RECORD_LEN: usize = 128;
const REVERSE_SIGN_EVERY: usize = 100;
/// Each row is measured this many times, each in a fresh capsule; the median is reported.
const ROW_RUNS: usize = 3;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Reproduce the poster's figure 4: writes and proofs by sub-records per record, and
    /// reverse-sequential proofs with and without the proof cache.
    Proofs {
        /// Sub-records written and proven per row.
        #[arg(long, default_value_t = 10_000)]
        ops: usize,
    },
    /// Anti-entropy and push throughput against `capsulefs serve` on loopback (make bench-sync).
    Sync(sync::SyncBenchArgs),
    /// Pull latency through a quorum of four replicas against one, and the rate at which a
    /// forked writer is caught, by simulation (the `quorum:` line).
    Quorum(quorum::QuorumBenchArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Proofs { ops } => proofs(ops),
        BenchCommand::Sync(a) => sync::run(a),
        BenchCommand::Quorum(a) => quorum::run(a),
    }
}

fn new_capsule(dir: &tempfile::TempDir, name: &str, me: &Identity) -> anyhow::Result<Capsule> {
    let kv = RocksKv::open(&dir.path().join(name), true)?;
    // Proven marks persisted and authenticated, as `capsulefs` itself keeps them.
    Ok(Capsule::create(Arc::new(kv), NewCapsule::new(name, me), vec![me.clone()])?.with_trust_key(TrustKey::generate()))
}

fn payload(n: usize) -> Vec<u8> {
    let mut p = vec![0u8; SUB_RECORD_LEN];
    p[..8].copy_from_slice(&(n as u64).to_le_bytes());
    p
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Row {
    per_record: usize,
    write: Duration,
    prove: Duration,
}

/// Median write and prove times over `ROW_RUNS` runs.
fn measure_row(dir: &tempfile::TempDir, me: &Identity, ops: usize, per_record: usize) -> anyhow::Result<Row> {
    let runs =
        (0..ROW_RUNS).map(|run| measure_row_once(dir, me, ops, per_record, run)).collect::<anyhow::Result<Vec<_>>>()?;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    Ok(Row {
        per_record,
        write: median(runs.iter().map(|r| r.write).collect()),
        prove: median(runs.iter().map(|r| r.prove).collect()),
    })
}

fn measure_row_once(
    dir: &tempfile::TempDir,
    me: &Identity,
    ops: usize,
    per_record: usize,
    run: usize,
) -> anyhow::Result<Row> {
    let capsule = new_capsule(dir, &format!("k{per_record}-{run}"), me)?;
    let records = ops.div_ceil(per_record);
    let payloads: Vec<Vec<u8>> = (0..records * per_record).map(payload).collect();
    let opts = AppendOptions { sign: true, durability: Durability::Buffered, ..Default::default() };
    let start = Instant::now();
    let hashes = payloads
        .chunks(per_record)
        .map(|chunk| capsule.append(me, &chunk.iter().map(Vec::as_slice).collect::<Vec<_>>(), opts))
        .collect::<capsulefs::Result<Vec<RecordHash>>>()?;
    let write = start.elapsed();
    capsule.clear_proof_cache()?;
    let start = Instant::now();
    for h in &hashes {
        for idx in 0..per_record as u32 {
            let (data, _) = capsule.read_sub_record(*h, SubIdx(idx))?;
            debug_assert_eq!(data.get().len(), SUB_RECORD_LEN);
        }
    }
    Ok(Row { per_record, write, prove: start.elapsed() })
}

fn measure_reverse(dir: &tempfile::TempDir, me: &Identity, ops: usize) -> anyhow::Result<(Duration, Duration)> {
    let capsule = new_capsule(dir, "reverse", me)?;
    let hashes = (0..ops)
        .map(|i| {
            let sign = (i + 1) % REVERSE_SIGN_EVERY == 0 || i + 1 == ops;
            capsule.append(
                me,
                &[&payload(i)],
                AppendOptions { sign, durability: Durability::Buffered, ..Default::default() },
            )
        })
        .collect::<capsulefs::Result<Vec<_>>>()?;
    let start = Instant::now();
    for h in hashes.iter().rev() {
        capsule.prove_record(*h, EarlierProofs::Ignore)?;
    }
    let uncached = start.elapsed();
    capsule.clear_proof_cache()?;
    let start = Instant::now();
    for h in hashes.iter().rev() {
        capsule.prove_record(*h, EarlierProofs::Use)?;
    }
    Ok((uncached, start.elapsed()))
}

fn proofs(ops: usize) -> anyhow::Result<()> {
    anyhow::ensure!(ops >= 1000, "--ops must be at least 1000 (one record of 1000 sub-records)");
    let dir = tempfile::tempdir()?;
    let me = Identity::generate("bench")?;
    println!(
        "{ops} sub-records of {SUB_RECORD_LEN} bytes per row, one signature per record, RocksDB store, median of {ROW_RUNS}"
    );
    println!(
        "{:>12} {:>8} {:>10} {:>10} {:>12} {:>12}",
        "subs/record", "records", "write ms", "prove ms", "write us/op", "prove us/op"
    );
    let mut rows = Vec::new();
    for per_record in [1, 10, 100, 1000] {
        let row = measure_row(&dir, &me, ops, per_record)?;
        println!(
            "{:>12} {:>8} {:>10.1} {:>10.1} {:>12.2} {:>12.2}",
            row.per_record,
            ops.div_ceil(per_record),
            ms(row.write),
            ms(row.prove),
            row.write.as_secs_f64() * 1e6 / ops as f64,
            row.prove.as_secs_f64() * 1e6 / ops as f64
        );
        rows.push(row);
    }
    let (uncached, cached) = measure_reverse(&dir, &me, ops)?;
    println!("reverse-sequential proofs of {ops} records, signature every {REVERSE_SIGN_EVERY}:");
    println!("{:>12} {:>10.1} ms", "no cache", ms(uncached));
    println!("{:>12} {:>10.1} ms", "cache", ms(cached));
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    println!(
        "poster: writes_speedup={:.1} proofs_speedup={:.1} cached_reverse_speedup={:.1}",
        first.write.as_secs_f64() / last.write.as_secs_f64(),
        first.prove.as_secs_f64() / last.prove.as_secs_f64(),
        uncached.as_secs_f64() / cached.as_secs_f64()
    );
    Ok(())
}
