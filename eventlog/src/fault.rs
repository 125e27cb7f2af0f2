//! Fault injection: a redb storage backend that fails chosen writes or syncs on demand, and the
//! same faults on the store's write-ahead journal (`RedbOptions::journal_faults`).
//!
//! Used by tests of the commit-failure paths (the writer must not acknowledge, the store must
//! refuse further writes, a reopened log must hold exactly the acknowledged batches). The
//! [`FaultHandle`] is shared, so a test arms and disarms faults while the store runs.

use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::Mutex;
use redb::StorageBackend;
use redb::backends::FileBackend;

/// Which backend call a fault targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Write,
    SyncData,
}

/// Which file a failed call was on: the log (redb's file) or the write-ahead journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultTarget {
    LogFile,
    Journal,
}

/// Whether a fault fires once or keeps failing (a dead disk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// Only the chosen call fails.
    Once,
    /// The chosen call and every later write and sync fail.
    FromThenOn,
}

/// The error a failing call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultError {
    /// Like `ENOSPC`.
    NoSpace,
    /// Like `EIO`.
    Io,
}

/// A fault: fail the `nth` (1-based, counted from arming) call of `op`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultPlan {
    pub op: FaultOp,
    pub nth: u64,
    pub mode: FaultMode,
    pub error: FaultError,
}

#[derive(Debug, Default)]
struct State {
    plan: Option<FaultPlan>,
    /// Only calls on this file count and fail (`None`: both).
    only: Option<FaultTarget>,
    seen: u64,
    tripped: bool,
    failures: u64,
    /// Where the first failure happened.
    tripped_on: Option<FaultTarget>,
}

/// Shared control of a [`FaultyBackend`].
#[derive(Clone, Debug, Default)]
pub struct FaultHandle {
    state: Arc<Mutex<State>>,
    /// While true, the log file's syncs wait (a slow disk under a checkpoint, in tests).
    syncs_held: Arc<(Mutex<bool>, parking_lot::Condvar)>,
}

impl FaultHandle {
    /// Arms `plan`, replacing any previous one and resetting the call count.
    pub fn arm(&self, plan: FaultPlan) {
        *self.state.lock() = State { plan: Some(plan), ..State::default() };
    }

    /// Arms `plan` for calls on `target` only: the other file's calls neither count nor fail,
    /// even after the fault fired.
    pub fn arm_on(&self, plan: FaultPlan, target: FaultTarget) {
        *self.state.lock() = State { plan: Some(plan), only: Some(target), ..State::default() };
    }

    /// Makes the log file's syncs wait until [`Self::release_syncs`]: a checkpoint that takes as
    /// long as a test needs.
    pub fn hold_syncs(&self) {
        *self.syncs_held.0.lock() = true;
    }

    /// Lets the log file's syncs go on.
    pub fn release_syncs(&self) {
        *self.syncs_held.0.lock() = false;
        self.syncs_held.1.notify_all();
    }

    fn wait_while_syncs_held(&self) {
        let (held, released) = &*self.syncs_held;
        let mut held = held.lock();
        while *held {
            released.wait(&mut held);
        }
    }

    /// Stops injecting faults.
    pub fn disarm(&self) {
        *self.state.lock() = State::default();
    }

    /// Whether the armed fault has fired.
    pub fn tripped(&self) -> bool {
        self.state.lock().tripped
    }

    /// The file the armed fault fired on first, if it has fired.
    pub fn tripped_on(&self) -> Option<FaultTarget> {
        self.state.lock().tripped_on
    }

    /// Calls failed since arming.
    pub fn failures(&self) -> u64 {
        self.state.lock().failures
    }

    fn check(&self, op: FaultOp) -> io::Result<()> {
        self.check_on(op, FaultTarget::LogFile)
    }

    /// Counts a call of `op` on `target` and fails it if the armed plan says so. Calls on both
    /// files count toward the same `nth`.
    pub(crate) fn check_on(&self, op: FaultOp, target: FaultTarget) -> io::Result<()> {
        let mut state = self.state.lock();
        let Some(plan) = state.plan else {
            return Ok(());
        };
        if state.only.is_some_and(|only| only != target) {
            return Ok(());
        }
        let fail = if state.tripped {
            plan.mode == FaultMode::FromThenOn
        } else if plan.op == op {
            state.seen += 1;
            state.seen == plan.nth
        } else {
            false
        };
        if !fail {
            return Ok(());
        }
        if !state.tripped {
            state.tripped_on = Some(target);
        }
        state.tripped = true;
        state.failures += 1;
        Err(match plan.error {
            FaultError::NoSpace => io::Error::new(io::ErrorKind::StorageFull, "injected fault: no space left"),
            FaultError::Io => io::Error::other("injected fault: I/O error"),
        })
    }
}

/// redb's file backend with injectable write and sync failures.
#[derive(Debug)]
pub struct FaultyBackend {
    inner: FileBackend,
    handle: FaultHandle,
}

impl FaultyBackend {
    /// Wraps `file`; faults are controlled through the returned handle.
    pub fn new(file: File) -> Result<(Self, FaultHandle), redb::DatabaseError> {
        let handle = FaultHandle::default();
        let backend = Self { inner: FileBackend::new(file)?, handle: handle.clone() };
        Ok((backend, handle))
    }

    /// Wraps the log file of the data dir `dir` (`ledger.redb`), created if missing, for
    /// [`crate::RedbStore::open_with_backend`] on `dir`.
    pub fn for_log_in(dir: &std::path::Path) -> Result<(Self, FaultHandle), redb::DatabaseError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(crate::redb_store::LOG_FILE_NAME))
            .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
        Self::new(file)
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.handle.check(FaultOp::Write)?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.handle.wait_while_syncs_held();
        self.handle.check(FaultOp::SyncData)?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.handle.check(FaultOp::Write)?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), redb::BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, redb::BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
