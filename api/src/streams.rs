//! How many long-lived streams each token holds open: REST event feeds and GraphQL
//! subscriptions (`events`, `task`).
//!
//! Each such stream follows the log for as long as its client keeps it, and each reads every
//! record (a `task` subscription decodes every record of the log to pick its task's): a client
//! with a bug that opens a subscription per render, or a leaked auditor token, could open
//! thousands and take the server's CPU and memory from everyone else. `--max-connections` does
//! not bound them: one WebSocket carries any number of subscriptions. So each token may hold at
//! most `--max-streams-per-token` at once; the next is refused (`429 too_many_streams`) until one
//! ends, and the refusal names the limit.
//!
//! Where each batch of such a stream is made: a reader keeping up with the writer gets a few
//! records at a time, made on the HTTP worker; a reader catching up gets batches of up to
//! 1,024 records, made on the bulk-read threads (see [`next_batch`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use futures_util::{Stream, StreamExt};

use eventlog::{StoredRecord, Subscription};

use crate::error::ApiError;

/// The most records a batch may hold and still be made on the HTTP worker: a subscriber keeping
/// up with the writer gets a commit's records at a time, which cost less to encode than to hand
/// to another thread.
pub const IN_LINE_BATCH_RECORDS_MAX: u64 = 64;

/// The next batch of `subscription` (up to `max` records) and what `finish` makes of it, `None`
/// when nothing new is there yet. A batch of more than [`IN_LINE_BATCH_RECORDS_MAX`] records
/// (`max` above it, and older records on disk or a backlog in the writer's ring) is read and
/// finished on `bulk_reads`, the server's lower-priority threads for it
/// (`server::bulk_read_runtime`); the subscription goes there and back with it. An error ends
/// the stream it feeds.
pub async fn next_batch<T: Send + 'static>(
    bulk_reads: &tokio::runtime::Handle,
    mut subscription: Subscription,
    max: usize,
    finish: impl FnOnce(Vec<StoredRecord>) -> T + Send + 'static,
) -> Result<(Subscription, Option<T>), String> {
    let made_of = move |subscription: &mut Subscription| {
        let batch = subscription.try_next_batch(max)?;
        Ok::<_, eventlog::error::SubscribeError>((!batch.is_empty()).then(|| finish(batch)))
    };
    let long = max as u64 > IN_LINE_BATCH_RECORDS_MAX && subscription.has_backlog_of(IN_LINE_BATCH_RECORDS_MAX + 1);
    if !long {
        let made = made_of(&mut subscription).map_err(|error| error.to_string())?;
        return Ok((subscription, made));
    }
    let work = bulk_reads.spawn_blocking(move || {
        let made = made_of(&mut subscription);
        (subscription, made)
    });
    match work.await {
        Ok((subscription, Ok(made))) => Ok((subscription, made)),
        Ok((_, Err(error))) => Err(error.to_string()),
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err("the server is shutting down".to_owned()),
    }
}

/// The streams open per token (by its name in the tokens file).
pub struct StreamSlots {
    max_per_token: usize,
    open: Mutex<HashMap<Arc<str>, usize>>,
}

/// One open stream, counted against its token until dropped (when the feed's body or the
/// subscription ends, however it ends).
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    token: Arc<str>,
}

impl StreamSlots {
    pub fn new(max_per_token: usize) -> Arc<Self> {
        Arc::new(StreamSlots { max_per_token, open: Mutex::default() })
    }

    /// A slot for one more stream of the token named `token`, or `429 too_many_streams` when
    /// it holds the most it may.
    pub fn take(self: &Arc<Self>, token: &Arc<str>) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().expect("stream slots");
        let held = open.entry(token.clone()).or_insert(0);
        if *held >= self.max_per_token {
            return Err(ApiError {
                // A slot frees when a stream ends, which no client can predict: a client that
                // retried at once made ~13,000 refused requests a second (found by a client check).
                retry_after_s: Some(5),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    format!(
                        "token {} already holds {} event feeds and subscriptions open, the most \
                         --max-streams-per-token allows; end one first",
                        token, self.max_per_token
                    ),
                )
            });
        }
        *held += 1;
        Ok(StreamSlot { slots: self.clone(), token: token.clone() })
    }

    /// How many streams `token` holds open.
    pub fn held_by(&self, token: &str) -> usize {
        self.open.lock().expect("stream slots").get(token).copied().unwrap_or(0)
    }

    /// Streams open in all, the most one token holds, and the limit, for `/metrics` (without
    /// token names: a scoped token may read the metrics).
    pub fn gauges(&self) -> (usize, usize, usize) {
        let open = self.open.lock().expect("stream slots");
        (open.values().sum(), open.values().copied().max().unwrap_or(0), self.max_per_token)
    }
}

