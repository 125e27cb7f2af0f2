//! Where read models live: a SQLite file (the embedded default) or a PostgreSQL
//! database, behind one `Store` handle.
//!
//! Why an enum of two concrete pools rather than `sqlx::Any` or a generic
//! `Database` parameter: `Any` maps every value to a lowest common type (UUIDs
//! and timestamps lose their types on PostgreSQL), and generic code over
//! `sqlx::Database` drowns every function in trait bounds. The SQL we write is
//! the same text on both backends (`$n` placeholders, `ON CONFLICT` upserts,
//! row-value comparisons), so `on_backend!` instantiates one body of code
//! once per concrete pool and the compiler checks both.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Postgres, Sqlite, Transaction};

use crate::error::OpenError;

/// Connections per pool. Projectors write one transaction at a time each and
/// queries are short, so a handful is plenty; PostgreSQL servers count them.
pub const POOL_CONNECTIONS_MAX: u32 = 8;

/// Longest a query or a projector waits for a PostgreSQL connection. While the server is
/// unreachable, reads fail after this (the API answers 503 `projections_unavailable`) and
/// projectors retry; the log and commands do not depend on it.
pub const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The default file name of the SQLite projections, beside the log.
pub const SQLITE_FILE_NAME: &str = "projections.sqlite";

/// A connection string without its passwords, for logs and banners: the one in the user
/// info (`postgres://app:***@host/db`) and the `password` and `sslpassword` parameters of the
/// query string (`?password=***`), which the PostgreSQL driver takes too.
pub fn redact_target(target: &str) -> String {
    let Some(scheme_end) = target.find("://").map(|at| at + 3) else { return target.to_owned() };
    let (base, query) = match target.find('?') {
        Some(at) => (&target[..at], Some(&target[at + 1..])),
        None => (target, None),
    };
    let rest = &base[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let authority = match authority.rfind('@').map(|at| (&authority[..at], &authority[at..])) {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let mut out = format!("{}{authority}{}", &base[..scheme_end], &rest[authority_end..]);
    if let Some(query) = query {
        let parameters: Vec<String> = query
            .split('&')
            .map(|parameter| match parameter.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword") => {
                    format!("{key}=***")
                }
                _ => parameter.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&parameters.join("&"));
    }
    out
}

/// How a store is opened. `Default` is what the server uses unless told otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// SQLite's page cache per connection, in KiB (`PRAGMA cache_size`): the
    /// writer's and each pooled reader's. Ignored for PostgreSQL, whose cache
    /// is the server's.
    pub sqlite_cache_kib: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { sqlite_cache_kib: 64 * 1024 }
    }
}

/// Which database a store talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a `--projections` target names: `postgres://…` or `postgresql://…` is
    /// PostgreSQL, anything else a SQLite file path.
    pub fn of_target(target: &str) -> Backend {
        if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

/// The schema of each backend, compiled in.
static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// A connection pool on one of the two backends. Cheap to clone.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqlitePool, WriteGate),
    Postgres(PgPool),
}

/// SQLite has one writer at a time. Left to itself, a second writer polls
/// the lock with SQLite's busy handler, which sleeps in steps of up to
/// 100 ms: that is what a waiting projector's lag would look like. A tokio
/// mutex hands the write lock over in FIFO order the moment it is free.
///
/// Every write goes through one dedicated connection, `writer`. A SQLite
/// connection drops its whole page cache when it begins a transaction after
/// another connection wrote: projectors taking turns on the pool's
/// connections started every batch with a cold cache.
#[derive(Clone, Debug)]
pub struct WriteGate {
    turn: Arc<tokio::sync::Mutex<()>>,
    writer: SqlitePool,
}

/// Statements sqlx keeps prepared on the write connection: the checkpoint
/// statements and DDL. (Projectors' bulk writes prepare their own per batch,
/// see `sqlite_bulk`.)
const WRITER_STATEMENT_CACHE: usize = 64;

/// Runs `$body` with `$pool` bound to the concrete pool of `$store`.
macro_rules! on_backend {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite($pool, _) => $body,
            $crate::store::Store::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_backend;

/// Runs `$body` with `$tx` bound to the concrete transaction of `$store_tx`.
macro_rules! on_tx {
    ($store_tx:expr, $tx:ident => $body:expr) => {
        match $store_tx {
            $crate::store::StoreTx::Sqlite($tx, _) => $body,
            $crate::store::StoreTx::Postgres($tx) => $body,
        }
    };
}
pub(crate) use on_tx;

/// An open write transaction on either backend.
pub enum StoreTx {
    Sqlite(Transaction<'static, Sqlite>, tokio::sync::OwnedMutexGuard<()>),
    Postgres(Transaction<'static, Postgres>),
}

impl StoreTx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            StoreTx::Sqlite(tx, _gate) => tx.commit().await,
            StoreTx::Postgres(tx) => tx.commit().await,
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            StoreTx::Sqlite(..) => Backend::Sqlite,
            StoreTx::Postgres(_) => Backend::Postgres,
        }
    }
}

