//! Subscriptions against a live writer: a subscriber starting at seq 1 while a writer thread
//! appends and publishes sees exactly seqs 1..=N in order, whether it keeps up through the ring,
//! falls behind a tiny ring and reads from disk, or waits asynchronously.

use std::thread;
use std::time::{Duration, Instant};

use eventlog::{LiveFeed, LogReader, LogStore, NewRecord, RedbOptions, RedbStore, Subscription};

const RECORDS: u64 = 4_000;
const DEADLINE: Duration = Duration::from_secs(120);

fn record(i: u64) -> NewRecord {
    NewRecord {
        stream: format!("stream-{}", i % 7).into_bytes(),
        command_id: format!("cmd-{i}"),
        actor: "feed-test".into(),
        recorded_at_us: 1_000_000 + i as i64,
        event_type: 1,
        schema_version: 1,
        payload: i.to_le_bytes().to_vec(),
    }
}

/// Drains `subscription` until it has `RECORDS` records, checking order as it goes.
fn drain(mut subscription: Subscription, max: usize, slow: bool) -> Vec<u64> {
    let started = Instant::now();
    let mut seqs = Vec::new();
    while (seqs.len() as u64) < RECORDS {
        assert!(started.elapsed() < DEADLINE, "subscriber stuck at {}", subscription.next_seq());
        let batch = subscription.next_batch(max, Duration::from_millis(200)).unwrap();
        for record in batch {
            assert_eq!(record.seq, seqs.len() as u64 + 1);
            assert_eq!(record.payload, (record.seq - 1).to_le_bytes());
            seqs.push(record.seq);
        }
        if slow {
            thread::sleep(Duration::from_micros(300));
        }
    }
    seqs
}

#[test]
fn subscribers_see_every_record_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    let reader: LogReader = store.reader();
    let roomy = LiveFeed::new(1_024);
    let tiny = LiveFeed::new(4);

    let fast = {
        let subscription = Subscription::new(reader.clone(), roomy.clone(), 1);
        thread::spawn(move || drain(subscription, 64, false))
    };
    let slow = {
        let subscription = Subscription::new(reader.clone(), tiny.clone(), 0);
        thread::spawn(move || drain(subscription, 3, true))
    };
    let asynchronous = {
        let subscription = Subscription::new(reader.clone(), roomy.clone(), 1);
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async move {
                let mut subscription = subscription;
                let mut seqs = Vec::new();
                while (seqs.len() as u64) < RECORDS {
                    for record in subscription.next_batch_async(50).await.unwrap() {
                        assert_eq!(record.seq, seqs.len() as u64 + 1);
                        seqs.push(record.seq);
                    }
                }
                seqs
            })
        })
    };

    let mut next = 0u64;
    let mut batch_len = 1u64;
    while next < RECORDS {
        let end = (next + batch_len).min(RECORDS);
        let records: Vec<NewRecord> = (next..end).map(record).collect();
        let appended = store.append(&records, &[]).unwrap();
        roomy.publish(&appended.records);
        tiny.publish(&appended.records);
        next = end;
        batch_len = batch_len % 23 + 1;
    }

    let expected: Vec<u64> = (1..=RECORDS).collect();
    assert_eq!(fast.join().unwrap(), expected);
    assert_eq!(slow.join().unwrap(), expected);
    assert_eq!(asynchronous.join().unwrap(), expected);

    // A late subscriber starting mid-log catches up from disk and stops at the head.
    let mut late = Subscription::new(reader, tiny, RECORDS - 10);
    let mut seqs = Vec::new();
    loop {
        let batch = late.try_next_batch(100).unwrap();
        if batch.is_empty() {
            break;
        }
        seqs.extend(batch.iter().map(|r| r.seq));
    }
    assert_eq!(seqs, ((RECORDS - 10)..=RECORDS).collect::<Vec<_>>());
}

