//! Errors, one enum per operation plus the umbrella `Error` (as redb does), so
//! a caller can match exactly what one call can fail with.

use std::path::PathBuf;

/// Opening or connecting a store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("open the SQLite projections at {path}: {source}")]
    Sqlite { path: PathBuf, source: sqlx::Error },
    #[error(
        "the SQLite projections at {path} are damaged ({source}); they hold nothing the log does not: move the file \
         and its -wal and -shm files aside and start again, and they are rebuilt from the log"
    )]
    Damaged { path: PathBuf, source: sqlx::Error },
    #[error("connect to the PostgreSQL projections: {source}")]
    Postgres { source: sqlx::Error },
    #[error("migrate the projections database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("not a database URL or file path: {0}")]
    BadTarget(String),
    #[error(
        "the projections are in use by another taskledger server: {what}; give each server its own projections \
         database"
    )]
    InUse { what: String },
}

/// Whether SQLite said its file is damaged or not a database (`SQLITE_CORRUPT`,
/// `SQLITE_NOTADB`, with their extended codes): a file replaced under a running server, then a
/// crash, left one the server refused to start on, without a word of what to do (found by a
/// black-box check).
pub fn sqlite_file_damaged(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(e) = error else { return false };
    e.code().and_then(|c| c.parse::<i64>().ok()).is_some_and(|c| matches!(c & 0xff, 11 | 26))
}

/// Whether `error` says the database cannot be reached or cannot take a connection now (a
/// PostgreSQL that is down, starting, shutting down, out of connection slots, or silent), as
/// opposed to one that answered and refused (a wrong password, a database that does not
/// exist, a failed migration, a TLS handshake or certificate it refused: configuration to fix,
/// found by review): an outage to wait out, not a mistake to report.
pub fn database_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        // Class 08 (connection exceptions), `cannot_connect_now` (starting up or shutting
        // down), `admin_shutdown`, `crash_shutdown`, `too_many_connections`.
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|code| code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")),
        _ => false,
    }
}

impl OpenError {
    /// The database could not be reached while opening it (see [`database_unreachable`]).
    pub fn is_unreachable(&self) -> bool {
        match self {
            OpenError::Postgres { source } => database_unreachable(source),
            OpenError::Migrate(sqlx::migrate::MigrateError::Execute(source)) => database_unreachable(source),
            _ => false,
        }
    }
}

/// Applying a batch of log records to a projector.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("decode the event at seq {seq}: {reason}")]
    Decode { seq: u64, reason: String },
    #[error("event at seq {seq} does not fit the projection's model: {reason}")]
    Inconsistent { seq: u64, reason: String },
    #[error("batch starts at seq {got}, the checkpoint expects {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error(
        "the stored checkpoint is no longer at seq {at} (another server or a rebuild moved it, or the database \
         lost or changed it); the batch up to seq {last} is not applied, and the projector starts again from \
         the stored checkpoint"
    )]
    CheckpointMoved { at: u64, last: u64 },
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("a stored projector model row is unreadable: {0}")]
    Model(String),
}

/// Starting, running or stopping projectors.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("read the log: {0}")]
    Read(#[from] eventlog::ReadError),
    #[error("follow the log: {0}")]
    Subscribe(#[from] eventlog::SubscribeError),
    #[error(
        "projector {projector} is at seq {checkpoint} but the log ends at {head}: these projections were built from another log, or from a later point of this one (a backup of an earlier point restored, or a write-ahead journal removed after a crash: then records were lost); move their database aside, and they are rebuilt from this log"
    )]
    CheckpointAhead { projector: String, checkpoint: u64, head: u64 },
    #[error(
        "projector {projector}'s checkpoint hash at seq {seq} differs from the log's: these projections were built from another log; move their database aside, and they are rebuilt from this log"
    )]
    CheckpointMismatch { projector: String, seq: u64 },
    #[error("unknown projector {0}")]
    UnknownProjector(String),
    #[error("projector {0} is already being rebuilt")]
    RebuildInProgress(String),
    #[error("the projector runtime has stopped")]
    Stopped,
    #[error(
        "another process holds the projections database's lock ({0}), taken while this server's connection to it was lost: this server writes nothing there until it has the lock back; stop the other process, and if it wrote there, rebuild these projections"
    )]
    LockHeldElsewhere(String),
    #[error(
        "the connection holding the projections database's lock was lost: nothing is written there until it is taken again"
    )]
    LockLost,
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("create the projections schema again: {0}")]
    Schema(#[from] sqlx::migrate::MigrateError),
}

impl RuntimeError {
    /// The database could not be reached (see [`database_unreachable`]).
    pub fn is_unreachable(&self) -> bool {
        match self {
            RuntimeError::Sql(e)
            | RuntimeError::Apply(ApplyError::Sql(e))
            | RuntimeError::Schema(sqlx::migrate::MigrateError::Execute(e)) => database_unreachable(e),
            _ => false,
        }
    }
}

/// Reading a read model.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("invalid cursor: {0}")]
    BadCursor(String),
    #[error("invalid filter: {0}")]
    BadFilter(String),
}

impl QueryError {
    /// The database could not be reached (PostgreSQL down, or no connection in time): an
    /// outage, not a fault of the query.
    pub fn is_unreachable(&self) -> bool {
        match self {
            // PostgreSQL cancelled the statement at its `statement_timeout` (a lock held on the
            // table, an overloaded database).
            QueryError::Sql(sqlx::Error::Database(e)) if e.code().as_deref() == Some("57014") => true,
            // A connection that failed its TLS handshake while the server runs is an outage of
            // the views all the same.
            QueryError::Sql(sqlx::Error::Tls(_)) => true,
            QueryError::Sql(e) => database_unreachable(e),
            _ => false,
        }
    }

    /// Whether SQLite said the file is damaged (see [`sqlite_file_damaged`]).
    pub fn damaged(&self) -> bool {
        matches!(self, QueryError::Sql(e) if sqlite_file_damaged(e))
    }

    /// The database's message when a table the query reads does not exist (dropped by hand, a
    /// schema dropped and created again): PostgreSQL's `42P01`, SQLite's "no such table".
    pub fn missing_table(&self) -> Option<String> {
        match self {
            QueryError::Sql(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("42P01") || e.message().starts_with("no such table") =>
            {
                Some(e.message().to_owned())
            }
            _ => None,
        }
    }
}

/// Materializing projections as of a past point.
#[derive(Debug, thiserror::Error)]
pub enum AsOfError {
    #[error("seq {seq} is past the end of the log ({head})")]
    PastHead { seq: u64, head: u64 },
    #[error("create the scratch file {path}: {reason}")]
    Scratch { path: PathBuf, reason: String },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Everything this crate can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    AsOf(#[from] AsOfError),
}

#[cfg(test)]
mod tests {
    use super::database_unreachable;

    /// An outage is waited out; a TLS setting the server refuses is configuration to fix.
    #[test]
    fn outages_are_told_from_refusals() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(database_unreachable(&sqlx::Error::Io(refused)));
        assert!(database_unreachable(&sqlx::Error::PoolTimedOut));
        assert!(!database_unreachable(&sqlx::Error::Tls("server does not support TLS".into())));
        assert!(!database_unreachable(&sqlx::Error::RowNotFound));
    }
}
