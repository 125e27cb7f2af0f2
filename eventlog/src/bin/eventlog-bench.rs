//! `eventlog-bench`: the figures behind the event log's performance goals, measured in one run
//! on one filesystem, so every writer rate can be read against the disk's raw fdatasync rate.
//!
//! Cases (all in a fresh directory under `--dir`, removed afterwards):
//! - `raw_fdatasync`: append a 256-byte record to a plain file and `fdatasync` it, in a loop —
//!   the most single-record commits per second this disk allows (ratio 1.0).
//! - `redb_floor_{N}`: a bare redb file with one table (seq → 256-byte record), N records per
//!   `Durability::Immediate` transaction, in a loop, for N = 1 and each `--submitters` count —
//!   the most this storage engine allows for that batch size, with no index, no hash chain and no
//!   ledger; the writer's figure at the same concurrency reads against it.
//! - `writer_1_submitter`: one submitter sending `CreateTask` commands one at a time.
//! - `writer_{N}_submitters`: N submitters, each running create → claim → complete cycles on its
//!   own namespace (the realistic shape: a producer and a worker per queue; a shared queue would
//!   mostly measure claims that find another submitter's task).
//!
//! Submitters are tasks on a tokio runtime with a worker thread per core, as the server's
//! request handlers are; `--submitter-threads` runs each on an OS thread of its own instead
//! (each wake-up then costs the kernel a thread switch, which on two cores caps the rate).
//! - `snapshot_stall`: while the ledger holds `--live-tasks` live tasks and a snapshot of it is
//!   being taken, a probe thread runs create → claim → complete cycles; the longest
//!   acknowledgement it sees is `max_stall_us`.
//! - `restart_{N}_live_snapshot` / `restart_{N}_live_no_snapshot`: `Writer::open` of that log,
//!   from the snapshot and with the snapshot directory moved away.
//! - `verify`: `eventlog::verify` over that log.
//!
//! Throughput counts commands and events acknowledged inside a fixed window after a warm-up;
//! latency is per command, submit to acknowledgement. `ratio_to_fdatasync` is events/s over
//! the raw fdatasync rate.
//!
//! `cargo run --release -p eventlog --bin eventlog-bench -- [--quick] [--json]`

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

// The server's allocator (api/src/main.rs), so these figures are the ones `taskledger serve` gets.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use domain::Command;
use domain::testkit::{claim, complete, job};
use eventlog::{
    CommandResult, Envelope, RedbOptions, RedbStore, SystemClock, WriteError, Writer, WriterConfig, WriterHandle,
    verify,
};
use hdrhistogram::Histogram;

#[derive(Parser, Debug)]
#[command(about = "Measures the event log: raw fdatasync, the writer under load, restart and verify")]
struct Args {
    /// Where the temporary benchmark directory is created (must be the disk under test, not tmpfs).
    #[arg(long, default_value = "target/bench-tmp")]
    dir: PathBuf,
    /// Print one JSON object per case and line instead of a table.
    #[arg(long)]
    json: bool,
    /// Small sizes and short windows (about 20 s in all).
    #[arg(long)]
    quick: bool,
    /// Measured window of each throughput case, in seconds [default: 5, quick: 2].
    #[arg(long)]
    seconds: Option<f64>,
    /// Warm-up before each measured window, in seconds [default: 1, quick: 0.5].
    #[arg(long)]
    warmup: Option<f64>,
    /// Live tasks in the log for the snapshot, restart and verify cases [default: 1000000, quick: 50000].
    #[arg(long)]
    live_tasks: Option<u64>,
    /// Concurrent submitter counts for the create/claim/complete cases.
    #[arg(long, value_delimiter = ',', default_value = "8,64,256")]
    submitters: Vec<usize>,
    /// Cases to run (comma separated): raw, redb, writer1, writerN, snapshot, restart, verify [default: all].
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Keep the benchmark directory afterwards (to inspect the log, or to pass it to --live-log).
    #[arg(long)]
    keep: bool,
    /// Run restart and verify on this existing live log (a kept `live` directory) instead of
    /// building one; the snapshot case is skipped. For profiling startup without the build.
    #[arg(long)]
    live_log: Option<PathBuf>,
    /// Records the writer's stream index may trail the log by (1 = index every commit's
    /// records in that commit, as before the index trailed).
    #[arg(long, default_value_t = eventlog::STREAM_INDEX_LAG_DEFAULT)]
    stream_index_lag: usize,
    /// Size of the writer's write-ahead journal in MiB (0 = no journal: every commit is an
    /// `Immediate` redb commit).
    #[arg(long, default_value_t = eventlog::JOURNAL_BYTES_DEFAULT >> 20)]
    journal_mib: u64,
    /// Run each submitter on an OS thread of its own instead of as a task on a tokio runtime
    /// with one worker per core (the way the server's request handlers run).
    #[arg(long)]
    submitter_threads: bool,
    /// Run even on tmpfs, where fdatasync costs nothing and the figures mean nothing (for the
    /// smoke test, which checks the cases run, not their figures).
    #[arg(long, hide = true)]
    allow_tmpfs: bool,
}

