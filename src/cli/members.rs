//! `capsulefs grant` and `members`: who may read a capsule.

use anyhow::bail;
use clap::{Parser, ValueEnum};

use capsulefs::Error;
use capsulefs::member::{Level, grant_read, members};
use capsulefs::record::WriterId;

use super::home::Home;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LevelArg {
    Read,
    Write,
    Admin,
    Superadmin,
}

#[derive(Parser, Debug)]
pub struct GrantArgs {
    /// Local name of the capsule.
    pub name: String,
    /// The member's public key, as `capsulefs key show` prints it on their machine.
    #[arg(value_parser = super::capsules::parse_writer)]
    pub pubkey: WriterId,
    #[arg(long, value_enum)]
    pub level: LevelArg,
    /// The admin identity that signs the grant.
    #[arg(long)]
    pub key: Option<String>,
}

/// Appends a signed grant with the content key wrapped for the member; it reaches other
/// machines with the next push. Prints the record.
pub fn grant(home: &Home, a: GrantArgs) -> anyhow::Result<()> {
    if !matches!(a.level, LevelArg::Read) {
        bail!(Error::Unsupported(format!(
            "granting {} access (only read can be granted so far: writing rights still come from the \
             capsule's metadata alone, given with `capsulefs create --writer`)",
            format!("{:?}", a.level).to_lowercase()
        )));
    }
    let admin = home.identity(a.key.as_deref(), false)?;
    let capsule = home.open(&a.name)?;
    println!("{}", grant_read(&capsule, &admin, &a.pubkey)?);
    Ok(())
}

#[derive(Parser, Debug)]
pub struct MembersArgs {
    /// Local name of the capsule.
    pub name: String,
}

/// One line per member: `PUBKEY LEVEL`, then who granted it and in which record.
pub fn list(home: &Home, a: MembersArgs) -> anyhow::Result<()> {
    let capsule = home.open_for_reading(&a.name)?;
    let roster = members(&capsule)?;
    for m in roster.members {
        let from = match m.record {
            Some(record) => format!("record {record}"),
            None => "the metadata".to_owned(),
        };
        let level =
            if m.level == Level::Superadmin && m.granted_by == m.key { "superadmin (creator)" } else { m.level.name() };
        println!("{} {level} granted by {} in {from}", m.key, m.granted_by);
    }
    for (record, writer) in roster.not_applied {
        eprintln!("capsulefs: not applied: membership record {record} by {writer} (not an admin, or more than read)");
    }
    Ok(())
}
