//! Shared by the projection tests: a real redb log in a temp dir that tests
//! append domain events to (as the writer would, one command's events per
//! append), a scripted fixture history, and random histories for proptest.

use std::path::Path;

use domain::testkit::{self, Scenario, claim, job, ns, step, task_id, text, workflow};
use domain::{Command, Event, Json, LeaseEpoch, LeaseRef, StepName, StepState, Tag};
use eventlog::{LiveFeed, LogReader, LogStore, RedbOptions, RedbStore, encode_event};

/// A log being written by a test.
pub struct TestLog {
    pub dir: tempfile::TempDir,
    pub store: RedbStore,
    pub feed: LiveFeed,
    commands: u64,
}

impl TestLog {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open(dir.path().join("log"), RedbOptions::default()).expect("open log");
        Self { dir, store, feed: LiveFeed::new(4096), commands: 0 }
    }

    pub fn reader(&self) -> LogReader {
        self.store.reader()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Appends one command's events (as `actor`) and publishes them.
    pub fn append(&mut self, actor: &str, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        self.commands += 1;
        let command_id = format!("cmd-{}", self.commands);
        let records: Vec<_> = events.iter().map(|e| encode_event(e, &command_id, actor, e.at().as_micros())).collect();
        let appended = self.store.append(&records, &[]).expect("append");
        self.feed.publish(&appended.records);
    }

    pub fn append_all(&mut self, history: &[(String, Vec<Event>)]) {
        for (actor, events) in history {
            self.append(actor, events);
        }
    }

    pub fn head(&self) -> u64 {
        self.store.head().seq
    }
}

/// Records what a scenario's commands produced, grouped per command.
pub struct Recorder {
    pub scenario: Scenario,
    pub history: Vec<(String, Vec<Event>)>,
}

impl Recorder {
    pub fn new() -> Self {
        Self { scenario: Scenario::new(), history: Vec::new() }
    }

    pub fn ok(&mut self, actor: &str, command: Command) -> Vec<Event> {
        let events = self.scenario.ok(command);
        self.history.push((actor.to_owned(), events.clone()));
        events
    }

    pub fn try_(&mut self, actor: &str, command: Command) {
        if let Ok(events) = self.scenario.when(command)
            && !events.is_empty()
        {
            self.history.push((actor.to_owned(), events));
        }
    }

    pub fn advance_and_fire(&mut self, ms: u64) {
        self.scenario.advance_ms(ms);
        let events = self.scenario.fire_timers();
        if !events.is_empty() {
            self.history.push(("system".to_owned(), events));
        }
    }

    /// The epoch of the live lease on `task`'s `step`.
    pub fn epoch(&self, task: u64, step: &str) -> u32 {
        let t = self.scenario.ledger.task(&task_id(task)).expect("live task");
        let s = t.step(t.step_index(&testkit::step_name(step)).expect("step")).expect("step");
        s.epoch.0
    }
}

fn lease(task: u64, step: &str, epoch: u32) -> LeaseRef {
    LeaseRef { task: task_id(task), step: testkit::step_name(step), epoch: LeaseEpoch(epoch) }
}

