//! The server with its read models in PostgreSQL (`--projections postgres://…`), black box:
//! the same log must give the same rows whichever database the projectors write, a killed
//! server's projectors resume in PostgreSQL where they stood, and a restart resumes from the
//! checkpoints kept there instead of rebuilding. PostgreSQL is a throwaway cluster
//! (`projections::testing`), or `TASKLEDGER_TEST_DATABASE_URL` when it is set.

use std::path::Path;

use projections::testing::{ClusterOptions, TempPostgres};
use serde_json::{Value, json};
use tests::{Server, read_models};

use crate::api::{claim, create_job, epoch, step_path};

/// The server's projector status, for [`read_models::converged_dump`].
fn status(server: &Server) -> Option<Value> {
    let answer = server.get("/v1/views/projections");
    assert_eq!(answer.status, 200, "projector status: {answer:?}");
    Some(answer.body)
}

/// Every page of a list view, joined.
fn all_pages(server: &Server, view: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after.as_ref().map(|c| format!("&after={c}")).unwrap_or_default();
        let separator = if view.contains('?') { '&' } else { '?' };
        let page = server.get(&format!("/v1/views/{view}{separator}first=7{cursor}"));
        assert_eq!(page.status, 200, "{view}: {page:?}");
        items.extend(page.body["items"].as_array().expect("items").iter().cloned());
        match page.body["next_cursor"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return items,
        }
    }
}

/// What a user reads from the views (paged with a small page, so cursors are crossed).
fn views(server: &Server) -> Value {
    json!({
        "tasks": all_pages(server, "tasks"),
        "queue": all_pages(server, "queue"),
        "dead_letters": all_pages(server, "dead-letters"),
        "audit": all_pages(server, "audit"),
        "workers": all_pages(server, "workers"),
        "dashboard": server.get("/v1/views/dashboard?namespace=pg").body,
    })
}

/// Copies a stopped server's log, journals, snapshots and tokens (not its projections).
fn copy_log(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.join("snapshots")).expect("copy dir");
    for entry in std::fs::read_dir(from).expect("data dir").flatten() {
        let path = entry.path();
        if path.is_file() && !entry.file_name().to_string_lossy().starts_with("projections") {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copy a file");
        }
    }
    // A short log has no snapshot yet, maybe no snapshot dir either.
    for entry in std::fs::read_dir(from.join("snapshots")).into_iter().flatten().flatten() {
        std::fs::copy(entry.path(), to.join("snapshots").join(entry.file_name())).expect("copy a snapshot");
    }
}

