//! `verify`: is this log intact, and does the domain accept all of it?
//!
//! Three layers, each reported with its time: (1) storage — redb's full
//! page-checksum check; it rewrites allocator state, so it runs through an
//! in-memory overlay of the file (`eventlog::OverlayBackend`) and the file is
//! never written; (2) the log — every
//! record decodes, seqs are gapless, stream versions are gapless, every chain
//! link recomputes, the head matches (`eventlog::verify`); (3) the domain —
//! every event is folded through `Ledger::apply` from an empty ledger, the
//! final indexes are consistent, and every snapshot's state equals the fold
//! at its seq.
//!
//! The log is read once. One pass (`eventlog::verify::verify_with`) checks
//! each record and decodes its event on the calling thread, and hands the
//! events in batches through a bounded channel to a fold thread, so decoding
//! and hashing overlap with `apply` on the other core; the channel's bound
//! keeps at most a few batches of decoded events in memory. The storage layer
//! needs neither, so it runs on a third thread at
//! the same time, unless `--skip-storage-check` says not to run it at all.
//!
//! A snapshot is compared without decoding it: the fold's canonical state
//! encoding (`Ledger::write_state`, the bytes a snapshot body holds after its
//! digest) is streamed against the file's bytes, while a helper thread reads
//! the file and computes its body checksum and the digest of the saved state.
//! Equal bytes mean an equal state; no second ledger is built.
//!
//! redb may panic on a plain open of a damaged file. Every storage call is made
//! inside `catch_unwind`; a panic there is reported, never raised.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use domain::{Event, Ledger};
use eventlog::fold::{decode_payload, scan_snapshot_body};
use eventlog::json::hex;
use eventlog::record::{chain_hash, stored_body};
use eventlog::snapshot::open_snapshot;
use eventlog::{GENESIS_HASH, Hash, RedbStore, SnapshotError, SnapshotStore};
use serde::Serialize;

use crate::progress::Progress;
use crate::source::{self, Source, without_panic};
use crate::{Input, Outcome};

/// Events per batch handed from the reading thread to the fold thread.
const FOLD_BATCH_EVENTS: usize = 4096;
/// Batches in flight between the two threads: enough to ride out a slow
/// stretch on either side, few enough to keep memory flat.
const FOLD_BATCHES_IN_FLIGHT: usize = 8;
/// redb's page cache for the storage check, which reads every page once.
const STORAGE_CHECK_CACHE_BYTES: usize = 64 << 20;
/// Bytes per read while comparing a snapshot file.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// One broken invariant.
#[derive(Serialize, Clone, Debug)]
pub struct Problem {
    /// The record concerned (0 when none can be named).
    pub seq: u64,
    /// storage, decode, seq_gap, stream_version, chain_link, head, index, domain, snapshot.
    pub kind: String,
    pub message: String,
}

/// Wall time of each layer, in seconds. The log and domain layers overlap
/// (one thread each), and so does the storage layer unless it was skipped.
#[derive(Serialize, Default)]
struct Timings {
    total_s: f64,
    /// Records checked per second of total wall time.
    records_per_s: f64,
    /// redb integrity check (null when skipped or not applicable).
    storage_s: Option<f64>,
    /// The reading pass: decode, chain, stream versions, head, event decoding.
    log_s: f64,
    /// Time the fold thread spent applying events (not waiting for them).
    domain_apply_s: f64,
    /// Time spent comparing snapshots with the fold.
    snapshots_s: f64,
    /// The final index check.
    index_check_s: f64,
}

#[derive(Serialize, Default)]
struct Report {
    log: String,
    clean: bool,
    /// redb's integrity check of the file: "passed", "failed: …", "skipped (…)" or "not applicable".
    storage: String,
    records_checked: u64,
    /// Records after the first problem of the log layer, which stops there (0 when it read to
    /// the head).
    records_unchecked: u64,
    /// The log's head as it records it (not the last record checked: a damaged record near the
    /// start reported "head seq 28" for a log of 95, found by a black-box check).
    head_seq: u64,
    head_hash: String,
    events_applied: u64,
    live_tasks: usize,
    snapshots_checked: Vec<u64>,
    /// Intact snapshots in another format version (written by another build): skipped by
    /// every loader, as here; not a problem.
    snapshots_skipped: Vec<SkippedSnapshot>,
    problems: Vec<Problem>,
    /// Journal losses accepted with `--accept-journal-loss` to open the log (not problems: the
    /// operator said so; without the flag each is a `journal` problem).
    journal_losses_accepted: Vec<String>,
    timings: Timings,
}

