//! Bulk statements shared by every projector: multi-row upserts and deletes,
//! rendered with their values before the write transaction begins.
//!
//! Rebuild speed is decided here. One statement per row costs a round trip
//! (PostgreSQL) or a statement step (SQLite) each; one statement per few
//! thousand rows amortizes both, which is what lets a rebuild apply hundreds
//! of thousands of events per second. On SQLite a statement is
//! `INSERT … VALUES (…),(…)`, chunked under the bind-parameter limit; on
//! PostgreSQL it binds one array per column and reads them back with
//! `UNNEST`, so a statement's text never depends on its row count: it is
//! parsed and planned once per connection, and each value travels as an
//! array element instead of a separate parameter.
//!
//! Why render first and run later (`Statements`): SQLite has one writer at a
//! time, so everything done while a projector holds the write lock delays
//! every other projector. Folding events, building rows and encoding values
//! happen before the transaction begins; inside it, only the database works.

use std::sync::Arc;

use sqlx::{Database, Postgres, QueryBuilder, Sqlite};
use uuid::Uuid;

use crate::store::{Backend, StoreTx, on_tx};

/// Most bind parameters in one SQLite statement: under its 32,766.
pub const BINDS_PER_STATEMENT_MAX: usize = 30_000;

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

/// Binds a row's values as one `(…)` tuple of a SQLite `VALUES` list.
struct TupleSink<'a, DB: Database> {
    builder: &'a mut QueryBuilder<DB>,
    first: bool,
}

impl TupleSink<'_, Sqlite> {
    fn sep(&mut self) {
        if !self.first {
            self.builder.push(",");
        }
        self.first = false;
    }
}

/// Text goes in as `Arc<str>`, which sqlx hands to SQLite as it is: one
/// allocation per value instead of a `String` and the `Arc` around it.
impl Sink for TupleSink<'_, Sqlite> {
    fn i64(&mut self, value: i64) {
        self.sep();
        self.builder.push_bind(value);
    }
    fn opt_i64(&mut self, value: Option<i64>) {
        self.sep();
        self.builder.push_bind(value);
    }
    fn text(&mut self, value: &str) {
        self.sep();
        self.builder.push_bind(Arc::<str>::from(value));
    }
    fn opt_text(&mut self, value: Option<&str>) {
        self.sep();
        self.builder.push_bind(value.map(Arc::<str>::from));
    }
    fn uuid(&mut self, value: Uuid) {
        self.sep();
        self.builder.push_bind(value);
    }
    fn opt_uuid(&mut self, value: Option<Uuid>) {
        self.sep();
        self.builder.push_bind(value);
    }
    fn bytes(&mut self, value: &[u8]) {
        self.sep();
        self.builder.push_bind(value.to_vec());
    }
    fn bool(&mut self, value: bool) {
        self.sep();
        self.builder.push_bind(value);
    }
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
        column_push!(self, Text, value.to_owned())
    }
    fn opt_text(&mut self, value: Option<&str>) {
        column_push!(self, OptText, value.map(str::to_owned))
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

/// The largest power of two at or below `n` (which must be at least 1).
fn power_of_two_at_most(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// Splits `items` into chunks whose lengths are powers of two of at most
/// `most` items: the biggest that fit first, then the binary digits of the
/// rest. A SQLite statement's text depends only on its row count, so with a
/// few dozen distinct counts every statement is parsed once per connection
/// and then served from sqlx's statement cache; a live projector's small
/// batches of ever-different sizes used to be parsed afresh each time.
fn cacheable_chunks<T>(items: &[T], most: usize) -> impl Iterator<Item = &[T]> {
    let most = power_of_two_at_most(most.max(1));
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, tail) = rest.split_at(most.min(power_of_two_at_most(rest.len())));
        rest = tail;
        Some(chunk)
    })
}

