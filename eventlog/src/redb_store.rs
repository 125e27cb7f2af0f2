//! [`RedbStore`]: the [`LogStore`] on one redb file, `<dir>/ledger.redb`.
//!
//! One write transaction per [`LogStore::append`], made durable by one fsync of its frame in the
//! write-ahead journal (then committed without one; see `journal.rs`), or committed with
//! `Durability::Immediate` (without a journal, with outcomes, and as the checkpoint): events,
//! time index, command outcomes (with eviction of the oldest beyond the dedup window), head and,
//! every `stream_index_lag_records` records, the stream index change together or not at all.
//! With [`RedbStore::checkpoint_beside_appends`], a full journal's checkpoint runs on a thread
//! of its own while appends go to the second journal and are held out of redb until it is done.
//!
//! Two in-memory mirrors avoid reads on the write path: the dedup window (complete, rebuilt at
//! open) and a bounded cache of stream heads (complete while the log was created by this store
//! and never overflowed the cache, so a new stream costs no lookup; otherwise a miss reads the
//! stream index once per batch).
//!
//! Why the stream index trails the log: its key is the stream, so a batch of records for many
//! streams dirties a B-tree leaf per stream, and every commit rewrote those leaves (and their
//! branches) before its fsync — most of a commit's pages, measured. The records after the
//! `streams_indexed_through` marker (a bounded tail) are indexed in memory here, in a map shared
//! with this store's readers (a read-only reader scans the tail instead); once the tail reaches
//! the lag, one commit writes all of its entries sorted, each leaf once, and moves the marker
//! and the head checkpoint. Reopening rebuilds the tail from the events table, so nothing about
//! it needs to be durable beyond the records themselves.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, TableError};

use crate::error::{AppendError, OpenError, ReadError, backend};
use crate::fault::FaultHandle;
use crate::journal::{self, FrameBuilder, FrameIo, Journal, JournalLoss, journal_paths};
use crate::overlay;
use crate::reader::{
    Checked, Db, EVENTS, HEAD, HEAD_KEY, LOG_FORMAT_VERSION, LogReader, META, META_FORMAT_VERSION,
    META_JOURNALS_IN_USE, META_STREAMS_INDEXED_THROUGH, OUTCOME_ORDER, OUTCOMES, STREAMS, SharedTail, TIMES,
    UnindexedTail, check_head, encode_head, for_each_unindexed, journals_in_use, last_stream_version,
    streams_indexed_through,
};
use crate::record::{self, Hash, NewRecord, StoredRecord};
use crate::snapshot::SnapshotStore;
use crate::store::{Appended, Head, LogStore};
use crate::stream_key::StreamKey;

/// Name of the log file inside the ledger directory.
pub const LOG_FILE_NAME: &str = "ledger.redb";
/// Name of the snapshot directory inside the ledger directory.
pub const SNAPSHOT_DIR_NAME: &str = "snapshots";
/// Most records accepted in one append.
pub const BATCH_RECORDS_MAX: usize = 100_000;
/// Most outcomes accepted in one append.
pub const BATCH_OUTCOMES_MAX: usize = 100_000;
/// Largest opaque outcome.
pub const OUTCOME_BYTES_MAX: usize = 64 * 1024;
/// Default of [`RedbOptions::stream_index_lag_records`]. The commit that carries the tail's
/// entries takes about 1 µs per entry on the writer thread, and every command behind it waits:
/// 8,192 stalled the writer 6–13 ms every few hundred ms (the half-rate create tail of
/// `taskledger-bench`), 1,024 costs about 1 ms, with the same throughput (measured 2026-12-03).
/// A read-only reader's stream read scans at most this many records.
pub const STREAM_INDEX_LAG_DEFAULT: usize = 1024;
/// Default of [`RedbOptions::journal_bytes`]: 4,000 one-record batches (a frame takes at least
/// 4 KiB) or ~80,000 records in large ones between checkpoints; recovery replays at most that.
/// A checkpoint writes every page dirtied since the last one (redb keeps a non-durable commit's
/// pages in its write buffer), so the size sets the longest stall: measured with 64 submitters,
/// ~60 ms with 32 MiB, ~30 ms with 16, ~17 ms with 8, for no measurable difference in throughput
/// between 16 and 32 and a higher p99 with 8 (a checkpoint five times a second).
pub const JOURNAL_BYTES_DEFAULT: u64 = 16 * 1024 * 1024;

/// How a store uses the journal beside its log file.
enum JournalAccess {
    /// No journal (turned off, or an in-memory backend with nowhere to put one).
    Off,
    /// Replay what they hold into the (in-memory) database; never write the files.
    ReadOnly([PathBuf; 2]),
    /// Replay what they hold, then retire them: a store opened with its journal turned off on a
    /// dir whose last writer used them.
    TakeIn([PathBuf; 2]),
    /// Replay what they hold, then append to them.
    ReadWrite([PathBuf; 2]),
}

/// Tunables of a [`RedbStore`].
#[derive(Clone, Debug)]
pub struct RedbOptions {
    /// Most command outcomes kept for deduplication; the oldest are evicted. At least 1.
    pub dedup_window_entries: usize,
    /// Memory redb may use to cache pages.
    pub cache_bytes: usize,
    /// Most stream heads cached in memory (when full, the cache forgets the half with the
    /// lowest keys: see `StreamHeads`).
    pub stream_cache_entries: usize,
    /// Snapshot files kept (newest first). At least 1.
    pub snapshots_keep: usize,
    /// Run redb's full integrity check (every page checksum) at open. This rewrites redb's
    /// allocator state, so it modifies the file; off by default.
    pub check_integrity_on_open: bool,
    /// Most records the stream index may trail the log by; once the unindexed tail holds this
    /// many, the next commit indexes all of them. 1 indexes every commit's records in that
    /// commit. Readers of a stream scan at most this many records beyond the index.
    pub stream_index_lag_records: usize,
    /// Size of the write-ahead journal (`ledger.journal`, see `journal.rs`): a batch's records
    /// are fsynced there and committed to redb without an fsync; when the next frame would not
    /// fit, that batch is committed with `Durability::Immediate` instead (the checkpoint) and
    /// the journal starts over. 0 turns the journal off: every commit is durable in redb itself.
    pub journal_bytes: u64,
    /// Faults injected into the journal's writes and syncs (tests of the failure paths).
    pub journal_faults: Option<FaultHandle>,
    /// Whether to open a log whose journals were in use when its writer stopped uncleanly, and
    /// are now missing, wiped or short (see [`journal::read_kept`]): refused by default.
    pub journal_loss: JournalLoss,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            dedup_window_entries: 100_000,
            cache_bytes: 256 * 1024 * 1024,
            stream_cache_entries: 1_000_000,
            snapshots_keep: 3,
            check_integrity_on_open: false,
            stream_index_lag_records: STREAM_INDEX_LAG_DEFAULT,
            journal_bytes: JOURNAL_BYTES_DEFAULT,
            journal_faults: None,
            journal_loss: JournalLoss::Refuse,
        }
    }
}

/// The persisted dedup window, mirrored in memory.
#[derive(Default)]
struct OutcomeWindow {
    /// command id → (order, seq, outcome).
    by_command: HashMap<String, (u64, u64, Vec<u8>)>,
    /// order → command id, oldest first.
    by_order: BTreeMap<u64, String>,
    next_order: u64,
}

/// Most stream heads the cache reserves room for when the store opens.
const STREAM_CACHE_PRESIZE_MAX: usize = 1 << 22;

/// Keys sampled to pick the key below which a full [`StreamHeads`] forgets its entries.
const STREAM_CACHE_EVICTION_SAMPLE: usize = 1024;

/// Bounded cache of stream heads, complete above a key: every stream of the log whose key sorts
/// after `complete_above` is in it, so a miss for such a key is a stream with no record, known
/// without reading the stream index. A task's stream key is its UUIDv7, which sorts by time: the
/// tasks the server creates are above every key the log held when it opened and above every key
/// the cache has forgotten since. Only a client-given id from the past (or a clock set back)
/// costs a read of the index, to tell whether it was ever used; and after a restart, every new
/// task while a client-given id from the future is the log's highest key.
///
/// (It used to be complete only on a log opened empty and until it first overflowed: from then
/// on, and on every restart, each created task cost a read of the index, ~1 µs a task of the
/// writer's time in batch creates.)
struct StreamHeads {
    versions: HashMap<StreamKey, u64, foldhash::fast::RandomState>,
    entries_max: usize,
    /// Empty on a log opened empty: complete for every key (stream keys are never empty).
    complete_above: Vec<u8>,
}

impl StreamHeads {
    fn get(&self, stream: &[u8]) -> Option<u64> {
        match self.versions.get(stream) {
            Some(version) => Some(*version),
            None if stream > self.complete_above.as_slice() => Some(0),
            None => None,
        }
    }

