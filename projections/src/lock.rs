//! One server per projections database: a [`StoreLock`] held for as long as a server runs.
//!
//! Two servers with different logs pointed at one database (a copied `--projections` URL) each
//! served the other's tasks as their own, and a server whose log had no new events never
//! noticed: its projectors only check the stored checkpoints when they write (found by a
//! black-box check). The lock makes the second one refuse to start instead.
//!
//! - SQLite: an exclusive `flock` on the database file itself. SQLite's own locks are POSIX
//!   record locks (`fcntl`), which on Linux are independent of `flock`, so the two never meet.
//! - PostgreSQL: the session advisory lock ([`ADVISORY_LOCK_CLASS`], the hash of the schema the
//!   tables go to), taken on a connection of its own (not one of the pool's), so one server per
//!   database *and schema* (`search_path`): advisory locks belong to one database, the tables
//!   to one schema. A session lock goes with its connection, so a keeper task checks the
//!   connection every [`KEEPER_PERIOD`] and, once PostgreSQL is back after losing it, takes the
//!   lock again (ending its own old session first, should PostgreSQL still hold it); if another
//!   process took it meanwhile it says so at ERROR, naming it, every minute until it gets it
//!   back. The lock's [`LockFence`] says when it is not held: from the moment the connection
//!   is found lost the projectors write nothing, and while another process holds it the
//!   server's views refuse to answer too (the tables may hold the other's rows). Every call waits at most [`POSTGRES_ACQUIRE_TIMEOUT`]: a PostgreSQL that accepts
//!   connections and never answers made a start hang for good (found by review). Session
//!   locks need a direct connection or session pooling (not PgBouncer's transaction mode).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use crate::error::OpenError;
use crate::store::{POSTGRES_ACQUIRE_TIMEOUT, SQLITE_FILE_NAME};

/// The first half of the advisory lock a server holds on its PostgreSQL projections ("task");
/// the second is `hashtext(current_schema())`.
pub const ADVISORY_LOCK_CLASS: i32 = 0x7461_736b;

/// `application_name` of the connection holding the lock, so that `pg_stat_activity` says what
/// it is.
pub const LOCK_APPLICATION_NAME: &str = "taskledger projections lock";

/// How often the keeper repeats that another process holds the lock.
const HELD_ELSEWHERE_REPEAT: Duration = Duration::from_secs(60);

/// How often the keeper checks that it still holds the PostgreSQL lock.
pub const KEEPER_PERIOD: Duration = Duration::from_secs(2);

/// Exclusive use of a projections database, released when dropped.
#[derive(Debug)]
pub enum StoreLock {
    /// The locked SQLite file (a `flock` is not lost while the file is open).
    Sqlite(std::fs::File),
    /// The task holding the PostgreSQL lock's connection (aborted on drop, which closes it), and
    /// what it knows of who holds the lock.
    Postgres { keeper: tokio::task::JoinHandle<()>, fence: LockFence },
}

impl StoreLock {
    /// Whether another process holds the lock now; for the projectors and the views.
    pub fn fence(&self) -> LockFence {
        match self {
            StoreLock::Sqlite(_) => LockFence::default(),
            StoreLock::Postgres { fence, .. } => fence.clone(),
        }
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        if let StoreLock::Postgres { keeper, .. } = self {
            keeper.abort();
        }
    }
}

/// Whether this process holds a [`StoreLock`]'s lock, as the PostgreSQL keeper last found:
/// set when its connection is lost (nothing may be written until the lock is taken again) and
/// when another session is found holding it; cleared when it has the lock back. Cheap to clone;
/// the default (and SQLite's) is always held.
#[derive(Clone, Debug, Default)]
pub struct LockFence(std::sync::Arc<parking_lot::Mutex<Fenced>>);

/// What a [`LockFence`] says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Fenced {
    /// This process holds the lock.
    #[default]
    No,
    /// Its connection was lost and the lock is not taken again yet (whoever holds it).
    Lost,
    /// Another session holds it, described.
    HeldElsewhere(String),
}

impl LockFence {
    /// The lock's state now.
    fn state(&self) -> Fenced {
        self.0.lock().clone()
    }

