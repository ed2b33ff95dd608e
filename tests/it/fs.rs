//! The filesystem core in-process: POSIX semantics over sealed, proven sub-records.

use std::sync::Arc;

use capsulefs::capsule::{AppendOptions, Capsule, NewCapsule};
use capsulefs::crypto::aead::SealedKind;
use capsulefs::crypto::keys::Identity;
use capsulefs::fs::Fs;
use capsulefs::fs::filesystem::Signing;
use capsulefs::fs::heads::filesystem_heads;
use capsulefs::fs::node::{CHUNK_SIZE, Inode, Kind, ROOT_INO};
use capsulefs::fs::sealed::Sealed;
use capsulefs::fs::trie::Loc;
use capsulefs::member::{content_key, create_keystore};
use capsulefs::record::{RecordHash, SubIdx};
use capsulefs::store::mem::MemKv;
use capsulefs::store::{Batch, Cf, Durability, Kv};
use capsulefs::{Error, VerifyError};

struct Setup {
    kv: Arc<MemKv>,
    cap: Arc<Capsule>,
    me: Identity,
}

fn setup() -> Setup {
    let kv = Arc::new(MemKv::new());
    let me = Identity::generate("me").unwrap();
    let cap = Arc::new(Capsule::create(kv.clone(), NewCapsule::new("fs", &me), vec![me.clone()]).unwrap());
    create_keystore(&cap, &me).unwrap();
    Setup { kv, cap, me }
}

impl Setup {
    fn fs(&self) -> Fs {
        Fs::open(self.cap.clone(), content_key(&self.cap, &self.me).unwrap(), Some(self.me.clone())).unwrap()
    }
    fn view(&self, at: RecordHash) -> Fs {
        Fs::open_at(self.cap.clone(), content_key(&self.cap, &self.me).unwrap(), None, at).unwrap()
    }
}

fn file() -> Inode {
    Inode::new(Kind::File, 0o644, 1000, 1000)
}

fn dir() -> Inode {
    Inode::new(Kind::Dir, 0o755, 1000, 1000)
}

fn commit(fs: &mut Fs) -> RecordHash {
    fs.commit(Signing::Now, Durability::Buffered).unwrap().expect("something to commit")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn files_and_directories_survive_commit_and_reopen() {
    let s = setup();
    let mut fs = s.fs();
    let (docs, _) = fs.make(ROOT_INO, b"docs", dir()).unwrap();
    let (f, _) = fs.make(docs, b"report.txt", file()).unwrap();
    let data = pattern(3 * CHUNK_SIZE as usize + 123, 7);
    fs.write(f, 1000, &data).unwrap();
    assert_eq!(fs.read(f, 1000, data.len() as u32).unwrap(), data, "pending writes read back");
    commit(&mut fs);
    assert!(!fs.is_dirty());

    let fs = s.fs();
    let (ino, attr) = fs.lookup(ROOT_INO, b"docs").unwrap();
    assert_eq!((ino, attr.kind, attr.nlink), (docs, Kind::Dir, 2));
    let (ino, attr) = fs.lookup(docs, b"report.txt").unwrap();
    assert_eq!((ino, attr.size), (f, 1000 + data.len() as u64));
    assert_eq!(fs.read(f, 0, 1000).unwrap(), vec![0; 1000], "the start is a hole");
    assert_eq!(fs.read(f, 1000, data.len() as u32).unwrap(), data);
    assert_eq!(fs.read(f, 1000 + CHUNK_SIZE - 5, 10).unwrap(), data[CHUNK_SIZE as usize - 5..CHUNK_SIZE as usize + 5]);
    let names: Vec<_> = fs.readdir(docs).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec![b"report.txt".to_vec()]);
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
}

