//! Review probe: the stream-version lookup transaction (`RedbStore::lookup`) is reset only by
//! `append`, not by `settle`, which commits the held batches into redb. A lookup begun before
//! that settle answers afterwards from a snapshot without them, and the stream-head cache
//! (which forgot the held streams, and whose `complete_above` does not cover them) stores
//! the stale answer.

use std::fs::OpenOptions;
use std::sync::Arc;
use std::time::Duration;

use domain::testkit::job;
use domain::{Command, RejectionCode};
use eventlog::{
    Envelope, FaultyBackend, LogStore, NewRecord, RedbOptions, RedbStore, SystemClock, WriteError, Writer,
    WriterConfig, verify,
};

fn key(n: u32) -> Vec<u8> {
    [b"T".as_slice(), &n.to_be_bytes()].concat()
}

fn record(stream: &[u8], at_us: i64) -> NewRecord {
    NewRecord {
        stream: stream.to_vec(),
        command_id: format!("cmd-{at_us}"),
        actor: "test".into(),
        recorded_at_us: at_us,
        event_type: 1,
        schema_version: 1,
        payload: vec![1],
    }
}

/// Store level: deterministic.
#[test]
fn probe_store_stale_lookup_after_settle() {
    let dir = tempfile::tempdir().unwrap();
    let options = RedbOptions {
        journal_bytes: eventlog::journal::JOURNAL_BYTES_MIN,
        stream_cache_entries: 2,
        stream_index_lag_records: 1,
        ..RedbOptions::default()
    };
    let mut store = RedbStore::open(dir.path(), options).unwrap();
    store.checkpoint_beside_appends();
    let mut at = 1_000i64;
    let mut n = 1_000u32;
    // Until a batch is held (a checkpoint runs beside the appends).
    loop {
        at += 1;
        n += 1;
        if !store.append(&[record(&key(n), at), record(b"Qq", at)], &[]).unwrap().readable {
            break;
        }
    }
    // X: a low key, written in a held batch.
    let x = key(5);
    at += 1;
    assert!(!store.append(&[record(&x, at)], &[]).unwrap().readable);
    // More held streams: the full cache forgets X (the lowest key).
    for m in [2_000u32, 2_001, 2_002] {
        at += 1;
        assert!(!store.append(&[record(&key(m), at)], &[]).unwrap().readable);
    }
    // A miss below the mark: the lookup transaction begins (a create of an old id, refused).
    assert_eq!(store.stream_version_cached(&key(1_001)).unwrap(), 1);
    // The writer settles between batches: the held batches go into redb (and the index).
    store.settle(true).unwrap();
    assert_eq!(store.stream_version(&x).unwrap(), 1, "fresh read");
    // The next batch's create of X: must be 1 (X was used).
    let cached = store.stream_version_cached(&x).unwrap();
    assert_eq!(cached, 1, "stale lookup transaction answered X as never used");
}

fn envelope(id: &str, command: Command) -> Envelope {
    Envelope { command_id: id.to_owned(), actor: "tester".to_owned(), command }
}

/// Writer level: a task id created and cancelled in held batches is accepted again after a
/// batch of refused creates and the settle.
#[test]
fn probe_writer_reused_task_id_after_settle() {
    let dir = tempfile::tempdir().unwrap();
    let file =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.path().join("ledger.redb")).unwrap();
    let (backend, faults) = FaultyBackend::new(file).unwrap();
    let options = RedbOptions {
        journal_bytes: eventlog::journal::JOURNAL_BYTES_MIN,
        journal_faults: Some(faults.clone()),
        stream_cache_entries: 2,
        stream_index_lag_records: 1,
        ..RedbOptions::default()
    };
    let store = RedbStore::open_with_backend(dir.path(), backend, options).unwrap();
    let config = WriterConfig { snapshot_every_events: 0, ..WriterConfig::default() };
    let (writer, _) = Writer::start(store, config, Arc::new(SystemClock)).unwrap();
    let handle = writer.handle();
    struct ReleaseSyncs(eventlog::FaultHandle);
    impl Drop for ReleaseSyncs {
        fn drop(&mut self) {
            self.0.release_syncs();
        }
    }
    faults.hold_syncs();
    let release = ReleaseSyncs(faults.clone());
    let held = || handle.stats().held_batches.load(std::sync::atomic::Ordering::Relaxed);
    // Task 1000: created and cancelled (finished, out of the ledger; its id stays used).
    handle.execute(envelope("c1000", Command::CreateTask(job(1_000, "q")))).unwrap();
    handle.execute(envelope("k1000", Command::CancelTask { task: job(1_000, "q").id, reason: None })).unwrap();
    let mut i = 1_001u64;
    while held() == 0 {
        handle.execute(envelope(&format!("c{i}"), Command::CreateTask(job(i, "q")))).unwrap();
        i += 1;
        assert!(i < 1_200, "never held");
    }
    // X created and cancelled while held: it leaves the ledger, its stream is in held batches.
    handle.execute(envelope("x1", Command::CreateTask(job(5, "q")))).unwrap();
    handle
        .execute(envelope("x2", Command::CancelTask { task: job(5, "q").id, reason: None }))
        .unwrap();
    for m in 2_000..2_003u64 {
        handle.execute(envelope(&format!("d{m}"), Command::CreateTask(job(m, "q")))).unwrap();
    }
    // A batch of one refused create (an id used before, below the mark): the lookup begins,
    // nothing is appended.
    let refused = handle.execute(envelope("old", Command::CreateTask(job(1_000, "q"))));
    assert!(matches!(refused, Err(WriteError::Rejected(ref r)) if r.code == RejectionCode::TaskExists), "{refused:?}");
    // The checkpoint finishes; the writer settles the held batches.
    drop(release);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while *handle.head_watch().borrow() < handle.acknowledged_head() {
        assert!(std::time::Instant::now() < deadline, "never readable");
        std::thread::sleep(Duration::from_millis(5));
    }
    // X again: its id was used.
    let again = handle.execute(envelope("x3", Command::CreateTask(job(5, "q"))));
    let report = verify(handle.reader(), |_, _| {}).unwrap();
    assert!(
        matches!(again, Err(WriteError::Rejected(ref r)) if r.code == RejectionCode::TaskExists),
        "a reused task id was accepted: {again:?}; verify: {report:?}"
    );
    drop(handle);
    writer.shutdown();
}