    fn insert(&mut self, stream: StreamKey, version: u64) {
        if self.versions.len() >= self.entries_max && !self.versions.contains_key(&stream) {
            self.forget_the_lower_half();
        }
        self.versions.insert(stream, version);
    }

    /// Forgets the entries at or below the median of a sample of the keys (about half of them:
    /// the oldest tasks, and the queue streams, whose keys sort below tasks'), and raises
    /// `complete_above` to that median, so that what is forgotten is read from the index again.
    fn forget_the_lower_half(&mut self) {
        let step = (self.versions.len() / STREAM_CACHE_EVICTION_SAMPLE).max(1);
        // A hash map's order is a random one as far as the keys' order goes.
        let mut sample: Vec<&StreamKey> = self.versions.keys().step_by(step).collect();
        if sample.is_empty() {
            return;
        }
        let middle = (sample.len() - 1) / 2;
        let median = sample.select_nth_unstable(middle).1.as_slice().to_vec();
        self.versions.retain(|key, _| key.as_slice() > median.as_slice());
        if median > self.complete_above {
            self.complete_above = median;
        }
    }
}

/// The redb implementation of [`LogStore`]. Owned by the single writer.
pub struct RedbStore {
    db: Arc<Db>,
    reader: LogReader,
    head: Head,
    last_recorded_at_us: Option<i64>,
    outcomes: OutcomeWindow,
    stream_heads: StreamHeads,
    /// The stream index entries after its marker, shared with this store's readers.
    unindexed: SharedTail,
    snapshots: SnapshotStore,
    options: RedbOptions,
    poisoned: bool,
    /// Read transaction shared by the cache misses of [`RedbStore::stream_version_cached`]
    /// until the next append.
    lookup: Option<redb::ReadTransaction>,
    /// The write-ahead journals, when appends go through them.
    journals: Option<Journals>,
    /// The checkpoint running beside the writer, if any.
    checkpoint: Option<RunningCheckpoint>,
    /// Batches journaled while the checkpoint runs, as one: durable, not in redb yet.
    held: Option<Encoded>,
    /// Each stream's last version among the held batches (the stream-head cache may drop it).
    held_versions: HashMap<StreamKey, u64, foldhash::fast::RandomState>,
    /// Whether a full journal's checkpoint runs beside later appends (which are then held)
    /// rather than in the append that found it full: see [`RedbStore::checkpoint_beside_appends`].
    checkpoint_beside_appends: bool,
    /// See [`RedbStore::accepted_journal_losses`].
    accepted_journal_losses: Vec<String>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("head", &self.head).field("poisoned", &self.poisoned).finish_non_exhaustive()
    }
}

fn open_backend<E: Into<redb::Error>>(error: E) -> OpenError {
    OpenError::Backend(backend(error))
}

fn append_backend<E: Into<redb::Error>>(error: E) -> AppendError {
    AppendError::Backend(backend(error))
}

