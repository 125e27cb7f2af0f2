//! `verify`: is this log intact, and does the domain accept all of it?
//!
//! Three layers, each reported: (1) storage — redb's full page-checksum check,
//! run on a scratch copy because it rewrites allocator state (the original is
//! never opened for writing); (2) the log — every record decodes, seqs are
//! gapless, stream versions are gapless, every chain link recomputes, the head
//! matches (`eventlog::verify`); (3) the domain — every event is folded through
//! `Ledger::apply` from an empty ledger, the final indexes are consistent, and
//! every snapshot's state equals the fold at its seq.
//!
//! redb may panic on a plain open of a damaged file. When the checked open of
//! the copy fails, the original is opened plainly inside `catch_unwind` to
//! find which record is damaged; a panic there is reported, never raised.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use domain::Ledger;
use eventlog::fold::{decode_event, ledger_from_snapshot};
use eventlog::json::hex;
use eventlog::record::{chain_hash, stored_body};
use eventlog::{GENESIS_HASH, LogReader, RedbOptions, RedbStore, SnapshotStore};
use serde::Serialize;

use crate::progress::Progress;
use crate::source::{self, Source, without_panic};
use crate::{Input, Outcome};

/// One broken invariant.
#[derive(Serialize, Clone, Debug)]
pub struct Problem {
    /// The record concerned (0 when none can be named).
    pub seq: u64,
    /// storage, decode, seq_gap, stream_version, chain_link, head, index, domain, snapshot.
    pub kind: String,
    pub message: String,
}

#[derive(Serialize, Default)]
struct Report {
    log: String,
    clean: bool,
    /// redb's integrity check of a scratch copy: "passed", "failed: …", or "not applicable".
    storage: String,
    records_checked: u64,
    head_seq: u64,
    head_hash: String,
    events_applied: u64,
    live_tasks: usize,
    snapshots_checked: Vec<u64>,
    problems: Vec<Problem>,
}

fn problem(seq: u64, kind: &str, message: impl Into<String>) -> Problem {
    Problem { seq, kind: kind.to_owned(), message: message.into() }
}

pub fn run(input: &Input, as_json: bool, scratch: Option<&Path>) -> Result<Outcome> {
    let started = Instant::now();
    let mut report = Report::default();
    if input.server.is_some() {
        let source = input.open()?;
        report.log = source.origin();
        report.storage = "not applicable (server feed)".into();
        check_feed(&source, &mut report)?;
        check_domain(&source, None, &mut report)?;
    } else {
        let (path, snapshot_dir) = source::log_paths(input.data.as_deref(), input.log.as_deref())?;
        if !path.is_file() {
            anyhow::bail!("open log {}: no such file", path.display());
        }
        report.log = path.display().to_string();
        let scratch_dir = match scratch {
            Some(dir) => tempfile::tempdir_in(dir),
            None => tempfile::tempdir(),
        }
        .context("create a scratch directory for the integrity check")?;
        let copy = scratch_dir.path().join(eventlog::redb_store::LOG_FILE_NAME);
        std::fs::copy(&path, &copy).with_context(|| format!("copy {} to {}", path.display(), copy.display()))?;
        let options = RedbOptions { check_integrity_on_open: true, cache_bytes: 64 << 20, ..RedbOptions::default() };
        let checked = without_panic("check the copy", || {
            RedbStore::open(scratch_dir.path(), options).map_err(|e| anyhow::anyhow!("{e}"))
        });
        // Keep the store alive while its reader is used.
        let (_store, reader) = match checked {
            Ok(store) => {
                report.storage = "passed".into();
                let reader = store.reader();
                (Some(store), reader)
            }
            Err(error) => {
                report.storage = format!("failed: {error:#}");
                report.problems.push(problem(0, "storage", format!("redb integrity check failed: {error:#}")));
                // Find the damaged record with a plain read-only open of the original.
                match without_panic("open the log read-only", || {
                    LogReader::open_read_only(&path).map_err(|e| anyhow::anyhow!("{e}"))
                }) {
                    Ok(reader) => (None, reader),
                    Err(error) => {
                        report.problems.push(problem(open_error_seq(&error), "storage", format!("{error:#}")));
                        return finish(report, as_json, started);
                    }
                }
            }
        };
        let snapshots = SnapshotStore::new(&snapshot_dir, usize::MAX);
        let log_problem = without_panic("verify the log", || {
            let progress = Progress::new(reader.head().map(|h| h.seq).unwrap_or(0), "verifying");
            Ok(eventlog::verify(&reader, |done, _| progress.set(done))?)
        });
        match log_problem {
            Ok(log) => {
                report.records_checked = log.records;
                report.head_seq = log.head.seq;
                report.head_hash = hex(&log.head.hash);
                if let Some(p) = log.first_problem {
                    report.problems.push(problem(p.seq, kind_name(p.kind), p.message));
                }
            }
            Err(error) => report.problems.push(problem(0, "storage", format!("{error:#}"))),
        }
        let source = Source::File { path: path.clone(), reader, snapshots: snapshots.clone() };
        check_domain(&source, Some(&snapshots), &mut report)?;
    }
    finish(report, as_json, started)
}

