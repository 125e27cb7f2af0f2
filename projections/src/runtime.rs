//! The projector runtime: one tokio task per projector, each following the
//! log through its own `Subscription` and applying batches in transactions
//! that also move its checkpoint.
//!
//! Why one task per projector and nothing shared between them: a projector
//! that is slow (a big rebuild) or failing (its database is down, a bug in its
//! rules) must not hold back the others, and none of them may hold back the
//! writer. Subscriptions read committed records from the writer's ring or
//! from disk, so the writer never waits for a projector, and each projector's
//! lag (head seq − checkpoint) is its own. A failed batch rolls back whole;
//! the task reports the error, waits, reloads its checkpoint and mirror from
//! the database and tries again from there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use domain::Event;
use eventlog::{LiveFeed, LogReader, StoredRecord, Subscription};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::checkpoint::{self, Checkpoint, Indexes, Slot, Unlogged};
use crate::error::{ApplyError, RuntimeError};
use crate::lock::LockFence;
use crate::projectors::{self, KeptMirror, MIRROR_STORE_EVERY_EVENTS, ProjectorKind};
use crate::sql::{self, Statements};
use crate::store::Store;

/// Most events applied in one transaction while following the log.
pub const BATCH_EVENTS_MAX: usize = 8192;
/// Most events per transaction in bulk builds (rebuilds, as-of): bigger
/// batches coalesce more of a task's rows into one write.
pub const BULK_BATCH_EVENTS_MAX: usize = 32_768;

/// Tunables of the runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Most events per transaction (at most `eventlog::reader::READ_BATCH_MAX`).
    pub batch_events_max: usize,
    /// How long a failed projector waits before it tries again.
    pub retry_delay: Duration,
    /// The projectors to run (all by default).
    pub projectors: Vec<ProjectorKind>,
    /// The tokio runtime the projector tasks run on; the caller's when `None`.
    /// The server gives them their own, so that folding a batch never holds
    /// a worker an HTTP request is waiting for.
    pub executor: Option<tokio::runtime::Handle>,
    /// Says when another process holds the database's lock: no batch is written meanwhile.
    pub fence: LockFence,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            batch_events_max: BATCH_EVENTS_MAX,
            retry_delay: Duration::from_secs(1),
            projectors: ProjectorKind::ALL.to_vec(),
            executor: None,
            fence: LockFence::default(),
        }
    }
}

/// One projector's position in one slot, with its in-memory mirror: what it
/// takes to apply the next batch.
pub struct Driver {
    kind: ProjectorKind,
    slot: Slot,
    checkpoint: Checkpoint,
    mirror: Option<KeptMirror>,
    store_mirror_every: u64,
    scratch: Scratch,
}

/// What a driver reuses from one batch to the next instead of allocating it
/// afresh (with the records its runner reads into one kept `Vec`, and the
/// mirror's touched tasks, `KeptMirror::touched`): a live projector applies a
/// batch every few milliseconds, and buffers grown from nothing each time
/// fault in memory the allocator has given back to the kernel in the
/// meantime. Under `taskledger-bench`'s lifecycle (2026-12-04) the projector
/// threads took ~14,000 page faults a second, mostly growing the rendered
/// statements' buffers, and the faults were 7 % of the server's CPU samples.
/// Both are emptied as soon as a batch is done, so they keep capacity, not
/// the batch.
#[derive(Default)]
struct Scratch {
    events: Vec<Event>,
    statements: Option<Statements>,
}

impl Driver {
    /// Loads the checkpoint and the mirror of `kind` in `slot`; installs the
    /// live slot's tables if this store has never held the projector. The
    /// checkpoint must be a record of `reader`'s log (projections built from
    /// another log are refused), and the events between the stored mirror and
    /// the checkpoint are read from it and folded into the mirror.
    pub async fn load(
        store: &Store,
        kind: ProjectorKind,
        slot: Slot,
        reader: &LogReader,
    ) -> Result<Driver, RuntimeError> {
        Self::load_with(store, kind, slot, Indexes::Now, reader).await
    }

