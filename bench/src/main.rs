//! `taskledger-bench`: the end-to-end benchmark of issue 7. In one run it
//! starts the release `taskledger serve` and a throwaway PostgreSQL cluster
//! (fsync on), drives the same workloads through both — taskledger over
//! HTTP, and the usual "table + FOR UPDATE SKIP LOCKED" queue over SQL — and
//! prints one table (or JSON lines with `--json`), so the comparison is made
//! on the same machine at the same moment. The two lifecycles, whose ratio is
//! the headline, run back to back before anything else (`--rounds` pairs of
//! them), since the machine's speed drifts within minutes.
//!
//! Workloads (see `--help` for every size):
//! - `lifecycle`: P closed-loop producers create single-step tasks while W
//!   workers claim up to K at a time and complete them; completed tasks/s,
//!   per-command latency, pickup latency (create acknowledged → claimed).
//! - `half-rate`: the same, but producers are open-loop at 50 % of the
//!   lifecycle throughput just measured; acknowledgement latency is measured
//!   from each create's scheduled time when its connection was still busy
//!   then, else from its send (see `stats::OpenLoop`).
//! - `idle-pickup`: one long-polling worker, tasks created one at a time at
//!   a low rate; pickup latency.
//! - `mixed` (taskledger only): retries with a short backoff, permanent
//!   failures into the dead-letter queue, and 3-step DAG workflows.
//! - `batch-create`: tasks/s through the batch endpoint (baseline: one
//!   multi-row INSERT per batch).
//! - `http-floor`: lifecycle's producers against a server that stores
//!   nothing (floor.rs): the most creates/s any HTTP server answers here.
//! - `storage-floor`: the least CPU a lifecycle task's log records and
//!   read-model rows take in redb and SQLite themselves (storage_floor.rs),
//!   measured in this process.
//!
//! Every workload warms up, then measures a fixed window; the CPU the bench
//! itself used in that window (getrusage) is printed beside the figures,
//! because it shares the cores with what it measures.

mod baseline;
mod disk;
mod floor;
mod http;
mod server;
mod stats;
mod storage_floor;
mod taskledger;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use projections::testing::{ClusterOptions, TempPostgres};
use serde_json::json;

use crate::baseline::Wakeup;
use crate::http::{Conn, Target};
use crate::stats::{CpuMeter, CpuUse, Phase, Pickups, Tally};
use crate::storage_floor::StorageFloor;
use crate::taskledger::{Fates, Ids, TaskShape, WorkerSpec};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "taskledger-bench",
    about = "taskledger against a PostgreSQL SKIP LOCKED queue, on the same machine in one run"
)]
struct Args {
    /// Producers (closed loop: one create in flight each).
    #[arg(long, short = 'P', default_value_t = 32)]
    producers: usize,
    /// Workers.
    #[arg(long, short = 'W', default_value_t = 8)]
    workers: usize,
    /// Most steps a worker claims at once (K); it completes them in parallel.
    #[arg(long, short = 'K', default_value_t = 16)]
    batch: u32,
    /// How long a claim long-polls when the queue is empty (taskledger).
    #[arg(long, default_value_t = 1000)]
    wait_ms: u64,
    /// Warm-up before each measuring window, in seconds.
    #[arg(long, default_value_t = 3.0)]
    warmup_s: f64,
    /// Each measuring window, in seconds.
    #[arg(long, default_value_t = 10.0)]
    measure_s: f64,
    /// Lifecycle rounds, each measuring taskledger and then the baseline back to back (every
    /// other round the baseline first), so each ratio compares two windows a few seconds
    /// apart on a machine whose speed drifts; the table shows the first round, and the
    /// ratio of every round and their median follow it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Producers pause while this many tasks are created but not finished.
    #[arg(long, default_value_t = 1000)]
    max_backlog: u64,
    /// Tasks per batch in `batch-create` (the API allows 1,000).
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// Producers in `batch-create`.
    #[arg(long, default_value_t = 4)]
    batch_producers: usize,
    /// Tasks created in `idle-pickup`, one at a time.
    #[arg(long, default_value_t = 200)]
    idle_tasks: u32,
    /// Gap between creates in `idle-pickup`, in milliseconds.
    #[arg(long, default_value_t = 20)]
    idle_interval_ms: u64,
    /// `half-rate` target in tasks/s (default: half of the lifecycle figure just measured).
    #[arg(long)]
    half_rate: Option<f64>,
    /// Readers of the event feed during `half-rate` (taskledger only): each reads the log from
    /// its first record, page after page, over and over, as a consumer catching up would.
    #[arg(long, default_value_t = 0)]
    feed_readers: usize,
    /// GraphQL subscribers during `half-rate` (taskledger only): each subscribes to `events`
    /// from the log's first record and, once it has the records that were there when it
    /// subscribed, ends the subscription and starts again from the first.
    #[arg(long, default_value_t = 0)]
    graphql_readers: usize,
    /// Followers of the event feed during `half-rate` (taskledger only): each follows the log
    /// from its head on, as a downstream consumer keeping up does.
    #[arg(long, default_value_t = 0)]
    feed_followers: usize,
    /// GraphQL subscribers following the log during `half-rate` (taskledger only): each
    /// subscribes to `events` from the head on, as a live dashboard does.
    #[arg(long, default_value_t = 0)]
    graphql_followers: usize,
    /// Connections the open-loop `half-rate` producers use.
    #[arg(long, default_value_t = 32)]
    paced_connections: usize,
    /// In `mixed`, every Nth task is a 3-step workflow (a → b → c).
    #[arg(long, default_value_t = 3)]
    dag_every: u64,
    /// In `mixed`, per-mille of attempts that fail and are retried.
    #[arg(long, default_value_t = 100)]
    transient_permille: u64,
    /// In `mixed`, per-mille of steps that fail permanently (dead letter).
    #[arg(long, default_value_t = 20)]
    permanent_permille: u64,
    /// Which workloads, comma-separated: lifecycle, half-rate, idle-pickup, mixed, batch-create,
    /// http-floor (taskledger's lifecycle creates against a server that stores nothing),
    /// storage-floor (a lifecycle task's records and rows in redb and SQLite, nothing else).
    #[arg(long, default_value = "lifecycle,half-rate,idle-pickup,mixed,batch-create,http-floor,storage-floor")]
    workloads: String,
    /// Lifecycle tasks the storage floor stores.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    floor_tasks: u64,
    /// Run only one system: taskledger or baseline.
    #[arg(long)]
    only: Option<String>,
    /// The server binary (default: target/release/taskledger, built if missing).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Keep the server's data dir.
    #[arg(long)]
    keep: bool,
    /// How the baseline wakes idle workers: `poll:MS` (sleep after an empty claim) or
    /// `notify` (an insert trigger's pg_notify; serializes commits, see baseline.rs).
    #[arg(long, default_value = "poll:2")]
    baseline_wakeup: Wakeup,
    /// Finished jobs the baseline's table starts with, then `ANALYZE`: a production queue's
    /// table has history and statistics. 0 starts it empty and never analyzed, whose prepared
    /// statements PostgreSQL plans for an empty table (see baseline.rs).
    #[arg(long, default_value_t = 100_000)]
    baseline_history: u64,
    /// Threads of the bench's own runtime (1 keeps the load generator to one core at most).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Longest wait for the server's projections to catch up between workloads, in seconds.
    #[arg(long, default_value_t = 10.0)]
    settle_s: f64,
    /// How taskledger workers finish a claim's completed steps: `batch` (one `POST
    /// /v1/completions`, as the baseline completes a claimed batch in one UPDATE) or `each`
    /// (one request per step, in parallel).
    #[arg(long, default_value = "batch", value_parser = ["batch", "each"])]
    completions: String,
    /// How long to probe the disk's own fdatasync latency before the workloads (0: skip).
    #[arg(long, default_value_t = 4.0)]
    disk_probe_s: f64,
    /// A smoke run: tiny windows and sizes (about 20 s in all).
    #[arg(long)]
    quick: bool,
    /// One JSON object per line on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run as the `http-floor` workload's null server (the bench starts it itself).
    #[arg(long, hide = true)]
    serve_null: bool,
}

