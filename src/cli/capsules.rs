//! `capsulefs create`, `list` and `append`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;

use capsulefs::Error;
use capsulefs::capsule::{AppendOptions, Capsule, NewCapsule};
use capsulefs::member::create_keystore;
use capsulefs::record::{Params, WriterId};

use super::home::Home;

#[derive(Parser, Debug)]
pub struct CreateArgs {
    /// Local name of the new capsule.
    pub name: String,
    /// Identity that creates and owns the capsule (default: 'default', made if missing).
    #[arg(long)]
    pub key: Option<String>,
    /// Writers sign at least every this many records.
    #[arg(long, default_value_t = Params::default().sign_every_records)]
    pub sign_every_records: u32,
    /// ... and at least every this many seconds.
    #[arg(long, default_value_t = Params::default().sign_every_secs)]
    pub sign_every_secs: u32,
    /// Another writer allowed from the start (writer id as printed by `key list`); repeatable.
    #[arg(long = "writer", value_name = "WRITER_ID", value_parser = parse_writer)]
    pub writers: Vec<WriterId>,
}

pub(super) fn parse_writer(s: &str) -> Result<WriterId, String> {
    WriterId::from_hex(s).map_err(|e| e.to_string())
}

pub fn create(home: &Home, a: CreateArgs) -> anyhow::Result<()> {
    let valid = !a.name.is_empty() && !a.name.contains('/') && !a.name.starts_with('.');
    if !valid {
        bail!(Error::Invalid(format!("capsule name '{}': no '/', not empty, not starting with '.'", a.name)));
    }
    if home.name_taken(&a.name) {
        bail!(Error::Exists(format!("capsule '{}'", a.name)));
    }
    let creator = home.identity(a.key.as_deref(), true)?;
    let (staging, kv) = home.staging_store()?;
    let params = Params { sign_every_records: a.sign_every_records, sign_every_secs: a.sign_every_secs };
    let spec = NewCapsule { name: &a.name, creator: &creator, writers: a.writers, params };
    let capsule = Capsule::create(kv, spec, Vec::new())?;
    create_keystore(&capsule, &creator)?;
    let id = capsule.id();
    // Close the capsule (and with it the RocksDB handle) before its folder moves.
    drop(capsule);
    home.register(&a.name, &id, staging)?;
    println!("{id}");
    Ok(())
}

pub fn list(home: &Home) -> anyhow::Result<()> {
    for (name, id) in home.names()? {
        println!("{name}\t{id}");
    }
    Ok(())
}

#[derive(Parser, Debug)]
pub struct AppendArgs {
    /// Capsule name or id.
    pub name: String,
    /// Files whose bytes become the record's sub-records, in order.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Sign the record (otherwise it is proven by a later signed descendant, or locally by the writer's key).
    #[arg(long)]
    pub sign: bool,
    /// Identity that writes the record.
    #[arg(long)]
    pub key: Option<String>,
}

pub fn append(home: &Home, a: AppendArgs) -> anyhow::Result<()> {
    let capsule = home.open(&a.name)?;
    let writer = home.identity(a.key.as_deref(), false)?;
    let payloads = a
        .files
        .iter()
        .map(|f| std::fs::read(f).map_err(|e| Error::io(f, e)).with_context(|| "reading a file to append"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let h = capsule.append(&writer, &refs, AppendOptions { sign: a.sign, ..Default::default() })?;
    println!("{h}");
    Ok(())
}
