//! `capsulefs name register NAME --capsule CAPSULE`, and `URL#NAME` for `clone`: names that
//! the capsule's creator signs and honest servers bind once (trust on first use, as BFTKV's
//! slots). A name is resolved through a read quorum of the servers given, and the binding
//! first accepted is pinned in the home's `pinned-names` file: a later answer that differs is refused.

use std::fs;

use anyhow::bail;
use clap::Subcommand;

use capsulefs::member::name::NameBinding;
use capsulefs::record::{CapsuleId, WriterId};
use capsulefs::replica::remote::Remote;
use capsulefs::{Error, VerifyError};

use super::home::Home;

#[derive(Subcommand, Debug)]
pub enum NameCommand {
    /// Ask the capsule's server replicas to bind NAME to it, signed with its creator's key
    /// (which this home must hold); a server that bound NAME to something else refuses.
    Register {
        name: String,
        /// The capsule (name or id here).
        #[arg(long)]
        capsule: String,
    },
}

pub fn name(home: &Home, cmd: NameCommand) -> anyhow::Result<()> {
    match cmd {
        NameCommand::Register { name, capsule } => register(home, &name, &capsule),
    }
}

fn is_server(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

fn register(home: &Home, name: &str, capsule: &str) -> anyhow::Result<()> {
    let capsule = home.open_for_reading(capsule)?;
    let creator = capsule.metadata().creator;
    let ring = home.keyring()?;
    let Some(me) = ring.identities().iter().find(|i| i.writer() == creator) else {
        bail!(Error::NotFound(format!("the key of the capsule's creator ({creator:?}): only the creator can name it")));
    };
    let binding = NameBinding::make(name, &capsule.metadata_bytes(), me)?;
    let servers: Vec<String> = home.replicas(&capsule.id())?.into_iter().filter(|u| is_server(u)).collect();
    if servers.is_empty() {
        bail!(Error::NotFound(format!(
            "a server replica of {:?} to bind the name on (`capsulefs replica add NAME http://HOST:PORT`)",
            capsule.id()
        )));
    }
    let needed = servers.len() - home.replica_policy(&capsule.id())?.min(servers.len() - 1);
    let mut bound = 0;
    for url in &servers {
        match Remote::new(url, capsule.id())?.bind_name(&binding) {
            Ok(()) => {
                println!("bound '{name}' on {url}");
                bound += 1;
            }
            Err(e @ Error::Exists(_)) => bail!(e),
            Err(e) => eprintln!("capsulefs: warning: {url} did not bind '{name}': {e}"),
        }
    }
    if bound < needed {
        bail!(Error::Replica(format!(
            "'{name}' is bound on {bound} of {} servers; that takes {needed}",
            servers.len()
        )));
    }
    pin(home, name, capsule.id(), creator)?;
    println!("{name} {}", capsule.id().to_hex());
    Ok(())
}

/// The capsule `name` stands for: the binding a read quorum of `urls` (all but `faulty`)
/// agrees on, checked, and matching the pin of an earlier resolution, if any.
pub fn resolve(home: &Home, name: &str, urls: &[String], faulty: usize) -> anyhow::Result<CapsuleId> {
    let mut answers: Vec<(String, (CapsuleId, WriterId))> = Vec::new();
    for url in urls.iter().filter(|u| is_server(u)) {
        match Remote::new(url, CapsuleId::from_bytes([0; 32]))?.name(name) {
            Ok(Some(binding)) if binding.name == name => match binding.check() {
                Ok(bound) => answers.push((url.clone(), bound)),
                Err(e) => {
                    eprintln!("capsulefs: warning: {url} answered a binding of '{name}' that does not check: {e}")
                }
            },
            Ok(Some(_)) => eprintln!("capsulefs: warning: {url} answered a binding of another name"),
            Ok(None) => eprintln!("capsulefs: warning: {url} does not know the name '{name}'"),
            Err(e) => eprintln!("capsulefs: warning: {url}: {e}"),
        }
    }
    let Some((_, first)) = answers.first().cloned() else {
        bail!(Error::NotFound(format!("the name '{name}' on {}", urls.join(", "))));
    };
    if let Some((url, other)) = answers.iter().find(|(_, b)| *b != first) {
        bail!(refused(format!(
            "servers disagree on '{name}': {} says capsule {:?} by {:?}, {url} says {:?} by {:?}",
            answers[0].0, first.0, first.1, other.0, other.1
        )));
    }
    let needed = urls.len().saturating_sub(faulty).max(1);
    if answers.len() < needed {
        bail!(Error::Replica(format!(
            "only {} of {} servers bind '{name}'; a quorum is {needed}",
            answers.len(),
            urls.len()
        )));
    }
    match pinned(home, name)? {
        Some(pin) if pin != first => bail!(refused(format!(
            "'{name}' was first accepted here as capsule {:?} by {:?}, and now answers {:?} by {:?}: refused (if \
             the name really moved, delete its line from {})",
            pin.0,
            pin.1,
            first.0,
            first.1,
            pins_file(home).display()
        ))),
        Some(_) => {}
        None => pin(home, name, first.0, first.1)?,
    }
    Ok(first.0)
}

fn refused(why: String) -> Error {
    Error::Verify(VerifyError::Metadata(why))
}

fn pins_file(home: &Home) -> std::path::PathBuf {
    home.root().join("pinned-names")
}

/// The binding pinned for `name`: (capsule, creator).
fn pinned(home: &Home, name: &str) -> anyhow::Result<Option<(CapsuleId, WriterId)>> {
    let path = pins_file(home);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e).into()),
    };
    for line in text.lines() {
        if let [n, id, creator] = line.split(' ').collect::<Vec<_>>()[..]
            && n == name
        {
            let bad = |e| Error::Invalid(format!("{}: the pin of '{name}': {e}", path.display()));
            return Ok(Some((CapsuleId::from_hex(id).map_err(bad)?, WriterId::from_hex(creator).map_err(bad)?)));
        }
    }
    Ok(None)
}

/// Pins `name` to `capsule` by `creator` (appended; a name is pinned once).
fn pin(home: &Home, name: &str, capsule: CapsuleId, creator: WriterId) -> anyhow::Result<()> {
    if pinned(home, name)?.is_some() {
        return Ok(());
    }
    let path = pins_file(home);
    let mut text = fs::read_to_string(&path).unwrap_or_default();
    text.push_str(&format!("{name} {} {}\n", capsule.to_hex(), creator.to_hex()));
    let tmp = path.with_extension("new");
    fs::write(&tmp, text).and_then(|()| fs::rename(&tmp, &path)).map_err(|e| Error::io(&path, e))?;
    Ok(())
}
