//! `Ledger`: the whole in-memory world the writer decides commands against.
//! Live tasks with their steps, a ready queue per namespace and handler, the
//! timer index, the idempotency-key index and queue settings.
//!
//! It is a pure state machine: `decide` (in `decide.rs`) reads it and returns
//! events; `apply` (here) is the only thing that changes it. Replaying the
//! log through `apply` yields exactly the writer's state, which `digest`
//! proves. Tasks that reach a terminal state leave memory; their history stays
//! in the log.
//!
//! Claim order. Every enqueued step gets a ready key
//! `(enqueued_at − priority × AGING_US_PER_POINT, ordinal)` and the smallest key
//! is claimed first. This is "highest effective priority first" where the
//! effective priority of a waiting step is its priority plus one point per
//! `AGING_US_PER_POINT` spent waiting, so a low-priority step that has waited
//! long enough overtakes fresh high-priority work instead of starving. Because
//! the aging term grows at the same rate for every waiting step, the order
//! never changes while steps wait, and the key can be computed once, at
//! enqueue time: claims are O(log n). `ordinal` is a ledger-wide counter
//! that makes ties FIFO.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::event::{Event, FailOutcome};
use crate::spec::{RetryPolicy, StepSpec, TaskSpec};
use crate::state::{StepState, TaskState};
use crate::values::{
    Attempt, HandlerName, IdempotencyKey, Json, LeaseEpoch, Namespace, Priority, StepIndex, StepName, Tag, TaskId,
    Text, Timestamp, WorkerId,
};

/// One priority point of aging per this many microseconds of waiting (1 s).
pub const AGING_US_PER_POINT: i64 = 1_000_000;
/// How long an idempotency key keeps mapping to its task (24 h), measured in
/// event time, so replay prunes exactly as the writer did.
pub const IDEMPOTENCY_RETENTION_US: i64 = 24 * 60 * 60 * 1_000_000;

/// Whether a key recorded at `created` no longer names its task at `now`.
fn idempotency_expired(created: Timestamp, now: Timestamp) -> bool {
    now.as_micros().saturating_sub(created.as_micros()) >= IDEMPOTENCY_RETENTION_US
}

/// A step as the ledger tracks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: StepName,
    pub handler: HandlerName,
    pub payload: Json,
    /// Positions of the steps this one waits for.
    pub deps: Box<[StepIndex]>,
    pub max_attempts: u32,
    pub retry: RetryPolicy,
    pub lease_ms: u32,
    pub state: StepState,
    /// Claims that counted (a release gives its attempt back).
    pub attempts: u32,
    /// Epoch of the latest claim (0 = never claimed).
    pub epoch: LeaseEpoch,
    pub worker: Option<WorkerId>,
    pub lease_deadline: Option<Timestamp>,
    /// How long the live lease was granted for, by its claim or its latest heartbeat (0 when
    /// none): a heartbeat that names no duration extends the lease by this much, so a claim's
    /// longer `lease_ms` is not cut back to the step's default by the first heartbeat.
    pub lease_granted_ms: u32,
    pub retry_at: Option<Timestamp>,
    /// Ready key while `Enqueued`.
    pub ready: Option<ReadyKey>,
    pub last_error: Option<Text>,
    pub result: Option<Json>,
}

/// A live task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub namespace: Namespace,
    pub name: Box<str>,
    pub payload: Json,
    pub priority: Priority,
    pub run_at: Option<Timestamp>,
    pub tags: Vec<Tag>,
    pub idempotency_key: Option<IdempotencyKey>,
    pub created_at: Timestamp,
    pub state: TaskState,
    /// `run_at` has passed (or there was none): ready steps may be enqueued.
    pub run_at_reached: bool,
    /// Some step has been claimed at least once.
    pub started: bool,
    pub steps: Vec<Step>,
}

impl Task {
    pub fn step_index(&self, name: &StepName) -> Option<StepIndex> {
        self.steps.iter().position(|s| &s.name == name).map(|i| StepIndex(i as u16))
    }
    pub fn step(&self, index: StepIndex) -> Option<&Step> {
        self.steps.get(index.get())
    }
    fn deps_satisfied(&self, step: &Step) -> bool {
        step.deps.iter().all(|d| self.steps[d.get()].state.satisfies_dependents())
    }
}

/// Position in a ready queue: smaller is claimed first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReadyKey {
    /// `enqueued_at − priority × AGING_US_PER_POINT`.
    pub aged_at: i64,
    pub ordinal: u64,
}

/// An operator's settings for one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSettings {
    pub paused: bool,
    pub concurrency_limit: Option<u32>,
}

/// A namespace's claimable steps, per handler, plus how many run now.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReadyQueue {
    pub(crate) by_handler: FastMap<HandlerName, BTreeMap<ReadyKey, (TaskId, StepIndex)>>,
    pub(crate) in_progress: u32,
}

/// What a timer does when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerKind {
    LeaseExpiry,
    RetryDue,
    RunAt,
}

/// An entry of the timer index, ordered by due time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timer {
    pub due: Timestamp,
    pub kind: TimerKind,
    pub task: TaskId,
    pub step: StepIndex,
}

/// The log contradicts the state: an event that cannot follow what came
/// before it. `decide` never produces one; replaying a damaged or foreign log
/// might. `apply` checks before it changes anything, so the ledger is left
/// as it was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("inconsistent event {event}: {reason}")]
pub struct Inconsistency {
    pub event: &'static str,
    pub reason: String,
}

/// A hash map with foldhash, seeded at random per process, for the small keys hashed per
/// event here and in the writer and projections: SipHash was about a tenth of the
/// instructions of folding a log (every event looks up its task, namespace and handler).
/// Keys come from clients (task ids, names), hence the per-process random seed.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// A hash set with foldhash; see [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// The serializable core of a ledger, from which every index is rebuilt.
/// Snapshots store this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerState {
    pub tasks: Vec<Task>,
    pub queue_settings: Vec<(Namespace, QueueSettings)>,
    pub idempotency: Vec<(Namespace, IdempotencyKey, TaskId, Timestamp)>,
    pub next_ordinal: u64,
    pub last_event_at: Timestamp,
}

/// `LedgerState` by reference, for hashing: it serializes to exactly the same
/// postcard bytes (serde writes a `&T` as a `T`), field for field.
#[derive(Serialize)]
struct LedgerStateRef<'a> {
    tasks: Vec<&'a Task>,
    queue_settings: Vec<(&'a Namespace, &'a QueueSettings)>,
    idempotency: Vec<(&'a Namespace, &'a IdempotencyKey, TaskId, Timestamp)>,
    next_ordinal: u64,
    last_event_at: Timestamp,
}

/// Decodes a [`LedgerState`]'s bytes straight into a [`Ledger`] (see [`Ledger::decode_state`]):
/// the same fields in the same order, with the task sequence fed to the ledger one by one.
struct StateSeed;

impl<'de> serde::de::DeserializeSeed<'de> for StateSeed {
    type Value = Ledger;
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Ledger, D::Error> {
        const FIELDS: &[&str] = &["tasks", "queue_settings", "idempotency", "next_ordinal", "last_event_at"];
        deserializer.deserialize_struct("LedgerState", FIELDS, StateVisitor)
    }
}

struct StateVisitor;

impl<'de> serde::de::Visitor<'de> for StateVisitor {
    type Value = Ledger;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a ledger state")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Ledger, A::Error> {
        use serde::de::Error;
        let missing = |field: &str| A::Error::custom(format!("ledger state ends before {field}"));
        let mut ledger = Ledger::default();
        seq.next_element_seed(TasksSeed(&mut ledger))?.ok_or_else(|| missing("tasks"))?;
        let queue_settings = seq.next_element()?.ok_or_else(|| missing("queue_settings"))?;
        let idempotency = seq.next_element()?.ok_or_else(|| missing("idempotency"))?;
        let next_ordinal = seq.next_element()?.ok_or_else(|| missing("next_ordinal"))?;
        let last_event_at = seq.next_element()?.ok_or_else(|| missing("last_event_at"))?;
        ledger.restore_settings_and_counters(queue_settings, idempotency, next_ordinal, last_event_at);
        Ok(ledger)
    }
}

struct TasksSeed<'a>(&'a mut Ledger);

impl<'de> serde::de::DeserializeSeed<'de> for TasksSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TasksSeed<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a sequence of tasks")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // The length comes from the (checksummed) snapshot; bounded all the same.
        self.0.tasks.reserve(seq.size_hint().unwrap_or(0).min(1 << 24));
        while let Some(task) = seq.next_element::<Task>()? {
            self.0.restore_task(task);
        }
        Ok(())
    }
}

/// The whole in-memory write model.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Boxed: a growing map then moves 24-byte entries, not 176-byte tasks, and
    /// touches half as much fresh memory per task (its spare buckets stay small).
    pub(crate) tasks: FastMap<TaskId, Box<Task>>,
    pub(crate) settings: FastMap<Namespace, QueueSettings>,
    pub(crate) ready: FastMap<Namespace, ReadyQueue>,
    /// Every task in the map, by namespace, in id order: a queue's page of
    /// steps reads its namespace's tasks from a cursor on, not the whole map
    /// (the GraphQL `queue` read walked every live task on the writer thread).
    pub(crate) namespace_tasks: FastMap<Namespace, BTreeSet<TaskId>>,
    pub(crate) timers: BTreeSet<Timer>,
    pub(crate) idempotency: FastMap<(Namespace, IdempotencyKey), (TaskId, Timestamp)>,
    /// Idempotency entries in creation order, for pruning by age.
    pub(crate) idempotency_order: VecDeque<(Timestamp, Namespace, IdempotencyKey)>,
    pub(crate) next_ordinal: u64,
    pub(crate) last_event_at: Timestamp,
    /// Keep tasks in memory after they end (read-only views of history, such
    /// as one task's final state folded from its stream). Never set in the
    /// writer, whose memory must stay bounded by live work.
    pub(crate) retain_terminal_tasks: bool,
}

