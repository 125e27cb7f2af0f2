//! `taskledger`: the server binary's command line. `serve` runs the API on
//! the embedded default (log and projections under `./data`, listening on
//! 127.0.0.1:7070); every flag has a `TASKLEDGER_*` environment variable.
//! `backup` copies the log of a running server or a stopped data dir into a
//! new log file (see `api::backup`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::server::{ServeConfig, serve};
use clap::{Parser, Subcommand};
use eventlog::WriterConfig;

/// See the workspace manifest for why the server does not use the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Copy the log into a new file: online from a running server, or offline from a stopped data dir.
    ///
    /// The copy is the log up to the head at the moment the backup starts, every
    /// record checked against its chain hash. It is a log file like
    /// <data>/ledger.redb: `taskledger-replay verify --log FILE` checks it, and
    /// copying it to <newdir>/ledger.redb and running `taskledger serve --data
    /// <newdir>` restores the ledger. FILE appears only when the copy is complete
    /// and checked (it is built in FILE.tmp/ first, which must not exist); an
    /// existing FILE is never replaced.
    Backup(BackupArgs),
}

#[derive(Parser, Clone)]
struct BackupArgs {
    /// The new file to write.
    #[arg(long)]
    to: PathBuf,
    /// Base URL of a running server (online backup), e.g. http://127.0.0.1:7070.
    #[arg(long, env = "TASKLEDGER_SERVER", conflicts_with = "data", required_unless_present = "data")]
    server: Option<String>,
    /// Admin token for --server (a backup holds every namespace's history).
    #[arg(long, env = "TASKLEDGER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data dir of a stopped server (offline backup); it is only read.
    #[arg(long)]
    data: Option<PathBuf>,
    /// With --data: copy what `ledger.redb` holds even though a write-ahead journal its server
    /// wrote through (it did not stop cleanly) is missing, wiped or short.
    #[arg(long, requires = "data")]
    accept_journal_loss: bool,
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
    #[arg(long, env = "TASKLEDGER_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = at_least_one_usize())]
    max_body_bytes: usize,
    /// Longest a request may take, in milliseconds, 10 s to 1 h (long-polling claims wait at most
    /// 30 s and at most half of this; reads waiting for a seq at most 5 s).
    #[arg(long, env = "TASKLEDGER_REQUEST_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(10_000..=3_600_000))]
    request_timeout_ms: u64,
    /// Most requests served at once; more wait.
    #[arg(long, env = "TASKLEDGER_MAX_CONCURRENT_REQUESTS", default_value_t = 4096, value_parser = at_least_one_usize())]
    max_concurrent_requests: usize,
    /// Most event feeds and GraphQL subscriptions one token holds open at once (1 to 65,536);
    /// the next is refused with 429 too_many_streams until one ends.
    #[arg(long, env = "TASKLEDGER_MAX_STREAMS_PER_TOKEN", default_value_t = 256,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65_536))]
    max_streams_per_token: usize,
    /// Most connections open at once; further clients wait to be accepted until one closes.
    #[arg(long, env = "TASKLEDGER_MAX_CONNECTIONS", default_value_t = 1024, value_parser = at_least_one_usize())]
    max_connections: usize,
    /// Longest a client may take to send a request's head, in milliseconds; also the longest a
    /// kept-alive connection may sit idle between requests. Slower connections are closed.
    #[arg(long, env = "TASKLEDGER_HEADER_READ_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_ms: u64,
    /// Commands that may queue for the writer before callers get 503 (1 to 1,048,576; the queue's
    /// slots, ~240 bytes each, are allocated at startup).
    #[arg(long, env = "TASKLEDGER_WRITER_QUEUE", default_value_t = 16 * 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=WRITER_QUEUE_MAX))]
    writer_queue: usize,
    /// Take a snapshot of the ledger every this many events (0: never).
    #[arg(long, env = "TASKLEDGER_SNAPSHOT_EVERY", default_value_t = 1_000_000)]
    snapshot_every: u64,
    /// A retried command id is recognised while its events are among the newest this many events.
    #[arg(long, env = "TASKLEDGER_DEDUP_WINDOW", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    dedup_window: u64,
    /// Under this many MiB free on the data directory's disk, new tasks and steps are refused
    /// (507 storage_low) until space is freed, while the work in flight goes on, so that a full
    /// disk never fails a commit or a checkpoint halfway (0: no floor; at most 16 TiB).
    #[arg(long, env = "TASKLEDGER_MIN_FREE_DISK_MIB", default_value_t = eventlog::writer::MIN_FREE_DISK_BYTES_DEFAULT >> 20, value_parser = clap::value_parser!(u64).range(0..=16 << 20))]
    min_free_disk_mib: u64,
    /// Newest records kept in memory for live subscribers (projections, feeds); a subscriber
    /// further behind reads from disk.
    #[arg(long, env = "TASKLEDGER_FEED_CAPACITY", default_value_t = 64 * 1024, value_parser = at_least_one_usize())]
    feed_capacity: usize,
    /// Stream heads (the last version of a task's stream) the writer keeps in memory; past this
    /// many it forgets the half with the lowest keys and reads each again from the log's index
    /// on its next use.
    #[arg(long, env = "TASKLEDGER_STREAM_CACHE", default_value_t = eventlog::RedbOptions::default().stream_cache_entries, value_parser = at_least_one_usize())]
    stream_cache: usize,
    /// Memory redb may use for the log's pages (its read cache and write buffer), in MiB.
    #[arg(long, env = "TASKLEDGER_LOG_CACHE_MIB", value_parser = clap::value_parser!(u32).range(1..=CACHE_MIB_MAX),
          default_value_t = (eventlog::RedbOptions::default().cache_bytes >> 20) as u32)]
    log_cache_mib: u32,
    /// SQLite's page cache for the projections, per connection (one writer and up to
    /// eight readers), in MiB. Ignored for PostgreSQL.
    #[arg(long, env = "TASKLEDGER_PROJECTIONS_CACHE_MIB", value_parser = clap::value_parser!(u32).range(1..=CACHE_MIB_MAX),
          default_value_t = projections::StoreOptions::default().sqlite_cache_kib >> 10)]
    projections_cache_mib: u32,
    /// Size of each of the log's two write-ahead journals (`ledger.journal`, `ledger.journal.1`),
    /// in MiB: each batch is fsynced there and checkpointed into `ledger.redb` when the journal
    /// fills, while the other one takes the batches; 0 commits every batch durably into
    /// `ledger.redb` itself (slower: see the README's Performance section).
    #[arg(long, env = "TASKLEDGER_JOURNAL_MIB", value_parser = clap::value_parser!(u32).range(0..=JOURNAL_MIB_MAX),
          default_value_t = (eventlog::JOURNAL_BYTES_DEFAULT >> 20) as u32)]
    journal_mib: u32,
    /// Start even though a write-ahead journal the last run wrote through (it did not stop
    /// cleanly) is missing, wiped or short: the records acknowledged only there are lost. For
    /// the one start after such damage, when the journal cannot be put back; not an env setting,
    /// so that it is not left on.
    #[arg(long)]
    accept_journal_loss: bool,
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

