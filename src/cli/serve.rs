//! `capsulefs serve`: replicas for others, on a TCP address (see `net::server`), configured
//! by flags and an optional TOML file (`--config`), the flags winning.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use capsulefs::net::limits::Limits;
use capsulefs::net::registry::{Admission, Quotas};
use capsulefs::net::server::{self, Config};
use capsulefs::record::WriterId;

use super::home::Home;

const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

#[derive(Parser, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port; the address is printed) [default:
    /// 127.0.0.1:7070].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Folder of the replicas (default: serve/ in the capsulefs home).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// A TOML file with any of: listen, store, peers, open, allow_creators,
    /// allow_creators_file, [tls] cert and key, [quotas] capsules_per_creator,
    /// mib_per_creator, names_per_creator, [limits] idle_timeout_secs, max_connections,
    /// max_connections_per_addr, max_open_stores. Flags given win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Another server (http://HOST:PORT) to reconcile every capsule with, in the background;
    /// repeatable.
    #[arg(long = "peer", value_name = "URL")]
    pub peers: Vec<String>,
    /// Serve https with this PEM certificate chain (with --tls-key). Clients trust it through
    /// the public roots, or through CAPSULEFS_TLS_CA=FILE.pem (e.g. this very certificate).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Host capsules created by this key (as `capsulefs key show` prints it); repeatable.
    /// Without --allow-creator, --allow-creators or --open, only the identities of this
    /// server's own capsulefs home may create capsules here.
    #[arg(long = "allow-creator", value_name = "PUBKEY")]
    pub allow_creators: Vec<String>,
    /// Host capsules created by the keys in this file (one a line; `#` starts a comment),
    /// read again when it changes or on SIGHUP.
    #[arg(long = "allow-creators", value_name = "FILE")]
    pub allow_creators_file: Option<PathBuf>,
    /// Host capsules of any creator (a public server): the quotas are what protect it, and
    /// they default to a stranger's share (8 capsules, 1024 MiB and 8 names a creator).
    #[arg(long, conflicts_with_all = ["allow_creators", "allow_creators_file"])]
    pub open: bool,
    /// Capsules one creator may have held here [default: 1024, or 8 with --open].
    #[arg(long, value_name = "N")]
    pub max_capsules_per_creator: Option<u64>,
    /// MiB one creator's capsules may take here, members' pushes included [default:
    /// 1048576, or 1024 with --open].
    #[arg(long, value_name = "MIB")]
    pub max_mib_per_creator: Option<u64>,
    /// Names one creator may bind here [default: 1024, or 8 with --open].
    #[arg(long, value_name = "N")]
    pub max_names_per_creator: Option<u64>,
    /// Close a connection that moves no byte for this many seconds [default: 90; keep it
    /// above 60, the longest long poll of the heads].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Connections open at once; more wait in the kernel's backlog [default: 1024].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Connections open at once from one address; more are closed [default: 64].
    #[arg(long, value_name = "N")]
    pub max_connections_per_addr: Option<usize>,
    /// Capsule stores kept open at once, least recently used closed first [default: 64].
    #[arg(long, value_name = "N")]
    pub max_open_stores: Option<usize>,
    /// Read the configuration (flags, --config, the creators file, the TLS files), print what
    /// the server would run with, and exit without serving.
    #[arg(long)]
    pub check: bool,
}

/// What a config file may say (every field optional; flags win).
#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    store: Option<PathBuf>,
    #[serde(default)]
    peers: Vec<String>,
    open: Option<bool>,
    #[serde(default)]
    allow_creators: Vec<String>,
    allow_creators_file: Option<PathBuf>,
    tls: Option<Tls>,
    quotas: Option<FileQuotas>,
    limits: Option<FileLimits>,
}

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Tls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileQuotas {
    capsules_per_creator: Option<u64>,
    mib_per_creator: Option<u64>,
    names_per_creator: Option<u64>,
}

#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    idle_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_addr: Option<usize>,
    max_open_stores: Option<usize>,
}

fn read_file(path: &Path) -> anyhow::Result<File> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the server config {}", path.display()))?;
    toml::from_str(&text)
        .with_context(|| format!("the server config {} (see `capsulefs serve --help`)", path.display()))
}

/// `n`, if it is in `range`; else an error that names the setting and the range.
fn within<T: PartialOrd + std::fmt::Display>(
    n: T,
    range: std::ops::RangeInclusive<T>,
    what: &str,
) -> anyhow::Result<T> {
    anyhow::ensure!(range.contains(&n), "{what} must be from {} to {}, not {n}", range.start(), range.end());
    Ok(n)
}