impl RedbStore {
    /// Opens (or creates) the log in `dir`. An existing file is only read (redb's own crash
    /// recovery aside), and its head is checked against its last records.
    pub fn open(dir: impl AsRef<Path>, options: RedbOptions) -> Result<Self, OpenError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join(LOG_FILE_NAME);
        let exists = path.exists();
        let journals = journal_paths(&path);
        if !exists
            && let Some((journal, _)) = journal::read_all(&journals)?
                .into_iter()
                .find(|(_, contents)| !contents.records.is_empty() || contents.header.base.seq > 0)
        {
            // Records of a log whose file is gone: starting a new log here would bring them
            // back as its first records.
            return Err(OpenError::Journal {
                path: journal,
                offset: 0,
                message: format!("it continues a log, but {} does not exist", path.display()),
            });
        }
        if !exists {
            create_initialised(&path)?;
        }
        let mut builder = Database::builder();
        builder.set_cache_size(options.cache_bytes).set_check_integrity_on_open(options.check_integrity_on_open);
        let db = builder.open(&path).map_err(|source| OpenError::Database { path: path.clone(), source })?;
        // Without a journal of its own, the store still takes in the records of the journals a
        // crash left (committed durably before anything else): starting with `--journal-mib 0`
        // on such a dir dropped them, and handed their seqs out again (found by a black-box check).
        let journal = if options.journal_bytes > 0 {
            JournalAccess::ReadWrite(journals)
        } else {
            JournalAccess::TakeIn(journals)
        };
        Self::from_database(db, dir, false, options, journal)
    }

    /// Opens (or creates) the log on `backend` (fault injection, tests); snapshots go to
    /// `dir/snapshots`.
    pub fn open_with_backend(
        dir: impl AsRef<Path>,
        backend: impl StorageBackend,
        options: RedbOptions,
    ) -> Result<Self, OpenError> {
        let dir = dir.as_ref();
        let mut builder = Database::builder();
        builder.set_cache_size(options.cache_bytes).set_check_integrity_on_open(options.check_integrity_on_open);
        let db = builder
            .create_with_backend(backend)
            .map_err(|source| OpenError::Database { path: PathBuf::from("<backend>"), source })?;
        let journal = if options.journal_bytes > 0 {
            JournalAccess::ReadWrite([
                dir.join(journal::JOURNAL_FILE_NAME),
                dir.join(journal::SECOND_JOURNAL_FILE_NAME),
            ])
        } else {
            JournalAccess::Off
        };
        Self::from_database(db, dir, true, options, journal)
    }

    /// Checks the log file at `path` offline without writing to it: redb's full integrity
    /// check (every page checksum, the allocator state), then the checks of an ordinary open
    /// (head, format, stream index marker). What the check, or the repair of a log a crash left
    /// unclean, rewrites goes to an in-memory overlay ([`crate::OverlayBackend`]), so no copy
    /// of the file is needed and the file is never modified.
    pub fn check_file(path: &Path, cache_bytes: usize, loss: JournalLoss) -> Result<(), OpenError> {
        Self::open_repaired(path, cache_bytes, true, loss).map(drop)
    }

    /// Opens the log file at `path` as a store whose writes all go to an in-memory overlay
    /// ([`crate::OverlayBackend`]): redb's repair of a file a crash left unclean, the optional
    /// integrity check, and the records of the journal beside it that the file does not hold
    /// yet. Neither file is modified; the store is for reading (`reader()`).
    pub(crate) fn open_repaired(
        path: &Path,
        cache_bytes: usize,
        check_integrity: bool,
        journal_loss: JournalLoss,
    ) -> Result<Self, OpenError> {
        let db = overlay::open_database(path, cache_bytes, check_integrity)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let options = RedbOptions { cache_bytes, journal_loss, ..RedbOptions::default() };
        Self::from_database(db, dir, false, options, JournalAccess::ReadOnly(journal_paths(path)))
    }

    fn from_database(
        db: Database,
        dir: &Path,
        may_initialise: bool,
        options: RedbOptions,
        journal: JournalAccess,
    ) -> Result<Self, OpenError> {
        let needs_init = {
            let txn = db.begin_read().map_err(open_backend)?;
            match txn.open_table(META) {
                Ok(_) => false,
                Err(TableError::TableDoesNotExist(_)) if may_initialise => true,
                Err(TableError::TableDoesNotExist(_)) => return Err(OpenError::NotInitialised),
                Err(other) => return Err(open_backend(other)),
            }
        };
        if needs_init {
            initialise(&db)?;
        } else if !matches!(journal, JournalAccess::ReadOnly(_)) {
            // A store that will append (a read-only one reads an older log as it is).
            mark_the_stream_index_of_an_older_log(&db)?;
        }
        let txn = db.begin_read().map_err(open_backend)?;
        let Checked { head, last_recorded_at_us } = check_head(&txn)?;
        let outcomes = load_outcomes(&txn)?;
        let meta = txn.open_table(META).map_err(open_backend)?;
        let indexed_through = streams_indexed_through(&meta, head.seq).map_err(open_backend)?;
        let journals_in_use = journals_in_use(&meta).map_err(open_backend)?;
        if indexed_through > head.seq {
            return Err(OpenError::HeadMismatch {
                seq: indexed_through,
                message: format!("stream index claims records up to {indexed_through}, the head is {}", head.seq),
            });
        }
        let mut unindexed = UnindexedTail::new(indexed_through);
        let events = txn.open_table(EVENTS).map_err(open_backend)?;
        for_each_unindexed(&events, indexed_through, |seq, decoded| {
            unindexed.push(decoded.body.stream, decoded.body.stream_version, seq);
        })?;
        let complete_above = highest_stream_key(&txn, &unindexed)?;
        drop((meta, events, txn));
        let db = Arc::new(Db::ReadWrite(db));
        let unindexed = Arc::new(RwLock::new(unindexed));
        let mut store = Self {
            reader: LogReader::with_tail(db.clone(), unindexed.clone()),
            db,
            head,
            last_recorded_at_us,
            outcomes,
            stream_heads: StreamHeads {
                // Room for the whole cache up front, for the reason the dedup index reserves its
                // window (see `dedup::PRESIZE_ENTRIES_MAX`): growing rehashes every key at once.
                versions: HashMap::with_capacity_and_hasher(
                    options.stream_cache_entries.clamp(1, STREAM_CACHE_PRESIZE_MAX),
                    Default::default(),
                ),
                entries_max: options.stream_cache_entries.max(1),
                complete_above,
            },
            unindexed,
            snapshots: SnapshotStore::new(dir.join(SNAPSHOT_DIR_NAME), options.snapshots_keep),
            options,
            poisoned: false,
            lookup: None,
            journals: None,
            checkpoint: None,
            held: None,
            held_versions: HashMap::default(),
            checkpoint_beside_appends: false,
            accepted_journal_losses: Vec::new(),
        };
        match journal {
            JournalAccess::Off => {}
            JournalAccess::ReadOnly(paths) => {
                store.take_in_journals(&paths, journals_in_use)?;
            }
            JournalAccess::TakeIn(paths) => {
                store.take_in_journals(&paths, journals_in_use)?;
                // Every record is durable in the log file now: the journals are retired, so
                // that later starts neither read them again nor take them for a crash's.
                if journals_in_use.is_some() {
                    store.set_journals_in_use(None).map_err(open_backend)?;
                }
                retire_journals(&paths)?;
            }
            JournalAccess::ReadWrite(paths) => {
                let [first, second] = &paths;
                let mut headers = [None, None];
                for (path, header) in store.take_in_journals(&paths, journals_in_use)? {
                    headers[usize::from(path == *second)] = Some(header);
                }
                let mut journals_in_use = journals_in_use;
                if !store.accepted_journal_losses.is_empty() && journals_in_use.is_some() {
                    // A journal is about to be created again: the mark goes first (everything is
                    // durable in the log file now), so that a crash before the new file is
                    // whole does not have the next start refuse an empty journal.
                    store.set_journals_in_use(None).map_err(open_backend)?;
                    journals_in_use = None;
                }
                let generation_floor = headers.iter().flatten().map(|h| h.generation).max().unwrap_or(0);
                let (bytes, faults) = (store.options.journal_bytes, store.options.journal_faults.clone());
                let current = Journal::start(first, bytes, headers[0], generation_floor, store.head, faults.clone())?;
                // Started too (empty, on the same head), so that taking over costs a header write.
                let other = Journal::start(second, bytes, headers[1], current.generation(), store.head, faults)?;
                // Both are started and full-size: from now until a clean close, a start that
                // finds either missing, wiped or short refuses (`journal::read_kept`).
                let in_use = bytes.max(journal::JOURNAL_BYTES_MIN);
                if journals_in_use != Some(in_use) {
                    store.set_journals_in_use(Some(in_use)).map_err(open_backend)?;
                }
                // Without io_uring (an old kernel, `kernel.io_uring_disabled`, a container's
                // seccomp profile) every frame is written on the writer's thread.
                let io = FrameIo::start().ok();
                store.journals = Some(Journals { current, other, io });
            }
        }
        Ok(store)
    }

    /// Reads the journals at `paths`, checks that they are as the last writer left them (see
    /// `journal::read_kept`; the losses the options accept are kept in
    /// `accepted_journal_losses`), and appends their records that the log does not hold yet.
    /// Returns the headers found. With a loss accepted, a journal that no longer follows the log
    /// (the older one, whose records it needed, is gone) is skipped with its records.
    fn take_in_journals(
        &mut self,
        paths: &[PathBuf],
        in_use: Option<u64>,
    ) -> Result<Vec<(PathBuf, journal::JournalHeader)>, OpenError> {
        // In the order their records follow the log (the older one's may all be in it).
        let (found, accepted) = journal::read_kept(paths, in_use, self.options.journal_loss)?;
        self.accepted_journal_losses = accepted;
        let mut headers = Vec::with_capacity(found.len());
        for (path, contents) in found {
            headers.push((path.clone(), contents.header));
            if !self.accepted_journal_losses.is_empty() && contents.header.base.seq > self.head.seq {
                let skipped = format!(
                    "write-ahead journal {} follows seq {}, past the log's head {} after the accepted loss: \
                     its {} records are dropped too",
                    path.display(),
                    contents.header.base.seq,
                    self.head.seq,
                    contents.records.len()
                );
                tracing::warn!("accepted (--accept-journal-loss): {skipped}");
                self.accepted_journal_losses.push(skipped);
                continue;
            }
            self.replay_journal(&path, contents)?;
        }
        Ok(headers)
    }

    /// The journal losses this store was opened with, accepted by `RedbOptions::journal_loss`
    /// (each says which journal, what is wrong with it, and what was dropped); empty when none.
    pub fn accepted_journal_losses(&self) -> &[String] {
        &self.accepted_journal_losses
    }

    /// Sets (`Some(bytes)`) or clears the mark that the store writes through journals of that
    /// size (`reader::META_JOURNALS_IN_USE`), durably.
    fn set_journals_in_use(&self, bytes: Option<u64>) -> Result<(), redb::Error> {
        let Db::ReadWrite(db) = &*self.db else { unreachable!("a store's database is read-write") };
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut meta = txn.open_table(META)?;
            match bytes {
                Some(bytes) => meta.insert(META_JOURNALS_IN_USE, bytes).map(drop)?,
                None => meta.remove(META_JOURNALS_IN_USE).map(drop)?,
            }
        }
        Ok(txn.commit()?)
    }

    /// Appends the journal's records that the log does not hold yet, committed durably, after
    /// checking that those it does hold are the same records. Each replayed record must encode
    /// to exactly the hash the journal has for it, so a journal from another log, or one that
    /// does not continue this log's chain, is refused rather than appended.
    fn replay_journal(&mut self, path: &Path, contents: journal::JournalContents) -> Result<(), OpenError> {
        let mismatch = |seq: u64, message: String| OpenError::Journal {
            path: path.to_path_buf(),
            offset: 0,
            message: format!("seq {seq}: {message}"),
        };
        let base = contents.header.base;
        if base.seq > self.head.seq {
            return Err(mismatch(
                base.seq,
                format!(
                    "the journal follows seq {}, but the log file ends at seq {}: the log file is older than its \
                     journals (a backup restored over it?); a restored log goes in a new data dir, or with this dir's \
                     journals, snapshots and projections moved aside",
                    base.seq, self.head.seq
                ),
            ));
        }
        if base.seq > 0
            && self.reader.record_hash(base.seq).map_err(|e| mismatch(base.seq, e.to_string()))? != Some(base.hash)
        {
            return Err(mismatch(base.seq, "the journal follows another record than the log file holds there".into()));
        }
        let mut pending: Vec<(Hash, u64, NewRecord)> = Vec::new();
        for (seq, value) in contents.records {
            let stored = record::decode(seq, &value)?.to_stored(seq);
            if seq <= self.head.seq {
                if self.reader.record_hash(seq).map_err(|e| mismatch(seq, e.to_string()))? != Some(stored.hash) {
                    return Err(mismatch(seq, "the journal and the log file hold different records".into()));
                }
                continue;
            }
            let hash = stored.hash;
            let version = stored.stream_version;
            pending.push((
                hash,
                version,
                NewRecord {
                    stream: stored.stream,
                    command_id: stored.command_id,
                    actor: stored.actor,
                    recorded_at_us: stored.recorded_at_us,
                    event_type: stored.event_type,
                    schema_version: stored.schema_version,
                    payload: stored.payload,
                },
            ));
        }
        for chunk in pending.chunks(BATCH_RECORDS_MAX) {
            let records: Vec<NewRecord> = chunk.iter().map(|(_, _, record)| record.clone()).collect();
            self.check_batch(&records, &[]).map_err(|e| mismatch(self.head.seq + 1, e.to_string()))?;
            let Db::ReadWrite(db) = &*self.db else { unreachable!("a store's database is read-write") };
            let mut txn = db.begin_write().map_err(open_backend)?;
            txn.set_durability(Durability::Immediate).map_err(|e| open_backend(redb::Error::from(e)))?;
            let (encoded, inserted) =
                self.write_batch(&txn, &records, &[], None).map_err(|e| mismatch(self.head.seq + 1, e.to_string()))?;
            for ((hash, version, _), stored) in chunk.iter().zip(&encoded.records) {
                if stored.hash != *hash || stored.stream_version != *version {
                    return Err(mismatch(
                        stored.seq,
                        "the journal's record does not continue the log's hash chain".into(),
                    ));
                }
            }
            txn.commit().map_err(open_backend)?;
            self.note_appended(&encoded, false);
            self.note_inserted(&encoded.records, encoded.head, inserted);
        }
        Ok(())
    }

    /// The version of `stream` (0 if it has no record), remembering the answer: the writer asks
    /// this for every task it creates, and without the cache (a log reopened, or the cache
    /// overflowed) each miss would cost a read transaction. Misses of one batch share one read
    /// transaction, dropped at the next append; the remembered answers stay right because only
    /// this store writes, and it updates the cache after each commit.
    pub fn stream_version_cached(&mut self, stream: &[u8]) -> Result<u64, ReadError> {
        if let Some(version) = self.held_versions.get(stream).copied().or_else(|| self.stream_heads.get(stream)) {
            return Ok(version);
        }
        if let Some(version) = self.unindexed.read().version(stream) {
            return Ok(version);
        }
        if self.lookup.is_none() {
            self.lookup = Some(self.reader.begin()?);
        }
        let txn = self.lookup.as_ref().expect("just set");
        let table = txn.open_table(STREAMS).map_err(|e| ReadError::Backend(backend(e)))?;
        let version = last_stream_version(&table, stream).map_err(|e| ReadError::Backend(backend(e)))?;
        self.stream_heads.insert(StreamKey::new(stream), version);
        Ok(version)
    }

    /// From now on, when the journal is full, the checkpoint runs on a thread of its own while
    /// later appends go to the second journal: they return as soon as they are durable there,
    /// but with [`Appended::readable`] false, and this store's readers see them only once
    /// [`LogStore::settle`] reports them readable. The writer turns this on (it publishes only
    /// readable records); without it every append is readable when it returns, and the append
    /// that finds the journal full waits for the checkpoint.
    pub fn checkpoint_beside_appends(&mut self) {
        self.checkpoint_beside_appends = true;
    }

    /// A reader sharing this store's database.
    pub fn reader(&self) -> LogReader {
        self.reader.clone()
    }

    /// Checks the batch before anything is written.
    fn check_batch(&self, records: &[NewRecord], outcomes: &[(String, Vec<u8>)]) -> Result<(), AppendError> {
        if records.len() > BATCH_RECORDS_MAX {
            return Err(AppendError::Invalid {
                index: BATCH_RECORDS_MAX,
                reason: format!("batch has {} records, above {BATCH_RECORDS_MAX}", records.len()),
            });
        }
        if outcomes.len() > BATCH_OUTCOMES_MAX {
            return Err(AppendError::Invalid {
                index: 0,
                reason: format!("batch has {} outcomes, above {BATCH_OUTCOMES_MAX}", outcomes.len()),
            });
        }
        let mut previous_us = self.last_recorded_at_us;
        for (index, record) in records.iter().enumerate() {
            record::check_new(record).map_err(|reason| AppendError::Invalid { index, reason })?;
            if let Some(previous_us) = previous_us
                && record.recorded_at_us < previous_us
            {
                return Err(AppendError::TimeWentBackwards {
                    index,
                    recorded_at_us: record.recorded_at_us,
                    previous_us,
                });
            }
            previous_us = Some(record.recorded_at_us);
        }
        let mut seen = std::collections::HashSet::new();
        for (index, (command_id, outcome)) in outcomes.iter().enumerate() {
            if outcome.len() > OUTCOME_BYTES_MAX || command_id.len() > record::COMMAND_ID_BYTES_MAX {
                return Err(AppendError::Invalid {
                    index,
                    reason: "outcome or its command id above the size limit".into(),
                });
            }
            if !seen.insert(command_id.as_str()) || self.outcomes.by_command.contains_key(command_id) {
                return Err(AppendError::DuplicateCommandId { command_id: command_id.clone() });
            }
        }
        Ok(())
    }
}

