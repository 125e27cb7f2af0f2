//! Bulk statements shared by every projector: upserts and deletes of many
//! rows, rendered with their values before the write transaction begins.
//!
//! Rebuild speed is decided here. On PostgreSQL one statement per row would
//! cost a round trip each: a statement binds one array per column and reads
//! them back with `UNNEST`, so its text never depends on its row count (it
//! is parsed and planned once per connection) and each value travels as an
//! array element instead of a separate parameter. SQLite runs in this
//! process, so there a statement is prepared once per batch and stepped once
//! per row with its values bound from one buffer (`sqlite_bulk`).
//!
//! Why render first and run later (`Statements`): SQLite has one writer at a
//! time, so everything done while a projector holds the write lock delays
//! every other projector. Folding events, building rows and encoding values
//! happen before the transaction begins; inside it, only the database works.

use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use crate::pg_copy::{self, CopyRows};
use crate::runtime::off_worker_if;
use crate::sqlite_bulk::SqliteBatch;
use crate::store::{Backend, StoreTx, on_tx};

/// SQLite batches of at least this many rows run under `block_in_place` on a
/// multi-threaded runtime: they take the calling worker for milliseconds
/// (a bulk build's for tens of them), and its other tasks move elsewhere.
const OFF_WORKER_ROWS_MIN: usize = 1024;

/// Where a row writes its values, in column order.
pub trait Sink {
    fn i64(&mut self, value: i64);
    fn opt_i64(&mut self, value: Option<i64>);
    fn text(&mut self, value: &str);
    fn opt_text(&mut self, value: Option<&str>);
    fn uuid(&mut self, value: Uuid);
    fn opt_uuid(&mut self, value: Option<Uuid>);
    fn bytes(&mut self, value: &[u8]);
    fn bool(&mut self, value: bool);
}

/// A row of some table: its column count and how it binds its values.
pub trait SqlRow {
    const COLUMNS: usize;
    fn bind(&self, sink: &mut dyn Sink);
}

/// One column's values for a PostgreSQL `UNNEST` insert.
enum Column {
    I64(Vec<i64>),
    OptI64(Vec<Option<i64>>),
    Text(Vec<String>),
    OptText(Vec<Option<String>>),
    Uuid(Vec<Uuid>),
    OptUuid(Vec<Option<Uuid>>),
    Bytes(Vec<Vec<u8>>),
    Bool(Vec<bool>),
}

impl Column {
    /// The array type the column is cast to in `UNNEST($n::…)`.
    fn array_type(&self) -> &'static str {
        match self {
            Column::I64(_) | Column::OptI64(_) => "BIGINT[]",
            Column::Text(_) | Column::OptText(_) => "TEXT[]",
            Column::Uuid(_) | Column::OptUuid(_) => "UUID[]",
            Column::Bytes(_) => "BYTEA[]",
            Column::Bool(_) => "BOOLEAN[]",
        }
    }

    fn bind_into(self, builder: &mut QueryBuilder<Postgres>) {
        match self {
            Column::I64(v) => builder.push_bind(v),
            Column::OptI64(v) => builder.push_bind(v),
            Column::Text(v) => builder.push_bind(v),
            Column::OptText(v) => builder.push_bind(v),
            Column::Uuid(v) => builder.push_bind(v),
            Column::OptUuid(v) => builder.push_bind(v),
            Column::Bytes(v) => builder.push_bind(v),
            Column::Bool(v) => builder.push_bind(v),
        };
    }
}

/// Collects rows column by column. The first row decides each column's
/// type; a row whose column changes type is a bug in its `SqlRow`.
struct ColumnSink {
    columns: Vec<Column>,
    at: usize,
    rows: usize,
}

macro_rules! column_push {
    ($self:ident, $variant:ident, $value:expr) => {{
        let value = $value;
        if $self.rows == 0 {
            $self.columns.push(Column::$variant(Vec::new()));
        }
        match &mut $self.columns[$self.at] {
            Column::$variant(values) => values.push(value),
            _ => panic!("column {} of a row changed type", $self.at),
        }
        $self.at += 1;
    }};
}

