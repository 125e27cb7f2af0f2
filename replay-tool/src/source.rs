//! Where the records come from: a log file on disk (a stopped server's data
//! directory or a backup), read through read-only MVCC transactions that
//! never modify it, or a running server's NDJSON event feed, held in memory.
//! Every subcommand reads through `Source`, so they all work on both.
//!
//! Also here: points in the log (`SEQ` or an RFC 3339 time) and how a time
//! becomes a seq (the last record recorded at or before it).

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use domain::{Event, Ledger, LedgerSummary, Namespace, QueueSettings, TaskId, Timestamp};
use eventlog::fold::{FoldStats, decode_event, fold_to};
use eventlog::{Head, LogReader, SnapshotStore, StoredRecord};

use crate::progress::Progress;

/// Records read per batch while scanning.
pub const SCAN_BATCH_RECORDS: usize = 8192;

/// A position in the log given by the user: a seq, or a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    Seq(u64),
    Time(Timestamp),
}

impl FromStr for Point {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text.parse().map(Point::Seq).map_err(|e| format!("seq {text:?}: {e}"));
        }
        Timestamp::parse_rfc3339(text).map(Point::Time).map_err(|e| format!("{e}, or a seq"))
    }
}

/// The log being read.
pub enum Source {
    /// A log file, opened read-only (repaired in memory when a crash left it unclean), and the
    /// journal losses accepted to open it (`--accept-journal-loss`; empty when none).
    File { path: PathBuf, reader: LogReader, snapshots: SnapshotStore, journal_losses: Vec<String> },
    /// A server's feed in memory (payloads re-encoded from the feed's JSON): the records from
    /// seq `first` on (1 but for `events`, which reads only the window it shows; a task's
    /// earlier records are then read from the server, `token` its bearer token, and
    /// `window_head` is the head the server announced, past the window's last record).
    Feed { origin: String, token: String, first: u64, records: Vec<StoredRecord>, window_head: Option<u64> },
}

/// The log file and snapshot directory named by `--data DIR` or `--log FILE`.
/// A command line that asks for something impossible (exit status 2, as clap's
/// own parse errors), as opposed to a command that could not run (3).
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A usage error with this message.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    Usage(message.into()).into()
}

pub fn log_paths(data: Option<&Path>, log: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    match (data, log) {
        (Some(dir), None) => Ok((dir.join(eventlog::redb_store::LOG_FILE_NAME), dir.join("snapshots"))),
        (None, Some(file)) => {
            let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            Ok((file.to_path_buf(), dir.join(eventlog::redb_store::SNAPSHOT_DIR_NAME)))
        }
        (Some(_), Some(_)) => Err(usage("give either --data DIR or --log FILE, not both")),
        (None, None) => Err(usage("say which log to read: --data DIR, --log FILE, or --server URL --token T")),
    }
}

/// How many `without_panic` calls are running, on any thread: the panic hook stays quiet
/// while one is, since the panic becomes an error there — also a panic in a thread the
/// guarded code started (the storage engine's, `eventlog::verify`'s scanning thread), which
/// reaches the guard when that thread is joined.
static GUARDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Installs a panic hook that is silent while `without_panic` runs (the panic is
/// reported as an error there) and says "internal error" otherwise.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        if GUARDED.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            eprintln!("taskledger-replay: internal error: {info}");
        }
    }));
}

/// Runs `f`, turning a panic inside the storage engine into an error (redb may
/// panic on a damaged file that it was not asked to check first).
pub fn without_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    GUARDED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    match result {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(anyhow!("{what}: the storage engine panicked ({message}); the file is damaged (`verify` says where)"))
        }
    }
}

