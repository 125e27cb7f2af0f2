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
//! 1,024 records, made on the bulk-read threads (see [`next_batch`]). A GraphQL socket does
//! more per record than its batch (each event is resolved, serialized and framed), so the
//! whole socket is served on the bulk-read threads while one of its subscriptions catches up
//! (see [`serve_by_catch_up`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

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
/// (`server::bulk_read_runtime`); the subscription goes there and back with it. With no
/// `bulk_reads` (the server stopping), every batch is made here, whatever its size. An error
/// ends the stream it feeds.
pub async fn next_batch<T: Send + 'static>(
    bulk_reads: Option<&tokio::runtime::Handle>,
    mut subscription: Subscription,
    max: usize,
    finish: impl FnOnce(Vec<StoredRecord>) -> T + Send + 'static,
) -> Result<(Subscription, Option<T>), String> {
    let made_of = move |subscription: &mut Subscription, max: usize| {
        let batch = subscription.try_next_batch(max)?;
        Ok::<_, eventlog::error::SubscribeError>((!batch.is_empty()).then(|| finish(batch)))
    };
    let Some(bulk_reads) = bulk_reads.filter(|_| is_catching_up(&subscription, max)) else {
        // At most a short batch here, whatever the disk holds beyond the ring (records committed
        // and not yet published are read from disk), unless no bulk-read thread is to be used.
        let in_line_max = if bulk_reads.is_some() { max.min(IN_LINE_BATCH_RECORDS_MAX as usize) } else { max };
        let made = made_of(&mut subscription, in_line_max).map_err(|error| error.to_string())?;
        return Ok((subscription, made));
    };
    // A batch whose stream was dropped (its client went away) before a thread took it is not
    // made: a client connecting and leaving in a loop queued a long batch each time. (Aborting
    // blocking work keeps it from starting; once started, it runs to its end.)
    let work = AbortOnDrop(bulk_reads.spawn_blocking(move || {
        let made = made_of(&mut subscription, max);
        (subscription, made)
    }));
    match work.await {
        Ok((subscription, Ok(made))) => Ok((subscription, made)),
        Ok((_, Err(error))) => Err(error.to_string()),
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(_) => Err("the server is shutting down".to_owned()),
    }
}

/// Whether the next batch of `subscription`, of at most `max` records, is a long one, made on
/// the bulk-read threads by [`next_batch`]: more than [`IN_LINE_BATCH_RECORDS_MAX`] records
/// asked for, and more than that waiting.
pub fn is_catching_up(subscription: &Subscription, max: usize) -> bool {
    max as u64 > IN_LINE_BATCH_RECORDS_MAX && subscription.has_backlog_of(IN_LINE_BATCH_RECORDS_MAX + 1)
}

/// How many of one connection's streams are catching up (their last batch was a long one), for
/// [`serve_by_catch_up`].
#[derive(Default)]
pub struct CatchingUp(AtomicUsize);

