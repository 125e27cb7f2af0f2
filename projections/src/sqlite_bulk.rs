//! SQLite bulk writes through the connection's raw handle: one prepared
//! single-row statement per table, stepped once per row with values bound
//! straight from one buffer.
//!
//! Why not sqlx's own `execute` here: a rebuild into SQLite is bound by the
//! one thread that runs SQLite, and a profile of that thread (2026-12-02,
//! 1M-event rebuild) had about a fifth of it in sqlx's argument handling
//! around the statements rather than in SQLite: converting and binding each
//! value as a transient copy, clearing the bindings, dropping the argument
//! vectors, and multi-row `VALUES` statements that SQLite runs with a
//! statement journal. Here the rows' values are written once into a
//! `SqliteBatch` while the batch is rendered (before the write lock), and
//! bound with `SQLITE_STATIC` from there.
//!
//! The handle is borrowed from sqlx (`SqliteConnection::lock_handle`) inside
//! sqlx's own transaction, so `BEGIN`/`COMMIT` and the checkpoint row still go
//! through sqlx. Every statement prepared here is finalized before the handle
//! goes back: sqlx closes its connections with `sqlite3_close`, which refuses
//! a connection that still has statements.

use std::ffi::{CStr, c_int};
use std::ops::Range;
use std::ptr::{self, NonNull};

use libsqlite3_sys as ffi;
use uuid::Uuid;

use crate::sql::Sink;

/// The most buffer memory a cleared batch keeps (see `SqliteBatch::clear`).
const RETAINED_BYTES_MAX: usize = 16 << 20;

/// One value of a row, with text and blobs in `SqliteBatch::bytes`.
#[derive(Clone, Debug)]
enum Value {
    Null,
    Integer(i64),
    Text(Range<usize>),
    Blob(Range<usize>),
}

/// One statement and the rows it runs for: `values[values]`, `columns` per row.
#[derive(Debug)]
struct Statement {
    sql: String,
    columns: usize,
    rows: usize,
    values: Range<usize>,
}

/// A batch's SQLite statements with their values, in the order they run.
#[derive(Debug, Default)]
pub struct SqliteBatch {
    statements: Vec<Statement>,
    values: Vec<Value>,
    bytes: Vec<u8>,
}

impl SqliteBatch {
    pub fn len(&self) -> usize {
        self.statements.len()
    }

    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    /// Empties the batch and keeps its buffers for the next one, unless they
    /// grew past `RETAINED_BYTES_MAX` (a bulk build's batch): a live
    /// projector renders a batch every few milliseconds, and buffers grown
    /// afresh each time cost page faults on memory the allocator had given
    /// back (7 % of the server's CPU under `taskledger-bench`'s lifecycle,
    /// 2026-12-04).
    pub fn clear(&mut self) {
        let retained = self.bytes.capacity() + self.values.capacity() * std::mem::size_of::<Value>();
        if retained > RETAINED_BYTES_MAX {
            *self = SqliteBatch::default();
        } else {
            self.statements.clear();
            self.values.clear();
            self.bytes.clear();
        }
    }

    /// Rows over all statements: how much work `execute` has to do.
    pub fn rows(&self) -> usize {
        self.statements.iter().map(|s| s.rows).sum()
    }

    /// Adds `sql` (with `?1`…`?columns` parameters), run once per row that
    /// `fill` writes: `fill` gets a sink and binds `rows` rows of `columns`
    /// values each.
    pub(crate) fn push(&mut self, sql: String, columns: usize, rows: usize, fill: impl FnOnce(&mut dyn Sink)) {
        let start = self.values.len();
        let mut sink = BatchSink { values: &mut self.values, bytes: &mut self.bytes };
        fill(&mut sink);
        let end = self.values.len();
        assert_eq!(end - start, columns * rows, "rows bind as many values as they have columns");
        self.statements.push(Statement { sql, columns, rows, values: start..end });
    }

    /// Runs every statement on `db`, in order, in the transaction the caller
    /// holds open.
    ///
    /// # Safety
    /// `db` is an open connection that no other thread uses until this returns.
    pub unsafe fn execute(&self, db: NonNull<ffi::sqlite3>) -> Result<(), sqlx::Error> {
        for statement in &self.statements {
            // SAFETY: the caller's contract on `db`.
            let prepared = unsafe { Prepared::new(db, &statement.sql)? };
            let values = &self.values[statement.values.clone()];
            for row in 0..statement.rows {
                let row = &values[row * statement.columns..(row + 1) * statement.columns];
                // SAFETY: `self.bytes` outlives the step the values are bound for.
                unsafe { prepared.run(row, &self.bytes)? };
            }
        }
        Ok(())
    }
}