/// A batch's statements, rendered with their values for one backend, in the
/// order they must run.
pub enum Statements {
    Sqlite(Vec<QueryBuilder<Sqlite>>),
    Postgres(Vec<QueryBuilder<Postgres>>),
}

impl Statements {
    pub fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Statements::Sqlite(Vec::new()),
            Backend::Postgres => Statements::Postgres(Vec::new()),
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

    /// `head VALUES (..),(..) tail` (SQLite) or `head SELECT * FROM
    /// UNNEST(..) tail` (PostgreSQL) for all `rows`. `head` is e.g.
    /// `INSERT INTO t (a, b)`; `tail` an optional `ON CONFLICT` clause. The
    /// rows must not repeat a conflict key (one statement cannot upsert a row
    /// twice).
    pub fn insert_rows<R: SqlRow>(&mut self, head: &str, tail: &str, rows: &[R]) {
        if rows.is_empty() {
            return;
        }
        match self {
            Statements::Sqlite(out) => {
                let per_statement = (BINDS_PER_STATEMENT_MAX / R::COLUMNS).max(1);
                for chunk in cacheable_chunks(rows, per_statement) {
                    let mut builder = QueryBuilder::new(head);
                    builder.push(" VALUES ");
                    for (i, row) in chunk.iter().enumerate() {
                        builder.push(if i == 0 { "(" } else { ",(" });
                        let mut sink = TupleSink { builder: &mut builder, first: true };
                        row.bind(&mut sink);
                        builder.push(")");
                    }
                    builder.push(" ");
                    builder.push(tail);
                    out.push(builder);
                }
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
                out.push(builder);
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
                for chunk in cacheable_chunks(ids, BINDS_PER_STATEMENT_MAX) {
                    let mut builder = QueryBuilder::new(format!("DELETE FROM {table} WHERE {column} IN ("));
                    let mut separated = builder.separated(",");
                    for id in chunk {
                        separated.push_bind(*id);
                    }
                    builder.push(")");
                    out.push(builder);
                }
            }
            Statements::Postgres(out) => {
                let mut builder = QueryBuilder::new(format!("DELETE FROM {table} WHERE {column} = ANY("));
                builder.push_bind(ids.to_vec());
                builder.push("::UUID[])");
                out.push(builder);
            }
        }
    }

    /// A statement without parameters.
    pub fn execute(&mut self, statement: &str) {
        match self {
            Statements::Sqlite(out) => out.push(QueryBuilder::new(statement)),
            Statements::Postgres(out) => out.push(QueryBuilder::new(statement)),
        }
    }

    /// Runs every statement, in order, in `tx` (which must be on the backend
    /// these were rendered for).
    pub async fn run(self, tx: &mut StoreTx) -> Result<(), sqlx::Error> {
        match (self, tx) {
            (Statements::Sqlite(statements), StoreTx::Sqlite(t, _)) => {
                for mut statement in statements {
                    statement.build().execute(&mut **t).await?;
                }
            }
            (Statements::Postgres(statements), StoreTx::Postgres(t)) => {
                for mut statement in statements {
                    statement.build().execute(&mut **t).await?;
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
}

pub fn types(backend: Backend) -> Types {
    match backend {
        Backend::Sqlite => Types { uuid: "BLOB", bytes: "BLOB" },
        Backend::Postgres => Types { uuid: "UUID", bytes: "BYTEA" },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_powers_of_two_under_the_limit_and_cover_everything_in_order() {
        for n in 0..300usize {
            let items: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = cacheable_chunks(&items, 100).collect();
            assert!(chunks.iter().all(|c| c.len().is_power_of_two() && c.len() <= 64), "n = {n}: {chunks:?}");
            assert_eq!(chunks.concat(), items, "n = {n}");
            // Full chunks first, then the binary digits of the rest: at most 6 more.
            assert!(chunks.len() <= n / 64 + 6, "n = {n}: {} chunks", chunks.len());
        }
    }
}
