//! Whole-log verification: decode every record and check every invariant the log promises.
//!
//! Streams the events table in one MVCC read transaction (a consistent view while the writer
//! goes on appending) and checks, in one pass: seqs gapless from 1, each record decodes,
//! stream versions gapless from 1 per stream, recorded times never going back (every lookup by
//! time is a binary search that relies on it), every chain link, and the stored head against
//! the last record. The stream index must hold exactly one entry per record. Two threads
//! share the pass: one reads the table and checks the chain links (each needs only the stored
//! hash before it), the caller's decodes and checks the rest in order.
//! Measure with
//! `VERIFY_SPEED_RECORDS=2000000 cargo test -p eventlog --release --test suite verify_speed -- --nocapture`.

use std::collections::HashMap;

use redb::{ReadableTable, ReadableTableMetadata};

use crate::byte_batch::ByteBatch;
use crate::error::{ReadError, RecordError, backend};
use crate::reader::{EVENTS, HEAD, HEAD_KEY, LogReader, META, STREAMS, decode_head, streams_indexed_through};
use crate::record::{self, GENESIS_HASH, Hash};
use crate::store::Head;
use crate::stream_key::StreamKey;

/// How often the progress callback is called, in records.
pub const PROGRESS_EVERY_RECORDS: u64 = 65_536;

/// What kind of invariant a [`Problem`] breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// The stored value does not decode.
    Decode,
    /// A seq is missing or out of order.
    SeqGap,
    /// A stream version is not the previous one plus one.
    StreamVersion,
    /// The stored hash does not recompute from the predecessor's.
    ChainLink,
    /// A record's time is before the time of the record ahead of it.
    RecordedAt,
    /// The head entry does not match the last record.
    Head,
    /// The stream index does not match the records.
    Index,
}

/// The first broken invariant found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub seq: u64,
    pub kind: ProblemKind,
    pub message: String,
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked (up to the first problem).
    pub records: u64,
    pub first_problem: Option<Problem>,
    /// The head: the last record checked, with its chain hash (`Head::EMPTY` if none).
    pub head: Head,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.first_problem.is_none()
    }
}

fn read_backend<E: Into<redb::Error>>(error: E) -> ReadError {
    ReadError::Backend(backend(error))
}

/// One record that passed every check up to it (seq continuity, decoding, its chain link and
/// its stream version), borrowed from the read transaction. [`verify_with`] hands these out so
/// a caller can do more with each record (decode its event, fold it) in the same single read
/// of the log, without decoding or hashing it a second time.
#[derive(Clone, Copy, Debug)]
pub struct CheckedRecord<'a> {
    pub seq: u64,
    /// Its chain hash (checked against its predecessor's).
    pub hash: &'a Hash,
    pub stream: &'a [u8],
    pub stream_version: u64,
    pub recorded_at_us: i64,
    pub command_id: &'a str,
    pub actor: &'a str,
    pub event_type: u16,
    pub schema_version: u16,
    pub payload: &'a [u8],
    /// The stored body: exactly the bytes the chain hash covers.
    pub body: &'a [u8],
}

/// Verifies the whole log as of now; `progress(done, total)` is called every
/// [`PROGRESS_EVERY_RECORDS`] records and at the end. Backend failures are errors; broken data
/// is reported in the answer.
pub fn verify(reader: &LogReader, progress: impl FnMut(u64, u64)) -> Result<VerifyReport, ReadError> {
    verify_with(reader, progress, |_| {})
}

/// Records per batch handed from the scanning thread to the checking one.
const SCAN_BATCH_RECORDS: usize = 1024;

/// Stored values read and link-checked by [`scan_and_link`], in log order.
type ScannedBatch = ByteBatch<Scanned>;

/// What the scanning thread learnt of one stored value.
struct Scanned {
    seq: u64,
    /// Its stored hash recomputes from the stored hash of the record before it.
    link_holds: bool,
}

