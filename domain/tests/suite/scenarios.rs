//! Given/when/then scenarios: every command, every state transition and every
//! rejection code of the domain, each shown in the smallest history that
//! exhibits it.

use std::collections::BTreeSet;

use domain::testkit::*;
use domain::*;

fn only<T: std::fmt::Debug>(mut v: Vec<T>) -> T {
    assert_eq!(v.len(), 1, "expected one item: {v:?}");
    v.pop().unwrap()
}

fn claimed_epoch(event: &Event) -> u32 {
    match event {
        Event::StepClaimed { epoch, .. } => epoch.0,
        other => panic!("not a claim: {other:?}"),
    }
}

fn step_state(s: &Scenario, task: TaskId, step: &str) -> StepState {
    let t = s.ledger.task(&task).expect("task is live");
    t.steps[t.step_index(&step_name(step)).unwrap().get()].state
}

fn task_state(s: &Scenario, task: TaskId) -> Option<TaskState> {
    s.ledger.task(&task).map(|t| t.state)
}

#[test]
fn a_created_job_is_enqueued_claimed_and_completed_then_leaves_memory() {
    let mut s = Scenario::new();
    let created = only(s.ok(Command::CreateTask(job(1, "mail"))));
    assert!(matches!(created, Event::TaskCreated { .. }));
    assert_eq!(step_state(&s, task_id(1), "run"), StepState::Enqueued);
    assert_eq!(task_state(&s, task_id(1)), Some(TaskState::Pending));

    let claim_event = only(s.ok(claim("mail", "w1", 10)));
    let work = s.ledger.claimed_step(&claim_event).unwrap();
    assert_eq!((work.epoch, work.attempt, work.handler.as_str()), (LeaseEpoch(1), Attempt(1), "work"));
    assert_eq!(work.task_payload.as_str(), "{\"n\":1}");
    assert_eq!(task_state(&s, task_id(1)), Some(TaskState::InProgress));
    assert_eq!(s.ledger.in_progress(&ns("mail")), 1);

    s.ok(complete(task_id(1), "run", 1));
    assert_eq!(task_state(&s, task_id(1)), None, "terminal tasks leave memory");
    assert_eq!(s.ledger.in_progress(&ns("mail")), 0);
    assert_eq!(s.ledger.timer_count(), 0);
    assert_eq!(s.rejected(complete(task_id(1), "run", 1)).code, RejectionCode::TaskNotFound);
}

#[test]
fn a_dag_runs_each_step_only_after_its_dependencies() {
    let mut s = Scenario::new();
    let spec = workflow(
        1,
        "etl",
        vec![step("d", "h", &["b", "c"]), step("a", "h", &[]), step("b", "h", &["a"]), step("c", "h", &["a"])],
    );
    s.ok(Command::CreateTask(spec));
    assert_eq!(step_state(&s, task_id(1), "d"), StepState::Pending);
    let first = only(s.ok(claim("etl", "w", 10)));
    assert_eq!(s.ledger.claimed_step(&first).unwrap().step.as_str(), "a");
    assert!(s.ok(claim("etl", "w", 10)).is_empty(), "b and c wait for a");
    s.ok(complete(task_id(1), "a", 1));
    let next = s.ok(claim("etl", "w", 10));
    let names: Vec<_> = next.iter().map(|e| s.ledger.claimed_step(e).unwrap().step.to_string()).collect();
    assert_eq!(names, ["b", "c"], "FIFO in declaration order");
    s.ok(complete(task_id(1), "b", 1));
    assert_eq!(step_state(&s, task_id(1), "d"), StepState::Pending, "d still waits for c");
    s.ok(complete(task_id(1), "c", 1));
    assert_eq!(step_state(&s, task_id(1), "d"), StepState::Enqueued);
    only(s.ok(claim("etl", "w", 10)));
    s.ok(complete(task_id(1), "d", 1));
    assert_eq!(task_state(&s, task_id(1)), None);
}

#[test]
fn run_at_holds_steps_pending_until_its_timer_fires() {
    let mut s = Scenario::new();
    let mut spec = job(1, "q");
    spec.run_at = Some(s.now.plus_ms(5_000));
    s.ok(Command::CreateTask(spec));
    assert_eq!(step_state(&s, task_id(1), "run"), StepState::Pending);
    assert!(s.ok(claim("q", "w", 1)).is_empty());
    assert_eq!(s.rejected(Command::RunAtDue { task: task_id(1) }).code, RejectionCode::InvalidState);
    assert!(s.fire_timers().is_empty());
    s.advance_ms(5_000);
    let fired = only(s.fire_timers());
    assert!(matches!(fired, Event::RunAtReached { .. }));
    assert_eq!(step_state(&s, task_id(1), "run"), StepState::Enqueued);
}

#[test]
fn claims_take_highest_priority_first_fifo_within_a_priority() {
    let mut s = Scenario::new();
    for (n, priority) in [(1, 0), (2, 5), (3, 5), (4, -3)] {
        let mut spec = job(n, "q");
        spec.priority = Priority::new(priority).unwrap();
        s.ok(Command::CreateTask(spec));
    }
    let order: Vec<TaskId> = s.ok(claim("q", "w", 10)).iter().map(|e| e.task().unwrap()).collect();
    assert_eq!(order, [task_id(2), task_id(3), task_id(1), task_id(4)]);
}

#[test]
fn aging_lets_long_waiting_low_priority_work_overtake_fresh_high_priority() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(job(1, "q"))); // priority 0, enqueued first
    s.advance_ms(11_000); // 11 s of waiting = 11 points of aging
    let mut urgent = job(2, "q");
    urgent.priority = Priority::new(10).unwrap();
    s.ok(Command::CreateTask(urgent));
    let first = only(s.ok(claim("q", "w", 1)));
    assert_eq!(first.task(), Some(task_id(1)), "11 s of aging beats +10 priority");

    let mut s = Scenario::new();
    s.ok(Command::CreateTask(job(1, "q")));
    s.advance_ms(9_000);
    let mut urgent = job(2, "q");
    urgent.priority = Priority::new(10).unwrap();
    s.ok(Command::CreateTask(urgent));
    assert_eq!(only(s.ok(claim("q", "w", 1))).task(), Some(task_id(2)), "9 s does not");
}

