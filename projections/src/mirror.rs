//! The projections' own model of live tasks, folded from the events alone.
//!
//! Several events name a step only by its index, and step states such as
//! "enqueued because its dependencies completed" are never events of their own:
//! they follow from the task's graph. A projector therefore needs the step
//! names, handlers and dependency graph of every live task, and it must get
//! them from the log, never from the writer's in-memory ledger (which may be
//! ahead of, or behind, the projector). `Mirror` is that model: a small
//! re-statement of `Ledger::apply`'s step rules without ready queues, timers
//! or idempotency, plus the times the read models need (when a step was
//! enqueued and claimed).
//!
//! Terminal tasks leave the mirror, so it holds only live work. Each
//! projector that uses a mirror persists the changed tasks in its own table in
//! the same transaction as its rows (see `runtime`), so a restart loads the
//! mirror back instead of replaying the log.

use domain::{Event, FailOutcome, FastMap, StepSpec, StepState, TaskId, TaskState, Timestamp};
use serde::{Deserialize, Serialize};

use crate::error::ApplyError;

/// One step as the projections track it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStep {
    pub name: String,
    pub handler: String,
    pub deps: Vec<u16>,
    pub max_attempts: u32,
    pub state: StepState,
    pub attempts: u32,
    pub epoch: u32,
    pub worker: Option<String>,
    pub lease_deadline_us: Option<i64>,
    pub retry_at_us: Option<i64>,
    /// When it last became claimable (for wait latency and claim order).
    pub enqueued_at_us: Option<i64>,
    /// When its current (or last) lease began (for run latency).
    pub claimed_at_us: Option<i64>,
    /// When it reached a terminal state (or `Error`).
    pub finished_at_us: Option<i64>,
    pub last_error: Option<String>,
    pub result: Option<String>,
    pub resolution_note: Option<String>,
}

/// One live task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorTask {
    pub id: TaskId,
    pub namespace: String,
    pub name: String,
    pub payload: String,
    pub priority: i32,
    pub run_at_us: Option<i64>,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    pub created_at_us: i64,
    pub created_seq: u64,
    pub updated_at_us: i64,
    pub updated_seq: u64,
    pub state: TaskState,
    pub run_at_reached: bool,
    pub started: bool,
    pub finished_at_us: Option<i64>,
    /// Reason given to a cancel or give-up.
    pub end_reason: Option<String>,
    pub steps: Vec<MirrorStep>,
}

impl MirrorTask {
    fn deps_satisfied(&self, step: &MirrorStep) -> bool {
        step.deps.iter().all(|d| self.steps[usize::from(*d)].state.satisfies_dependents())
    }
}

/// A lease that ended with an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedLease {
    pub step: u16,
    pub worker: String,
    pub claimed_at_us: i64,
    pub how: LeaseEnd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseEnd {
    Completed,
    Failed,
    Released,
    Expired,
    Cancelled,
}

/// What one event did to the mirror, for projectors to turn into rows.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub task: Option<TaskId>,
    /// Namespace of the task (or queue) the event concerns.
    pub namespace: Option<String>,
    /// (step, old state or `None` for a new step, new state).
    pub step_moves: Vec<(u16, Option<StepState>, StepState)>,
    /// (old state or `None` for a new task, new state).
    pub task_move: Option<(Option<TaskState>, TaskState)>,
    /// A claim: the worker and how long the step had waited.
    pub claimed: Option<(String, i64)>,
    /// A heartbeat: the worker whose lease was extended.
    pub extended_by: Option<String>,
    pub ended_leases: Vec<EndedLease>,
    /// The task reached a terminal state and left the mirror: its last state.
    pub finished: Option<Box<MirrorTask>>,
}

/// Every live task, by id.
///
/// Memory per live task is what limits a projector's size, and there are
/// three mirrors (one per projector that keeps one). A decoded `MirrorTask`
/// with its steps, strings and map slot costs about 1.4 KiB; its postcard
/// body about 100 bytes. So a task is kept decoded only while a batch works
/// on it: `apply` decodes it on first touch, and `settle`, at the end of the
/// batch, encodes the touched tasks back into bodies — the same bodies the
/// projector persists in its mirror table, so the encoding is paid once.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    /// Tasks not touched since the last `settle`, as postcard bodies.
    settled: FastMap<TaskId, Box<[u8]>>,
    /// Tasks touched since the last `settle`, decoded.
    touched: FastMap<TaskId, MirrorTask>,
}