#[derive(Serialize, Clone, Debug)]
struct SkippedSnapshot {
    seq: u64,
    reason: String,
}

fn problem(seq: u64, kind: &str, message: impl Into<String>) -> Problem {
    Problem { seq, kind: kind.to_owned(), message: message.into() }
}

/// One record's event on its way to the fold thread.
struct Item {
    seq: u64,
    hash: Hash,
    event: Result<Event, String>,
}

/// Collects decoded events into batches and sends them to the fold thread;
/// stops sending (and decoding) once the fold has stopped listening. The fold
/// hands each applied batch back, events and all, so freeing the events and
/// reallocating the batch happen here, on the less loaded thread.
struct Feeder {
    tx: Option<SyncSender<Vec<Item>>>,
    returned: Receiver<Vec<Item>>,
    batch: Vec<Item>,
}

/// The fold thread's ends of its channels: batches in, applied batches back.
type FoldEnds = (Receiver<Vec<Item>>, SyncSender<Vec<Item>>);

/// Both ends of the two channels between the reading and the fold threads.
fn channels() -> (Feeder, FoldEnds) {
    let (tx, rx) = sync_channel(FOLD_BATCHES_IN_FLIGHT);
    let (back_tx, back_rx) = sync_channel(FOLD_BATCHES_IN_FLIGHT + 2);
    let feeder = Feeder { tx: Some(tx), returned: back_rx, batch: Vec::with_capacity(FOLD_BATCH_EVENTS) };
    (feeder, (rx, back_tx))
}

impl Feeder {
    fn wants_more(&self) -> bool {
        self.tx.is_some()
    }

