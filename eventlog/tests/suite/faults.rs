//! Injected storage faults under the writer, as a full matrix: for k = 1..K, the k-th write (or
//! the k-th sync) of redb's file or of the write-ahead journal (one count for both) fails, once or from then on, with EIO or ENOSPC, while several
//! submitters run a create → claim → complete/fail mix through the real writer on a real file
//! (`FaultyBackend` wraps redb's own file backend; nothing is mocked). Each trial checks that
//!
//! - no command of the failed commit is acknowledged: each gets `CommitFailed` (EIO) or
//!   `StorageFull` (ENOSPC), and every later command is refused with `Unavailable`;
//! - the writer reports `Health::Failed` and never retries, even when the disk recovers
//!   (`FaultMode::Once`);
//! - reads keep working while writes are refused: the head, every acknowledged record, a
//!   subscription from seq 1 (the path of the event feed and of exports) and the writer's own
//!   ledger, which equals a fold of what the log durably holds;
//! - after reopening the file with the normal backend: `verify` is clean, every acknowledged
//!   command's events are at exactly the seqs it was told, a command that got an error is either
//!   absent or (a failed sync may still have reached the disk, and a failed write of redb's
//!   pages comes after the journal's fsync) present as one whole batch, the
//!   startup ledger equals a fold of the log from scratch, and writes resume.
//!
//! `eventlog/tests/suite/writer.rs` keeps the single-fault walk-through; this file is the matrix.
//! `TASKLEDGER_FAULT_K` raises K (default 24 writes and 12 syncs per mode).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use domain::testkit::{claim, complete, job};
use domain::{Command, Event, Ledger};
use eventlog::{
    Acknowledgement, Envelope, FaultError, FaultHandle, FaultMode, FaultOp, FaultPlan, FaultTarget, FaultyBackend,
    Health, LogReader, RedbOptions, RedbStore, Subscription, SystemClock, WriteError, Writer, WriterConfig,
    decode_event, fold_to_head, verify,
};

const SUBMITTERS: u64 = 4;
/// Commands one submitter sends at most in one trial; far more commits than the largest k
/// needs, so a trial that never trips its fault is a test failure, not a silent pass.
const COMMANDS_PER_SUBMITTER_MAX: u64 = 2_000;
const K_WRITES_DEFAULT: u64 = 24;
const K_SYNCS_DEFAULT: u64 = 12;
const K_ENV: &str = "TASKLEDGER_FAULT_K";
/// Task numbers: submitter × this + counter.
const SUBMITTER_TASKS: u64 = 1_000_000;

fn config() -> WriterConfig {
    // No snapshots: the folds below must come from the log alone.
    WriterConfig { snapshot_every_events: 0, ..WriterConfig::default() }
}

fn k_max(op: FaultOp) -> u64 {
    let default = if op == FaultOp::Write { K_WRITES_DEFAULT } else { K_SYNCS_DEFAULT };
    std::env::var(K_ENV).ok().map_or(default, |v| v.parse().expect("TASKLEDGER_FAULT_K is a number"))
}

/// What happened to one command.
#[derive(Debug)]
enum Outcome {
    Acked(Acknowledgement),
    Failed(WriteError),
}

/// Opens a fresh log on a `FaultyBackend` and starts the writer on it.
fn start_faulty(dir: &Path) -> (Writer, FaultHandle) {
    let (backend, faults) = FaultyBackend::for_log_in(dir).expect("wrap the ledger file");
    let options = RedbOptions { journal_faults: Some(faults.clone()), ..RedbOptions::default() };
    let store = RedbStore::open_with_backend(dir, backend, options).expect("open the store");
    let (writer, _) = Writer::start(store, config(), Arc::new(SystemClock)).expect("start the writer");
    (writer, faults)
}

