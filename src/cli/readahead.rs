//! A FUSE mount's readahead window. The kernel starts every FUSE mount's backing device
//! (bdi) at 128 KiB of readahead and lets `max_readahead` only lower it, so sequential reads
//! reach the daemon as 128 KiB requests whatever the mount negotiated. As root, the mount
//! raises its own bdi's `read_ahead_kb` to match `max_readahead`: 1 MiB requests, an eighth of
//! the round trips (BENCHMARKS.md, "Smaller figures").

use std::path::Path;

/// Sets the readahead of the filesystem mounted at `mount_point` (canonical) to `kib`.
/// Best effort: without root or sysfs the mount simply keeps the kernel's default.
pub fn raise(mount_point: &Path, kib: u32) {
    let Some(device) = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| device_of(&info, &mount_point.to_string_lossy()))
    else {
        tracing::debug!("no mountinfo entry for {}; readahead left as is", mount_point.display());
        return;
    };
    let knob = format!("/sys/class/bdi/{device}/read_ahead_kb");
    match std::fs::write(&knob, kib.to_string()) {
        Ok(()) => tracing::debug!("{knob} = {kib}"),
        Err(e) => tracing::debug!("cannot raise readahead ({knob}: {e}); keeping the kernel's 128 KiB"),
    }
}

/// The `major:minor` of the last mount at `mount_point` in a mountinfo listing.
fn device_of(mountinfo: &str, mount_point: &str) -> Option<String> {
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (unescape(fields.get(4)?) == mount_point).then(|| fields[2].to_owned())
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\040`).
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_newest_mount_at_an_escaped_path() {
        let info = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    40 22 0:39 / /tmp/my\\040notes rw - fuse capsulefs rw\n\
                    41 22 0:40 / /tmp/other rw - fuse capsulefs rw\n\
                    42 40 0:41 / /tmp/my\\040notes rw - fuse capsulefs rw\n";
        assert_eq!(device_of(info, "/tmp/my notes").as_deref(), Some("0:41"));
        assert_eq!(device_of(info, "/tmp/other").as_deref(), Some("0:40"));
        assert_eq!(device_of(info, "/tmp/none"), None);
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
    }
}
