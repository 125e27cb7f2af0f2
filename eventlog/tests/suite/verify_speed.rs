//! Prints how fast `verify` runs over ~150-byte payloads (no assertion on time).
//! `VERIFY_SPEED_RECORDS=2000000 cargo test -p eventlog --release --test suite verify_speed -- --nocapture`

use std::time::Instant;

use eventlog::{LogStore, NewRecord, RedbOptions, RedbStore, verify};

#[test]
fn verify_speed() {
    let records: u64 = std::env::var("VERIFY_SPEED_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    let started = Instant::now();
    let mut i = 0u64;
    while i < records {
        let end = (i + 5_000).min(records);
        let batch: Vec<NewRecord> = (i..end)
            .map(|i| NewRecord {
                stream: format!("task-{:08}", i / 10).into_bytes(),
                command_id: format!("cmd-{i}"),
                actor: "bench".into(),
                recorded_at_us: 1_700_000_000_000_000 + i as i64,
                event_type: 3,
                schema_version: 1,
                payload: vec![(i % 251) as u8; 150],
            })
            .collect();
        store.append(&batch, &[]).unwrap();
        i = end;
    }
    let append_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let report = verify(&store.reader(), |_, _| {}).unwrap();
    let verify_s = started.elapsed().as_secs_f64();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.records, records);
    println!(
        "append: {records} records in {append_s:.2} s ({:.0}/s, batches of 5000); verify: {verify_s:.3} s ({:.0} records/s)",
        records as f64 / append_s,
        records as f64 / verify_s
    );
}