fn encode(task: &MirrorTask) -> Result<Box<[u8]>, ApplyError> {
    postcard::to_stdvec(task).map(Vec::into_boxed_slice).map_err(|e| ApplyError::Model(e.to_string()))
}

fn decode(body: &[u8]) -> Result<MirrorTask, ApplyError> {
    postcard::from_bytes(body).map_err(|e| ApplyError::Model(e.to_string()))
}

fn inconsistent(seq: u64, reason: impl Into<String>) -> ApplyError {
    ApplyError::Inconsistent { seq, reason: reason.into() }
}

fn new_steps(existing: &[MirrorStep], specs: &[StepSpec]) -> Result<Vec<MirrorStep>, String> {
    let position = |name: &str| -> Option<u16> {
        existing
            .iter()
            .map(|s| s.name.as_str())
            .chain(specs.iter().map(|s| s.name.as_str()))
            .position(|n| n == name)
            .and_then(|i| u16::try_from(i).ok())
    };
    specs
        .iter()
        .map(|spec| {
            let deps = spec
                .depends_on
                .iter()
                .map(|d| position(d.as_str()).ok_or_else(|| format!("unknown dependency {d}")))
                .collect::<Result<Vec<u16>, String>>()?;
            Ok(MirrorStep {
                name: spec.name.as_str().to_owned(),
                handler: spec.handler.as_str().to_owned(),
                deps,
                max_attempts: spec.max_attempts,
                state: StepState::Pending,
                attempts: 0,
                epoch: 0,
                worker: None,
                lease_deadline_us: None,
                retry_at_us: None,
                enqueued_at_us: None,
                claimed_at_us: None,
                finished_at_us: None,
                last_error: None,
                result: None,
                resolution_note: None,
            })
        })
        .collect()
}

impl Mirror {
    pub fn new() -> Self {
        Self::default()
    }

    /// A mirror holding the postcard bodies a projector persisted (see
    /// `settled_body`), settled. A body is decoded when an event touches
    /// its task; one that does not decode is reported then.
    pub fn from_bodies(bodies: impl IntoIterator<Item = (TaskId, Box<[u8]>)>) -> Self {
        Self { settled: bodies.into_iter().collect(), touched: FastMap::default() }
    }

    /// A live task that an event touched since the last `settle` (every
    /// task whose rows a batch renders).
    pub fn touched_task(&self, id: &TaskId) -> Option<&MirrorTask> {
        self.touched.get(id)
    }

    /// A live task, touched or not.
    pub fn task(&self, id: &TaskId) -> Result<Option<MirrorTask>, ApplyError> {
        match self.touched.get(id) {
            Some(task) => Ok(Some(task.clone())),
            None => self.settled.get(id).map(|body| decode(body)).transpose(),
        }
    }

    /// A settled live task's persisted form.
    pub fn settled_body(&self, id: &TaskId) -> Option<&[u8]> {
        self.settled.get(id).map(|body| &body[..])
    }