/// The fixture history the read-model tests check row by row:
/// 1. job 1 in `mail` (tag `vip`): claimed by w1, heartbeat, completed.
/// 2. workflow 2 in `etl` (a → b, a → c): a completed by w1; b fails permanently
///    (dead letter) on w2; c completed; an operator resolves b → resolved manually.
/// 3. job 3 in `mail`: claimed by w2, lease expires (retry), re-claimed by w1,
///    fails permanently → dead letter (task blocked, stays in dead letters).
/// 4. job 4 in `mail`: cancelled while pending. Queue `etl` paused and limited.
/// 5. job 5 in `mail` (priority 5): left enqueued.
pub fn fixture_history() -> Recorder {
    let mut r = Recorder::new();
    let mut j1 = job(1, "mail");
    j1.tags = vec![Tag::new("vip").unwrap()];
    r.ok("producer", Command::CreateTask(j1));
    r.scenario.advance_ms(10);
    r.ok("w1", claim("mail", "w1", 1));
    r.scenario.advance_ms(100);
    r.ok("w1", Command::Heartbeat { lease: lease(1, "run", 1), lease_ms: Some(60_000) });
    r.scenario.advance_ms(5);
    r.ok("w1", testkit::complete(task_id(1), "run", 1));

    let mut wf =
        workflow(2, "etl", vec![step("a", "extract", &[]), step("b", "load", &["a"]), step("c", "index", &["a"])]);
    wf.steps[1].max_attempts = 1;
    r.ok("producer", Command::CreateTask(wf));
    r.scenario.advance_ms(20);
    r.ok("w1", claim("etl", "w1", 1));
    r.scenario.advance_ms(30);
    r.ok("w1", testkit::complete(task_id(2), "a", 1));
    r.scenario.advance_ms(5);
    r.ok(
        "w2",
        Command::ClaimSteps {
            namespaces: vec![ns("etl")],
            worker: testkit::worker("w2"),
            max: 1,
            lease_ms: None,
            handlers: vec![domain::HandlerName::new("load").unwrap()],
        },
    );
    r.scenario.advance_ms(7);
    r.ok("w2", testkit::fail(task_id(2), "b", 1, false));
    r.ok("w1", claim("etl", "w1", 1));
    r.scenario.advance_ms(3);
    r.ok("w1", testkit::complete(task_id(2), "c", 1));
    r.ok(
        "operator",
        Command::ResolveStep {
            task: task_id(2),
            step: StepName::new("b").unwrap(),
            note: text("loaded by hand"),
            result: Some(Json::new("result", "{\"rows\":3}").unwrap()),
        },
    );

    r.ok("producer", Command::CreateTask(job(3, "mail")));
    r.ok(
        "w2",
        Command::ClaimSteps {
            namespaces: vec![ns("mail")],
            worker: testkit::worker("w2"),
            max: 1,
            lease_ms: Some(1_000),
            handlers: vec![],
        },
    );
    r.advance_and_fire(1_500); // lease expires → waiting for retry
    r.advance_and_fire(10_000); // retry due → enqueued
    r.ok("w1", claim("mail", "w1", 1));
    let epoch = r.epoch(3, "run");
    r.ok("w1", testkit::fail(task_id(3), "run", epoch, false));

    r.ok("producer", Command::CreateTask(job(4, "mail")));
    r.ok("producer", Command::CancelTask { task: task_id(4), reason: Some(text("not needed")) });
    r.ok("operator", Command::PauseQueue { namespace: ns("etl") });
    r.ok("operator", Command::SetQueueConcurrency { namespace: ns("etl"), limit: Some(4) });

    let mut j5 = job(5, "mail");
    j5.priority = domain::Priority::new(5).unwrap();
    r.ok("producer", Command::CreateTask(j5));
    r
}

/// One random operation of a random history.
#[derive(Clone, Debug)]
pub enum Op {
    Create { steps: u8, namespace: u8, tag: bool, run_at_ms: Option<u16>, priority: i8 },
    Claim { namespace: u8, worker: u8, max: u8 },
    Finish { pick: u16, how: u8 },
    Operator { pick: u16, how: u8 },
    Advance { ms: u32 },
    Queue { namespace: u8, how: u8 },
}

pub fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (1u8..4, 0u8..2, any::<bool>(), proptest::option::weighted(0.2, 0u16..5000), -3i8..4).prop_map(
            |(steps, namespace, tag, run_at_ms, priority)| Op::Create { steps, namespace, tag, run_at_ms, priority }
        ),
        3 => (0u8..2, 0u8..3, 1u8..4).prop_map(|(namespace, worker, max)| Op::Claim { namespace, worker, max }),
        4 => (any::<u16>(), 0u8..6).prop_map(|(pick, how)| Op::Finish { pick, how }),
        1 => (any::<u16>(), 0u8..4).prop_map(|(pick, how)| Op::Operator { pick, how }),
        2 => (1u32..70_000).prop_map(|ms| Op::Advance { ms }),
        1 => (0u8..2, 0u8..3).prop_map(|(namespace, how)| Op::Queue { namespace, how }),
    ]
}

const NAMESPACES: [&str; 2] = ["alpha", "beta"];