/// A claim stops before its payloads (each step's and its task's) would pass
/// `MAX_CLAIM_PAYLOAD_BYTES`: 1,000 steps of 64 KiB payloads answered 124 MiB (found by a
/// black-box check). The steps left are the next claim's, in the same order.
#[test]
fn a_claim_stops_before_its_payloads_pass_their_bound() {
    let mut s = Scenario::new();
    let big = format!("\"{}\"", "x".repeat(Json::MAX_BYTES - 2));
    for n in 1..=200 {
        let mut spec = job(n, "q");
        spec.payload = Json::new("payload", big.as_str()).unwrap();
        s.ok(Command::CreateTask(spec));
    }
    let per_step = Json::MAX_BYTES + Json::null().len();
    let first = s.ok(claim("q", "w", 1000));
    assert_eq!(first.len(), MAX_CLAIM_PAYLOAD_BYTES / per_step, "as many as fit");
    let second = s.ok(claim("q", "w", 1000));
    assert_eq!(first.len() + second.len(), 200, "the rest");
    let tasks: Vec<_> = first.iter().chain(&second).map(|e| e.task().unwrap()).collect();
    assert_eq!(tasks, (1..=200).map(task_id).collect::<Vec<_>>(), "in the order they were ready");
}

#[test]
fn claims_respect_handlers_namespaces_pauses_and_concurrency_limits() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(workflow(1, "a", vec![step("x", "resize", &[])])));
    s.ok(Command::CreateTask(workflow(2, "a", vec![step("x", "email", &[])])));
    s.ok(Command::CreateTask(job(3, "b")));
    let by_handler = Command::ClaimSteps {
        namespaces: vec![ns("a"), ns("b")],
        worker: worker("w"),
        max: 10,
        lease_ms: Some(1_000),
        handlers: vec![HandlerName::new("email").unwrap()],
    };
    assert_eq!(only(s.ok(by_handler)).task(), Some(task_id(2)));

    assert_eq!(
        only(s.ok(Command::PauseQueue { namespace: ns("b") })),
        Event::QueuePaused { namespace: ns("b"), at: s.now }
    );
    assert!(s.ok(Command::PauseQueue { namespace: ns("b") }).is_empty(), "pausing twice changes nothing");
    assert!(s.ok(claim("b", "w", 10)).is_empty(), "paused queue hands out nothing");
    s.ok(Command::ResumeQueue { namespace: ns("b") });
    assert!(s.ok(Command::ResumeQueue { namespace: ns("b") }).is_empty());

    s.ok(Command::SetQueueConcurrency { namespace: ns("b"), limit: Some(1) });
    for n in 4..8 {
        s.ok(Command::CreateTask(job(n, "b")));
    }
    assert_eq!(s.ok(claim("b", "w", 10)).len(), 1, "limit 1");
    assert!(s.ok(claim("b", "w", 10)).is_empty(), "limit reached");
    s.ok(Command::SetQueueConcurrency { namespace: ns("b"), limit: Some(3) });
    assert_eq!(s.ok(claim("b", "w", 10)).len(), 2);
    s.ok(Command::SetQueueConcurrency { namespace: ns("b"), limit: None });
    assert_eq!(s.ok(claim("b", "w", 10)).len(), 2);
    let bad = s.rejected(Command::SetQueueConcurrency { namespace: ns("b"), limit: Some(0) });
    assert_eq!((bad.code, bad.field.as_deref()), (RejectionCode::InvalidValue, Some("limit")));
}

#[test]
fn leases_are_fenced_by_epoch_and_by_deadline() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(job(1, "q")));
    let epoch = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    let stale = s.rejected(complete(task_id(1), "run", epoch + 1));
    assert_eq!((stale.code, stale.field.as_deref()), (RejectionCode::LeaseLost, Some("epoch")));

    s.advance_ms(20_000);
    let beat = only(s.ok(Command::Heartbeat { lease: lease(task_id(1), "run", epoch), lease_ms: Some(60_000) }));
    assert!(matches!(beat, Event::LeaseExtended { lease_deadline, .. } if lease_deadline == s.now.plus_ms(60_000)));
    s.advance_ms(59_000);
    assert!(s.fire_timers().is_empty(), "the heartbeat moved the expiry");
    s.advance_ms(1_000);
    assert_eq!(s.rejected(complete(task_id(1), "run", epoch)).code, RejectionCode::LeaseLost, "past its deadline");
    let expired = only(s.fire_timers());
    assert!(matches!(expired, Event::LeaseExpired { outcome: FailOutcome::Retry { .. }, .. }));
    assert_eq!(step_state(&s, task_id(1), "run"), StepState::WaitingForRetry);
    let bad = s.rejected(Command::Heartbeat { lease: lease(task_id(1), "run", epoch), lease_ms: Some(10) });
    assert_eq!(bad.code, RejectionCode::LeaseLost);
}

