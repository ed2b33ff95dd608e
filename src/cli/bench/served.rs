//! The benches' `capsulefs serve`, started from the binary they run in.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A `capsulefs serve` on a free loopback port, ended when dropped.
pub(super) struct Served {
    child: Child,
    pub(super) addr: String,
}

impl Served {
    pub(super) fn start(store: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--store"])
            .arg(store)
            // Benches make identities of their own, and capsules by the hundred.
            .args(["--open", "--max-capsules-per-creator", "100000", "--max-mib-per-creator", "1048576"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let addr = line.trim().strip_prefix("listening on ").context("the server's readiness line")?.to_owned();
        Ok(Self { child, addr })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
