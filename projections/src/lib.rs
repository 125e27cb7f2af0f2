//! Projections: the read side of CQRS. Independent projectors follow the event
//! log and materialize SQL read models (queue, tasks, dashboard, audit log,
//! dead letters, workers) on SQLite (the embedded default) or PostgreSQL.
//!
//! Entry points:
//! - [`Store`]: open a SQLite file or connect to PostgreSQL (migrated).
//! - [`Projections::start`]: one tokio task per projector, each following the
//!   log from its checkpoint; [`Projections::status`] for lag and errors,
//!   [`Projections::rebuild`] for a rebuild without downtime.
//! - [`query`]: the typed queries the API serves.
//! - [`asof`]: materialize every projector at seq N or time T into a scratch
//!   SQLite file.
//! - [`testing`]: a throwaway PostgreSQL cluster for tests of any crate.
//!
//! Architecture invariants:
//! - Projections never write to the log and never read the writer's ledger:
//!   everything they know comes from log records.
//! - A projector's checkpoint moves only in the transaction that writes the
//!   rows of the records it covers, so no record is applied twice or skipped.
//! - A projector never waits for another one, and the writer never waits for
//!   any of them.

pub mod asof;
pub mod checkpoint;
pub mod digest;
pub mod error;
pub mod lock;
pub mod mirror;
pub mod pg_copy;
pub mod projectors;
pub mod query;
pub mod runtime;
pub mod sql;
pub mod sqlite_bulk;
pub mod sqlite_memory;
pub mod store;
pub mod testing;

pub use checkpoint::{Checkpoint, Slot};
pub use error::{ApplyError, AsOfError, Error, OpenError, QueryError, RuntimeError};
pub use lock::{LockFence, StoreLock};
pub use projectors::ProjectorKind;
pub use runtime::{Driver, Projections, ProjectorStatus, RuntimeConfig};
pub use store::{Backend, Store, StoreOptions};
