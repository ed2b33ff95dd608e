//! Merges of filesystem branches made apart: two machines (two stores, so two devices) of one
//! writer change the same capsule, exchange records, and must both show one and the same
//! tree, keeping every version either committed.

use std::collections::BTreeMap;
use std::sync::Arc;

use capsulefs::capsule::{Capsule, NewCapsule};
use capsulefs::crypto::aead::ContentKey;
use capsulefs::crypto::keys::Identity;
use capsulefs::fs::Fs;
use capsulefs::fs::filesystem::{Followed, Signing};
use capsulefs::fs::heads::filesystem_heads;
use capsulefs::fs::node::{DirEntry, Inode, Kind, ROOT_INO};
use capsulefs::member::{self, content_key, create_keystore};
use capsulefs::record::RecordHash;
use capsulefs::rights::Level;
use capsulefs::store::mem::MemKv;
use capsulefs::store::{Durability, Kv};
use capsulefs::sync::transfer::pull;

struct Machines {
    a: Arc<Capsule>,
    b: Arc<Capsule>,
    me: Identity,
    key: ContentKey,
}

fn machines() -> Machines {
    let me = Identity::generate("me").unwrap();
    let kv: Arc<dyn Kv> = Arc::new(MemKv::new());
    let a = Arc::new(Capsule::create(kv, NewCapsule::new("merge", &me), vec![me.clone()]).unwrap());
    create_keystore(&a, &me).unwrap();
    let kv: Arc<dyn Kv> = Arc::new(MemKv::new());
    let b = Arc::new(Capsule::adopt(kv, a.id(), &a.metadata_bytes(), vec![me.clone()]).unwrap());
    pull(&b, &*a, &()).unwrap();
    let key = content_key(&a, &me).unwrap();
    Machines { a, b, me, key }
}

impl Machines {
    fn fs(&self, cap: &Arc<Capsule>) -> Fs {
        Fs::open(cap.clone(), self.key.clone(), Some(self.me.clone())).unwrap()
    }

    /// Both machines pull what the other has, as a sync through a replica would.
    fn exchange(&self) {
        pull(&self.a, &*self.b, &()).unwrap();
        pull(&self.b, &*self.a, &()).unwrap();
    }
}

fn commit(fs: &mut Fs) -> RecordHash {
    fs.commit(Signing::Now, Durability::Buffered).unwrap().expect("something to commit")
}

fn make_file(fs: &mut Fs, dir: u64, name: &str, content: &[u8]) -> u64 {
    let (ino, _) = fs.make(dir, name.as_bytes(), Inode::new(Kind::File, 0o644, 1000, 1000)).unwrap();
    fs.write(ino, 0, content).unwrap();
    ino
}

fn make_dir(fs: &mut Fs, dir: u64, name: &str) -> u64 {
    fs.make(dir, name.as_bytes(), Inode::new(Kind::Dir, 0o755, 1000, 1000)).unwrap().0
}

fn rewrite(fs: &mut Fs, dir: u64, name: &str, content: &[u8]) {
    let (ino, _) = fs.lookup(dir, name.as_bytes()).unwrap();
    fs.truncate(ino, 0).unwrap();
    fs.write(ino, 0, content).unwrap();
}

/// What a tree shows, by path: kind, inode number, link count, and a file's bytes.
type Shown = BTreeMap<String, (Kind, u64, u32, Vec<u8>)>;

fn shown(fs: &Fs) -> Shown {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((dir, path)) = stack.pop() {
        let mut subdirs = 0;
        for e in fs.readdir(dir).unwrap() {
            let at = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            let inode = fs.getattr(e.ino).unwrap();
            assert_eq!(inode.kind, e.kind, "{at}: entry and inode agree on the kind");
            let bytes = if e.kind == Kind::File { fs.read(e.ino, 0, 1 << 20).unwrap() } else { Vec::new() };
            if e.kind == Kind::Dir {
                subdirs += 1;
                stack.push((e.ino, at.clone()));
            }
            out.insert(at, (e.kind, e.ino, inode.nlink, bytes));
        }
        assert_eq!(fs.getattr(dir).unwrap().nlink, 2 + subdirs, "{path}/: links of a folder");
    }
    out
}

fn content(tree: &Shown, path: &str) -> Vec<u8> {
    tree.get(path).unwrap_or_else(|| panic!("{path} missing from {:?}", tree.keys().collect::<Vec<_>>())).3.clone()
}

