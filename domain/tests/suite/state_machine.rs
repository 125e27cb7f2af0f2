//! Property test of the whole ledger as a state machine (proptest-state-machine).
//!
//! Random sequences of producer, worker, operator and clock operations, plus
//! arbitrary (mostly invalid) commands, are decided and applied; after every
//! step the invariants of DESIGN §3 are checked:
//! - every step has at most one live lease, and every older epoch is fenced out;
//! - attempts never exceed `max_attempts`;
//! - final states never change, and a task that left memory never returns;
//! - a step is claimable or running only when its dependencies are done and
//!   its task's `run_at` has passed;
//! - a task's state agrees with its steps;
//! - `decide` never panics, and rejected commands change nothing;
//! - replaying every event into a fresh `Ledger` gives an identical digest,
//!   snapshots round-trip, and every index agrees with the tasks;
//! - every event survives a postcard round trip (the log's encoding).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use domain::testkit::*;
use domain::*;
use proptest::prelude::*;
use proptest::test_runner::Config;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

const NAMESPACES: [&str; 2] = ["alpha", "beta"];
const HANDLERS: [&str; 2] = ["h0", "h1"];

#[derive(Clone, Debug)]
enum Op {
    Create {
        steps: Vec<u8>,
        max_attempts: u32,
        priority: i32,
        run_at_ms: Option<u64>,
        ns: usize,
        handler: usize,
        key: Option<u8>,
        lease_ms: u32,
    },
    Claim {
        ns_mask: u8,
        max: u32,
        handler: Option<usize>,
        lease_ms: Option<u32>,
    },
    Heartbeat {
        pick: usize,
        stale: bool,
    },
    Complete {
        pick: usize,
        stale: bool,
    },
    Fail {
        pick: usize,
        retryable: bool,
        stale: bool,
    },
    Release {
        pick: usize,
    },
    AddSteps {
        pick: usize,
        count: u8,
        after_running: bool,
    },
    Retry {
        pick: usize,
        reset: bool,
    },
    Resolve {
        pick: usize,
    },
    GiveUp {
        pick: usize,
    },
    Cancel {
        pick: usize,
    },
    Pause {
        ns: usize,
        pause: bool,
    },
    Concurrency {
        ns: usize,
        limit: Option<u32>,
    },
    Advance {
        ms: u64,
    },
    Arbitrary {
        kind: u8,
        task: usize,
        step: u8,
        epoch: u32,
        flag: bool,
    },
}

struct Reference;

impl ReferenceStateMachine for Reference {
    /// The number of tasks created so far (ids are derived from it).
    type State = u64;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<u64> {
        Just(0).boxed()
    }

    fn transitions(_: &u64) -> BoxedStrategy<Op> {
        let create =
            (
                prop::collection::vec(any::<u8>(), 1..5),
                1u32..4,
                -3i32..4,
                prop::option::weighted(0.2, 1u64..4000),
                0..NAMESPACES.len(),
                0..HANDLERS.len(),
                prop::option::weighted(0.2, 0u8..4),
                prop_oneof![Just(1_000u32), Just(5_000u32)],
            )
                .prop_map(|(steps, max_attempts, priority, run_at_ms, ns, handler, key, lease_ms)| {
                    Op::Create { steps, max_attempts, priority, run_at_ms, ns, handler, key, lease_ms }
                });
        let claim = (
            1u8..4,
            1u32..4,
            prop::option::weighted(0.3, 0..HANDLERS.len()),
            prop::option::weighted(0.3, 500u32..3000),
        )
            .prop_map(|(ns_mask, max, handler, lease_ms)| Op::Claim { ns_mask, max, handler, lease_ms });
        prop_oneof![
            4 => create,
            5 => claim,
            2 => (any::<usize>(), prop::bool::weighted(0.2)).prop_map(|(pick, stale)| Op::Heartbeat { pick, stale }),
            5 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(pick, stale)| Op::Complete { pick, stale }),
            3 => (any::<usize>(), any::<bool>(), prop::bool::weighted(0.1))
                .prop_map(|(pick, retryable, stale)| Op::Fail { pick, retryable, stale }),
            1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
            1 => (any::<usize>(), 1u8..3, any::<bool>())
                .prop_map(|(pick, count, after_running)| Op::AddSteps { pick, count, after_running }),
            2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, reset)| Op::Retry { pick, reset }),
            1 => any::<usize>().prop_map(|pick| Op::Resolve { pick }),
            1 => any::<usize>().prop_map(|pick| Op::GiveUp { pick }),
            1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
            1 => (0..NAMESPACES.len(), any::<bool>()).prop_map(|(ns, pause)| Op::Pause { ns, pause }),
            1 => (0..NAMESPACES.len(), prop::option::of(0u32..3))
                .prop_map(|(ns, limit)| Op::Concurrency { ns, limit }),
            4 => (0u64..3000).prop_map(|ms| Op::Advance { ms }),
            2 => (any::<u8>(), any::<usize>(), any::<u8>(), 0u32..4, any::<bool>())
                .prop_map(|(kind, task, step, epoch, flag)| Op::Arbitrary { kind, task, step, epoch, flag }),
        ]
        .boxed()
    }

    fn apply(created: u64, op: &Op) -> u64 {
        match op {
            Op::Create { .. } => created + 1,
            _ => created,
        }
    }
}

