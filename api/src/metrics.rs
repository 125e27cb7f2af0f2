//! Prometheus metrics, rendered by hand in the text exposition format:
//! commands by type and outcome, the acknowledgement latency histogram, error
//! answers by status and code (`error::error_answers`), and the writer's own
//! counters. A mutex-guarded map is plenty here: one
//! increment per command, far off the writer's hot path.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eventlog::{CommandResult, WriteError, WriterHandle};
use projections::ProjectorStatus;

/// Upper bounds of the acknowledgement latency buckets, in seconds.
const LATENCY_BUCKETS_S: [f64; 11] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0];

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    commands: BTreeMap<(&'static str, &'static str), u64>,
    latency_buckets: [u64; LATENCY_BUCKETS_S.len()],
    latency_count: u64,
    latency_sum_s: f64,
    /// Whether a refusal because the writer stopped has been logged (it is logged once).
    writes_stopped_logged: bool,
}

fn outcome(result: &CommandResult) -> &'static str {
    match result {
        Ok(ack) if ack.duplicate => "duplicate",
        Ok(_) => "accepted",
        Err(WriteError::Rejected(_)) => "rejected",
        Err(WriteError::Overloaded) => "overloaded",
        Err(WriteError::Unavailable(_)) => "unavailable",
        Err(WriteError::CommitFailed(_)) => "commit_failed",
        Err(WriteError::StorageFull(_)) => "storage_full",
        Err(WriteError::StorageLow(_)) => "storage_low",
        Err(WriteError::InvalidEnvelope(_) | WriteError::Forbidden) => "invalid",
    }
}

impl Metrics {
    pub fn record_command(&self, kind: &'static str, result: &CommandResult, latency: Duration) {
        let mut inner = self.inner.lock().expect("metrics lock");
        *inner.commands.entry((kind, outcome(result))).or_default() += 1;
        let seconds = latency.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS_S.iter().position(|b| seconds <= *b) {
            inner.latency_buckets[i] += 1;
        }
        inner.latency_count += 1;
        inner.latency_sum_s += seconds;
        // The writer stopped (a failed commit or checkpoint): an operator must read that once.
        // A failed checkpoint answers no command with an error of its own, and every later
        // refusal (503, not logged per request) is the same fact.
        if let Err(WriteError::Unavailable(reason)) = result
            && !std::mem::replace(&mut inner.writes_stopped_logged, true)
        {
            tracing::error!(%reason, "the writer stopped taking writes; commands get 503 until a restart");
        }
    }

    /// Event feeds and subscriptions open (`streams::StreamSlots::gauges`).
    pub fn render_streams(out: &mut String, (open, most, limit): (usize, usize, usize)) {
        let _ = writeln!(
            out,
            "# HELP taskledger_streams_open Event feeds and GraphQL subscriptions open.\n# TYPE taskledger_streams_open gauge\ntaskledger_streams_open {open}\n# HELP taskledger_streams_open_most_by_one_token The most of them one token holds; at --max-streams-per-token its next is refused (429 too_many_streams).\n# TYPE taskledger_streams_open_most_by_one_token gauge\ntaskledger_streams_open_most_by_one_token {most}\n# HELP taskledger_streams_per_token_limit --max-streams-per-token.\n# TYPE taskledger_streams_per_token_limit gauge\ntaskledger_streams_per_token_limit {limit}"
        );
    }

    /// Task folds kept between reads (`task_folds::TaskFolds::len_and_weight`).
    pub fn render_task_folds(out: &mut String, (kept, weight): (usize, usize)) {
        let _ = writeln!(
            out,
            "# HELP taskledger_task_folds_kept Folds of tasks with long histories kept between reads (at most {}).\n# TYPE taskledger_task_folds_kept gauge\ntaskledger_task_folds_kept {kept}\n# HELP taskledger_task_folds_bytes What the kept folds weigh, estimated: 4 KiB each, and each record's payload and 256 bytes, heartbeats left out (at most {}).\n# TYPE taskledger_task_folds_bytes gauge\ntaskledger_task_folds_bytes {weight}",
            crate::task_folds::TaskFolds::MAX_TASKS,
            crate::task_folds::TaskFolds::MAX_WEIGHT
        );
    }

