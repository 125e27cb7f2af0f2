//! `queue`, `queue_settings` and `workers`: the live operational picture.
//! `queue` holds every step that is not terminal (pending, enqueued, in
//! progress, waiting for retry) with where it stands; `queue_settings` the
//! operator's pause and concurrency settings per namespace; `workers` each
//! worker's last activity, the leases it holds and its outcomes.
//!
//! `sort_key_us` orders a namespace's queue by "what happens next": an
//! enqueued step by its claim order (enqueue time minus priority aging, as the
//! ledger claims), a running one by its lease deadline, a waiting one by its
//! retry time, a pending one by its `run_at` (or creation).

use std::collections::BTreeMap;

use domain::{AGING_US_PER_POINT, Event, StepState};
use uuid::Uuid;

use crate::mirror::{Applied, LeaseEnd, Mirror, MirrorStep, MirrorTask};
use crate::projectors::Touched;
use crate::sql::{Sink, SqlRow, Statements, Types};

pub(crate) fn ddl(t: &Types, s: &str, g: &str) -> Vec<String> {
    let uuid = t.uuid;
    vec![
        format!(
            "CREATE TABLE queue{s} (
                task_id {uuid} NOT NULL,
                step_index BIGINT NOT NULL,
                namespace TEXT NOT NULL,
                task_name TEXT NOT NULL,
                step_name TEXT NOT NULL,
                handler TEXT NOT NULL,
                state TEXT NOT NULL,
                priority BIGINT NOT NULL,
                run_at_us BIGINT,
                attempts BIGINT NOT NULL,
                max_attempts BIGINT NOT NULL,
                worker TEXT,
                lease_deadline_us BIGINT,
                retry_at_us BIGINT,
                enqueued_at_us BIGINT,
                sort_key_us BIGINT NOT NULL,
                PRIMARY KEY (task_id, step_index)
            )"
        ),
        format!("CREATE INDEX queue_order_{g} ON queue{s} (namespace, state, sort_key_us, task_id, step_index)"),
        // A page of one state across namespaces, and of the whole queue (see `query::queue`).
        format!("CREATE INDEX queue_state_{g} ON queue{s} (state, sort_key_us, task_id, step_index)"),
        format!(
            "CREATE TABLE queue_settings{s} (
                namespace TEXT PRIMARY KEY,
                paused BOOLEAN NOT NULL,
                concurrency_limit BIGINT,
                updated_at_us BIGINT NOT NULL
            )"
        ),
        format!(
            "CREATE TABLE workers{s} (
                worker TEXT PRIMARY KEY,
                first_seen_us BIGINT NOT NULL,
                last_seen_us BIGINT NOT NULL,
                leases_held BIGINT NOT NULL,
                claims BIGINT NOT NULL,
                completed BIGINT NOT NULL,
                failed BIGINT NOT NULL,
                released BIGINT NOT NULL,
                expired BIGINT NOT NULL,
                cancelled BIGINT NOT NULL
            )"
        ),
    ]
}

struct QueueRow<'a> {
    task: &'a MirrorTask,
    index: usize,
    step: &'a MirrorStep,
}

fn sort_key_us(task: &MirrorTask, step: &MirrorStep) -> i64 {
    match step.state {
        StepState::Enqueued => step
            .enqueued_at_us
            .unwrap_or(task.created_at_us)
            .saturating_sub(i64::from(task.priority) * AGING_US_PER_POINT),
        StepState::InProgress => step.lease_deadline_us.unwrap_or(task.updated_at_us),
        StepState::WaitingForRetry => step.retry_at_us.unwrap_or(task.updated_at_us),
        _ => task.run_at_us.unwrap_or(task.created_at_us),
    }
}

impl SqlRow for QueueRow<'_> {
    const COLUMNS: usize = 16;
    fn bind(&self, sink: &mut dyn Sink) {
        let (t, s) = (self.task, self.step);
        sink.uuid(*t.id.as_uuid());
        sink.i64(self.index as i64);
        sink.text(&t.namespace);
        sink.text(&t.name);
        sink.text(&s.name);
        sink.text(&s.handler);
        sink.text(s.state.as_str());
        sink.i64(i64::from(t.priority));
        sink.opt_i64(t.run_at_us);
        sink.i64(i64::from(s.attempts));
        sink.i64(i64::from(s.max_attempts));
        sink.opt_text(s.worker.as_deref());
        sink.opt_i64(s.lease_deadline_us);
        sink.opt_i64(s.retry_at_us);
        sink.opt_i64(s.enqueued_at_us);
        sink.i64(sort_key_us(t, s));
    }
}

/// A worker's activity within one batch (counters are deltas; `last_seen_us`
/// is `i64::MIN` if the worker did nothing itself, e.g. only lost a lease).
#[derive(Default)]
struct WorkerDelta {
    first_seen_us: i64,
    last_seen_us: i64,
    leases_held: i64,
    claims: i64,
    completed: i64,
    failed: i64,
    released: i64,
    expired: i64,
    cancelled: i64,
}

struct WorkerRow<'a>(&'a str, &'a WorkerDelta);

impl SqlRow for WorkerRow<'_> {
    const COLUMNS: usize = 10;
    fn bind(&self, sink: &mut dyn Sink) {
        let d = self.1;
        sink.text(self.0);
        for value in [
            d.first_seen_us,
            d.last_seen_us,
            d.leases_held,
            d.claims,
            d.completed,
            d.failed,
            d.released,
            d.expired,
            d.cancelled,
        ] {
            sink.i64(value);
        }
    }
}

struct SettingRow<'a> {
    namespace: &'a str,
    paused: bool,
    limit: Option<i64>,
    at: i64,
}