/// The system under test and what the invariant checks remember.
struct World {
    scenario: Scenario,
    created: u64,
    /// Every lease ever handed out: (task, step) -> epochs.
    leases: BTreeMap<(TaskId, StepName), Vec<u32>>,
    /// Steps seen in a final state, with that state. (Cells: the invariant
    /// hook only gets `&World`, and these record what it has seen.)
    finals: RefCell<BTreeMap<(TaskId, StepName), StepState>>,
    /// Tasks that reached a terminal state and left memory.
    gone: RefCell<HashSet<TaskId>>,
}

impl World {
    fn decide_and_apply(&mut self, command: Command) {
        let before = self.scenario.ledger.digest();
        match self.scenario.when(command.clone()) {
            Ok(events) => {
                // Its events are of its own kind, for the task (or queue) it names, with its
                // arguments: what a repeat under its command id is judged by. (A command that
                // recorded nothing is not kept under its id: nothing to judge.)
                assert!(
                    events.is_empty() || self.scenario.ledger.repeats(&command, &events),
                    "{command:?} does not repeat its own {events:?}"
                );
                for event in &events {
                    let bytes = postcard::to_stdvec(event).expect("events encode");
                    let back: Event = postcard::from_bytes(&bytes).expect("events decode");
                    assert_eq!(&back, event, "postcard round trip");
                    if let Event::StepClaimed { task, step, epoch, .. } = event {
                        let name = self.scenario.ledger.task(task).unwrap().steps[step.get()].name.clone();
                        self.leases.entry((*task, name)).or_default().push(epoch.0);
                    }
                }
            }
            Err(_) => assert_eq!(self.scenario.ledger.digest(), before, "a rejection changed the ledger"),
        }
    }

    /// Live steps in a canonical order, filtered by state.
    fn steps_in(&self, states: &[StepState]) -> Vec<(TaskId, StepName, u32)> {
        let mut tasks: Vec<&Task> = self.scenario.ledger.tasks().collect();
        tasks.sort_by_key(|t| t.id);
        tasks
            .into_iter()
            .flat_map(|t| {
                t.steps.iter().filter(|s| states.contains(&s.state)).map(move |s| (t.id, s.name.clone(), s.epoch.0))
            })
            .collect()
    }

