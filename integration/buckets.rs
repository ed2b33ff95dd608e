//! `s3://` replicas against a real S3-compatible server started here (moto, from `make
//! tools`): push, clone whole and sparse, mount, and an altered object refused. Each test
//! starts its own server on a free port and ends it by pid.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::garage::Garage;
use super::{Home, Mounted, sh};

/// moto's server from `make tools`, or from MOTO_SERVER; None (with a message) when absent.
fn moto() -> Option<PathBuf> {
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/moto/bin/moto_server");
    super::tool("moto", "MOTO_SERVER", &default)
}

/// An S3 server of its own on a free loopback port, with one bucket; killed when dropped.
pub(super) struct S3 {
    child: Child,
    pub(super) endpoint: String,
}

impl S3 {
    pub(super) fn start(bucket: &str) -> Option<Self> {
        let moto = moto()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s3 = Self { child, endpoint: format!("http://127.0.0.1:{port}") };
        // Readiness: it accepts connections, bounded.
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto never listened on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        sh(&format!("curl -sf -X PUT {}/{bucket} -o /dev/null", s3.endpoint));
        Some(s3)
    }

    /// The AWS environment that reaches this server.
    fn env(&self) -> [(&str, &str); 4] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "capsulefs-test"),
            ("AWS_SECRET_ACCESS_KEY", "capsulefs-test-secret"),
            ("AWS_REGION", "us-east-1"),
        ]
    }

    /// `capsulefs ARGS` in `home`, reaching this server.
    fn run(&self, home: &Home, args: &[&str]) -> std::process::Output {
        home.command().args(args).envs(self.env()).output().unwrap()
    }

    fn ok(&self, home: &Home, args: &[&str]) -> String {
        let out = self.run(home, args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl S3 {
    /// Gets, puts or deletes object `key` of `bucket` with a signed request (boto3, from
    /// moto's venv), as anyone holding the bucket's keys could; what a get returned.
    fn object(&self, op: &str, bucket: &str, key: &str, body: &[u8]) -> Vec<u8> {
        let python = moto().unwrap().with_file_name("python");
        let script = "import boto3,sys; c = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', \
            aws_access_key_id='capsulefs-test', aws_secret_access_key='capsulefs-test-secret'); \
            op, b, k = sys.argv[2:5]; \
            sys.stdout.buffer.write(c.get_object(Bucket=b, Key=k)['Body'].read()) if op == 'get' else \
            c.put_object(Bucket=b, Key=k, Body=sys.stdin.buffer.read()) if op == 'put' else \
            c.delete_object(Bucket=b, Key=k)";
        let mut child = Command::new(python)
            .args(["-c", script, &self.endpoint, op, bucket, key])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), body).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "boto3 {op} {key}: {out:?}");
        out.stdout
    }

    /// The keys of `bucket` under `prefix` (a listing, as boto3 pages it).
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let python = moto().unwrap().with_file_name("python");
        let script = "import boto3,sys; c = boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', \
            aws_access_key_id='capsulefs-test', aws_secret_access_key='capsulefs-test-secret'); \
            [print(o['Key']) for p in c.get_paginator('list_objects_v2').paginate(Bucket=sys.argv[2], Prefix=sys.argv[3]) \
             for o in p.get('Contents', [])]";
        let out = Command::new(python).args(["-c", script, &self.endpoint, bucket, prefix]).output().unwrap();
        assert!(out.status.success(), "boto3 list {prefix}: {out:?}");
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_bucket_takes_pushes_and_gives_clones_whole_and_sparse_and_refuses_an_altered_object() {
    let Some(s3) = S3::start("capsules") else { return };
    let home = Home::default();
    let Some(id) = super::replicas::capsule_with_tree(&home) else { return };
    let url = "s3://capsules/team";
    let pushed = s3.ok(&home, &["push", "c", url]);
    assert!(pushed.starts_with("pushed ") && !pushed.starts_with("pushed 0 "), "{pushed}");
    assert!(s3.ok(&home, &["push", "c", url]).starts_with("pushed 0 records"), "nothing twice");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for how in [&[][..], &["--sparse"][..]] {
        let laptop = super::replicas::same_user(&home);
        let source = format!("{url}#{id}");
        s3.ok(&laptop, &[&["clone"][..], how, &[source.as_str()]].concat());
        assert_eq!(laptop.ok(&["log", "c"]), home.ok(&["log", "c"]));
        // A sparse clone reads what it lacks from the bucket: the mount reaches it too.
        let Some(m) = Mounted::with_env(&laptop, "c", &["--read-only"], &s3.env()) else { return };
        sh(&format!("diff -r {} {}", src.display(), m.path("tree").display()));
    }
    // A record object replaced in the bucket: a fresh clone refuses it and keeps nothing.
    let head = home.ok(&["log", "c"]).split(' ').next().unwrap().to_owned();
    s3.object("put", "capsules", &format!("team/{id}/records/{head}"), b"capsrec1 but not a record");
    let stranger = super::replicas::same_user(&home);
    let refused = s3.run(&stranger, &["clone", &format!("{url}#{id}")]);
    assert!(!refused.status.success(), "an altered object was taken: {refused:?}");
    assert!(stranger.run(&["log", "c"]).stdout.is_empty(), "nothing was kept");
}

