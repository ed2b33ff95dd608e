//! `$CAPSULEFS_HOME`: keys/ (one file per identity), capsules/<id>/store (RocksDB), and
//! names/<name> (a file holding the id), so a capsule is named by local name or by id;
//! `cli::mount` adds capsules/<id>/mounted, mounts/ and logs/.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};

use capsulefs::capsule::Capsule;
use capsulefs::crypto::keys::{Identity, KeyFolder};
use capsulefs::record::{CapsuleId, WriterId};
use capsulefs::replica::objects::Pusher;
use capsulefs::replica::prefetch::SubRecordSource;
use capsulefs::replica::{self, Replica};
use capsulefs::store::rocks::RocksKv;
use capsulefs::{Error, Result};

/// The replica list's policy line: how many replicas may lie.
const POLICY_PREFIX: &str = "faulty ";

pub struct Home {
    root: PathBuf,
}

const DEFAULT_KEY: &str = "default";

impl Home {
    pub fn new(root: Option<PathBuf>) -> anyhow::Result<Self> {
        let root = match root {
            Some(r) => r,
            None => {
                let home = std::env::var_os("HOME")
                    .ok_or_else(|| anyhow!("neither --home, CAPSULEFS_HOME nor HOME is set"))?;
                Path::new(&home).join(".local/share/capsulefs")
            }
        };
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn keyring(&self) -> Result<KeyFolder> {
        KeyFolder::load(&self.root.join("keys"))
    }

    /// This machine's device id, made at random on first use: a folder or bucket replica keeps
    /// one head object per device, so no two machines ever write the same object.
    pub fn device_id(&self) -> anyhow::Result<[u8; 16]> {
        let path = self.root.join("device");
        if let Ok(text) = fs::read_to_string(&path) {
            let bytes = hex::decode(text.trim()).ok().and_then(|b| <[u8; 16]>::try_from(b).ok());
            return bytes
                .ok_or_else(|| anyhow!("{} is not 32 hex digits: remove it to make a new device id", path.display()));
        }
        let id = capsulefs::crypto::random_bytes::<16>();
        let tmp = path.with_extension("new");
        fs::write(&tmp, format!("{}\n", hex::encode(id)))
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| Error::io(&path, e))?;
        Ok(id)
    }

    /// Who pushes `capsule` from here: the first local identity allowed to write it, with this
    /// device's id; None when no local identity may write it.
    pub fn pusher(&self, capsule: &Capsule) -> anyhow::Result<Option<Pusher>> {
        let rights = capsule.rights()?;
        self.pusher_for(|w| rights.may_write(w))
    }

    /// `pusher`, with the rights `may_write` gives (a relay between two replicas, with no
    /// local copy, knows only the metadata's writers).
    pub fn pusher_for(&self, may_write: impl Fn(&WriterId) -> bool) -> anyhow::Result<Option<Pusher>> {
        let ring = self.keyring()?;
        let Some(identity) = ring.identities().iter().find(|i| may_write(&i.writer())) else {
            return Ok(None);
        };
        let turn = Some(self.root.join("device.lock"));
        Ok(Some(Pusher { identity: identity.clone(), device: self.device_id()?, turn }))
    }

    /// The replica at `url` for `capsule`, able to take pushes from this machine.
    pub fn replica(&self, url: &str, capsule: &Capsule) -> anyhow::Result<Box<dyn Replica>> {
        Ok(replica::open(url, capsule.id(), self.pusher(capsule)?)?)
    }

