//! `taskledger serve`: opens the ledger, starts the writer, and serves the
//! HTTP API until SIGINT or SIGTERM; then it stops accepting connections,
//! lets in-flight requests finish, drains the writer and exits.
//!
//! Also here: the operational routes (`/healthz`, `/readyz`, `/metrics`,
//! `/openapi.json`), the request limits (body size, timeout, concurrent
//! requests) that every route shares, and the connection limits (how many
//! connections are open at once, how long a client may take to send a
//! request head), which live in this file's own accept loop because
//! `axum::serve` exposes neither.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use eventlog::{Health, IdleClassThreads, SystemClock, Writer, WriterConfig, WriterHandle};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing_subscriber::filter::Targets;

use crate::auth::{HasTokens, TokenSource, Tokens};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::projections_slot::{ProjectionsSlot, ProjectionsTarget};
use crate::request_log::WithRequest;

/// Everything a request handler can reach. Cloned for every request (axum's `State`), so it is
/// one `Arc`: a clone is one atomic increment rather than one per handle inside (cloning and
/// dropping the handles was ~5 % of the HTTP workers' CPU under `taskledger-bench` lifecycle).
#[derive(Clone)]
pub struct AppState(Arc<AppContext>);

/// What [`AppState`] shares.
pub struct AppContext {
    pub writer: WriterHandle,
    pub projections: ProjectionsSlot,
    pub tokens: Tokens,
    pub metrics: Arc<Metrics>,
    pub ready_max_lag: u64,
    /// Turns `true` when the server starts shutting down: answers that would otherwise go on
    /// (a following event feed, a long-polling claim) end then, so their connections can close.
    pub stopping: watch::Receiver<bool>,
    /// The longest a long-polling claim waits: half the request timeout, so that it answers
    /// (with nothing claimed) well before the request would be cut off with a 408.
    pub long_poll_limit: Duration,
    /// The largest request body (`--max-body-bytes`), and so the largest WebSocket message.
    pub max_body_bytes: usize,
    /// WebSockets open: a shutdown waits (briefly) for them to close with their close frame.
    pub open_sockets: Arc<OpenSockets>,
    /// Event feeds and subscriptions open per token (`--max-streams-per-token`).
    pub streams: Arc<crate::streams::StreamSlots>,
    /// Folds of tasks with long histories, kept between reads.
    pub task_folds: crate::task_folds::TaskFolds,
    /// Where event feeds and subscriptions that are catching up make their batches (see
    /// `bulk_read_runtime`).
    pub bulk_reads: tokio::runtime::Handle,
    /// The newest records' event feed lines, made once for every feed that sends them.
    pub feed_lines: Arc<crate::feed_lines::FeedLines>,
}

/// How many WebSockets are open, for a shutdown to wait on. (An upgraded connection leaves
/// hyper, so the wait for connections does not see it: the server exited under them, and
/// clients saw the socket end without a close frame.)
#[derive(Default)]
pub struct OpenSockets {
    open: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::Notify,
}

/// One open WebSocket, counted in [`OpenSockets`] until dropped.
pub struct OpenSocket(Arc<OpenSockets>);

impl OpenSockets {
    pub fn open(self: &Arc<Self>) -> OpenSocket {
        self.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        OpenSocket(self.clone())
    }

    /// Waits until every socket has closed, at most `limit`.
    pub async fn all_closed(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            loop {
                let closed = self.closed.notified();
                if self.open.load(std::sync::atomic::Ordering::Acquire) == 0 {
                    return;
                }
                closed.await;
            }
        })
        .await;
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.closed.notify_waiters();
    }
}

impl AppState {
    pub fn new(context: AppContext) -> Self {
        Self(Arc::new(context))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppContext;

    fn deref(&self) -> &AppContext {
        &self.0
    }
}

impl HasTokens for AppState {
    fn tokens(&self) -> &Tokens {
        &self.tokens
    }
}

/// How `serve` runs; every limit is explicit.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub tokens_file: Option<PathBuf>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// Most connections open at once; the next one is accepted when one closes.
    pub max_connections: usize,
    /// How long a client may take to send a complete request head (also the
    /// idle time allowed between requests on a kept-alive connection).
    pub header_read_timeout: Duration,
    pub writer: WriterConfig,
    pub json_logs: bool,
    /// `postgres://…` for PostgreSQL projections; default: `<data>/projections.sqlite`.
    pub projections: Option<String>,
    /// How the projections store is opened (SQLite's page cache per connection).
    pub projections_store: projections::StoreOptions,
    /// `/readyz` fails while any projector lags more than this many events.
    pub ready_max_lag: u64,
    /// Most event feeds and GraphQL subscriptions one token holds open at once.
    pub max_streams_per_token: usize,
}