impl Args {
    fn apply_quick(&mut self) {
        if !self.quick {
            return;
        }
        self.warmup_s = self.warmup_s.min(0.3);
        self.measure_s = self.measure_s.min(1.0);
        self.idle_tasks = self.idle_tasks.min(15);
        self.batch_size = self.batch_size.min(100);
        self.settle_s = self.settle_s.min(3.0);
        self.disk_probe_s = self.disk_probe_s.min(0.5);
        self.producers = self.producers.min(4);
        self.workers = self.workers.min(2);
        self.batch = self.batch.min(8);
        self.paced_connections = self.paced_connections.min(8);
        self.baseline_history = self.baseline_history.min(10_000);
        self.floor_tasks = self.floor_tasks.min(3_000);
    }
    fn wants(&self, workload: &str) -> bool {
        self.workloads.split(',').any(|w| w.trim() == workload)
    }
    /// Whether any workload needs a system started (the floors alone need none).
    fn wants_a_system(&self) -> bool {
        ["lifecycle", "half-rate", "idle-pickup", "mixed", "batch-create"].iter().any(|w| self.wants(w))
    }
    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_s)
    }
    fn window(&self) -> Duration {
        Duration::from_secs_f64(self.measure_s)
    }
}

/// One line of the report.
struct Row {
    system: &'static str,
    workload: &'static str,
    tasks_per_s: f64,
    seconds: f64,
    tally: Tally,
    cpu: CpuUse,
    /// Writer figures from the server's /metrics over the window (taskledger only).
    writer: Option<WriterRates>,
    note: String,
}

impl Row {
    /// HTTP requests the workload sent per task it counts (creates, claims, completion batches,
    /// failures): what the HTTP workers' CPU per task divides by to compare with the floor's
    /// per create. `None` for the baseline, which sends SQL.
    fn http_requests_per_task(&self) -> Option<f64> {
        let tasks = self.tasks_per_s * self.seconds;
        (self.tally.http_requests > 0 && tasks > 0.0).then(|| self.tally.http_requests as f64 / tasks)
    }

    fn json(&self) -> serde_json::Value {
        let t = &self.tally;
        let all = t.all_commands();
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        let mut v = json!({
            "system": self.system,
            "workload": self.workload,
            "tasks_per_s": r(self.tasks_per_s),
            "p50_ms": r(all.p_ms(0.5)),
            "p99_ms": r(all.p_ms(0.99)),
            "pickup_p50_ms": r(t.pickup.p_ms(0.5)),
            "pickup_p99_ms": r(t.pickup.p_ms(0.99)),
            "create_p50_ms": r(t.create.p_ms(0.5)),
            "create_p99_ms": r(t.create.p_ms(0.99)),
            "claim_p50_ms": r(t.claim.p_ms(0.5)),
            "claim_p99_ms": r(t.claim.p_ms(0.99)),
            "complete_p50_ms": r(t.complete.p_ms(0.5)),
            "complete_p99_ms": r(t.complete.p_ms(0.99)),
            "fail_p99_ms": r(t.fail.p_ms(0.99)),
            "create_p99_from_schedule_ms": r(t.create_from_schedule.p_ms(0.99)),
            "send_late_p99_ms": r(t.send_late.p_ms(0.99)),
            "created": t.created,
            "finished": t.finished,
            "completed_steps": t.completed_steps,
            "retried_steps": t.retried_steps,
            "dead_lettered": t.dead_lettered,
            "errors": t.errors_total,
            "seconds": r(self.seconds),
            "client_cpu_pct": r(self.cpu.client_pct),
            "server_cpu_pct": self.cpu.server_pct.map(r),
            "machine_cpu_pct": self.cpu.machine_pct.map(r),
            "machine_steal_pct": self.cpu.steal_pct.map(r),
        });
        if let Some(per_task) = self.http_requests_per_task() {
            v["http_requests_per_task"] = json!(r(per_task));
        }
        if t.feed_records > 0 {
            v["feed_records_per_s"] = json!(r(t.feed_records as f64 / self.seconds));
        }
        if t.followed_records > 0 {
            v["followed_records_per_s"] = json!(r(t.followed_records as f64 / self.seconds));
        }
        if t.graphql_followed_records > 0 {
            v["graphql_followed_records_per_s"] = json!(r(t.graphql_followed_records as f64 / self.seconds));
        }
        if t.graphql_records > 0 {
            v["graphql_records_per_s"] = json!(r(t.graphql_records as f64 / self.seconds));
        }
        if !self.cpu.server_threads.is_empty() {
            let threads: serde_json::Map<String, serde_json::Value> =
                self.cpu.server_threads.iter().map(|(name, pct)| (name.clone(), json!(r(*pct)))).collect();
            v["server_threads_cpu_pct"] = json!(threads);
        }
        if let Some(w) = &self.writer {
            v["writer_events_per_s"] = json!(r(w.events_per_s));
            v["writer_commits_per_s"] = json!(r(w.batches_per_s));
            v["writer_commands_per_commit"] = json!(r(w.commands_per_batch));
            v["writer_commit_p99_ms_at_most"] = json!(w.commit_p99_ms);
            v["writer_commit_max_ms_at_most"] = json!(w.commit_max_ms);
            v["writer_commit_avg_ms"] = json!(w.commit_avg_ms);
            v["server_ack_over_10ms_pct"] = json!(r(w.server_ack_over_10ms * 100.0));
        }
        if let Some(e) = &t.first_error {
            v["first_error"] = json!(e);
        }
        v
    }
}

/// The writer's counters from `/metrics`.
#[derive(Clone, Default)]
struct WriterCounters {
    batches: f64,
    commands: f64,
    events: f64,
    /// `taskledger_commit_seconds` as (upper bound in ms, cumulative count).
    commit_buckets: Vec<(f64, f64)>,
    /// `taskledger_commit_seconds_sum`.
    commit_seconds: f64,
    /// `taskledger_ack_latency_seconds` (the server's own view of each command, from
    /// its handler's start to the writer's answer), as (upper bound in ms, cumulative count).
    ack_buckets: Vec<(f64, f64)>,
}

