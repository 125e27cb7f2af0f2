//! taskledger's pure write model. Tasks and their steps, the two state
//! machines, commands, events, and the `Ledger` that decides commands and
//! applies events.
//!
//! This crate does no I/O: no clock, no randomness, no files, no sockets.
//! Time (`now`) and identifiers come in as arguments, which is what makes the
//! ledger a deterministic function of its log: replaying the events through
//! `Ledger::apply` rebuilds exactly the state the writer had.

mod command;
mod decide;
mod event;
mod ledger;
mod rejection;
mod repeat;
mod spec;
mod state;
mod time;
mod values;

pub mod testkit;

pub use command::{
    Command, CommandOrigin, LeaseRef, MAX_BATCH_TASKS, MAX_CLAIM_HANDLERS, MAX_CLAIM_NAMESPACES,
    MAX_CLAIM_PAYLOAD_BYTES, MAX_CLAIM_STEPS, MAX_QUEUE_CONCURRENCY,
};
pub use event::{Event, FailOutcome, StreamId};
pub use ledger::{
    AGING_US_PER_POINT, ClaimedStep, FastMap, FastSet, IDEMPOTENCY_RETENTION_US, Inconsistency, Ledger, LedgerState,
    LedgerSummary, NamespaceCounts, QueueSettings, ReadyKey, SplitState, Step, Task, Timer, TimerKind, split_state,
};
pub use rejection::{Rejection, RejectionCode};
pub use spec::{
    LEASE_MS_MAX, LEASE_MS_MIN, MAX_ATTEMPTS_LIMIT, MAX_DEPENDENCIES_PER_STEP, MAX_STEPS_PER_TASK, MAX_TAGS_PER_TASK,
    MAX_TASK_NAME_BYTES, RETRY_CAP_MS_MAX, RetryPolicy, StepSpec, TaskSpec, check_lease_ms, retry_delay_ms, splitmix64,
    validate_step_graph,
};
pub use state::{StepState, TaskState};
pub use values::{
    Attempt, HandlerName, IdempotencyKey, Json, LeaseEpoch, Namespace, Priority, StepIndex, StepName, Tag, TaskId,
    Text, Timestamp, WorkerId,
};