#[test]
fn a_bucket_rolled_back_or_missing_objects_is_reported_and_never_serves_wrong_bytes() {
    let Some(s3) = S3::start("capsules") else { return };
    let home = Home::default();
    let Some(id) = super::replicas::capsule_with_tree(&home) else { return };
    let url = "s3://capsules/team";
    s3.ok(&home, &["push", "c", url]);
    let device = std::fs::read_to_string(home.path().join("device")).unwrap();
    let head_key = format!("team/{id}/heads/{}", device.trim());
    let old_head = s3.object("get", "capsules", &head_key, b"");
    let f = home.file("later", b"a later commit");
    home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    s3.ok(&home, &["push", "c", url]);
    let laptop = super::replicas::same_user(&home);
    s3.ok(&laptop, &["clone", &format!("{url}#{id}")]);
    let sparse = super::replicas::same_user(&home);
    s3.ok(&sparse, &["clone", "--sparse", &format!("{url}#{id}")]);

    // The old head object put back: a pull says the bucket went back, and moves nothing.
    s3.object("put", "capsules", &head_key, &old_head);
    let pulled = s3.run(&laptop, &["pull", "c", url]);
    assert!(pulled.status.success(), "{pulled:?}");
    let warned = String::from_utf8_lossy(&pulled.stderr);
    assert!(warned.contains("lacks 1 signed records") && warned.contains("rolled back"), "{warned}");
    assert_eq!(laptop.ok(&["log", "c"]), home.ok(&["log", "c"]), "the clone did not move back");

    // Every record object deleted, while the sparse clone is mounted (it has read the
    // keystore and the root): a fresh clone fails, naming what is missing, and keeps
    // nothing; the mount answers EIO or the right bytes, never others.
    let Some(m) = Mounted::with_env(&sparse, "c", &["--read-only"], &s3.env()) else { return };
    let records = s3.keys("capsules", &format!("team/{id}/records/"));
    assert!(records.len() > 2, "{records:?}");
    for key in &records {
        s3.object("delete", "capsules", key, b"");
    }
    let stranger = super::replicas::same_user(&home);
    let refused = s3.run(&stranger, &["clone", &format!("{url}#{id}")]);
    assert!(!refused.status.success(), "a clone of a bucket missing objects succeeded: {refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("missing"), "{said}");
    assert!(stranger.run(&["log", "c"]).stdout.is_empty(), "nothing was kept");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (mut right, mut eio) = (0, 0);
    for rel in files_under(&src) {
        match std::fs::read(m.path("tree").join(&rel)) {
            Ok(bytes) => {
                assert_eq!(bytes, std::fs::read(src.join(&rel)).unwrap(), "{rel:?}: wrong bytes");
                right += 1;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{rel:?}: {e}");
                eio += 1;
            }
        }
    }
    assert!(eio > 0, "no read failed though the objects holding the tree are gone ({right} read)");
}

#[test]
fn two_devices_pushing_to_one_bucket_at_once_lose_nothing() {
    use std::sync::Arc;

    use capsulefs::capsule::{AppendOptions, Capsule, NewCapsule};
    use capsulefs::crypto::keys::Identity;
    use capsulefs::replica::bucket::{Bucket, Settings};
    use capsulefs::replica::objects::{ObjectReplica, Pusher};
    use capsulefs::store::mem::MemKv;
    use capsulefs::store::{Durability, Kv};
    use capsulefs::sync::transfer::{pull, push};

    let Some(s3) = S3::start("shared") else { return };
    let (laptop_key, desktop_key) = (Identity::generate("laptop").unwrap(), Identity::generate("desktop").unwrap());
    let spec = NewCapsule { writers: vec![desktop_key.writer()], ..NewCapsule::new("c", &laptop_key) };
    let laptop = Capsule::create(Arc::new(MemKv::new()), spec, vec![laptop_key.clone()]).unwrap();
    let copy = |me: &Identity| {
        Capsule::adopt(Arc::new(MemKv::new()) as Arc<dyn Kv>, laptop.id(), &laptop.metadata_bytes(), vec![me.clone()])
            .unwrap()
    };
    let desktop = copy(&desktop_key);
    let bucket = |me: &Identity, device: u8| {
        let settings = Settings {
            endpoint: Some(s3.endpoint.clone()),
            region: "us-east-1".into(),
            credentials: Some(rusty_s3::Credentials::new("capsulefs-test", "capsulefs-test-secret")),
        };
        let pusher = Pusher { identity: me.clone(), device: [device; 16], turn: None };
        ObjectReplica::new(Bucket::with_settings("s3://shared/p", settings).unwrap(), laptop.id(), Some(pusher))
    };
    push(&laptop, &bucket(&laptop_key, 1), &()).unwrap();
    pull(&desktop, &bucket(&desktop_key, 2), &()).unwrap();
    let signed = AppendOptions { sign: true, durability: Durability::Buffered, ..Default::default() };
    // Ten commits each, each pushed at once, both devices at the same moment.
    std::thread::scope(|s| {
        for (capsule, me, device) in [(&laptop, &laptop_key, 1u8), (&desktop, &desktop_key, 2u8)] {
            let replica = bucket(me, device);
            s.spawn(move || {
                for i in 0..10u32 {
                    capsule.append(me, &[&i.to_le_bytes()], signed).unwrap();
                    push(capsule, &replica, &()).unwrap();
                }
            });
        }
    });
    let reader = copy(&laptop_key);
    pull(&reader, &bucket(&laptop_key, 3), &()).unwrap();
    let mut both: Vec<_> = laptop.heads().unwrap().into_iter().chain(desktop.heads().unwrap()).collect();
    both.sort();
    both.dedup();
    assert_eq!(reader.heads().unwrap(), both, "every commit of both devices survived");
    assert_eq!(reader.audit().unwrap().records, laptop.audit().unwrap().records + 10);
}

/// The files below `dir`, as paths relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let path = rel.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() { stack.push(path) } else { files.push(path) }
        }
    }
    files
}

