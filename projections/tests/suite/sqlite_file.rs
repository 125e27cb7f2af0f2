//! The SQLite file's own settings: a new file gets `SQLITE_PAGE_SIZE` pages,
//! and a file made before that (4 KiB pages) opens, keeps its page size and
//! still takes projections.

use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection};

use crate::support::{TestLog, fixture_history};
use projections::store::SQLITE_PAGE_SIZE;
use projections::{Projections, RuntimeConfig, Store, digest};

async fn page_size(path: &std::path::Path) -> i64 {
    let mut conn = SqliteConnectOptions::new().filename(path).read_only(true).connect().await.unwrap();
    let size: i64 = sqlx::query_scalar("PRAGMA page_size").fetch_one(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    size
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_gets_large_pages_and_an_old_file_keeps_its_own() {
    let mut log = TestLog::new();
    log.append_all(&fixture_history().history);

    let new_path = log.path().join("new.sqlite");
    let old_path = log.path().join("old.sqlite");
    // A file as an earlier version made it: 4 KiB pages, WAL mode.
    let mut old = SqliteConnectOptions::new()
        .filename(&old_path)
        .create_if_missing(true)
        .page_size(4096)
        .journal_mode(SqliteJournalMode::Wal)
        .connect()
        .await
        .unwrap();
    sqlx::query("CREATE TABLE made_before (x INTEGER)").execute(&mut old).await.unwrap();
    old.close().await.unwrap();

    let mut digests = Vec::new();
    for path in [&new_path, &old_path] {
        let store = Store::open_sqlite(path).await.unwrap();
        let projections =
            Projections::start(store.clone(), log.reader(), log.feed.clone(), RuntimeConfig::default()).await.unwrap();
        assert!(projections.wait_for_seq(log.head(), Duration::from_secs(20)).await, "{:?}", projections.status());
        projections.shutdown().await;
        digests.push(digest::dump(&store).await.unwrap().digest());
        store.close().await;
    }
    assert_eq!(page_size(&new_path).await, i64::from(SQLITE_PAGE_SIZE));
    assert_eq!(page_size(&old_path).await, 4096);
    assert_eq!(digests[0], digests[1], "the same rows whatever the page size");
}