/// One submitter: creates jobs, claims them, completes most and fails some, until the writer
/// refuses a command (the fault fired) or it has sent its maximum. Returns every command's
/// outcome in the order sent.
fn submit_until_refused(
    handle: eventlog::WriterHandle,
    trial: &str,
    thread: u64,
    stop: &AtomicBool,
) -> Vec<(String, Outcome)> {
    let namespace = format!("q{thread}");
    let mut outcomes = Vec::new();
    let mut created = 0;
    for n in 0..COMMANDS_PER_SUBMITTER_MAX {
        let command = match n % 4 {
            0 | 1 => {
                created += 1;
                Command::CreateTask(job(thread * SUBMITTER_TASKS + created, &namespace))
            }
            2 => claim(&namespace, &format!("w{thread}"), 2),
            _ => {
                // Complete (or fail) whatever this submitter's last claim handed out.
                let last_claim = outcomes.iter().rev().find_map(|(_, o)| match o {
                    Outcome::Acked(ack) if !ack.claimed.is_empty() => Some(ack.claimed[0].clone()),
                    _ => None,
                });
                match last_claim {
                    Some(work) if n % 8 == 3 => complete(work.task, work.step.as_str(), work.epoch.0),
                    Some(work) => Command::FailStep {
                        lease: domain::LeaseRef { task: work.task, step: work.step, epoch: work.epoch },
                        error: domain::testkit::text("injected"),
                        retryable: true,
                    },
                    None => claim(&namespace, &format!("w{thread}"), 1),
                }
            }
        };
        let command_id = format!("{trial}-t{thread}-{n}");
        let envelope = Envelope { command_id: command_id.clone(), actor: format!("sub-{thread}"), command };
        let outcome = match handle.execute(envelope) {
            Ok(ack) => Outcome::Acked(ack),
            // A rejection (a lease already completed by a repeat, say) is part of the mix.
            Err(WriteError::Rejected(_)) => continue,
            Err(error) => Outcome::Failed(error),
        };
        let refused = matches!(outcome, Outcome::Failed(_));
        outcomes.push((command_id, outcome));
        if refused || stop.load(Ordering::Relaxed) {
            // One thread's refusal means the writer stopped: the others will be refused too,
            // but each also stops on its own first error.
            stop.store(true, Ordering::Relaxed);
            if refused {
                break;
            }
        }
    }
    outcomes
}

/// Reads `from..=to` completely, checking the seqs are gapless.
fn read_all(reader: &LogReader, from: u64, to: u64) -> Vec<eventlog::StoredRecord> {
    let mut records = Vec::new();
    let mut next = from;
    while next <= to {
        let batch = reader.read_range(next, to, 4096).expect("read the log");
        assert!(!batch.is_empty(), "no record at seq {next} (head {to})");
        for record in batch {
            assert_eq!(record.seq, next, "read_range skipped a seq");
            next += 1;
            records.push(record);
        }
    }
    records
}

/// The ledger folded from seq 1 without snapshots.
fn fold_from_scratch(records: &[eventlog::StoredRecord]) -> Ledger {
    let mut ledger = Ledger::new();
    for record in records {
        let event = decode_event(record).expect("every record decodes");
        ledger.apply(&event).unwrap_or_else(|e| panic!("apply seq {}: {e}", record.seq));
    }
    ledger
}

/// Where each command id's records are: (first seq, last seq, count).
fn spans(records: &[eventlog::StoredRecord]) -> HashMap<String, (u64, u64, u64)> {
    let mut spans: HashMap<String, (u64, u64, u64)> = HashMap::new();
    for record in records {
        let span = spans.entry(record.command_id.clone()).or_insert((record.seq, record.seq, 0));
        span.1 = record.seq;
        span.2 += 1;
    }
    spans
}

/// Figures of one trial, summed over the matrix.
#[derive(Default, Debug)]
struct Tally {
    trials: u64,
    acked: u64,
    failed_in_commit: u64,
    refused_after: u64,
    /// Commands that got an error but whose batch reached the disk anyway (failed syncs).
    errored_but_durable: u64,
}

