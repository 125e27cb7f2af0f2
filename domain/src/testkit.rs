//! Builders for tests, fixtures and benchmarks in this and other crates:
//! short ways to make valid specs and commands, and `Scenario`, a
//! given/when/then harness over a `Ledger` with a settable clock. Pure like
//! the rest of the crate: ids and times are derived from small integers.

use crate::{
    Command, Event, HandlerName, Json, LeaseEpoch, LeaseRef, Ledger, Namespace, Rejection, StepName, StepSpec, TaskId,
    TaskSpec, Text, Timestamp, WorkerId,
};

/// A seeded SplitMix64 generator: the same seed gives the same sequence, so
/// a randomized test prints its seed and can be replayed.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        let out = crate::splitmix64(self.0);
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        out
    }

    /// Uniform enough in `0..n` for test workloads.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True `p` percent of the time.
    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A deterministic UUIDv7 task id for small integer `n`.
pub fn task_id(n: u64) -> TaskId {
    TaskId::from_parts(1_700_000_000_000 + n, u128::from(n) * 0x9e37_79b9_7f4a_7c15)
}

pub fn ns(name: &str) -> Namespace {
    Namespace::new(name).expect("valid namespace")
}

pub fn step_name(name: &str) -> StepName {
    StepName::new(name).expect("valid step name")
}

pub fn worker(name: &str) -> WorkerId {
    WorkerId::new(name).expect("valid worker id")
}

pub fn text(t: &str) -> Text {
    Text::new("text", t).expect("short text")
}

/// A step named `name` run by handler `handler`, depending on `deps`.
pub fn step(name: &str, handler: &str, deps: &[&str]) -> StepSpec {
    let mut s = StepSpec::new(step_name(name), HandlerName::new(handler).expect("valid handler"), Json::null());
    s.depends_on = deps.iter().map(|d| step_name(d)).collect();
    s
}

/// A single-step job `n` in `namespace`, step `run` with handler `work`.
pub fn job(n: u64, namespace: &str) -> TaskSpec {
    workflow(n, namespace, vec![step("run", "work", &[])])
}

/// A task `n` in `namespace` with the given steps.
pub fn workflow(n: u64, namespace: &str, steps: Vec<StepSpec>) -> TaskSpec {
    TaskSpec {
        id: task_id(n),
        namespace: ns(namespace),
        name: format!("task-{n}"),
        payload: Json::new("payload", format!("{{\"n\":{n}}}")).expect("small"),
        priority: Default::default(),
        run_at: None,
        tags: Vec::new(),
        idempotency_key: None,
        steps,
    }
}

/// A claim of up to `max` steps from `namespace` by `worker_name`.
pub fn claim(namespace: &str, worker_name: &str, max: u32) -> Command {
    Command::ClaimSteps {
        namespaces: vec![ns(namespace)],
        worker: worker(worker_name),
        max,
        lease_ms: None,
        handlers: Vec::new(),
    }
}

pub fn lease(task: TaskId, step: &str, epoch: u32) -> LeaseRef {
    LeaseRef { task, step: step_name(step), epoch: LeaseEpoch(epoch) }
}

pub fn complete(task: TaskId, step: &str, epoch: u32) -> Command {
    Command::CompleteStep { lease: lease(task, step, epoch), result: Json::null() }
}

pub fn fail(task: TaskId, step: &str, epoch: u32, retryable: bool) -> Command {
    Command::FailStep { lease: lease(task, step, epoch), error: text("boom"), retryable }
}

/// Given/when/then over a ledger: `when` decides a command at the scenario's
/// clock and applies the events, returning them (or the rejection).
#[derive(Default)]
pub struct Scenario {
    pub ledger: Ledger,
    pub now: Timestamp,
    /// Every event applied so far, in order.
    pub log: Vec<Event>,
}

impl Scenario {
    pub fn new() -> Self {
        Self { now: Timestamp::from_micros(1_000_000), ..Self::default() }
    }

    /// Applies past events directly (the "given" part).
    pub fn given(mut self, events: impl IntoIterator<Item = Event>) -> Self {
        for event in events {
            self.ledger.apply(&event).expect("given events are consistent");
            self.now = self.now.max(event.at());
            self.log.push(event);
        }
        self
    }

    /// Moves the clock forward by `ms` milliseconds.
    pub fn advance_ms(&mut self, ms: u64) -> &mut Self {
        self.now = self.now.plus_ms(ms);
        self
    }

    /// Decides and applies `command` now.
    pub fn when(&mut self, command: Command) -> Result<Vec<Event>, Rejection> {
        let events = self.ledger.decide(&command, self.now)?;
        for event in &events {
            self.ledger.apply(event).expect("decided events apply");
            self.log.push(event.clone());
        }
        Ok(events)
    }

    /// Like `when`, but the command must succeed.
    pub fn ok(&mut self, command: Command) -> Vec<Event> {
        let kind = command.kind();
        self.when(command).unwrap_or_else(|r| panic!("{kind} rejected: {r}"))
    }

    /// Like `when`, but the command must be rejected; returns the rejection.
    pub fn rejected(&mut self, command: Command) -> Rejection {
        let kind = command.kind();
        match self.when(command) {
            Ok(events) => panic!("{kind} was accepted with {events:?}"),
            Err(r) => r,
        }
    }

    /// Fires every due timer through decide/apply, as the writer does;
    /// returns the events.
    pub fn fire_timers(&mut self) -> Vec<Event> {
        let commands: Vec<Command> = self
            .ledger
            .due_timers(self.now, usize::MAX)
            .copied()
            .collect::<Vec<_>>()
            .iter()
            .filter_map(|t| self.ledger.timer_command(t))
            .collect();
        commands.into_iter().flat_map(|c| self.ok(c)).collect()
    }
}
