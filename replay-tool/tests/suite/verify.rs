//! `verify` on clean and damaged logs: clean logs pass with exit 0; a
//! flipped byte inside a record is reported with its seq and a non-zero exit,
//! and no damage anywhere in the file makes the tool panic.

use crate::common::{build_story, path, replay, replay_ok, stderr, stdout};
use serde_json::Value;

#[test]
fn a_clean_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    build_story(dir.path(), 10);
    let before = std::fs::read(dir.path().join("ledger.redb")).unwrap();
    let out = replay(&["verify", "--data", path(dir.path()), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["clean"], true);
    assert_eq!(report["records_checked"], 23);
    assert_eq!(report["events_applied"], 23);
    assert_eq!(report["snapshots_checked"], serde_json::json!([10, 20]));
    assert_eq!(report["storage"], "passed");
    let text = stdout(&replay(&["verify", "--data", path(dir.path())]));
    assert!(text.ends_with("result: clean\n"), "{text}");
    // redb's check rewrites allocator state: in memory, never in the file.
    assert!(std::fs::read(dir.path().join("ledger.redb")).unwrap() == before, "verify wrote to the log");
}

fn flip_all(file: &std::path::Path, needle: &[u8]) -> usize {
    let mut bytes = std::fs::read(file).unwrap();
    let mut flipped = 0;
    for i in 0..bytes.len().saturating_sub(needle.len()) {
        if &bytes[i..i + needle.len()] == needle {
            bytes[i + needle.len() - 1] ^= 0x01;
            flipped += 1;
        }
    }
    std::fs::write(file, bytes).unwrap();
    flipped
}