fn open_error_seq(error: &anyhow::Error) -> u64 {
    error.downcast_ref::<eventlog::OpenError>().map_or(0, |e| match e {
        eventlog::OpenError::Record(r) => r.seq(),
        eventlog::OpenError::HeadMismatch { seq, .. } => *seq,
        _ => 0,
    })
}

fn kind_name(kind: eventlog::ProblemKind) -> &'static str {
    match kind {
        eventlog::ProblemKind::Decode => "decode",
        eventlog::ProblemKind::SeqGap => "seq_gap",
        eventlog::ProblemKind::StreamVersion => "stream_version",
        eventlog::ProblemKind::ChainLink => "chain_link",
        eventlog::ProblemKind::Head => "head",
        eventlog::ProblemKind::Index => "index",
    }
}

/// The log-level checks for a feed held in memory: seqs, stream versions, chain.
fn check_feed(source: &Source, report: &mut Report) -> Result<()> {
    let Source::Feed { records, .. } = source else { return Ok(()) };
    let mut prev = GENESIS_HASH;
    let mut versions: HashMap<&[u8], u64> = HashMap::new();
    for (expected, record) in (1u64..).zip(records) {
        if record.seq != expected {
            report.problems.push(problem(
                expected,
                "seq_gap",
                format!("expected record {expected}, found {}", record.seq),
            ));
            return Ok(());
        }
        let version = versions.entry(&record.stream).or_insert(0);
        if record.stream_version != *version + 1 {
            report.problems.push(problem(
                record.seq,
                "stream_version",
                format!("stream version {} follows {version}", record.stream_version),
            ));
            return Ok(());
        }
        *version += 1;
        if chain_hash(&prev, record.seq, &stored_body(record)) != record.hash {
            report.problems.push(problem(
                record.seq,
                "chain_link",
                "the chain hash does not recompute (from a feed, a payload whose JSON text was not compact \
                 with sorted keys also shows up here)",
            ));
            return Ok(());
        }
        prev = record.hash;
        report.records_checked += 1;
    }
    let head = source.head()?;
    report.head_seq = head.seq;
    report.head_hash = hex(&head.hash);
    Ok(())
}

