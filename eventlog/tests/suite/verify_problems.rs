//! `verify` names the first damaged record exactly: its seq and what is wrong with it, the
//! records and head before it, and `verify_with` hands on only the records before it. The
//! records are rewritten in place through redb (so its page checksums still hold and only the
//! log's own checks can notice), across more than one of the scanning thread's batches.

use std::path::Path;

use crate::support::{rewrite_record, write_sample_log};
use eventlog::verify::{ProblemKind, verify_with};
use eventlog::{LogReader, RedbOptions};

const RECORDS: u64 = 3_000;

/// Verifies the log in `dir`: the report and the seqs `on_record` saw.
fn verify_dir(dir: &Path) -> (eventlog::verify::VerifyReport, Vec<u64>) {
    let reader = LogReader::open_read_only(dir.join("ledger.redb")).unwrap();
    let mut seen = Vec::new();
    let report = verify_with(&reader, |_, _| {}, |record| seen.push(record.seq)).unwrap();
    (report, seen)
}

fn damaged(seq: u64, change: impl FnOnce(&mut Vec<u8>)) -> (eventlog::verify::VerifyReport, Vec<u64>, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    write_sample_log(dir.path(), RECORDS, RedbOptions::default());
    let (clean, all) = verify_dir(dir.path());
    assert!(clean.is_clean(), "{:?}", clean.first_problem);
    assert_eq!(all, (1..=RECORDS).collect::<Vec<_>>());
    rewrite_record(dir.path(), seq, change);
    let (report, seen) = verify_dir(dir.path());
    (report, seen, all)
}

#[test]
fn a_changed_payload_byte_breaks_that_records_link() {
    let seq = 2_222;
    let (report, seen, _) = damaged(seq, |value| {
        let last = value.len() - 1;
        value[last] ^= 0x01;
    });
    let problem = report.first_problem.expect("detected");
    assert_eq!((problem.seq, problem.kind), (seq, ProblemKind::ChainLink), "{}", problem.message);
    assert_eq!(report.records, seq - 1);
    assert_eq!(report.head.seq, seq - 1);
    assert_eq!(seen, (1..seq).collect::<Vec<_>>(), "records after the damaged one were handed on");
}

#[test]
fn a_changed_stored_hash_breaks_that_records_link() {
    // The record's own hash no longer recomputes: that record is the first bad link.
    let seq = 1_025;
    let (report, seen, _) = damaged(seq, |value| value[0] ^= 0x80);
    let problem = report.first_problem.expect("detected");
    assert_eq!((problem.seq, problem.kind), (seq, ProblemKind::ChainLink), "{}", problem.message);
    assert_eq!(seen.len() as u64, seq - 1);
}

#[test]
fn a_value_that_does_not_decode_is_reported_as_undecodable() {
    // Its link is broken too; what is wrong with it first is its shape.
    let seq = 1_024;
    let (report, seen, _) = damaged(seq, |value| value.truncate(20));
    let problem = report.first_problem.expect("detected");
    assert_eq!((problem.seq, problem.kind), (seq, ProblemKind::Decode), "{}", problem.message);
    assert_eq!(seen.len() as u64, seq - 1);

    let (report, _, _) = damaged(1, |value| value[32] = 0xEE);
    let problem = report.first_problem.expect("detected");
    assert_eq!((problem.seq, problem.kind), (1, ProblemKind::Decode), "{}", problem.message);
    assert_eq!(report.records, 0);
}