const ALL_CASES: [&str; 7] = ["raw", "redb", "writer1", "writerN", "snapshot", "restart", "verify"];
const RAW_RECORD_BYTES: usize = 256;

struct Settings {
    /// Each submitter on a thread of its own, instead of a task on a runtime with a worker per core.
    submitter_threads: bool,
    stream_index_lag: usize,
    journal_bytes: u64,
    seconds: f64,
    warmup: f64,
    live_tasks: u64,
}

/// One line of the report.
struct Row {
    case: String,
    events_per_s: f64,
    commands_per_s: f64,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    max_us: Option<u64>,
    seconds: f64,
    extra: Vec<(&'static str, serde_json::Value)>,
}

struct Report {
    json: bool,
    raw_rate: Option<f64>,
}

impl Report {
    fn header(&self, facts: &[(&str, String)]) {
        if self.json {
            let object: serde_json::Map<String, serde_json::Value> =
                facts.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone()))).collect();
            let mut line = serde_json::Map::new();
            line.insert("machine".into(), serde_json::Value::Object(object));
            println!("{}", serde_json::Value::Object(line));
        } else {
            for (key, value) in facts {
                println!("# {key}: {value}");
            }
            println!(
                "{:<34} {:>12} {:>12} {:>9} {:>9} {:>10} {:>8} {:>9}  extra",
                "case", "events/s", "commands/s", "p50_us", "p99_us", "max_us", "ratio", "seconds"
            );
        }
    }

    fn print(&mut self, row: Row) {
        let ratio = self.raw_rate.filter(|r| *r > 0.0).map(|raw| row.events_per_s / raw);
        if self.json {
            let mut object = serde_json::Map::new();
            object.insert("case".into(), row.case.clone().into());
            object.insert("events_per_s".into(), round1(row.events_per_s).into());
            object.insert("commands_per_s".into(), round1(row.commands_per_s).into());
            object.insert("p50_us".into(), row.p50_us.into());
            object.insert("p99_us".into(), row.p99_us.into());
            object.insert("max_us".into(), row.max_us.into());
            object.insert("ratio_to_fdatasync".into(), ratio.map(|r| (r * 1000.0).round() / 1000.0).into());
            object.insert("seconds".into(), ((row.seconds * 1000.0).round() / 1000.0).into());
            for (key, value) in &row.extra {
                object.insert((*key).to_owned(), value.clone());
            }
            println!("{}", serde_json::Value::Object(object));
        } else {
            let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
            let extra: Vec<String> = row.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "{:<34} {:>12.0} {:>12.0} {:>9} {:>9} {:>10} {:>8} {:>9.3}  {}",
                row.case,
                row.events_per_s,
                row.commands_per_s,
                opt(row.p50_us),
                opt(row.p99_us),
                opt(row.max_us),
                ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
                row.seconds,
                extra.join(" ")
            );
        }
        if row.case == "raw_fdatasync" {
            self.raw_rate = Some(row.events_per_s);
        }
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn us_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX).max(1)
}

