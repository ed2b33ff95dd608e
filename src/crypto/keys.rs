//! Writer identities: ed25519 keys kept one per file (hex seed, mode 0600) in a keys folder.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::sign::{TrustKey, writer_id};
use crate::record::WriterId;
use crate::{Error, Result};

#[derive(Clone)]
pub struct Identity {
    name: String,
    key: SigningKey,
}

impl Identity {
    pub fn generate(name: &str) -> Result<Self> {
        check_identity_name(name)?;
        Ok(Self { name: name.to_owned(), key: SigningKey::from_bytes(&super::random_bytes()) })
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn key(&self) -> &SigningKey {
        &self.key
    }
    pub fn writer(&self) -> WriterId {
        writer_id(&self.key)
    }
}

/// Key names become file names, so keep them to a safe alphabet.
fn check_identity_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("name '{name}': use 1-64 of A-Z a-z 0-9 . _ - (not starting with '.')")))
    }
}

/// The trust key's file in the keys folder (not `*.key`, so never taken for an identity).
const TRUST_KEY_FILE: &str = "local-trust.secret";

/// The identities in one folder.
pub struct KeyFolder {
    dir: PathBuf,
    identities: Vec<Identity>,
}

impl KeyFolder {
    pub fn load(dir: &Path) -> Result<Self> {
        let mut identities = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self { dir: dir.to_owned(), identities }),
            Err(e) => return Err(Error::io(dir, e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".key")) else {
                continue;
            };
            let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let mut seed = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| {
                Error::Invalid(format!("{} is not a capsulefs key file (64 hex digits)", path.display()))
            })?;
            identities.push(Identity { name: name.to_owned(), key: SigningKey::from_bytes(&seed) });
        }
        identities.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { dir: dir.to_owned(), identities })
    }

    pub fn identities(&self) -> &[Identity] {
        &self.identities
    }

    pub fn by_name(&self, name: &str) -> Option<&Identity> {
        self.identities.iter().find(|i| i.name == name)
    }

    pub fn by_writer(&self, w: &WriterId) -> Option<&Identity> {
        self.identities.iter().find(|i| i.writer() == *w)
    }

    /// This machine's trust key (`keys/local-trust.secret`, 0600), made on first use. It lives
    /// with the identities because the threat model protects that folder, not the stores.
    pub fn trust_key(&self) -> Result<TrustKey> {
        let path = self.dir.join(TRUST_KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let mut secret = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut secret).map_err(|_| {
                    Error::Invalid(format!(
                        "{} is not a trust key (64 hex digits); remove it to make a new one",
                        path.display()
                    ))
                })?;
                Ok(TrustKey::from_bytes(secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: [u8; 32] = super::random_bytes();
                self.write_private(&path, &hex::encode(secret))?;
                Ok(TrustKey::from_bytes(secret))
            }
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Writes a new file in the keys folder, 0600, never overwriting, synced.
    fn write_private(&self, path: &Path, text: &str) -> Result<()> {
        fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(&self.dir, e))?;
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Exists(path.display().to_string())
            } else {
                Error::io(path, e)
            }
        })?;
        writeln!(file, "{text}").and_then(|()| file.sync_all()).map_err(|e| Error::io(path, e))
    }

    /// Writes a new identity's file (0600, never overwriting) and adds it.
    pub fn add(&mut self, identity: Identity) -> Result<&Identity> {
        let path = self.dir.join(format!("{}.key", identity.name));
        self.write_private(&path, &hex::encode(identity.key.to_bytes())).map_err(|e| match e {
            Error::Exists(_) => Error::Exists(format!("key '{}'", identity.name)),
            e => e,
        })?;
        self.identities.push(identity);
        Ok(self.identities.last().expect("just pushed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = KeyFolder::load(dir.path()).unwrap();
        let w = ring.add(Identity::generate("alice").unwrap()).unwrap().writer();
        let mode = fs::metadata(dir.path().join("alice.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = KeyFolder::load(dir.path()).unwrap();
        assert_eq!(again.by_name("alice").unwrap().writer(), w);
        assert!(matches!(ring.add(Identity::generate("alice").unwrap()), Err(Error::Exists(_))));
        assert!(Identity::generate("../x").is_err());
    }
}