#[test]
fn overwrites_sparse_files_and_truncation() {
    let s = setup();
    let mut fs = s.fs();
    let (f, _) = fs.make(ROOT_INO, b"f", file()).unwrap();
    fs.write(f, 10 * CHUNK_SIZE, b"far away").unwrap();
    commit(&mut fs);
    assert_eq!(fs.getattr(f).unwrap().size, 10 * CHUNK_SIZE + 8);
    assert_eq!(fs.read(f, 5 * CHUNK_SIZE, 4).unwrap(), vec![0; 4]);
    fs.write(f, 10 * CHUNK_SIZE + 4, b"AWAY!").unwrap();
    assert_eq!(fs.read(f, 10 * CHUNK_SIZE, 100).unwrap(), b"far AWAY!");
    // Shrink into the middle of the last chunk, commit, grow again: the cut bytes stay gone.
    fs.truncate(f, 10 * CHUNK_SIZE + 2).unwrap();
    commit(&mut fs);
    fs.truncate(f, 10 * CHUNK_SIZE + 6).unwrap();
    assert_eq!(fs.read(f, 10 * CHUNK_SIZE, 100).unwrap(), b"fa\0\0\0\0");
    fs.truncate(f, 0).unwrap();
    commit(&mut fs);
    assert_eq!(s.fs().read(f, 0, 100).unwrap(), b"");
}

#[test]
fn a_large_directory_is_not_rewritten_for_one_entry() {
    let s = setup();
    let mut fs = s.fs();
    let (d, _) = fs.make(ROOT_INO, b"many", dir()).unwrap();
    for i in 0..3000 {
        fs.make(d, format!("file-{i:05}").as_bytes(), file()).unwrap();
    }
    let big = commit(&mut fs);
    fs.make(d, b"one-more", file()).unwrap();
    let small = commit(&mut fs);
    let count = |h| s.cap.proven_header(h).unwrap().sub_count;
    assert!(count(big) > 100, "{} sub-records for 3000 entries", count(big));
    assert!(count(small) < 12, "{} sub-records for one new entry", count(small));
    let fs = s.fs();
    assert_eq!(fs.readdir(d).unwrap().len(), 3001);
    assert!(fs.lookup(d, b"file-02999").is_ok());
    assert!(matches!(fs.lookup(d, b"file-03000"), Err(Error::NotFound(_))));
}

#[test]
fn rename_link_unlink_and_rmdir_follow_posix() {
    let s = setup();
    let mut fs = s.fs();
    let (a, _) = fs.make(ROOT_INO, b"a", dir()).unwrap();
    let (b, _) = fs.make(ROOT_INO, b"b", dir()).unwrap();
    let (x, _) = fs.make(a, b"x", file()).unwrap();
    let (y, _) = fs.make(b, b"y", file()).unwrap();
    fs.write(x, 0, b"x data").unwrap();
    fs.write(y, 0, b"y data").unwrap();
    commit(&mut fs);
    // Over an existing file, across directories.
    fs.rename(a, b"x", b, b"y").unwrap();
    assert!(matches!(fs.lookup(a, b"x"), Err(Error::NotFound(_))));
    assert_eq!(fs.lookup(b, b"y").unwrap().0, x);
    assert!(matches!(fs.getattr(y), Err(Error::NotFound(_))), "the replaced file is gone");
    assert!(matches!(fs.make(b, b"y", file()), Err(Error::Exists(_))));
    // Hard links count.
    fs.link(x, a, b"x-again").unwrap();
    assert_eq!(fs.getattr(x).unwrap().nlink, 2);
    fs.unlink(b, b"y").unwrap();
    assert_eq!(fs.read(x, 0, 100).unwrap(), b"x data", "still reachable through the other link");
    // Directories.
    assert!(matches!(fs.rmdir(ROOT_INO, b"a"), Err(Error::NotEmpty(_))));
    assert!(matches!(fs.unlink(ROOT_INO, b"a"), Err(Error::IsADirectory(_))));
    assert!(matches!(fs.rename(ROOT_INO, b"a", a, b"inside"), Err(Error::Invalid(_))));
    assert!(matches!(fs.rename(ROOT_INO, b"b", a, b"x-again"), Err(Error::NotADirectory(_))));
    fs.rename(ROOT_INO, b"b", a, b"b-moved").unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    assert_eq!(fs.getattr(a).unwrap().nlink, 3);
    commit(&mut fs);
    let fs = s.fs();
    let mut names: Vec<_> = fs.readdir(a).unwrap().into_iter().map(|e| e.name).collect();
    names.sort();
    assert_eq!(names, vec![b"b-moved".to_vec(), b"x-again".to_vec()]);
}

