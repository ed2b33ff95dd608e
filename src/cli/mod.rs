//! Command-line edge: the one clap definition (help, man pages and completions all come from
//! it), dispatch to one module per command, and the error-to-exit-code table.

// Benchmarks stay out of the shipped binary: `make bench*` builds with `--features bench`.
#[cfg(feature = "bench")]
mod bench;
mod capsules;
mod docs;
mod home;
mod keys;
mod members;
mod mount;
mod mount_helper;
mod names;
mod progress;
mod read;
mod readahead;
mod replicas;
mod requests;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use capsulefs::{Error, StoreError};

pub const EXIT_CODES: &str = "\
EXIT CODES:
  0  success
  1  verification failed: data was refused (tampered, missing, unauthorized or unproven)
  2  usage error (bad arguments)
  3  not found: no such capsule, record, sub-record or key
  4  store error: the local store is corrupted, locked by another process, or unreadable
  5  invalid input or conflict (for example a name that already exists)
  6  a replica could not be reached, or refused what was sent; or fewer than a quorum answered
  7  a fork: a writer signed two records with one device and sequence number";

#[derive(Parser, Debug)]
#[command(name = "capsulefs", version, about = "A secure filesystem for untrusted storage, built on DataCapsules")]
#[command(long_about = "capsulefs keeps data in capsules: DAGs of hash-linked, signed records whose \
sub-records are each provable alone. Every byte read back is verified before it is returned.")]
#[command(after_help = EXIT_CODES)]
pub struct Args {
    /// Where keys and capsules live.
    #[arg(long, global = true, env = "CAPSULEFS_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// More log output on stderr (-v info, -vv debug); CAPSULEFS_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage writer identities (ed25519 keys).
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// Create a capsule (signed metadata, and a keystore holding its content key wrapped for the creator) and print its id.
    Create(capsules::CreateArgs),
    /// List local capsules: name and id.
    List,
    /// Append one record whose sub-records are the given files' bytes; prints its hash last.
    Append(capsules::AppendArgs),
    /// Write one sub-record (RECORD:INDEX) to stdout, only after verifying it.
    Cat(read::CatArgs),
    /// Print the proof of a record or sub-record.
    Prove(read::ProveArgs),
    /// One line per record, newest first.
    Log(read::LogArgs),
    /// Verify every record and sub-record; exit 1 naming the first bad record.
    Verify(read::VerifyArgs),
    /// Give a member access (read today): a signed grant with the content key wrapped for them.
    Grant(members::GrantArgs),
    /// Grant, push the grant to the capsule's replicas, and print a token (last line) that
    /// `capsulefs join TOKEN` or `capsulefs mount TOKEN DIR` takes.
    Invite(members::InviteArgs),
    /// Make a local replica of the capsule an invitation token names, from its replicas.
    Join(members::JoinArgs),
    /// The capsule's members: one line each, `PUBKEY LEVEL`, then who granted it and where.
    Members(members::MembersArgs),
    /// Remove a member: a signed revocation that cuts off their later records, with a new
    /// generation of the content key for everyone else.
    Revoke(members::RevokeArgs),
    /// Mount a capsule as a folder (returns once mounted; --foreground stays attached).
    Mount(mount::MountArgs),
    /// Unmount a folder mounted by `capsulefs mount`, after its final commit.
    Umount(mount::UmountArgs),
    /// Mounted capsules: folder, daemon, head record, pending bytes, commits, cache hit rate.
    Status(mount::StatusArgs),
    /// Host capsule replicas for others to push to and pull from (holds no content keys).
    Serve(serve::ServeArgs),
    /// The replicas remembered for a capsule: add, list, remove, policy.
    #[command(subcommand)]
    Replica(replicas::ReplicaCommand),
    /// Human-readable capsule names, bound on first use by the replicas (`clone URL#NAME`).
    #[command(subcommand)]
    Name(names::NameCommand),
    /// Send a capsule's records to its replicas (or the URLs given).
    Push(replicas::TransferArgs),
    /// Fetch and verify the records of a capsule's replicas (or the URLs given).
    Pull(replicas::PullArgs),
    /// Pull, then push: both sides end up with every record either had. `capsulefs sync
    /// URL_A URL_B` does one such round between two servers.
    Sync(replicas::TransferArgs),
    /// Make a local replica of a remote capsule (URL#CAPSULE_ID), every record verified.
    Clone(replicas::CloneArgs),
    /// Benchmarks.
    #[command(subcommand)]
    #[cfg(feature = "bench")]
    Bench(bench::BenchCommand),
    /// Print shell completions.
    Completions(docs::CompletionsArgs),
    /// Write man pages for every command into a folder (used by `make man`).
    #[command(hide = true)]
    GenerateMan(docs::ManArgs),
}

