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