/// Folds every readable record through the domain, up to the first log problem.
fn check_domain(source: &Source, snapshots: Option<&SnapshotStore>, report: &mut Report) -> Result<()> {
    let upto = report.problems.iter().filter(|p| p.seq > 0).map(|p| p.seq - 1).min().unwrap_or(report.records_checked);
    let upto = upto.min(report.records_checked);
    let mut snapshot_at: HashMap<u64, std::path::PathBuf> = HashMap::new();
    if let Some(store) = snapshots {
        for entry in store.list().unwrap_or_default() {
            if entry.seq <= upto {
                snapshot_at.insert(entry.seq, entry.path);
            }
        }
    }
    let mut ledger = Ledger::new();
    let progress = Progress::new(upto, "folding");
    let mut applied = 0u64;
    let mut failed = None;
    let scanned = without_panic("fold the log", || {
        source.scan(1, upto, &progress, |record| {
            let event = match decode_event(record) {
                Ok(event) => event,
                Err(e) => {
                    failed = Some(problem(record.seq, "domain", e.to_string()));
                    return Ok(ControlFlow::Break(()));
                }
            };
            if let Err(e) = ledger.apply(&event) {
                failed = Some(problem(record.seq, "domain", format!("Ledger::apply refused it: {e}")));
                return Ok(ControlFlow::Break(()));
            }
            applied += 1;
            if let Some(path) = snapshot_at.get(&record.seq) {
                report.snapshots_checked.push(record.seq);
                match eventlog::snapshot::load_snapshot(path) {
                    Err(e) => eprintln!("note: snapshot {} skipped: {e}", path.display()),
                    Ok(snapshot) if snapshot.info.chain_hash != record.hash => failed_snapshot(
                        report,
                        record.seq,
                        "its chain hash is not this log's hash at that seq (a snapshot of another log)",
                    ),
                    Ok(snapshot) => match ledger_from_snapshot(record.seq, &snapshot.body) {
                        Err(e) => failed_snapshot(report, record.seq, &e.to_string()),
                        Ok(saved) if saved.digest() != ledger.digest() => failed_snapshot(
                            report,
                            record.seq,
                            "the state it saved differs from the fold of the log up to it",
                        ),
                        Ok(_) => {}
                    },
                }
            }
            Ok(ControlFlow::Continue(()))
        })
    });
    drop(progress);
    if let Err(error) = scanned {
        failed.get_or_insert(problem(applied + 1, "storage", format!("{error:#}")));
    }
    report.events_applied = applied;
    report.live_tasks = ledger.live_task_count();
    match failed {
        Some(p) => report.problems.push(p),
        None => {
            if let Err(e) = ledger.check_indexes() {
                report.problems.push(problem(
                    upto,
                    "domain",
                    format!("ledger indexes inconsistent after the fold: {e}"),
                ));
            }
        }
    }
    Ok(())
}

fn failed_snapshot(report: &mut Report, seq: u64, why: &str) {
    report.problems.push(problem(seq, "snapshot", format!("snapshot at seq {seq}: {why}")));
}

fn finish(mut report: Report, as_json: bool, started: Instant) -> Result<Outcome> {
    report.problems.sort_by_key(|p| (p.seq == 0, p.seq));
    report.clean = report.problems.is_empty();
    let seconds = started.elapsed().as_secs_f64();
    if as_json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("verify {}", report.log);
        println!("  storage   redb integrity check: {}", report.storage);
        println!(
            "  log       {} records checked (head seq {}, hash {})",
            report.records_checked,
            report.head_seq,
            if report.head_hash.is_empty() { "-" } else { &report.head_hash }
        );
        println!("  domain    {} events applied, {} live tasks at the end", report.events_applied, report.live_tasks);
        if !report.snapshots_checked.is_empty() {
            let seqs: Vec<String> = report.snapshots_checked.iter().map(u64::to_string).collect();
            println!("  snapshots compared with the fold at seq {}", seqs.join(", "));
        }
        for p in &report.problems {
            if p.seq > 0 {
                println!("  PROBLEM   seq {} ({}): {}", p.seq, p.kind, p.message);
            } else {
                println!("  PROBLEM   ({}): {}", p.kind, p.message);
            }
        }
        match report.problems.iter().find(|p| p.seq > 0) {
            None if report.clean => println!("result: clean"),
            None => println!("result: NOT clean ({} problems)", report.problems.len()),
            Some(first) => {
                println!("result: NOT clean ({} problems, first at seq {})", report.problems.len(), first.seq)
            }
        }
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!(
                "verified {} records in {seconds:.2} s ({:.0} records/s)",
                report.records_checked,
                report.records_checked as f64 / seconds.max(1e-9)
            );
        }
    }
    Ok(if report.clean { Outcome::Clean } else { Outcome::Problems })
}