    /// Like `load`; a live slot installed now gets its indexes per `indexes`.
    pub async fn load_with(
        store: &Store,
        kind: ProjectorKind,
        slot: Slot,
        indexes: Indexes,
        reader: &LogReader,
    ) -> Result<Driver, RuntimeError> {
        let mut checkpoint = match (checkpoint::read(store, kind, slot).await?, slot) {
            (Some(checkpoint), _) => checkpoint,
            (None, Slot::Live) => checkpoint::install(store, kind, slot, "", 1, indexes).await?,
            (None, Slot::Shadow) => {
                return Err(ApplyError::Model(format!("{} has no shadow build", kind.name())).into());
            }
        };
        match checkpoint::unlogged_state(store, kind, &checkpoint).await? {
            Unlogged::None => {}
            Unlogged::Reset => {
                tracing::warn!(
                    projector = kind.name(),
                    slot = slot.as_str(),
                    checkpoint = checkpoint.last_seq,
                    "PostgreSQL crashed during this bulk build and emptied its unlogged tables: building again from seq 0"
                );
                let Checkpoint { table_suffix, generation, .. } = checkpoint;
                checkpoint = checkpoint::install(store, kind, slot, &table_suffix, generation, indexes).await?;
            }
            // A bulk build left unfinished, now followed row by row: finish it first.
            Unlogged::Intact if indexes == Indexes::Now => checkpoint::create_indexes(store, kind, &checkpoint).await?,
            Unlogged::Intact => {}
        }
        if indexes == Indexes::Now {
            checkpoint::create_missing_indexes(store, kind, &checkpoint).await?;
            checkpoint::drop_retired_indexes(store, kind, &checkpoint).await?;
        }
        checkpoint::check_against_log(&checkpoint, reader)?;
        let mut tx = store.begin().await?;
        let mut mirror = kind.load_mirror(&mut tx, &checkpoint.table_suffix, checkpoint.last_seq).await?;
        tx.commit().await?;
        if let Some(kept) = mirror.as_mut().filter(|kept| kept.stored_seq < checkpoint.last_seq) {
            let mut at = kept.stored_seq;
            while at < checkpoint.last_seq {
                let records = read_shared(reader, at + 1, checkpoint.last_seq, eventlog::reader::READ_BATCH_MAX)?;
                let Some(last) = records.last() else {
                    return Err(ApplyError::Model(format!(
                        "the log ends at seq {at}, before {}'s checkpoint {}",
                        kind.name(),
                        checkpoint.last_seq
                    ))
                    .into());
                };
                at = last.seq;
                kept.fold(&records, &decode_all(&records)?, |_, _, _| {})?;
                kept.mirror.settle()?;
            }
        }
        Ok(Driver {
            kind,
            slot,
            checkpoint,
            mirror,
            store_mirror_every: MIRROR_STORE_EVERY_EVENTS,
            scratch: Scratch::default(),
        })
    }

    /// Stores the mirror's changes in its table once it trails the checkpoint by
    /// `events` or more (at least 1; 1 stores them with every batch).
    pub fn store_mirror_every(&mut self, events: u64) {
        self.store_mirror_every = events.max(1);
    }

    pub fn kind(&self) -> ProjectorKind {
        self.kind
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// Applies `records` (which must continue the checkpoint) in one
    /// transaction with the checkpoint. On error nothing was written and this
    /// driver must be dropped and loaded again (its mirror moved on).
    pub async fn apply(&mut self, store: &Store, records: &[Arc<StoredRecord>]) -> Result<(), ApplyError> {
        let mut events = std::mem::take(&mut self.scratch.events);
        decode_into(records, &mut events)?;
        let applied = self.apply_decoded(store, records, &events).await;
        events.clear();
        self.scratch.events = events;
        applied
    }

    /// `apply` with the records' events already decoded (`events[i]` is
    /// `records[i]`'s), for callers that share one decode among projectors.
    pub async fn apply_decoded(
        &mut self,
        store: &Store,
        records: &[Arc<StoredRecord>],
        events: &[Event],
    ) -> Result<(), ApplyError> {
        self.apply_decoded_with(store, records, events, Fold::OnWorker).await
    }

    async fn apply_decoded_with(
        &mut self,
        store: &Store,
        records: &[Arc<StoredRecord>],
        events: &[Event],
        fold: Fold,
    ) -> Result<(), ApplyError> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else { return Ok(()) };
        if first.seq != self.checkpoint.last_seq + 1 {
            return Err(ApplyError::OutOfOrder { expected: self.checkpoint.last_seq + 1, got: first.seq });
        }
        assert_eq!(records.len(), events.len(), "one event per record");
        let mut statements = match self.scratch.statements.take() {
            Some(kept) if kept.backend() == store.backend() => kept,
            _ => Statements::new(store.backend()),
        };
        // Fold and render before taking the write lock (see `sql::Statements`).
        let prepared = fold.run(records.len(), || {
            projectors::prepare_batch(
                self.kind,
                &self.checkpoint.table_suffix,
                self.mirror.as_mut(),
                self.store_mirror_every,
                records,
                events,
                &mut statements,
            )
        });
        let result = async {
            prepared?;
            let mut tx = store.begin().await?;
            statements.run(&mut tx).await?;
            checkpoint::advance(&mut tx, self.kind, self.slot, self.checkpoint.last_seq, last).await?;
            tx.commit().await?;
            Ok(())
        }
        .await;
        statements.clear();
        self.scratch.statements = Some(statements);
        if let Err(error) = result {
            self.mirror = None;
            return Err(error);
        }
        self.checkpoint.last_seq = last.seq;
        self.checkpoint.last_hash = last.hash;
        Ok(())
    }

    /// Applies everything in the log after the checkpoint up to `to_seq`,
    /// reading straight from disk (rebuilds, as-of, tools).
    pub async fn catch_up(
        &mut self,
        store: &Store,
        reader: &LogReader,
        to_seq: u64,
        batch_events_max: usize,
    ) -> Result<(), RuntimeError> {
        while self.checkpoint.last_seq < to_seq {
            let records = read_shared(reader, self.checkpoint.last_seq + 1, to_seq, batch_events_max)?;
            if records.is_empty() {
                break;
            }
            self.apply(store, &records).await?;
        }
        Ok(())
    }
}