/// Writes a row's values into a `SqliteBatch`.
struct BatchSink<'a> {
    values: &'a mut Vec<Value>,
    bytes: &'a mut Vec<u8>,
}

impl BatchSink<'_> {
    fn stored(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }
}

impl Sink for BatchSink<'_> {
    fn i64(&mut self, value: i64) {
        self.values.push(Value::Integer(value));
    }
    fn opt_i64(&mut self, value: Option<i64>) {
        self.values.push(value.map_or(Value::Null, Value::Integer));
    }
    fn text(&mut self, value: &str) {
        let range = self.stored(value.as_bytes());
        self.values.push(Value::Text(range));
    }
    fn opt_text(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.text(value),
            None => self.values.push(Value::Null),
        }
    }
    /// As sqlx stores a `Uuid` on SQLite: its 16 bytes as a blob.
    fn uuid(&mut self, value: Uuid) {
        self.bytes(value.as_bytes());
    }
    fn opt_uuid(&mut self, value: Option<Uuid>) {
        match value {
            Some(value) => self.uuid(value),
            None => self.values.push(Value::Null),
        }
    }
    fn bytes(&mut self, value: &[u8]) {
        let range = self.stored(value);
        self.values.push(Value::Blob(range));
    }
    /// As sqlx stores a `bool` on SQLite: the integer 0 or 1.
    fn bool(&mut self, value: bool) {
        self.values.push(Value::Integer(i64::from(value)));
    }
}

/// A prepared statement, finalized on drop.
struct Prepared<'a> {
    db: NonNull<ffi::sqlite3>,
    stmt: NonNull<ffi::sqlite3_stmt>,
    sql: &'a str,
}