/// A heartbeat that names no duration extends the lease by what it was granted for: the
/// claim's `lease_ms`, or the last heartbeat's; not the step's default (found by a black-box
/// check: the first heartbeat cut a 60 s claim back to the step's 1 s, and the lease expired
/// under a worker that was heartbeating).
#[test]
fn a_heartbeat_extends_a_lease_by_the_duration_it_was_granted() {
    let mut s = Scenario::new();
    let mut spec = job(1, "q");
    spec.steps[0].lease_ms = 1_000;
    s.ok(Command::CreateTask(spec));
    let mut long_claim = claim("q", "w", 1);
    if let Command::ClaimSteps { lease_ms, .. } = &mut long_claim {
        *lease_ms = Some(60_000);
    }
    let epoch = claimed_epoch(&only(s.ok(long_claim)));
    let beat = |s: &mut Scenario, lease_ms| {
        only(s.ok(Command::Heartbeat { lease: lease(task_id(1), "run", epoch), lease_ms }))
    };
    s.advance_ms(30_000);
    let extended = beat(&mut s, None);
    assert!(
        matches!(extended, Event::LeaseExtended { lease_deadline, .. } if lease_deadline == s.now.plus_ms(60_000)),
        "{extended:?}"
    );
    s.advance_ms(59_000);
    assert!(s.fire_timers().is_empty(), "still leased");
    // A heartbeat that names a duration sets it, for the heartbeats after it too.
    let shorter = beat(&mut s, Some(5_000));
    assert!(matches!(shorter, Event::LeaseExtended { lease_deadline, .. } if lease_deadline == s.now.plus_ms(5_000)));
    s.advance_ms(4_000);
    let again = beat(&mut s, None);
    assert!(
        matches!(again, Event::LeaseExtended { lease_deadline, .. } if lease_deadline == s.now.plus_ms(5_000)),
        "{again:?}"
    );
    // The next claim starts from the step's default again.
    s.advance_ms(5_000);
    assert!(matches!(only(s.fire_timers()), Event::LeaseExpired { .. }));
    s.advance_ms(600_000);
    s.fire_timers();
    let epoch = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    let beat = only(s.ok(Command::Heartbeat { lease: lease(task_id(1), "run", epoch), lease_ms: None }));
    assert!(
        matches!(beat, Event::LeaseExtended { lease_deadline, .. } if lease_deadline == s.now.plus_ms(1_000)),
        "{beat:?}"
    );
}

/// A task's tags are distinct: a repeated tag is refused (found by a black-box check: it was
/// accepted, and the tasks projector, whose tag table is keyed by tag and task, stopped on it).
#[test]
fn a_repeated_tag_is_refused() {
    let mut s = Scenario::new();
    let mut spec = job(1, "q");
    spec.tags = vec![domain::Tag::new("x").unwrap(), domain::Tag::new("y").unwrap(), domain::Tag::new("x").unwrap()];
    let refused = s.rejected(Command::CreateTask(spec.clone()));
    assert_eq!((refused.code, refused.field.as_deref()), (RejectionCode::InvalidValue, Some("tags[2]")));
    let refused = s.rejected(Command::CreateTasks(vec![job(2, "q"), spec]));
    assert_eq!((refused.code, refused.field.as_deref()), (RejectionCode::InvalidValue, Some("tasks[1].tags[2]")));
}

/// A new task's name has no control character, as tags and idempotency keys have none (found
/// by a black-box review: a NUL went into the log and came back in every read). A log written
/// before the rule still folds: the rule is the command's, not the event's.
#[test]
fn a_task_name_with_a_control_character_is_refused_and_an_old_one_still_folds() {
    let mut s = Scenario::new();
    for name in ["a\u{0}b", "a\nb", "tab\there", "a\u{7f}b", "a\u{85}b"] {
        let mut spec = job(1, "q");
        spec.name = name.into();
        let refused = s.rejected(Command::CreateTask(spec.clone()));
        assert_eq!((refused.code, refused.field.as_deref()), (RejectionCode::InvalidValue, Some("name")), "{name:?}");
        let refused = s.rejected(Command::CreateTasks(vec![job(2, "q"), spec]));
        assert_eq!(refused.field.as_deref(), Some("tasks[1].name"), "{name:?}");
    }
    assert_eq!(s.ledger.live_task_count(), 0, "nothing was created");
    let mut spec = job(3, "q");
    spec.name = "caf\u{e9} \u{2603}".into();
    s.ok(Command::CreateTask(spec));
    let mut old = job(4, "q");
    old.name = "written\u{0}before".into();
    s.ledger.apply(&Event::TaskCreated { spec: old, at: s.now }).expect("an old log's name still folds");
    assert_eq!(s.ledger.task(&task_id(4)).map(|t| &*t.name), Some("written\u{0}before"));
}

#[test]
fn retryable_failures_back_off_then_exhaust_into_the_dead_letter_queue() {
    let mut s = Scenario::new();
    let mut spec = job(1, "q");
    spec.steps[0].max_attempts = 2;
    spec.steps[0].retry = RetryPolicy { base_ms: 1_000, multiplier_permille: 2000, cap_ms: 60_000, jitter_pct: 0 };
    s.ok(Command::CreateTask(spec));
    let e1 = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    let failed = only(s.ok(fail(task_id(1), "run", e1, true)));
    let Event::StepFailed { outcome: FailOutcome::Retry { retry_at, delay_ms }, .. } = failed else {
        panic!("{failed:?}")
    };
    assert_eq!((delay_ms, retry_at), (1_000, s.now.plus_ms(1_000)));
    assert_eq!(task_state(&s, task_id(1)), Some(TaskState::WaitingForRetry));
    assert_eq!(
        s.rejected(Command::RetryDue { task: task_id(1), step: step_name("run") }).code,
        RejectionCode::InvalidState
    );
    s.advance_ms(1_000);
    assert!(matches!(only(s.fire_timers()), Event::StepRetryDue { .. }));
    assert_eq!(task_state(&s, task_id(1)), Some(TaskState::InProgress));
    let claimed = only(s.ok(claim("q", "w", 1)));
    assert!(matches!(claimed, Event::StepClaimed { attempt: Attempt(2), epoch: LeaseEpoch(2), .. }));
    let last = only(s.ok(fail(task_id(1), "run", 2, true)));
    assert!(matches!(last, Event::StepFailed { outcome: FailOutcome::DeadLetter, .. }), "attempts exhausted");
    assert_eq!(step_state(&s, task_id(1), "run"), StepState::Error);
    assert_eq!(task_state(&s, task_id(1)), Some(TaskState::BlockedByFailures));
}