/// Where a batch is folded and rendered.
#[derive(Clone, Copy)]
enum Fold {
    /// On the runtime worker, in line: live projectors, as before `OffWorker`
    /// existed. Their batches are mostly small; with `OffWorker` for live
    /// batches too, interleaved `taskledger-bench` batch-create runs gave
    /// 64–75k tasks/s against 74–89k without (2026-12-02; this machine's
    /// run-to-run noise is nearly as large, so the server was left as it was).
    OnWorker,
    /// Bulk builds (rebuild, as-of): batches of `BULK_BATCH_EVENTS_MAX` take
    /// tens of milliseconds to fold. On a multi-threaded runtime they run under
    /// `block_in_place`, so the worker's other tasks move to another thread;
    /// otherwise the projector holding SQLite's write gate waits for a free
    /// worker between its statements while the others fold, and the SQLite
    /// thread idles. A 1M-event SQLite rebuild took 18.8–20.3 s with the
    /// SQLite thread about half busy, and 13.8–16.3 s with this.
    OffWorker,
}

/// `OffWorker` batches shorter than this are folded in line all the same:
/// handing the worker's tasks over would cost more than the fold.
const OFF_WORKER_BATCH_EVENTS_MIN: usize = 1024;

impl Fold {
    fn run<T>(self, events: usize, work: impl FnOnce() -> T) -> T {
        off_worker_if(matches!(self, Fold::OffWorker) && events >= OFF_WORKER_BATCH_EVENTS_MIN, work)
    }
}

/// Runs `work` under `block_in_place` when `long` and the runtime has several
/// workers (so the worker's other tasks move to another thread meanwhile);
/// in line otherwise.
pub(crate) fn off_worker_if<T>(long: bool, work: impl FnOnce() -> T) -> T {
    let flavor = tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor());
    match flavor {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) if long => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Decodes the domain event of every record.
pub fn decode_all(records: &[Arc<StoredRecord>]) -> Result<Vec<Event>, ApplyError> {
    let mut events = Vec::with_capacity(records.len());
    decode_into(records, &mut events)?;
    Ok(events)
}

/// Decodes the domain event of every record into `events`, emptied first.
fn decode_into(records: &[Arc<StoredRecord>], events: &mut Vec<Event>) -> Result<(), ApplyError> {
    events.clear();
    events.reserve(records.len());
    for record in records {
        let event = eventlog::decode_event(record)
            .map_err(|e| ApplyError::Decode { seq: record.seq, reason: e.to_string() })?;
        events.push(event);
    }
    Ok(())
}

/// Applies the log up to `to_seq` to the live slot of every projector in
/// `kinds`, each from its own checkpoint, reading and decoding each batch
/// once and applying it to the projectors in parallel tasks. A projector
/// installed here (a fresh store) gets its secondary indexes at the end.
pub async fn build_live(
    store: &Store,
    reader: &LogReader,
    to_seq: u64,
    kinds: &[ProjectorKind],
    batch_events_max: usize,
) -> Result<(), RuntimeError> {
    let mut drivers = Vec::new();
    for kind in kinds {
        let driver = Driver::load_with(store, *kind, Slot::Live, Indexes::Later, reader).await?;
        drivers.push(driver);
    }
    build_drivers(store, reader, to_seq, &mut drivers, batch_events_max).await?;
    for driver in &drivers {
        checkpoint::create_indexes(store, driver.kind, &driver.checkpoint).await?;
    }
    Ok(())
}

/// How far a bulk build lets its mirror table trail (`Driver::store_mirror_every`).
/// Every store rewrites the bodies of all live tasks that changed since the
/// last one: at the default 65,536 events, 1.2 s of the 9.5 s a PostgreSQL
/// tasks projector spent in statements over a 1M-event rebuild. Resuming an
/// interrupted build refolds at most this many events from the log.
const BULK_MIRROR_STORE_EVERY_EVENTS: u64 = 262_144;

/// Records `from..=to` (at most `max`) read from the log, in the handles the live feed hands
/// the projectors (see `eventlog::FeedRecord`).
fn read_shared(
    reader: &LogReader,
    from: u64,
    to: u64,
    max: usize,
) -> Result<Vec<Arc<StoredRecord>>, eventlog::ReadError> {
    Ok(reader.read_range(from, to, max)?.into_iter().map(Arc::new).collect())
}

/// Batches read ahead of the slowest projector in a bulk build, per projector.
const BULK_READ_AHEAD_BATCHES: usize = 2;

/// One batch of a bulk build: records and their decoded events.
type DecodedBatch = Arc<(Vec<Arc<StoredRecord>>, Vec<Event>)>;

