//! `make bench-s3`: capsulefs against the AWS CLI on a three-node Garage cluster on loopback
//! (the integration tests' harness), in one run. Two trees: BENCH_S3_MB MiB in 8 large files
//! (512 by default) and BENCH_S3_FILES small files (5000 by default, 512 B to 8 KiB). Each
//! is copied into a mounted capsule; then `capsulefs push` to `s3://` is timed against `aws
//! s3 cp --recursive` of the same plaintext files to the same cluster, and `capsulefs clone`
//! back against `aws s3 cp --recursive` down. Requests are counted from the Garage node the
//! clients talk to, so both tools are counted the same way.
//!
//! Last line: `s3: push_vs_awscli=<x> clone_vs_awscli=<y> requests_per_file=<r>`, where x
//! and y are the worse of the two trees and r is the small tree's requests per file in the
//! worse direction (the AWS CLI needs one per file each way).

#[path = "../integration/garage.rs"]
mod garage;
#[path = "../integration/tool.rs"]
mod tool;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use garage::Garage;
use tool::tool;

const BUCKET: &str = "bench";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Deterministic incompressible bytes: blake3's output stream under `seed`.
fn fill(seed: u64, out: &mut [u8]) {
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(out);
}

/// One tree of plaintext files, as a user would hold them.
struct Tree {
    name: &'static str,
    dir: PathBuf,
    files: usize,
    bytes: u64,
}

fn big_tree(root: &Path, mib: usize) -> Tree {
    let dir = root.join("big");
    std::fs::create_dir_all(&dir).unwrap();
    let mut block = vec![0u8; 1 << 20];
    let per_file = mib.div_ceil(8);
    for f in 0..8u64 {
        let mut out = Vec::with_capacity(per_file << 20);
        for m in 0..per_file as u64 {
            fill(f << 32 | m, &mut block);
            out.extend_from_slice(&block);
        }
        std::fs::write(dir.join(format!("file{f}")), out).unwrap();
    }
    Tree { name: "big", dir, files: 8, bytes: (8 * per_file as u64) << 20 }
}

fn small_tree(root: &Path, files: usize) -> Tree {
    let dir = root.join("small");
    let mut bytes = 0;
    for i in 0..files {
        let sub = dir.join(format!("d{:03}", i / 100));
        std::fs::create_dir_all(&sub).unwrap();
        let mut len = [0u8; 2];
        fill(1 << 40 | i as u64, &mut len);
        let mut body = vec![0u8; 512 + u16::from_le_bytes(len) as usize % 7681];
        fill(i as u64, &mut body);
        bytes += body.len() as u64;
        std::fs::write(sub.join(format!("f{i:05}.txt")), body).unwrap();
    }
    Tree { name: "small", dir, files, bytes }
}

