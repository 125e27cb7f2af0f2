//! Builds real logs for the replay tool's tests: a `Writer` on a temp
//! directory with an injected clock, driven through an incident-shaped story
//! (completions, retries with backoff, a dead letter and an operator retry, a
//! lease expiry, queue controls, a cancel), so every output is deterministic
//! and golden files stay stable. Also runs the built binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command as Process, Output};
use std::sync::Arc;

use domain::testkit::{claim, complete, fail, job, lease, ns, step, task_id, text, workflow};
use domain::{Command, Ledger};
use eventlog::{Envelope, LogReader, ManualClock, Writer, WriterConfig, WriterHandle};

/// 2026-11-23T14:00:00Z, when every story starts.
pub const START_US: i64 = 1_795_442_400_000_000;

pub struct Story {
    handle: WriterHandle,
    clock: Arc<ManualClock>,
    n: u32,
}

impl Story {
    fn run(&mut self, actor: &str, command: Command) -> eventlog::Acknowledgement {
        self.n += 1;
        let envelope = Envelope { command_id: format!("cmd-{:03}", self.n), actor: actor.to_owned(), command };
        self.handle.execute(envelope).unwrap_or_else(|e| panic!("command {} refused: {e:?}", self.n))
    }

    fn epoch(ack: &eventlog::Acknowledgement) -> u32 {
        ack.claimed.first().expect("a step was claimed").epoch.0
    }

    fn advance(&mut self, ms: i64) {
        self.clock.advance_ms(ms);
        self.handle.tick();
        self.handle.read(|_| ()).unwrap();
    }
}

/// Writes the story into `dir` (`dir/ledger.redb`, `dir/snapshots`); a
/// snapshot is taken every `snapshot_every` events (0 = none). Returns the head seq.
pub fn build_story(dir: &Path, snapshot_every: u64) -> u64 {
    let clock = Arc::new(ManualClock::new(START_US));
    let config = WriterConfig { snapshot_every_events: snapshot_every, ..WriterConfig::default() };
    let (writer, _) = Writer::open(dir, config, clock.clone()).unwrap();
    let mut s = Story { handle: writer.handle(), clock, n: 0 };

    // Three tasks arrive.
    s.run("producer-a", Command::CreateTask(job(1, "emails")));
    let pipeline = workflow(
        2,
        "reports",
        vec![step("extract", "etl", &[]), step("transform", "etl", &["extract"]), step("load", "etl", &["transform"])],
    );
    let mut pipeline = pipeline;
    pipeline.steps[0].lease_ms = 1_000;
    s.run("producer-b", Command::CreateTask(pipeline));
    let mut flaky = job(3, "emails");
    flaky.steps[0].max_attempts = 2;
    s.run("producer-a", Command::CreateTask(flaky));
    s.advance(1_000);

    // Task 1: claimed, heartbeat, completed.
    let a = s.run("worker", claim("emails", "w-1", 1));
    let e1 = Story::epoch(&a);
    s.advance(500);
    s.run("worker", Command::Heartbeat { lease: lease(task_id(1), "run", e1), lease_ms: None });
    s.advance(500);
    s.run("worker", complete(task_id(1), "run", e1));

    // Task 3: fails, waits for its retry, fails again and is dead-lettered.
    let a = s.run("worker", claim("emails", "w-2", 1));
    s.run("worker", fail(task_id(3), "run", Story::epoch(&a), true));
    s.advance(5_000);
    let a = s.run("worker", claim("emails", "w-2", 1));
    s.run("worker", fail(task_id(3), "run", Story::epoch(&a), true));

    // Task 2: extract's lease expires on w-3, then w-1 finishes it after the backoff.
    let a = s.run("worker", claim("reports", "w-3", 1));
    assert_eq!(a.claimed[0].task, task_id(2));
    s.advance(1_500);
    s.advance(5_000);
    let a = s.run("worker", claim("reports", "w-1", 1));
    s.run("worker", complete(task_id(2), "extract", Story::epoch(&a)));

    // An operator sends task 3 back with fresh attempts; w-1 completes it.
    s.advance(60_000);
    s.run(
        "operator-kim",
        Command::RetryStep { task: task_id(3), step: domain::testkit::step_name("run"), reset_attempts: true },
    );
    let a = s.run("worker", claim("emails", "w-1", 1));
    s.run("worker", complete(task_id(3), "run", Story::epoch(&a)));

    // Queue controls, and a task that is cancelled before it runs.
    s.run("operator-kim", Command::PauseQueue { namespace: ns("reports") });
    s.run("operator-kim", Command::SetQueueConcurrency { namespace: ns("emails"), limit: Some(5) });
    s.run("producer-a", Command::CreateTask(job(4, "emails")));
    s.advance(1_000);
    s.run("producer-a", Command::CancelTask { task: task_id(4), reason: Some(text("duplicate")) });
    finish(s, writer, snapshot_every)
}

