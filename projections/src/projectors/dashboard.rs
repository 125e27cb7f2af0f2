//! `dashboard_counts`, `dashboard_throughput` and `dashboard_latency`: the
//! numbers an operator's dashboard shows, kept as counters so that reading
//! them never scans tasks.
//!
//! - counts: tasks and steps per namespace × state (every state, terminal
//!   ones included, so they add up to everything ever created);
//! - throughput per namespace and minute (of event time): tasks created;
//!   steps completed; step runs failed (failures and lease expiries); retried
//!   (a failure that scheduled another attempt, or an operator's retry); and
//!   dead-lettered;
//! - latency histograms per namespace: wait (enqueued → claimed) and run
//!   (claimed → completed or failed), in fixed millisecond buckets.
//!
//! Each batch sums its changes in memory and adds them with one upsert per
//! counter row (`count = count + delta`).

use std::collections::BTreeMap;

use domain::{Event, FailOutcome};

use crate::mirror::{Applied, LeaseEnd};
use crate::sql::{Sink, SqlRow, Statements, Types};

/// Upper bounds (inclusive, in ms) of the latency buckets; a last, unbounded
/// bucket catches the rest (stored with `le_ms = -1`).
pub const LATENCY_BUCKETS_MS: [i64; 18] =
    [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000];

/// The bucket bound of a latency in µs.
pub fn bucket_le_ms(latency_us: i64) -> i64 {
    let ms_ceil = (latency_us.max(0) as u64).div_ceil(1000) as i64;
    LATENCY_BUCKETS_MS.iter().copied().find(|le| ms_ceil <= *le).unwrap_or(-1)
}

const MINUTE_US: i64 = 60_000_000;

pub(crate) fn ddl(_t: &Types, s: &str, _g: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE dashboard_counts{s} (
                namespace TEXT NOT NULL,
                kind TEXT NOT NULL,
                state TEXT NOT NULL,
                count BIGINT NOT NULL,
                PRIMARY KEY (namespace, kind, state)
            )"
        ),
        format!(
            "CREATE TABLE dashboard_throughput{s} (
                namespace TEXT NOT NULL,
                minute_us BIGINT NOT NULL,
                created BIGINT NOT NULL,
                completed BIGINT NOT NULL,
                failed BIGINT NOT NULL,
                retried BIGINT NOT NULL,
                dead_lettered BIGINT NOT NULL,
                PRIMARY KEY (namespace, minute_us)
            )"
        ),
        format!(
            "CREATE TABLE dashboard_latency{s} (
                namespace TEXT NOT NULL,
                kind TEXT NOT NULL,
                le_ms BIGINT NOT NULL,
                count BIGINT NOT NULL,
                PRIMARY KEY (namespace, kind, le_ms)
            )"
        ),
    ]
}

#[derive(Default, Clone, Copy)]
struct Throughput {
    created: i64,
    completed: i64,
    failed: i64,
    retried: i64,
    dead_lettered: i64,
}

struct CountRow<'a>(&'a str, &'static str, &'static str, i64);

impl SqlRow for CountRow<'_> {
    const COLUMNS: usize = 4;
    fn bind(&self, sink: &mut dyn Sink) {
        sink.text(self.0);
        sink.text(self.1);
        sink.text(self.2);
        sink.i64(self.3);
    }
}

struct ThroughputRow<'a>(&'a str, i64, &'a Throughput);

impl SqlRow for ThroughputRow<'_> {
    const COLUMNS: usize = 7;
    fn bind(&self, sink: &mut dyn Sink) {
        let t = self.2;
        sink.text(self.0);
        sink.i64(self.1);
        for value in [t.created, t.completed, t.failed, t.retried, t.dead_lettered] {
            sink.i64(value);
        }
    }
}

struct LatencyRow<'a>(&'a str, &'static str, i64, i64);

impl SqlRow for LatencyRow<'_> {
    const COLUMNS: usize = 4;
    fn bind(&self, sink: &mut dyn Sink) {
        sink.text(self.0);
        sink.text(self.1);
        sink.i64(self.2);
        sink.i64(self.3);
    }
}

/// One namespace's deltas in a batch.
#[derive(Default)]
struct Deltas {
    /// (kind, state) → change of count.
    counts: BTreeMap<(&'static str, &'static str), i64>,
    /// minute → counters.
    throughput: BTreeMap<i64, Throughput>,
    /// (kind, bucket) → added observations.
    latency: BTreeMap<(&'static str, i64), i64>,
}

/// Deltas by namespace: looked up by `&str`, so an event costs no
/// allocation unless it is the batch's first in its namespace.
#[derive(Default)]
pub(crate) struct Plan {
    namespaces: BTreeMap<String, Deltas>,
}

impl Plan {
    fn deltas(&mut self, namespace: &str) -> &mut Deltas {
        if !self.namespaces.contains_key(namespace) {
            self.namespaces.insert(namespace.to_owned(), Deltas::default());
        }
        self.namespaces.get_mut(namespace).expect("just inserted")
    }

