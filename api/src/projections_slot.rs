//! The projections as the server has them: running, or waiting for their database.
//!
//! The log is the source of truth and the projections are derived from it, so a projections
//! database that cannot be reached must not keep the server from starting: commands, task
//! reads, history and the event feed need only the log. `serve` exited instead while its
//! PostgreSQL was down (found by a black-box check), so a PostgreSQL restart, or one started a
//! little after the server, took the whole ledger down with it.
//!
//! Now a PostgreSQL that cannot be reached when the server starts (down, starting up, shutting
//! down, out of connection slots, silent) leaves the projections *waiting*: the server starts,
//! every view, `/readyz` and the rebuild route answer `503 projections_unavailable` saying
//! why, `taskledger_projections_connected` is 0, and a task tries again every
//! [`RECONNECT_EVERY`] until it has taken the database's lock, migrated it and started the
//! projectors, which then catch up from their checkpoints. Anything else that fails at startup
//! is a mistake to fix and still refuses the start: a wrong password or database name, a TLS
//! setting the server refuses, another server's lock, projections built from another log, a
//! damaged SQLite file. (SQLite is a file beside the log: it has no outage to wait out.) Once
//! the server runs, the task keeps trying whatever the failure (a database that comes back
//! with another password, or holding another server's lock, is said at ERROR, once per cause,
//! and in the 503s).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use eventlog::{LiveFeed, LogReader};
use projections::{Backend, Projections, StoreLock, StoreOptions};

use crate::error::{ApiError, ApiResult};

/// How often a server whose projections database was unreachable at startup tries again.
pub const RECONNECT_EVERY: Duration = Duration::from_secs(2);

/// What the projectors are started on, and where their database is.
#[derive(Clone)]
pub struct ProjectionsTarget {
    /// `--projections`: a SQLite path or a PostgreSQL URL (with its password: never shown).
    pub target: String,
    pub options: StoreOptions,
    pub reader: LogReader,
    pub feed: LiveFeed,
    /// The runtime the projectors run on.
    pub executor: tokio::runtime::Handle,
}

impl ProjectionsTarget {
    /// The target without its passwords, for messages.
    pub fn shown(&self) -> String {
        projections::store::redact_target(&self.target)
    }