#[test]
fn exchange_swaps_two_names_of_any_kind() {
    let s = setup();
    let mut fs = s.fs();
    let (d, _) = fs.make(ROOT_INO, b"d", dir()).unwrap();
    let (f, _) = fs.make(ROOT_INO, b"f", file()).unwrap();
    let (inner, _) = fs.make(d, b"inner", dir()).unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    fs.exchange(ROOT_INO, b"f", d, b"inner").unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"f").unwrap().0, inner);
    assert_eq!(fs.lookup(d, b"inner").unwrap().0, f);
    // A directory moved up and a file moved down: the link counts follow.
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 4);
    assert_eq!(fs.getattr(d).unwrap().nlink, 2);
    assert!(matches!(fs.exchange(ROOT_INO, b"d", d, b"inner"), Err(Error::Invalid(_))), "d into itself");
    assert!(matches!(fs.exchange(ROOT_INO, b"d", d, b"missing"), Err(Error::NotFound(_))));
    commit(&mut fs);
    let fs = s.fs();
    assert_eq!(fs.lookup(ROOT_INO, b"f").unwrap().0, inner);
    assert_eq!(fs.lookup(d, b"inner").unwrap().0, f);
}

#[test]
fn every_commit_stays_readable_as_a_view_of_the_past() {
    let s = setup();
    let mut fs = s.fs();
    let (f, _) = fs.make(ROOT_INO, b"notes", file()).unwrap();
    fs.write(f, 0, b"first draft").unwrap();
    let v1 = commit(&mut fs);
    fs.write(f, 0, b"FINAL").unwrap();
    fs.make(ROOT_INO, b"later", file()).unwrap();
    let v2 = commit(&mut fs);
    let mut past = s.view(v1);
    assert_eq!(past.read(f, 0, 100).unwrap(), b"first draft");
    assert!(matches!(past.lookup(ROOT_INO, b"later"), Err(Error::NotFound(_))));
    assert!(matches!(past.write(f, 0, b"x"), Err(Error::ReadOnlyView)));
    assert_eq!(s.view(v2).read(f, 0, 100).unwrap(), b"FINAL draft");
}

#[test]
fn stored_bytes_never_contain_plaintext_names_or_contents() {
    let s = setup();
    let mut fs = s.fs();
    let (f, _) = fs.make(ROOT_INO, b"very-secret-name.txt", file()).unwrap();
    fs.write(f, 0, b"the launch codes are 0000").unwrap();
    commit(&mut fs);
    for cf in [Cf::Records, Cf::Subs] {
        for entry in s.kv.scan(cf, &[], false).unwrap() {
            let (_, v) = entry.unwrap();
            for needle in [&b"very-secret-name"[..], b"launch codes"] {
                assert!(!v.windows(needle.len()).any(|w| w == needle), "plaintext in {cf:?}");
            }
        }
    }
}

