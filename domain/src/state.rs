//! The two state machines: steps (8 states) and tasks (8 states). Step states
//! change only through events; a task's state is derived from its steps (and
//! its cancel/give-up flags) after every event, and each change of either is
//! checked against the tables below, so a transition that is not listed here
//! cannot happen.

use serde::{Deserialize, Serialize};

/// Where a step is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StepState {
    /// Waiting for dependencies to complete or for the task's `run_at`.
    Pending,
    /// Claimable now.
    Enqueued,
    /// Leased to a worker.
    InProgress,
    /// Failed with attempts left; becomes `Enqueued` when its retry time comes.
    WaitingForRetry,
    /// Done successfully.
    Complete,
    /// Attempts exhausted or permanent failure: the step is in the dead-letter
    /// queue until an operator retries or resolves it (or gives up the task).
    Error,
    /// Cancelled with its task.
    Cancelled,
    /// An operator declared it done without a successful run.
    ResolvedManually,
}

impl StepState {
    pub const ALL: [StepState; 8] = [
        Self::Pending,
        Self::Enqueued,
        Self::InProgress,
        Self::WaitingForRetry,
        Self::Complete,
        Self::Error,
        Self::Cancelled,
        Self::ResolvedManually,
    ];

    /// States that no event changes any more. `Error` is not among them: an
    /// operator may still retry or resolve a dead-lettered step.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Complete | Self::Cancelled | Self::ResolvedManually)
    }

    /// Terminal in the sense of DESIGN §3 (the four right-hand states).
    pub fn is_terminal(self) -> bool {
        self.is_final() || self == Self::Error
    }

    /// Counts as "done" for the steps that depend on it.
    pub fn satisfies_dependents(self) -> bool {
        matches!(self, Self::Complete | Self::ResolvedManually)
    }

    /// The allowed step transitions, and nothing else.
    pub fn can_become(self, next: StepState) -> bool {
        use StepState::*;
        matches!(
            (self, next),
            (Pending, Enqueued | Cancelled | ResolvedManually)
                | (Enqueued, InProgress | Cancelled | ResolvedManually)
                | (InProgress, Complete | Enqueued | WaitingForRetry | Error | Cancelled)
                | (WaitingForRetry, Enqueued | Cancelled | ResolvedManually)
                | (Error, Enqueued | ResolvedManually)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Enqueued => "enqueued",
            Self::InProgress => "in_progress",
            Self::WaitingForRetry => "waiting_for_retry",
            Self::Complete => "complete",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
            Self::ResolvedManually => "resolved_manually",
        }
    }
}

/// Where a task is in its life, derived from its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TaskState {
    /// No step has started yet.
    Pending,
    /// Some step is running or has finished, and nothing is blocked.
    InProgress,
    /// Nothing runs; at least one step waits for its retry time.
    WaitingForRetry,
    /// A step is in `Error`: an operator must retry, resolve or give up.
    BlockedByFailures,
    /// Every step completed.
    Complete,
    /// An operator gave the task up.
    Error,
    /// Cancelled by a producer or operator.
    Cancelled,
    /// Every step is complete or resolved, at least one manually.
    ResolvedManually,
}

impl TaskState {
    pub const ALL: [TaskState; 8] = [
        Self::Pending,
        Self::InProgress,
        Self::WaitingForRetry,
        Self::BlockedByFailures,
        Self::Complete,
        Self::Error,
        Self::Cancelled,
        Self::ResolvedManually,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Complete | Self::Error | Self::Cancelled | Self::ResolvedManually)
    }

    /// The allowed task transitions, and nothing else. Only a blocked task
    /// may be given up (`Error`): one that still runs is cancelled instead.
    /// A task cannot fall back to `Pending`, and cannot reach `Complete`
    /// except from `InProgress` (its last step completing).
    pub fn can_become(self, next: TaskState) -> bool {
        use TaskState::*;
        matches!(
            (self, next),
            (Pending, InProgress | Cancelled | ResolvedManually)
                | (InProgress, WaitingForRetry | BlockedByFailures | Complete | Cancelled | ResolvedManually)
                | (WaitingForRetry, InProgress | Cancelled | ResolvedManually)
                | (BlockedByFailures, InProgress | WaitingForRetry | Error | Cancelled | ResolvedManually)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InProgress => "in_progress",
            Self::WaitingForRetry => "waiting_for_retry",
            Self::BlockedByFailures => "blocked_by_failures",
            Self::Complete => "complete",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
            Self::ResolvedManually => "resolved_manually",
        }
    }

    /// Derives a task's state from its steps. `started` is true once any step
    /// has ever been claimed; `cancelled` and `given_up` are the task's flags.
    pub fn derive(
        steps: impl Iterator<Item = StepState> + Clone,
        started: bool,
        cancelled: bool,
        given_up: bool,
    ) -> TaskState {
        if cancelled {
            return TaskState::Cancelled;
        }
        if given_up {
            return TaskState::Error;
        }
        let mut all_final = true;
        let mut any_resolved = false;
        let mut any_error = false;
        let mut any_running = false;
        let mut any_retry = false;
        for s in steps {
            all_final &= s.satisfies_dependents();
            any_resolved |= s == StepState::ResolvedManually;
            any_error |= s == StepState::Error;
            any_running |= s == StepState::InProgress;
            any_retry |= s == StepState::WaitingForRetry;
        }
        if all_final {
            return if any_resolved { TaskState::ResolvedManually } else { TaskState::Complete };
        }
        if any_error {
            TaskState::BlockedByFailures
        } else if any_running {
            TaskState::InProgress
        } else if any_retry {
            TaskState::WaitingForRetry
        } else if started {
            TaskState::InProgress
        } else {
            TaskState::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_step_states_have_no_way_out() {
        for from in StepState::ALL.into_iter().filter(|s| s.is_final()) {
            for to in StepState::ALL {
                assert!(!from.can_become(to), "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn terminal_task_states_have_no_way_out() {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in TaskState::ALL {
                assert!(!from.can_become(to), "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn derive_follows_precedence() {
        use StepState::*;
        let d = |s: &[StepState], started| TaskState::derive(s.iter().copied(), started, false, false);
        assert_eq!(d(&[Enqueued, Pending], false), TaskState::Pending);
        assert_eq!(d(&[InProgress, Error], true), TaskState::BlockedByFailures);
        assert_eq!(d(&[WaitingForRetry, Pending], true), TaskState::WaitingForRetry);
        assert_eq!(d(&[Complete, Enqueued], true), TaskState::InProgress);
        assert_eq!(d(&[Complete, Complete], true), TaskState::Complete);
        assert_eq!(d(&[Complete, ResolvedManually], true), TaskState::ResolvedManually);
        assert_eq!(TaskState::derive([Error].into_iter(), true, false, true), TaskState::Error);
    }
}