struct WriterRates {
    events_per_s: f64,
    batches_per_s: f64,
    commands_per_batch: f64,
    /// Upper bound of the bucket holding the window's 99th-percentile commit
    /// (write + fsync), and of its longest: a writer stall shows here before
    /// it shows in the acknowledgement latencies.
    commit_p99_ms: f64,
    commit_max_ms: f64,
    commit_avg_ms: f64,
    /// Share of the window's commands the server itself took over 10 ms to answer.
    server_ack_over_10ms: f64,
}

/// The window's counts per bucket of a cumulative histogram read before (`b`) and after (`a`).
fn bucket_window(b: &[(f64, f64)], a: &[(f64, f64)]) -> Vec<(f64, f64)> {
    a.iter().zip(b).map(|(&(le, after), &(_, before))| (le, after - before)).collect()
}

impl WriterRates {
    fn between(b: &WriterCounters, a: &WriterCounters, seconds: f64) -> Self {
        let window = bucket_window(&b.commit_buckets, &a.commit_buckets);
        let acks = bucket_window(&b.ack_buckets, &a.ack_buckets);
        let acks_total = acks.last().map_or(0.0, |&(_, n)| n);
        let acks_within_10ms = acks.iter().find(|&&(le, _)| le >= 10.0).map_or(0.0, |&(_, n)| n);
        let total = window.last().map_or(0.0, |&(_, n)| n);
        let bound_at = |count: f64| window.iter().find(|&&(_, n)| n >= count).map_or(f64::NAN, |&(le, _)| le);
        WriterRates {
            events_per_s: (a.events - b.events) / seconds,
            batches_per_s: (a.batches - b.batches) / seconds,
            commands_per_batch: (a.commands - b.commands) / (a.batches - b.batches).max(1.0),
            commit_p99_ms: bound_at((total * 0.99).ceil().max(1.0)),
            commit_max_ms: bound_at(total.max(1.0)),
            commit_avg_ms: (a.commit_seconds - b.commit_seconds) * 1000.0 / total.max(1.0),
            server_ack_over_10ms: (acks_total - acks_within_10ms) / acks_total.max(1.0),
        }
    }
}

async fn writer_counters(target: &Target) -> Option<WriterCounters> {
    let mut conn = Conn::connect(target).await.ok()?;
    let (_, body) = conn.get("/metrics").await.ok()?;
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok())).unwrap_or(0.0)
    };
    let buckets = |name: &str| {
        let prefix = format!("{name}_bucket{{le=\"");
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .filter_map(|rest| {
                let (le, count) = rest.split_once("\"}")?;
                let le_ms = if le == "+Inf" { f64::INFINITY } else { le.parse::<f64>().ok()? * 1000.0 };
                Some((le_ms, count.trim().parse().ok()?))
            })
            .collect()
    };
    Some(WriterCounters {
        batches: value("taskledger_writer_batches_total "),
        commands: value("taskledger_writer_commands_total "),
        events: value("taskledger_writer_events_total "),
        commit_seconds: value("taskledger_commit_seconds_sum "),
        commit_buckets: buckets("taskledger_commit_seconds"),
        ack_buckets: buckets("taskledger_ack_latency_seconds"),
    })
}

/// Spawned producers and workers of one workload.
type Tasks = Vec<tokio::task::JoinHandle<Result<Tally>>>;

struct Measured {
    tally: Tally,
    seconds: f64,
    cpu: CpuUse,
    writer: Option<WriterRates>,
}

/// Warm up, measure a window, stop everything and merge what each task saw.
async fn measure(
    phase: &Arc<Phase>,
    warmup: Duration,
    window: Duration,
    server: Option<(u32, Option<&Target>)>,
    tasks: Tasks,
) -> Result<Measured> {
    tokio::time::sleep(warmup).await;
    let counters = server.and_then(|(_, t)| t);
    let before = match counters {
        Some(t) => writer_counters(t).await,
        None => None,
    };
    let cpu = CpuMeter::start(server.map(|(pid, _)| pid));
    let started = std::time::Instant::now();
    phase.start_measuring();
    tokio::time::sleep(window).await;
    phase.stop();
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    let after = match counters {
        Some(t) => writer_counters(t).await,
        None => None,
    };
    let writer = before.zip(after).map(|(b, a)| WriterRates::between(&b, &a, seconds));
    let mut tally = Tally::default();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(Ok(t))) => tally.merge(&t),
            Ok(Ok(Err(e))) => tally.error(|| format!("{e:#}")),
            Ok(Err(e)) => tally.error(|| format!("a bench task panicked: {e}")),
            Err(_) => tally.error(|| "a bench task did not stop within 60 s".into()),
        }
    }
    Ok(Measured { tally, seconds, cpu, writer })
}

fn row(system: &'static str, workload: &'static str, m: Measured, count: impl Fn(&Tally) -> u64, note: String) -> Row {
    Row {
        system,
        workload,
        tasks_per_s: count(&m.tally) as f64 / m.seconds,
        seconds: m.seconds,
        tally: m.tally,
        cpu: m.cpu,
        writer: m.writer,
        note,
    }
}

fn progress(args: &Args, r: &Row) {
    let t = &r.tally;
    eprintln!(
        "  {:<12} {:<13} {:>9.0} tasks/s  create p99 {:>7.2} ms  pickup p99 {:>7.2} ms  errors {}  (client cpu {:.0}%){}",
        r.system,
        r.workload,
        r.tasks_per_s,
        t.create.p_ms(0.99),
        t.pickup.p_ms(0.99),
        t.errors_total,
        r.cpu.client_pct,
        t.first_error.as_deref().map(|e| format!("\n    first error: {e}")).unwrap_or_default()
    );
    let _ = args;
}

/// What a taskledger worker of `namespace` claims and how it finishes its steps.
fn worker_spec(args: &Args, namespace: &'static str, fates: Fates) -> WorkerSpec {
    WorkerSpec {
        namespace,
        max: args.batch,
        wait_ms: args.wait_ms,
        always_wait: false,
        fates,
        batch_completions: args.completions == "batch",
    }
}

/// The taskledger server under test, started once for all of its workloads.
struct TaskledgerSide {
    srv: server::Server,
    target: Target,
    ids: Arc<Ids>,
}

impl TaskledgerSide {
    fn start(args: &Args, binary: &std::path::Path) -> Result<TaskledgerSide> {
        let srv = server::Server::start(binary, args.keep)?;
        eprintln!("taskledger {} (pid {}) on {}, data {}", binary.display(), srv.pid(), srv.addr, srv.data.display());
        let target = Target::new(srv.addr, &srv.token)?;
        Ok(TaskledgerSide { srv, target, ids: Arc::new(Ids::new()) })
    }

