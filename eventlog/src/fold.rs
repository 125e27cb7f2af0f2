//! From log to `Ledger`: decoding domain events out of records, folding a log
//! (from its nearest snapshot) into the in-memory ledger, and the snapshot
//! body format. The writer uses it at startup and after a failed commit; the
//! replay tool uses it for time travel (`as of seq N` = nearest snapshot at
//! or below N, then replay up to N).

use domain::{Event, Ledger, LedgerState};
use serde::{Deserialize, Serialize};

use crate::error::ReadError;
use crate::reader::LogReader;
use crate::record::{NewRecord, StoredRecord};
use crate::snapshot::SnapshotStore;
use crate::store::Head;

/// Records read per batch while replaying.
const REPLAY_BATCH_RECORDS: usize = 8192;

/// The log and the domain disagree.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("read the log: {0}")]
    Read(#[from] ReadError),
    #[error("record {seq}: payload does not decode as a domain event: {reason}")]
    Decode { seq: u64, reason: String },
    #[error(
        "record {seq}: header says event type {header_type} v{header_version}, payload is {payload_type} v{payload_version}"
    )]
    TypeMismatch { seq: u64, header_type: u16, header_version: u16, payload_type: u16, payload_version: u16 },
    #[error("record {seq}: {reason}")]
    Inconsistent { seq: u64, reason: String },
    #[error("snapshot at seq {seq}: {reason}")]
    Snapshot { seq: u64, reason: String },
}

/// Encodes a domain event as a log record. The record header repeats the
/// event's type and schema version so readers can filter without decoding.
pub fn encode_event(event: &Event, command_id: &str, actor: &str, recorded_at_us: i64) -> NewRecord {
    NewRecord {
        stream: event.stream().to_key(),
        command_id: command_id.to_owned(),
        actor: actor.to_owned(),
        recorded_at_us,
        event_type: event.type_code(),
        schema_version: event.schema_version(),
        payload: postcard::to_stdvec(event).expect("events always serialize"),
    }
}

/// Decodes the domain event of a record, checking it agrees with the header.
pub fn decode_event(record: &StoredRecord) -> Result<Event, FoldError> {
    let event: Event = postcard::from_bytes(&record.payload)
        .map_err(|e| FoldError::Decode { seq: record.seq, reason: e.to_string() })?;
    if event.type_code() != record.event_type || event.schema_version() != record.schema_version {
        return Err(FoldError::TypeMismatch {
            seq: record.seq,
            header_type: record.event_type,
            header_version: record.schema_version,
            payload_type: event.type_code(),
            payload_version: event.schema_version(),
        });
    }
    Ok(event)
}

/// What a snapshot file's body holds: the ledger's core state and its digest,
/// so a loaded snapshot is checked to rebuild exactly the state that was saved.
#[derive(Serialize, Deserialize)]
pub struct SnapshotBody {
    pub digest: [u8; 32],
    pub state: LedgerState,
}

/// Serializes a ledger for a snapshot file.
pub fn snapshot_body(ledger: &Ledger) -> Vec<u8> {
    let body = SnapshotBody { digest: ledger.digest(), state: ledger.to_state() };
    postcard::to_stdvec(&body).expect("ledger state always serializes")
}

/// Rebuilds a ledger from a snapshot body and checks its digest.
pub fn ledger_from_snapshot(seq: u64, body: &[u8]) -> Result<Ledger, FoldError> {
    let body: SnapshotBody =
        postcard::from_bytes(body).map_err(|e| FoldError::Snapshot { seq, reason: format!("decode: {e}") })?;
    let ledger = Ledger::from_state(body.state);
    if ledger.digest() != body.digest {
        return Err(FoldError::Snapshot { seq, reason: "state digest differs from the one saved".into() });
    }
    Ok(ledger)
}

/// How a fold went: where it started and how much it replayed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoldStats {
    /// Seq of the snapshot the fold started from (0 = from the beginning).
    pub snapshot_seq: u64,
    /// Records replayed after the snapshot.
    pub replayed: u64,
    /// Snapshots skipped because they failed a check, with the reason.
    pub skipped_snapshots: Vec<String>,
}

/// Applies records `from..=to` to `ledger`, in batches.
pub fn replay(ledger: &mut Ledger, reader: &LogReader, from: u64, to: u64) -> Result<u64, FoldError> {
    let mut next = from;
    let mut replayed = 0;
    while next <= to {
        let records = reader.read_range(next, to, REPLAY_BATCH_RECORDS)?;
        if records.is_empty() {
            break;
        }
        for record in &records {
            let event = decode_event(record)?;
            ledger.apply(&event).map_err(|e| FoldError::Inconsistent { seq: record.seq, reason: e.to_string() })?;
        }
        replayed += records.len() as u64;
        next = records.last().map_or(to, |r| r.seq) + 1;
    }
    Ok(replayed)
}

/// The ledger as of record `upto` (inclusive): the newest usable snapshot at
/// or below it, then the records after it. A snapshot that fails any check
/// (checksum, chain hash, digest) is skipped, never trusted.
pub fn fold_to(reader: &LogReader, snapshots: &SnapshotStore, upto: u64) -> Result<(Ledger, FoldStats), FoldError> {
    let mut stats = FoldStats::default();
    let pick = snapshots.latest_at_or_below(upto, |snapshot| {
        reader.record_hash(snapshot.info.seq).ok().flatten() == Some(snapshot.info.chain_hash)
    });
    stats.skipped_snapshots.extend(pick.skipped.iter().map(|e| e.to_string()));
    let mut ledger = Ledger::new();
    if let Some(snapshot) = pick.snapshot {
        match ledger_from_snapshot(snapshot.info.seq, &snapshot.body) {
            Ok(loaded) => {
                ledger = loaded;
                stats.snapshot_seq = snapshot.info.seq;
            }
            Err(e) => stats.skipped_snapshots.push(e.to_string()),
        }
    }
    stats.replayed = replay(&mut ledger, reader, stats.snapshot_seq + 1, upto)?;
    Ok((ledger, stats))
}

/// The ledger at the head of the log.
pub fn fold_to_head(reader: &LogReader, snapshots: &SnapshotStore) -> Result<(Ledger, Head, FoldStats), FoldError> {
    let head = reader.head()?;
    let (ledger, stats) = fold_to(reader, snapshots, head.seq)?;
    Ok((ledger, head, stats))
}