    fn push(&mut self, item: Item) {
        self.batch.push(item);
        if self.batch.len() >= FOLD_BATCH_EVENTS {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let next = match self.returned.try_recv() {
            Ok(mut used) => {
                used.clear();
                used
            }
            Err(_) => Vec::with_capacity(FOLD_BATCH_EVENTS),
        };
        let batch = std::mem::replace(&mut self.batch, next);
        if let Some(tx) = &self.tx
            && tx.send(batch).is_err()
        {
            // The fold stopped at a problem; the log checks go on without it.
            self.tx = None;
        }
    }

    /// Sends what is left and closes the channel.
    fn finish(mut self) {
        self.flush();
    }
}

/// What the fold thread found.
#[derive(Default)]
struct FoldOutcome {
    applied: u64,
    live_tasks: usize,
    problems: Vec<Problem>,
    snapshots_checked: Vec<u64>,
    snapshots_skipped: Vec<SkippedSnapshot>,
    apply_time: Duration,
    snapshot_time: Duration,
    index_time: Duration,
}

pub fn run(input: &Input, as_json: bool, skip_storage: bool) -> Result<Outcome> {
    let started = Instant::now();
    let mut report = Report::default();
    if input.server.is_some() {
        let source = input.open()?;
        report.log = source.origin();
        report.storage = "not applicable (server feed)".into();
        let log_started = Instant::now();
        let checked = check_feed(&source, &mut report)?;
        report.timings.log_s = log_started.elapsed().as_secs_f64();
        let Source::Feed { records, .. } = &source else { unreachable!("a server input is a feed") };
        let (mut feeder, (rx, back)) = channels();
        let fold = std::thread::scope(|scope| {
            let fold = scope.spawn(|| fold_thread(rx, back, HashMap::new()));
            for record in &records[..usize::try_from(checked).unwrap_or(usize::MAX).min(records.len())] {
                if !feeder.wants_more() {
                    break;
                }
                let event = decode_payload(record.seq, record.event_type, record.schema_version, &record.payload)
                    .map_err(|e| e.to_string());
                feeder.push(Item { seq: record.seq, hash: record.hash, event });
            }
            feeder.finish();
            fold.join()
        });
        take_fold(fold, &mut report);
        return finish(report, as_json, started);
    }

    let (path, snapshot_dir) = source::log_paths(input.file.data.as_deref(), input.file.log.as_deref())?;
    let loss = input.file.journal_loss();
    if !path.is_file() {
        anyhow::bail!("open log {}: no such file", path.display());
    }
    // A log a running server holds cannot be checked: that is "could not run" (exit 3), not
    // two problems found in it (exit 1), as it was (found by a black-box check).
    // (Any other outcome of this open, a panic of a damaged file included, is left to the checks.)
    let locked = crate::source::without_panic("open log", || {
        Ok(matches!(
            eventlog::LogReader::open_read_only(&path),
            Err(eventlog::OpenError::Database { source: redb::DatabaseError::DatabaseAlreadyOpen, .. })
        ))
    });
    if locked.unwrap_or(false) {
        anyhow::bail!(
            "open log {}: it is open by a running server; verify a backup of it (taskledger backup), or stop the server",
            path.display()
        );
    }
    report.log = path.display().to_string();
    let snapshots = SnapshotStore::new(&snapshot_dir, usize::MAX);
    let snapshot_at: HashMap<u64, PathBuf> =
        snapshots.list().unwrap_or_default().into_iter().map(|entry| (entry.seq, entry.path)).collect();

    std::thread::scope(|scope| -> Result<()> {
        let storage = (!skip_storage).then(|| {
            let path = path.clone();
            std::thread::Builder::new().name("verify-storage".into()).spawn_scoped(scope, move || {
                let started = Instant::now();
                (check_storage(&path), started.elapsed())
            })
        });
        let storage = storage.transpose().context("start the storage check thread")?;

        let log_started = Instant::now();
        // A log left unclean by a crash is read repaired in memory.
        let opened = Source::open_file(&path, &snapshot_dir, loss);
        match &opened {
            Err(error) => {
                report.problems.push(problem(open_error_seq(error), open_error_kind(error), format!("{error:#}")))
            }
            Ok(Source::Feed { .. }) => unreachable!("a file source"),
            Ok(Source::File { reader, journal_losses, .. }) => {
                report.journal_losses_accepted = journal_losses.clone();
                let expected = reader.head().map(|h| h.seq).unwrap_or(0);
                let (mut feeder, (rx, back)) = channels();
                let fold = std::thread::Builder::new()
                    .name("verify-fold".into())
                    .spawn_scoped(scope, || fold_thread(rx, back, snapshot_at))
                    .context("start the fold thread")?;
                let progress = Progress::new(expected, "verifying");
                // The last record read, for a log that cannot be read to its end.
                let mut last_read = 0u64;
                let log = without_panic("verify the log", || {
                    Ok(eventlog::verify::verify_with(
                        reader,
                        |done, _| progress.set(done),
                        |record| {
                            last_read = record.seq;
                            if feeder.wants_more() {
                                let event = decode_payload(
                                    record.seq,
                                    record.event_type,
                                    record.schema_version,
                                    record.payload,
                                )
                                .map_err(|e| e.to_string())
                                .and_then(|event| filed_under_its_stream(record.stream, event));
                                feeder.push(Item { seq: record.seq, hash: *record.hash, event });
                            }
                        },
                    )?)
                });
                feeder.finish();
                drop(progress);
                let stored_head = reader.head().ok();
                match log {
                    Ok(log) => {
                        report.records_checked = log.records;
                        let head = stored_head.filter(|stored| stored.seq > log.head.seq).unwrap_or(log.head);
                        report.head_seq = head.seq;
                        report.head_hash = hex(&head.hash);
                        report.records_unchecked = head.seq.saturating_sub(log.records);
                        if let Some(p) = log.first_problem {
                            report.problems.push(problem(p.seq, kind_name(p.kind), p.message));
                        }
                    }
                    Err(error) => {
                        report.records_checked = last_read;
                        if let Some(head) = stored_head {
                            report.head_seq = head.seq;
                            report.head_hash = hex(&head.hash);
                            report.records_unchecked = head.seq.saturating_sub(last_read);
                        }
                        report.problems.push(problem(
                            last_read + 1,
                            "storage",
                            format!("the log cannot be read past seq {last_read}: {error:#}"),
                        ))
                    }
                }
                report.timings.log_s = log_started.elapsed().as_secs_f64();
                take_fold(fold.join(), &mut report);
            }
        }

        match storage.map(|thread| thread.join()) {
            None => report.storage = "skipped (--skip-storage-check)".into(),
            Some(Err(_)) => {
                report.storage = "failed: the check stopped unexpectedly".into();
                report.problems.push(problem(0, "storage", "redb integrity check stopped unexpectedly"));
            }
            Some(Ok((result, took))) => {
                report.timings.storage_s = Some(took.as_secs_f64());
                match result {
                    Ok(()) => report.storage = "passed".into(),
                    Err(error) => {
                        report.storage = format!("failed: {error:#}");
                        report.problems.push(problem(0, "storage", format!("redb integrity check failed: {error:#}")));
                    }
                }
            }
        }
        Ok(())
    })?;
    finish(report, as_json, started)
}

/// redb's integrity check of the file, and an ordinary open's checks after it
/// (`RedbStore::check_file`: what the check rewrites stays in memory). A lost journal is the
/// log layer's problem to report (once, as `journal`), not a failure of redb's pages.
fn check_storage(path: &Path) -> Result<()> {
    without_panic("check the file", || {
        RedbStore::check_file(path, STORAGE_CHECK_CACHE_BYTES, eventlog::JournalLoss::Accept)
            .map_err(|e| anyhow::anyhow!("{e}"))
    })
}

fn take_fold(joined: std::thread::Result<FoldOutcome>, report: &mut Report) {
    match joined {
        Ok(fold) => {
            report.events_applied = fold.applied;
            report.live_tasks = fold.live_tasks;
            report.snapshots_checked = fold.snapshots_checked;
            report.snapshots_skipped = fold.snapshots_skipped;
            report.problems.extend(fold.problems);
            report.timings.domain_apply_s = fold.apply_time.as_secs_f64();
            report.timings.snapshots_s = fold.snapshot_time.as_secs_f64();
            report.timings.index_check_s = fold.index_time.as_secs_f64();
        }
        Err(_) => report.problems.push(problem(0, "domain", "the fold stopped unexpectedly")),
    }
}

/// The fold thread: applies every event it is sent, compares snapshots at
/// their seqs, and checks the indexes at the end — up to the first problem,
/// after which it stops listening (the sender notices and stops decoding).
fn fold_thread(
    rx: Receiver<Vec<Item>>,
    back: SyncSender<Vec<Item>>,
    snapshot_at: HashMap<u64, PathBuf>,
) -> FoldOutcome {
    let mut out = FoldOutcome::default();
    let mut ledger = Ledger::new();
    if let Some(tasks) = live_tasks_hint(&snapshot_at) {
        ledger.reserve_tasks(tasks);
    }
    let folded = without_panic("fold the log", || {
        'batches: for mut batch in rx.iter() {
            let started = Instant::now();
            let mut comparing = Duration::ZERO;
            for item in &mut batch {
                // The ledger takes the event's strings and vectors (`apply_owned`);
                // what is left goes back with the batch to be freed.
                let event = match std::mem::replace(&mut item.event, Err(String::new())) {
                    Ok(event) => event,
                    Err(e) => {
                        out.problems.push(problem(item.seq, "domain", e));
                        break 'batches;
                    }
                };
                if let Err(e) = ledger.apply_owned(event) {
                    out.problems.push(problem(item.seq, "domain", format!("Ledger::apply refused it: {e}")));
                    break 'batches;
                }
                out.applied += 1;
                if let Some(path) = snapshot_at.get(&item.seq) {
                    let compared = Instant::now();
                    match compare_snapshot(path, item.seq, &item.hash, &ledger) {
                        Ok(()) => out.snapshots_checked.push(item.seq),
                        Err(SnapshotVerdict::OtherVersion(reason)) => {
                            out.snapshots_skipped.push(SkippedSnapshot { seq: item.seq, reason })
                        }
                        // Every loader skips such a file, so no state is wrong; but a file that
                        // changed on disk is damage the operator must hear of.
                        Err(SnapshotVerdict::Unusable(why)) => out.problems.push(problem(
                            item.seq,
                            "snapshot",
                            format!(
                                "snapshot file {} is damaged ({why}); restarts and as-of reads skip it and fold from an earlier one: delete it, and check the disk",
                                path.display()
                            ),
                        )),
                        Err(SnapshotVerdict::Differs(why)) => {
                            out.snapshots_checked.push(item.seq);
                            out.problems.push(problem(item.seq, "snapshot", format!("snapshot at seq {}: {why}", item.seq)))
                        }
                    }
                    comparing += compared.elapsed();
                }
            }
            out.snapshot_time += comparing;
            out.apply_time += started.elapsed().saturating_sub(comparing);
            // Full or gone: then this thread frees it, which is only slower.
            let _ = back.try_send(batch);
        }
        Ok(())
    });
    if let Err(error) = folded {
        out.problems.push(problem(out.applied + 1, "domain", format!("{error:#}")));
    }
    out.live_tasks = ledger.live_task_count();
    if !out.problems.iter().any(|p| p.kind == "domain") {
        let started = Instant::now();
        if let Err(e) = ledger.check_indexes_in_place() {
            out.problems.push(problem(
                out.applied,
                "domain",
                format!("ledger indexes inconsistent after the fold: {e}"),
            ));
        }
        out.index_time = started.elapsed();
    }
    // The process ends soon after; freeing a million tasks one by one would
    // cost a noticeable share of the whole run and check nothing.
    std::mem::forget(ledger);
    out
}