#[test]
fn tampered_chunks_fail_their_reads_only() {
    let s = setup();
    let mut fs = s.fs();
    let (a, _) = fs.make(ROOT_INO, b"a", file()).unwrap();
    let (b, _) = fs.make(ROOT_INO, b"b", file()).unwrap();
    fs.write(a, 0, b"alpha").unwrap();
    fs.write(b, 0, b"bravo").unwrap();
    let h = commit(&mut fs);
    // Sub-records 0 and 1 are the two chunks (chunks come first, in inode order).
    let key = [&h.as_bytes()[..], &0u32.to_be_bytes()].concat();
    let mut bytes = s.kv.get(Cf::Subs, &key).unwrap().unwrap();
    // Inside the sealed chunk (after its 4-byte length), not the Merkle path: a path check may
    // stop at a subtree proven by an earlier read, and then the path's upper part is unused.
    bytes[10] ^= 1;
    let mut batch = Batch::default();
    batch.put(Cf::Subs, key, bytes);
    s.kv.write(batch, Durability::Buffered).unwrap();
    let fs = s.fs();
    assert!(matches!(fs.read(a, 0, 5), Err(Error::Verify(VerifyError::MerkleMismatch { idx: SubIdx(0), .. }))));
    assert_eq!(fs.read(b, 0, 5).unwrap(), b"bravo");
}

#[test]
fn a_payload_read_at_another_place_does_not_open() {
    let s = setup();
    let mut fs = s.fs();
    let (a, _) = fs.make(ROOT_INO, b"a", file()).unwrap();
    fs.write(a, 0, b"alpha").unwrap();
    let h = commit(&mut fs);
    let key = content_key(&s.cap, &s.me).unwrap();
    let sealed = Sealed::new(s.cap.clone(), key.into());
    let at = Loc { record: h, idx: SubIdx(0) };
    assert_eq!(sealed.read(at, &sealed.place(SealedKind::Chunk, a, 0, 0)).unwrap().as_slice(), b"alpha");
    for wrong in [sealed.place(SealedKind::Chunk, a + 1, 0, 0), sealed.place(SealedKind::Chunk, a, CHUNK_SIZE, 0)] {
        assert!(matches!(sealed.read(at, &wrong), Err(Error::Verify(VerifyError::SealBroken { .. }))));
    }
}

#[test]
fn extended_attributes_and_provenance() {
    use capsulefs::fs::filesystem::XattrMode;

    let s = setup();
    let mut fs = s.fs();
    let (f, _) = fs.make(ROOT_INO, b"f", file()).unwrap();
    assert_eq!(fs.get_xattr(f, b"user.capsule.record").unwrap(), b"uncommitted");
    fs.set_xattr(f, b"user.color", Some(b"blue"), XattrMode::Create).unwrap();
    assert!(matches!(fs.set_xattr(f, b"user.color", Some(b"red"), XattrMode::Create), Err(Error::Exists(_))));
    assert!(matches!(fs.set_xattr(f, b"user.size", Some(b"1"), XattrMode::Replace), Err(Error::NoAttribute(_))));
    assert!(matches!(fs.set_xattr(f, b"user.capsule.record", Some(b"x"), XattrMode::Any), Err(Error::NotPermitted(_))));
    assert!(matches!(fs.set_xattr(f, b"trusted.x", Some(b"x"), XattrMode::Any), Err(Error::Unsupported(_))));
    let h = commit(&mut fs);

    let mut fs = s.fs();
    assert_eq!(fs.get_xattr(f, b"user.color").unwrap(), b"blue");
    assert_eq!(fs.get_xattr(f, b"user.capsule.record").unwrap(), h.to_hex().into_bytes());
    assert_eq!(fs.get_xattr(f, b"user.capsule.writer").unwrap(), s.me.writer().to_hex().into_bytes());
    assert!(fs.get_xattr(f, b"user.capsule.verified").unwrap().starts_with(b"signed "));
    assert_eq!(fs.list_xattrs(f).unwrap(), [b"user.color".to_vec()], "provenance is not listed");
    fs.set_xattr(f, b"user.color", None, XattrMode::Any).unwrap();
    assert!(matches!(fs.get_xattr(f, b"user.color"), Err(Error::NoAttribute(_))));
    assert!(matches!(fs.set_xattr(f, b"user.color", None, XattrMode::Any), Err(Error::NoAttribute(_))));
}

