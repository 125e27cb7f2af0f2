//! Model-based test of `RedbStore` against an in-memory model (a `Vec` of records and a list of
//! outcomes), with crash/reopen transitions and commit failures injected through
//! `FaultyBackend` and into the write-ahead journal. After every reopen the whole log must
//! verify clean. The journal is as small as allowed, so runs cross many checkpoints, and
//! batches without outcomes go through it while batches with outcomes are checkpoints.

use eventlog::{
    AppendError, FaultError, FaultHandle, FaultMode, FaultOp, FaultPlan, FaultTarget, FaultyBackend, Head, LogStore,
    NewRecord, RedbOptions, RedbStore, StoredRecord, verify,
};
use proptest::prelude::*;

const WINDOW: usize = 4;
const STREAMS: u8 = 4;
const START_US: i64 = 1_000_000_000;

#[derive(Clone, Debug)]
struct Batch {
    /// (stream, payload length, time step in µs) per record.
    records: Vec<(u8, u8, u32)>,
    /// Number of commands with an outcome in this batch.
    commands: u8,
    /// Make one record go back in time (the whole batch must be rejected).
    backwards: Option<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Append(Batch),
    FailedAppend {
        batch: Batch,
        sync: bool,
        nth: u64,
    },
    ReadRange {
        from: u8,
        len: u8,
        max: u8,
    },
    ReadStream {
        stream: u8,
        from: u8,
        max: u8,
    },
    ReadTime {
        from: u16,
        len: u32,
        max: u8,
    },
    Outcome {
        back: u8,
    },
    Reopen,
    /// The process dies between two appends: reopen a copy of the files as they are now (what
    /// SIGKILL leaves: every write made, no checkpoint, redb not closed).
    Crash,
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        prop::collection::vec((0..STREAMS, any::<u8>(), prop_oneof![Just(0u32), 0..3_000_000u32]), 0..8),
        0..3u8,
        prop::option::weighted(0.15, 0..8usize),
    )
        .prop_map(|(records, commands, backwards)| Batch {
            backwards: backwards.filter(|i| *i < records.len()),
            records,
            commands,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => batch().prop_map(Op::Append),
        1 => (batch(), any::<bool>(), 1..4u64).prop_map(|(batch, sync, nth)| Op::FailedAppend { batch, sync, nth }),
        2 => (any::<u8>(), any::<u8>(), 0..20u8).prop_map(|(from, len, max)| Op::ReadRange { from, len, max }),
        2 => (0..STREAMS + 1, 0..10u8, 0..10u8).prop_map(|(stream, from, max)| Op::ReadStream { stream, from, max }),
        2 => (any::<u16>(), 0..5_000_000u32, 0..20u8).prop_map(|(from, len, max)| Op::ReadTime { from, len, max }),
        2 => any::<u8>().prop_map(|back| Op::Outcome { back }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

struct Model {
    records: Vec<StoredRecord>,
    /// (command id, seq, outcome) in insertion order.
    outcomes: Vec<(String, u64, Vec<u8>)>,
    next_command: u64,
}

impl Model {
    fn last_us(&self) -> i64 {
        self.records.last().map_or(START_US, |r| r.recorded_at_us)
    }

    fn head(&self) -> Head {
        self.records.last().map_or(Head::EMPTY, |r| Head { seq: r.seq, hash: r.hash })
    }

    fn stream_version(&self, stream: &[u8]) -> u64 {
        self.records.iter().filter(|r| r.stream == stream).count() as u64
    }

    /// The records and outcomes `batch` asks for.
    fn build(&mut self, batch: &Batch) -> (Vec<NewRecord>, Vec<(String, Vec<u8>)>) {
        let commands: Vec<String> = (0..batch.commands)
            .map(|_| {
                self.next_command += 1;
                format!("cmd-{}", self.next_command)
            })
            .collect();
        let mut at = self.last_us();
        let records = batch
            .records
            .iter()
            .enumerate()
            .map(|(i, (stream, len, step))| {
                let previous = at;
                at += i64::from(*step);
                let recorded_at_us = if batch.backwards == Some(i) { previous - 1 } else { at };
                NewRecord {
                    stream: format!("stream-{stream}").into_bytes(),
                    command_id: commands.get(i % commands.len().max(1)).cloned().unwrap_or_default(),
                    actor: "model".into(),
                    recorded_at_us,
                    event_type: u16::from(*stream),
                    schema_version: 1,
                    payload: vec![*len; usize::from(*len)],
                }
            })
            .collect();
        let outcomes = commands.iter().map(|c| (c.clone(), c.as_bytes().to_vec())).collect();
        (records, outcomes)
    }

    /// Checks what the store wrote for an accepted batch and applies it.
    fn accept(&mut self, new: &[NewRecord], outcomes: &[(String, Vec<u8>)], written: &[StoredRecord]) {
        assert_eq!(new.len(), written.len());
        for (n, w) in new.iter().zip(written) {
            assert_eq!(w.seq, self.records.len() as u64 + 1);
            assert_eq!(w.stream_version, self.stream_version(&n.stream) + 1);
            assert_eq!(
                (&w.stream, &w.command_id, &w.actor, w.recorded_at_us, w.event_type, w.schema_version, &w.payload),
                (&n.stream, &n.command_id, &n.actor, n.recorded_at_us, n.event_type, n.schema_version, &n.payload)
            );
            self.records.push(w.clone());
        }
        let head = self.records.len() as u64;
        for (command, outcome) in outcomes {
            let seq = written.iter().rev().find(|r| &r.command_id == command).map_or(head, |r| r.seq);
            self.outcomes.push((command.clone(), seq, outcome.clone()));
        }
    }

    fn outcome(&self, command: &str) -> Option<(u64, Vec<u8>)> {
        let window_start = self.outcomes.len().saturating_sub(WINDOW);
        self.outcomes[window_start..]
            .iter()
            .find(|(c, _, _)| c == command)
            .map(|(_, seq, outcome)| (*seq, outcome.clone()))
    }
}

struct Harness {
    dir: tempfile::TempDir,
    store: Option<RedbStore>,
    faults: FaultHandle,
}

fn options(faults: &FaultHandle) -> RedbOptions {
    RedbOptions {
        dedup_window_entries: WINDOW,
        cache_bytes: 1 << 20,
        stream_cache_entries: 3,
        snapshots_keep: 2,
        check_integrity_on_open: false,
        // Small, so runs cross many index flushes, and reads and reopens meet both an indexed
        // part and an unindexed tail.
        stream_index_lag_records: 3,
        // The smallest journal: a checkpoint every 15 journaled batches, so runs cross many.
        journal_bytes: eventlog::journal::JOURNAL_BYTES_MIN,
        journal_faults: Some(faults.clone()),
        journal_loss: eventlog::JournalLoss::Refuse,
    }
}

impl Harness {
    fn open(&mut self) {
        self.store = None;
        let (backend, faults) = FaultyBackend::for_log_in(self.dir.path()).unwrap();
        self.store = Some(RedbStore::open_with_backend(self.dir.path(), backend, options(&faults)).unwrap());
        self.faults = faults;
    }

    fn store(&mut self) -> &mut RedbStore {
        self.store.as_mut().unwrap()
    }

    fn check_after_reopen(&mut self, model: &Model) {
        let store = self.store.as_ref().unwrap();
        assert_eq!(store.head(), model.head());
        let report = verify(&store.reader(), |_, _| {}).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.records, model.records.len() as u64);
        assert_eq!(report.head, model.head());
    }
}

fn run(ops: Vec<Op>) {
    let mut harness = Harness { dir: tempfile::tempdir().unwrap(), store: None, faults: FaultHandle::default() };
    harness.open();
    let mut model = Model { records: Vec::new(), outcomes: Vec::new(), next_command: 0 };
    for op in ops {
        match op {
            Op::Append(mut batch) => {
                // The very first record of a log cannot go back in time.
                batch.backwards = batch.backwards.filter(|i| *i > 0 || !model.records.is_empty());
                let (records, outcomes) = model.build(&batch);
                let result = harness.store().append(&records, &outcomes);
                if batch.backwards.is_some() {
                    assert!(matches!(result, Err(AppendError::TimeWentBackwards { .. })), "{result:?}");
                } else {
                    let appended = result.unwrap();
                    model.accept(&records, &outcomes, &appended.records);
                }
                assert_eq!(harness.store().head(), model.head());
            }
            Op::FailedAppend { batch, sync, nth } => {
                let batch = Batch { backwards: None, ..batch };
                let (records, outcomes) = model.build(&batch);
                harness.faults.arm(FaultPlan {
                    op: if sync { FaultOp::SyncData } else { FaultOp::Write },
                    nth,
                    mode: FaultMode::FromThenOn,
                    error: FaultError::NoSpace,
                });
                match harness.store().append(&records, &outcomes) {
                    Ok(appended) => {
                        let tripped = harness.faults.tripped();
                        harness.faults.disarm();
                        model.accept(&records, &outcomes, &appended.records);
                        if tripped {
                            // The fault hit the journal's restart after a checkpoint had made the
                            // batch durable: written, but the store takes nothing more.
                            assert!(matches!(harness.store().append(&records, &[]), Err(AppendError::Poisoned)));
                            harness.open();
                            harness.check_after_reopen(&model);
                        }
                    }
                    Err(error) => {
                        assert!(matches!(error, AppendError::Backend(_)), "{error:?}");
                        assert!(matches!(harness.store().append(&records, &[]), Err(AppendError::Poisoned)));
                        // A batch without outcomes was fsynced in the journal before redb's
                        // commit, so a failure in redb's write after that leaves it durable.
                        let durable_before_failure =
                            outcomes.is_empty() && harness.faults.tripped_on() == Some(FaultTarget::LogFile);
                        harness.open();
                        let on_disk = harness.store().head().seq;
                        let before = model.records.len() as u64;
                        let outcome_kept =
                            outcomes.first().map(|(command, _)| harness.store().outcome(command).is_some());
                        if on_disk != before || outcome_kept == Some(true) {
                            // Only a failed fsync after the data reached the file may leave
                            // the batch in place, and then all of it.
                            assert!(sync || durable_before_failure, "a failed write left a batch behind");
                            assert_eq!(on_disk, before + records.len() as u64);
                            assert_ne!(outcome_kept, Some(false));
                            let written = harness.store().reader().read_range(before + 1, on_disk, 100).unwrap();
                            model.accept(&records, &outcomes, &written);
                        }
                        harness.check_after_reopen(&model);
                    }
                }
            }
            Op::ReadRange { from, len, max } => {
                let from = u64::from(from) % (model.records.len() as u64 + 2);
                let to = from + u64::from(len);
                let got = harness.store().reader().read_range(from, to, usize::from(max)).unwrap();
                let expected: Vec<_> = model
                    .records
                    .iter()
                    .filter(|r| r.seq >= from.max(1) && r.seq <= to)
                    .take(usize::from(max))
                    .cloned()
                    .collect();
                assert_eq!(got, expected);
            }
            Op::ReadStream { stream, from, max } => {
                let stream = format!("stream-{stream}").into_bytes();
                let got = harness.store().reader().read_stream(&stream, u64::from(from), usize::from(max)).unwrap();
                let expected: Vec<_> = model
                    .records
                    .iter()
                    .filter(|r| r.stream == stream && r.stream_version >= u64::from(from))
                    .take(usize::from(max))
                    .cloned()
                    .collect();
                assert_eq!(got, expected);
                let version = model.stream_version(&stream);
                assert_eq!(harness.store().stream_version(&stream).unwrap(), version);
                assert_eq!(harness.store().reader().stream_version(&stream).unwrap(), version);
            }
            Op::ReadTime { from, len, max } => {
                let span = (model.last_us() - START_US).max(1);
                let from_us = START_US - 1_000_000 + (i64::from(from) * (span + 2_000_000)) / i64::from(u16::MAX);
                let to_us = from_us + i64::from(len);
                let got = harness.store().reader().read_time_range(from_us, to_us, usize::from(max)).unwrap();
                let expected: Vec<_> = model
                    .records
                    .iter()
                    .filter(|r| r.recorded_at_us >= from_us && r.recorded_at_us <= to_us)
                    .take(usize::from(max))
                    .cloned()
                    .collect();
                assert_eq!(got, expected, "from {from_us} to {to_us}");
            }
            Op::Outcome { back } => {
                let command = format!("cmd-{}", model.next_command.saturating_sub(u64::from(back % 8)));
                assert_eq!(harness.store().outcome(&command), model.outcome(&command), "{command}");
            }
            Op::Crash => {
                let image = tempfile::tempdir().unwrap();
                for name in ["ledger.redb", "ledger.journal", "ledger.journal.1"] {
                    let from = harness.dir.path().join(name);
                    if from.exists() {
                        std::fs::copy(&from, image.path().join(name)).unwrap();
                    }
                }
                // The old store closes on its own files; the image is what a crash left.
                harness.store = None;
                harness.dir = image;
                harness.open();
                harness.check_after_reopen(&model);
                for (command, _, _) in &model.outcomes {
                    assert_eq!(harness.store().outcome(command), model.outcome(command));
                }
            }
            Op::Reopen => {
                harness.open();
                harness.check_after_reopen(&model);
                for (command, _, _) in &model.outcomes {
                    assert_eq!(harness.store().outcome(command), model.outcome(command));
                }
            }
        }
    }
    harness.open();
    harness.check_after_reopen(&model);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..30)) {
        run(ops);
    }
}

