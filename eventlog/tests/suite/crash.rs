//! Crash test: the writer killed with SIGKILL at random moments loses nothing it acknowledged.
//!
//! The parent test runs this same test binary again as a child process (see `crash_child`).
//! The child opens the writer on a data directory and drives it from several submitter threads
//! with a mix of creates (single and batched), claims, heartbeats, completions, failures and
//! repeated command ids; it prints one line per acknowledgement only after `execute` returned
//! `Ok`. The parent kills it with SIGKILL after a random delay (sometimes during startup),
//! reopens the log, and checks after every kill that
//!
//! - `verify` is clean: seqs gapless from 1, stream versions, the whole hash chain, the head;
//! - every acknowledged command's events are at exactly the seqs it was told: the records
//!   there carry its command id, no other record does, and they decode to the same events;
//! - every acknowledgement of one command id (the original and any deduplicated repeat, in
//!   this run or a later one) names the same seqs and events;
//! - the ledger rebuilt the way startup does it (newest good snapshot plus the tail, with
//!   snapshots taken every few hundred events and sometimes cut short by the kill, which
//!   leaves a temporary file behind) has the same digest as a fold of the whole log from
//!   scratch, without snapshots;
//! - the next child starts at exactly the head the parent saw.
//!
//! Each run continues the previous log, so recovery is exercised on a growing history; the
//! parent extends its fold and its index of the log after each kill rather than redoing them
//! (see `check_after_kill` for why that is equivalent), so long runs stay affordable. Why a
//! process and SIGKILL rather than an injected fault: only a real kill stops every thread at
//! an arbitrary instruction, including between the commit and the acknowledgement and in the
//! middle of a snapshot file. The seed is printed; rerun with `TASKLEDGER_CRASH_SEED=<seed>`
//! (timing still varies, so a rerun explores nearby schedules rather than the same one).
//! `TASKLEDGER_CRASH_KILLS` sets the number of kills (default 50).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use domain::testkit::{job, lease, ns, step, task_id, text, worker, workflow};
use domain::{Command, Event, LeaseEpoch, Ledger, StepName, TaskId};
use eventlog::{
    Acknowledgement, Envelope, LogReader, LogStore, RedbOptions, RedbStore, SystemClock, WriterConfig, WriterHandle,
    decode_event, fold_to_head, verify,
};

/// Set in the child's environment: the data directory to drive.
const CHILD_DIR_ENV: &str = "TASKLEDGER_CRASH_CHILD_DIR";
/// The run number (makes the child's command and task ids unique across runs).
const CHILD_RUN_ENV: &str = "TASKLEDGER_CRASH_CHILD_RUN";
const CHILD_SEED_ENV: &str = "TASKLEDGER_CRASH_CHILD_SEED";
const KILLS_ENV: &str = "TASKLEDGER_CRASH_KILLS";
const SEED_ENV: &str = "TASKLEDGER_CRASH_SEED";
/// The name of the test function that acts as the child, as libtest names it in the suite
/// binary (`--exact` needs the module path).
const CHILD_TEST: &str = "crash::crash_child";

const KILLS_DEFAULT: u64 = 50;
const SUBMITTERS: u64 = 8;
/// Small, so that most runs write snapshots and some kills land in the middle of one.
const SNAPSHOT_EVERY_EVENTS: u64 = 250;
const NAMESPACES: [&str; 3] = ["alpha", "beta", "gamma"];
/// Longest the child runs after it reported its startup before it is killed.
const RUN_MS_MAX: u64 = 250;
/// How often (in percent) the kill comes without waiting for the startup report, so that some
/// kills land while the child opens the log and folds it.
const EARLY_KILL_PERCENT: u64 = 12;
const EARLY_KILL_MS_MAX: u64 = 60;
/// Task ids: run × RUN_TASKS + submitter × SUBMITTER_TASKS + counter, unique across runs.
const RUN_TASKS: u64 = 100_000_000;
const SUBMITTER_TASKS: u64 = 10_000_000;
/// Old command ids the child samples from the log at startup to repeat.
const OLD_IDS_SAMPLED: usize = 32;
const READ_BATCH_RECORDS: usize = 8192;
/// Every this many kills the parent redoes its checks from seq 1 and reports progress.
const FULL_CHECK_EVERY_KILLS: u64 = 25;

