//! Subscriptions: catch up from any seq on disk, then follow the writer live, with no gap and
//! no duplicate.
//!
//! The writer publishes each committed batch to a [`LiveFeed`], which keeps the newest records
//! in a bounded ring. A [`Subscription`] tracks only the next seq it owes its consumer and, on
//! each call, serves from the ring if that seq is still there and from disk (through a
//! [`LogReader`]) otherwise: records are published only after they are committed, so disk
//! always holds at least what the ring does, and a slow subscriber that the ring has left
//! behind simply reads from disk again. The writer never waits for a subscriber.
//!
//! Why these primitives: the ring is a `parking_lot::Mutex` held only to push `Arc`s or clone
//! at most one batch of `Arc`s, so the publisher's wait is bounded and short; blocking waiters
//! sleep on a `Condvar` tied to that mutex; async waiters use a `tokio::sync::watch` of the last
//! published seq, whose `send_replace` never blocks and whose versioning cannot lose a wake-up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::error::SubscribeError;
use crate::reader::LogReader;
use crate::record::StoredRecord;

struct Ring {
    records: VecDeque<Arc<StoredRecord>>,
    /// Seq of the last published record; before the first publish, the head the feed was made
    /// after (0 when not known).
    last_seq: u64,
}

struct FeedInner {
    ring: Mutex<Ring>,
    capacity: usize,
    published: Condvar,
    last_seq: watch::Sender<u64>,
}

/// The writer's broadcast of committed records. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct LiveFeed {
    inner: Arc<FeedInner>,
}

impl std::fmt::Debug for LiveFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveFeed").field("capacity", &self.inner.capacity).finish_non_exhaustive()
    }
}

impl LiveFeed {
    /// A feed keeping the newest `capacity` records (at least 1), of a log whose head is not
    /// known to it: until the first publish, every subscription counts as behind.
    pub fn new(capacity: usize) -> Self {
        Self::after(capacity, 0)
    }

    /// A feed keeping the newest `capacity` records (at least 1), whose first publish continues
    /// the log after `head_seq`: the writer's, which knows its head when it opens. Until that
    /// publish, a subscription is behind by what it has not read up to the head (a server
    /// restarted on a log nobody writes to had every subscription caught up at the head counted
    /// as catching up, and its socket served on the idle-class threads: found by a review).
    pub fn after(capacity: usize, head_seq: u64) -> Self {
        let (last_seq, _) = watch::channel(head_seq);
        Self {
            inner: Arc::new(FeedInner {
                ring: Mutex::new(Ring {
                    records: VecDeque::with_capacity(capacity.clamp(1, 1 << 16)),
                    last_seq: head_seq,
                }),
                capacity: capacity.max(1),
                published: Condvar::new(),
                last_seq,
            }),
        }
    }

    /// Publishes committed records (in seq order, continuing the previous publish) and wakes
    /// every waiting subscriber. Never waits for a subscriber.
    pub fn publish(&self, records: &[StoredRecord]) {
        self.publish_owned(records.to_vec());
    }

    /// Like [`LiveFeed::publish`], taking the records (the writer's path: no copy of each
    /// record, and the `Arc`s are made before the ring's lock is taken).
    pub fn publish_owned(&self, mut records: Vec<StoredRecord>) {
        let (Some(first), Some(last)) = (records.first().map(|r| r.seq), records.last().map(|r| r.seq)) else {
            return;
        };
        let skip = records.len().saturating_sub(self.inner.capacity);
        let shared: Vec<Arc<StoredRecord>> = records.drain(skip..).map(Arc::new).collect();
        {
            let mut ring = self.inner.ring.lock();
            // A publish that does not continue the ring (the writer restarted its feed at a new
            // head) starts the ring over; subscribers then fill the gap from disk.
            if ring.last_seq != 0 && first != ring.last_seq + 1 {
                ring.records.clear();
            }
            let kept = ring.records.len();
            let overflow = (kept + shared.len()).saturating_sub(self.inner.capacity);
            ring.records.drain(..overflow.min(kept));
            ring.records.extend(shared);
            ring.last_seq = last;
        }
        self.inner.published.notify_all();
        self.inner.last_seq.send_replace(last);
    }

    /// Seq of the last published record (before the first publish, the head it was made after).
    pub fn last_seq(&self) -> u64 {
        self.inner.ring.lock().last_seq
    }
}

/// What a subscription fills a batch with: records of the consumer's own (`StoredRecord`: each
/// one read from the ring is copied), or handles it shares with the ring (`Arc<StoredRecord>`:
/// no copy; what the projectors, each of which reads every record, and the snapshot replica take).
pub trait FeedRecord {
    fn from_ring(record: Arc<StoredRecord>) -> Self;
    fn from_disk(record: StoredRecord) -> Self;
    fn record(&self) -> &StoredRecord;
}

impl FeedRecord for StoredRecord {
    fn from_ring(record: Arc<StoredRecord>) -> Self {
        Arc::unwrap_or_clone(record)
    }

    fn from_disk(record: StoredRecord) -> Self {
        record
    }

    fn record(&self) -> &StoredRecord {
        self
    }
}

impl FeedRecord for Arc<StoredRecord> {
    fn from_ring(record: Arc<StoredRecord>) -> Self {
        record
    }

    fn from_disk(record: StoredRecord) -> Self {
        Arc::new(record)
    }

    fn record(&self) -> &StoredRecord {
        self
    }
}

/// Where the next records of a subscription come from.
enum Source {
    Ring(Vec<Arc<StoredRecord>>),
    Disk { to_seq: u64 },
}