    pub(crate) fn observe(&mut self, event: &Event, applied: &Applied) {
        let Some(namespace) = &applied.namespace else { return };
        if applied.task.is_none() {
            return;
        }
        let at = event.at().as_micros();
        let d = self.deltas(namespace);
        for (_, from, to) in &applied.step_moves {
            if let Some(from) = from {
                *d.counts.entry(("step", from.as_str())).or_default() -= 1;
            }
            *d.counts.entry(("step", to.as_str())).or_default() += 1;
        }
        if let Some((from, to)) = &applied.task_move {
            if let Some(from) = from {
                *d.counts.entry(("task", from.as_str())).or_default() -= 1;
            }
            *d.counts.entry(("task", to.as_str())).or_default() += 1;
        }
        let minute = at.div_euclid(MINUTE_US) * MINUTE_US;
        let mut tick = |f: fn(&mut Throughput)| f(d.throughput.entry(minute).or_default());
        match event {
            Event::TaskCreated { .. } => tick(|t| t.created += 1),
            Event::StepCompleted { .. } => tick(|t| t.completed += 1),
            Event::StepFailed { outcome, .. } | Event::LeaseExpired { outcome, .. } => {
                tick(|t| t.failed += 1);
                match outcome {
                    FailOutcome::Retry { .. } => tick(|t| t.retried += 1),
                    FailOutcome::DeadLetter => tick(|t| t.dead_lettered += 1),
                }
            }
            Event::StepRetried { .. } => tick(|t| t.retried += 1),
            _ => {}
        }
        if let Some((_, waited_us)) = &applied.claimed {
            *d.latency.entry(("wait", bucket_le_ms(*waited_us))).or_default() += 1;
        }
        for ended in &applied.ended_leases {
            if matches!(ended.how, LeaseEnd::Completed | LeaseEnd::Failed) {
                let ran_us = at - ended.claimed_at_us;
                *d.latency.entry(("run", bucket_le_ms(ran_us))).or_default() += 1;
            }
        }
    }

    pub(crate) fn render(&self, out: &mut Statements, s: &str) {
        let counts: Vec<CountRow<'_>> = self
            .namespaces
            .iter()
            .flat_map(|(ns, d)| {
                d.counts
                    .iter()
                    .filter(|(_, delta)| **delta != 0)
                    .map(|((kind, state), delta)| CountRow(ns, kind, state, *delta))
            })
            .collect();
        out.insert_rows(
            &format!("INSERT INTO dashboard_counts{s} (namespace, kind, state, count)"),
            &format!(
                "ON CONFLICT (namespace, kind, state) DO UPDATE SET count = dashboard_counts{s}.count + excluded.count"
            ),
            &counts,
        );
        // A count that went back to zero disappears, so the table does not
        // depend on how the log was cut into batches.
        if !counts.is_empty() {
            out.execute(&format!("DELETE FROM dashboard_counts{s} WHERE count = 0"));
        }
        let throughput: Vec<ThroughputRow<'_>> = self
            .namespaces
            .iter()
            .flat_map(|(ns, d)| d.throughput.iter().map(|(minute, t)| ThroughputRow(ns, *minute, t)))
            .collect();
        out.insert_rows(
            &format!(
                "INSERT INTO dashboard_throughput{s} (namespace, minute_us, created, completed, failed, retried, dead_lettered)"
            ),
            &format!(
                "ON CONFLICT (namespace, minute_us) DO UPDATE SET \
                 created = dashboard_throughput{s}.created + excluded.created, \
                 completed = dashboard_throughput{s}.completed + excluded.completed, \
                 failed = dashboard_throughput{s}.failed + excluded.failed, \
                 retried = dashboard_throughput{s}.retried + excluded.retried, \
                 dead_lettered = dashboard_throughput{s}.dead_lettered + excluded.dead_lettered"
            ),
            &throughput,
        );
        let latency: Vec<LatencyRow<'_>> = self
            .namespaces
            .iter()
            .flat_map(|(ns, d)| d.latency.iter().map(|((kind, le), count)| LatencyRow(ns, kind, *le, *count)))
            .collect();
        out.insert_rows(
            &format!("INSERT INTO dashboard_latency{s} (namespace, kind, le_ms, count)"),
            &format!(
                "ON CONFLICT (namespace, kind, le_ms) DO UPDATE SET count = dashboard_latency{s}.count + excluded.count"
            ),
            &latency,
        );
    }
}