/// Most live tasks a snapshot of the log holds: the task count at the start
/// of the newest snapshot's state (read without checking the body: it only
/// sizes the task map, so the fold does not rehash a million tasks as it
/// grows). `None` without a readable snapshot.
fn live_tasks_hint(snapshot_at: &HashMap<u64, PathBuf>) -> Option<usize> {
    use std::io::Read;
    /// A damaged count must not reserve much: at most this many tasks.
    const HINT_TASKS_MAX: usize = 1 << 24;
    let (_, path) = snapshot_at.iter().max_by_key(|(seq, _)| **seq)?;
    let opened = open_snapshot(path).ok()?;
    // The body is `digest (32 bytes) ‖ state`, and the state starts with the
    // task count as a postcard varint (at most 10 bytes).
    let mut head = Vec::with_capacity(42);
    opened.file.take(42).read_to_end(&mut head).ok()?;
    let mut count = 0usize;
    for (n, byte) in head.get(32..)?.iter().enumerate().take(10) {
        count |= usize::from(byte & 0x7f).checked_shl(7 * n as u32)?;
        if byte & 0x80 == 0 {
            return Some(count.min(HINT_TASKS_MAX));
        }
    }
    None
}

/// Why a snapshot did not match.
enum SnapshotVerdict {
    /// The file is unreadable or corrupt: every loader skips it (no state is wrong), reported as damage.
    Unusable(String),
    /// An intact file in another format version: every loader skips it; nothing is damaged.
    OtherVersion(String),
    /// An intact snapshot that disagrees with the log.
    Differs(String),
}

