//! `Ledger::decide`: turns a command into the events it causes, or into a
//! `Rejection`, reading the ledger and never changing it. Each arm checks
//! everything first and then builds its events, so a rejected command has no
//! effect at all.

use crate::command::{
    Command, LeaseRef, MAX_BATCH_TASKS, MAX_CLAIM_HANDLERS, MAX_CLAIM_NAMESPACES, MAX_CLAIM_PAYLOAD_BYTES,
    MAX_CLAIM_STEPS, MAX_QUEUE_CONCURRENCY,
};
use crate::event::{Event, FailOutcome};
use crate::ledger::{Ledger, ReadyKey, Step, Task};
use crate::rejection::{Rejection, RejectionCode};
use crate::spec::{TaskSpec, check_lease_ms, refuse_repeated_dependencies, retry_delay_ms, validate_step_graph};
use crate::state::{StepState, TaskState};
use crate::values::{Attempt, HandlerName, Namespace, StepIndex, StepName, TaskId, Timestamp};

fn reject(code: RejectionCode, field: Option<&str>, message: impl Into<String>) -> Rejection {
    Rejection::new(code, field, message)
}

impl Ledger {
    /// Decides a command at time `now`. Pure: the same ledger, command and
    /// time always give the same answer.
    pub fn decide(&self, command: &Command, now: Timestamp) -> Result<Vec<Event>, Rejection> {
        // Event time never goes backwards, whatever clock the caller has.
        let at = now.max(self.last_event_at);
        match command {
            Command::CreateTask(spec) => Ok(self.decide_create(spec, at)?.into_iter().collect()),
            Command::CreateTasks(specs) => self.decide_create_batch(specs, at),
            Command::CancelTask { task, reason } => {
                self.live_task(task)?;
                Ok(vec![Event::TaskCancelled { task: *task, reason: reason.clone(), at }])
            }
            Command::ClaimSteps { namespaces, worker, max, lease_ms, handlers } => {
                self.decide_claim(namespaces, handlers, *max, *lease_ms, at, |task, step, s, epoch, deadline| {
                    Event::StepClaimed {
                        task,
                        step,
                        worker: worker.clone(),
                        epoch,
                        attempt: Attempt(s.attempts + 1),
                        lease_deadline: deadline,
                        at,
                    }
                })
            }
            Command::Heartbeat { lease, lease_ms } => {
                let (_, index, step) = self.holder(lease, at)?;
                // By default a lease is extended by the duration it was granted for (the claim's
                // `lease_ms`, or the last heartbeat's), not by the step's default.
                let granted = Some(step.lease_granted_ms).filter(|ms| *ms > 0);
                let lease_ms = lease_ms.or(granted).unwrap_or(step.lease_ms);
                check_lease_ms("lease_ms", lease_ms)?;
                Ok(vec![Event::LeaseExtended {
                    task: lease.task,
                    step: index,
                    epoch: lease.epoch,
                    lease_deadline: at.plus_ms(lease_ms.into()),
                    at,
                }])
            }
            Command::CompleteStep { lease, result } => {
                let (_, index, _) = self.holder(lease, at)?;
                Ok(vec![Event::StepCompleted {
                    task: lease.task,
                    step: index,
                    epoch: lease.epoch,
                    result: result.clone(),
                    at,
                }])
            }
            Command::FailStep { lease, error, retryable } => {
                let (_, index, step) = self.holder(lease, at)?;
                let outcome = fail_outcome(&lease.task, index, step, *retryable, at);
                Ok(vec![Event::StepFailed {
                    task: lease.task,
                    step: index,
                    epoch: lease.epoch,
                    error: error.clone(),
                    retryable: *retryable,
                    outcome,
                    at,
                }])
            }
            Command::ReleaseStep { lease } => {
                let (_, index, _) = self.holder(lease, at)?;
                Ok(vec![Event::StepReleased { task: lease.task, step: index, epoch: lease.epoch, at }])
            }
            Command::AddSteps { lease, steps } => {
                let (task, index, _) = self.holder(lease, at)?;
                if steps.is_empty() {
                    return Err(reject(RejectionCode::NoSteps, Some("steps"), "add_steps needs at least one step"));
                }
                let existing: Vec<&StepName> = task.steps.iter().map(|s| &s.name).collect();
                validate_step_graph(&existing, steps)?;
                refuse_repeated_dependencies(steps)?;
                Ok(vec![Event::StepsAdded {
                    task: lease.task,
                    by_step: index,
                    epoch: lease.epoch,
                    steps: steps.clone(),
                    at,
                }])
            }
            Command::RetryStep { task, step, reset_attempts } => {
                let (index, s) = self.named_step(task, step)?;
                if s.state != StepState::Error {
                    return Err(reject(
                        RejectionCode::InvalidState,
                        Some("step"),
                        format!(
                            "step {step} is {}; only a step in error (dead-lettered) can be retried",
                            s.state.as_str()
                        ),
                    ));
                }
                if !reset_attempts && s.attempts >= s.max_attempts {
                    return Err(reject(
                        RejectionCode::InvalidState,
                        Some("reset_attempts"),
                        format!(
                            "step {step} has used all {} attempts; retry it with reset_attempts to run it again",
                            s.max_attempts
                        ),
                    ));
                }
                Ok(vec![Event::StepRetried { task: *task, step: index, reset_attempts: *reset_attempts, at }])
            }
            Command::ResolveStep { task, step, note, result } => {
                let (index, s) = self.named_step(task, step)?;
                match s.state {
                    StepState::Pending | StepState::Enqueued | StepState::WaitingForRetry | StepState::Error => {}
                    StepState::InProgress => {
                        return Err(reject(
                            RejectionCode::InvalidState,
                            Some("step"),
                            format!(
                                "step {step} is leased to worker {}; wait for it to finish or fail, or cancel the task",
                                s.worker.as_ref().map_or("?", |w| w.as_str())
                            ),
                        ));
                    }
                    other => {
                        return Err(reject(
                            RejectionCode::InvalidState,
                            Some("step"),
                            format!("step {step} is already {}", other.as_str()),
                        ));
                    }
                }
                Ok(vec![Event::StepResolved {
                    task: *task,
                    step: index,
                    note: note.clone(),
                    result: result.clone(),
                    at,
                }])
            }
            Command::GiveUpTask { task, reason } => {
                let t = self.live_task(task)?;
                if t.state != TaskState::BlockedByFailures {
                    return Err(reject(
                        RejectionCode::InvalidState,
                        Some("task"),
                        format!(
                            "task {task} is {}; only a task blocked by failures can be given up (cancel it instead)",
                            t.state.as_str()
                        ),
                    ));
                }
                Ok(vec![Event::TaskGivenUp { task: *task, reason: reason.clone(), at }])
            }
            Command::PauseQueue { namespace } => Ok(if self.queue_settings(namespace).paused {
                Vec::new()
            } else {
                vec![Event::QueuePaused { namespace: namespace.clone(), at }]
            }),
            Command::ResumeQueue { namespace } => Ok(if self.queue_settings(namespace).paused {
                vec![Event::QueueResumed { namespace: namespace.clone(), at }]
            } else {
                Vec::new()
            }),
            Command::SetQueueConcurrency { namespace, limit } => {
                if let Some(limit) = limit
                    && !(1..=MAX_QUEUE_CONCURRENCY).contains(limit)
                {
                    return Err(Rejection::invalid(
                        "limit",
                        format!("a concurrency limit must be between 1 and {MAX_QUEUE_CONCURRENCY}, got {limit}"),
                    ));
                }
                Ok(if self.queue_settings(namespace).concurrency_limit == *limit {
                    Vec::new()
                } else {
                    vec![Event::QueueConcurrencySet { namespace: namespace.clone(), limit: *limit, at }]
                })
            }
            Command::ExpireLease { task, step, epoch } => {
                let (index, s) = self.named_step(task, step)?;
                let live = s.state == StepState::InProgress && s.epoch == *epoch;
                if !live || s.lease_deadline.is_none_or(|d| d > at) {
                    return Err(reject(
                        RejectionCode::InvalidState,
                        Some("epoch"),
                        format!("lease {epoch} of step {step} is not due to expire"),
                    ));
                }
                let outcome = fail_outcome(task, index, s, true, at);
                Ok(vec![Event::LeaseExpired { task: *task, step: index, epoch: *epoch, outcome, at }])
            }
            Command::RetryDue { task, step } => {
                let (index, s) = self.named_step(task, step)?;
                if s.state != StepState::WaitingForRetry || s.retry_at.is_none_or(|r| r > at) {
                    return Err(reject(
                        RejectionCode::InvalidState,
                        Some("step"),
                        format!("step {step} has no retry due"),
                    ));
                }
                Ok(vec![Event::StepRetryDue { task: *task, step: index, at }])
            }
            Command::RunAtDue { task } => {
                let t = self.live_task(task)?;
                if t.run_at_reached || t.run_at.is_none_or(|r| r > at) {
                    return Err(reject(
                        RejectionCode::InvalidState,
                        Some("task"),
                        format!("task {task} has no run_at due"),
                    ));
                }
                Ok(vec![Event::RunAtReached { task: *task, at }])
            }
        }
    }