/// CPU seconds used so far by the calling thread: restart and verify run on it, so this is
/// their cost even when other processes share the cores.
fn thread_cpu_s() -> f64 {
    // SAFETY: clock_gettime writes into the timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn main() -> Result<()> {
    let args = Args::parse();
    // As the server runs (see `eventlog::memory`).
    eventlog::memory::disable_transparent_huge_pages()?;
    let settings = Settings {
        submitter_threads: args.submitter_threads,
        stream_index_lag: args.stream_index_lag,
        journal_bytes: args.journal_mib << 20,
        seconds: args.seconds.unwrap_or(if args.quick { 2.0 } else { 5.0 }),
        warmup: args.warmup.unwrap_or(if args.quick { 0.5 } else { 1.0 }),
        live_tasks: args.live_tasks.unwrap_or(if args.quick { 50_000 } else { 1_000_000 }),
    };
    let cases: Vec<String> =
        if args.cases.is_empty() { ALL_CASES.iter().map(|c| (*c).to_owned()).collect() } else { args.cases.clone() };
    for case in &cases {
        if !ALL_CASES.contains(&case.as_str()) {
            bail!("unknown case {case:?}; known: {}", ALL_CASES.join(", "));
        }
    }
    let wants = |name: &str| cases.iter().any(|c| c == name);

    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let fs_type = filesystem_type(&args.dir);
    if fs_type == "tmpfs" && !args.allow_tmpfs {
        bail!("{} is on tmpfs: fdatasync costs nothing there; pass --dir on a real disk", args.dir.display());
    }
    let temp = tempfile::Builder::new()
        .prefix("eventlog-bench-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("create a temporary directory in {}", args.dir.display()))?;
    let root = temp.path().to_path_buf();

    let mut report = Report { json: args.json, raw_rate: None };
    report.header(&machine_facts(&root, &fs_type, &settings));

    if wants("raw") {
        report.print(raw_fdatasync(&root.join("raw"), &settings)?);
    }
    if wants("redb") {
        for records in std::iter::once(1).chain(args.submitters.iter().copied()) {
            report.print(redb_floor(&root.join(format!("redb-{records}")), records, &settings)?);
        }
    }
    if wants("writer1") {
        report.print(writer_submitters(&root.join("writer-1"), 1, Workload::CreateOnly, &settings)?);
    }
    if wants("writerN") {
        for &n in &args.submitters {
            let dir = root.join(format!("writer-{n}"));
            report.print(writer_submitters(&dir, n, Workload::Cycles, &settings)?);
        }
    }
    if wants("snapshot") || wants("restart") || wants("verify") {
        let dir = match &args.live_log {
            Some(existing) => existing.clone(),
            None => {
                let dir = root.join("live");
                let built = build_live_log(&dir, settings.live_tasks)?;
                if wants("snapshot") {
                    report.print(built.stall_row);
                }
                dir
            }
        };
        if wants("restart") {
            report.print(restart(&dir, settings.live_tasks, true)?);
            report.print(restart(&dir, settings.live_tasks, false)?);
        }
        if wants("verify") {
            report.print(verify_case(&dir)?);
        }
    }
    if args.keep {
        let kept = temp.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(())
}

fn machine_facts(root: &Path, fs_type: &str, settings: &Settings) -> Vec<(&'static str, String)> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned()))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or_else(|| "unknown".into(), |kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
    vec![
        ("cores", cores.to_string()),
        ("cpu", cpu),
        ("memory", mem),
        ("kernel", kernel),
        ("dir", root.display().to_string()),
        ("filesystem", fs_type.to_owned()),
        ("seconds", settings.seconds.to_string()),
        ("warmup", settings.warmup.to_string()),
        ("live_tasks", settings.live_tasks.to_string()),
        ("stream_index_lag", settings.stream_index_lag.to_string()),
        ("journal_mib", (settings.journal_bytes >> 20).to_string()),
    ]
}

/// The filesystem of `path`, by statfs magic number.
fn filesystem_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return "unknown".into() };
    // SAFETY: statfs writes into the zeroed struct we own; c_path is a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return "unknown".into();
    }
    #[allow(clippy::unnecessary_cast)]
    match stat.f_type as i64 {
        0xEF53 => "ext2/3/4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        other => format!("0x{other:x}"),
    }
}

