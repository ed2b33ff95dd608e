//! Tests that run the real `capsulefs` binary against real RocksDB stores in temporary homes.
//! Each test owns its home folder and the processes it starts, and ends only those.

mod cli;
mod corruption;
mod crash;
mod fsx;
mod mount;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A `$CAPSULEFS_HOME` of its own, removed when dropped.
pub struct Home {
    dir: tempfile::TempDir,
}

impl Default for Home {
    fn default() -> Self {
        Self { dir: tempfile::tempdir().expect("temporary folder") }
    }
}

impl Home {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_capsulefs"));
        c.env("CAPSULEFS_HOME", self.path()).env_remove("CAPSULEFS_LOG");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("capsulefs runs")
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "capsulefs {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// A file in the home's scratch folder holding `bytes`.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let dir = self.path().join("scratch");
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    pub fn store_path(&self, capsule_id: &str) -> PathBuf {
        self.path().join("capsules").join(capsule_id.trim()).join("store")
    }
}

pub fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or_default().to_owned()
}
