//! The single writer: the only code that appends to the log.
//!
//! One thread owns the `LogStore` and the in-memory `Ledger`. Callers hand it
//! commands through a bounded channel (`WriterHandle::submit`); when the
//! channel is full they are told "overloaded" at once rather than queued
//! without bound. The thread loops:
//!
//! 1. wait for a command or the earliest due timer;
//! 2. drain whatever else is queued, up to `batch_events_max` events (the commands
//!    after its records reach `batch_bytes_max` bytes wait for the next batch);
//! 3. turn due timers into system commands (lease expiry, retry due, run_at);
//! 4. decide each command against the ledger, applying its events at once so
//!    the next command of the batch sees them;
//! 5. append every accepted event in one redb transaction, made durable by one
//!    fsync (of the write-ahead journal, or a checkpoint: see `journal.rs`) —
//!    group commit;
//! 6. only then publish the records to subscribers and acknowledge each command —
//!    on a second thread, the acknowledger, so waking the callers (a futex call
//!    each for threads) overlaps with deciding and committing the next batch; a
//!    batch of one or two commands finding the acknowledger idle is answered by
//!    the writer itself, sparing a lone submitter a thread hop.
//!    Acknowledgements keep batch order; none is sent before its commit returned;
//! 7. file the batch's command ids in the dedup window — after the answers, which
//!    need not wait for it: only this thread's next batch reads the window.
//!
//! Why one thread: redb allows one write transaction at a time anyway, and a
//! single owner of the ledger needs no locks on the hot path. Why a plain
//! std channel: submitters may be threads or async tasks; `try_send` never
//! blocks either, and the writer blocks on `recv_timeout`, which also gives
//! it its timer wake-up. Replies go through a tokio oneshot, which a thread
//! can `blocking_recv` and a task can `.await`.
//!
//! If a commit fails, no command of that batch is acknowledged, the ledger is
//! rebuilt from what the log durably holds (so memory is as before the batch),
//! and the writer refuses every later write until restart (health reports
//! it). It never retries an fsync: after a failed fsync the page cache may
//! not match the disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use domain::{ClaimedStep, Command, Event, Ledger, Rejection, RejectionCode, StreamId, TaskId, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::clock::Clock;
use crate::dedup::DedupIndex;
use crate::feed::LiveFeed;
use crate::fold::{FoldError, FoldStats, decode_event, encode_event, fold_to, fold_to_head, snapshot_body};
use crate::reader::LogReader;
use crate::record::NewRecord;
use crate::redb_store::{RedbOptions, RedbStore};
use crate::snapshot::SnapshotStore;
use crate::store::{Head, LogStore};

/// Tunables of the writer; every limit is explicit.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Commands that may wait in the channel before submitters are told "overloaded".
    pub channel_capacity: usize,
    /// A batch stops draining the channel once it holds this many events.
    pub batch_events_max: usize,
    /// A batch takes no more commands once its records hold this many bytes; the commands
    /// drained after that go into the next batch. With `command_bytes_max` it keeps a batch's
    /// journal frame and transaction far below the frame's 4 GiB, and bounds the writer's memory.
    pub batch_bytes_max: usize,
    /// A command whose records would hold more bytes than this is refused
    /// (`payload_too_large`): only a batch create under a raised body limit comes near it.
    pub command_bytes_max: usize,
    /// Most due timers turned into commands per batch.
    pub timers_per_batch_max: usize,
    /// A snapshot is taken every this many events (0 = never).
    pub snapshot_every_events: u64,
    /// Records kept in memory for live subscribers.
    pub feed_capacity: usize,
    /// A repeated command id is recognised while its events are among the
    /// newest this many records (the dedup window; rebuilt at startup).
    pub dedup_window_events: u64,
    /// Under this many free bytes on the data directory's disk, commands that bring new work
    /// are refused (`WriteError::StorageLow`) until space is freed (0 = no floor); see `disk`.
    pub min_free_disk_bytes: u64,
    pub store: RedbOptions,
}

/// Default of [`WriterConfig::batch_bytes_max`].
pub const BATCH_BYTES_MAX_DEFAULT: usize = 256 << 20;
/// Default of [`WriterConfig::command_bytes_max`]. With the default 4 MiB body limit, a command's
/// records hold at most about 18 MiB (a payload re-serialized: `1e15` is kept as
/// `1000000000000000.0`); 1 GiB is reached only with the body limit raised past ~230 MiB.
pub const COMMAND_BYTES_MAX_DEFAULT: usize = 1 << 30;

/// Default of [`WriterConfig::min_free_disk_bytes`]: room for what the default journals' records
/// take once checkpointed and projected (ten 16 MiB journals' worth, see `disk`), and a margin.
pub const MIN_FREE_DISK_BYTES_DEFAULT: u64 = 256 << 20;

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            channel_capacity: 16 * 1024,
            batch_events_max: 8192,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            command_bytes_max: COMMAND_BYTES_MAX_DEFAULT,
            timers_per_batch_max: 4096,
            snapshot_every_events: 1_000_000,
            feed_capacity: 64 * 1024,
            dedup_window_events: 1_000_000,
            min_free_disk_bytes: MIN_FREE_DISK_BYTES_DEFAULT,
            store: RedbOptions::default(),
        }
    }
}

/// Most bytes in a client's command id or actor name.
pub const COMMAND_ID_BYTES_MAX: usize = 128;

/// A command with who sent it and the client's id for safe retries.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// Chosen by the client; a repeat within the dedup window returns the
    /// original outcome and writes nothing.
    pub command_id: String,
    pub actor: String,
    pub command: Command,
}

/// What a command's events were recorded as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

/// The answer to an accepted command, sent only after its events are durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acknowledgement {
    /// Where this command's events are in the log; `None` if it changed
    /// nothing (an idempotent create, pausing a paused queue, a claim that
    /// found no work).
    pub seqs: Option<SeqRange>,
    /// The log head once this command was durable: a consistency token for
    /// read-your-writes (`minSeq`).
    pub head_seq: u64,
    pub events: Vec<Event>,
    /// Work handed out by a claim.
    pub claimed: Vec<ClaimedStep>,
    /// For a create (`CreateTask`, `CreateTasks`): the task each spec names, in
    /// order — the one it created, or the one its idempotency key already named
    /// (`Ledger::tasks_named_by`). Empty for other commands.
    pub task_ids: Vec<TaskId>,
    /// This is a repeat of an earlier command id; nothing was written now.
    pub duplicate: bool,
    /// For a repeat: it is not the command the id was first used for (`Ledger::repeats`:
    /// other task specs, another worker, step, epoch, result, queue, …), which the API refuses
    /// rather than answering with the original's outcome (a claim's live leases, say).
    pub differs_from_original: bool,
    /// For a repeat: the actor who sent the original (so the API can refuse another
    /// caller's reuse of the id without reading the log, whose newest records a
    /// checkpoint may still hold back). `None` for a command answered now.
    pub original_actor: Option<String>,
}