/// The parsed command line: `capsulefs ...`, or mount(8)'s helper call when run as
/// `mount.fuse.capsulefs` (None: a fake mount, nothing to do).
pub fn parse() -> anyhow::Result<Option<Args>> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.first().is_some_and(mount_helper::invoked_as_helper) {
        let rest: Vec<String> = argv[1..].iter().map(|a| a.to_string_lossy().into_owned()).collect();
        return mount_helper::translate(&rest);
    }
    Ok(Some(Args::parse()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let home = home::Home::new(args.home)?;
    match args.command {
        Command::Key(cmd) => keys::run(&home, cmd),
        Command::Create(a) => capsules::create(&home, a),
        Command::Grant(a) => members::grant(&home, a),
        Command::Members(a) => members::list(&home, a),
        Command::Revoke(a) => members::revoke(&home, a),
        Command::Invite(a) => members::invite(&home, a),
        Command::Join(a) => members::join(&home, a),
        Command::List => capsules::list(&home),
        Command::Append(a) => capsules::append(&home, a),
        Command::Cat(a) => read::cat(&home, a),
        Command::Prove(a) => read::prove(&home, a),
        Command::Log(a) => read::log(&home, a),
        Command::Verify(a) => read::verify(&home, a),
        Command::Mount(a) => mount::mount(&home, a),
        Command::Umount(a) => mount::umount(&home, a),
        Command::Status(a) => mount::status(&home, a),
        Command::Serve(a) => serve::serve(&home, a),
        Command::Replica(cmd) => replicas::replica(&home, cmd),
        Command::Name(cmd) => names::name(&home, cmd),
        Command::Push(a) => replicas::push(&home, a),
        Command::Pull(a) => replicas::pull(&home, a),
        Command::Sync(a) => replicas::sync(&home, a),
        Command::Clone(a) => replicas::clone(&home, a),
        #[cfg(feature = "bench")]
        Command::Bench(cmd) => bench::run(cmd),
        Command::Completions(a) => docs::completions(a),
        Command::GenerateMan(a) => docs::man(a),
    }
}

/// The exit code for an error, from the first capsulefs error in its chain (see EXIT_CODES).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    match e.chain().find_map(|c| c.downcast_ref::<Error>()) {
        Some(Error::Verify(capsulefs::VerifyError::Equivocation(_))) => 7,
        Some(Error::Verify(capsulefs::VerifyError::Refused { reason, .. })) if reason == "equivocation" => 7,
        Some(Error::Verify(_)) => 1,
        Some(Error::NotFound(_)) => 3,
        Some(Error::Store(_) | Error::Io { .. }) => 4,
        Some(Error::Replica(_) | Error::Forbidden(_) | Error::OverQuota(_)) => 6,
        Some(Error::Exists(_) | Error::Invalid(_) | Error::NameTooLong(_)) => 5,
        Some(
            Error::NotEmpty(_)
            | Error::NotADirectory(_)
            | Error::IsADirectory(_)
            | Error::ReadOnlyView
            | Error::NoAttribute(_)
            | Error::NotPermitted(_)
            | Error::NoKey(_)
            | Error::Unsupported(_),
        ) => 5,
        None if e.chain().any(|c| c.downcast_ref::<StoreError>().is_some()) => 4,
        None => 5,
    }
}

/// Whether the command failed only because stdout was closed early.
pub fn reader_went_away(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    // A session ends when `capsulefs umount` has unmounted it, and fuser then unmounts again
    // as it drops the session, failing with EINVAL and warning at every clean unmount; its
    // session module warns of nothing else, and its errors still show. A filter that names
    // fuser itself is taken as it is.
    let asked = std::env::var("CAPSULEFS_LOG").unwrap_or_else(|_| default.to_owned());
    let directives = if asked.contains("fuser") { asked } else { format!("{asked},fuser::session=error") };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},fuser::session=error")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