impl CatchingUp {
    pub fn any(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

/// One stream's part in its connection's [`CatchingUp`]: counted while it is set, and no more
/// once it is cleared or dropped (the stream ended, however it ended).
pub struct CatchUpMark {
    of: Arc<CatchingUp>,
    set: bool,
}

impl CatchUpMark {
    pub fn new(of: Arc<CatchingUp>) -> Self {
        CatchUpMark { of, set: false }
    }

    pub fn set(&mut self, catching_up: bool) {
        match (self.set, catching_up) {
            (false, true) => self.of.0.fetch_add(1, Ordering::AcqRel),
            (true, false) => self.of.0.fetch_sub(1, Ordering::AcqRel),
            _ => return,
        };
        self.set = catching_up;
    }
}

impl Drop for CatchUpMark {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Runs `work` (a GraphQL socket) on the calling task while none of its streams is catching up,
/// and on `bulk_reads`, the idle-class threads, while one is: a subscriber catching up from the
/// log's start receives every event resolved, serialized and framed, ~15 µs each, and on the
/// HTTP workers two such subscribers took create p50 from 0.8 to 20 ms, p99 from 5 to 209 ms
/// (`taskledger-bench --only taskledger --workloads half-rate --half-rate 6000
/// --graphql-readers 2`, 2026-12-07). `work` moves between the two when a poll leaves it
/// waiting with the other side's condition true; so under full load a socket catching up waits
/// for spare CPU, and so does everything else on that socket meanwhile. It ends early, leaving
/// `work` undone, only if the bulk-read runtime is shut down under it (the server stopping).
pub async fn serve_by_catch_up<F>(bulk_reads: &tokio::runtime::Handle, catching_up: Arc<CatchingUp>, work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    /// Polls `work` until it is done (`true`) or waits with `hop` true (`false`).
    async fn until<F: Future<Output = ()>>(work: &mut Pin<Box<F>>, hop: impl Fn() -> bool) -> bool {
        std::future::poll_fn(|cx| match work.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(true),
            Poll::Pending if hop() => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        })
        .await
    }
    let mut work = Box::pin(work);
    loop {
        if until(&mut work, || catching_up.any()).await {
            return;
        }
        let load = catching_up.clone();
        let away = AbortOnDrop(bulk_reads.spawn(async move {
            let done = until(&mut work, || !load.any()).await;
            (work, done)
        }));
        match away.await {
            Ok((_, true)) => return,
            Ok((back, false)) => work = back,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => return,
        }
    }
}

/// A task aborted when its handle is dropped: the socket's task may be dropped while its work is
/// away on the bulk-read threads, and the work must not go on serving a socket nobody holds; a
/// long batch queued for a stream that was dropped is not made.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
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

    /// A socket's work runs where it is served while none of its streams is catching up, on the
    /// bulk-read threads while one is, and back again; dropped while away, it is dropped there
    /// too.
    #[test]
    fn a_socket_is_served_on_the_bulk_read_threads_while_a_stream_catches_up() {
        let bulk = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bulk-test")
            .enable_all()
            .build()
            .unwrap();
        let serving = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let here = std::thread::current().name().unwrap_or("").to_owned();
        let catching_up = Arc::new(CatchingUp::default());
        // The work sets its mark as told and answers each message with the thread it ran on.
        let (tell, mut told) = tokio::sync::mpsc::unbounded_channel::<bool>();
        let (answer, mut answers) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut mark = CatchUpMark::new(catching_up.clone());
        let work = async move {
            while let Some(set) = told.recv().await {
                mark.set(set);
                answer.send(std::thread::current().name().unwrap_or("").to_owned()).unwrap();
            }
            answer.send(format!("ended on {}", std::thread::current().name().unwrap_or(""))).unwrap();
        };
        let ran_on = serving.block_on(async {
            let serve = serve_by_catch_up(bulk.handle(), catching_up.clone(), work);
            let drive = async {
                let mut ran_on = Vec::new();
                for set in [false, true, false, false] {
                    tell.send(set).unwrap();
                    ran_on.push(answers.recv().await.unwrap());
                }
                drop(tell);
                ran_on.push(answers.recv().await.unwrap());
                ran_on
            };
            tokio::join!(serve, drive).1
        });
        let bulk_name = "bulk-test".to_owned();
        assert_eq!(ran_on, [here.clone(), here.clone(), bulk_name, here.clone(), format!("ended on {here}")]);
        assert!(!catching_up.any(), "the mark was cleared");

        // Dropped while away: the work is dropped on the bulk-read threads, and its mark with it.
        let (dropped, was_dropped) = tokio::sync::oneshot::channel::<()>();
        let mark = CatchUpMark::new(catching_up.clone());
        let work = async move {
            let _on_drop = dropped;
            // Declared after the sender, so dropped before it: the receiver's wake-up comes after
            // the mark is cleared (dropped the other way round, the check below raced it).
            let mut mark = mark;
            mark.set(true);
            std::future::pending::<()>().await;
        };
        serving.block_on(async {
            let serve = serve_by_catch_up(bulk.handle(), catching_up.clone(), work);
            let away = tokio::time::timeout(std::time::Duration::from_millis(50), serve);
            assert!(away.await.is_err(), "the work never ends of itself");
        });
        bulk.block_on(was_dropped).expect_err("the work was dropped, its sender with it");
        assert!(!catching_up.any(), "the dropped work's mark was cleared");
    }

    /// The `i`th record of a test log, all in one stream.
    fn record(i: u64) -> eventlog::NewRecord {
        eventlog::NewRecord {
            stream: b"s".to_vec(),
            command_id: format!("c-{i}"),
            actor: "test".into(),
            recorded_at_us: i as i64,
            event_type: 1,
            schema_version: 1,
            payload: Vec::new(),
        }
    }

    /// A batch of more than `IN_LINE_BATCH_RECORDS_MAX` records (older ones on disk, or a
    /// backlog in the ring) is made on the bulk-read threads; a few records of a reader keeping
    /// up, or a short page, are made where the stream runs. Every record comes once, in order,
    /// either way.
    #[test]
    fn a_backlog_is_made_on_the_bulk_read_threads_and_a_few_records_in_line() {
        use eventlog::{LiveFeed, LogStore, RedbOptions, RedbStore};

        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
        let feed = LiveFeed::new(1_000);
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
            let (next, made) = next_batch(Some(bulk.handle()), subscription, 10, made_on).await.unwrap();
            assert_eq!(made, Some(((1..=10).collect(), here.clone())));
            let (next, made) = next_batch(Some(bulk.handle()), next, 140, made_on).await.unwrap();
            assert_eq!(made, Some(((11..=150).collect(), "bulk-test".to_owned())));
            feed.publish(&appended.records);
            // 50 left in the ring: few enough to make in line.
            let (next, made) = next_batch(Some(bulk.handle()), next, 1024, made_on).await.unwrap();
            assert_eq!(made, Some(((151..=200).collect(), here.clone())));
            let more = store.append(&(201..=300).map(record).collect::<Vec<_>>(), &[]).unwrap();
            feed.publish(&more.records);
            // 100 waiting in the ring: a backlog.
            let (next, made) = next_batch(Some(bulk.handle()), next, 1024, made_on).await.unwrap();
            assert_eq!(made, Some(((201..=300).collect(), "bulk-test".to_owned())));
            let (next, made) = next_batch(Some(bulk.handle()), next, 1024, made_on).await.unwrap();
            assert_eq!(made, None, "caught up");
            // Committed, not yet published: the ring shows no backlog, and the disk holds 200. A
            // batch made in line is a short one all the same.
            store.append(&(301..=500).map(record).collect::<Vec<_>>(), &[]).unwrap();
            let (next, made) = next_batch(Some(bulk.handle()), next, 1024, made_on).await.unwrap();
            assert_eq!(made, Some(((301..=364).collect(), here.clone())));
            // With no bulk-read threads to use (the server stopping), a backlog is made here.
            let (next, made) = next_batch(None, next, 1024, made_on).await.unwrap();
            assert_eq!(made, Some(((365..=500).collect(), here.clone())));
            next
        });
        assert_eq!(subscription.next_seq(), 501);
    }

    /// A long batch whose stream is dropped before a bulk-read thread takes it is not made.
    #[test]
    fn a_long_batch_dropped_before_it_starts_is_not_made() {
        use eventlog::{LiveFeed, LogStore, RedbOptions, RedbStore};
        use std::sync::atomic::AtomicBool;

        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
        store.append(&(1..=500).map(record).collect::<Vec<_>>(), &[]).unwrap();
        let bulk =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).max_blocking_threads(1).build().unwrap();
        // The one blocking thread is busy until `release` is sent.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let busy = bulk.spawn_blocking(move || wait.recv().unwrap());
        let made = Arc::new(AtomicBool::new(false));
        let serving = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let subscription = Subscription::new(store.reader(), LiveFeed::new(1_000), 1);
        let flag = made.clone();
        let batch = next_batch(Some(bulk.handle()), subscription, 1024, move |_| flag.store(true, Ordering::Release));
        let gave_up =
            serving.block_on(async { tokio::time::timeout(std::time::Duration::from_millis(50), batch).await });
        assert!(gave_up.is_err(), "the batch waited for the busy thread and was dropped");
        release.send(()).unwrap();
        bulk.block_on(busy).unwrap();
        // Whatever was queued has run by now: a second job queued behind it has.
        bulk.block_on(bulk.spawn_blocking(|| ())).unwrap();
        assert!(!made.load(Ordering::Acquire), "the dropped batch was not made");
    }
}
