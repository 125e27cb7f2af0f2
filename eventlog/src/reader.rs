//! [`LogReader`]: concurrent reads of a redb log through MVCC read transactions.
//!
//! A reader is an `Arc` of the database, so it is cheap to clone and usable from any thread
//! while the writer appends: each call opens its own read transaction and sees one committed
//! state. Every record read back is decoded and checked against its key; sequential reads also
//! check each chain link, so a modified record is never handed out silently.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;

use redb::{
    Database, ReadOnlyDatabase, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
};

use crate::error::{OpenError, ReadError, RecordError, backend};
use crate::record::{self, GENESIS_HASH, Hash, StoredRecord};
use crate::store::Head;

/// Version of the table layout, stored in the meta table.
pub const LOG_FORMAT_VERSION: u64 = 1;
/// One record as [`LogReader::scan_range`] hands it on: what a fold needs, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct ScannedRecord<'a> {
    pub seq: u64,
    pub event_type: u16,
    pub schema_version: u16,
    pub payload: &'a [u8],
}

/// Page cache of a log opened read-only. Tools mostly scan a log once, and
/// redb's default (1 GiB) would keep every page of that scan: hundreds of
/// megabytes of fresh memory for nothing (`verify` of a million-event log used
/// 1.0 GB of RSS with it, 0.8 GB with this; 8 to 64 MiB made no difference to its speed).
pub const READ_ONLY_CACHE_BYTES: usize = 32 * 1024 * 1024;
/// Largest `max` honoured by one read call.
pub const READ_BATCH_MAX: usize = 65_536;

pub(crate) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// (stream, stream version) → seq, for every record up to the `streams_indexed_through` marker
/// in the meta table; the records after it (a bounded tail, see `RedbOptions::stream_index_lag_records`)
/// are found by scanning the tail of the events table.
pub(crate) const STREAMS: TableDefinition<(&[u8], u64), u64> = TableDefinition::new("streams");
/// Sparse time index: second (floor of `recorded_at_us / 1e6`) → first seq recorded in it.
pub(crate) const TIMES: TableDefinition<i64, u64> = TableDefinition::new("times");
/// command id → order (u64 LE) ‖ seq (u64 LE) ‖ opaque outcome.
pub(crate) const OUTCOMES: TableDefinition<&str, &[u8]> = TableDefinition::new("outcomes");
/// insertion order → command id; the oldest is evicted first.
pub(crate) const OUTCOME_ORDER: TableDefinition<u64, &str> = TableDefinition::new("outcome_order");
/// HEAD_KEY → seq (u64 LE) ‖ hash: a checkpoint of the head, moved with the stream index (so
/// it may trail the last record by up to the index's lag). The head itself is the last record,
/// whose stored value begins with its chain hash; opening checks that the checkpoint names a
/// record with that hash and that the last record links to the one before it.
pub(crate) const HEAD: TableDefinition<u8, &[u8]> = TableDefinition::new("head");
pub(crate) const HEAD_KEY: u8 = 0;
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(crate) const META_FORMAT_VERSION: &str = "format_version";
/// The last seq whose stream entry is in `STREAMS`. Absent in logs written before the index
/// trailed the log, where every record is indexed.
pub(crate) const META_STREAMS_INDEXED_THROUGH: &str = "streams_indexed_through";
/// Present while a store writes through its journals, with their size in bytes: set durably
/// once both are started, removed by a clean close (everything is then in this file). Found at
/// open, it says the last writer stopped without that close, so records may be only in the
/// journals, and both must be there, with a header and at least that size (see
/// `journal::read_kept`): a journal deleted, wiped or cut after a crash is refused rather than
/// silently losing what it held.
pub(crate) const META_JOURNALS_IN_USE: &str = "journals_in_use";

pub(crate) enum Db {
    ReadWrite(Database),
    ReadOnly(ReadOnlyDatabase),
}

/// The stream index entries of the records after the `streams_indexed_through` marker. The
/// store that writes them keeps it (and indexes from it when the tail reaches its lag), and
/// shares it with its readers, so a stream read finds the tail's records without scanning them.
#[derive(Debug, Default)]
pub(crate) struct UnindexedTail {
    /// The marker these entries follow.
    pub base: u64,
    /// The last seq entered (`base` when empty).
    pub last: u64,
    /// stream → (version, seq), in log order.
    pub by_stream: HashMap<Vec<u8>, Vec<(u64, u64)>, foldhash::fast::RandomState>,
}