/// Why a command got no acknowledgement.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The domain refused it; nothing was written.
    #[error("rejected: {0}")]
    Rejected(Rejection),
    /// The channel is full: try again shortly (HTTP 503 + Retry-After).
    #[error("the writer is overloaded; retry shortly")]
    Overloaded,
    /// The writer has stopped accepting writes (after a storage failure, or
    /// at shutdown). Reads still work.
    #[error("the writer is not accepting writes: {0}")]
    Unavailable(String),
    /// The commit of this command's batch failed. It was not acknowledged, and it is not in
    /// the log the server reads now; a failed sync, or a failure after the journal's write,
    /// may still leave it in the log after a restart (retry with the same command id: the dedup
    /// window then answers with its outcome).
    #[error("the commit failed; the command is not in the log now, and may be after a restart: {0}")]
    CommitFailed(String),
    /// The commit of this command's batch failed because the disk is full (see `CommitFailed`).
    /// Like `CommitFailed`, the writer then refuses writes until restarted (with space).
    #[error("the disk is full: the commit failed; the command is not in the log now, and may be after a restart: {0}")]
    StorageFull(String),
    /// The data directory's disk is under its free-space floor: this command would bring new
    /// work (a task, steps), so nothing was written; it is taken again once space is freed
    /// (see `disk`).
    #[error("{0}")]
    StorageLow(String),
    /// The envelope itself is unusable (an empty or oversized command id or actor).
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(String),
    /// A system command (timers) was submitted by a client.
    #[error("system commands are issued by the ledger itself")]
    Forbidden,
}

pub type CommandResult = Result<Acknowledgement, WriteError>;

/// The namespaces a caller's credentials cover.
pub type Scope = Arc<[domain::Namespace]>;

/// The writer's health, for `/healthz` and `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Writes are refused until restart; the reason says why.
    Failed(String),
}

/// Figures the writer keeps for metrics.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub batches: AtomicU64,
    /// Batches acknowledged while a checkpoint ran, before readers could see them.
    pub held_batches: AtomicU64,
    pub commands: AtomicU64,
    pub events: AtomicU64,
    pub overloaded: AtomicU64,
    pub snapshots: AtomicU64,
    /// Snapshots due that could not be written, and the snapshot thread stopping for good.
    pub snapshot_failures: AtomicU64,
    /// How far (µs) the system clock was behind the log's last recorded time when the writer
    /// last looked (at least every 500 ms); 0 when it is not. Set back, the clock makes
    /// recorded time stand still until it catches up.
    pub clock_behind_us: AtomicI64,
    /// Free bytes on the data directory's disk when the writer last looked (at most every
    /// 100 ms while commands come; 0 before it first looked).
    pub disk_free_bytes: AtomicU64,
    /// Whether that is under the floor, so new work is refused.
    pub storage_low: AtomicBool,
    /// Commit durations (write + fsync), counted into `COMMIT_BUCKETS_US`.
    pub commit_us_buckets: [AtomicU64; COMMIT_BUCKETS_US.len()],
    pub commit_us_total: AtomicU64,
    /// Events per committed batch, counted into `BATCH_SIZE_BUCKETS`.
    pub batch_size_buckets: [AtomicU64; BATCH_SIZE_BUCKETS.len()],
}

/// Upper bounds of the commit-duration histogram, in µs (the last catches all).
pub const COMMIT_BUCKETS_US: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 250_000, 1_000_000, u64::MAX];
/// Upper bounds of the batch-size histogram, in events (the last catches all).
pub const BATCH_SIZE_BUCKETS: [u64; 9] = [1, 4, 16, 64, 256, 1_024, 4_096, 16_384, u64::MAX];

fn count_into(buckets: &[AtomicU64], bounds: &[u64], value: u64) {
    let i = bounds.iter().position(|b| value <= *b).unwrap_or(bounds.len() - 1);
    buckets[i].fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    health: Mutex<Health>,
    stats: WriterStats,
    /// The head readers see (records published up to it).
    head: watch::Sender<u64>,
    /// The head of the last answered batch: durable, possibly not readable yet.
    acknowledged: AtomicU64,
    /// The most readers will ever see until a restart: below `u64::MAX` once a checkpoint
    /// failed, and the batches it held stayed unreadable (durable in the journal).
    readable_cap: AtomicU64,
    /// The streams those held batches wrote to: reads of them would miss acknowledged records.
    unreadable_streams: Mutex<std::collections::HashSet<Vec<u8>>>,
    work: watch::Sender<ReadyWork>,
}

/// Per namespace, how many committed batches left it with claimable steps.
/// Long-polling claims wait for their namespaces' counters to move rather
/// than for any commit: otherwise every commit wakes every waiting worker,
/// and each sends the writer an empty claim.
pub type ReadyWork = HashMap<domain::Namespace, u64>;

/// A read run against the ledger between batches: given `None` once the ledger is lost (see
/// `WriterThread::ledger_lost`).
type LedgerRead = Box<dyn FnOnce(Option<&Ledger>) + Send>;

/// A command drained from the channel, with the scope it was sent under and where its answer goes.
type Submitted = (Envelope, Option<Scope>, oneshot::Sender<CommandResult>);

/// Bytes a record's fields take (a batch's bound; the log adds a fixed few dozen per record).
fn stored_bytes(record: &NewRecord) -> usize {
    record.payload.len() + record.stream.len() + record.command_id.len() + record.actor.len()
}

// Commands are nearly every message; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Message {
    Command(Envelope, Option<Scope>, oneshot::Sender<CommandResult>),
    /// Runs a read against the ledger between batches, so it sees every
    /// command answered before it.
    Read(LedgerRead),
    /// Re-check timers now (tests with a manual clock send it after advancing).
    Tick,
    Shutdown,
}

/// How a caller reaches the writer. Cheap to clone; the writer stops when
/// the last handle is dropped or `Writer::shutdown` is called.
#[derive(Clone)]
pub struct WriterHandle {
    tx: SyncSender<Message>,
    shared: Arc<Shared>,
    reader: LogReader,
    feed: LiveFeed,
    snapshots: SnapshotStore,
}

impl WriterHandle {
    /// Queues a command; the receiver yields its result once it is durable
    /// (or refused). Never blocks: a full channel is `Overloaded` at once.
    pub fn submit(&self, envelope: Envelope) -> Result<oneshot::Receiver<CommandResult>, WriteError> {
        self.submit_scoped(envelope, None)
    }

    /// Like `submit`, for a caller whose credentials cover only the
    /// namespaces in `scope`: the writer checks the command against it (with
    /// the ledger, which knows each task's namespace) before deciding.
    pub fn submit_scoped(
        &self,
        envelope: Envelope,
        scope: Option<Scope>,
    ) -> Result<oneshot::Receiver<CommandResult>, WriteError> {
        check_envelope(&envelope)?;
        if let Health::Failed(reason) = self.health() {
            return Err(WriteError::Unavailable(reason));
        }
        let (reply, receiver) = oneshot::channel();
        match self.tx.try_send(Message::Command(envelope, scope, reply)) {
            Ok(()) => Ok(receiver),
            Err(TrySendError::Full(_)) => {
                self.shared.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(WriteError::Overloaded)
            }
            Err(TrySendError::Disconnected(_)) => Err(WriteError::Unavailable("the writer has stopped".into())),
        }
    }

    /// Submits and waits (for threads, not async tasks).
    pub fn execute(&self, envelope: Envelope) -> CommandResult {
        self.submit(envelope)?
            .blocking_recv()
            .unwrap_or_else(|_| Err(WriteError::Unavailable("the writer stopped before answering".into())))
    }