    /// Waits (at most `--settle-s`) for the projections to catch up after a workload, so that
    /// their backlog is not the next workload's load.
    async fn settle(&self, args: &Args, name: &str) {
        let limit = Duration::from_secs_f64(args.settle_s);
        let started = std::time::Instant::now();
        match taskledger::settle(&self.target, limit).await {
            Ok(true) => {
                if started.elapsed() > Duration::from_millis(500) {
                    eprintln!("  (projections caught up after {name} in {:.1} s)", started.elapsed().as_secs_f64());
                }
            }
            Ok(false) => eprintln!("  (projections still behind {:.0} s after {name}; going on)", limit.as_secs_f64()),
            Err(e) => eprintln!("  (could not ask /readyz: {e:#})"),
        }
    }

    fn measured_here(&self) -> Option<(u32, Option<&Target>)> {
        Some((self.srv.pid(), Some(&self.target)))
    }

    /// The lifecycle in a namespace of the round's own: the tasks a round leaves unfinished
    /// when its window closes stay there, since a later round's workers, finding them, would
    /// count finishes that round's producers never created (its backlog below zero, which
    /// paused them: a round of 676 tasks/s among rounds of 10k).
    async fn lifecycle(&self, args: &Args, round: u32) -> Result<Row> {
        let namespace: &'static str =
            if round == 0 { "lifecycle" } else { Box::leak(format!("lifecycle-round{}", round + 1).into_boxed_str()) };
        let target = &self.target;
        let phase = Arc::new(Phase::new());
        let pickups = Arc::new(Pickups::new());
        let mut tasks: Tasks = Vec::new();
        for i in 0..args.workers {
            let spec = worker_spec(args, namespace, Fates::AllComplete);
            tasks.push(tokio::spawn(taskledger::worker(target.clone(), i, spec, phase.clone(), pickups.clone())));
        }
        for _ in 0..args.producers {
            tasks.push(tokio::spawn(taskledger::producer(
                target.clone(),
                namespace,
                TaskShape::Single,
                args.max_backlog,
                self.ids.clone(),
                phase.clone(),
                pickups.clone(),
            )));
        }
        let m = measure(&phase, args.warmup(), args.window(), self.measured_here(), tasks).await?;
        let r = row("taskledger", "lifecycle", m, |t| t.finished, String::new());
        progress(args, &r);
        self.settle(args, "lifecycle").await;
        Ok(r)
    }

    /// Every workload but the lifecycle, then the server's stop.
    async fn rest(mut self, args: &Args, lifecycle_rate: Option<f64>, rows: &mut Vec<Row>) -> Result<()> {
        let target = self.target.clone();
        let ids = self.ids.clone();
        if args.wants("half-rate") {
            let rate = args.half_rate.or(lifecycle_rate.map(|r| r / 2.0));
            match rate {
                Some(rate) if rate > 0.0 => {
                    let phase = Arc::new(Phase::new());
                    let pickups = Arc::new(Pickups::new());
                    let mut tasks: Tasks = Vec::new();
                    for i in 0..args.workers {
                        let spec = worker_spec(args, "half", Fates::AllComplete);
                        tasks.push(tokio::spawn(taskledger::worker(
                            target.clone(),
                            i,
                            spec,
                            phase.clone(),
                            pickups.clone(),
                        )));
                    }
                    let conns = args.paced_connections.max(1);
                    let interval = Duration::from_secs_f64(conns as f64 / rate);
                    for c in 0..conns {
                        let offset = interval.mul_f64(c as f64 / conns as f64);
                        tasks.push(tokio::spawn(taskledger::paced_producer(
                            target.clone(),
                            "half",
                            interval,
                            offset,
                            ids.clone(),
                            phase.clone(),
                            pickups.clone(),
                        )));
                    }
                    for _ in 0..args.feed_readers {
                        tasks.push(tokio::spawn(taskledger::feed_reader(target.clone(), phase.clone())));
                    }
                    for _ in 0..args.feed_followers {
                        tasks.push(tokio::spawn(taskledger::feed_follower(target.clone(), phase.clone())));
                    }
                    let subscribers = [
                        (args.graphql_readers, taskledger::GraphqlSubscriber::CatchingUp),
                        (args.graphql_followers, taskledger::GraphqlSubscriber::Following),
                    ];
                    for (count, kind) in subscribers {
                        for _ in 0..count {
                            let (target, phase) = (target.clone(), phase.clone());
                            tasks.push(tokio::task::spawn_blocking(move || {
                                taskledger::graphql_subscriber(&target, &phase, kind)
                            }));
                        }
                    }
                    let m = measure(&phase, args.warmup(), args.window(), self.measured_here(), tasks).await?;
                    let mut note = format!("target {rate:.0} tasks/s");
                    if args.feed_readers > 0 {
                        let read = m.tally.feed_records as f64 / m.seconds;
                        note += &format!(", {} feed readers read {read:.0} records/s", args.feed_readers);
                    }
                    if args.feed_followers > 0 {
                        let read = m.tally.followed_records as f64 / m.seconds / args.feed_followers as f64;
                        note += &format!(", {} feed followers got {read:.0} records/s each", args.feed_followers);
                    }
                    if args.graphql_readers > 0 {
                        let read = m.tally.graphql_records as f64 / m.seconds;
                        note += &format!(", {} GraphQL subscribers got {read:.0} events/s", args.graphql_readers);
                    }
                    if args.graphql_followers > 0 {
                        let read = m.tally.graphql_followed_records as f64 / m.seconds / args.graphql_followers as f64;
                        note += &format!(", {} GraphQL followers got {read:.0} events/s each", args.graphql_followers);
                    }
                    let r = row("taskledger", "half-rate", m, |t| t.finished, note);
                    progress(args, &r);
                    rows.push(r);
                    self.settle(args, "half-rate").await;
                }
                _ => eprintln!("  (half-rate skipped: it needs the lifecycle figure or --half-rate)"),
            }
        }

        if args.wants("idle-pickup") {
            let phase = Arc::new(Phase::new());
            let pickups = Arc::new(Pickups::new());
            let interval = Duration::from_millis(args.idle_interval_ms);
            let spec = WorkerSpec {
                max: 1,
                wait_ms: 5_000,
                always_wait: true,
                ..worker_spec(args, "idle", Fates::AllComplete)
            };
            let tasks: Tasks = vec![
                tokio::spawn(taskledger::worker(target.clone(), 0, spec, phase.clone(), pickups.clone())),
                tokio::spawn(taskledger::trickle_producer(
                    target.clone(),
                    "idle",
                    interval,
                    ids.clone(),
                    phase.clone(),
                    pickups.clone(),
                )),
            ];
            let window = interval * args.idle_tasks;
            let m = measure(&phase, interval * 5, window, self.measured_here(), tasks).await?;
            let r = row("taskledger", "idle-pickup", m, |t| t.finished, String::new());
            progress(args, &r);
            rows.push(r);
        }

        if args.wants("mixed") {
            let phase = Arc::new(Phase::new());
            let pickups = Arc::new(Pickups::new());
            let fates = Fates::Mixed {
                transient_permille: args.transient_permille,
                permanent_permille: args.permanent_permille,
                max_attempts: 3,
            };
            let mut tasks: Tasks = Vec::new();
            for i in 0..args.workers {
                let spec = worker_spec(args, "mixed", fates);
                tasks.push(tokio::spawn(taskledger::worker(target.clone(), i, spec, phase.clone(), pickups.clone())));
            }
            for _ in 0..args.producers {
                tasks.push(tokio::spawn(taskledger::producer(
                    target.clone(),
                    "mixed",
                    TaskShape::Mixed { dag_every: args.dag_every },
                    args.max_backlog,
                    ids.clone(),
                    phase.clone(),
                    pickups.clone(),
                )));
            }
            let m = measure(&phase, args.warmup(), args.window(), self.measured_here(), tasks).await?;
            let note = format!(
                "{} steps completed, {} retried, {} dead-lettered",
                m.tally.completed_steps, m.tally.retried_steps, m.tally.dead_lettered
            );
            let r = row("taskledger", "mixed", m, |t| t.finished, note);
            progress(args, &r);
            rows.push(r);
            self.settle(args, "mixed").await;
        }

        if args.wants("batch-create") {
            let phase = Arc::new(Phase::new());
            let mut tasks: Tasks = Vec::new();
            for _ in 0..args.batch_producers {
                tasks.push(tokio::spawn(taskledger::batch_producer(
                    target.clone(),
                    "batch",
                    args.batch_size,
                    ids.clone(),
                    phase.clone(),
                )));
            }
            let m =
                measure(&phase, args.warmup().min(Duration::from_secs(2)), args.window(), self.measured_here(), tasks)
                    .await?;
            let r = row("taskledger", "batch-create", m, |t| t.created, format!("{} tasks per batch", args.batch_size));
            progress(args, &r);
            rows.push(r);
        }
        self.srv.stop();
        Ok(())
    }
}

