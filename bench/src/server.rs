//! Runs the real `taskledger serve` as a child process on a temporary data
//! dir: finds (or builds) the release binary, starts it on a free loopback
//! port, reads its address from stdout and its admin token from
//! `<data>/admin.token`, and stops it with SIGTERM (it drains its writer and
//! exits) when dropped. The bench talks to it only over HTTP, as a user would.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The workspace root: this crate's parent directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// The server binary to run: `explicit`, or the release build, built first
/// if it is missing.
pub fn find_or_build(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !path.exists() {
            bail!("--server-bin {} does not exist", path.display());
        }
        return Ok(path.to_path_buf());
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let binary = target.join("release").join("taskledger");
    if binary.exists() {
        return Ok(binary);
    }
    let command = "cargo build --release -p api --bin taskledger";
    eprintln!("{} is missing; running `{command}` (several minutes on 2 cores)", binary.display());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "api", "--bin", "taskledger"])
        .current_dir(&root)
        .status()
        .with_context(|| format!("run `{command}`; run it yourself in {}, or pass --server-bin", root.display()))?;
    if !status.success() || !binary.exists() {
        bail!("`{command}` failed ({status}); fix the build or pass --server-bin PATH");
    }
    Ok(binary)
}

/// A running server.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub token: String,
    pub data: PathBuf,
    /// Removed on drop unless `--keep`.
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `binary serve` on a fresh data dir; `keep` leaves the dir behind.
    pub fn start(binary: &Path, keep: bool) -> Result<Server> {
        let dir = tempfile::Builder::new().prefix("taskledger-bench-").tempdir().context("create a data dir")?;
        let data = dir.path().join("data");
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--data")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            // /readyz then says whether the projections have caught up, which
            // the bench waits for between workloads so one does not pay for
            // the last one's projection work.
            .args(["--ready-max-lag", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.context("read the server's stdout")?;
            if let Some(rest) = line.split("listening on http://").nth(1) {
                addr = Some(rest.trim().parse::<SocketAddr>().with_context(|| format!("parse address in {line:?}"))?);
            }
            if line.contains("authenticate with") {
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let Some(addr) = addr else {
            let _ = child.kill();
            bail!(
                "the server exited without printing its address; run `{} serve` by hand to see why",
                binary.display()
            );
        };
        let token =
            std::fs::read_to_string(data.join("admin.token")).context("read the admin token")?.trim().to_owned();
        let dir = if keep {
            eprintln!("keeping the server's data dir {}", dir.path().display());
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };
        Ok(Server { child, addr, token, data, _dir: dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server and waits for it to exit (at most 30 s, then SIGKILL).
    pub fn stop(&mut self) {
        // SAFETY: kill with a pid we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}