#[test]
fn a_permanent_failure_dead_letters_at_once_and_retry_may_reset_attempts() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(job(1, "q")));
    let e = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    let failed = only(s.ok(fail(task_id(1), "run", e, false)));
    assert!(matches!(failed, Event::StepFailed { outcome: FailOutcome::DeadLetter, retryable: false, .. }));
    // Attempts remain (1 of 3 used), so a plain retry is allowed.
    s.ok(Command::RetryStep { task: task_id(1), step: step_name("run"), reset_attempts: false });
    assert_eq!(step_state(&s, task_id(1), "run"), StepState::Enqueued);
    assert_eq!(task_state(&s, task_id(1)), Some(TaskState::InProgress));
    let wrong = s.rejected(Command::RetryStep { task: task_id(1), step: step_name("run"), reset_attempts: false });
    assert_eq!(wrong.code, RejectionCode::InvalidState);

    let mut s = Scenario::new();
    let mut spec = job(2, "q");
    spec.steps[0].max_attempts = 1;
    s.ok(Command::CreateTask(spec));
    let e = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    s.ok(fail(task_id(2), "run", e, true));
    let exhausted = s.rejected(Command::RetryStep { task: task_id(2), step: step_name("run"), reset_attempts: false });
    assert_eq!((exhausted.code, exhausted.field.as_deref()), (RejectionCode::InvalidState, Some("reset_attempts")));
    s.ok(Command::RetryStep { task: task_id(2), step: step_name("run"), reset_attempts: true });
    assert!(matches!(
        only(s.ok(claim("q", "w", 1))),
        Event::StepClaimed { attempt: Attempt(1), epoch: LeaseEpoch(2), .. }
    ));
}

#[test]
fn lease_expiry_counts_as_a_failed_attempt() {
    let mut s = Scenario::new();
    let mut spec = job(1, "q");
    spec.steps[0].max_attempts = 1;
    spec.steps[0].lease_ms = 1_000;
    s.ok(Command::CreateTask(spec));
    let e = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    assert_eq!(
        s.rejected(Command::ExpireLease { task: task_id(1), step: step_name("run"), epoch: LeaseEpoch(e) }).code,
        RejectionCode::InvalidState,
        "not due yet"
    );
    s.advance_ms(1_000);
    assert!(matches!(only(s.fire_timers()), Event::LeaseExpired { outcome: FailOutcome::DeadLetter, .. }));
    assert_eq!(task_state(&s, task_id(1)), Some(TaskState::BlockedByFailures));
}

#[test]
fn release_gives_the_step_and_its_attempt_back() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(job(1, "q")));
    let e = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    s.ok(Command::ReleaseStep { lease: lease(task_id(1), "run", e) });
    assert_eq!(step_state(&s, task_id(1), "run"), StepState::Enqueued);
    assert!(matches!(
        only(s.ok(claim("q", "w2", 1))),
        Event::StepClaimed { attempt: Attempt(1), epoch: LeaseEpoch(2), .. }
    ));
    assert_eq!(s.rejected(Command::ReleaseStep { lease: lease(task_id(1), "run", e) }).code, RejectionCode::LeaseLost);
}

#[test]
fn a_lease_holder_may_add_steps_at_a_decision_point() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(workflow(1, "q", vec![step("decide", "h", &[])])));
    let e = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    let add = |epoch, steps| Command::AddSteps { lease: lease(task_id(1), "decide", epoch), steps };
    assert_eq!(s.rejected(add(e + 1, vec![step("x", "h", &[])])).code, RejectionCode::LeaseLost);
    assert_eq!(s.rejected(add(e, vec![])).code, RejectionCode::NoSteps);
    assert_eq!(s.rejected(add(e, vec![step("decide", "h", &[])])).code, RejectionCode::DuplicateStep);
    assert_eq!(
        s.rejected(add(e, vec![step("x", "h", &["y"]), step("y", "h", &["x"])])).code,
        RejectionCode::DependencyCycle
    );
    let twice = s.rejected(add(e, vec![step("x", "h", &["decide", "decide"])]));
    assert_eq!((twice.code, twice.field.as_deref()), (RejectionCode::InvalidValue, Some("steps[0].depends_on[1]")));
    s.ok(add(e, vec![step("after", "h", &["decide"]), step("now", "h", &[])]));
    assert_eq!(step_state(&s, task_id(1), "after"), StepState::Pending);
    assert_eq!(step_state(&s, task_id(1), "now"), StepState::Enqueued);
    s.ok(complete(task_id(1), "decide", e));
    assert_eq!(step_state(&s, task_id(1), "after"), StepState::Enqueued);
}

#[test]
fn an_operator_resolves_steps_and_unblocks_dependents() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(workflow(1, "q", vec![step("a", "h", &[]), step("b", "h", &["a"])])));
    let e = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    let busy =
        s.rejected(Command::ResolveStep { task: task_id(1), step: step_name("a"), note: text("n"), result: None });
    assert_eq!(busy.code, RejectionCode::InvalidState);
    s.ok(fail(task_id(1), "a", e, false));
    assert_eq!(task_state(&s, task_id(1)), Some(TaskState::BlockedByFailures));
    s.ok(Command::ResolveStep {
        task: task_id(1),
        step: step_name("a"),
        note: text("fixed by hand"),
        result: Some(Json::null()),
    });
    assert_eq!(step_state(&s, task_id(1), "a"), StepState::ResolvedManually);
    assert_eq!(step_state(&s, task_id(1), "b"), StepState::Enqueued);
    let again =
        s.rejected(Command::ResolveStep { task: task_id(1), step: step_name("a"), note: text("n"), result: None });
    assert_eq!(again.code, RejectionCode::InvalidState);
    s.ok(Command::ResolveStep { task: task_id(1), step: step_name("b"), note: text("skip"), result: None });
    assert_eq!(task_state(&s, task_id(1)), None, "resolved manually is terminal");
    assert!(matches!(s.log.last(), Some(Event::StepResolved { .. })));
}

