//! What a producer asks for: task and step specifications, the retry policy,
//! and their validation. A spec that passes `validate` can be turned into live
//! state without further checks; every limit here is a named constant.

use serde::{Deserialize, Serialize};

use crate::rejection::{Rejection, RejectionCode};
use crate::values::{HandlerName, IdempotencyKey, Json, Namespace, Priority, StepName, Tag, TaskId, Timestamp};

/// Most steps one task may have, including steps added later by `AddSteps`.
pub const MAX_STEPS_PER_TASK: usize = 256;
/// Most dependencies one step may declare.
pub const MAX_DEPENDENCIES_PER_STEP: usize = 64;
/// Most tags on one task.
pub const MAX_TAGS_PER_TASK: usize = 16;
/// Task name length limit in bytes.
pub const MAX_TASK_NAME_BYTES: usize = 256;
/// Lease duration bounds (a claim, a heartbeat or a step default).
pub const LEASE_MS_MIN: u32 = 100;
pub const LEASE_MS_MAX: u32 = 24 * 60 * 60 * 1000;
/// Attempt bounds: `max_attempts` counts the first run.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;
/// Retry backoff bounds.
pub const RETRY_CAP_MS_MAX: u64 = 7 * 24 * 60 * 60 * 1000;
pub const RETRY_MULTIPLIER_PERMILLE_MAX: u32 = 100_000;

/// Exponential backoff: attempt `n` (the one that just failed, from 1) waits
/// `min(cap, base × multiplier^(n-1))`, then jitter removes up to `jitter_pct`
/// percent of that. The jitter is derived from (task, step, attempt) rather
/// than drawn at random, and the result is recorded in the event, so a replay
/// reproduces it exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub base_ms: u64,
    /// Growth per attempt in thousandths: 2000 doubles.
    pub multiplier_permille: u32,
    pub cap_ms: u64,
    /// 0..=100: how much of the delay jitter may remove.
    pub jitter_pct: u8,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { base_ms: 1000, multiplier_permille: 2000, cap_ms: 5 * 60 * 1000, jitter_pct: 20 }
    }
}

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), Rejection> {
        let bad =
            |field: &str, message: String| Err(Rejection::new(RejectionCode::InvalidRetryPolicy, Some(field), message));
        if self.cap_ms > RETRY_CAP_MS_MAX {
            return bad("retry.cap_ms", format!("cap_ms must be at most {RETRY_CAP_MS_MAX}, got {}", self.cap_ms));
        }
        if self.base_ms > self.cap_ms {
            return bad(
                "retry.base_ms",
                format!("base_ms ({}) must not exceed cap_ms ({})", self.base_ms, self.cap_ms),
            );
        }
        if !(1000..=RETRY_MULTIPLIER_PERMILLE_MAX).contains(&self.multiplier_permille) {
            return bad(
                "retry.multiplier_permille",
                format!(
                    "multiplier_permille must be between 1000 (constant) and {RETRY_MULTIPLIER_PERMILLE_MAX}, got {}",
                    self.multiplier_permille
                ),
            );
        }
        if self.jitter_pct > 100 {
            return bad("retry.jitter_pct", format!("jitter_pct must be at most 100, got {}", self.jitter_pct));
        }
        Ok(())
    }
}

/// One step of a task as the producer describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    pub name: StepName,
    pub handler: HandlerName,
    pub payload: Json,
    #[serde(default)]
    pub depends_on: Vec<StepName>,
    pub max_attempts: u32,
    #[serde(default)]
    pub retry: RetryPolicy,
    pub lease_ms: u32,
}

impl StepSpec {
    /// A step with the common defaults: 3 attempts, default backoff, 30 s lease.
    pub fn new(name: StepName, handler: HandlerName, payload: Json) -> Self {
        Self {
            name,
            handler,
            payload,
            depends_on: Vec::new(),
            max_attempts: 3,
            retry: RetryPolicy::default(),
            lease_ms: 30_000,
        }
    }

