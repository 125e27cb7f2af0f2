//! Single-byte corruption of a log file must be detected or be harmless, never accepted and
//! never a panic. Each trial flips one byte of a copy of a finished log, then opens it and
//! verifies it; if both pass, every record is read back and compared with the original: a flip
//! that changed a live record without being reported fails the test. Flips in free space are
//! harmless and may go unnoticed.

use std::panic::{AssertUnwindSafe, catch_unwind};

use eventlog::{LogStore, NewRecord, RedbStore};

use crate::support::{checked_options as options, next, read_all};

const TRIALS: u64 = 400;
const RECORDS: u64 = 1_500;

/// What one trial found.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Detected(String),
    Harmless,
    Accepted,
}

#[test]
fn single_byte_flips_are_detected_or_harmless() {
    let original_dir = tempfile::tempdir().unwrap();
    {
        let mut store = RedbStore::open(original_dir.path(), options()).unwrap();
        for chunk in 0..RECORDS / 100 {
            let records: Vec<NewRecord> = (chunk * 100..(chunk + 1) * 100)
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
            store.append(&records, &outcomes).unwrap();
        }
    }
    let original_records = read_all(original_dir.path()).unwrap();
    assert_eq!(original_records.len() as u64, RECORDS);
    let file = std::fs::read(original_dir.path().join("ledger.redb")).unwrap();

    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut detected = 0;
    let mut harmless = 0;
    let mut failures = Vec::new();
    for trial in 0..TRIALS {
        let offset = (next(&mut state) % file.len() as u64) as usize;
        let mask = (next(&mut state) % 255 + 1) as u8;
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = file.clone();
        bytes[offset] ^= mask;
        std::fs::write(dir.path().join("ledger.redb"), &bytes).unwrap();
        let outcome = catch_unwind(AssertUnwindSafe(|| match read_all(dir.path()) {
            Err(message) => Outcome::Detected(message),
            Ok(records) if records == original_records => Outcome::Harmless,
            Ok(_) => Outcome::Accepted,
        }));
        match outcome {
            Ok(Outcome::Detected(_)) => detected += 1,
            Ok(Outcome::Harmless) => harmless += 1,
            Ok(Outcome::Accepted) => failures.push(format!("trial {trial}: flip {mask:#x} at {offset} accepted")),
            Err(_) => failures.push(format!("trial {trial}: flip {mask:#x} at {offset} panicked")),
        }
    }
    println!("{detected} detected, {harmless} harmless, {} failed", failures.len());
    assert!(failures.is_empty(), "{failures:#?}");
}