/// Feeds every driver the log from the lowest checkpoint up to `to_seq`, as
/// a pipeline: a blocking thread reads and decodes each batch once and hands
/// it to every projector's task through a short queue, so reading the next
/// batch, folding it and writing the previous one overlap, and a projector
/// that is ahead never waits for the others (only SQLite's write lock and the
/// read-ahead bound tie them together).
async fn build_drivers(
    store: &Store,
    reader: &LogReader,
    to_seq: u64,
    drivers: &mut Vec<Driver>,
    batch_events_max: usize,
) -> Result<(), RuntimeError> {
    let Some(from) = drivers.iter().map(|d| d.checkpoint.last_seq + 1).min() else { return Ok(()) };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for mut driver in drivers.drain(..) {
        let (sender, mut batches) = tokio::sync::mpsc::channel::<DecodedBatch>(BULK_READ_AHEAD_BATCHES);
        senders.push(sender);
        let (store, stop) = (store.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(batch) = batches.recv().await {
                let (records, events) = &*batch;
                // The mirror table is only read to resume an interrupted build
                // (refolding from its seq) or by whoever follows the build: store
                // it rarely on the way, and with the last batch.
                let last_batch = records.last().is_some_and(|r| r.seq >= to_seq);
                driver.store_mirror_every(if last_batch { 1 } else { BULK_MIRROR_STORE_EVERY_EVENTS });
                let skip = records.iter().take_while(|r| r.seq <= driver.checkpoint.last_seq).count();
                if let Err(error) =
                    driver.apply_decoded_with(&store, &records[skip..], &events[skip..], Fold::OffWorker).await
                {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    return (driver, Err(error));
                }
            }
            (driver, Ok(()))
        }));
    }
    let reading = {
        let (reader, stop) = (reader.clone(), stop.clone());
        tokio::task::spawn_blocking(move || -> Result<(), RuntimeError> {
            let mut from = from;
            while from <= to_seq && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let records = read_shared(&reader, from, to_seq, batch_events_max)?;
                let Some(last) = records.last().map(|r| r.seq) else { break };
                let events = decode_all(&records)?;
                let batch = Arc::new((records, events));
                for sender in &senders {
                    // A closed queue is a projector that failed; the others go on.
                    let _ = sender.blocking_send(batch.clone());
                }
                from = last + 1;
            }
            Ok(())
        })
    };
    let read = reading.await.map_err(|_| RuntimeError::Stopped);
    let mut failed = None;
    for task in tasks {
        let (driver, result) = task.await.map_err(|_| RuntimeError::Stopped)?;
        drivers.push(driver);
        if let Err(error) = result {
            failed.get_or_insert(error);
        }
    }
    if let Some(error) = failed {
        return Err(error.into());
    }
    read?
}

/// What a projector is doing, for the API, metrics and operators.
#[derive(Clone, Debug, Default, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject), graphql(complex))]
pub struct ProjectorStatus {
    pub projector: String,
    pub version: i32,
    pub slot: String,
    pub checkpoint_seq: u64,
    /// The log head when the status was taken.
    pub head_seq: u64,
    /// `head_seq − checkpoint_seq`.
    pub lag: u64,
    pub running: bool,
    /// The last error, until a batch succeeds again.
    pub error: Option<String>,
    pub events_applied: u64,
    pub batches_applied: u64,
}

/// The short names the GraphQL documentation uses (`projections { name checkpoint lag }`),
/// beside the REST field names.
#[cfg(feature = "graphql")]
#[async_graphql::ComplexObject]
impl ProjectorStatus {
    /// The projector's name (same as `projector`).
    async fn name(&self) -> &str {
        &self.projector
    }
    /// The last seq it applied (same as `checkpointSeq`).
    async fn checkpoint(&self) -> u64 {
        self.checkpoint_seq
    }
}

#[derive(Default)]
struct Progress {
    checkpoint_seq: u64,
    running: bool,
    error: Option<String>,
    events_applied: u64,
    batches_applied: u64,
    /// Failed attempts since the last batch that succeeded.
    failures: u64,
    /// When the current run of failures was last logged.
    failure_logged_at: Option<std::time::Instant>,
    /// When the batch being applied was begun (`None` between batches).
    batch_started: Option<std::time::Instant>,
}

/// A batch the database has not finished after this long is reported as the projector's error
/// (so `taskledger_projection_failing` fires): a lock held on a projection table, or a database
/// that stopped answering, showed neither error nor failing flag (found by a black-box check).
pub const BATCH_WAIT_REPORTED_AFTER: Duration = Duration::from_secs(10);

/// How long a stopping projector may take to finish the batch in flight: past it the batch is
/// abandoned (rolled back with its checkpoint, applied again at the next start). A shutdown
/// waited as long as a hung database did (found by a black-box check).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How often a projector that keeps failing the same way says so again. Every attempt was a
/// WARN line: four a second while PostgreSQL was down (found by a black-box check).
const FAILURE_LOG_REPEAT: Duration = Duration::from_secs(60);

/// How a runner stops: `Stop` at the next batch boundary, or once caught up
/// with the head (rebuilds).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Until {
    Stopped,
    CaughtUp,
}

struct Runner {
    kind: ProjectorKind,
    slot: Slot,
    store: Store,
    reader: LogReader,
    feed: LiveFeed,
    config: RuntimeConfig,
    progress: Arc<Mutex<Progress>>,
    checkpoint_watch: Arc<watch::Sender<u64>>,
    stop: watch::Receiver<bool>,
    until: Until,
}