pub fn app(state: AppState, config: &ServeConfig) -> Router {
    let schema = crate::graphql::schema(state.clone());
    crate::routes::router()
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::routes::refuse_query_on_commands))
        .route("/graphql", get(crate::graphql::graphiql).post(crate::graphql::graphql_handler))
        .route("/graphql/ws", get(crate::graphql_ws::graphql_ws))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route(
            crate::backup::BACKUP_ROUTE,
            get(crate::backup::serve_backup)
                .route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::routes::refuse_query_string)),
        )
        .fallback(|| async { ApiError::not_found("no such route; see /openapi.json") })
        // Every route registered above: its Allow header stays, the body is the usual error.
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; see /openapi.json",
            )
        })
        .with_state(state)
        .layer(axum::Extension(schema))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(config.request_timeout, answer_within))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(config.max_concurrent_requests))
        // Every log line of a request says which one (its id, method and path).
        .layer(axum::middleware::from_fn(crate::request_log::in_request_context))
}

/// Cuts off a request whose answer is not ready within the request timeout: 408 with the
/// stable code `request_timeout` (counted like every error answer). A command cut off this way
/// may still be recorded — the writer decides what it was given — so the message says how to
/// learn its outcome. A streamed answer (an event feed) is ready once its head is sent.
async fn answer_within(
    State(timeout): State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "no answer within the request timeout of {} ms; a command may still have been recorded: send it \
                 again with the same X-Command-Id to learn its outcome",
                timeout.as_millis()
            ),
        )
        .into_response(),
    }
}

/// Liveness: the process answers. The body says whether writes work.
async fn healthz(State(state): State<AppState>) -> Response {
    let writer = match state.writer.health() {
        Health::Healthy => "healthy".to_owned(),
        Health::Failed(reason) => format!("failed: {reason}"),
    };
    axum::Json(serde_json::json!({ "status": "ok", "writer": writer })).into_response()
}

/// How long an accepted connection may be idle before TCP asks whether its peer is still there,
/// and how often it asks again.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long what the server sent may go unacknowledged, or its keepalive probes unanswered,
/// before the connection is dropped (`TCP_USER_TIMEOUT`): the time a quiet connection's 9
/// probes took anyway. Without it, a connection the server is writing to (a feed that is
/// following the log) retransmitted to a vanished peer for about 15 minutes.
const UNACKNOWLEDGED_MAX: Duration = Duration::from_secs(150);

/// TCP keepalive on an accepted connection, and a bound on unacknowledged data: a client that
/// vanishes without closing (a laptop asleep, a NAT mapping dropped) sends no FIN or RST. A
/// connection nothing is written to (a WebSocket whose subscriptions are quiet) stayed open
/// forever, holding its connection slot and its token's stream slots (found by review): the
/// probes end it. One the server writes to is ended once its data has gone unacknowledged for
/// `UNACKNOWLEDGED_MAX`.
fn keep_alive(stream: &TcpStream) -> std::io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL);
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_MAX))
}

/// Readiness: the log is open, the writer accepts writes, no other process holds the
/// projections database's lock, and projections are within `ready_max_lag` events of the head.
async fn readyz(State(state): State<AppState>) -> Response {
    match (state.writer.health(), state.writer.reader().head()) {
        (Health::Healthy, Ok(head)) => {
            if state.writer.stats().storage_low.load(std::sync::atomic::Ordering::Relaxed) {
                return ApiError {
                    retry_after_s: Some(30),
                    ..ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "storage_low",
                        format!(
                            "the data directory's disk has {} MiB free, under --min-free-disk-mib: new tasks and steps \
                             are refused until space is freed",
                            state.writer.stats().disk_free_bytes.load(std::sync::atomic::Ordering::Relaxed) >> 20
                        ),
                    )
                }
                .into_response();
            }
            // After the disk: projections waiting for their database hid a disk under its floor.
            if let Err(refused) = crate::readmodels::check_projections_lock(&state) {
                return refused.into_response();
            }
            // Running: `check_projections_lock` refuses while they wait for their database.
            let lag = state.projections.running().and_then(|p| p.max_lag().ok()).unwrap_or(u64::MAX);
            if lag > state.ready_max_lag {
                return ApiError::unavailable(
                    "projections_lagging",
                    format!("projections are {lag} events behind (limit {})", state.ready_max_lag),
                    1,
                )
                .into_response();
            }
            axum::Json(serde_json::json!({ "ready": true, "head_seq": head.seq, "projection_lag": lag }))
                .into_response()
        }
        (Health::Failed(reason), _) => {
            ApiError::unavailable("writes_unavailable", format!("the writer stopped: {reason}"), 30).into_response()
        }
        (_, Err(e)) => ApiError::unavailable("log_unreadable", e.to_string(), 5).into_response(),
    }
}