/// Paths of conflict copies and names.
fn conflicts(tree: &Shown) -> Vec<&str> {
    tree.keys().filter(|p| p.contains(".conflict-")).map(String::as_str).collect()
}

#[test]
fn changes_made_apart_merge_alike_on_both_machines() {
    let m = machines();
    let mut a = m.fs(&m.a);
    let docs = make_dir(&mut a, ROOT_INO, "docs");
    make_file(&mut a, docs, "report.txt", b"v0");
    for name in ["keep.txt", "gone.txt", "edited.txt"] {
        make_file(&mut a, ROOT_INO, name, b"base");
    }
    let old = make_dir(&mut a, ROOT_INO, "old");
    make_file(&mut a, old, "inner.txt", b"inner");
    commit(&mut a);
    m.exchange();
    let mut b = m.fs(&m.b);

    rewrite(&mut a, docs, "report.txt", b"from a");
    make_file(&mut a, ROOT_INO, "a-only.txt", b"a");
    a.unlink(ROOT_INO, b"gone.txt").unwrap();
    a.unlink(ROOT_INO, b"edited.txt").unwrap();
    a.rename(ROOT_INO, b"old", ROOT_INO, b"renamed").unwrap();
    make_file(&mut a, ROOT_INO, "same.txt", b"same from a");
    let from_a = commit(&mut a);

    rewrite(&mut b, docs, "report.txt", b"from b");
    make_file(&mut b, ROOT_INO, "b-only.txt", b"b");
    rewrite(&mut b, ROOT_INO, "edited.txt", b"edited on b");
    make_file(&mut b, old, "from-b.txt", b"written into old");
    make_file(&mut b, ROOT_INO, "same.txt", b"same from b");
    let from_b = commit(&mut b);

    m.exchange();
    let (a, b) = (m.fs(&m.a), m.fs(&m.b));
    let mut heads = vec![from_a, from_b];
    heads.sort();
    assert_eq!(a.heads(), heads);
    let tree = shown(&a);
    assert_eq!(tree, shown(&b), "both machines show the same merge");

    assert_eq!(content(&tree, "/a-only.txt"), b"a");
    assert_eq!(content(&tree, "/b-only.txt"), b"b");
    assert_eq!(content(&tree, "/keep.txt"), b"base");
    assert!(!tree.contains_key("/gone.txt"), "removed on one side, untouched on the other");
    assert_eq!(content(&tree, "/edited.txt"), b"edited on b", "a delete against an edit keeps the edit");
    assert!(!tree.contains_key("/old"));
    assert_eq!(content(&tree, "/renamed/inner.txt"), b"inner");
    assert_eq!(content(&tree, "/renamed/from-b.txt"), b"written into old", "rename and write both kept");

    // Both versions of a file changed on both sides, and of a name both made, side by side.
    let copies = conflicts(&tree);
    assert_eq!(copies.len(), 2, "{copies:?}");
    let copy_of = |prefix: &str, ext: &str| {
        let found = copies.iter().find(|p| p.starts_with(prefix) && p.ends_with(ext));
        found.unwrap_or_else(|| panic!("no {prefix}…{ext} in {copies:?}")).to_string()
    };
    let report_copy = copy_of("/docs/report.conflict-", ".txt");
    let mut versions = [content(&tree, "/docs/report.txt"), content(&tree, &report_copy)];
    versions.sort();
    assert_eq!(versions, [b"from a".to_vec(), b"from b".to_vec()]);
    let same_copy = copy_of("/same.conflict-", ".txt");
    let mut versions = [content(&tree, "/same.txt"), content(&tree, &same_copy)];
    versions.sort();
    assert_eq!(versions, [b"same from a".to_vec(), b"same from b".to_vec()]);
    // Named after the losing version's record and writer: the same on every machine.
    let writer = m.me.writer().to_hex();
    assert!(report_copy.contains(&format!(".conflict-{}-", &writer[..8])), "{report_copy}");
}