/// Runs `commit` in a loop: a warm-up, then the measured window. Returns the row with
/// `per_commit` events per call.
fn commit_loop(
    case: String,
    per_commit: usize,
    settings: &Settings,
    extra: Vec<(&'static str, serde_json::Value)>,
    mut commit: impl FnMut() -> Result<()>,
) -> Result<Row> {
    let warm_until = Instant::now() + Duration::from_secs_f64(settings.warmup);
    while Instant::now() < warm_until {
        commit()?;
    }
    let mut hist = histogram();
    let mut commits = 0u64;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(settings.seconds);
    while Instant::now() < until {
        let t = Instant::now();
        commit()?;
        hist.saturating_record(us_since(t));
        commits += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Row {
        case,
        events_per_s: (commits * per_commit as u64) as f64 / seconds,
        commands_per_s: commits as f64 / seconds,
        p50_us: Some(hist.value_at_quantile(0.5)),
        p99_us: Some(hist.value_at_quantile(0.99)),
        max_us: Some(hist.max()),
        seconds,
        extra,
    })
}

/// Appends 256-byte records to a plain file with an fdatasync after each.
fn raw_fdatasync(dir: &Path, settings: &Settings) -> Result<Row> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("raw.log");
    let mut file =
        OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("open {}", path.display()))?;
    let record = [0xA5u8; RAW_RECORD_BYTES];
    let fd = file.as_raw_fd();
    let extra = vec![("record_bytes", RAW_RECORD_BYTES.into())];
    commit_loop("raw_fdatasync".into(), 1, settings, extra, || {
        file.write_all(&record).context("append a record")?;
        // SAFETY: fd is the open descriptor of `file`, which outlives this call.
        if unsafe { libc::fdatasync(fd) } != 0 {
            return Err(std::io::Error::last_os_error()).context("fdatasync");
        }
        Ok(())
    })
}