impl Store {
    /// Opens (creating if needed) a SQLite file in WAL mode and migrates it.
    ///
    /// `synchronous = NORMAL`: a power cut may lose the last transactions,
    /// but never splits one, and each carries its checkpoint, so the projector
    /// simply re-applies from where the file says it is.
    ///
    /// Pages stay at SQLite's 4 KiB. 16 KiB pages made bulk rebuilds 10–20 %
    /// faster (fewer B-tree pages to split and log per row), but every commit
    /// writes whole pages to the WAL, and in `taskledger-bench --workloads
    /// half-rate` runs (2026-12-02, three rounds each) the server's create
    /// p99 went from 6.7–9.6 ms to 13.3–16.0 ms and its completion p99 from
    /// 3.6–5.9 ms to 10.3–12.8 ms: the projections' larger writes share the
    /// disk with the log's fdatasync.
    pub async fn open_sqlite(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        Self::open_sqlite_with(path, StoreOptions::default()).await
    }

    /// [`Store::open_sqlite`] with explicit options.
    pub async fn open_sqlite_with(path: impl AsRef<Path>, options: StoreOptions) -> Result<Store, OpenError> {
        let path = path.as_ref();
        let cache_kib = options.sqlite_cache_kib.max(1);
        crate::sqlite_memory::install();
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .pragma("cache_size", format!("-{cache_kib}"))
            // Sorts beyond the page cache (an index built at the end of a rebuild) go to
            // temporary files ($SQLITE_TMPDIR, else $TMPDIR, else /var/tmp or /tmp), not the
            // heap: in memory, three `audit_log` indexes over 2M rows took 58 MiB more at their
            // peak, 29 MiB a million rows and growing with the log, for no gain in speed
            // (8.1 s against 7.7 s; found by a churn soak's rebuilds, 2026-12-07).
            .pragma("temp_store", "file");
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .connect_with(connect.clone())
            .await
            .map_err(|source| sqlite_open_error(path, source))?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_with(connect.statement_cache_capacity(WRITER_STATEMENT_CACHE))
            .await
            .map_err(|source| sqlite_open_error(path, source))?;
        let store = Store::Sqlite(pool, WriteGate { turn: Arc::default(), writer });
        match store.migrate().await.map_err(OpenError::Migrate) {
            Err(OpenError::Migrate(sqlx::migrate::MigrateError::Execute(source)))
                if crate::error::sqlite_file_damaged(&source) =>
            {
                Err(OpenError::Damaged { path: path.to_path_buf(), source })
            }
            migrated => migrated.map(|()| store),
        }
    }