    /// Checks that a command only touches namespaces in `allowed` (a caller's
    /// token scope). A task-addressed command on a task outside the scope is
    /// answered as if the task did not exist, so scopes do not leak which
    /// tasks exist elsewhere.
    pub fn check_scope(&self, command: &Command, allowed: &[Namespace]) -> Result<(), Rejection> {
        let forbidden = |ns: &Namespace| {
            reject(
                RejectionCode::NamespaceForbidden,
                Some("namespace"),
                format!("your credentials do not cover namespace {ns}"),
            )
        };
        let check = |ns: &Namespace| if allowed.contains(ns) { Ok(()) } else { Err(forbidden(ns)) };
        match command {
            Command::CreateTask(spec) => check(&spec.namespace),
            Command::CreateTasks(specs) => specs.iter().try_for_each(|s| check(&s.namespace)),
            Command::ClaimSteps { namespaces, .. } => namespaces.iter().try_for_each(check),
            Command::PauseQueue { namespace }
            | Command::ResumeQueue { namespace }
            | Command::SetQueueConcurrency { namespace, .. } => check(namespace),
            Command::CancelTask { task, .. }
            | Command::GiveUpTask { task, .. }
            | Command::RetryStep { task, .. }
            | Command::ResolveStep { task, .. }
            | Command::ExpireLease { task, .. }
            | Command::RetryDue { task, .. }
            | Command::RunAtDue { task } => self.check_task_scope(task, allowed),
            Command::Heartbeat { lease, .. }
            | Command::CompleteStep { lease, .. }
            | Command::FailStep { lease, .. }
            | Command::ReleaseStep { lease }
            | Command::AddSteps { lease, .. } => self.check_task_scope(&lease.task, allowed),
        }
    }