/// Compares snapshot `path` with `ledger`, the fold of the log up to `seq`
/// whose chain hash is `hash`. The body must be `digest ‖ state` where
/// `state` is byte for byte the fold's canonical encoding and `digest` its
/// ledger digest; the file's own body checksum must hold.
fn compare_snapshot(path: &Path, seq: u64, hash: &Hash, ledger: &Ledger) -> Result<(), SnapshotVerdict> {
    let opened = open_snapshot(path).map_err(|e| match e {
        SnapshotError::OtherVersion { .. } => SnapshotVerdict::OtherVersion(e.to_string()),
        e => SnapshotVerdict::Unusable(e.to_string()),
    })?;
    if opened.info.seq != seq {
        return Err(SnapshotVerdict::Unusable(format!("its header says seq {}", opened.info.seq)));
    }
    if &opened.info.chain_hash != hash {
        return Err(SnapshotVerdict::Differs(
            "its chain hash is not this log's hash at that seq (a snapshot of another log)".into(),
        ));
    }
    let expected_body_hash = opened.body_hash;
    let (chunks_tx, chunks_rx) = sync_channel::<Vec<u8>>(4);
    let (facts, equal) = std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            scan_snapshot_body(opened.file, SNAPSHOT_CHUNK_BYTES, |chunk| chunks_tx.send(chunk).is_ok())
        });
        let compare = Compare { rx: chunks_rx, chunk: Vec::new(), at: 0 };
        let written = ledger.write_state(std::io::BufWriter::with_capacity(256 * 1024, compare));
        // The comparison is dropped in every arm, before the join: the reader
        // then stops waiting to hand it chunks.
        let equal = match written.map(std::io::BufWriter::into_inner) {
            Ok(Ok(mut compare)) => !compare.has_more(),
            _ => false,
        };
        (reader.join(), equal)
    });
    let facts = facts.map_err(|_| SnapshotVerdict::Unusable("reading it stopped unexpectedly".into()))?;
    let facts = facts.map_err(|e| SnapshotVerdict::Unusable(format!("read: {e}")))?;
    if facts.body_hash != expected_body_hash {
        return Err(SnapshotVerdict::Unusable("body checksum mismatch".into()));
    }
    if !equal {
        return Err(SnapshotVerdict::Differs("the state it saved differs from the fold of the log up to it".into()));
    }
    if facts.saved_digest != Some(facts.state_digest) {
        return Err(SnapshotVerdict::Differs("state digest differs from the one saved".into()));
    }
    Ok(())
}

