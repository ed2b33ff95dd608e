//! `kill -9` at arbitrary moments during durable appends: every acknowledged record survives
//! and the store verifies clean.

use std::process::Stdio;
use std::thread::sleep;
use std::time::Duration;

use super::{Home, last_line};

#[test]
fn kill_9_during_appends_loses_nothing_acknowledged() {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8).collect();
    let f = home.file("p", &payload);
    let mut acknowledged = Vec::new();
    let mut killed = 0;
    // A fixed spread of delays (0..40 ms) lands kills before, during and after the write.
    for i in 0..40u64 {
        let mut args = vec!["append", "c", f.to_str().unwrap()];
        if i % 4 == 0 {
            args.push("--sign");
        }
        let mut child = home.command().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        sleep(Duration::from_micros((i * 7919) % 40_000));
        let _ = child.kill(); // SIGKILL; fails harmlessly if the append already exited
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            acknowledged.push(last_line(&String::from_utf8(out.stdout).unwrap()));
        } else {
            killed += 1;
        }
    }
    eprintln!("{} appends acknowledged, {killed} killed", acknowledged.len());
    let verify = home.run(&["verify", "c"]);
    assert!(verify.status.success(), "verify after crashes: {}", String::from_utf8_lossy(&verify.stderr));
    let log = home.ok(&["log", "c"]);
    for h in &acknowledged {
        assert!(log.contains(h.as_str()), "acknowledged record {h} lost");
        assert_eq!(home.run(&["cat", "c", &format!("{h}:0")]).stdout, payload);
    }
}