/// Prometheus metrics; any valid token (nothing but health is served unauthenticated).
async fn metrics(State(state): State<AppState>, who: crate::auth::Principal) -> Response {
    let mut text = state.metrics.render(&state.writer, state.projections.running());
    Metrics::render_streams(&mut text, state.streams.gauges());
    // The folds' weight follows payloads and results of tasks in every namespace.
    if who.scope.is_none() {
        Metrics::render_task_folds(&mut text, state.task_folds.len_and_weight());
    }
    // Bounded: a scrape must answer (with the writer's and projectors' figures) while the
    // projections database is unreachable; the depths are left out then.
    // Nor while another process holds the projections' lock: the rows may be its (see
    // `readmodels::check_projections_lock`).
    // Nor while the projections wait for their database.
    if let Some(projections) = state.projections.running()
        && crate::readmodels::check_projections_lock(&state).is_ok()
        && let Ok(Ok(mut dashboard)) = tokio::time::timeout(
            METRICS_DEPTHS_WAIT,
            projections::query::dashboard(projections.store(), None, Some(i64::MAX)),
        )
        .await
    {
        // A namespace-scoped token sees the depths of its own namespaces only: scopes do not
        // reveal which namespaces exist elsewhere, here as in the dashboard view.
        dashboard.counts.retain(|c| domain::Namespace::new(&c.namespace).is_ok_and(|ns| who.may_see(&ns)));
        Metrics::render_depths(&mut text, &dashboard.counts);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The OpenAPI 3.1 document served at `/openapi.json`, written by hand beside the routes.
const OPENAPI_DOCUMENT: &str = include_str!("../openapi.json");

async fn openapi(_who: crate::auth::Principal) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_DOCUMENT).into_response()
}

/// Logs to stderr, filtered by `TASKLEDGER_LOG` (see [`log_filter`]).
fn init_tracing(json: bool) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().map_event_format(|format| WithRequest::new(format, true)).boxed()
    } else {
        fmt.map_event_format(|format| WithRequest::new(format, false)).boxed()
    };
    let registry = tracing_subscriber::registry().with(fmt);
    let _ = match log_filter(std::env::var("TASKLEDGER_LOG").ok().as_deref()) {
        LogFilter::ByTarget(filter) => registry.with(filter).try_init(),
        LogFilter::BySpan(filter) => {
            crate::request_log::use_request_spans();
            registry.with(*filter).try_init()
        }
    };
}

/// What the log keeps.
enum LogFilter {
    /// Levels by target (`info`, `warn,api=debug`).
    ByTarget(Targets),
    /// Filters by span (`[request{path=/v1/claims}]=debug`).
    BySpan(Box<tracing_subscriber::EnvFilter>),
}

/// The filter `TASKLEDGER_LOG` asks for: `info` when it is unset or unreadable. Only a filter
/// by span needs an `EnvFilter`, which takes a lock on every enter and exit of every span (each
/// request's span is entered at each poll of its future: that lock was ~3 % of the HTTP
/// workers' CPU under `taskledger-bench` lifecycle); levels by target do not.
fn log_filter(spec: Option<&str>) -> LogFilter {
    // PostgreSQL's notices ("table … does not exist, skipping" from the projectors' idempotent
    // DDL) are not news to an operator, nor the pool's line per dropped idle connection after
    // a PostgreSQL restart (the projectors say what failed, once).
    let default = || {
        Targets::new()
            .with_default(tracing::Level::INFO)
            .with_target("sqlx::postgres::notice", tracing::Level::WARN)
            .with_target("sqlx_core::pool", tracing::Level::WARN)
    };
    match spec {
        Some(spec) if spec.contains('[') => match tracing_subscriber::EnvFilter::try_new(spec) {
            Ok(filter) => LogFilter::BySpan(Box::new(filter)),
            Err(_) => LogFilter::ByTarget(default()),
        },
        Some(spec) => LogFilter::ByTarget(spec.parse().unwrap_or_else(|_| default())),
        None => LogFilter::ByTarget(default()),
    }
}

/// Worker threads of the projectors' own runtime. One: on SQLite their writes are serialized
/// anyway, and bulk builds fold their big batches off it (`block_in_place`).
pub const PROJECTION_THREADS: usize = 1;

/// How much the projector threads' nice value is raised above the HTTP workers' and the
/// writer's. Projections are eventually consistent and nothing on the write path waits for
/// them: under full load commands go first, and projectors catch up with bigger (cheaper)
/// batches when there is CPU to spare. Measured on 2 cores (`taskledger-bench`, interleaved
/// pairs against the projectors on the HTTP runtime, 2026-12-03): lifecycle 13.6k/14.8k
/// against 11.4k/12.3k tasks/s, batch create 87k/95k against 77k/87k.
pub const PROJECTION_THREAD_NICE_INCREMENT: i32 = 10;