impl StreamSlot {
    /// `stream`, holding this slot until the stream ends or is dropped.
    pub fn hold<S: Stream>(self, stream: S) -> impl Stream<Item = S::Item> {
        stream.map(move |item| {
            let _held = &self;
            item
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("stream slots");
        if let Some(held) = open.get_mut(&self.token) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_holds_at_most_its_limit_and_a_dropped_slot_is_free_again() {
        let slots = StreamSlots::new(2);
        let (alice, bob): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("bob"));
        let first = slots.take(&alice).unwrap();
        let _second = slots.take(&alice).unwrap();
        let refused = slots.take(&alice).err().unwrap();
        assert_eq!((refused.status, refused.code), (StatusCode::TOO_MANY_REQUESTS, "too_many_streams"));
        assert!(refused.message.contains("--max-streams-per-token"), "{}", refused.message);
        let _other = slots.take(&bob).expect("another token has slots of its own");
        drop(first);
        assert_eq!(slots.held_by("alice"), 1);
        let _again = slots.take(&alice).expect("a dropped slot is free again");
        assert_eq!(slots.held_by("alice"), 2);
        assert_eq!(slots.gauges(), (3, 2, 2));
    }

    /// A batch of more than `IN_LINE_BATCH_RECORDS_MAX` records (older ones on disk, or a
    /// backlog in the ring) is made on the bulk-read threads; a few records of a reader keeping
    /// up, or a short page, are made where the stream runs. Every record comes once, in order,
    /// either way.
    #[test]
    fn a_backlog_is_made_on_the_bulk_read_threads_and_a_few_records_in_line() {
        use eventlog::{LiveFeed, LogStore, NewRecord, RedbOptions, RedbStore};

        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
        let feed = LiveFeed::new(1_000);
        let record = |i: u64| NewRecord {
            stream: b"s".to_vec(),
            command_id: format!("c-{i}"),
            actor: "test".into(),
            recorded_at_us: i as i64,
            event_type: 1,
            schema_version: 1,
            payload: Vec::new(),
        };
        let bulk =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("bulk-test").build().unwrap();
        let serving = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let made_on = |batch: Vec<StoredRecord>| {
            let seqs: Vec<u64> = batch.iter().map(|r| r.seq).collect();
            (seqs, std::thread::current().name().unwrap_or("").to_owned())
        };
        let here = std::thread::current().name().unwrap_or("").to_owned();
        let subscription = Subscription::new(store.reader(), feed.clone(), 1);
        let subscription = serving.block_on(async {
            // 200 records on disk, nothing published yet: a page of 10 is short, one of 140 long.
            let appended = store.append(&(1..=200).map(record).collect::<Vec<_>>(), &[]).unwrap();
            let (next, made) = next_batch(bulk.handle(), subscription, 10, made_on).await.unwrap();
            assert_eq!(made, Some(((1..=10).collect(), here.clone())));
            let (next, made) = next_batch(bulk.handle(), next, 140, made_on).await.unwrap();
            assert_eq!(made, Some(((11..=150).collect(), "bulk-test".to_owned())));
            feed.publish(&appended.records);
            // 50 left in the ring: few enough to make in line.
            let (next, made) = next_batch(bulk.handle(), next, 1024, made_on).await.unwrap();
            assert_eq!(made, Some(((151..=200).collect(), here.clone())));
            let more = store.append(&(201..=300).map(record).collect::<Vec<_>>(), &[]).unwrap();
            feed.publish(&more.records);
            // 100 waiting in the ring: a backlog.
            let (next, made) = next_batch(bulk.handle(), next, 1024, made_on).await.unwrap();
            assert_eq!(made, Some(((201..=300).collect(), "bulk-test".to_owned())));
            let (next, made) = next_batch(bulk.handle(), next, 1024, made_on).await.unwrap();
            assert_eq!(made, None, "caught up");
            next
        });
        assert_eq!(subscription.next_seq(), 301);
    }
}