/// Creates an initialised, empty log file at `path` atomically: built and made durable under a
/// temporary name, then renamed into place and the directory synced. A crash while a log is being
/// created leaves no `ledger.redb` at all (only a temporary file the next attempt replaces), never
/// a file without its tables, which a later open could not tell from a foreign file.
fn create_initialised(path: &Path) -> Result<(), OpenError> {
    let temp = path.with_extension("redb.creating");
    let io_error = |source: std::io::Error| OpenError::File { path: temp.clone(), source };
    // Two first starts on one dir at once must not build the file in each other's way: the
    // directory's lock is held until the log is in place, and whoever waited finds it there.
    let dir_path = path.parent().filter(|dir| !dir.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::fs::File::open(dir_path).map_err(io_error)?;
    match dir.lock() {
        // A filesystem without `flock` goes on unlocked, as redb does.
        Err(error) if error.kind() != std::io::ErrorKind::Unsupported => return Err(io_error(error)),
        _ => {}
    }
    if path.exists() {
        return Ok(());
    }
    match std::fs::remove_file(&temp) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io_error(error)),
        _ => {}
    }
    let db = Database::builder().create(&temp).map_err(|source| OpenError::Database { path: temp.clone(), source })?;
    initialise(&db)?;
    drop(db);
    std::fs::rename(&temp, path).map_err(io_error)?;
    dir.sync_all().map_err(io_error)
}

fn initialise(db: &Database) -> Result<(), OpenError> {
    let mut txn = db.begin_write().map_err(open_backend)?;
    txn.set_durability(Durability::Immediate).map_err(|e| open_backend(redb::Error::from(e)))?;
    {
        txn.open_table(EVENTS).map_err(open_backend)?;
        txn.open_table(STREAMS).map_err(open_backend)?;
        txn.open_table(TIMES).map_err(open_backend)?;
        txn.open_table(OUTCOMES).map_err(open_backend)?;
        txn.open_table(OUTCOME_ORDER).map_err(open_backend)?;
        txn.open_table(HEAD)
            .map_err(open_backend)?
            .insert(HEAD_KEY, encode_head(&Head::EMPTY).as_slice())
            .map_err(open_backend)?;
        let mut meta = txn.open_table(META).map_err(open_backend)?;
        meta.insert(META_FORMAT_VERSION, LOG_FORMAT_VERSION).map_err(open_backend)?;
        meta.insert(META_STREAMS_INDEXED_THROUGH, 0).map_err(open_backend)?;
    }
    txn.commit().map_err(open_backend)
}

/// Logs written before the stream index trailed the log (builds before 2026-12-02) indexed
/// every record in its own batch and have no marker; without one, readers take the index to
/// cover the whole log. Once this build appends (indexing later, in batches), that no longer
/// holds: the marker is written before the first append, at the last record the old build
/// wrote, or the new records of old streams would not be read (a task alive across the upgrade
/// read as it was before it; found by the upgrade test's fixture of 2026-11-23).
fn mark_the_stream_index_of_an_older_log(db: &Database) -> Result<(), OpenError> {
    {
        let txn = db.begin_read().map_err(open_backend)?;
        let meta = txn.open_table(META).map_err(open_backend)?;
        if meta.get(META_STREAMS_INDEXED_THROUGH).map_err(open_backend)?.is_some() {
            return Ok(());
        }
    }
    let mut txn = db.begin_write().map_err(open_backend)?;
    txn.set_durability(Durability::Immediate).map_err(|e| open_backend(redb::Error::from(e)))?;
    {
        let last_seq = txn
            .open_table(EVENTS)
            .map_err(open_backend)?
            .last()
            .map_err(open_backend)?
            .map_or(0, |(key, _)| key.value());
        let mut meta = txn.open_table(META).map_err(open_backend)?;
        meta.insert(META_STREAMS_INDEXED_THROUGH, last_seq).map_err(open_backend)?;
    }
    txn.commit().map_err(open_backend)
}

fn load_outcomes(txn: &redb::ReadTransaction) -> Result<OutcomeWindow, OpenError> {
    let order = txn.open_table(OUTCOME_ORDER).map_err(open_backend)?;
    let outcomes = txn.open_table(OUTCOMES).map_err(open_backend)?;
    let mut window = OutcomeWindow::default();
    for entry in order.iter().map_err(open_backend)? {
        let (order_key, command_id) = entry.map_err(open_backend)?;
        let (order_key, command_id) = (order_key.value(), command_id.value().to_owned());
        let value =
            outcomes.get(command_id.as_str()).map_err(open_backend)?.ok_or_else(|| OpenError::HeadMismatch {
                seq: 0,
                message: format!("outcome order names {command_id:?}, which has no outcome"),
            })?;
        let (stored_order, seq, outcome) = decode_outcome(value.value()).ok_or_else(|| OpenError::HeadMismatch {
            seq: 0,
            message: format!("outcome of {command_id:?} is malformed"),
        })?;
        if stored_order != order_key {
            return Err(OpenError::HeadMismatch {
                seq,
                message: format!("outcome of {command_id:?} disagrees with the order table"),
            });
        }
        let next_order = order_key.checked_add(1).ok_or_else(|| OpenError::HeadMismatch {
            seq,
            message: format!("outcome of {command_id:?} is at the last order key"),
        })?;
        window.by_order.insert(order_key, command_id.clone());
        window.by_command.insert(command_id, (order_key, seq, outcome.to_vec()));
        window.next_order = next_order;
    }
    Ok(window)
}

