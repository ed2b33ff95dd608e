//! Hostile clients and replicas, built on the library's own encoders, against real
//! `capsulefs serve` processes, a folder replica and real mounts: a signature vouches for its
//! own writer only, a refused batch leaves nothing on disk, forged sequence numbers and
//! membership records block nobody, forged records a replica serves are kept out of pulls,
//! clones and mounts, and fork evidence reaches every server.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use capsulefs::capsule::Capsule;
use capsulefs::crypto::keys::{Identity, KeyFolder};
use capsulefs::crypto::sign;
use capsulefs::record::codec::{self, FORMAT_VERSION};
use capsulefs::record::{CapsuleId, DeviceId, KeyGen, Record, RecordHash, RecordHeader, RecordKind, Seq, merkle};
use capsulefs::replica::objects::Pusher;
use capsulefs::rights::{Level, MembershipEntry};
use capsulefs::store::rocks::RocksKv;
use capsulefs::store::{CapsuleStore, Durability, SubValue};
use capsulefs::wire::Bundle;

use super::replicas::same_user;
use super::server::Server;
use super::{Home, Mounted, write_fsynced};

/// The first identity of `home`.
fn identity(home: &Home) -> Identity {
    KeyFolder::load(&home.path().join("keys")).unwrap().identities()[0].clone()
}

/// A record of capsule `id` by `by`, numbered (device, seq), of `kind`, on `parents`, with
/// one payload; signed by `signer` (None: unsigned), whoever that is.
struct Forge<'a> {
    id: &'a str,
    by: &'a Identity,
    device: DeviceId,
    seq: u64,
    kind: RecordKind,
    parents: Vec<RecordHash>,
    payload: Vec<u8>,
    signer: Option<&'a Identity>,
}

impl Forge<'_> {
    fn bundle(&self) -> Bundle {
        let mut parents = self.parents.clone();
        parents.sort();
        let header = RecordHeader {
            version: FORMAT_VERSION,
            capsule: CapsuleId::from_hex(self.id).unwrap(),
            parents,
            writer: self.by.writer(),
            device: self.device,
            seq: Seq(self.seq),
            time_ms: 1,
            kind: self.kind,
            key_gen: KeyGen(0),
            sub_count: 1,
            merkle_root: merkle::build(&[merkle::leaf_hash(&self.payload)]).0,
        };
        let signature = self.signer.map(|s| sign::sign_record(s.key(), &header.hash()));
        Bundle { record: Record { header, signature }.encode(), payloads: vec![self.payload.clone()] }
    }
}

fn hash_of(b: &Bundle) -> RecordHash {
    Record::decode(&b.record).unwrap().hash()
}

/// One POST of `body` to `path`; the status and the refusal reason the server gave.
fn post(server: &Server, path: &str, body: &[u8]) -> (u16, Option<String>) {
    let addr = server.url().trim_start_matches("http://").to_owned();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let reason = text.lines().find_map(|l| l.strip_prefix("x-capsulefs-refusal: ")).map(|r| r.trim().to_owned());
    (status, reason)
}

fn post_records(server: &Server, id: &str, bundles: &[Bundle]) -> (u16, Option<String>) {
    post(server, &format!("/v1/capsules/{id}/records"), &codec::encode(&bundles.to_vec()))
}

/// Every file under `dir` with its size: what "nothing left on disk" compares for packs.
fn sizes(dir: &Path) -> Vec<(String, u64)> {
    let mut all = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries {
            let e = e.unwrap();
            all.push((e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()));
        }
    }
    all.sort();
    all
}

fn head_of(home: &Home) -> RecordHash {
    RecordHash::from_hex(home.ok(&["log", "c"]).split(' ').next().unwrap()).unwrap()
}

fn append_signed(home: &Home, text: &str) -> String {
    let f = home.file("record", text.as_bytes());
    super::last_line(&home.ok(&["append", "c", "--sign", f.to_str().unwrap()]))
}

/// The device `home`'s store numbers its records in (read while nothing holds the store).
fn device_of(home: &Home, id: &str) -> DeviceId {
    let kv = RocksKv::open(&home.store_path(id), false).unwrap();
    let capsule = Capsule::open(Arc::new(kv), vec![identity(home)]).unwrap();
    capsule.device().unwrap()
}