/// taskledger's lifecycle producers against the null server (see floor.rs): the
/// most creates per second any HTTP server answers here.
async fn run_http_floor(args: &Args, rows: &mut Vec<Row>) -> Result<()> {
    let null = floor::NullServer::start()?;
    let target = Target::new(null.addr, "floor")?;
    let phase = Arc::new(Phase::new());
    let pickups = Arc::new(Pickups::untracked());
    let ids = Arc::new(Ids::new());
    let tasks: Tasks = (0..args.producers)
        .map(|_| {
            tokio::spawn(taskledger::producer(
                target.clone(),
                "floor",
                TaskShape::Single,
                u64::MAX,
                ids.clone(),
                phase.clone(),
                pickups.clone(),
            ))
        })
        .collect();
    let m = measure(&phase, args.warmup(), args.window(), Some((null.pid(), None)), tasks).await?;
    let r = row(HTTP_FLOOR, "create", m, |t| t.created, "creates only, nothing stored".to_owned());
    progress(args, &r);
    rows.push(r);
    Ok(())
}

/// The `system` of the `http-floor` row.
const HTTP_FLOOR: &str = "http-floor";

/// The baseline queue on the throwaway PostgreSQL cluster: a database of its own per workload.
struct BaselineSide<'a> {
    pg: &'a TempPostgres,
    connections: u32,
    wakeup_note: String,
}