// Deterministic delays and commands from the printed seed.
use domain::testkit::SplitMix as Rng;

/// The dedup window is made larger than the whole test's history, so every repeat of an
/// acknowledged id must be answered from it. The journal is small (a checkpoint every ~250
/// one-record batches), so kills land in the journal, in checkpoints and between them.
fn store_options() -> RedbOptions {
    RedbOptions {
        dedup_window_entries: 10_000_000,
        cache_bytes: 64 * 1024 * 1024,
        journal_bytes: 1024 * 1024,
        ..RedbOptions::default()
    }
}

fn child_config() -> WriterConfig {
    WriterConfig {
        snapshot_every_events: SNAPSHOT_EVERY_EVENTS,
        channel_capacity: 1024,
        store: store_options(),
        ..WriterConfig::default()
    }
}

/// The digest an acknowledgement line carries: BLAKE3 over the postcard encoding of each
/// event, in order. The parent recomputes it from the decoded records.
fn events_digest<'a>(events: impl IntoIterator<Item = &'a Event>) -> String {
    let mut hasher = blake3::Hasher::new();
    for event in events {
        hasher.update(&postcard::to_stdvec(event).expect("events serialize"));
    }
    hasher.finalize().to_hex().to_string()
}

// ---------------------------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------------------------

/// The child process's body. Without `TASKLEDGER_CRASH_CHILD_DIR` it returns at once: it is an
/// ordinary test only so that the test binary, re-run by the parent with
/// `--exact crash::crash_child`, has an entry point to run (that works the same under libtest and
/// nextest, which runs libtest binaries). It must not be `#[ignore]`d, since the child could
/// then not run it without `--ignored`, and in a normal test run it does nothing.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else { return };
    let env_u64 = |name: &str| -> u64 {
        std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} is set by the parent"))
    };
    run_child(Path::new(&dir), env_u64(CHILD_RUN_ENV), env_u64(CHILD_SEED_ENV));
}

/// Writes one whole line and flushes it, under the stdout lock so lines never interleave. A
/// line is written with one `write` (it is far shorter than a pipe's atomic size), so the kill
/// can only cut off the last one, which the parent then ignores.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let mut bytes = line.as_bytes().to_vec();
    bytes.push(b'\n');
    if out.write_all(&bytes).and_then(|()| out.flush()).is_err() {
        // The parent is gone: nobody is watching, so stop rather than run on.
        std::process::exit(1);
    }
}