fn encode_outcome(order: u64, seq: u64, outcome: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(16 + outcome.len());
    value.extend_from_slice(&order.to_le_bytes());
    value.extend_from_slice(&seq.to_le_bytes());
    value.extend_from_slice(outcome);
    value
}

fn decode_outcome(value: &[u8]) -> Option<(u64, u64, &[u8])> {
    let order = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(value.get(8..16)?.try_into().ok()?);
    Some((order, seq, &value[16..]))
}

/// A batch's records numbered, chained and encoded: their stored values (for the events table
/// and the journal) and what the mirrors learn from them.
struct Encoded {
    /// The head before the batch.
    base: Head,
    /// The stored value of each record, in seq order from `base.seq + 1`.
    values: Vec<Vec<u8>>,
    records: Vec<StoredRecord>,
    /// Time index entries: a second and the first seq recorded in it.
    times: Vec<(i64, u64)>,
    head: Head,
    /// Each stream's last version in the batch.
    stream_versions: Vec<(StreamKey, u64)>,
}

impl Encoded {
    /// `next`, appended after this batch: the two as one.
    fn extend(&mut self, next: Encoded) {
        debug_assert_eq!(next.base, self.head);
        self.values.extend(next.values);
        self.records.extend(next.records);
        self.times.extend(next.times);
        self.head = next.head;
        // `stream_versions` were noted when each batch was appended (`note_appended`).
    }
}

/// What a transaction inserted besides the records, applied to the mirrors only after the
/// commit succeeded.
struct Inserted {
    /// Whether this transaction indexed the whole tail (and its own records).
    indexed: bool,
    new_outcomes: Vec<(u64, String, u64, Vec<u8>)>,
    evicted: Vec<(u64, String)>,
}

/// What [`RedbStore::commit_batch`] did with a batch.
enum Committed {
    /// In the redb file (durably, or journaled and committed without an fsync).
    Inserted(Encoded, Inserted),
    /// Journaled while a checkpoint holds redb; inserted once the checkpoint is done.
    Held(Encoded),
}

/// A checkpoint running on its own thread: the `Immediate` commit that makes every earlier
/// commit durable in the log file, while the writer journals into the other journal.
struct RunningCheckpoint {
    thread: std::thread::JoinHandle<Result<(), redb::Error>>,
}

/// The journals of a store: the one frames go to, and the other one, which takes over when the
/// current one is full, while the checkpoint of everything before runs beside it.
struct Journals {
    current: Journal,
    other: Journal,
    /// Writes either journal's frames of large batches, when io_uring is available.
    io: Option<FrameIo>,
}

impl RedbStore {
    /// Numbers, chains and encodes a batch after the current head (without touching redb), and
    /// adds each stored value to `frame`. A stream's version comes from the batch itself, then the
    /// held records, the stream-head cache and the unindexed tail, and `lookup` (the stream
    /// index) for the rest.
    fn encode_batch(
        &self,
        records: &[NewRecord],
        mut frame: Option<&mut FrameBuilder>,
        lookup: &mut dyn FnMut(&[u8]) -> Result<u64, AppendError>,
    ) -> Result<Encoded, AppendError> {
        let unindexed = self.unindexed.read();
        let mut seq = self.head.seq;
        let mut prev_hash: Hash = self.head.hash;
        let mut last_second = self.last_recorded_at_us.map(|us| us.div_euclid(1_000_000));
        // Keys borrow from `records`: one copy per distinct stream, made at the end.
        let mut stream_versions: domain::FastMap<&[u8], u64> =
            domain::FastMap::with_capacity_and_hasher(records.len(), Default::default());
        let mut values = Vec::with_capacity(records.len());
        let mut written = Vec::with_capacity(records.len());
        let mut times = Vec::new();
        for record in records {
            let stream = record.stream.as_slice();
            let version = match stream_versions.get(stream) {
                Some(version) => *version,
                None => match self.held_versions.get(stream).copied().or_else(|| self.stream_heads.get(stream)) {
                    Some(version) => version,
                    None => match unindexed.version(stream) {
                        Some(version) => version,
                        None => lookup(stream)?,
                    },
                },
            } + 1;
            seq += 1;
            let (value, stored) = record::encode(record, seq, version, &prev_hash)?;
            if let Some(frame) = frame.as_deref_mut() {
                frame.push(&value);
            }
            let second = record.recorded_at_us.div_euclid(1_000_000);
            if last_second != Some(second) {
                times.push((second, seq));
                last_second = Some(second);
            }
            stream_versions.insert(stream, version);
            prev_hash = stored.hash;
            values.push(value);
            written.push(stored);
        }
        let stream_versions =
            stream_versions.into_iter().map(|(stream, version)| (StreamKey::new(stream), version)).collect();
        Ok(Encoded {
            base: self.head,
            values,
            records: written,
            times,
            head: Head { seq, hash: prev_hash },
            stream_versions,
        })
    }

    /// Inserts encoded records (which follow everything in redb) and `outcomes` into `txn`: the
    /// events, the time index, the stream index and head checkpoint when the tail is due, the
    /// outcomes with eviction of the oldest beyond the window.
    fn insert_encoded(
        &self,
        txn: &redb::WriteTransaction,
        encoded: &Encoded,
        outcomes: &[(String, Vec<u8>)],
    ) -> Result<Inserted, AppendError> {
        {
            let mut events = txn.open_table(EVENTS).map_err(append_backend)?;
            for (record, value) in encoded.records.iter().zip(&encoded.values) {
                events.insert(record.seq, value.as_slice()).map_err(append_backend)?;
            }
            let mut times = txn.open_table(TIMES).map_err(append_backend)?;
            for (second, seq) in &encoded.times {
                times.insert(*second, *seq).map_err(append_backend)?;
            }
        }
        // Only this store writes the tail, so reading it throughout the batch is consistent.
        let unindexed = self.unindexed.read();
        let head = encoded.head;
        let written = &encoded.records;
        let indexed = unindexed.len() + written.len() as u64 >= self.options.stream_index_lag_records.max(1) as u64;
        if indexed {
            let mut streams = txn.open_table(STREAMS).map_err(append_backend)?;
            let mut entries: Vec<(&[u8], u64, u64)> = unindexed
                .by_stream
                .iter()
                .flat_map(|(stream, entries)| entries.iter().map(|(version, seq)| (stream.as_slice(), *version, *seq)))
                .chain(written.iter().map(|r| (r.stream.as_slice(), r.stream_version, r.seq)))
                .collect();
            // Sorted, so each leaf of the index is written once.
            entries.sort_unstable();
            for (stream, version, seq) in entries {
                streams.insert((stream, version), seq).map_err(append_backend)?;
            }
            txn.open_table(META)
                .map_err(append_backend)?
                .insert(META_STREAMS_INDEXED_THROUGH, head.seq)
                .map_err(append_backend)?;
            // The head checkpoint moves with the index (see `reader::HEAD`).
            txn.open_table(HEAD)
                .map_err(append_backend)?
                .insert(HEAD_KEY, encode_head(&head).as_slice())
                .map_err(append_backend)?;
        }
        if outcomes.is_empty() {
            return Ok(Inserted { indexed, new_outcomes: Vec::new(), evicted: Vec::new() });
        }

        // An outcome is stored at the last record of its command, else at the head.
        let command_seqs: domain::FastMap<&str, u64> = written.iter().map(|r| (r.command_id.as_str(), r.seq)).collect();
        let mut outcome_table = txn.open_table(OUTCOMES).map_err(append_backend)?;
        let mut order_table = txn.open_table(OUTCOME_ORDER).map_err(append_backend)?;
        let mut new_outcomes = Vec::with_capacity(outcomes.len());
        for (order, (command_id, outcome)) in (self.outcomes.next_order..).zip(outcomes) {
            let at = command_seqs.get(command_id.as_str()).copied().unwrap_or(head.seq);
            outcome_table
                .insert(command_id.as_str(), encode_outcome(order, at, outcome).as_slice())
                .map_err(append_backend)?;
            order_table.insert(order, command_id.as_str()).map_err(append_backend)?;
            new_outcomes.push((order, command_id.clone(), at, outcome.clone()));
        }
        // Evict the oldest beyond the window, new ones included if the batch alone exceeds it.
        let window = self.options.dedup_window_entries.max(1);
        let excess = (self.outcomes.by_order.len() + new_outcomes.len()).saturating_sub(window);
        let evicted: Vec<(u64, String)> = self
            .outcomes
            .by_order
            .iter()
            .map(|(order, id)| (*order, id.clone()))
            .chain(new_outcomes.iter().map(|(order, id, _, _)| (*order, id.clone())))
            .take(excess)
            .collect();
        for (order, command_id) in &evicted {
            order_table.remove(*order).map_err(append_backend)?;
            outcome_table.remove(command_id.as_str()).map_err(append_backend)?;
        }
        Ok(Inserted { indexed, new_outcomes, evicted })
    }

