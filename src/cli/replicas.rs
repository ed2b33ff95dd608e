//! `capsulefs replica add|list|remove`, `push`, `pull`, `sync` and `clone`: a capsule and its
//! replicas. Replica URLs are remembered per capsule in `capsules/<id>/replicas`, one a line.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use capsulefs::capsule::Capsule;
use capsulefs::member::Invitation;
use capsulefs::record::RecordHash;
use capsulefs::record::{CapsuleId, SignedMetadata, WriterId};
use capsulefs::replica::Replica;
use capsulefs::sync::quorum::{self, Quorum, Round};
use capsulefs::sync::transfer;
use capsulefs::sync::{Report, Take};
use capsulefs::sync::{evidence, walk};
use capsulefs::{Error, Fork, VerifyError};

use super::home::Home;
use super::progress::Bar;

#[derive(Subcommand, Debug)]
pub enum ReplicaCommand {
    /// Remember a replica (http(s)://HOST:PORT of a `capsulefs serve`, or file:///PATH) for a
    /// capsule.
    Add { name: String, url: String },
    /// The replicas remembered for a capsule, one URL a line.
    List { name: String },
    /// Forget a replica.
    Remove { name: String, url: String },
    /// How many of the capsule's replicas may lie (0: trust each). With B > 0 (and at least
    /// 3B + 1 replicas), `push`, `pull` and `sync` without URLs go through a quorum of n - B:
    /// heads are read from every replica, each record is taken from whoever has it, replicas
    /// found behind are sent what they lack, and a push counts once n - B replicas hold it.
    Policy {
        name: String,
        #[arg(long)]
        faulty: usize,
    },
}

#[derive(Parser, Debug)]
pub struct TransferArgs {
    /// Capsule name or id (`sync` also takes a server URL: `sync URL_A[#ID] URL_B[#ID]`).
    pub name: String,
    /// Replica URLs (default: the remembered ones).
    pub urls: Vec<String>,
}

#[derive(Parser, Debug)]
pub struct PullArgs {
    #[command(flatten)]
    pub transfer: TransferArgs,
    /// Keep pulling: wait for new records on the (first) replica and pull them as they arrive,
    /// until interrupted.
    #[arg(long)]
    pub follow: bool,
}

/// How long one wait for new heads lasts before it is asked again.
const FOLLOW_WAIT: Duration = Duration::from_secs(30);
/// How long a follower waits before it tries an unreachable replica again.
const FOLLOW_RETRY: Duration = Duration::from_secs(2);

#[derive(Parser, Debug)]
pub struct CloneArgs {
    /// The replica and the capsule: http(s)://HOST:PORT#CAPSULE_ID or file:///PATH#CAPSULE_ID,
    /// or http(s)://HOST:PORT#NAME for a name registered there (`capsulefs name register`),
    /// resolved through the servers given (with --also) and pinned here once accepted.
    pub source: String,
    /// Local name (default: the capsule's own name).
    #[arg(long)]
    pub name: Option<String>,
    /// Fetch record headers only; each sub-record is fetched from the replica when first read
    /// (and proven against its header then), then kept.
    #[arg(long)]
    pub sparse: bool,
    /// More replicas of the same capsule (URL, repeatable): remembered with the first, and
    /// with --faulty, the clone ends with a pull through their quorum.
    #[arg(long = "also", value_name = "URL")]
    pub also: Vec<String>,
    /// How many of the replicas may lie (see `capsulefs replica policy`).
    #[arg(long, default_value_t = 0)]
    pub faulty: usize,
}

fn check_url(url: &str) -> anyhow::Result<()> {
    // Validates the form without contacting it.
    capsulefs::replica::open(url, CapsuleId::from_bytes([0; 32]), None)?;
    Ok(())
}