fn run_trial(op: FaultOp, mode: FaultMode, error: FaultError, k: u64, tally: &mut Tally) {
    let trial = format!("{op:?}-{mode:?}-{error:?}-{k}");
    let dir = tempfile::tempdir().expect("temp dir");
    let (writer, faults) = start_faulty(dir.path());
    let handle = writer.handle();
    faults.arm(FaultPlan { op, nth: k, mode, error });

    let stop = AtomicBool::new(false);
    let outcomes: Vec<(String, Outcome)> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..SUBMITTERS)
            .map(|thread| {
                let handle = handle.clone();
                let (trial, stop) = (&trial, &stop);
                scope.spawn(move || submit_until_refused(handle, trial, thread, stop))
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().expect("submitter")).collect()
    });
    assert!(faults.tripped(), "{trial}: the fault never fired; raise COMMANDS_PER_SUBMITTER_MAX");
    let tripped_on = faults.tripped_on();

    // Every error is one of the two a failed storage may give.
    let commit_error = |e: &WriteError| match error {
        FaultError::Io => matches!(e, WriteError::CommitFailed(_)),
        FaultError::NoSpace => matches!(e, WriteError::StorageFull(_)),
    };
    let mut acked: BTreeMap<u64, (&str, &Acknowledgement)> = BTreeMap::new();
    let mut errored: Vec<&str> = Vec::new();
    let mut in_commit = 0;
    for (id, outcome) in &outcomes {
        match outcome {
            Outcome::Acked(ack) => {
                if let Some(seqs) = ack.seqs {
                    assert!(acked.insert(seqs.first, (id, ack)).is_none(), "{trial}: two acks at seq {}", seqs.first);
                }
                tally.acked += 1;
            }
            Outcome::Failed(e) if commit_error(e) => {
                in_commit += 1;
                errored.push(id);
            }
            Outcome::Failed(WriteError::Unavailable(_)) => {
                tally.refused_after += 1;
                errored.push(id);
            }
            Outcome::Failed(e) => panic!("{trial}: command {id} got an unexpected error: {e:?}"),
        }
    }
    assert!(in_commit >= 1, "{trial}: no command saw the failed commit: {outcomes:?}");
    tally.failed_in_commit += in_commit;

    // The writer stopped for good, and says so, even if the disk works again.
    assert!(matches!(handle.health(), Health::Failed(_)), "{trial}: {:?}", handle.health());
    faults.disarm();
    let later = handle.execute(Envelope {
        command_id: format!("{trial}-later"),
        actor: "tester".into(),
        command: Command::CreateTask(job(999_999_999, "later")),
    });
    assert!(matches!(later, Err(WriteError::Unavailable(_))), "{trial}: a write after the failure: {later:?}");

    // Reads still work: the head, every acknowledged record, the feed's subscription path, and
    // the writer's ledger equals the fold of what the log holds.
    let reader = handle.reader().clone();
    let head = reader.head().expect("read the head while writes are refused");
    let acked_last = acked.values().filter_map(|(_, a)| a.seqs).map(|s| s.last).max().unwrap_or(0);
    assert!(head.seq >= acked_last, "{trial}: head {} is below acknowledged seq {acked_last}", head.seq);
    let visible = read_all(&reader, 1, head.seq);
    let mut subscription = Subscription::new(reader.clone(), handle.feed().clone(), 1);
    let mut followed = Vec::new();
    loop {
        let batch = subscription.try_next_batch(1024).expect("subscribe while writes are refused");
        if batch.is_empty() {
            break;
        }
        followed.extend(batch.into_iter().map(|r| (r.seq, r.hash)));
    }
    assert_eq!(followed, visible.iter().map(|r| (r.seq, r.hash)).collect::<Vec<_>>(), "{trial}: the feed");
    for record in &visible {
        let event = decode_event(record).expect("decode while writes are refused");
        let _ = eventlog::json::record_json(record, &event);
    }
    let digest = handle.read(|ledger| ledger.digest()).expect("read the writer's ledger");
    assert_eq!(digest, fold_from_scratch(&visible).digest(), "{trial}: the writer's memory is not the log's fold");
    // The readers hold the database open; the reopen below needs its lock.
    drop((subscription, reader, handle));
    writer.shutdown();

    // Reopen with the normal backend.
    let (writer, startup) = Writer::open(dir.path(), config(), Arc::new(SystemClock))
        .unwrap_or_else(|e| panic!("{trial}: reopen after the fault: {e}"));
    let reader = writer.handle().reader().clone();
    let report = verify(&reader, |_, _| {}).expect("verify");
    assert!(report.is_clean(), "{trial}: verify after reopening: {:?}", report.first_problem);
    assert_eq!(report.records, startup.head.seq, "{trial}");
    let records = read_all(&reader, 1, startup.head.seq);
    let spans = spans(&records);
    for (id, ack) in acked.values() {
        let seqs = ack.seqs.expect("only acks with events are kept");
        assert_eq!(
            spans.get(*id).copied(),
            Some((seqs.first, seqs.last, seqs.last - seqs.first + 1)),
            "{trial}: acknowledged command {id} is not exactly at seqs {}..={}",
            seqs.first,
            seqs.last
        );
        let events: Vec<Event> = records[(seqs.first - 1) as usize..seqs.last as usize]
            .iter()
            .map(|r| decode_event(r).expect("decode"))
            .collect();
        assert_eq!(events, ack.events, "{trial}: the events of {id} differ from its acknowledgement");
    }
    for id in &errored {
        if let Some(&(first, last, count)) = spans.get(*id) {
            // Only a failed sync can leave a batch on disk, or a failed write of redb's pages
            // after the journal's fsync returned; and then all of it.
            assert!(
                op == FaultOp::SyncData || tripped_on == Some(FaultTarget::LogFile),
                "{trial}: {id} got an error, yet its failed write is in the log"
            );
            assert_eq!(count, last - first + 1, "{trial}: {id} is split in the log");
            tally.errored_but_durable += 1;
        }
    }
    // Nothing else is in the log: every record belongs to an acknowledged command, a timer, or
    // (failed syncs only, checked above) a command that got an error.
    let acked_ids: std::collections::HashSet<&str> = acked.values().map(|(id, _)| *id).collect();
    let errored_ids: std::collections::HashSet<&str> = errored.iter().copied().collect();
    for record in &records {
        let id = record.command_id.as_str();
        assert!(
            acked_ids.contains(id) || errored_ids.contains(id) || id.starts_with("timer:"),
            "{trial}: seq {} carries command id {id}, which nobody was told about",
            record.seq
        );
    }
    let (folded, _, _) = fold_to_head(&reader, writer.handle().snapshots()).expect("fold to head");
    let scratch = fold_from_scratch(&records);
    assert_eq!(folded.digest(), scratch.digest(), "{trial}: startup fold differs from the fold from scratch");
    assert_eq!(writer.handle().read(|l| l.digest()).expect("read"), scratch.digest(), "{trial}: writer's ledger");

    // Writes resume on a healthy disk.
    let resumed = writer
        .handle()
        .execute(Envelope {
            command_id: format!("{trial}-resumed"),
            actor: "tester".into(),
            command: Command::CreateTask(job(999_999_998, "resumed")),
        })
        .unwrap_or_else(|e| panic!("{trial}: a write after reopening: {e}"));
    assert_eq!(resumed.seqs.map(|s| s.first), Some(startup.head.seq + 1), "{trial}");
    writer.shutdown();
    tally.trials += 1;
}

