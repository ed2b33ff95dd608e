//! `capsulefs grant`, `revoke`, `invite`, `join` and `members`: who may read and write a
//! capsule.

use anyhow::bail;
use clap::{Parser, ValueEnum};

use capsulefs::Error;
use capsulefs::member::{self, Invitation};
use capsulefs::record::{RecordHash, WriterId};
use capsulefs::rights::Level;
use capsulefs::sync::transfer;

use super::home::Home;
use super::requests::Change;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LevelArg {
    Read,
    Write,
    Admin,
    Superadmin,
}

impl From<LevelArg> for Level {
    fn from(level: LevelArg) -> Level {
        match level {
            LevelArg::Read => Level::Read,
            LevelArg::Write => Level::Write,
            LevelArg::Admin => Level::Admin,
            LevelArg::Superadmin => Level::Superadmin,
        }
    }
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
/// machines with the next push (a mount's background sync pushes it at once). Prints the
/// record.
pub fn grant(home: &Home, a: GrantArgs) -> anyhow::Result<()> {
    println!("{}", grant_only(home, &a)?);
    Ok(())
}

/// The grant, appended here, or by the capsule's writable mount when one holds its store.
fn grant_only(home: &Home, a: &GrantArgs) -> anyhow::Result<RecordHash> {
    let level = Level::from(a.level);
    if let Some(socket) = home.request_socket(&home.resolve(&a.name)?) {
        return super::requests::change_through(&socket, Change::Grant(level), &a.pubkey, a.key.as_deref());
    }
    let admin = home.identity(a.key.as_deref(), false)?;
    Ok(member::grant(&home.open(&a.name)?, &admin, &a.pubkey, level)?)
}

#[derive(Parser, Debug)]
pub struct RevokeArgs {
    /// Local name of the capsule.
    pub name: String,
    /// The member's public key.
    #[arg(value_parser = super::capsules::parse_writer)]
    pub pubkey: WriterId,
    /// The admin identity that signs the revocation.
    #[arg(long)]
    pub key: Option<String>,
}

/// Appends a signed revocation with a new generation of the content key for the remaining
/// members. Prints the record. Unmounted, it first pulls from the capsule's replicas, so that
/// the cut-off covers the member's records they hold (a mount pulls in the background).
pub fn revoke(home: &Home, a: RevokeArgs) -> anyhow::Result<()> {
    let id = home.resolve(&a.name)?;
    let record = match home.request_socket(&id) {
        Some(socket) => super::requests::change_through(&socket, Change::Revoke, &a.pubkey, a.key.as_deref())?,
        None => {
            let admin = home.identity(a.key.as_deref(), false)?;
            let capsule = home.open(&a.name)?;
            for url in home.replicas(&id)? {
                let pulled = home.replica(&url, &capsule).and_then(|r| Ok(transfer::pull(&capsule, &*r, &())?));
                if let Err(e) = pulled {
                    eprintln!(
                        "capsulefs: warning: could not pull from {url} before revoking ({e:#}): records of the member \
                         that only it holds fall past the cut-off"
                    );
                }
            }
            member::revoke(&capsule, &admin, &a.pubkey)?
        }
    };
    println!("{record}");
    Ok(())
}

#[derive(Parser, Debug)]
pub struct InviteArgs {
    #[command(flatten)]
    pub grant: GrantArgs,
    /// Seal the token for the member: only their identity opens it, so the capsule id and
    /// replica URLs stay private to them.
    #[arg(long)]
    pub encrypt: bool,
}

/// `grant`, then a push of the grant to the capsule's replicas, then the token that lets the
/// member join: printed last, one line.
pub fn invite(home: &Home, a: InviteArgs) -> anyhow::Result<()> {
    let InviteArgs { grant: a, encrypt } = a;
    let id = home.resolve(&a.name)?;
    let replicas = home.replicas(&id)?;
    if replicas.is_empty() {
        bail!(Error::Invalid(format!(
            "'{}' has no replica for the member to join through: add one with `capsulefs replica add {} URL`",
            a.name, a.name
        )));
    }
    grant_only(home, &a)?;
    let creator = home.open_for_reading(&a.name)?.metadata().creator;
    super::replicas::push(home, super::replicas::TransferArgs { name: a.name.clone(), urls: Vec::new() })?;
    let invitation = Invitation { capsule: id, creator, replicas };
    println!("{}", if encrypt { invitation.sealed_token(&a.pubkey)? } else { invitation.token() });
    Ok(())
}

#[derive(Parser, Debug)]
pub struct JoinArgs {
    /// The token `capsulefs invite` printed.
    pub token: String,
    /// Local name (default: the capsule's own name).
    #[arg(long)]
    pub name: Option<String>,
    /// The identity a sealed token was made for (default: whichever opens it).
    #[arg(long)]
    pub key: Option<String>,
}

/// Clones the capsule from the first of the token's replicas that answers, after checking
/// that its metadata names the creator the token does. Prints the capsule id.
pub fn join(home: &Home, a: JoinArgs) -> anyhow::Result<()> {
    let invitation = read_token(home, &a.token, a.key.as_deref())?;
    let name = join_as(home, &invitation, a.name, capsulefs::sync::Take::Whole)?;
    println!("{}", home.resolve(&name)?);
    Ok(())
}

/// The invitation in `token`; a sealed one opened with identity `key`, or any of this home's.
pub fn read_token(home: &Home, token: &str, key: Option<&str>) -> anyhow::Result<Invitation> {
    let identities = match key {
        Some(name) => vec![home.identity(Some(name), false)?],
        None => home.keyring()?.identities().to_vec(),
    };
    Ok(Invitation::from_token(token, &identities)?)
}

/// `join`, taking of each record what `taking` says; returns the local name.
pub fn join_as(
    home: &Home,
    invitation: &Invitation,
    name: Option<String>,
    taking: capsulefs::sync::Take,
) -> anyhow::Result<String> {
    let mut failures = Vec::new();
    for url in &invitation.replicas {
        match super::replicas::clone_checked(home, url, invitation, name.clone(), taking) {
            Ok(name) => {
                home.set_replicas(&invitation.capsule, &invitation.replicas)?;
                return Ok(name);
            }
            Err(e) => failures.push(format!("{url}: {e:#}")),
        }
    }
    bail!(Error::Replica(format!("no replica of the invitation could be joined through: {}", failures.join("; "))))
}

#[derive(Parser, Debug)]
pub struct MembersArgs {
    /// Local name of the capsule.
    pub name: String,
}

/// One line per member: `PUBKEY LEVEL`, then who granted it and in which record.
pub fn list(home: &Home, a: MembersArgs) -> anyhow::Result<()> {
    let capsule = home.open_for_reading(&a.name)?;
    let rights = capsule.rights()?;
    for m in rights.members() {
        let from = match m.record {
            Some(record) => format!("record {record}"),
            None => "the metadata".to_owned(),
        };
        let level =
            if m.level == Level::Superadmin && m.granted_by == m.key { "superadmin (creator)" } else { m.level.name() };
        println!("{} {level} granted by {} in {from}", m.key, m.granted_by);
    }
    for r in &rights.revocations {
        eprintln!("capsulefs: {} was removed by {} in record {}", r.member, r.by, r.record);
    }
    for n in &rights.not_applied {
        eprintln!("capsulefs: not applied: membership record {} by {}: {}", n.record, n.writer, n.why);
    }
    Ok(())
}