/// The projectors' runtime, apart from the one serving HTTP: folding a batch of a few thousand
/// events takes milliseconds, and on a shared worker every request queued behind it waits.
fn projection_runtime() -> std::io::Result<BackgroundRuntime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(PROJECTION_THREADS)
        .thread_name("projections")
        .on_thread_start(|| eventlog::lower_this_threads_priority(PROJECTION_THREAD_NICE_INCREMENT))
        .enable_all()
        .build()
        .map(|runtime| BackgroundRuntime(Some(runtime)))
}

/// The most threads reading and encoding batches at once for event feeds and subscriptions
/// that are catching up (see [`crate::streams::next_batch`]); more such batches queue.
pub const BULK_READ_THREADS_MAX: usize = 16;

/// Threads for event feeds' and subscriptions' big batches (a reader catching up: up to 1,024
/// records read from disk and encoded, milliseconds each), in the idle scheduling class. Made
/// on an HTTP worker, every request queued behind a batch waited for it, and at the same
/// priority the readers took the cores from the commands: two readers of the feed from its
/// start cut a 6,000 tasks/s open-loop load to about 970 tasks/s, creates acknowledged after
/// 6.2 s (p50). On these threads at nice +10 (the projectors'): 6,000 tasks/s, create p50
/// 4–43 ms; at +19: 1.8–2.3 ms, p99 15–27 ms; in the idle class: 0.9–1.1 ms, p99 11–38 ms,
/// against 0.8–0.9 and 5.1–5.5 ms with no reader, the readers still reading 132k–155k
/// records/s (`taskledger-bench --only taskledger --workloads half-rate --half-rate 6000
/// --feed-readers 2`, 2026-12-07). A reader is eventually consistent: under full load the
/// commands and the projectors go first, and readers get the CPU left over.
///
/// GraphQL sockets with a subscription catching up are served on its workers
/// ([`crate::streams::serve_by_catch_up`]), as many as the machine has cores: with one, two such
/// sockets on an otherwise idle server shared a core and got 36.7k events/s, against 74.6k on
/// the HTTP workers.
///
/// Its threads are counted in `threads`, which lifts them out of the idle class when the server
/// stops: what they still serve then must not wait for CPU that other processes hold.
fn bulk_read_runtime(threads: &IdleClassThreads) -> std::io::Result<BackgroundRuntime> {
    let (starting, stopping) = (threads.clone(), threads.clone());
    tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BULK_READ_THREADS_MAX)
        .thread_name("bulk-reads")
        // A GraphQL socket served here meanwhile (`streams::serve_by_catch_up`) may start timers.
        .enable_all()
        .on_thread_start(move || starting.enter_this_thread())
        .on_thread_stop(move || stopping.leave_this_thread())
        .build()
        .map(|runtime| BackgroundRuntime(Some(runtime)))
}

/// A runtime started inside the serving one, shut down in the background when dropped: a
/// runtime may not be dropped inside another, and every early return of `serve` (projections
/// refused, the listen address taken) panicked doing so instead of reporting why.
struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl BackgroundRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Name of the file in the data dir a running server holds locked.
pub const DATA_DIR_LOCK_FILE_NAME: &str = "taskledger.lock";

/// Locks the data dir for this server (held until the returned file is dropped), before it reads
/// or writes anything there: the ledger file's own lock came after the tokens file, so two first
/// starts racing on a new dir could each mint an admin token, and the one that lost the ledger
/// left its token in `admin.token`, which the survivor rejects (found by a black-box check).
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join(DATA_DIR_LOCK_FILE_NAME);
    projections::lock::try_lock_file(&path).with_context(|| format!("lock {}", path.display()))?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is in use by another taskledger server (it holds {}); stop it, or give this server another --data",
            dir.display(),
            path.display()
        )
    })
}

/// The free-disk floor should hold this many journals: two journals' records owed to the log
/// when the floor is reached, each taking about five times its size once checkpointed and
/// projected (`eventlog::disk::DISK_BYTES_PER_RECORD_BYTE`, measured on a full ext4 disk).
pub const FLOOR_PER_JOURNAL: u64 = 2 * eventlog::disk::DISK_BYTES_PER_RECORD_BYTE;

