//! A throwaway PostgreSQL for tests and benchmarks of any crate.
//!
//! If `TASKLEDGER_TEST_DATABASE_URL` is set, that server is used. Otherwise a
//! private cluster is made in a temp dir with the system's PostgreSQL 15
//! (`initdb`, `pg_ctl`), run as the `postgres` OS user when we are root
//! (PostgreSQL refuses to run as root), listening on a free loopback port
//! with its unix socket inside the temp dir. Dropping it stops the cluster
//! and removes the dir; a small watchdog process does the same if the test
//! process dies first (or keeps it in a `static`, which is never dropped).
//!
//! Each test takes its own database from [`TempPostgres::create_database`],
//! so one cluster serves every test of a binary ([`TempPostgres::shared`]).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming an existing server to test against.
pub const DATABASE_URL_ENV: &str = "TASKLEDGER_TEST_DATABASE_URL";
/// Where the PostgreSQL 15 server binaries are.
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

#[derive(Debug, thiserror::Error)]
pub enum TempPostgresError {
    #[error("create the cluster directory: {0}")]
    Dir(std::io::Error),
    #[error("run {command}: {reason}")]
    Command { command: String, reason: String },
    #[error("no `postgres` OS user to run the cluster as")]
    NoPostgresUser,
    #[error("create database {name}: {source}")]
    CreateDatabase { name: String, source: sqlx::Error },
}

/// How the private cluster is tuned.
#[derive(Clone, Copy, Debug)]
pub struct ClusterOptions {
    /// Keep fsync on (benchmarks); tests turn it off for speed.
    pub durable: bool,
}

/// A PostgreSQL server for the lifetime of this value.
pub struct TempPostgres {
    /// `postgres://…/postgres` on the admin database.
    admin_url: String,
    /// Held for its `Drop`, which stops and removes the private cluster.
    cluster: Option<Cluster>,
}

struct Cluster {
    dir: PathBuf,
    data: PathBuf,
    as_postgres_user: bool,
    /// `postgres`'s options (`pg_ctl -o`): the port and the tuning, for starting it again.
    settings: String,
}

impl Cluster {
    /// `pg_ctl start`, waiting until it takes connections.
    fn start(&self) -> Result<(), TempPostgresError> {
        self.pg_ctl(&["-w", "-t", "60", "-o", &self.settings, "start"])
    }

    /// `pg_ctl stop` (fast: open sessions are ended), waiting until it is down.
    fn stop(&self) -> Result<(), TempPostgresError> {
        self.pg_ctl(&["-m", "fast", "-w", "stop"])
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), TempPostgresError> {
        let mut command = pg_command(self.as_postgres_user, "pg_ctl");
        command.arg("-D").arg(&self.data).arg("-l").arg(self.dir.join("server.log")).args(args);
        run(command)
    }
}

impl std::fmt::Debug for TempPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TempPostgres").field("admin_url", &self.admin_url).finish_non_exhaustive()
    }
}

