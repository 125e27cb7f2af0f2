//! The narrow storage interface the writer is written against.
//!
//! Everything the single writer needs from durable storage goes through [`LogStore`], so a
//! second backend (PostgreSQL, for cluster mode) is a new implementation of this trait, not a
//! rewrite of the writer. Readers are backend-specific (see [`crate::LogReader`]).

use crate::error::{AppendError, ReadError, SnapshotError};
use crate::record::{GENESIS_HASH, Hash, NewRecord, StoredRecord};
use crate::snapshot::{Snapshot, SnapshotEntry, SnapshotInfo, SnapshotPick, SnapshotStore};

/// The last record of the log: its seq (0 for an empty log) and its chain hash
/// ([`GENESIS_HASH`] for an empty log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Head {
    pub seq: u64,
    pub hash: Hash,
}

impl Head {
    /// The head of an empty log.
    pub const EMPTY: Head = Head { seq: 0, hash: GENESIS_HASH };
}

/// What one successful [`LogStore::append`] wrote, so the caller can publish it without
/// reading it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The records in log order, with their assigned seq, stream version and hash.
    pub records: Vec<StoredRecord>,
    /// The head after the commit.
    pub head: Head,
    /// Whether the store's readers see the records yet. They are durable either way; records
    /// appended while a checkpoint runs are readable only once [`LogStore::settle`] reports a
    /// readable head at or past them, and must not be published to subscribers before (a
    /// subscriber that falls back to reading the store would find a gap).
    pub readable: bool,
}

/// Durable, hash-chained, append-only storage of opaque records. Owned by one writer.
pub trait LogStore: Send {
    /// The last committed record.
    fn head(&self) -> Head;

    /// `recorded_at_us` of the last record, `None` for an empty log. Appends must not go below.
    fn last_recorded_at_us(&self) -> Option<i64>;

    /// Appends `records` and stores `outcomes` (command id → opaque outcome) in one durable
    /// transaction (one fsync). Assigns seq and stream versions, computes the chain, and fails
    /// without writing anything if a record is invalid, a timestamp decreases, or a command id
    /// already has an outcome. An outcome is stored at the seq of the last record of the batch
    /// carrying its command id, or at the head after the batch if none does.
    ///
    /// After a commit failure the store refuses further appends ([`AppendError::Poisoned`]):
    /// the state on disk is unknown until it is reopened (never retry an fsync).
    fn append(&mut self, records: &[NewRecord], outcomes: &[(String, Vec<u8>)]) -> Result<Appended, AppendError>;

    /// Makes what can be made readable readable (waiting for a running checkpoint when `wait`)
    /// and returns the head the store's readers see. After an error the store refuses further
    /// appends, as after a failed commit.
    fn settle(&mut self, wait: bool) -> Result<Head, AppendError> {
        let _ = wait;
        Ok(self.head())
    }

    /// The current version of `stream`; 0 if the stream has no record.
    fn stream_version(&self, stream: &[u8]) -> Result<u64, ReadError>;

    /// The stored outcome of `command_id` and the seq it was stored at, if it is still inside
    /// the dedup window. Served from memory.
    fn outcome(&self, command_id: &str) -> Option<(u64, Vec<u8>)>;

    /// The chain hash of record `seq`, if it exists.
    fn record_hash(&self, seq: u64) -> Result<Option<Hash>, ReadError>;

    /// The snapshot files of this log. Clone it to write snapshots from another thread.
    fn snapshots(&self) -> &SnapshotStore;

    /// Writes a snapshot of state as of `at` (see [`SnapshotStore::write`]).
    fn write_snapshot(&self, at: Head, body: &[u8]) -> Result<SnapshotInfo, SnapshotError> {
        self.snapshots().write(at, body)
    }

    /// The newest intact snapshot taken at or below `seq` whose chain hash matches this log;
    /// corrupt or foreign snapshots are skipped and listed in the answer.
    fn latest_snapshot_at_or_below(&self, seq: u64) -> Result<SnapshotPick, ReadError> {
        let mut hash_error = None;
        let pick =
            self.snapshots().latest_at_or_below(seq, |snapshot: &Snapshot| match self.record_hash(snapshot.info.seq) {
                Ok(hash) => {
                    hash == Some(snapshot.info.chain_hash)
                        || (snapshot.info.seq == 0 && snapshot.info.chain_hash == GENESIS_HASH)
                }
                Err(error) => {
                    hash_error.get_or_insert(error);
                    false
                }
            });
        match hash_error {
            Some(error) => Err(error),
            None => Ok(pick),
        }
    }

    /// All snapshot files, oldest first, with their headers checked.
    fn list_snapshots(&self) -> Result<Vec<SnapshotEntry>, SnapshotError> {
        self.snapshots().list()
    }
}
