//! Why a command was refused. A rejection is the domain's answer to a caller's
//! mistake or a conflict; it writes nothing. Its `code` is a stable,
//! machine-readable string that clients may match on (the API maps codes to
//! HTTP statuses in one place); the message is for a person and names the
//! offending field.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Stable rejection codes. Variants are only ever appended (they are stored in
/// the command-outcome index of the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionCode {
    /// A value failed its constructor's checks (bad name, out-of-range number).
    InvalidValue,
    /// A payload, result or whole request exceeded its byte limit.
    PayloadTooLarge,
    /// A task declared no steps.
    NoSteps,
    /// A task (or an `AddSteps`) would exceed `MAX_STEPS_PER_TASK`.
    TooManySteps,
    /// Two steps of one task share a name.
    DuplicateStep,
    /// `depends_on` names a step that does not exist.
    UnknownDependency,
    /// The dependency graph has a cycle.
    DependencyCycle,
    /// A lease duration outside the allowed range.
    InvalidLease,
    /// A retry policy outside the allowed ranges.
    InvalidRetryPolicy,
    /// A batch exceeded its size limit or was empty.
    InvalidBatch,
    /// A task with this id already exists.
    TaskExists,
    /// No live task has this id (it never existed, or it finished and left memory).
    TaskNotFound,
    /// The task has no step of that name.
    StepNotFound,
    /// The lease epoch presented is not the step's current live lease.
    LeaseLost,
    /// The command does not apply to the step's or task's current state.
    InvalidState,
    /// A claim request outside its limits (`max`, lease, namespaces).
    InvalidClaim,
    /// The caller's credentials do not cover this namespace.
    NamespaceForbidden,
}

impl RejectionCode {
    /// The stable wire form, e.g. `"lease_lost"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidValue => "invalid_value",
            Self::PayloadTooLarge => "payload_too_large",
            Self::NoSteps => "no_steps",
            Self::TooManySteps => "too_many_steps",
            Self::DuplicateStep => "duplicate_step",
            Self::UnknownDependency => "unknown_dependency",
            Self::DependencyCycle => "dependency_cycle",
            Self::InvalidLease => "invalid_lease",
            Self::InvalidRetryPolicy => "invalid_retry_policy",
            Self::InvalidBatch => "invalid_batch",
            Self::TaskExists => "task_exists",
            Self::TaskNotFound => "task_not_found",
            Self::StepNotFound => "step_not_found",
            Self::LeaseLost => "lease_lost",
            Self::InvalidState => "invalid_state",
            Self::InvalidClaim => "invalid_claim",
            Self::NamespaceForbidden => "namespace_forbidden",
        }
    }

    /// Every code, for tests and documentation that must cover them all.
    pub const ALL: [RejectionCode; 17] = [
        Self::InvalidValue,
        Self::PayloadTooLarge,
        Self::NoSteps,
        Self::TooManySteps,
        Self::DuplicateStep,
        Self::UnknownDependency,
        Self::DependencyCycle,
        Self::InvalidLease,
        Self::InvalidRetryPolicy,
        Self::InvalidBatch,
        Self::TaskExists,
        Self::TaskNotFound,
        Self::StepNotFound,
        Self::LeaseLost,
        Self::InvalidState,
        Self::InvalidClaim,
        Self::NamespaceForbidden,
    ];
}

impl fmt::Display for RejectionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused command: a stable code, the field at fault (a path such as
/// `tasks[2].steps[0].depends_on`) when there is one, and a sentence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    pub code: RejectionCode,
    pub field: Option<String>,
    pub message: String,
}

impl Rejection {
    pub fn new(code: RejectionCode, field: Option<&str>, message: impl Into<String>) -> Self {
        Self { code, field: field.map(str::to_owned), message: message.into() }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(RejectionCode::InvalidValue, Some(field), message)
    }

    /// Places this rejection under a parent path: `steps[1]` + `handler` →
    /// `steps[1].handler`. Used when validating nested specs and batches.
    pub fn within(mut self, parent: &str) -> Self {
        self.field = Some(match self.field.take() {
            Some(child) => format!("{parent}.{child}"),
            None => parent.to_owned(),
        });
        self
    }
}