/// Jobs, a workflow, completions, dead letters, a cancel, queue controls: every projector
/// gets rows of every kind. Leaves no lease or timer pending, so the log stands still after.
fn first_half(server: &Server) {
    for n in 0..12 {
        create_job(server, "pg", json!({ "priority": n % 3, "tags": [format!("t{}", n % 2)], "max_attempts": 1 }));
    }
    let created = server.post(
        "/v1/tasks",
        json!({ "namespace": "pg", "steps": [
            { "name": "extract", "handler": "extract" },
            { "name": "load", "handler": "load", "depends_on": ["extract"] },
            { "name": "report", "handler": "report", "depends_on": ["extract"] }
        ] }),
    );
    assert_eq!(created.status, 201, "{created:?}");
    let steps = claim(server, "pg", 0);
    assert_eq!(steps.len(), 10);
    for (i, step) in steps.iter().enumerate() {
        let answer = match i {
            2 | 5 | 8 => server.post(&step_path(step, "fail"), json!({ "epoch": epoch(step), "error": "boom" })),
            _ => server.post(&step_path(step, "complete"), json!({ "epoch": epoch(step), "result": { "i": i } })),
        };
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let pending = create_job(server, "pg", json!({}));
    assert_eq!(server.post(&format!("/v1/tasks/{pending}/cancel"), json!({ "reason": "not needed" })).status, 200);
    assert_eq!(server.put("/v1/queues/pg/concurrency", json!({ "limit": 50 })).status, 200);
}

/// Operator work on the dead letters, then every step left is finished.
fn second_half(server: &Server) {
    let dead = all_pages(server, &format!("dead-letters?namespace=pg&min_seq={}", server.head_seq()));
    assert!(dead.len() >= 2, "dead letters: {dead:?}");
    let (first, second) = (&dead[0], &dead[1]);
    let retried = server.post(
        &format!("/v1/tasks/{}/steps/main/retry", first["task_id"].as_str().unwrap()),
        json!({ "reset_attempts": true }),
    );
    assert_eq!(retried.status, 200, "{retried:?}");
    let resolved = server.post(
        &format!("/v1/tasks/{}/steps/main/resolve", second["task_id"].as_str().unwrap()),
        json!({ "note": "fixed by hand", "result": { "by": "hand" } }),
    );
    assert_eq!(resolved.status, 200, "{resolved:?}");
    assert_eq!(server.post("/v1/queues/pg/pause", json!({})).status, 200);
    assert_eq!(server.post("/v1/queues/pg/resume", json!({})).status, 200);
    loop {
        let steps = claim(server, "pg", 0);
        if steps.is_empty() {
            break;
        }
        for step in &steps {
            let done = server.post(&step_path(step, "complete"), json!({ "epoch": epoch(step) }));
            assert_eq!(done.status, 200, "{done:?}");
        }
    }
}

#[test]
fn read_models_in_postgresql_equal_sqlites_across_a_kill_and_a_restart() {
    let runtime = read_models::runtime();
    let url = runtime.block_on(TempPostgres::shared().create_database("serve")).expect("a scratch database");
    let temp = tempfile::tempdir().unwrap();
    let (data, copy) = (temp.path().join("data"), temp.path().join("copy"));
    let on_postgres = ["--projections", url.as_str()];

    let server = Server::start_in(&data, &on_postgres);
    first_half(&server);
    // A crash: the projectors' checkpoints are wherever PostgreSQL had them.
    server.kill();
    let server = Server::start_in(&data, &on_postgres);
    second_half(&server);
    let (seq, in_postgres) =
        read_models::converged_dump(|| status(&server), &runtime, &url, server.head_seq(), "on PostgreSQL");
    let seen_on_postgres = views(&server);
    assert_eq!(server.stop(), Some(0));

    // A clean restart resumes from the checkpoints in PostgreSQL: nothing to apply again.
    let server = Server::start_in(&data, &on_postgres);
    let (again, _) = read_models::converged_dump(|| status(&server), &runtime, &url, seq, "restarted on PostgreSQL");
    assert_eq!(again, seq, "the log moved while nothing was sent");
    for projector in status(&server).unwrap().as_array().unwrap() {
        assert_eq!(projector["events_applied"], json!(0), "resumed, not rebuilt: {projector}");
    }
    assert_eq!(views(&server), seen_on_postgres, "the views after a restart");
    assert_eq!(server.stop(), Some(0));

    // The same log, projected into SQLite from scratch by a server on a copy of it.
    copy_log(&data, &copy);
    let server = Server::start_in(&copy, &[]);
    let sqlite = copy.join("projections.sqlite");
    let (at, in_sqlite) =
        read_models::converged_dump(|| status(&server), &runtime, sqlite.to_str().unwrap(), seq, "on SQLite");
    assert_eq!(at, seq);
    assert!(
        in_postgres == in_sqlite,
        "the rows differ: {}",
        read_models::first_difference(&in_postgres, &in_sqlite, ("PostgreSQL", "SQLite"))
    );
    assert!(!in_postgres.audit_log.is_empty() && !in_postgres.dead_letters.is_empty(), "rows of every kind");
    assert_eq!(views(&server), seen_on_postgres, "the views served from SQLite");
}

/// One server per PostgreSQL projections database: a second server (another log) pointed at the
/// first's database served the first's tasks as its own, undetected (found by a black-box
/// check). Now it refuses, also after the first's lock connection was cut (its keeper takes
/// the lock again). And the projectors' commits are durable (`synchronous_commit = on`): with
/// it off, PostgreSQL crashing alone lost batches whose checkpoints the server kept in memory.
#[test]
fn a_second_server_on_the_same_postgresql_database_is_refused() {
    let runtime = read_models::runtime();
    let url = runtime.block_on(TempPostgres::shared().create_database("shared")).expect("a scratch database");
    let temp = tempfile::tempdir().unwrap();
    let on_postgres = ["--projections", url.as_str()];
    let first = Server::start_in(&temp.path().join("first"), &on_postgres);
    create_job(&first, "first", json!({}));
    let second = temp.path().join("second");
    let (refused, stderr) = crate::api::serve_once_with(&second, "127.0.0.1:0", &on_postgres);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another taskledger server") && stderr.contains("advisory lock"), "{stderr}");
    assert!(stderr.contains("taskledger projections lock"), "the holder is named: {stderr}");

    // Every connection of the first server cut: its keeper takes the lock again.
    runtime.block_on(async {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&mut admin)
        .await
        .unwrap();
    });
    std::thread::sleep(projections::lock::KEEPER_PERIOD * 3);
    let (refused, stderr) = crate::api::serve_once_with(&second, "127.0.0.1:0", &on_postgres);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("advisory lock"), "the lock was not taken again: {stderr}");
    assert_eq!(first.get("/v1/views/tasks?namespace=first&min_seq=1").body["items"].as_array().unwrap().len(), 1);

    // Another schema of the same database is another server's place (found by review: the
    // lock was the database's).
    runtime.block_on(async {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("CREATE SCHEMA other").execute(&mut admin).await.unwrap();
    });
    let in_other_schema = format!("{url}?options=-c%20search_path%3Dother");
    let third = Server::start_in(&temp.path().join("third"), &["--projections", in_other_schema.as_str()]);
    create_job(&third, "third", json!({}));
    assert_eq!(third.get("/v1/views/tasks?namespace=third&min_seq=1").body["items"].as_array().unwrap().len(), 1);
    drop(third);

    let store = runtime.block_on(projections::Store::open(&url)).unwrap();
    let projections::Store::Postgres(pool) = &store else { panic!("a PostgreSQL store") };
    let setting: String = runtime.block_on(sqlx::query_scalar("SHOW synchronous_commit").fetch_one(pool)).unwrap();
    assert_eq!(setting, "on");
    assert_eq!(first.stop(), Some(0));
    // Stopped, its lock is gone (once PostgreSQL has seen its connections close), and what
    // stops the second server is the first's projections: built from another log.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while runtime
        .block_on(
            // Other tests' servers hold theirs in their own databases.
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(pool),
        )
        .unwrap()
        > 0
    {
        assert!(std::time::Instant::now() < deadline, "the first server's lock outlived it");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (refused, stderr) = crate::api::serve_once_with(&second, "127.0.0.1:0", &on_postgres);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("built from another log") && !stderr.contains("advisory lock"), "{stderr}");
}

