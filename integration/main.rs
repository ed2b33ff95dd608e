//! Tests that run the real `capsulefs` binary against real RocksDB stores in temporary homes.
//! Each test owns its home folder and the processes it starts, and ends only those.

mod background;
mod buckets;
mod chaos;
mod cli;
mod conformance;
mod corruption;
mod crash;
mod fsx;
mod garage;
mod hardening;
mod hostile;
mod membership;
mod mount;
mod quorum;
mod replicas;
mod server;
mod serving;
mod tool;
mod tools;

pub use tool::tool;

use std::fs;
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

    /// Keeps the folder past the test (for looking into what a failed run left), and says where.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
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

/// A mounted capsule; unmounted when dropped.
pub struct Mounted<'h> {
    home: &'h Home,
    pub dir: PathBuf,
}

impl<'h> Mounted<'h> {
    pub fn new(home: &'h Home, capsule: &str, extra: &[&str]) -> Option<Self> {
        Self::with_env(home, capsule, extra, &[])
    }

    /// `new`, with environment variables for the mount daemon (e.g. a bucket's settings).
    pub fn with_env(home: &'h Home, capsule: &str, extra: &[&str], env: &[(&str, &str)]) -> Option<Self> {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("skipped: no /dev/fuse");
            return None;
        }
        let dir = home.path().join("mnt");
        fs::create_dir_all(&dir).unwrap();
        let out =
            home.command().arg("mount").arg(capsule).arg(&dir).args(extra).envs(env.iter().copied()).output().unwrap();
        assert!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
        Some(Self { home, dir })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The daemon's pid, from the mount registry.
    pub fn daemon_pid(&self) -> u32 {
        let mounts = self.home.path().join("mounts");
        // The registry entry, not the mount's request socket beside it.
        let entry = fs::read_dir(mounts)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_none())
            .expect("a registry entry");
        fs::read_to_string(entry).unwrap().lines().next().unwrap().parse().unwrap()
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let out = self.home.run(&["umount", self.dir.to_str().unwrap()]);
        if !out.status.success() {
            eprintln!("umount: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// The value of extended attribute `name` of `path`, read with getfattr.
pub fn xattr(path: &Path, name: &str) -> String {
    let out = Command::new("getfattr").args(["--only-values", "-n", name]).arg(path).output().unwrap();
    assert!(out.status.success(), "getfattr {name}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Writes `bytes` to `path` and fsyncs it: in a mount, one commit made durable before this
/// returns (a close alone asks for a commit a few milliseconds later, shared with other closes).
pub fn write_fsynced(path: &Path, bytes: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
    f.sync_all().unwrap();
}

/// Runs a shell command line and expects success.
pub fn sh(cmd: &str) {
    let status = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(status.success(), "{cmd}");
}

/// renameat2(2) with `flags` (RENAME_NOREPLACE, RENAME_EXCHANGE), which std does not offer.
#[allow(unsafe_code)]
pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (from, to) = (CString::new(from.as_os_str().as_bytes())?, CString::new(to.as_os_str().as_bytes())?);
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}