    /// Encodes every touched task back into its body; afterwards
    /// `settled_body` has the body of each that is still live.
    pub fn settle(&mut self) -> Result<(), ApplyError> {
        for (id, task) in self.touched.drain() {
            self.settled.insert(id, encode(&task)?);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.settled.len() + self.touched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The task `id`, decoded and moved to `touched` if it was settled.
    fn touch(&mut self, seq: u64, id: TaskId) -> Result<&mut MirrorTask, ApplyError> {
        if let Some(body) = self.settled.remove(&id) {
            self.touched.insert(id, decode(&body)?);
        }
        self.touched.get_mut(&id).ok_or_else(|| inconsistent(seq, format!("task {id} is not live")))
    }

    /// Folds the event at `seq` in. On `Err` the mirror may be half-changed
    /// for that task; the runtime then drops it and reloads from its table.
    pub fn apply(&mut self, seq: u64, event: &Event) -> Result<Applied, ApplyError> {
        let at = event.at().as_micros();
        let mut applied = Applied { task: event.task(), ..Applied::default() };
        let task_id = match event {
            Event::TaskCreated { spec, .. } => {
                if self.touched.contains_key(&spec.id) || self.settled.contains_key(&spec.id) {
                    return Err(inconsistent(seq, format!("task {} created twice", spec.id)));
                }
                let steps = new_steps(&[], &spec.steps).map_err(|r| inconsistent(seq, r))?;
                let task = MirrorTask {
                    id: spec.id,
                    namespace: spec.namespace.as_str().to_owned(),
                    name: spec.name.clone(),
                    payload: spec.payload.as_str().to_owned(),
                    priority: spec.priority.get(),
                    run_at_us: spec.run_at.map(Timestamp::as_micros),
                    tags: spec.tags.iter().map(|t| t.as_str().to_owned()).collect(),
                    idempotency_key: spec.idempotency_key.as_ref().map(|k| k.as_str().to_owned()),
                    created_at_us: at,
                    created_seq: seq,
                    updated_at_us: at,
                    updated_seq: seq,
                    state: TaskState::Pending,
                    run_at_reached: spec.run_at.is_none_or(|t| t.as_micros() <= at),
                    started: false,
                    finished_at_us: None,
                    end_reason: None,
                    steps,
                };
                for i in 0..task.steps.len() {
                    applied.step_moves.push((i as u16, None, StepState::Pending));
                }
                applied.task_move = Some((None, TaskState::Pending));
                let t = self.touched.entry(spec.id).insert_entry(task).into_mut();
                enqueue_unblocked(t, at, &mut applied);
                spec.id
            }
            Event::QueuePaused { namespace, .. }
            | Event::QueueResumed { namespace, .. }
            | Event::QueueConcurrencySet { namespace, .. } => {
                applied.namespace = Some(namespace.as_str().to_owned());
                return Ok(applied);
            }
            _ => {
                let id = event.task().expect("every other event names a task");
                let t = self.touch(seq, id)?;
                apply_to_task(t, seq, event, at, &mut applied)?;
                id
            }
        };
        let t = self.touched.get_mut(&task_id).expect("touched above");
        applied.namespace = Some(t.namespace.clone());
        t.updated_at_us = at;
        t.updated_seq = seq;
        let cancelled = matches!(event, Event::TaskCancelled { .. });
        let given_up = matches!(event, Event::TaskGivenUp { .. });
        let next = TaskState::derive(t.steps.iter().map(|s| s.state), t.started, cancelled, given_up);
        if next != t.state {
            match &mut applied.task_move {
                Some((_, to)) => *to = next,
                None => applied.task_move = Some((Some(t.state), next)),
            }
            t.state = next;
        }
        if next.is_terminal() {
            t.finished_at_us = Some(at);
            applied.finished = self.touched.remove(&task_id).map(Box::new);
        }
        Ok(applied)
    }
}

fn step_mut(t: &mut MirrorTask, seq: u64, index: u16) -> Result<&mut MirrorStep, ApplyError> {
    let id = t.id;
    t.steps.get_mut(usize::from(index)).ok_or_else(|| inconsistent(seq, format!("task {id} has no step {index}")))
}

fn set_state(step: &mut MirrorStep, index: u16, to: StepState, applied: &mut Applied) {
    if step.state != to {
        applied.step_moves.push((index, Some(step.state), to));
        step.state = to;
    }
}

fn enqueue(step: &mut MirrorStep, index: u16, at: i64, applied: &mut Applied) {
    step.enqueued_at_us = Some(at);
    step.retry_at_us = None;
    set_state(step, index, StepState::Enqueued, applied);
}

fn enqueue_unblocked(t: &mut MirrorTask, at: i64, applied: &mut Applied) {
    if !t.run_at_reached {
        return;
    }
    let ready: Vec<usize> = (0..t.steps.len())
        .filter(|&i| t.steps[i].state == StepState::Pending && t.deps_satisfied(&t.steps[i]))
        .collect();
    for i in ready {
        enqueue(&mut t.steps[i], i as u16, at, applied);
    }
}

/// Ends the live lease of an in-progress step with `epoch`.
fn end_lease(
    step: &mut MirrorStep,
    index: u16,
    seq: u64,
    epoch: Option<u32>,
    how: LeaseEnd,
    applied: &mut Applied,
) -> Result<(), ApplyError> {
    if step.state != StepState::InProgress || epoch.is_some_and(|e| e != step.epoch) {
        return Err(inconsistent(seq, format!("step {index} has no live lease {epoch:?} (it is {:?})", step.state)));
    }
    applied.ended_leases.push(EndedLease {
        step: index,
        worker: step.worker.take().unwrap_or_default(),
        claimed_at_us: step.claimed_at_us.unwrap_or_default(),
        how,
    });
    step.lease_deadline_us = None;
    Ok(())
}

fn fail_outcome(step: &mut MirrorStep, index: u16, at: i64, outcome: &FailOutcome, applied: &mut Applied) {
    match outcome {
        FailOutcome::Retry { retry_at, .. } => {
            step.retry_at_us = Some(retry_at.as_micros());
            set_state(step, index, StepState::WaitingForRetry, applied);
        }
        FailOutcome::DeadLetter => {
            step.finished_at_us = Some(at);
            set_state(step, index, StepState::Error, applied);
        }
    }
}

fn apply_to_task(
    t: &mut MirrorTask,
    seq: u64,
    event: &Event,
    at: i64,
    applied: &mut Applied,
) -> Result<(), ApplyError> {
    match event {
        Event::StepClaimed { step, worker, epoch, attempt, lease_deadline, .. } => {
            let i = step.0;
            let s = step_mut(t, seq, i)?;
            if s.state != StepState::Enqueued {
                return Err(inconsistent(seq, format!("step {i} is {:?}, not enqueued", s.state)));
            }
            applied.claimed = Some((worker.as_str().to_owned(), at - s.enqueued_at_us.unwrap_or(at)));
            s.epoch = epoch.0;
            s.attempts = attempt.0;
            s.worker = Some(worker.as_str().to_owned());
            s.lease_deadline_us = Some(lease_deadline.as_micros());
            s.claimed_at_us = Some(at);
            set_state(s, i, StepState::InProgress, applied);
            t.started = true;
        }
        Event::LeaseExtended { step, epoch, lease_deadline, .. } => {
            let s = step_mut(t, seq, step.0)?;
            if s.state != StepState::InProgress || s.epoch != epoch.0 {
                return Err(inconsistent(seq, format!("step {} has no live lease {epoch}", step.0)));
            }
            s.lease_deadline_us = Some(lease_deadline.as_micros());
            applied.extended_by = s.worker.clone();
        }
        Event::StepCompleted { step, epoch, result, .. } => {
            let i = step.0;
            let s = step_mut(t, seq, i)?;
            end_lease(s, i, seq, Some(epoch.0), LeaseEnd::Completed, applied)?;
            s.result = Some(result.as_str().to_owned());
            s.finished_at_us = Some(at);
            set_state(s, i, StepState::Complete, applied);
            enqueue_unblocked(t, at, applied);
        }
        Event::StepFailed { step, epoch, error, outcome, .. } => {
            let i = step.0;
            let s = step_mut(t, seq, i)?;
            end_lease(s, i, seq, Some(epoch.0), LeaseEnd::Failed, applied)?;
            s.last_error = Some(error.as_str().to_owned());
            fail_outcome(s, i, at, outcome, applied);
        }
        Event::LeaseExpired { step, epoch, outcome, .. } => {
            let i = step.0;
            let s = step_mut(t, seq, i)?;
            end_lease(s, i, seq, Some(epoch.0), LeaseEnd::Expired, applied)?;
            s.last_error = Some("lease expired".to_owned());
            fail_outcome(s, i, at, outcome, applied);
        }
        Event::StepReleased { step, epoch, .. } => {
            let i = step.0;
            let s = step_mut(t, seq, i)?;
            end_lease(s, i, seq, Some(epoch.0), LeaseEnd::Released, applied)?;
            s.attempts = s.attempts.saturating_sub(1);
            enqueue(s, i, at, applied);
        }
        Event::StepsAdded { by_step, epoch, steps, .. } => {
            let s = step_mut(t, seq, by_step.0)?;
            if s.state != StepState::InProgress || s.epoch != epoch.0 {
                return Err(inconsistent(seq, format!("step {} has no live lease {epoch}", by_step.0)));
            }
            let added = new_steps(&t.steps, steps).map_err(|r| inconsistent(seq, r))?;
            let first = t.steps.len();
            for i in 0..added.len() {
                applied.step_moves.push(((first + i) as u16, None, StepState::Pending));
            }
            t.steps.extend(added);
            enqueue_unblocked(t, at, applied);
        }
        Event::StepRetryDue { step, .. } => {
            let i = step.0;
            let s = step_mut(t, seq, i)?;
            if s.state != StepState::WaitingForRetry {
                return Err(inconsistent(seq, format!("step {i} is {:?}, not waiting for retry", s.state)));
            }
            enqueue(s, i, at, applied);
        }
        Event::RunAtReached { .. } => {
            if t.run_at_reached {
                return Err(inconsistent(seq, "run_at already reached"));
            }
            t.run_at_reached = true;
            enqueue_unblocked(t, at, applied);
        }
        Event::StepRetried { step, reset_attempts, .. } => {
            let i = step.0;
            let s = step_mut(t, seq, i)?;
            if s.state != StepState::Error {
                return Err(inconsistent(seq, format!("step {i} is {:?}, not in error", s.state)));
            }
            if *reset_attempts {
                s.attempts = 0;
            }
            s.finished_at_us = None;
            enqueue(s, i, at, applied);
        }
        Event::StepResolved { step, note, result, .. } => {
            let i = step.0;
            let s = step_mut(t, seq, i)?;
            if !matches!(
                s.state,
                StepState::Pending | StepState::Enqueued | StepState::WaitingForRetry | StepState::Error
            ) {
                return Err(inconsistent(seq, format!("step {i} is {:?} and cannot be resolved", s.state)));
            }
            s.retry_at_us = None;
            s.result = result.as_ref().map(|r| r.as_str().to_owned());
            s.resolution_note = Some(note.as_str().to_owned());
            s.finished_at_us = Some(at);
            set_state(s, i, StepState::ResolvedManually, applied);
            enqueue_unblocked(t, at, applied);
        }
        Event::TaskCancelled { reason, .. } | Event::TaskGivenUp { reason, .. } => {
            if matches!(event, Event::TaskGivenUp { .. }) && t.state != TaskState::BlockedByFailures {
                return Err(inconsistent(seq, format!("task is {:?}, not blocked", t.state)));
            }
            t.end_reason = reason.as_ref().map(|r| r.as_str().to_owned());
            for (i, s) in t.steps.iter_mut().enumerate() {
                if s.state.is_terminal() {
                    continue;
                }
                if s.state == StepState::InProgress {
                    end_lease(s, i as u16, seq, None, LeaseEnd::Cancelled, applied)?;
                }
                s.retry_at_us = None;
                s.finished_at_us = Some(at);
                set_state(s, i as u16, StepState::Cancelled, applied);
            }
        }
        Event::TaskCreated { .. }
        | Event::QueuePaused { .. }
        | Event::QueueResumed { .. }
        | Event::QueueConcurrencySet { .. } => unreachable!("handled by the caller"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use domain::Command;
    use domain::testkit::{Scenario, claim, complete, fail, step, task_id, workflow};

    use super::*;

    /// A DAG task that is claimed, fails once, is retried and completes, and
    /// a second task that is cancelled while its step is leased.
    fn history() -> Vec<Event> {
        let mut s = Scenario::new();
        s.ok(Command::CreateTask(workflow(
            1,
            "ns",
            vec![step("a", "h", &[]), step("b", "h", &["a"]), step("c", "h", &["a", "b"])],
        )));
        s.ok(Command::CreateTask(workflow(2, "ns", vec![step("x", "h", &[])])));
        s.ok(claim("ns", "w1", 2));
        s.ok(fail(task_id(1), "a", 1, true));
        s.advance_ms(60_000);
        s.fire_timers();
        s.ok(Command::CancelTask { task: task_id(2), reason: None });
        for (name, epoch) in [("a", 2), ("b", 1), ("c", 1)] {
            s.ok(claim("ns", "w2", 1));
            s.ok(complete(task_id(1), name, epoch));
        }
        s.log
    }

    #[test]
    fn settling_after_every_event_changes_nothing_a_batch_sees() {
        let events = history();
        let mut kept = Mirror::new();
        let mut settled = Mirror::new();
        for (i, event) in events.iter().enumerate() {
            let seq = i as u64 + 1;
            let a = kept.apply(seq, event).expect("consistent");
            let b = settled.apply(seq, event).expect("consistent");
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "what event {seq} did");
            for id in [task_id(1), task_id(2)] {
                assert_eq!(kept.task(&id).unwrap(), settled.task(&id).unwrap(), "task {id} after event {seq}");
                if event.task() == Some(id) {
                    assert_eq!(kept.touched_task(&id), settled.touched_task(&id), "task {id} after event {seq}");
                }
            }
            settled.settle().expect("encodes");
            assert!(settled.touched.is_empty());
            assert_eq!(kept.len(), settled.len());
        }
        assert!(kept.is_empty(), "both tasks ended");
    }

    #[test]
    fn a_body_that_does_not_decode_is_reported_when_its_task_is_touched() {
        let events = history();
        let mut mirror = Mirror::from_bodies([(task_id(1), Box::from(&b"\xff\xff"[..]))]);
        let claimed = events.iter().position(|e| matches!(e, Event::StepClaimed { .. })).expect("a claim");
        assert!(matches!(mirror.apply(1, &events[claimed]), Err(ApplyError::Model(_))));
    }
}