fn inconsistent(event: &Event, reason: impl Into<String>) -> Inconsistency {
    Inconsistency { event: event.type_name(), reason: reason.into() }
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// A ledger that keeps finished tasks, for read-only views of history
    /// (a task's final state folded from its own events). Commands must not
    /// be decided against it: finished tasks would look live to `decide`.
    pub fn retaining_terminal_tasks() -> Self {
        Self { retain_terminal_tasks: true, ..Self::default() }
    }

    /// This ledger, from now on keeping the tasks that finish (same caveat as
    /// [`Ledger::retaining_terminal_tasks`]): a view of history that starts
    /// from a snapshot and must still show what ended after it.
    pub fn into_retaining(mut self) -> Self {
        self.retain_terminal_tasks = true;
        self
    }

    // ----- reads -----

    pub fn task(&self, id: &TaskId) -> Option<&Task> {
        self.tasks.get(id).map(|task| &**task)
    }
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values().map(|task| &**task)
    }
    /// The tasks of `ns` in id order, from `from` (inclusive) on.
    pub fn tasks_in(&self, ns: &Namespace, from: Option<TaskId>) -> impl Iterator<Item = &Task> {
        let start = from.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Included);
        self.namespace_tasks
            .get(ns)
            .into_iter()
            .flat_map(move |ids| ids.range((start, std::ops::Bound::Unbounded)))
            .map(|id| &*self.tasks[id])
    }
    pub fn live_task_count(&self) -> usize {
        self.tasks.len()
    }
    pub fn queue_settings(&self, ns: &Namespace) -> QueueSettings {
        self.settings.get(ns).cloned().unwrap_or_default()
    }
    /// Steps currently leased in a namespace.
    pub fn in_progress(&self, ns: &Namespace) -> u32 {
        self.ready.get(ns).map_or(0, |q| q.in_progress)
    }
    /// Claimable steps in a namespace (all handlers).
    pub fn ready_count(&self, ns: &Namespace) -> usize {
        self.ready.get(ns).map_or(0, |q| q.by_handler.values().map(BTreeMap::len).sum())
    }
    /// The task `key` names in `ns` for a create decided at `at`: none once the key
    /// is [`IDEMPOTENCY_RETENTION_US`] old, whether or not a later create has pruned
    /// it from the index yet (pruning happens as creates are applied, so a key can
    /// outlive its retention in the index when no task is created for a while).
    pub fn idempotent_task(&self, ns: &Namespace, key: &IdempotencyKey, at: Timestamp) -> Option<TaskId> {
        self.idempotency
            .get(&(ns.clone(), key.clone()))
            .filter(|(_, created)| !idempotency_expired(*created, at))
            .map(|(id, _)| *id)
    }
    /// The task `key` names in `ns` in the index as it stands, expired or not:
    /// what an answer already given named (a repeat's, or a create's once applied).
    pub(crate) fn indexed_idempotent_task(&self, ns: &Namespace, key: &IdempotencyKey) -> Option<TaskId> {
        self.idempotency.get(&(ns.clone(), key.clone())).map(|(id, _)| *id)
    }
    /// The task each of a create command's `specs` names, in order, once its
    /// events are applied: the task it created (the next of `created`, the ids
    /// of the command's `TaskCreated` events in order), or the task its
    /// idempotency key already named — before the command, or by an earlier
    /// spec of the same batch. Also rebuilds the answer to a repeated command
    /// from its recorded events: the specs of a retry carry freshly minted
    /// ids, but their keys and their order are the original's.
    pub fn tasks_named_by(&self, specs: &[TaskSpec], created: impl IntoIterator<Item = TaskId>) -> Vec<TaskId> {
        let mut created = created.into_iter().peekable();
        specs
            .iter()
            .map(|spec| {
                let keyed =
                    spec.idempotency_key.as_ref().and_then(|key| self.indexed_idempotent_task(&spec.namespace, key));
                match keyed {
                    Some(task) => {
                        created.next_if_eq(&task);
                        task
                    }
                    None => created.next().unwrap_or(spec.id),
                }
            })
            .collect()
    }
    /// The time of the latest applied event.
    pub fn last_event_at(&self) -> Timestamp {
        self.last_event_at
    }
    /// When the earliest timer is due, so the writer knows how long to sleep.
    pub fn next_timer_due(&self) -> Option<Timestamp> {
        self.timers.first().map(|t| t.due)
    }
    /// Timers due at `now`, earliest first, at most `max`.
    pub fn due_timers(&self, now: Timestamp, max: usize) -> impl Iterator<Item = &Timer> {
        self.timers.iter().take_while(move |t| t.due <= now).take(max)
    }
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    // ----- apply -----

    /// Folds one event into the state. Checks first, then changes: on `Err`
    /// nothing was modified.
    pub fn apply(&mut self, event: &Event) -> Result<(), Inconsistency> {
        if event.at() < self.last_event_at {
            return Err(inconsistent(
                event,
                format!("time goes backwards: {} after {}", event.at(), self.last_event_at),
            ));
        }
        match event {
            Event::TaskCreated { spec, at } => self.apply_created(event, spec, *at)?,
            Event::StepClaimed { task, step, worker, epoch, attempt, lease_deadline, at } => {
                let s = self.step_for(event, task, *step)?;
                if s.state != StepState::Enqueued {
                    return Err(inconsistent(event, format!("step is {:?}, not enqueued", s.state)));
                }
                if *epoch != s.epoch.next() || attempt.0 != s.attempts + 1 || attempt.0 > s.max_attempts {
                    return Err(inconsistent(event, "epoch or attempt out of sequence"));
                }
                self.unready(task, *step);
                let t = self.tasks.get_mut(task).expect("checked");
                t.started = true;
                let s = &mut t.steps[step.get()];
                s.state = StepState::InProgress;
                s.epoch = *epoch;
                s.attempts = attempt.0;
                s.worker = Some(worker.clone());
                s.lease_deadline = Some(*lease_deadline);
                s.lease_granted_ms = granted_ms(*at, *lease_deadline);
                let ns = t.namespace.clone();
                self.ready.entry(ns).or_default().in_progress += 1;
                self.timers.insert(Timer {
                    due: *lease_deadline,
                    kind: TimerKind::LeaseExpiry,
                    task: *task,
                    step: *step,
                });
            }
            Event::LeaseExtended { task, step, epoch, lease_deadline, at } => {
                let old = self.live_lease(event, task, *step, *epoch)?;
                self.timers.remove(&Timer { due: old, kind: TimerKind::LeaseExpiry, task: *task, step: *step });
                self.timers.insert(Timer {
                    due: *lease_deadline,
                    kind: TimerKind::LeaseExpiry,
                    task: *task,
                    step: *step,
                });
                let s = self.step_mut(task, *step);
                s.lease_deadline = Some(*lease_deadline);
                s.lease_granted_ms = granted_ms(*at, *lease_deadline);
            }
            Event::StepCompleted { task, step, epoch, result, at } => {
                self.live_lease(event, task, *step, *epoch)?;
                self.end_lease(task, *step);
                let s = self.step_mut(task, *step);
                s.state = StepState::Complete;
                s.result = Some(result.clone());
                self.enqueue_unblocked(task, *at);
            }
            Event::StepFailed { task, step, epoch, error, outcome, .. } => {
                self.live_lease(event, task, *step, *epoch)?;
                self.check_outcome(event, task, *step, outcome)?;
                self.end_lease(task, *step);
                self.step_mut(task, *step).last_error = Some(error.clone());
                self.apply_fail_outcome(task, *step, outcome);
            }
            Event::LeaseExpired { task, step, epoch, outcome, .. } => {
                self.live_lease(event, task, *step, *epoch)?;
                self.check_outcome(event, task, *step, outcome)?;
                self.end_lease(task, *step);
                self.step_mut(task, *step).last_error = Some(Text::new("error", "lease expired").expect("short"));
                self.apply_fail_outcome(task, *step, outcome);
            }
            Event::StepReleased { task, step, epoch, at } => {
                self.live_lease(event, task, *step, *epoch)?;
                self.end_lease(task, *step);
                let s = self.step_mut(task, *step);
                s.attempts -= 1;
                self.enqueue(task, *step, *at);
            }
            Event::StepsAdded { task, by_step, epoch, steps, at } => {
                self.live_lease(event, task, *by_step, *epoch)?;
                let t = &self.tasks[task];
                let existing: Vec<&StepName> = t.steps.iter().map(|s| &s.name).collect();
                crate::spec::validate_step_graph(&existing, steps).map_err(|r| inconsistent(event, r.message))?;
                let t = self.tasks.get_mut(task).expect("checked");
                let new_steps = build_steps(&t.steps, steps);
                t.steps.extend(new_steps);
                self.enqueue_unblocked(task, *at);
            }
            Event::StepRetryDue { task, step, at } => {
                let s = self.step_for(event, task, *step)?;
                if s.state != StepState::WaitingForRetry {
                    return Err(inconsistent(event, format!("step is {:?}, not waiting for retry", s.state)));
                }
                let due = s.retry_at.expect("waiting steps have a retry time");
                self.timers.remove(&Timer { due, kind: TimerKind::RetryDue, task: *task, step: *step });
                self.step_mut(task, *step).retry_at = None;
                self.enqueue(task, *step, *at);
            }
            Event::RunAtReached { task, at } => {
                let t = self.task_for(event, task)?;
                if t.run_at_reached {
                    return Err(inconsistent(event, "run_at already reached"));
                }
                let due = t.run_at.expect("tasks waiting for run_at have one");
                self.timers.remove(&Timer { due, kind: TimerKind::RunAt, task: *task, step: StepIndex(0) });
                self.tasks.get_mut(task).expect("checked").run_at_reached = true;
                self.enqueue_unblocked(task, *at);
            }
            Event::StepRetried { task, step, reset_attempts, at } => {
                let s = self.step_for(event, task, *step)?;
                if s.state != StepState::Error {
                    return Err(inconsistent(event, format!("step is {:?}, not in error", s.state)));
                }
                if !reset_attempts && s.attempts >= s.max_attempts {
                    return Err(inconsistent(event, "attempts exhausted and not reset"));
                }
                let s = self.step_mut(task, *step);
                if *reset_attempts {
                    s.attempts = 0;
                }
                self.enqueue(task, *step, *at);
            }
            Event::StepResolved { task, step, note: _, result, at } => {
                let s = self.step_for(event, task, *step)?;
                if !matches!(
                    s.state,
                    StepState::Pending | StepState::Enqueued | StepState::WaitingForRetry | StepState::Error
                ) {
                    return Err(inconsistent(event, format!("step is {:?}, which cannot be resolved", s.state)));
                }
                self.leave_waiting_states(task, *step);
                let s = self.step_mut(task, *step);
                s.state = StepState::ResolvedManually;
                s.result = result.clone();
                self.enqueue_unblocked(task, *at);
            }
            Event::TaskCancelled { task, .. } => {
                self.task_for(event, task)?;
                self.close_open_steps(task);
            }
            Event::TaskGivenUp { task, .. } => {
                let t = self.task_for(event, task)?;
                if t.state != TaskState::BlockedByFailures {
                    return Err(inconsistent(event, format!("task is {:?}, not blocked", t.state)));
                }
                self.close_open_steps(task);
            }
            Event::QueuePaused { namespace, .. } => {
                self.settings.entry(namespace.clone()).or_default().paused = true;
            }
            Event::QueueResumed { namespace, .. } => {
                self.settings.entry(namespace.clone()).or_default().paused = false;
            }
            Event::QueueConcurrencySet { namespace, limit, .. } => {
                self.settings.entry(namespace.clone()).or_default().concurrency_limit = *limit;
            }
        }
        self.last_event_at = event.at();
        if let Some(task) = event.task() {
            self.settle_task_state(&task, event);
        }
        Ok(())
    }

    fn apply_created(&mut self, event: &Event, spec: &TaskSpec, at: Timestamp) -> Result<(), Inconsistency> {
        self.check_created(event, spec, at)?;
        let task = Task {
            id: spec.id,
            namespace: spec.namespace.clone(),
            name: spec.name.clone().into_boxed_str(),
            payload: spec.payload.clone(),
            priority: spec.priority,
            run_at: spec.run_at,
            tags: spec.tags.clone(),
            idempotency_key: spec.idempotency_key.clone(),
            created_at: at,
            state: TaskState::Pending,
            run_at_reached: spec.run_at.is_none_or(|t| t <= at),
            started: false,
            steps: build_steps(&[], &spec.steps),
        };
        self.insert_created(task, at);
        Ok(())
    }

    /// The checks of a `TaskCreated`, then the idempotency pruning its time
    /// causes (only once the checks have passed: on `Err` nothing changes).
    fn check_created(&mut self, event: &Event, spec: &TaskSpec, at: Timestamp) -> Result<(), Inconsistency> {
        if self.tasks.contains_key(&spec.id) {
            return Err(inconsistent(event, format!("task {} already exists", spec.id)));
        }
        spec.validate().map_err(|r| inconsistent(event, r.message))?;
        if let Some(key) = &spec.idempotency_key
            && self.idempotent_task(&spec.namespace, key, at).is_some()
        {
            return Err(inconsistent(event, "idempotency key already maps to a task"));
        }
        self.prune_idempotency(at);
        Ok(())
    }

    /// A checked `TaskCreated`'s task into the ledger and its indexes.
    fn insert_created(&mut self, task: Task, at: Timestamp) {
        if let Some(key) = &task.idempotency_key {
            self.idempotency.insert((task.namespace.clone(), key.clone()), (task.id, at));
            self.idempotency_order.push_back((at, task.namespace.clone(), key.clone()));
        }
        if let (false, Some(due)) = (task.run_at_reached, task.run_at) {
            self.timers.insert(Timer { due, kind: TimerKind::RunAt, task: task.id, step: StepIndex(0) });
        }
        let id = task.id;
        self.index_namespace_task(&task.namespace, id);
        self.tasks.insert(id, Box::new(task));
        self.enqueue_unblocked(&id, at);
    }

    /// [`Ledger::apply`] of an event the caller gives away: the same checks
    /// and exactly the same resulting state, but a created task takes the
    /// spec's strings and vectors instead of copies of them. Replaying a log
    /// of a million creations spent much of its time cloning specs into the
    /// ledger and freeing the decoded originals.
    pub fn apply_owned(&mut self, event: Event) -> Result<(), Inconsistency> {
        let Event::TaskCreated { spec, at } = &event else {
            return self.apply(&event);
        };
        let at = *at;
        if at < self.last_event_at {
            return Err(inconsistent(&event, format!("time goes backwards: {at} after {}", self.last_event_at)));
        }
        self.check_created(&event, spec, at)?;
        let Event::TaskCreated { spec, .. } = event else { unreachable!("matched above") };
        let TaskSpec { id, namespace, name, payload, priority, run_at, tags, idempotency_key, steps } = spec;
        let task = Task {
            id,
            namespace,
            name: name.into_boxed_str(),
            payload,
            priority,
            run_at,
            tags,
            idempotency_key,
            created_at: at,
            state: TaskState::Pending,
            run_at_reached: run_at.is_none_or(|t| t <= at),
            started: false,
            steps: build_owned_steps(steps),
        };
        self.insert_created(task, at);
        self.last_event_at = at;
        self.settle(&id, SettleCause::Other, Event::TYPES[0].0);
        Ok(())
    }

    /// Room for `additional` more live tasks without growing the task map
    /// (a replay that knows roughly how many tasks it will hold saves the
    /// rehashes of a map of a million tasks and the memory they touch).
    pub fn reserve_tasks(&mut self, additional: usize) {
        self.tasks.reserve(additional);
    }

    fn prune_idempotency(&mut self, now: Timestamp) {
        while let Some((at, _, _)) = self.idempotency_order.front() {
            if !idempotency_expired(*at, now) {
                break;
            }
            let (_, ns, key) = self.idempotency_order.pop_front().expect("front exists");
            self.idempotency.remove(&(ns, key));
        }
    }

    fn task_for(&self, event: &Event, task: &TaskId) -> Result<&Task, Inconsistency> {
        self.task(task).ok_or_else(|| inconsistent(event, format!("task {task} is not live")))
    }

    fn step_for(&self, event: &Event, task: &TaskId, step: StepIndex) -> Result<&Step, Inconsistency> {
        self.task_for(event, task)?
            .step(step)
            .ok_or_else(|| inconsistent(event, format!("task {task} has no step {}", step.0)))
    }

    /// Checks that `epoch` is the live lease of an in-progress step; returns
    /// its deadline.
    fn live_lease(
        &self,
        event: &Event,
        task: &TaskId,
        step: StepIndex,
        epoch: LeaseEpoch,
    ) -> Result<Timestamp, Inconsistency> {
        let s = self.step_for(event, task, step)?;
        if s.state != StepState::InProgress || s.epoch != epoch {
            return Err(inconsistent(
                event,
                format!("no live lease with epoch {epoch} (step is {:?}, epoch {})", s.state, s.epoch),
            ));
        }
        Ok(s.lease_deadline.expect("in-progress steps have a deadline"))
    }

    fn check_outcome(
        &self,
        event: &Event,
        task: &TaskId,
        step: StepIndex,
        outcome: &FailOutcome,
    ) -> Result<(), Inconsistency> {
        let s = &self.tasks[task].steps[step.get()];
        if matches!(outcome, FailOutcome::Retry { .. }) && s.attempts >= s.max_attempts {
            return Err(inconsistent(event, "retry scheduled with no attempts left"));
        }
        Ok(())
    }

    fn step_mut(&mut self, task: &TaskId, step: StepIndex) -> &mut Step {
        &mut self.tasks.get_mut(task).expect("checked by caller").steps[step.get()]
    }

    /// Takes an in-progress step out of its lease: timer, worker, counters.
    fn end_lease(&mut self, task: &TaskId, step: StepIndex) {
        let t = self.tasks.get_mut(task).expect("checked by caller");
        let s = &mut t.steps[step.get()];
        debug_assert_eq!(s.state, StepState::InProgress);
        let deadline = s.lease_deadline.take().expect("in-progress steps have a deadline");
        s.lease_granted_ms = 0;
        s.worker = None;
        self.timers.remove(&Timer { due: deadline, kind: TimerKind::LeaseExpiry, task: *task, step });
        if let Some(q) = self.ready.get_mut(&t.namespace) {
            q.in_progress -= 1;
        }
    }

    fn apply_fail_outcome(&mut self, task: &TaskId, step: StepIndex, outcome: &FailOutcome) {
        let s = self.step_mut(task, step);
        match outcome {
            FailOutcome::Retry { retry_at, .. } => {
                s.state = StepState::WaitingForRetry;
                s.retry_at = Some(*retry_at);
                self.timers.insert(Timer { due: *retry_at, kind: TimerKind::RetryDue, task: *task, step });
            }
            FailOutcome::DeadLetter => s.state = StepState::Error,
        }
    }

    /// Removes a step from the ready queue or the timer index, whichever holds
    /// it, before it moves to a final state.
    fn leave_waiting_states(&mut self, task: &TaskId, step: StepIndex) {
        let s = &self.tasks[task].steps[step.get()];
        match s.state {
            StepState::Enqueued => self.unready(task, step),
            StepState::WaitingForRetry => {
                let due = s.retry_at.expect("waiting steps have a retry time");
                self.timers.remove(&Timer { due, kind: TimerKind::RetryDue, task: *task, step });
                self.step_mut(task, step).retry_at = None;
            }
            StepState::InProgress => self.end_lease(task, step),
            _ => {}
        }
    }

    /// Cancels every step that is not final or in error (cancel and give-up).
    fn close_open_steps(&mut self, task: &TaskId) {
        let n = self.tasks[task].steps.len();
        for i in 0..n {
            let step = StepIndex(i as u16);
            let state = self.tasks[task].steps[i].state;
            if !state.is_terminal() {
                self.leave_waiting_states(task, step);
                self.step_mut(task, step).state = StepState::Cancelled;
            }
        }
    }

    /// Moves a step into its namespace's ready queue.
    fn enqueue(&mut self, task: &TaskId, step: StepIndex, at: Timestamp) {
        let ordinal = self.next_ordinal;
        self.next_ordinal += 1;
        let t = self.tasks.get_mut(task).expect("checked by caller");
        let key = ReadyKey {
            aged_at: at.as_micros().saturating_sub(i64::from(t.priority.get()) * AGING_US_PER_POINT),
            ordinal,
        };
        let s = &mut t.steps[step.get()];
        s.state = StepState::Enqueued;
        s.ready = Some(key);
        // Looked up before an entry is made: `entry` would clone both names every time.
        let queue = match self.ready.get_mut(&t.namespace) {
            Some(queue) => queue,
            None => self.ready.entry(t.namespace.clone()).or_default(),
        };
        let by_key = match queue.by_handler.get_mut(&s.handler) {
            Some(by_key) => by_key,
            None => queue.by_handler.entry(s.handler.clone()).or_default(),
        };
        by_key.insert(key, (*task, step));
    }

    fn unready(&mut self, task: &TaskId, step: StepIndex) {
        let t = self.tasks.get_mut(task).expect("checked by caller");
        let s = &mut t.steps[step.get()];
        let key = s.ready.take().expect("enqueued steps have a ready key");
        if let Some(q) = self.ready.get_mut(&t.namespace)
            && let Some(by_key) = q.by_handler.get_mut(&s.handler)
        {
            by_key.remove(&key);
            if by_key.is_empty() {
                q.by_handler.remove(&s.handler);
            }
        }
    }

    /// Enqueues every pending step whose dependencies are satisfied, once the
    /// task's `run_at` has passed. Steps are visited in declaration order so
    /// ordinals, and thus FIFO order, are deterministic.
    fn enqueue_unblocked(&mut self, task: &TaskId, at: Timestamp) {
        let t = &self.tasks[task];
        if !t.run_at_reached {
            return;
        }
        let ready = |(_, s): &(usize, &Step)| s.state == StepState::Pending && t.deps_satisfied(s);
        // The ready steps are found first, then enqueued; a task has at most
        // `MAX_STEPS_PER_TASK` steps, so a bit set on the stack holds them
        // (this runs for every creation and completion: no allocation).
        if t.steps.len() <= READY_BITS {
            let mut bits = [0u64; READY_BITS / 64];
            for (i, _) in t.steps.iter().enumerate().filter(ready) {
                bits[i / 64] |= 1 << (i % 64);
            }
            for (word, mut set) in bits.into_iter().enumerate() {
                while set != 0 {
                    let i = word * 64 + set.trailing_zeros() as usize;
                    set &= set - 1;
                    self.enqueue(task, StepIndex(i as u16), at);
                }
            }
            return;
        }
        let ready: Vec<StepIndex> =
            t.steps.iter().enumerate().filter(ready).map(|(i, _)| StepIndex(i as u16)).collect();
        for step in ready {
            self.enqueue(task, step, at);
        }
    }

    /// Recomputes the task's state after an event, checks the transition is
    /// allowed, and lets a terminal task leave memory.
    fn settle_task_state(&mut self, task: &TaskId, event: &Event) {
        let cause = match event {
            Event::TaskGivenUp { .. } => SettleCause::GivenUp,
            Event::TaskCancelled { .. } => SettleCause::Cancelled,
            _ => SettleCause::Other,
        };
        self.settle(task, cause, event.type_name());
    }

    /// `settle_task_state` after an event of type `event_type`.
    fn settle(&mut self, task: &TaskId, cause: SettleCause, event_type: &'static str) {
        let given_up = cause == SettleCause::GivenUp;
        let cancelled = cause == SettleCause::Cancelled;
        let Some(t) = self.tasks.get_mut(task) else { return };
        let next = TaskState::derive(t.steps.iter().map(|s| s.state), t.started, cancelled, given_up);
        if next != t.state {
            assert!(t.state.can_become(next), "task {task}: {:?} -> {next:?} after {event_type}", t.state);
            t.state = next;
        }
        if next.is_terminal() {
            if let (false, Some(due)) = (t.run_at_reached, t.run_at) {
                self.timers.remove(&Timer { due, kind: TimerKind::RunAt, task: *task, step: StepIndex(0) });
            }
            debug_assert!(
                t.steps.iter().all(|s| s.ready.is_none() && s.lease_deadline.is_none() && s.retry_at.is_none())
            );
            if !self.retain_terminal_tasks
                && let Some(removed) = self.tasks.remove(task)
                && let Some(ids) = self.namespace_tasks.get_mut(&removed.namespace)
            {
                ids.remove(task);
            }
        }
    }

    // ----- snapshots and digests -----

    /// The serializable core state, in canonical order.
    pub fn to_state(&self) -> LedgerState {
        let mut tasks: Vec<Task> = self.tasks().cloned().collect();
        tasks.sort_by_key(|t| t.id);
        let mut queue_settings: Vec<(Namespace, QueueSettings)> =
            self.settings.iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        queue_settings.sort_by(|a, b| a.0.cmp(&b.0));
        let idempotency = self
            .idempotency_order
            .iter()
            .map(|(at, ns, key)| (ns.clone(), key.clone(), self.idempotency[&(ns.clone(), key.clone())].0, *at))
            .collect();
        LedgerState {
            tasks,
            queue_settings,
            idempotency,
            next_ordinal: self.next_ordinal,
            last_event_at: self.last_event_at,
        }
    }

    /// Rebuilds a ledger, with all its indexes, from a core state.
    pub fn from_state(state: LedgerState) -> Self {
        let mut ledger = Ledger::default();
        ledger.restore_settings_and_counters(
            state.queue_settings,
            state.idempotency,
            state.next_ordinal,
            state.last_event_at,
        );
        // Sized once: growing a map of a million tasks rehashes (and moves every task) ~20 times.
        ledger.tasks.reserve(state.tasks.len());
        for task in state.tasks {
            ledger.restore_task(task);
        }
        ledger
    }

    /// `from_state(postcard::from_bytes(bytes))` without the intermediate `LedgerState`: each
    /// task goes into the ledger as it is decoded, so a snapshot of a million tasks never
    /// exists twice in memory (a `Vec<Task>` and the map) on the restart path.
    pub fn decode_state(bytes: &[u8]) -> Result<Ledger, postcard::Error> {
        let mut deserializer = postcard::Deserializer::from_bytes(bytes);
        let ledger = serde::de::DeserializeSeed::deserialize(StateSeed, &mut deserializer)?;
        if deserializer.finalize()?.is_empty() { Ok(ledger) } else { Err(postcard::Error::DeserializeBadEncoding) }
    }

    fn restore_settings_and_counters(
        &mut self,
        queue_settings: Vec<(Namespace, QueueSettings)>,
        idempotency: Vec<(Namespace, IdempotencyKey, TaskId, Timestamp)>,
        next_ordinal: u64,
        last_event_at: Timestamp,
    ) {
        self.next_ordinal = next_ordinal;
        self.last_event_at = last_event_at;
        self.settings = queue_settings.into_iter().collect();
        for (ns, key, task, at) in idempotency {
            self.idempotency.insert((ns.clone(), key.clone()), (task, at));
            self.idempotency_order.push_back((at, ns, key));
        }
    }

    /// Adds one task of a saved state with every index entry it implies.
    fn restore_task(&mut self, task: Task) {
        let queue = match self.ready.get_mut(&task.namespace) {
            Some(queue) => queue,
            None => self.ready.entry(task.namespace.clone()).or_default(),
        };
        for (i, s) in task.steps.iter().enumerate() {
            let step = StepIndex(i as u16);
            if let Some(key) = s.ready {
                let by_handler = match queue.by_handler.get_mut(&s.handler) {
                    Some(by_handler) => by_handler,
                    None => queue.by_handler.entry(s.handler.clone()).or_default(),
                };
                by_handler.insert(key, (task.id, step));
            }
            if let Some(due) = s.lease_deadline {
                queue.in_progress += 1;
                self.timers.insert(Timer { due, kind: TimerKind::LeaseExpiry, task: task.id, step });
            }
            if let Some(due) = s.retry_at {
                self.timers.insert(Timer { due, kind: TimerKind::RetryDue, task: task.id, step });
            }
        }
        if let (false, Some(due)) = (task.run_at_reached, task.run_at) {
            self.timers.insert(Timer { due, kind: TimerKind::RunAt, task: task.id, step: StepIndex(0) });
        }
        self.index_namespace_task(&task.namespace, task.id);
        self.tasks.insert(task.id, Box::new(task));
    }

    fn index_namespace_task(&mut self, ns: &Namespace, id: TaskId) {
        match self.namespace_tasks.get_mut(ns) {
            Some(ids) => ids.insert(id),
            None => self.namespace_tasks.entry(ns.clone()).or_default().insert(id),
        };
    }

    /// Whether the namespace index holds exactly the tasks of the map, each
    /// under its own namespace.
    fn check_namespace_index(&self) -> Result<(), String> {
        let indexed: usize = self.namespace_tasks.values().map(BTreeSet::len).sum();
        if indexed != self.tasks.len() {
            return Err(format!("namespace index holds {indexed} tasks, the ledger {}", self.tasks.len()));
        }
        for (ns, ids) in &self.namespace_tasks {
            if let Some(id) = ids.iter().find(|id| self.tasks.get(*id).is_none_or(|t| t.namespace != *ns)) {
                return Err(format!("namespace index lists task {id} under {ns}, where the ledger has no such task"));
            }
        }
        Ok(())
    }

    /// A canonical digest of the whole state: two ledgers with equal digests
    /// hold the same tasks, steps, queue settings, idempotency keys and
    /// counters. Indexes are derived from those, and `check_indexes` proves it.
    ///
    /// It hashes the postcard bytes of `to_state()`, but serializes a borrowed
    /// view of the state straight into the hasher: no task is cloned and no
    /// buffer the size of the state is built (restart from a snapshot of a
    /// million tasks checks this digest on the critical path).
    pub fn digest(&self) -> [u8; 32] {
        let mut tasks: Vec<&Task> = self.tasks().collect();
        tasks.sort_unstable_by_key(|t| t.id);
        let mut queue_settings: Vec<(&Namespace, &QueueSettings)> = self.settings.iter().collect();
        queue_settings.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let idempotency = self
            .idempotency_order
            .iter()
            .map(|(at, ns, key)| (ns, key, self.idempotency[&(ns.clone(), key.clone())].0, *at))
            .collect();
        let state = LedgerStateRef {
            tasks,
            queue_settings,
            idempotency,
            next_ordinal: self.next_ordinal,
            last_event_at: self.last_event_at,
        };
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"taskledger.ledger.v1");
        {
            let mut buffered = std::io::BufWriter::with_capacity(64 * 1024, &mut hasher);
            postcard::to_io(&state, &mut buffered).expect("in-memory state always serializes");
            std::io::Write::flush(&mut buffered).expect("hashing never fails");
        }
        *hasher.finalize().as_bytes()
    }

    /// Writes the canonical encoding of the state: exactly the postcard bytes of
    /// `to_state()`, which `digest` hashes and a snapshot body holds after its
    /// digest, without cloning a task. `verify` streams it into a comparison
    /// with a snapshot file instead of decoding the snapshot into a second ledger.
    pub fn write_state<W: std::io::Write>(&self, out: W) -> Result<W, postcard::Error> {
        self.write_state_with(&[], out)
    }

    /// [`Ledger::write_state`] of this ledger with `others` added: tasks
    /// given as their ids and encodings (as [`split_state`] returns them, in
    /// id order, none of them in this ledger), merged in id order. A ledger
    /// rebuilt from part of a snapshot and folded forward writes, this way,
    /// the state the whole ledger would have, without the rest being decoded.
    pub fn write_state_with<W: std::io::Write>(
        &self,
        others: &[(TaskId, &[u8])],
        out: W,
    ) -> Result<W, postcard::Error> {
        self.write_state_split(others, out, PARALLEL_STATE_TASKS_MIN)
    }

    /// [`Ledger::write_state_with`], on two threads from `parallel_min` tasks.
    fn write_state_split<W: std::io::Write>(
        &self,
        others: &[(TaskId, &[u8])],
        out: W,
        parallel_min: usize,
    ) -> Result<W, postcard::Error> {
        let own = self.tasks_by_id(parallel_min);
        let mut queue_settings: Vec<(&Namespace, &QueueSettings)> = self.settings.iter().collect();
        queue_settings.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let idempotency = self
            .idempotency_order
            .iter()
            .map(|(at, ns, key)| (ns, key, self.idempotency[&(ns.clone(), key.clone())].0, *at))
            .collect();
        // Every task in id order, ours and the already encoded others merged.
        let mut pieces = Vec::with_capacity(own.len() + others.len());
        let (mut own, mut others) = (own.into_iter().peekable(), others.iter().peekable());
        loop {
            let take_own = match (own.peek(), others.peek()) {
                (Some((a, _)), Some((b, _))) => a < b,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            pieces.push(if take_own {
                StatePiece::Task(own.next().expect("peeked").1)
            } else {
                StatePiece::Encoded(others.next().expect("peeked").1)
            });
        }
        // Postcard writes a struct as its fields one after another and a
        // sequence as its length then its items, so writing the pieces in
        // turn gives the bytes of `LedgerStateRef` exactly.
        let mut out = postcard::to_io(&pieces.len(), out)?;
        if pieces.len() < parallel_min {
            out = write_pieces(&pieces, out)?;
        } else {
            // The second half is encoded into memory on another thread while
            // this one writes the first half out, then follows it.
            let (first, second) = pieces.split_at(pieces.len() / 2);
            out = std::thread::scope(|scope| {
                let encode_second = || write_pieces(second, Vec::with_capacity(second.len() * 128));
                let other = std::thread::Builder::new().spawn_scoped(scope, encode_second);
                let mut out = write_pieces(first, out)?;
                let second = match other {
                    Ok(thread) => thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?,
                    Err(_) => encode_second()?,
                };
                out.write_all(&second).map_err(|_| postcard::Error::SerializeBufferFull)?;
                Ok::<W, postcard::Error>(out)
            })?;
        }
        let tail = StateTailRef {
            queue_settings,
            idempotency,
            next_ordinal: self.next_ordinal,
            last_event_at: self.last_event_at,
        };
        postcard::to_io(&tail, out)
    }

    /// The live tasks in id order, with their ids held beside the
    /// references: comparing through the references would fetch two tasks
    /// from memory per comparison. On two threads from `parallel_min` tasks.
    fn tasks_by_id(&self, parallel_min: usize) -> Vec<(TaskId, &Task)> {
        let own: Vec<(TaskId, &Task)> = self.tasks.iter().map(|(id, t)| (*id, &**t)).collect();
        sorted_on_two_threads(own, parallel_min, |(id, _)| *id)
    }

    /// [`Ledger::digest`] of the state [`Ledger::write_state_with`] writes.
    pub fn digest_with(&self, others: &[(TaskId, &[u8])]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"taskledger.ledger.v1");
        {
            let buffered = std::io::BufWriter::with_capacity(64 * 1024, &mut hasher);
            let mut buffered = self.write_state_with(others, buffered).expect("in-memory state always serializes");
            std::io::Write::flush(&mut buffered).expect("hashing never fails");
        }
        *hasher.finalize().as_bytes()
    }

    /// Every namespace's queue settings, by namespace.
    pub fn all_queue_settings(&self) -> Vec<(Namespace, QueueSettings)> {
        let mut all: Vec<(Namespace, QueueSettings)> =
            self.settings.iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Counts of the live tasks, per namespace and state, and of the timers.
    pub fn summary(&self) -> LedgerSummary {
        let mut summary = Summing::default();
        for task in self.tasks.values() {
            summary.add(
                task.namespace.as_str(),
                task.state,
                task.steps.iter().map(|s| (s.state, s.lease_deadline, s.retry_at)),
                task.run_at.filter(|_| !task.run_at_reached),
            );
        }
        summary.finish()
    }

    /// The verdict of [`Ledger::check_indexes`] without rebuilding a ledger:
    /// one walk over the tasks checks that every ready-queue entry, timer and
    /// lease count they imply is in the indexes, then that the indexes hold
    /// nothing more. For `verify` on a ledger of a million tasks, where
    /// cloning every task into a rebuilt ledger costs more than the fold.
    pub fn check_indexes_in_place(&self) -> Result<(), String> {
        // Entries are gathered into vectors and compared in order rather than
        // looked up one by one: a million lookups in a million-entry B-tree
        // miss the cache at every level, a sort and a linear walk do not.
        type Entry<'a> = (ReadyKey, TaskId, StepIndex, &'a Namespace, &'a HandlerName);
        let held = || {
            let mut held: Vec<Entry<'_>> = self
                .ready
                .iter()
                .flat_map(|(ns, q)| {
                    q.by_handler
                        .iter()
                        .flat_map(move |(h, by_key)| by_key.iter().map(move |(k, (t, s))| (*k, *t, *s, ns, h)))
                })
                .collect();
            held.sort_unstable_by_key(|e| (e.0, e.1, e.2));
            held
        };
        // The queues' side is gathered and sorted on a second thread while
        // this one walks the tasks and sorts their side (a million entries
        // each in `verify`); the result is the same either way, so a thread
        // that cannot start only costs time.
        let (expected, mut timers, leased, held) = std::thread::scope(|scope| {
            let other = std::thread::Builder::new().spawn_scoped(scope, held);
            // Most live tasks have a ready step: one entry each, grown into no copy.
            let mut expected: Vec<Entry<'_>> = Vec::with_capacity(self.tasks.len());
            let mut timers: Vec<Timer> = Vec::new();
            let mut leased: FastMap<&Namespace, u32> = FastMap::default();
            for task in self.tasks.values() {
                for (i, s) in task.steps.iter().enumerate() {
                    let step = StepIndex(i as u16);
                    if let Some(key) = s.ready {
                        expected.push((key, task.id, step, &task.namespace, &s.handler));
                    }
                    if let Some(due) = s.lease_deadline {
                        *leased.entry(&task.namespace).or_default() += 1;
                        timers.push(Timer { due, kind: TimerKind::LeaseExpiry, task: task.id, step });
                    }
                    if let Some(due) = s.retry_at {
                        timers.push(Timer { due, kind: TimerKind::RetryDue, task: task.id, step });
                    }
                }
                if let (false, Some(due)) = (task.run_at_reached, task.run_at) {
                    timers.push(Timer { due, kind: TimerKind::RunAt, task: task.id, step: StepIndex(0) });
                }
            }
            let expected = sorted_on_two_threads(expected, PARALLEL_STATE_TASKS_MIN, |e| (e.0, e.1, e.2));
            let held = other.ok().and_then(|thread| thread.join().ok()).unwrap_or_else(held);
            (expected, timers, leased, held)
        });
        if expected != held {
            let first = expected.iter().zip(&held).position(|(a, b)| a != b).unwrap_or(expected.len().min(held.len()));
            return Err(format!(
                "ready queues differ from tasks: {} entries, the tasks imply {}; first difference: {:?} vs {:?}",
                held.len(),
                expected.len(),
                held.get(first),
                expected.get(first)
            ));
        }
        timers.sort_unstable();
        if !timers.iter().eq(self.timers.iter()) {
            return Err(format!(
                "timer index differs from tasks: {} timers, the tasks imply {}",
                self.timers.len(),
                timers.len()
            ));
        }
        for (ns, q) in &self.ready {
            let expected = leased.get(ns).copied().unwrap_or(0);
            if q.in_progress != expected {
                return Err(format!(
                    "ready queues differ from tasks: {ns} counts {} leased steps, not {expected}",
                    q.in_progress
                ));
            }
        }
        if let Some((ns, n)) = leased.iter().find(|(ns, _)| !self.ready.contains_key(**ns)) {
            return Err(format!("ready queues differ from tasks: {ns} has {n} leased steps and no queue"));
        }
        self.check_namespace_index()
    }

    /// Checks that every index agrees with the tasks (for tests and `verify`).
    pub fn check_indexes(&self) -> Result<(), String> {
        let rebuilt = Ledger::from_state(self.to_state());
        let mut ours: Vec<_> = self
            .ready
            .iter()
            .filter(|(_, q)| q.in_progress > 0 || !q.by_handler.is_empty())
            .map(|(n, q)| (n.clone(), q.in_progress, flatten(q)))
            .collect();
        let mut theirs: Vec<_> = rebuilt
            .ready
            .iter()
            .filter(|(_, q)| q.in_progress > 0 || !q.by_handler.is_empty())
            .map(|(n, q)| (n.clone(), q.in_progress, flatten(q)))
            .collect();
        ours.sort();
        theirs.sort();
        if ours != theirs {
            return Err(format!("ready queues differ from tasks: {ours:?} vs {theirs:?}"));
        }
        if self.timers != rebuilt.timers {
            return Err("timer index differs from tasks".into());
        }
        self.check_namespace_index()
    }
}