impl Sink for ColumnSink {
    fn i64(&mut self, value: i64) {
        column_push!(self, I64, value)
    }
    fn opt_i64(&mut self, value: Option<i64>) {
        column_push!(self, OptI64, value)
    }
    fn text(&mut self, value: &str) {
        column_push!(self, Text, pg_copy::storable_text(value).into_owned())
    }
    fn opt_text(&mut self, value: Option<&str>) {
        column_push!(self, OptText, value.map(|value| pg_copy::storable_text(value).into_owned()))
    }
    fn uuid(&mut self, value: Uuid) {
        column_push!(self, Uuid, value)
    }
    fn opt_uuid(&mut self, value: Option<Uuid>) {
        column_push!(self, OptUuid, value)
    }
    fn bytes(&mut self, value: &[u8]) {
        column_push!(self, Bytes, value.to_vec())
    }
    fn bool(&mut self, value: bool) {
        column_push!(self, Bool, value)
    }
}

/// A batch's statements, rendered with their values for one backend, in the
/// order they must run.
pub enum Statements {
    Sqlite(SqliteBatch),
    Postgres(Vec<PgStatement>),
}

/// One PostgreSQL statement of a batch.
pub enum PgStatement {
    Query(QueryBuilder<Postgres>),
    /// Plain inserts stream through `COPY` (`pg_copy`).
    Copy(CopyRows),
}

