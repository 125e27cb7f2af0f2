//! From log to `Ledger`: decoding domain events out of records, folding a log
//! (from its nearest snapshot) into the in-memory ledger, and the snapshot
//! body format. The writer uses it at startup and after a failed commit; the
//! replay tool uses it for time travel (`as of seq N` = nearest snapshot at
//! or below N, then replay up to N).

use domain::{Event, Ledger};

use crate::byte_batch::ByteBatch;
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

/// Bytes reserved for an event's payload before encoding it: growing a buffer from empty
/// reallocated it three or four times per event on the writer's thread (a single-step
/// `TaskCreated` with a small JSON payload takes about 150 bytes). The store copies the payload
/// into its `StoredRecord` exactly; a caller that keeps a `NewRecord`'s payload itself should
/// shrink it (`replay-tool`'s feed reader does).
const PAYLOAD_CAPACITY: usize = 256;

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
        payload: postcard::to_extend(event, Vec::with_capacity(PAYLOAD_CAPACITY)).expect("events always serialize"),
    }
}

/// Decodes the domain event of a record, checking it agrees with the header.
pub fn decode_event(record: &StoredRecord) -> Result<Event, FoldError> {
    decode_payload(record.seq, record.event_type, record.schema_version, &record.payload)
}

/// [`decode_event`] from a record's parts, for callers holding a borrowed record
/// (`verify::CheckedRecord`) rather than an owned one.
pub fn decode_payload(seq: u64, event_type: u16, schema_version: u16, payload: &[u8]) -> Result<Event, FoldError> {
    let event: Event = postcard::from_bytes(payload).map_err(|e| FoldError::Decode { seq, reason: e.to_string() })?;
    if event.type_code() != event_type || event.schema_version() != schema_version {
        return Err(FoldError::TypeMismatch {
            seq,
            header_type: event_type,
            header_version: schema_version,
            payload_type: event.type_code(),
            payload_version: event.schema_version(),
        });
    }
    Ok(event)
}

/// Serializes a ledger for a snapshot file: `digest ‖ postcard(state)`, where the digest is
/// `Ledger::digest` (BLAKE3 of a domain tag and exactly those state bytes), so a loaded snapshot
/// is checked to hold the state that was saved. The state is written straight from the ledger
/// (no clone of its tasks) and hashed once.
pub fn snapshot_body(ledger: &Ledger) -> Vec<u8> {
    let mut body = ledger.write_state(vec![0u8; 32]).expect("ledger state always serializes");
    let digest = state_digest(&body[32..]);
    body[..32].copy_from_slice(&digest);
    body
}

/// `Ledger::digest` of the ledger whose `write_state` wrote `state`.
fn state_digest(state: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(LEDGER_DIGEST_DOMAIN);
    hasher.update(state);
    *hasher.finalize().as_bytes()
}

/// Rebuilds a ledger from a snapshot body and checks its digest.
///
/// `Ledger::digest` hashes the postcard bytes of the state, and the body stores exactly those
/// bytes after the digest, so the check hashes the stored bytes before decoding them: it proves
/// the state is the one that was digested when the snapshot was taken, without sorting and
/// re-serializing a million tasks on the restart path. That `decode_state` rebuilds exactly that
/// state is the domain's own invariant (its state-machine test round-trips a snapshot after every
/// step), and debug builds recompute the digest here as well.
pub fn ledger_from_snapshot(seq: u64, body: &[u8]) -> Result<Ledger, FoldError> {
    let digest_matches = body.split_at_checked(32).is_some_and(|(saved, state)| state_digest(state) == saved);
    if !digest_matches {
        return Err(FoldError::Snapshot { seq, reason: "state digest differs from the one saved".into() });
    }
    let ledger =
        Ledger::decode_state(&body[32..]).map_err(|e| FoldError::Snapshot { seq, reason: format!("decode: {e}") })?;
    debug_assert_eq!(ledger.digest(), body[..32], "the decoded ledger differs from the saved state at seq {seq}");
    Ok(ledger)
}