impl UnindexedTail {
    pub fn new(base: u64) -> Self {
        Self { base, last: base, ..Self::default() }
    }

    pub fn push(&mut self, stream: &[u8], version: u64, seq: u64) {
        match self.by_stream.get_mut(stream) {
            Some(entries) => entries.push((version, seq)),
            None => {
                self.by_stream.insert(stream.to_vec(), vec![(version, seq)]);
            }
        }
        self.last = seq;
    }

    /// Entries held: one per record after `base`, every record being entered in order.
    pub fn len(&self) -> u64 {
        self.last - self.base
    }

    /// The last version of `stream` in the tail.
    pub fn version(&self, stream: &[u8]) -> Option<u64> {
        self.by_stream.get(stream).and_then(|entries| entries.last()).map(|(version, _)| *version)
    }
}

/// The tail, shared by a store and its readers.
pub(crate) type SharedTail = Arc<RwLock<UnindexedTail>>;

/// A cheap, cloneable, thread-safe read handle on a log.
#[derive(Clone)]
pub struct LogReader {
    db: Arc<Db>,
    /// The writing store's unindexed tail, when this reader belongs to one.
    tail: Option<SharedTail>,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").finish_non_exhaustive()
    }
}

pub(crate) fn encode_head(head: &Head) -> [u8; 40] {
    let mut value = [0u8; 40];
    value[..8].copy_from_slice(&head.seq.to_le_bytes());
    value[8..].copy_from_slice(&head.hash);
    value
}

pub(crate) fn decode_head(value: &[u8]) -> Option<Head> {
    if value.len() != 40 {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&value[..8]);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&value[8..]);
    Some(Head { seq: u64::from_le_bytes(seq), hash })
}

/// What opening established about a log: its checked head and the last timestamp.
pub(crate) struct Checked {
    pub head: Head,
    pub last_recorded_at_us: Option<i64>,
}

/// Checks the meta table, that the stored head checkpoint names a record of the log with its
/// hash, and that the last record (the head) links to the one before it.
pub(crate) fn check_head(txn: &ReadTransaction) -> Result<Checked, OpenError> {
    let meta = txn.open_table(META).map_err(|error| match error {
        redb::TableError::TableDoesNotExist(_) => OpenError::NotInitialised,
        other => OpenError::Backend(backend(other)),
    })?;
    let version = meta.get(META_FORMAT_VERSION).map_err(|e| OpenError::Backend(backend(e)))?.map(|v| v.value());
    if version != Some(LOG_FORMAT_VERSION) {
        return Err(OpenError::FormatVersion { found: version.unwrap_or(0), expected: LOG_FORMAT_VERSION });
    }
    let open = |e: redb::TableError| OpenError::Backend(backend(e));
    let storage = |e: redb::StorageError| OpenError::Backend(backend(e));
    let head_table = txn.open_table(HEAD).map_err(open)?;
    let events = txn.open_table(EVENTS).map_err(open)?;
    let stored_head = match head_table.get(HEAD_KEY).map_err(storage)? {
        None => None,
        Some(value) => Some(
            decode_head(value.value())
                .ok_or(OpenError::HeadMismatch { seq: 0, message: "head entry is not 40 bytes".into() })?,
        ),
    };
    let last = events.last().map_err(storage)?;
    let Some((last_key, _)) = last else {
        return match stored_head {
            None | Some(Head::EMPTY) => Ok(Checked { head: Head::EMPTY, last_recorded_at_us: None }),
            Some(head) => Err(OpenError::HeadMismatch {
                seq: head.seq,
                message: "head names a record but the log is empty".into(),
            }),
        };
    };
    let last_seq = last_key.value();
    let Some(checkpoint) = stored_head else {
        return Err(OpenError::HeadMismatch { seq: last_seq, message: "log has records but no head entry".into() });
    };
    if checkpoint.seq > last_seq {
        return Err(OpenError::HeadMismatch {
            seq: checkpoint.seq,
            message: format!("head seq {} but the last record is {last_seq}", checkpoint.seq),
        });
    }
    // The checkpoint names a record with its hash, and the last record links to the one before
    // it; the whole chain is `verify`'s to check (so it can name the first bad record).
    let stored_hash = |seq: u64| -> Result<Hash, OpenError> {
        if seq == 0 {
            return Ok(GENESIS_HASH);
        }
        let value = events
            .get(seq)
            .map_err(storage)?
            .ok_or(OpenError::HeadMismatch { seq, message: format!("record {seq} is missing") })?;
        Ok(record::decode(seq, value.value())?.hash)
    };
    if stored_hash(checkpoint.seq)? != checkpoint.hash {
        return Err(OpenError::HeadMismatch {
            seq: checkpoint.seq,
            message: "head hash differs from the hash of the record it names".into(),
        });
    }
    let Some(before_last) = last_seq.checked_sub(1) else {
        return Err(OpenError::HeadMismatch {
            seq: 0,
            message: "a record is stored at seq 0, before the first".into(),
        });
    };
    let prev_hash = stored_hash(before_last)?;
    let last_value = events
        .get(last_seq)
        .map_err(storage)?
        .ok_or(OpenError::HeadMismatch { seq: last_seq, message: format!("record {last_seq} is missing") })?;
    let last = record::decode(last_seq, last_value.value())?;
    last.check_link(last_seq, &prev_hash)?;
    Ok(Checked { head: Head { seq: last_seq, hash: last.hash }, last_recorded_at_us: Some(last.body.recorded_at_us) })
}