    /// Connects to PostgreSQL by URL and migrates the database.
    ///
    /// Commits wait for their WAL flush (PostgreSQL's default,
    /// `synchronous_commit = on`). With it off, a crash of PostgreSQL alone
    /// lost the last committed batches while the server, which lives on,
    /// kept their checkpoints in memory: views answered `min_seq` from rows
    /// that were gone, reporting no lag, until the next event (found by a
    /// black-box check). SQLite's `synchronous = NORMAL` has no such gap:
    /// only a crash of the machine loses its last commits, and the server's
    /// memory goes with it.
    pub async fn connect_postgres(url: &str) -> Result<Store, OpenError> {
        // Every statement is bounded, so a view behind a DBA's table lock gives its connection
        // back: cut off only on the client's side, the query went on holding it, and a lock on
        // one table used up the pool and stalled every view and projector (found by a black-box
        // check). Writes lift the bound in their own transactions (`begin`).
        let options = PgConnectOptions::from_str(url)
            .map_err(|source| OpenError::Postgres { source })?
            .options([("synchronous_commit", "on"), ("statement_timeout", POSTGRES_READ_STATEMENT_TIMEOUT)]);
        let pool = PgPoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|source| OpenError::Postgres { source })?;
        let store = Store::Postgres(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// `postgres://…` or `postgresql://…` connects to PostgreSQL; anything
    /// else is a SQLite file path (a directory gets `projections.sqlite`).
    pub async fn open(target: &str) -> Result<Store, OpenError> {
        Self::open_with(target, StoreOptions::default()).await
    }

    /// [`Store::open`] with explicit options.
    pub async fn open_with(target: &str, options: StoreOptions) -> Result<Store, OpenError> {
        if Backend::of_target(target) == Backend::Postgres {
            return Self::connect_postgres(target).await;
        }
        Self::open_sqlite_with(crate::lock::sqlite_path(target)?, options).await
    }

    /// Migrates the schema. Through `run_direct` on a connection rather than `run(pool)`:
    /// `run`'s `Acquire` bound made every future that opens a store one the compiler cannot prove
    /// `Send` ("`Acquire` is not general enough"), so a store could not be opened inside
    /// `tokio::spawn` (the server's reconnecting task, `api::projections_slot`).
    ///
    /// Also run before every projection rebuild: a schema dropped under a running server (all
    /// its tables, checkpoints and migration history gone) is created again, and the rebuild,
    /// and the live projectors finding their checkpoints gone, fill it from the log (a rebuild
    /// failed on the missing tables until a restart: found by a black-box check). With the
    /// schema in place it is a lookup of the applied migrations.
    ///
    /// One migration at a time in this process (concurrent rebuilds after a dropped schema raced
    /// to create the same tables on SQLite, whose migration lock is a no-op), and on PostgreSQL
    /// on a connection taken out of the pool and closed after: the migrator's session lock and
    /// the lifted statement timeout went back to the pool with it when a migration failed or
    /// was cancelled (found by review).
    pub(crate) async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _turn = ONE_AT_A_TIME.lock().await;
        match self {
            Store::Sqlite(pool, _) => {
                let mut connection = pool.acquire().await?;
                SQLITE_MIGRATOR.run_direct(None, &mut *connection, false).await?
            }
            Store::Postgres(pool) => {
                // Without the read bound: a migration may take its time.
                let mut connection = pool.acquire().await?.detach();
                sqlx::query("SET statement_timeout = 0").execute(&mut connection).await?;
                POSTGRES_MIGRATOR.run_direct(None, &mut connection, false).await?;
                let _ = sqlx::Connection::close(connection).await;
            }
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        match self {
            Store::Sqlite(..) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    /// A write transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two projectors never deadlock upgrading a
    /// read lock; they queue on the busy timeout instead.
    pub async fn begin(&self) -> Result<StoreTx, sqlx::Error> {
        Ok(match self {
            Store::Sqlite(_, gate) => {
                let turn = gate.turn.clone().lock_owned().await;
                let tx = match gate.writer.begin_with("BEGIN IMMEDIATE").await {
                    // A write that failed because the disk was full: SQLite rolled the
                    // transaction back itself, so the rollback sqlx queued failed too, and the
                    // connection still counts one open transaction and refuses to begin another.
                    // Retire it; the pool opens a fresh one (with a cold page cache, once).
                    Err(sqlx::Error::InvalidSavePointStatement) => {
                        let stuck = gate.writer.acquire().await?.detach();
                        let _ = sqlx::Connection::close_hard(stuck).await;
                        gate.writer.begin_with("BEGIN IMMEDIATE").await?
                    }
                    begun => begun?,
                };
                StoreTx::Sqlite(tx, turn)
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // A projector's batch or a rebuild step may rightly take longer than a read.
                sqlx::query("SET LOCAL statement_timeout = 0").execute(&mut *tx).await?;
                StoreTx::Postgres(tx)
            }
        })
    }

    /// After a failed write: on SQLite, closes the write connection so the next transaction
    /// opens a fresh one. A connection can stay broken after what broke it is gone: one opened
    /// while the database's files were read-only stays read-only ("attempt to write a readonly
    /// database" after they were writable again, until a restart: found by a black-box check).
    /// Bounded: a connection held elsewhere is left as it is. PostgreSQL's pool drops broken
    /// connections itself.
    pub async fn retire_writer(&self) {
        if let Store::Sqlite(_, gate) = self {
            let retire = async {
                let _turn = gate.turn.clone().lock_owned().await;
                if let Ok(connection) = gate.writer.acquire().await {
                    let _ = sqlx::Connection::close_hard(connection.detach()).await;
                }
            };
            let _ = tokio::time::timeout(RETIRE_WAIT, retire).await;
        }
    }

    pub async fn close(&self) {
        if let Store::Sqlite(_, gate) = self {
            gate.writer.close().await;
        }
        on_backend!(self, pool => pool.close().await)
    }
}

fn sqlite_open_error(path: &Path, source: sqlx::Error) -> OpenError {
    let path = path.to_path_buf();
    if crate::error::sqlite_file_damaged(&source) {
        OpenError::Damaged { path, source }
    } else {
        OpenError::Sqlite { path, source }
    }
}

/// PostgreSQL's `statement_timeout` for statements outside a write transaction (views,
/// checkpoint reads): just under the API's 5 s bound on a view, so the database cancels the
/// query itself and the connection is free again when the view answers 503.
const POSTGRES_READ_STATEMENT_TIMEOUT: &str = "4800";

/// The longest [`Store::retire_writer`] waits for the write connection.
const RETIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged file is named as such, with what to do (its contents come from the log).
    #[tokio::test]
    async fn a_damaged_file_says_how_to_rebuild_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sqlite");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let Err(error) = Store::open_sqlite(&path).await else { panic!("a damaged file opened") };
        assert!(matches!(error, OpenError::Damaged { .. }), "{error:?}");
        assert!(error.to_string().contains("move the file and its -wal and -shm files aside"), "{error}");
    }

    /// A write connection gone read-only (as one opened while the files were read-only stays)
    /// is replaced after the failure, and writes go on.
    #[tokio::test]
    async fn a_write_connection_stuck_read_only_is_replaced_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(dir.path().join("p.sqlite")).await.unwrap();
        let Store::Sqlite(_, gate) = &store else { unreachable!("a SQLite store") };
        sqlx::query("CREATE TABLE t (n INTEGER)").execute(&gate.writer).await.unwrap();
        sqlx::query("PRAGMA query_only = 1").execute(&gate.writer).await.unwrap();
        let store = &store;
        let insert = |n: i64| async move {
            let mut tx = store.begin().await?;
            let StoreTx::Sqlite(sqlite, _) = &mut tx else { unreachable!("a SQLite transaction") };
            sqlx::query("INSERT INTO t VALUES ($1)").bind(n).execute(&mut **sqlite).await?;
            tx.commit().await
        };
        let failed = insert(1).await.expect_err("the connection is read-only");
        assert!(failed.to_string().contains("readonly"), "{failed}");
        assert!(insert(2).await.is_err(), "it stays read-only");
        store.retire_writer().await;
        insert(3).await.expect("a fresh connection writes");
        let rows: Vec<i64> = sqlx::query_scalar("SELECT n FROM t").fetch_all(&gate.writer).await.unwrap();
        assert_eq!(rows, [3]);
    }

