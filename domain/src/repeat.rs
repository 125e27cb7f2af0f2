//! Whether a command sent again under a command id already used is the same command the id
//! was first used for, judged against the events the original produced. The writer
//! deduplicates by command id alone (the log keeps ids and events, not commands); a client
//! that reuses an id for another command must be told so, not handed the original's answer:
//! a claim under a reused id would otherwise hand a live lease to a second worker.
//!
//! What the events do not say cannot be compared: a heartbeat's default duration, or a step's
//! name once its task has finished and left the ledger (its lease is then gone too, so no
//! answer hands anything out).

use crate::command::{Command, LeaseRef};
use crate::event::Event;
use crate::ledger::{Ledger, granted_ms};
use crate::spec::TaskSpec;
use crate::values::{LeaseEpoch, StepIndex, StepName, TaskId};

impl Ledger {
    /// Whether `command` is the command whose events were `events` (decided, and applied,
    /// earlier; never empty, since a command that recorded nothing is not kept under its id): same kind (each command records events of its own kinds only), same target,
    /// same arguments, as far as the events tell. Also a property of every decision: a command
    /// repeats the events it was just decided into (`tests/suite/state_machine.rs`).
    pub fn repeats(&self, command: &Command, events: &[Event]) -> bool {
        match command {
            Command::CreateTask(spec) => self.repeats_create(std::slice::from_ref(spec), events),
            Command::CreateTasks(specs) => self.repeats_create(specs, events),
            Command::ClaimSteps { namespaces, worker, max, lease_ms, handlers } => {
                events.len() <= *max as usize
                    && events.iter().all(|event| match event {
                        Event::StepClaimed { task, step, worker: holder, lease_deadline, at, .. } => {
                            holder == worker
                                && self.tasks.get(task).is_none_or(|t| {
                                    t.step(*step).is_some_and(|s| {
                                        namespaces.contains(&t.namespace)
                                            && (handlers.is_empty() || handlers.contains(&s.handler))
                                            && granted_ms(*at, *lease_deadline) == lease_ms.unwrap_or(s.lease_ms)
                                    })
                                })
                        }
                        _ => false,
                    })
            }
            Command::Heartbeat { lease, lease_ms } => match events {
                [Event::LeaseExtended { task, step, epoch, lease_deadline, at }] => {
                    self.same_lease(lease, task, *step, *epoch)
                        && lease_ms.is_none_or(|ms| granted_ms(*at, *lease_deadline) == ms)
                }
                _ => false,
            },
            Command::CompleteStep { lease, result } => match events {
                [Event::StepCompleted { task, step, epoch, result: recorded, .. }] => {
                    self.same_lease(lease, task, *step, *epoch) && recorded == result
                }
                _ => false,
            },
            Command::FailStep { lease, error, retryable } => match events {
                [Event::StepFailed { task, step, epoch, error: recorded, retryable: was, .. }] => {
                    self.same_lease(lease, task, *step, *epoch) && recorded == error && was == retryable
                }
                _ => false,
            },
            Command::ReleaseStep { lease } => match events {
                [Event::StepReleased { task, step, epoch, .. }] => self.same_lease(lease, task, *step, *epoch),
                _ => false,
            },
            Command::AddSteps { lease, steps } => match events {
                [Event::StepsAdded { task, by_step, epoch, steps: added, .. }] => {
                    self.same_lease(lease, task, *by_step, *epoch) && added == steps
                }
                _ => false,
            },
            Command::RetryStep { task, step, reset_attempts } => match events {
                [Event::StepRetried { task: t, step: index, reset_attempts: reset, .. }] => {
                    t == task && self.names_step(task, *index, step) && reset == reset_attempts
                }
                _ => false,
            },
            Command::ResolveStep { task, step, note, result } => match events {
                [Event::StepResolved { task: t, step: index, note: n, result: r, .. }] => {
                    t == task && self.names_step(task, *index, step) && n == note && r == result
                }
                _ => false,
            },
            Command::CancelTask { task, reason } => {
                matches!(events, [Event::TaskCancelled { task: t, reason: r, .. }] if t == task && r == reason)
            }
            Command::GiveUpTask { task, reason } => {
                matches!(events, [Event::TaskGivenUp { task: t, reason: r, .. }] if t == task && r == reason)
            }
            Command::PauseQueue { namespace } => {
                matches!(events, [Event::QueuePaused { namespace: n, .. }] if n == namespace)
            }
            Command::ResumeQueue { namespace } => {
                matches!(events, [Event::QueueResumed { namespace: n, .. }] if n == namespace)
            }
            Command::SetQueueConcurrency { namespace, limit } => {
                matches!(events, [Event::QueueConcurrencySet { namespace: n, limit: l, .. }] if n == namespace && l == limit)
            }
            // The writer's own timers (which carry no client command id) are judged alike.
            Command::ExpireLease { task, step, epoch } => match events {
                [Event::LeaseExpired { task: t, step: index, epoch: e, .. }] => {
                    t == task && e == epoch && self.names_step(task, *index, step)
                }
                _ => false,
            },
            Command::RetryDue { task, step } => match events {
                [Event::StepRetryDue { task: t, step: index, .. }] => t == task && self.names_step(task, *index, step),
                _ => false,
            },
            Command::RunAtDue { task } => matches!(events, [Event::RunAtReached { task: t, .. }] if t == task),
        }
    }

    /// A repeated create's specs against the original's events: each spec, in order, either
    /// created the next task of `events` (the task ids aside: the server mints a fresh id for
    /// each spec of each request that names none) or carries an idempotency key that names a
    /// task (it created nothing, then or now), and every task the original created is
    /// accounted for. A spec added, dropped, changed or reordered is another command.
    fn repeats_create(&self, specs: &[TaskSpec], events: &[Event]) -> bool {
        let created: Option<Vec<&TaskSpec>> = events
            .iter()
            .map(|event| match event {
                Event::TaskCreated { spec, .. } => Some(spec),
                _ => None,
            })
            .collect();
        // An original that recorded anything else was another kind of command.
        let Some(created) = created else { return false };
        let mut created = created.into_iter().peekable();
        for spec in specs {
            if created.next_if(|created| **created == TaskSpec { id: created.id, ..spec.clone() }).is_some() {
                continue;
            }
            // The index as it stands: a key past its retention that no create has pruned yet
            // still names what the original's answer named.
            let keyed = spec
                .idempotency_key
                .as_ref()
                .is_some_and(|key| self.indexed_idempotent_task(&spec.namespace, key).is_some());
            if !keyed {
                return false;
            }
        }
        created.next().is_none()
    }

    /// Whether `lease` (task, step name, epoch) is the one an event recorded.
    fn same_lease(&self, lease: &LeaseRef, task: &TaskId, step: StepIndex, epoch: LeaseEpoch) -> bool {
        lease.task == *task && lease.epoch == epoch && self.names_step(task, step, &lease.step)
    }

    /// Whether step `index` of `task` is named `name`; true when the task has left the ledger
    /// (finished), whose step names are no longer at hand.
    fn names_step(&self, task: &TaskId, index: StepIndex, name: &StepName) -> bool {
        self.tasks.get(task).is_none_or(|t| t.step(index).is_some_and(|s| s.name == *name))
    }
}