fn run(mut command: Command) -> Result<(), TempPostgresError> {
    let described = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TempPostgresError::Command { command: described.clone(), reason: e.to_string() })?;
    if !output.status.success() {
        return Err(TempPostgresError::Command {
            command: described,
            reason: format!(
                "{}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(())
}

/// A command for PostgreSQL binary `program`, as the `postgres` user if needed.
fn pg_command(as_postgres_user: bool, program: &str) -> Command {
    let path = Path::new(PG_BIN_DIR).join(program);
    if as_postgres_user {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn postgres_ids() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").ok()?;
    // SAFETY: getpwnam returns a pointer to static storage or null; we read
    // two integers from it at once, before any other call could reuse it.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return None;
    }
    // SAFETY: checked non-null above.
    let entry = unsafe { &*entry };
    Some((entry.pw_uid, entry.pw_gid))
}

fn free_port() -> Result<u16, TempPostgresError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(TempPostgresError::Dir)?;
    Ok(listener.local_addr().map_err(TempPostgresError::Dir)?.port())
}

impl TempPostgres {
    /// The server of `TASKLEDGER_TEST_DATABASE_URL`, or a new private cluster
    /// tuned for tests (no fsync).
    pub fn start() -> Result<TempPostgres, TempPostgresError> {
        Self::start_with(ClusterOptions { durable: false })
    }

    pub fn start_with(options: ClusterOptions) -> Result<TempPostgres, TempPostgresError> {
        if let Ok(url) = std::env::var(DATABASE_URL_ENV)
            && !url.is_empty()
        {
            return Ok(TempPostgres { admin_url: url, cluster: None });
        }
        Self::start_private(options)
    }

    /// A private cluster even when `TASKLEDGER_TEST_DATABASE_URL` is set: for a test that
    /// stops the server under a client (dropping the value stops it).
    pub fn start_private(options: ClusterOptions) -> Result<TempPostgres, TempPostgresError> {
        // SAFETY: geteuid has no preconditions.
        let as_postgres_user = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::Builder::new().prefix("taskledger-pg-").tempdir().map_err(TempPostgresError::Dir)?.keep();
        let cluster = Cluster { data: dir.join("data"), dir: dir.clone(), as_postgres_user, settings: String::new() };
        // From here on, dropping `cluster` stops and removes whatever was made.
        let mut this = TempPostgres { admin_url: String::new(), cluster: Some(cluster) };
        if as_postgres_user {
            let (uid, gid) = postgres_ids().ok_or(TempPostgresError::NoPostgresUser)?;
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(TempPostgresError::Dir)?;
        }
        let data = dir.join("data");
        let mut initdb = pg_command(as_postgres_user, "initdb");
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ]);
        run(initdb)?;
        let port = free_port()?;
        let mut settings =
            format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200", dir.display());
        if !options.durable {
            settings.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        let cluster = this.cluster.as_mut().expect("made above");
        cluster.settings = settings;
        cluster.start()?;
        spawn_watchdog(&dir, &data, as_postgres_user);
        this.admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        Ok(this)
    }

    /// One server for the whole test binary (process). Panics if it cannot
    /// start: a test that needs PostgreSQL must fail, not skip.
    pub fn shared() -> &'static TempPostgres {
        static SHARED: OnceLock<TempPostgres> = OnceLock::new();
        SHARED.get_or_init(|| TempPostgres::start().unwrap_or_else(|e| panic!("start a test PostgreSQL: {e}")))
    }

    /// Stops a private cluster (a fast shutdown), keeping its data: for a test of what a server
    /// does while PostgreSQL is down. [`TempPostgres::start_again`] starts it on the same port.
    pub fn stop(&self) -> Result<(), TempPostgresError> {
        self.private()?.stop()
    }

    /// Starts a cluster [`TempPostgres::stop`] stopped.
    pub fn start_again(&self) -> Result<(), TempPostgresError> {
        self.private()?.start()
    }

    fn private(&self) -> Result<&Cluster, TempPostgresError> {
        self.cluster.as_ref().ok_or_else(|| TempPostgresError::Command {
            command: "pg_ctl".to_owned(),
            reason: format!("{DATABASE_URL_ENV} names a server this process did not start: it cannot stop it"),
        })
    }

    /// The URL of the server's `postgres` database.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Creates a fresh database and returns its URL.
    pub async fn create_database(&self, prefix: &str) -> Result<String, TempPostgresError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name: String = format!("{prefix}_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
            .collect();
        let make = async {
            use sqlx::Connection;
            let mut admin = sqlx::PgConnection::connect(&self.admin_url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
            admin.close().await
        };
        make.await.map_err(|source| TempPostgresError::CreateDatabase { name: name.clone(), source })?;
        let base = self.admin_url.rsplit_once('/').map_or(self.admin_url.as_str(), |(base, _)| base);
        Ok(format!("{base}/{name}"))
    }
}

/// Stops the cluster and removes its dir once this process is gone.
fn spawn_watchdog(dir: &Path, data: &Path, as_postgres_user: bool) {
    let pg_ctl = Path::new(PG_BIN_DIR).join("pg_ctl");
    let stop = if as_postgres_user {
        format!("runuser -u postgres -- {} -D {} -m immediate stop", pg_ctl.display(), data.display())
    } else {
        format!("{} -D {} -m immediate stop", pg_ctl.display(), data.display())
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display()
    );
    // `setsid` puts the watchdog in its own session, so a test runner that
    // kills the test's process group does not kill it too.
    let _ = Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