/// The fault paths above must actually fire: a failed commit is refused, poisons the store,
/// and after a reopen only the acknowledged batches are there.
#[test]
fn injected_commit_failures_fire_and_lose_only_the_failed_batch() {
    for (op, nth) in [(FaultOp::Write, 1), (FaultOp::Write, 2), (FaultOp::SyncData, 1)] {
        let mut harness = Harness { dir: tempfile::tempdir().unwrap(), store: None, faults: FaultHandle::default() };
        harness.open();
        let mut model = Model { records: Vec::new(), outcomes: Vec::new(), next_command: 0 };
        let batch = Batch { records: vec![(0, 10, 5), (1, 20, 5)], commands: 1, backwards: None };
        let (records, outcomes) = model.build(&batch);
        let appended = harness.store().append(&records, &outcomes).unwrap();
        model.accept(&records, &outcomes, &appended.records);
        harness.faults.arm(FaultPlan { op, nth, mode: FaultMode::Once, error: FaultError::Io });
        let (records, outcomes) = model.build(&batch);
        let error = harness.store().append(&records, &outcomes).unwrap_err();
        assert!(matches!(error, AppendError::Backend(_)), "{error:?}");
        assert!(harness.faults.tripped());
        harness.open();
        if op == FaultOp::Write {
            harness.check_after_reopen(&model);
            assert_eq!(harness.store().outcome(&outcomes[0].0), None);
        } else {
            let seq = harness.store().head().seq;
            assert!(seq == 2 || seq == 4, "{seq}");
        }
    }
}