fn run_child(dir: &Path, run: u64, seed: u64) -> ! {
    let (writer, startup) =
        eventlog::Writer::open(dir, child_config(), Arc::new(SystemClock)).expect("open the log in the child");
    // The leading newline ends libtest's "test crash_child ... " so that OPEN starts a line.
    emit(&format!(
        "\nOPEN {} {} {}",
        startup.head.seq,
        startup.fold.snapshot_seq,
        startup.fold.skipped_snapshots.len()
    ));
    let handle = writer.handle();
    let old_ids = Arc::new(sample_old_ids(&handle, startup.head.seq, &mut Rng(seed)));
    let threads: Vec<_> = (0..SUBMITTERS)
        .map(|thread| {
            let mut submitter = Submitter {
                handle: handle.clone(),
                run,
                thread,
                rng: Rng(seed ^ (thread + 1).wrapping_mul(0xa076_1d64_78bd_642f)),
                commands: 0,
                tasks: 0,
                leases: Vec::new(),
                acked: Vec::new(),
                old_ids: old_ids.clone(),
            };
            std::thread::spawn(move || submitter.run())
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    // The submitters never return; if one panicked, fail loudly so the parent notices.
    panic!("a submitter thread stopped");
}

/// Command ids of records from earlier runs, to repeat: each was committed (whether or not its
/// acknowledgement got out before the kill), so its repeat must be deduplicated. Timer ids are
/// skipped: system commands keep no outcome.
fn sample_old_ids(handle: &WriterHandle, head: u64, rng: &mut Rng) -> Vec<String> {
    if head == 0 {
        return Vec::new();
    }
    (0..OLD_IDS_SAMPLED)
        .filter_map(|_| {
            let seq = 1 + rng.below(head);
            let records = handle.reader().read_range(seq, seq, 1).expect("read a record in the child");
            records.into_iter().next().map(|r| r.command_id).filter(|id| !id.starts_with("timer:"))
        })
        .collect()
}

struct Submitter {
    handle: WriterHandle,
    run: u64,
    thread: u64,
    rng: Rng,
    commands: u64,
    tasks: u64,
    /// Leases this worker holds (task, step, epoch).
    leases: Vec<(TaskId, StepName, u32)>,
    /// Envelopes of this thread's commands acknowledged with events, to repeat.
    acked: Vec<Envelope>,
    old_ids: Arc<Vec<String>>,
}

impl Submitter {
    fn run(&mut self) {
        loop {
            let roll = self.rng.below(100);
            if roll < 4 && !self.acked.is_empty() {
                let envelope = self.rng.pick(&self.acked).clone();
                self.repeat(envelope);
            } else if roll < 6 && !self.old_ids.is_empty() {
                // The command sent with an old id does not matter: a deduplicated repeat is
                // answered from the stored outcome without being decided.
                let id = self.rng.pick(&self.old_ids).clone();
                let bogus = Command::Heartbeat { lease: lease(task_id(0), "run", 1), lease_ms: None };
                self.repeat(Envelope { command_id: id, actor: "crash".into(), command: bogus });
            } else {
                let command = self.next_command(roll);
                self.send(command);
            }
        }
    }

    fn next_command(&mut self, roll: u64) -> Command {
        let namespace = *self.rng.pick(&NAMESPACES);
        // Creates add about as many steps as the workers finish, so the ledger (and with it
        // snapshots and startup) stays small while the log grows.
        if roll < 18 {
            let n = self.next_task();
            let spec = if self.rng.percent(30) {
                workflow(n, namespace, vec![step("a", "work", &[]), step("b", "work", &["a"])])
            } else {
                job(n, namespace)
            };
            return Command::CreateTask(spec);
        }
        if roll < 24 {
            let count = 2 + self.rng.below(5);
            return Command::CreateTasks((0..count).map(|_| job(self.next_task(), namespace)).collect());
        }
        if roll < 44 || self.leases.is_empty() {
            // Short leases expire within a run or across a kill, so timers fire too.
            let lease_ms = *self.rng.pick(&[150, 2_000, 30_000]);
            return Command::ClaimSteps {
                namespaces: vec![ns(namespace)],
                worker: worker(&format!("w{}", self.thread)),
                max: 1 + self.rng.below(4) as u32,
                lease_ms: Some(lease_ms),
                handlers: Vec::new(),
            };
        }
        let index = self.rng.below(self.leases.len() as u64) as usize;
        let (task, step, epoch) = self.leases[index].clone();
        let lease = domain::LeaseRef { task, step, epoch: LeaseEpoch(epoch) };
        let action = self.rng.below(100);
        if action < 15 {
            return Command::Heartbeat { lease, lease_ms: Some(2_000) };
        }
        self.leases.swap_remove(index);
        if action < 80 {
            Command::CompleteStep { lease, result: domain::Json::null() }
        } else {
            Command::FailStep { lease, error: text("crash test"), retryable: self.rng.percent(70) }
        }
    }

    fn next_task(&mut self) -> u64 {
        self.tasks += 1;
        assert!(self.tasks < SUBMITTER_TASKS, "task ids of one submitter stay in its range");
        self.run * RUN_TASKS + self.thread * SUBMITTER_TASKS + self.tasks
    }

    fn send(&mut self, command: Command) {
        self.commands += 1;
        let envelope = Envelope {
            command_id: format!("r{}-t{}-{}", self.run, self.thread, self.commands),
            actor: format!("crash-{}", self.thread),
            command,
        };
        // Rejections (a lease lost to expiry, nothing to heartbeat) are part of the mix and
        // print nothing: only acknowledgements are promises.
        let Ok(ack) = self.handle.execute(envelope.clone()) else { return };
        emit(&ack_line(&envelope.command_id, &ack));
        for work in &ack.claimed {
            self.leases.push((work.task, work.step.clone(), work.epoch.0));
        }
        if ack.seqs.is_some() {
            self.acked.push(envelope);
        }
    }

    /// Sends a command id that is known to have been committed; it must come back as the
    /// original outcome.
    fn repeat(&mut self, envelope: Envelope) {
        match self.handle.execute(envelope.clone()) {
            Ok(ack) if ack.duplicate && ack.seqs.is_some() => emit(&ack_line(&envelope.command_id, &ack)),
            Ok(ack) => emit(&format!("BADDUP {} answered as new: {:?}", envelope.command_id, ack.seqs)),
            Err(error) => emit(&format!("BADDUP {} refused: {error}", envelope.command_id)),
        }
    }
}

/// `ACK <command id> <first seq> <last seq> <events digest> <duplicate 0|1>`; seqs are 0 for a
/// command that changed nothing.
fn ack_line(command_id: &str, ack: &Acknowledgement) -> String {
    let (first, last) = ack.seqs.map_or((0, 0), |s| (s.first, s.last));
    format!("ACK {command_id} {first} {last} {} {}", events_digest(&ack.events), u8::from(ack.duplicate))
}

// ---------------------------------------------------------------------------------------------
// The parent
// ---------------------------------------------------------------------------------------------

/// One command's acknowledged outcome, as first printed.
struct Acked {
    first: u64,
    last: u64,
    digest: String,
    run: u64,
    /// The records at its seqs were decoded and compared with `digest`.
    events_checked: bool,
}

#[derive(Default)]
struct History {
    acked: HashMap<String, Acked>,
    /// The head the parent saw after the last kill (the next child must start there); the
    /// hash is the chain hash of record `head_seq` (unused while it is 0).
    head_seq: u64,
    head_hash: eventlog::Hash,
    /// The fold of records 1..=head, from an empty ledger, never from a snapshot.
    scratch: Ledger,
    /// Where each command id's records are, over records 1..=head.
    spans: HashMap<String, Span>,
    ack_lines: u64,
    duplicate_lines: u64,
    child_starts: u64,
    starts_from_snapshot: u64,
    folds_from_snapshot: u64,
    skipped_snapshots: u64,
    live_tasks: usize,
    last_snapshot_seq: u64,
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let kills = std::env::var(KILLS_ENV).ok().map_or(KILLS_DEFAULT, |v| v.parse().expect("a number of kills"));
    let seed = std::env::var(SEED_ENV).ok().map_or_else(
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
        |v| v.parse().expect("a numeric seed"),
    );
    eprintln!("crash test: {kills} kills, seed {seed} (rerun with {SEED_ENV}={seed})");
    let started = Instant::now();
    let data = tempfile::tempdir().expect("temp dir");
    let dir = data.path().join("ledger");
    let mut rng = Rng(seed);
    let mut history = History::default();
    for run in 0..kills {
        let lines = run_and_kill(&dir, run, &mut rng, seed);
        absorb(&mut history, run, &lines, seed);
        let every = (run + 1) % FULL_CHECK_EVERY_KILLS == 0;
        check_after_kill(&dir, &mut history, run, seed, every || run + 1 == kills);
        if every {
            eprintln!(
                "crash test: {} kills in {:.1?}, log head {}, {} live tasks, last fold from snapshot seq {}",
                run + 1,
                started.elapsed(),
                history.head_seq,
                history.live_tasks,
                history.last_snapshot_seq
            );
        }
    }
    let leftover_temp_files = std::fs::read_dir(dir.join("snapshots"))
        .map(|entries| {
            entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).count()
        })
        .unwrap_or(0);
    eprintln!(
        "crash test: {kills} kills in {:.1?}; log head {}; {} acknowledgements ({} deduplicated repeats) of {} command ids; \
         {} child starts, {} from a snapshot; {} parent folds from a snapshot; {} snapshots skipped; \
         {leftover_temp_files} snapshot temp files left by kills",
        started.elapsed(),
        history.head_seq,
        history.ack_lines,
        history.duplicate_lines,
        history.acked.len(),
        history.child_starts,
        history.starts_from_snapshot,
        history.folds_from_snapshot,
        history.skipped_snapshots,
    );
    // The test proves something only if the children got work acknowledged and snapshots were
    // written and used; these are properties of the run, not of its timing.
    assert!(history.ack_lines > 0, "seed {seed}: no command was ever acknowledged");
    assert!(history.folds_from_snapshot > 0, "seed {seed}: no reopen ever started from a snapshot");
}

/// Starts a child on `dir`, kills it at a random moment, and returns the lines it fully printed.
fn run_and_kill(dir: &Path, run: u64, rng: &mut Rng, seed: u64) -> Vec<String> {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Process::new(exe)
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_RUN_ENV, run.to_string())
        .env(CHILD_SEED_ENV, rng.next_u64().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    // A thread reads the pipe so the child never blocks on a full pipe while the parent sleeps.
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = Vec::new();
        loop {
            line.clear();
            match stdout.read_until(b'\n', &mut line) {
                // A last line without its newline was cut by the kill: it never counted.
                Ok(_) if line.last() == Some(&b'\n') => {
                    line.pop();
                    if tx.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });

    let mut lines = Vec::new();
    let delay_ms = if rng.percent(EARLY_KILL_PERCENT) {
        rng.below(EARLY_KILL_MS_MAX)
    } else {
        // Wait for the startup report, then let it run.
        loop {
            match rx.recv() {
                Ok(line) => {
                    assert!(!line.starts_with("ACK "), "seed {seed}, run {run}: the child's OPEN line was not seen");
                    let opened = line.starts_with("OPEN ");
                    lines.push(line);
                    if opened {
                        break;
                    }
                }
                Err(_) => {
                    let status = child.wait().expect("wait for the child");
                    panic!("seed {seed}, run {run}: the child exited before opening the log: {status}");
                }
            }
        }
        rng.below(RUN_MS_MAX)
    };
    std::thread::sleep(Duration::from_millis(delay_ms));
    // `Child::kill` is SIGKILL on Unix.
    child.kill().expect("kill the child");
    let status = child.wait().expect("wait for the child");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "seed {seed}, run {run}: the child ended on its own ({status}), not by the kill"
    );
    reader.join().expect("stdout reader");
    lines.extend(rx.try_iter());
    lines
}

/// Records what a child printed; every acknowledgement of one command id must agree.
fn absorb(history: &mut History, run: u64, lines: &[String], seed: u64) {
    for line in lines {
        let fields: Vec<&str> = line.split(' ').collect();
        match fields.as_slice() {
            ["OPEN", head, snapshot_seq, skipped] => {
                let head: u64 = head.parse().expect("OPEN head");
                assert_eq!(
                    head, history.head_seq,
                    "seed {seed}, run {run}: the writer started at seq {head}, but the log held {} after the last kill",
                    history.head_seq
                );
                history.child_starts += 1;
                history.starts_from_snapshot += u64::from(snapshot_seq.parse::<u64>().expect("OPEN snapshot") > 0);
                history.skipped_snapshots += skipped.parse::<u64>().expect("OPEN skipped");
            }
            ["ACK", id, first, last, digest, duplicate] => {
                let first: u64 = first.parse().expect("ACK first");
                let last: u64 = last.parse().expect("ACK last");
                history.ack_lines += 1;
                history.duplicate_lines += u64::from(*duplicate == "1");
                let seen = history.acked.entry((*id).to_owned()).or_insert_with(|| Acked {
                    first,
                    last,
                    digest: (*digest).to_owned(),
                    run,
                    events_checked: false,
                });
                assert!(
                    (seen.first, seen.last, seen.digest.as_str()) == (first, last, *digest),
                    "seed {seed}, run {run}: command {id} acknowledged as seqs {first}..={last} (events {digest}), \
                     but in run {} as {}..={} (events {})",
                    seen.run,
                    seen.first,
                    seen.last,
                    seen.digest
                );
            }
            ["BADDUP", ..] => panic!("seed {seed}, run {run}: a repeated command id was not deduplicated: {line}"),
            // libtest's own output ("running 1 test", ...).
            _ => {}
        }
    }
}

/// Where one command id's records are in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    first: u64,
    last: u64,
    records: u64,
}