/// Domain prefix of `Ledger::digest` (`domain/src/ledger.rs`); a test below
/// checks the two agree.
const LEDGER_DIGEST_DOMAIN: &[u8] = b"taskledger.ledger.v1";

/// What [`scan_snapshot_body`] found in a snapshot body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotBodyFacts {
    /// BLAKE3 of the whole body (compare with the file header's body hash).
    pub body_hash: [u8; 32],
    /// The digest the snapshot saved (`None` if the body is shorter than one).
    pub saved_digest: Option<[u8; 32]>,
    /// The ledger digest of the state bytes after it, as `Ledger::digest` would compute it
    /// for a ledger whose `write_state` wrote exactly those bytes.
    pub state_digest: [u8; 32],
}

/// Reads a snapshot body (`digest ‖ postcard(state)`, see [`snapshot_body`]) in chunks of
/// `chunk_bytes` without decoding it, hashing it on the way, and hands every chunk of the state
/// part to `on_state` (which returns whether it still wants them). A caller compares those
/// bytes with `Ledger::write_state` of the ledger it expects: equal bytes and
/// `saved_digest == Some(state_digest)` mean the snapshot holds exactly that ledger, with no
/// second ledger built. The body is always read to its end, so `body_hash` is always complete.
pub fn scan_snapshot_body(
    mut body: impl std::io::Read,
    chunk_bytes: usize,
    mut on_state: impl FnMut(Vec<u8>) -> bool,
) -> std::io::Result<SnapshotBodyFacts> {
    let mut body_hasher = blake3::Hasher::new();
    let mut state_hasher = blake3::Hasher::new();
    state_hasher.update(LEDGER_DIGEST_DOMAIN);
    let mut saved = Vec::with_capacity(32);
    let mut listening = true;
    loop {
        let mut chunk = vec![0u8; chunk_bytes.max(64)];
        let n = match body.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        chunk.truncate(n);
        body_hasher.update(&chunk);
        let digest_bytes = (32 - saved.len()).min(chunk.len());
        saved.extend_from_slice(&chunk[..digest_bytes]);
        let state = chunk.split_off(digest_bytes);
        state_hasher.update(&state);
        if listening && !state.is_empty() {
            listening = on_state(state);
        }
    }
    Ok(SnapshotBodyFacts {
        body_hash: *body_hasher.finalize().as_bytes(),
        saved_digest: saved.try_into().ok(),
        state_digest: *state_hasher.finalize().as_bytes(),
    })
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

/// Read batches queued between the reading and the applying thread of [`replay`] (besides
/// the one being read and the one being applied).
const REPLAY_BATCHES_IN_FLIGHT: usize = 4;

/// Payloads read by [`replay`]'s reading thread, each with its seq, event type and schema version.
type PayloadBatch = ByteBatch<(u64, u16, u16)>;

/// Applies records `from..=to` to `ledger`, in batches. A second thread reads the records and
/// checks their chain links (about half of the work) while this one decodes and applies them;
/// the first error by seq is returned, and then `ledger` is partly replayed and must be thrown
/// away.
pub fn replay(ledger: &mut Ledger, reader: &LogReader, from: u64, to: u64) -> Result<u64, FoldError> {
    // Seq 0 is no record: counting from it would hand the last record of each batch twice.
    let from = from.max(1);
    if from > to {
        return Ok(0);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<PayloadBatch, ReadError>>(REPLAY_BATCHES_IN_FLIGHT);
    let (spare_tx, spare_rx) = std::sync::mpsc::sync_channel::<PayloadBatch>(REPLAY_BATCHES_IN_FLIGHT + 2);
    std::thread::scope(|scope| {
        let read = move || {
            let mut next = from;
            while next <= to {
                let mut batch = spare_rx.try_recv().unwrap_or_default();
                batch.clear();
                let scanned = reader.scan_range(next, to, REPLAY_BATCH_RECORDS, |record| {
                    batch.push((record.seq, record.event_type, record.schema_version), record.payload);
                });
                let handed = match scanned {
                    Ok(handed) => handed,
                    Err(error) => {
                        // What was read before the error goes first: an error among it comes first.
                        if batch.is_empty() || tx.send(Ok(batch)).is_ok() {
                            let _ = tx.send(Err(error));
                        }
                        return;
                    }
                };
                if handed == 0 {
                    return;
                }
                next += handed as u64;
                if tx.send(Ok(batch)).is_err() {
                    return;
                }
            }
        };
        std::thread::Builder::new()
            .name("replay-read".into())
            .spawn_scoped(scope, read)
            .map_err(|e| FoldError::Read(ReadError::Backend(format!("start the reading thread: {e}").into())))?;
        // Owned here, so that returning early hangs up on the reading thread before the join.
        let rx = rx;
        let mut replayed = 0;
        for batch in rx.iter() {
            let batch = batch?;
            for (&(seq, event_type, schema_version), payload) in batch.iter() {
                let event = decode_payload(seq, event_type, schema_version, payload)?;
                ledger.apply_owned(event).map_err(|e| FoldError::Inconsistent { seq, reason: e.to_string() })?;
                replayed += 1;
            }
            let _ = spare_tx.try_send(batch);
        }
        Ok(replayed)
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use domain::Command;
    use domain::testkit::{Scenario, claim, job};

    /// A snapshot body scanned without decoding says what decoding it would: its state bytes
    /// are `write_state`'s and both digests are the ledger's.
    #[test]
    fn scanning_a_snapshot_body_yields_the_ledger_digest_and_its_state_bytes() {
        let mut scenario = Scenario::new();
        for n in 0..30 {
            scenario.ok(Command::CreateTask(job(n, if n % 2 == 0 { "a" } else { "b" })));
        }
        scenario.ok(claim("a", "w", 2));
        let ledger = &scenario.ledger;
        let body = snapshot_body(ledger);
        for chunk_bytes in [1, 7, 64, 1 << 20] {
            let mut state = Vec::new();
            let facts = scan_snapshot_body(&body[..], chunk_bytes, |chunk| {
                state.extend_from_slice(&chunk);
                true
            })
            .unwrap();
            assert_eq!(facts.body_hash, *blake3::hash(&body).as_bytes());
            assert_eq!(facts.saved_digest, Some(ledger.digest()));
            assert_eq!(facts.state_digest, ledger.digest());
            assert_eq!(state, ledger.write_state(Vec::new()).unwrap());
        }
        let short = scan_snapshot_body(&body[..10], 4, |_| true).unwrap();
        assert_eq!(short.saved_digest, None);
    }

    /// A snapshot body loads only when its state bytes are the ones its digest was taken of: a
    /// changed digest, a different (still decodable) state under the old digest, and a short
    /// body are all refused, and a good body rebuilds the same ledger.
    #[test]
    fn a_snapshot_loads_only_with_the_digest_of_its_own_state() {
        let mut scenario = Scenario::new();
        for n in 0..20 {
            scenario.ok(Command::CreateTask(job(n, "a")));
        }
        let before = snapshot_body(&scenario.ledger);
        scenario.ok(claim("a", "w", 3));
        let after = snapshot_body(&scenario.ledger);

        let loaded = ledger_from_snapshot(7, &after).unwrap();
        assert_eq!(loaded.digest(), scenario.ledger.digest());

        let mut flipped = after.clone();
        flipped[5] ^= 0x01;
        let mut swapped = after[..32].to_vec();
        swapped.extend_from_slice(&before[32..]);
        for (what, body) in [("flipped digest", &flipped[..]), ("other state", &swapped[..]), ("short", &after[..20])] {
            let err = ledger_from_snapshot(7, body).err().unwrap_or_else(|| panic!("{what}: loaded"));
            assert!(err.to_string().contains("digest differs"), "{what}: {err}");
        }
    }
}