/// How many records wait for a subscription: any when it is behind the ring (or nothing was
/// published yet, so how many is not known), those the ring holds from its next seq on, none
/// once caught up; and `wait_published` returns once the next seq is published.
#[test]
fn a_subscription_knows_its_backlog_and_waits_for_the_next_publish() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    let feed = LiveFeed::new(8);
    let appended = store.append(&(0..20).map(record).collect::<Vec<_>>(), &[]).unwrap();
    let mut subscription = Subscription::new(store.reader(), feed.clone(), 1);
    assert!(subscription.has_backlog_of(1_000_000), "nothing published yet: the whole log may wait on disk");
    // The ring keeps 13..=20.
    feed.publish(&appended.records);
    assert!(subscription.has_backlog_of(1_000_000), "1..=12 are older than the ring");
    let seqs = |batch: Vec<eventlog::StoredRecord>| batch.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(subscription.try_next_batch(100).unwrap()), (1..=12).collect::<Vec<_>>());
    assert!(subscription.has_backlog_of(8) && !subscription.has_backlog_of(9), "13..=20 in the ring");
    assert_eq!(seqs(subscription.try_next_batch(5).unwrap()), (13..=17).collect::<Vec<_>>());
    assert!(subscription.has_backlog_of(3) && !subscription.has_backlog_of(4));
    assert_eq!(seqs(subscription.try_next_batch(100).unwrap()), (18..=20).collect::<Vec<_>>());
    assert!(!subscription.has_backlog_of(1), "caught up");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let more = store.append(&[record(20)], &[]).unwrap();
    runtime.block_on(async {
        let publish = async {
            tokio::task::yield_now().await;
            feed.publish(&more.records);
        };
        tokio::join!(subscription.wait_published(), publish);
    });
    assert!(subscription.has_backlog_of(1) && !subscription.has_backlog_of(2));
    assert_eq!(seqs(subscription.try_next_batch(100).unwrap()), vec![21]);
}

/// A feed made after a known head (the writer's, at open): before anything is published, a
/// subscription at the head has no backlog, one behind it has what it has not read up to the
/// head, and the first publish continues the log.
#[test]
fn a_feed_made_after_the_head_knows_the_backlog_before_its_first_publish() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    store.append(&(0..20).map(record).collect::<Vec<_>>(), &[]).unwrap();
    let feed = LiveFeed::after(8, 20);
    let at_head = Subscription::new(store.reader(), feed.clone(), 21);
    assert!(!at_head.has_backlog_of(1), "caught up at the head: nothing waits");
    let mut behind = Subscription::new(store.reader(), feed.clone(), 15);
    assert!(behind.has_backlog_of(6) && !behind.has_backlog_of(7), "15..=20 wait on disk");
    let seqs = |batch: Vec<eventlog::StoredRecord>| batch.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(behind.try_next_batch(100).unwrap()), (15..=20).collect::<Vec<_>>());
    let more = store.append(&[record(20), record(21)], &[]).unwrap();
    feed.publish(&more.records);
    assert!(at_head.has_backlog_of(2) && !at_head.has_backlog_of(3), "the publish continued the ring");
    assert_eq!(seqs(behind.try_next_batch(100).unwrap()), vec![21, 22]);
}

/// Shared handles (`Arc<StoredRecord>`, what the projectors take) are the ring's own records,
/// not copies, and from the ring or from disk they hold what owned records hold.
#[test]
fn shared_handles_are_the_rings_records_and_equal_owned_ones() {
    use eventlog::StoredRecord;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    let feed = LiveFeed::new(8);
    let records: Vec<NewRecord> = (0..20).map(record).collect();
    let appended = store.append(&records, &[]).unwrap();
    // Only the last 8 stay in the ring: the first 12 come from disk.
    feed.publish(&appended.records);

    let mut owned: Vec<StoredRecord> = Vec::new();
    let mut shared: Vec<Arc<StoredRecord>> = Vec::new();
    let mut again: Vec<Arc<StoredRecord>> = Vec::new();
    let mut by_owned = Subscription::new(store.reader(), feed.clone(), 1);
    let mut by_shared = Subscription::new(store.reader(), feed.clone(), 1);
    let mut by_shared_too = Subscription::new(store.reader(), feed.clone(), 13);
    by_owned.try_next_batch_into(100, &mut owned).unwrap();
    by_shared.try_next_batch_into(100, &mut shared).unwrap();
    assert_eq!(owned.len(), 12, "up to the ring, from disk");
    assert!(owned.iter().zip(&shared).all(|(a, b)| a == &**b));
    assert_eq!(owned, appended.records[..12]);

    by_owned.try_next_batch_into(100, &mut owned).unwrap();
    by_shared.try_next_batch_into(100, &mut shared).unwrap();
    by_shared_too.try_next_batch_into(100, &mut again).unwrap();
    assert_eq!(owned, appended.records[12..], "the ring's records");
    assert!(owned.iter().zip(&shared).all(|(a, b)| a == &**b));
    assert_eq!(shared.len(), 8);
    assert!(shared.iter().zip(&again).all(|(a, b)| Arc::ptr_eq(a, b)), "two subscribers share one record");
}