/// `items` sorted by `key` (unstable): from `parallel_min` items, in two
/// halves on two threads, then merged. The state writer and the index check
/// sort a million entries each in `verify` of a million live tasks.
fn sorted_on_two_threads<T: Copy + Send, K: Ord>(
    mut items: Vec<T>,
    parallel_min: usize,
    key: impl Fn(&T) -> K + Sync,
) -> Vec<T> {
    if items.len() < parallel_min.max(2) {
        items.sort_unstable_by_key(&key);
        return items;
    }
    let mid = items.len() / 2;
    let (first, second) = items.split_at_mut(mid);
    let sorted_beside = std::thread::scope(|scope| {
        let other = std::thread::Builder::new().spawn_scoped(scope, || second.sort_unstable_by_key(&key));
        first.sort_unstable_by_key(&key);
        let joined = other.map(|thread| thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        joined.is_ok()
    });
    if !sorted_beside {
        items[mid..].sort_unstable_by_key(&key);
    }
    let (first, second) = items.split_at(mid);
    let mut merged = Vec::with_capacity(items.len());
    let (mut a, mut b) = (first.iter().peekable(), second.iter().peekable());
    while let (Some(x), Some(y)) = (a.peek(), b.peek()) {
        merged.push(if key(x) <= key(y) { *a.next().expect("peeked") } else { *b.next().expect("peeked") });
    }
    merged.extend(a.chain(b).copied());
    merged
}

/// Ledgers of at least this many tasks sort and encode their state on two
/// threads (`Ledger::write_state_with`); smaller ones take less time than
/// starting a thread.
const PARALLEL_STATE_TASKS_MIN: usize = 65_536;

/// One task of a state being written: a live task of the ledger, or one
/// given already encoded (`Ledger::write_state_with`'s `others`).
#[derive(Clone, Copy)]
enum StatePiece<'a> {
    Task(&'a Task),
    Encoded(&'a [u8]),
}

/// Writes `pieces` one after another, as the items of the state's task sequence.
fn write_pieces<W: std::io::Write>(pieces: &[StatePiece<'_>], mut out: W) -> Result<W, postcard::Error> {
    for piece in pieces {
        out = match piece {
            StatePiece::Task(task) => postcard::to_io(task, out)?,
            StatePiece::Encoded(bytes) => {
                out.write_all(bytes).map_err(|_| postcard::Error::SerializeBufferFull)?;
                out
            }
        };
    }
    Ok(out)
}

/// The fields of `LedgerState` after `tasks`, by reference, for writing.
#[derive(Serialize)]
struct StateTailRef<'a> {
    queue_settings: Vec<(&'a Namespace, &'a QueueSettings)>,
    idempotency: Vec<(&'a Namespace, &'a IdempotencyKey, TaskId, Timestamp)>,
    next_ordinal: u64,
    last_event_at: Timestamp,
}

/// The fields of `LedgerState` after `tasks`, for reading.
#[derive(Deserialize)]
struct StateTail {
    queue_settings: Vec<(Namespace, QueueSettings)>,
    idempotency: Vec<(Namespace, IdempotencyKey, TaskId, Timestamp)>,
    next_ordinal: u64,
    last_event_at: Timestamp,
}

/// Counts for one namespace, indexed like `TaskState::ALL` and `StepState::ALL`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceCounts {
    pub tasks: [u64; TaskState::ALL.len()],
    pub steps: [u64; StepState::ALL.len()],
}

impl NamespaceCounts {
    pub fn tasks_in(&self, state: TaskState) -> u64 {
        self.tasks[task_slot(state)]
    }
    pub fn steps_in(&self, state: StepState) -> u64 {
        self.steps[step_slot(state)]
    }
}

/// What a whole-ledger report needs, without the tasks: live tasks and their
/// steps counted per namespace and state, and the timers. Claimable steps are
/// the `Enqueued` ones and leased steps the `InProgress` ones, exactly what the
/// ready queues and lease counters index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerSummary {
    pub live_tasks: u64,
    pub by_namespace: BTreeMap<String, NamespaceCounts>,
    pub timers: u64,
    pub next_timer_due: Option<Timestamp>,
}