    /// Submits and awaits (for async tasks).
    pub async fn execute_async(&self, envelope: Envelope) -> CommandResult {
        match self.submit(envelope)?.await {
            Ok(result) => result,
            Err(_) => Err(WriteError::Unavailable("the writer stopped before answering".into())),
        }
    }

    /// Runs `read` on the writer's ledger once every command submitted before
    /// it has been answered, and returns its result. For inspection (tests,
    /// admin views): it holds up the writer while it runs, so keep it short.
    pub fn read<T: Send + 'static>(&self, read: impl FnOnce(&Ledger) -> T + Send + 'static) -> Result<T, WriteError> {
        let (reply, receiver) = std::sync::mpsc::sync_channel(1);
        let message = Message::Read(Box::new(move |ledger: Option<&Ledger>| {
            let _ = reply.send(ledger.map(read));
        }));
        self.tx.send(message).map_err(|_| WriteError::Unavailable("the writer has stopped".into()))?;
        receiver.recv().map_err(|_| WriteError::Unavailable("the writer stopped before answering".into()))?.ok_or_else(
            || {
                WriteError::Unavailable(
                    "the writer's ledger could not be rebuilt from the log after a failed commit; restart the \
                     server (nothing acknowledged is lost)"
                        .into(),
                )
            },
        )
    }

    /// Asks the writer to look at its timers now.
    pub fn tick(&self) {
        let _ = self.tx.try_send(Message::Tick);
    }

    pub fn health(&self) -> Health {
        self.shared.health.lock().expect("health lock").clone()
    }

    pub fn stats(&self) -> &WriterStats {
        &self.shared.stats
    }

    /// The durable head seq; changes after every commit (long-poll claims
    /// and read-your-writes wait on it).
    pub fn work_watch(&self) -> watch::Receiver<ReadyWork> {
        self.shared.work.subscribe()
    }

    /// The head readers see: every record up to it is published to the feed and readable
    /// through [`Self::reader`]. Batches acknowledged while a checkpoint runs become readable
    /// when it is done, so this may trail [`Self::acknowledged_head`] for that long.
    pub fn head_watch(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    /// The head after the last acknowledged batch: every seq a command was answered with is at
    /// or below it, and durable.
    pub fn acknowledged_head(&self) -> u64 {
        self.shared.acknowledged.load(Ordering::Acquire)
    }

    /// The head a read waits for to see every acknowledged write: [`Self::acknowledged_head`],
    /// except after a failed checkpoint or commit, whose held batches (acknowledged while a
    /// checkpoint ran) stay unreadable until a restart (they are durable in the journal, and the
    /// restart has them): then the last seq before them, so reads go on instead of waiting for
    /// records that cannot come.
    pub fn readable_goal(&self) -> u64 {
        self.acknowledged_head().min(self.shared.readable_cap.load(Ordering::Acquire))
    }

    /// After a failed checkpoint, whether acknowledged records cannot be read until a restart
    /// (they are durable in the journal): any at all for `None`, or any of `stream`'s. A read
    /// that needs them must not answer as if they did not exist (a task created with a 201 read
    /// as 404, an online backup that left them out: found by a black-box check on a full disk).
    pub fn has_unreadable_records(&self, stream: Option<&[u8]>) -> bool {
        if self.readable_goal() >= self.acknowledged_head() {
            return false;
        }
        stream.is_none_or(|stream| {
            self.shared.unreadable_streams.lock().expect("unreadable streams lock").contains(stream)
        })
    }

    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    pub fn feed(&self) -> &LiveFeed {
        &self.feed
    }

    pub fn snapshots(&self) -> &SnapshotStore {
        &self.snapshots
    }
}

fn check_envelope(envelope: &Envelope) -> Result<(), WriteError> {
    for (what, value) in [("command_id", &envelope.command_id), ("actor", &envelope.actor)] {
        if value.is_empty() || value.len() > COMMAND_ID_BYTES_MAX || value.chars().any(char::is_control) {
            return Err(WriteError::InvalidEnvelope(format!(
                "{what} must be 1 to {COMMAND_ID_BYTES_MAX} bytes without control characters"
            )));
        }
    }
    if envelope.command.origin() == domain::CommandOrigin::System {
        return Err(WriteError::Forbidden);
    }
    Ok(())
}

/// The running writer: its thread and a handle.
pub struct Writer {
    handle: WriterHandle,
    thread: Option<JoinHandle<()>>,
    snapshotter: Option<JoinHandle<()>>,
    stop_snapshots: Arc<AtomicBool>,
}