/// A count or size that must be at least 1 (0 would refuse every request, or hold nothing).
/// Most commands `--writer-queue` may hold: its slots are allocated up front (a queue of 10^10
/// asked the allocator for 2.4 TB and never listened: found by a black-box check).
const WRITER_QUEUE_MAX: u64 = 1 << 20;

fn at_least_one_usize() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

/// The largest cache flag accepted, in MiB (1 TiB).
const CACHE_MIB_MAX: i64 = 1 << 20;
/// Largest journal: recovery holds the journal's records in memory while it replays them.
const JOURNAL_MIB_MAX: i64 = 1024;

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs::parse_from(["serve"])
    }
}

fn main() -> ExitCode {
    if let Err(e) = eventlog::memory::disable_transparent_huge_pages() {
        eprintln!("taskledger: could not turn off transparent huge pages ({e}); going on with them");
    }
    let cli = Cli::parse();
    match cli.command.unwrap_or(Cmd::Serve(ServeArgs::default())) {
        Cmd::Serve(args) => {
            let writer = WriterConfig {
                channel_capacity: args.writer_queue,
                snapshot_every_events: args.snapshot_every,
                dedup_window_events: args.dedup_window,
                min_free_disk_bytes: args.min_free_disk_mib.saturating_mul(1 << 20),
                feed_capacity: args.feed_capacity,
                store: eventlog::RedbOptions {
                    stream_cache_entries: args.stream_cache,
                    cache_bytes: (args.log_cache_mib as usize) << 20,
                    journal_bytes: u64::from(args.journal_mib) << 20,
                    journal_loss: eventlog::JournalLoss::accepted_if(args.accept_journal_loss),
                    ..eventlog::RedbOptions::default()
                },
                ..WriterConfig::default()
            };
            let config = ServeConfig {
                data_dir: args.data,
                listen: args.listen,
                tokens_file: args.tokens,
                max_body_bytes: args.max_body_bytes,
                request_timeout: Duration::from_millis(args.request_timeout_ms),
                max_concurrent_requests: args.max_concurrent_requests,
                max_connections: args.max_connections,
                header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
                writer,
                json_logs: args.log_format == "json",
                projections: args.projections,
                projections_store: projections::StoreOptions { sqlite_cache_kib: args.projections_cache_mib << 10 },
                ready_max_lag: args.ready_max_lag,
                max_streams_per_token: args.max_streams_per_token,
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
                    eprintln!("taskledger: {}", eventlog::cli::error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Backup(args) => backup(args),
    }
}

fn backup(args: BackupArgs) -> ExitCode {
    let source = match (args.server, args.data) {
        (Some(url), None) => match args.token {
            Some(token) => api::backup::Source::Server { url, token },
            None => {
                eprintln!("taskledger backup: --server needs an admin token (--token or TASKLEDGER_TOKEN)");
                return ExitCode::from(2);
            }
        },
        (None, Some(dir)) => api::backup::Source::DataDir {
            dir,
            journal_loss: eventlog::JournalLoss::accepted_if(args.accept_journal_loss),
        },
        _ => {
            eprintln!("taskledger backup: give either --server URL --token T (online) or --data DIR (offline)");
            return ExitCode::from(2);
        }
    };
    match api::backup::run(&source, &args.to) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("taskledger backup: {}", eventlog::cli::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