fn run_matrix(op: FaultOp, mode: FaultMode, error: FaultError) {
    let mut tally = Tally::default();
    for k in 1..=k_max(op) {
        run_trial(op, mode, error, k, &mut tally);
    }
    println!(
        "faults {op:?} {mode:?} {error:?}: {} trials (k = 1..={}), {} commands acknowledged and found at their seqs, \
         {} failed in the commit, {} refused afterwards, {} errored but durable (failed sync)",
        tally.trials,
        k_max(op),
        tally.acked,
        tally.failed_in_commit,
        tally.refused_after,
        tally.errored_but_durable
    );
}

#[test]
fn the_kth_write_fails_once() {
    run_matrix(FaultOp::Write, FaultMode::Once, FaultError::Io);
}

#[test]
fn the_kth_write_fails_from_then_on() {
    run_matrix(FaultOp::Write, FaultMode::FromThenOn, FaultError::Io);
}

#[test]
fn the_kth_sync_fails_once() {
    run_matrix(FaultOp::SyncData, FaultMode::Once, FaultError::Io);
}

#[test]
fn the_kth_sync_fails_from_then_on() {
    run_matrix(FaultOp::SyncData, FaultMode::FromThenOn, FaultError::Io);
}

/// Disk full: every write from the k-th on returns ENOSPC. Commands get `StorageFull` (HTTP 507
/// `insufficient_storage`, see `api/src/error.rs`), then `Unavailable` (503); everything
/// acknowledged survives, reads and the feed keep working, and writes resume after a restart
/// with space.
#[test]
fn a_full_disk_refuses_writes_and_keeps_everything_acknowledged() {
    run_matrix(FaultOp::Write, FaultMode::FromThenOn, FaultError::NoSpace);
}
