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

/// The largest power of two at or below `n` (which must be at least 1).
fn power_of_two_at_most(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

/// Splits `items` into chunks whose lengths are powers of two of at most
/// `most` items: the biggest that fit first, then the binary digits of the
/// rest. A statement's text depends only on its row count, so with a few
/// dozen distinct counts every statement is parsed once per connection and
/// then served from sqlx's statement cache; a live projector's small batches
/// of ever-different sizes used to be parsed afresh each time.
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

/// Runs `head VALUES (..),(..) tail` for all `rows`, in few statements under
/// the bind limit (see `cacheable_chunks`). `head` is e.g.
/// `INSERT INTO t (a, b)`; `tail` an optional `ON CONFLICT` clause.
pub async fn insert_rows<R: SqlRow>(tx: &mut StoreTx, head: &str, tail: &str, rows: &[R]) -> Result<(), sqlx::Error> {
    let per_statement = (BINDS_PER_STATEMENT_MAX / R::COLUMNS).max(1);
    for chunk in cacheable_chunks(rows, per_statement) {
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
    for chunk in cacheable_chunks(ids, BINDS_PER_STATEMENT_MAX) {
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