#[test]
fn files_unlinked_while_open_are_swept_after_a_crash() {
    let s = setup();
    let mut fs = s.fs();
    let (f, _) = fs.make(ROOT_INO, b"tmp", file()).unwrap();
    let (keep, _) = fs.make(ROOT_INO, b"keep", file()).unwrap();
    fs.opened(f);
    fs.write(f, 0, b"scratch").unwrap();
    fs.unlink(ROOT_INO, b"tmp").unwrap();
    assert_eq!(fs.getattr(f).unwrap().nlink, 0, "open: it lives on");
    commit(&mut fs);
    // The mount dies with the file still open: a fresh Fs finds it and removes it.
    let mut fs = s.fs();
    assert_eq!(fs.sweep_orphans().unwrap(), 1);
    assert!(matches!(fs.getattr(f), Err(Error::NotFound(_))));
    assert!(fs.getattr(keep).is_ok());
    commit(&mut fs);
    assert_eq!(s.fs().sweep_orphans().unwrap(), 0);
}

#[test]
fn records_of_other_kinds_never_break_the_filesystem() {
    let s = setup();
    let mut fs = s.fs();
    fs.make(ROOT_INO, b"kept", file()).unwrap();
    let first = commit(&mut fs);
    // Raw appends on top (`capsulefs append`): the mount passes through them to the commit.
    let raw = s.cap.append(&s.me, &[b"not a superblock"], AppendOptions::default()).unwrap();
    let mut fs = s.fs();
    assert_eq!(fs.heads(), [first]);
    assert!(fs.lookup(ROOT_INO, b"kept").is_ok());
    // The next commit names the raw head: it holds the same filesystem state.
    fs.make(ROOT_INO, b"more", file()).unwrap();
    let second = commit(&mut fs);
    assert_eq!(s.cap.record(second).unwrap().header.parents, vec![raw]);
    assert_eq!(filesystem_heads(&s.cap).unwrap(), vec![second]);
    // A raw append on a capsule with no filesystem yet: the mount starts empty.
    let t = setup();
    t.cap.append(&t.me, &[b"raw"], AppendOptions::default()).unwrap();
    assert!(t.fs().readdir(ROOT_INO).unwrap().is_empty());
}

#[test]
fn appends_to_a_committed_chunk_seal_only_the_added_bytes() {
    let s = setup();
    let mut fs = s.fs();
    let (ino, _) = fs.make(ROOT_INO, b"log", file()).unwrap();
    let mut expected = Vec::new();
    let sealed_chunk_len = |rec: RecordHash| s.cap.read_sub_record(rec, SubIdx(0)).unwrap().0.get().len();
    for i in 0..20u8 {
        let line = pattern(100, i);
        fs.write(ino, expected.len() as u64, &line).unwrap();
        expected.extend_from_slice(&line);
        let rec = commit(&mut fs);
        // Sub-record 0 is the chunk's new piece (plus the seal's 40): the appended bytes joined
        // with the last pieces no longer than they are, a binary counter. After the c-th
        // line it holds as many lines as c's lowest set bit says: the whole chunk after 1, 2,
        // 4, 8 and 16 lines, one line after every odd count.
        let c = usize::from(i) + 1;
        let want = line.len() * (c & c.wrapping_neg());
        assert_eq!(sealed_chunk_len(rec), want + 40, "append {i}");
        assert_eq!(fs.read(ino, 0, 1 << 20).unwrap(), expected, "append {i}");
    }
    // A write below the committed pieces' end seals the chunk whole again.
    fs.write(ino, 10, b"rewritten").unwrap();
    expected[10..19].copy_from_slice(b"rewritten");
    let rec = commit(&mut fs);
    assert_eq!(sealed_chunk_len(rec), expected.len() + 40);
    // Read back by a fresh filesystem, with nothing cached, in part and whole.
    let fresh = s.fs();
    assert_eq!(fresh.read(ino, 0, 1 << 20).unwrap(), expected);
    assert_eq!(fresh.read(ino, 150, 120).unwrap(), expected[150..270]);
}