#[test]
fn give_up_only_applies_to_blocked_tasks_and_cancel_stops_everything() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(workflow(1, "q", vec![step("a", "h", &[]), step("b", "h", &[])])));
    let give_up = Command::GiveUpTask { task: task_id(1), reason: Some(text("no")) };
    assert_eq!(s.rejected(give_up.clone()).code, RejectionCode::InvalidState);
    let claims = s.ok(claim("q", "w", 1));
    let e = claimed_epoch(&claims[0]);
    s.ok(fail(task_id(1), "a", e, false));
    s.ok(give_up);
    assert_eq!(task_state(&s, task_id(1)), None);
    assert!(s.ledger.ready_count(&ns("q")) == 0, "b left the queue");

    s.ok(Command::CreateTask(job(2, "q")));
    let e = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    s.ok(Command::CancelTask { task: task_id(2), reason: None });
    assert_eq!(s.rejected(complete(task_id(2), "run", e)).code, RejectionCode::TaskNotFound);
    assert_eq!(s.ledger.in_progress(&ns("q")), 0);
    assert_eq!(s.rejected(Command::CancelTask { task: task_id(2), reason: None }).code, RejectionCode::TaskNotFound);
}

#[test]
fn idempotency_keys_return_the_original_and_write_nothing() {
    let mut s = Scenario::new();
    let mut spec = job(1, "q");
    spec.idempotency_key = Some(IdempotencyKey::new("order-7").unwrap());
    s.ok(Command::CreateTask(spec.clone()));
    let mut repeat = spec.clone();
    repeat.id = task_id(2);
    assert!(s.ok(Command::CreateTask(repeat.clone())).is_empty());
    assert_eq!(s.ledger.idempotent_task(&ns("q"), spec.idempotency_key.as_ref().unwrap(), s.now), Some(task_id(1)));
    repeat.namespace = ns("other");
    assert_eq!(s.ok(Command::CreateTask(repeat)).len(), 1, "keys are per namespace");

    // Inside a batch, a repeated key is a repeat of the first.
    let mut a = job(10, "b");
    a.idempotency_key = Some(IdempotencyKey::new("k").unwrap());
    let mut b = job(11, "b");
    b.idempotency_key = a.idempotency_key.clone();
    assert_eq!(s.ok(Command::CreateTasks(vec![a, b, job(12, "b")])).len(), 2);

    // Keys expire after the retention window, measured in event time.
    s.now = s.now.plus_ms((IDEMPOTENCY_RETENTION_US / 1000) as u64 + 1);
    assert_eq!(s.ledger.idempotent_task(&ns("q"), spec.idempotency_key.as_ref().unwrap(), s.now), None);
    let mut again = spec.clone();
    again.id = task_id(21);
    assert_eq!(s.ok(Command::CreateTask(again)).len(), 1, "an expired key creates a new task");
}

#[test]
fn batches_are_all_or_nothing_with_a_field_path() {
    let mut s = Scenario::new();
    let mut bad = job(2, "q");
    bad.steps[0].lease_ms = 1;
    let err = s.rejected(Command::CreateTasks(vec![job(1, "q"), bad]));
    assert_eq!((err.code, err.field.as_deref()), (RejectionCode::InvalidLease, Some("tasks[1].steps[0].lease_ms")));
    assert_eq!(s.ledger.live_task_count(), 0);
    assert_eq!(s.rejected(Command::CreateTasks(vec![])).code, RejectionCode::InvalidBatch);
    let too_many: Vec<TaskSpec> = (0..=MAX_BATCH_TASKS as u64).map(|n| job(n, "q")).collect();
    assert_eq!(s.rejected(Command::CreateTasks(too_many)).code, RejectionCode::InvalidBatch);
    assert_eq!(s.rejected(Command::CreateTasks(vec![job(1, "q"), job(1, "q")])).code, RejectionCode::TaskExists);
}

