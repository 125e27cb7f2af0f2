//! The durable event log: the source of truth of taskledger.
//!
//! A domain-agnostic, append-only, hash-chained log of opaque records on redb. Records get a
//! gapless `seq` from 1 and a gapless version within their stream; each record's hash chains
//! it to its predecessor, so any change to history is detectable ([`verify()`]). Appends go
//! through the narrow [`LogStore`] interface (implemented by [`RedbStore`]), owned by one
//! writer; reads go through cloneable [`LogReader`]s on MVCC snapshots, from any thread;
//! [`Subscription`]s catch up from disk and then follow the writer's [`LiveFeed`].
//!
//! Architecture invariants:
//! - Nothing is acknowledged before fsync: an append returns only after its records were
//!   fsynced, in the write-ahead journal (`journal.rs`, then committed to redb without an
//!   fsync) or in a `Durability::Immediate` redb commit (a checkpoint).
//! - After a failed commit the store refuses writes until it is reopened.
//! - Every record is checked before it is written and again when it is read back.
//! - This crate knows nothing about tasks: payloads, stream keys and outcomes are opaque bytes.

mod byte_batch;
pub mod cli;
pub mod clock;
pub mod dedup;
pub mod disk;
pub mod error;
pub mod fault;
pub mod feed;
pub mod fold;
pub mod journal;
pub mod json;
pub mod memory;
pub mod overlay;
pub mod reader;
pub mod record;
pub mod redb_store;
pub mod snapshot;
pub mod store;
mod stream_key;
pub mod verify;
pub mod writer;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{
    AppendError, BackendError, Error, OpenError, ReadError, RecordError, SnapshotError, StoreError, SubscribeError,
};
pub use fault::{FaultError, FaultHandle, FaultMode, FaultOp, FaultPlan, FaultTarget, FaultyBackend};
pub use feed::{FeedRecord, LiveFeed, Subscription};
pub use fold::{FoldError, FoldStats, decode_event, encode_event, fold_to, fold_to_head};
pub use journal::JournalLoss;
pub use overlay::OverlayBackend;
pub use reader::{LogReader, ScannedRecord};
pub use record::{GENESIS_HASH, Hash, NewRecord, StoredRecord};
pub use redb_store::{JOURNAL_BYTES_DEFAULT, RedbOptions, RedbStore, STREAM_INDEX_LAG_DEFAULT};
pub use snapshot::{Snapshot, SnapshotEntry, SnapshotInfo, SnapshotPick, SnapshotStore};
pub use store::{Appended, Head, LogStore};
pub use verify::{Problem, ProblemKind, VerifyReport, verify};
pub use writer::{
    Acknowledgement, CommandResult, Envelope, Health, IdleClassThreads, ReadyWork, SNAPSHOT_THREAD_NICE_INCREMENT,
    Scope, SeqRange, StartError, Startup, WriteError, Writer, WriterConfig, WriterHandle, lower_this_threads_priority,
};
