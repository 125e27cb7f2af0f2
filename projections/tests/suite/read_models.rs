//! Each read model against the rows expected for the fixture history
//! (`crate::support::fixture_history`), built by the real runtime following a live
//! feed; plus the queries' filters and pagination, restart from checkpoints,
//! and a rebuild that swaps while the old tables keep serving.

use std::time::Duration;

use crate::support::{TestLog, fixture_history};
use domain::testkit::task_id;
use projections::query::{self, AuditFilter, PageRequest, PlannedView, TaskFilter};
use projections::{Projections, ProjectorKind, RuntimeConfig, Store, digest};

async fn started(log: &TestLog, store: &Store) -> Projections {
    let projections =
        Projections::start(store.clone(), log.reader(), log.feed.clone(), RuntimeConfig::default()).await.unwrap();
    assert!(projections.wait_for_seq(log.head(), Duration::from_secs(20)).await, "{:?}", projections.status());
    projections
}

/// Appends the creation of job `n` in namespace `mail`, after every fixture event.
fn append_job(log: &mut TestLog, n: u64) {
    log.append(
        "producer",
        &[domain::Event::TaskCreated {
            spec: domain::testkit::job(n, "mail"),
            at: domain::Timestamp::from_micros(i64::MAX / 2),
        }],
    );
}

