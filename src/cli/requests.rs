//! Requests to a running mount from other `capsulefs` commands. A writable mount holds its
//! capsule's store, so a command that must append to it (a grant or a revocation) asks the
//! mount's daemon instead, over a unix socket beside the mount's registry entry, readable by
//! its owner only (whoever can connect could read the home's keys anyway). One request a connection: a
//! line of words, answered by `ok RECORD` or `error MESSAGE`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use capsulefs::capsule::Capsule;
use capsulefs::member;
use capsulefs::record::{RecordHash, WriterId};
use capsulefs::rights::Level;

use super::home::Home;

/// Longest request line taken; a longer one is refused unread.
const MAX_REQUEST: u64 = 4096;
/// How often the listener looks for a new connection, and so how soon it ends at unmount.
const POLL: Duration = Duration::from_millis(100);
/// How long a connected client may take to send its line.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The listening thread of a mount; stopped, and its socket removed, when dropped.
pub struct Requests {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Requests {
    /// Starts answering requests for `capsule` at `path`, with identities from `home`;
    /// `changed` runs after each change carried out (the mount takes new keys).
    pub fn serve(
        path: PathBuf,
        home: &Path,
        capsule: Arc<Capsule>,
        changed: Arc<dyn Fn() + Send + Sync>,
    ) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(&path); // left by a daemon that was killed
        let listener = UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (home, stopped) = (Home::new(Some(home.to_path_buf()))?, stop.clone());
        let thread = std::thread::Builder::new().name("capsulefs-requests".into()).spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => answer(stream, &home, &capsule, &*changed),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(e) => {
                        tracing::warn!("taking a request: {e}");
                        std::thread::sleep(POLL);
                    }
                }
            }
        })?;
        Ok(Self { stop, thread: Some(thread), path })
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Carries out one request; `changed` runs before the answer, so that the command asking
/// returns once the mount took the change in.
fn answer(stream: UnixStream, home: &Home, capsule: &Capsule, changed: &dyn Fn()) {
    let reply = match read_request(&stream).and_then(|words| carry_out(&words, home, capsule)) {
        Ok(record) => {
            changed();
            format!("ok {}\n", record.to_hex())
        }
        Err(e) => format!("error {}\n", format!("{e:#}").replace('\n', " ")),
    };
    let _ = (&stream).write_all(reply.as_bytes());
}

fn read_request(stream: &UnixStream) -> anyhow::Result<Vec<String>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST)).read_line(&mut line)?;
    if !line.ends_with('\n') {
        bail!("a request is one line of at most {MAX_REQUEST} bytes");
    }
    Ok(line.split_whitespace().map(str::to_owned).collect())
}

/// A change of membership a mount carries out for another command.
pub enum Change {
    Grant(Level),
    Revoke,
}

/// `grant MEMBER LEVEL [KEY]` or `revoke MEMBER - [KEY]`: what `capsulefs grant` and
/// `revoke` do on an unmounted capsule.
fn carry_out(words: &[String], home: &Home, capsule: &Capsule) -> anyhow::Result<RecordHash> {
    let [verb, member, level, key @ ..] = words else { bail!("a request names what to do and to whom") };
    let level = [Level::Read, Level::Write, Level::Admin, Level::Superadmin].into_iter().find(|l| l.name() == level);
    let change = match (verb.as_str(), level) {
        ("grant", Some(level)) if key.len() <= 1 => Change::Grant(level),
        ("revoke", None) if key.len() <= 1 => Change::Revoke,
        _ => bail!(
            "this mount carries out `grant MEMBER LEVEL [KEY]` and `revoke MEMBER - [KEY]`, not `{}`",
            words.join(" ")
        ),
    };
    let member = WriterId::from_hex(member).map_err(|e| anyhow::anyhow!("member: {e}"))?;
    let admin = home.identity(key.first().map(String::as_str), false)?;
    Ok(match change {
        Change::Grant(level) => member::grant(capsule, &admin, &member, level)?,
        Change::Revoke => member::revoke(capsule, &admin, &member)?,
    })
}

/// Asks the mount listening at `path` to make `change` to `member`, signed by identity
/// `key` (the default one if None). Returns the change's record.
pub fn change_through(path: &Path, change: Change, member: &WriterId, key: Option<&str>) -> anyhow::Result<RecordHash> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("asking the mount's daemon at {} (is it still running?)", path.display()))?;
    let (verb, level) = match change {
        Change::Grant(level) => ("grant", level.name()),
        Change::Revoke => ("revoke", "-"),
    };
    let request = format!("{verb} {} {level} {}\n", member.to_hex(), key.unwrap_or_default());
    stream.write_all(request.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_REQUEST)).read_line(&mut reply)?;
    match reply.trim_end().split_once(' ') {
        Some(("ok", record)) => Ok(RecordHash::from_hex(record).map_err(|e| anyhow::anyhow!("{e}"))?),
        Some(("error", message)) => bail!("the mount's daemon refused: {message}"),
        _ => bail!("the mount's daemon gave no answer (it may have stopped)"),
    }
}
