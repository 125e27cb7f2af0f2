//! Commands: what producers, workers, operators and the ledger's own timers
//! ask for. A command is a request, not a fact; `Ledger::decide` turns it into
//! events or a `Rejection`. Who sent it and its `command_id` travel beside it
//! in the log record, not inside the command.
//!
//! Serialized with serde as externally tagged enums; variants are only ever
//! appended, so old command scripts and stored outcomes stay readable.

use serde::{Deserialize, Serialize};

use crate::spec::{StepSpec, TaskSpec};
use crate::values::{HandlerName, Json, LeaseEpoch, Namespace, StepName, TaskId, Text, WorkerId};

/// Most tasks in one `CreateTasks` batch.
pub const MAX_BATCH_TASKS: usize = 1000;
/// Most steps one claim may return.
pub const MAX_CLAIM_STEPS: u32 = 1000;
/// Most payload bytes (each claimed step's and its task's) one claim returns: a claim stops
/// taking steps before it would pass this, though it always takes one when one is ready. A
/// claim of 1,000 steps with 64 KiB payloads answered 124 MiB and grew the server by 470 MB
/// (found by a black-box check).
pub const MAX_CLAIM_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;
/// Most namespaces (and handler filters) one claim may name.
pub const MAX_CLAIM_NAMESPACES: usize = 32;
pub const MAX_CLAIM_HANDLERS: usize = 64;
/// Largest concurrency limit a queue may be given.
pub const MAX_QUEUE_CONCURRENCY: u32 = 1_000_000;

/// A step addressed by a worker: its task, its name, and the lease epoch the
/// worker was given. Every lease-holding command carries one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRef {
    pub task: TaskId,
    pub step: StepName,
    pub epoch: LeaseEpoch,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    // producer
    CreateTask(TaskSpec),
    CreateTasks(Vec<TaskSpec>),
    CancelTask {
        task: TaskId,
        reason: Option<Text>,
    },
    // worker
    ClaimSteps {
        namespaces: Vec<Namespace>,
        worker: WorkerId,
        max: u32,
        /// Overrides the steps' default lease duration.
        lease_ms: Option<u32>,
        /// When non-empty, only steps with one of these handlers are claimed.
        handlers: Vec<HandlerName>,
    },
    Heartbeat {
        lease: LeaseRef,
        lease_ms: Option<u32>,
    },
    CompleteStep {
        lease: LeaseRef,
        result: Json,
    },
    FailStep {
        lease: LeaseRef,
        error: Text,
        retryable: bool,
    },
    ReleaseStep {
        lease: LeaseRef,
    },
    /// A decision point: the holder of a live lease on one of the task's steps
    /// adds steps to the workflow.
    AddSteps {
        lease: LeaseRef,
        steps: Vec<StepSpec>,
    },
    // operator
    RetryStep {
        task: TaskId,
        step: StepName,
        reset_attempts: bool,
    },
    ResolveStep {
        task: TaskId,
        step: StepName,
        note: Text,
        result: Option<Json>,
    },
    GiveUpTask {
        task: TaskId,
        reason: Option<Text>,
    },
    PauseQueue {
        namespace: Namespace,
    },
    ResumeQueue {
        namespace: Namespace,
    },
    /// `None` removes the limit.
    SetQueueConcurrency {
        namespace: Namespace,
        limit: Option<u32>,
    },
    // system timers (issued by the writer, never accepted from clients)
    ExpireLease {
        task: TaskId,
        step: StepName,
        epoch: LeaseEpoch,
    },
    RetryDue {
        task: TaskId,
        step: StepName,
    },
    RunAtDue {
        task: TaskId,
    },
}

/// Who may send a command: the API checks a caller's role against this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandOrigin {
    Producer,
    Worker,
    Operator,
    System,
}

impl Command {
    pub fn origin(&self) -> CommandOrigin {
        match self {
            Command::CreateTask(_) | Command::CreateTasks(_) | Command::CancelTask { .. } => CommandOrigin::Producer,
            Command::ClaimSteps { .. }
            | Command::Heartbeat { .. }
            | Command::CompleteStep { .. }
            | Command::FailStep { .. }
            | Command::ReleaseStep { .. }
            | Command::AddSteps { .. } => CommandOrigin::Worker,
            Command::RetryStep { .. }
            | Command::ResolveStep { .. }
            | Command::GiveUpTask { .. }
            | Command::PauseQueue { .. }
            | Command::ResumeQueue { .. }
            | Command::SetQueueConcurrency { .. } => CommandOrigin::Operator,
            Command::ExpireLease { .. } | Command::RetryDue { .. } | Command::RunAtDue { .. } => CommandOrigin::System,
        }
    }

    /// A short stable name, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateTask(_) => "create_task",
            Command::CreateTasks(_) => "create_tasks",
            Command::CancelTask { .. } => "cancel_task",
            Command::ClaimSteps { .. } => "claim_steps",
            Command::Heartbeat { .. } => "heartbeat",
            Command::CompleteStep { .. } => "complete_step",
            Command::FailStep { .. } => "fail_step",
            Command::ReleaseStep { .. } => "release_step",
            Command::AddSteps { .. } => "add_steps",
            Command::RetryStep { .. } => "retry_step",
            Command::ResolveStep { .. } => "resolve_step",
            Command::GiveUpTask { .. } => "give_up_task",
            Command::PauseQueue { .. } => "pause_queue",
            Command::ResumeQueue { .. } => "resume_queue",
            Command::SetQueueConcurrency { .. } => "set_queue_concurrency",
            Command::ExpireLease { .. } => "expire_lease",
            Command::RetryDue { .. } => "retry_due",
            Command::RunAtDue { .. } => "run_at_due",
        }
    }

    /// The existing task this command acts on, when it names one.
    pub fn target_task(&self) -> Option<TaskId> {
        match self {
            Command::CancelTask { task, .. }
            | Command::RetryStep { task, .. }
            | Command::ResolveStep { task, .. }
            | Command::GiveUpTask { task, .. }
            | Command::ExpireLease { task, .. }
            | Command::RetryDue { task, .. }
            | Command::RunAtDue { task } => Some(*task),
            Command::Heartbeat { lease, .. }
            | Command::CompleteStep { lease, .. }
            | Command::FailStep { lease, .. }
            | Command::ReleaseStep { lease }
            | Command::AddSteps { lease, .. } => Some(lease.task),
            Command::CreateTask(_)
            | Command::CreateTasks(_)
            | Command::ClaimSteps { .. }
            | Command::PauseQueue { .. }
            | Command::ResumeQueue { .. }
            | Command::SetQueueConcurrency { .. } => None,
        }
    }
}