/// A writer that checks what is written against the bytes of a snapshot's
/// state, arriving in chunks; the first difference ends the write.
struct Compare {
    rx: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Compare {
    /// Whether more of the file's bytes remain (waits for the next chunk).
    fn has_more(&mut self) -> bool {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                Err(_) => return false,
            }
        }
        true
    }
}

impl Write for Compare {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<usize> {
        let len = data.len();
        while !data.is_empty() {
            if !self.has_more() {
                return Err(std::io::Error::other("the snapshot's state is shorter than the fold's"));
            }
            let n = data.len().min(self.chunk.len() - self.at);
            if data[..n] != self.chunk[self.at..self.at + n] {
                return Err(std::io::Error::other("the snapshot's state differs from the fold's"));
            }
            self.at += n;
            data = &data[n..];
        }
        Ok(len)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn open_error_seq(error: &anyhow::Error) -> u64 {
    error.downcast_ref::<eventlog::OpenError>().map_or(0, |e| match e {
        eventlog::OpenError::Record(r) => r.seq(),
        eventlog::OpenError::HeadMismatch { seq, .. } => *seq,
        _ => 0,
    })
}

/// What kind of problem made opening the log fail: opening checks the
/// chain from the stored head checkpoint to the last record, so a damaged
/// record near the end is found there, before the full pass.
fn open_error_kind(error: &anyhow::Error) -> &'static str {
    use eventlog::RecordError;
    match error.downcast_ref::<eventlog::OpenError>() {
        Some(eventlog::OpenError::Record(RecordError::HashMismatch { .. })) => "chain_link",
        Some(eventlog::OpenError::Record(
            RecordError::TooShort { .. }
            | RecordError::FormatVersion { .. }
            | RecordError::Decode { .. }
            | RecordError::TrailingBytes { .. },
        )) => "decode",
        Some(eventlog::OpenError::HeadMismatch { .. }) => "head",
        Some(eventlog::OpenError::JournalLost { .. }) => "journal",
        _ => "storage",
    }
}

/// `event` when the record holding it is filed under its stream: stream versions and the
/// stream index go by the record's stream, the fold by the event's, so a record filed under
/// another stream verified clean while a task's history read through the index showed another
/// task's events (found by a review).
fn filed_under_its_stream(stream: &[u8], event: domain::Event) -> Result<domain::Event, String> {
    let own = event.stream();
    if own.is_key(stream) {
        return Ok(event);
    }
    Err(format!(
        "the record is filed under stream {} but its {} event belongs to {own}",
        eventlog::json::hex(stream),
        event.type_name()
    ))
}

fn kind_name(kind: eventlog::ProblemKind) -> &'static str {
    match kind {
        eventlog::ProblemKind::Decode => "decode",
        eventlog::ProblemKind::SeqGap => "seq_gap",
        eventlog::ProblemKind::StreamVersion => "stream_version",
        eventlog::ProblemKind::ChainLink => "chain_link",
        eventlog::ProblemKind::RecordedAt => "recorded_at",
        eventlog::ProblemKind::Head => "head",
        eventlog::ProblemKind::Index => "index",
    }
}

