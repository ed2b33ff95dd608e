//! `file:///PATH`: a replica's objects (`objects.rs`) as files under a folder: a USB disk, an
//! NFS mount, a Syncthing folder. Each object is written to a temporary name, synced, and
//! renamed into place, so a reader never sees half of one and a crash leaves the old bytes.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::objects::Objects;
use crate::{Error, Result};

/// Temporary files end with this, followed by random hex; listings skip them.
const PARTIAL: &str = ".partial-";

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
}

fn missing_is_none<T>(path: &Path, read: std::io::Result<T>) -> Result<Option<T>> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

impl Objects for Folder {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        missing_is_none(&path, fs::read(&path))
    }

    fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        let Some(file) = missing_is_none(&path, fs::File::open(&path))? else { return Ok(None) };
        let mut out = Vec::new();
        let mut file = file;
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.take(len).read_to_end(&mut out))
            .map_err(|e| Error::io(&path, e))?;
        Ok(Some(out))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let path = self.path(key);
        let dir = path.parent().expect("a key names a file under the root");
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let name = path.file_name().expect("a key ends with a name").to_string_lossy();
        let partial = dir.join(format!("{name}{PARTIAL}{}", hex::encode(crate::crypto::random_bytes::<8>())));
        let written = fs::File::create(&partial).and_then(|mut f| {
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