impl<'a> BaselineSide<'a> {
    fn new(args: &Args, pg: &'a TempPostgres) -> BaselineSide<'a> {
        let connections = (args.producers.max(args.paced_connections).max(args.batch_producers) + args.workers) as u32;
        let wakeup_note = match args.baseline_wakeup {
            Wakeup::Notify => "LISTEN/NOTIFY".to_owned(),
            Wakeup::Poll(d) => format!("poll every {} ms", d.as_millis()),
        };
        BaselineSide { pg, connections, wakeup_note }
    }

    async fn open(&self, args: &Args, name: &str) -> Result<baseline::Queue> {
        let url = self.pg.create_database(&format!("bench_{name}")).await.context("create a baseline database")?;
        baseline::Queue::create(&url, self.connections, args.baseline_wakeup, args.baseline_history).await
    }

    fn spawn_workers(
        q: &baseline::Queue,
        name: &'static str,
        count: usize,
        max: u32,
        phase: &Arc<Phase>,
        pickups: &Arc<Pickups>,
    ) -> Tasks {
        (0..count)
            .map(|i| {
                tokio::spawn(baseline::worker(
                    q.inserted.clone(),
                    q.wakeup,
                    q.pool.clone(),
                    name,
                    i,
                    max,
                    phase.clone(),
                    pickups.clone(),
                ))
            })
            .collect()
    }

    /// The lifecycle on a fresh table (with its history) in a database of the round's own.
    async fn lifecycle(&self, args: &Args, round: u32) -> Result<Row> {
        let database = if round == 0 { "lifecycle".to_owned() } else { format!("lifecycle_round{}", round + 1) };
        let q = self.open(args, &database).await?;
        let phase = Arc::new(Phase::new());
        let pickups = Arc::new(Pickups::new());
        let mut tasks = Self::spawn_workers(&q, "lifecycle", args.workers, args.batch, &phase, &pickups);
        for _ in 0..args.producers {
            tasks.push(tokio::spawn(baseline::producer(
                q.pool.clone(),
                "lifecycle",
                args.max_backlog,
                phase.clone(),
                pickups.clone(),
            )));
        }
        let m = measure(&phase, args.warmup(), args.window(), None, tasks).await?;
        let r = row("pg-skip-locked", "lifecycle", m, |t| t.finished, self.wakeup_note.clone());
        progress(args, &r);
        q.close().await;
        Ok(r)
    }

    /// Every workload but the lifecycle.
    async fn rest(&self, args: &Args, lifecycle_rate: Option<f64>, rows: &mut Vec<Row>) -> Result<()> {
        if args.wants("half-rate") {
            let rate = args.half_rate.or(lifecycle_rate.map(|r| r / 2.0));
            if let Some(rate) = rate.filter(|r| *r > 0.0) {
                let q = self.open(args, "half").await?;
                let phase = Arc::new(Phase::new());
                let pickups = Arc::new(Pickups::new());
                let mut tasks = Self::spawn_workers(&q, "half", args.workers, args.batch, &phase, &pickups);
                let conns = args.paced_connections.max(1);
                let interval = Duration::from_secs_f64(conns as f64 / rate);
                for c in 0..conns {
                    let offset = interval.mul_f64(c as f64 / conns as f64);
                    tasks.push(tokio::spawn(baseline::paced_producer(
                        q.pool.clone(),
                        "half",
                        baseline::Pace::Fixed { interval, offset },
                        phase.clone(),
                        pickups.clone(),
                    )));
                }
                let m = measure(&phase, args.warmup(), args.window(), None, tasks).await?;
                let r = row("pg-skip-locked", "half-rate", m, |t| t.finished, format!("target {rate:.0} tasks/s"));
                progress(args, &r);
                rows.push(r);
                q.close().await;
            }
        }

        if args.wants("idle-pickup") {
            let q = self.open(args, "idle").await?;
            let phase = Arc::new(Phase::new());
            let pickups = Arc::new(Pickups::new());
            let interval = Duration::from_millis(args.idle_interval_ms);
            let mut tasks = Self::spawn_workers(&q, "idle", 1, 1, &phase, &pickups);
            tasks.push(tokio::spawn(baseline::paced_producer(
                q.pool.clone(),
                "idle",
                baseline::Pace::Trickle { interval },
                phase.clone(),
                pickups.clone(),
            )));
            let m = measure(&phase, interval * 5, interval * args.idle_tasks, None, tasks).await?;
            let r = row("pg-skip-locked", "idle-pickup", m, |t| t.finished, self.wakeup_note.clone());
            progress(args, &r);
            rows.push(r);
            q.close().await;
        }

        if args.wants("batch-create") {
            let q = self.open(args, "batch").await?;
            let phase = Arc::new(Phase::new());
            let tasks: Tasks = (0..args.batch_producers)
                .map(|_| {
                    tokio::spawn(baseline::batch_producer(q.pool.clone(), "batch", args.batch_size, phase.clone()))
                })
                .collect();
            let m = measure(&phase, args.warmup().min(Duration::from_secs(2)), args.window(), None, tasks).await?;
            let r =
                row("pg-skip-locked", "batch-create", m, |t| t.created, format!("{} jobs per INSERT", args.batch_size));
            progress(args, &r);
            rows.push(r);
            q.close().await;
        }
        Ok(())
    }
}

/// Gap between the disk probe's syncs: about the pace of an idle writer's commits.
const DISK_PROBE_INTERVAL: Duration = Duration::from_millis(5);

fn print_disk(tail: &disk::FsyncTail) {
    eprintln!(
        "disk: fdatasync of a 256-byte append every {} ms, {} syncs: p50 {:.2} ms, p99 {:.2} ms, longest {:.2} ms \
         (no acknowledgement percentile can beat the disk's)",
        DISK_PROBE_INTERVAL.as_millis(),
        tail.syncs,
        tail.latency.p_ms(0.5),
        tail.latency.p_ms(0.99),
        tail.latency.p_ms(1.0)
    );
}

fn print_table(args: &Args, rows: &[Row], storage: Option<&StorageFloor>) {
    let mut out = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "\ntaskledger-bench: P={} W={} K={}, taskledger completions: {}, warm-up {} s, window {} s (latencies in ms)",
        args.producers, args.workers, args.batch, args.completions, args.warmup_s, args.measure_s
    );
    let _ = writeln!(
        out,
        "{:<15} {:<13} {:>10} {:>15} {:>15} {:>15} {:>15} {:>6} {:>11}",
        "system",
        "workload",
        "tasks/s",
        "create p50/p99",
        "claim p50/p99",
        "compl. p50/p99",
        "pickup p50/p99",
        "errors",
        "client cpu"
    );
    let pair = |c: &stats::Command| {
        if c.latency_us.is_empty() { "-".to_owned() } else { format!("{:.2}/{:.2}", c.p_ms(0.5), c.p_ms(0.99)) }
    };
    for r in rows {
        let t = &r.tally;
        let _ = writeln!(
            out,
            "{:<15} {:<13} {:>10.0} {:>15} {:>15} {:>15} {:>15} {:>6} {:>10.0}%",
            r.system,
            r.workload,
            r.tasks_per_s,
            pair(&t.create),
            pair(&t.claim),
            pair(&t.complete),
            pair(&t.pickup),
            t.errors_total,
            r.cpu.client_pct
        );
    }
    let _ = writeln!(out);
    for r in rows {
        let mut notes = Vec::new();
        if !r.note.is_empty() {
            notes.push(r.note.clone());
        }
        if let Some(s) = r.cpu.server_pct {
            notes.push(format!("server cpu {s:.0}%"));
        }
        if !r.cpu.server_threads.is_empty() && r.tasks_per_s > 0.0 {
            let threads: Vec<String> = r
                .cpu
                .server_threads
                .iter()
                .map(|(name, pct)| format!("{name} {:.1}", cpu_us_per_task(*pct, r.tasks_per_s)))
                .collect();
            notes.push(format!("server cpu µs per task by thread: {}", threads.join(", ")));
        }
        if let Some(per_task) = r.http_requests_per_task() {
            notes.push(format!("http requests per task {per_task:.3}"));
        }
        if let Some(m) = r.cpu.machine_pct {
            notes.push(format!("machine cpu {m:.0}% of 1 core"));
        }
        if let Some(steal) = r.cpu.steal_pct.filter(|steal| *steal >= 0.5) {
            notes.push(format!("the host took {steal:.0}% of 1 core for other guests (steal)"));
        }
        if !r.tally.create_from_schedule.latency_us.is_empty() {
            let (s, l) = (&r.tally.create_from_schedule, &r.tally.send_late);
            notes.push(format!(
                "create p50/p99 from the schedule {:.2}/{:.2} ms (sends on a free connection left {:.2}/{:.2} ms late)",
                s.p_ms(0.5),
                s.p_ms(0.99),
                l.p_ms(0.5),
                l.p_ms(0.99)
            ));
        }
        if let Some(w) = &r.writer {
            notes.push(format!(
                "writer {:.0} events/s in {:.0} commits/s ({:.1} commands/commit), commit avg {:.2} ms, p99 <= {} ms, longest <= {} ms; commands the server took over 10 ms to answer {:.2}%",
                w.events_per_s,
                w.batches_per_s,
                w.commands_per_batch,
                w.commit_avg_ms,
                w.commit_p99_ms,
                w.commit_max_ms,
                w.server_ack_over_10ms * 100.0
            ));
        }
        let _ = writeln!(out, "{} {}: {}", r.system, r.workload, notes.join("; "));
    }
    let (lifecycle, floor) = ratios(rows);
    if let Some(ratio) = lifecycle {
        let _ = writeln!(out, "\nlifecycle ratio taskledger / pg-skip-locked: {ratio:.2}");
    }
    if let Some(ratio) = floor {
        let _ = writeln!(
            out,
            "http-floor creates / pg-skip-locked lifecycle: {ratio:.2} (no lifecycle served over HTTP here could have a higher ratio)"
        );
    }
    if let Some(b) = cpu_budget(rows) {
        let _ = writeln!(
            out,
            "cpu a task: 3× the baseline is {:.0} tasks/s, at which {} cores give {:.1} µs a task; taskledger's lifecycle took \
             {:.1} µs a task of the machine's cpu ({:.1} the server, {:.1} the load generator): {:.2} times that",
            b.goal_tasks_per_s,
            b.cores,
            b.budget_us,
            b.spent_us,
            b.server_us,
            b.client_us,
            b.spent_us / b.budget_us
        );
    }
    if let Some(f) = storage {
        let _ = writeln!(
            out,
            "storage floor ({} lifecycle tasks, {:.0} records of {:.0} bytes and {:.0} rows each): the log {:.1} µs a task \
             (redb: hash chain, events, stream index), the read models {:.1} (SQLite: the rows and their indexes)",
            f.tasks, f.records_per_task, f.record_bytes_avg, f.rows_per_task, f.log_us, f.read_models_us
        );
    }
    if let Some(d) = design_floor(args, rows, storage) {
        let _ = writeln!(
            out,
            "design floor a task: http {:.1} ({:.3} requests at the null server's {:.1} µs of the machine's cpu a create) \
             + log {:.1} + read models {:.1} = {:.1} µs, {:.0}% of the {:.1} µs a task 3× allows, before any command is \
             decided, folded, encoded or routed",
            d.http_us,
            d.requests_per_task,
            d.http_us / d.requests_per_task,
            d.log_us,
            d.read_models_us,
            d.total_us(),
            d.total_us() / d.budget_us * 100.0,
            d.budget_us
        );
    }
    eprint!("{out}");
}