/// A log where an operator cancels a task while w-9 holds its step's lease
/// (seqs: 1–2 two jobs created, 3 w-9 claims task 1, 4 task 1 cancelled at
/// +1 s, 5 w-9 claims task 2 at +3 s, 6 w-9 completes it at +3.5 s).
pub fn build_cancelled_lease(dir: &Path) -> u64 {
    let clock = Arc::new(ManualClock::new(START_US));
    let (writer, _) = Writer::open(dir, WriterConfig::default(), clock.clone()).unwrap();
    let mut s = Story { handle: writer.handle(), clock, n: 0 };
    s.run("producer-a", Command::CreateTask(job(1, "emails")));
    s.run("producer-a", Command::CreateTask(job(2, "emails")));
    s.run("worker", claim("emails", "w-9", 1));
    s.advance(1_000);
    s.run("operator-kim", Command::CancelTask { task: task_id(1), reason: Some(text("customer left")) });
    s.advance(2_000);
    let a = s.run("worker", claim("emails", "w-9", 1));
    s.advance(500);
    s.run("worker", complete(task_id(2), "run", Story::epoch(&a)));
    finish(s, writer, 0)
}

/// A log of one long-running job (task 1): w-1 claims it (seq 2), heartbeats `beats` times a
/// second apart and fails it retryably; an operator pauses its queue and resumes it a minute
/// later, after the retry came due; w-2 claims it, heartbeats `beats` times and completes it.
/// Returns the head seq (`2 * beats + 8`).
pub fn build_heartbeats(dir: &Path, beats: u32) -> u64 {
    let clock = Arc::new(ManualClock::new(START_US));
    let (writer, _) = Writer::open(dir, WriterConfig::default(), clock.clone()).unwrap();
    let mut s = Story { handle: writer.handle(), clock, n: 0 };
    s.run("producer-a", Command::CreateTask(job(1, "emails")));
    for (worker, last) in [("w-1", false), ("w-2", true)] {
        let epoch = Story::epoch(&s.run("worker", claim("emails", worker, 1)));
        for _ in 0..beats {
            s.advance(1_000);
            s.run("worker", Command::Heartbeat { lease: lease(task_id(1), "run", epoch), lease_ms: None });
        }
        if last {
            s.run("worker", complete(task_id(1), "run", epoch));
        } else {
            s.run("worker", fail(task_id(1), "run", epoch, true));
            s.run("operator-kim", Command::PauseQueue { namespace: ns("emails") });
            s.advance(60_000);
            s.run("operator-kim", Command::ResumeQueue { namespace: ns("emails") });
        }
    }
    finish(s, writer, 0)
}