fn keys(listed: &[String]) -> anyhow::Result<Vec<WriterId>> {
    listed
        .iter()
        .map(|k| {
            WriterId::from_hex(k.trim()).with_context(|| format!("'{k}' is not a public key (`capsulefs key show`)"))
        })
        .collect()
}

pub fn serve(home: &Home, a: ServeArgs) -> anyhow::Result<()> {
    let file = a.config.as_deref().map(read_file).transpose()?.unwrap_or_default();
    let store = a.store.or(file.store).unwrap_or_else(|| home.root().join("serve"));
    let listen = a.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid address"));
    let tls = a.tls_cert.zip(a.tls_key).or(file.tls.map(|t| (t.cert, t.key)));
    let (fl, base) = (file.limits.unwrap_or_default(), Limits::default());
    let limits = Limits {
        idle: Duration::from_secs(within(
            a.idle_timeout.or(fl.idle_timeout_secs).unwrap_or(base.idle.as_secs()),
            1..=86_400,
            "idle_timeout",
        )?),
        connections: within(
            a.max_connections.or(fl.max_connections).unwrap_or(base.connections),
            1..=1 << 20,
            "max_connections",
        )?,
        connections_per_addr: within(
            a.max_connections_per_addr.or(fl.max_connections_per_addr).unwrap_or(base.connections_per_addr),
            1..=1 << 20,
            "max_connections_per_addr",
        )?,
        open_stores: within(
            a.max_open_stores.or(fl.max_open_stores).unwrap_or(base.open_stores),
            1..=1 << 16,
            "max_open_stores",
        )?,
    };
    let mut peers = a.peers;
    if peers.is_empty() {
        peers = file.peers;
    }
    let given = !a.allow_creators.is_empty() || a.allow_creators_file.is_some();
    let file_lists = !file.allow_creators.is_empty() || file.allow_creators_file.is_some();
    if file.open == Some(true) && file_lists {
        anyhow::bail!("the config file says both `open = true` and who may create capsules: keep one of them");
    }
    let open = a.open || (!given && file.open.unwrap_or(false));
    let admission = if open {
        Admission::open()
    } else if given || file_lists {
        let (listed, list_file) = match given {
            true => (a.allow_creators, a.allow_creators_file),
            false => (file.allow_creators, file.allow_creators_file),
        };
        Admission::allow(keys(&listed)?, list_file)?
    } else {
        // The safe default: this home's own identities, and nobody else.
        let own: Vec<WriterId> = home.keyring()?.identities().iter().map(|i| i.writer()).collect();
        if own.is_empty() {
            eprintln!(
                "capsulefs: warning: no creator may create capsules here: give --allow-creator PUBKEY, \
                 --allow-creators FILE or --open (or make an identity in this home: `capsulefs key new`)"
            );
        }
        Admission::allow(own, None)?
    };
    let base = if open { Quotas::OPEN } else { Quotas::ALLOWED };
    let fq = file.quotas.unwrap_or_default();
    let quotas = Quotas {
        capsules: a.max_capsules_per_creator.or(fq.capsules_per_creator).unwrap_or(base.capsules),
        bytes: a
            .max_mib_per_creator
            .or(fq.mib_per_creator)
            .map_or(Ok(base.bytes), |m| within(m, 0..=u64::MAX >> 20, "mib_per_creator").map(|m| m << 20))?,
        names: a.max_names_per_creator.or(fq.names_per_creator).unwrap_or(base.names),
    };
    if a.check {
        if let Some((cert, key)) = &tls {
            capsulefs::net::tls::acceptor(cert, key)?;
        }
        print!("{}", describe(&Config { listen, store, peers, tls, limits, admission, quotas }));
        return Ok(());
    }
    server::run(Config { listen, store, peers, tls, limits, admission, quotas }, |addr| {
        // The readiness line scripts and tests wait for.
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}

/// The configuration a server runs with, one setting a line.
fn describe(c: &Config) -> String {
    let q = &c.quotas;
    let l = &c.limits;
    let tls = c.tls.as_ref().map_or("none (plain http)".to_owned(), |(cert, key)| {
        format!("certificate {}, key {}", cert.display(), key.display())
    });
    let peers = if c.peers.is_empty() { "none".to_owned() } else { c.peers.join(" ") };
    format!(
        "listen {}\nstore {}\ntls {tls}\npeers {peers}\ncreators {}\n\
         quotas {} capsules, {} MiB, {} names a creator\n\
         limits idle {} s, {} connections ({} an address), {} stores open\n",
        c.listen,
        c.store.display(),
        c.admission.describe(),
        q.capsules,
        q.bytes >> 20,
        q.names,
        l.idle.as_secs(),
        l.connections,
        l.connections_per_addr,
        l.open_stores
    )
}
