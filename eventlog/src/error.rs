//! Errors of the event log: one enum per operation plus the umbrella [`Error`].
//!
//! Backend failures are carried as an opaque boxed error so that the store interface stays
//! independent of redb (a PostgreSQL backend reports its own errors through the same variant).
//! Data problems found on disk are always reported with the sequence number they concern.

use std::path::PathBuf;

/// A failure of the storage engine itself (I/O, transaction, commit), backend-neutral.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Converts any redb error (or other backend error) into a [`BackendError`].
pub(crate) fn backend<E: Into<redb::Error>>(error: E) -> BackendError {
    Box::new(error.into())
}

/// A stored record that does not decode or does not agree with where it was found.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record {seq}: stored value is {len} bytes, shorter than hash plus format byte")]
    TooShort { seq: u64, len: usize },
    #[error("record {seq}: unknown record format version {found}")]
    FormatVersion { seq: u64, found: u8 },
    #[error("record {seq}: body does not decode: {source}")]
    Decode {
        seq: u64,
        #[source]
        source: postcard::Error,
    },
    #[error("record {seq}: {trailing} trailing bytes after the body")]
    TrailingBytes { seq: u64, trailing: usize },
    #[error("record {seq}: stored hash does not match the recomputed chain hash")]
    HashMismatch { seq: u64 },
    #[error("record {seq}: {message}")]
    Disagrees { seq: u64, message: String },
}

impl RecordError {
    /// The sequence number of the record concerned.
    pub fn seq(&self) -> u64 {
        match self {
            Self::TooShort { seq, .. }
            | Self::FormatVersion { seq, .. }
            | Self::Decode { seq, .. }
            | Self::TrailingBytes { seq, .. }
            | Self::HashMismatch { seq }
            | Self::Disagrees { seq, .. } => *seq,
        }
    }
}

/// Opening a log failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("open ledger database at {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("open {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger storage: {0}")]
    Backend(BackendError),
    #[error("ledger file is not initialised (no meta table)")]
    NotInitialised,
    #[error("unsupported ledger format version {found} (this build reads {expected})")]
    FormatVersion { found: u64, expected: u64 },
    #[error("ledger head is inconsistent at seq {seq}: {message}")]
    HeadMismatch { seq: u64, message: String },
    #[error("ledger record is corrupt: {0}")]
    Record(#[from] RecordError),
    #[error("write-ahead journal {path} at offset {offset}: {message}")]
    Journal { path: PathBuf, offset: u64, message: String },
    #[error(
        "{path} holds {records} records past the log file's head (the server crashed or was killed before a \
         checkpoint); open it repaired to read them"
    )]
    JournalPending { path: PathBuf, records: u64 },
    #[error(
        "write-ahead journal {path} {problem}, but the log file was last written through it and not closed cleanly \
         (its server crashed, was killed, or is running): records acknowledged since the last checkpoint may be only \
         there. Put the journal back as it was; to open the log without them, and lose them, pass \
         --accept-journal-loss"
    )]
    JournalLost { path: PathBuf, problem: String },
}

/// Appending a batch failed; nothing of the batch was written.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("record {index} of the batch is invalid: {reason}")]
    Invalid { index: usize, reason: String },
    #[error(
        "record {index} of the batch is recorded at {recorded_at_us} µs, before the previous record at {previous_us} µs"
    )]
    TimeWentBackwards { index: usize, recorded_at_us: i64, previous_us: i64 },
    #[error("command id {command_id:?} already has an outcome")]
    DuplicateCommandId { command_id: String },
    #[error("the store refuses writes after an earlier commit failure; reopen it")]
    Poisoned,
    #[error("commit the batch: {0}")]
    Backend(BackendError),
    #[error("a record failed its self-check before write: {0}")]
    Record(#[from] RecordError),
}

impl AppendError {
    /// Whether the commit failed because the disk (or the caller's quota) is full, so that the
    /// API can say so (507) instead of reporting an anonymous internal fault. The I/O error is
    /// looked for through the whole chain: the backend error is a boxed `redb::Error`, whose
    /// `Io` variant does not expose its cause through `source()`.
    pub fn is_storage_full(&self) -> bool {
        let Self::Backend(error) = self else { return false };
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
        while let Some(error) = next {
            let io = match error.downcast_ref::<redb::Error>() {
                Some(redb::Error::Io(io)) => Some(io),
                _ => error.downcast_ref::<std::io::Error>(),
            };
            if io.is_some_and(|io| {
                matches!(io.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
            }) {
                return true;
            }
            next = error.source();
        }
        false
    }
}

/// Reading from the log failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("read the ledger: {0}")]
    Backend(BackendError),
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Writing, listing or loading snapshot files failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// An intact file in a format this build does not read (written by another version):
    /// skipped like a corrupt one, but nothing is wrong with the disk or the log.
    #[error(
        "snapshot file {path} is in format version {version}, and this build reads version {supported}: it is skipped (the state is folded from an older snapshot or the log; newer snapshots replace it)"
    )]
    OtherVersion { path: PathBuf, version: u32, supported: u32 },
    #[error("snapshot body is {len} bytes, above the limit of {max}")]
    TooLarge { len: u64, max: u64 },
}

/// A subscription could not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Append(#[from] AppendError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
}

/// Name for the umbrella when used as the store interface's error (see `store.rs`).
pub type StoreError = Error;

/// A read made while opening a log fails the open with the same cause.
impl From<ReadError> for OpenError {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Backend(b) => OpenError::Backend(b),
            ReadError::Record(r) => OpenError::Record(r),
        }
    }
}
