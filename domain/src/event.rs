//! Events: facts that happened, in the order the log recorded them. They are
//! the source of truth; `Ledger::apply` folds them into state and must never
//! fail on an event `decide` produced.
//!
//! Everything an event's effect depends on is inside it (the time, the
//! computed retry time, the lease deadline), so a replay reproduces the
//! writer's state exactly without a clock. Serialized with postcard in the log
//! (externally tagged: the variant index is the wire tag), so variants are
//! only ever appended; a changed shape becomes a new variant with a higher
//! schema version.

use serde::{Deserialize, Serialize};

use crate::spec::{StepSpec, TaskSpec};
use crate::values::{Attempt, Json, LeaseEpoch, Namespace, StepIndex, TaskId, Text, Timestamp, WorkerId};

/// What a failure (or a lease expiry) leads to, decided when it happens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailOutcome {
    /// Attempts remain: the step waits until `retry_at` (`delay_ms` after the failure).
    Retry { retry_at: Timestamp, delay_ms: u64 },
    /// Attempts exhausted or the failure was permanent: the step goes to `Error`.
    DeadLetter,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    TaskCreated {
        spec: TaskSpec,
        at: Timestamp,
    },
    StepClaimed {
        task: TaskId,
        step: StepIndex,
        worker: WorkerId,
        epoch: LeaseEpoch,
        attempt: Attempt,
        lease_deadline: Timestamp,
        at: Timestamp,
    },
    LeaseExtended {
        task: TaskId,
        step: StepIndex,
        epoch: LeaseEpoch,
        lease_deadline: Timestamp,
        at: Timestamp,
    },
    StepCompleted {
        task: TaskId,
        step: StepIndex,
        epoch: LeaseEpoch,
        result: Json,
        at: Timestamp,
    },
    StepFailed {
        task: TaskId,
        step: StepIndex,
        epoch: LeaseEpoch,
        error: Text,
        retryable: bool,
        outcome: FailOutcome,
        at: Timestamp,
    },
    StepReleased {
        task: TaskId,
        step: StepIndex,
        epoch: LeaseEpoch,
        at: Timestamp,
    },
    LeaseExpired {
        task: TaskId,
        step: StepIndex,
        epoch: LeaseEpoch,
        outcome: FailOutcome,
        at: Timestamp,
    },
    StepsAdded {
        task: TaskId,
        by_step: StepIndex,
        epoch: LeaseEpoch,
        steps: Vec<StepSpec>,
        at: Timestamp,
    },
    StepRetryDue {
        task: TaskId,
        step: StepIndex,
        at: Timestamp,
    },
    RunAtReached {
        task: TaskId,
        at: Timestamp,
    },
    StepRetried {
        task: TaskId,
        step: StepIndex,
        reset_attempts: bool,
        at: Timestamp,
    },
    StepResolved {
        task: TaskId,
        step: StepIndex,
        note: Text,
        result: Option<Json>,
        at: Timestamp,
    },
    TaskCancelled {
        task: TaskId,
        reason: Option<Text>,
        at: Timestamp,
    },
    TaskGivenUp {
        task: TaskId,
        reason: Option<Text>,
        at: Timestamp,
    },
    QueuePaused {
        namespace: Namespace,
        at: Timestamp,
    },
    QueueResumed {
        namespace: Namespace,
        at: Timestamp,
    },
    QueueConcurrencySet {
        namespace: Namespace,
        limit: Option<u32>,
        at: Timestamp,
    },
}

/// The stream an event belongs to: a task's whole life is one stream, a
/// queue's settings another. Each stream has its own gapless version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StreamId {
    Task(TaskId),
    Queue(Namespace),
}

impl StreamId {
    /// [`Self::to_key`] of a task's stream, without an allocation (the writer looks one up for
    /// every task it creates).
    pub fn task_key(id: &TaskId) -> [u8; 17] {
        let mut key = [b'T'; 17];
        key[1..].copy_from_slice(id.as_bytes());
        key
    }

    /// Whether `key` is [`Self::to_key`], without building it.
    pub fn is_key(&self, key: &[u8]) -> bool {
        match self {
            StreamId::Task(id) => key == Self::task_key(id),
            StreamId::Queue(ns) => {
                key.split_first().is_some_and(|(kind, name)| *kind == b'Q' && name == ns.as_str().as_bytes())
            }
        }
    }

    /// A compact, order-preserving byte key: `T` + 16 id bytes, or `Q` + name.
    pub fn to_key(&self) -> Vec<u8> {
        match self {
            StreamId::Task(id) => Self::task_key(id).to_vec(),
            StreamId::Queue(ns) => {
                let mut key = Vec::with_capacity(1 + ns.as_str().len());
                key.push(b'Q');
                key.extend_from_slice(ns.as_str().as_bytes());
                key
            }
        }
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamId::Task(id) => write!(f, "task:{id}"),
            StreamId::Queue(ns) => write!(f, "queue:{ns}"),
        }
    }
}