/// Each rejection code, with the smallest command that earns it.
#[test]
fn every_rejection_code_is_reachable_and_changes_nothing() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(job(1, "q")));
    let e = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    let digest = s.ledger.digest();
    let with = |f: &dyn Fn(&mut TaskSpec)| {
        let mut spec = job(99, "q");
        f(&mut spec);
        Command::CreateTask(spec)
    };
    let huge = "x".repeat(Json::MAX_BYTES + 1);
    let cases: Vec<(Command, RejectionCode, Option<&str>)> = vec![
        (with(&|t| t.name.clear()), RejectionCode::InvalidValue, Some("name")),
        (with(&|t| t.steps[0].max_attempts = 0), RejectionCode::InvalidValue, Some("steps[0].max_attempts")),
        (with(&|t| t.steps.clear()), RejectionCode::NoSteps, Some("steps")),
        (
            with(&|t| t.steps = (0..=MAX_STEPS_PER_TASK).map(|i| step(&format!("s{i}"), "h", &[])).collect()),
            RejectionCode::TooManySteps,
            Some("steps"),
        ),
        (with(&|t| t.steps.push(step("run", "h", &[]))), RejectionCode::DuplicateStep, Some("steps[1].name")),
        (
            with(&|t| t.steps[0].depends_on.push(step_name("ghost"))),
            RejectionCode::UnknownDependency,
            Some("steps[0].depends_on[0]"),
        ),
        (
            // A limit, not an unknown name: every one of the 65 exists.
            with(&|t| {
                let names: Vec<String> = (0..=MAX_DEPENDENCIES_PER_STEP).map(|i| format!("s{i}")).collect();
                t.steps = names.iter().map(|name| step(name, "h", &[])).collect();
                t.steps.push(step("last", "h", &names.iter().map(String::as_str).collect::<Vec<_>>()));
            }),
            RejectionCode::InvalidValue,
            Some("steps[65].depends_on"),
        ),
        (
            with(&|t| t.steps[0].depends_on.push(step_name("run"))),
            RejectionCode::DependencyCycle,
            Some("steps[0].depends_on"),
        ),
        (with(&|t| t.steps[0].lease_ms = LEASE_MS_MAX + 1), RejectionCode::InvalidLease, Some("steps[0].lease_ms")),
        (
            with(&|t| t.steps[0].retry.jitter_pct = 101),
            RejectionCode::InvalidRetryPolicy,
            Some("steps[0].retry.jitter_pct"),
        ),
        (
            with(&|t| t.steps[0].retry.multiplier_permille = 999),
            RejectionCode::InvalidRetryPolicy,
            Some("steps[0].retry.multiplier_permille"),
        ),
        (Command::CreateTasks(vec![]), RejectionCode::InvalidBatch, Some("tasks")),
        (Command::CreateTask(job(1, "q")), RejectionCode::TaskExists, Some("id")),
        (Command::CancelTask { task: task_id(5), reason: None }, RejectionCode::TaskNotFound, Some("task")),
        (complete(task_id(1), "nope", e), RejectionCode::StepNotFound, Some("step")),
        (complete(task_id(1), "run", e + 7), RejectionCode::LeaseLost, Some("epoch")),
        (
            Command::RetryStep { task: task_id(1), step: step_name("run"), reset_attempts: true },
            RejectionCode::InvalidState,
            Some("step"),
        ),
        (claim("q", "w", 0), RejectionCode::InvalidClaim, Some("max")),
        (
            Command::ClaimSteps { namespaces: vec![], worker: worker("w"), max: 1, lease_ms: None, handlers: vec![] },
            RejectionCode::InvalidClaim,
            Some("namespaces"),
        ),
        (
            Command::ClaimSteps {
                namespaces: vec![ns("q")],
                worker: worker("w"),
                max: 1,
                lease_ms: Some(5),
                handlers: vec![],
            },
            RejectionCode::InvalidLease,
            Some("lease_ms"),
        ),
    ];
    let mut seen = BTreeSet::new();
    // An oversized payload cannot even be built (or deserialized), so no
    // command can carry one.
    let too_large = Json::new("payload", huge.clone()).unwrap_err();
    assert_eq!((too_large.code, too_large.field.as_deref()), (RejectionCode::PayloadTooLarge, Some("payload")));
    let json_err = serde_json::from_str::<Json>(&serde_json::to_string(&huge).unwrap()).unwrap_err();
    assert!(json_err.to_string().contains("payload_too_large"), "{json_err}");
    seen.insert(too_large.code.as_str());
    for (command, code, field) in cases {
        let kind = command.kind();
        let rejection = match s.ledger.decide(&command, s.now) {
            Ok(events) => panic!("{kind} accepted: {events:?}"),
            Err(r) => r,
        };
        assert_eq!((rejection.code, rejection.field.as_deref()), (code, field), "{kind}: {rejection}");
        assert!(!rejection.message.is_empty());
        seen.insert(rejection.code.as_str());
    }
    let scoped = s.ledger.check_scope(&claim("q", "w", 1), &[ns("other")]).unwrap_err();
    assert_eq!((scoped.code, scoped.field.as_deref()), (RejectionCode::NamespaceForbidden, Some("namespace")));
    seen.insert(scoped.code.as_str());
    let hidden = s.ledger.check_scope(&complete(task_id(1), "run", e), &[ns("other")]).unwrap_err();
    assert_eq!(hidden.code, RejectionCode::TaskNotFound, "out-of-scope tasks look absent");
    assert!(s.ledger.check_scope(&complete(task_id(1), "run", e), &[ns("q")]).is_ok());
    assert_eq!(s.ledger.digest(), digest, "rejections change nothing");
    let all: BTreeSet<&str> = RejectionCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(seen, all, "every code is covered");
}