    fn validate_own_fields(&self) -> Result<(), Rejection> {
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(Rejection::invalid(
                "max_attempts",
                format!("max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {}", self.max_attempts),
            ));
        }
        check_lease_ms("lease_ms", self.lease_ms)?;
        self.retry.validate()?;
        if self.depends_on.len() > MAX_DEPENDENCIES_PER_STEP {
            // Every dependency may exist: the limit is a value's, not an unknown name.
            return Err(Rejection::invalid(
                "depends_on",
                format!(
                    "a step may depend on at most {MAX_DEPENDENCIES_PER_STEP} steps, got {}",
                    self.depends_on.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Rejects a lease duration outside `LEASE_MS_MIN..=LEASE_MS_MAX`.
pub fn check_lease_ms(field: &str, lease_ms: u32) -> Result<(), Rejection> {
    if !(LEASE_MS_MIN..=LEASE_MS_MAX).contains(&lease_ms) {
        return Err(Rejection::new(
            RejectionCode::InvalidLease,
            Some(field),
            format!("{field} must be between {LEASE_MS_MIN} and {LEASE_MS_MAX} ms, got {lease_ms}"),
        ));
    }
    Ok(())
}

/// A task as the producer describes it: a single job is a task with one step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub id: TaskId,
    pub namespace: Namespace,
    pub name: String,
    pub payload: Json,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub run_at: Option<Timestamp>,
    #[serde(default)]
    pub tags: Vec<Tag>,
    #[serde(default)]
    pub idempotency_key: Option<IdempotencyKey>,
    pub steps: Vec<StepSpec>,
}

impl TaskSpec {
    /// Checks everything that can be checked without the ledger: names, limits,
    /// and that the steps form a DAG.
    pub fn validate(&self) -> Result<(), Rejection> {
        if self.name.is_empty() || self.name.len() > MAX_TASK_NAME_BYTES {
            return Err(Rejection::invalid(
                "name",
                format!("name must be 1 to {MAX_TASK_NAME_BYTES} bytes long, got {}", self.name.len()),
            ));
        }
        if self.tags.len() > MAX_TAGS_PER_TASK {
            return Err(Rejection::invalid(
                "tags",
                format!("a task may have at most {MAX_TAGS_PER_TASK} tags, got {}", self.tags.len()),
            ));
        }
        if self.steps.is_empty() {
            return Err(Rejection::new(RejectionCode::NoSteps, Some("steps"), "a task needs at least one step"));
        }
        validate_step_graph(&[], &self.steps)
    }

    /// [`TaskSpec::validate`], and the rules a create must meet that logs written before them
    /// may not (their events must still fold): tags are distinct (a repeated tag once wedged
    /// the tasks projector, whose tag table is keyed by tag and task), and so are each step's
    /// dependencies; the name has no control character, as tags and idempotency keys have none.
    pub fn validate_new(&self) -> Result<(), Rejection> {
        self.validate()?;
        if let Some(bad) = self.name.chars().find(|c| c.is_control()) {
            return Err(Rejection::invalid(
                "name",
                format!("name {:?} contains {bad:?}; allowed: any non-control character", self.name),
            ));
        }
        refuse_repeated_dependencies(&self.steps)?;
        if let Some((i, tag)) = self.tags.iter().enumerate().find(|(i, tag)| self.tags[..*i].contains(tag)) {
            return Err(Rejection::invalid(
                &format!("tags[{i}]"),
                format!("tag {:?} is given twice; a task's tags are distinct", tag.as_str()),
            ));
        }
        Ok(())
    }

    /// Bytes of payload this task carries (task payload and all step payloads).
    pub fn payload_bytes(&self) -> usize {
        self.payload.len() + self.steps.iter().map(|s| s.payload.len()).sum::<usize>()
    }
}

/// Refuses a step that names one dependency twice: the graph means the same either way, but
/// a spec that says one thing twice is a client's mistake it should hear of, as with tags.
/// Checked for new commands only (creates, add-steps), so logs written before still fold.
pub fn refuse_repeated_dependencies(steps: &[StepSpec]) -> Result<(), Rejection> {
    for (i, step) in steps.iter().enumerate() {
        if let Some((d, dep)) = step.depends_on.iter().enumerate().find(|(d, dep)| step.depends_on[..*d].contains(dep))
        {
            return Err(Rejection::invalid(
                &format!("steps[{i}].depends_on[{d}]"),
                format!("step {} names dependency {dep} twice; a step's dependencies are distinct", step.name),
            ));
        }
    }
    Ok(())
}

/// Validates `new_steps` appended after `existing` step names: each step's own
/// fields, unique names, known dependencies (new steps may depend on existing
/// steps and on each other) and no cycle. Existing steps cannot gain
/// dependencies, so a cycle can only run through new steps.
pub fn validate_step_graph(existing: &[&StepName], new_steps: &[StepSpec]) -> Result<(), Rejection> {
    let total = existing.len() + new_steps.len();
    if total > MAX_STEPS_PER_TASK {
        return Err(Rejection::new(
            RejectionCode::TooManySteps,
            Some("steps"),
            format!("a task may have at most {MAX_STEPS_PER_TASK} steps, this one would have {total}"),
        ));
    }
    // The common task: one new step, nothing to depend on or collide with.
    if let ([step], []) = (new_steps, existing)
        && step.depends_on.is_empty()
    {
        return step.validate_own_fields().map_err(|r| r.within("steps[0]"));
    }
    let mut index: crate::ledger::FastMap<&StepName, usize> =
        crate::ledger::FastMap::with_capacity_and_hasher(total, Default::default());
    for (i, name) in existing.iter().enumerate() {
        index.insert(name, i);
    }
    for (i, step) in new_steps.iter().enumerate() {
        let at = || format!("steps[{i}]");
        step.validate_own_fields().map_err(|r| r.within(&at()))?;
        if let Some(before) = index.insert(&step.name, existing.len() + i) {
            // A name the task already has (a retried attempt adding its steps again: its first
            // attempt's stay) is not "used twice" in the request (found by a black-box check).
            let message = if before < existing.len() {
                format!(
                    "the task already has a step named {} (steps added by an earlier attempt stay when it fails); \
                     give the new step another name, or depend on the one there",
                    step.name
                )
            } else {
                format!("step name {} is used twice", step.name)
            };
            return Err(Rejection::new(RejectionCode::DuplicateStep, Some(&format!("{}.name", at())), message));
        }
    }
    // Resolve dependencies to positions; a dependency on a later new step is
    // allowed (order in the list is not execution order), so resolve after all
    // names are known.
    let mut edges: Vec<Vec<usize>> = Vec::with_capacity(new_steps.len());
    for (i, step) in new_steps.iter().enumerate() {
        let mut deps = Vec::with_capacity(step.depends_on.len());
        for (d, dep) in step.depends_on.iter().enumerate() {
            match index.get(dep) {
                Some(&pos) => deps.push(pos),
                None => {
                    return Err(Rejection::new(
                        RejectionCode::UnknownDependency,
                        Some(&format!("steps[{i}].depends_on[{d}]")),
                        format!("step {} depends on {dep}, which is not a step of this task", step.name),
                    ));
                }
            }
        }
        edges.push(deps);
    }
    if let Some(i) = find_cycle(existing.len(), &edges) {
        return Err(Rejection::new(
            RejectionCode::DependencyCycle,
            Some(&format!("steps[{i}].depends_on")),
            format!("step {} is part of a dependency cycle", new_steps[i].name),
        ));
    }
    Ok(())
}

/// Returns the index (among new steps) of a step on a cycle, if any. Kahn's
/// algorithm over new steps only; positions below `offset` are existing steps,
/// which have no edges into new ones and so cannot be on a cycle.
fn find_cycle(offset: usize, edges: &[Vec<usize>]) -> Option<usize> {
    let n = edges.len();
    let mut pending_deps: Vec<usize> = edges.iter().map(|d| d.iter().filter(|&&p| p >= offset).count()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, deps) in edges.iter().enumerate() {
        for &p in deps.iter().filter(|&&p| p >= offset) {
            dependents[p - offset].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..n).filter(|&i| pending_deps[i] == 0).collect();
    let mut done = 0;
    while let Some(i) = ready.pop() {
        done += 1;
        for &j in &dependents[i] {
            pending_deps[j] -= 1;
            if pending_deps[j] == 0 {
                ready.push(j);
            }
        }
    }
    if done == n { None } else { (0..n).find(|&i| pending_deps[i] > 0) }
}

/// Deterministic retry delay for the attempt that just failed (`attempt` ≥ 1).
/// The jitter comes from a hash of (task, step, attempt), not from a random
/// source, so the same history always yields the same schedule.
pub fn retry_delay_ms(policy: &RetryPolicy, task: &TaskId, step: u16, attempt: u32) -> u64 {
    let mut delay = policy.base_ms as u128;
    let grows = policy.multiplier_permille > 1000 && delay > 0;
    for _ in (1..attempt).take_while(|_| grows) {
        delay = delay * u128::from(policy.multiplier_permille) / 1000;
        if delay >= u128::from(policy.cap_ms) {
            break;
        }
    }
    let delay = delay.min(u128::from(policy.cap_ms)) as u64;
    let max_jitter = delay * u64::from(policy.jitter_pct) / 100;
    if max_jitter == 0 {
        return delay;
    }
    let (hi, lo) = task.as_uuid().as_u64_pair();
    let seed = hi ^ lo.rotate_left(17) ^ (u64::from(step) << 48) ^ u64::from(attempt);
    delay - splitmix64(seed) % (max_jitter + 1)
}

/// SplitMix64: a small, well-mixed, dependency-free hash for jitter (and
/// the seeded generators of tests and benchmarks, `testkit::SplitMix`).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, deps: &[&str]) -> StepSpec {
        let mut s = StepSpec::new(StepName::new(name).unwrap(), HandlerName::new("h").unwrap(), Json::null());
        s.depends_on = deps.iter().map(|d| StepName::new(d).unwrap()).collect();
        s
    }

    #[test]
    fn cycles_are_found_including_self_loops() {
        assert!(validate_step_graph(&[], &[step("a", &[]), step("b", &["a"]), step("c", &["a", "b"])]).is_ok());
        let err = validate_step_graph(&[], &[step("a", &["c"]), step("b", &["a"]), step("c", &["b"])]).unwrap_err();
        assert_eq!(err.code, RejectionCode::DependencyCycle);
        let err = validate_step_graph(&[], &[step("a", &["a"])]).unwrap_err();
        assert_eq!(err.code, RejectionCode::DependencyCycle);
        assert_eq!(err.field.as_deref(), Some("steps[0].depends_on"));
    }

    /// Found by a black-box check: `depends_on: ["a", "a"]` was accepted and stored as sent.
    #[test]
    fn a_dependency_named_twice_is_refused_for_new_commands_only() {
        let steps = [step("a", &[]), step("b", &["a", "a"])];
        let err = refuse_repeated_dependencies(&steps).unwrap_err();
        assert_eq!((err.code, err.field.as_deref()), (RejectionCode::InvalidValue, Some("steps[1].depends_on[1]")));
        assert!(refuse_repeated_dependencies(&[step("a", &[]), step("b", &["a"])]).is_ok());
        // An older log's create with such a step still folds: the graph check alone accepts it.
        assert!(validate_step_graph(&[], &steps).is_ok());
    }

    #[test]
    fn new_steps_may_depend_on_existing_ones() {
        let a = StepName::new("a").unwrap();
        assert!(validate_step_graph(&[&a], &[step("b", &["a"])]).is_ok());
        let err = validate_step_graph(&[&a], &[step("a", &[])]).unwrap_err();
        assert_eq!(err.code, RejectionCode::DuplicateStep);
        assert_eq!(err.field.as_deref(), Some("steps[0].name"));
        assert!(err.message.contains("the task already has a step named a"), "{}", err.message);
        let err = validate_step_graph(&[&a], &[step("b", &[]), step("b", &[])]).unwrap_err();
        assert_eq!((err.code, err.message.as_str()), (RejectionCode::DuplicateStep, "step name b is used twice"));
    }

    #[test]
    fn retry_delays_grow_cap_and_jitter_within_bounds() {
        let task = TaskId::from_parts(1, 2);
        let policy = RetryPolicy { base_ms: 100, multiplier_permille: 2000, cap_ms: 1000, jitter_pct: 0 };
        let delays: Vec<u64> = (1..=6).map(|a| retry_delay_ms(&policy, &task, 0, a)).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        let jittery = RetryPolicy { jitter_pct: 50, ..policy };
        for attempt in 1..=6 {
            let d = retry_delay_ms(&jittery, &task, 0, attempt);
            assert!(d <= delays[attempt as usize - 1] && d >= delays[attempt as usize - 1] / 2);
            assert_eq!(d, retry_delay_ms(&jittery, &task, 0, attempt), "deterministic");
        }
        // Huge attempt counts do not overflow.
        assert_eq!(retry_delay_ms(&policy, &task, 0, u32::MAX), 1000);
    }
}