#[test]
fn a_strangers_or_another_members_signature_launders_nothing_and_a_refusal_leaves_nothing() {
    let server = Server::start();
    let writer = Home::default();
    let member = Home::default();
    member.ok(&["key", "new"]);
    let member_key = identity(&member);
    let id = writer.ok(&["create", "c", "--writer", &member_key.writer().to_hex()]).trim().to_owned();
    append_signed(&writer, "honest");
    writer.ok(&["push", "c", &server.url()]);
    let me = identity(&writer);
    let stranger = Identity::generate("stranger").unwrap();
    let packs = server.capsule_store(&id).join("packs");
    let (packs_before, metrics_before) = (sizes(&packs), server.metrics());
    let heads_before = server.heads(&id);
    // R1 claims the writer, unsigned, with bytes of the attacker's; R2 signs it from below.
    // Five times with 8 MiB payloads: refused uploads must cost no disk.
    for (i, vouch) in [&stranger, &member_key, &stranger, &member_key, &stranger].into_iter().enumerate() {
        let r1 = Forge {
            id: &id,
            by: &me,
            device: DeviceId([7; 16]),
            seq: 1 + i as u64,
            kind: RecordKind::Data,
            parents: vec![heads_before[0]],
            payload: vec![i as u8; 8 << 20],
            signer: None,
        }
        .bundle();
        let r2 = Forge {
            id: &id,
            by: vouch,
            device: DeviceId([8; 16]),
            seq: 1 + i as u64,
            kind: RecordKind::Data,
            parents: vec![hash_of(&r1)],
            payload: b"vouching".to_vec(),
            signer: Some(vouch),
        }
        .bundle();
        let (status, reason) = post_records(&server, &id, &[r1, r2]);
        assert_eq!((status, reason.as_deref()), (400, Some("unsigned_without_signed_descendant")), "batch {i}");
    }
    assert_eq!(sizes(&packs), packs_before, "refused payloads are not in the packs");
    assert_eq!(server.heads(&id), heads_before);
    let stored = |m: &str| m.lines().find(|l| l.starts_with("capsulefs_bytes_stored_total")).map(str::to_owned);
    assert_eq!(stored(&server.metrics()), stored(&metrics_before));
    // The honest writer goes on: pull, append, push, and every reader verifies.
    writer.ok(&["pull", "c", &server.url()]);
    let latest = append_signed(&writer, "still mine");
    writer.ok(&["push", "c", &server.url()]);
    assert_eq!(writer.ok(&["cat", "c", &format!("{latest}:0")]), "still mine");
    writer.ok(&["verify", "c"]);
    let reader = same_user(&writer);
    reader.ok(&["clone", &format!("{}#{id}", server.url())]);
    reader.ok(&["verify", "c"]);
    assert_eq!(reader.ok(&["log", "c"]).lines().count(), writer.ok(&["log", "c"]).lines().count());
}

#[test]
fn forged_sequence_numbers_and_membership_records_block_no_one() {
    let server = Server::start();
    let writer = Home::default();
    let id = writer.ok(&["create", "c"]).trim().to_owned();
    append_signed(&writer, "first");
    writer.ok(&["push", "c", &server.url()]);
    let (me, device, head) = (identity(&writer), device_of(&writer, &id), head_of(&writer));
    let stranger = Identity::generate("stranger").unwrap();
    let forged = |seq: u64, kind: RecordKind, payload: Vec<u8>| {
        let r1 = Forge { id: &id, by: &me, device, seq, kind, parents: vec![head], payload, signer: None }.bundle();
        let r2 = Forge {
            id: &id,
            by: &stranger,
            device: DeviceId([8; 16]),
            seq: 1,
            kind: RecordKind::Data,
            parents: vec![hash_of(&r1)],
            payload: b"v".to_vec(),
            signer: Some(&stranger),
        }
        .bundle();
        vec![r1, r2]
    };
    let grant = MembershipEntry::Grant { member: stranger.writer(), level: Level::Superadmin }.encode();
    let last_seq = writer.ok(&["log", "c"]).lines().count() as u64; // the writer's records, one device
    for batch in [
        forged(u64::MAX, RecordKind::Data, b"wraps".to_vec()),
        forged(last_seq + 1, RecordKind::Data, b"takes the next number".to_vec()),
        forged(last_seq + 1, RecordKind::Membership, grant),
    ] {
        let (status, reason) = post_records(&server, &id, &batch);
        assert_eq!((status, reason.as_deref()), (400, Some("unsigned_without_signed_descendant")));
    }
    // The writer appends on its next number, and the server takes it: no false fork.
    writer.ok(&["pull", "c", &server.url()]);
    append_signed(&writer, "next");
    writer.ok(&["push", "c", &server.url()]);
    let reader = same_user(&writer);
    reader.ok(&["clone", &format!("{}#{id}", server.url())]);
    assert_eq!(reader.ok(&["cat", "c", "head:0"]), "next");
    let members = reader.ok(&["members", "c"]);
    assert!(!members.contains(&stranger.writer().to_hex()), "{members}");
    reader.ok(&["verify", "c"]);
}

