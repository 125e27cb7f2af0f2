//! Words for events: one-line summaries for tables and timelines, and
//! `TaskBook`, which remembers each task's namespace, name and step names
//! (events name steps by index) so a record can be described on its own,
//! even when the task was created before the range being shown.

use std::collections::HashMap;

use anyhow::Result;
use domain::{Event, FailOutcome, Namespace, StepIndex, TaskId, Timestamp};
use eventlog::fold::decode_event;

use crate::source::Source;

/// What a report needs to know about a task to describe its events.
#[derive(Clone, Debug)]
pub struct TaskInfo {
    pub namespace: Namespace,
    pub steps: Vec<String>,
}

/// Task facts, learnt from the events seen and, for tasks first met in the
/// middle of their life, from the start of their stream.
#[derive(Default)]
pub struct TaskBook {
    tasks: HashMap<TaskId, TaskInfo>,
}

impl TaskBook {
    /// Learns from an event being shown (creates and added steps).
    pub fn learn(&mut self, event: &Event) {
        match event {
            Event::TaskCreated { spec, .. } => {
                self.tasks.insert(
                    spec.id,
                    TaskInfo {
                        namespace: spec.namespace.clone(),
                        steps: spec.steps.iter().map(|s| s.name.to_string()).collect(),
                    },
                );
            }
            Event::StepsAdded { task, steps, .. } => {
                if let Some(info) = self.tasks.get_mut(task) {
                    for step in steps {
                        let name = step.name.to_string();
                        if !info.steps.contains(&name) {
                            info.steps.push(name);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Facts about `task`, reading its stream if it has not been seen yet.
    pub fn get(&mut self, source: &Source, task: TaskId) -> Result<Option<&TaskInfo>> {
        if !self.tasks.contains_key(&task) {
            for record in source.task_records(task, u64::MAX)? {
                if let Ok(event) = decode_event(&record) {
                    self.learn(&event);
                }
            }
        }
        Ok(self.tasks.get(&task))
    }

    /// The name of step `index` of `task`, or `#index` if unknown.
    pub fn step_name(&mut self, source: &Source, task: TaskId, index: StepIndex) -> Result<String> {
        Ok(self
            .get(source, task)?
            .and_then(|info| info.steps.get(index.get()).cloned())
            .unwrap_or_else(|| format!("#{}", index.0)))
    }

    pub fn namespace(&mut self, source: &Source, task: TaskId) -> Result<Option<Namespace>> {
        Ok(self.get(source, task)?.map(|info| info.namespace.clone()))
    }
}

/// The step an event concerns, if it concerns one.
pub fn event_step(event: &Event) -> Option<StepIndex> {
    match event {
        Event::StepClaimed { step, .. }
        | Event::LeaseExtended { step, .. }
        | Event::StepCompleted { step, .. }
        | Event::StepFailed { step, .. }
        | Event::StepReleased { step, .. }
        | Event::LeaseExpired { step, .. }
        | Event::StepRetryDue { step, .. }
        | Event::StepRetried { step, .. }
        | Event::StepResolved { step, .. } => Some(*step),
        Event::StepsAdded { by_step, .. } => Some(*by_step),
        _ => None,
    }
}

fn short_time(ts: Timestamp) -> String {
    ts.to_rfc3339()
}

fn outcome_text(outcome: &FailOutcome) -> String {
    match outcome {
        FailOutcome::Retry { retry_at, delay_ms } => {
            format!("retry in {delay_ms} ms at {}", short_time(*retry_at))
        }
        FailOutcome::DeadLetter => "dead-lettered".to_owned(),
    }
}

fn clipped(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// `text` with its control characters escaped (`\u{1b}`, `\r`, `\n`), so that text a client
/// wrote (an error, a note) can neither move a terminal's cursor nor start a line of its own.
pub fn printable(text: &str) -> String {
    text.chars().fold(String::with_capacity(text.len()), |mut out, c| {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        out
    })
}

fn quoted(text: &str, max: usize) -> String {
    format!("{:?}", clipped(text, max))
}

/// A one-line description of an event; `step` is the step's name when known.
pub fn summary(event: &Event, step: &str) -> String {
    match event {
        Event::TaskCreated { spec, .. } => {
            let steps: Vec<&str> = spec.steps.iter().map(|s| s.name.as_str()).collect();
            format!(
                "created {:?} in {} (priority {}, steps: {})",
                spec.name,
                spec.namespace,
                spec.priority.get(),
                steps.join(", ")
            )
        }
        Event::StepClaimed { worker, epoch, attempt, lease_deadline, .. } => format!(
            "{step} claimed by {worker} (epoch {epoch}, attempt {}, lease until {})",
            attempt.0,
            short_time(*lease_deadline)
        ),
        Event::LeaseExtended { epoch, lease_deadline, .. } => {
            format!("{step} heartbeat (epoch {epoch}), lease until {}", short_time(*lease_deadline))
        }
        Event::StepCompleted { epoch, result, .. } => {
            // JSON escapes U+0000–001F only: DEL and the C1 controls (some terminals act on
            // U+009B) would reach the terminal as they are.
            format!("{step} completed (epoch {epoch}), result {}", printable(&clipped(result.as_str(), 60)))
        }
        Event::StepFailed { epoch, error, retryable, outcome, .. } => format!(
            "{step} failed (epoch {epoch}, {}): {} -> {}",
            if *retryable { "retryable" } else { "permanent" },
            quoted(error.as_str(), 80),
            outcome_text(outcome)
        ),
        Event::StepReleased { epoch, .. } => format!("{step} released by its worker (epoch {epoch})"),
        Event::LeaseExpired { epoch, outcome, .. } => {
            format!("{step} lease expired (epoch {epoch}) -> {}", outcome_text(outcome))
        }
        Event::StepsAdded { steps, .. } => {
            let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
            format!("{step} added steps: {}", names.join(", "))
        }
        Event::StepRetryDue { .. } => format!("{step} retry due, enqueued"),
        Event::RunAtReached { .. } => "run_at reached".to_owned(),
        Event::StepRetried { reset_attempts, .. } => {
            format!("{step} retried by operator{}", if *reset_attempts { " (attempts reset)" } else { "" })
        }
        Event::StepResolved { note, .. } => format!("{step} resolved manually: {}", quoted(note.as_str(), 80)),
        Event::TaskCancelled { reason, .. } => {
            format!(
                "task cancelled{}",
                reason.as_ref().map(|r| format!(": {}", quoted(r.as_str(), 80))).unwrap_or_default()
            )
        }
        Event::TaskGivenUp { reason, .. } => {
            format!(
                "task given up{}",
                reason.as_ref().map(|r| format!(": {}", quoted(r.as_str(), 80))).unwrap_or_default()
            )
        }
        Event::QueuePaused { namespace, .. } => format!("queue {namespace} paused"),
        Event::QueueResumed { namespace, .. } => format!("queue {namespace} resumed"),
        Event::QueueConcurrencySet { namespace, limit, .. } => match limit {
            Some(limit) => format!("queue {namespace} concurrency limit {limit}"),
            None => format!("queue {namespace} concurrency limit removed"),
        },
    }
}
