//! fsx (the File System eXerciser) on a file in a real mount: reads, writes, mmap reads and
//! writes, truncates, fsyncs and reopens, checked against fsx's own model; then again on the
//! same file after a remount.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::Home;

/// The issue asks for at least 100k operations per run; about two minutes each here.
const OPS: &str = "100000";

/// fsx from `make tools`, or from FSX; None (with a message) when it is not installed.
fn fsx() -> Option<PathBuf> {
    super::tool("fsx", "FSX", &Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/fsx"))
}

fn run_fsx(fsx: &Path, file: &Path, seed: &str, artifacts: &Path) {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/data/fsx.toml");
    let out = Command::new(fsx)
        .args(["-N", OPS, "-S", seed, "-f"])
        .arg(&config)
        .arg("-P")
        .arg(artifacts)
        .arg(file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("All operations completed A-OK"), "fsx failed:\n{text}");
}

#[test]
fn fsx_finds_no_mismatch_before_and_after_a_remount() {
    let Some(fsx) = fsx() else { return };
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: no /dev/fuse");
        return;
    }
    let home = Home::default();
    home.ok(&["create", "c"]);
    let (mnt, artifacts) = (home.path().join("mnt"), home.path().join("fsx-artifacts"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&artifacts).unwrap();
    for seed in ["1", "2"] {
        home.ok(&["mount", "c", mnt.to_str().unwrap()]);
        let result = std::panic::catch_unwind(|| run_fsx(&fsx, &mnt.join("exercised"), seed, &artifacts));
        home.ok(&["umount", mnt.to_str().unwrap()]);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
    home.ok(&["verify", "c"]);
}