/// The least CPU a lifecycle task can cost any server of this design here: its HTTP requests at
/// the null server's cost (client included), its records and its rows at the storage floor.
struct DesignFloor {
    requests_per_task: f64,
    http_us: f64,
    log_us: f64,
    read_models_us: f64,
    budget_us: f64,
}

impl DesignFloor {
    fn total_us(&self) -> f64 {
        self.http_us + self.log_us + self.read_models_us
    }
}

/// From this run's HTTP floor, storage floor and 3× budget; the fewest requests a task takes are
/// its create and its share of a full claim and of one completion request for that claim (its
/// own completion request with `--completions each`).
fn design_floor(args: &Args, rows: &[Row], storage: Option<&StorageFloor>) -> Option<DesignFloor> {
    let storage = storage?;
    let floor = rows.iter().find(|r| r.system == HTTP_FLOOR && r.tasks_per_s > 0.0)?;
    let per_create = cpu_us_per_task(floor.cpu.machine_pct?, floor.tasks_per_s);
    // With `--completions each` a task's completion is a request of its own.
    let k = f64::from(args.batch.max(1));
    let requests_per_task = 1.0 + 1.0 / k + if args.completions == "batch" { 1.0 / k } else { 1.0 };
    Some(DesignFloor {
        requests_per_task,
        http_us: per_create * requests_per_task,
        log_us: storage.log_us,
        read_models_us: storage.read_models_us,
        budget_us: cpu_budget(rows)?.budget_us,
    })
}

/// The machine's CPU a lifecycle task may take at 3× the baseline's rate, against what this
/// run's taskledger lifecycle took: the goal's arithmetic, from this run's own figures.
struct CpuBudget {
    goal_tasks_per_s: f64,
    cores: usize,
    /// µs of CPU a task at the goal's rate, with every core busy.
    budget_us: f64,
    /// µs of the machine's CPU a task in taskledger's lifecycle (all of it: the server, the load
    /// generator and the kernel's work for both; the baseline's PostgreSQL starts later), and
    /// the server's and the load generator's shares.
    spent_us: f64,
    server_us: f64,
    client_us: f64,
}

/// CPU time a task took, in µs, from percent of a core at a rate: a core-second is 10^6 µs,
/// so percent × 10^4 / tasks per second.
fn cpu_us_per_task(pct: f64, tasks_per_s: f64) -> f64 {
    pct * 1e4 / tasks_per_s
}

