//! Single-byte corruption of a log file must be detected or be harmless, never accepted and
//! never a panic. Each trial flips one byte of a copy of a finished log, then opens it and
//! verifies it; if both pass, every record is read back and compared with the original: a flip
//! that changed a live record without being reported fails the test. Flips in free space are
//! harmless and may go unnoticed.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::support::{checked_options as options, next, read_all, write_sample_log};

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
    write_sample_log(original_dir.path(), RECORDS, options());
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