#[test]
fn the_next_commit_records_the_merge_and_two_mounts_settle_without_merging_again() {
    let m = machines();
    let mut a = m.fs(&m.a);
    let (f, _) = a.make(ROOT_INO, b"f.txt", Inode::new(Kind::File, 0o644, 0, 0)).unwrap();
    a.write(f, 0, b"base").unwrap();
    commit(&mut a);
    m.exchange();
    let mut b = m.fs(&m.b);
    a.write(f, 0, b"AAAA").unwrap();
    commit(&mut a);
    b.write(f, 0, b"BBBB").unwrap();
    commit(&mut b);
    m.exchange();
    // Both follow to the merge; nothing is committed for it.
    for fs in [&mut a, &mut b] {
        assert!(matches!(fs.follow().unwrap(), Followed::Moved(heads, _) if heads.len() == 2));
        assert!(!fs.is_dirty(), "a merge alone is no change to commit");
        assert_eq!(fs.commit(Signing::Now, Durability::Buffered).unwrap(), None);
    }
    let merged = shown(&a);
    assert_eq!(merged, shown(&b));
    assert_eq!(conflicts(&merged).len(), 1);

    // Each machine now changes something else: two commits, each with both heads as parents.
    let heads = a.heads().to_vec();
    make_file(&mut a, ROOT_INO, "after-a", b"1");
    let ca = commit(&mut a);
    make_file(&mut b, ROOT_INO, "after-b", b"2");
    let cb = commit(&mut b);
    for c in [ca, cb] {
        assert_eq!(m.a.record(c).or_else(|_| m.b.record(c)).unwrap().header.parents, heads);
    }
    m.exchange();
    // Their merge starts from the merge both built on: no new conflict, the same tree.
    for fs in [&mut a, &mut b] {
        assert!(matches!(fs.follow().unwrap(), Followed::Moved(..)));
    }
    let settled = shown(&a);
    assert_eq!(settled, shown(&b));
    assert_eq!(conflicts(&settled).len(), 1, "the old conflict is not made again");
    assert_eq!(content(&settled, "/after-a"), b"1");
    assert_eq!(content(&settled, "/after-b"), b"2");
    // One more commit anywhere leaves one filesystem head.
    make_file(&mut a, ROOT_INO, "last", b"3");
    commit(&mut a);
    m.exchange();
    assert_eq!(filesystem_heads(&m.b).unwrap().len(), 1);
    assert!(matches!(b.follow().unwrap(), Followed::Moved(heads, _) if heads.len() == 1));
    assert_eq!(shown(&a), shown(&b));
}

#[test]
fn a_member_behind_the_owner_commits_on_the_grant_that_lets_it_write() {
    // Granted before any commit (the chaos run's start), and on top of one.
    member_commits_while_behind(false);
    member_commits_while_behind(true);
}

fn member_commits_while_behind(committed_before_grant: bool) {
    let m = machines();
    let mut theirs = m.fs(&m.a);
    if committed_before_grant {
        make_file(&mut theirs, ROOT_INO, "first", b"f");
        commit(&mut theirs);
    }
    let carol = Identity::generate("carol").unwrap();
    member::grant(&m.a, &m.me, &carol.writer(), Level::Write).unwrap();
    let kv: Arc<dyn Kv> = Arc::new(MemKv::new());
    let c = Arc::new(Capsule::adopt(kv, m.a.id(), &m.a.metadata_bytes(), vec![carol.clone()]).unwrap());
    pull(&c, &*m.a, &()).unwrap();
    let mut mine = Fs::open(c.clone(), content_key(&c, &carol).unwrap(), Some(carol.clone())).unwrap();
    // Carol writes while the owner's next commit arrives: she commits on the state she shows,
    // which predates it, and her record must still sit on the grant.
    make_file(&mut mine, ROOT_INO, "carol", b"c");
    make_file(&mut theirs, ROOT_INO, "owner", b"o");
    commit(&mut theirs);
    pull(&c, &*m.a, &()).unwrap();
    assert!(matches!(mine.follow().unwrap(), Followed::Pending));
    commit(&mut mine);
    pull(&m.a, &*c, &()).unwrap();
    for fs in [&mut mine, &mut theirs] {
        assert!(matches!(fs.follow().unwrap(), Followed::Moved(heads, _) if heads.len() == 2));
    }
    assert_eq!(shown(&mine), shown(&theirs));
    assert_eq!(content(&shown(&mine), "/carol"), b"c");
    assert_eq!(content(&shown(&mine), "/owner"), b"o");
}