fn cpu_budget(rows: &[Row]) -> Option<CpuBudget> {
    let row = |system: &str| rows.iter().find(|r| r.system == system && r.workload == "lifecycle");
    let (taskledger, baseline) = (row("taskledger")?, row("pg-skip-locked")?);
    let rate = taskledger.tasks_per_s;
    if rate <= 0.0 || baseline.tasks_per_s <= 0.0 {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let goal_tasks_per_s = 3.0 * baseline.tasks_per_s;
    let per_task = |pct: f64| cpu_us_per_task(pct, rate);
    Some(CpuBudget {
        goal_tasks_per_s,
        cores,
        budget_us: cores as f64 * 1e6 / goal_tasks_per_s,
        spent_us: per_task(taskledger.cpu.machine_pct?),
        server_us: per_task(taskledger.cpu.server_pct?),
        client_us: per_task(taskledger.cpu.client_pct),
    })
}

/// taskledger's lifecycle over the baseline's; the HTTP floor's creates over the baseline's
/// lifecycle (the highest lifecycle ratio any system answering over HTTP could have here).
fn ratios(rows: &[Row]) -> (Option<f64>, Option<f64>) {
    let rate = |system: &str, workload: &str| {
        rows.iter().find(|r| r.system == system && r.workload == workload).map(|r| r.tasks_per_s)
    };
    let baseline = rate("pg-skip-locked", "lifecycle");
    let over_baseline = |rate: Option<f64>| rate.zip(baseline).map(|(a, b)| a / b);
    (over_baseline(rate("taskledger", "lifecycle")), over_baseline(rate(HTTP_FLOOR, "create")))
}

/// One lifecycle round: taskledger's and the baseline's throughput measured back to back.
struct Round {
    taskledger: f64,
    baseline: f64,
    /// Errors in either window.
    errors: u64,
}

impl Round {
    fn ratio(&self) -> f64 {
        self.taskledger / self.baseline
    }
}

/// Measures the lifecycle of each system that runs, in `--rounds` rounds when both do: taskledger
/// then the baseline, the other way round every other round, so a drift in the machine's speed
/// favours neither. The first round's rows go into the table.
async fn lifecycle_rounds(
    args: &Args,
    tl: Option<&TaskledgerSide>,
    baseline: Option<&BaselineSide<'_>>,
    tl_rows: &mut Vec<Row>,
    pg_rows: &mut Vec<Row>,
) -> Result<Vec<Round>> {
    let count = if tl.is_some() && baseline.is_some() { args.rounds } else { 1 };
    let mut rounds = Vec::new();
    for round in 0..count {
        if count > 1 {
            eprintln!("lifecycle round {} of {count}", round + 1);
        }
        let (mut ours, mut theirs) = (None, None);
        let baseline_first = round % 2 == 1;
        if baseline_first && let Some(b) = baseline {
            theirs = Some(b.lifecycle(args, round).await?);
        }
        if let Some(t) = tl {
            ours = Some(t.lifecycle(args, round).await?);
        }
        if !baseline_first && let Some(b) = baseline {
            theirs = Some(b.lifecycle(args, round).await?);
        }
        if let (Some(a), Some(b)) = (&ours, &theirs) {
            let errors = a.tally.errors_total + b.tally.errors_total;
            rounds.push(Round { taskledger: a.tasks_per_s, baseline: b.tasks_per_s, errors });
        }
        if round == 0 {
            tl_rows.extend(ours);
            pg_rows.extend(theirs);
        }
    }
    Ok(rounds)
}

fn median_ratio(rounds: &[Round]) -> Option<f64> {
    let mut ratios: Vec<f64> = rounds.iter().map(Round::ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(ratios[n / 2]),
        _ => Some((ratios[n / 2 - 1] + ratios[n / 2]) / 2.0),
    }
}

fn print_rounds(rounds: &[Round]) {
    if rounds.len() < 2 {
        return;
    }
    let each: Vec<String> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{}: {:.0} / {:.0} = {:.2}", i + 1, r.taskledger, r.baseline, r.ratio()))
        .collect();
    eprintln!(
        "lifecycle in {} rounds, taskledger / pg-skip-locked tasks/s back to back: {}; median ratio {:.2}",
        rounds.len(),
        each.join(", "),
        median_ratio(rounds).unwrap_or(f64::NAN)
    );
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.serve_null {
        return floor::serve_null();
    }
    args.apply_quick();
    let (run_tl, run_pg) = match args.only.as_deref() {
        None => (true, true),
        Some("taskledger") => (true, false),
        Some("baseline") | Some("pg-skip-locked") => (false, true),
        Some(other) => bail!("--only takes taskledger or baseline, not {other:?}"),
    };
    let (start_tl, run_pg) = (run_tl && args.wants_a_system(), run_pg && args.wants_a_system());
    let binary = if start_tl { Some(server::find_or_build(args.server_bin.as_deref())?) } else { None };
    let runtime = if args.client_threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.client_threads).enable_all().build()
    }
    .context("start the bench runtime")?;

    let disk = if args.disk_probe_s > 0.0 {
        let tail = disk::probe(args.disk_probe_s, DISK_PROBE_INTERVAL)?;
        print_disk(&tail);
        Some(tail)
    } else {
        None
    };
    // First, while no server, database or workload runs: a floor is measured on a quiet machine.
    let storage = if args.wants("storage-floor") {
        eprintln!("storage floor: {} lifecycle tasks into redb and SQLite", args.floor_tasks);
        Some(storage_floor::measure(args.floor_tasks as usize, args.batch, &std::env::temp_dir())?)
    } else {
        None
    };
    let mut rows = Vec::new();
    let mut rounds = Vec::new();
    runtime.block_on(async {
        let tl = match &binary {
            Some(binary) => Some(TaskledgerSide::start(&args, binary)?),
            None => None,
        };
        let pg = if run_pg {
            eprintln!("starting a throwaway PostgreSQL (fsync on)");
            let pg = tokio::task::spawn_blocking(|| TempPostgres::start_with(ClusterOptions { durable: true }))
                .await
                .context("start PostgreSQL")?
                .context("start PostgreSQL")?;
            Some(pg)
        } else {
            None
        };
        let baseline = pg.as_ref().map(|pg| BaselineSide::new(&args, pg));
        // The table keeps taskledger's rows, then the floor's, then the baseline's.
        let (mut tl_rows, mut pg_rows) = (Vec::new(), Vec::new());
        if args.wants("lifecycle") {
            rounds = lifecycle_rounds(&args, tl.as_ref(), baseline.as_ref(), &mut tl_rows, &mut pg_rows).await?;
        }
        let lifecycle_rate = |rows: &[Row]| rows.iter().find(|r| r.workload == "lifecycle").map(|r| r.tasks_per_s);
        if let Some(tl) = tl {
            let rate = lifecycle_rate(&tl_rows);
            tl.rest(&args, rate, &mut tl_rows).await?;
        }
        rows.append(&mut tl_rows);
        if run_tl && args.wants("http-floor") {
            run_http_floor(&args, &mut rows).await?;
        }
        if let Some(baseline) = &baseline {
            let rate = lifecycle_rate(&pg_rows);
            baseline.rest(&args, rate, &mut pg_rows).await?;
        }
        rows.append(&mut pg_rows);
        if let Some(pg) = pg {
            tokio::task::spawn_blocking(move || drop(pg)).await.ok();
        }
        anyhow::Ok(())
    })?;

    print_table(&args, &rows, storage.as_ref());
    print_rounds(&rounds);
    if let Some(tail) = &disk {
        print_disk(tail);
    }
    if args.json {
        if let Some(tail) = &disk {
            let r = |x: f64| (x * 1000.0).round() / 1000.0;
            println!(
                "{}",
                json!({ "system": "disk", "workload": "fdatasync-probe", "syncs": tail.syncs,
                        "p50_ms": r(tail.latency.p_ms(0.5)), "p99_ms": r(tail.latency.p_ms(0.99)),
                        "max_ms": r(tail.latency.p_ms(1.0)) })
            );
        }
        for r in &rows {
            println!("{}", r.json());
        }
        let r = |x: f64| (x * 1000.0).round() / 1000.0;
        if let Some(f) = &storage {
            println!(
                "{}",
                json!({ "system": "storage-floor", "workload": "lifecycle-records", "tasks": f.tasks,
                        "records_per_task": r(f.records_per_task), "record_bytes_avg": r(f.record_bytes_avg),
                        "rows_per_task": r(f.rows_per_task), "log_cpu_us_per_task": r(f.log_us),
                        "read_models_cpu_us_per_task": r(f.read_models_us) })
            );
        }
        if let (Some(lifecycle), floor) = ratios(&rows) {
            let mut line = json!({ "ratio_lifecycle": r(lifecycle) });
            if let Some(floor) = floor {
                line["ratio_http_floor"] = json!(r(floor));
            }
            if let Some(b) = cpu_budget(&rows) {
                line["cpu_us_per_task_at_3x"] = json!(r(b.budget_us));
                line["lifecycle_cpu_us_per_task"] = json!(r(b.spent_us));
                line["lifecycle_server_cpu_us_per_task"] = json!(r(b.server_us));
                line["lifecycle_client_cpu_us_per_task"] = json!(r(b.client_us));
            }
            if let Some(d) = design_floor(&args, &rows, storage.as_ref()) {
                line["design_floor_cpu_us_per_task"] = json!(r(d.total_us()));
                line["design_floor_http_cpu_us_per_task"] = json!(r(d.http_us));
            }
            if rounds.len() > 1 {
                line["ratio_lifecycle_rounds"] = json!(rounds.iter().map(|x| r(x.ratio())).collect::<Vec<_>>());
                line["ratio_lifecycle_median"] = json!(median_ratio(&rounds).map(r));
            }
            println!("{line}");
        }
    }
    if rows.iter().any(|r| r.tally.errors_total > 0) || rounds.iter().any(|r| r.errors > 0) {
        bail!("some workloads had errors (see first_error above); the figures are not a result");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounds(ratios: &[f64]) -> Vec<Round> {
        ratios.iter().map(|r| Round { taskledger: r * 1000.0, baseline: 1000.0, errors: 0 }).collect()
    }

    #[test]
    fn the_median_ratio_is_the_middle_round_or_the_mean_of_the_middle_two() {
        assert_eq!(median_ratio(&rounds(&[])), None);
        assert_eq!(median_ratio(&rounds(&[1.5])), Some(1.5));
        assert_eq!(median_ratio(&rounds(&[2.0, 1.0, 1.25])), Some(1.25));
        assert_eq!(median_ratio(&rounds(&[2.0, 1.0, 1.5, 1.25])), Some(1.375));
    }
}