impl SqlRow for SettingRow<'_> {
    const COLUMNS: usize = 4;
    fn bind(&self, sink: &mut dyn Sink) {
        sink.text(self.namespace);
        sink.bool(self.paused);
        sink.opt_i64(self.limit);
        sink.i64(self.at);
    }
}

enum SettingChange {
    Paused(bool),
    Limit(Option<u32>),
}

#[derive(Default)]
pub(crate) struct Plan {
    first_seq: Option<u64>,
    workers: BTreeMap<String, WorkerDelta>,
    settings: Vec<(String, SettingChange, i64)>,
}

impl Plan {
    fn worker(&mut self, worker: &str, at: i64) -> &mut WorkerDelta {
        self.workers.entry(worker.to_owned()).or_insert_with(|| WorkerDelta {
            first_seen_us: at,
            last_seen_us: i64::MIN,
            ..WorkerDelta::default()
        })
    }

    pub(crate) fn observe(&mut self, seq: u64, event: &Event, applied: &Applied) {
        self.first_seq.get_or_insert(seq);
        let at = event.at().as_micros();
        match event {
            Event::QueuePaused { namespace, .. } => {
                self.settings.push((namespace.as_str().to_owned(), SettingChange::Paused(true), at))
            }
            Event::QueueResumed { namespace, .. } => {
                self.settings.push((namespace.as_str().to_owned(), SettingChange::Paused(false), at))
            }
            Event::QueueConcurrencySet { namespace, limit, .. } => {
                self.settings.push((namespace.as_str().to_owned(), SettingChange::Limit(*limit), at))
            }
            _ => {}
        }
        if let Some((worker, _)) = &applied.claimed {
            let d = self.worker(worker, at);
            d.last_seen_us = at;
            d.leases_held += 1;
            d.claims += 1;
        }
        if let Some(worker) = &applied.extended_by {
            self.worker(worker, at).last_seen_us = at;
        }
        for ended in &applied.ended_leases {
            let d = self.worker(&ended.worker, at);
            d.leases_held -= 1;
            match ended.how {
                LeaseEnd::Completed => d.completed += 1,
                LeaseEnd::Failed => d.failed += 1,
                LeaseEnd::Released => d.released += 1,
                LeaseEnd::Expired => d.expired += 1,
                LeaseEnd::Cancelled => d.cancelled += 1,
            }
            if matches!(ended.how, LeaseEnd::Completed | LeaseEnd::Failed | LeaseEnd::Released) {
                d.last_seen_us = at;
            }
        }
    }

    pub(crate) fn render(&self, out: &mut Statements, s: &str, touched: &Touched, mirror: &Mirror) {
        let first_seq = self.first_seq.unwrap_or(u64::MAX);
        let existing: Vec<Uuid> = touched
            .order
            .iter()
            .filter_map(|id| touched.current(mirror, id))
            .filter(|t| t.created_seq < first_seq)
            .map(|t| *t.id.as_uuid())
            .collect();
        out.delete_by_uuid(&format!("queue{s}"), "task_id", &existing);
        let rows: Vec<QueueRow<'_>> = touched
            .order
            .iter()
            .filter_map(|id| mirror.touched_task(id))
            .flat_map(|t| {
                t.steps
                    .iter()
                    .enumerate()
                    .filter(|(_, step)| !step.state.is_terminal())
                    .map(move |(index, step)| QueueRow { task: t, index, step })
            })
            .collect();
        out.insert_rows(
            &format!(
                "INSERT INTO queue{s} (task_id, step_index, namespace, task_name, step_name, handler, state, priority, \
                 run_at_us, attempts, max_attempts, worker, lease_deadline_us, retry_at_us, enqueued_at_us, sort_key_us)"
            ),
            "",
            &rows,
        );

        let worker_rows: Vec<WorkerRow<'_>> = self.workers.iter().map(|(w, d)| WorkerRow(w, d)).collect();
        out.insert_rows(
            &format!(
                "INSERT INTO workers{s} (worker, first_seen_us, last_seen_us, leases_held, claims, completed, failed, \
                 released, expired, cancelled)"
            ),
            &format!(
                "ON CONFLICT (worker) DO UPDATE SET last_seen_us = CASE WHEN excluded.last_seen_us > \
                 workers{s}.last_seen_us THEN excluded.last_seen_us ELSE workers{s}.last_seen_us END, \
                 leases_held = workers{s}.leases_held + excluded.leases_held, \
                 claims = workers{s}.claims + excluded.claims, \
                 completed = workers{s}.completed + excluded.completed, \
                 failed = workers{s}.failed + excluded.failed, \
                 released = workers{s}.released + excluded.released, \
                 expired = workers{s}.expired + excluded.expired, \
                 cancelled = workers{s}.cancelled + excluded.cancelled"
            ),
            &worker_rows,
        );

        // Queue settings change rarely: one statement per change, in order
        // (one statement cannot upsert a namespace twice).
        for (namespace, change, at) in &self.settings {
            let (paused, limit, tail) = match change {
                SettingChange::Paused(paused) => (*paused, None, "paused = excluded.paused"),
                SettingChange::Limit(limit) => (false, *limit, "concurrency_limit = excluded.concurrency_limit"),
            };
            out.insert_rows(
                &format!("INSERT INTO queue_settings{s} (namespace, paused, concurrency_limit, updated_at_us)"),
                &format!("ON CONFLICT (namespace) DO UPDATE SET {tail}, updated_at_us = excluded.updated_at_us"),
                &[SettingRow { namespace, paused, limit: limit.map(i64::from), at: *at }],
            );
        }
    }
}
