//! Everyday tools inside a real mount — tar, rsync, cp, git, sqlite3, cargo — each run
//! twice by the same script, once on a local folder and once in the mount, and the results
//! compared: file trees with `diff -r`, metadata with `find -printf` and `getfattr`, and each
//! tool's own view (commit hashes, SQL dumps, program output). Then again after a remount.

use std::path::Path;
use std::process::Command;

use super::{Home, Mounted};

/// Runs `script` with `sh -e` in `dir`; returns its stdout.
fn run_in(dir: &Path, script: &str) -> String {
    let out = Command::new("sh").arg("-ec").arg(script).current_dir(dir).output().unwrap();
    assert!(
        out.status.success(),
        "in {}:\n{script}\nstdout:\n{}\nstderr:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` on a local folder and in a fresh mount, asserts equal output, remounts and
/// asserts that `after_remount` prints the same again. None when there is no /dev/fuse.
fn same_as_local_disk(script: &str, after_remount: &str) -> Option<()> {
    let home = Home::default();
    home.ok(&["create", "c"]);
    let local = home.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    let expected = run_in(&local, script);
    {
        let m = Mounted::new(&home, "c", &[])?;
        assert_eq!(run_in(&m.dir, script), expected, "the mount differs from a local disk");
    }
    let expected = run_in(&local, after_remount);
    let m = Mounted::new(&home, "c", &[])?;
    assert_eq!(run_in(&m.dir, after_remount), expected, "after a remount the mount differs from a local disk");
    drop(m);
    home.ok(&["verify", "c"]);
    Some(())
}

/// Every file's type, mode, owner, size, link count, mtime (ns) and link target, every
/// directory's mode and mtime, and the user.* xattrs: what `tar x` and `rsync -a` preserve.
const TREE_LISTING: &str = r#"
find "$1" ! -type d -printf '%P %y %m %U:%G %s %n %T@ %l\n' | LC_ALL=C sort
find "$1" -mindepth 1 -type d -printf '%P %m %U:%G %T@\n' | LC_ALL=C sort
find "$1" -print0 | LC_ALL=C sort -z | xargs -0 getfattr -h -d -m '^user\.' --absolute-names | sed '/^$/d'
"#;

/// A source tree with what archivers must carry: nested folders, empty folder, symlinks
/// (also dangling), hard links, odd modes, a sparse file, xattrs, nanosecond mtimes. All of
/// them in the past: rsync skips setting an mtime that matches the current one to the second.
fn source_tree(home: &Home) -> String {
    let src = home.path().join("source");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    run_in(
        home.path(),
        &format!(
            r#"mkdir -p {s}/deep/er/still {s}/empty
cp -r {repo}/src {s}/code
printf 'hello\n' > {s}/deep/er/still/leaf.txt
ln -s deep/er/still/leaf.txt {s}/link
ln -s nowhere {s}/dangling
ln {s}/deep/er/still/leaf.txt {s}/hardlink
truncate -s 3000000 {s}/sparse && printf tail >> {s}/sparse
printf '#!/bin/sh\necho run\n' > {s}/tool && chmod 4751 {s}/tool
chmod 700 {s}/deep/er && chmod 1777 {s}/empty
setfattr -n user.color -v blue {s}/deep/er/still/leaf.txt
setfattr -n user.empty {s}/tool
find {s} -depth -exec touch -h -d '2020-05-06 07:08:09.987654321' {{}} +
touch -d '2001-02-03 04:05:06.123456789' {s}/deep/er/still/leaf.txt {s}/deep
touch -h -d '2002-01-01 00:00:00.5' {s}/link"#,
            s = src.display(),
            repo = repo.display()
        ),
    );
    src.display().to_string()
}

#[test]
fn tar_rsync_and_cp_give_the_same_tree_as_on_a_local_disk() {
    let home = Home::default();
    let src = source_tree(&home);
    let listing = |dir: &str| format!("set -- {dir}\n{TREE_LISTING}");
    let script = format!(
        r#"tar -C {src} --xattrs --xattrs-include='user.*' -cf ../tree.tar .
mkdir untarred && tar -C untarred --xattrs --xattrs-include='user.*' -xpf ../tree.tar
rsync -aHX {src}/ rsynced/
rsync -aHX --delete --checksum {src}/ rsynced/
cp -a {src} copied
diff -r --no-dereference {src} untarred && diff -r --no-dereference {src} rsynced && diff -r --no-dereference {src} copied
{untarred}
{rsynced}
{copied}
mv untarred/code renamed && rm -r rsynced/deep && ls -A . rsynced"#,
        untarred = listing("untarred"),
        rsynced = listing("rsynced"),
        copied = listing("copied"),
    );
    let after = format!("{}\nmd5sum renamed/lib.rs && ls -A . rsynced", listing("copied"));
    same_as_local_disk(&script, &after);
}

#[test]
fn git_commits_in_the_mount_hash_the_same_as_on_a_local_disk() {
    let script = r#"export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@example.org GIT_COMMITTER_NAME=t \
    GIT_COMMITTER_EMAIL=t@example.org GIT_AUTHOR_DATE='2026-01-01T00:00:00Z' \
    GIT_COMMITTER_DATE='2026-01-01T00:00:00Z' GIT_CONFIG_NOSYSTEM=1 HOME=$PWD
git init -q -b main repo && cd repo
cp -r "$CARGO_MANIFEST_DIR/src" src && git add -A && git commit -qm first
git checkout -qb side && printf 'more\n' >> src/lib.rs && git mv src/error.rs src/errors.rs
git commit -qam second && git checkout -q main && git merge -q --no-ff -m merged side
git gc -q && git fsck --full --strict
git log --format='%H %s' && git status --porcelain && git ls-files -s | md5sum"#;
    let after = "cd repo && git fsck --full && git log --format=%H && git diff --stat HEAD~1";
    same_as_local_disk(&script.replace("$CARGO_MANIFEST_DIR", env!("CARGO_MANIFEST_DIR")), after);
}

#[test]
fn sqlite_in_the_mount_holds_the_same_rows_as_on_a_local_disk() {
    // Rollback journal first, then WAL (its -shm index is a shared mmap of a file here).
    let script = r#"sqlite3 db "create table t(id integer primary key, name text, blob blob);
begin; $(for i in $(seq 1 3000); do printf "insert into t(name) values('row %d');" $i; done) commit;
update t set blob = zeroblob(300) where id % 7 = 0; delete from t where id % 11 = 0;
create index t_name on t(name); vacuum; pragma integrity_check;"
sqlite3 db "pragma journal_mode=wal; begin; insert into t(name) select name || '+' from t where id < 500; commit;
pragma wal_checkpoint(truncate); pragma integrity_check; select count(*), sum(length(blob)) from t;"
sqlite3 db .dump | md5sum"#;
    let after = r#"sqlite3 db "pragma integrity_check; select count(*) from t;" && sqlite3 db .dump | md5sum"#;
    same_as_local_disk(script, after);
}

#[test]
fn cargo_builds_the_same_program_in_the_mount_as_on_a_local_disk() {
    // A workspace with a build script and two crates; incremental debug builds write, rename
    // and hard-link many files in target/. No dependencies: offline and quick.
    let script = r#"export CARGO_TARGET_DIR=$PWD/target CARGO_NET_OFFLINE=true
mkdir -p ws/app/src ws/lib/src
printf '[workspace]\nmembers = ["app", "lib"]\nresolver = "2"\n' > ws/Cargo.toml
printf '[package]\nname = "lib"\nversion = "0.1.0"\nedition = "2021"\n' > ws/lib/Cargo.toml
printf '[package]\nname = "app"\nversion = "0.1.0"\nedition = "2021"\n[dependencies]\nlib = { path = "../lib" }\n' > ws/app/Cargo.toml
cat > ws/lib/src/lib.rs <<'EOF'
pub fn fib(n: u64) -> u64 { if n < 2 { n } else { fib(n - 1) + fib(n - 2) } }
#[test]
fn small() { assert_eq!(fib(10), 55); }
EOF
cat > ws/app/build.rs <<'EOF'
fn main() {
    let out = std::env::var("OUT_DIR").unwrap();
    std::fs::write(format!("{out}/table.rs"), "pub const N: u64 = 25;").unwrap();
}
EOF
cat > ws/app/src/main.rs <<'EOF'
include!(concat!(env!("OUT_DIR"), "/table.rs"));
fn main() { println!("fib({N}) = {}", lib::fib(N)); }
EOF
cd ws && cargo build -q && cargo test -q --workspace 2>&1 | grep -c 'test result: ok'
"$CARGO_TARGET_DIR/debug/app"
sed -i 's/25/30/' app/build.rs && cargo build -q && "$CARGO_TARGET_DIR/debug/app"
cargo build -q --release && "$CARGO_TARGET_DIR/release/app""#;
    let after = r#"export CARGO_TARGET_DIR=$PWD/target && target/release/app && cd ws && cargo build -q --release
cargo clean -q && test ! -e ../target && echo cleaned"#;
    same_as_local_disk(script, after);
}