pub fn replica(home: &Home, cmd: ReplicaCommand) -> anyhow::Result<()> {
    match cmd {
        ReplicaCommand::Add { name, url } => {
            let id = home.resolve(&name)?;
            check_url(&url)?;
            let mut urls = home.replicas(&id)?;
            if urls.contains(&url) {
                bail!(Error::Exists(format!("replica {url} of '{name}'")));
            }
            urls.push(url);
            home.set_replicas(&id, &urls)
        }
        ReplicaCommand::List { name } => {
            let id = home.resolve(&name)?;
            let urls = home.replicas(&id)?;
            for url in &urls {
                println!("{url}");
            }
            let faulty = home.replica_policy(&id)?;
            if faulty > 0 {
                eprintln!("policy: at most {faulty} faulty, quorum {} of {}", urls.len() - faulty, urls.len());
            }
            Ok(())
        }
        ReplicaCommand::Policy { name, faulty } => {
            let id = home.resolve(&name)?;
            quorum::check_policy(home.replicas(&id)?.len(), faulty)?;
            home.set_replica_policy(&id, faulty)
        }
        ReplicaCommand::Remove { name, url } => {
            let id = home.resolve(&name)?;
            let mut urls = home.replicas(&id)?;
            let before = urls.len();
            urls.retain(|u| *u != url);
            if urls.len() == before {
                bail!(Error::NotFound(format!("replica {url} of '{name}' (see `capsulefs replica list {name}`)")));
            }
            quorum::check_policy(urls.len(), home.replica_policy(&id)?)
                .context("the replica policy would no longer hold")?;
            home.set_replicas(&id, &urls)
        }
    }
}

/// The URLs given, or the remembered ones.
fn urls(home: &Home, name: &str, id: &CapsuleId, given: Vec<String>) -> anyhow::Result<Vec<String>> {
    if !given.is_empty() {
        return Ok(given);
    }
    let remembered = home.replicas(id)?;
    if remembered.is_empty() {
        bail!(Error::NotFound(format!(
            "a replica of '{name}': give a URL, or remember one with `capsulefs replica add {name} URL`"
        )));
    }
    Ok(remembered)
}

fn print(verb: &str, preposition: &str, url: &str, r: &Report) {
    println!(
        "{verb} {} records ({} bytes) {preposition} {url} in {} round trips; finding them took {} bytes sent, {} received",
        r.records, r.bytes, r.round_trips, r.reconcile_sent, r.reconcile_received
    );
    // After a push they are what it just sent; after a pull, what it still lacks.
    for lacking in r.replica_lacks.iter().filter(|_| verb != "pushed") {
        eprintln!(
            "capsulefs: warning: {url} lacks {} signed records of writer {} (device {}, up to seq {}) that this \
             capsule holds: it is behind or was rolled back; `capsulefs push` repairs it",
            lacking.count,
            lacking.writer.short(),
            lacking.device.short(),
            lacking.seq.0
        );
    }
    if !r.revoked.is_empty() {
        eprintln!(
            "capsulefs: warning: {url} offered {} records by writers removed from the capsule, made past their \
             revocation's cut-off: kept out (the log names each)",
            r.revoked.len()
        );
    }
    if let Some(first) = r.unanchored.first() {
        eprintln!(
            "capsulefs: warning: {url} offered {} unsigned records without a record their writers signed after \
             them (the first: {first:?}): kept out, as unverified; pull from another replica",
            r.unanchored.len()
        );
    }
    if r.waiting_for_signature > 0 {
        println!(
            "{} unsigned records wait for a signed one before a replica takes them (a mount signs within the capsule's T seconds)",
            r.waiting_for_signature
        );
    }
}

/// Which way records go.
#[derive(Clone, Copy)]
enum Way {
    Push,
    Pull,
}