/// Runs one history that passes through every allowed step and task
/// transition, recording each change, and checks the set observed equals the
/// set the state machines allow.
#[test]
fn every_allowed_transition_occurs_and_no_other() {
    use std::collections::HashMap;
    let mut s = Scenario::new();
    let mut step_seen = BTreeSet::new();
    let mut task_seen = BTreeSet::new();
    let mut observe = |s: &mut Scenario, command: Command| {
        let before: HashMap<TaskId, (TaskState, Vec<StepState>)> =
            s.ledger.tasks().map(|t| (t.id, (t.state, t.steps.iter().map(|x| x.state).collect()))).collect();
        let events = s.ledger.decide(&command, s.now).unwrap_or_else(|r| panic!("{}: {r}", command.kind()));
        let mut last_events = Vec::new();
        for event in &events {
            // Removal from memory hides the terminal state: reconstruct it.
            let id = event.task();
            s.ledger.apply(event).unwrap();
            last_events.push((id, event.clone()));
        }
        for (id, (state, steps)) in &before {
            let (after_state, after_steps) = match s.ledger.task(id) {
                Some(t) => (t.state, t.steps.iter().map(|x| x.state).collect::<Vec<_>>()),
                None => terminal_after(&last_events, *id, steps),
            };
            if after_state != *state {
                task_seen.insert((*state, after_state));
            }
            for (a, b) in steps.iter().zip(after_steps.iter()) {
                if a != b {
                    step_seen.insert((*a, *b));
                }
            }
        }
        events
    };
    let t = |n| task_id(n);
    // Pending -> Enqueued -> InProgress -> Complete; tasks Pending -> InProgress -> Complete.
    observe(&mut s, Command::CreateTask(workflow(1, "q", vec![step("a", "h", &[]), step("b", "h", &["a"])])));
    observe(&mut s, claim("q", "w", 1));
    observe(&mut s, complete(t(1), "a", 1));
    observe(&mut s, claim("q", "w", 1));
    observe(&mut s, complete(t(1), "b", 1));
    // InProgress -> Enqueued (release), -> WaitingForRetry -> Enqueued, -> Error.
    let mut spec = workflow(2, "q", vec![step("a", "h", &[]), step("b", "h", &["a"])]);
    spec.steps[0].retry = RetryPolicy { base_ms: 10, multiplier_permille: 1000, cap_ms: 10, jitter_pct: 0 };
    observe(&mut s, Command::CreateTask(spec));
    observe(&mut s, claim("q", "w", 1));
    observe(&mut s, Command::ReleaseStep { lease: lease(t(2), "a", 1) });
    observe(&mut s, claim("q", "w", 1));
    observe(&mut s, fail(t(2), "a", 2, true)); // task InProgress -> WaitingForRetry
    s.advance_ms(10);
    observe(&mut s, Command::RetryDue { task: t(2), step: step_name("a") }); // WaitingForRetry -> InProgress
    observe(&mut s, claim("q", "w", 1));
    observe(&mut s, fail(t(2), "a", 3, false)); // -> Error; task -> BlockedByFailures
    observe(&mut s, Command::RetryStep { task: t(2), step: step_name("a"), reset_attempts: false }); // Error -> Enqueued
    observe(&mut s, claim("q", "w", 1));
    observe(&mut s, fail(t(2), "a", 4, false));
    observe(&mut s, Command::ResolveStep { task: t(2), step: step_name("a"), note: text("n"), result: None }); // Error -> Resolved
    observe(&mut s, Command::ResolveStep { task: t(2), step: step_name("b"), note: text("n"), result: None }); // Enqueued -> Resolved; task InProgress -> Resolved
    // Pending -> Resolved, Pending -> Cancelled, Enqueued -> Cancelled; task Pending -> Cancelled / Resolved.
    observe(&mut s, Command::CreateTask(workflow(3, "q", vec![step("a", "h", &[]), step("b", "h", &["a"])])));
    observe(&mut s, Command::CancelTask { task: t(3), reason: None });
    observe(&mut s, Command::CreateTask(workflow(4, "q", vec![step("a", "h", &["b"]), step("b", "h", &[])])));
    observe(&mut s, Command::ResolveStep { task: t(4), step: step_name("a"), note: text("n"), result: None });
    observe(&mut s, Command::ResolveStep { task: t(4), step: step_name("b"), note: text("n"), result: None });
    // InProgress -> Cancelled (step and task); WaitingForRetry -> Cancelled / Resolved; task WaitingForRetry -> Cancelled / Resolved.
    observe(&mut s, Command::CreateTask(job(5, "r")));
    observe(&mut s, claim("r", "w", 1));
    observe(&mut s, Command::CancelTask { task: t(5), reason: None });
    for (n, resolve) in [(6, false), (7, true)] {
        observe(&mut s, Command::CreateTask(job(n, "r")));
        observe(&mut s, claim("r", "w", 1));
        observe(&mut s, fail(t(n), "run", 1, true));
        observe(
            &mut s,
            if resolve {
                Command::ResolveStep { task: t(n), step: step_name("run"), note: text("n"), result: None }
            } else {
                Command::CancelTask { task: t(n), reason: None }
            },
        );
    }
    // Blocked -> WaitingForRetry / Cancelled / Error / Resolved, Blocked -> InProgress; WaitingForRetry -> Resolved for steps.
    let mut spec = workflow(8, "s", vec![step("a", "h", &[]), step("b", "h", &[])]);
    spec.steps[1].retry = RetryPolicy { base_ms: 10_000, multiplier_permille: 1000, cap_ms: 10_000, jitter_pct: 0 };
    observe(&mut s, Command::CreateTask(spec));
    observe(&mut s, claim("s", "w", 2));
    observe(&mut s, fail(t(8), "b", 1, true));
    observe(&mut s, fail(t(8), "a", 1, false)); // -> Blocked (b waiting)
    observe(&mut s, Command::RetryStep { task: t(8), step: step_name("a"), reset_attempts: false }); // Blocked -> WaitingForRetry
    observe(&mut s, Command::CancelTask { task: t(8), reason: None });
    for (n, end) in [(9, 0), (10, 1), (11, 2)] {
        observe(&mut s, Command::CreateTask(job(n, "u")));
        observe(&mut s, claim("u", "w", 1));
        observe(&mut s, fail(t(n), "run", 1, false));
        observe(
            &mut s,
            match end {
                0 => Command::GiveUpTask { task: t(n), reason: None },
                1 => Command::CancelTask { task: t(n), reason: None },
                _ => Command::ResolveStep { task: t(n), step: step_name("run"), note: text("n"), result: None },
            },
        );
    }
    observe(&mut s, Command::CreateTask(job(12, "v")));
    observe(&mut s, claim("v", "w", 1));
    observe(&mut s, fail(t(12), "run", 1, false));
    observe(&mut s, Command::RetryStep { task: t(12), step: step_name("run"), reset_attempts: false }); // Blocked -> InProgress

    let allowed_steps: BTreeSet<_> = StepState::ALL
        .iter()
        .flat_map(|a| StepState::ALL.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| a.can_become(*b))
        .collect();
    let allowed_tasks: BTreeSet<_> = TaskState::ALL
        .iter()
        .flat_map(|a| TaskState::ALL.iter().map(move |b| (*a, *b)))
        .filter(|(a, b)| a.can_become(*b))
        .collect();
    assert_eq!(step_seen.difference(&allowed_steps).count(), 0, "step transitions outside the table");
    assert_eq!(task_seen.difference(&allowed_tasks).count(), 0, "task transitions outside the table");
    assert_eq!(allowed_steps.difference(&step_seen).collect::<Vec<_>>(), Vec::<&(StepState, StepState)>::new());
    assert_eq!(allowed_tasks.difference(&task_seen).collect::<Vec<_>>(), Vec::<&(TaskState, TaskState)>::new());
}