impl LedgerSummary {
    /// Adds the counts of `other` (disjoint tasks) to these.
    pub fn merge(&mut self, other: &LedgerSummary) {
        self.live_tasks += other.live_tasks;
        for (ns, counts) in &other.by_namespace {
            let mine = self.by_namespace.entry(ns.clone()).or_default();
            mine.tasks.iter_mut().zip(counts.tasks).for_each(|(a, b)| *a += b);
            mine.steps.iter_mut().zip(counts.steps).for_each(|(a, b)| *a += b);
        }
        self.timers += other.timers;
        self.next_timer_due = match (self.next_timer_due, other.next_timer_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

fn task_slot(state: TaskState) -> usize {
    TaskState::ALL.iter().position(|s| *s == state).expect("ALL lists every state")
}

fn step_slot(state: StepState) -> usize {
    StepState::ALL.iter().position(|s| *s == state).expect("ALL lists every state")
}

/// Builds a summary; namespaces are few, so a short list searched from the
/// most recently used beats hashing every task's namespace.
#[derive(Default)]
struct Summing<'a> {
    namespaces: Vec<(&'a str, NamespaceCounts)>,
    live_tasks: u64,
    timers: u64,
    next_timer_due: Option<Timestamp>,
}

impl<'a> Summing<'a> {
    fn add(
        &mut self,
        namespace: &'a str,
        state: TaskState,
        steps: impl Iterator<Item = (StepState, Option<Timestamp>, Option<Timestamp>)>,
        run_at_timer: Option<Timestamp>,
    ) {
        let at = match self.namespaces.iter().rposition(|(ns, _)| *ns == namespace) {
            Some(at) => at,
            None => {
                self.namespaces.push((namespace, NamespaceCounts::default()));
                self.namespaces.len() - 1
            }
        };
        let counts = &mut self.namespaces[at].1;
        counts.tasks[task_slot(state)] += 1;
        self.live_tasks += 1;
        let mut due = |t: Option<Timestamp>| {
            if let Some(t) = t {
                self.timers += 1;
                self.next_timer_due = Some(self.next_timer_due.map_or(t, |n| n.min(t)));
            }
        };
        for (step, lease_deadline, retry_at) in steps {
            counts.steps[step_slot(step)] += 1;
            due(lease_deadline);
            due(retry_at);
        }
        due(run_at_timer);
    }

    /// `add` of a task whose steps were counted as they were read.
    fn add_seen(&mut self, namespace: &'a str, state: TaskState, steps: &StepsSeen, run_at_timer: Option<Timestamp>) {
        self.add(namespace, state, std::iter::empty(), run_at_timer);
        let at = self.namespaces.iter().rposition(|(ns, _)| *ns == namespace).expect("just added");
        let counts = &mut self.namespaces[at].1;
        for (sum, n) in counts.steps.iter_mut().zip(steps.by_state) {
            *sum += n;
        }
        self.timers += steps.timers;
        if let Some(due) = steps.next_due {
            self.next_timer_due = Some(self.next_timer_due.map_or(due, |n| n.min(due)));
        }
    }

    fn finish(self) -> LedgerSummary {
        LedgerSummary {
            live_tasks: self.live_tasks,
            by_namespace: self.namespaces.into_iter().map(|(ns, counts)| (ns.to_owned(), counts)).collect(),
            timers: self.timers,
            next_timer_due: self.next_timer_due,
        }
    }
}

/// A task read in place from a state encoding: the fields a summary needs,
/// the namespace borrowed, the rest read past (`Skip`) and its steps counted
/// as they are read (`StepsSeen`), so nothing is allocated or copied per task.
/// Field for field `Task` (postcard is not self-describing); the tests below
/// keep them in step.
#[derive(Deserialize)]
struct TaskView<'a> {
    id: TaskId,
    #[serde(borrow)]
    namespace: &'a str,
    _name: Skip,
    _payload: Skip,
    _priority: Priority,
    run_at: Option<Timestamp>,
    _tags: SkipSeq<Skip>,
    _idempotency_key: Option<Skip>,
    _created_at: Timestamp,
    state: TaskState,
    run_at_reached: bool,
    _started: bool,
    steps: StepsSeen,
}

/// `Step`, read in place (see `TaskView`).
#[derive(Deserialize)]
struct StepView {
    _name: Skip,
    _handler: Skip,
    _payload: Skip,
    _deps: SkipSeq<StepIndex>,
    _max_attempts: u32,
    _retry: RetryPolicy,
    _lease_ms: u32,
    state: StepState,
    _attempts: u32,
    _epoch: LeaseEpoch,
    _worker: Option<Skip>,
    lease_deadline: Option<Timestamp>,
    _lease_granted_ms: u32,
    retry_at: Option<Timestamp>,
    _ready: Option<ReadyKey>,
    _last_error: Option<Skip>,
    _result: Option<Skip>,
}

/// A string read past: postcard writes a string as its length and its bytes,
/// which are taken as bytes (no UTF-8 check: the summary never reads them,
/// and the state digest covers them).
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = Skip;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Skip, E> {
                Ok(Skip)
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Skip, E> {
                Ok(Skip)
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

/// A sequence read past, element by element, without collecting it.
struct SkipSeq<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for SkipSeq<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Items<T> {
            type Value = SkipSeq<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<SkipSeq<T>, A::Error> {
                while seq.next_element::<T>()?.is_some() {}
                Ok(SkipSeq(std::marker::PhantomData))
            }
        }
        deserializer.deserialize_seq(Items(std::marker::PhantomData))
    }
}

/// A task's steps as a summary counts them: how many are in each state, and
/// their timers (lease deadlines and retry times).
#[derive(Default)]
struct StepsSeen {
    by_state: [u64; StepState::ALL.len()],
    timers: u64,
    next_due: Option<Timestamp>,
}

impl<'de> Deserialize<'de> for StepsSeen {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Steps;
        impl<'de> serde::de::Visitor<'de> for Steps {
            type Value = StepsSeen;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence of steps")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<StepsSeen, A::Error> {
                let mut seen = StepsSeen::default();
                while let Some(step) = seq.next_element::<StepView>()? {
                    seen.by_state[step_slot(step.state)] += 1;
                    for due in [step.lease_deadline, step.retry_at].into_iter().flatten() {
                        seen.timers += 1;
                        seen.next_due = Some(seen.next_due.map_or(due, |n| n.min(due)));
                    }
                }
                Ok(seen)
            }
        }
        deserializer.deserialize_seq(Steps)
    }
}