/// Runs `cmd` with the cluster's environment, expecting success; returns stdout.
fn run(cmd: &mut Command, garage: &Garage) -> String {
    cmd.envs(garage.env(0)).env("AWS_EC2_METADATA_DISABLED", "true");
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Seconds taken and S3 requests made by `cmd`.
fn measured(cmd: &mut Command, garage: &Garage) -> (f64, usize, String) {
    let before = garage.requests(0);
    let start = Instant::now();
    let out = run(cmd, garage);
    (start.elapsed().as_secs_f64(), garage.requests(0) - before, out)
}

struct Figures {
    push: (f64, usize),
    clone: (f64, usize),
    aws_up: (f64, usize),
    aws_down: (f64, usize),
}

fn capsulefs(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsulefs"));
    c.env("CAPSULEFS_HOME", home).env_remove("CAPSULEFS_LOG");
    c
}

fn measure(tree: &Tree, root: &Path, aws: &Path, garage: &Garage) -> Figures {
    // The tree goes into a capsule through a mount, as a user's files would.
    let home = root.join(format!("home-{}", tree.name));
    let mnt = root.join(format!("mnt-{}", tree.name));
    std::fs::create_dir_all(&mnt).unwrap();
    let id = run(capsulefs(&home).args(["create", tree.name]), garage).trim().to_owned();
    run(capsulefs(&home).arg("mount").arg(tree.name).arg(&mnt), garage);
    let copied = Command::new("cp").arg("-r").arg(&tree.dir).arg(mnt.join("tree")).status().unwrap();
    run(capsulefs(&home).arg("umount").arg(&mnt), garage);
    assert!(copied.success(), "cp -r into the mount failed");

    let url = format!("s3://{BUCKET}/capsules");
    let (secs, requests, out) = measured(capsulefs(&home).args(["push", tree.name, &url]), garage);
    println!("  capsulefs push: {secs:.2} s, {requests} requests; {}", out.trim());
    let push = (secs, requests);
    let clone_home = root.join(format!("clone-{}", tree.name));
    let (secs, requests, _) = measured(capsulefs(&clone_home).args(["clone", &format!("{url}#{id}")]), garage);
    println!("  capsulefs clone: {secs:.2} s, {requests} requests");
    let clone = (secs, requests);
    run(capsulefs(&clone_home).args(["verify", tree.name]), garage);

    let plain = format!("s3://{BUCKET}/plain-{}/", tree.name);
    let (secs, requests, _) =
        measured(Command::new(aws).args(["s3", "cp", "--recursive", "--quiet"]).arg(&tree.dir).arg(&plain), garage);
    println!("  aws s3 cp up: {secs:.2} s, {requests} requests");
    let aws_up = (secs, requests);
    let down = root.join(format!("down-{}", tree.name));
    let (secs, requests, _) =
        measured(Command::new(aws).args(["s3", "cp", "--recursive", "--quiet", &plain]).arg(&down), garage);
    println!("  aws s3 cp down: {secs:.2} s, {requests} requests");
    reconcile_cost(tree.name, &home, &clone_home, &url, garage);
    Figures { push, clone, aws_up, aws_down: (secs, requests) }
}

/// What finding a difference with a bucket costs: a pull when nothing changed, then one new
/// record pushed by the first home and pulled by the clone. The layout's claim is that these
/// counts grow with what changed, not with the capsule, so the two trees (tens against
/// hundreds of records) should show the same figures.
fn reconcile_cost(name: &str, home: &Path, clone_home: &Path, url: &str, garage: &Garage) {
    let records = run(capsulefs(clone_home).args(["log", name]), garage).lines().count();
    let (_, idle, _) = measured(capsulefs(clone_home).args(["pull", name, url]), garage);
    let note = home.join("one-more-record");
    std::fs::write(&note, b"one more record").unwrap();
    run(capsulefs(home).args(["append", "--sign", name]).arg(&note), garage);
    let (_, up, _) = measured(capsulefs(home).args(["push", name, url]), garage);
    let (_, down, _) = measured(capsulefs(clone_home).args(["pull", name, url]), garage);
    println!(
        "  reconciliation with {records} records held: pull with nothing new {idle} requests; \
         one new record: push {up} requests, pull {down} requests"
    );
}

fn main() {
    // `cargo bench` passes `--bench`; this bench takes no arguments of its own.
    let mib = env_number("BENCH_S3_MB", 512);
    let files = env_number("BENCH_S3_FILES", 5000);
    let aws_default = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/aws/bin/aws");
    let aws = tool("aws", "AWS_CLI", &aws_default).expect("the AWS CLI: run `make bench-s3`, which installs it");
    let garage = Garage::start(BUCKET).expect("Garage: run `make garage`");
    let root = tempfile::tempdir_in(Path::new(env!("CARGO_MANIFEST_DIR")).join("target")).unwrap();
    let trees = [big_tree(root.path(), mib), small_tree(root.path(), files)];
    let mut push_ratio: f64 = 0.0;
    let mut clone_ratio: f64 = 0.0;
    let mut requests_per_file = 0.0;
    for tree in &trees {
        println!("{} tree: {} files, {:.1} MiB", tree.name, tree.files, tree.bytes as f64 / (1 << 20) as f64);
        let f = measure(tree, root.path(), &aws, &garage);
        let mib = tree.bytes as f64 / (1 << 20) as f64;
        println!(
            "  {}: push {:.2}x the AWS CLI's time, clone {:.2}x; requests per MiB up {:.2} (aws {:.2}), down {:.2} (aws {:.2}); \
             per file up {:.3} (aws {:.3}), down {:.3} (aws {:.3})",
            tree.name,
            f.push.0 / f.aws_up.0,
            f.clone.0 / f.aws_down.0,
            f.push.1 as f64 / mib,
            f.aws_up.1 as f64 / mib,
            f.clone.1 as f64 / mib,
            f.aws_down.1 as f64 / mib,
            f.push.1 as f64 / tree.files as f64,
            f.aws_up.1 as f64 / tree.files as f64,
            f.clone.1 as f64 / tree.files as f64,
            f.aws_down.1 as f64 / tree.files as f64,
        );
        push_ratio = push_ratio.max(f.push.0 / f.aws_up.0);
        clone_ratio = clone_ratio.max(f.clone.0 / f.aws_down.0);
        if tree.name == "small" {
            requests_per_file = f.push.1.max(f.clone.1) as f64 / tree.files as f64;
        }
    }
    println!(
        "s3: push_vs_awscli={push_ratio:.2} clone_vs_awscli={clone_ratio:.2} requests_per_file={requests_per_file:.3}"
    );
}