#[test]
fn a_folder_removed_on_one_machine_keeps_what_the_other_changed_under_it() {
    let m = machines();
    let mut a = m.fs(&m.a);
    let top = make_dir(&mut a, ROOT_INO, "project");
    let sub = make_dir(&mut a, top, "src");
    make_file(&mut a, sub, "main.rs", b"fn main() {}");
    make_file(&mut a, sub, "lib.rs", b"// lib");
    make_file(&mut a, top, "README", b"readme");
    commit(&mut a);
    m.exchange();
    let mut b = m.fs(&m.b);
    // a removes the whole folder (as rm -rf: children first).
    a.unlink(sub, b"main.rs").unwrap();
    a.unlink(sub, b"lib.rs").unwrap();
    a.rmdir(top, b"src").unwrap();
    a.unlink(top, b"README").unwrap();
    a.rmdir(ROOT_INO, b"project").unwrap();
    commit(&mut a);
    // b edits one file deep inside it.
    rewrite(&mut b, sub, "main.rs", b"fn main() { edited() }");
    commit(&mut b);
    m.exchange();
    let tree = shown(&m.fs(&m.a));
    assert_eq!(tree, shown(&m.fs(&m.b)));
    assert_eq!(content(&tree, "/project/src/main.rs"), b"fn main() { edited() }", "the edit survives");
    assert!(!tree.contains_key("/project/src/lib.rs"), "what only one side touched goes: {tree:?}");
    assert!(!tree.contains_key("/project/README"));
}

#[test]
fn hard_links_and_moves_made_apart_keep_their_link_counts() {
    let m = machines();
    let mut a = m.fs(&m.a);
    let f = make_file(&mut a, ROOT_INO, "f", b"shared");
    let d = make_dir(&mut a, ROOT_INO, "d");
    let e = make_dir(&mut a, ROOT_INO, "e");
    commit(&mut a);
    m.exchange();
    let mut b = m.fs(&m.b);
    a.link(f, d, b"f-in-d").unwrap();
    a.rename(ROOT_INO, b"e", d, b"e").unwrap();
    commit(&mut a);
    b.link(f, ROOT_INO, b"f-again").unwrap();
    b.write(f, 6, b" and more").unwrap();
    make_dir(&mut b, e, "inside-e");
    commit(&mut b);
    m.exchange();
    let tree = shown(&m.fs(&m.a));
    assert_eq!(tree, shown(&m.fs(&m.b)));
    for path in ["/f", "/d/f-in-d", "/f-again"] {
        assert_eq!(tree[path].1, f, "{path} is the same file");
        assert_eq!(tree[path].2, 3, "{path}: three names");
        assert_eq!(tree[path].3, b"shared and more");
    }
    assert!(tree.contains_key("/d/e/inside-e"));
}

#[test]
fn folders_moved_into_each_other_apart_stay_reachable() {
    let m = machines();
    let mut a = m.fs(&m.a);
    let x = make_dir(&mut a, ROOT_INO, "x");
    let y = make_dir(&mut a, ROOT_INO, "y");
    make_file(&mut a, x, "in-x", b"x");
    make_file(&mut a, y, "in-y", b"y");
    commit(&mut a);
    m.exchange();
    let mut b = m.fs(&m.b);
    a.rename(ROOT_INO, b"x", y, b"x").unwrap();
    commit(&mut a);
    b.rename(ROOT_INO, b"y", x, b"y").unwrap();
    commit(&mut b);
    m.exchange();
    let tree = shown(&m.fs(&m.a));
    assert_eq!(tree, shown(&m.fs(&m.b)));
    // One move stays (the winner's), the other folder keeps its old place.
    let files: Vec<&String> = tree.keys().filter(|p| p.ends_with("in-x") || p.ends_with("in-y")).collect();
    assert_eq!(files.len(), 2, "{tree:?}");
    assert!(tree.contains_key("/x/y/in-y") || tree.contains_key("/y/x/in-x"), "{tree:?}");
}

