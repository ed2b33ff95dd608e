//! `mount.fuse.capsulefs`: the mount(8) helper, so `mount -t fuse.capsulefs NAME DIR` and an
//! fstab line work. `make install` links it to the capsulefs binary; run under that name,
//! the binary takes mount(8)'s helper arguments, `SPEC DIR [-sfnv] [-N NS] [-o OPTS] [-t TYPE]`,
//! and turns them into `capsulefs mount`.
//!
//! fstab: `notes  /srv/notes  fuse.capsulefs  home=/var/lib/capsulefs,key=server,nofail  0 0`.
//! `home=`, `key=`, `at=`, `commit_after=`, `cache_mib=` and `proof_cache_records=` are
//! capsulefs's own options; options that only mount(8) or
//! systemd read (defaults, auto, nofail, _netdev, user, x-*) are dropped; the rest go to FUSE.

use std::ffi::OsString;
use std::path::Path;

use anyhow::bail;

use super::Args;

pub const HELPER_NAME: &str = "mount.fuse.capsulefs";

/// Options for mount(8) or systemd, not for the filesystem.
const MOUNT_ONLY: [&str; 10] =
    ["defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "rw"];

/// Whether this process was started as the mount helper.
pub fn invoked_as_helper(argv0: &OsString) -> bool {
    Path::new(argv0).file_name().is_some_and(|n| n == HELPER_NAME)
}

/// The `capsulefs` arguments for a helper invocation; None for a fake mount (`-f`).
pub fn translate(helper_args: &[String]) -> anyhow::Result<Option<Args>> {
    let mut positional = Vec::new();
    let (mut options, mut fake, mut verbose) = (Vec::new(), false, false);
    let mut it = helper_args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-o" => options.extend(it.next().map(String::as_str).unwrap_or_default().split(',').map(str::to_owned)),
            "-t" | "-N" => drop(it.next()), // our own type; namespaces are not supported
            flags if flags.starts_with('-') && flags.len() > 1 => {
                for f in flags[1..].chars() {
                    match f {
                        'f' => fake = true,
                        'v' => verbose = true,
                        's' | 'n' => {} // sloppy, no mtab: nothing to do
                        other => bail!("{HELPER_NAME}: unknown flag -{other}"),
                    }
                }
            }
            _ => positional.push(arg.clone()),
        }
    }
    let [spec, dir] = positional.as_slice() else {
        bail!("usage: {HELPER_NAME} CAPSULE DIR [-sfnv] [-o OPTIONS] (normally run by mount -t fuse.capsulefs)");
    };
    let mut args: Vec<String> = vec!["capsulefs".into(), "mount".into(), spec.clone(), dir.clone()];
    let mut fuse = Vec::new();
    for o in options.iter().filter(|o| !o.is_empty()) {
        match o.split_once('=') {
            Some(("home", v)) => args.extend(["--home".into(), v.into()]),
            Some(("key", v)) => args.extend(["--key".into(), v.into()]),
            Some(("at", v)) => args.extend(["--at".into(), v.into()]),
            Some(("commit_after", v)) => args.extend(["--commit-after".into(), v.into()]),
            Some(("cache_mib", v)) => args.extend(["--cache-mib".into(), v.into()]),
            Some(("proof_cache_records", v)) => args.extend(["--proof-cache-records".into(), v.into()]),
            _ if o == "ro" => args.push("--read-only".into()),
            _ if MOUNT_ONLY.contains(&o.as_str()) || o.starts_with("x-") || o.starts_with("comment=") => {}
            _ => fuse.push(o.clone()),
        }
    }
    if verbose {
        args.push("-v".into());
    }
    if !fuse.is_empty() {
        args.extend(["-o".into(), fuse.join(",")]);
    }
    if fake {
        return Ok(None);
    }
    Ok(Some(<Args as clap::Parser>::try_parse_from(args)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fstab_options_become_mount_arguments() {
        let args = translate(&strings(&[
            "notes",
            "/srv/notes",
            "-n",
            "-o",
            "defaults,nofail,x-systemd.automount,home=/var/lib/c,key=server,ro,allow_other,nodev",
            "-t",
            "fuse.capsulefs",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(args.home.as_deref(), Some(Path::new("/var/lib/c")));
        let Command::Mount(m) = args.command else { panic!("not a mount: {:?}", args.command) };
        assert_eq!((m.name.as_str(), m.dir.as_path()), ("notes", Path::new("/srv/notes")));
        assert_eq!(m.key.as_deref(), Some("server"));
        assert!(m.read_only && !m.foreground);
        assert_eq!(m.options, ["allow_other", "nodev"]);
    }

    #[test]
    fn fake_mounts_do_nothing_and_bad_calls_say_how() {
        assert!(translate(&strings(&["notes", "/srv/notes", "-fv"])).unwrap().is_none());
        let err = translate(&strings(&["notes"])).unwrap_err().to_string();
        assert!(err.contains("usage: mount.fuse.capsulefs CAPSULE DIR"), "{err}");
        assert!(translate(&strings(&["a", "b", "-q"])).is_err());
    }
}