/// The log-level checks for a feed held in memory: seqs, stream versions,
/// chain. Returns how many records passed (the fold stops there).
fn check_feed(source: &Source, report: &mut Report) -> Result<u64> {
    let Source::Feed { records, .. } = source else { return Ok(0) };
    let mut prev = GENESIS_HASH;
    let mut versions: HashMap<&[u8], u64> = HashMap::new();
    for (expected, record) in (1u64..).zip(records) {
        if record.seq != expected {
            report.problems.push(problem(
                expected,
                "seq_gap",
                format!("expected record {expected}, found {}", record.seq),
            ));
            return Ok(report.records_checked);
        }
        let version = versions.entry(&record.stream).or_insert(0);
        if record.stream_version != *version + 1 {
            report.problems.push(problem(
                record.seq,
                "stream_version",
                format!("stream version {} follows {version}", record.stream_version),
            ));
            return Ok(report.records_checked);
        }
        *version += 1;
        if chain_hash(&prev, record.seq, &stored_body(record)) != record.hash {
            report.problems.push(problem(
                record.seq,
                "chain_link",
                "the chain hash does not recompute (from a feed, a payload whose JSON text was not compact \
                 with sorted keys also shows up here)",
            ));
            return Ok(report.records_checked);
        }
        prev = record.hash;
        report.records_checked += 1;
    }
    let head = source.head()?;
    report.head_seq = head.seq;
    report.head_hash = hex(&head.hash);
    Ok(report.records_checked)
}

fn finish(mut report: Report, as_json: bool, started: Instant) -> Result<Outcome> {
    report.problems.sort_by_key(|p| (p.seq == 0, p.seq));
    report.clean = report.problems.is_empty();
    let seconds = started.elapsed().as_secs_f64();
    report.timings.total_s = seconds;
    report.timings.records_per_s = report.records_checked as f64 / seconds.max(1e-9);
    if as_json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(if report.clean { Outcome::Clean } else { Outcome::Problems });
    }
    let t = &report.timings;
    let rate = |seconds: f64| format!("{:.0} records/s", report.records_checked as f64 / seconds.max(1e-9));
    println!("verify {}", report.log);
    match t.storage_s {
        Some(s) => {
            println!("  storage   redb integrity check, alongside the other layers: {} ({s:.2} s)", report.storage)
        }
        None => println!("  storage   redb integrity check: {}", report.storage),
    }
    let unchecked = match report.records_unchecked {
        0 => String::new(),
        n => format!(", then stopped at the first problem: {n} after it not checked"),
    };
    println!(
        "  log       {} records checked{unchecked} (head seq {}, hash {}) ({:.2} s, {})",
        report.records_checked,
        report.head_seq,
        if report.head_hash.is_empty() { "-" } else { &report.head_hash },
        t.log_s,
        rate(t.log_s)
    );
    println!(
        "  domain    {} events applied, {} live tasks at the end ({:.2} s applying, {:.2} s index check)",
        report.events_applied, report.live_tasks, t.domain_apply_s, t.index_check_s
    );
    if !report.snapshots_checked.is_empty() {
        let seqs: Vec<String> = report.snapshots_checked.iter().map(u64::to_string).collect();
        println!("  snapshots compared with the fold at seq {} ({:.2} s)", seqs.join(", "), t.snapshots_s);
    }
    for skipped in &report.snapshots_skipped {
        println!("  snapshot  seq {} skipped: {}", skipped.seq, skipped.reason);
    }
    for p in &report.problems {
        if p.seq > 0 {
            println!("  PROBLEM   seq {} ({}): {}", p.seq, p.kind, p.message);
        } else {
            println!("  PROBLEM   ({}): {}", p.kind, p.message);
        }
    }
    for lost in &report.journal_losses_accepted {
        println!("  journal   loss accepted (--accept-journal-loss): {lost}");
    }
    println!("  time      {seconds:.2} s in all, {}", rate(seconds));
    match report.problems.iter().find(|p| p.seq > 0) {
        None if report.clean && !report.journal_losses_accepted.is_empty() => {
            println!("result: clean, but for the journal records lost (accepted)")
        }
        None if report.clean => println!("result: clean"),
        None => println!("result: NOT clean ({} problems)", report.problems.len()),
        Some(first) => println!("result: NOT clean ({} problems, first at seq {})", report.problems.len(), first.seq),
    }
    Ok(if report.clean { Outcome::Clean } else { Outcome::Problems })
}