    /// Encodes a batch and inserts it into `txn`, looking streams up in `txn`'s stream index.
    fn write_batch(
        &self,
        txn: &redb::WriteTransaction,
        records: &[NewRecord],
        outcomes: &[(String, Vec<u8>)],
        frame: Option<&mut FrameBuilder>,
    ) -> Result<(Encoded, Inserted), AppendError> {
        let encoded = self.encode_in(txn, records, frame)?;
        let inserted = self.insert_encoded(txn, &encoded, outcomes)?;
        Ok((encoded, inserted))
    }

    /// `encode_batch` with the stream index read in `txn`.
    fn encode_in(
        &self,
        txn: &redb::WriteTransaction,
        records: &[NewRecord],
        frame: Option<&mut FrameBuilder>,
    ) -> Result<Encoded, AppendError> {
        let streams = txn.open_table(STREAMS).map_err(append_backend)?;
        self.encode_batch(records, frame, &mut |stream| last_stream_version(&streams, stream).map_err(append_backend))
    }
}

/// The highest stream key the log holds, in its stream index or its unindexed tail (empty for
/// a log without records): the stream-head cache starts complete above it.
fn highest_stream_key(txn: &redb::ReadTransaction, unindexed: &UnindexedTail) -> Result<Vec<u8>, OpenError> {
    let indexed = match txn.open_table(STREAMS) {
        Ok(streams) => streams.last().map_err(open_backend)?.map(|(key, _)| key.value().0.to_vec()),
        Err(TableError::TableDoesNotExist(_)) => None,
        Err(other) => return Err(open_backend(other)),
    };
    let tail = unindexed.by_stream.keys().max().cloned();
    Ok(indexed.max(tail).unwrap_or_default())
}

/// Batches of at least this many records write their journal frame asynchronously
/// (`journal::FrameIo`) while they are inserted into redb. Smaller ones write it on the
/// writer's thread first, as before: their inserts take a few microseconds, and the
/// asynchronous write's completion costs a hop through a kernel worker (measured 2026-12-04:
/// one submitter 10-15 % slower with every frame asynchronous).
pub const OVERLAPPED_FRAME_RECORDS_MIN: usize = 16;

impl RedbStore {
    /// Journal frames written asynchronously through io_uring since the store opened (see
    /// `OVERLAPPED_FRAME_RECORDS_MIN`); `None` when io_uring is not available here and every
    /// frame is written on the writer's thread.
    pub fn async_frames(&self) -> Option<u64> {
        self.journals.as_ref().and_then(|j| j.io.as_ref()).map(FrameIo::written)
    }

    /// Writes one batch: through the journal (fsync there, then a commit without one) when it
    /// has room for the batch, else as a checkpoint, after which the journal starts over.
    ///
    /// With two journals, the checkpoint does not stop the writer: the batch that does not fit
    /// goes to the other journal (started on the current head), and the `Immediate` commit runs
    /// on a thread of its own while later batches are journaled there and *held*: durable,
    /// acknowledged, but in redb (and so visible to readers) only once the checkpoint is done
    /// ([`LogStore::settle`]). With one journal the batch itself is the `Immediate` commit.
    /// Outcomes are not journaled, so a batch with outcomes is always a checkpoint.
    fn commit_batch(
        &mut self,
        records: &[NewRecord],
        outcomes: &[(String, Vec<u8>)],
    ) -> Result<Committed, AppendError> {
        if self.checkpoint.is_some() {
            if let Some(held) = self.hold_batch(records, outcomes)? {
                return Ok(Committed::Held(held));
            }
            self.settle_checkpoint(true)?;
        }
        let Db::ReadWrite(db) = &*self.db else { return Err(AppendError::Poisoned) };
        let mut txn = db.begin_write().map_err(append_backend)?;
        let mut frame = (self.journals.is_some() && outcomes.is_empty()).then(FrameBuilder::default);
        let encoded = self.encode_in(&txn, records, frame.as_mut())?;
        let first_seq = self.head.seq + 1;
        let generation_floor = self.journals.as_ref().map_or(0, |j| j.other.generation());
        let beside = self.checkpoint_beside_appends;
        let journaled = matches!((&self.journals, &frame), (Some(j), Some(f)) if j.current.has_room(f.file_bytes()));
        // The usual path for a batch of many records: its frame is on the way to the disk
        // while the batch goes into redb here (see `journal::FrameIo`). The redb transaction
        // commits only once the frame is durable, so readers never see a batch that is not.
        let overlapped = journaled
            && records.len() >= OVERLAPPED_FRAME_RECORDS_MIN
            && self.journals.as_ref().is_some_and(|j| j.io.is_some());
        let in_flight = match (&mut self.journals, &frame) {
            (Some(Journals { current, io: Some(io), .. }), Some(frame)) if overlapped => {
                Some(current.begin_append(io, frame, first_seq).map_err(journal_io)?)
            }
            _ => None,
        };
        let inserted = self.insert_encoded(&txn, &encoded, outcomes);
        if let (Some(in_flight), Some(Journals { current, io: Some(io), .. })) = (in_flight, &mut self.journals) {
            // Waited for even if the inserts failed: the journal must not be left mid-write.
            current.finish_append(io, in_flight).map_err(journal_io)?;
        }
        let inserted = inserted?;
        match (&mut self.journals, frame) {
            (Some(journals), Some(frame)) if journaled => {
                if !overlapped && !records.is_empty() {
                    journals.current.append(&frame, first_seq).map_err(journal_io)?;
                }
                txn.set_durability(Durability::None).map_err(|e| append_backend(redb::Error::from(e)))?;
                txn.commit().map_err(append_backend)?;
            }
            (Some(journals), Some(frame)) if beside => {
                // The other journal takes this batch and those after it; the checkpoint of
                // everything up to this batch runs beside them.
                journals.other.reset(self.head, journals.current.generation()).map_err(journal_io)?;
                std::mem::swap(&mut journals.current, &mut journals.other);
                if !records.is_empty() {
                    journals.current.append(&frame, first_seq).map_err(journal_io)?;
                }
                txn.set_durability(Durability::None).map_err(|e| append_backend(redb::Error::from(e)))?;
                txn.commit().map_err(append_backend)?;
                self.start_checkpoint();
            }
            (journals, _) => {
                txn.set_durability(Durability::Immediate).map_err(|e| append_backend(redb::Error::from(e)))?;
                txn.commit().map_err(append_backend)?;
                // The batch is durable and visible now, so it is reported as written even if the
                // journal cannot start over; the store then refuses further appends.
                if let Some(journals) = journals
                    && journals.current.reset(encoded.head, generation_floor).is_err()
                {
                    self.poisoned = true;
                }
            }
        }
        Ok(Committed::Inserted(encoded, inserted))
    }

    /// While a checkpoint runs: journals the batch in the current journal and holds it, if it
    /// has no outcomes and the journal has room (`None` otherwise: the caller waits for the
    /// checkpoint instead).
    fn hold_batch(
        &mut self,
        records: &[NewRecord],
        outcomes: &[(String, Vec<u8>)],
    ) -> Result<Option<Encoded>, AppendError> {
        let Some(journals) = &self.journals else { return Ok(None) };
        if !outcomes.is_empty() {
            return Ok(None);
        }
        let mut frame = FrameBuilder::default();
        let reader = &self.reader;
        let encoded = self.encode_batch(records, Some(&mut frame), &mut |stream| {
            reader.stream_version(stream).map_err(|error| match error {
                ReadError::Backend(error) => AppendError::Backend(error),
                ReadError::Record(error) => error.into(),
            })
        })?;
        if !journals.current.has_room(frame.file_bytes()) {
            return Ok(None);
        }
        let journals = self.journals.as_mut().expect("checked");
        if !records.is_empty() {
            journals.current.append(&frame, encoded.base.seq + 1).map_err(journal_io)?;
        }
        Ok(Some(encoded))
    }

