//! `s3://` replicas against a real S3-compatible server started here (moto, from `make
//! tools`): push, clone whole and sparse, mount, and an altered object refused. Each test
//! starts its own server on a free port and ends it by pid.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Home, Mounted, sh};

/// moto's server from `make tools`, or from MOTO_SERVER; None (with a message) when absent.
fn moto() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("MOTO_SERVER").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/moto/bin/moto_server")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.exists());
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "moto is not installed: CI must run `make tools`");
        eprintln!("skipped: moto not installed (run `make tools`)");
    }
    found
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
    // Written with a signed request (boto3, from moto's venv), as anyone with the bucket's
    // keys could.
    let python = moto().unwrap().with_file_name("python");
    let script = "import boto3,sys; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', \
        aws_access_key_id='capsulefs-test', aws_secret_access_key='capsulefs-test-secret')\
        .put_object(Bucket='capsules', Key=sys.argv[2], Body=b'capsrec1 but not a record')";
    let key = format!("team/{id}/records/{head}");
    let put = Command::new(python).args(["-c", script, &s3.endpoint, &key]).output().unwrap();
    assert!(put.status.success(), "{put:?}");
    let stranger = super::replicas::same_user(&home);
    let refused = s3.run(&stranger, &["clone", &format!("{url}#{id}")]);
    assert!(!refused.status.success(), "an altered object was taken: {refused:?}");
    assert!(stranger.run(&["log", "c"]).stdout.is_empty(), "nothing was kept");
}