    fn check_task_scope(&self, task: &TaskId, allowed: &[Namespace]) -> Result<(), Rejection> {
        match self.tasks.get(task) {
            Some(t) if !allowed.contains(&t.namespace) => Err(reject(
                RejectionCode::TaskNotFound,
                Some("task"),
                format!("no live task {task} (unknown, or already finished)"),
            )),
            _ => Ok(()),
        }
    }

    /// The system command a due timer stands for.
    pub fn timer_command(&self, timer: &crate::ledger::Timer) -> Option<Command> {
        let task = self.tasks.get(&timer.task)?;
        let step = task.step(timer.step)?;
        Some(match timer.kind {
            crate::ledger::TimerKind::LeaseExpiry => {
                Command::ExpireLease { task: timer.task, step: step.name.clone(), epoch: step.epoch }
            }
            crate::ledger::TimerKind::RetryDue => Command::RetryDue { task: timer.task, step: step.name.clone() },
            crate::ledger::TimerKind::RunAt => Command::RunAtDue { task: timer.task },
        })
    }

    fn live_task(&self, task: &TaskId) -> Result<&Task, Rejection> {
        self.task(task).ok_or_else(|| {
            reject(
                RejectionCode::TaskNotFound,
                Some("task"),
                format!("no live task {task} (unknown, or already finished)"),
            )
        })
    }