    /// Takes the database's lock, opens and migrates it, and starts the projectors.
    async fn open(&self) -> Result<Running, OpenFailure> {
        let shown = self.shown();
        // Held until the server stops: one server per projections database (`projections::lock`).
        let lock = projections::lock::lock(&self.target)
            .await
            .map_err(|e| OpenFailure::new(e.is_unreachable(), anyhow::Error::new(e)))?;
        let store = projections::Store::open_with(&self.target, self.options)
            .await
            .map_err(|e| OpenFailure::new(e.is_unreachable(), anyhow::Error::new(e)))?;
        let projections = Projections::start(
            store,
            self.reader.clone(),
            self.feed.clone(),
            projections::RuntimeConfig {
                executor: Some(self.executor.clone()),
                fence: lock.fence(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| {
            let unreachable = e.is_unreachable();
            OpenFailure::new(unreachable, anyhow::Error::new(e).context(format!("start the projectors on {shown}")))
        })?;
        Ok(Running { projections, _lock: lock })
    }
}

/// Why the projections could not be opened, and whether it was an outage of their database.
struct OpenFailure {
    unreachable: bool,
    error: anyhow::Error,
}

impl OpenFailure {
    fn new(unreachable: bool, error: anyhow::Error) -> Self {
        OpenFailure { unreachable, error }
    }
}

/// Running projectors and the lock on their database, held as long as they run.
struct Running {
    projections: Projections,
    _lock: StoreLock,
}

/// The server's projections, running or waiting for their database. Cheap to clone.
#[derive(Clone)]
pub struct ProjectionsSlot(Arc<Inner>);

struct Inner {
    backend: Backend,
    running: OnceLock<Running>,
    /// Why they are not running yet (the last attempt's error); empty once they are.
    waiting: Mutex<String>,
    /// The task trying again, while there is one.
    reconnecting: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ProjectionsSlot {
    /// Opens the projections at `target`. A PostgreSQL that cannot be reached leaves them
    /// waiting, with a task trying again on the current runtime; any other failure is returned.
    pub async fn open(target: ProjectionsTarget) -> anyhow::Result<ProjectionsSlot> {
        let backend = Backend::of_target(&target.target);
        let slot = ProjectionsSlot(Arc::new(Inner {
            backend,
            running: OnceLock::new(),
            waiting: Mutex::new(String::new()),
            reconnecting: Mutex::new(None),
        }));
        match target.open().await {
            Ok(running) => {
                let _ = slot.0.running.set(running);
                Ok(slot)
            }
            Err(failure) if failure.unreachable && backend == Backend::Postgres => {
                let error = eventlog::cli::error_chain(&failure.error);
                tracing::warn!(
                    projections = %target.shown(),
                    %error,
                    "the projections database is not reachable: the server starts without its views (commands, task \
                     reads and the event feed work) and connects every {} s until it can",
                    RECONNECT_EVERY.as_secs()
                );
                *slot.0.waiting.lock().expect("projections slot lock") = error;
                let reconnect = tokio::spawn(slot.clone().reconnect(target));
                *slot.0.reconnecting.lock().expect("projections slot lock") = Some(reconnect);
                Ok(slot)
            }
            Err(failure) => Err(failure.error.context(format!("open projections at {}", target.shown()))),
        }
    }

    /// Tries to open the projections every [`RECONNECT_EVERY`] until it can. Each new error is
    /// said once (a WARN while the database is unreachable, an ERROR when it answered and
    /// refused), not at every attempt.
    async fn reconnect(self, target: ProjectionsTarget) {
        loop {
            tokio::time::sleep(RECONNECT_EVERY).await;
            match target.open().await {
                Ok(running) => {
                    let _ = self.0.running.set(running);
                    self.0.waiting.lock().expect("projections slot lock").clear();
                    tracing::info!(
                        projections = %target.shown(),
                        "connected to the projections database; the projectors catch up from their checkpoints"
                    );
                    return;
                }
                Err(failure) => {
                    let error = eventlog::cli::error_chain(&failure.error);
                    let mut waiting = self.0.waiting.lock().expect("projections slot lock");
                    if *waiting != error {
                        if failure.unreachable {
                            tracing::warn!(%error, "the projections database is still not reachable; trying again");
                        } else {
                            tracing::error!(%error, "the projections database answered but could not be opened; trying again");
                        }
                        *waiting = error;
                    }
                }
            }
        }
    }

    /// The running projections, or `503 projections_unavailable` saying why there are none.
    pub fn get(&self) -> ApiResult<&Projections> {
        self.running().ok_or_else(|| {
            ApiError::unavailable(
                "projections_unavailable",
                format!(
                    "the projections database could not be opened since the server started ({}); the server tries \
                     again every {} s and the projectors catch up from their checkpoints once it can; the log, \
                     commands and task reads work",
                    self.0.waiting.lock().expect("projections slot lock"),
                    RECONNECT_EVERY.as_secs()
                ),
                RECONNECT_EVERY.as_secs().max(1) as u32,
            )
        })
    }

    /// The projections, if they are running.
    pub fn running(&self) -> Option<&Projections> {
        self.0.running.get().map(|running| &running.projections)
    }

    /// SQLite or PostgreSQL, as `--projections` names it.
    pub fn backend(&self) -> Backend {
        self.0.backend
    }

    /// Stops trying to connect, and stops the projectors if they run.
    pub async fn shutdown(&self) {
        let reconnecting = self.0.reconnecting.lock().expect("projections slot lock").take();
        if let Some(task) = reconnecting {
            task.abort();
            let _ = task.await;
        }
        if let Some(projections) = self.running() {
            projections.shutdown().await;
        }
    }
}

impl std::fmt::Debug for ProjectionsSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionsSlot")
            .field("backend", &self.0.backend)
            .field("running", &self.running().is_some())
            .finish_non_exhaustive()
    }
}

/// Used by `serve` to name where the projections are, with a word on whether they wait.
pub fn describe(slot: &ProjectionsSlot, shown_target: &str) -> String {
    match slot.running() {
        Some(_) => shown_target.to_owned(),
        None => format!("{shown_target} (not reachable yet: connecting every {} s)", RECONNECT_EVERY.as_secs()),
    }
}