#[test]
fn a_conflict_copy_is_a_file_like_any_other() {
    let m = machines();
    let mut a = m.fs(&m.a);
    let f = make_file(&mut a, ROOT_INO, "notes.md", &vec![7u8; 200_000]);
    commit(&mut a);
    m.exchange();
    let mut b = m.fs(&m.b);
    a.write(f, 0, b"a's start").unwrap();
    commit(&mut a);
    b.write(f, 150_000, b"b's middle").unwrap();
    commit(&mut b);
    m.exchange();
    let mut a = m.fs(&m.a);
    let tree = shown(&a);
    let copy = conflicts(&tree)[0].trim_start_matches('/').to_owned();
    assert!(copy.starts_with("notes.conflict-") && copy.ends_with(".md"), "{copy}");
    let (ino, _) = a.lookup(ROOT_INO, copy.as_bytes()).unwrap();
    let before = a.read(ino, 0, 1 << 20).unwrap();
    assert_eq!(before.len(), 200_000);
    // Written, it is sealed afresh at its own number, and reads back after a reopen.
    a.write(ino, 199_990, b"0123456789tail").unwrap();
    commit(&mut a);
    let mut want = before;
    want.truncate(199_990);
    want.extend_from_slice(b"0123456789tail");
    assert_eq!(m.fs(&m.a).read(ino, 0, 1 << 20).unwrap(), want);
    m.exchange();
    assert_eq!(m.fs(&m.b).read(ino, 0, 1 << 20).unwrap(), want);
}

/// Every name a folder lists can be looked up and read: no name outlives its inode.
fn assert_no_dangling(fs: &Fs) {
    let mut stack = vec![ROOT_INO];
    while let Some(dir) = stack.pop() {
        for e in fs.readdir(dir).unwrap() {
            let (ino, inode) = fs.lookup(dir, &e.name).unwrap_or_else(|err| {
                panic!("{:?} is listed but does not look up: {err}", String::from_utf8_lossy(&e.name))
            });
            if inode.kind == Kind::Dir {
                stack.push(ino);
            } else if inode.kind == Kind::File {
                fs.read(ino, 0, 1 << 20).unwrap();
            }
        }
    }
}

#[test]
fn a_file_one_side_renamed_to_a_conflict_name_and_the_other_deleted_keeps_name_and_inode() {
    // Which side's g0 wins the hash order decides whether A's merge renames B's file: run
    // enough times that both happen.
    let mut renamed = 0;
    for _ in 0..12 {
        let m = machines();
        let mut a = m.fs(&m.a);
        commit_anything(&mut a);
        m.exchange();
        let mut b = m.fs(&m.b);
        make_file(&mut a, ROOT_INO, "g0", b"from a");
        commit(&mut a);
        make_file(&mut b, ROOT_INO, "g0", b"from b");
        commit(&mut b);
        // A sees B's g0, shows the merge, and its next commit records it.
        pull(&m.a, &*m.b, &()).unwrap();
        let mut a = m.fs(&m.a);
        make_file(&mut a, ROOT_INO, "z", b"x");
        commit(&mut a);
        let b_was_renamed = conflicts(&shown(&a)).iter().any(|p| content(&shown(&a), p) == b"from b");
        renamed += usize::from(b_was_renamed);
        // B, which never saw that merge, deletes its g0.
        b.unlink(ROOT_INO, b"g0").unwrap();
        commit(&mut b);
        m.exchange();
        let (a, b) = (m.fs(&m.a), m.fs(&m.b));
        assert_eq!(shown(&a), shown(&b));
        assert_no_dangling(&a);
        let tree = shown(&a);
        assert!(tree.values().any(|v| v.3 == b"from a"), "{tree:?}");
        if b_was_renamed {
            // A kept B's file under a conflict name; the rename outlives B's delete.
            assert!(tree.values().any(|v| v.3 == b"from b"), "{tree:?}");
        }
    }
    assert!(renamed > 0, "the case never came up");
}

/// Commits a first file, so the machines share a base with something in it.
fn commit_anything(fs: &mut Fs) {
    make_file(fs, ROOT_INO, "base", b"base");
    commit(fs);
}

#[test]
fn a_file_renamed_to_two_names_apart_ends_with_the_winners_name() {
    let m = machines();
    let mut a = m.fs(&m.a);
    let f = make_file(&mut a, ROOT_INO, "f", b"one file");
    commit(&mut a);
    m.exchange();
    let mut b = m.fs(&m.b);
    a.rename(ROOT_INO, b"f", ROOT_INO, b"from-a").unwrap();
    commit(&mut a);
    b.rename(ROOT_INO, b"f", ROOT_INO, b"from-b").unwrap();
    commit(&mut b);
    m.exchange();
    let tree = shown(&m.fs(&m.a));
    assert_eq!(tree, shown(&m.fs(&m.b)));
    let names: Vec<&String> = tree.iter().filter(|(_, v)| v.1 == f).map(|(p, _)| p).collect();
    assert_eq!(names.len(), 1, "one file keeps one name, as a folder does: {names:?}");
    assert_eq!(tree[names[0]].2, 1);
}