impl Statements {
    pub fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Statements::Sqlite(SqliteBatch::default()),
            Backend::Postgres => Statements::Postgres(Vec::new()),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Statements::Sqlite(_) => Backend::Sqlite,
            Statements::Postgres(_) => Backend::Postgres,
        }
    }

    /// Empties these for the next batch, keeping what buffers are worth
    /// keeping (see `SqliteBatch::clear`).
    pub fn clear(&mut self) {
        match self {
            Statements::Sqlite(s) => s.clear(),
            Statements::Postgres(s) => s.clear(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Statements::Sqlite(s) => s.len(),
            Statements::Postgres(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `head VALUES (?1, …) tail` once per row (SQLite) or `head SELECT *
    /// FROM UNNEST(..) tail` for all `rows` (PostgreSQL; with no `tail` and
    /// at least `pg_copy::COPY_ROWS_MIN` rows, a `COPY` of them instead).
    /// `head` is e.g. `INSERT INTO t (a, b)`; `tail` an optional `ON
    /// CONFLICT` clause. The rows must not repeat a conflict key (one
    /// PostgreSQL statement cannot upsert a row twice).
    pub fn insert_rows<R: SqlRow>(&mut self, head: &str, tail: &str, rows: &[R]) {
        if rows.is_empty() {
            return;
        }
        match self {
            Statements::Sqlite(out) => {
                let mut sql = format!("{head} VALUES (");
                for column in 1..=R::COLUMNS {
                    sql.push_str(if column == 1 { "?" } else { ", ?" });
                    sql.push_str(&column.to_string());
                }
                sql.push_str(") ");
                sql.push_str(tail);
                out.push(sql, R::COLUMNS, rows.len(), |sink| rows.iter().for_each(|row| row.bind(sink)));
            }
            Statements::Postgres(out) if tail.is_empty() && rows.len() >= pg_copy::COPY_ROWS_MIN => {
                out.push(PgStatement::Copy(pg_copy::render(head, rows)))
            }
            Statements::Postgres(out) => {
                let mut sink = ColumnSink { columns: Vec::with_capacity(R::COLUMNS), at: 0, rows: 0 };
                for row in rows {
                    sink.at = 0;
                    row.bind(&mut sink);
                    assert_eq!(sink.at, R::COLUMNS, "a row binds as many values as it has columns");
                    sink.rows += 1;
                }
                let mut builder = QueryBuilder::new(head);
                builder.push(" SELECT * FROM UNNEST(");
                for (i, column) in sink.columns.into_iter().enumerate() {
                    if i > 0 {
                        builder.push(", ");
                    }
                    let array_type = column.array_type();
                    column.bind_into(&mut builder);
                    builder.push("::");
                    builder.push(array_type);
                }
                builder.push(") ");
                builder.push(tail);
                out.push(PgStatement::Query(builder));
            }
        }
    }

    /// `DELETE FROM table WHERE column IN (...)` for every id.
    pub fn delete_by_uuid(&mut self, table: &str, column: &str, ids: &[Uuid]) {
        if ids.is_empty() {
            return;
        }
        match self {
            Statements::Sqlite(out) => {
                let sql = format!("DELETE FROM {table} WHERE {column} = ?1");
                out.push(sql, 1, ids.len(), |sink| ids.iter().for_each(|id| sink.uuid(*id)));
            }
            Statements::Postgres(out) => {
                let mut builder = QueryBuilder::new(format!("DELETE FROM {table} WHERE {column} = ANY("));
                builder.push_bind(ids.to_vec());
                builder.push("::UUID[])");
                out.push(PgStatement::Query(builder));
            }
        }
    }

    /// A statement without parameters.
    pub fn execute(&mut self, statement: &str) {
        match self {
            Statements::Sqlite(out) => out.push(statement.to_owned(), 0, 1, |_| {}),
            Statements::Postgres(out) => out.push(PgStatement::Query(QueryBuilder::new(statement))),
        }
    }

    /// Runs every statement, in order, in `tx` (which must be on the backend
    /// these were rendered for). PostgreSQL's are used up; SQLite's stay, to
    /// be cleared and reused.
    pub async fn run(&mut self, tx: &mut StoreTx) -> Result<(), sqlx::Error> {
        match (self, tx) {
            (Statements::Sqlite(batch), StoreTx::Sqlite(t, _)) => {
                let mut handle = t.lock_handle().await?;
                let db = handle.as_raw_handle();
                // SAFETY: sqlx's worker thread keeps off the connection while `handle` is held.
                off_worker_if(batch.rows() >= OFF_WORKER_ROWS_MIN, || unsafe { batch.execute(db) })?;
            }
            (Statements::Postgres(statements), StoreTx::Postgres(t)) => {
                for statement in statements.drain(..) {
                    match statement {
                        PgStatement::Query(mut query) => {
                            query.build().execute(&mut **t).await?;
                        }
                        PgStatement::Copy(rows) => {
                            let mut copy = t.copy_in_raw(&rows.statement).await?;
                            if let Err(error) = copy.send(rows.data).await {
                                // Leave the connection usable (the transaction rolls back).
                                let _ = copy.abort(error.to_string()).await;
                                return Err(error);
                            }
                            copy.finish().await?;
                        }
                    }
                }
            }
            _ => panic!("statements rendered for one backend run on the other"),
        }
        Ok(())
    }
}

/// Runs one statement without parameters (DDL).
pub async fn execute(tx: &mut StoreTx, statement: &str) -> Result<(), sqlx::Error> {
    on_tx!(tx, t => {
        sqlx::query(sqlx::AssertSqlSafe(statement.to_owned())).execute(&mut **t).await?;
    });
    Ok(())
}

/// The backend's column types for the few that differ.
pub struct Types {
    pub uuid: &'static str,
    pub bytes: &'static str,
    /// A primary key of one 64-bit integer. On SQLite only `INTEGER PRIMARY KEY` names the
    /// rowid itself; `BIGINT PRIMARY KEY` is a second b-tree (an automatic unique index)
    /// beside the rowid's, written with every row.
    pub integer_key: &'static str,
}

pub fn types(backend: Backend) -> Types {
    match backend {
        Backend::Sqlite => Types { uuid: "BLOB", bytes: "BLOB", integer_key: "INTEGER PRIMARY KEY" },
        Backend::Postgres => Types { uuid: "UUID", bytes: "BYTEA", integer_key: "BIGINT PRIMARY KEY" },
    }
}