impl Event {
    /// The stream this event extends.
    pub fn stream(&self) -> StreamId {
        match self {
            Event::TaskCreated { spec, .. } => StreamId::Task(spec.id),
            Event::StepClaimed { task, .. }
            | Event::LeaseExtended { task, .. }
            | Event::StepCompleted { task, .. }
            | Event::StepFailed { task, .. }
            | Event::StepReleased { task, .. }
            | Event::LeaseExpired { task, .. }
            | Event::StepsAdded { task, .. }
            | Event::StepRetryDue { task, .. }
            | Event::RunAtReached { task, .. }
            | Event::StepRetried { task, .. }
            | Event::StepResolved { task, .. }
            | Event::TaskCancelled { task, .. }
            | Event::TaskGivenUp { task, .. } => StreamId::Task(*task),
            Event::QueuePaused { namespace, .. }
            | Event::QueueResumed { namespace, .. }
            | Event::QueueConcurrencySet { namespace, .. } => StreamId::Queue(namespace.clone()),
        }
    }

    /// When it happened (the `now` of the command that produced it).
    pub fn at(&self) -> Timestamp {
        match self {
            Event::TaskCreated { at, .. }
            | Event::StepClaimed { at, .. }
            | Event::LeaseExtended { at, .. }
            | Event::StepCompleted { at, .. }
            | Event::StepFailed { at, .. }
            | Event::StepReleased { at, .. }
            | Event::LeaseExpired { at, .. }
            | Event::StepsAdded { at, .. }
            | Event::StepRetryDue { at, .. }
            | Event::RunAtReached { at, .. }
            | Event::StepRetried { at, .. }
            | Event::StepResolved { at, .. }
            | Event::TaskCancelled { at, .. }
            | Event::TaskGivenUp { at, .. }
            | Event::QueuePaused { at, .. }
            | Event::QueueResumed { at, .. }
            | Event::QueueConcurrencySet { at, .. } => *at,
        }
    }

    /// The stable type name stored in each log record.
    pub fn type_name(&self) -> &'static str {
        Self::TYPES[usize::from(self.type_code())].0
    }

    /// The event's type as a small number (its variant index), stored in each
    /// record beside the schema version so a reader can filter without
    /// decoding payloads.
    pub fn type_code(&self) -> u16 {
        match self {
            Event::TaskCreated { .. } => 0,
            Event::StepClaimed { .. } => 1,
            Event::LeaseExtended { .. } => 2,
            Event::StepCompleted { .. } => 3,
            Event::StepFailed { .. } => 4,
            Event::StepReleased { .. } => 5,
            Event::LeaseExpired { .. } => 6,
            Event::StepsAdded { .. } => 7,
            Event::StepRetryDue { .. } => 8,
            Event::RunAtReached { .. } => 9,
            Event::StepRetried { .. } => 10,
            Event::StepResolved { .. } => 11,
            Event::TaskCancelled { .. } => 12,
            Event::TaskGivenUp { .. } => 13,
            Event::QueuePaused { .. } => 14,
            Event::QueueResumed { .. } => 15,
            Event::QueueConcurrencySet { .. } => 16,
        }
    }

    /// The schema version of this event's shape. Every type is at version 1;
    /// a changed shape becomes a new variant whose version is higher.
    pub fn schema_version(&self) -> u16 {
        Self::TYPES[usize::from(self.type_code())].1
    }

    /// (type name, schema version) by type code.
    pub const TYPES: [(&'static str, u16); 17] = [
        ("task_created", 1),
        ("step_claimed", 1),
        ("lease_extended", 1),
        ("step_completed", 1),
        ("step_failed", 1),
        ("step_released", 1),
        ("lease_expired", 1),
        ("steps_added", 1),
        ("step_retry_due", 1),
        ("run_at_reached", 1),
        ("step_retried", 1),
        ("step_resolved", 1),
        ("task_cancelled", 1),
        ("task_given_up", 1),
        ("queue_paused", 1),
        ("queue_resumed", 1),
        ("queue_concurrency_set", 1),
    ];

    /// The task this event creates, if it is a `TaskCreated`.
    pub fn created_task(&self) -> Option<TaskId> {
        match self {
            Event::TaskCreated { spec, .. } => Some(spec.id),
            _ => None,
        }
    }

    /// The task this event concerns, if any.
    pub fn task(&self) -> Option<TaskId> {
        match self.stream() {
            StreamId::Task(id) => Some(id),
            StreamId::Queue(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stream keys are stored in every log: `T` and the id's 16 bytes, `Q` and the name.
    #[test]
    fn stream_keys_are_a_tag_byte_and_the_id_or_name() {
        let id = TaskId::new(uuid::Uuid::from_u128(0x0123_4567_89ab_7def_8123_4567_89ab_cdef)).unwrap();
        let mut expected = vec![b'T'];
        expected.extend_from_slice(id.as_bytes());
        assert_eq!(StreamId::Task(id).to_key(), expected);
        assert_eq!(StreamId::task_key(&id).as_slice(), expected.as_slice());
        let queue = StreamId::Queue(Namespace::new("emails").unwrap());
        assert_eq!(queue.to_key(), b"Qemails");
        assert!(
            queue.is_key(b"Qemails") && !queue.is_key(b"Qemail") && !queue.is_key(b"Temails") && !queue.is_key(b"")
        );
        let task = StreamId::Task(id);
        assert!(task.is_key(&task.to_key()) && !task.is_key(&task.to_key()[..16]) && !queue.is_key(&task.to_key()));
    }
}