#[test]
fn forged_records_a_server_serves_are_kept_out_of_pulls_clones_and_mounts() {
    let server = Server::start();
    let writer = Home::default();
    let id = writer.ok(&["create", "c"]).trim().to_owned();
    append_signed(&writer, "honest");
    writer.ok(&["push", "c", &server.url()]);
    let head = head_of(&writer);
    // Whoever runs the server plants a record of the writer's, unsigned, as its head.
    let (store, addr) = server.kill();
    let forged = Forge {
        id: &id,
        by: &identity(&writer),
        device: DeviceId([7; 16]),
        seq: 1,
        kind: RecordKind::Data,
        parents: vec![head],
        payload: b"planted".to_vec(),
        signer: None,
    }
    .bundle();
    plant(&store.path().join("capsules").join(&id).join("store"), &forged);
    let server = Server::start_on(store, &addr);
    assert!(server.heads(&id).contains(&hash_of(&forged)));
    // A clone takes the honest records, keeps the planted one out and says so (exit 1).
    let reader = same_user(&writer);
    let out = reader.run(&["clone", &format!("{}#{id}", server.url())]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("kept out, as unverified"), "{said}");
    assert_eq!(reader.ok(&["cat", "c", "head:0"]), "honest");
    reader.ok(&["verify", "c"]);
    // The writer's pull too; its next record builds on its own head, and the server takes it.
    let out = writer.run(&["pull", "c", &server.url()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let latest = append_signed(&writer, "mine again");
    writer.ok(&["push", "c", &server.url()]);
    // A mount that follows the server (remembered by the clone) shows the honest state only,
    // and verifies after.
    {
        let Some(m) = Mounted::new(&reader, "c", &[]) else { return };
        super::background::eventually("the writer's record reaches the mount", || {
            reader.ok(&["log", "c"]).contains(&latest[..16])
        });
        write_fsynced(&m.path("note"), b"from the reader");
    }
    let log = reader.ok(&["log", "c"]);
    assert!(!log.contains(&hash_of(&forged).to_hex()[..16]), "{log}");
    reader.ok(&["verify", "c"]);
}

/// Writes `bundle` into the capsule store at `path` as a record and head, past every check:
/// what someone who runs a replica can do to its files.
fn plant(path: &Path, bundle: &Bundle) {
    let store = CapsuleStore::new(Arc::new(RocksKv::open(path, false).unwrap()));
    let record = Record::decode(&bundle.record).unwrap();
    let h = record.hash();
    let (root, subs) = {
        let leaves: Vec<_> = bundle.payloads.iter().map(|p| merkle::leaf_hash(p)).collect();
        merkle::build(&leaves)
    };
    assert_eq!(root, record.header.merkle_root);
    let mut batch = store.batch();
    let heads = batch.put_record(
        &h,
        bundle.record.clone(),
        &record.header.parents,
        store.heads().unwrap(),
        store.next_order().unwrap(),
    );
    assert!(heads.contains(&h));
    let (head, tail) = capsulefs::record::SubRecord::around(&bundle.payloads[0], &subs[0]);
    batch.put_sub_record(
        &h,
        capsulefs::record::SubIdx(0),
        SubValue::Pieces { head, body: bundle.payloads[0].clone(), tail },
    );
    let height = record.header.parents.iter().filter_map(|p| store.height(p).unwrap()).max().unwrap_or(0) + 1;
    batch.put_height(&h, height);
    batch.put_seq(&record.header.writer, &record.header.device, record.header.seq, &h);
    store.write(batch, Durability::Durable).unwrap();
}

#[test]
fn a_member_cannot_slip_records_of_anothers_into_a_folder_replica() {
    let folder = tempfile::tempdir().unwrap();
    let url = format!("file://{}", folder.path().display());
    let writer = Home::default();
    let member = Home::default();
    member.ok(&["key", "new"]);
    let member_key = identity(&member);
    let id = writer.ok(&["create", "c", "--writer", &member_key.writer().to_hex()]).trim().to_owned();
    append_signed(&writer, "honest");
    writer.ok(&["push", "c", &url]);
    // The member pushes, through the library, a record claiming the writer with its own
    // signature below it: a folder runs no code, so it holds whatever it is given.
    let r1 = Forge {
        id: &id,
        by: &identity(&writer),
        device: DeviceId([7; 16]),
        seq: 1,
        kind: RecordKind::Data,
        parents: vec![head_of(&writer)],
        payload: b"not the writer's".to_vec(),
        signer: None,
    }
    .bundle();
    let r2 = Forge {
        id: &id,
        by: &member_key,
        device: DeviceId([8; 16]),
        seq: 1,
        kind: RecordKind::Data,
        parents: vec![hash_of(&r1)],
        payload: b"vouching".to_vec(),
        signer: Some(&member_key),
    }
    .bundle();
    let pusher = Pusher { identity: member_key.clone(), device: [8; 16], turn: None };
    let replica = capsulefs::replica::open(&url, CapsuleId::from_hex(&id).unwrap(), Some(pusher)).unwrap();
    replica.put(vec![r1.clone(), r2.clone()], Some(&[hash_of(&r2)])).unwrap();
    // Every reader keeps both out: the first is not vouched for by its own writer.
    let reader = same_user(&writer);
    let out = reader.run(&["clone", &format!("{url}#{id}")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(reader.ok(&["cat", "c", "head:0"]), "honest");
    let out = writer.run(&["pull", "c", &url]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!writer.ok(&["log", "c"]).contains(&hash_of(&r1).to_hex()[..16]));
    writer.ok(&["verify", "c"]);
}

#[test]
fn a_fork_made_by_a_restored_home_through_mounts_reaches_every_server_as_evidence() {
    let home = Home::default();
    let mut servers: Vec<Server> = (0..4).map(|_| Server::start()).collect();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    for s in &servers {
        home.ok(&["replica", "add", "c", &s.url()]);
    }
    home.ok(&["replica", "policy", "c", "--faulty", "1"]);
    append_signed(&home, "before the backup");
    home.ok(&["push", "c"]);
    let restored = Home::default();
    super::sh(&format!("cp -a {}/. {}", home.path().display(), restored.path().display()));
    let urls: Vec<String> = servers.iter().map(Server::url).collect();
    // The original writes through a mount while servers 2 and 3 are down.
    let down: Vec<_> = servers.drain(2..).map(Server::kill).collect();
    {
        let Some(m) = Mounted::new(&home, "c", &["--push-wait", "10"]) else { return };
        write_fsynced(&m.path("a.txt"), b"the original goes on");
    }
    for (store, addr) in down {
        servers.push(Server::start_on(store, &addr));
    }
    // The restored copy writes through a mount while servers 0 and 1 are down.
    let down: Vec<_> = servers.drain(..2).map(Server::kill).collect();
    {
        let Some(m) = Mounted::new(&restored, "c", &["--push-wait", "10"]) else { return };
        write_fsynced(&m.path("a.txt"), b"the restored copy writes");
    }
    for (i, (store, addr)) in down.into_iter().enumerate() {
        servers.insert(i, Server::start_on(store, &addr));
    }
    // Each home pushes to all four: the servers with the other branch refuse it as a fork.
    for h in [&home, &restored] {
        let out = h.run(&["push", "c"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("fork"), "{out:?}");
    }
    // Every server keeps the evidence, and a reader through the quorum raises the alarm.
    for (i, s) in servers.iter().enumerate() {
        let evidence: Vec<capsulefs::proof::fork::ForkEvidence> = s.get_borsh(&format!("/v1/capsules/{id}/evidence"));
        assert!(!evidence.is_empty(), "server {i} keeps no evidence");
    }
    let reader = same_user(&home);
    let mut args = vec!["clone".to_owned(), format!("{}#{id}", urls[0]), "--faulty".into(), "1".into()];
    args.extend(urls[1..].iter().flat_map(|u| ["--also".to_owned(), u.clone()]));
    let out = reader.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ALARM"), "{out:?}");
    for url in &urls {
        let other = same_user(&home);
        other.run(&["clone", &format!("{url}#{id}")]);
        assert_eq!(other.run(&["verify", "c"]).status.code(), Some(7), "{url} serves the evidence");
    }
}
