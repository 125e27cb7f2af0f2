//! `taskledger`: the server binary's command line. `serve` runs the API on
//! the embedded default (log and projections under `./data`, listening on
//! 127.0.0.1:7070); every flag has a `TASKLEDGER_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::server::{ServeConfig, serve};
use clap::{Parser, Subcommand};
use eventlog::WriterConfig;

#[derive(Parser)]
#[command(name = "taskledger", version, about = "An event-sourced task ledger: durable queues with exact history.")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Take a consistent online copy of the log (not built yet).
    Backup {
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Parser, Clone)]
struct ServeArgs {
    /// Where the log, snapshots, projections and tokens live.
    #[arg(long, env = "TASKLEDGER_DATA", default_value = "./data")]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "TASKLEDGER_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Tokens file (default: <data>/tokens.json, created with an admin token on first start).
    #[arg(long, env = "TASKLEDGER_TOKENS")]
    tokens: Option<PathBuf>,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "TASKLEDGER_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Longest a request may take, in milliseconds (long-polling claims wait at most 30 s).
    #[arg(long, env = "TASKLEDGER_REQUEST_TIMEOUT_MS", default_value_t = 60_000)]
    request_timeout_ms: u64,
    /// Most requests served at once; more wait.
    #[arg(long, env = "TASKLEDGER_MAX_CONCURRENT_REQUESTS", default_value_t = 4096)]
    max_concurrent_requests: usize,
    /// Commands that may queue for the writer before callers get 503.
    #[arg(long, env = "TASKLEDGER_WRITER_QUEUE", default_value_t = 16 * 1024)]
    writer_queue: usize,
    /// Take a snapshot of the ledger every this many events (0: never).
    #[arg(long, env = "TASKLEDGER_SNAPSHOT_EVERY", default_value_t = 1_000_000)]
    snapshot_every: u64,
    /// A retried command id is recognised while its events are among the newest this many events.
    #[arg(long, env = "TASKLEDGER_DEDUP_WINDOW", default_value_t = 1_000_000)]
    dedup_window: u64,
    /// Log format: text or json.
    #[arg(long, env = "TASKLEDGER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Where the SQL projections live: `postgres://…`, or a SQLite file (default: <data>/projections.sqlite).
    #[arg(long, env = "TASKLEDGER_PROJECTIONS")]
    projections: Option<String>,
    /// `/readyz` reports not ready while a projector lags more than this many events.
    #[arg(long, env = "TASKLEDGER_READY_MAX_LAG", default_value_t = 100_000)]
    ready_max_lag: u64,
}

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs::parse_from(["serve"])
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Cmd::Serve(ServeArgs::default())) {
        Cmd::Serve(args) => {
            let writer = WriterConfig {
                channel_capacity: args.writer_queue,
                snapshot_every_events: args.snapshot_every,
                dedup_window_events: args.dedup_window.max(1),
                ..WriterConfig::default()
            };
            let config = ServeConfig {
                data_dir: args.data,
                listen: args.listen,
                tokens_file: args.tokens,
                max_body_bytes: args.max_body_bytes,
                request_timeout: Duration::from_millis(args.request_timeout_ms),
                max_concurrent_requests: args.max_concurrent_requests.max(1),
                writer,
                json_logs: args.log_format == "json",
                projections: args.projections,
                ready_max_lag: args.ready_max_lag,
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("taskledger: start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("taskledger: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Backup { to } => {
            eprintln!("taskledger backup --to {}: not built yet (issue #5)", to.display());
            ExitCode::from(2)
        }
    }
}