#[test]
fn a_chunk_of_pieces_read_whole_and_past_its_end() {
    let s = setup();
    let mut fs = s.fs();
    let (ino, _) = fs.make(ROOT_INO, b"f", file()).unwrap();
    fs.write(ino, 0, &pattern(1000, 1)).unwrap();
    commit(&mut fs);
    fs.write(ino, 1000, &pattern(CHUNK_SIZE as usize - 1000, 2)).unwrap();
    fs.write(ino, CHUNK_SIZE, &pattern(10, 3)).unwrap();
    commit(&mut fs);
    let mut want = pattern(1000, 1);
    want.extend(pattern(CHUNK_SIZE as usize - 1000, 2));
    want.extend(pattern(10, 3));
    let fresh = s.fs();
    assert_eq!(fresh.read(ino, 0, CHUNK_SIZE as u32).unwrap(), want[..CHUNK_SIZE as usize]);
    assert_eq!(fresh.read(ino, 0, 1 << 20).unwrap(), want);
}

#[test]
fn a_live_filesystem_follows_commits_made_elsewhere_unless_it_has_its_own() {
    use capsulefs::fs::filesystem::Followed;
    let s = setup();
    // Two filesystems over one capsule stand for two machines after a pull: `desk` writes,
    // `fresh` has done nothing, `busy` has a change of its own pending.
    let (mut desk, mut fresh) = (s.fs(), s.fs());
    let (ino, _) = desk.make(ROOT_INO, b"notes", file()).unwrap();
    desk.write(ino, 0, b"from the desk").unwrap();
    let first = commit(&mut desk);
    let mut busy = s.fs();
    let Followed::Moved(head, changes) = fresh.follow().unwrap() else { panic!("an untouched new root gives way") };
    assert_eq!(head, [first]);
    assert!(changes.inodes.contains(&ino) && changes.names.contains(&(ROOT_INO, b"notes".to_vec())), "{changes:?}");
    let (at, _) = fresh.lookup(ROOT_INO, b"notes").unwrap();
    assert_eq!(fresh.read(at, 0, 64).unwrap(), b"from the desk");
    assert_eq!(busy.follow().unwrap(), Followed::Same);

    desk.write(ino, 0, b"FROM").unwrap();
    let second = commit(&mut desk);
    let Followed::Moved(head, changes) = fresh.follow().unwrap() else { panic!("moved to the second commit") };
    assert_eq!(head, [second]);
    // Only the file changed: no name did, and the trees they share were not walked.
    assert_eq!((changes.inodes, changes.names), (vec![ino], vec![]));
    assert_eq!(fresh.read(at, 0, 64).unwrap(), b"FROM the desk");
    busy.write(ino, 0, b"mine").unwrap();
    assert_eq!(busy.follow().unwrap(), Followed::Pending, "pending changes are not dropped");
    let mine = commit(&mut busy);
    assert_eq!(filesystem_heads(&s.cap).unwrap().len(), 2, "both branches kept");
    // Once committed, the next follow shows the merge (the merges themselves: tests/it/merge.rs).
    let Followed::Moved(heads, _) = busy.follow().unwrap() else { panic!("merged") };
    assert!(heads.contains(&mine) && heads.contains(&second), "{heads:?}");
}