impl Source {
    /// Opens a log file read-only, checking its head.
    pub fn open_file(path: &Path, snapshot_dir: &Path, loss: eventlog::JournalLoss) -> Result<Source> {
        if !path.is_file() {
            bail!("open log {}: no such file (a data directory holds ledger.redb)", path.display());
        }
        let snapshots = SnapshotStore::new(snapshot_dir, usize::MAX);
        let opened = without_panic("open log", || match LogReader::open_read_only(path) {
            Ok(reader) => Ok(Ok(reader)),
            Err(eventlog::OpenError::Database { source: redb::DatabaseError::RepairAborted, .. })
            | Err(eventlog::OpenError::JournalPending { .. }) => Ok(Err(())),
            Err(eventlog::OpenError::JournalLost { .. }) if loss == eventlog::JournalLoss::Accept => Ok(Err(())),
            Err(error) => {
                // The hint only where it can be the cause: the file is locked by another process.
                let locked = matches!(
                    &error,
                    eventlog::OpenError::Database { source: redb::DatabaseError::DatabaseAlreadyOpen, .. }
                );
                let hint = if locked { " (is a server still running on it?)" } else { "" };
                Err(anyhow::Error::new(error)).with_context(|| format!("open log {} read-only{hint}", path.display()))
            }
        })?;
        match opened {
            Ok(reader) => Ok(Source::File { path: path.to_path_buf(), reader, snapshots, journal_losses: Vec::new() }),
            Err(()) => Self::open_repaired(path, snapshots, loss),
        }
    }