/// A state encoding (`Ledger::write_state`, a snapshot body after its
/// digest) split without building most of it: the tasks `keep` picks are
/// decoded into a partial `LedgerState` with every non-task field, and the
/// others are only counted and kept as their encodings.
///
/// Rebuilding a ledger from `kept` and folding events that touch only kept
/// tasks forward gives, for those tasks and every non-task field, exactly
/// what the whole ledger would hold; `others` are unchanged by such events.
/// So `summary()` merged with `others_summary`, and `digest_with(&others)`,
/// describe the whole ledger after those events.
pub struct SplitState<'a> {
    pub kept: LedgerState,
    /// Every other task: its id and its encoding, in id order.
    pub others: Vec<(TaskId, &'a [u8])>,
    pub others_summary: LedgerSummary,
}

/// Splits the state encoding `bytes` (see [`SplitState`]).
pub fn split_state(bytes: &[u8], keep: impl Fn(&TaskId) -> bool) -> Result<SplitState<'_>, postcard::Error> {
    let (count, mut rest): (usize, &[u8]) = postcard::take_from_bytes(bytes)?;
    let mut kept = Vec::new();
    // Every task takes more than one byte: a damaged count cannot make this allocate much.
    let mut others = Vec::with_capacity(count.min(rest.len()));
    let mut summing = Summing::default();
    for _ in 0..count {
        let (view, after): (TaskView<'_>, &[u8]) = postcard::take_from_bytes(rest)?;
        let encoded = &rest[..rest.len() - after.len()];
        if keep(&view.id) {
            kept.push(postcard::from_bytes::<Task>(encoded)?);
        } else {
            summing.add_seen(view.namespace, view.state, &view.steps, view.run_at.filter(|_| !view.run_at_reached));
            others.push((view.id, encoded));
        }
        rest = after;
    }
    let (tail, trailing): (StateTail, &[u8]) = postcard::take_from_bytes(rest)?;
    if !trailing.is_empty() {
        return Err(postcard::Error::DeserializeBadEncoding);
    }
    let kept = LedgerState {
        tasks: kept,
        queue_settings: tail.queue_settings,
        idempotency: tail.idempotency,
        next_ordinal: tail.next_ordinal,
        last_event_at: tail.last_event_at,
    };
    Ok(SplitState { kept, others, others_summary: summing.finish() })
}

