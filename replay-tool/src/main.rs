//! `taskledger-replay`: the tool an on-call engineer reaches for at 3 a.m. and
//! the one an auditor is handed (issue #6, DESIGN §7). It reads a log without
//! ever modifying it — a stopped server's data directory, a backup file, or a
//! running server's event feed — and answers: what is in it (`info`,
//! `events`), is it intact (`verify`), what did the ledger look like then
//! (`state`, `diff`), what happened to this task or worker (`incident`), and
//! produces and checks signed audit bundles (`export-audit`, `verify-export`,
//! `keygen`).
//!
//! Exit status: 0 success (for checks: clean), 1 a check found problems,
//! 2 usage errors, 3 the command could not run
//! (unreadable input, I/O error).

mod audit;
mod describe;
mod diff;
mod events;
mod feed;
mod incident;
mod info;
mod progress;
mod project;
mod sorted_json;
mod source;
mod state;
mod verify;

/// The fold of a large log makes millions of small allocations across the
/// reading and folding threads; mimalloc's thread-local free lists are much
/// cheaper for that than glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::source::{Point, Source};

#[derive(Parser)]
#[command(name = "taskledger-replay", version, about = "Investigate, verify and export a taskledger event log.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which log file to read: `--data` or `--log` (the commands that need the file itself).
#[derive(Args, Clone, Debug)]
pub struct FileInput {
    /// A stopped server's data directory (holds ledger.redb and snapshots/).
    #[arg(long, value_name = "DIR", global = true)]
    data: Option<PathBuf>,
    /// A log file (a backup, or ledger.redb itself); snapshots/ beside it are used if present.
    #[arg(long, value_name = "FILE", global = true)]
    log: Option<PathBuf>,
    /// Read a log whose server did not stop cleanly even though a write-ahead journal beside
    /// it is missing, wiped or short: the records only that journal held are not there.
    #[arg(long, global = true)]
    accept_journal_loss: bool,
}

impl FileInput {
    fn open(&self) -> Result<Source> {
        let (path, snapshots) = source::log_paths(self.data.as_deref(), self.log.as_deref())?;
        Source::open_file(&path, &snapshots, self.journal_loss())
    }

    fn journal_loss(&self) -> eventlog::JournalLoss {
        eventlog::JournalLoss::accepted_if(self.accept_journal_loss)
    }
}

/// Which log to read. Exactly one of `--data`, `--log` or `--server`.
#[derive(Args, Clone, Debug)]
pub struct Input {
    #[command(flatten)]
    file: FileInput,
    /// A running server's base URL; its event feed is read (needs --token).
    #[arg(long, value_name = "URL", global = true)]
    server: Option<String>,
    /// Bearer token for --server (a role that may read the feed, e.g. auditor; `incident --task`
    /// reads only that task's history, which any role of its namespace may).
    #[arg(long, value_name = "TOKEN", env = "TASKLEDGER_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

impl Input {
    fn open(&self) -> Result<Source> {
        self.open_window(feed::FeedWindow::ALL)
    }

    /// [`Input::open`], reading only `window` of a server's feed (a file is opened whole).
    fn open_window(&self, window: feed::FeedWindow) -> Result<Source> {
        match self.server()? {
            Some((url, token)) => feed::fetch(url, token, window),
            None => self.file.open(),
        }
    }

    /// [`Input::open`], reading only the head of a server's log: a report on one task reads the
    /// task's history from the server (a file is opened whole).
    fn open_head_only(&self) -> Result<Source> {
        match self.server()? {
            Some((url, token)) => feed::head_only(url, token),
            None => self.file.open(),
        }
    }