    /// The identity named `name`, else "default", else the only one; with `create`, a missing
    /// default is generated.
    pub fn identity(&self, name: Option<&str>, create: bool) -> anyhow::Result<Identity> {
        let mut ring = self.keyring()?;
        if let Some(name) = name {
            return ring
                .by_name(name)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("key '{name}' (see `capsulefs key list`)")).into());
        }
        if let Some(id) = ring.by_name(DEFAULT_KEY) {
            return Ok(id.clone());
        }
        match ring.identities() {
            [only] => Ok(only.clone()),
            [] if create => {
                let id = ring.add(Identity::generate(DEFAULT_KEY)?)?.clone();
                eprintln!("capsulefs: made identity 'default' ({})", id.writer());
                Ok(id)
            }
            [] => Err(Error::NotFound("a key: make one with `capsulefs key new`".into()).into()),
            _ => bail!(Error::Invalid("several keys and none named 'default': choose one with --key".into())),
        }
    }

    fn capsules_dir(&self) -> PathBuf {
        self.root.join("capsules")
    }

    fn names_dir(&self) -> PathBuf {
        self.root.join("names")
    }

    pub fn store_path(&self, id: &CapsuleId) -> PathBuf {
        self.capsules_dir().join(id.to_hex()).join("store")
    }

    /// A fresh, empty store folder for a capsule whose id is not known yet.
    pub fn staging_store(&self) -> anyhow::Result<(tempfile::TempDir, Arc<RocksKv>)> {
        let dir = self.capsules_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let staging = tempfile::Builder::new().prefix(".new-").tempdir_in(&dir)?;
        let kv = RocksKv::open(&staging.path().join("store"), true)?;
        Ok((staging, Arc::new(kv)))
    }

    /// Moves a staged capsule to its place and records its name.
    pub fn register(&self, name: &str, id: &CapsuleId, staging: tempfile::TempDir) -> anyhow::Result<()> {
        let names = self.names_dir();
        fs::create_dir_all(&names)?;
        let final_dir = self.capsules_dir().join(id.to_hex());
        fs::rename(staging.keep(), &final_dir)
            .with_context(|| format!("moving the new capsule to {}", final_dir.display()))?;
        fs::write(names.join(name), format!("{id}\n"))?;
        Ok(())
    }

    pub fn name_taken(&self, name: &str) -> bool {
        self.names_dir().join(name).exists()
    }

    /// (name, id) of every named capsule, sorted by name.
    pub fn names(&self) -> anyhow::Result<Vec<(String, CapsuleId)>> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.names_dir()) else { return Ok(out) };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let text = fs::read_to_string(entry.path())?;
            let id =
                CapsuleId::from_hex(text.trim()).with_context(|| format!("names/{name} does not hold a capsule id"))?;
            out.push((name, id));
        }
        out.sort();
        Ok(out)
    }

    /// Resolves a local name, a full id or a unique id prefix.
    pub fn resolve(&self, name: &str) -> anyhow::Result<CapsuleId> {
        let names = self.names()?;
        if let Some((_, id)) = names.iter().find(|(n, _)| n == name) {
            return Ok(*id);
        }
        let lower = name.to_ascii_lowercase();
        let mut hits = fs::read_dir(self.capsules_dir())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|d| lower.len() >= 4 && d.starts_with(&lower))
            .filter_map(|d| CapsuleId::from_hex(&d).ok());
        match (hits.next(), hits.next()) {
            (Some(id), None) => Ok(id),
            (Some(_), Some(_)) => {
                bail!(Error::Invalid(format!("'{name}' matches several capsule ids: give more digits")))
            }
            _ => bail!(Error::NotFound(format!("capsule '{name}' (see `capsulefs list`)"))),
        }
    }

    /// Opens a capsule for reading and writing, with every local identity able to attest and
    /// proven marks authenticated by this home's trust key. A capsule that is mounted is
    /// refused with a message naming the mount.
    pub fn open(&self, name: &str) -> anyhow::Result<Capsule> {
        let id = self.resolve(name)?;
        let kv = RocksKv::open(&self.store_path(&id), false).map_err(|e| match e {
            Error::Store(ref s) if is_lock_error(s) => {
                let held_by = match self.mounted_at(&id) {
                    Some((dir, pid)) => format!(
                        "it is mounted at {} (daemon pid {pid}): write through that folder, or unmount it \
                         first with `capsulefs umount {}`",
                        dir.display(),
                        dir.display()
                    ),
                    None => "another capsulefs process has it open; wait for it to finish".to_owned(),
                };
                anyhow::Error::new(e).context(format!("capsule '{name}' is in use: {held_by}"))
            }
            e => anyhow::Error::new(e).context(format!("opening capsule '{name}'")),
        })?;
        let capsule = self.checked(name, &id, kv)?;
        Ok(capsule.with_trust_key(self.keyring()?.trust_key()?))
    }

    /// Opens a capsule to read it, also while a mount has it open for writing: then the store
    /// is opened read-only, seeing every commit made before this call, and proofs made now are
    /// kept in memory only.
    pub fn open_for_reading(&self, name: &str) -> anyhow::Result<Capsule> {
        let id = self.resolve(name)?;
        let path = self.store_path(&id);
        match RocksKv::open(&path, false) {
            Ok(kv) => Ok(self.checked(name, &id, kv)?.with_trust_key(self.keyring()?.trust_key()?)),
            Err(Error::Store(ref s)) if is_lock_error(s) => {
                let kv = RocksKv::open_read_only(&path).with_context(|| format!("opening capsule '{name}' to read"))?;
                self.checked(name, &id, kv)
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("opening capsule '{name}'"))),
        }
    }

    /// The capsule in `kv`, checked to be capsule `id`.
    fn checked(&self, name: &str, id: &CapsuleId, kv: RocksKv) -> anyhow::Result<Capsule> {
        let capsule = Capsule::open(Arc::new(kv), self.keyring()?.identities().to_vec())
            .with_context(|| format!("opening capsule '{name}'"))?;
        if capsule.id() != *id {
            bail!(Error::Store(capsulefs::StoreError::Corrupted(format!(
                "{} holds capsule {:?}, not {:?}",
                self.store_path(id).display(),
                capsule.id(),
                id
            ))));
        }
        // A sparse clone reads the sub-records it lacks from its first replica.
        if capsule.is_sparse()?
            && let Some(url) = self.replicas(id)?.first()
        {
            capsule.fill_from(SubRecordSource::new(Arc::from(replica::open(url, *id, None)?)));
        }
        Ok(capsule)
    }

    fn replicas_file(&self, id: &CapsuleId) -> PathBuf {
        self.capsules_dir().join(id.to_hex()).join("replicas")
    }

    /// The lines of capsule `id`'s replica list: URLs, and the policy line (`faulty B`).
    fn replica_lines(&self, id: &CapsuleId) -> anyhow::Result<Vec<String>> {
        let path = self.replicas_file(id);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::io(&path, e).into()),
        }
    }

    /// The replica URLs remembered for capsule `id`.
    pub fn replicas(&self, id: &CapsuleId) -> anyhow::Result<Vec<String>> {
        Ok(self.replica_lines(id)?.into_iter().filter(|l| l.contains("://")).collect())
    }

    /// How many of capsule `id`'s replicas may lie (`capsulefs replica policy`; 0 by default).
    pub fn replica_policy(&self, id: &CapsuleId) -> anyhow::Result<usize> {
        let line = self.replica_lines(id)?.into_iter().find_map(|l| l.strip_prefix(POLICY_PREFIX).map(str::to_owned));
        match line {
            None => Ok(0),
            Some(b) => Ok(b.trim().parse().map_err(|_| Error::Invalid(format!("replica policy 'faulty {b}'")))?),
        }
    }

    /// Remembers `urls` as capsule `id`'s replicas (written whole, then renamed into place),
    /// keeping its policy.
    pub fn set_replicas(&self, id: &CapsuleId, urls: &[String]) -> anyhow::Result<()> {
        let faulty = self.replica_policy(id)?;
        self.write_replica_list(id, urls, faulty)
    }

    /// Sets how many of capsule `id`'s replicas may lie.
    pub fn set_replica_policy(&self, id: &CapsuleId, faulty: usize) -> anyhow::Result<()> {
        self.write_replica_list(id, &self.replicas(id)?, faulty)
    }

    fn write_replica_list(&self, id: &CapsuleId, urls: &[String], faulty: usize) -> anyhow::Result<()> {
        let path = self.replicas_file(id);
        let mut text: String = urls.iter().map(|u| format!("{u}\n")).collect();
        if faulty > 0 {
            text.push_str(&format!("{POLICY_PREFIX}{faulty}\n"));
        }
        let tmp = path.with_extension("new");
        fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, &path)).map_err(|e| Error::io(&path, e))?;
        Ok(())
    }

    /// The folder and daemon pid of a running mount of capsule `id`, from the mount registry.
    pub fn mounted_at(&self, id: &CapsuleId) -> Option<(PathBuf, u32)> {
        let entries = fs::read_dir(self.root.join("mounts")).ok()?;
        entries.filter_map(|e| fs::read_to_string(e.ok()?.path()).ok()).find_map(|text| {
            let mut lines = text.lines();
            let (pid, name, dir) = (lines.next()?.parse().ok()?, lines.next()?, lines.next()?);
            (self.resolve(name).ok()? == *id).then(|| (PathBuf::from(dir), pid))
        })
    }

    /// `$CAPSULEFS_HOME/mounts/<key>` for a mounted folder.
    pub fn mount_entry(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let canonical = dir.canonicalize().with_context(|| format!("{} is not an existing folder", dir.display()))?;
        let key = &blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex()[..16];
        Ok(self.root.join("mounts").join(key))
    }

    /// The request socket of the writable mount of capsule `id`, if one runs (`requests.rs`).
    pub fn request_socket(&self, id: &CapsuleId) -> Option<PathBuf> {
        let (dir, _) = self.mounted_at(id)?;
        Some(self.mount_entry(&dir).ok()?.with_extension("sock")).filter(|p| p.exists())
    }
}

/// RocksDB's answer when another process holds the store's lock.
fn is_lock_error(e: &capsulefs::StoreError) -> bool {
    e.to_string().contains("lock")
}