fn flatten(q: &ReadyQueue) -> Vec<(HandlerName, ReadyKey, TaskId, StepIndex)> {
    let mut v: Vec<_> =
        q.by_handler.iter().flat_map(|(h, m)| m.iter().map(move |(k, (t, s))| (h.clone(), *k, *t, *s))).collect();
    v.sort();
    v
}

/// Steps `enqueue_unblocked` tracks in a bit set on the stack (every task,
/// as validated, has at most this many).
const READY_BITS: usize = crate::spec::MAX_STEPS_PER_TASK.next_multiple_of(64);

/// Which event a task's state is settled after: the two that end a task by
/// fiat, or any other.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SettleCause {
    GivenUp,
    Cancelled,
    Other,
}

/// `build_steps(&[], &specs)`, moving each spec's name, handler and payload
/// into its step instead of cloning them.
fn build_owned_steps(specs: Vec<StepSpec>) -> Vec<Step> {
    // Without dependencies (most tasks) no positions need resolving.
    let deps: Vec<Box<[StepIndex]>> = if specs.iter().all(|spec| spec.depends_on.is_empty()) {
        Vec::new()
    } else {
        specs
            .iter()
            .map(|spec| {
                spec.depends_on
                    .iter()
                    .map(|name| {
                        let at = specs.iter().position(|s| &s.name == name).expect("validated dependency");
                        StepIndex(at as u16)
                    })
                    .collect()
            })
            .collect()
    };
    let mut deps = deps.into_iter();
    specs
        .into_iter()
        .map(|spec| (spec, deps.next().unwrap_or_default()))
        .map(|(spec, deps)| pending_step(spec, deps))
        .collect()
}