    /// Starts the `Immediate` commit of everything so far on a thread of its own; where no thread
    /// can be started, commits it here.
    fn start_checkpoint(&mut self) {
        let db = self.db.clone();
        let commit = move || -> Result<(), redb::Error> {
            let Db::ReadWrite(db) = &*db else { return Ok(()) };
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            txn.commit()?;
            Ok(())
        };
        let thread = std::thread::Builder::new().name("taskledger-checkpoint".into()).spawn(commit.clone());
        match thread {
            Ok(thread) => self.checkpoint = Some(RunningCheckpoint { thread }),
            Err(_) => {
                if commit().is_err() {
                    self.poisoned = true;
                }
            }
        }
    }

    /// Once the running checkpoint is done (waiting for it if `wait`): inserts the held batches
    /// into redb in one commit without an fsync (they are in the journal) and makes them
    /// readable. A failed checkpoint poisons the store.
    fn settle_checkpoint(&mut self, wait: bool) -> Result<(), AppendError> {
        // A checkpoint that failed (here, or joined by a commit that needed the journal's room)
        // leaves the batches it held unreadable until a restart replays them: say so every time,
        // so the writer stops waiting for them and caps what readers wait for.
        if self.poisoned && self.held.is_some() {
            return Err(AppendError::Poisoned);
        }
        let Some(running) = self.checkpoint.take() else { return Ok(()) };
        if self.poisoned {
            // Nothing is inserted into a store whose state on disk is unknown.
            self.checkpoint = Some(running);
            return Err(AppendError::Poisoned);
        }
        if !wait && !running.thread.is_finished() {
            self.checkpoint = Some(running);
            return Ok(());
        }
        let result = running
            .thread
            .join()
            .unwrap_or_else(|_| Err(redb::Error::Io(std::io::Error::other("the checkpoint thread panicked"))));
        if let Err(error) = result {
            self.poisoned = true;
            return Err(append_backend(error));
        }
        let Some(held) = self.held.take() else { return Ok(()) };
        let Db::ReadWrite(db) = &*self.db else { return Err(AppendError::Poisoned) };
        let result = (|| {
            let mut txn = db.begin_write().map_err(append_backend)?;
            let inserted = self.insert_encoded(&txn, &held, &[])?;
            txn.set_durability(Durability::None).map_err(|e| append_backend(redb::Error::from(e)))?;
            txn.commit().map_err(append_backend)?;
            Ok(inserted)
        })();
        match result {
            Ok(inserted) => {
                self.held_versions.clear();
                // A lookup transaction begun before this insert does not see the held records,
                // which neither `held_versions` nor (once forgotten) the cache answer for now.
                self.lookup = None;
                self.note_inserted(&held.records, held.head, inserted);
                Ok(())
            }
            Err(error) => {
                // Still held: not in the log file, so never reported readable (the next settle
                // finds the store poisoned with batches held, and says so).
                self.held = Some(held);
                self.poisoned = true;
                Err(error)
            }
        }
    }

    /// Makes every commit so far durable in the log file itself and starts the journal over.
    /// Done when the store is dropped, and by tools; a no-op without a journal, or when nothing
    /// was journaled since the last checkpoint.
    pub fn checkpoint(&mut self) -> Result<(), AppendError> {
        if self.poisoned {
            return Err(AppendError::Poisoned);
        }
        self.settle_checkpoint(true)?;
        let Some(journals) = &mut self.journals else { return Ok(()) };
        if !journals.current.dirty() {
            return Ok(());
        }
        let generation_floor = journals.other.generation();
        let Db::ReadWrite(db) = &*self.db else {
            return Err(AppendError::Poisoned);
        };
        let result = (|| {
            let mut txn = db.begin_write().map_err(append_backend)?;
            txn.set_durability(Durability::Immediate).map_err(|e| append_backend(redb::Error::from(e)))?;
            txn.commit().map_err(append_backend)?;
            journals.current.reset(self.head, generation_floor).map_err(journal_io)
        })();
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Applies an appended batch to the writer's mirrors (head, time, stream heads), whether it
    /// is in redb yet or held.
    fn note_appended(&mut self, encoded: &Encoded, held: bool) {
        self.head = encoded.head;
        if let Some(last) = encoded.records.last() {
            self.last_recorded_at_us = Some(last.recorded_at_us);
        }
        for (stream, version) in &encoded.stream_versions {
            if held {
                self.held_versions.insert(stream.clone(), *version);
            }
            self.stream_heads.insert(stream.clone(), *version);
        }
    }

    /// Applies what a committed transaction inserted to the mirrors readers share (the
    /// unindexed tail) and to the dedup window.
    fn note_inserted(&mut self, records: &[StoredRecord], head: Head, inserted: Inserted) {
        {
            let mut unindexed = self.unindexed.write();
            if inserted.indexed {
                *unindexed = UnindexedTail::new(head.seq);
            } else {
                for record in records {
                    unindexed.push(&record.stream, record.stream_version, record.seq);
                }
            }
        }
        for (order, command_id) in &inserted.evicted {
            self.outcomes.by_order.remove(order);
            self.outcomes.by_command.remove(command_id);
        }
        let evicted_new = inserted.evicted.iter().filter(|(order, _)| *order >= self.outcomes.next_order);
        let evicted_new: std::collections::HashSet<u64> = evicted_new.map(|(order, _)| *order).collect();
        for (order, command_id, seq, outcome) in inserted.new_outcomes {
            self.outcomes.next_order = order + 1;
            if !evicted_new.contains(&order) {
                self.outcomes.by_order.insert(order, command_id.clone());
                self.outcomes.by_command.insert(command_id, (order, seq, outcome));
            }
        }
    }

    /// The head readers see: the head before the held batches, if any.
    fn readable_head(&self) -> Head {
        self.held.as_ref().map_or(self.head, |held| held.base)
    }
}

/// Removes the journals at `paths` (and makes that durable), once their records are all durable
/// in the log file.
fn retire_journals(paths: &[PathBuf]) -> Result<(), OpenError> {
    let mut removed = None;
    for path in paths {
        match std::fs::remove_file(path) {
            Ok(()) => removed = path.parent().map(|dir| if dir.as_os_str().is_empty() { Path::new(".") } else { dir }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(OpenError::File { path: path.clone(), source }),
        }
    }
    if let Some(dir) = removed {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| OpenError::File { path: dir.to_path_buf(), source })?;
    }
    Ok(())
}

/// A journal write or sync that failed.
fn journal_io(error: std::io::Error) -> AppendError {
    append_backend(redb::Error::Io(error))
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // A clean close leaves everything in the log file and an empty journal, so tools open
        // the file alone; if this fails, the next open replays the journal instead.
        if self.checkpoint().is_ok() && self.journals.is_some() {
            // ... and says so, so that the journals may go (a copy of the file alone is whole).
            let _ = self.set_journals_in_use(None);
        }
    }
}

impl LogStore for RedbStore {
    fn head(&self) -> Head {
        self.head
    }

    fn last_recorded_at_us(&self) -> Option<i64> {
        self.last_recorded_at_us
    }

    fn append(&mut self, records: &[NewRecord], outcomes: &[(String, Vec<u8>)]) -> Result<Appended, AppendError> {
        // Never keep old pages pinned past a commit.
        self.lookup = None;
        if self.poisoned {
            return Err(AppendError::Poisoned);
        }
        self.check_batch(records, outcomes)?;
        // Any backend failure from here on leaves the files in a state only a reopen can tell.
        let written = match self.commit_batch(records, outcomes) {
            Ok(written) => written,
            Err(error) => {
                if matches!(error, AppendError::Backend(_)) {
                    self.poisoned = true;
                }
                return Err(error);
            }
        };
        match written {
            Committed::Inserted(encoded, inserted) => {
                self.note_appended(&encoded, false);
                self.note_inserted(&encoded.records, encoded.head, inserted);
                Ok(Appended { head: encoded.head, records: encoded.records, readable: true })
            }
            Committed::Held(encoded) => {
                self.note_appended(&encoded, true);
                let (head, records) = (encoded.head, encoded.records.clone());
                match &mut self.held {
                    Some(held) => held.extend(encoded),
                    None => self.held = Some(encoded),
                }
                Ok(Appended { head, records, readable: false })
            }
        }
    }

    fn settle(&mut self, wait: bool) -> Result<Head, AppendError> {
        self.settle_checkpoint(wait)?;
        Ok(self.readable_head())
    }

    fn stream_version(&self, stream: &[u8]) -> Result<u64, ReadError> {
        let known = self.held_versions.get(stream).copied().or_else(|| self.stream_heads.get(stream));
        match known.or_else(|| self.unindexed.read().version(stream)) {
            Some(version) => Ok(version),
            None => self.reader.stream_version(stream),
        }
    }