fn uuid(n: u64) -> uuid::Uuid {
    *task_id(n).as_uuid()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_model_has_the_expected_rows_for_the_fixture_history() {
    let mut log = TestLog::new();
    log.append_all(&fixture_history().history);
    let store = Store::open_sqlite(log.path().join("projections.sqlite")).await.unwrap();
    let projections = started(&log, &store).await;

    // tasks and task_steps
    let t1 = query::task(&store, uuid(1)).await.unwrap().unwrap();
    assert_eq!(t1.summary.state, "complete");
    assert_eq!(t1.tags, ["vip"]);
    assert_eq!((t1.summary.step_count, t1.summary.steps_done), (1, 1));
    assert_eq!(t1.steps[0].state, "complete");
    assert_eq!(t1.steps[0].worker, None);
    assert_eq!(t1.steps[0].attempts, 1);
    assert_eq!(t1.steps[0].result.as_deref(), Some("null"));
    let t2 = query::task(&store, uuid(2)).await.unwrap().unwrap();
    assert_eq!(t2.summary.state, "resolved_manually");
    let states: Vec<(&str, &str, &str)> =
        t2.steps.iter().map(|s| (s.name.as_str(), s.state.as_str(), s.depends_on.as_str())).collect();
    assert_eq!(states, [("a", "complete", ""), ("b", "resolved_manually", "a"), ("c", "complete", "a")]);
    assert_eq!(t2.steps[1].last_error.as_deref(), Some("boom"));
    assert_eq!(t2.steps[1].resolution_note.as_deref(), Some("loaded by hand"));
    assert_eq!(t2.steps[1].result.as_deref(), Some("{\"rows\":3}"));
    let t3 = query::task(&store, uuid(3)).await.unwrap().unwrap();
    assert_eq!(t3.summary.state, "blocked_by_failures");
    assert_eq!((t3.steps[0].state.as_str(), t3.steps[0].attempts), ("error", 2));
    let t4 = query::task(&store, uuid(4)).await.unwrap().unwrap();
    assert_eq!((t4.summary.state.as_str(), t4.summary.end_reason.as_deref()), ("cancelled", Some("not needed")));
    assert_eq!(t4.steps[0].state, "cancelled");
    assert!(query::task(&store, uuid(99)).await.unwrap().is_none());

    // queue: only job 5's step is not terminal.
    let queue = query::queue(&store, None, None, &PageRequest::default()).await.unwrap();
    assert_eq!(queue.items.len(), 1);
    let entry = &queue.items[0];
    assert_eq!((entry.task_id, entry.state.as_str(), entry.priority), (uuid(5), "enqueued", 5));
    assert_eq!(entry.sort_key_us, entry.enqueued_at_us.unwrap() - 5_000_000);
    let settings = query::queue_settings(&store).await.unwrap();
    assert_eq!(settings.len(), 1);
    assert_eq!(
        (settings[0].namespace.as_str(), settings[0].paused, settings[0].concurrency_limit),
        ("etl", true, Some(4))
    );

    // dead letters: job 3 (blocked) is there; workflow 2's b was resolved and left.
    let dead = query::dead_letters(&store, None, &PageRequest::default()).await.unwrap();
    assert_eq!(dead.items.len(), 1);
    assert_eq!((dead.items[0].task_id, dead.items[0].attempts), (uuid(3), 2));
    assert_eq!(dead.items[0].last_error.as_deref(), Some("boom"));

    // workers
    let workers = query::workers(&store, &PageRequest::default()).await.unwrap().items;
    let w: Vec<(&str, i64, i64, i64, i64, i64)> = workers
        .iter()
        .map(|w| (w.worker.as_str(), w.leases_held, w.claims, w.completed, w.failed, w.expired))
        .collect();
    assert_eq!(w, [("w1", 0, 4, 3, 1, 0), ("w2", 0, 2, 0, 1, 1)]);

    // dashboard
    let dash = query::dashboard(&store, None, None).await.unwrap();
    let count = |ns: &str, kind: &str, state: &str| {
        dash.counts.iter().find(|c| c.namespace == ns && c.kind == kind && c.state == state).map_or(0, |c| c.count)
    };
    assert_eq!(count("mail", "task", "complete"), 1);
    assert_eq!(count("mail", "task", "blocked_by_failures"), 1);
    assert_eq!(count("mail", "task", "cancelled"), 1);
    assert_eq!(count("mail", "task", "pending"), 1);
    assert_eq!(count("etl", "task", "resolved_manually"), 1);
    assert_eq!(count("etl", "step", "complete"), 2);
    assert_eq!(count("mail", "step", "enqueued"), 1);
    assert!(dash.counts.iter().all(|c| c.count > 0));
    let total = |f: fn(&query::MinuteThroughput) -> i64| dash.throughput.iter().map(f).sum::<i64>();
    assert_eq!(total(|t| t.created), 5);
    assert_eq!(total(|t| t.completed), 3);
    assert_eq!(total(|t| t.failed), 3);
    assert_eq!(total(|t| t.retried), 1);
    assert_eq!(total(|t| t.dead_lettered), 2);
    let runs: i64 = dash.latency.iter().filter(|l| l.kind == "run").map(|l| l.count).sum();
    let waits: i64 = dash.latency.iter().filter(|l| l.kind == "wait").map(|l| l.count).sum();
    assert_eq!((waits, runs), (6, 5));
    assert!(dash.latency.iter().any(|l| l.namespace == "mail" && l.kind == "run" && l.le_ms == 200));

    // audit_log: one row per event, with the record's metadata.
    let audit = query::audit_log(&store, &AuditFilter::default(), &PageRequest::first(500)).await.unwrap();
    assert_eq!(audit.items.len() as u64, log.head());
    let records = log.reader().read_range(1, log.head(), 1000).unwrap();
    for (row, record) in audit.items.iter().zip(&records) {
        assert_eq!(row.seq as u64, record.seq);
        assert_eq!(row.actor, record.actor);
        assert_eq!(row.command_id, record.command_id);
        assert_eq!(row.recorded_at_us, record.recorded_at_us);
        assert_eq!(row.hash, projections::checkpoint::to_hex(&record.hash));
    }
    assert_eq!(audit.items[1].event_type, "step_claimed");
    assert!(
        audit.items[1].summary.starts_with("step #0 claimed by w1 (attempt 1, epoch 1"),
        "{}",
        audit.items[1].summary
    );
    assert_eq!(audit.items[0].stream, format!("task:{}", task_id(1)));

    // lag
    let status = projections.status().unwrap();
    assert_eq!(status.len(), 4);
    assert!(status.iter().all(|s| s.lag == 0 && s.error.is_none() && s.running), "{status:?}");
    let checkpoints = query::checkpoints(&store, log.head()).await.unwrap();
    assert!(checkpoints.iter().all(|c| c.lag == 0 && c.last_seq == log.head()));
    projections.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_filter_and_page_with_cursors() {
    let mut log = TestLog::new();
    log.append_all(&fixture_history().history);
    let store = Store::open_sqlite(log.path().join("p.sqlite")).await.unwrap();
    let projections = started(&log, &store).await;

    let mail = TaskFilter { namespace: Some("mail".into()), ..TaskFilter::default() };
    let first = query::tasks(&store, &mail, &PageRequest::first(2)).await.unwrap();
    assert_eq!(first.items.iter().map(|t| t.task_id).collect::<Vec<_>>(), [uuid(1), uuid(3)]);
    let second =
        query::tasks(&store, &mail, &PageRequest { after: first.next_cursor.clone(), limit: 2 }).await.unwrap();
    assert_eq!(second.items.iter().map(|t| t.task_id).collect::<Vec<_>>(), [uuid(4), uuid(5)]);
    assert_eq!(second.next_cursor, None);
    let vip = TaskFilter { tag: Some("vip".into()), ..TaskFilter::default() };
    assert_eq!(query::tasks(&store, &vip, &PageRequest::default()).await.unwrap().items.len(), 1);
    let blocked = TaskFilter { state: Some("blocked_by_failures".into()), ..TaskFilter::default() };
    assert_eq!(query::tasks(&store, &blocked, &PageRequest::default()).await.unwrap().items[0].task_id, uuid(3));
    let bad = TaskFilter { state: Some("nope".into()), ..TaskFilter::default() };
    assert!(matches!(
        query::tasks(&store, &bad, &PageRequest::default()).await,
        Err(projections::QueryError::BadFilter(_))
    ));
    let bad_cursor = PageRequest { after: Some("x".into()), limit: 1 };
    assert!(matches!(query::tasks(&store, &mail, &bad_cursor).await, Err(projections::QueryError::BadCursor(_))));

    // audit: by task, by actor, by type, by seq range, paged.
    let by_task = AuditFilter { task: Some(uuid(3)), ..AuditFilter::default() };
    let rows = query::audit_log(&store, &by_task, &PageRequest::first(3)).await.unwrap();
    assert_eq!(rows.items.len(), 3);
    let rest =
        query::audit_log(&store, &by_task, &PageRequest { after: rows.next_cursor.clone(), limit: 100 }).await.unwrap();
    let types: Vec<String> = rows.items.iter().chain(&rest.items).map(|r| r.event_type.clone()).collect();
    assert_eq!(
        types,
        ["task_created", "step_claimed", "lease_expired", "step_retry_due", "step_claimed", "step_failed"]
    );
    let by_actor = AuditFilter { actor: Some("operator".into()), ..AuditFilter::default() };
    assert_eq!(query::audit_log(&store, &by_actor, &PageRequest::default()).await.unwrap().items.len(), 3);
    let by_type = AuditFilter { event_type: Some("task_cancelled".into()), ..AuditFilter::default() };
    assert_eq!(query::audit_log(&store, &by_type, &PageRequest::default()).await.unwrap().items.len(), 1);
    let range = AuditFilter { from_seq: Some(3), to_seq: Some(5), ..AuditFilter::default() };
    let seqs: Vec<i64> =
        query::audit_log(&store, &range, &PageRequest::default()).await.unwrap().items.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [3, 4, 5]);
    crate::support::audit_time_ranges_match_the_log(&store, &log).await;

    // queue by namespace and state
    assert!(query::queue(&store, Some("etl"), None, &PageRequest::default()).await.unwrap().items.is_empty());
    assert_eq!(
        query::queue(&store, Some("mail"), Some("enqueued"), &PageRequest::default()).await.unwrap().items.len(),
        1
    );
    projections.shutdown().await;
}

/// The first half of the fixture history in a log, projected into a SQLite store by projectors
/// since stopped: the log, the store's path, the store, and the second half, to append later.
async fn first_half_projected() -> (TestLog, std::path::PathBuf, Store, Vec<(String, Vec<domain::Event>)>) {
    let mut history = fixture_history().history;
    let late = history.split_off(history.len() / 2);
    let mut log = TestLog::new();
    log.append_all(&history);
    let path = log.path().join("p.sqlite");
    let store = Store::open_sqlite(&path).await.unwrap();
    started(&log, &store).await.shutdown().await;
    (log, path, store, late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_checkpoints_and_a_rebuild_swaps_in_the_same_rows() {
    let (mut log, path, store, late) = first_half_projected().await;
    // A store made by an older version has an index this one no longer keeps, and lacks one it
    // keeps.
    let indexes = |store: Store| async move {
        let Store::Sqlite(pool, _) = &store else { unreachable!("a SQLite store") };
        sqlx::query_scalar::<_, String>("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")
            .fetch_all(pool)
            .await
            .unwrap()
    };
    let Store::Sqlite(pool, _) = &store else { unreachable!("a SQLite store") };
    sqlx::query("CREATE INDEX audit_log_time_g1 ON audit_log (recorded_at_us)").execute(pool).await.unwrap();
    assert!(indexes(store.clone()).await.contains(&"audit_log_time_g1".to_owned()));
    // And lacks one this version keeps (the queue's by state, since 2026-12-07).
    sqlx::query("DROP INDEX queue_state_g1").execute(pool).await.unwrap();
    store.close().await;

    // More history while the projections are down; they catch up on restart.
    log.append_all(&late);
    let store = Store::open_sqlite(&path).await.unwrap();
    let projections = started(&log, &store).await;
    let incremental = digest::dump(&store).await.unwrap();
    // The restarted audit projector dropped it, and kept the others.
    let kept = indexes(store.clone()).await;
    assert!(!kept.contains(&"audit_log_time_g1".to_owned()), "{kept:?}");
    assert!(kept.contains(&"audit_log_task_g1".to_owned()), "{kept:?}");
    // The restarted queue projector made the missing one.
    assert!(kept.contains(&"queue_state_g1".to_owned()), "{kept:?}");

    // A rebuild builds shadow tables from seq 0 and swaps them in; the live
    // tables answer queries all along.
    let rebuild = {
        let projections = projections.clone();
        tokio::spawn(async move { projections.rebuild(ProjectorKind::Tasks).await })
    };
    // All along, and through the swap, the live projector is in the status at its checkpoint
    // (at the swap it vanished, then came back at seq 0: `/readyz` said the projections were
    // the whole log behind, found by a black-box check).
    let mut samples = 0;
    while !rebuild.is_finished() || samples == 0 {
        assert!(query::task(&store, uuid(1)).await.unwrap().is_some());
        let status = projections.status().unwrap();
        let live = status.iter().find(|s| s.projector == "tasks" && s.slot == "live");
        assert_eq!(live.map(|s| s.checkpoint_seq), Some(log.head()), "{status:?}");
        samples += 1;
        tokio::task::yield_now().await;
    }
    let swapped = rebuild.await.unwrap().unwrap();
    assert_eq!((swapped.generation, swapped.last_seq), (2, log.head()));
    assert_eq!(digest::dump(&store).await.unwrap(), incremental);
    // And the runtime follows the log again on the new generation.
    append_job(&mut log, 77);
    assert!(projections.wait_for_seq(log.head(), Duration::from_secs(20)).await);
    assert!(query::task(&store, uuid(77)).await.unwrap().is_some());

    // A fresh build of the same log gives the same rows.
    let fresh = Store::open_sqlite(log.path().join("fresh.sqlite")).await.unwrap();
    projections::asof::build(&fresh, &log.reader(), log.head(), &ProjectorKind::ALL).await.unwrap();
    assert_eq!(digest::dump(&fresh).await.unwrap(), digest::dump(&store).await.unwrap());
    projections.shutdown().await;
}

/// A rebuild that a stop or a crash interrupted (its shadow generation installed, partly built)
/// goes on at the next start and is swapped in: it was left until someone asked again, and the
/// status did not show it (found by a black-box check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rebuild_goes_on_at_the_next_start() {
    use projections::Slot;
    use projections::checkpoint::{self, Indexes};
    let mut log = TestLog::new();
    log.append_all(&fixture_history().history);
    let path = log.path().join("p.sqlite");
    let store = Store::open_sqlite(&path).await.unwrap();
    let projections = started(&log, &store).await;
    projections.shutdown().await;
    // What a rebuild leaves when it is stopped right after it began.
    checkpoint::install(&store, ProjectorKind::Queue, Slot::Shadow, "__g2", 2, Indexes::Later).await.unwrap();
    store.close().await;

    let store = Store::open_sqlite(&path).await.unwrap();
    let projections = started(&log, &store).await;
    let mut swapped = None;
    for _ in 0..400 {
        let shadow = checkpoint::read(&store, ProjectorKind::Queue, Slot::Shadow).await.unwrap();
        let live = checkpoint::read(&store, ProjectorKind::Queue, Slot::Live).await.unwrap().unwrap();
        if shadow.is_none() && live.generation == 2 {
            swapped = Some(live);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live = swapped.expect("the interrupted rebuild was swapped in");
    assert_eq!(live.last_seq, log.head());
    let fresh = Store::open_sqlite(log.path().join("fresh.sqlite")).await.unwrap();
    projections::asof::build(&fresh, &log.reader(), log.head(), &ProjectorKind::ALL).await.unwrap();
    assert_eq!(digest::dump(&fresh).await.unwrap(), digest::dump(&store).await.unwrap());
    projections.shutdown().await;
}

/// Tables of an older version are rebuilt in the background at start. Until the swap they
/// stand at their checkpoint: the projector is in the status with its lag, and a `min_seq`
/// wait waits for the new version instead of answering from tables nobody writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_of_an_older_version_count_as_behind_until_the_new_version_swaps_in() {
    use projections::Slot;
    use projections::checkpoint;
    let (mut log, path, store, late) = first_half_projected().await;
    let stored_at = log.head();
    let Store::Sqlite(pool, _) = &store else { unreachable!("a SQLite store") };
    sqlx::query("UPDATE projector_checkpoints SET version = 0 WHERE projector = 'tasks'").execute(pool).await.unwrap();
    store.close().await;
    log.append_all(&late);

    let store = Store::open_sqlite(&path).await.unwrap();
    let projections =
        Projections::start(store.clone(), log.reader(), log.feed.clone(), RuntimeConfig::default()).await.unwrap();
    let status = projections.status().unwrap();
    let tasks = status.iter().find(|s| s.projector == "tasks" && s.slot == "live").expect("in the status");
    assert!(tasks.checkpoint_seq == stored_at || tasks.checkpoint_seq == log.head(), "{tasks:?}");
    if tasks.checkpoint_seq == stored_at {
        assert_eq!(tasks.lag, log.head() - stored_at, "{tasks:?}");
        assert!(tasks.error.as_deref().unwrap_or_default().contains("version 0"), "{tasks:?}");
    }
    assert!(projections.wait_for_seq(log.head(), Duration::from_secs(20)).await, "{:?}", projections.status());
    let live = checkpoint::read(&store, ProjectorKind::Tasks, Slot::Live).await.unwrap().unwrap();
    assert_eq!((live.version, live.generation), (ProjectorKind::Tasks.version(), 2), "the wait outlasted the swap");
    assert!(live.last_seq >= log.head());
    let fresh = Store::open_sqlite(log.path().join("fresh.sqlite")).await.unwrap();
    projections::asof::build(&fresh, &log.reader(), log.head(), &ProjectorKind::ALL).await.unwrap();
    assert_eq!(digest::dump(&fresh).await.unwrap(), digest::dump(&store).await.unwrap());
    projections.shutdown().await;
}

/// The server gives the projectors a runtime of their own (apart from the one serving
/// HTTP): every runner, and the live runner started again after a rebuild's swap, runs there.
/// (Exact task counts are not compared: the store's pool spawns short helper tasks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projectors_run_on_the_executor_they_are_given() {
    let mut log = TestLog::new();
    log.append_all(&fixture_history().history);
    let store = Store::open_sqlite(log.path().join("projections.sqlite")).await.unwrap();
    let executor = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = RuntimeConfig { executor: Some(executor.handle().clone()), ..RuntimeConfig::default() };
    let projections = Projections::start(store.clone(), log.reader(), log.feed.clone(), config).await.unwrap();
    assert!(projections.wait_for_seq(log.head(), Duration::from_secs(20)).await, "{:?}", projections.status());
    let runners = ProjectorKind::ALL.len();
    let on_executor = || executor.metrics().num_alive_tasks();
    assert!(on_executor() >= runners, "{} tasks on the executor", on_executor());

    let swapped = projections.rebuild(ProjectorKind::Tasks).await.unwrap();
    assert_eq!(swapped.last_seq, log.head());
    assert!(on_executor() >= runners, "{} tasks on the executor after the swap", on_executor());
    append_job(&mut log, 78);
    assert!(projections.wait_for_seq(log.head(), Duration::from_secs(20)).await);
    assert!(query::task(&store, uuid(78)).await.unwrap().is_some());

    let before_shutdown = on_executor();
    projections.shutdown().await;
    // A finished task leaves the runtime's count just after its join handle resolves.
    for _ in 0..500 {
        if on_executor() + runners <= before_shutdown {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(on_executor() + runners <= before_shutdown, "{} of {before_shutdown} tasks left", on_executor());
    executor.shutdown_background();
}

/// A log written before creates refused a repeated tag may hold one: the tasks projector
/// keeps one row per distinct tag instead of stopping on its table's key (found by a
/// black-box check: it stopped there for good, and every later task was missing from the
/// views).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_created_with_a_repeated_tag_before_the_rule_projects_its_tags_once() {
    let mut log = TestLog::new();
    let mut spec = domain::testkit::job(1, "mail");
    spec.tags = ["x", "y", "x"].map(|t| domain::Tag::new(t).unwrap()).to_vec();
    log.append("producer", &[domain::Event::TaskCreated { spec, at: domain::Timestamp::from_micros(1) }]);
    append_job(&mut log, 2);
    let store = Store::open_sqlite(log.path().join("p.sqlite")).await.unwrap();
    let projections = started(&log, &store).await;
    let task = query::task(&store, uuid(1)).await.unwrap().expect("the task is in the view");
    assert_eq!(task.tags, ["x", "y"]);
    assert!(query::task(&store, uuid(2)).await.unwrap().is_some(), "the projector went on past it");
    projections.shutdown().await;
}

/// A page of one tag's tasks reads the tag's rows in their key's order and stops at the page:
/// ordered by the tasks table's copy of `created_seq`, SQLite read every task of the tag and
/// sorted them first (0.7 s a page at 2.1M events; found by a churn soak). No filter of the
/// tasks view sorts, and a tag's pages come in creation order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_a_tags_tasks_is_read_in_order_without_sorting_them_all() {
    let mut log = TestLog::new();
    for n in 1..=7 {
        let mut spec = domain::testkit::job(n, if n % 2 == 0 { "mail" } else { "sms" });
        let tags: &[&str] = if n == 4 { &["other"] } else { &["bulk", "other"] };
        spec.tags = tags.iter().map(|t| domain::Tag::new(*t).unwrap()).collect();
        log.append("producer", &[domain::Event::TaskCreated { spec, at: domain::Timestamp::from_micros(n as i64) }]);
    }
    let store = Store::open_sqlite(log.path().join("p.sqlite")).await.unwrap();
    let projections = started(&log, &store).await;

    let bulk = TaskFilter { tag: Some("bulk".into()), ..TaskFilter::default() };
    let mut seen = Vec::new();
    let mut page = PageRequest::first(2);
    loop {
        let got = query::tasks(&store, &bulk, &page).await.unwrap();
        seen.extend(got.items.iter().map(|t| t.task_id));
        match got.next_cursor {
            Some(cursor) => page = PageRequest { after: Some(cursor), limit: 2 },
            None => break,
        }
    }
    assert_eq!(seen, [1, 2, 3, 5, 6, 7].map(uuid));
    let bulk_sms = TaskFilter { namespace: Some("sms".into()), ..bulk.clone() };
    let got = query::tasks(&store, &bulk_sms, &PageRequest::default()).await.unwrap();
    assert_eq!(got.items.iter().map(|t| t.task_id).collect::<Vec<_>>(), [1, 3, 5, 7].map(uuid));

    let filters = [
        TaskFilter::default(),
        bulk.clone(),
        bulk_sms,
        TaskFilter { state: Some("pending".into()), ..bulk },
        TaskFilter { namespace: Some("mail".into()), ..TaskFilter::default() },
        TaskFilter { state: Some("pending".into()), ..TaskFilter::default() },
    ];
    for filter in &filters {
        let plan = query::plan(&store, PlannedView::Tasks(filter)).await.unwrap();
        assert!(!plan.is_empty(), "{filter:?}");
        assert!(plan.iter().all(|step| !step.contains("TEMP B-TREE")), "{filter:?} sorts: {plan:?}");
    }
    projections.shutdown().await;
}

/// A page of the queue reads at most a page of rows from each index it searches, whatever the
/// queue holds: with a state, an index gives the rows in page order; without one, a page of each
/// state is read so and the pages merged (sorting every row of a namespace took seconds a page
/// at a million steps). Pages without a state come in the one order across states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_the_queue_reads_a_page_of_each_state_without_sorting_the_queue() {
    let mut log = TestLog::new();
    log.append_all(&fixture_history().history);
    // Pending steps (their `run_at` to come) whose keys fall between the enqueued ones'.
    for n in 90..96 {
        let mut spec = domain::testkit::job(n, "mail");
        spec.run_at = Some(domain::Timestamp::from_micros(60_000_000 + n as i64));
        log.append("producer", &[domain::Event::TaskCreated { spec, at: domain::Timestamp::from_micros(50_000_000) }]);
    }
    for n in 100..112 {
        append_job(&mut log, n);
    }
    let store = Store::open_sqlite(log.path().join("p.sqlite")).await.unwrap();
    let projections = started(&log, &store).await;

    for namespace in [None, Some("mail")] {
        let all = query::queue(&store, namespace, None, &PageRequest::first(500)).await.unwrap().items;
        let states: Vec<&str> = all.iter().map(|e| e.state.as_str()).collect();
        assert!(states.contains(&"pending") && states.contains(&"enqueued"), "{namespace:?}: {states:?}");
        let pending = states.iter().position(|s| *s == "pending").unwrap();
        assert!(
            states[..pending].contains(&"enqueued") && states[pending..].contains(&"enqueued"),
            "{namespace:?}: the states interleave in key order: {states:?}"
        );
        let keys = |entries: &[query::QueueEntry]| -> Vec<(i64, uuid::Uuid, i64)> {
            entries.iter().map(|e| (e.sort_key_us, e.task_id, e.step_index)).collect()
        };
        let mut sorted = keys(&all);
        sorted.sort();
        assert_eq!(keys(&all), sorted, "{namespace:?}: one order across states");
        let mut paged = Vec::new();
        let mut page = PageRequest::first(3);
        loop {
            let got = query::queue(&store, namespace, None, &page).await.unwrap();
            paged.extend(got.items);
            match got.next_cursor {
                Some(cursor) => page = PageRequest { after: Some(cursor), limit: 3 },
                None => break,
            }
        }
        assert_eq!(keys(&paged), keys(&all), "{namespace:?}: pages of 3 hold every row once, in order");
    }

    for namespace in [None, Some("mail")] {
        for state in [None, Some("enqueued"), Some("in_progress")] {
            let plan = query::plan(&store, PlannedView::Queue { namespace, state }).await.unwrap();
            // Each step that reads the table itself ("SCAN queue", "SEARCH queue USING …").
            let on_table: Vec<&String> =
                plan.iter().filter(|step| step.split_whitespace().nth(1) == Some("queue")).collect();
            assert!(!on_table.is_empty(), "{namespace:?} {state:?}: {plan:?}");
            assert!(
                on_table.iter().all(|step| step.starts_with("SEARCH queue USING") && step.contains("state=?")),
                "{namespace:?} {state:?} does not read the queue in page order: {plan:?}"
            );
            // The only sorts are of one page of a state each, read from a subquery.
            for (i, step) in plan.iter().enumerate() {
                if step.contains("TEMP B-TREE") {
                    assert!(i > 0 && plan[i - 1].starts_with("SCAN s"), "{namespace:?} {state:?} sorts: {plan:?}");
                }
            }
        }
    }
    projections.shutdown().await;
}

/// A fresh store's tables exist as soon as `start` returns: each live runner installed its own
/// as it loaded, and a view read in the first milliseconds after a server's first start failed
/// with "no such table" (503, "rebuild its projector").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_store_answers_every_view_as_soon_as_the_projectors_start() {
    let log = TestLog::new();
    let store = Store::open_sqlite(log.path().join("projections.sqlite")).await.unwrap();
    let projections =
        Projections::start(store.clone(), log.reader(), log.feed.clone(), RuntimeConfig::default()).await.unwrap();
    let page = PageRequest::first(10);
    assert!(query::tasks(&store, &TaskFilter::default(), &page).await.unwrap().items.is_empty());
    assert!(query::audit_log(&store, &AuditFilter::default(), &page).await.unwrap().items.is_empty());
    assert!(query::workers(&store, &page).await.unwrap().items.is_empty());
    assert!(query::queue_settings(&store).await.unwrap().is_empty());
    projections.shutdown().await;
}
