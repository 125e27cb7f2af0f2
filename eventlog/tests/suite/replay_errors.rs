//! A fold stops at the first record it cannot use and names it, however far into the log it is
//! and however many batches the reading thread has read ahead: a payload that does not decode
//! and an event the ledger refuses are each reported with their own seq.

use std::path::Path;

use domain::testkit::job;
use domain::{Command, Ledger, Timestamp};
use eventlog::fold::{FoldError, replay};
use eventlog::snapshot::SnapshotStore;
use eventlog::{LogStore, NewRecord, RedbOptions, RedbStore, encode_event, fold_to};

use crate::support::rewrite_record;

/// More records than the reading thread reads ahead (six batches of 8,192 at most).
const TASKS: u64 = 60_000;

/// A log of `TASKS` task creations where record `damaged` is replaced by `replace(record)`.
fn write_log(dir: &Path, damaged: u64, replace: impl Fn(NewRecord) -> NewRecord) {
    let mut ledger = Ledger::new();
    let now = Timestamp::from_micros(1_700_000_000_000_000);
    let mut store = RedbStore::open(dir, RedbOptions::default()).unwrap();
    let mut seq = 0;
    for chunk in 0..TASKS / 1_000 {
        let mut records = Vec::new();
        for n in chunk * 1_000..(chunk + 1) * 1_000 {
            for event in ledger.decide(&Command::CreateTask(job(n, "fold")), now).unwrap() {
                ledger.apply(&event).unwrap();
                seq += 1;
                let record = encode_event(&event, &format!("c-{n}"), "tester", now.as_micros());
                records.push(if seq == damaged { replace(record) } else { record });
            }
        }
        store.append(&records, &[(format!("chunk-{chunk}"), b"ok".to_vec())]).unwrap();
    }
}

fn fold(dir: &Path) -> Result<u64, FoldError> {
    let store = RedbStore::open(dir, RedbOptions::default()).unwrap();
    let reader = store.reader();
    let head = reader.head().unwrap().seq;
    let snapshots = SnapshotStore::new(dir.join("snapshots"), 1);
    fold_to(&reader, &snapshots, head).map(|(ledger, stats)| {
        assert_eq!(stats.replayed, head);
        ledger.live_task_count() as u64
    })
}

#[test]
fn a_clean_log_folds_to_every_task() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 0, |record| record);
    assert_eq!(fold(dir.path()).unwrap(), TASKS);
}

#[test]
fn a_payload_that_does_not_decode_is_named_by_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = 10_001;
    write_log(dir.path(), damaged, |record| NewRecord { payload: vec![0xff; 7], ..record });
    match fold(dir.path()) {
        Err(FoldError::Decode { seq, .. }) => assert_eq!(seq, damaged),
        other => panic!("expected a decode error at {damaged}, got {other:?}"),
    }
}

#[test]
fn an_event_the_ledger_refuses_is_named_by_its_seq() {
    // Record 20,001 creates task 0 again instead of its own task.
    let dir = tempfile::tempdir().unwrap();
    let damaged = 20_001;
    let first = Ledger::new();
    let now = Timestamp::from_micros(1_700_000_000_000_000);
    let again = first.decide(&Command::CreateTask(job(0, "fold")), now).unwrap();
    let again = encode_event(&again[0], "c-again", "tester", now.as_micros());
    write_log(dir.path(), damaged, |record| NewRecord {
        stream: again.stream.clone(),
        payload: again.payload.clone(),
        ..record
    });
    match fold(dir.path()) {
        Err(FoldError::Inconsistent { seq, .. }) => assert_eq!(seq, damaged),
        other => panic!("expected the ledger to refuse record {damaged}, got {other:?}"),
    }
}

#[test]
fn a_replay_from_seq_zero_applies_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 0, |record| record);
    let store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    let mut ledger = Ledger::new();
    let replayed = replay(&mut ledger, &store.reader(), 0, u64::MAX).unwrap();
    assert_eq!(replayed, TASKS);
    assert_eq!(ledger.live_task_count() as u64, TASKS);
}

#[test]
fn an_undecodable_payload_comes_before_a_broken_link_read_after_it() {
    // Both in one read batch: the reading thread fails at the link, but the payload before it
    // is the first error.
    let dir = tempfile::tempdir().unwrap();
    let (undecodable, broken) = (30_100, 30_200);
    write_log(dir.path(), undecodable, |record| NewRecord { payload: vec![0xff; 7], ..record });
    rewrite_record(dir.path(), broken, |value| {
        let last = value.len() - 1;
        value[last] ^= 0x01;
    });
    match fold(dir.path()) {
        Err(FoldError::Decode { seq, .. }) => assert_eq!(seq, undecodable),
        other => panic!("expected the decode error at {undecodable} first, got {other:?}"),
    }
}