/// Reads every stored value in seq order and checks its chain link against the value before
/// it, sending batches to `to_check`; stops after the first broken link (that record is sent,
/// so the checker can report it as undecodable if it is), at a backend error, or when the
/// checker hangs up. A value too short to hold a hash is sent as broken, for the same reason.
fn scan_and_link(
    events: &redb::ReadOnlyTable<u64, &[u8]>,
    to_check: &std::sync::mpsc::SyncSender<Result<ScannedBatch, ReadError>>,
    spare: &std::sync::mpsc::Receiver<ScannedBatch>,
) {
    let next_batch = || {
        let mut batch = spare.try_recv().unwrap_or_default();
        batch.clear();
        batch
    };
    let iter = match events.iter() {
        Ok(iter) => iter,
        Err(error) => {
            let _ = to_check.send(Err(read_backend(error)));
            return;
        }
    };
    let mut prev_hash = GENESIS_HASH;
    let mut batch = next_batch();
    for entry in iter {
        let (key, value) = match entry {
            Ok(entry) => entry,
            Err(error) => {
                // The records read so far go first: a problem among them is the first one.
                if batch.is_empty() || to_check.send(Ok(batch)).is_ok() {
                    let _ = to_check.send(Err(read_backend(error)));
                }
                return;
            }
        };
        let seq = key.value();
        let value = value.value();
        let link_holds = value.len() >= 32 && {
            let (hash, body) = value.split_at(32);
            let holds = record::chain_hash(&prev_hash, seq, body) == hash;
            prev_hash.copy_from_slice(hash);
            holds
        };
        batch.push(Scanned { seq, link_holds }, value);
        if !link_holds {
            // The checker reports this record; nothing after it is read.
            let _ = to_check.send(Ok(batch));
            return;
        }
        if batch.len() == SCAN_BATCH_RECORDS && to_check.send(Ok(std::mem::replace(&mut batch, next_batch()))).is_err()
        {
            return;
        }
    }
    if !batch.is_empty() {
        let _ = to_check.send(Ok(batch));
    }
}

