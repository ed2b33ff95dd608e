//! A three-node Garage cluster on loopback, started by the test that needs it and ended by
//! pid: a real distributed S3 store, which does not honour conditional writes (see
//! ../shared/DEPS.md). The binary comes from `make garage` (built once, outside the clone,
//! in `/var/cache/capsulefs/garage`) or from `GARAGE`. `benches/s3.rs` includes this file
//! too, for `make bench-s3`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn binary() -> Option<PathBuf> {
    super::tool("garage", "GARAGE", Path::new("/var/cache/capsulefs/garage/bin/garage"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "garage never listened on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Garage {
    binary: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<Option<Child>>,
    /// The S3 API of each node: http://127.0.0.1:PORT.
    pub endpoints: Vec<String>,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    fn config(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("node{node}.toml"))
    }

    /// `garage -c <node 0's config> ARGS`, retried while the cluster settles (bounded).
    fn admin(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = Command::new(&self.binary).arg("-c").arg(self.config(0)).args(args).output().unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(Instant::now() < deadline, "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Three nodes, one zone, replication factor 3, a key and `bucket` it may read and write.
    pub fn start(bucket: &str) -> Option<Self> {
        let binary = binary()?;
        let dir = tempfile::tempdir().unwrap();
        let secret = hex::encode(capsulefs::crypto::random_bytes::<32>());
        let mut endpoints = Vec::new();
        let mut rpc_ports = Vec::new();
        for node in 0..3 {
            let (rpc, s3, admin) = (free_port(), free_port(), free_port());
            let base = dir.path().join(format!("node{node}"));
            let config = format!(
                "metadata_dir = \"{base}/meta\"\ndata_dir = \"{base}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 3\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n[s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\nadmin_token = \"{secret}\"\n",
                base = base.display()
            );
            std::fs::write(dir.path().join(format!("node{node}.toml")), config).unwrap();
            endpoints.push(format!("http://127.0.0.1:{s3}"));
            rpc_ports.push(rpc);
        }
        let mut garage =
            Self { binary, dir, nodes: Vec::new(), endpoints, key_id: String::new(), secret: String::new() };
        for node in 0..3 {
            let child = Command::new(&garage.binary)
                .arg("-c")
                .arg(garage.config(node))
                .arg("server")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(garage.log(node)).unwrap())
                .spawn()
                .unwrap();
            garage.nodes.push(Some(child));
        }
        rpc_ports.iter().for_each(|&p| wait_for_port(p));
        let ids: Vec<String> = (0..3)
            .map(|node| {
                let out =
                    Command::new(&garage.binary).arg("-c").arg(garage.config(node)).args(["node", "id", "-q"]).output();
                String::from_utf8_lossy(&out.unwrap().stdout).trim().to_owned()
            })
            .collect();
        for id in &ids[1..] {
            garage.admin(&["node", "connect", id]);
        }
        for id in &ids {
            let short = id.split('@').next().unwrap();
            garage.admin(&["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        garage.admin(&["layout", "apply", "--version", "1"]);
        let key = garage.admin(&["key", "create", "capsulefs-test"]);
        let field = |name: &str| {
            key.lines()
                .find(|l| l.to_ascii_lowercase().contains(name))
                .and_then(|l| l.split_whitespace().last())
                .unwrap_or_else(|| panic!("no {name} in `key create`: {key}"))
                .to_owned()
        };
        (garage.key_id, garage.secret) = (field("key id"), field("secret key"));
        garage.admin(&["bucket", "create", bucket]);
        garage.admin(&["bucket", "allow", "--read", "--write", "--owner", bucket, "--key", &garage.key_id]);
        Some(garage)
    }

    /// Where node `node` logs: one line for each S3 request, among others.
    fn log(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("node{node}.log"))
    }

    /// How many S3 requests node `node` has answered so far, counted from its log: a Garage
    /// built without its metrics feature logs each request at info, as `ADDR [(key ID)] METHOD
    /// PATH`; a failed one adds a second line, `error ... in response to ...`.
    pub fn requests(&self, node: usize) -> usize {
        let log = std::fs::read_to_string(self.log(node)).unwrap_or_default();
        let answered = |line: &&str| {
            let Some(at) = line.find("generic_server") else { return false };
            // Past the target's colon and the colour codes around it.
            let message = line[at..].split_once(':').map_or("", |(_, m)| m);
            let message =
                message.trim_start_matches(|c: char| c == '\x1b' || c == '[' || c == 'm' || c.is_ascii_digit());
            let message = message.trim_start();
            message.starts_with(|c: char| c.is_ascii_digit())
        };
        log.lines().filter(answered).count()
    }

    /// The AWS environment that reaches node `node`.
    pub fn env(&self, node: usize) -> Vec<(&str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoints[node].clone()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_REGION", "garage".to_owned()),
        ]
    }

    /// Stops node `node` (kill -9), as a failed machine would.
    pub fn stop(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for node in 0..self.nodes.len() {
            self.stop(node);
        }
    }
}