fn read_backend<E: Into<redb::Error>>(error: E) -> ReadError {
    ReadError::Backend(backend(error))
}

impl LogReader {
    pub(crate) fn new(db: Arc<Db>) -> Self {
        Self { db, tail: None }
    }

    pub(crate) fn with_tail(db: Arc<Db>, tail: SharedTail) -> Self {
        Self { db, tail: Some(tail) }
    }

    /// Opens a log file for reading only (tools, offline verification), checking its head.
    /// Fails if a writer has the file open, or if it needs crash recovery; never modifies it.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        let path = path.as_ref();
        let db = Database::builder()
            .set_cache_size(READ_ONLY_CACHE_BYTES)
            .open_read_only(path)
            .map_err(|source| OpenError::Database { path: path.to_path_buf(), source })?;
        let reader = Self::with_checked_head(Db::ReadOnly(db))?;
        let in_use = {
            let txn = reader.begin()?;
            let meta = txn.open_table(META).map_err(|e| OpenError::Backend(backend(e)))?;
            journals_in_use(&meta).map_err(|e| OpenError::Backend(backend(e)))?
        };
        let paths = crate::journal::journal_paths(path);
        let (found, _) = crate::journal::read_kept(&paths, in_use, crate::journal::JournalLoss::Refuse)?;
        // Records still only in the journal (a crash before the checkpoint) belong to the log.
        for (journal, contents) in found {
            let head = reader.head()?.seq;
            let past_head = contents.records.iter().filter(|(seq, _)| *seq > head).count() as u64;
            if past_head > 0 {
                return Err(OpenError::JournalPending { path: journal, records: past_head });
            }
        }
        Ok(reader)
    }

    /// Opens a log file that needs crash recovery (a server was killed on it) for reading,
    /// without modifying it: redb's repair, and the records of the journal beside it that the
    /// file does not hold yet, go to an in-memory overlay ([`crate::OverlayBackend`]), never to
    /// either file. Checks the head like [`Self::open_read_only`].
    pub fn open_repaired(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_repaired_with(path, crate::journal::JournalLoss::Refuse).map(|(reader, _)| reader)
    }

    /// [`Self::open_repaired`], opening even a log whose journals are missing, wiped or short
    /// when `loss` says to accept that (see [`crate::journal::read_kept`]); with the losses
    /// accepted (`RedbStore::accepted_journal_losses`).
    pub fn open_repaired_with(
        path: impl AsRef<Path>,
        loss: crate::journal::JournalLoss,
    ) -> Result<(Self, Vec<String>), OpenError> {
        let store = crate::RedbStore::open_repaired(path.as_ref(), READ_ONLY_CACHE_BYTES, false, loss)?;
        Ok((store.reader(), store.accepted_journal_losses().to_vec()))
    }

    fn with_checked_head(db: Db) -> Result<Self, OpenError> {
        let reader = Self::new(Arc::new(db));
        let txn = reader.begin()?;
        check_head(&txn)?;
        Ok(reader)
    }

    pub(crate) fn begin(&self) -> Result<ReadTransaction, ReadError> {
        match &*self.db {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
        .map_err(read_backend)
    }

    /// The committed head: the last record's seq and chain hash.
    pub fn head(&self) -> Result<Head, ReadError> {
        let txn = self.begin()?;
        let events = txn.open_table(EVENTS).map_err(read_backend)?;
        match events.last().map_err(read_backend)? {
            None => Ok(Head::EMPTY),
            Some((key, value)) => {
                let seq = key.value();
                Ok(Head { seq, hash: record::decode(seq, value.value())?.hash })
            }
        }
    }

    /// Number of records (the head seq, since seqs are gapless from 1).
    pub fn len(&self) -> Result<u64, ReadError> {
        Ok(self.head()?.seq)
    }

    pub fn is_empty(&self) -> Result<bool, ReadError> {
        Ok(self.len()? == 0)
    }

    /// Records `from_seq..=to_seq`, at most `max` (capped at [`READ_BATCH_MAX`]), each checked
    /// for its key and its chain link.
    pub fn read_range(&self, from_seq: u64, to_seq: u64, max: usize) -> Result<Vec<StoredRecord>, ReadError> {
        let txn = self.begin()?;
        let events = txn.open_table(EVENTS).map_err(read_backend)?;
        read_range_in(&events, from_seq, to_seq, max, |_| true)
    }

    /// [`LogReader::read_range`] without copying: hands `f` each record, borrowed and checked
    /// the same way, and returns how many it handed on (at most `max` and [`READ_BATCH_MAX`];
    /// fewer only at `to_seq` or the end of the log). For folds that only need each record's
    /// payload once. If a record fails its checks, the ones before it have been handed on.
    pub fn scan_range(
        &self,
        from_seq: u64,
        to_seq: u64,
        max: usize,
        mut f: impl FnMut(&ScannedRecord<'_>),
    ) -> Result<usize, ReadError> {
        let txn = self.begin()?;
        let events = txn.open_table(EVENTS).map_err(read_backend)?;
        let mut handed = 0;
        scan_range_in(&events, from_seq, to_seq, max, |seq, decoded| {
            f(&ScannedRecord {
                seq,
                event_type: decoded.body.event_type,
                schema_version: decoded.body.schema_version,
                payload: decoded.body.payload,
            });
            handed += 1;
            true
        })?;
        Ok(handed)
    }

    /// Records of `stream` from version `from_version` on, at most `max`: from the stream index,
    /// then from the unindexed tail of the log.
    pub fn read_stream(&self, stream: &[u8], from_version: u64, max: usize) -> Result<Vec<StoredRecord>, ReadError> {
        let max = max.min(READ_BATCH_MAX);
        let txn = self.begin()?;
        let streams = txn.open_table(STREAMS).map_err(read_backend)?;
        let events = txn.open_table(EVENTS).map_err(read_backend)?;
        let (indexed_through, _) = self.indexed_through(&txn, &events)?;
        let mut out = Vec::new();
        let from = (stream, from_version.max(1));
        let to = (stream, u64::MAX);
        for entry in streams.range(from..=to).map_err(read_backend)?.take(max) {
            let (key, seq) = entry.map_err(read_backend)?;
            let (_, version) = key.value();
            let seq = seq.value();
            let record = indexed_record(&events, seq, stream, version)?.ok_or_else(|| RecordError::Disagrees {
                seq,
                message: format!("stream index names seq {seq}, which does not exist"),
            })?;
            out.push(record);
        }
        if out.len() < max {
            let from_version = out.last().map_or(from_version.max(1), |r| r.stream_version + 1);
            let (known, scan_after) = self.tail_entries(indexed_through, stream);
            for (version, seq) in known.into_iter().filter(|(version, _)| *version >= from_version) {
                if out.len() == max {
                    break;
                }
                // None: entered after this transaction began.
                let Some(record) = indexed_record(&events, seq, stream, version)? else { break };
                out.push(record);
            }
            for_each_unindexed(&events, scan_after, |seq, decoded| {
                if out.len() < max && decoded.body.stream == stream && decoded.body.stream_version >= from_version {
                    out.push(decoded.to_stored(seq));
                }
            })?;
        }
        Ok(out)
    }

    /// What the shared tail knows of `stream` beyond the index at `indexed_through` (its
    /// (version, seq) entries, copied so no lock is held while reading), and the seq after which
    /// the tail must still be scanned: all of it without a shared tail for that marker.
    fn tail_entries(&self, indexed_through: u64, stream: &[u8]) -> (Vec<(u64, u64)>, u64) {
        if let Some(tail) = &self.tail {
            let tail = tail.read();
            if tail.base == indexed_through {
                return (tail.by_stream.get(stream).cloned().unwrap_or_default(), tail.last);
            }
        }
        (Vec::new(), indexed_through)
    }

    /// The stream index's marker in `txn`, and the last seq there.
    fn indexed_through(
        &self,
        txn: &ReadTransaction,
        events: &ReadOnlyTable<u64, &[u8]>,
    ) -> Result<(u64, u64), ReadError> {
        let last_seq = events.last().map_err(read_backend)?.map_or(0, |(key, _)| key.value());
        let meta = txn.open_table(META).map_err(read_backend)?;
        Ok((streams_indexed_through(&meta, last_seq).map_err(read_backend)?, last_seq))
    }

    /// Records with `from_us <= recorded_at_us <= to_us`, at most `max`, in log order.
    pub fn read_time_range(&self, from_us: i64, to_us: i64, max: usize) -> Result<Vec<StoredRecord>, ReadError> {
        if from_us > to_us {
            return Ok(Vec::new());
        }
        let txn = self.begin()?;
        let times = txn.open_table(TIMES).map_err(read_backend)?;
        let events = txn.open_table(EVENTS).map_err(read_backend)?;
        let second = from_us.div_euclid(1_000_000);
        // Every record before the first seq of the latest indexed second at or before
        // `from_us` is older than `from_us`, because timestamps never decrease.
        let start = match times.range(..=second).map_err(read_backend)?.next_back() {
            Some(entry) => entry.map_err(read_backend)?.1.value(),
            None => 1,
        };
        let mut out = Vec::new();
        let mut from = start;
        let max = max.min(READ_BATCH_MAX);
        while out.len() < max {
            let mut done = false;
            let batch = read_range_in(&events, from, u64::MAX, 4096, |r| {
                if r.body.recorded_at_us > to_us {
                    done = true;
                }
                !done
            })?;
            let Some(last) = batch.last() else { break };
            from = last.seq + 1;
            out.extend(batch.into_iter().filter(|r| r.recorded_at_us >= from_us).take(max - out.len()));
            if done {
                break;
            }
        }
        Ok(out)
    }

    /// The chain hash of record `seq`, if it exists.
    pub fn record_hash(&self, seq: u64) -> Result<Option<Hash>, ReadError> {
        let txn = self.begin()?;
        let events = txn.open_table(EVENTS).map_err(read_backend)?;
        let value = events.get(seq).map_err(read_backend)?;
        match value {
            None => Ok(None),
            Some(value) => Ok(Some(record::decode(seq, value.value())?.hash)),
        }
    }

    /// The current version of `stream`; 0 if it has no record.
    pub fn stream_version(&self, stream: &[u8]) -> Result<u64, ReadError> {
        let txn = self.begin()?;
        let streams = txn.open_table(STREAMS).map_err(read_backend)?;
        let events = txn.open_table(EVENTS).map_err(read_backend)?;
        let mut version = last_stream_version(&streams, stream).map_err(read_backend)?;
        let (indexed_through, last_seq) = self.indexed_through(&txn, &events)?;
        let (known, scan_after) = self.tail_entries(indexed_through, stream);
        if let Some((known_version, _)) = known.iter().rev().find(|(_, seq)| *seq <= last_seq) {
            version = *known_version;
        }
        for_each_unindexed(&events, scan_after, |_, decoded| {
            if decoded.body.stream == stream {
                version = decoded.body.stream_version;
            }
        })?;
        Ok(version)
    }
}

/// Record `seq`, which an index says is version `version` of `stream`; `None` if there is no
/// such record.
fn indexed_record(
    events: &ReadOnlyTable<u64, &[u8]>,
    seq: u64,
    stream: &[u8],
    version: u64,
) -> Result<Option<StoredRecord>, ReadError> {
    let Some(value) = events.get(seq).map_err(read_backend)? else { return Ok(None) };
    let decoded = record::decode(seq, value.value())?;
    if decoded.body.stream != stream || decoded.body.stream_version != version {
        return Err(RecordError::Disagrees {
            seq,
            message: format!("stream index says version {version} of this stream, the record disagrees"),
        }
        .into());
    }
    Ok(Some(decoded.to_stored(seq)))
}

/// The last version of `stream` in the stream index, 0 if none.
pub(crate) fn last_stream_version(
    streams: &impl ReadableTable<(&'static [u8], u64), u64>,
    stream: &[u8],
) -> Result<u64, redb::StorageError> {
    let last = streams.range((stream, 0u64)..=(stream, u64::MAX))?.next_back().transpose()?;
    Ok(last.map_or(0, |(key, _)| key.value().1))
}

/// The journals' size while a store writes through them and has not closed cleanly (see
/// [`META_JOURNALS_IN_USE`]), else `None`.
pub(crate) fn journals_in_use(meta: &impl ReadableTable<&'static str, u64>) -> Result<Option<u64>, redb::StorageError> {
    Ok(meta.get(META_JOURNALS_IN_USE)?.map(|v| v.value()))
}

/// The last seq covered by the stream index, given the last seq of the log in the same
/// transaction.
pub(crate) fn streams_indexed_through(
    meta: &impl ReadableTable<&'static str, u64>,
    last_seq: u64,
) -> Result<u64, redb::StorageError> {
    Ok(meta.get(META_STREAMS_INDEXED_THROUGH)?.map_or(last_seq, |v| v.value()))
}

/// Calls `each(seq, decoded)` for every record after `indexed_through`, in log order: the part
/// of the log the stream index does not cover yet.
pub(crate) fn for_each_unindexed(
    events: &impl ReadableTable<u64, &'static [u8]>,
    indexed_through: u64,
    mut each: impl FnMut(u64, &record::Decoded<'_>),
) -> Result<(), ReadError> {
    for entry in events.range(indexed_through.saturating_add(1)..).map_err(read_backend)? {
        let (key, value) = entry.map_err(read_backend)?;
        let seq = key.value();
        each(seq, &record::decode(seq, value.value())?);
    }
    Ok(())
}

/// Reads `from_seq..=to_seq` (at most `max`) from `events`, checking keys and chain links,
/// stopping before the first record `keep` refuses.
fn read_range_in(
    events: &ReadOnlyTable<u64, &[u8]>,
    from_seq: u64,
    to_seq: u64,
    max: usize,
    mut keep: impl FnMut(&record::Decoded<'_>) -> bool,
) -> Result<Vec<StoredRecord>, ReadError> {
    let mut out = Vec::with_capacity(max.clamp(1, 1024));
    scan_range_in(events, from_seq, to_seq, max, |seq, decoded| {
        let kept = keep(decoded);
        if kept {
            out.push(decoded.to_stored(seq));
        }
        kept
    })?;
    Ok(out)
}

/// Hands `f` the records `from_seq..=to_seq`, at most `max`, borrowed from `events` and checked
/// as they are read (seq continuity, decoding, chain link), until `f` returns false.
fn scan_range_in(
    events: &ReadOnlyTable<u64, &[u8]>,
    from_seq: u64,
    to_seq: u64,
    max: usize,
    mut f: impl FnMut(u64, &record::Decoded<'_>) -> bool,
) -> Result<(), ReadError> {
    let from_seq = from_seq.max(1);
    let max = max.min(READ_BATCH_MAX);
    if from_seq > to_seq || max == 0 {
        return Ok(());
    }
    let mut prev_hash = if from_seq > 1 {
        match events.get(from_seq - 1).map_err(read_backend)? {
            Some(value) => record::decode(from_seq - 1, value.value())?.hash,
            None => return Ok(()),
        }
    } else {
        GENESIS_HASH
    };
    let entries = events.range(from_seq..=to_seq).map_err(read_backend)?;
    for (expected, entry) in (from_seq..).zip(entries.take(max)) {
        let (key, value) = entry.map_err(read_backend)?;
        let seq = key.value();
        if seq != expected {
            return Err(RecordError::Disagrees {
                seq: expected,
                message: format!("record {expected} is missing, next is {seq}"),
            }
            .into());
        }
        let decoded = record::decode(seq, value.value())?;
        decoded.check_link(seq, &prev_hash)?;
        if !f(seq, &decoded) {
            break;
        }
        prev_hash = decoded.hash;
    }
    Ok(())
}