impl<'a> Prepared<'a> {
    /// # Safety
    /// As `SqliteBatch::execute`.
    unsafe fn new(db: NonNull<ffi::sqlite3>, sql: &'a str) -> Result<Prepared<'a>, sqlx::Error> {
        let length = c_int::try_from(sql.len()).map_err(|_| protocol(format!("statement of {} bytes", sql.len())))?;
        let mut stmt = ptr::null_mut();
        let mut tail = ptr::null();
        // SAFETY: `sql` is valid for `length` bytes; `stmt` receives the statement
        // and `tail` a pointer into `sql` just after it.
        let code = unsafe { ffi::sqlite3_prepare_v2(db.as_ptr(), sql.as_ptr().cast(), length, &mut stmt, &mut tail) };
        if code != ffi::SQLITE_OK {
            // SAFETY: the caller's contract on `db`.
            return Err(unsafe { SqliteCallError::from_db(db, sql) }.into());
        }
        let stmt = NonNull::new(stmt).ok_or_else(|| protocol(format!("no statement in {sql:?}")))?;
        let prepared = Prepared { db, stmt, sql };
        // SQLite compiles only the first statement of the text: refuse a second
        // one rather than skip it.
        let consumed = (tail as usize).saturating_sub(sql.as_ptr() as usize).min(sql.len());
        if !sql.as_bytes()[consumed..].iter().all(|b| b.is_ascii_whitespace() || *b == b';') {
            return Err(protocol(format!("more than one statement in {sql:?}")));
        }
        Ok(prepared)
    }

    /// Binds `row` and steps the statement once.
    ///
    /// # Safety
    /// `bytes` holds the ranges of `row`'s text and blob values.
    unsafe fn run(&self, row: &[Value], bytes: &[u8]) -> Result<(), sqlx::Error> {
        let stmt = self.stmt.as_ptr();
        for (index, value) in row.iter().enumerate() {
            let parameter = c_int::try_from(index + 1).expect("a statement has few parameters");
            // SAFETY: `stmt` is prepared; text and blobs point into `bytes`, which
            // outlives the step below (SQLITE_STATIC: SQLite does not copy them),
            // and the reset after the step drops SQLite's use of them.
            let code = unsafe {
                match value {
                    Value::Null => ffi::sqlite3_bind_null(stmt, parameter),
                    Value::Integer(v) => ffi::sqlite3_bind_int64(stmt, parameter, *v),
                    Value::Text(range) => ffi::sqlite3_bind_text(
                        stmt,
                        parameter,
                        bytes[range.clone()].as_ptr().cast(),
                        length(range)?,
                        ffi::SQLITE_STATIC(),
                    ),
                    Value::Blob(range) => ffi::sqlite3_bind_blob(
                        stmt,
                        parameter,
                        bytes[range.clone()].as_ptr().cast(),
                        length(range)?,
                        ffi::SQLITE_STATIC(),
                    ),
                }
            };
            if code != ffi::SQLITE_OK {
                // SAFETY: as `SqliteBatch::execute`.
                return Err(unsafe { SqliteCallError::from_db(self.db, self.sql) }.into());
            }
        }
        // SAFETY: `stmt` is prepared and bound.
        let code = unsafe { ffi::sqlite3_step(stmt) };
        // The error, if any, is read before the reset (which returns it again).
        let error = (code != ffi::SQLITE_DONE && code != ffi::SQLITE_ROW)
            // SAFETY: as `SqliteBatch::execute`.
            .then(|| unsafe { SqliteCallError::from_db(self.db, self.sql) });
        // SAFETY: `stmt` is prepared.
        unsafe { ffi::sqlite3_reset(stmt) };
        match error {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        // SAFETY: `stmt` was prepared by `new` and is finalized once, here.
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

fn length(range: &Range<usize>) -> Result<c_int, sqlx::Error> {
    c_int::try_from(range.len()).map_err(|_| protocol(format!("a value of {} bytes", range.len())))
}

fn protocol(message: String) -> sqlx::Error {
    sqlx::Error::Protocol(message)
}

/// An error SQLite returned for a statement run here, as sqlx reports its own.
#[derive(Debug, thiserror::Error)]
#[error("sqlite error {code}: {message} (in {sql:.200})")]
pub struct SqliteCallError {
    code: c_int,
    message: String,
    sql: String,
}

impl SqliteCallError {
    /// # Safety
    /// As `SqliteBatch::execute`.
    unsafe fn from_db(db: NonNull<ffi::sqlite3>, sql: &str) -> SqliteCallError {
        // SAFETY: `db` is open; errmsg returns a NUL-terminated string SQLite owns.
        let (code, message) = unsafe {
            let code = ffi::sqlite3_extended_errcode(db.as_ptr());
            let message = CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr())).to_string_lossy().into_owned();
            (code, message)
        };
        SqliteCallError { code, message, sql: sql.to_owned() }
    }
}

impl sqlx::error::DatabaseError for SqliteCallError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(self.code.to_string().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                sqlx::error::ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => sqlx::error::ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => sqlx::error::ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => sqlx::error::ErrorKind::CheckViolation,
            _ => sqlx::error::ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Connection, Row, SqliteConnection};

    use super::*;

    async fn memory() -> SqliteConnection {
        let mut conn = SqliteConnectOptions::new().in_memory(true).connect().await.unwrap();
        sqlx::query("CREATE TABLE t (id BLOB PRIMARY KEY, n INTEGER, s TEXT, b BLOB, o INTEGER, f INTEGER)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    async fn execute(conn: &mut SqliteConnection, batch: &SqliteBatch) -> Result<(), sqlx::Error> {
        let mut handle = conn.lock_handle().await.unwrap();
        let db = handle.as_raw_handle();
        // SAFETY: the handle is locked out of sqlx's worker thread.
        unsafe { batch.execute(db) }
    }

    /// A row of `t`: id, n, s, b, o, f.
    type InsertedRow<'a> = (Uuid, i64, &'a str, &'a [u8], Option<i64>, bool);
    type ReadRow = (Uuid, i64, String, Vec<u8>, Option<i64>, bool);

    fn insert(batch: &mut SqliteBatch, rows: &[InsertedRow<'_>]) {
        let sql = "INSERT INTO t (id, n, s, b, o, f) VALUES (?1, ?2, ?3, ?4, ?5, ?6)".to_owned();
        batch.push(sql, 6, rows.len(), |sink| {
            for (id, n, s, b, o, f) in rows {
                sink.uuid(*id);
                sink.i64(*n);
                sink.text(s);
                sink.bytes(b);
                sink.opt_i64(*o);
                sink.bool(*f);
            }
        });
    }

    #[tokio::test]
    async fn values_read_back_as_sqlx_reads_them_including_empty_text_and_blobs() {
        let mut conn = memory().await;
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut batch = SqliteBatch::default();
        insert(&mut batch, &[(a, -7, "héllo", b"\x00\x01", Some(i64::MAX), true), (b, 0, "", b"", None, false)]);
        batch.push("DELETE FROM t WHERE n = ?1".to_owned(), 1, 1, |sink| sink.i64(12345));
        assert_eq!((batch.len(), batch.rows()), (2, 3));
        execute(&mut conn, &batch).await.unwrap();

        let rows = sqlx::query("SELECT id, n, s, b, o, f FROM t ORDER BY n").fetch_all(&mut conn).await.unwrap();
        let read: Vec<ReadRow> =
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))).collect();
        assert_eq!(
            read,
            [(a, -7, "héllo".to_owned(), vec![0, 1], Some(i64::MAX), true), (b, 0, String::new(), vec![], None, false)]
        );
        let nulls: i64 = sqlx::query_scalar("SELECT count(*) FROM t WHERE s IS NULL OR b IS NULL")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(nulls, 0, "empty text and blobs are not NULL");
    }