/// Reopens the log as the next child will, and checks everything acknowledged so far.
///
/// Most of the work is incremental, so that long runs stay linear in the log's length: the
/// parent keeps the fold of the log from scratch and an index of which seqs carry which command
/// id, and extends both with the records written since the last kill. That is the same as
/// redoing them from seq 1 because `verify` checks the whole chain and the record at the old
/// head must still have the old head's hash, so the earlier records are byte for byte the ones
/// already folded. Every `FULL_CHECK_EVERY_KILLS` kills, and after the last one, everything is
/// redone from seq 1 anyway.
fn check_after_kill(dir: &Path, history: &mut History, run: u64, seed: u64, full: bool) {
    let context = format!("seed {seed}, after kill {run}");
    let store = RedbStore::open(dir, store_options()).unwrap_or_else(|e| panic!("{context}: reopen the log: {e}"));
    let reader = store.reader();

    let report = verify(&reader, |_, _| {}).unwrap_or_else(|e| panic!("{context}: verify: {e}"));
    assert!(report.is_clean(), "{context}: verify found {:?}", report.first_problem);
    let head = reader.head().unwrap_or_else(|e| panic!("{context}: read the head: {e}"));
    assert_eq!(report.records, head.seq, "{context}: verify saw {} records, the head is {}", report.records, head.seq);
    assert!(head.seq >= history.head_seq, "{context}: the head went back from {} to {}", history.head_seq, head.seq);
    if history.head_seq > 0 {
        let hash = reader.record_hash(history.head_seq).unwrap_or_else(|e| panic!("{context}: read a hash: {e}"));
        assert_eq!(hash, Some(history.head_hash), "{context}: record {} changed since the last kill", history.head_seq);
    }

    // What startup does: the newest good snapshot, then the tail.
    let (startup_ledger, fold_head, stats) =
        fold_to_head(&reader, store.snapshots()).unwrap_or_else(|e| panic!("{context}: fold to head: {e}"));
    assert_eq!(fold_head, head, "{context}: the fold saw a different head");
    startup_ledger.check_indexes().unwrap_or_else(|e| panic!("{context}: ledger indexes after the fold: {e}"));
    history.folds_from_snapshot += u64::from(stats.snapshot_seq > 0);
    history.skipped_snapshots += stats.skipped_snapshots.len() as u64;

    if full {
        history.scratch = Ledger::new();
        history.spans.clear();
        history.head_seq = 0;
        for acked in history.acked.values_mut() {
            acked.events_checked = false;
        }
    }
    // Extend the fold from scratch and the command id index with the new records.
    for_each_record(&reader, history.head_seq + 1, head.seq, &context, |record, event| {
        history
            .scratch
            .apply(&event)
            .unwrap_or_else(|e| panic!("{context}: apply seq {} from scratch: {e}", record.seq));
        let span = history.spans.entry(record.command_id.clone()).or_insert(Span {
            first: record.seq,
            last: record.seq,
            records: 0,
        });
        span.last = record.seq;
        span.records += 1;
    });
    assert_eq!(
        startup_ledger.digest(),
        history.scratch.digest(),
        "{context}: the ledger rebuilt from snapshot seq {} (+{} records) differs from the fold of the whole log",
        stats.snapshot_seq,
        stats.replayed
    );

    // Every acknowledged command: its id is on exactly the seqs it was told (one contiguous
    // run of records, as many as it was told), and those records hold the events it was told.
    for (id, acked) in &mut history.acked {
        let span = history.spans.get(id.as_str()).copied();
        if acked.first == 0 {
            assert_eq!(span, None, "{context}: command {id} was acknowledged without events, but the log has some");
            continue;
        }
        let told = Span { first: acked.first, last: acked.last, records: acked.last + 1 - acked.first };
        assert_eq!(
            span,
            Some(told),
            "{context}: command {id} (acknowledged in run {}) is not where it was told",
            acked.run
        );
        if !acked.events_checked {
            let mut hasher = blake3::Hasher::new();
            for_each_record(&reader, acked.first, acked.last, &context, |record, event| {
                assert_eq!(&record.command_id, id, "{context}: seq {} was told to {id}", record.seq);
                hasher.update(&postcard::to_stdvec(&event).expect("events serialize"));
            });
            assert_eq!(
                hasher.finalize().to_hex().as_str(),
                acked.digest,
                "{context}: the events of {id} at seqs {}..={} differ from those acknowledged",
                acked.first,
                acked.last
            );
            acked.events_checked = true;
        }
    }
    history.head_seq = head.seq;
    history.head_hash = head.hash;
    history.live_tasks = history.scratch.live_task_count();
    history.last_snapshot_seq = stats.snapshot_seq;
}

