//! `audit_log`: one immutable row per event, with who, when, which command,
//! which stream, what type, a one-line summary and the record's chain hash,
//! so an auditor can read (and, with the hash, check) history without the log.
//!
//! The summary names steps by index: the audit projector keeps no model of
//! tasks, which keeps it the cheapest projector and independent of the rules
//! the others re-derive.

use crate::sql::{Sink, SqlRow, Statements, Types};
use domain::{Event, FailOutcome};
use std::sync::Arc;

use eventlog::StoredRecord;

/// Longest summary kept, in bytes.
pub const SUMMARY_BYTES_MAX: usize = 512;

pub(crate) fn ddl(t: &Types, s: &str, g: &str) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE audit_log{s} (
                seq {integer_key},
                recorded_at_us BIGINT NOT NULL,
                actor TEXT NOT NULL,
                command_id TEXT NOT NULL,
                stream TEXT NOT NULL,
                task_id {uuid},
                event_type TEXT NOT NULL,
                summary TEXT NOT NULL,
                hash {bytes} NOT NULL
            )",
            uuid = t.uuid,
            bytes = t.bytes,
            integer_key = t.integer_key
        ),
        format!("CREATE INDEX audit_log_task_{g} ON audit_log{s} (task_id, seq)"),
        format!("CREATE INDEX audit_log_actor_{g} ON audit_log{s} (actor, seq)"),
        format!("CREATE INDEX audit_log_type_{g} ON audit_log{s} (event_type, seq)"),
    ]
}

/// DROP statements for the indexes older versions gave generation `g` and
/// this one no longer keeps. `audit_log_time`: a time range is answered as a
/// seq range (`query::first_seq_where`), and the index cost every event a
/// write.
pub(crate) fn retired_indexes(g: &str) -> Vec<String> {
    vec![format!("DROP INDEX IF EXISTS audit_log_time_{g}")]
}

/// One event's row, borrowing what the record already holds.
struct AuditRow<'a> {
    record: &'a StoredRecord,
    event: &'a Event,
    stream: String,
    summary: String,
}

impl SqlRow for AuditRow<'_> {
    const COLUMNS: usize = 9;
    fn bind(&self, sink: &mut dyn Sink) {
        sink.i64(self.record.seq as i64);
        sink.i64(self.record.recorded_at_us);
        sink.text(&self.record.actor);
        sink.text(&self.record.command_id);
        sink.text(&self.stream);
        sink.opt_uuid(self.event.task().map(|t| *t.as_uuid()));
        sink.text(self.event.type_name());
        sink.text(&self.summary);
        sink.bytes(&self.record.hash);
    }
}

/// The audit projector keeps nothing between events: its rows are the
/// batch's records, rendered straight from them.
#[derive(Default)]
pub(crate) struct Plan;

impl Plan {
    pub(crate) fn render(&self, out: &mut Statements, s: &str, records: &[Arc<StoredRecord>], events: &[Event]) {
        let rows: Vec<AuditRow<'_>> = records
            .iter()
            .zip(events)
            .map(|(record, event)| AuditRow {
                record,
                event,
                stream: event.stream().to_string(),
                summary: summary(event),
            })
            .collect();
        out.insert_rows(
            &format!(
                "INSERT INTO audit_log{s} (seq, recorded_at_us, actor, command_id, stream, task_id, event_type, summary, hash)"
            ),
            "",
            &rows,
        );
    }
}

fn outcome_text(outcome: &FailOutcome) -> String {
    match outcome {
        FailOutcome::Retry { retry_at, delay_ms } => format!("retry in {delay_ms} ms (at {retry_at})"),
        FailOutcome::DeadLetter => "dead-lettered".to_owned(),
    }
}

/// A one-line, human-readable account of an event.
pub fn summary(event: &Event) -> String {
    let mut text = match event {
        Event::TaskCreated { spec, .. } => format!(
            "task '{}' created in {} with {} step(s), priority {}",
            spec.name,
            spec.namespace,
            spec.steps.len(),
            spec.priority.get()
        ),
        Event::StepClaimed { step, worker, epoch, attempt, lease_deadline, .. } => format!(
            "step #{} claimed by {worker} (attempt {}, epoch {epoch}, lease until {lease_deadline})",
            step.0, attempt.0
        ),
        Event::LeaseExtended { step, epoch, lease_deadline, .. } => {
            format!("step #{} lease {epoch} extended until {lease_deadline}", step.0)
        }
        Event::StepCompleted { step, epoch, .. } => format!("step #{} completed (epoch {epoch})", step.0),
        Event::StepFailed { step, epoch, error, retryable, outcome, .. } => format!(
            "step #{} failed (epoch {epoch}, {}): {}; {}",
            step.0,
            if *retryable { "retryable" } else { "permanent" },
            error.as_str(),
            outcome_text(outcome)
        ),
        Event::StepReleased { step, epoch, .. } => format!("step #{} released (epoch {epoch})", step.0),
        Event::LeaseExpired { step, epoch, outcome, .. } => {
            format!("step #{} lease {epoch} expired; {}", step.0, outcome_text(outcome))
        }
        Event::StepsAdded { by_step, steps, .. } => format!(
            "{} step(s) added by step #{}: {}",
            steps.len(),
            by_step.0,
            steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
        Event::StepRetryDue { step, .. } => format!("step #{} retry due", step.0),
        Event::RunAtReached { .. } => "run_at reached".to_owned(),
        Event::StepRetried { step, reset_attempts, .. } => {
            format!("step #{} retried by an operator{}", step.0, if *reset_attempts { " (attempts reset)" } else { "" })
        }
        Event::StepResolved { step, note, .. } => {
            format!("step #{} resolved manually: {}", step.0, note.as_str())
        }
        Event::TaskCancelled { reason, .. } => {
            format!("task cancelled{}", reason.as_ref().map(|r| format!(": {}", r.as_str())).unwrap_or_default())
        }
        Event::TaskGivenUp { reason, .. } => {
            format!("task given up{}", reason.as_ref().map(|r| format!(": {}", r.as_str())).unwrap_or_default())
        }
        Event::QueuePaused { namespace, .. } => format!("queue {namespace} paused"),
        Event::QueueResumed { namespace, .. } => format!("queue {namespace} resumed"),
        Event::QueueConcurrencySet { namespace, limit, .. } => match limit {
            Some(limit) => format!("queue {namespace} concurrency limited to {limit}"),
            None => format!("queue {namespace} concurrency unlimited"),
        },
    };
    if text.len() > SUMMARY_BYTES_MAX {
        let mut end = SUMMARY_BYTES_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