#[test]
fn commits_from_elsewhere_wait_for_a_file_open_for_writing_to_be_closed() {
    use capsulefs::fs::filesystem::Followed;
    // The chaos run's seed 8761656951902955914: a merge arriving right after an fsync put
    // another machine's version of the file in place, under the writer's open handle, and
    // its read-back got one page of each (its own first page, kept by the kernel, and the
    // other version's second, read from the mount).
    let s = setup();
    let (mut desk, mut laptop) = (s.fs(), s.fs());
    let (notes, _) = laptop.make(ROOT_INO, b"notes", file()).unwrap();
    let (other, _) = laptop.make(ROOT_INO, b"other", file()).unwrap();
    commit(&mut laptop);
    laptop.opened(notes);
    let mut mine = pattern(6383, 1);
    laptop.write(notes, 0, &mine).unwrap();
    commit(&mut laptop);

    // A commit from elsewhere that leaves the open file alone is followed at once.
    assert!(matches!(desk.follow().unwrap(), Followed::Moved(..)));
    desk.write(other, 0, b"from the desk").unwrap();
    commit(&mut desk);
    assert!(matches!(laptop.follow().unwrap(), Followed::Moved(..)), "only the closed file changed");
    assert_eq!(laptop.read(other, 0, 64).unwrap(), b"from the desk");

    // One that rewrites it waits, however often asked, and the writer reads what it wrote.
    let theirs = pattern(7562, 2);
    desk.truncate(notes, 0).unwrap();
    desk.write(notes, 0, &theirs).unwrap();
    let from_desk = commit(&mut desk);
    assert_eq!(laptop.follow().unwrap(), Followed::HeldBack(vec![notes]));
    assert_eq!(laptop.follow().unwrap(), Followed::HeldBack(vec![notes]));
    assert_eq!((laptop.held_back_by(), laptop.held_back_no_more()), (1, false));
    assert_eq!(laptop.read(notes, 0, 1 << 20).unwrap(), mine);

    // It writes on, on its own branch; whatever the merge makes of that, the open file is not
    // changed under it.
    laptop.write(notes, mine.len() as u64, b" and more").unwrap();
    mine.extend_from_slice(b" and more");
    let from_laptop = commit(&mut laptop);
    let _ = laptop.follow().unwrap();
    assert_eq!(laptop.read(notes, 0, 1 << 20).unwrap(), mine);

    // Closed, it gives way: the merge shows both versions, one of them as a conflict copy.
    laptop.released(notes).unwrap();
    assert!(matches!(laptop.follow().unwrap(), Followed::Moved(..) | Followed::Same));
    let mut heads = vec![from_desk, from_laptop];
    heads.sort();
    assert_eq!(laptop.heads(), heads);
    let versions: Vec<Vec<u8>> = laptop
        .readdir(ROOT_INO)
        .unwrap()
        .into_iter()
        .filter(|e| e.name.starts_with(b"notes"))
        .map(|e| laptop.read(e.ino, 0, 1 << 20).unwrap())
        .collect();
    assert!(versions.len() == 2 && versions.contains(&mine) && versions.contains(&theirs));
    assert_eq!((laptop.held_back_by(), laptop.held_back_no_more()), (0, false));
}

#[test]
fn a_reader_open_across_a_follow_keeps_reading_its_version() {
    use capsulefs::fs::filesystem::Followed;
    let s = setup();
    let (mut desk, mut laptop) = (s.fs(), s.fs());
    let (f, _) = desk.make(ROOT_INO, b"f", file()).unwrap();
    desk.write(f, 0, b"old").unwrap();
    commit(&mut desk);
    assert!(matches!(laptop.follow().unwrap(), Followed::Moved(..)));
    laptop.opened_reader(f, 7);
    desk.write(f, 0, b"new").unwrap();
    commit(&mut desk);
    assert!(!laptop.has_pinned_readers(f));
    // A reader holds nothing back: it is pinned, and new handles read around the page cache
    // its pages fill.
    assert!(matches!(laptop.follow().unwrap(), Followed::Moved(..)));
    assert!(laptop.has_pinned_readers(f));
    assert_eq!(laptop.read_handle(7, f, 0, 64).unwrap(), b"old");
    assert_eq!(laptop.read(f, 0, 64).unwrap(), b"new");
    laptop.released_reader(7).unwrap();
    assert!(!laptop.has_pinned_readers(f));
}