/// A server whose projections are in a database of a private PostgreSQL (one a test may stop),
/// logging to a file.
struct OnPrivatePostgres {
    postgres: TempPostgres,
    server: Server,
    log_path: std::path::PathBuf,
    _temp: tempfile::TempDir,
}

/// Starts [`OnPrivatePostgres`], with `before_start` done to PostgreSQL once the database exists.
fn on_private_postgres(database: &str, before_start: impl FnOnce(&TempPostgres)) -> OnPrivatePostgres {
    let runtime = read_models::runtime();
    let postgres = TempPostgres::start_private(ClusterOptions { durable: false }).expect("a private PostgreSQL");
    let url = runtime.block_on(postgres.create_database(database)).expect("a scratch database");
    before_start(&postgres);
    let temp = tempfile::tempdir().unwrap();
    let log_path = temp.path().join("server.log");
    let server = Server::start_with_log(
        &temp.path().join("data"),
        &["--projections", url.as_str()],
        std::fs::File::create(&log_path).unwrap(),
    );
    OnPrivatePostgres { postgres, server, log_path, _temp: temp }
}

/// PostgreSQL going away under a running server is an outage of the SQL views only: commands
/// and reads from the log go on, `/metrics` answers (without the queue depths, which come from
/// the views), and the views answer 503 `projections_unavailable` instead of a 500.
#[test]
fn an_unreachable_postgresql_is_an_outage_of_the_views_only() {
    let OnPrivatePostgres { postgres, server, log_path, _temp } = on_private_postgres("outage", |_| {});
    let id = create_job(&server, "out", json!({}));
    let head = server.head_seq();
    assert_eq!(server.get(&format!("/v1/views/tasks?min_seq={head}")).status, 200);
    let (_, metrics) = server.get_text("/metrics");
    assert!(metrics.contains("taskledger_queue_depth{"), "depths while PostgreSQL is up");
    assert!(metrics.contains("taskledger_projection_failing{projector=\"tasks\",slot=\"live\"} 0"), "{metrics}");

    drop(postgres);
    create_job(&server, "out", json!({}));
    assert_eq!(server.get(&format!("/v1/tasks/{id}")).status, 200);
    let (status, metrics) = server.get_text("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("taskledger_head_seq"), "{metrics}");
    assert!(!metrics.contains("taskledger_queue_depth{"), "no depths without the views");
    let view = server.get("/v1/views/tasks");
    assert_eq!((view.status, view.code()), (503, "projections_unavailable"), "{view:?}");
    assert!(view.header("retry-after").is_some(), "{view:?}");
    // The projectors' failure shows as a gauge an alert can watch.
    let failing = "taskledger_projection_failing{projector=\"tasks\",slot=\"live\"} 1";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !server.get_text("/metrics").1.lines().any(|l| l == failing) {
        assert!(std::time::Instant::now() < deadline, "no {failing}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Said once per cause while it keeps failing the same way, not at every attempt (a WARN
    // line per projector and attempt while PostgreSQL was down: found by a black-box check):
    // the pool's timeout, and once the keeper has found the lock's connection gone, the lost
    // lock (nothing is written until it is taken again). Attempts come every second: 13 s
    // hold many more.
    std::thread::sleep(std::time::Duration::from_secs(13));
    let logged = std::fs::read_to_string(&log_path).unwrap();
    let said: Vec<&str> =
        logged.lines().filter(|l| l.contains("projector failed") && l.contains("projector=\"tasks\"")).collect();
    let lock_lost = said.iter().filter(|l| l.contains("lock was lost")).count();
    assert!(!said.is_empty() && lock_lost <= 1 && said.len() - lock_lost <= 1, "{logged}");
    assert_eq!(server.stop(), Some(0), "a clean stop without PostgreSQL");
}

/// Waits until `done` holds, for at most 30 s.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "not within 30 s: {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A PostgreSQL that is down when the server starts (restarted with it, or started a little
/// after it) does not keep the ledger down: the server starts (`serve` exited before: found
/// by a black-box check), commands and task reads work, the views, GraphQL's, `/readyz` and
/// the rebuild route answer 503 `projections_unavailable` saying why, and once PostgreSQL is
/// up the projectors connect, migrate and catch up by themselves.
#[test]
fn a_server_starts_while_its_postgresql_is_down_and_connects_once_it_is_up() {
    let OnPrivatePostgres { postgres, server, log_path, _temp } =
        on_private_postgres("late", |postgres| postgres.stop().expect("stop PostgreSQL"));
    assert!(server.banner.contains("not reachable yet"), "{}", server.banner);
    let before = create_job(&server, "late", json!({}));
    assert_eq!(server.get(&format!("/v1/tasks/{before}")).status, 200);
    assert_eq!(server.get(&format!("/v1/tasks/{before}/history")).status, 200);
    let view = server.get("/v1/views/tasks?namespace=late");
    assert_eq!((view.status, view.code()), (503, "projections_unavailable"), "{view:?}");
    let message = view.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("could not be opened since the server started") && message.contains("Connection refused"),
        "says why: {message}"
    );
    assert!(view.header("retry-after").is_some(), "{view:?}");
    assert_eq!(server.get("/v1/views/projections").code(), "projections_unavailable");
    let ready = server.get("/readyz");
    assert_eq!((ready.status, ready.code()), (503, "projections_unavailable"), "{ready:?}");
    let rebuild = server.post("/v1/admin/projections/tasks/rebuild", json!({}));
    assert_eq!((rebuild.status, rebuild.code()), (503, "projections_unavailable"), "{rebuild:?}");
    let graphql = server.post("/graphql", json!({ "query": "{ tasks(namespace: \"late\") { items { taskId } } }" }));
    assert_eq!(graphql.body["errors"][0]["extensions"]["code"], "projections_unavailable", "{graphql:?}");
    let (status, metrics) = server.get_text("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.lines().any(|l| l == "taskledger_projections_connected 0"), "{metrics}");
    assert!(!metrics.contains("taskledger_projection_lag_events{"), "no projectors yet: {metrics}");

    // Attempts every 2 s: a few of them fail the same way before PostgreSQL is back.
    std::thread::sleep(std::time::Duration::from_secs(5));
    postgres.start_again().expect("start PostgreSQL again");
    let after = create_job(&server, "late", json!({}));
    let head = server.head_seq();
    eventually("the views reach the head", || server.get(&format!("/v1/views/tasks?min_seq={head}")).status == 200);
    let ids: Vec<String> =
        all_pages(&server, "tasks?namespace=late").iter().map(|t| t["task_id"].as_str().unwrap().to_owned()).collect();
    assert!(ids.contains(&before) && ids.contains(&after), "both tasks projected: {ids:?}");
    eventually("ready", || server.get("/readyz").status == 200);
    assert!(server.get_text("/metrics").1.lines().any(|l| l == "taskledger_projections_connected 1"));
    assert_eq!(server.stop(), Some(0));
    let logged = std::fs::read_to_string(&log_path).unwrap();
    // Said at the start, and again only when the error changes (PostgreSQL starting up), not at
    // each of the attempts that failed the same way.
    assert_eq!(logged.matches("the projections database is not reachable").count(), 1, "{logged}");
    assert!(logged.matches("not reachable").count() <= 2, "said once per cause: {logged}");
    assert!(logged.contains("connected to the projections database"), "{logged}");
}

/// A schema dropped under a running server (`DROP SCHEMA public CASCADE`, then created empty):
/// the views name the projector to rebuild, and rebuilding each creates the schema again and
/// fills it from the log (a rebuild failed on the missing tables until a restart: found by a
/// black-box check).
#[test]
fn a_rebuild_after_the_schema_was_dropped_creates_it_again_from_the_log() {
    let runtime = read_models::runtime();
    let url = runtime.block_on(TempPostgres::shared().create_database("dropped")).expect("a scratch database");
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_in(&temp.path().join("data"), &["--projections", url.as_str()]);
    first_half(&server);
    let head = server.head_seq();
    assert_eq!(server.get(&format!("/v1/views/tasks?min_seq={head}")).status, 200);
    let before = views(&server);
    runtime.block_on(async {
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public").execute(&mut connection).await.unwrap();
    });
    let view = server.get("/v1/views/audit");
    assert_eq!((view.status, view.code()), (503, "projections_unavailable"), "{view:?}");
    let message = view.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("/v1/admin/projections/audit/rebuild") && message.contains("each projector"), "{message}");
    for projector in ["tasks", "queue", "dashboard", "audit"] {
        let rebuild = server.post(&format!("/v1/admin/projections/{projector}/rebuild"), json!({}));
        assert_eq!(rebuild.status, 202, "{rebuild:?}");
    }
    // Every rebuild swapped in (no shadow left) and every projector at the head: only then are
    // the views read (one read earlier could meet a table in the middle of its swap).
    eventually("the rebuilds done and every projector at the head", || {
        let projectors = server.get("/v1/views/projections");
        projectors.status == 200
            && projectors.body.as_array().is_some_and(|rows| rows.iter().all(|row| row["slot"] == "live"))
            && server.get(&format!("/v1/views/tasks?min_seq={head}")).status == 200
    });
    assert_eq!(views(&server), before, "the views as they were");
    // And the projectors go on from there.
    let after = create_job(&server, "pg", json!({}));
    let head = server.head_seq();
    let tasks = all_pages(&server, &format!("tasks?namespace=pg&min_seq={head}"));
    assert!(tasks.iter().any(|t| t["task_id"] == after.as_str()), "{tasks:?}");
    assert_eq!(server.stop(), Some(0));
}

/// Only an outage is waited out: a PostgreSQL that answers and refuses (a database that does not
/// exist) still refuses the start, and a server waiting for an unreachable one stops at once.
#[test]
fn a_postgresql_that_refuses_still_refuses_the_start_and_a_waiting_server_stops_cleanly() {
    let postgres = TempPostgres::shared();
    let missing = format!("{}_missing_{}", postgres.admin_url(), std::process::id());
    let temp = tempfile::tempdir().unwrap();
    let (refused, stderr) =
        crate::api::serve_once_with(&temp.path().join("a"), "127.0.0.1:0", &["--projections", missing.as_str()]);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nowhere = format!("postgres://postgres@127.0.0.1:{port}/nothing_listens_here");
    let server = Server::start_in(&temp.path().join("b"), &["--projections", nowhere.as_str()]);
    create_job(&server, "waiting", json!({}));
    assert_eq!(server.stop(), Some(0), "a clean stop while connecting");
}

/// A lock held on a projection table (a DBA's `LOCK TABLE`): a view's read is bounded at 5 s
/// with `503 projections_unavailable` (it waited 28 s, or until the request timeout's 408), the
/// projector blocked behind it is reported as failing after 10 s (it showed no error at all),
/// and a stop abandons its batch after 5 s instead of waiting for the lock (all three found by
/// a black-box check). Commands go on; after a restart the batch is applied.
#[test]
fn a_table_lock_bounds_views_is_reported_and_does_not_hold_a_stop() {
    use sqlx::Connection;
    let runtime = read_models::runtime();
    let postgres = TempPostgres::start_private(ClusterOptions { durable: false }).expect("a private PostgreSQL");
    let url = runtime.block_on(postgres.create_database("locked")).expect("a scratch database");
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let log_path = temp.path().join("server.log");
    let server =
        Server::start_with_log(&data, &["--projections", url.as_str()], std::fs::File::create(&log_path).unwrap());
    create_job(&server, "held", json!({}));
    let head = server.head_seq();
    assert_eq!(server.get(&format!("/v1/views/tasks?min_seq={head}")).status, 200);

    // The DBA's session holds the lock until told to let go (or for 90 s at most).
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked_tx, locked) = std::sync::mpsc::channel::<()>();
    let dba_url = url.clone();
    let dba = std::thread::spawn(move || {
        let runtime = read_models::runtime();
        let mut dba = runtime.block_on(sqlx::PgConnection::connect(&dba_url)).unwrap();
        runtime.block_on(sqlx::query("BEGIN").execute(&mut dba)).unwrap();
        runtime.block_on(sqlx::query("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE").execute(&mut dba)).unwrap();
        locked_tx.send(()).unwrap();
        let _ = released.recv_timeout(std::time::Duration::from_secs(90));
        runtime.block_on(sqlx::query("COMMIT").execute(&mut dba)).unwrap();
    });
    locked.recv().unwrap();
    let view = server.get("/v1/views/tasks");
    assert_eq!((view.status, view.code()), (503, "projections_unavailable"), "{view:?}");
    let said = view.body["error"]["message"].as_str().unwrap();
    assert!(said.contains("in time") || said.contains("within 5 s"), "{view:?}");
    // Many reads of the locked table at once give their connections back (PostgreSQL cancels
    // them at its statement timeout): cut off only on the server's side, they kept the pool's
    // connections inside the lock, and views of other tables failed for want of one.
    std::thread::scope(|scope| {
        for _ in 0..12 {
            scope.spawn(|| assert_eq!(server.get("/v1/views/tasks").status, 503));
        }
    });
    let other = server.get("/v1/views/queue");
    assert_eq!(other.status, 200, "a view of another table: {other:?}");

    create_job(&server, "held", json!({}));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let waiting = loop {
        let tasks = status(&server).unwrap().as_array().unwrap().iter().find(|p| p["projector"] == "tasks").cloned();
        if let Some(error) = tasks.as_ref().and_then(|t| t["error"].as_str()) {
            break error.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "the blocked projector was never reported: {tasks:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(waiting.contains("waiting") && waiting.contains("lock"), "{waiting}");
    let (_, metrics) = server.get_text("/metrics");
    assert!(metrics.contains("taskledger_projection_failing{projector=\"tasks\",slot=\"live\"} 1"), "{metrics}");

    assert_eq!(server.stop(), Some(0), "a stop with the lock still held");
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(logged.contains("stopped without finishing its batch"), "{logged}");
    release.send(()).unwrap();
    dba.join().unwrap();

    let server = Server::start_in(&data, &["--projections", url.as_str()]);
    let head = server.head_seq();
    let view = server.get(&format!("/v1/views/tasks?min_seq={head}"));
    assert_eq!(view.body["items"].as_array().map(Vec::len), Some(2), "{view:?}");
    assert_eq!(server.stop(), Some(0));
}

/// Another process that takes the projections' lock while this server's lock connection is lost
/// (a second server in a restart loop, say) stops this server's projectors writing and its views
/// answering: they went on, and the two servers wrote into one database (the keeper only said
/// so in its log). Commands go on; with the lock back, the projectors catch up.
#[test]
fn another_process_holding_the_lock_stops_the_projectors_and_the_views() {
    use sqlx::Connection;
    let runtime = read_models::runtime();
    let url = runtime.block_on(TempPostgres::shared().create_database("fence")).expect("a scratch database");
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_in(&temp.path().join("data"), &["--projections", url.as_str()]);
    create_job(&server, "fence", json!({}));
    let before = server.head_seq();
    assert_eq!(server.get(&format!("/v1/views/tasks?min_seq={before}")).status, 200);

    let mut other = runtime.block_on(async {
        let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(projections::lock::LOCK_APPLICATION_NAME)
        .execute(&mut other)
        .await
        .unwrap();
        sqlx::query("SELECT pg_advisory_lock($1, hashtext(current_schema()))")
            .bind(projections::lock::ADVISORY_LOCK_CLASS)
            .execute(&mut other)
            .await
            .unwrap();
        other
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let refused = loop {
        let ready = server.get("/readyz");
        if ready.status == 503 {
            break ready;
        }
        assert!(std::time::Instant::now() < deadline, "still ready: {ready:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(refused.code(), "projections_unavailable", "{refused:?}");
    assert!(refused.body["error"]["message"].as_str().unwrap().contains("another process holds"), "{refused:?}");
    let view = server.get("/v1/views/tasks");
    assert_eq!((view.status, view.code()), (503, "projections_unavailable"), "{view:?}");
    // Commands go on; nothing is written into the database meanwhile.
    create_job(&server, "fence", json!({}));
    let after = server.head_seq();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = server.get("/v1/views/projections").body;
        let tasks = status.as_array().unwrap().iter().find(|s| s["projector"] == "tasks" && s["slot"] == "live");
        let error = tasks.and_then(|s| s["error"].as_str()).unwrap_or("").to_owned();
        if error.contains("another process holds") {
            assert_eq!(tasks.unwrap()["checkpoint_seq"], json!(before), "{status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the projector did not stop: {status}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let written: i64 = runtime
        .block_on(sqlx::query_scalar("SELECT max(last_seq) FROM projector_checkpoints").fetch_one(&mut other))
        .unwrap();
    assert_eq!(written as u64, before, "a projector wrote while another process held the lock");

    // The other process gone, the keeper takes the lock back and the projectors catch up.
    drop(other);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.get(&format!("/v1/views/tasks?min_seq={after}")).status != 200 {
        assert!(std::time::Instant::now() < deadline, "the views did not come back");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(server.get("/readyz").status, 200);
    assert_eq!(server.stop(), Some(0));
}