    /// A log the server did not close cleanly (it crashed, or was killed)
    /// needs redb's repair before it can be read, and repair writes. The
    /// original is never modified: the repair goes to memory
    /// (`LogReader::open_repaired`).
    fn open_repaired(path: &Path, snapshots: SnapshotStore, loss: eventlog::JournalLoss) -> Result<Source> {
        let (reader, journal_losses) = without_panic("open the log repaired in memory", || {
            LogReader::open_repaired_with(path, loss).with_context(|| format!("repair {} in memory", path.display()))
        })?;
        // Said once it opened (a refused open said why already).
        let journals = eventlog::journal::journal_paths(path);
        if !journal_losses.is_empty() {
            for lost in &journal_losses {
                eprintln!("warning: {lost}; reading what the log file holds, as --accept-journal-loss says");
            }
        } else if journals.iter().any(|journal| journal.exists()) {
            eprintln!(
                "note: {} was not closed cleanly (the server crashed or was killed); reading it repaired in memory, \
                 with the records of its journal, the files are left as they are",
                path.display()
            );
        } else if loss == eventlog::JournalLoss::Refuse {
            // A file copied without its journals, written before the store marked its journals in
            // use (a marked one is refused): what was acknowledged after the last checkpoint
            // lived only there.
            eprintln!(
                "warning: {} was not closed cleanly and has no journal beside it ({}); reading it repaired in \
                 memory, the file is left as it is. If its server wrote through journals (builds since \
                 2026-12-03; older ones wrote every record into this file), records acknowledged after its last \
                 checkpoint are only in them: copy them with it, or take a `taskledger backup`",
                path.display(),
                journals
                    .iter()
                    .filter_map(|j| j.file_name())
                    .map(|n| n.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(Source::File { path: path.to_path_buf(), reader, snapshots, journal_losses })
    }

    /// Where the records come from, for reports.
    pub fn origin(&self) -> String {
        match self {
            Source::File { path, .. } => path.display().to_string(),
            Source::Feed { origin, .. } => origin.clone(),
        }
    }

    pub fn head(&self) -> Result<Head> {
        match self {
            Source::File { reader, .. } => without_panic("read the head", || Ok(reader.head()?)),
            Source::Feed { records, window_head, .. } => {
                let last = records.last().map_or(Head::EMPTY, |r| Head { seq: r.seq, hash: r.hash });
                // A window's points are checked against the log's head, not the window's end (the
                // hash is the window's last: only `events` reads a window, and it shows no head).
                Ok(Head { seq: last.seq.max(window_head.unwrap_or(0)), ..last })
            }
        }
    }

    /// Calls `f` on records `from..=to` in log order until it breaks.
    pub fn scan(
        &self,
        from: u64,
        to: u64,
        progress: &Progress,
        mut f: impl FnMut(&StoredRecord) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        let from = from.max(1);
        match self {
            // The file is read in owned batches either way; a feed's records are lent in place.
            Source::File { .. } => {
                return self.scan_batches(from, to, SCAN_BATCH_RECORDS, progress, |batch| {
                    for record in &batch {
                        if f(record)?.is_break() {
                            return Ok(ControlFlow::Break(()));
                        }
                    }
                    Ok(ControlFlow::Continue(()))
                });
            }
            Source::Feed { first, records, .. } => {
                let start = usize::try_from(from.saturating_sub(*first)).unwrap_or(usize::MAX).min(records.len());
                for record in records[start..].iter().take_while(|r| r.seq <= to) {
                    if f(record)?.is_break() {
                        return Ok(());
                    }
                }
            }
        }
        progress.set(to.min(self.head()?.seq));
        Ok(())
    }

    /// Calls `f` with records `from..=to` in log order, in owned batches of at
    /// most `batch` records (for handing to another thread), until it breaks.
    pub fn scan_batches(
        &self,
        from: u64,
        to: u64,
        batch: usize,
        progress: &Progress,
        mut f: impl FnMut(Vec<StoredRecord>) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        let from = from.max(1);
        match self {
            Source::File { reader, .. } => {
                let mut next = from;
                while next <= to {
                    let records = without_panic("read the log", || {
                        reader.read_range(next, to, batch).with_context(|| format!("read records from seq {next}"))
                    })?;
                    let Some(last) = records.last() else { break };
                    next = last.seq + 1;
                    if f(records)?.is_break() {
                        return Ok(());
                    }
                    progress.set(next - 1);
                }
            }
            Source::Feed { first, records, .. } => {
                let start = usize::try_from(from.saturating_sub(*first)).unwrap_or(usize::MAX).min(records.len());
                let wanted: Vec<&StoredRecord> = records[start..].iter().take_while(|r| r.seq <= to).collect();
                for part in wanted.chunks(batch.max(1)) {
                    if f(part.iter().map(|r| (*r).clone()).collect())?.is_break() {
                        return Ok(());
                    }
                }
            }
        }
        progress.set(to.min(self.head()?.seq));
        Ok(())
    }

    /// Every record of one task's stream up to `upto`, in order.
    pub fn task_records(&self, task: TaskId, upto: u64) -> Result<Vec<StoredRecord>> {
        if let Some(records) = self.stream_records(&domain::StreamId::Task(task), upto)? {
            return Ok(records);
        }
        // A window of a server's feed: the task's history, from the server.
        let Source::Feed { origin, token, .. } = self else { unreachable!("a file holds every stream") };
        let mut records = crate::feed::task_history(origin, token, task)?;
        records.retain(|r| r.seq <= upto);
        Ok(records)
    }

    /// Whether every record of the log is at hand (a file, or a server's whole feed), not a
    /// window of a server's feed.
    pub fn holds_whole_log(&self) -> bool {
        !matches!(self, Source::Feed { first, .. } if *first != 1)
    }

    /// Every record of `stream` up to `upto`, in order; `None` from a window of a server's feed
    /// (which holds only part of the log, and the server reads no stream but a task's).
    pub fn stream_records(&self, stream: &domain::StreamId, upto: u64) -> Result<Option<Vec<StoredRecord>>> {
        let key = stream.to_key();
        match self {
            Source::File { reader, .. } => {
                let mut out: Vec<StoredRecord> = Vec::new();
                loop {
                    let from = out.len() as u64 + 1;
                    let batch = without_panic("read a stream", || {
                        reader.read_stream(&key, from, SCAN_BATCH_RECORDS).with_context(|| format!("read {stream}"))
                    })?;
                    let done = batch.len() < SCAN_BATCH_RECORDS;
                    out.extend(batch);
                    if done {
                        break;
                    }
                }
                out.retain(|r| r.seq <= upto);
                Ok(Some(out))
            }
            Source::Feed { records, first: 1, .. } => {
                Ok(Some(records.iter().filter(|r| r.seq <= upto && r.stream == key).cloned().collect()))
            }
            Source::Feed { .. } => Ok(None),
        }
    }

    /// The record at `seq`, if there is one.
    pub fn record(&self, seq: u64) -> Result<Option<StoredRecord>> {
        if seq == 0 {
            return Ok(None);
        }
        match self {
            Source::File { reader, .. } => {
                without_panic("read a record", || Ok(reader.read_range(seq, seq, 1)?.into_iter().next()))
            }
            Source::Feed { first, records, .. } => {
                Ok(seq.checked_sub(*first).and_then(|at| records.get(usize::try_from(at).ok()?)).cloned())
            }
        }
    }

    /// The whole ledger as of record `seq`: the nearest snapshot at or below it
    /// and the records after it (a feed has no snapshots: it replays from 1).
    pub fn ledger_at(&self, seq: u64, progress: &Progress) -> Result<(Ledger, FoldStats)> {
        match self {
            Source::File { reader, snapshots, .. } => without_panic("fold the log", || {
                fold_to(reader, snapshots, seq).with_context(|| format!("fold the log up to seq {seq}"))
            }),
            Source::Feed { .. } => {
                let mut ledger = Ledger::new();
                let mut stats = FoldStats::default();
                self.scan(1, seq, progress, |record| {
                    apply(&mut ledger, record)?;
                    stats.replayed += 1;
                    Ok(ControlFlow::Continue(()))
                })?;
                Ok((ledger, stats))
            }
        }
    }

    /// Counts of the whole ledger as of record `seq`, with its digest, without
    /// building the whole ledger when a snapshot is at hand: the snapshot's
    /// state is split (`domain::split_state`) so that only the tasks the
    /// records after it touch are decoded; the rest are counted in place and
    /// kept as bytes, which the digest hashes as they are. A feed, a log
    /// without a usable snapshot, or a snapshot that fails a check is folded
    /// in full instead.
    pub fn summary_at(&self, seq: u64, progress: &Progress) -> Result<SummaryAt> {
        let mut skipped = Vec::new();
        if let Source::File { reader, snapshots, .. } = self {
            let pick = without_panic("read snapshots", || {
                Ok(snapshots.latest_at_or_below(seq, |snapshot| {
                    reader.record_hash(snapshot.info.seq).ok().flatten() == Some(snapshot.info.chain_hash)
                }))
            })?;
            skipped.extend(pick.skipped.iter().map(|e| e.to_string()));
            if let Some(snapshot) = pick.snapshot {
                match self.summary_from_snapshot(&snapshot, seq, progress)? {
                    Ok(mut summary) => {
                        summary.stats.skipped_snapshots.splice(0..0, skipped);
                        return Ok(summary);
                    }
                    Err(why) => skipped.push(format!("snapshot at seq {}: {why}", snapshot.info.seq)),
                }
            }
        }
        let (ledger, mut stats) = self.ledger_at(seq, progress)?;
        stats.skipped_snapshots.splice(0..0, skipped);
        Ok(SummaryAt {
            summary: ledger.summary(),
            settings: ledger.all_queue_settings(),
            digest: ledger.digest(),
            stats,
            tasks_decoded: ledger.live_task_count(),
        })
    }

    /// `summary_at` from one snapshot; the inner error says why the snapshot
    /// cannot be used (then the caller folds in full).
    fn summary_from_snapshot(
        &self,
        snapshot: &eventlog::Snapshot,
        seq: u64,
        progress: &Progress,
    ) -> Result<Result<SummaryAt, String>> {
        let Some((saved, state)) = snapshot.body.split_first_chunk::<32>() else {
            return Ok(Err("body shorter than its digest".into()));
        };
        let from = snapshot.info.seq;
        let mut events: Vec<(u64, Event)> = Vec::new();
        self.scan(from + 1, seq, progress, |record| {
            events.push((record.seq, decode(record)?));
            Ok(ControlFlow::Continue(()))
        })?;
        let touched: HashSet<TaskId> = events.iter().filter_map(|(_, e)| e.task()).collect();
        let split = match domain::split_state(state, |id| touched.contains(id)) {
            Ok(split) => split,
            Err(e) => return Ok(Err(format!("decode: {e}"))),
        };
        let tasks_decoded = split.kept.tasks.len();
        // The ledger rebuilt from the kept tasks is small: a copy is folded
        // forward, so the check of the saved digest (on the state as it was)
        // and the digest of the answer (after the events), each hashing the
        // whole state, run at the same time on two threads.
        let rebuilt = Ledger::from_state(split.kept);
        let mut ledger = rebuilt.clone();
        let mut refused = None;
        for (seq, event) in &events {
            if let Err(e) = ledger.apply(event) {
                refused = Some(anyhow!("record {seq}: {e}"));
                break;
            }
        }
        let others = &split.others;
        let (check, digest) = std::thread::scope(|scope| {
            let check = std::thread::Builder::new()
                .name("state-check".into())
                .spawn_scoped(scope, || rebuilt.digest_with(others));
            let digest = ledger.digest_with(others);
            let check = match check {
                Ok(thread) => thread.join().map_err(|_| anyhow!("checking the snapshot's digest stopped unexpectedly")),
                Err(_) => Ok(rebuilt.digest_with(others)),
            };
            (check, digest)
        });
        // The check `fold_to` makes: the state rebuilds to the digest saved with it.
        if &check? != saved {
            return Ok(Err("state digest differs from the one saved".into()));
        }
        if let Some(refused) = refused {
            return Err(refused);
        }
        let mut summary = ledger.summary();
        summary.merge(&split.others_summary);
        let stats = FoldStats { snapshot_seq: from, replayed: events.len() as u64, skipped_snapshots: Vec::new() };
        Ok(Ok(SummaryAt { summary, settings: ledger.all_queue_settings(), digest, stats, tasks_decoded }))
    }

    /// The last seq recorded at or before `time` (0 if none is).
    pub fn seq_at_or_before(&self, time: Timestamp) -> Result<u64> {
        let head = self.head()?.seq;
        let (mut low, mut high) = (0u64, head);
        // Invariant: record `low` is at or before `time` (or low = 0); every record after `high` is later.
        while low < high {
            let mid = low + (high - low).div_ceil(2);
            let record = self.record(mid)?.ok_or_else(|| anyhow!("the log has no record {mid}"))?;
            if record.recorded_at_us <= time.as_micros() {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        Ok(low)
    }

    /// The seq a point names when it ends a range (or is an "as of"): a time
    /// means the last record at or before it.
    pub fn upto(&self, point: Point) -> Result<u64> {
        let head = self.head()?.seq;
        match point {
            Point::Seq(seq) if seq > head => bail!("seq {seq} is beyond the head of the log ({head})"),
            Point::Seq(seq) => Ok(seq),
            Point::Time(time) => self.seq_at_or_before(time),
        }
    }

    /// The seq a point names when it starts a range: a time means the first
    /// record at or after it.
    pub fn from(&self, point: Point) -> Result<u64> {
        match point {
            // Just after the head is an empty range (as for a follower); further on, a seq the
            // log does not have, as for `upto`.
            Point::Seq(seq) => {
                let head = self.head()?.seq;
                if seq > head.saturating_add(1) {
                    bail!("seq {seq} is beyond the head of the log ({head})");
                }
                Ok(seq.max(1))
            }
            Point::Time(time) => Ok(self.seq_at_or_before(Timestamp::from_micros(time.as_micros() - 1))? + 1),
        }
    }

    /// Inclusive seq range from optional points (defaults: the whole log).
    pub fn range(&self, from: Option<Point>, to: Option<Point>) -> Result<(u64, u64)> {
        let head = self.head()?.seq;
        let first = from.map(|p| self.from(p)).transpose()?.unwrap_or(1);
        let last = to.map(|p| self.upto(p)).transpose()?.unwrap_or(head);
        // Two seqs must be in order; a time window may fall between two records (first = last + 1).
        let reversed = match (from, to) {
            (Some(Point::Seq(a)), Some(Point::Seq(b))) => a > b,
            (Some(_), Some(_)) => first > last + 1,
            _ => false,
        };
        if reversed {
            return Err(usage(format!("--from (seq {first}) is after --to (seq {last})")));
        }
        Ok((first, last))
    }
}

/// The whole ledger at a point, as counts (see [`Source::summary_at`]).
pub struct SummaryAt {
    pub summary: LedgerSummary,
    pub settings: Vec<(Namespace, QueueSettings)>,
    pub digest: [u8; 32],
    pub stats: FoldStats,
    /// Tasks decoded into memory to answer (all of them when folded in full).
    pub tasks_decoded: usize,
}

/// Decodes a record's domain event.
pub fn decode(record: &StoredRecord) -> Result<Event> {
    decode_event(record).map_err(|e| anyhow!("{e}"))
}

/// Decodes a record's event and folds it into `ledger`, naming the seq on failure.
pub fn apply(ledger: &mut Ledger, record: &StoredRecord) -> Result<Event> {
    let event = decode_event(record).map_err(|e| anyhow!("{e}"))?;
    ledger.apply(&event).map_err(|e| anyhow!("record {}: {e}", record.seq))?;
    Ok(event)
}

/// The time of a record as RFC 3339.
pub fn time_of(record: &StoredRecord) -> String {
    Timestamp::from_micros(record.recorded_at_us).to_rfc3339()
}