/// Runs `ops` against a scenario; rejected commands are simply skipped.
pub fn random_history(ops: &[Op]) -> Recorder {
    let mut r = Recorder::new();
    let mut next_task = 1u64;
    for op in ops {
        match op {
            Op::Create { steps, namespace, tag, run_at_ms, priority } => {
                let names = ["s0", "s1", "s2", "s3"];
                let specs = (0..*steps as usize)
                    .map(|i| {
                        let deps: Vec<&str> = if i == 0 { vec![] } else { vec![names[i - 1]] };
                        let mut s = step(names[i], if i % 2 == 0 { "even" } else { "odd" }, &deps);
                        s.max_attempts = 2;
                        s.lease_ms = 5_000;
                        s.retry = domain::RetryPolicy {
                            base_ms: 1000,
                            multiplier_permille: 2000,
                            cap_ms: 10_000,
                            jitter_pct: 0,
                        };
                        s
                    })
                    .collect();
                let mut spec = workflow(next_task, NAMESPACES[*namespace as usize], specs);
                if *tag {
                    spec.tags = vec![Tag::new("t").unwrap()];
                }
                spec.run_at = run_at_ms.map(|ms| r.scenario.now.plus_ms(u64::from(ms)));
                spec.priority = domain::Priority::new(i32::from(*priority)).unwrap();
                next_task += 1;
                r.try_("producer", Command::CreateTask(spec));
            }
            Op::Claim { namespace, worker, max } => {
                r.try_(
                    &format!("w{worker}"),
                    claim(NAMESPACES[*namespace as usize], &format!("w{worker}"), u32::from(*max)),
                );
            }
            Op::Finish { pick, how } => {
                let running: Vec<(domain::TaskId, StepName, u32, Option<domain::WorkerId>)> = r
                    .scenario
                    .ledger
                    .tasks()
                    .flat_map(|t| {
                        t.steps
                            .iter()
                            .filter(|s| s.state == StepState::InProgress)
                            .map(move |s| (t.id, s.name.clone(), s.epoch.0, s.worker.clone()))
                    })
                    .collect();
                if running.is_empty() {
                    continue;
                }
                let mut all = running;
                all.sort_by_key(|x| (x.0, x.1.clone()));
                let (task, step_name, epoch, worker) = all[*pick as usize % all.len()].clone();
                let lease = LeaseRef { task, step: step_name.clone(), epoch: LeaseEpoch(epoch) };
                let actor = worker.map(|w| w.as_str().to_owned()).unwrap_or_default();
                let command = match how {
                    0 | 1 => Command::CompleteStep { lease, result: Json::new("result", "{\"ok\":true}").unwrap() },
                    2 => Command::FailStep { lease, error: text("flaky"), retryable: true },
                    3 => Command::FailStep { lease, error: text("broken"), retryable: false },
                    4 => Command::ReleaseStep { lease },
                    _ => Command::AddSteps {
                        lease,
                        steps: vec![{
                            let mut s = step(&format!("x{}", r.history.len()), "extra", &[step_name.as_str()]);
                            s.max_attempts = 1;
                            s
                        }],
                    },
                };
                r.try_(&actor, command);
            }
            Op::Operator { pick, how } => {
                let mut failed: Vec<(domain::TaskId, StepName)> = r
                    .scenario
                    .ledger
                    .tasks()
                    .flat_map(|t| {
                        t.steps.iter().filter(|s| s.state == StepState::Error).map(move |s| (t.id, s.name.clone()))
                    })
                    .collect();
                let mut live: Vec<domain::TaskId> = r.scenario.ledger.tasks().map(|t| t.id).collect();
                failed.sort_by_key(|x| (x.0, x.1.clone()));
                live.sort();
                let command = match how {
                    0 if !failed.is_empty() => {
                        let (task, step) = failed[*pick as usize % failed.len()].clone();
                        Command::RetryStep { task, step, reset_attempts: pick % 2 == 0 }
                    }
                    1 if !failed.is_empty() => {
                        let (task, step) = failed[*pick as usize % failed.len()].clone();
                        Command::ResolveStep { task, step, note: text("by hand"), result: None }
                    }
                    2 if !failed.is_empty() => {
                        let (task, _) = failed[*pick as usize % failed.len()];
                        Command::GiveUpTask { task, reason: Some(text("enough")) }
                    }
                    _ if !live.is_empty() => {
                        Command::CancelTask { task: live[*pick as usize % live.len()], reason: None }
                    }
                    _ => continue,
                };
                r.try_("operator", command);
            }
            Op::Advance { ms } => r.advance_and_fire(u64::from(*ms)),
            Op::Queue { namespace, how } => {
                let namespace = ns(NAMESPACES[*namespace as usize]);
                let command = match how {
                    0 => Command::PauseQueue { namespace },
                    1 => Command::ResumeQueue { namespace },
                    _ => Command::SetQueueConcurrency { namespace, limit: Some(2) },
                };
                r.try_("operator", command);
            }
        }
    }
    r
}