/// Moves records between `capsule` and each of `urls`; returns the forks learned on the way.
/// A replica that fails does not stop the others; the first failure is returned at the end,
/// after every replica was given the fork evidence known here (a fork one replica showed
/// reaches them all).
fn transfer_each(home: &Home, capsule: &Capsule, urls: &[String], way: Way) -> anyhow::Result<Found> {
    let (mut found, mut failed) = (Found::default(), None);
    let forks_before = capsule.fork_count()?;
    for url in urls {
        match transfer_one(home, capsule, url, way) {
            Ok(report) => found.add(&report),
            // The first failure is the command's; later ones are told here.
            Err(e) if failed.is_some() => eprintln!("capsulefs: {e:#}"),
            Err(e) => failed = Some(e),
        }
    }
    if capsule.fork_count()? > forks_before {
        for url in urls {
            let replica = home.replica(url, capsule);
            let passed = replica.and_then(|r| Ok(evidence::pass_evidence(capsule, &*r, &mut Report::default())?));
            if let Err(e) = passed {
                eprintln!("capsulefs: passing fork evidence on to {url}: {e:#}");
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

/// What transfers found that a command reports once they all ended: forks (exit 7), and
/// records a replica offered that were kept out as unverified (exit 1).
#[derive(Default)]
struct Found {
    forks: Vec<Fork>,
    unverified: Vec<RecordHash>,
}

impl Found {
    fn add(&mut self, report: &Report) {
        self.forks.extend(report.forks_learned.iter().cloned());
        self.unverified.extend(&report.unanchored);
    }
}

/// `transfer_each` with one replica.
fn transfer_one(home: &Home, capsule: &Capsule, url: &str, way: Way) -> anyhow::Result<Report> {
    let remote = home.replica(url, capsule)?;
    let (report, doing, verb, preposition) = match way {
        Way::Push => {
            (transfer::push(capsule, &*remote, &Bar::new(&format!("pushing to {url}"))), "pushing", "pushed", "to")
        }
        Way::Pull => (
            pull_learning(capsule, &*remote, Take::Whole, &Bar::new(&format!("pulling from {url}"))),
            "pulling",
            "pulled",
            "from",
        ),
    };
    let report = report.with_context(|| format!("{doing} {preposition} {url}"))?;
    print(verb, preposition, url, &report);
    Ok(report)
}

/// A pull, then the replica's fork evidence (one more request: library pulls, as a mount's,
/// leave it out, since a bucket answers it with a listing).
fn pull_learning(capsule: &Capsule, remote: &dyn Replica, taking: Take, bar: &Bar) -> capsulefs::Result<Report> {
    let mut report = transfer::pull_taking(capsule, remote, taking, bar)?;
    evidence::learn_evidence(capsule, remote, &mut report)?;
    Ok(report)
}

/// Exit 7 (after the transfers finished) when replicas showed evidence of forks not known
/// here before: the forked branch is kept aside, never merged. Exit 1 when a replica offered
/// records that were kept out as unverified.
fn alarm_on(found: Found) -> anyhow::Result<()> {
    if let Some(first) = found.forks.first().cloned() {
        found.forks.iter().for_each(warn_fork);
        return Err(Error::Verify(VerifyError::Equivocation(Box::new(first))).into());
    }
    match found.unverified.first() {
        Some(first) => {
            Err(anyhow::Error::new(Error::Verify(VerifyError::Unanchored { record: *first })).context(format!(
                "{} records a replica offered were kept out as unverified; everything verified was taken",
                found.unverified.len()
            )))
        }
        None => Ok(()),
    }
}

fn warn_fork(fork: &Fork) {
    eprintln!("capsulefs: ALARM: a replica holds evidence of a fork: {fork}");
}

/// The remembered replicas as a quorum, when no URL was given and the capsule's policy
/// allows faulty replicas.
fn quorum_of(home: &Home, capsule: &Capsule, given: &[String]) -> anyhow::Result<Option<Quorum>> {
    let faulty = home.replica_policy(&capsule.id())?;
    if !given.is_empty() || faulty == 0 {
        return Ok(None);
    }
    let members =
        home.replicas(&capsule.id())?.iter().map(|url| home.replica(url, capsule)).collect::<Result<_, _>>()?;
    Ok(Some(Quorum::new(members, faulty)?))
}

/// One line per replica of a round through a quorum, then the count.
fn print_round(verb: &str, preposition: &str, round: &Round) {
    for o in &round.outcomes {
        match &o.transfer {
            Ok(report) => print(verb, preposition, &o.replica, report),
            Err(e) if o.forked => eprintln!("capsulefs: ALARM: {} holds the other branch of a fork: {e}", o.replica),
            Err(e) => eprintln!("capsulefs: warning: {} did not answer: {e}", o.replica),
        }
        match &o.written_back {
            Some(Ok(report)) => print("wrote back", "to", &o.replica, report),
            Some(Err(e)) => eprintln!("capsulefs: warning: writing back to {} failed: {e}", o.replica),
            None => {}
        }
    }
    println!("{} of {} replicas answered (quorum {})", round.acknowledged(), round.outcomes.len(), round.quorum);
}

fn quorum_push(capsule: &Capsule, quorum: &Quorum) -> anyhow::Result<()> {
    print_round("pushed", "to", &quorum.push(capsule)?);
    Ok(())
}

/// A pull through the quorum; returns the forks learned and what was kept out.
fn quorum_pull(capsule: &Capsule, quorum: &Quorum) -> anyhow::Result<Found> {
    let round = quorum.pull(capsule, &Bar::new("pulling through the quorum"))?;
    print_round("pulled", "from", &round);
    let mut found = Found { forks: round.forks_learned.clone(), unverified: Vec::new() };
    for report in round.outcomes.iter().filter_map(|o| o.transfer.as_ref().ok()) {
        found.unverified.extend(&report.unanchored);
    }
    Ok(found)
}

pub fn push(home: &Home, a: TransferArgs) -> anyhow::Result<()> {
    // Pushing only reads the local store, so it works beside a mount too.
    let capsule = home.open_for_reading(&a.name)?;
    if let Some(quorum) = quorum_of(home, &capsule, &a.urls)? {
        return quorum_push(&capsule, &quorum);
    }
    let urls = urls(home, &a.name, &capsule.id(), a.urls)?;
    transfer_each(home, &capsule, &urls, Way::Push).map(drop)
}

pub fn pull(home: &Home, a: PullArgs) -> anyhow::Result<()> {
    let capsule = home.open(&a.transfer.name)?;
    if !a.follow
        && let Some(quorum) = quorum_of(home, &capsule, &a.transfer.urls)?
    {
        return alarm_on(quorum_pull(&capsule, &quorum)?);
    }
    let urls = urls(home, &a.transfer.name, &capsule.id(), a.transfer.urls)?;
    if !a.follow {
        return alarm_on(transfer_each(home, &capsule, &urls, Way::Pull)?);
    }
    let remote = home.replica(&urls[0], &capsule)?;
    loop {
        let round = transfer_each(home, &capsule, &urls[..1], Way::Pull)
            .and_then(|found| {
                found.forks.iter().for_each(warn_fork);
                Ok(remote.heads()?)
            })
            .and_then(|seen| Ok(remote.watch_heads(&seen, FOLLOW_WAIT)?));
        if let Err(e) = round {
            eprintln!("capsulefs: {e:#} (trying again in {} s)", FOLLOW_RETRY.as_secs());
            std::thread::sleep(FOLLOW_RETRY);
        }
    }
}

pub fn sync(home: &Home, a: TransferArgs) -> anyhow::Result<()> {
    if a.name.contains("://") {
        return sync_servers(home, &a.name, &a.urls);
    }
    let capsule = home.open(&a.name)?;
    if let Some(quorum) = quorum_of(home, &capsule, &a.urls)? {
        let found = quorum_pull(&capsule, &quorum)?;
        quorum_push(&capsule, &quorum)?;
        return alarm_on(found);
    }
    let urls = urls(home, &a.name, &capsule.id(), a.urls)?;
    let found = transfer_each(home, &capsule, &urls, Way::Pull)?;
    transfer_each(home, &capsule, &urls, Way::Push)?;
    alarm_on(found)
}

/// `URL#CAPSULE_ID` split in two; the id is None without a `#`.
fn split_source(source: &str) -> anyhow::Result<(&str, Option<CapsuleId>)> {
    match source.rsplit_once('#') {
        None => Ok((source, None)),
        Some((url, id)) => {
            let id =
                CapsuleId::from_hex(id).map_err(|e| Error::Invalid(format!("capsule id '{id}' in '{source}': {e}")))?;
            Ok((url, Some(id)))
        }
    }
}

/// `capsulefs sync URL_A URL_B`: one anti-entropy round between two replicas (servers or
/// folders), both ways, through this process (no local capsule is read or changed), for the
/// capsule named by `#ID`, or else for every capsule either holds. A folder takes records
/// only from a writer: this machine's key signs its head statement there.
fn sync_servers(home: &Home, first: &str, rest: &[String]) -> anyhow::Result<()> {
    let [second] = rest else {
        bail!(Error::Invalid("give two server URLs: capsulefs sync URL_A[#ID] URL_B[#ID]".into()));
    };
    let ((a, a_id), (b, b_id)) = (split_source(first)?, split_source(second)?);
    let ids = match (a_id, b_id) {
        (Some(x), Some(y)) if x != y => {
            bail!(Error::Invalid(format!("'{first}' and '{second}' name different capsules")))
        }
        (Some(id), _) | (_, Some(id)) => vec![id],
        (None, None) => {
            let mut ids = capsulefs::replica::capsules_at(a)?;
            ids.extend(capsulefs::replica::capsules_at(b)?);
            ids.sort();
            ids.dedup();
            ids
        }
    };
    for id in ids {
        let (probe_a, probe_b) = (capsulefs::replica::open(a, id, None)?, capsulefs::replica::open(b, id, None)?);
        let Some(metadata) = probe_a.metadata()?.or(probe_b.metadata()?) else {
            bail!(Error::NotFound(format!("capsule {id} on {a} or {b}")));
        };
        let metadata =
            SignedMetadata::decode(&metadata).map_err(|e| Error::Invalid(format!("{id}'s metadata: {e}")))?;
        let pusher = home.pusher_for(|w| metadata.metadata.may_write(w))?;
        let remote_a = capsulefs::replica::open(a, id, pusher.clone())?;
        let remote_b = capsulefs::replica::open(b, id, pusher)?;
        for (from, to) in [(&*remote_a, &*remote_b), (&*remote_b, &*remote_a)] {
            let (from_url, to_url) = (from.describe(), to.describe());
            let bar = Bar::new(&format!("{from_url} to {to_url}"));
            let report = walk::relay(from, to, id, &bar)
                .with_context(|| format!("relaying capsule {id} from {from_url} to {to_url}"))?;
            print("relayed", &format!("of {id} from {from_url} to"), &to_url, &report);
        }
    }
    Ok(())
}

pub fn clone(home: &Home, a: CloneArgs) -> anyhow::Result<()> {
    let taking = if a.sparse { Take::Headers } else { Take::Whole };
    let (url, fragment) = a.source.rsplit_once('#').unwrap_or((&a.source, ""));
    let mut urls = vec![url.to_owned()];
    for also in &a.also {
        check_url(also)?;
        urls.push(also.split_once('#').map_or(also.as_str(), |(u, _)| u).to_owned());
    }
    quorum::check_policy(urls.len(), a.faulty)?;
    let id = match CapsuleId::from_hex(fragment) {
        Ok(id) => id,
        Err(_) if !fragment.is_empty() => super::names::resolve(home, fragment, &urls, a.faulty)?,
        Err(_) => bail!(Error::Invalid(format!(
            "'{}': give the replica and the capsule as URL#CAPSULE_ID or URL#NAME",
            a.source
        ))),
    };
    // A plain clone warns of the forks it learns (`verify` exits 7 for them); a clone through a
    // quorum exits 7 as a quorum pull does.
    let (name, cloned) = clone_named(home, url, id, None, a.name, taking)?;
    let mut found = Found { forks: Vec::new(), unverified: cloned.unverified };
    if urls.len() > 1 || a.faulty > 0 {
        home.set_replicas(&id, &urls)?;
        home.set_replica_policy(&id, a.faulty)?;
        let capsule = home.open(&name)?;
        if let Some(quorum) = quorum_of(home, &capsule, &[])? {
            let through_quorum = quorum_pull(&capsule, &quorum)?;
            found.forks.extend(cloned.forks.into_iter().chain(through_quorum.forks));
            found.unverified.extend(through_quorum.unverified);
        }
    }
    println!("{id}");
    alarm_on(found)
}

/// Makes a local replica of capsule `id` from `url`, under `name` (default: the capsule's
/// own), taking of each record what `taking` says; remembers `url` as its replica.
fn clone_from(home: &Home, url: &str, id: CapsuleId, name: Option<String>, taking: Take) -> anyhow::Result<()> {
    clone_named(home, url, id, None, name, taking).map(drop)
}

/// `clone_from` for an invitation: the metadata must name the creator the token names.
/// Returns the local name.
pub fn clone_checked(
    home: &Home,
    url: &str,
    invitation: &Invitation,
    name: Option<String>,
    taking: Take,
) -> anyhow::Result<String> {
    Ok(clone_named(home, url, invitation.capsule, Some(&invitation.creator), name, taking)?.0)
}

fn clone_named(
    home: &Home,
    url: &str,
    id: CapsuleId,
    creator: Option<&WriterId>,
    name: Option<String>,
    taking: Take,
) -> anyhow::Result<(String, Found)> {
    let remote = capsulefs::replica::open(url, id, None)?;
    let metadata = remote.metadata()?.ok_or_else(|| Error::NotFound(format!("capsule {id:?} on {url}")))?;
    let signed = SignedMetadata::decode(&metadata).map_err(|e| Error::Invalid(e.to_string()))?;
    if let Some(creator) = creator
        && signed.metadata.creator != *creator
    {
        bail!(Error::Invalid(format!(
            "{url} serves capsule {id:?} made by {:?}, not by {creator:?} as the invitation says: \
             ask the person who invited you for a new token",
            signed.metadata.creator
        )));
    }
    let name = name.unwrap_or(signed.metadata.name);
    if home.name_taken(&name) {
        bail!(Error::Exists(format!("capsule '{name}' here: choose another with --name")));
    }
    let (staging, kv) = home.staging_store()?;
    let capsule = Capsule::adopt(kv, id, &metadata, home.keyring()?.identities().to_vec())
        .with_context(|| format!("the metadata {url} sent"))?;
    let report = pull_learning(&capsule, &*remote, taking, &Bar::new(&format!("cloning from {url}")))
        .with_context(|| format!("pulling from {url}"))?;
    drop(capsule);
    home.register(&name, &id, staging)?;
    home.set_replicas(&id, &[url.to_owned()])?;
    print("pulled", "from", url, &report);
    report.forks_learned.iter().for_each(warn_fork);
    let mut found = Found::default();
    found.add(&report);
    Ok((name, found))
}

/// For `capsulefs mount URL#CAPSULE_ID DIR`: the local replica of that capsule, brought up to
/// the replica's heads, headers only (sub-records come when read); a sparse clone named by
/// the capsule id if there is none yet. Returns the name to mount.
pub fn local_for_mount(home: &Home, source: &str) -> anyhow::Result<String> {
    let (url, Some(id)) = split_source(source)? else {
        bail!(Error::Invalid(format!("'{source}': mount a replica as URL#CAPSULE_ID")));
    };
    if home.resolve(&id.to_hex()).is_err() {
        clone_from(home, url, id, Some(id.to_hex()), Take::Headers)?;
        return Ok(id.to_hex());
    }
    let capsule = home.open(&id.to_hex())?;
    let remote = home.replica(url, &capsule)?;
    let taking = if capsule.is_sparse()? { Take::Headers } else { Take::Whole };
    let report = transfer::pull_taking(&capsule, &*remote, taking, &Bar::new(&format!("pulling from {url}")))
        .with_context(|| format!("pulling from {url}"))?;
    print("pulled", "from", url, &report);
    Ok(id.to_hex())
}
