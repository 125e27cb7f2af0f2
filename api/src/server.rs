//! `taskledger serve`: opens the ledger, starts the writer, and serves the
//! HTTP API until SIGINT or SIGTERM; then it stops accepting connections,
//! lets in-flight requests finish, drains the writer and exits.
//!
//! Also here: the operational routes (`/healthz`, `/readyz`, `/metrics`,
//! `/openapi.json`) and the request limits (body size, timeout, concurrent
//! requests) that every route shares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use eventlog::{Health, SystemClock, Writer, WriterConfig, WriterHandle};
use tower_http::timeout::TimeoutLayer;

use crate::auth::{HasTokens, TokenSource, Tokens};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Everything a request handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub writer: WriterHandle,
    pub projections: projections::Projections,
    pub tokens: Tokens,
    pub metrics: Arc<Metrics>,
    pub ready_max_lag: u64,
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
    pub writer: WriterConfig,
    pub json_logs: bool,
    /// `postgres://…` for PostgreSQL projections; default: `<data>/projections.sqlite`.
    pub projections: Option<String>,
    /// `/readyz` fails while any projector lags more than this many events.
    pub ready_max_lag: u64,
}

pub fn app(state: AppState, config: &ServeConfig) -> Router {
    let schema = crate::graphql::schema(state.clone());
    crate::routes::router()
        .route("/graphql", get(crate::graphql::graphiql).post(crate::graphql::graphql_handler))
        .route("/graphql/ws", get(crate::graphql::graphql_ws))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::not_found("no such route; see /openapi.json") })
        .with_state(state)
        .layer(axum::Extension(schema))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, config.request_timeout))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(config.max_concurrent_requests))
        .layer(
            // One span per request, with a request id (the client's
            // X-Request-Id if it sent one), method and path.
            tower_http::trace::TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
                let request_id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                tracing::info_span!("request", %request_id, method = %request.method(), path = %request.uri().path())
            }),
        )
}

/// Liveness: the process answers. The body says whether writes work.
async fn healthz(State(state): State<AppState>) -> Response {
    let writer = match state.writer.health() {
        Health::Healthy => "healthy".to_owned(),
        Health::Failed(reason) => format!("failed: {reason}"),
    };
    axum::Json(serde_json::json!({ "status": "ok", "writer": writer })).into_response()
}

/// Readiness: the log is open, the writer accepts writes, and projections
/// are within `ready_max_lag` events of the head.
async fn readyz(State(state): State<AppState>) -> Response {
    match (state.writer.health(), state.writer.reader().head()) {
        (Health::Healthy, Ok(head)) => {
            let lag = state.projections.max_lag().unwrap_or(u64::MAX);
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
async fn metrics(State(state): State<AppState>, _who: crate::auth::Principal) -> Response {
    let mut text = state.metrics.render(&state.writer, &state.projections);
    if let Ok(dashboard) = projections::query::dashboard(state.projections.store(), None, Some(i64::MAX)).await {
        Metrics::render_depths(&mut text, &dashboard.counts);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn openapi(_who: crate::auth::Principal) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("../openapi.json")).into_response()
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TASKLEDGER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Runs the server until a shutdown signal.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    init_tracing(config.json_logs);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
    let tokens_path = config.tokens_file.clone().unwrap_or_else(|| config.data_dir.join("tokens.json"));
    let (tokens, token_source) = crate::auth::load_or_init(&tokens_path, &config.data_dir)?;

    let data_dir = config.data_dir.clone();
    let writer_config = config.writer.clone();
    let (writer, startup) =
        tokio::task::spawn_blocking(move || Writer::open(&data_dir, writer_config, Arc::new(SystemClock)))
            .await
            .context("join the ledger opener")?
            .with_context(|| format!("open ledger at {}", config.data_dir.display()))?;

    let target = config
        .projections
        .clone()
        .unwrap_or_else(|| config.data_dir.join("projections.sqlite").to_string_lossy().into_owned());
    let store =
        projections::Store::open(&target).await.with_context(|| format!("open projections at {}", redact(&target)))?;
    let handle = writer.handle();
    let projections = projections::Projections::start(
        store,
        handle.reader().clone(),
        handle.feed().clone(),
        projections::RuntimeConfig::default(),
    )
    .await
    .context("start the projectors")?;
    let state = AppState {
        writer: handle,
        projections: projections.clone(),
        tokens,
        metrics: Arc::new(Metrics::default()),
        ready_max_lag: config.ready_max_lag,
    };
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("listen on {}", config.listen))?;
    let local = listener.local_addr().context("read the bound address")?;

    // The startup banner goes to stdout so scripts (and tests) can read the address.
    println!("taskledger {} listening on http://{local}", env!("CARGO_PKG_VERSION"));
    println!("projections in {}", redact(&target));
    println!(
        "ledger at {}: head seq {}, {} live tasks (snapshot at seq {}, {} events replayed in {:.3} s)",
        config.data_dir.display(),
        startup.head.seq,
        startup.live_tasks,
        startup.fold.snapshot_seq,
        startup.fold.replayed,
        startup.took.as_secs_f64()
    );
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
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await.context("serve HTTP")?;
    tracing::info!("shutting down: stopping projectors, draining the writer");
    projections.shutdown().await;
    tokio::task::spawn_blocking(move || writer.shutdown()).await.context("join the writer")?;
    println!("taskledger stopped");
    Ok(())
}

/// A connection string without its password, for logs and banners.
fn redact(target: &str) -> String {
    match (target.find("://"), target.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &target[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!("{}{}:***{}", &target[..scheme + 3], &credentials[..colon], &target[at..]),
                None => target.to_owned(),
            }
        }
        _ => target.to_owned(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