/// The duration of a lease granted at `at` until `deadline`, in ms (`Step::lease_granted_ms`).
pub(crate) fn granted_ms(at: Timestamp, deadline: Timestamp) -> u32 {
    u32::try_from(deadline.micros_since(at) / 1000).unwrap_or(u32::MAX)
}

/// A step that has not run yet, taking its spec's name, handler and payload (its dependency
/// names are already resolved into `deps`).
fn pending_step(spec: StepSpec, deps: Box<[StepIndex]>) -> Step {
    Step {
        name: spec.name,
        handler: spec.handler,
        payload: spec.payload,
        deps,
        max_attempts: spec.max_attempts,
        retry: spec.retry,
        lease_ms: spec.lease_ms,
        state: StepState::Pending,
        attempts: 0,
        epoch: LeaseEpoch(0),
        worker: None,
        lease_deadline: None,
        lease_granted_ms: 0,
        retry_at: None,
        ready: None,
        last_error: None,
        result: None,
    }
}

/// Turns specs into pending steps, resolving dependency names against the
/// existing steps and the new ones.
fn build_steps(existing: &[Step], specs: &[StepSpec]) -> Vec<Step> {
    let position = |name: &StepName| -> StepIndex {
        existing
            .iter()
            .map(|s| &s.name)
            .chain(specs.iter().map(|s| &s.name))
            .position(|n| n == name)
            .map(|i| StepIndex(i as u16))
            .expect("validated dependency")
    };
    specs
        .iter()
        .map(|spec| {
            let deps = spec.depends_on.iter().map(position).collect();
            let parts = StepSpec {
                name: spec.name.clone(),
                handler: spec.handler.clone(),
                payload: spec.payload.clone(),
                depends_on: Vec::new(),
                ..*spec
            };
            pending_step(parts, deps)
        })
        .collect()
}

/// What a worker receives for a claimed step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimedStep {
    pub task: TaskId,
    pub namespace: Namespace,
    pub step: StepName,
    pub handler: HandlerName,
    pub payload: Json,
    pub task_payload: Json,
    pub epoch: LeaseEpoch,
    pub attempt: Attempt,
    pub lease_deadline: Timestamp,
}

impl Ledger {
    /// The work a `StepClaimed` event handed out, read after the event was
    /// applied (the step is then in progress with that epoch).
    pub fn claimed_step(&self, event: &Event) -> Option<ClaimedStep> {
        let Event::StepClaimed { task, step, epoch, attempt, lease_deadline, .. } = event else { return None };
        let t = self.tasks.get(task)?;
        let s = t.step(*step)?;
        Some(ClaimedStep {
            task: *task,
            namespace: t.namespace.clone(),
            step: s.name.clone(),
            handler: s.handler.clone(),
            payload: s.payload.clone(),
            task_payload: t.payload.clone(),
            epoch: *epoch,
            attempt: *attempt,
            lease_deadline: *lease_deadline,
        })
    }
}

#[cfg(test)]
mod digest_tests {
    use crate::testkit::{Scenario, claim, job, ns};
    use crate::{Command, Event, IDEMPOTENCY_RETENTION_US, IdempotencyKey, TaskId, TaskSpec};

    /// `write_state` writes exactly the postcard bytes of `to_state()`.
    #[test]
    fn write_state_writes_the_bytes_of_to_state() {
        let mut scenario = Scenario::new();
        for n in 0..20 {
            let mut spec = job(n, if n % 2 == 0 { "a" } else { "b" });
            if n % 4 == 0 {
                spec.idempotency_key = Some(IdempotencyKey::new(format!("key-{n}")).unwrap());
            }
            scenario.ok(Command::CreateTask(spec));
        }
        scenario.ok(claim("a", "w", 3));
        let ledger = &scenario.ledger;
        let written = ledger.write_state(Vec::new()).unwrap();
        assert_eq!(written, postcard::to_stdvec(&ledger.to_state()).unwrap());
    }

    /// Each spec of a create names the task it created or the one its key
    /// named (before the batch, or earlier in it), for the first answer and,
    /// from the recorded events, for a retry whose specs carry new ids.
    #[test]
    fn a_create_names_a_task_for_each_of_its_specs() {
        let mut scenario = Scenario::new();
        let keyed = |n: u64, key: &str| {
            let mut spec = job(n, "a");
            spec.idempotency_key = Some(IdempotencyKey::new(key).unwrap());
            spec
        };
        let before = keyed(1, "k1");
        scenario.ok(Command::CreateTask(before.clone()));
        let specs = vec![keyed(2, "k1"), keyed(3, "dup"), job(4, "a"), keyed(5, "dup"), keyed(6, "k6")];
        let events = scenario.ok(Command::CreateTasks(specs.clone()));
        let created: Vec<TaskId> = events.iter().filter_map(Event::created_task).collect();
        assert_eq!(created, vec![specs[1].id, specs[2].id, specs[4].id]);
        let expected = vec![before.id, specs[1].id, specs[2].id, specs[1].id, specs[4].id];
        assert_eq!(scenario.ledger.tasks_named_by(&specs, created.iter().copied()), expected);
        // A retry: the same keys and order, fresh ids.
        let retry: Vec<TaskSpec> =
            specs.iter().zip(10..).map(|(spec, n)| TaskSpec { id: job(n, "a").id, ..spec.clone() }).collect();
        assert_eq!(scenario.ledger.tasks_named_by(&retry, created.iter().copied()), expected);
    }

    /// A key past its retention names nothing, even while no create has pruned
    /// it from the index yet: a create with it makes a new task, alone or after
    /// another spec of its batch (whose apply prunes the old entry first), and the
    /// answer names the tasks that exist. A repeat of the original is still
    /// answered from the index as it stands.
    #[test]
    fn an_expired_key_names_nothing_before_any_create_prunes_it() {
        let keyed = |n: u64| {
            let mut spec = job(n, "a");
            spec.idempotency_key = Some(IdempotencyKey::new("k").unwrap());
            spec
        };
        let key = IdempotencyKey::new("k").unwrap();
        let retention_ms = (IDEMPOTENCY_RETENTION_US / 1000) as u64;
        for lead in [None, Some(job(2, "a"))] {
            let mut scenario = Scenario::new();
            let original = keyed(1);
            scenario.ok(Command::CreateTask(original.clone()));
            scenario.advance_ms(retention_ms - 1);
            assert_eq!(scenario.ledger.idempotent_task(&ns("a"), &key, scenario.now), Some(original.id));
            scenario.advance_ms(1);
            assert_eq!(scenario.ledger.idempotent_task(&ns("a"), &key, scenario.now), None, "expired at 24 h");
            assert!(scenario.ledger.repeats(&Command::CreateTask(keyed(9)), &[]), "a repeat still names it");

            let specs: Vec<TaskSpec> = lead.iter().cloned().chain([keyed(3)]).collect();
            let events = scenario.ok(Command::CreateTasks(specs.clone()));
            let created: Vec<TaskId> = events.iter().filter_map(Event::created_task).collect();
            assert_eq!(created, specs.iter().map(|s| s.id).collect::<Vec<_>>(), "every spec created its task");
            let named = scenario.ledger.tasks_named_by(&specs, created.iter().copied());
            assert_eq!(named, created);
            assert!(named.iter().all(|id| scenario.ledger.task(id).is_some()), "the answer names live tasks");
            assert_eq!(scenario.ledger.idempotent_task(&ns("a"), &key, scenario.now), Some(job(3, "a").id));
        }
    }

    /// Sorting in two halves and merging gives the plain sort's order, ties
    /// and odd lengths included.
    #[test]
    fn sorting_on_two_threads_sorts() {
        for len in [0usize, 1, 2, 3, 10, 101] {
            let items: Vec<(u32, u32)> = (0..len as u32).map(|i| ((i * 7919) % 13, i)).collect();
            let mut expected = items.clone();
            expected.sort_unstable_by_key(|(k, _)| *k);
            for parallel_min in [0, 1, 2, len, len + 1] {
                let sorted = super::sorted_on_two_threads(items.clone(), parallel_min, |(k, _)| *k);
                let keys = |v: &[(u32, u32)]| v.iter().map(|(k, _)| *k).collect::<Vec<_>>();
                assert_eq!(keys(&sorted), keys(&expected), "{len} items from {parallel_min}");
                let mut all = sorted.clone();
                all.sort_unstable();
                let mut original = items.clone();
                original.sort_unstable();
                assert_eq!(all, original, "the same items");
            }
        }
    }

