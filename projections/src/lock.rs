//! One server per projections database: a [`StoreLock`] held for as long as a server runs.
//!
//! Two servers with different logs pointed at one database (a copied `--projections` URL) each
//! served the other's tasks as their own, and a server whose log had no new events never
//! noticed: its projectors only check the stored checkpoints when they write (found by a
//! black-box check). The lock makes the second one refuse to start instead.
//!
//! - SQLite: an exclusive `flock` on the database file itself. SQLite's own locks are POSIX
//!   record locks (`fcntl`), which on Linux are independent of `flock`, so the two never meet.
//! - PostgreSQL: the session advisory lock [`ADVISORY_LOCK_KEY`], taken on a connection of its
//!   own (not one of the pool's). Advisory locks belong to one database of the cluster, as the
//!   projection tables do. A session lock goes with its connection, so a keeper task checks the
//!   connection every [`KEEPER_PERIOD`] and, once PostgreSQL is back after losing it, takes the
//!   lock again; if another server took it meanwhile it says so (ERROR, every period) until it
//!   gets it back.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use crate::error::OpenError;
use crate::store::SQLITE_FILE_NAME;

/// The advisory lock key a server holds on its PostgreSQL projections database ("taskledg").
pub const ADVISORY_LOCK_KEY: i64 = 0x7461_736b_6c65_6467;

/// How often the keeper checks that it still holds the PostgreSQL lock.
pub const KEEPER_PERIOD: Duration = Duration::from_secs(2);

/// Exclusive use of a projections database, released when dropped.
#[derive(Debug)]
pub enum StoreLock {
    /// The locked SQLite file.
    Sqlite(std::fs::File),
    /// The task holding the PostgreSQL lock's connection (aborted on drop, which closes it).
    Postgres(tokio::task::JoinHandle<()>),
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        if let StoreLock::Postgres(keeper) = self {
            keeper.abort();
        }
    }
}

/// Takes the lock on the projections database at `target` (what `Store::open_with` takes), or
/// fails with [`OpenError::InUse`] when another process holds it. A SQLite file that does not
/// exist yet is created empty (SQLite takes an empty file for a new database).
pub async fn lock(target: &str) -> Result<StoreLock, OpenError> {
    if target.starts_with("postgres://") || target.starts_with("postgresql://") {
        let options = PgConnectOptions::from_str(target).map_err(|source| OpenError::Postgres { source })?;
        let mut connection = options.connect().await.map_err(|source| OpenError::Postgres { source })?;
        if !try_lock(&mut connection).await.map_err(|source| OpenError::Postgres { source })? {
            return Err(OpenError::InUse {
                what: format!("its PostgreSQL database (advisory lock {ADVISORY_LOCK_KEY:#x} is held)"),
            });
        }
        return Ok(StoreLock::Postgres(tokio::spawn(keep(options, connection))));
    }
    let path = sqlite_path(target)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| OpenError::Sqlite { path: path.clone(), source: sqlx::Error::Io(source) })?;
    match file.try_lock() {
        Ok(()) => Ok(StoreLock::Sqlite(file)),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(OpenError::InUse { what: format!("{} (another process holds it locked)", path.display()) })
        }
        Err(std::fs::TryLockError::Error(source)) => Err(OpenError::Sqlite { path, source: sqlx::Error::Io(source) }),
    }
}

/// The SQLite file `target` names, as `Store::open_with` resolves it (a directory gets
/// [`SQLITE_FILE_NAME`]).
pub(crate) fn sqlite_path(target: &str) -> Result<PathBuf, OpenError> {
    let path = PathBuf::from_str(target).map_err(|_| OpenError::BadTarget(target.to_owned()))?;
    Ok(if Path::new(&path).is_dir() { path.join(SQLITE_FILE_NAME) } else { path })
}

async fn try_lock(connection: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(ADVISORY_LOCK_KEY).fetch_one(connection).await
}

/// Holds the PostgreSQL lock's connection; takes the lock again on a new connection when the old
/// one is lost (PostgreSQL restarted, the backend terminated).
async fn keep(options: PgConnectOptions, mut connection: PgConnection) {
    let mut held = true;
    loop {
        tokio::time::sleep(KEEPER_PERIOD).await;
        if held && connection.ping().await.is_ok() {
            continue;
        }
        if held {
            tracing::warn!("lost the connection holding the projections database's lock; taking it again");
            held = false;
        }
        let Ok(mut fresh) = options.connect().await else { continue };
        match try_lock(&mut fresh).await {
            Ok(true) => {
                tracing::info!("holding the projections database's lock again");
                connection = fresh;
                held = true;
            }
            Ok(false) => tracing::error!(
                "another process took the projections database's lock (advisory lock {ADVISORY_LOCK_KEY:#x}) while \
                 PostgreSQL was unreachable: two servers write their views into one database; stop one"
            ),
            Err(error) => tracing::warn!("take the projections database's lock again: {error}"),
        }
    }
}
