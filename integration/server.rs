//! A `capsulefs serve` of a test's own (or a benchmark's), on a free loopback port, with what
//! tests read of it: its log, `/proc` status and descriptors, metrics, raw requests from any
//! 127.x.y.z address. Ended by pid when dropped.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use capsulefs::crypto::keys::Identity;
use capsulefs::crypto::sign;
use capsulefs::record::codec::FORMAT_VERSION;
use capsulefs::record::{CapsuleId, DeviceId, KeyGen, Record, RecordHash, RecordHeader, RecordKind, Seq, merkle};
use capsulefs::wire::Bundle;

/// Where the honest clients of a test connect from; hostile ones take other 127.x.y.z.
pub const LOOPBACK: [u8; 4] = [127, 0, 0, 1];

/// A `capsulefs serve` of its own, on a free loopback port; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: String,
    store: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Self {
        let store = tempfile::tempdir().unwrap();
        Self::start_on(store, "127.0.0.1:0")
    }

    pub fn start_on(store: tempfile::TempDir, listen: &str) -> Self {
        Self::start_peered(store, listen, &[])
    }

    pub fn start_peered(store: tempfile::TempDir, listen: &str, peers: &[String]) -> Self {
        let args: Vec<String> = peers.iter().flat_map(|p| ["--peer".to_owned(), p.clone()]).collect();
        Self::start_with(store, listen, &args)
    }

    pub fn start_with(store: tempfile::TempDir, listen: &str, args: &[String]) -> Self {
        // Tests make identities of their own: a server open to them, unless a test says who
        // may create capsules (then its flags replace these).
        let admits = args.iter().any(|a| a.starts_with("--allow-creator") || a == "--open" || a == "--config");
        let open: &[&str] = if admits {
            &[]
        } else {
            &[
                "--open",
                "--max-capsules-per-creator",
                "100000",
                "--max-mib-per-creator",
                "1048576",
                "--max-names-per-creator",
                "1000",
            ]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_capsulefs"))
            .args(["serve", "--listen", listen, "--store"])
            .arg(store.path())
            .args(open)
            .args(args)
            .env_remove("CAPSULEFS_LOG")
            .stdout(Stdio::piped())
            .stderr(fs::File::create(store.path().join("serve.log")).unwrap())
            .spawn()
            .unwrap();
        // Readiness: the "listening on ADDR" line, waited for with a bound.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("the server says where it listens");
        let addr = line.trim().strip_prefix("listening on ").expect("a readiness line").to_owned();
        Self { child, addr, store }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// kill -9, keeping the store for a restart on the same address.
    pub fn kill(mut self) -> (tempfile::TempDir, String) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let store = std::mem::replace(&mut self.store, tempfile::tempdir().unwrap());
        (store, self.addr.clone())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A field of the server's `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`), or a count
    /// (`Threads`).
    pub fn status(&self, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap().to_owned();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Descriptors the server has open.
    pub fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.child.id())).unwrap().count()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The folder the server keeps its replicas in.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// A connection to the server from `source`, any 127.x.y.z address (the loopback answers
    /// them all): so a test plays clients on several addresses.
    pub fn connect_from(&self, source: [u8; 4]) -> TcpStream {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&std::net::SocketAddr::from((source, 0)).into()).unwrap();
        socket.connect(&self.addr.parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        socket.into()
    }

    /// One raw HTTP/1.1 request; returns the status code (0 if the server closed first).
    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> u16 {
        self.raw_declaring(method, path, body.len(), body)
    }

    /// A request whose Content-Length says `declared` bytes, sending `body`.
    pub fn raw_declaring(&self, method: &str, path: &str, declared: usize, body: &[u8]) -> u16 {
        self.raw_from(LOOPBACK, method, path, declared, body)
    }

    /// `raw_declaring`, from address `source`.
    pub fn raw_from(&self, source: [u8; 4], method: &str, path: &str, declared: usize, body: &[u8]) -> u16 {
        let mut s = self.connect_from(source);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head =
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n");
        let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(body));
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.store.path().join("serve.log")).unwrap()
    }

    /// Where the server keeps capsule `id`'s store.
    pub fn capsule_store(&self, id: &str) -> std::path::PathBuf {
        self.store.path().join("capsules").join(id).join("store")
    }

    /// A GET whose answer is borsh, decoded.
    pub fn get_borsh<T: borsh::BorshDeserialize>(&self, path: &str) -> T {
        let out = Command::new("curl").args(["-sf", &format!("{}{path}", self.url())]).output().unwrap();
        assert!(out.status.success(), "GET {path}: {out:?}");
        borsh::from_slice(&out.stdout).unwrap()
    }

    /// Capsule `id`'s heads as the server gives them.
    pub fn heads(&self, id: &str) -> Vec<RecordHash> {
        self.get_borsh(&format!("/v1/capsules/{id}/heads"))
    }

    pub fn metrics(&self) -> String {
        let out = Command::new("curl").args(["-s", &format!("{}/metrics", self.url())]).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A data record of `capsule` by `writer` (on device `device`) with one sub-record, signed or
/// not, as a client would upload it: what tests and the soak bench forge.
pub fn data_record(
    writer: &Identity,
    capsule: CapsuleId,
    device: DeviceId,
    (parent, seq): (RecordHash, u64),
    payload: Vec<u8>,
    signed: bool,
) -> Bundle {
    let header = RecordHeader {
        version: FORMAT_VERSION,
        capsule,
        parents: vec![parent],
        writer: writer.writer(),
        device,
        seq: Seq(seq),
        time_ms: 1,
        kind: RecordKind::Data,
        key_gen: KeyGen(0),
        sub_count: 1,
        merkle_root: merkle::build(&[merkle::leaf_hash(&payload)]).0,
    };
    let signature = signed.then(|| sign::sign_record(writer.key(), &header.hash()));
    Bundle { record: Record { header, signature }.encode(), payloads: vec![payload] }
}
