//! Names bound to capsules on first use (`/v1/names/NAME`): a binding is kept once, and the
//! same binding again is fine; any other of a name taken is refused. Each creator may bind
//! `Quotas::names` names, and only a creator the server admits.

use std::path::Path;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};

use super::registry::Registry;
use super::replies::{borsh_body, decode};
use super::shared::{Shared, blocking};
use crate::member::name::{NameBinding, check_bound_name};
use crate::{Error, Result};

/// Largest binding taken: a name and signed metadata with a long list of writers.
pub const MAX_BINDING: usize = 64 << 10;

/// The binding of `name` this server took first, as stored.
fn name(dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    check_bound_name(name)?;
    let path = dir.join("names").join(name);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Takes `binding` if its name is free here, or already bound to the same capsule by the
/// same creator; any other binding of a name taken is refused (trust on first use). The file
/// appears whole or not at all: written aside, then linked in place, which fails if another
/// request linked first.
fn bind(registry: &Registry, binding: &NameBinding, bytes: &[u8]) -> Result<()> {
    let wanted = binding.check()?;
    let dir = registry.dir().join("names");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join(&binding.name);
    let taken = |held: Vec<u8>| -> Result<()> {
        let held: NameBinding = decode(&held)?;
        if held.check()? == wanted {
            return Ok(());
        }
        Err(Error::Exists(format!(
            "the name '{}' is bound to another capsule or creator on this server; a name is bound once",
            binding.name
        )))
    };
    if let Some(held) = name(registry.dir(), &binding.name)? {
        return taken(held);
    }
    registry.take_name(wanted.1)?;
    let aside = dir.join(format!(".{}.{}", binding.name, hex::encode(crate::crypto::random_bytes::<8>())));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&aside)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        registry.untake_name(wanted.1);
        return Err(Error::io(&aside, e));
    }
    let linked = std::fs::hard_link(&aside, &path);
    let _ = std::fs::remove_file(&aside);
    match linked {
        Ok(()) => {
            std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(&dir, e))?;
            tracing::info!("bound the name '{}' to {:?}", binding.name, wanted.0);
            Ok(())
        }
        Err(e) => {
            registry.untake_name(wanted.1);
            match e.kind() {
                std::io::ErrorKind::AlreadyExists => taken(std::fs::read(&path).map_err(|e| Error::io(&path, e))?),
                _ => Err(Error::io(&path, e)),
            }
        }
    }
}

pub async fn get_name(State(s): Shared, UrlPath(wanted): UrlPath<String>) -> Response {
    blocking(s, move |s| match name(s.registry.dir(), &wanted)? {
        Some(bytes) => Ok(bytes.into_response()),
        None => Err(Error::NotFound(format!("the name '{wanted}' on this server"))),
    })
    .await
}

pub async fn put_name(State(s): Shared, UrlPath(wanted): UrlPath<String>, body: Bytes) -> Response {
    blocking(s, move |s| {
        if body.len() > MAX_BINDING {
            return Err(Error::Invalid(format!("a name binding of {} bytes; at most {MAX_BINDING}", body.len())));
        }
        let binding: NameBinding = decode(&body)?;
        if binding.name != wanted {
            return Err(Error::Invalid(format!("a binding of '{}' sent to the name '{wanted}'", binding.name)));
        }
        bind(&s.registry, &binding, &body)?;
        Ok(borsh_body(&()))
    })
    .await
}