/// A consumer's position in the log: yields every record from its start seq on, in order.
pub struct Subscription {
    reader: LogReader,
    feed: LiveFeed,
    next_seq: u64,
    watcher: watch::Receiver<u64>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("next_seq", &self.next_seq).finish_non_exhaustive()
    }
}

impl Subscription {
    /// A subscription whose first record is `from_seq` (0 is treated as 1).
    pub fn new(reader: LogReader, feed: LiveFeed, from_seq: u64) -> Self {
        let watcher = feed.inner.last_seq.subscribe();
        Self { reader, feed, next_seq: from_seq.max(1), watcher }
    }

    /// The seq of the next record this subscription will yield.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether at least `records` records wait for this subscription: in the ring, or older
    /// ones on disk. Before the first publish, those up to the head the feed was made after
    /// (`LiveFeed::after`); always, if it was made without one (`LiveFeed::new`: how many is
    /// not known). A consumer that serves other work on its threads (an HTTP server's feeds)
    /// makes a long batch elsewhere: a full batch read from disk or encoded takes milliseconds.
    pub fn has_backlog_of(&self, records: u64) -> bool {
        let ring = self.feed.inner.ring.lock();
        match ring.records.front() {
            Some(front) if self.next_seq < front.seq => true,
            // Nothing published to a feed made without the head: how many is not known.
            None if ring.last_seq == 0 => true,
            _ => (ring.last_seq + 1).saturating_sub(self.next_seq) >= records,
        }
    }

    fn source(&self, max: usize) -> Source {
        let ring = self.feed.inner.ring.lock();
        match ring.records.front() {
            Some(front) if front.seq <= self.next_seq && self.next_seq <= ring.last_seq => {
                // Seqs in the ring are contiguous, so the offset is exact.
                let start = (self.next_seq - front.seq) as usize;
                Source::Ring(ring.records.range(start..).take(max).cloned().collect())
            }
            Some(front) if self.next_seq < front.seq => Source::Disk { to_seq: front.seq - 1 },
            // Past the ring (or nothing published yet): whatever is committed but not (yet)
            // published can still be read from disk.
            _ => Source::Disk { to_seq: u64::MAX },
        }
    }

    /// Waits until the writer has published this subscription's next seq. (The subscription
    /// holds the feed, and with it the sender of the published seq, so the wait cannot fail.)
    pub async fn wait_published(&mut self) {
        let next_seq = self.next_seq;
        let _ = self.watcher.wait_for(|last_seq| *last_seq >= next_seq).await;
    }

    /// Up to `max` records without waiting; empty if there is nothing new.
    pub fn try_next_batch(&mut self, max: usize) -> Result<Vec<StoredRecord>, SubscribeError> {
        let mut batch = Vec::new();
        self.try_next_batch_into(max, &mut batch)?;
        Ok(batch)
    }

    /// Like [`Subscription::try_next_batch`], into `batch` (emptied first): a consumer that
    /// polls in a loop keeps one buffer instead of growing a new one for every batch (a
    /// live projector's batch of a few thousand records is a few hundred KiB, which the
    /// allocator hands back to the kernel between batches and faults in again).
    pub fn try_next_batch_into<R: FeedRecord>(&mut self, max: usize, batch: &mut Vec<R>) -> Result<(), SubscribeError> {
        batch.clear();
        if max == 0 {
            return Ok(());
        }
        match self.source(max) {
            Source::Ring(records) => batch.extend(records.into_iter().map(R::from_ring)),
            Source::Disk { to_seq } => {
                batch.extend(self.reader.read_range(self.next_seq, to_seq, max)?.into_iter().map(R::from_disk))
            }
        }
        if let Some(last) = batch.last() {
            debug_assert_eq!(batch[0].record().seq, self.next_seq);
            self.next_seq = last.record().seq + 1;
        }
        Ok(())
    }

    /// Up to `max` records, waiting at most `timeout` for the writer to publish if there is
    /// nothing new; empty on timeout.
    pub fn next_batch(&mut self, max: usize, timeout: Duration) -> Result<Vec<StoredRecord>, SubscribeError> {
        let mut batch = Vec::new();
        self.next_batch_into(max, timeout, &mut batch)?;
        Ok(batch)
    }

    /// Like [`Subscription::next_batch`], into `batch` (see
    /// [`Subscription::try_next_batch_into`]).
    pub fn next_batch_into<R: FeedRecord>(
        &mut self,
        max: usize,
        timeout: Duration,
        batch: &mut Vec<R>,
    ) -> Result<(), SubscribeError> {
        self.try_next_batch_into(max, batch)?;
        if !batch.is_empty() || max == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        {
            let mut ring = self.feed.inner.ring.lock();
            while ring.last_seq < self.next_seq {
                if self.feed.inner.published.wait_until(&mut ring, deadline).timed_out() {
                    break;
                }
            }
        }
        self.try_next_batch_into(max, batch)
    }

    /// Up to `max` records, waiting for the writer to publish if there is nothing new.
    /// The disk read it may do is short and synchronous.
    pub async fn next_batch_async(&mut self, max: usize) -> Result<Vec<StoredRecord>, SubscribeError> {
        let mut batch = Vec::new();
        self.next_batch_async_into(max, &mut batch).await?;
        Ok(batch)
    }

    /// Like [`Subscription::next_batch_async`], into `batch` (see
    /// [`Subscription::try_next_batch_into`]).
    pub async fn next_batch_async_into<R: FeedRecord>(
        &mut self,
        max: usize,
        batch: &mut Vec<R>,
    ) -> Result<(), SubscribeError> {
        loop {
            self.try_next_batch_into(max, batch)?;
            if !batch.is_empty() || max == 0 {
                return Ok(());
            }
            self.wait_published().await;
        }
    }
}