/// The audit log's time filter on `store` (projected from all of `log`)
/// against a scan of the log's records: every range whose ends are a recorded
/// time, a microsecond either side of one, or beyond them all; each end alone;
/// with a seq range and a task; and page by page.
pub async fn audit_time_ranges_match_the_log(store: &projections::Store, log: &TestLog) {
    use projections::query::{self, AuditFilter, PageRequest};
    let records = log.reader().read_range(1, log.head(), 10_000).expect("read the log");
    let mut ends: Vec<i64> = records
        .iter()
        .flat_map(|r| [r.recorded_at_us - 1, r.recorded_at_us, r.recorded_at_us + 1])
        .chain([i64::MIN, i64::MAX])
        .collect();
    ends.sort_unstable();
    ends.dedup();
    let seqs = |filter: AuditFilter, page: u32| async move {
        let mut seqs = Vec::new();
        let mut request = PageRequest::first(page);
        loop {
            let got = query::audit_log(store, &filter, &request).await.expect("audit query");
            seqs.extend(got.items.iter().map(|r| r.seq as u64));
            match got.next_cursor {
                Some(cursor) => request.after = Some(cursor),
                None => return seqs,
            }
        }
    };
    let want = |from: Option<i64>, to: Option<i64>, keep: &dyn Fn(&eventlog::StoredRecord) -> bool| -> Vec<u64> {
        records
            .iter()
            .filter(|r| from.is_none_or(|f| r.recorded_at_us >= f) && to.is_none_or(|t| r.recorded_at_us <= t))
            .filter(|r| keep(r))
            .map(|r| r.seq)
            .collect()
    };
    for &from in &ends {
        for &to in &ends {
            let filter = AuditFilter { from_us: Some(from), to_us: Some(to), ..AuditFilter::default() };
            assert_eq!(seqs(filter, 500).await, want(Some(from), Some(to), &|_| true), "from {from} to {to}");
        }
        let from_only = AuditFilter { from_us: Some(from), ..AuditFilter::default() };
        assert_eq!(seqs(from_only, 500).await, want(Some(from), None, &|_| true), "from {from}");
        let to = from;
        let to_only = AuditFilter { to_us: Some(to), ..AuditFilter::default() };
        assert_eq!(seqs(to_only, 500).await, want(None, Some(to), &|_| true), "to {to}");
    }
    // With other filters, and in pages of 2.
    let (first, last) = (records[0].recorded_at_us, records[records.len() - 1].recorded_at_us);
    let middle = first + (last - first) / 2;
    let task = *task_id(3).as_uuid();
    let of_task = |r: &eventlog::StoredRecord| {
        eventlog::decode_event(r).expect("decode").task().is_some_and(|t| *t.as_uuid() == task)
    };
    // Task 3's third event: its range has some of the task's events, not all.
    let task_middle = records.iter().filter(|r| of_task(r)).nth(2).expect("task 3 has 3 events").recorded_at_us;
    type Keep<'a> = Box<dyn Fn(&eventlog::StoredRecord) -> bool + 'a>;
    let cases: [(AuditFilter, Keep<'_>); 3] = [
        (
            AuditFilter { from_us: Some(middle), from_seq: Some(3), to_seq: Some(30), ..AuditFilter::default() },
            Box::new(|r| (3..=30).contains(&r.seq)),
        ),
        (AuditFilter { to_us: Some(task_middle), task: Some(task), ..AuditFilter::default() }, Box::new(of_task)),
        (AuditFilter { from_us: Some(first + 1), to_us: Some(last - 1), ..AuditFilter::default() }, Box::new(|_| true)),
    ];
    for (filter, keep) in cases {
        let expected = want(filter.from_us, filter.to_us, &*keep);
        assert!(!expected.is_empty(), "{filter:?} selects something");
        assert_eq!(seqs(filter.clone(), 2).await, expected, "{filter:?} in pages of 2");
    }
}