    fn live_tasks(&self) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = self.scenario.ledger.tasks().map(|t| t.id).collect();
        ids.sort();
        ids
    }

    fn pick<T: Clone>(items: &[T], pick: usize) -> Option<T> {
        (!items.is_empty()).then(|| items[pick % items.len()].clone())
    }

    fn lease_command(&mut self, pick: usize, stale: bool, make: impl FnOnce(LeaseRef) -> Command) {
        if let Some((task, step, epoch)) = Self::pick(&self.steps_in(&[StepState::InProgress]), pick) {
            let epoch = if stale { epoch.wrapping_sub(1) } else { epoch };
            self.decide_and_apply(make(LeaseRef { task, step, epoch: LeaseEpoch(epoch) }));
        }
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::Create { steps, max_attempts, priority, run_at_ms, ns, handler, key, lease_ms } => {
                self.created += 1;
                let n = self.created;
                let specs: Vec<StepSpec> = steps
                    .iter()
                    .enumerate()
                    .map(|(i, deps)| {
                        // Bit j of `deps` makes step i depend on step j < i: always a DAG.
                        let dep_names: Vec<String> =
                            (0..i).filter(|j| deps & (1 << j) != 0).map(|j| format!("s{j}")).collect();
                        let dep_refs: Vec<&str> = dep_names.iter().map(String::as_str).collect();
                        let mut s = step(&format!("s{i}"), HANDLERS[(handler + i) % HANDLERS.len()], &dep_refs);
                        s.max_attempts = max_attempts;
                        s.lease_ms = lease_ms;
                        s.retry = RetryPolicy { base_ms: 200, multiplier_permille: 2000, cap_ms: 2000, jitter_pct: 50 };
                        s
                    })
                    .collect();
                let mut spec = workflow(n, NAMESPACES[ns], specs);
                spec.priority = Priority::new(priority).unwrap();
                spec.run_at = run_at_ms.map(|ms| self.scenario.now.plus_ms(ms));
                spec.idempotency_key = key.map(|k| IdempotencyKey::new(format!("key-{k}")).unwrap());
                self.decide_and_apply(Command::CreateTask(spec));
            }
            Op::Claim { ns_mask, max, handler, lease_ms } => {
                let namespaces = NAMESPACES
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| ns_mask & (1 << i) != 0)
                    .map(|(_, n)| ns(n))
                    .collect();
                let handlers = handler.map(|h| vec![HandlerName::new(HANDLERS[h]).unwrap()]).unwrap_or_default();
                self.decide_and_apply(Command::ClaimSteps { namespaces, worker: worker("w"), max, lease_ms, handlers });
            }
            Op::Heartbeat { pick, stale } => {
                self.lease_command(pick, stale, |lease| Command::Heartbeat { lease, lease_ms: Some(2_000) })
            }
            Op::Complete { pick, stale } => {
                self.lease_command(pick, stale, |lease| Command::CompleteStep { lease, result: Json::null() })
            }
            Op::Fail { pick, retryable, stale } => {
                self.lease_command(pick, stale, |lease| Command::FailStep { lease, error: text("e"), retryable })
            }
            Op::Release { pick } => self.lease_command(pick, false, |lease| Command::ReleaseStep { lease }),
            Op::AddSteps { pick, count, after_running } => {
                let n = self.created;
                self.lease_command(pick, false, |lease| {
                    let deps: Vec<String> = if after_running { vec![lease.step.to_string()] } else { vec![] };
                    let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
                    let steps = (0..count).map(|i| step(&format!("added-{n}-{i}"), "h0", &deps)).collect();
                    Command::AddSteps { lease, steps }
                })
            }
            Op::Retry { pick, reset } => {
                if let Some((task, step, _)) = Self::pick(&self.steps_in(&[StepState::Error]), pick) {
                    self.decide_and_apply(Command::RetryStep { task, step, reset_attempts: reset });
                }
            }
            Op::Resolve { pick } => {
                let all = StepState::ALL;
                if let Some((task, step, _)) = Self::pick(&self.steps_in(&all), pick) {
                    self.decide_and_apply(Command::ResolveStep { task, step, note: text("n"), result: None });
                }
            }
            Op::GiveUp { pick } => {
                if let Some(task) = Self::pick(&self.live_tasks(), pick) {
                    self.decide_and_apply(Command::GiveUpTask { task, reason: None });
                }
            }
            Op::Cancel { pick } => {
                if let Some(task) = Self::pick(&self.live_tasks(), pick) {
                    self.decide_and_apply(Command::CancelTask { task, reason: None });
                }
            }
            Op::Pause { ns: n, pause } => {
                let namespace = ns(NAMESPACES[n]);
                self.decide_and_apply(if pause {
                    Command::PauseQueue { namespace }
                } else {
                    Command::ResumeQueue { namespace }
                });
            }
            Op::Concurrency { ns: n, limit } => {
                self.decide_and_apply(Command::SetQueueConcurrency { namespace: ns(NAMESPACES[n]), limit });
            }
            Op::Advance { ms } => {
                self.scenario.advance_ms(ms);
                let due: Vec<Timer> = self.scenario.ledger.due_timers(self.scenario.now, usize::MAX).copied().collect();
                for timer in due {
                    if let Some(command) = self.scenario.ledger.timer_command(&timer) {
                        self.decide_and_apply(command);
                    }
                }
                assert!(
                    self.scenario.ledger.next_timer_due().is_none_or(|d| d > self.scenario.now),
                    "a due timer was left"
                );
            }
            Op::Arbitrary { kind, task, step: s, epoch, flag } => {
                // Ids of live, finished and never-created tasks alike.
                let task = task_id((task % (self.created as usize + 2)) as u64);
                let step = step_name(&format!("s{}", s % 5));
                let lease = LeaseRef { task, step: step.clone(), epoch: LeaseEpoch(epoch) };
                let command = match kind % 12 {
                    0 => Command::Heartbeat { lease, lease_ms: Some(if flag { 10 } else { 1000 }) },
                    1 => Command::CompleteStep { lease, result: Json::null() },
                    2 => Command::FailStep { lease, error: text("x"), retryable: flag },
                    3 => Command::ReleaseStep { lease },
                    4 => Command::AddSteps { lease, steps: vec![step_spec_named(&step)] },
                    5 => Command::RetryStep { task, step, reset_attempts: flag },
                    6 => Command::ResolveStep { task, step, note: text("x"), result: None },
                    7 => Command::ExpireLease { task, step, epoch: LeaseEpoch(epoch) },
                    8 => Command::RetryDue { task, step },
                    9 => Command::RunAtDue { task },
                    10 => Command::GiveUpTask { task, reason: None },
                    _ => Command::CancelTask { task, reason: None },
                };
                self.decide_and_apply(command);
            }
        }
    }

    fn check(&self) {
        let ledger = &self.scenario.ledger;
        let mut live = BTreeSet::new();
        for t in ledger.tasks() {
            live.insert(t.id);
            assert!(!self.gone.borrow().contains(&t.id), "task {} came back after leaving memory", t.id);
            assert!(!t.state.is_terminal(), "terminal task {} still in memory", t.id);
            let expected = TaskState::derive(t.steps.iter().map(|s| s.state), t.started, false, false);
            assert_eq!(t.state, expected, "task {} state disagrees with its steps", t.id);
            for (i, s) in t.steps.iter().enumerate() {
                assert!(s.attempts <= s.max_attempts, "attempts {} > max {}", s.attempts, s.max_attempts);
                let running = s.state == StepState::InProgress;
                assert_eq!(running, s.lease_deadline.is_some(), "lease iff in progress");
                assert_eq!(running, s.worker.is_some());
                assert_eq!(s.state == StepState::Enqueued, s.ready.is_some(), "ready key iff enqueued");
                assert_eq!(s.state == StepState::WaitingForRetry, s.retry_at.is_some());
                if matches!(s.state, StepState::Enqueued | StepState::InProgress) {
                    assert!(t.run_at_reached, "step {i} runnable before run_at");
                    for d in s.deps.iter() {
                        assert!(
                            t.steps[d.get()].state.satisfies_dependents(),
                            "step {i} runnable before dependency {}",
                            d.0
                        );
                    }
                }
                let key = (t.id, s.name.clone());
                if let Some(previous) = self.finals.borrow().get(&key) {
                    assert_eq!(*previous, s.state, "a final state changed");
                }
                if s.state.is_final() {
                    self.finals.borrow_mut().insert(key.clone(), s.state);
                }
                // Fencing: every epoch but the live one is refused.
                if let Some(epochs) = self.leases.get(&key) {
                    for &old in epochs.iter().filter(|e| !running || **e != s.epoch.0) {
                        let probe =
                            Command::CompleteStep { lease: lease(t.id, s.name.as_str(), old), result: Json::null() };
                        let rejection =
                            ledger.decide(&probe, self.scenario.now).expect_err("an old epoch must be fenced");
                        assert_eq!(rejection.code, RejectionCode::LeaseLost);
                    }
                    assert!(epochs.windows(2).all(|w| w[0] < w[1]), "epochs increase");
                }
            }
        }
        for n in 1..=self.created {
            let id = task_id(n);
            let was_created =
                self.scenario.log.iter().any(|e| matches!(e, Event::TaskCreated { spec, .. } if spec.id == id));
            if was_created && !live.contains(&id) {
                self.gone.borrow_mut().insert(id);
            }
        }
        // Replay, snapshot round trip, indexes.
        let mut replayed = Ledger::new();
        for event in &self.scenario.log {
            replayed.apply(event).expect("the log replays");
        }
        let digest = ledger.digest();
        assert_eq!(replayed.digest(), digest, "replay differs from the writer's state");
        assert_eq!(Ledger::from_state(ledger.to_state()).digest(), digest, "snapshot round trip");
        let bytes = ledger.write_state(Vec::new()).expect("state serializes");
        let decoded = Ledger::decode_state(&bytes).expect("written state decodes");
        assert_eq!(decoded.digest(), digest, "snapshot round trip through decode_state");
        decoded.check_indexes_in_place().expect("decode_state rebuilds every index");
        ledger.check_indexes().expect("indexes agree with tasks");
    }
}

fn step_spec_named(name: &StepName) -> StepSpec {
    step(name.as_str(), "h1", &[])
}

impl StateMachineTest for World {
    type SystemUnderTest = World;
    type Reference = Reference;

    fn init_test(_: &u64) -> World {
        World {
            scenario: Scenario::new(),
            created: 0,
            leases: BTreeMap::new(),
            finals: RefCell::default(),
            gone: RefCell::default(),
        }
    }

    fn apply(mut world: World, _: &u64, op: Op) -> World {
        world.run(op);
        world
    }

    fn check_invariants(world: &World, _: &u64) {
        world.check();
    }
}

prop_state_machine! {
    #![proptest_config(Config {
        cases: std::env::var("TASKLEDGER_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000),
        max_shrink_iters: 4096,
        failure_persistence: None,
        .. Config::default()
    })]
    #[test]
    fn ledger_invariants_hold_for_random_histories(sequential 1..80 => World);
}