/// Bare redb: `records` 256-byte records per `Durability::Immediate` transaction, one table.
fn redb_floor(dir: &Path, records: usize, settings: &Settings) -> Result<Row> {
    const TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("records");
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let db = redb::Database::create(dir.join("floor.redb")).context("create the redb file")?;
    let record = [0xA5u8; RAW_RECORD_BYTES];
    let mut seq = 0u64;
    let extra = vec![("records_per_commit", records.into())];
    commit_loop(format!("redb_floor_{records}"), records, settings, extra, || {
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let mut table = txn.open_table(TABLE)?;
            for _ in 0..records {
                seq += 1;
                table.insert(seq, record.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// One `CreateTask` at a time.
    CreateOnly,
    /// create → claim → complete on the thread's own namespace.
    Cycles,
}

const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPED: u8 = 2;

/// What one submitter thread saw inside the measured window.
struct Tally {
    hist: Histogram<u64>,
    commands: u64,
    events: u64,
    overloaded: u64,
}

fn envelope(command_id: String, command: Command) -> Envelope {
    Envelope { command_id, actor: "bench".into(), command }
}

/// Runs `command`, retrying briefly on "overloaded"; returns the result and its latency.
async fn timed_execute(
    handle: &WriterHandle,
    command_id: String,
    command: Command,
    overloaded: &mut u64,
) -> (CommandResult, u64) {
    let started = Instant::now();
    loop {
        match handle.execute_async(envelope(command_id.clone(), command.clone())).await {
            Err(WriteError::Overloaded) => {
                *overloaded += 1;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            result => return (result, us_since(started)),
        }
    }
}

/// Task numbers of submitter `t` start here, so every thread's ids are distinct.
/// Task numbers handed out in creation order across all submitters, above the bulk-loaded ones:
/// ids are UUIDv7 made from the number as milliseconds, so, as with real UUIDv7 ids minted from
/// a clock, tasks created together have neighbouring keys.
static NEXT_TASK_NUMBER: AtomicU64 = AtomicU64::new(1_000_000_000);

fn task_number() -> u64 {
    NEXT_TASK_NUMBER.fetch_add(1, Ordering::Relaxed)
}

async fn submitter(handle: WriterHandle, t: usize, workload: Workload, phase: Arc<AtomicU8>) -> Result<Tally> {
    let namespace = format!("bench-{t}");
    let worker = format!("worker-{t}");
    let mut tally = Tally { hist: histogram(), commands: 0, events: 0, overloaded: 0 };
    let record = |tally: &mut Tally, result: &CommandResult, us: u64| -> Result<()> {
        let ack = result.as_ref().map_err(|e| anyhow::anyhow!("command failed: {e}"))?;
        if phase.load(Ordering::Acquire) == MEASURING {
            tally.hist.saturating_record(us);
            tally.commands += 1;
            tally.events += ack.events.len() as u64;
        }
        Ok(())
    };
    while phase.load(Ordering::Acquire) != STOPPED {
        let n = task_number();
        let (created, us) =
            timed_execute(&handle, format!("c-{n}"), Command::CreateTask(job(n, &namespace)), &mut tally.overloaded)
                .await;
        record(&mut tally, &created, us)?;
        if workload == Workload::CreateOnly {
            continue;
        }
        let (claimed, us) =
            timed_execute(&handle, format!("l-{n}"), claim(&namespace, &worker, 1), &mut tally.overloaded).await;
        record(&mut tally, &claimed, us)?;
        let Some(work) = claimed.ok().and_then(|ack| ack.claimed.into_iter().next()) else {
            bail!("submitter {t}: the claim found no work in its own namespace");
        };
        let (completed, us) =
            timed_execute(&handle, format!("d-{n}"), complete(work.task, "run", work.epoch.0), &mut tally.overloaded)
                .await;
        record(&mut tally, &completed, us)?;
    }
    Ok(tally)
}

/// Runs `future` on the calling thread, which parks while it waits (as `blocking_recv` does).
fn block_on_this_thread<F: std::future::Future>(future: F) -> Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().context("a thread's runtime")?;
    Ok(runtime.block_on(future))
}

/// A running submitter: a thread of its own, or a task on the shared runtime.
enum Submitter {
    Thread(std::thread::JoinHandle<Result<Tally>>),
    Task(tokio::task::JoinHandle<Result<Tally>>),
}

fn writer_submitters(dir: &Path, submitters: usize, workload: Workload, settings: &Settings) -> Result<Row> {
    let store = RedbOptions {
        stream_index_lag_records: settings.stream_index_lag,
        journal_bytes: settings.journal_bytes,
        ..RedbOptions::default()
    };
    let (writer, _) = Writer::open(dir, WriterConfig { store, ..WriterConfig::default() }, Arc::new(SystemClock))
        .with_context(|| format!("open the writer at {}", dir.display()))?;
    let opened = Instant::now();
    let handle = writer.handle();
    let phase = Arc::new(AtomicU8::new(WARMING));
    // The submitters' shared runtime, unless each has a thread of its own.
    let runtime = (!settings.submitter_threads)
        .then(|| tokio::runtime::Builder::new_multi_thread().enable_time().build())
        .transpose()
        .context("start the submitters' runtime")?;
    let running: Vec<Submitter> = (0..submitters)
        .map(|t| {
            let submitter = submitter(handle.clone(), t, workload, phase.clone());
            match &runtime {
                Some(runtime) => Ok(Submitter::Task(runtime.spawn(submitter))),
                None => std::thread::Builder::new()
                    .name(format!("submitter-{t}"))
                    .stack_size(256 * 1024)
                    .spawn(move || block_on_this_thread(submitter)?)
                    .map(Submitter::Thread)
                    .context("spawn a submitter"),
            }
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs_f64(settings.warmup));
    phase.store(MEASURING, Ordering::Release);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(settings.seconds));
    phase.store(STOPPED, Ordering::Release);
    let seconds = started.elapsed().as_secs_f64();
    let mut total = Tally { hist: histogram(), commands: 0, events: 0, overloaded: 0 };
    for submitter in running {
        let tally = match submitter {
            Submitter::Thread(thread) => thread.join().map_err(|_| anyhow::anyhow!("a submitter panicked"))??,
            Submitter::Task(task) => {
                runtime.as_ref().expect("tasks run on the runtime").block_on(task).context("a submitter task")??
            }
        };
        total.hist.add(&tally.hist).context("merge histograms")?;
        total.commands += tally.commands;
        total.events += tally.events;
        total.overloaded += tally.overloaded;
    }
    let elapsed_all = opened.elapsed();
    let stats = handle.stats();
    let batches = stats.batches.load(Ordering::Relaxed);
    let all_events = stats.events.load(Ordering::Relaxed);
    let commit_us_total = stats.commit_us_total.load(Ordering::Relaxed);
    drop(handle);
    writer.shutdown();
    let case = match (workload, submitters) {
        (Workload::CreateOnly, 1) => "writer_1_submitter".to_owned(),
        (Workload::CreateOnly, n) => format!("writer_{n}_submitters_create"),
        (Workload::Cycles, n) => format!("writer_{n}_submitters"),
    };
    Ok(Row {
        case,
        events_per_s: total.events as f64 / seconds,
        commands_per_s: total.commands as f64 / seconds,
        p50_us: Some(total.hist.value_at_quantile(0.5)),
        p99_us: Some(total.hist.value_at_quantile(0.99)),
        max_us: Some(total.hist.max()),
        seconds,
        extra: vec![
            ("events_per_batch", round1(all_events as f64 / batches.max(1) as f64).into()),
            // Time inside the store's append (redb inserts, write, fsync) per batch, against the
            // whole time per batch: the rest is deciding, draining and waiting for submitters.
            ("commit_us_avg", round1(commit_us_total as f64 / batches.max(1) as f64).into()),
            ("batch_us_avg", round1(elapsed_all.as_micros() as f64 / batches.max(1) as f64).into()),
            ("overloaded", total.overloaded.into()),
            ("submitters_as", if settings.submitter_threads { "threads" } else { "tasks" }.into()),
        ],
    })
}

/// The log with `live_tasks` live tasks, and what the probe saw while its snapshot was taken.
struct Built {
    stall_row: Row,
}

/// Acknowledgements of the probe thread: when each arrived and how long it took.
type ProbeLog = Vec<(Instant, u64)>;

/// Writes `live_tasks` single-step tasks in `CreateTasks` batches of 1000, with a probe thread
/// running create → claim → complete cycles throughout, and waits for the snapshot taken at
/// the end (`snapshot_every_events` = `live_tasks`). Reports the probe's latencies between the
/// last bulk acknowledgement and the snapshot being durable.
fn build_live_log(dir: &Path, live_tasks: u64) -> Result<Built> {
    let config = WriterConfig { snapshot_every_events: live_tasks, ..WriterConfig::default() };
    let (writer, _) = Writer::open(dir, config, Arc::new(SystemClock))
        .with_context(|| format!("open the writer at {}", dir.display()))?;
    let handle = writer.handle();
    let stop_probe = Arc::new(AtomicBool::new(false));
    let probe = {
        let handle = handle.clone();
        let stop = stop_probe.clone();
        std::thread::Builder::new().name("probe".into()).spawn(move || -> Result<ProbeLog> {
            block_on_this_thread(async move {
                let mut log = ProbeLog::new();
                let mut overloaded = 0;
                while !stop.load(Ordering::Acquire) {
                    let n = task_number();
                    let (created, us) =
                        timed_execute(&handle, format!("c-{n}"), Command::CreateTask(job(n, "probe")), &mut overloaded)
                            .await;
                    created.map_err(|e| anyhow::anyhow!("probe create: {e}"))?;
                    log.push((Instant::now(), us));
                    let (claimed, us) =
                        timed_execute(&handle, format!("l-{n}"), claim("probe", "prober", 1), &mut overloaded).await;
                    let work = claimed
                        .map_err(|e| anyhow::anyhow!("probe claim: {e}"))?
                        .claimed
                        .into_iter()
                        .next()
                        .context("the probe's claim found no work")?;
                    log.push((Instant::now(), us));
                    let (completed, us) = timed_execute(
                        &handle,
                        format!("d-{n}"),
                        complete(work.task, "run", work.epoch.0),
                        &mut overloaded,
                    )
                    .await;
                    completed.map_err(|e| anyhow::anyhow!("probe complete: {e}"))?;
                    log.push((Instant::now(), us));
                }
                Ok(log)
            })?
        })?
    };

    // Keep a few batches in flight so group commit has something to group.
    const IN_FLIGHT: usize = 8;
    let build_started = Instant::now();
    let mut in_flight: VecDeque<tokio::sync::oneshot::Receiver<CommandResult>> = VecDeque::new();
    let mut next = 0u64;
    let mut batch_number = 0u64;
    while next < live_tasks || !in_flight.is_empty() {
        if next < live_tasks && in_flight.len() < IN_FLIGHT {
            let end = (next + domain::MAX_BATCH_TASKS as u64).min(live_tasks);
            let specs = (next..end).map(|n| job(n + 1, "bulk")).collect();
            let command_id = format!("bulk-{batch_number}");
            batch_number += 1;
            match handle.submit(envelope(command_id, Command::CreateTasks(specs))) {
                Ok(receiver) => {
                    in_flight.push_back(receiver);
                    next = end;
                }
                Err(WriteError::Overloaded) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => bail!("submit a bulk create: {e}"),
            }
            continue;
        }
        let receiver = in_flight.pop_front().expect("in flight");
        let ack =
            receiver.blocking_recv().context("the writer stopped")?.map_err(|e| anyhow::anyhow!("bulk create: {e}"))?;
        if ack.events.len() != ack.seqs.map_or(0, |s| (s.last - s.first + 1) as usize) {
            bail!("a bulk create was acknowledged with a wrong seq range");
        }
    }
    let bulk_done = Instant::now();
    let build_seconds = build_started.elapsed().as_secs_f64();
    while handle.stats().snapshots.load(Ordering::Relaxed) == 0 {
        if bulk_done.elapsed() > Duration::from_secs(600) {
            bail!("no snapshot was taken within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let snapshot_done = Instant::now();
    // A little more probing after the snapshot, as a baseline.
    std::thread::sleep(Duration::from_millis(500));
    stop_probe.store(true, Ordering::Release);
    let probe_log = probe.join().map_err(|_| anyhow::anyhow!("the probe panicked"))??;
    let live = handle.read(|ledger| ledger.live_task_count())?;
    let head = handle.reader().head()?.seq;
    let snapshot = handle.snapshots().list()?.into_iter().next_back().context("the snapshot directory is empty")?;
    drop(handle);
    writer.shutdown();

    let mut during = histogram();
    let mut after = histogram();
    let mut during_events = 0u64;
    for &(at, us) in &probe_log {
        if at >= bulk_done && at <= snapshot_done + Duration::from_millis(1) {
            during.saturating_record(us);
            during_events += 1;
        } else if at > snapshot_done {
            after.saturating_record(us);
        }
    }
    let window = (snapshot_done - bulk_done).as_secs_f64();
    let snapshot_bytes = snapshot.header.as_ref().map_or(0, |info| info.body_len);
    let quantile = |h: &Histogram<u64>, q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
    let stall_row = Row {
        case: format!("snapshot_stall_{}_live", short_count(live_tasks)),
        events_per_s: during_events as f64 / window.max(1e-9),
        commands_per_s: during_events as f64 / window.max(1e-9),
        p50_us: quantile(&during, 0.5),
        p99_us: quantile(&during, 0.99),
        max_us: quantile(&during, 1.0),
        seconds: window,
        extra: vec![
            ("max_stall_us", quantile(&during, 1.0).into()),
            ("probe_commands", during.len().into()),
            ("after_p99_us", quantile(&after, 0.99).into()),
            ("after_max_us", quantile(&after, 1.0).into()),
            ("snapshot_seq", snapshot.seq.into()),
            ("head_seq", head.into()),
            ("snapshot_mib", round1(snapshot_bytes as f64 / 1048576.0).into()),
            ("live_tasks", live.into()),
            ("build_s", round1(build_seconds).into()),
            ("build_events_per_s", round1(live_tasks as f64 / build_seconds).into()),
        ],
    };
    Ok(Built { stall_row })
}

fn short_count(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}m", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// Times `Writer::open` of the live log, from its snapshot or with the snapshots moved away.
fn restart(dir: &Path, live_tasks: u64, with_snapshot: bool) -> Result<Row> {
    let snapshots = dir.join("snapshots");
    let aside = dir.join("snapshots-aside");
    if !with_snapshot {
        std::fs::rename(&snapshots, &aside).context("move the snapshots away")?;
    }
    // The production configuration, so the snapshot thread's own startup fold competes for the
    // CPU as it would in service; with the snapshots moved away it would write a fresh one, so
    // snapshots are off in that case.
    let config =
        WriterConfig { snapshot_every_events: if with_snapshot { live_tasks } else { 0 }, ..WriterConfig::default() };
    let started = Instant::now();
    let cpu_started = thread_cpu_s();
    let opened = Writer::open(dir, config, Arc::new(SystemClock));
    let seconds = started.elapsed().as_secs_f64();
    let cpu_s = thread_cpu_s() - cpu_started;
    let result = opened.with_context(|| format!("reopen the writer at {}", dir.display())).map(|(writer, startup)| {
        writer.shutdown();
        startup
    });
    if !with_snapshot {
        std::fs::rename(&aside, &snapshots).context("move the snapshots back")?;
    }
    let startup = result?;
    if startup.live_tasks < live_tasks as usize {
        bail!("the restarted ledger holds {} live tasks, expected at least {live_tasks}", startup.live_tasks);
    }
    if with_snapshot && startup.fold.snapshot_seq == 0 {
        bail!("the restart did not use the snapshot: {:?}", startup.fold.skipped_snapshots);
    }
    let suffix = if with_snapshot { "snapshot" } else { "no_snapshot" };
    Ok(Row {
        case: format!("restart_{}_live_{suffix}", short_count(live_tasks)),
        events_per_s: startup.head.seq as f64 / seconds,
        commands_per_s: 0.0,
        p50_us: None,
        p99_us: None,
        max_us: None,
        seconds,
        extra: vec![
            ("head_seq", startup.head.seq.into()),
            ("snapshot_seq", startup.fold.snapshot_seq.into()),
            ("replayed", startup.fold.replayed.into()),
            ("live_tasks", startup.live_tasks.into()),
            ("cpu_s", round3(cpu_s).into()),
        ],
    })
}

fn verify_case(dir: &Path) -> Result<Row> {
    let store =
        // The page cache `taskledger-replay verify` opens a log with: one sequential pass gains
        // nothing from caching more of it.
        RedbStore::open(dir, RedbOptions { cache_bytes: eventlog::reader::READ_ONLY_CACHE_BYTES, ..RedbOptions::default() })
            .with_context(|| format!("open the log at {}", dir.display()))?;
    let started = Instant::now();
    let cpu_started = thread_cpu_s();
    let report = verify(&store.reader(), |_, _| {}).context("verify the log")?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_s = thread_cpu_s() - cpu_started;
    if !report.is_clean() {
        bail!("verify found problems: {report:?}");
    }
    Ok(Row {
        case: "verify".into(),
        events_per_s: report.records as f64 / seconds,
        commands_per_s: 0.0,
        p50_us: None,
        p99_us: None,
        max_us: None,
        seconds,
        // The checking thread's CPU; the scanning thread (reading, chain links) runs beside it.
        extra: vec![("records", report.records.into()), ("checker_cpu_s", round3(cpu_s).into())],
    })
}
