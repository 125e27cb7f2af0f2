//! `projections-bench`: how fast the projectors rebuild, and how far behind
//! the writer they run, with figures printed for the README.
//!
//! 1. Rebuild: writes a log of `--events` events (jobs created in batches,
//!    claimed, mostly completed, some failing and retrying, over four
//!    namespaces), then builds all four projectors from seq 0 into a fresh
//!    SQLite file and a fresh PostgreSQL database, each projector in its own
//!    task as the runtime runs them, and prints events/s (log events applied
//!    by every projector, divided by the wall time until the last finished).
//! 2. Lag: runs the real writer, a producer sustaining `--rate` events/s for
//!    `--lag-seconds`, and the projector runtime (started, and warmed up with
//!    one command, before the producer starts); for every acknowledged
//!    command, the time from its acknowledgement until every projector has
//!    applied it; prints p50/p99/max.
//!
//! `--quick` shrinks both for a smoke run. PostgreSQL is
//! `TASKLEDGER_TEST_DATABASE_URL` if set, else a private cluster with fsync on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use domain::testkit::{Scenario, job, ns, text, worker};
use domain::{Command, Event, Json, LeaseRef};
use eventlog::{
    Envelope, LogReader, LogStore, RedbOptions, RedbStore, SystemClock, Writer, WriterConfig, encode_event,
};
use hdrhistogram::Histogram;
use projections::testing::{ClusterOptions, TempPostgres};
use projections::{Projections, ProjectorKind, RuntimeConfig, Store};

// The server's allocator (api/src/main.rs), so these figures are the ones `taskledger serve` gets.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "Rebuild speed and lag of the taskledger projections")]
struct Args {
    /// Events in the rebuild log.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events per second the producer sustains in the lag run.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long the lag run lasts.
    #[arg(long, default_value_t = 10)]
    lag_seconds: u64,
    /// Which backends: sqlite, postgres or both.
    #[arg(long, default_value = "both")]
    backend: String,
    /// Skip the rebuild or the lag part.
    #[arg(long)]
    skip_rebuild: bool,
    #[arg(long)]
    skip_lag: bool,
    /// Rebuild only this projector (audit, tasks, queue, dashboard).
    #[arg(long)]
    projector: Option<String>,
    /// 100,000 events and a 3 s lag run.
    #[arg(long)]
    quick: bool,
}

/// Writes a synthetic log of about `events` events through the domain
/// (so it is a valid history) straight into a redb store.
fn write_log(dir: &std::path::Path, events: u64) -> Result<RedbStore> {
    let mut store = RedbStore::open(dir, RedbOptions::default()).context("open the bench log")?;
    let mut scenario = Scenario::new();
    let mut pending: Vec<eventlog::NewRecord> = Vec::new();
    let mut next = 1u64;
    let mut command = 0u64;
    let namespaces = ["mail", "billing", "etl", "search"];
    let flush = |store: &mut RedbStore, pending: &mut Vec<eventlog::NewRecord>, force: bool| -> Result<()> {
        if pending.len() >= 2000 || (force && !pending.is_empty()) {
            store.append(pending, &[]).context("append to the bench log")?;
            pending.clear();
        }
        Ok(())
    };
    while store.head().seq + (pending.len() as u64) < events {
        let namespace = namespaces[(next / 100 % 4) as usize];
        let mut record = |scenario: &mut Scenario, c: Command, actor: &str, pending: &mut Vec<eventlog::NewRecord>| {
            command += 1;
            let produced = scenario.ok(c);
            pending.extend(
                produced.iter().map(|e: &Event| encode_event(e, &format!("c{command}"), actor, e.at().as_micros())),
            );
            produced
        };
        let specs: Vec<_> = (next..next + 100).map(|n| job(n, namespace)).collect();
        next += 100;
        record(&mut scenario, Command::CreateTasks(specs), "producer", &mut pending);
        scenario.advance_ms(5);
        let claimed = record(&mut scenario, domain::testkit::claim(namespace, "w1", 100), "w1", &mut pending);
        scenario.advance_ms(20);
        for (i, event) in claimed.iter().enumerate() {
            let Event::StepClaimed { task, epoch, .. } = event else { continue };
            let lease = LeaseRef { task: *task, step: domain::testkit::step_name("run"), epoch: *epoch };
            let c = if i % 10 == 9 {
                Command::FailStep { lease, error: text("flaky"), retryable: true }
            } else {
                Command::CompleteStep { lease, result: Json::null() }
            };
            record(&mut scenario, c, "w1", &mut pending);
        }
        scenario.advance_ms(2_000);
        let timers = scenario.fire_timers();
        pending.extend(timers.iter().map(|e| encode_event(e, "timers", "system", e.at().as_micros())));
        flush(&mut store, &mut pending, false)?;
    }
    flush(&mut store, &mut pending, true)?;
    Ok(store)
}