    fn named_step(&self, task: &TaskId, step: &StepName) -> Result<(StepIndex, &Step), Rejection> {
        let t = self.live_task(task)?;
        let index = t.step_index(step).ok_or_else(|| {
            reject(RejectionCode::StepNotFound, Some("step"), format!("task {task} has no step {step}"))
        })?;
        Ok((index, &t.steps[index.get()]))
    }

    /// Checks that `lease` is the live lease of its step at `at`. A lease is
    /// live from its claim until its deadline; after that it is lost even if
    /// the expiry timer has not fired yet, and a newer claim's epoch fences
    /// out every older one.
    fn holder(&self, lease: &LeaseRef, at: Timestamp) -> Result<(&Task, StepIndex, &Step), Rejection> {
        let (index, step) = self.named_step(&lease.task, &lease.step)?;
        let lost = |why: String| reject(RejectionCode::LeaseLost, Some("epoch"), why);
        if step.state != StepState::InProgress || step.epoch != lease.epoch {
            return Err(lost(format!(
                "lease {} on step {} is not live (step is {}, current epoch {})",
                lease.epoch,
                lease.step,
                step.state.as_str(),
                step.epoch
            )));
        }
        if let Some(deadline) = step.lease_deadline.filter(|d| *d <= at) {
            return Err(lost(format!("lease {} on step {} expired at {deadline}", lease.epoch, lease.step)));
        }
        Ok((&self.tasks[&lease.task], index, step))
    }

    /// A single create: `None` when the idempotency key already names a task
    /// (the caller reports that task; nothing is written).
    fn decide_create(&self, spec: &TaskSpec, at: Timestamp) -> Result<Option<Event>, Rejection> {
        spec.validate_new()?;
        if let Some(key) = &spec.idempotency_key
            && self.idempotent_task(&spec.namespace, key, at).is_some()
        {
            return Ok(None);
        }
        if self.tasks.contains_key(&spec.id) {
            return Err(reject(RejectionCode::TaskExists, Some("id"), format!("task {} already exists", spec.id)));
        }
        Ok(Some(Event::TaskCreated { spec: spec.clone(), at }))
    }