/// Runs the server until a shutdown signal.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    init_tracing(config.json_logs);
    let signals = shutdown_signals();
    let hangups = hangup_signals();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    let _data_dir_lock = lock_data_dir(&config.data_dir)?;
    let tokens_path = config.tokens_file.clone().unwrap_or_else(|| config.data_dir.join("tokens.json"));
    let (tokens, token_source) = crate::auth::load_or_init(&tokens_path)?;
    reload_tokens_on_hangup(hangups, tokens.clone(), tokens_path.clone());

    let (floor, journal) = (config.writer.min_free_disk_bytes, config.writer.store.journal_bytes);
    if floor > 0 && floor < FLOOR_PER_JOURNAL * journal {
        tracing::warn!(
            min_free_disk_mib = floor >> 20,
            journal_mib = journal >> 20,
            "--min-free-disk-mib is under {FLOOR_PER_JOURNAL} times the journal: what the server still owes the disk \
             when the floor is reached (both journals checkpointed into the log, the projections catching up: about \
             five times the records' size) may not fit, and a full disk stops writes until a restart"
        );
    }
    let data_dir = config.data_dir.clone();
    let writer_config = config.writer.clone();
    let log_file = config.data_dir.join(eventlog::redb_store::LOG_FILE_NAME);
    let (writer, startup) =
        match tokio::task::spawn_blocking(move || Writer::open(&data_dir, writer_config, Arc::new(SystemClock))).await {
            Ok(opened) => opened.map_err(|error| match error {
                // Say who holds it and what to do, as `backup` does (found by a black-box check).
                eventlog::StartError::Open {
                    source:
                        eventlog::OpenError::Database { source: redb::DatabaseError::DatabaseAlreadyOpen, .. },
                    ..
                } => anyhow::anyhow!(
                    "{} is in use by another process (a server already running on this data dir, or `taskledger backup --data` of it); stop it, or give this server another --data",
                    log_file.display()
                ),
                other => anyhow::Error::new(other).context(format!("open ledger at {}", config.data_dir.display())),
            })?,
            // redb asserts on some damaged files: name the file, not a task number.
            Err(join) => anyhow::bail!(
                "the storage engine panicked opening {} ({join}); the file may be damaged: check it with `taskledger-replay verify --log {}`, and restore it from a backup only if that reports damage",
                log_file.display(),
                log_file.display()
            ),
        };

    let target = config
        .projections
        .clone()
        .unwrap_or_else(|| config.data_dir.join("projections.sqlite").to_string_lossy().into_owned());
    let shown_target = projections::store::redact_target(&target);
    let handle = writer.handle();
    let projection_runtime = projection_runtime().context("start the projectors' runtime")?;
    let projections = ProjectionsSlot::open(ProjectionsTarget {
        target,
        options: config.projections_store,
        reader: handle.reader().clone(),
        feed: handle.feed().clone(),
        executor: projection_runtime.handle().clone(),
    })
    .await?;
    let bulk_read_threads = IdleClassThreads::default();
    let bulk_read_runtime = bulk_read_runtime(&bulk_read_threads).context("start the bulk readers' runtime")?;
    let (stopping_tx, stopping) = watch::channel(false);
    let state = AppState::new(AppContext {
        writer: handle,
        projections: projections.clone(),
        tokens,
        metrics: Arc::new(Metrics::default()),
        ready_max_lag: config.ready_max_lag,
        stopping,
        long_poll_limit: config.request_timeout / 2,
        max_body_bytes: config.max_body_bytes,
        open_sockets: Arc::default(),
        streams: crate::streams::StreamSlots::new(config.max_streams_per_token),
        task_folds: Default::default(),
        bulk_reads: bulk_read_runtime.handle().clone(),
        feed_lines: Arc::default(),
    });
    let open_sockets = state.open_sockets.clone();
    let listener = TcpListener::bind(config.listen).await.with_context(|| format!("listen on {}", config.listen))?;
    let local = listener.local_addr().context("read the bound address")?;

    // The startup banner goes to stdout so scripts (and tests) can read the address.
    println!("taskledger {} listening on http://{local}", env!("CARGO_PKG_VERSION"));
    println!("projections in {}", crate::projections_slot::describe(&projections, &shown_target));
    println!(
        "limits: {} connections, request head within {} ms, requests of {} bytes and {} ms, {} requests at once, \
         {} event feeds and subscriptions per token; ready while projections lag at most {} events",
        config.max_connections,
        config.header_read_timeout.as_millis(),
        config.max_body_bytes,
        config.request_timeout.as_millis(),
        config.max_concurrent_requests,
        config.max_streams_per_token,
        config.ready_max_lag
    );
    println!(
        "writer: queue of {} commands, dedup window of {} events, {} recent records kept for live subscribers, \
         {} stream heads cached, {}, {}, {}; caches: {} MiB of log pages{}",
        config.writer.channel_capacity,
        config.writer.dedup_window_events,
        config.writer.feed_capacity,
        config.writer.store.stream_cache_entries,
        match config.writer.snapshot_every_events {
            0 => "no snapshots".to_owned(),
            every => format!("a snapshot every {every} events"),
        },
        match config.writer.store.journal_bytes >> 20 {
            0 => "no write-ahead journal".to_owned(),
            mib => format!("a {mib} MiB write-ahead journal"),
        },
        match config.writer.min_free_disk_bytes >> 20 {
            0 => "no free-disk floor".to_owned(),
            mib => format!("new work refused under {mib} MiB free on disk"),
        },
        config.writer.store.cache_bytes >> 20,
        match projections.backend() {
            projections::Backend::Sqlite => format!(
                ", {} MiB of SQLite projection pages per connection",
                config.projections_store.sqlite_cache_kib >> 10
            ),
            // PostgreSQL's cache is its server's.
            projections::Backend::Postgres => String::new(),
        }
    );
    println!(
        "ledger at {}: head seq {}, {} live tasks (snapshot at seq {}, {} events replayed in {:.3} s)",
        config.data_dir.display(),
        startup.head.seq,
        startup.live_tasks,
        startup.fold.snapshot_seq,
        startup.fold.replayed,
        startup.took.as_secs_f64()
    );
    // A damaged snapshot costs only replay time, but it says something is wrong with the disk or
    // with someone's hands: it was skipped without a word (found by a black-box check).
    for reason in &startup.fold.skipped_snapshots {
        tracing::warn!(reason = %reason, "a snapshot failed its check and was skipped; the ledger was rebuilt from an older one or the log");
    }
    match token_source {
        TokenSource::MintedAdmin { tokens, token_file } => println!(
            "created an admin token in {} (hash in {}); authenticate with: Authorization: Bearer $(cat {})",
            token_file.display(),
            tokens.display(),
            token_file.display()
        ),
        TokenSource::Existing(path) => {
            println!("tokens from {}; authenticate with: Authorization: Bearer <token>", path.display())
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let app = app(state, &config);
    let shutdown = async move {
        signals.await;
        if let Err(error) = bulk_read_threads.lift() {
            tracing::info!(%error, "the bulk-read threads stay in the idle scheduling class while the server stops");
        }
        stopping_tx.send_replace(true);
    };
    serve_connections(listener, app, config.max_connections, config.header_read_timeout, shutdown).await;
    // WebSockets complete their subscriptions and close with 1001 (`graphql_ws`).
    open_sockets.all_closed(WEBSOCKETS_CLOSE_WAIT).await;
    tracing::info!("shutting down: stopping projectors, draining the writer");
    projections.shutdown().await;
    drop(projection_runtime);
    drop(bulk_read_runtime);
    tokio::task::spawn_blocking(move || writer.shutdown()).await.context("join the writer")?;
    println!("taskledger stopped");
    Ok(())
}

/// Serves HTTP/1.1 on `listener` until `shutdown` resolves, then stops
/// accepting, lets every connection finish its in-flight request, and returns
/// once all have closed.
///
/// Why not `axum::serve`: it neither limits connections nor sets hyper's timer,
/// and without a timer hyper's `header_read_timeout` is off, so a client that
/// drips a request head a byte at a time would hold its connection forever.
/// Here a semaphore of `max_connections` slots is taken *before* each accept:
/// when all are taken the loop stops accepting and further clients wait in the
/// kernel's backlog until a connection closes. The slot travels inside the
/// connection's I/O object, so it is released exactly when the socket is
/// dropped, including after an upgrade to WebSocket (which moves the socket out
/// of hyper).
async fn serve_connections(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(header_read_timeout).keep_alive(true);
    // Connection tasks hold a receiver: they watch it for the stop signal, and
    // `stop_tx.closed()` resolves once the last of them has finished.
    let (stop_tx, stop_rx) = watch::channel(());
    let mut shutdown = pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the connection semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    handle_accept_error(error).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small writes go out at once: a WebSocket's messages (a `next`, then its `complete`) and
        // a feed's records are separate writes, and Nagle's algorithm held each second one for the
        // client's delayed ACK, ~40 ms (found by a client-library check).
        let _ = stream.set_nodelay(true);
        let _ = keep_alive(&stream);
        let io = TokioIo::new(SlotStream { stream, _slot: slot });
        let connection = http.serve_connection(io, TowerToHyperService::new(app.clone())).with_upgrades();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut connection = pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%remote, %error, "connection ended with an error");
                    }
                }
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(stop);
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    drop(stop_rx);
    if tokio::time::timeout(SHUTDOWN_GRACE, stop_tx.closed()).await.is_err() {
        tracing::warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "connections still open after the shutdown grace period; the server exits without waiting for them"
        );
    }
}

