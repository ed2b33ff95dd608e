//! `file:///PATH`: a replica's objects (`objects.rs`) as files under a folder: a USB disk, an
//! NFS mount, a Syncthing folder. Each object is written to a temporary name, synced, and
//! renamed into place, so a reader never sees half of one and a crash leaves the old bytes.
//!
//! The folder is untrusted like any replica: whoever can write it may plant symlinks, fifos,
//! devices or huge files. Objects are opened without following a symlink and without
//! blocking (a fifo), only regular files are read, and no read goes past the largest object
//! the format has; nothing is written through a symlink below the folder's root.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::objects::Objects;
use crate::{Error, Result};

/// Temporary files end with this, followed by random hex; listings skip them.
const PARTIAL: &str = ".partial-";
/// Largest object read: a record with its sub-records as the largest batch a replica takes
/// carries them (`objects::PUT_BATCH_BYTES`), with room for a statement or segment.
const MAX_OBJECT: u64 = 1 << 30;

pub struct Folder {
    root: PathBuf,
}

impl Folder {
    /// The folder a `file:///PATH` URL names (created on the first write).
    pub fn from_url(url: &str) -> Result<Self> {
        let path = url.strip_prefix("file://").unwrap_or(url);
        if !path.starts_with('/') {
            return Err(Error::Invalid(format!("replica URL '{url}': give an absolute path, as file:///PATH")));
        }
        Ok(Self { root: PathBuf::from(path) })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Makes `dir` (below the root) and its parents, refusing a symlink on the way: a write
    /// goes where the layout says, never where someone who can write the folder points it.
    fn make_dirs(&self, dir: &Path) -> Result<()> {
        // The root is the user's choice (it may well be a symlink to a disk).
        fs::create_dir_all(&self.root).map_err(|e| Error::io(&self.root, e))?;
        let below = dir.strip_prefix(&self.root).unwrap_or(dir);
        let mut at = self.root.clone();
        for part in below.components() {
            at.push(part);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::Replica(format!(
                        "{}: not a folder (a symlink or file where the layout has a folder): refusing to write through it",
                        at.display()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => match fs::create_dir(&at) {
                    Ok(()) => {}
                    // Made by another writer between the look and now: looked at again.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue_if_dir(&at)?,
                    Err(e) => return Err(Error::io(&at, e)),
                },
                Err(e) => return Err(Error::io(&at, e)),
            }
        }
        Ok(())
    }
}

/// Whether `at`, just made by someone else, is a folder (not a symlink).
fn continue_if_dir(at: &Path) -> Result<()> {
    match fs::symlink_metadata(at) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Replica(format!("{}: not a folder: refusing to write through it", at.display()))),
        Err(e) => Err(Error::io(at, e)),
    }
}

fn missing_is_none<T>(path: &Path, read: std::io::Result<T>) -> Result<Option<T>> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The object at `path` opened to read: not through a symlink, not waiting on a fifo, and
/// only if it is a regular file; None if there is none.
fn open_object(path: &Path) -> Result<Option<fs::File>> {
    let opened = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path);
    let Some(file) = missing_is_none(path, opened)? else { return Ok(None) };
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Replica(format!(
            "{}: not a regular file; a replica object never is anything else",
            path.display()
        )));
    }
    if meta.len() > MAX_OBJECT {
        return Err(Error::Replica(format!(
            "{}: {} bytes, more than any object of a replica ({MAX_OBJECT})",
            path.display(),
            meta.len()
        )));
    }
    Ok(Some(file))
}

impl Objects for Folder {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.get_range(key, 0, MAX_OBJECT)
    }

    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        let Some(mut file) = open_object(&path)? else { return Ok(None) };
        let mut out = Vec::new();
        // Bounded by the size checked at open, so a file growing meanwhile cannot fill memory.
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.take(len.min(MAX_OBJECT)).read_to_end(&mut out))
            .map_err(|e| Error::io(&path, e))?;
        Ok(Some(out))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(key);
        let dir = path.parent().expect("a key names a file under the root");
        self.make_dirs(dir)?;
        let name = path.file_name().expect("a key ends with a name").to_string_lossy();
        let partial = dir.join(format!("{name}{PARTIAL}{}", hex::encode(crate::crypto::random_bytes::<8>())));
        // A new file (never an existing one, nor a symlink's target); the rename then
        // replaces the name itself, whatever it was.
        let created = fs::OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW).open(&partial);
        let written = created.and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
        if let Err(e) = written.and_then(|()| fs::rename(&partial, &path)) {
            let _ = fs::remove_file(&partial);
            return Err(Error::io(&path, e));
        }
        // The rename itself is durable only once the folder is synced.
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.path(prefix);
        let Some(entries) = missing_is_none(&dir, fs::read_dir(&dir))? else { return Ok(Vec::new()) };
        let mut names = Vec::new();
        for entry in entries {
            let name = entry.map_err(|e| Error::io(&dir, e))?.file_name().to_string_lossy().into_owned();
            if !name.contains(PARTIAL) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}
