//! Logs written by older builds, opened by this one: what an older format lacks is filled in
//! before this build appends. (The whole upgrade path, server and projections included, is
//! `tests/tests/suite/compat.rs`, on data dirs older builds wrote.)

use eventlog::{LogStore, RedbOptions, RedbStore};

use crate::support::write_sample_log;

/// A log written before the stream index trailed the log (builds before 2026-12-02) has no
/// index marker and a whole index. Once this build appends to it, reads of its streams must
/// see the new records too (they saw none until the next index flush: found by the upgrade
/// test's oldest fixture).
#[test]
fn an_older_log_without_an_index_marker_reads_its_streams_after_appends() {
    const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    let dir = tempfile::tempdir().unwrap();
    let every_batch = RedbOptions { stream_index_lag_records: 1, journal_bytes: 0, ..RedbOptions::default() };
    write_sample_log(dir.path(), 130, every_batch);
    {
        let db = redb::Database::create(dir.path().join("ledger.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            assert_eq!(meta.remove("streams_indexed_through").unwrap().map(|v| v.value()), Some(130));
        }
        txn.commit().unwrap();
    }
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    let before = store.reader().read_stream(b"task-0", 1, 1000).unwrap();
    assert_eq!(before.len(), 10, "task-0 holds every 13th of 130 records");
    let record = eventlog::NewRecord {
        stream: b"task-0".to_vec(),
        command_id: "after-upgrade".into(),
        actor: "tester".into(),
        recorded_at_us: 1_800_000_000_000_000,
        event_type: 1,
        schema_version: 1,
        payload: vec![7; 10],
    };
    store.append(&[record], &[]).unwrap();
    let after = store.reader().read_stream(b"task-0", 1, 1000).unwrap();
    assert_eq!(after.iter().map(|r| r.stream_version).collect::<Vec<_>>(), (1..=11).collect::<Vec<_>>());
    assert_eq!(after.last().unwrap().command_id, "after-upgrade");
}