    /// A batch is all or nothing: any invalid task rejects the whole batch,
    /// with the field path naming it (`tasks[3].steps[0].handler`).
    fn decide_create_batch(&self, specs: &[TaskSpec], at: Timestamp) -> Result<Vec<Event>, Rejection> {
        if specs.is_empty() || specs.len() > MAX_BATCH_TASKS {
            return Err(reject(
                RejectionCode::InvalidBatch,
                Some("tasks"),
                format!("a batch holds 1 to {MAX_BATCH_TASKS} tasks, got {}", specs.len()),
            ));
        }
        let mut ids = std::collections::HashSet::with_capacity(specs.len());
        let mut keys = std::collections::HashSet::new();
        let mut events = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let within = |r: Rejection| r.within(&format!("tasks[{i}]"));
            // A key repeated inside the batch behaves like a repeat of the first.
            if let Some(key) = &spec.idempotency_key
                && !keys.insert((&spec.namespace, key))
            {
                spec.validate_new().map_err(within)?;
                continue;
            }
            if !ids.insert(spec.id) {
                return Err(within(reject(
                    RejectionCode::TaskExists,
                    Some("id"),
                    format!("task {} appears twice in the batch", spec.id),
                )));
            }
            if let Some(event) = self.decide_create(spec, at).map_err(within)? {
                events.push(event);
            }
        }
        Ok(events)
    }

    /// Picks up to `max` claimable steps across `namespaces` (and `handlers`,
    /// when given) in ready-key order, honouring pauses and concurrency limits.
    fn decide_claim(
        &self,
        namespaces: &[Namespace],
        handlers: &[HandlerName],
        max: u32,
        lease_ms: Option<u32>,
        at: Timestamp,
        make_event: impl Fn(TaskId, StepIndex, &Step, crate::values::LeaseEpoch, Timestamp) -> Event,
    ) -> Result<Vec<Event>, Rejection> {
        if namespaces.is_empty() || namespaces.len() > MAX_CLAIM_NAMESPACES {
            return Err(reject(
                RejectionCode::InvalidClaim,
                Some("namespaces"),
                format!("a claim names 1 to {MAX_CLAIM_NAMESPACES} namespaces, got {}", namespaces.len()),
            ));
        }
        if handlers.len() > MAX_CLAIM_HANDLERS {
            return Err(reject(
                RejectionCode::InvalidClaim,
                Some("handlers"),
                format!("a claim names at most {MAX_CLAIM_HANDLERS} handlers, got {}", handlers.len()),
            ));
        }
        if !(1..=MAX_CLAIM_STEPS).contains(&max) {
            return Err(reject(
                RejectionCode::InvalidClaim,
                Some("max"),
                format!("max must be between 1 and {MAX_CLAIM_STEPS}, got {max}"),
            ));
        }
        if let Some(ms) = lease_ms {
            check_lease_ms("lease_ms", ms)?;
        }
        // One cursor per (namespace, handler) ready queue; merge by ready key.
        let mut budget: crate::ledger::FastMap<&Namespace, u32> = Default::default();
        let mut cursors = Vec::new();
        for ns in namespaces {
            let settings = self.settings.get(ns);
            if settings.is_some_and(|s| s.paused) || budget.contains_key(ns) {
                continue;
            }
            let Some(queue) = self.ready.get(ns) else { continue };
            let room = settings
                .and_then(|s| s.concurrency_limit)
                .map_or(u32::MAX, |limit| limit.saturating_sub(queue.in_progress));
            budget.insert(ns, room);
            if room == 0 {
                continue;
            }
            for (handler, by_key) in &queue.by_handler {
                if handlers.is_empty() || handlers.contains(handler) {
                    cursors.push((ns, by_key.iter().peekable()));
                }
            }
        }
        let mut events = Vec::new();
        let mut payload_bytes = 0usize;
        while events.len() < max as usize {
            let best = cursors
                .iter_mut()
                .enumerate()
                .filter(|(_, (ns, _))| budget[ns] > 0)
                .filter_map(|(i, (_, it))| it.peek().map(|(k, _)| (**k, i)))
                .min_by_key(|(k, _): &(ReadyKey, usize)| *k);
            let Some((_, i)) = best else { break };
            let (ns, it) = &mut cursors[i];
            let (_, &(task, index)) = *it.peek().expect("peeked");
            let held = &self.tasks[&task];
            let step = &held.steps[index.get()];
            payload_bytes += held.payload.len() + step.payload.len();
            if !events.is_empty() && payload_bytes > MAX_CLAIM_PAYLOAD_BYTES {
                break;
            }
            it.next();
            *budget.get_mut(ns).expect("budgeted") -= 1;
            debug_assert_eq!(step.state, StepState::Enqueued);
            let deadline = at.plus_ms(lease_ms.unwrap_or(step.lease_ms).into());
            events.push(make_event(task, index, step, step.epoch.next(), deadline));
        }
        Ok(events)
    }
}

/// A failure's consequence: retry after the policy's delay while attempts
/// remain and the failure is retryable; otherwise the dead-letter queue.
fn fail_outcome(task: &TaskId, index: StepIndex, step: &Step, retryable: bool, at: Timestamp) -> FailOutcome {
    if retryable && step.attempts < step.max_attempts {
        let delay_ms = retry_delay_ms(&step.retry, task, index.0, step.attempts);
        FailOutcome::Retry { retry_at: at.plus_ms(delay_ms), delay_ms }
    } else {
        FailOutcome::DeadLetter
    }
}
