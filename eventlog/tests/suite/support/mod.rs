//! Helpers shared by the corruption tests (`corruption.rs`: whole-byte flips on a small log;
//! `bitflips.rs`: single-bit flips on a 10,000-event log written by the real writer): how a
//! possibly damaged file is opened, verified and read back, a plain log written and a record
//! rewritten in place, and a small seeded generator.

use std::path::Path;

use eventlog::{LogStore, NewRecord, RedbOptions, RedbStore, StoredRecord, verify};

/// redb trusts its pages on a plain open (a corrupt page may make it panic), so a file that
/// may have been tampered with is opened with the full page-checksum check.
pub fn checked_options() -> RedbOptions {
    RedbOptions { cache_bytes: 1 << 20, check_integrity_on_open: true, ..RedbOptions::default() }
}

/// Opens the log in `dir` with the integrity check; an error is a detection at open.
pub fn open_checked(dir: &Path) -> Result<RedbStore, String> {
    RedbStore::open(dir, checked_options()).map_err(|e| e.to_string())
}

/// Runs `verify` and, if it is clean, reads every record back; an error is a detection by
/// `verify` (or by the read-back's own checks).
pub fn verify_and_read(store: &RedbStore) -> Result<Vec<StoredRecord>, String> {
    let report = verify(&store.reader(), |_, _| {}).map_err(|e| e.to_string())?;
    if let Some(problem) = report.first_problem {
        return Err(format!("verify: seq {}: {}", problem.seq, problem.message));
    }
    let mut records = Vec::new();
    loop {
        let from = records.len() as u64 + 1;
        let batch = store.reader().read_range(from, u64::MAX, 500).map_err(|e| e.to_string())?;
        if batch.is_empty() {
            return Ok(records);
        }
        records.extend(batch);
    }
}

/// Opens, verifies and reads back every record.
pub fn read_all(dir: &Path) -> Result<Vec<StoredRecord>, String> {
    verify_and_read(&open_checked(dir)?)
}

/// A deterministic xorshift generator, so a failing trial can be replayed.
pub fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Writes `records` plain records (13 streams, 150-byte payloads, one dedup outcome per
/// append of 100) to a new log in `dir`.
pub fn write_sample_log(dir: &Path, records: u64, options: RedbOptions) {
    let mut store = RedbStore::open(dir, options).unwrap();
    for chunk in 0..records.div_ceil(100) {
        let batch: Vec<NewRecord> = (chunk * 100..((chunk + 1) * 100).min(records))
            .map(|i| NewRecord {
                stream: format!("task-{}", i % 13).into_bytes(),
                command_id: format!("cmd-{i}"),
                actor: "auditor".into(),
                recorded_at_us: 1_700_000_000_000_000 + i as i64 * 1_000,
                event_type: (i % 5) as u16,
                schema_version: 1,
                payload: vec![(i % 251) as u8; 150],
            })
            .collect();
        let outcomes = vec![(format!("cmd-{}", chunk * 100), b"ok".to_vec())];
        store.append(&batch, &outcomes).unwrap();
    }
}

/// Replaces the stored value of record `seq` in the log in `dir` with `change(value)`, through
/// redb itself: its page checksums still hold, so only the log's own checks can notice.
pub fn rewrite_record(dir: &Path, seq: u64, change: impl FnOnce(&mut Vec<u8>)) {
    use redb::ReadableTable;
    const EVENTS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");
    let db = redb::Database::create(dir.join("ledger.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(EVENTS).unwrap();
        let mut value = table.get(seq).unwrap().unwrap().value().to_vec();
        change(&mut value);
        table.insert(seq, value.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}