/// Longest a shutdown waits for WebSockets to close after the HTTP connections have.
const WEBSOCKETS_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Longest `/metrics` waits for the queue depths from the projections.
const METRICS_DEPTHS_WAIT: Duration = Duration::from_secs(1);

/// How long a shutdown waits for connections to finish their requests before it closes them.
/// Following feeds and long-polling claims end at once on shutdown; this bounds anything else
/// (a large backup download, a client that stopped reading), so a stop never hangs.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// An accept error: a connection that failed before we took it is no reason to
/// pause; anything else (out of file descriptors) is logged and retried after
/// a pause, as `axum::serve` does.
async fn handle_accept_error(error: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(error.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(%error, "accept a connection; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A TCP connection holding one of the server's connection slots until it is
/// dropped.
struct SlotStream {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for SlotStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SlotStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Registers the shutdown signals (SIGTERM, SIGINT) now, and returns a future that resolves at
/// the first of them. Registered when `serve` starts, so that a SIGTERM while the ledger is
/// still being opened stops the server cleanly once it is up, instead of killing it outright
/// as the signal's default action did (found by a black-box check).
///
/// A second signal, at any time (a long journal replay at startup, a slow drain at shutdown),
/// ends the process at once with exit 130, as after a crash (the log is crash-safe): an
/// operator's second Ctrl-C or `systemctl stop` is not left waiting (found by review).
fn shutdown_signals() -> impl std::future::Future<Output = ()> + Send + 'static {
    let (noted, requested) = watch::channel(false);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        async fn wait(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::spawn(async move {
            let (mut terminate, mut interrupt) = (terminate, interrupt);
            for seen in 0.. {
                tokio::select! {
                    () = wait(&mut terminate) => {},
                    () = wait(&mut interrupt) => {},
                }
                if seen == 0 {
                    tracing::info!(
                        "stop requested: stopping once every answer in flight is given (a second signal exits at once)"
                    );
                    noted.send_replace(true);
                } else {
                    eprintln!("taskledger: a second stop signal; exiting at once (the log is crash-safe)");
                    std::process::exit(130);
                }
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        noted.send_replace(true);
    });
    let mut requested = requested;
    async move {
        let _ = requested.wait_for(|stop| *stop).await;
    }
}

/// SIGHUP, listened for from the start of `serve` (its default action ended the server at
/// once); `None` where there is none.
#[cfg(unix)]
fn hangup_signals() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(not(unix))]
fn hangup_signals() -> Option<()> {
    None
}

/// Reloads the tokens file at each SIGHUP: a revocation takes effect without a restart. A file
/// that fails changes nothing, and says why at ERROR.
#[cfg(unix)]
fn reload_tokens_on_hangup(hangups: Option<tokio::signal::unix::Signal>, tokens: Tokens, path: PathBuf) {
    let Some(mut hangups) = hangups else { return };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match tokens.reload_from(&path) {
                Ok(counts) => tracing::info!(
                    file = %path.display(),
                    live = counts.live,
                    revoked = counts.revoked,
                    "tokens reloaded (SIGHUP): feeds and WebSockets of tokens revoked, removed or changed end now"
                ),
                Err(error) => tracing::error!(
                    file = %path.display(),
                    error = %eventlog::cli::error_chain(&error),
                    "tokens not reloaded (SIGHUP): the previous tokens stay in force"
                ),
            }
        }
    });
}

#[cfg(not(unix))]
fn reload_tokens_on_hangup(_: Option<()>, _: Tokens, _: PathBuf) {}

/// A watch that turns `true` when a stream served to `who` must end: the server stopping, or
/// a reload of the tokens that revokes, removes or changes `who`'s token. For the long-lived
/// answers (a following event feed); the task watching ends with the last receiver.
pub fn stopping_or_revoked(state: &AppContext, who: &crate::auth::Principal) -> watch::Receiver<bool> {
    let (ends, receiver) = watch::channel(*state.stopping.borrow());
    let (mut stopping, tokens, who) = (state.stopping.clone(), state.tokens.clone(), who.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = ends.closed() => return,
            _ = stopping.wait_for(|stop| *stop) => {}
            () = tokens.revoked(|| Some(who.clone())) => {}
        }
        ends.send_replace(true);
    });
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    /// The bulk-read threads run in Linux's idle scheduling class (`SCHED_IDLE`, 5: the
    /// `policy` field of `/proc/thread-self/stat`); the test's own thread does not.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_bulk_read_threads_run_in_the_idle_scheduling_class() {
        fn policy() -> String {
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            // Fields after the command's closing parenthesis start at the third, the state; the
            // policy is the 41st.
            let after_command = &stat[stat.rfind(')').unwrap() + 2..];
            after_command.split(' ').nth(41 - 3).unwrap().to_owned()
        }
        let threads = IdleClassThreads::default();
        let runtime = bulk_read_runtime(&threads).unwrap();
        let policy_there = || {
            let (sent, received) = std::sync::mpsc::channel();
            runtime.handle().spawn_blocking(move || sent.send(policy()).unwrap());
            received.recv().unwrap()
        };
        assert_eq!(policy_there(), "5", "SCHED_IDLE");
        assert_eq!(policy(), "0", "SCHED_OTHER");
        // Lifted, as the server does when it stops: the threads there and those started since
        // are in the normal class (only with CAP_SYS_NICE, or an RLIMIT_NICE allowing it).
        match threads.lift() {
            Ok(()) => {
                assert_eq!(policy_there(), "0", "lifted");
                let blocked: Vec<_> = (0..3)
                    .map(|_| {
                        let (sent, received) = std::sync::mpsc::channel();
                        let (release, wait) = std::sync::mpsc::channel::<()>();
                        runtime.handle().spawn_blocking(move || {
                            sent.send(policy()).unwrap();
                            let _ = wait.recv();
                        });
                        (received.recv().unwrap(), release)
                    })
                    .collect();
                assert!(blocked.iter().all(|(policy, _)| policy == "0"), "threads started since are not idle");
            }
            Err(error) => {
                // CAP_SYS_NICE is capability 23 of the effective set.
                let status = std::fs::read_to_string("/proc/self/status").unwrap();
                let effective = status.lines().find_map(|line| line.strip_prefix("CapEff:")).unwrap().trim();
                let may_nice = u64::from_str_radix(effective, 16).unwrap() & (1 << 23) != 0;
                assert!(!may_nice, "CAP_SYS_NICE may always lift: {error}");
            }
        }
    }

    fn by_target(spec: Option<&str>) -> Targets {
        match log_filter(spec) {
            LogFilter::ByTarget(filter) => filter,
            LogFilter::BySpan(_) => panic!("{spec:?} gave a filter by span"),
        }
    }

    #[test]
    fn the_log_filter_is_by_target_unless_it_names_a_span() {
        for spec in [None, Some("info"), Some("not=a=filter")] {
            let filter = by_target(spec);
            assert!(filter.would_enable("api::server", &Level::INFO), "{spec:?}");
            assert!(!filter.would_enable("api::server", &Level::DEBUG), "{spec:?}");
        }
        assert!(!by_target(None).would_enable("sqlx::postgres::notice", &Level::INFO));
        assert!(!by_target(None).would_enable("sqlx_core::pool::inner", &Level::INFO));
        assert!(by_target(None).would_enable("sqlx_core::pool::inner", &Level::WARN));
        let filter = by_target(Some("warn,api=debug"));
        assert!(filter.would_enable("api::routes", &Level::DEBUG));
        assert!(!filter.would_enable("hyper", &Level::INFO));
        assert!(filter.would_enable("hyper", &Level::WARN));
        assert!(matches!(log_filter(Some("[request]=debug")), LogFilter::BySpan(_)));
    }

    /// Client generators name their methods after `operationId`: every operation has one,
    /// distinct, in lowerCamelCase (without them a generated client's methods are named after
    /// the paths, and change when a path does); every link names an operation that exists.
    #[test]
    fn every_operation_has_its_own_operation_id_and_every_link_names_one() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI_DOCUMENT).unwrap();
        let mut seen = std::collections::BTreeMap::new();
        // Links (which schemathesis's stateful phase follows) name their targets by operationId.
        let mut links = Vec::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                if !["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                    continue;
                }
                let id =
                    operation["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no operationId"));
                assert!(
                    id.starts_with(|c: char| c.is_ascii_lowercase()) && id.chars().all(|c| c.is_ascii_alphanumeric()),
                    "{method} {path}: operationId {id:?} is not lowerCamelCase"
                );
                if let Some(other) = seen.insert(id.to_owned(), format!("{method} {path}")) {
                    panic!("operationId {id:?} names both {other} and {method} {path}");
                }
                for (status, response) in operation["responses"].as_object().into_iter().flatten() {
                    for (name, link) in response["links"].as_object().into_iter().flatten() {
                        let target = link["operationId"].as_str().unwrap_or_default().to_owned();
                        links.push((format!("{method} {path} {status}: link {name}"), target));
                    }
                }
            }
        }
        assert!(seen.len() >= 30, "the document's operations were not all read: {seen:?}");
        assert!(!links.is_empty(), "the document's links were not read");
        for (link, target) in links {
            assert!(seen.contains_key(&target), "{link} names {target:?}, no operation's id");
        }
    }

    #[tokio::test]
    async fn accepted_connections_probe_a_silent_peer_and_bound_unacknowledged_data() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(!socket.keepalive().unwrap(), "off until set");
        keep_alive(&accepted).unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(UNACKNOWLEDGED_MAX));
        drop(client);
    }

    /// A request whose answer is not ready within the timeout gets a coded, counted 408 that
    /// says how to learn whether a command went through; a quick one passes untouched.
    #[tokio::test]
    async fn a_request_past_the_timeout_is_a_coded_408() {
        use tower::ServiceExt;
        let app = Router::new()
            .route("/slow", get(|| async { tokio::time::sleep(Duration::from_secs(5)).await }))
            .route("/quick", get(|| async { "done" }))
            .layer(axum::middleware::from_fn_with_state(Duration::from_millis(50), answer_within));
        let counted = || {
            crate::error::error_answers()
                .into_iter()
                .find(|(key, _)| *key == (408, "request_timeout"))
                .map_or(0, |(_, n)| n)
        };
        let before = counted();
        let get = |path: &str| axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap();

        let response = app.clone().oneshot(get("/slow")).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "request_timeout");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("50 ms") && message.contains("X-Command-Id"), "{message}");
        assert!(counted() > before, "the 408 is counted in taskledger_http_errors_total");

        let response = app.oneshot(get("/quick")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