/// The final state of a task that left memory, reconstructed from the events
/// that ended it (the ledger no longer holds it).
fn terminal_after(events: &[(Option<TaskId>, Event)], id: TaskId, before: &[StepState]) -> (TaskState, Vec<StepState>) {
    let mut steps = before.to_vec();
    let mut given_up = false;
    let mut cancelled = false;
    for (task, event) in events.iter().filter(|(t, _)| *t == Some(id)) {
        let _ = task;
        match event {
            Event::StepCompleted { step, .. } => steps[step.get()] = StepState::Complete,
            Event::StepResolved { step, .. } => steps[step.get()] = StepState::ResolvedManually,
            Event::TaskCancelled { .. } => cancelled = true,
            Event::TaskGivenUp { .. } => given_up = true,
            _ => {}
        }
    }
    if cancelled || given_up {
        for s in steps.iter_mut().filter(|s| !s.is_terminal()) {
            *s = StepState::Cancelled;
        }
    }
    (TaskState::derive(steps.iter().copied(), true, cancelled, given_up), steps)
}

#[test]
fn a_retaining_ledger_keeps_finished_tasks_for_views_of_history() {
    let mut s = Scenario::new();
    s.ok(Command::CreateTask(job(1, "q")));
    let e = claimed_epoch(&only(s.ok(claim("q", "w", 1))));
    s.ok(complete(task_id(1), "run", e));
    let mut view = Ledger::retaining_terminal_tasks();
    for event in &s.log {
        view.apply(event).unwrap();
    }
    let task = view.task(&task_id(1)).expect("kept");
    assert_eq!(task.state, TaskState::Complete);
    assert_eq!(task.steps[0].state, StepState::Complete);
    assert_eq!(task.steps[0].result, Some(Json::null()));
}

/// `Ledger::repeats`: a command sent again under a used command id is judged against the
/// original's events, so another worker, namespace, step, epoch, result or queue is another
/// command (found by a black-box check: a claim repeated by another worker was handed the
/// original's live lease).
#[test]
fn a_command_repeats_only_the_command_its_events_came_from() {
    let mut s = Scenario::new();
    let spec = workflow(1, "etl", vec![step("a", "h", &[]), step("b", "g", &[])]);
    s.ok(Command::CreateTask(spec));
    s.ok(Command::CreateTask(job(2, "mail")));
    let with = |command: &Command, change: &dyn Fn(&mut Command)| {
        let mut changed = command.clone();
        change(&mut changed);
        changed
    };

    let claim_ab = claim("etl", "w", 2);
    let claimed = s.ok(claim_ab.clone());
    assert_eq!(claimed.len(), 2);
    assert!(s.ledger.repeats(&claim_ab, &claimed));
    let claim_of = |namespaces: &[&str], worker_name: &str, max: u32, lease_ms: Option<u32>, handlers: &[&str]| {
        Command::ClaimSteps {
            namespaces: namespaces.iter().map(|n| ns(n)).collect(),
            worker: worker(worker_name),
            max,
            lease_ms,
            handlers: handlers.iter().map(|h| HandlerName::new(h).unwrap()).collect(),
        }
    };
    assert_eq!(claim_of(&["etl"], "w", 2, None, &[]), claim_ab);
    for other in [
        claim_of(&["etl"], "v", 2, None, &[]),
        claim_of(&["mail"], "w", 2, None, &[]),
        claim_of(&["etl"], "w", 1, None, &[]),
        claim_of(&["etl"], "w", 2, Some(5_000), &[]),
        claim_of(&["etl"], "w", 2, None, &["g"]),
    ] {
        assert!(!s.ledger.repeats(&other, &claimed), "{other:?}");
    }
    let wider = claim_of(&["etl", "mail"], "w", 5, None, &[]);
    assert!(s.ledger.repeats(&wider, &claimed), "a wider claim could have handed out the same steps");

    let done = complete(task_id(1), "a", 1);
    let completed = s.ok(done.clone());
    assert!(s.ledger.repeats(&done, &completed));
    for other in [complete(task_id(1), "b", 1), complete(task_id(1), "a", 2), complete(task_id(2), "a", 1)] {
        assert!(!s.ledger.repeats(&other, &completed), "{other:?}");
    }
    let other_result = with(&done, &|c| {
        if let Command::CompleteStep { result, .. } = c {
            *result = Json::new("result", r#"{"other":true}"#).unwrap();
        }
    });
    assert!(!s.ledger.repeats(&other_result, &completed));

    let beat = Command::Heartbeat { lease: lease(task_id(1), "b", 1), lease_ms: Some(2_000) };
    let extended = s.ok(beat.clone());
    assert!(s.ledger.repeats(&beat, &extended));
    assert!(
        !s.ledger.repeats(&Command::Heartbeat { lease: lease(task_id(1), "b", 1), lease_ms: Some(3_000) }, &extended)
    );
    assert!(s.ledger.repeats(&Command::Heartbeat { lease: lease(task_id(1), "b", 1), lease_ms: None }, &extended));

    let pause = Command::PauseQueue { namespace: ns("etl") };
    let paused = s.ok(pause.clone());
    assert!(s.ledger.repeats(&pause, &paused));
    assert!(!s.ledger.repeats(&Command::PauseQueue { namespace: ns("mail") }, &paused));
    assert!(!s.ledger.repeats(&Command::ResumeQueue { namespace: ns("etl") }, &paused));
    let limit = Command::SetQueueConcurrency { namespace: ns("mail"), limit: Some(3) };
    let limited = s.ok(limit.clone());
    assert!(s.ledger.repeats(&limit, &limited));
    assert!(!s.ledger.repeats(&Command::SetQueueConcurrency { namespace: ns("mail"), limit: None }, &limited));

    let cancel = Command::CancelTask { task: task_id(2), reason: None };
    let cancelled = s.ok(cancel.clone());
    assert!(s.ledger.repeats(&cancel, &cancelled));
    assert!(!s.ledger.repeats(&Command::CancelTask { task: task_id(2), reason: Some(text("why")) }, &cancelled));
}