/// Text a hostile client could write into the log: HTML, a Markdown image, a terminal escape
/// that sets the window title and redraws the line, a carriage return and a line of its own.
pub const HOSTILE: &str = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>![x](https://t.example/p.png)\r\u{1b}]0;PWNED\u{7}\u{1b}[2Kdead letters (0)\nfake line";

/// A log where every free text is [`HOSTILE`]: a task's name, a permanent failure's error (a
/// dead letter, seq 3) and the operator's note resolving it (seq 4).
pub fn build_hostile(dir: &Path) -> u64 {
    // A new task's name may not hold control characters, but a log written before that rule
    // keeps its names, and the reports must escape them: the creation goes into the log
    // directly, as an older server wrote it, and the writer folds it at its start.
    {
        use eventlog::LogStore as _;
        let mut store = eventlog::RedbStore::open(dir, eventlog::RedbOptions::default()).unwrap();
        let mut named = job(1, "emails");
        named.name = HOSTILE.to_owned();
        let created = domain::Event::TaskCreated { spec: named, at: domain::Timestamp::from_micros(START_US) };
        store.append(&[eventlog::encode_event(&created, "hostile-create", "producer-a", START_US)], &[]).unwrap();
    }
    let clock = Arc::new(ManualClock::new(START_US));
    let (writer, _) = Writer::open(dir, WriterConfig::default(), clock.clone()).unwrap();
    let mut s = Story { handle: writer.handle(), clock, n: 0 };
    let a = s.run("worker", claim("emails", "w-1", 1));
    let failed = lease(task_id(1), "run", Story::epoch(&a));
    s.run("worker", Command::FailStep { lease: failed, error: text(HOSTILE), retryable: false });
    s.run(
        "operator-kim",
        Command::ResolveStep {
            task: task_id(1),
            step: domain::testkit::step_name("run"),
            note: text(HOSTILE),
            result: None,
        },
    );
    finish(s, writer, 0)
}

/// Waits (bounded) for the snapshot thread to write every snapshot due, so
/// which snapshots exist does not depend on timing; then stops the writer.
fn finish(s: Story, writer: Writer, snapshot_every: u64) -> u64 {
    let head = s.handle.reader().head().unwrap().seq;
    let due = head.checked_div(snapshot_every).unwrap_or(0);
    for _ in 0..2000 {
        if s.handle.stats().snapshots.load(std::sync::atomic::Ordering::Relaxed) >= due {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(s);
    writer.shutdown();
    head
}

/// A log of `tasks` simple jobs, each created, claimed and completed (3 events each).
pub fn build_bulk(dir: &Path, tasks: u64, snapshot_every: u64) -> u64 {
    let clock = Arc::new(ManualClock::new(START_US));
    let config = WriterConfig { snapshot_every_events: snapshot_every, ..WriterConfig::default() };
    let (writer, _) = Writer::open(dir, config, clock.clone()).unwrap();
    let mut s = Story { handle: writer.handle(), clock, n: 0 };
    for t in 0..tasks {
        s.run("producer", Command::CreateTask(job(100 + t, "bulk")));
        s.clock.advance_ms(1);
        let a = s.run("worker", claim("bulk", "w", 1));
        let task = a.claimed[0].task;
        s.run("worker", complete(task, "run", Story::epoch(&a)));
    }
    finish(s, writer, snapshot_every)
}

/// A log of one large task: 60 steps, each with a payload of 20,000 quote characters (a JSON
/// string of 40 KB, whose CSV cell doubles every quote): its record is 2.4 MB, and its row in
/// an audit bundle over 4 MiB.
pub fn build_large(dir: &Path) -> u64 {
    let clock = Arc::new(ManualClock::new(START_US));
    let (writer, _) = Writer::open(dir, WriterConfig::default(), clock.clone()).unwrap();
    let mut s = Story { handle: writer.handle(), clock, n: 0 };
    let quotes = serde_json::to_string(&"\"".repeat(20_000)).unwrap();
    let steps = (0..60)
        .map(|i| {
            let mut spec = step(&format!("s{i}"), "work", &[]);
            spec.payload = domain::Json::new("payload", quotes.as_str()).unwrap();
            spec
        })
        .collect();
    s.run("producer", Command::CreateTask(workflow(1, "large", steps)));
    s.run("producer", Command::CreateTask(job(2, "large")));
    finish(s, writer, 0)
}

/// Runs the built `taskledger-replay` with `args`.
pub fn replay(args: &[&str]) -> Output {
    Process::new(env!("CARGO_BIN_EXE_taskledger-replay")).args(args).output().expect("run taskledger-replay")
}

/// Runs it with every file it writes limited to `bytes`, standing for a full disk: a write past
/// the limit fails with EFBIG ("File too large"; SIGXFSZ, which would kill it, is ignored).
#[cfg(target_os = "linux")]
pub fn replay_with_files_under(bytes: u64, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut command = Process::new(env!("CARGO_BIN_EXE_taskledger-replay"));
    command.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.output().expect("run taskledger-replay")
}

/// Runs it and insists on exit status 0; returns stdout.
pub fn replay_ok(args: &[&str]) -> String {
    let out = replay(args);
    assert!(
        out.status.success(),
        "taskledger-replay {args:?} failed with {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ledger folded by hand from records 1..=upto, without snapshots.
pub fn fold_by_hand(dir: &Path, upto: u64) -> Ledger {
    let reader = LogReader::open_read_only(dir.join("ledger.redb")).unwrap();
    let mut ledger = Ledger::new();
    for record in reader.read_range(1, upto, 100_000).unwrap() {
        ledger.apply(&eventlog::decode_event(&record).unwrap()).unwrap();
    }
    ledger
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `fixtures/replay/` at the workspace root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/replay")
}

/// Compares `actual` with the golden file `name`; `UPDATE_GOLDEN=1` rewrites it.
pub fn golden(name: &str, actual: &str) {
    let file = fixtures().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(fixtures()).unwrap();
        std::fs::write(&file, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&file)
        .unwrap_or_else(|_| panic!("golden file {} is missing; run with UPDATE_GOLDEN=1", file.display()));
    assert_eq!(actual, expected, "output differs from {} (UPDATE_GOLDEN=1 to accept)", file.display());
}