/// How the writer started.
#[derive(Clone, Debug)]
pub struct Startup {
    pub head: Head,
    pub fold: FoldStats,
    pub live_tasks: usize,
    pub took: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("open the log at {path}: {source}")]
    Open { path: PathBuf, source: crate::error::OpenError },
    #[error("rebuild the ledger from the log: {0}")]
    Fold(#[from] FoldError),
    #[error("start the writer thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl Writer {
    /// Opens (or creates) the log in `dir`, rebuilds the ledger from the
    /// latest good snapshot plus the records after it, and starts the writer
    /// thread and the snapshot thread.
    pub fn open(
        dir: impl AsRef<Path>,
        config: WriterConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(Writer, Startup), StartError> {
        let dir = dir.as_ref();
        let store = RedbStore::open(dir, config.store.clone())
            .map_err(|source| StartError::Open { path: dir.to_path_buf(), source })?;
        Self::start(store, config, clock)
    }

    /// Starts a writer on an already opened store (tests inject faults this way).
    pub fn start(
        mut store: RedbStore,
        config: WriterConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(Writer, Startup), StartError> {
        let started = std::time::Instant::now();
        // Acknowledged batches are published once readable (see `publish_readable`), so a full
        // journal's checkpoint need not stop the writer.
        store.checkpoint_beside_appends();
        let reader = store.reader();
        let snapshots = store.snapshots().clone();
        // The dedup window (the newest records' command ids) is read on a second thread while
        // this one folds: both are on the restart's critical path and neither needs the other.
        let head = reader.head().map_err(|e| StartError::Fold(FoldError::Read(e)))?;
        let (folded, dedup) = std::thread::scope(|scope| {
            let dedup = std::thread::Builder::new()
                .name("taskledger-dedup-load".into())
                .spawn_scoped(scope, || DedupIndex::rebuild(&reader, head.seq, config.dedup_window_events))?;
            let folded = fold_to(&reader, &snapshots, head.seq);
            let dedup = dedup.join().map_err(|_| std::io::Error::other("the dedup window loader panicked"))?;
            Ok::<_, StartError>((folded, dedup))
        })?;
        let (ledger, fold) = folded?;
        let dedup = dedup.map_err(|e| StartError::Fold(FoldError::Read(e)))?;
        let startup = Startup { head, fold, live_tasks: ledger.live_task_count(), took: started.elapsed() };
        let feed = LiveFeed::after(config.feed_capacity, head.seq);
        let (tx, rx) = std::sync::mpsc::sync_channel(config.channel_capacity.max(1));
        let shared = Arc::new(Shared {
            health: Mutex::new(Health::Healthy),
            stats: WriterStats::default(),
            head: watch::Sender::new(head.seq),
            acknowledged: AtomicU64::new(head.seq),
            readable_cap: AtomicU64::new(u64::MAX),
            unreadable_streams: Mutex::default(),
            work: watch::Sender::new(ReadyWork::new()),
        });
        let handle = WriterHandle {
            tx,
            shared: shared.clone(),
            reader: reader.clone(),
            feed: feed.clone(),
            snapshots: snapshots.clone(),
        };

        // The snapshot thread folds its own replica from the newest snapshot; it starts once the
        // writer is up, so that fold never competes with the restart for the CPU (its
        // subscription reads from disk whatever it missed meanwhile).
        let stop_snapshots = Arc::new(AtomicBool::new(false));
        let snapshotter = (config.snapshot_every_events > 0).then(|| Snapshotter {
            reader: reader.clone(),
            feed: feed.clone(),
            snapshots: snapshots.clone(),
            every: config.snapshot_every_events,
            start: head,
            shared: shared.clone(),
            stop: stop_snapshots.clone(),
        });
        let data_dir = snapshots.dir().parent().unwrap_or(snapshots.dir()).to_path_buf();
        let mut disk = crate::disk::DiskFloor::new(data_dir, config.min_free_disk_bytes);
        // Looked at once now: a start under the floor is logged, and the metrics have a figure.
        disk.look(&shared.stats);
        let acks = Acknowledger::start(feed.clone(), shared.clone())?;
        let state = WriterThread {
            acks,
            touched: Vec::new(),
            store,
            ledger,
            ledger_lost: false,
            dedup,
            clock,
            config,
            rx,
            shared,
            reader,
            unpublished: Default::default(),
            disk,
        };
        let thread = std::thread::Builder::new().name("taskledger-writer".into()).spawn(move || state.run())?;
        let snapshotter = snapshotter
            .map(|snap| std::thread::Builder::new().name("taskledger-snapshots".into()).spawn(move || snap.run()))
            .transpose()?;
        Ok((Writer { handle, thread: Some(thread), snapshotter, stop_snapshots }, startup))
    }

    pub fn handle(&self) -> WriterHandle {
        self.handle.clone()
    }

    /// Stops accepting commands, finishes what is queued, and joins the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // Blocking send: the shutdown message queues behind pending commands,
        // which are therefore all answered first.
        let _ = self.handle.tx.send(Message::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.stop_snapshots.store(true, Ordering::SeqCst);
        if let Some(thread) = self.snapshotter.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command of the current batch, waiting for the commit.
struct Pending {
    reply: oneshot::Sender<CommandResult>,
    result: Result<Acknowledgement, WriteError>,
}

struct WriterThread {
    acks: Acknowledger,
    /// Namespaces the current batch's events concern, noted before each is applied.
    touched: Vec<domain::Namespace>,
    store: RedbStore,
    ledger: Ledger,
    /// Set when a failed commit left `ledger` neither as before the batch nor as the log holds
    /// it (the log could not be read to rebuild it): reads are refused, not answered from it.
    ledger_lost: bool,
    dedup: DedupIndex,
    clock: Arc<dyn Clock>,
    config: WriterConfig,
    rx: Receiver<Message>,
    shared: Arc<Shared>,
    reader: LogReader,
    /// Batches acknowledged while a checkpoint ran, not readable yet: `(head after, records)`,
    /// published in order once the store's readable head reaches them.
    unpublished: std::collections::VecDeque<(u64, Vec<crate::record::StoredRecord>)>,
    disk: crate::disk::DiskFloor,
}

/// Work for the acknowledger thread, in batch order.
enum AckJob {
    /// Publish the committed records, answer the batch, then advance the head watch.
    Committed {
        records: Vec<crate::record::StoredRecord>,
        pending: Vec<Pending>,
        head_seq: u64,
        /// Namespaces the batch touched that have claimable steps after it.
        ready: Vec<domain::Namespace>,
    },
    /// Answers that carry no new records (rejections, repeats, a failed commit's errors).
    Answer { pending: Vec<Pending>, head_seq: u64 },
    /// Answer a batch that is durable but not readable yet (appended while a checkpoint ran):
    /// signal the namespaces with work and answer, but neither publish nor move the head watch.
    Held { pending: Vec<Pending>, head_seq: u64, ready: Vec<domain::Namespace> },
    /// Publish held records once they are readable, then advance the head watch.
    Publish { records: Vec<crate::record::StoredRecord>, head_seq: u64 },
}

/// The writer's end of the acknowledger thread.
struct Acknowledger {
    tx: Option<std::sync::mpsc::Sender<AckJob>>,
    thread: Option<JoinHandle<()>>,
    /// Jobs sent and not yet finished by the thread.
    in_flight: Arc<AtomicUsize>,
    feed: LiveFeed,
    shared: Arc<Shared>,
}

/// Most commands a batch may have for the writer to answer it itself when the acknowledger is
/// idle: waking the acknowledger costs a thread hop on the path of a lone submitter (measured
/// ~5 % of its round trip), while answering many commands is better done beside the next batch.
const INLINE_ANSWERS_MAX: usize = 2;
/// Most records such a batch may publish (a batch of due timers has no command but may have
/// many records).
const INLINE_RECORDS_MAX: usize = 64;

impl Acknowledger {
    fn start(feed: LiveFeed, shared: Arc<Shared>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<AckJob>();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (feed, shared, in_flight) = (feed.clone(), shared.clone(), in_flight.clone());
            std::thread::Builder::new().name("taskledger-acks".into()).spawn(move || {
                for job in rx {
                    deliver(&feed, &shared, job);
                    in_flight.fetch_sub(1, Ordering::Release);
                }
            })?
        };
        Ok(Self { tx: Some(tx), thread: Some(thread), in_flight, feed, shared })
    }

    fn send(&self, job: AckJob) {
        let (answers, records) = match &job {
            AckJob::Committed { pending, records, .. } => (pending.len(), records.len()),
            AckJob::Answer { pending, .. } | AckJob::Held { pending, .. } => (pending.len(), 0),
            AckJob::Publish { records, .. } => (0, records.len()),
        };
        // Only the writer sends, so nothing can be queued behind an idle thread: delivering
        // here keeps batch order.
        if answers <= INLINE_ANSWERS_MAX && records <= INLINE_RECORDS_MAX && self.in_flight.load(Ordering::Acquire) == 0
        {
            deliver(&self.feed, &self.shared, job);
            return;
        }
        if let Some(tx) = &self.tx {
            self.in_flight.fetch_add(1, Ordering::Release);
            // The thread only ends after `finish`, so this cannot fail while the writer runs.
            let _ = tx.send(job);
        }
    }

    /// Delivers everything queued and stops the thread.
    fn finish(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Publishes a batch's records, signals the namespaces with work, answers its commands and
/// advances the head watch, in that order.
fn deliver(feed: &LiveFeed, shared: &Shared, job: AckJob) {
    match job {
        AckJob::Committed { records, pending, head_seq, ready } => {
            feed.publish_owned(records);
            signal_work(shared, ready);
            shared.acknowledged.fetch_max(head_seq, Ordering::AcqRel);
            answer(pending, head_seq);
            shared.head.send_replace(head_seq);
        }
        AckJob::Answer { pending, head_seq } => answer(pending, head_seq),
        AckJob::Held { pending, head_seq, ready } => {
            signal_work(shared, ready);
            shared.acknowledged.fetch_max(head_seq, Ordering::AcqRel);
            answer(pending, head_seq);
        }
        AckJob::Publish { records, head_seq } => {
            feed.publish_owned(records);
            shared.head.send_replace(head_seq);
        }
    }
}

/// Wakes the workers waiting on the namespaces that have claimable steps. Before the answers:
/// a producer told "created" finds the waiting workers already woken.
fn signal_work(shared: &Shared, ready: Vec<domain::Namespace>) {
    if !ready.is_empty() {
        shared.work.send_modify(|work| {
            for namespace in ready {
                *work.entry(namespace).or_default() += 1;
            }
        });
    }
}

/// Sends each command its result, stamped with the head after its batch.
fn answer(pending: Vec<Pending>, head_seq: u64) {
    for Pending { reply, result } in pending {
        let result = result.map(|mut ack| {
            ack.head_seq = head_seq;
            ack
        });
        let _ = reply.send(result);
    }
}

/// Longest the writer sleeps without looking at its timers.
const IDLE_WAKE: Duration = Duration::from_millis(500);
/// How far the clock may fall behind the log's recorded time before it is logged (1 s).
pub const CLOCK_BEHIND_WARN_US: i64 = 1_000_000;
/// How often an idle writer looks whether the running checkpoint is done, while it holds
/// acknowledged batches that readers cannot see yet.
const HELD_POLL: Duration = Duration::from_millis(1);

impl WriterThread {
    fn run(mut self) {
        let mut shutting_down = false;
        while !shutting_down {
            let mut wait = self.time_to_next_timer();
            if !self.unpublished.is_empty() {
                // Held batches become readable when the checkpoint is done: look again soon.
                wait = wait.min(HELD_POLL);
            }
            let first = match self.rx.recv_timeout(wait) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = Vec::new();
            let mut queued_events = 0usize;
            let mut next = first;
            while let Some(message) = next.take() {
                match message {
                    Message::Command(envelope, scope, reply) => {
                        queued_events += estimated_events(&envelope.command);
                        batch.push((envelope, scope, reply));
                    }
                    Message::Tick => {}
                    Message::Read(read) => {
                        // Commands already drained must be decided first.
                        self.process(std::mem::take(&mut batch));
                        queued_events = 0;
                        read((!self.ledger_lost).then_some(&self.ledger));
                    }
                    Message::Shutdown => {
                        shutting_down = true;
                        break;
                    }
                }
                if queued_events >= self.config.batch_events_max {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            self.process(batch);
            self.publish_readable(false);
        }
        self.publish_readable(true);
        self.acks.finish();
    }

    /// Publishes the held batches the store's readers see by now (waiting for the checkpoint
    /// when `wait`). A failed checkpoint stops the writer, as a failed commit does.
    fn publish_readable(&mut self, wait: bool) {
        if self.unpublished.is_empty() {
            return;
        }
        match self.store.settle(wait) {
            Ok(readable) => {
                while let Some((head_seq, _)) = self.unpublished.front()
                    && *head_seq <= readable.seq
                {
                    let (head_seq, records) = self.unpublished.pop_front().expect("just looked");
                    self.acks.send(AckJob::Publish { records, head_seq });
                }
            }
            Err(error) => {
                // Everything acknowledged is in the journal; the ledger in memory holds it too.
                // What failed is making it readable: stop taking writes until a restart replays it.
                // The streams first, then the cap: a read between the two would see the cap with
                // no stream named, and answer without the held records (found by review).
                let cap = self.unpublished.front().and_then(|(_, records)| records.first()).map(|first| first.seq - 1);
                let mut unreadable = self.shared.unreadable_streams.lock().expect("unreadable streams lock");
                for (_, records) in self.unpublished.drain(..) {
                    unreadable.extend(records.into_iter().map(|record| record.stream));
                }
                drop(unreadable);
                if let Some(cap) = cap {
                    self.shared.readable_cap.store(cap, Ordering::Release);
                }
                // After a failed commit the store refuses to settle too: the health keeps the
                // commit's own reason, which names the cause (it was overwritten with "the store
                // is poisoned", found by a review).
                let mut health = self.shared.health.lock().expect("health lock");
                if !matches!(*health, Health::Failed(_)) {
                    *health = Health::Failed(format!("checkpoint failed: {error}"));
                }
            }
        }
    }

    /// The time a batch is recorded at: the clock's, but never before the last record's. A
    /// clock set back makes time stand still until it catches up (leases, retries and `run_at`
    /// fall due that much later), which is counted and logged rather than silent.
    fn now(&self) -> Timestamp {
        let floor = self.store.last_recorded_at_us().unwrap_or(i64::MIN).max(self.ledger.last_event_at().as_micros());
        let clock = self.clock.now_us();
        let behind = floor.saturating_sub(clock).max(0);
        let before = self.shared.stats.clock_behind_us.swap(behind, Ordering::Relaxed);
        if behind > CLOCK_BEHIND_WARN_US && before <= CLOCK_BEHIND_WARN_US {
            tracing::warn!(
                behind_s = behind as f64 / 1e6,
                "the system clock is behind the log's last recorded time (it was set back): recorded time stands \
                 still, and leases, retries and run_at fall due that much later, until the clock catches up"
            );
        } else if behind <= CLOCK_BEHIND_WARN_US && before > CLOCK_BEHIND_WARN_US {
            tracing::info!("the system clock has caught up with the log's recorded time");
        }
        Timestamp::from_micros(clock.max(floor))
    }

    fn time_to_next_timer(&self) -> Duration {
        match self.ledger.next_timer_due() {
            Some(due) if self.healthy() => {
                let now = self.clock.now_us();
                Duration::from_micros(u64::try_from(due.as_micros().saturating_sub(now)).unwrap_or(0)).min(IDLE_WAKE)
            }
            _ => IDLE_WAKE,
        }
    }

    fn healthy(&self) -> bool {
        matches!(*self.shared.health.lock().expect("health lock"), Health::Healthy)
    }

    /// Decides, commits and acknowledges the commands drained, in batches of at most
    /// `batch_bytes_max` bytes of records (and one command).
    fn process(&mut self, mut batch: Vec<Submitted>) {
        loop {
            let rest = self.process_one_batch(batch);
            if rest.is_empty() {
                return;
            }
            self.publish_readable(false);
            batch = rest;
        }
    }

    /// Decides, commits and acknowledges one batch, and gives back the commands it did not take
    /// (those after its records reached `batch_bytes_max`).
    fn process_one_batch(&mut self, batch: Vec<Submitted>) -> Vec<Submitted> {
        // Looked at first, so its gauges stay current whatever happens next.
        self.disk.look(&self.shared.stats);
        if let Health::Failed(reason) = self.shared.health.lock().expect("health lock").clone() {
            let pending = batch
                .into_iter()
                .map(|(_, _, reply)| Pending { reply, result: Err(WriteError::Unavailable(reason.clone())) })
                .collect();
            self.acks.send(AckJob::Answer { pending, head_seq: self.store.head().seq });
            return Vec::new();
        }
        let now = self.now();
        let at_us = now.as_micros();
        let mut records: Vec<NewRecord> = Vec::new();
        let mut pending: Vec<Pending> = Vec::with_capacity(batch.len());
        // Command ids accepted in this batch, with their seqs.
        let mut in_batch: domain::FastMap<String, SeqRange> =
            domain::FastMap::with_capacity_and_hasher(batch.len(), Default::default());
        let mut new_streams: domain::FastSet<TaskId> = domain::FastSet::default();
        let head_before = self.store.head().seq;

        // System commands for due timers go first, through the same path.
        self.touched.clear();
        let timers: Vec<domain::Timer> =
            self.ledger.due_timers(now, self.config.timers_per_batch_max).copied().collect();
        for timer in timers {
            let Some(command) = self.ledger.timer_command(&timer) else { continue };
            if let Ok(events) = self.ledger.decide(&command, now) {
                let command_id = format!("timer:{}:{}:{}", command.kind(), timer.task, timer.step.0);
                for event in &events {
                    note_namespace(&self.ledger, event, &mut self.touched);
                    self.ledger.apply(event).expect("decided events apply");
                    records.push(encode_event(event, &command_id, "system", at_us));
                }
            }
        }

        let mut rest = Vec::new();
        let mut record_bytes: usize = records.iter().map(stored_bytes).sum();
        let mut commands = batch.into_iter();
        while let Some((envelope, scope, reply)) = commands.next() {
            let records_before = records.len();
            let result = self.decide_one(
                scope.as_deref(),
                &envelope,
                now,
                &mut records,
                &mut in_batch,
                &mut new_streams,
                head_before,
            );
            pending.push(Pending { reply, result });
            record_bytes += records[records_before..].iter().map(stored_bytes).sum::<usize>();
            if record_bytes >= self.config.batch_bytes_max {
                rest = commands.collect();
                break;
            }
        }

        if records.is_empty() {
            self.acks.send(AckJob::Answer { pending, head_seq: self.store.head().seq });
            return rest;
        }
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        touched.retain(|namespace| self.ledger.ready_count(namespace) > 0);
        // The dedup window lives in memory (see dedup.rs): nothing but the
        // records goes into the transaction.
        let commit_started = std::time::Instant::now();
        let appended = self.store.append(&records, &[]);
        let commit_us = commit_started.elapsed().as_micros() as u64;
        match appended {
            Ok(appended) => {
                let head = appended.head.seq;
                self.disk.note_appended(records.iter().map(|r| r.payload.len() as u64 + 64).sum());
                let stats = &self.shared.stats;
                count_into(&stats.commit_us_buckets, &COMMIT_BUCKETS_US, commit_us);
                stats.commit_us_total.fetch_add(commit_us, Ordering::Relaxed);
                count_into(&stats.batch_size_buckets, &BATCH_SIZE_BUCKETS, appended.records.len() as u64);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.commands.fetch_add(pending.len() as u64, Ordering::Relaxed);
                stats.events.fetch_add(appended.records.len() as u64, Ordering::Relaxed);
                if appended.readable {
                    // Held batches before this one are readable too by now, and go first.
                    self.publish_readable(false);
                    self.acks.send(AckJob::Committed {
                        records: appended.records,
                        pending,
                        head_seq: head,
                        ready: touched,
                    });
                } else {
                    stats.held_batches.fetch_add(1, Ordering::Relaxed);
                    self.unpublished.push_back((head, appended.records));
                    self.acks.send(AckJob::Held { pending, head_seq: head, ready: touched });
                }
                // After the answers are on their way: only this thread's next batch reads the
                // window, so a repeat sent the moment its answer arrives still finds it.
                for (id, range) in in_batch.drain() {
                    self.dedup.insert(&id, range, head);
                }
            }
            Err(error) => self.fail(pending, error.to_string(), error.is_storage_full()),
        }
        rest
    }

    /// Decides one client command into the batch. Seq numbers are predicted
    /// from the head (the store assigns them gaplessly in order) and only
    /// reported after the commit.
    #[allow(clippy::too_many_arguments)]
    fn decide_one(
        &mut self,
        scope: Option<&[domain::Namespace]>,
        envelope: &Envelope,
        now: Timestamp,
        records: &mut Vec<NewRecord>,
        in_batch: &mut domain::FastMap<String, SeqRange>,
        new_streams: &mut domain::FastSet<TaskId>,
        head_before: u64,
    ) -> Result<Acknowledgement, WriteError> {
        // The caller's scope first: a command outside it is refused as it would be under any
        // other id, so that the answer does not tell whether another tenant used this one.
        // (A task no longer in memory passes, so a repeat of a command on it still finds its id.)
        if let Some(allowed) = scope {
            self.ledger.check_scope(&envelope.command, allowed).map_err(WriteError::Rejected)?;
        }
        // A repeat: of a command earlier in this batch (a client that retried before the first
        // was answered: it was refused with a 400, which clients take as final), or in the dedup
        // window. Either is answered as the original, from its records, after this batch commits.
        // An id the server minted cannot come again: nothing to look up, nothing to keep.
        let deduplicated = crate::dedup::is_deduplicated(&envelope.command_id);
        if deduplicated && let Some(&range) = in_batch.get(&envelope.command_id) {
            let index = |seq: u64| (seq - head_before - 1) as usize;
            let originals = &records[index(range.first)..=index(range.last)];
            let events = originals
                .iter()
                .zip(range.first..)
                .map(|(record, seq)| {
                    crate::fold::decode_payload(seq, record.event_type, record.schema_version, &record.payload)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| WriteError::CommitFailed(e.to_string()))?;
            let original_actor = originals.first().map(|record| record.actor.clone());
            return Ok(self.repeated(&envelope.command, range, events, original_actor));
        }
        // As of this command's place in the log (after the batch's earlier records), so that whether
        // a repeat at the window's edge is one does not depend on how commands met in batches.
        let head_here = head_before + records.len() as u64;
        if deduplicated && let Some(range) = self.dedup.get(&envelope.command_id, head_here) {
            return self.replay_outcome(&envelope.command, range);
        }
        // Under the disk's floor no new work is taken; what is in flight goes on (see `disk`).
        let new_work = crate::disk::new_work_bytes(&envelope.command);
        if new_work > 0 {
            self.disk.admits(new_work).map_err(WriteError::StorageLow)?;
        }
        let events = self.ledger.decide(&envelope.command, now).map_err(WriteError::Rejected)?;
        // A task id is unique for all time, not just among live tasks.
        let created: Vec<TaskId> = events.iter().filter_map(Event::created_task).collect();
        for id in &created {
            let on_disk = self
                .store
                .stream_version_cached(&StreamId::task_key(id))
                .map_err(|e| WriteError::CommitFailed(e.to_string()))?;
            if on_disk > 0 || new_streams.contains(id) {
                return Err(WriteError::Rejected(Rejection::new(
                    RejectionCode::TaskExists,
                    Some("id"),
                    format!("task id {id} was already used"),
                )));
            }
        }
        // Encoded before anything is applied: a record the log cannot hold (the domain's limits
        // let a task's payloads add up past a record's) refuses this command alone. Found by
        // the store, it would fail the whole batch and stop the writer.
        let encoded: Vec<NewRecord> = events
            .iter()
            .map(|event| encode_event(event, &envelope.command_id, &envelope.actor, now.as_micros()))
            .collect();
        let unstorable = encoded.iter().zip(&events).find_map(|(record, event)| {
            crate::record::check_new(record).err().map(|problem| (event.type_name(), problem))
        });
        if let Some((event_type, problem)) = unstorable {
            return Err(WriteError::Rejected(Rejection::new(
                RejectionCode::PayloadTooLarge,
                None,
                format!(
                    "the log cannot hold its {event_type} event ({problem}): send smaller payloads, or a \
                     workflow's steps in several commands"
                ),
            )));
        }
        let command_bytes: usize = encoded.iter().map(stored_bytes).sum();
        if command_bytes > self.config.command_bytes_max {
            return Err(WriteError::Rejected(Rejection::new(
                RejectionCode::PayloadTooLarge,
                None,
                format!(
                    "its {} events would take {command_bytes} bytes in the log, above the {} one command may \
                     write: send the tasks in several batches",
                    encoded.len(),
                    self.config.command_bytes_max
                ),
            )));
        }
        new_streams.extend(created.iter().copied());
        let first = head_here + 1;
        let mut claimed = Vec::new();
        for (event, record) in events.iter().zip(encoded) {
            note_namespace(&self.ledger, event, &mut self.touched);
            self.ledger.apply(event).expect("decided events apply");
            records.push(record);
            if let Some(work) = self.ledger.claimed_step(event) {
                claimed.push(work);
            }
        }
        let seqs = (!events.is_empty()).then(|| SeqRange { first, last: first + events.len() as u64 - 1 });
        let task_ids = self.tasks_named(&envelope.command, created);
        if deduplicated && let Some(range) = seqs {
            in_batch.insert(envelope.command_id.clone(), range);
        }
        Ok(Acknowledgement {
            seqs,
            head_seq: 0,
            events,
            claimed,
            task_ids,
            duplicate: false,
            differs_from_original: false,
            original_actor: None,
        })
    }

    /// [`Acknowledgement::task_ids`] of `command`, whose events (applied) created `created`.
    fn tasks_named(&self, command: &Command, created: impl IntoIterator<Item = TaskId>) -> Vec<TaskId> {
        let specs = match command {
            Command::CreateTask(spec) => std::slice::from_ref(spec),
            Command::CreateTasks(specs) => specs.as_slice(),
            _ => return Vec::new(),
        };
        self.ledger.tasks_named_by(specs, created)
    }

    /// The original answer to a repeated command id, rebuilt from the log.
    fn replay_outcome(&self, command: &Command, range: SeqRange) -> Result<Acknowledgement, WriteError> {
        let mut events = Vec::new();
        let wanted = (range.last - range.first + 1) as usize;
        let mut records = self
            .reader
            .read_range(range.first, range.last, wanted)
            .map_err(|e| WriteError::CommitFailed(e.to_string()))?;
        // Records held during a checkpoint are not readable yet; the writer has them.
        let next = records.last().map_or(range.first, |r| r.seq + 1);
        let held = self.unpublished.iter().flat_map(|(_, records)| records);
        records.extend(held.filter(|r| r.seq >= next && r.seq <= range.last).cloned());
        if records.len() != wanted {
            return Err(WriteError::CommitFailed(format!(
                "the records of seqs {}..={} are neither readable nor held",
                range.first, range.last
            )));
        }
        for record in &records {
            events.push(decode_event(record).map_err(|e| WriteError::CommitFailed(e.to_string()))?);
        }
        Ok(self.repeated(command, range, events, records.first().map(|record| record.actor.clone())))
    }

    /// The answer to `command`, a repeat of the command whose `events` (applied) are at `range`.
    fn repeated(
        &self,
        command: &Command,
        range: SeqRange,
        events: Vec<Event>,
        original_actor: Option<String>,
    ) -> Acknowledgement {
        // A claim's work is handed out again if the leases are still live, with their deadlines
        // as they are now (a heartbeat may have moved them since the claim).
        let claimed = events
            .iter()
            .filter_map(|e| self.ledger.claimed_step(e))
            .filter_map(|mut c| {
                let task = self.ledger.task(&c.task)?;
                let step = &task.steps[task.step_index(&c.step)?.get()];
                if step.epoch != c.epoch || step.state != domain::StepState::InProgress {
                    return None;
                }
                c.lease_deadline = step.lease_deadline.unwrap_or(c.lease_deadline);
                Some(c)
            })
            .collect();
        let task_ids = self.tasks_named(command, events.iter().filter_map(Event::created_task));
        let differs_from_original = !self.ledger.repeats(command, &events);
        Acknowledgement {
            seqs: Some(range),
            head_seq: 0,
            events,
            claimed,
            task_ids,
            duplicate: true,
            differs_from_original,
            original_actor,
        }
    }

    /// A commit failed: answer every command of the batch with an error,
    /// put memory back to what the log durably holds, stop taking writes.
    fn fail(&mut self, pending: Vec<Pending>, reason: String, storage_full: bool) {
        let what = if storage_full { "commit failed, the disk is full" } else { "commit failed" };
        *self.shared.health.lock().expect("health lock") = Health::Failed(format!("{what}: {reason}"));
        let pending = pending
            .into_iter()
            .map(|Pending { reply, result }| Pending {
                reply,
                result: match result {
                    Ok(_) if storage_full => Err(WriteError::StorageFull(reason.clone())),
                    Ok(_) => Err(WriteError::CommitFailed(reason.clone())),
                    Err(e) => Err(e),
                },
            })
            .collect();
        self.acks.send(AckJob::Answer { pending, head_seq: self.store.head().seq });
        match fold_to_head(&self.reader, self.store.snapshots()) {
            Ok((mut ledger, head, _)) => {
                // Batches acknowledged while a checkpoint ran are durable in the journal but
                // maybe not in what the reader folded: memory keeps them (once).
                let held = self.unpublished.iter().flat_map(|(_, records)| records);
                for record in held.filter(|record| record.seq > head.seq) {
                    if let Ok(event) = crate::fold::decode_event(record) {
                        let _ = ledger.apply(&event);
                    }
                }
                self.ledger = ledger;
                if let Ok(dedup) = DedupIndex::rebuild(&self.reader, head.seq, self.config.dedup_window_events) {
                    self.dedup = dedup;
                }
            }
            Err(e) => {
                *self.shared.health.lock().expect("health lock") =
                    Health::Failed(format!("{what}: {reason}; the ledger could not be rebuilt: {e}"));
                self.ledger = Ledger::new();
                self.ledger_lost = true;
            }
        }
    }
}

/// Adds the namespace `event` concerns (its task's, or its queue's) to
/// `into`. Called before the event is applied: a finishing task (which frees
/// a concurrency slot) may leave the ledger with it.
fn note_namespace(ledger: &Ledger, event: &Event, into: &mut Vec<domain::Namespace>) {
    match event {
        Event::TaskCreated { spec, .. } => into.push(spec.namespace.clone()),
        Event::StepClaimed { .. } | Event::LeaseExtended { .. } | Event::QueuePaused { .. } => {}
        _ => match event.stream() {
            StreamId::Queue(namespace) => into.push(namespace),
            StreamId::Task(id) => {
                if let Some(task) = ledger.task(&id) {
                    into.push(task.namespace.clone());
                }
            }
        },
    }
}

/// An upper bound on the events a command may produce, for batch sizing.
fn estimated_events(command: &Command) -> usize {
    match command {
        Command::CreateTasks(specs) => specs.len(),
        Command::ClaimSteps { max, .. } => *max as usize,
        _ => 1,
    }
}

/// Keeps its own replica of the ledger by following the log, and writes a
/// snapshot of it every `every` events. Living off the writer thread (it
/// folds its replica from disk itself at startup, and then follows the live
/// feed), it never delays an acknowledgement: the writer only publishes
/// records. The price is a second copy of the ledger in memory.
struct Snapshotter {
    reader: LogReader,
    feed: LiveFeed,
    snapshots: SnapshotStore,
    every: u64,
    /// The head when the writer started.
    start: Head,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

/// How much the snapshot thread's nice value is raised above the writer's. It keeps a
/// replica of the ledger by applying every event a second time (about a ninth of the server's
/// CPU under a batch-create load), and nothing waits for it: under full load the writer, the
/// acknowledger and the HTTP workers go first, and the replica catches up (from the feed, or
/// from disk past the live buffer) when there is CPU to spare. Measured on 2 cores, batch
/// create: 95.1k against 88.4k tasks/s on the means of nine interleaved pairs.
pub const SNAPSHOT_THREAD_NICE_INCREMENT: i32 = 10;

/// Raises the calling thread's nice value by `increment`, up to 19 (Linux: per thread). Best
/// effort: a failure leaves the thread at its priority.
pub fn lower_this_threads_priority(increment: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: plain system calls about the calling thread's own id; no memory is passed.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, current.saturating_add(increment).min(19));
    }
    #[cfg(not(target_os = "linux"))]
    let _ = increment;
}

/// Puts the calling thread in Linux's idle scheduling class (`SCHED_IDLE`, per thread): it
/// runs only on CPU no other thread of a normal class wants, and a normal thread that wakes
/// takes the core from it at once, where a thread at nice 19 still holds it until the
/// scheduler's next decision. For work whose only cost of waiting is its own delay. Best
/// effort: a failure leaves the thread at its priority.
fn put_this_thread_in_the_idle_class() {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain system call about the calling thread's own id, with a parameter that
    // lives across the call.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(libc::gettid(), libc::SCHED_IDLE, &param);
    }
}

/// Threads put in the idle scheduling class that can all be lifted out of it at once: the
/// server's bulk-read threads, whose work still in flight when it stops (a feed read through the
/// shutdown's grace, a socket completing its subscriptions) must not wait for CPU that other
/// processes hold. Under two busy processes a stop cut such a feed short after the whole 10 s
/// grace (found by a review).
#[derive(Clone, Default)]
pub struct IdleClassThreads(Arc<Mutex<IdleThreads>>);

#[derive(Default)]
struct IdleThreads {
    /// The threads counted in (Linux thread ids).
    ids: Vec<i32>,
    /// Lifted: threads started since stay in the normal class.
    lifted: bool,
}

impl IdleClassThreads {
    /// Puts the calling thread in the idle class (unless the threads were lifted already) and
    /// counts it in; for a runtime's `on_thread_start`.
    pub fn enter_this_thread(&self) {
        let mut threads = self.0.lock().expect("idle thread ids");
        if !threads.lifted {
            put_this_thread_in_the_idle_class();
        }
        threads.ids.push(this_thread_id());
    }

    /// Counts the calling thread out; for a runtime's `on_thread_stop`.
    pub fn leave_this_thread(&self) {
        let id = this_thread_id();
        self.0.lock().expect("idle thread ids").ids.retain(|t| *t != id);
    }

    /// Moves every thread counted in to the normal class (`SCHED_OTHER`, at its nice value), and
    /// threads that start later stay there. Linux lets a thread leave the idle class only with
    /// `CAP_SYS_NICE` (which root has, unless its container drops it) or an `RLIMIT_NICE` of 20:
    /// the first refusal is returned, after every thread was tried.
    pub fn lift(&self) -> std::io::Result<()> {
        let mut threads = self.0.lock().expect("idle thread ids");
        threads.lifted = true;
        #[cfg(target_os = "linux")]
        let first_error = threads
            .ids
            .iter()
            .filter_map(|&id| {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: a plain system call about a thread of this process, with a parameter
                // that lives across the call.
                let refused = unsafe { libc::sched_setscheduler(id, libc::SCHED_OTHER, &param) } != 0;
                refused.then(std::io::Error::last_os_error)
            })
            .fold(None, |first, error| first.or(Some(error)));
        #[cfg(not(target_os = "linux"))]
        let first_error = None;
        first_error.map_or(Ok(()), Err)
    }
}

fn this_thread_id() -> i32 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: no arguments, no memory.
        unsafe { libc::gettid() }
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

impl Snapshotter {
    fn run(self) {
        lower_this_threads_priority(SNAPSHOT_THREAD_NICE_INCREMENT);
        // Every failure is logged and counted: they were silent (found by a black-box check: with
        // the descriptors used up, due snapshots were skipped without a word), and the thread
        // stopping meant no snapshot ever again, so restarts replayed ever more of the log.
        let stopped = |why: String| {
            self.shared.stats.snapshot_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %why, "the snapshot thread stopped: no more snapshots until a restart");
        };
        let (mut ledger, stats) = match crate::fold::fold_to(&self.reader, &self.snapshots, self.start.seq) {
            Ok(folded) => folded,
            Err(e) => return stopped(format!("fold the log to seq {}: {e}", self.start.seq)),
        };
        let mut head = self.start;
        let mut last_snapshot_seq = stats.snapshot_seq;
        let mut subscription = crate::feed::Subscription::new(self.reader.clone(), self.feed.clone(), head.seq + 1);
        // A snapshot is due once the replica is `every` records past the
        // last one. It is checked after every record, not every batch, so
        // where snapshots fall does not depend on how the feed happened to
        // batch records.
        let take_snapshot_if_due = |ledger: &Ledger, head: Head, last: &mut u64| {
            if head.seq >= *last + self.every {
                let body = snapshot_body(ledger);
                match self.snapshots.write(head, &body) {
                    Ok(_) => {
                        self.shared.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.shared.stats.snapshot_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(seq = head.seq, error = %e, "a snapshot could not be written; the next is due after another interval");
                    }
                }
                // On a write failure, wait another interval rather than retry at once.
                *last = head.seq;
            }
        };
        take_snapshot_if_due(&ledger, head, &mut last_snapshot_seq);
        // The ring's own records, not copies: this thread only reads them.
        let mut batch: Vec<Arc<crate::record::StoredRecord>> = Vec::new();
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = subscription.next_batch_into(4096, Duration::from_millis(100), &mut batch) {
                return stopped(format!("read the log after seq {}: {e}", head.seq));
            }
            for record in &batch {
                let event = match decode_event(record) {
                    Ok(event) => event,
                    Err(e) => return stopped(format!("decode seq {}: {e}", record.seq)),
                };
                // The event is this thread's own copy: the replica takes its strings.
                if let Err(e) = ledger.apply_owned(event) {
                    return stopped(format!("apply seq {}: {e}", record.seq));
                }
                head = Head { seq: record.seq, hash: record.hash };
                take_snapshot_if_due(&ledger, head, &mut last_snapshot_seq);
            }
        }
    }
}