    fn outcome(&self, command_id: &str) -> Option<(u64, Vec<u8>)> {
        self.outcomes.by_command.get(command_id).map(|(_, seq, outcome)| (*seq, outcome.clone()))
    }

    fn record_hash(&self, seq: u64) -> Result<Option<Hash>, ReadError> {
        self.reader.record_hash(seq)
    }

    fn snapshots(&self) -> &SnapshotStore {
        &self.snapshots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_head_cache_has_room_for_all_its_entries_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions { stream_cache_entries: 1_000_000, ..RedbOptions::default() };
        let store = RedbStore::open(dir.path(), options).unwrap();
        assert!(store.stream_heads.versions.capacity() >= 1_000_000, "{}", store.stream_heads.versions.capacity());
    }

    fn record(stream: &[u8], at_us: i64) -> NewRecord {
        NewRecord {
            stream: stream.to_vec(),
            command_id: format!("cmd-{at_us}"),
            actor: "test".into(),
            recorded_at_us: at_us,
            event_type: 1,
            schema_version: 1,
            payload: vec![1],
        }
    }

    /// Stream keys in key order, as UUIDv7 task streams sort by time.
    fn key(n: u32) -> Vec<u8> {
        [b"T".as_slice(), &n.to_be_bytes()].concat()
    }

    /// The version of `stream` as the writer asks for it, and whether the cache answered alone:
    /// a read of the stream index begins the lookup transaction, which starts dropped here.
    fn version_and_whether_cached(store: &mut RedbStore, stream: &[u8]) -> (u64, bool) {
        store.lookup = None;
        let version = store.stream_version_cached(stream).unwrap();
        (version, store.lookup.is_none())
    }

    #[test]
    fn a_reopened_log_knows_streams_above_its_highest_key_are_new_without_reading_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions { stream_index_lag_records: 2, ..RedbOptions::default() };
        {
            let mut store = RedbStore::open(dir.path(), options.clone()).unwrap();
            // Some streams indexed, the last ones in the unindexed tail, one with two records.
            for (i, n) in [10, 20, 30, 30, 40].into_iter().enumerate() {
                store.append(&[record(&key(n), 1_000 + i as i64)], &[]).unwrap();
            }
        }
        let mut store = RedbStore::open(dir.path(), options).unwrap();
        assert_eq!(store.stream_heads.complete_above, key(40));
        // A new task's stream sorts above every key the log holds: known new, no read.
        assert_eq!(version_and_whether_cached(&mut store, &key(50)), (0, true));
        // Below the highest key, the index tells (a client's id from the past).
        assert_eq!(version_and_whether_cached(&mut store, &key(15)), (0, false));
        assert_eq!(version_and_whether_cached(&mut store, &key(30)).0, 2);
        assert_eq!(version_and_whether_cached(&mut store, &key(10)).0, 1);
        assert_eq!(version_and_whether_cached(&mut store, &key(40)), (1, true));
        // An append goes on from what the log holds.
        let appended = store.append(&[record(&key(30), 2_000), record(&key(60), 2_001)], &[]).unwrap();
        let versions: Vec<u64> = appended.records.iter().map(|r| r.stream_version).collect();
        assert_eq!(versions, [3, 1]);
    }

    /// The checkpoint succeeds, then inserting the batches held during it fails, inside an
    /// append that had to wait for it (the second journal full). Those batches were taken out
    /// of `held` first, so the next settle found nothing held and reported them readable
    /// though the log file does not have them (found by a review): the writer would publish
    /// them, and reads would miss acknowledged records. Now they stay held, and unreadable.
    #[test]
    fn batches_whose_insert_failed_after_the_checkpoint_are_never_reported_readable() {
        use crate::fault::{FaultError, FaultMode, FaultOp, FaultPlan, FaultTarget, FaultyBackend};
        let dir = tempfile::tempdir().unwrap();
        let (backend, faults) = FaultyBackend::for_log_in(dir.path()).unwrap();
        // A small page cache, so that the held batches' insert writes pages (and meets the fault).
        let options =
            RedbOptions { journal_bytes: journal::JOURNAL_BYTES_MIN, cache_bytes: 16 * 1024, ..RedbOptions::default() };
        let mut store = RedbStore::open_with_backend(dir.path(), backend, options).unwrap();
        store.checkpoint_beside_appends();
        let mut at = 1_000;
        let mut append = |store: &mut RedbStore| {
            at += 1;
            store.append(&[record(&key(at as u32), at)], &[])
        };
        // Appends until one starts the checkpoint, then until one must wait for it.
        while append(&mut store).unwrap().readable {}
        let readable = store.reader().head().unwrap().seq;
        while store.journals.as_ref().unwrap().current.has_room(4096) {
            assert!(!append(&mut store).unwrap().readable);
        }
        let checkpoint = store.checkpoint.as_ref().expect("a checkpoint runs");
        while !checkpoint.thread.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let acknowledged = store.head().seq;
        assert!(acknowledged > readable);
        faults.arm_on(
            FaultPlan { op: FaultOp::Write, nth: 1, mode: FaultMode::FromThenOn, error: FaultError::Io },
            FaultTarget::LogFile,
        );
        assert!(append(&mut store).is_err(), "the append that waited for the checkpoint failed");
        assert!(faults.tripped());
        match store.settle(false) {
            Err(AppendError::Poisoned) => {}
            // Under load the held batches' insert can stay within the page cache and succeed, the
            // fault then failing the waiting append's own batch (seen once in CI): then they are
            // in the log, and whatever is reported readable must read back.
            Ok(head) => {
                let read = store.reader().read_range(1, head.seq, usize::MAX).unwrap();
                assert_eq!(read.len() as u64, head.seq, "seqs up to {} were reported readable", head.seq);
                assert!(head.seq > readable, "the held batches went in");
            }
            Err(other) => panic!("{other:?}"),
        }
    }

    /// A lookup of the stream index begun before the batches held during a checkpoint went
    /// into redb (`settle`, between the writer's batches) answered from a snapshot without
    /// them: a stream written only in those batches, and forgotten by a full cache, read as
    /// never used, so a create reusing its task id would have been taken as new (found by a
    /// review; the lookup was dropped only by the next append, and a batch of refused commands
    /// appends nothing).
    #[test]
    fn a_stream_written_while_held_is_known_after_the_held_batches_settle() {
        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions {
            journal_bytes: journal::JOURNAL_BYTES_MIN,
            stream_cache_entries: 2,
            stream_index_lag_records: 1,
            ..RedbOptions::default()
        };
        let mut store = RedbStore::open(dir.path(), options).unwrap();
        store.checkpoint_beside_appends();
        let mut at = 1_000;
        let mut n = 1_000;
        // Until a batch is held (a checkpoint runs beside the appends).
        loop {
            (at, n) = (at + 1, n + 1);
            if !store.append(&[record(&key(n), at), record(b"Qq", at)], &[]).unwrap().readable {
                break;
            }
        }
        // A low key written only in held batches, then forgotten by the full cache.
        let low = key(5);
        at += 1;
        assert!(!store.append(&[record(&low, at)], &[]).unwrap().readable);
        for m in [2_000, 2_001, 2_002] {
            at += 1;
            assert!(!store.append(&[record(&key(m), at)], &[]).unwrap().readable);
        }
        // A miss below the mark begins a lookup transaction (a reused id, refused by the writer).
        assert_eq!(store.stream_version_cached(&key(1_001)).unwrap(), 1);
        store.settle(true).unwrap();
        assert_eq!(store.stream_version_cached(&low).unwrap(), 1, "the low key was used");
    }

    #[test]
    fn a_full_stream_head_cache_forgets_its_lowest_keys_and_stays_right_about_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions { stream_cache_entries: 8, stream_index_lag_records: 1, ..RedbOptions::default() };
        let mut store = RedbStore::open(dir.path(), options).unwrap();
        let mut versions = std::collections::BTreeMap::new();
        for n in 0..40u32 {
            // Every stream twice, a later one every other time: the cache overflows often.
            for stream in [n, n / 2] {
                let at = 1_000 + versions.values().sum::<u64>() as i64;
                store.append(&[record(&key(stream), at)], &[]).unwrap();
                *versions.entry(stream).or_insert(0u64) += 1;
            }
            assert!(store.stream_heads.versions.len() <= 8, "{}", store.stream_heads.versions.len());
        }
        let complete_above = store.stream_heads.complete_above.clone();
        assert!(complete_above > key(0) && complete_above < key(39), "{complete_above:?}");
        for (stream, version) in &versions {
            assert_eq!(store.stream_version_cached(&key(*stream)).unwrap(), *version, "stream {stream}");
        }
        assert_eq!(version_and_whether_cached(&mut store, &key(1_000)), (0, true));
    }
}
