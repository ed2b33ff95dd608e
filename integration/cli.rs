//! The command surface end to end: create, append, cat, prove, log, verify, keys, exit codes.

use std::os::unix::fs::PermissionsExt;

use super::{Home, last_line};

#[test]
fn append_cat_log_verify_round_trip() {
    let home = Home::default();
    let id = home.ok(&["create", "notes"]);
    assert_eq!(id.trim().len(), 64);
    let big: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let (a, b) = (home.file("a", b"hello\n"), home.file("b", &big));
    let r1 = last_line(&home.ok(&["append", "notes", a.to_str().unwrap(), b.to_str().unwrap()]));
    let r2 = last_line(&home.ok(&["append", "notes", "--sign", a.to_str().unwrap()]));
    let r3 = last_line(&home.ok(&["append", "notes", b.to_str().unwrap()]));

    assert_eq!(home.run(&["cat", "notes", &format!("{r1}:0")]).stdout, b"hello\n");
    assert_eq!(home.run(&["cat", "notes", &format!("{}:1", &r1[..10])]).stdout, big);
    assert_eq!(home.run(&["cat", id.trim(), "head:0"]).stdout, big);

    let log = home.ok(&["log", "notes"]);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4, "three appends on top of the keystore record");
    assert!(lines[0].starts_with(&r3) && lines[0].contains("unsigned") && lines[0].contains("seq=4"));
    assert!(
        lines[1].starts_with(&r2)
            && lines[1].contains(" signed")
            && lines[1].contains(&format!("parents={}", &r1[..12]))
    );
    assert!(lines[2].starts_with(&r1) && lines[2].contains("subs=2"));
    assert!(lines[3].contains("parents=genesis") && lines[3].ends_with(" signed subs=1 membership"), "{}", lines[3]);

    let proof = home.ok(&["prove", "notes", "--fresh", &format!("{r1}:1")]);
    assert!(proof.contains("sub-record:  1 of 2, Merkle path of 1 hashes"), "{proof}");
    assert!(proof.contains(&format!("chain:       2 record(s): {} -> {}", &r1[..12], &r2[..12])), "{proof}");
    assert!(proof.contains(&format!("anchor:      {r2} signed by writer")), "{proof}");
    let tail = home.ok(&["prove", "notes", "--fresh", &r3]);
    assert!(tail.contains("attested by the local key"), "{tail}");

    let verify = home.ok(&["verify", "notes"]);
    assert!(verify.starts_with("ok: 4 records (2 signed), 5 sub-records"), "{verify}");
    assert_eq!(home.ok(&["list"]), format!("notes\t{id}"));
}

#[test]
fn keys_are_private_files_and_listed() {
    let home = Home::default();
    let w = home.ok(&["key", "new", "--name", "laptop"]);
    let mode = std::fs::metadata(home.path().join("keys/laptop.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(home.ok(&["key", "list"]), format!("laptop\t{w}"));
    assert_eq!(home.run(&["key", "new", "--name", "laptop"]).status.code(), Some(5));
}

#[test]
fn a_writer_without_rights_is_refused() {
    let home = Home::default();
    home.ok(&["key", "new", "--name", "default"]);
    let guest = home.ok(&["key", "new", "--name", "guest"]);
    home.ok(&["create", "solo"]);
    let f = home.file("x", b"x");
    let out = home.run(&["append", "solo", "--key", "guest", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let refused = String::from_utf8_lossy(&out.stderr);
    assert!(refused.contains("did not hold the write level") && refused.contains("--level write"), "{refused}");
    home.ok(&["create", "shared", "--writer", guest.trim()]);
    home.ok(&["append", "shared", "--key", "guest", "--sign", f.to_str().unwrap()]);
}

#[test]
fn exit_codes_follow_the_table() {
    let home = Home::default();
    assert_eq!(home.run(&["cat", "nothing", "abcd:0"]).status.code(), Some(3));
    assert_eq!(home.run(&["frobnicate"]).status.code(), Some(2));
    home.ok(&["create", "c"]);
    assert_eq!(home.run(&["create", "c"]).status.code(), Some(5));
    assert_eq!(home.run(&["cat", "c", "0000000000000000:0"]).status.code(), Some(3));
    let f = home.file("x", b"x");
    let r = last_line(&home.ok(&["append", "c", f.to_str().unwrap()]));
    let out = home.run(&["cat", "c", &format!("{r}:1")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no sub-record SubIdx(1)"));
}

#[test]
fn help_exists_for_every_command() {
    let home = Home::default();
    for cmd in [
        &["--help"][..],
        &["key", "new", "--help"],
        &["create", "--help"],
        &["append", "--help"],
        &["cat", "--help"],
        &["prove", "--help"],
        &["log", "--help"],
        &["verify", "--help"],
        &["completions", "--help"],
    ] {
        let out = home.ok(cmd);
        assert!(out.contains("Usage:"), "{cmd:?}");
    }
    assert!(home.ok(&["--help"]).contains("EXIT CODES"));
    assert!(home.ok(&["completions", "bash"]).contains("capsulefs"));
}