    /// The two-thread path (halves sorted and merged, the second half encoded
    /// aside) writes the same bytes as one thread, with and without tasks
    /// given already encoded, at every threshold down to a single task.
    #[test]
    fn the_state_written_on_two_threads_is_the_same() {
        let mut scenario = Scenario::new();
        for n in 0..41 {
            scenario.ok(Command::CreateTask(job(n, if n % 3 == 0 { "a" } else { "b" })));
        }
        scenario.ok(claim("a", "w", 5));
        let ledger = &scenario.ledger;
        let whole = postcard::to_stdvec(&ledger.to_state()).unwrap();
        let ids: Vec<_> = ledger.to_state().tasks.iter().map(|t| t.id).collect();
        let split = super::split_state(&whole, |id| ids.iter().position(|i| i == id).unwrap() % 4 != 1).unwrap();
        let partial = crate::Ledger::from_state(split.kept.clone());
        for parallel_min in [0, 1, 2, 3, 17, 40, 41, 42, usize::MAX] {
            assert_eq!(ledger.write_state_split(&[], Vec::new(), parallel_min).unwrap(), whole, "from {parallel_min}");
            assert_eq!(
                partial.write_state_split(&split.others, Vec::new(), parallel_min).unwrap(),
                whole,
                "with others, from {parallel_min}"
            );
            let by_id: Vec<_> = ledger.tasks_by_id(parallel_min).iter().map(|(id, _)| *id).collect();
            assert_eq!(by_id, ids, "ids in order, from {parallel_min}");
        }
    }

    /// A ledger with every kind of step and task fact the views must read
    /// past: tags, idempotency keys, a future run_at, leases, a retry, an
    /// error, a result, a dependency.
    fn varied_ledger() -> crate::Ledger {
        varied_scenario().ledger
    }

    /// The scenario `varied_ledger` comes from (its `log` holds every event).
    fn varied_scenario() -> Scenario {
        use crate::testkit::{complete, fail, step, workflow};
        let mut scenario = Scenario::new();
        for n in 0..40 {
            let mut spec = job(n, ["a", "b", "c"][n as usize % 3]);
            if n % 4 == 0 {
                spec.idempotency_key = Some(IdempotencyKey::new(format!("key-{n}")).unwrap());
            }
            if n % 5 == 0 {
                spec.tags = vec![crate::Tag::new(format!("tag-{n}")).unwrap()];
            }
            if n % 7 == 0 {
                spec.run_at = Some(crate::Timestamp::from_micros(i64::MAX / 2));
            }
            scenario.ok(Command::CreateTask(spec));
        }
        scenario.ok(Command::CreateTask(workflow(100, "c", vec![step("one", "h", &[]), step("two", "h", &["one"])])));
        for _ in 0..3 {
            scenario.ok(claim("a", "w", 1));
        }
        let claimed: Vec<(crate::TaskId, u32)> = scenario
            .ok(claim("b", "w", 3))
            .iter()
            .filter_map(|e| match e {
                crate::Event::StepClaimed { task, epoch, .. } => Some((*task, epoch.0)),
                _ => None,
            })
            .collect();
        assert_eq!(claimed.len(), 3);
        scenario.ok(complete(claimed[0].0, "run", claimed[0].1));
        scenario.ok(fail(claimed[1].0, "run", claimed[1].1, true));
        scenario.ok(fail(claimed[2].0, "run", claimed[2].1, false));
        scenario
    }

    /// `apply_owned` leaves exactly the state `apply` does, event for event,
    /// and refuses exactly what it refuses, leaving the ledger as `apply` does.
    #[test]
    fn apply_owned_is_apply() {
        use crate::testkit::{step, workflow};
        let mut scenario = varied_scenario();
        // Dependencies named before and after their step, and an idempotency
        // key created more than a day later than the first ones (pruning).
        scenario.ok(Command::CreateTask(workflow(
            101,
            "d",
            vec![step("x", "h", &["z"]), step("y", "h", &[]), step("z", "h", &["y"])],
        )));
        scenario.advance_ms(25 * 60 * 60 * 1000);
        let mut late = job(102, "a");
        late.idempotency_key = Some(IdempotencyKey::new("key-0").unwrap());
        scenario.ok(Command::CreateTask(late));
        let (mut by_ref, mut owned) = (crate::Ledger::new(), crate::Ledger::new());
        for event in &scenario.log {
            by_ref.apply(event).unwrap();
            owned.apply_owned(event.clone()).unwrap();
            assert_eq!(owned.digest(), by_ref.digest(), "after {event:?}");
        }
        assert_eq!(owned.to_state(), by_ref.to_state());
        owned.check_indexes().unwrap();
        // Refusals: a task that exists, an idempotency key in use, time going backwards.
        let created = scenario.log.iter().find(|e| matches!(e, crate::Event::TaskCreated { .. })).unwrap();
        let mut reused = job(103, "a");
        reused.idempotency_key = Some(IdempotencyKey::new("key-0").unwrap());
        let reused = crate::Event::TaskCreated { spec: reused, at: by_ref.last_event_at() };
        let mut past = job(104, "a");
        past.name = "past".into();
        let past = crate::Event::TaskCreated { spec: past, at: crate::Timestamp::from_micros(0) };
        for bad in [created, &reused, &past] {
            assert_eq!(owned.apply_owned(bad.clone()), by_ref.apply(bad));
            assert!(by_ref.apply(bad).is_err());
            assert_eq!(owned.digest(), by_ref.digest());
        }
    }

    /// Splitting a state encoding keeps exactly the chosen tasks, counts the
    /// others as the ledger would, and merging them back writes the same bytes.
    #[test]
    fn split_state_and_merge_agree_with_the_whole_ledger() {
        let ledger = varied_ledger();
        let bytes = ledger.write_state(Vec::new()).unwrap();
        let ids: Vec<_> = ledger.to_state().tasks.iter().map(|t| t.id).collect();
        for modulus in [1, 2, 3, usize::MAX] {
            let kept_ids: Vec<_> =
                ids.iter().enumerate().filter(|(i, _)| i % modulus == 0).map(|(_, id)| *id).collect();
            let split = super::split_state(&bytes, |id| kept_ids.contains(id)).unwrap();
            assert_eq!(split.kept.tasks.len(), kept_ids.len());
            assert_eq!(split.others.len(), ids.len() - kept_ids.len());
            let partial = crate::Ledger::from_state(split.kept.clone());
            let mut summary = partial.summary();
            summary.merge(&split.others_summary);
            assert_eq!(summary, ledger.summary(), "keeping every {modulus}th");
            assert_eq!(partial.write_state_with(&split.others, Vec::new()).unwrap(), bytes);
            assert_eq!(partial.digest_with(&split.others), ledger.digest());
        }
        assert!(super::split_state(&bytes[..bytes.len() - 1], |_| false).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(super::split_state(&longer, |_| false).is_err());
    }

    /// The summary counts what the ledger's own reads say.
    #[test]
    fn summary_counts_agree_with_the_ledger_reads() {
        let ledger = varied_ledger();
        let summary = ledger.summary();
        assert_eq!(summary.live_tasks, ledger.live_task_count() as u64);
        assert_eq!(summary.timers, ledger.timer_count() as u64);
        assert_eq!(summary.next_timer_due, ledger.next_timer_due());
        for (ns, counts) in &summary.by_namespace {
            let ns = crate::Namespace::new(ns).unwrap();
            assert_eq!(counts.steps_in(crate::StepState::Enqueued), ledger.ready_count(&ns) as u64);
            assert_eq!(counts.steps_in(crate::StepState::InProgress), u64::from(ledger.in_progress(&ns)));
        }
        assert!(summary.by_namespace["a"].tasks_in(crate::TaskState::InProgress) > 0);
        assert!(summary.timers > 0);
    }

    /// `check_indexes_in_place` agrees with `check_indexes` on a sound ledger
    /// and on every kind of damaged index.
    #[test]
    fn check_indexes_in_place_agrees_with_check_indexes() {
        let mut scenario = Scenario::new();
        for n in 0..12 {
            scenario.ok(Command::CreateTask(job(n, if n % 2 == 0 { "a" } else { "b" })));
        }
        scenario.ok(claim("a", "w", 2));
        let sound = scenario.ledger.clone();
        assert_eq!(sound.check_indexes(), Ok(()));
        assert_eq!(sound.check_indexes_in_place(), Ok(()));

        let mut no_timer = sound.clone();
        let first = *no_timer.timers.first().unwrap();
        no_timer.timers.remove(&first);
        let mut extra_timer = sound.clone();
        extra_timer.timers.insert(super::Timer { due: crate::Timestamp::from_micros(1), ..first });
        let mut lease_count = sound.clone();
        lease_count.ready.values_mut().for_each(|q| q.in_progress += 1);
        let mut unqueued = sound.clone();
        let queue = unqueued.ready.values_mut().find(|q| !q.by_handler.is_empty()).unwrap();
        let by_key = queue.by_handler.values_mut().next().unwrap();
        let key = *by_key.keys().next().unwrap();
        by_key.remove(&key);
        for (what, damaged) in
            [("no timer", no_timer), ("extra timer", extra_timer), ("lease count", lease_count), ("unqueued", unqueued)]
        {
            assert!(damaged.check_indexes().is_err(), "{what}");
            assert!(damaged.check_indexes_in_place().is_err(), "{what}");
        }
    }

    /// The streamed digest hashes exactly the postcard bytes of `to_state()`.
    #[test]
    fn digest_hashes_the_bytes_of_to_state() {
        let mut scenario = Scenario::new();
        for n in 0..50 {
            let mut spec = job(n, if n % 3 == 0 { "a" } else { "b" });
            if n % 5 == 0 {
                spec.idempotency_key = Some(IdempotencyKey::new(format!("key-{n}")).unwrap());
            }
            scenario.ok(Command::CreateTask(spec));
        }
        scenario.ok(claim("a", "w", 4));
        let ledger = &scenario.ledger;
        let bytes = postcard::to_stdvec(&ledger.to_state()).unwrap();
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"taskledger.ledger.v1");
        hasher.update(&bytes);
        assert_eq!(ledger.digest(), *hasher.finalize().as_bytes());
    }
}