mod random {
    //! Random changes on both machines from a random common tree: whatever they do, both
    //! show the same merge, link counts match the names, and no version either machine
    //! committed of a file it changed is lost.
    use proptest::prelude::*;

    use super::*;

    /// One change, its numbers picking among what exists when it runs.
    #[derive(Clone, Debug)]
    enum Op {
        Create(u8, u8),
        Write(u8, u8),
        Mkdir(u8, u8),
        Unlink(u8),
        Rmdir(u8),
        Rename(u8, u8, u8),
        Link(u8, u8, u8),
        /// Whatever a name in a folder is, made something else (file, folder, symlink, fifo).
        Retype(u8, u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (any::<u8>(), any::<u8>()).prop_map(|(d, n)| Op::Create(d, n)),
            3 => (any::<u8>(), any::<u8>()).prop_map(|(f, s)| Op::Write(f, s)),
            1 => (any::<u8>(), any::<u8>()).prop_map(|(d, n)| Op::Mkdir(d, n)),
            2 => any::<u8>().prop_map(Op::Unlink),
            1 => any::<u8>().prop_map(Op::Rmdir),
            2 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(f, d, n)| Op::Rename(f, d, n)),
            1 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(f, d, n)| Op::Link(f, d, n)),
            1 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(d, n, k)| Op::Retype(d, n, k)),
        ]
    }

    /// Folders (with the root), and every entry with its folder.
    fn listing(fs: &Fs) -> (Vec<u64>, Vec<(u64, DirEntry)>) {
        let (mut dirs, mut entries) = (vec![ROOT_INO], Vec::new());
        let mut i = 0;
        while i < dirs.len() {
            for e in fs.readdir(dirs[i]).unwrap() {
                if e.kind == Kind::Dir {
                    dirs.push(e.ino);
                }
                entries.push((dirs[i], e));
            }
            i += 1;
        }
        (dirs, entries)
    }

    fn pick<T>(items: &[T], n: u8) -> Option<&T> {
        (!items.is_empty()).then(|| &items[n as usize % items.len()])
    }

    fn apply(fs: &mut Fs, op: &Op, tag: &str) {
        let (dirs, entries) = listing(fs);
        let files: Vec<_> = entries.iter().filter(|e| e.1.kind == Kind::File).collect();
        let name = |n: u8| format!("n{}", n % 6).into_bytes();
        // Errors (a name taken, a folder not empty) are what a user would meet: skipped.
        let _ = match *op {
            Op::Create(d, n) => fs
                .make(dirs[d as usize % dirs.len()], &name(n), Inode::new(Kind::File, 0o644, 0, 0))
                .and_then(|(ino, _)| fs.write(ino, 0, format!("{tag} made").as_bytes())),
            Op::Write(f, s) => match pick(&files, f) {
                Some(e) => fs.write(e.1.ino, u64::from(s % 8), format!("{tag} wrote {s}").as_bytes()),
                None => Ok(()),
            },
            Op::Mkdir(d, n) => {
                fs.make(dirs[d as usize % dirs.len()], &name(n), Inode::new(Kind::Dir, 0o755, 0, 0)).map(drop)
            }
            Op::Unlink(f) => match pick(&files, f) {
                Some(e) => fs.unlink(e.0, &e.1.name),
                None => Ok(()),
            },
            Op::Rmdir(d) => match pick(&entries.iter().filter(|e| e.1.kind == Kind::Dir).collect::<Vec<_>>(), d) {
                Some(e) => fs.rmdir(e.0, &e.1.name),
                None => Ok(()),
            },
            Op::Rename(f, d, n) => match pick(&entries, f) {
                Some(e) => fs.rename(e.0, &e.1.name, dirs[d as usize % dirs.len()], &name(n)),
                None => Ok(()),
            },
            Op::Link(f, d, n) => match pick(&files, f) {
                Some(e) => fs.link(e.1.ino, dirs[d as usize % dirs.len()], &name(n)).map(drop),
                None => Ok(()),
            },
            Op::Retype(d, n, k) => {
                let dir = dirs[d as usize % dirs.len()];
                let _ = fs.unlink(dir, &name(n)).or_else(|_| fs.rmdir(dir, &name(n)));
                let kind = [Kind::File, Kind::Dir, Kind::Symlink, Kind::Fifo][k as usize % 4];
                let mut inode = Inode::new(kind, if kind == Kind::Dir { 0o755 } else { 0o644 }, 0, 0);
                if kind == Kind::Symlink {
                    inode.target = format!("{tag} link").into_bytes();
                    inode.size = inode.target.len() as u64;
                }
                fs.make(dir, &name(n), inode).and_then(|(ino, _)| match kind {
                    Kind::File => fs.write(ino, 0, format!("{tag} retyped").as_bytes()),
                    _ => Ok(()),
                })
            }
        };
    }

    /// Each file's bytes, by inode.
    fn files(fs: &Fs) -> BTreeMap<u64, Vec<u8>> {
        let (_, entries) = listing(fs);
        entries
            .iter()
            .filter(|e| e.1.kind == Kind::File)
            .map(|e| (e.1.ino, fs.read(e.1.ino, 0, 1 << 20).unwrap()))
            .collect()
    }

    /// Both machines from a common tree (`base`) change it apart (`left`, `right`); A takes
    /// B's changes in, commits the merge with `later_left`, while B goes on with
    /// `later_right`; then both exchange. Both show the same tree, link counts match names,
    /// no name dangles, and no version either side held is lost.
    fn check_case(
        base: &[Op],
        left: &[Op],
        right: &[Op],
        later_left: &[Op],
        later_right: &[Op],
    ) -> Result<(), TestCaseError> {
        let m = machines();
        let mut a = m.fs(&m.a);
        for op in base {
            apply(&mut a, op, "base");
        }
        a.commit(Signing::Now, Durability::Buffered).unwrap();
        m.exchange();
        let mut b = m.fs(&m.b);
        for op in left {
            apply(&mut a, op, "a");
        }
        for op in right {
            apply(&mut b, op, "b");
        }
        a.commit(Signing::Now, Durability::Buffered).unwrap();
        b.commit(Signing::Now, Durability::Buffered).unwrap();
        // B's state now is the base of the last merge: A takes it in below, B never sees
        // A's merge before making more changes.
        let base_of_last = files(&b);
        // A merges and commits the merge with more changes; B goes on without seeing it:
        // the next merge is of a merge against a branch, as syncing mounts make them.
        pull(&m.a, &*m.b, &()).unwrap();
        let mut a = m.fs(&m.a);
        // Something to commit, so that A's next commit records the merge it shows.
        make_file(&mut a, ROOT_INO, "merged-on-a", b"merged");
        for op in later_left {
            apply(&mut a, op, "a later");
        }
        for op in later_right {
            apply(&mut b, op, "b later");
        }
        // What either side holds that the base of the last merge did not: each must be
        // somewhere in the merge (an edit outlives a delete; both edits keep a copy).
        let versions: Vec<Vec<u8>> = [files(&a), files(&b)]
            .into_iter()
            .flatten()
            .filter(|(ino, bytes)| base_of_last.get(ino) != Some(bytes))
            .map(|(_, bytes)| bytes)
            .collect();
        a.commit(Signing::Now, Durability::Buffered).unwrap();
        b.commit(Signing::Now, Durability::Buffered).unwrap();
        m.exchange();
        let (a, b) = (m.fs(&m.a), m.fs(&m.b));
        assert_no_dangling(&a);
        let tree = shown(&a);
        prop_assert_eq!(&tree, &shown(&b));
        let mut names: BTreeMap<u64, u32> = BTreeMap::new();
        for (kind, ino, _, _) in tree.values() {
            if *kind != Kind::Dir {
                *names.entry(*ino).or_default() += 1;
            }
        }
        for (path, (kind, ino, nlink, _)) in &tree {
            if *kind != Kind::Dir {
                prop_assert_eq!(*nlink, names[ino], "{} links", path);
            }
        }
        let kept: Vec<&Vec<u8>> = tree.values().map(|v| &v.3).collect();
        for v in &versions {
            prop_assert!(kept.contains(&v), "lost {:?}; tree {:?}", String::from_utf8_lossy(v), tree.keys());
        }
        Ok(())
    }

    #[test]
    fn a_conflict_name_never_outlives_its_inode() {
        // Found by the property test below: a name moved to a conflict name whose inode the
        // other side deleted.
        use Op::*;
        let base = [
            Unlink(211),
            Unlink(15),
            Unlink(160),
            Unlink(33),
            Unlink(199),
            Create(80, 197),
            Create(36, 147),
            Rename(148, 27, 121),
            Rename(79, 96, 63),
            Create(86, 215),
            Mkdir(239, 221),
            Rename(31, 185, 181),
        ];
        let left = [Rename(196, 146, 60), Unlink(185), Rename(98, 118, 26)];
        let right = [Mkdir(35, 123), Write(27, 56), Write(16, 246)];
        let later_right = [
            Write(103, 32),
            Rename(90, 163, 135),
            Write(201, 146),
            Rename(155, 80, 109),
            Create(184, 248),
            Unlink(9),
            Unlink(30),
        ];
        check_case(&base, &left, &right, &[], &later_right).unwrap();
    }

    /// One round of three machines syncing now and then: for each, which other machine it
    /// takes records from first (none, or one of the others), then its changes, committed
    /// with a marker so that a merge it shows is recorded.
    type Round = [(u8, Vec<Op>); 3];

    fn round() -> impl Strategy<Value = Round> {
        let turn = || (0u8..3, proptest::collection::vec(op(), 0..6));
        (turn(), turn(), turn()).prop_map(|(a, b, c)| [a, b, c])
    }

    /// Rounds of changes on three machines (two devices of one writer and a third store), each
    /// taking in another's records now and then: after every machine took every other's,
    /// all show the same tree, link counts match names, and no name dangles.
    fn check_rounds(base: &[Op], rounds: &[Round]) -> Result<(), TestCaseError> {
        let m = machines();
        let kv: Arc<dyn Kv> = Arc::new(MemKv::new());
        let c = Arc::new(Capsule::adopt(kv, m.a.id(), &m.a.metadata_bytes(), vec![m.me.clone()]).unwrap());
        let mut a = m.fs(&m.a);
        for op in base {
            apply(&mut a, op, "base");
        }
        a.commit(Signing::Now, Durability::Buffered).unwrap();
        let caps = [m.a.clone(), m.b.clone(), c];
        let everyone = || {
            for _ in 0..2 {
                for x in &caps {
                    for y in &caps {
                        if !Arc::ptr_eq(x, y) {
                            pull(x, &**y, &()).unwrap();
                        }
                    }
                }
            }
        };
        everyone();
        for (i, round) in rounds.iter().enumerate() {
            for (me, (from, ops)) in round.iter().enumerate() {
                let from = (me + 1 + *from as usize % 2) % 3;
                if *from_turn(round, me) {
                    pull(&caps[me], &*caps[from], &()).unwrap();
                }
                let mut fs = m.fs(&caps[me]);
                make_file(&mut fs, ROOT_INO, &format!("marker-{me}-{i}"), b"m");
                for op in ops {
                    apply(&mut fs, op, &format!("{me}.{i}"));
                }
                fs.commit(Signing::Now, Durability::Buffered).unwrap();
            }
        }
        everyone();
        let trees: Vec<Shown> = caps.iter().map(|c| shown(&m.fs(c))).collect();
        for c in &caps {
            assert_no_dangling(&m.fs(c));
        }
        prop_assert_eq!(&trees[0], &trees[1]);
        prop_assert_eq!(&trees[0], &trees[2]);
        let mut names: BTreeMap<u64, u32> = BTreeMap::new();
        for (kind, ino, _, _) in trees[0].values() {
            if *kind != Kind::Dir {
                *names.entry(*ino).or_default() += 1;
            }
        }
        for (path, (kind, ino, nlink, _)) in &trees[0] {
            if *kind != Kind::Dir {
                prop_assert_eq!(*nlink, names[ino], "{} links", path);
            }
        }
        Ok(())
    }

    /// Whether machine `me` takes records in this round (a third of the time it does not).
    fn from_turn(round: &Round, me: usize) -> &bool {
        if round[me].0 == 0 { &false } else { &true }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
        #[test]
        fn machines_that_sync_now_and_then_converge_without_dangling_names(
            base in proptest::collection::vec(op(), 0..16),
            rounds in proptest::collection::vec(round(), 1..6),
        ) {
            check_rounds(&base, &rounds)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn any_two_branches_merge_alike_and_lose_no_version(
            base in proptest::collection::vec(op(), 0..24),
            left in proptest::collection::vec(op(), 0..16),
            right in proptest::collection::vec(op(), 0..16),
            later_left in proptest::collection::vec(op(), 0..8),
            later_right in proptest::collection::vec(op(), 0..8),
        ) {
            check_case(&base, &left, &right, &later_left, &later_right)?;
        }
    }
}