    /// The other holder, described, while another session holds the lock: the tables may then
    /// hold its rows (the views refuse). A lost lock not yet known to be held elsewhere is not
    /// this: the rows are still this server's, only no more may be written.
    pub fn held_elsewhere(&self) -> Option<String> {
        match &*self.0.lock() {
            Fenced::HeldElsewhere(holder) => Some(holder.clone()),
            Fenced::No | Fenced::Lost => None,
        }
    }

    /// `Ok` while this process holds the lock: what every write of the projections checks first.
    pub fn check(&self) -> Result<(), crate::error::RuntimeError> {
        match self.state() {
            Fenced::No => Ok(()),
            Fenced::Lost => Err(crate::error::RuntimeError::LockLost),
            Fenced::HeldElsewhere(holder) => Err(crate::error::RuntimeError::LockHeldElsewhere(holder)),
        }
    }

    fn set(&self, state: Fenced) {
        *self.0.lock() = state;
    }
}

/// Takes the lock on the projections database at `target` (what `Store::open_with` takes), or
/// fails with [`OpenError::InUse`] when another process holds it. A SQLite file that does not
/// exist yet is created empty (SQLite takes an empty file for a new database).
pub async fn lock(target: &str) -> Result<StoreLock, OpenError> {
    if crate::store::Backend::of_target(target) == crate::store::Backend::Postgres {
        let options = PgConnectOptions::from_str(target)
            .map_err(|source| OpenError::Postgres { source })?
            .application_name(LOCK_APPLICATION_NAME);
        let (connection, taken) =
            connect_and_lock(&options, None).await.map_err(|source| OpenError::Postgres { source })?;
        return match taken {
            Taken::Yes(pid) => {
                let fence = LockFence::default();
                let keeper = tokio::spawn(keep(options, connection, pid, fence.clone()));
                Ok(StoreLock::Postgres { keeper, fence })
            }
            Taken::No(_, holder) => Err(OpenError::InUse {
                what: format!("its PostgreSQL database and schema (advisory lock held by {holder})"),
            }),
        };
    }
    let path = sqlite_path(target)?;
    match try_lock_file(&path) {
        Ok(Some(file)) => Ok(StoreLock::Sqlite(file)),
        Ok(None) => Err(OpenError::InUse { what: format!("{} (another process holds it locked)", path.display()) }),
        Err(source) => Err(OpenError::Sqlite { path, source: sqlx::Error::Io(source) }),
    }
}

/// Opens (or creates) the file at `path` and takes an exclusive `flock` on it, held until the
/// file is dropped; `None` when another process holds it. (The data dir's `taskledger.lock` is
/// taken the same way.)
pub fn try_lock_file(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(error)) => Err(error),
    }
}

/// The SQLite file `target` names, as `Store::open_with` resolves it (a directory gets
/// [`SQLITE_FILE_NAME`]).
pub(crate) fn sqlite_path(target: &str) -> Result<PathBuf, OpenError> {
    let path = PathBuf::from_str(target).map_err(|_| OpenError::BadTarget(target.to_owned()))?;
    Ok(if Path::new(&path).is_dir() { path.join(SQLITE_FILE_NAME) } else { path })
}

/// Whether the lock was taken: by this session (its backend pid), or not, and by whom (the
/// holder's backend pid when known, and a description).
enum Taken {
    Yes(i32),
    No(Option<i32>, String),
}

/// `f`, or a timeout error after [`POSTGRES_ACQUIRE_TIMEOUT`].
async fn in_time<T>(f: impl std::future::Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
    tokio::time::timeout(POSTGRES_ACQUIRE_TIMEOUT, f).await.unwrap_or_else(|_| {
        Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("PostgreSQL did not answer within {} s", POSTGRES_ACQUIRE_TIMEOUT.as_secs()),
        )))
    })
}