/// Builds every projector from seq 0 into `store` as a rebuild does: each
/// batch read and decoded once, applied by the projectors in parallel tasks,
/// secondary indexes created at the end (included in the time).
async fn rebuild(store: &Store, reader: &LogReader, head: u64, kinds: &[ProjectorKind]) -> Result<Duration> {
    let started = Instant::now();
    projections::runtime::build_live(store, reader, head, kinds, projections::runtime::BULK_BATCH_EVENTS_MAX)
        .await
        .context("rebuild the projectors")?;
    Ok(started.elapsed())
}

/// CPU time (user + system) this process has used so far: beside the wall
/// time, it shows how much of a run was work and how much waiting (the
/// machine is often shared).
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

async fn open_backend(name: &str, dir: &std::path::Path, pg: &Option<TempPostgres>, tag: &str) -> Result<Store> {
    match name {
        "sqlite" => Ok(Store::open_sqlite(dir.join(format!("{tag}.sqlite"))).await?),
        _ => {
            let pg = pg.as_ref().context("no PostgreSQL")?;
            let url = pg.create_database(tag).await?;
            Ok(Store::open(&url).await?)
        }
    }
}

/// Runs the writer with a producer at `rate` events/s and the projections
/// following it; returns the ack → applied-by-all latency histogram (µs).
async fn lag_run(store: Store, dir: &std::path::Path, rate: u64, seconds: u64) -> Result<(Histogram<u64>, u64)> {
    let (writer, _) =
        Writer::open(dir, WriterConfig { snapshot_every_events: 0, ..WriterConfig::default() }, Arc::new(SystemClock))
            .context("open the writer")?;
    let handle = writer.handle();
    let projections =
        Projections::start(store.clone(), handle.reader().clone(), handle.feed().clone(), RuntimeConfig::default())
            .await?;
    // Warm up: one command, applied by every projector, before the clock
    // starts, so the figures are those of following the writer and not of a
    // first start (each projector creating its tables).
    let warm_up = Envelope {
        command_id: "warm-up".into(),
        actor: "bench".into(),
        command: Command::CreateTasks(vec![job(1 << 40, "warm-up")]),
    };
    let warm_up = handle.submit(warm_up)?.await.context("warm up")??;
    if let Some(seqs) = warm_up.seqs {
        anyhow::ensure!(
            projections.wait_for_seq(seqs.last, Duration::from_secs(60)).await,
            "the projectors did not apply the warm-up command"
        );
    }
    let acks: Arc<parking_lot::Mutex<VecDeque<(u64, Instant)>>> = Arc::default();
    // Producer: every 10 ms, create n jobs, claim them, complete them (3n events).
    let per_tick = (rate / 100 / 3).max(1);
    let producer = {
        let (handle, acks) = (handle.clone(), acks.clone());
        tokio::task::spawn_blocking(move || -> Result<u64> {
            let start = Instant::now();
            let mut tick = 0u64;
            let mut next = 1u64;
            let mut events = 0u64;
            let envelope = |id: String, command| Envelope { command_id: id, actor: "bench".into(), command };
            while start.elapsed() < Duration::from_secs(seconds) {
                let due = start + Duration::from_millis(tick * 10);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                tick += 1;
                let specs: Vec<_> = (next..next + per_tick).map(|n| job(n, "lag")).collect();
                next += per_tick;
                let mut pending = vec![handle.submit(envelope(format!("create-{tick}"), Command::CreateTasks(specs)))?];
                let claim = Command::ClaimSteps {
                    namespaces: vec![ns("lag")],
                    worker: worker("w"),
                    max: per_tick as u32,
                    lease_ms: None,
                    handlers: vec![],
                };
                let claimed = handle.execute(envelope(format!("claim-{tick}"), claim))?;
                for c in &claimed.claimed {
                    let lease = LeaseRef { task: c.task, step: c.step.clone(), epoch: c.epoch };
                    pending.push(handle.submit(envelope(
                        format!("done-{}-{}", c.task, c.epoch),
                        Command::CompleteStep { lease, result: Json::null() },
                    ))?);
                }
                let now_ack = |seq: u64| acks.lock().push_back((seq, Instant::now()));
                if let Some(s) = claimed.seqs {
                    now_ack(s.last);
                    events += s.last - s.first + 1;
                }
                for p in pending {
                    let ack = p.blocking_recv()??;
                    if let Some(s) = ack.seqs {
                        now_ack(s.last);
                        events += s.last - s.first + 1;
                    }
                }
            }
            Ok(events)
        })
    };
    let mut histogram = Histogram::<u64>::new(3)?;
    let sampler_deadline = Instant::now() + Duration::from_secs(seconds + 30);
    loop {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let status = projections.status()?;
        let applied = status.iter().filter(|s| s.slot == "live").map(|s| s.checkpoint_seq).min().unwrap_or(0);
        let now = Instant::now();
        let mut queue = acks.lock();
        while let Some((seq, at)) = queue.front().copied() {
            if seq > applied {
                break;
            }
            queue.pop_front();
            histogram.record(now.duration_since(at).as_micros() as u64)?;
        }
        let drained = queue.is_empty();
        drop(queue);
        if (producer.is_finished() && drained) || now > sampler_deadline {
            break;
        }
    }
    let events = producer.await.context("join the producer")??;
    projections.shutdown().await;
    drop(handle);
    writer.shutdown();
    Ok((histogram, events))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    // As the server runs (see `eventlog::memory`).
    eventlog::memory::disable_transparent_huge_pages()?;
    if args.quick {
        args.events = args.events.min(100_000);
        args.lag_seconds = args.lag_seconds.min(3);
    }
    let backends: Vec<&str> = match args.backend.as_str() {
        "both" => vec!["sqlite", "postgres"],
        "sqlite" => vec!["sqlite"],
        "postgres" => vec!["postgres"],
        other => anyhow::bail!("unknown backend {other}: sqlite, postgres or both"),
    };
    let pg = if backends.contains(&"postgres") {
        Some(TempPostgres::start_with(ClusterOptions { durable: true }).context("start PostgreSQL")?)
    } else {
        None
    };
    let dir = tempfile::tempdir().context("make a temp dir")?;

    if !args.skip_rebuild {
        let started = Instant::now();
        let log = write_log(&dir.path().join("log"), args.events)?;
        let head = log.head().seq;
        println!("log: {head} events written in {:.1} s", started.elapsed().as_secs_f64());
        let reader = log.reader();
        for backend in &backends {
            let store = open_backend(backend, dir.path(), &pg, "rebuild").await?;
            let kinds: Vec<ProjectorKind> = match &args.projector {
                Some(name) => vec![ProjectorKind::from_name(name).context("unknown projector")?],
                None => ProjectorKind::ALL.to_vec(),
            };
            let cpu_before = cpu_time();
            let took = rebuild(&store, &reader, head, &kinds).await?;
            let cpu = cpu_time() - cpu_before;
            println!(
                "rebuild {backend:>8}: {head} events × {} projector(s) in {:.2} s = {:.0} events/s (this process: {:.2} s CPU)",
                kinds.len(),
                took.as_secs_f64(),
                head as f64 / took.as_secs_f64(),
                cpu.as_secs_f64()
            );
            store.close().await;
        }
    }

    if !args.skip_lag {
        for backend in &backends {
            let store = open_backend(backend, dir.path(), &pg, "lag").await?;
            let log_dir = dir.path().join(format!("lag-log-{backend}"));
            let (h, events) = lag_run(store, &log_dir, args.rate, args.lag_seconds).await?;
            println!(
                "lag {backend:>8}: {:.0} events/s sustained for {} s; ack → applied by all projectors: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} commands)",
                events as f64 / args.lag_seconds as f64,
                args.lag_seconds,
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.99) as f64 / 1000.0,
                h.max() as f64 / 1000.0,
                h.len()
            );
        }
    }
    Ok(())
}