/// [`verify`], calling `on_record` with every record once it has passed its checks, in log
/// order, up to the first problem.
pub fn verify_with(
    reader: &LogReader,
    mut progress: impl FnMut(u64, u64),
    mut on_record: impl FnMut(&CheckedRecord<'_>),
) -> Result<VerifyReport, ReadError> {
    let txn = reader.begin()?;
    let events = txn.open_table(EVENTS).map_err(read_backend)?;
    let total = events.len().map_err(read_backend)?;
    let head_value = txn
        .open_table(HEAD)
        .map_err(read_backend)?
        .get(HEAD_KEY)
        .map_err(read_backend)?
        .map(|v| decode_head(v.value()));
    let problem = |seq, kind, message: String| Problem { seq, kind, message };
    let (checkpoint, mut first_problem) = match head_value {
        None if total > 0 => {
            (Head::EMPTY, Some(problem(0, ProblemKind::Head, "log has records but no head entry".into())))
        }
        None => (Head::EMPTY, None),
        Some(Some(head)) => (head, None),
        Some(None) => (Head::EMPTY, Some(problem(0, ProblemKind::Head, "head entry is not 40 bytes".into()))),
    };

    // Sized for the log up front (growing a map of a million streams record
    // by record costs more than the hashing), but never trusting a head read
    // from a possibly damaged file for more than a bounded allocation.
    const PRESIZE_STREAMS_MAX: u64 = 4 * 1024 * 1024;
    // foldhash, randomly seeded per process: keys come from the file, which may be hostile.
    let mut stream_versions: HashMap<StreamKey, u64, foldhash::fast::RandomState> = HashMap::with_capacity_and_hasher(
        (total / 2).min(PRESIZE_STREAMS_MAX) as usize,
        foldhash::fast::RandomState::default(),
    );
    let mut prev_hash = GENESIS_HASH;
    let mut expected = 1u64;
    let mut records = 0u64;
    let mut last_recorded_at_us = i64::MIN;
    if first_problem.is_none() {
        // One thread reads the table and checks every chain link (BLAKE3 is a third of the
        // work, and each link needs only the stored hashes); this one decodes, checks the rest
        // in log order and hands records on, so `on_record` sees only fully checked records.
        let (scanned_tx, scanned_rx) = std::sync::mpsc::sync_channel::<Result<ScannedBatch, ReadError>>(4);
        let (spare_tx, spare_rx) = std::sync::mpsc::sync_channel::<ScannedBatch>(6);
        let events = &events;
        std::thread::scope(|scope| -> Result<(), ReadError> {
            std::thread::Builder::new()
                .name("verify-scan".into())
                .spawn_scoped(scope, move || scan_and_link(events, &scanned_tx, &spare_rx))
                .map_err(|e| ReadError::Backend(format!("start the scanning thread: {e}").into()))?;
            'batches: for batch in scanned_rx.iter() {
                let batch = batch?;
                for (scanned, value) in batch.iter() {
                    let seq = scanned.seq;
                    if seq != expected {
                        first_problem = Some(problem(
                            expected,
                            ProblemKind::SeqGap,
                            format!("expected record {expected}, found {seq}"),
                        ));
                        break 'batches;
                    }
                    let decoded = match record::decode(seq, value) {
                        Ok(decoded) => decoded,
                        Err(error) => {
                            first_problem = Some(problem(seq, ProblemKind::Decode, error.to_string()));
                            break 'batches;
                        }
                    };
                    if !scanned.link_holds {
                        first_problem =
                            Some(problem(seq, ProblemKind::ChainLink, RecordError::HashMismatch { seq }.to_string()));
                        break 'batches;
                    }
                    // One probe of the map per record (in a log of a million tasks each is a
                    // cache miss): a version-1 record must start its stream, so it is inserted
                    // outright, and any other must extend a stream already there.
                    let version = decoded.body.stream_version;
                    let previous = if version == 1 {
                        stream_versions.insert(StreamKey::new(decoded.body.stream), 1).unwrap_or(0)
                    } else {
                        match stream_versions.get_mut(decoded.body.stream) {
                            Some(known) => std::mem::replace(known, version),
                            None => 0,
                        }
                    };
                    if version != previous + 1 {
                        first_problem = Some(problem(
                            seq,
                            ProblemKind::StreamVersion,
                            format!("stream version {version} follows {previous}"),
                        ));
                        break 'batches;
                    }
                    let recorded_at_us = decoded.body.recorded_at_us;
                    if recorded_at_us < last_recorded_at_us {
                        first_problem = Some(problem(
                            seq,
                            ProblemKind::RecordedAt,
                            format!(
                                "recorded at {recorded_at_us} µs, {} µs before the record ahead of it",
                                last_recorded_at_us - recorded_at_us
                            ),
                        ));
                        break 'batches;
                    }
                    last_recorded_at_us = recorded_at_us;
                    if seq == checkpoint.seq && decoded.hash != checkpoint.hash {
                        first_problem = Some(problem(
                            seq,
                            ProblemKind::Head,
                            "stored head hash differs from the record's hash".into(),
                        ));
                        break 'batches;
                    }
                    prev_hash = decoded.hash;
                    on_record(&CheckedRecord {
                        seq,
                        hash: &prev_hash,
                        stream: decoded.body.stream,
                        stream_version: decoded.body.stream_version,
                        recorded_at_us: decoded.body.recorded_at_us,
                        command_id: decoded.body.command_id,
                        actor: decoded.body.actor,
                        event_type: decoded.body.event_type,
                        schema_version: decoded.body.schema_version,
                        payload: decoded.body.payload,
                        body: decoded.body_bytes,
                    });
                    records += 1;
                    expected += 1;
                    if records.is_multiple_of(PROGRESS_EVERY_RECORDS) {
                        progress(records, total);
                    }
                }
                // Full or gone: then this batch is freed here.
                let _ = spare_tx.try_send(batch);
            }
            // Hang up before the scope joins the scanner: a scan still running then stops at its
            // next send (returning early with `?` drops the receiver the same way).
            drop(scanned_rx);
            Ok(())
        })?;
    }
    // The stored head is a checkpoint that may trail the last record (see `reader::HEAD`).
    if first_problem.is_none() && checkpoint.seq > records {
        first_problem = Some(problem(
            checkpoint.seq,
            ProblemKind::Head,
            format!("stored head is seq {}, the last record is {records}", checkpoint.seq),
        ));
    }
    if first_problem.is_none() {
        // The index covers the records up to its marker; the tail after it is found by scanning.
        let meta = txn.open_table(META).map_err(read_backend)?;
        let covered = streams_indexed_through(&meta, records).map_err(read_backend)?;
        let indexed = txn.open_table(STREAMS).map_err(read_backend)?.len().map_err(read_backend)?;
        if covered > records || indexed != covered {
            first_problem = Some(problem(
                records,
                ProblemKind::Index,
                format!("stream index has {indexed} entries and claims {covered} records of {records}"),
            ));
        }
    }
    progress(records, total);
    Ok(VerifyReport { records, first_problem, head: Head { seq: records, hash: prev_hash } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::NewRecord;

    /// A log whose records carry the given (stream, version) pairs, chained and with a matching
    /// head, written around the store (which never numbers a version wrongly).
    fn log_with_versions(versions: &[(&[u8], u64)]) -> (tempfile::TempDir, LogReader) {
        let dir = tempfile::tempdir().unwrap();
        drop(crate::RedbStore::open(dir.path(), crate::RedbOptions::default()).unwrap());
        let path = dir.path().join(crate::redb_store::LOG_FILE_NAME);
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let mut prev = GENESIS_HASH;
        {
            let mut events = txn.open_table(EVENTS).unwrap();
            for (seq, (stream, version)) in (1u64..).zip(versions) {
                let record = NewRecord {
                    stream: stream.to_vec(),
                    command_id: format!("c{seq}"),
                    actor: "test".into(),
                    recorded_at_us: 1_000_000 + seq as i64,
                    event_type: 1,
                    schema_version: 1,
                    payload: vec![seq as u8],
                };
                let (value, stored) = record::encode(&record, seq, *version, &prev).unwrap();
                events.insert(seq, value.as_slice()).unwrap();
                prev = stored.hash;
            }
            let head = Head { seq: versions.len() as u64, hash: prev };
            txn.open_table(HEAD).unwrap().insert(HEAD_KEY, crate::reader::encode_head(&head).as_slice()).unwrap();
            txn.open_table(META).unwrap().insert(crate::reader::META_STREAMS_INDEXED_THROUGH, 0).unwrap();
        }
        txn.commit().unwrap();
        drop(db);
        let reader = LogReader::open_read_only(&path).unwrap();
        (dir, reader)
    }

    #[test]
    fn a_stream_version_out_of_order_is_reported_at_its_record() {
        let (a, b): (&[u8], &[u8]) = (b"task-a", b"task-b");
        let (_dir, reader) = log_with_versions(&[(a, 1), (b, 1), (a, 2), (b, 2), (a, 3)]);
        let report = verify(&reader, |_, _| {}).unwrap();
        assert!(report.is_clean(), "{:?}", report.first_problem);
        assert_eq!(report.records, 5);

        for (versions, bad_seq, message) in [
            // A stream started twice.
            (vec![(a, 1), (b, 1), (a, 2), (a, 1)], 4, "stream version 1 follows 2"),
            // A version skipped.
            (vec![(a, 1), (b, 1), (a, 3)], 3, "stream version 3 follows 1"),
            // A stream that does not start at 1.
            (vec![(a, 1), (b, 2)], 2, "stream version 2 follows 0"),
            // A version repeated.
            (vec![(a, 1), (a, 2), (b, 1), (a, 2)], 4, "stream version 2 follows 2"),
        ] {
            let (_dir, reader) = log_with_versions(&versions);
            let report = verify(&reader, |_, _| {}).unwrap();
            let problem = report.first_problem.unwrap_or_else(|| panic!("{versions:?} passed"));
            assert_eq!(
                (problem.seq, problem.kind, problem.message.as_str()),
                (bad_seq, ProblemKind::StreamVersion, message)
            );
            assert_eq!(report.records, bad_seq - 1, "records before the problem are the ones checked");
        }
    }
}