impl Runner {
    /// Runs until stopped (or caught up), retrying after failures.
    async fn run(mut self) {
        loop {
            let mut stop = self.stop.clone();
            let outcome = tokio::select! {
                outcome = self.run_once() => outcome,
                _ = async {
                    let _ = stop.wait_for(|stop| *stop).await;
                    tokio::time::sleep(STOP_GRACE).await;
                } => {
                    tracing::warn!(
                        projector = self.kind.name(),
                        slot = self.slot.as_str(),
                        "stopped without finishing its batch: the projections database did not answer within {} s \
                         of the stop (the batch is applied again at the next start)",
                        STOP_GRACE.as_secs()
                    );
                    return;
                }
            };
            self.progress.lock().batch_started = None;
            let failed = match outcome {
                Ok(()) => return,
                Err(error) => error,
            };
            let message = failed.to_string();
            let (failures, say) = {
                let mut progress = self.progress.lock();
                progress.failures += 1;
                let say = progress.error.as_deref() != Some(message.as_str())
                    || progress.failure_logged_at.is_none_or(|at| at.elapsed() >= FAILURE_LOG_REPEAT);
                if say {
                    progress.failure_logged_at = Some(std::time::Instant::now());
                }
                progress.error = Some(message);
                (progress.failures, say)
            };
            if say {
                tracing::warn!(
                    projector = self.kind.name(),
                    slot = self.slot.as_str(),
                    %failed,
                    failures,
                    "projector failed; retrying (said again once a minute while it fails the same way)"
                );
            }
            // The next try gets a fresh write connection: the failure may have left this one
            // broken for good (read-only, a failed I/O).
            self.store.retire_writer().await;
            tokio::select! {
                _ = tokio::time::sleep(self.config.retry_delay) => {}
                _ = self.stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    async fn run_once(&mut self) -> Result<(), RuntimeError> {
        // A shadow build stays a bulk build (unlogged, no secondary indexes on
        // PostgreSQL) until `rebuild` finishes it; a live projector finishes
        // one it finds.
        let indexes = match self.slot {
            Slot::Live => Indexes::Now,
            Slot::Shadow => Indexes::Later,
        };
        // Loading may write too (install a checkpoint, restart an unlogged build, create indexes).
        self.config.fence.check()?;
        // Reported like a batch when it waits long on the database.
        self.progress.lock().batch_started = Some(std::time::Instant::now());
        let mut driver = Driver::load_with(&self.store, self.kind, self.slot, indexes, &self.reader).await?;
        self.progress.lock().batch_started = None;
        // A retry after a failed batch keeps its error until a batch succeeds.
        self.publish(driver.checkpoint().last_seq, false);
        let mut subscription =
            Subscription::new(self.reader.clone(), self.feed.clone(), driver.checkpoint().last_seq + 1);
        let max = self.config.batch_events_max.clamp(1, eventlog::reader::READ_BATCH_MAX);
        // Kept from batch to batch (see `Scratch`).
        let mut records = Vec::new();
        loop {
            if *self.stop.borrow() {
                return Ok(());
            }
            if self.until == Until::CaughtUp && driver.checkpoint().last_seq >= self.reader.head()?.seq {
                return Ok(());
            }
            tokio::select! {
                read = subscription.next_batch_async_into(max, &mut records) => read?,
                _ = self.stop.wait_for(|stop| *stop) => return Ok(()),
            }
            self.config.fence.check()?;
            self.progress.lock().batch_started = Some(std::time::Instant::now());
            driver.apply(&self.store, &records).await?;
            let mut progress = self.progress.lock();
            progress.batch_started = None;
            progress.events_applied += records.len() as u64;
            progress.batches_applied += 1;
            drop(progress);
            self.publish(driver.checkpoint().last_seq, true);
        }
    }

    /// Publishes the checkpoint, and clears the last error when a batch has just succeeded.
    fn publish(&self, checkpoint_seq: u64, succeeded: bool) {
        let mut progress = self.progress.lock();
        progress.checkpoint_seq = checkpoint_seq;
        if succeeded {
            progress.error = None;
            if progress.failures > 0 {
                tracing::info!(
                    projector = self.kind.name(),
                    slot = self.slot.as_str(),
                    failures = progress.failures,
                    "projector recovered"
                );
                progress.failures = 0;
                progress.failure_logged_at = None;
            }
        }
        drop(progress);
        self.checkpoint_watch.send_replace(checkpoint_seq);
    }
}

struct Running {
    slot: Slot,
    progress: Arc<Mutex<Progress>>,
    /// The projector's applied seq, for `wait_for_seq`. Owned here, not by the runner, so that
    /// it outlives a runner stopped for a swap and passes on to the next one: readers waiting
    /// on it go on waiting instead of reading tables nobody is writing (found by a black-box
    /// check: `min_seq` reads answered from the old tables, without their seq, at a swap).
    checkpoint_tx: Arc<watch::Sender<u64>>,
    stop: watch::Sender<bool>,
    /// `None` once the runner was stopped and its task awaited.
    join: Option<JoinHandle<()>>,
}

impl Running {
    async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }
}

struct Inner {
    store: Store,
    reader: LogReader,
    feed: LiveFeed,
    config: RuntimeConfig,
    /// Live runners by projector. A `parking_lot` mutex: held only to insert,
    /// remove or read entries, never across an await.
    live: Mutex<HashMap<ProjectorKind, Running>>,
    shadows: Mutex<HashMap<ProjectorKind, Arc<Mutex<Progress>>>>,
}

/// The running projectors of one store. Cheap to clone.
#[derive(Clone)]
pub struct Projections {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Projections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projections").field("backend", &self.inner.store.backend()).finish_non_exhaustive()
    }
}

impl Projections {
    /// Starts a task per configured projector, each resuming from its
    /// checkpoint. A projector whose stored version is older than the code's
    /// keeps serving its old tables while a new generation is built beside
    /// them, and is swapped in once it has caught up.
    pub async fn start(
        store: Store,
        reader: LogReader,
        feed: LiveFeed,
        config: RuntimeConfig,
    ) -> Result<Projections, RuntimeError> {
        let projections = Projections {
            inner: Arc::new(Inner {
                store,
                reader,
                feed,
                config,
                live: Mutex::new(HashMap::new()),
                shadows: Mutex::new(HashMap::new()),
            }),
        };
        // Tables built from another log (a backup of an older point restored beside newer
        // projections, another server's database) are refused before anything serves them:
        // the projector refused to follow, but the views went on answering with events the
        // log does not have (found by a black-box check).
        let mut stored = Vec::new();
        for kind in projections.inner.config.projectors.clone() {
            let checkpoint = checkpoint::read(&projections.inner.store, kind, Slot::Live).await?;
            if let Some(checkpoint) = &checkpoint {
                checkpoint::check_against_log(checkpoint, &projections.inner.reader)?;
            }
            stored.push((kind, checkpoint));
        }
        for (kind, stored) in &stored {
            // A fresh store's tables exist before anything serves them: installed by each live
            // runner as it loaded, a view read in the first milliseconds after a start on a new
            // data dir answered 503 "a projection table is missing ... rebuild its projector"
            // (found by a test that queried right after the start).
            if stored.is_none() {
                projections.inner.config.fence.check()?;
                checkpoint::install(&projections.inner.store, *kind, Slot::Live, "", 1, Indexes::Now).await?;
            }
        }
        for (kind, stored) in stored {
            // A rebuild a stop or a crash interrupted goes on where its shadow tables stand (it
            // was left until someone asked again, and the status did not show it: found by a
            // black-box check).
            let interrupted = checkpoint::read(&projections.inner.store, kind, Slot::Shadow).await?.is_some();
            match stored {
                Some(checkpoint) if checkpoint.version != kind.version() => {
                    tracing::info!(projector = kind.name(), stored = checkpoint.version, "rebuilding a new version");
                    projections.park_live(kind, &checkpoint);
                    projections.rebuild_in_background(kind);
                }
                _ => {
                    // Its tables stand at the stored checkpoint from the start: status and
                    // `min_seq` waits said 0 (the whole log behind) until the runner had loaded,
                    // which takes as long as another process holds the database's write lock
                    // (found by a black-box check: /readyz not ready for 40 s).
                    let at = stored.as_ref().map_or(0, |checkpoint| checkpoint.last_seq);
                    projections.spawn_live(kind, Some((Arc::new(watch::channel(at).0), at)));
                    if interrupted {
                        tracing::info!(projector = kind.name(), "resuming an interrupted rebuild");
                        projections.rebuild_in_background(kind);
                    }
                }
            }
        }
        Ok(projections)
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// [`Projections::rebuild`] on a task of its own; a failure is logged.
    fn rebuild_in_background(&self, kind: ProjectorKind) {
        let this = self.clone();
        self.spawn_task(async move {
            if let Err(error) = this.rebuild(kind).await {
                tracing::error!(projector = kind.name(), %error, "rebuild failed");
            }
        });
    }

    /// Whether another process holds the database's lock (see [`LockFence`]).
    pub fn fence(&self) -> &LockFence {
        &self.inner.config.fence
    }

    /// Spawns `task` on the configured executor.
    fn spawn_task<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.inner.config.executor {
            Some(executor) => executor.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// Starts a runner; `carried` is the watch and the checkpoint of the runner it takes over
    /// from (a live projector after a swap), so that readers and the status see no gap.
    fn spawn(
        &self,
        kind: ProjectorKind,
        slot: Slot,
        until: Until,
        carried: Option<(Arc<watch::Sender<u64>>, u64)>,
    ) -> Running {
        let (checkpoint_tx, checkpoint_seq) = carried.unwrap_or_else(|| (Arc::new(watch::channel(0).0), 0));
        let progress = Arc::new(Mutex::new(Progress { running: true, checkpoint_seq, ..Progress::default() }));
        let (stop, stop_rx) = watch::channel(false);
        let runner = Runner {
            kind,
            slot,
            store: self.inner.store.clone(),
            reader: self.inner.reader.clone(),
            feed: self.inner.feed.clone(),
            config: self.inner.config.clone(),
            progress: progress.clone(),
            checkpoint_watch: checkpoint_tx.clone(),
            stop: stop_rx,
            until,
        };
        let done = progress.clone();
        let join = self.spawn_task(async move {
            runner.run().await;
            done.lock().running = false;
        });
        Running { slot, progress, checkpoint_tx, stop, join: Some(join) }
    }

    /// The live entry of a projector whose stored tables are of another version: nothing
    /// follows them (the code writes rows of its own version only), so they stand at their
    /// checkpoint until the rebuild swaps the new version in. Without it the projector was
    /// missing from the status and the lag, and `min_seq` waits passed it by, answering from
    /// tables nobody wrote (found by a review).
    fn park_live(&self, kind: ProjectorKind, stored: &Checkpoint) {
        let progress = Progress {
            checkpoint_seq: stored.last_seq,
            error: Some(format!(
                "its tables are of version {}; version {} is being rebuilt beside them",
                stored.version,
                kind.version()
            )),
            ..Progress::default()
        };
        let running = Running {
            slot: Slot::Live,
            progress: Arc::new(Mutex::new(progress)),
            checkpoint_tx: Arc::new(watch::channel(stored.last_seq).0),
            stop: watch::channel(false).0,
            join: None,
        };
        self.inner.live.lock().insert(kind, running);
    }

    fn spawn_live(&self, kind: ProjectorKind, carried: Option<(Arc<watch::Sender<u64>>, u64)>) {
        let running = self.spawn(kind, Slot::Live, Until::Stopped, carried);
        self.inner.live.lock().insert(kind, running);
    }

    /// Every projector's position, lag and last error, live and shadow.
    pub fn status(&self) -> Result<Vec<ProjectorStatus>, RuntimeError> {
        let head_seq = self.inner.reader.head()?.seq;
        let make = |kind: ProjectorKind, slot: Slot, progress: &Progress| ProjectorStatus {
            projector: kind.name().to_owned(),
            version: kind.version(),
            slot: slot.as_str().to_owned(),
            checkpoint_seq: progress.checkpoint_seq,
            head_seq,
            lag: head_seq.saturating_sub(progress.checkpoint_seq),
            running: progress.running,
            error: progress.error.clone().or_else(|| {
                let waited = progress.batch_started?.elapsed();
                (waited >= BATCH_WAIT_REPORTED_AFTER).then(|| {
                    format!(
                        "waiting {} s for the projections database to finish a batch (a lock held on a projection \
                         table, the database not answering, or its write lock held by a long rebuild step)",
                        waited.as_secs()
                    )
                })
            }),
            events_applied: progress.events_applied,
            batches_applied: progress.batches_applied,
        };
        let mut out: Vec<ProjectorStatus> =
            self.inner.live.lock().iter().map(|(kind, r)| make(*kind, r.slot, &r.progress.lock())).collect();
        out.extend(self.inner.shadows.lock().iter().map(|(kind, p)| make(*kind, Slot::Shadow, &p.lock())));
        out.sort_by(|a, b| (&a.projector, &a.slot).cmp(&(&b.projector, &b.slot)));
        Ok(out)
    }

    /// The largest lag of any live projector (for a single metric).
    pub fn max_lag(&self) -> Result<u64, RuntimeError> {
        Ok(self.status()?.iter().filter(|s| s.slot == "live").map(|s| s.lag).max().unwrap_or(0))
    }

    /// Waits until every live projector has applied `seq` (a `minSeq`
    /// consistency token), at most `timeout`. Returns whether they all have.
    pub async fn wait_for_seq(&self, seq: u64, timeout: Duration) -> bool {
        let watches: Vec<watch::Receiver<u64>> =
            self.inner.live.lock().values().map(|r| r.checkpoint_tx.subscribe()).collect();
        let all = async {
            for mut w in watches {
                if w.wait_for(|applied| *applied >= seq).await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, all).await.unwrap_or(false)
    }

    /// Builds a new generation of `kind`'s tables from seq 0 beside the live
    /// ones (which keep serving), and swaps it in atomically once it has
    /// caught up with the head. Resumes a shadow build a crash interrupted.
    pub async fn rebuild(&self, kind: ProjectorKind) -> Result<Checkpoint, RuntimeError> {
        {
            let mut shadows = self.inner.shadows.lock();
            if shadows.get(&kind).is_some_and(|progress| progress.lock().running) {
                return Err(RuntimeError::RebuildInProgress(kind.name().to_owned()));
            }
            shadows.insert(kind, Arc::new(Mutex::new(Progress { running: true, ..Progress::default() })));
        }
        let result = self.rebuild_inner(kind).await;
        let mut shadows = self.inner.shadows.lock();
        match &result {
            Ok(_) => {
                shadows.remove(&kind);
            }
            // Kept in the status, stopped, with its error, until the next try: a rebuild that
            // failed at once (a dropped schema) showed nowhere but in the log, though its request
            // had been answered 202 (found by a black-box check).
            Err(error) => {
                if let Some(progress) = shadows.get(&kind) {
                    let mut progress = progress.lock();
                    progress.running = false;
                    progress.error = Some(format!("the rebuild failed: {error}"));
                }
            }
        }
        drop(shadows);
        result
    }

    async fn rebuild_inner(&self, kind: ProjectorKind) -> Result<Checkpoint, RuntimeError> {
        self.inner.config.fence.check()?;
        let store = &self.inner.store;
        store.migrate().await?;
        let live = checkpoint::read(store, kind, Slot::Live).await?;
        let shadow = checkpoint::read(store, kind, Slot::Shadow).await?;
        match shadow {
            Some(shadow) if shadow.version == kind.version() => {}
            _ => {
                let generation = live.as_ref().map_or(1, |c| c.generation) + 1;
                checkpoint::install(store, kind, Slot::Shadow, &format!("__g{generation}"), generation, Indexes::Later)
                    .await?;
            }
        }
        // Catch up in the background of the live projector...
        let progress = self.inner.shadows.lock().get(&kind).cloned().expect("registered by rebuild");
        let shadow_runner = self.spawn(kind, Slot::Shadow, Until::CaughtUp, None);
        let shadow_progress = shadow_runner.progress.clone();
        {
            // Mirror the shadow runner's progress into the status entry.
            let mut checkpoint = shadow_runner.checkpoint_tx.subscribe();
            let progress = progress.clone();
            let shadow_progress = shadow_progress.clone();
            self.spawn_task(async move {
                while checkpoint.changed().await.is_ok() {
                    let p = shadow_progress.lock();
                    let mut q = progress.lock();
                    q.checkpoint_seq = p.checkpoint_seq;
                    q.events_applied = p.events_applied;
                    q.batches_applied = p.batches_applied;
                    q.error = p.error.clone();
                }
            });
        }
        if let Some(join) = shadow_runner.join {
            let _ = join.await;
        }
        if let Some(error) = shadow_progress.lock().error.clone() {
            tracing::debug!(projector = kind.name(), %error, "shadow build recovered from an error");
        }
        // Index the filled tables while the live projector still serves...
        if let Some(shadow) = checkpoint::read(store, kind, Slot::Shadow).await? {
            checkpoint::create_indexes(store, kind, &shadow).await?;
        }
        // ...then stop the live runner, finish the last few records, and swap. Its entry stays,
        // so that the status and `min_seq` readers still see the projector at its checkpoint
        // (it vanished from both, and then came back at seq 0: `/readyz` said the projections
        // were the whole log behind, found by a black-box check).
        let join = self.inner.live.lock().get_mut(&kind).and_then(|running| {
            running.stop.send_replace(true);
            running.join.take()
        });
        if let Some(join) = join {
            let _ = join.await;
        }
        let result = async {
            self.inner.config.fence.check()?;
            let mut driver = Driver::load(store, kind, Slot::Shadow, &self.inner.reader).await?;
            let head = self.inner.reader.head()?.seq;
            driver.catch_up(store, &self.inner.reader, head, self.inner.config.batch_events_max).await?;
            swap(store, kind).await
        }
        .await;
        let carried = self.inner.live.lock().get(&kind).map(|running| {
            let tx = running.checkpoint_tx.clone();
            let seq = running.progress.lock().checkpoint_seq;
            (tx, seq)
        });
        let carried = match (&result, carried) {
            // The swapped-in tables hold every record to their checkpoint: readers may go on.
            (Ok(live), Some((tx, _))) => {
                tx.send_replace(live.last_seq);
                Some((tx, live.last_seq))
            }
            (_, carried) => carried,
        };
        match (&result, &live) {
            // Tables of another version stay parked: this code cannot follow them.
            (Err(_), Some(stored)) if stored.version != kind.version() => {}
            _ => self.spawn_live(kind, carried),
        }
        result
    }

    /// Stops every runner at its next batch boundary and waits for them.
    pub async fn shutdown(&self) {
        let running: Vec<Running> = self.inner.live.lock().drain().map(|(_, r)| r).collect();
        // All told at once, then awaited: one after the other, four projectors behind a hung
        // database took four times the stop's grace (found by review).
        for r in &running {
            r.stop.send_replace(true);
        }
        // Their graces run side by side: awaiting them in turn takes the longest, not the sum.
        for r in running {
            r.stop().await;
        }
    }
}

/// Replaces `kind`'s live tables by its shadow generation in one transaction:
/// readers see the old tables or the new ones, never neither.
pub async fn swap(store: &Store, kind: ProjectorKind) -> Result<Checkpoint, RuntimeError> {
    let shadow = checkpoint::read(store, kind, Slot::Shadow)
        .await?
        .ok_or_else(|| RuntimeError::UnknownProjector(format!("{} has no shadow build", kind.name())))?;
    let mut tx = store.begin().await?;
    for table in kind.tables() {
        sql::execute(&mut tx, &format!("DROP TABLE IF EXISTS {table}")).await?;
        sql::execute(&mut tx, &format!("ALTER TABLE {table}{} RENAME TO {table}", shadow.table_suffix)).await?;
    }
    crate::store::on_tx!(&mut tx, t => {
        sqlx::query("DELETE FROM projector_checkpoints WHERE projector = $1 AND slot = 'live'")
            .bind(kind.name())
            .execute(&mut **t)
            .await?;
        sqlx::query(
            "UPDATE projector_checkpoints SET slot = 'live', table_suffix = '' WHERE projector = $1 AND slot = 'shadow'",
        )
        .bind(kind.name())
        .execute(&mut **t)
        .await?;
    });
    tx.commit().await?;
    let live = checkpoint::read(store, kind, Slot::Live).await?.expect("just swapped in");
    Ok(live)
}
