//! Bulk statements shared by every projector: multi-row upserts and deletes,
//! chunked under the backends' bind-parameter limits.
//!
//! Rebuild speed is decided here. One statement per row costs a round trip
//! (PostgreSQL) or a statement step (SQLite) each; one statement per few
//! thousand rows amortizes both, which is what lets a rebuild apply hundreds
//! of thousands of events per second.

use sqlx::{Database, Postgres, QueryBuilder, Sqlite};
use uuid::Uuid;

use crate::store::{Backend, StoreTx, on_tx};

/// Most bind parameters in one statement: under SQLite's 32,766 and
/// PostgreSQL's 65,535.
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

struct TupleSink<'a, DB: Database> {
    builder: &'a mut QueryBuilder<DB>,
    first: bool,
}

macro_rules! impl_sink {
    ($db:ty) => {
        impl TupleSink<'_, $db> {
            fn sep(&mut self) {
                if !self.first {
                    self.builder.push(",");
                }
                self.first = false;
            }
        }
        impl Sink for TupleSink<'_, $db> {
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
                self.builder.push_bind(value.to_owned());
            }
            fn opt_text(&mut self, value: Option<&str>) {
                self.sep();
                self.builder.push_bind(value.map(str::to_owned));
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
    };
}
impl_sink!(Sqlite);
impl_sink!(Postgres);

/// Runs `head VALUES (..),(..) tail` for all `rows`, in as few statements as
/// the bind limit allows. `head` is e.g. `INSERT INTO t (a, b)`; `tail` an
/// optional `ON CONFLICT` clause.
pub async fn insert_rows<R: SqlRow>(tx: &mut StoreTx, head: &str, tail: &str, rows: &[R]) -> Result<(), sqlx::Error> {
    let per_statement = (BINDS_PER_STATEMENT_MAX / R::COLUMNS).max(1);
    for chunk in rows.chunks(per_statement) {
        on_tx!(tx, t => {
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
            builder.build().execute(&mut **t).await?;
        })
    }
    Ok(())
}

/// `DELETE FROM table WHERE column IN (...)` for every id.
pub async fn delete_by_uuid(tx: &mut StoreTx, table: &str, column: &str, ids: &[Uuid]) -> Result<(), sqlx::Error> {
    for chunk in ids.chunks(BINDS_PER_STATEMENT_MAX) {
        on_tx!(tx, t => {
            let mut builder = QueryBuilder::new(format!("DELETE FROM {table} WHERE {column} IN ("));
            let mut separated = builder.separated(",");
            for id in chunk {
                separated.push_bind(*id);
            }
            builder.push(")");
            builder.build().execute(&mut **t).await?;
        })
    }
    Ok(())
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