    #[tokio::test]
    async fn a_cleared_batch_runs_only_what_was_pushed_after_it_and_keeps_small_buffers_only() {
        let mut conn = memory().await;
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut batch = SqliteBatch::default();
        insert(&mut batch, &[(a, 1, "first batch, a longer text than the next", b"\x01", None, true)]);
        execute(&mut conn, &batch).await.unwrap();
        let kept = batch.bytes.capacity();
        batch.clear();
        assert_eq!((batch.len(), batch.rows()), (0, 0));
        assert_eq!(batch.bytes.capacity(), kept, "a small batch's buffer is kept");
        insert(&mut batch, &[(b, 2, "second", b"", Some(3), false)]);
        execute(&mut conn, &batch).await.unwrap();
        let rows = sqlx::query("SELECT id, n, s, b, o, f FROM t ORDER BY n").fetch_all(&mut conn).await.unwrap();
        let read: Vec<ReadRow> =
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))).collect();
        assert_eq!(
            read,
            [
                (a, 1, "first batch, a longer text than the next".to_owned(), vec![1], None, true),
                (b, 2, "second".to_owned(), vec![], Some(3), false)
            ],
            "the cleared batch neither ran its first row again nor mixed its values into the second"
        );

        let big = vec![0u8; RETAINED_BYTES_MAX + 1];
        batch.push("SELECT ?1".to_owned(), 1, 1, |sink| sink.bytes(&big));
        batch.clear();
        assert_eq!(batch.bytes.capacity(), 0, "a bulk batch's buffer goes back to the allocator");
    }

    #[tokio::test]
    async fn a_failing_row_is_a_database_error_and_the_transaction_rolls_back() {
        let mut conn = memory().await;
        let id = Uuid::from_u128(9);
        let mut tx = conn.begin().await.unwrap();
        let mut batch = SqliteBatch::default();
        insert(&mut batch, &[(id, 1, "x", b"", None, false), (id, 2, "y", b"", None, false)]);
        let error = execute(&mut tx, &batch).await.unwrap_err();
        let sqlx::Error::Database(error) = error else { panic!("{error:?}") };
        assert_eq!(error.kind(), sqlx::error::ErrorKind::UniqueViolation);
        assert!(error.message().contains("UNIQUE constraint failed: t.id"), "{}", error.message());
        tx.rollback().await.unwrap();
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&mut conn).await.unwrap();
        assert_eq!(count, 0);

        // A statement SQLite cannot prepare is an error too, and the connection
        // stays usable (every statement is finalized: sqlx's close would panic).
        let mut bad = SqliteBatch::default();
        bad.push("INSERT INTO missing VALUES (?1)".to_owned(), 1, 1, |sink| sink.i64(1));
        let error = execute(&mut conn, &bad).await.unwrap_err();
        assert!(error.to_string().contains("no such table: missing"), "{error}");
        let mut two = SqliteBatch::default();
        two.push("DELETE FROM t; DROP TABLE t".to_owned(), 0, 1, |_| {});
        let error = execute(&mut conn, &two).await.unwrap_err();
        assert!(error.to_string().contains("more than one statement"), "{error}");
        let mut one = SqliteBatch::default();
        one.push("DELETE FROM t; ".to_owned(), 0, 1, |_| {});
        execute(&mut conn, &one).await.unwrap();
        conn.close().await.unwrap();
    }
}