    /// A write that fails because the database is full (here: SQLite's `max_page_count`, as a
    /// full disk would) leaves the next transaction able to begin once there is room again.
    #[tokio::test]
    async fn a_write_that_found_the_disk_full_does_not_stop_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(dir.path().join("p.sqlite")).await.unwrap();
        let Store::Sqlite(_, gate) = &store else { unreachable!("a SQLite store") };
        sqlx::query("CREATE TABLE filler (n INTEGER, pad BLOB)").execute(&gate.writer).await.unwrap();
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count").fetch_one(&gate.writer).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA max_page_count = {}", pages + 4)))
            .execute(&gate.writer)
            .await
            .unwrap();
        let mut tx = store.begin().await.unwrap();
        let mut failed = None;
        for n in 0..100 {
            let insert = sqlx::query("INSERT INTO filler VALUES ($1, zeroblob(4000))").bind(n);
            let StoreTx::Sqlite(sqlite, _) = &mut tx else { unreachable!("a SQLite transaction") };
            if let Err(e) = insert.execute(&mut **sqlite).await {
                failed = Some(e);
                break;
            }
        }
        assert!(failed.is_some_and(|e| e.to_string().contains("full")), "the database filled up");
        drop(tx);
        sqlx::query("PRAGMA max_page_count = 1073741823").execute(&gate.writer).await.unwrap();
        let mut tx = store.begin().await.expect("a transaction begins again");
        let StoreTx::Sqlite(sqlite, _) = &mut tx else { unreachable!("a SQLite transaction") };
        sqlx::query("INSERT INTO filler VALUES (1, NULL)").execute(&mut **sqlite).await.unwrap();
        tx.commit().await.unwrap();
    }
}

#[cfg(test)]
mod redact_tests {
    use super::redact_target;

    #[test]
    fn a_password_is_never_printed() {
        assert_eq!(redact_target("postgres://app:S3cret@db:5432/p"), "postgres://app:***@db:5432/p");
        assert_eq!(redact_target("postgresql://a:b:c@h/d"), "postgresql://a:***@h/d");
        assert_eq!(redact_target("postgres://app@db/p"), "postgres://app@db/p");
        assert_eq!(redact_target("/var/lib/taskledger/projections.sqlite"), "/var/lib/taskledger/projections.sqlite");
        // The driver takes a password in the query string too (found by review).
        assert_eq!(
            redact_target("postgres://app@h/db?password=S3cret&sslmode=require"),
            "postgres://app@h/db?password=***&sslmode=require"
        );
        assert_eq!(
            redact_target("postgresql://h:5432/db?user=app&sslpassword=k&PASSWORD=a@b"),
            "postgresql://h:5432/db?user=app&sslpassword=***&PASSWORD=***"
        );
        assert_eq!(
            redact_target("postgres://app:p@h/db?options=-c%20x%3Dy"),
            "postgres://app:***@h/db?options=-c%20x%3Dy"
        );
    }
}
