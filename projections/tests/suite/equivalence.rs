//! Equivalence over random histories (proptest): the projections applied
//! incrementally, in random batch sizes, with crashes and restarts in between
//! (in-memory mirrors lost, the database reopened), equal the projections
//! rebuilt from scratch in one pass; and an as-of materialization at seq N
//! equals the incremental projection stopped at N. PostgreSQL joins the
//! comparison in `postgres.rs`.

use crate::support::{TestLog, op_strategy, random_history};
use projections::asof::{self, AsOf};
use projections::{Driver, ProjectorKind, Slot, Store, digest};
use proptest::prelude::*;

/// Applies the log to `store` in chunks of `cuts` (cycled), "crashing" after
/// each chunk: every driver is dropped and the store reopened from its file.
/// Returns the dump taken when exactly `stop_at` was applied.
async fn incremental_with_crashes(
    log: &TestLog,
    path: &std::path::Path,
    cuts: &[u64],
    stop_at: u64,
    store_mirror_every: u64,
) -> (Store, digest::Dump) {
    let head = log.head();
    let mut store = Store::open_sqlite(path).await.unwrap();
    let mut applied = 0u64;
    let mut at_stop = None;
    let mut cut = cuts.iter().cycle();
    loop {
        if applied == stop_at {
            at_stop = Some(digest::dump(&store).await.unwrap());
        }
        if applied >= head {
            break;
        }
        let mut target = (applied + cut.next().unwrap()).min(head);
        if applied < stop_at && target > stop_at {
            target = stop_at;
        }
        for kind in ProjectorKind::ALL {
            let mut driver = Driver::load(&store, kind, Slot::Live, &log.reader()).await.unwrap();
            assert_eq!(driver.checkpoint().last_seq, applied, "{kind:?} resumes from its checkpoint");
            // Mirror tables stored with some batches and trailing others, so restarts fold the
            // events between the stored mirror and the checkpoint back in.
            driver.store_mirror_every(store_mirror_every);
            let batch = 1 + (target as usize % 7);
            driver.catch_up(&store, &log.reader(), target, batch).await.unwrap();
        }
        applied = target;
        // Crash: forget everything in memory, reopen the file.
        store.close().await;
        store = Store::open_sqlite(path).await.unwrap();
    }
    (store, at_stop.expect("stop point reached"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn incremental_with_crashes_equals_rebuild_and_as_of(
        ops in proptest::collection::vec(op_strategy(), 1..90),
        cuts in proptest::collection::vec(1u64..30, 1..5),
        stop_fraction in 0.0f64..=1.0,
        store_mirror_every in 1u64..40,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut log = TestLog::new();
            log.append_all(&random_history(&ops).history);
            let head = log.head();
            let stop_at = (head as f64 * stop_fraction) as u64;

            let (incremental, at_stop) =
                incremental_with_crashes(&log, &log.path().join("incremental.sqlite"), &cuts, stop_at, store_mirror_every)
                    .await;
            let incremental = digest::dump(&incremental).await.unwrap();

            let rebuilt = Store::open_sqlite(log.path().join("rebuilt.sqlite")).await.unwrap();
            asof::build(&rebuilt, &log.reader(), head, &ProjectorKind::ALL).await.unwrap();
            let rebuilt = digest::dump(&rebuilt).await.unwrap();
            prop_assert_eq!(&incremental, &rebuilt);
            prop_assert_eq!(incremental.audit_log.len() as u64, head);

            let past = asof::materialize(&log.reader(), AsOf::Seq(stop_at), log.path().join("asof.sqlite")).await.unwrap();
            prop_assert_eq!(past.seq, stop_at);
            prop_assert_eq!(digest::dump(&past.store).await.unwrap(), at_stop);

            // As-of by time names the last record at or before that time.
            if stop_at > 0 {
                let record = log.reader().read_range(stop_at, stop_at, 1).unwrap().remove(0);
                let seq = asof::resolve(&log.reader(), AsOf::TimeUs(record.recorded_at_us)).unwrap();
                prop_assert!(seq >= stop_at);
                let after = log.reader().read_range(seq + 1, seq + 1, 1).unwrap();
                prop_assert!(after.iter().all(|r| r.recorded_at_us > record.recorded_at_us));
            }
            Ok(())
        })?;
    }
}

/// A bulk build on a multi-threaded runtime folds batches of at least 1,024
/// events under `block_in_place` (`runtime::Fold::OffWorker`), while the
/// projector holding SQLite's write gate runs its statements from another
/// worker; it must give exactly the rows of applying the log in small batches.
#[test]
fn a_bulk_build_folded_off_the_runtime_workers_equals_small_batches() {
    use proptest::strategy::{Strategy, ValueTree};
    let ops = proptest::collection::vec(op_strategy(), 4000)
        .new_tree(&mut proptest::test_runner::TestRunner::deterministic())
        .unwrap()
        .current();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let mut log = TestLog::new();
        log.append_all(&random_history(&ops).history);
        let head = log.head();
        assert!(head >= 1024, "{head} events: too few for a batch folded off the workers");

        let small = Store::open_sqlite(log.path().join("small.sqlite")).await.unwrap();
        for kind in ProjectorKind::ALL {
            let mut driver = Driver::load(&small, kind, Slot::Live, &log.reader()).await.unwrap();
            driver.catch_up(&small, &log.reader(), head, 50).await.unwrap();
        }
        let bulk = Store::open_sqlite(log.path().join("bulk.sqlite")).await.unwrap();
        asof::build(&bulk, &log.reader(), head, &ProjectorKind::ALL).await.unwrap();

        let (small, bulk) = (digest::dump(&small).await.unwrap(), digest::dump(&bulk).await.unwrap());
        assert_eq!(bulk.audit_log.len() as u64, head);
        assert_eq!(small, bulk);
    });
}
