//! `capsulefs cat`, `prove`, `log` and `verify`: the read side, all through proofs.

use std::io::Write;

use anyhow::Context;
use clap::Parser;

use capsulefs::Error;
use capsulefs::capsule::{Capsule, EarlierProofs};
use capsulefs::proof::{Anchor, RecordProof};
use capsulefs::record::{RecordHash, RecordKind, SubIdx};

use super::home::Home;

/// Parses `RECORD` or `RECORD:INDEX` (RECORD: hash, unique prefix of 4+ digits, or `head`).
fn parse_target(capsule: &Capsule, target: &str) -> anyhow::Result<(RecordHash, Option<SubIdx>)> {
    let (rec, idx) = match target.rsplit_once(':') {
        Some((r, i)) => {
            let idx = i.parse::<u32>().map_err(|_| Error::Invalid(format!("'{i}' is not a sub-record index")))?;
            (r, Some(SubIdx(idx)))
        }
        None => (target, None),
    };
    Ok((capsule.resolve(rec)?, idx))
}

#[derive(Parser, Debug)]
pub struct CatArgs {
    /// Capsule name or id.
    pub name: String,
    /// RECORD:INDEX, e.g. 1a2b3c4d:0 or head:2.
    pub target: String,
}

pub fn cat(home: &Home, a: CatArgs) -> anyhow::Result<()> {
    let capsule = home.open_for_reading(&a.name)?;
    let (record, idx) = parse_target(&capsule, &a.target)?;
    let idx = idx.ok_or_else(|| Error::Invalid(format!("'{}' names no sub-record: use RECORD:INDEX", a.target)))?;
    let (data, _) = capsule.read_sub_record(record, idx)?;
    let mut out = std::io::stdout().lock();
    out.write_all(data.get()).and_then(|()| out.flush()).context("writing to stdout")
}

#[derive(Parser, Debug)]
pub struct ProveArgs {
    /// Capsule name or id.
    pub name: String,
    /// RECORD or RECORD:INDEX.
    pub target: String,
    /// Ignore earlier proofs and walk to a signed (or locally attested) record.
    #[arg(long)]
    pub fresh: bool,
}

fn describe_anchor(anchor: &Anchor) -> String {
    match anchor {
        Anchor::Signed { record, writer } => format!("{record} signed by writer {writer}"),
        Anchor::Cached { record } => format!("{record} proven earlier (proof cache)"),
        Anchor::Attested { record, writer } => {
            format!("{record} attested by the local key of writer {writer} (unsigned)")
        }
    }
}

fn print_record_proof(proof: &RecordProof) {
    let chain: Vec<String> = proof.chain.iter().map(|h| h.short()).collect();
    println!("chain:       {} record(s): {}", proof.chain.len(), chain.join(" -> "));
    println!("anchor:      {}", describe_anchor(&proof.anchor));
}

pub fn prove(home: &Home, a: ProveArgs) -> anyhow::Result<()> {
    let capsule = home.open_for_reading(&a.name)?;
    let (record, idx) = parse_target(&capsule, &a.target)?;
    let earlier = if a.fresh { EarlierProofs::Ignore } else { EarlierProofs::Use };
    println!("record:      {record}");
    match idx {
        Some(idx) => {
            let proof = capsule.prove_sub_record(record, idx, earlier)?;
            println!("sub-record:  {} of {}, Merkle path of {} hashes", idx.0, proof.count, proof.path_len);
            print_record_proof(&proof.record);
        }
        None => print_record_proof(&capsule.prove_record(record, earlier)?),
    }
    Ok(())
}

#[derive(Parser, Debug)]
pub struct LogArgs {
    /// Capsule name or id.
    pub name: String,
}

pub fn log(home: &Home, a: LogArgs) -> anyhow::Result<()> {
    let capsule = home.open_for_reading(&a.name)?;
    let genesis = RecordHash::genesis(capsule.id());
    let mut out = std::io::stdout().lock();
    for entry in capsule.log()? {
        let (h, record) = entry?;
        let hd = &record.header;
        let parents: Vec<String> =
            hd.parents.iter().map(|p| if *p == genesis { "genesis".into() } else { p.short() }).collect();
        writeln!(
            out,
            "{h} parents={} writer={} device={} seq={} {} subs={}{}",
            parents.join(","),
            hd.writer.short(),
            hd.device.short(),
            hd.seq.0,
            if record.signature.is_some() { "signed" } else { "unsigned" },
            hd.sub_count,
            match hd.kind {
                RecordKind::Data => "",
                RecordKind::Membership => " membership",
                RecordKind::FsCommit => " fs-commit",
            }
        )?;
    }
    Ok(())
}

#[derive(Parser, Debug)]
pub struct VerifyArgs {
    /// Capsule name or id.
    pub name: String,
}

pub fn verify(home: &Home, a: VerifyArgs) -> anyhow::Result<()> {
    let capsule = home.open_for_reading(&a.name)?;
    let report = capsule.audit().context("verify failed")?;
    for e in capsule.store().evidence()? {
        eprintln!(
            "capsulefs: warning: equivocation evidence: writer {} used seq {} of device {} for {}",
            e.writer,
            e.seq.0,
            hex::encode(e.device.0),
            e.record
        );
    }
    println!(
        "ok: {} records ({} signed), {} sub-records ({} bytes) verified",
        report.records, report.signed, report.sub_records, report.sub_record_bytes
    );
    if report.not_held > 0 {
        println!("{} sub-records not held here (a sparse clone: fetched and proven when read)", report.not_held);
    }
    for (h, record) in capsule.set_aside()? {
        let header = &record.header;
        eprintln!(
            "capsulefs: warning: kept aside, not applied: {h} by {} (seq {} of device {}), made after their removal \
             from the capsule",
            header.writer,
            header.seq.0,
            hex::encode(header.device.0)
        );
    }
    // Evidence is kept only once it checked (signatures, one writer, device and number).
    match capsule.fork_evidence()?.first() {
        None => Ok(()),
        Some(evidence) => {
            let fork = evidence.check(capsule.id())?;
            Err(capsulefs::Error::Verify(capsulefs::VerifyError::Equivocation(Box::new(fork))).into())
        }
    }
}
