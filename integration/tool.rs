//! Finding a test tool; shared with `benches/s3.rs`, which includes this file.

use std::path::{Path, PathBuf};

/// A test tool from `make tools` (or `make garage`): the path in `env_var` if set, else
/// `default`; None, with a message, when neither exists. CI must have every tool.
pub fn tool(name: &str, env_var: &str, default: &Path) -> Option<PathBuf> {
    let candidates = [std::env::var_os(env_var).map(PathBuf::from), Some(default.to_owned())];
    let found = candidates.into_iter().flatten().find(|p| p.exists());
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "{name} is not installed: CI must run `make tools`");
        eprintln!("skipped: {name} not installed (run `make tools`)");
    }
    found
}