#[test]
fn a_flipped_byte_in_a_record_is_reported_with_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    build_story(dir.path(), 0);
    let file = dir.path().join("ledger.redb");
    // "task-2" is the name inside record 2 (and inside its command's stored outcome).
    assert!(flip_all(&file, b"task-2") >= 1);
    let damaged = std::fs::read(&file).unwrap();
    let out = replay(&["verify", "--data", path(dir.path()), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    assert!(!stderr(&out).contains("internal error"), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["clean"], false);
    let problems = report["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p["seq"] == 2 && p["kind"] == "chain_link"), "{problems:#?}");
    // The log's head is the one it records, and what the stop left unchecked is said.
    assert_eq!((report["head_seq"].as_u64(), report["records_checked"].as_u64()), (Some(23), Some(1)), "{report}");
    assert_eq!(report["records_unchecked"], 22, "{report}");
    let text = stdout(&replay(&["verify", "--data", path(dir.path())]));
    assert!(text.contains("first at seq 2"), "{text}");
    assert!(
        text.contains("1 records checked, then stopped at the first problem: 22 after it not checked (head seq 23"),
        "{text}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), damaged, "verify never writes to the log it checks");
}

#[test]
fn damage_anywhere_never_panics_and_never_passes_silently() {
    let dir = tempfile::tempdir().unwrap();
    build_story(dir.path(), 0);
    let original = std::fs::read(dir.path().join("ledger.redb")).unwrap();
    let clean_events = stdout(&replay(&["events", "--data", path(dir.path()), "--json"]));
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for trial in 0..24 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = (state % original.len() as u64) as usize;
        let damaged = tempfile::tempdir().unwrap();
        let mut bytes = original.clone();
        bytes[offset] ^= 0x5a;
        std::fs::write(damaged.path().join("ledger.redb"), &bytes).unwrap();
        let out = replay(&["verify", "--data", path(damaged.path())]);
        let code = out.status.code();
        assert!(matches!(code, Some(0) | Some(1)), "trial {trial} at {offset}: exit {code:?}\n{}", stderr(&out));
        assert!(!stderr(&out).contains("internal error"), "trial {trial} at {offset}: {}", stderr(&out));
        if code == Some(0) {
            // Passed: then the records must read back exactly as before (the flip hit free space).
            let events = stdout(&replay(&["events", "--data", path(damaged.path()), "--json"]));
            assert_eq!(events, clean_events, "trial {trial}: a flip at {offset} changed records but verified clean");
        }
    }
}

/// Replaces the snapshot at `seq` with one holding `body`, with a valid header
/// (this log's chain hash at `seq`, a correct body checksum).
fn rewrite_snapshot(dir: &std::path::Path, seq: u64, body: &[u8]) {
    let reader = eventlog::LogReader::open_read_only(dir.join("ledger.redb")).unwrap();
    let hash = reader.record_hash(seq).unwrap().unwrap();
    drop(reader);
    let store = eventlog::SnapshotStore::new(dir.join("snapshots"), usize::MAX);
    store.write(eventlog::Head { seq, hash }, body).unwrap();
}

#[test]
fn a_snapshot_that_disagrees_with_the_fold_or_is_damaged_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    build_story(dir.path(), 10);
    // An intact snapshot file at seq 10 that saved the state as of seq 9.
    let stale = crate::common::fold_by_hand(dir.path(), 9);
    rewrite_snapshot(dir.path(), 10, &eventlog::fold::snapshot_body(&stale));
    let out = replay(&["verify", "--data", path(dir.path()), "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!((problems[0]["seq"].as_u64(), problems[0]["kind"].as_str()), (Some(10), Some("snapshot")));
    assert_eq!(report["events_applied"], 23, "the fold goes on past a bad snapshot");

    // The right state under a wrong saved digest is caught too.
    let mut body = eventlog::fold::snapshot_body(&crate::common::fold_by_hand(dir.path(), 10));
    body[0] ^= 1;
    rewrite_snapshot(dir.path(), 10, &body);
    let out = replay(&["verify", "--data", path(dir.path()), "--json"]);
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(report["problems"][0]["message"].as_str().unwrap().contains("digest"), "{report:#}");

    // A snapshot whose body fails its checksum is skipped by every loader, and reported as damage.
    rewrite_snapshot(dir.path(), 10, &eventlog::fold::snapshot_body(&crate::common::fold_by_hand(dir.path(), 10)));
    let file = dir.path().join("snapshots").join("snapshot-00000000000000000020.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&file, bytes).unwrap();
    let out = replay(&["verify", "--data", path(dir.path()), "--json", "--skip-storage-check"]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!((problems[0]["seq"].as_u64(), problems[0]["kind"].as_str()), (Some(20), Some("snapshot")));
    assert!(problems[0]["message"].as_str().unwrap().contains("body checksum mismatch"), "{problems:#?}");
    assert_eq!(report["snapshots_checked"], serde_json::json!([10]), "a damaged snapshot is not counted as checked");
    assert_eq!(report["events_applied"], 23, "the fold goes on past it");
    assert_eq!(report["storage"], "skipped (--skip-storage-check)");
    assert!(report["timings"]["storage_s"].is_null());
    assert!(report["timings"]["records_per_s"].as_f64().unwrap() > 0.0);
}

/// A snapshot written by a build with another snapshot format (an upgrade changed the state's
/// encoding) is skipped by every loader: `verify` says so and stays clean, since neither the
/// disk nor the log is damaged.
#[test]
fn a_snapshot_in_another_format_version_is_skipped_not_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    build_story(dir.path(), 10);
    let file = dir.path().join("snapshots").join("snapshot-00000000000000000020.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    // Header: magic (8) ‖ format version u32 ‖ … ‖ BLAKE3 of the first 92 bytes at 92..124.
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let header_hash = *blake3::hash(&bytes[..92]).as_bytes();
    bytes[92..124].copy_from_slice(&header_hash);
    std::fs::write(&file, bytes).unwrap();
    let out = replay(&["verify", "--data", path(dir.path()), "--json", "--skip-storage-check"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["clean"], true, "{report:#}");
    assert_eq!(report["snapshots_checked"], serde_json::json!([10]));
    assert_eq!(report["snapshots_skipped"][0]["seq"], 20, "{report:#}");
    assert!(report["snapshots_skipped"][0]["reason"].as_str().unwrap().contains("format version 1"), "{report:#}");
    let text = replay_ok(&["verify", "--data", path(dir.path()), "--skip-storage-check"]);
    assert!(text.contains("snapshot  seq 20 skipped") && text.contains("result: clean"), "{text}");
}

/// Moves every record of task 1 to the stream of a task that does not exist and hashes the chain
/// again (records, then the head): a log that holds together link by link and version by
/// version, whose records are filed under a stream their events do not belong to.
fn file_task_one_under_another_stream(dir: &std::path::Path) -> u64 {
    use eventlog::record::{chain_hash, decode_stored_body, stored_body};
    use redb::ReadableTable;
    const EVENTS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("events");
    const HEAD: redb::TableDefinition<u8, &[u8]> = redb::TableDefinition::new("head");
    let own = domain::StreamId::Task(domain::testkit::task_id(1)).to_key();
    let other = domain::StreamId::Task(domain::testkit::task_id(99)).to_key();
    let db = redb::Database::create(dir.join("ledger.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    let mut first_moved = None;
    {
        let mut table = txn.open_table(EVENTS).unwrap();
        let last = table.last().unwrap().unwrap().0.value();
        let mut prev = eventlog::GENESIS_HASH;
        for seq in 1..=last {
            let value = table.get(seq).unwrap().unwrap().value().to_vec();
            let (hash, body) = value.split_at(32);
            let mut record = decode_stored_body(seq, hash.try_into().unwrap(), body).unwrap();
            if record.stream == own {
                record.stream = other.clone();
                first_moved.get_or_insert(seq);
            }
            let body = stored_body(&record);
            prev = chain_hash(&prev, seq, &body);
            table.insert(seq, [prev.as_slice(), &body].concat().as_slice()).unwrap();
        }
        let head = [last.to_le_bytes().as_slice(), prev.as_slice()].concat();
        txn.open_table(HEAD).unwrap().insert(0, head.as_slice()).unwrap();
    }
    txn.commit().unwrap();
    first_moved.expect("task 1 has records")
}

/// A record filed under a stream its event does not belong to is named: the fold goes by the
/// event, the stream index and versions by the record, so such a log verified clean while the
/// history of a task read through the index showed another's events.
#[test]
fn a_record_filed_under_another_stream_is_named() {
    let dir = tempfile::tempdir().unwrap();
    build_story(dir.path(), 0);
    let seq = file_task_one_under_another_stream(dir.path());
    let out = replay(&["verify", "--data", path(dir.path()), "--json", "--skip-storage-check"]);
    assert_eq!(out.status.code(), Some(1), "{}{}", stdout(&out), stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let problem = &report["problems"][0];
    assert_eq!(problem["seq"], seq, "{report}");
    assert!(problem["message"].as_str().unwrap().contains("belongs to task:"), "{report}");
}