    /// `--server` and its token, when the input is a server.
    fn server(&self) -> Result<Option<(&str, &str)>> {
        let Some(url) = &self.server else { return Ok(None) };
        if self.file.data.is_some() || self.file.log.is_some() {
            return Err(source::usage("give one input: --server, --data or --log"));
        }
        if self.file.accept_journal_loss {
            return Err(source::usage("--accept-journal-loss is for a log file (--data or --log), not --server"));
        }
        let token = self.token.as_deref().ok_or_else(|| source::usage("--server needs --token"))?;
        Ok(Some((url, token)))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Head, record count, time range, file size, tasks by state, snapshots.
    Info {
        #[command(flatten)]
        input: Input,
        /// Also count finished tasks by how they ended (folds the whole log).
        #[arg(long)]
        full: bool,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The log, filtered: a table, or one JSON object per line with --json.
    Events(events::EventsArgs),
    /// Check every record, the hash chain, and that the domain accepts every event.
    Verify {
        #[command(flatten)]
        input: Input,
        #[arg(long)]
        json: bool,
        /// Skip the storage layer (redb's page-checksum check, which runs on its own thread
        /// alongside the others and never writes to the file). The log
        /// and domain layers still check every record, its chain link and every event; what
        /// goes unchecked is redb's own pages, e.g. the stream and time indexes.
        #[arg(long)]
        skip_storage_check: bool,
    },
    /// A task, or the whole ledger, exactly as it was at a seq or time.
    State {
        #[command(flatten)]
        input: Input,
        /// SEQ or RFC 3339 time (default: the head).
        #[arg(long, value_name = "SEQ|TIME")]
        as_of: Option<Point>,
        /// One task (UUID) instead of the whole ledger: folds only that task's own events.
        #[arg(long, value_name = "ID")]
        task: Option<String>,
        /// List every live task too (loads them all; the default shows counts only).
        #[arg(long, conflicts_with = "task")]
        tasks: bool,
        #[arg(long)]
        json: bool,
    },
    /// What changed between two points: tasks created, state changes, leases, dead letters.
    Diff {
        #[command(flatten)]
        input: Input,
        #[arg(long, value_name = "SEQ|TIME")]
        from: Point,
        #[arg(long, value_name = "SEQ|TIME")]
        to: Point,
        #[arg(long)]
        json: bool,
        /// Counts only: how many of each (state changes by transition), no lists.
        #[arg(long)]
        summary: bool,
    },
    /// A timeline report of a task, a worker or a time window.
    Incident(incident::IncidentArgs),
    /// Write a signed audit bundle for a range of the log.
    ExportAudit(audit::ExportArgs),
    /// Check an audit bundle offline, without the ledger.
    VerifyExport(audit::VerifyExportArgs),
    /// Make an Ed25519 key pair for signing audit checkpoints.
    Keygen {
        /// Writes PREFIX.key (secret, mode 0600) and PREFIX.pub.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
    },
    /// Run every projector over the log into SQL (a scratch SQLite file unless --into).
    Rebuild {
        #[command(flatten)]
        input: FileInput,
        /// A SQLite file path or a postgres:// URL (projectors resume from their checkpoints there).
        #[arg(long, value_name = "TARGET")]
        into: Option<String>,
    },
    /// Materialize every projector as of a point into a new SQLite file, for SQL on the past.
    Materialize {
        #[command(flatten)]
        input: FileInput,
        /// SEQ or RFC 3339 time (default: the head).
        #[arg(long, value_name = "SEQ|TIME")]
        as_of: Option<Point>,
        /// The SQLite file to create (default: a scratch file in the system temp directory).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// How a command ended, when it ran to completion.
pub enum Outcome {
    /// Done; for checks: clean.
    Clean,
    /// A check found problems (already reported).
    Problems,
}

fn run(cli: Cli) -> Result<Outcome> {
    match cli.command {
        Command::Info { input, full, json } => info::run(&input.open()?, full, json),
        Command::Events(args) => events::run(&args.input.open_window(events::feed_window(&args))?, &args),
        Command::Verify { input, json, skip_storage_check } => verify::run(&input, json, skip_storage_check),
        Command::State { input, as_of, task, tasks, json } => {
            state::run(&input.open()?, as_of, task.as_deref(), tasks, json)
        }
        Command::Diff { input, from, to, json, summary } => diff::run(&input.open()?, from, to, json, summary),
        Command::Incident(args) => {
            let source = if args.reads_one_task_by_seq() { args.input.open_head_only()? } else { args.input.open()? };
            incident::run(&source, &args)
        }
        Command::ExportAudit(args) => audit::export(&args.input.open()?, &args),
        Command::VerifyExport(args) => audit::verify_export(&args),
        Command::Keygen { out } => audit::keygen(&out),
        Command::Rebuild { input, into } => project::rebuild(&input.open()?, into.as_deref()),
        Command::Materialize { input, as_of, out } => project::materialize(&input.open()?, as_of, out),
    }
}

/// Output piped into `head` and the like: when the reader goes away, end quietly
/// as other command-line tools do (killed by SIGPIPE, status 141 in a shell),
/// rather than panic on the failed write. Rust ignores SIGPIPE by default.
fn end_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    end_quietly_on_a_closed_pipe();
    source::install_panic_hook();
    // Huge pages make each first touch of new heap zero 2 MiB at once, which is slow on
    // hosts that back memory lazily (see `eventlog::memory`); a fold of a large log grows
    // its heap the whole time. Best effort: the tool works the same without it.
    let _ = eventlog::memory::disable_transparent_huge_pages();
    let cli = Cli::parse();
    match run(cli) {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Problems) => ExitCode::from(1),
        Err(error) => {
            eprintln!("taskledger-replay: error: {}", eventlog::cli::error_chain(&error));
            ExitCode::from(if error.is::<source::Usage>() { 2 } else { 3 })
        }
    }
}