/// `capsulefs ARGS` in `home` with `env`, expecting success; its standard output.
fn run_with(home: &Home, env: &[(&str, String)], args: &[&str]) -> String {
    let out = home.command().args(args).envs(env.iter().map(|(k, v)| (*k, v.as_str()))).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_garage_cluster_keeps_serving_a_capsule_with_one_node_down() {
    let Some(mut garage) = Garage::start("capsules") else { return };
    let home = Home::default();
    let Some(id) = super::replicas::capsule_with_tree(&home) else { return };
    let url = "s3://capsules/team";
    let before = garage.requests(0);
    let pushed = run_with(&home, &garage.env(0), &["push", "c", url]);
    // "pushed N records (B bytes) to URL in R round trips; ...": the requests a push makes
    // grow with its records and batches (one PUT per record, a segment and a statement per
    // batch, a few reads to start), never with the files or sub-records inside them.
    let words: Vec<&str> = pushed.split_whitespace().collect();
    let records: usize = words[1].parse().unwrap();
    let round_trips: usize = words[words.iter().position(|w| *w == "round").unwrap() - 1].parse().unwrap();
    assert!(records > 0, "{pushed}");
    let requests = garage.requests(0) - before;
    assert!(requests <= records + 2 * round_trips + 4, "{requests} S3 requests for {pushed}");
    // One node of three stopped: pushes, clones and mounts go on through another.
    garage.stop(2);
    let env = garage.env(1);
    let f = home.file("later", b"written with a node down");
    home.ok(&["append", "c", "--sign", f.to_str().unwrap()]);
    let pushed = run_with(&home, &env, &["push", "c", url]);
    assert!(pushed.starts_with("pushed ") && !pushed.starts_with("pushed 0 "), "{pushed}");
    let laptop = super::replicas::same_user(&home);
    run_with(&laptop, &env, &["clone", "--sparse", &format!("{url}#{id}")]);
    assert_eq!(laptop.ok(&["log", "c"]), home.ok(&["log", "c"]));
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let Some(m) = Mounted::with_env(&laptop, "c", &["--read-only"], &pairs) else { return };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    sh(&format!("diff -r {} {}", src.display(), m.path("tree").display()));
}

#[test]
fn a_push_cut_by_a_killed_client_or_garage_node_resumes_and_shows_nothing_half_written() {
    let Some(mut garage) = Garage::start("capsules") else { return };
    let home = Home::default();
    let id = home.ok(&["create", "c"]).trim().to_owned();
    // Many signed records, so that a push takes many requests.
    let payload = home.file("p", &vec![0x5a; 3 << 20]);
    for _ in 0..24 {
        home.ok(&["append", "c", "--sign", payload.to_str().unwrap()]);
    }
    let url = "s3://capsules/team";
    // A push through node 0, cut once node 0 has answered `requests` more requests (or the
    // push ended first), bounded in time.
    let started = |garage: &Garage, requests: usize| {
        let before = garage.requests(0);
        let push = home
            .command()
            .args(["push", "c", url])
            .envs(garage.env(0))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (push, before + requests)
    };
    let wait_for = |garage: &Garage, push: &mut Child, requests: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while garage.requests(0) < requests && push.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the push never reached the bucket");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let source = format!("{url}#{id}");

    // The pushing process killed -9: a clone then sees a consistent capsule, a prefix of it.
    let (mut push, enough) = started(&garage, 20);
    wait_for(&garage, &mut push, enough);
    let _ = push.kill();
    let _ = push.wait();
    let peek = super::replicas::same_user(&home);
    run_with(&peek, &garage.env(1), &["clone", &source]);
    peek.ok(&["verify", "c"]);
    let all = home.ok(&["log", "c"]);
    assert!(peek.ok(&["log", "c"]).lines().all(|l| all.contains(l)), "a clone saw records the capsule lacks");

    // The Garage node the push talks to killed -9 mid-push: the push resumes through another.
    let (mut push, enough) = started(&garage, 4);
    wait_for(&garage, &mut push, enough);
    garage.stop(0);
    let _ = push.wait();
    assert!(run_with(&home, &garage.env(1), &["push", "c", url]).starts_with("pushed "));
    let other = super::replicas::same_user(&home);
    run_with(&other, &garage.env(1), &["clone", &source]);
    assert_eq!(other.ok(&["log", "c"]), all, "every record arrived");
    other.ok(&["verify", "c"]);
}

#[test]
fn two_mounts_sync_through_a_bucket() {
    use super::background::{eventually, pushed_mount};
    let Some(s3) = S3::start("capsules") else { return };
    let desk = Home::default();
    let url = "s3://capsules/team";
    let Some((id, a)) = pushed_mount(&desk, url, &s3.env(), ("notes.txt", b"first draft")) else { return };
    let laptop = super::replicas::same_user(&desk);
    s3.ok(&laptop, &["clone", &format!("{url}#{id}")]);
    let Some(b) = Mounted::with_env(&laptop, "c", &[], &s3.env()) else { return };
    assert_eq!(std::fs::read(b.path("notes.txt")).unwrap(), b"first draft");
    // The bucket cannot tell anyone of new heads: each mount looks every two seconds.
    super::write_fsynced(&a.path("notes.txt"), b"from the desk");
    eventually("the laptop read the desk's change", || {
        std::fs::read(b.path("notes.txt")).is_ok_and(|c| c == b"from the desk")
    });
    super::write_fsynced(&b.path("reply.txt"), b"from the laptop");
    eventually("the desk read the laptop's file", || {
        std::fs::read(a.path("reply.txt")).is_ok_and(|c| c == b"from the laptop")
    });
}