/// Reads records `from..=to` in batches, checks they are gapless, and decodes each.
fn for_each_record(
    reader: &LogReader,
    from: u64,
    to: u64,
    context: &str,
    mut visit: impl FnMut(&eventlog::StoredRecord, Event),
) {
    let mut next = from;
    while next <= to {
        let records =
            reader.read_range(next, to, READ_BATCH_RECORDS).unwrap_or_else(|e| panic!("{context}: read: {e}"));
        assert!(!records.is_empty(), "{context}: no record at seq {next} below {to}");
        for record in records {
            assert_eq!(record.seq, next, "{context}: read_range skipped from {next} to {}", record.seq);
            next += 1;
            let event = decode_event(&record).unwrap_or_else(|e| panic!("{context}: decode seq {}: {e}", record.seq));
            visit(&record, event);
        }
    }
}

/// A kill while the first open is creating the log (the first kill of the test above can land
/// there) leaves at most the half-built temporary file, never a `ledger.redb` without its
/// tables; the next open replaces it and creates the log. A file that is not a log is still
/// refused, not initialised over.
#[test]
fn a_log_whose_creation_was_cut_short_is_created_again() {
    let dir = tempfile::tempdir().unwrap();
    let half_built = dir.path().join("ledger.redb.creating");
    drop(redb::Database::create(&half_built).unwrap());
    std::fs::OpenOptions::new().append(true).open(&half_built).unwrap().write_all(b"torn").unwrap();

    let store = RedbStore::open(dir.path(), store_options()).unwrap();
    assert_eq!(store.reader().head().unwrap().seq, 0);
    drop(store);
    assert!(!half_built.exists(), "the half-built file was replaced and renamed into place");
    assert!(dir.path().join("ledger.redb").exists());
    RedbStore::open(dir.path(), store_options()).unwrap();

    let foreign = tempfile::tempdir().unwrap();
    drop(redb::Database::create(foreign.path().join("ledger.redb")).unwrap());
    match RedbStore::open(foreign.path(), store_options()) {
        Err(eventlog::OpenError::NotInitialised) => {}
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a file without tables was initialised over"),
    }
}

/// Several first starts on one empty dir at once: each gets the same initialised log, or (redb
/// holds the file while one of them has it open) a clear "already open" error; none leaves a
/// file without tables behind.
#[test]
fn first_starts_racing_on_one_dir_create_one_log() {
    for _ in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let openers: Vec<_> = (0..4)
            .map(|_| {
                let (dir, barrier) = (dir.path().to_path_buf(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    match RedbStore::open(&dir, store_options()) {
                        Ok(store) => Ok(store.reader().head().unwrap().seq),
                        Err(error) => Err(error.to_string()),
                    }
                })
            })
            .collect();
        for opener in openers {
            match opener.join().unwrap() {
                Ok(head) => assert_eq!(head, 0),
                Err(message) => assert!(message.contains("already open"), "{message}"),
            }
        }
        assert!(!dir.path().join("ledger.redb.creating").exists());
        let store = RedbStore::open(dir.path(), store_options()).unwrap();
        assert_eq!(store.reader().head().unwrap().seq, 0);
    }
}