    /// Steps and tasks by namespace and state, from the dashboard projection.
    pub fn render_depths(out: &mut String, counts: &[projections::query::StateCount]) {
        out.push_str("# HELP taskledger_queue_depth Tasks and steps by namespace and state.\n# TYPE taskledger_queue_depth gauge\n");
        for c in counts {
            let _ = writeln!(
                out,
                "taskledger_queue_depth{{namespace=\"{}\",kind=\"{}\",state=\"{}\"}} {}",
                c.namespace, c.kind, c.state, c.count
            );
        }
    }

    /// `projections` is `None` while they wait for a database that was unreachable when the
    /// server started (`projections_slot`).
    pub fn render(&self, writer: &WriterHandle, projections: Option<&projections::Projections>) -> String {
        let inner = self.inner.lock().expect("metrics lock");
        let mut out = String::new();
        out.push_str("# HELP taskledger_commands_total Commands by type and outcome.\n# TYPE taskledger_commands_total counter\n");
        for ((kind, outcome), n) in &inner.commands {
            let _ = writeln!(out, "taskledger_commands_total{{command=\"{kind}\",outcome=\"{outcome}\"}} {n}");
        }
        out.push_str("# HELP taskledger_ack_latency_seconds Time from request to acknowledgement.\n# TYPE taskledger_ack_latency_seconds histogram\n");
        let mut cumulative = 0;
        for (bound, n) in LATENCY_BUCKETS_S.iter().zip(inner.latency_buckets.iter()) {
            cumulative += n;
            let _ = writeln!(out, "taskledger_ack_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "taskledger_ack_latency_seconds_bucket{{le=\"+Inf\"}} {}", inner.latency_count);
        let _ = writeln!(out, "taskledger_ack_latency_seconds_sum {}", inner.latency_sum_s);
        let _ = writeln!(out, "taskledger_ack_latency_seconds_count {}", inner.latency_count);
        out.push_str("# HELP taskledger_http_errors_total Error answers by HTTP status and error code.\n# TYPE taskledger_http_errors_total counter\n");
        for ((status, code), n) in crate::error::error_answers() {
            let _ = writeln!(out, "taskledger_http_errors_total{{status=\"{status}\",code=\"{code}\"}} {n}");
        }
        let stats = writer.stats();
        for (name, help, value) in [
            ("taskledger_writer_batches_total", "Committed batches (one fsync each).", &stats.batches),
            ("taskledger_writer_commands_total", "Commands in committed batches.", &stats.commands),
            ("taskledger_writer_events_total", "Events appended.", &stats.events),
            (
                "taskledger_writer_overloaded_total",
                "Commands refused because the writer queue was full.",
                &stats.overloaded,
            ),
            (
                "taskledger_writer_held_batches_total",
                "Batches acknowledged while a checkpoint ran, readable once it was done.",
                &stats.held_batches,
            ),
            ("taskledger_snapshots_total", "Snapshots written.", &stats.snapshots),
            (
                "taskledger_snapshot_failures_total",
                "Snapshots due that could not be written, and the snapshot thread stopping.",
                &stats.snapshot_failures,
            ),
        ] {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
        }
        histogram(
            &mut out,
            "taskledger_commit_seconds",
            "Time to write and fsync one batch.",
            &stats.commit_us_buckets,
            &eventlog::writer::COMMIT_BUCKETS_US.map(|b| b as f64 / 1e6),
            stats.commit_us_total.load(Ordering::Relaxed) as f64 / 1e6,
        );
        histogram(
            &mut out,
            "taskledger_batch_events",
            "Events per committed batch.",
            &stats.batch_size_buckets,
            &eventlog::writer::BATCH_SIZE_BUCKETS.map(|b| b as f64),
            stats.events.load(Ordering::Relaxed) as f64,
        );
        let healthy = matches!(writer.health(), eventlog::Health::Healthy) as u8;
        let _ = writeln!(
            out,
            "# HELP taskledger_writer_healthy 1 while the writer accepts writes.\n# TYPE taskledger_writer_healthy gauge\ntaskledger_writer_healthy {healthy}"
        );
        let _ = writeln!(
            out,
            "# HELP taskledger_clock_behind_seconds How far the system clock is behind the log's last recorded time (0 unless it was set back: recorded time then stands still, and leases, retries and run_at fall due that much later).\n# TYPE taskledger_clock_behind_seconds gauge\ntaskledger_clock_behind_seconds {}",
            stats.clock_behind_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP taskledger_disk_free_bytes Free bytes on the data directory's disk when the writer last looked.\n# TYPE taskledger_disk_free_bytes gauge\ntaskledger_disk_free_bytes {}\n# HELP taskledger_storage_low 1 while that is under --min-free-disk-mib: new tasks and steps are refused (507 storage_low) until space is freed; work in flight goes on.\n# TYPE taskledger_storage_low gauge\ntaskledger_storage_low {}",
            stats.disk_free_bytes.load(Ordering::Relaxed),
            u8::from(stats.storage_low.load(Ordering::Relaxed))
        );
        if let Ok(head) = writer.reader().head() {
            // Acknowledged records count before they are readable (a checkpoint running, or one
            // that failed: it read 3 short of the acknowledged head then).
            let _ = writeln!(
                out,
                "# HELP taskledger_head_seq The log's last seq acknowledged (readable, or held by a checkpoint).\n# TYPE taskledger_head_seq gauge\ntaskledger_head_seq {}",
                head.seq.max(writer.acknowledged_head())
            );
        }
        let _ = writeln!(
            out,
            "# HELP taskledger_projections_connected 0 while the projections database could not be opened since the server started (views answer 503 projections_unavailable; the server tries again every {} s), 1 once the projectors run.\n# TYPE taskledger_projections_connected gauge\ntaskledger_projections_connected {}",
            crate::projections_slot::RECONNECT_EVERY.as_secs(),
            u8::from(projections.is_some())
        );
        if let Some(Ok(status)) = projections.map(|p| p.status()) {
            let families: [ProjectorFamily; 4] = [
                ("taskledger_projection_lag_events", "gauge", "Head seq minus the projector's checkpoint.", |s| s.lag),
                (
                    "taskledger_projection_failing",
                    "gauge",
                    "1 while the projector's last batch failed (it retries; the error is in /v1/views/projections), or its batch has waited over 10 s for the database.",
                    |s| u64::from(s.error.is_some()),
                ),
                (
                    "taskledger_projection_events_applied_total",
                    "counter",
                    "Events the projector has applied since the server started.",
                    |s| s.events_applied,
                ),
                (
                    "taskledger_projection_batches_applied_total",
                    "counter",
                    "Transactions the projector has applied them in (events per batch: the ratio of the two).",
                    |s| s.batches_applied,
                ),
            ];
            for (name, kind, help, value) in families {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for s in &status {
                    let _ = writeln!(out, "{name}{{projector=\"{}\",slot=\"{}\"}} {}", s.projector, s.slot, value(s));
                }
            }
        }
        out
    }
}

/// A per-projector metric: name, Prometheus type, help text and its value.
type ProjectorFamily = (&'static str, &'static str, &'static str, fn(&ProjectorStatus) -> u64);

/// Writes one histogram whose last bucket is unbounded.
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    buckets: &[std::sync::atomic::AtomicU64],
    bounds: &[f64],
    sum: f64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, bucket) in buckets.iter().enumerate() {
        cumulative += bucket.load(Ordering::Relaxed);
        if i + 1 < buckets.len() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", bounds[i]);
        }
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}\n{name}_sum {sum}\n{name}_count {cumulative}");
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use eventlog::WriteError;

    use super::Metrics;

    /// A log sink the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stopped_writer_is_logged_once_however_many_commands_it_refuses() {
        let log = Captured::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).finish();
        let metrics = Metrics::default();
        tracing::subscriber::with_default(subscriber, || {
            metrics.record_command("create_task", &Err(WriteError::Overloaded), Duration::from_micros(5));
            for _ in 0..3 {
                let refused = Err(WriteError::Unavailable("checkpoint failed: I/O error".into()));
                metrics.record_command("create_task", &refused, Duration::from_micros(5));
            }
        });
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("stopped taking writes")).collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("ERROR") && lines[0].contains("checkpoint failed: I/O error"), "{text}");
        assert_eq!(text.lines().count(), 1, "an overload is not logged: {text}");
    }
}