/// Connects and tries the lock; `old_pid`, a session of this process that held it before its
/// connection was lost, is ended first if PostgreSQL still has it (a connection cut on this side
/// only, by a middlebox, keeps its backend and its lock until TCP keepalive notices).
async fn connect_and_lock(
    options: &PgConnectOptions,
    old_pid: Option<i32>,
) -> Result<(PgConnection, Taken), sqlx::Error> {
    in_time(async {
        let mut connection = options.connect().await?;
        if let Some(old_pid) = old_pid {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_locks \
                 WHERE locktype = 'advisory' AND classid = $1::oid AND objsubid = 2 AND pid = $2 \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .bind(ADVISORY_LOCK_CLASS)
            .bind(old_pid)
            .execute(&mut connection)
            .await?;
        }
        let (taken, pid): (bool, i32) =
            sqlx::query_as("SELECT pg_try_advisory_lock($1, hashtext(current_schema())), pg_backend_pid()")
                .bind(ADVISORY_LOCK_CLASS)
                .fetch_one(&mut connection)
                .await?;
        if taken {
            return Ok((connection, Taken::Yes(pid)));
        }
        let holder: Option<(i32, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT a.pid, host(a.client_addr), a.application_name FROM pg_locks l \
             JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.classid = $1::oid AND l.objsubid = 2 \
             AND l.objid = hashtext(current_schema())::oid \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) LIMIT 1",
        )
        .bind(ADVISORY_LOCK_CLASS)
        .fetch_optional(&mut connection)
        .await?;
        let taken = match holder {
            Some((pid, address, name)) => Taken::No(
                Some(pid),
                format!(
                    "backend pid {pid} of {} ({})",
                    address.unwrap_or_else(|| "a local socket".to_owned()),
                    name.filter(|n| !n.is_empty()).unwrap_or_else(|| "no application name".to_owned())
                ),
            ),
            None => Taken::No(None, "another session".to_owned()),
        };
        Ok((connection, taken))
    })
    .await
}

/// Holds the PostgreSQL lock's connection (`pid` its backend); takes the lock again on a new
/// connection when the old one is lost (PostgreSQL restarted, the backend terminated, the
/// connection cut), and keeps `fence` saying whether another process holds it meanwhile.
async fn keep(options: PgConnectOptions, mut connection: PgConnection, mut pid: i32, fence: LockFence) {
    let mut held = true;
    let mut said_held_elsewhere: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(KEEPER_PERIOD).await;
        if held && in_time(connection.ping()).await.is_ok() {
            continue;
        }
        if held {
            // Nothing is written until the lock is taken again: another process may take it the
            // moment it is gone (found by review: writes went on until one was seen holding it).
            fence.set(Fenced::Lost);
            tracing::warn!("lost the connection holding the projections database's lock; taking it again");
            held = false;
        }
        match connect_and_lock(&options, Some(pid)).await {
            Ok((fresh, Taken::Yes(fresh_pid))) => {
                tracing::info!("holding the projections database's lock again");
                fence.set(Fenced::No);
                (connection, pid, held, said_held_elsewhere) = (fresh, fresh_pid, true, None);
            }
            // This server's own old session, ended just now but not gone yet
            // (`pg_terminate_backend` returns before it exits): not another process.
            Ok((_, Taken::No(Some(holder_pid), _))) if holder_pid == pid => {}
            Ok((_, Taken::No(_, holder))) => {
                if said_held_elsewhere.is_none_or(|at| at.elapsed() >= HELD_ELSEWHERE_REPEAT) {
                    tracing::error!(
                        "another process took the projections' lock while this server's connection was lost \
                         ({holder}): this server's projectors stop writing and its views refuse to answer until \
                         it has the lock back; stop the other"
                    );
                    said_held_elsewhere = Some(tokio::time::Instant::now());
                }
                fence.set(Fenced::HeldElsewhere(holder));
            }
            Err(error) => tracing::debug!("take the projections database's lock again: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::RuntimeError;

    /// A lost lock stops writes but not reads; one held elsewhere stops both.
    #[test]
    fn a_lost_lock_fences_writes_and_one_held_elsewhere_reads_too() {
        let fence = LockFence::default();
        assert!(fence.check().is_ok() && fence.held_elsewhere().is_none());
        fence.set(Fenced::Lost);
        assert!(matches!(fence.check(), Err(RuntimeError::LockLost)));
        assert_eq!(fence.held_elsewhere(), None);
        let clone = fence.clone();
        fence.set(Fenced::HeldElsewhere("backend pid 7".into()));
        assert!(matches!(clone.check(), Err(RuntimeError::LockHeldElsewhere(h)) if h == "backend pid 7"));
        assert_eq!(clone.held_elsewhere().as_deref(), Some("backend pid 7"));
        fence.set(Fenced::No);
        assert!(clone.check().is_ok());
    }
}
