//! The PostgreSQL backend against SQLite: for the fixture history and for
//! random histories, projections built on PostgreSQL (incrementally, through
//! the real runtime, and with a rebuild swap) have exactly the rows SQLite
//! has. Runs against `TASKLEDGER_TEST_DATABASE_URL` or a throwaway cluster
//! (one per test binary); never skipped.

use std::time::Duration;

use crate::support::{TestLog, fixture_history, op_strategy, random_history};
use projections::testing::TempPostgres;
use projections::{Backend, Driver, Projections, ProjectorKind, RuntimeConfig, Slot, Store, asof, digest, query};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

async fn postgres_store(prefix: &str) -> Store {
    let url = TempPostgres::shared().create_database(prefix).await.unwrap();
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.backend(), Backend::Postgres);
    store
}

async fn sqlite_dump(log: &TestLog, name: &str) -> digest::Dump {
    let store = Store::open_sqlite(log.path().join(name)).await.unwrap();
    asof::build(&store, &log.reader(), log.head(), &ProjectorKind::ALL).await.unwrap();
    digest::dump(&store).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_on_postgres_serves_the_same_rows_as_sqlite_and_swaps_rebuilds() {
    let mut log = TestLog::new();
    log.append_all(&fixture_history().history);
    let store = postgres_store("fixture").await;
    let projections =
        Projections::start(store.clone(), log.reader(), log.feed.clone(), RuntimeConfig::default()).await.unwrap();
    assert!(projections.wait_for_seq(log.head(), Duration::from_secs(30)).await, "{:?}", projections.status());
    let on_postgres = digest::dump(&store).await.unwrap();
    assert_eq!(on_postgres, sqlite_dump(&log, "fixture.sqlite").await);
    assert_eq!(on_postgres.digest(), sqlite_dump(&log, "again.sqlite").await.digest());

    // Typed queries work the same on PostgreSQL (UUID and BIGINT columns).
    let task = query::task(&store, *domain::testkit::task_id(2).as_uuid()).await.unwrap().unwrap();
    assert_eq!(task.summary.state, "resolved_manually");
    let page = query::tasks(&store, &query::TaskFilter::default(), &query::PageRequest::first(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let next = query::PageRequest { after: page.next_cursor.clone(), limit: 10 };
    assert_eq!(query::tasks(&store, &query::TaskFilter::default(), &next).await.unwrap().items.len(), 3);
    let queue = query::queue(&store, Some("mail"), None, &query::PageRequest::first(1)).await.unwrap();
    assert_eq!(queue.items.len(), 1);
    crate::support::audit_time_ranges_match_the_log(&store, &log).await;

    for kind in ProjectorKind::ALL {
        let swapped = projections.rebuild(kind).await.unwrap();
        assert_eq!((swapped.generation, swapped.last_seq), (2, log.head()));
    }
    assert_eq!(digest::dump(&store).await.unwrap(), on_postgres);
    projections.shutdown().await;
}

#[test]
fn postgres_equals_sqlite_for_random_histories() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut runner = TestRunner::new(Config { cases: 8, failure_persistence: None, ..Config::default() });
    let strategy = (proptest::collection::vec(op_strategy(), 1..90), 1usize..50);
    runner
        .run(&strategy, |(ops, batch)| {
            runtime.block_on(async {
                let mut log = TestLog::new();
                log.append_all(&random_history(&ops).history);
                let store = postgres_store("random").await;
                for kind in ProjectorKind::ALL {
                    let mut driver = Driver::load(&store, kind, Slot::Live, &log.reader()).await.unwrap();
                    driver.catch_up(&store, &log.reader(), log.head(), batch).await.unwrap();
                }
                let on_postgres = digest::dump(&store).await.unwrap();
                store.close().await;
                prop_assert_eq!(on_postgres, sqlite_dump(&log, "random.sqlite").await);
                Ok(())
            })
        })
        .unwrap();
}

/// Every table of `kind`'s live generation with its persistence
/// (`p` logged, `u` unlogged), and whether the unlogged marker exists.
async fn persistence(store: &Store, kind: ProjectorKind) -> (Vec<String>, bool) {
    let Store::Postgres(pool) = store else { unreachable!() };
    let mut found = Vec::new();
    for table in kind.tables() {
        let p: String = sqlx::query_scalar("SELECT relpersistence::text FROM pg_class WHERE relname = $1")
            .bind(table)
            .fetch_one(pool)
            .await
            .unwrap();
        found.push(p);
    }
    let marker: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{}_unlogged", kind.name()))
        .fetch_one(pool)
        .await
        .unwrap();
    (found, marker.is_some())
}

/// A bulk build on PostgreSQL writes unlogged tables (logged ones for the
/// append-only audit log). If PostgreSQL crashes
/// meanwhile, its recovery empties every unlogged table (simulated here with
/// `TRUNCATE`, which leaves them as recovery does) while the checkpoint says
/// how far the build came: the next load must start the build over, not
/// resume on empty tables. A bulk build that was only interrupted is finished
/// (tables logged, indexes built) by the first projector that follows it row
/// by row. Either way the rows end up exactly as SQLite's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_bulk_build_resumes_or_restarts_after_a_postgres_crash() {
    use projections::checkpoint::{self, Indexes, Unlogged};
    let mut log = TestLog::new();
    log.append_all(&fixture_history().history);
    let (reader, head) = (log.reader(), log.head());
    let half = head / 2;
    assert!(half > 0);
    let expected = sqlite_dump(&log, "expected.sqlite").await;

    for crash in [true, false] {
        let store = postgres_store(if crash { "crashed" } else { "interrupted" }).await;
        for kind in ProjectorKind::ALL {
            let mut driver = Driver::load_with(&store, kind, Slot::Live, Indexes::Later, &reader).await.unwrap();
            driver.catch_up(&store, &reader, half, 7).await.unwrap();
            let (tables, marker) = persistence(&store, kind).await;
            let state = checkpoint::unlogged_state(&store, kind, driver.checkpoint()).await.unwrap();
            if !kind.rewrites_rows() {
                // An append-only projector's bulk build writes logged tables.
                assert!(tables.iter().all(|p| p == "p") && !marker, "{kind:?} mid-build: {tables:?}, marker {marker}");
                assert_eq!(state, Unlogged::None);
                driver.catch_up(&store, &reader, head, 7).await.unwrap();
                continue;
            }
            assert!(tables.iter().all(|p| p == "u") && marker, "{kind:?} mid-build: {tables:?}, marker {marker}");
            assert_eq!(state, Unlogged::Intact);
            if crash {
                let Store::Postgres(pool) = &store else { unreachable!() };
                let mut names: Vec<String> = kind.tables().iter().map(|t| t.to_string()).collect();
                names.push(format!("{}_unlogged", kind.name()));
                sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {}", names.join(", ")))).execute(pool).await.unwrap();
                let state = checkpoint::unlogged_state(&store, kind, driver.checkpoint()).await.unwrap();
                assert_eq!(state, Unlogged::Reset);
                // A bulk build resumed after the crash starts from 0 and still ends with the right rows.
                let mut driver = Driver::load_with(&store, kind, Slot::Live, Indexes::Later, &reader).await.unwrap();
                assert_eq!(driver.checkpoint().last_seq, 0, "{kind:?} restarted from the beginning");
                driver.catch_up(&store, &reader, half, 7).await.unwrap();
            }
            // A projector following row by row finishes the bulk build first.
            let mut driver = Driver::load(&store, kind, Slot::Live, &reader).await.unwrap();
            assert_eq!(driver.checkpoint().last_seq, half);
            let (tables, marker) = persistence(&store, kind).await;
            assert!(tables.iter().all(|p| p == "p") && !marker, "{kind:?} finished: {tables:?}, marker {marker}");
            assert_eq!(checkpoint::unlogged_state(&store, kind, driver.checkpoint()).await.unwrap(), Unlogged::None);
            driver.catch_up(&store, &reader, head, 7).await.unwrap();
        }
        assert_eq!(digest::dump(&store).await.unwrap(), expected, "crash: {crash}");
        store.close().await;
    }
}

struct AwkwardRow {
    id: i64,
    text: Option<String>,
    bytes: Vec<u8>,
    uuid: Option<uuid::Uuid>,
    flag: bool,
}

impl projections::sql::SqlRow for AwkwardRow {
    const COLUMNS: usize = 5;
    fn bind(&self, sink: &mut dyn projections::sql::Sink) {
        sink.i64(self.id);
        sink.opt_text(self.text.as_deref());
        sink.bytes(&self.bytes);
        sink.opt_uuid(self.uuid);
        sink.bool(self.flag);
    }
}

/// Plain inserts of many rows travel as `COPY` text on PostgreSQL: every
/// value reads back exactly as written, whatever the escapes, and SQLite agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_rows_read_back_exactly_on_both_backends() {
    let texts = ["", "tab\there", "new\nline", "cr\rlf\r\n", "back\\slash \\N \\x41", "\\", "ünï ✓ 😀", "\\.\n"];
    // Enough rows for a COPY (fewer go through UNNEST).
    let rows: Vec<AwkwardRow> = (0..projections::pg_copy::COPY_ROWS_MIN)
        .map(|i| AwkwardRow {
            id: if i == 0 { i64::MIN } else { i as i64 * 1_000_000_007 },
            text: (i % 5 != 3).then(|| texts[i % texts.len()].to_string()),
            bytes: (0..=(i as u8).wrapping_mul(37)).rev().collect(),
            uuid: (i % 2 == 0).then(|| uuid::Uuid::from_u128(u128::MAX / (i as u128 + 1))),
            flag: i % 3 == 0,
        })
        .collect();
    let log = TestLog::new();
    for store in [postgres_store("copy").await, Store::open_sqlite(log.path().join("copy.sqlite")).await.unwrap()] {
        let uuid = if store.backend() == Backend::Postgres { "UUID" } else { "BLOB" };
        let bytes = if store.backend() == Backend::Postgres { "BYTEA" } else { "BLOB" };
        let mut tx = store.begin().await.unwrap();
        projections::sql::execute(
            &mut tx,
            &format!(
                "CREATE TABLE awkward (id BIGINT PRIMARY KEY, t TEXT, b {bytes} NOT NULL, u {uuid}, f BOOLEAN NOT NULL)"
            ),
        )
        .await
        .unwrap();
        let mut out = projections::sql::Statements::new(store.backend());
        out.insert_rows("INSERT INTO awkward (id, t, b, u, f)", "", &rows);
        out.run(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
        type Read = (i64, Option<String>, Vec<u8>, Option<uuid::Uuid>, bool);
        let read: Vec<Read> = match &store {
            Store::Postgres(pool) => {
                sqlx::query_as("SELECT id, t, b, u, f FROM awkward ORDER BY id").fetch_all(pool).await.unwrap()
            }
            Store::Sqlite(pool, _) => {
                sqlx::query_as("SELECT id, t, b, u, f FROM awkward ORDER BY id").fetch_all(pool).await.unwrap()
            }
        };
        let written: Vec<Read> = rows.iter().map(|r| (r.id, r.text.clone(), r.bytes.clone(), r.uuid, r.flag)).collect();
        assert_eq!(read, written, "{:?}", store.backend());
        store.close().await;
    }
}

/// PostgreSQL stores no text holding NUL. A log written before the API refused
/// NUL in free text may hold some: the read models take it as U+FFFD instead of
/// failing the batch again and again, live and in a bulk build alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_free_text_reaches_postgres_as_a_replacement_character() {
    use domain::testkit::{claim, job, task_id, text};
    use domain::{Command, LeaseEpoch, LeaseRef};
    let mut r = crate::support::Recorder::new();
    r.ok("producer", Command::CreateTask(job(1, "mail")));
    r.ok("w1", claim("mail", "w1", 1));
    let lease = LeaseRef { task: task_id(1), step: domain::testkit::step_name("run"), epoch: LeaseEpoch(1) };
    r.ok("w1", Command::FailStep { lease, error: text("disk\0full"), retryable: false });
    r.ok("producer", Command::CreateTask(job(2, "mail")));
    r.ok("producer", Command::CancelTask { task: task_id(2), reason: Some(text("dup\0")) });
    let mut log = TestLog::new();
    log.append_all(&r.history);

    let live = postgres_store("nul_live").await;
    let projections =
        Projections::start(live.clone(), log.reader(), log.feed.clone(), RuntimeConfig::default()).await.unwrap();
    assert!(projections.wait_for_seq(log.head(), Duration::from_secs(30)).await, "{:?}", projections.status());
    projections.shutdown().await;
    let built = postgres_store("nul_built").await;
    asof::build(&built, &log.reader(), log.head(), &ProjectorKind::ALL).await.unwrap();

    for store in [&live, &built] {
        let failed = query::task(store, *task_id(1).as_uuid()).await.unwrap().unwrap();
        assert_eq!(failed.steps[0].last_error.as_deref(), Some("disk\u{FFFD}full"));
        let cancelled = query::task(store, *task_id(2).as_uuid()).await.unwrap().unwrap();
        assert_eq!(cancelled.summary.end_reason.as_deref(), Some("dup\u{FFFD}"));
        let letters = query::dead_letters(store, Some("mail"), &query::PageRequest::first(10)).await.unwrap();
        assert_eq!(letters.items[0].last_error.as_deref(), Some("disk\u{FFFD}full"));
        let audit =
            query::audit_log(store, &query::AuditFilter::default(), &query::PageRequest::first(50)).await.unwrap();
        assert_eq!(audit.items.len() as u64, log.head(), "every event has its audit row");
        assert!(audit.items.iter().any(|entry| entry.summary.contains("disk\u{FFFD}full")), "{:?}", audit.items);
    }
}
