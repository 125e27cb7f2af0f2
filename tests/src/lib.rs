//! Shared helpers for the black-box tests in `tests/tests/`: locating the
//! binaries cargo built, and `Server`, which runs `taskledger serve` on a
//! free loopback port with a temporary data dir and talks HTTP to it as a
//! client would.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// One entry of a server's `tokens.json`: the token's name, the bearer token itself
/// (stored only as its BLAKE3 hash), roles, namespace scope (empty: every namespace) and
/// whether it is revoked.
pub fn token_entry(name: &str, token: &str, roles: &[&str], namespaces: &[&str], revoked: bool) -> Value {
    serde_json::json!({ "name": name, "token_blake3": api::auth::hash_token(token), "roles": roles,
                        "namespaces": namespaces, "revoked": revoked })
}

/// Writes `<data>/tokens.json` with `entries` (see [`token_entry`]) and `<data>/admin.token`
/// with `admin_token`, creating `data`; a server started on `data` then accepts those tokens.
pub fn write_tokens(data: &Path, entries: Vec<Value>, admin_token: &str) {
    std::fs::create_dir_all(data).expect("create the data dir");
    std::fs::write(data.join("tokens.json"), serde_json::json!({ "tokens": entries }).to_string())
        .expect("write tokens.json");
    std::fs::write(data.join("admin.token"), admin_token).expect("write admin.token");
}

/// Path of a binary built by this workspace (`taskledger`, `taskledger-replay`).
///
/// Cargo puts every workspace binary in the same target directory as the test
/// executable's parent, so the path is derived from the running test.
pub fn workspace_binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable has a path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// A running `taskledger serve`.
pub struct Server {
    child: Option<Child>,
    pub base: String,
    pub token: String,
    pub data: PathBuf,
    /// What the server printed on stdout up to the line that says how to authenticate.
    pub banner: String,
    agent: ureq::Agent,
    /// Kept alive for the server's lifetime when the data dir is temporary.
    _temp: Option<tempfile::TempDir>,
}

/// An HTTP answer: status and JSON body (`Value::Null` when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(String, String)>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// The stable error code of an error answer.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Server {
    /// Starts a server on a fresh temporary data dir.
    pub fn start() -> Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let data = temp.path().join("data");
        let mut server = Server::start_in(&data, &[]);
        server._temp = Some(temp);
        server
    }

    /// Starts a server on `data` (kept by the caller, e.g. across restarts).
    pub fn start_in(data: &Path, extra_args: &[&str]) -> Server {
        Server::start_with_log(data, extra_args, Stdio::null())
    }

    /// [`Server::start_in`], with the server's log (its stderr) going to `log`.
    pub fn start_with_log(data: &Path, extra_args: &[&str], log: impl Into<Stdio>) -> Server {
        let mut child = Command::new(workspace_binary("taskledger"))
            .arg("serve")
            .arg("--data")
            .arg(data)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start taskledger");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut base = None;
        let mut banner = String::new();
        for line in lines.by_ref() {
            let line = line.expect("read server stdout");
            banner.push_str(&line);
            banner.push('\n');
            if let Some(addr) = line.split("listening on ").nth(1) {
                base = Some(addr.trim().to_owned());
            }
            if line.contains("authenticate with") {
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let base = base.expect("the server printed its address");
        let token = std::fs::read_to_string(data.join("admin.token")).expect("admin token").trim().to_owned();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Server { child: Some(child), base, token, data: data.to_path_buf(), banner, agent, _temp: None }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn answer(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
        let mut response = result.expect("HTTP exchange");
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, body, headers }
    }

    /// POSTs JSON with the admin token.
    pub fn post(&self, path: &str, body: Value) -> Answer {
        self.post_as(&self.token, path, body, None)
    }

    /// POSTs JSON with `token` and an optional command id.
    pub fn post_as(&self, token: &str, path: &str, body: Value, command_id: Option<&str>) -> Answer {
        let mut request = self.agent.post(self.url(path)).header("Authorization", &format!("Bearer {token}"));
        if let Some(id) = command_id {
            request = request.header("X-Command-Id", id);
        }
        Self::answer(request.send_json(body))
    }

    /// Creates `count` single-step tasks in `namespace` through `/v1/tasks/batch`, at most 1,000
    /// a request: a backlog of `count` records for the feed and the subscriptions to read.
    pub fn create_tasks(&self, namespace: &str, count: usize) {
        let mut left = count;
        while left > 0 {
            let size = left.min(1000);
            let tasks: Vec<Value> =
                (0..size).map(|_| serde_json::json!({ "namespace": namespace, "handler": "h" })).collect();
            let batch = self.post("/v1/tasks/batch", serde_json::json!({ "tasks": tasks }));
            assert_eq!(batch.status, 201, "{:?}", batch.body);
            left -= size;
        }
    }

    /// POSTs a raw body (for malformed-input tests).
    pub fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> Answer {
        let request = self
            .agent
            .post(self.url(path))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", content_type);
        Self::answer(request.send(&body[..]))
    }

    pub fn put(&self, path: &str, body: Value) -> Answer {
        let request = self.agent.put(self.url(path)).header("Authorization", &format!("Bearer {}", self.token));
        Self::answer(request.send_json(body))
    }

    /// GETs with the admin token.
    pub fn get(&self, path: &str) -> Answer {
        self.get_as(&self.token, path)
    }

    pub fn get_as(&self, token: &str, path: &str) -> Answer {
        Self::answer(self.agent.get(self.url(path)).header("Authorization", &format!("Bearer {token}")).call())
    }

    /// GETs a text body (NDJSON feed, metrics) with the admin token.
    pub fn get_text(&self, path: &str) -> (u16, String) {
        self.get_text_as(&self.token, path)
    }

    /// Asserts that `/metrics` has each of `lines`, exactly as given.
    pub fn assert_metrics_include(&self, lines: &[&str]) {
        let (_, metrics) = self.get_text("/metrics");
        for line in lines {
            assert!(metrics.lines().any(|l| l == *line), "{line} in\n{metrics}");
        }
    }

    /// GETs a text body with `token`.
    pub fn get_text_as(&self, token: &str, path: &str) -> (u16, String) {
        let mut response = self
            .agent
            .get(self.url(path))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .expect("HTTP exchange");
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap_or_default())
    }

    /// The log head.
    pub fn head_seq(&self) -> u64 {
        self.get("/v1/ledger").body["head_seq"].as_u64().expect("head_seq")
    }

    /// Stops the server with SIGTERM and waits; returns its exit code.
    pub fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ----- additions for the reliability suite (authz, abuse, load) -----

impl Server {
    /// The server's process id (for /proc/<pid>/status), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `host:port`, for raw TCP clients.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_owned()
    }
}

/// Resident memory of a process in KiB (`VmRSS` in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raw HTTP/1.1 over a `TcpStream`, for requests an HTTP library would not
/// send (malformed headers, bytes dripped one at a time, odd framing).
pub mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    /// A parsed answer; `body` is the raw body text (not de-chunked).
    #[derive(Debug)]
    pub struct RawAnswer {
        pub status: u16,
        pub head: String,
        pub body: String,
    }

    /// Connects with read and write timeouts of `timeout`.
    pub fn connect(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Reads until the server closes (send `Connection: close`) or the
    /// timeout passes, then splits status, head and body.
    pub fn read_answer(stream: &mut TcpStream) -> std::io::Result<RawAnswer> {
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if bytes.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> std::io::Result<RawAnswer> {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
            std::io::Error::other(format!("no HTTP status line in {:?}", &text[..text.len().min(200)]))
        })?;
        Ok(RawAnswer { status, head: head.to_owned(), body: body.to_owned() })
    }

    /// Sends `request` as is and reads the whole answer.
    pub fn exchange(addr: &str, request: &[u8], timeout: Duration) -> std::io::Result<RawAnswer> {
        let mut stream = connect(addr, timeout)?;
        stream.write_all(request)?;
        read_answer(&mut stream)
    }
}

// ----- additions for the crash suite (crash_api) -----

impl Server {
    /// Kills the server with SIGKILL (no shutdown, no flush: a crash) and returns how it
    /// ended, so a caller can tell a kill from a server that had already exited on its own.
    pub fn kill(mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // `Child::kill` is SIGKILL on Unix.
        let _ = child.kill();
        child.wait().ok()
    }
}

/// The servers' SQL read models, compared row for row: every row of every projector table
/// (`projections::digest`), from SQLite or PostgreSQL, dumped once the projectors stand
/// still at the log's head.
pub mod read_models {
    use projections::digest::Dump;
    use serde_json::Value;
    use std::time::Duration;

    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
    }

    /// Every read-model row of a projections store: a SQLite file's path or a `postgres://` URL.
    pub fn dump(runtime: &tokio::runtime::Runtime, target: &str) -> Dump {
        runtime.block_on(async {
            let store = projections::Store::open(target).await.expect("open a projections store");
            let dump = projections::digest::dump(&store).await.expect("dump the projections");
            store.close().await;
            dump
        })
    }

    /// The seq every projector stands at, if all stand at the head, at `at_least` or
    /// later, without an error; `projectors` is `GET /v1/views/projections`'s answer.
    fn all_at_head(projectors: &Value, at_least: u64, context: &str) -> Option<u64> {
        let projectors = projectors.as_array()?;
        assert!(!projectors.is_empty(), "{context}: no projectors");
        let seq = projectors[0]["checkpoint_seq"].as_u64()?;
        for p in projectors {
            assert!(p["error"].is_null(), "{context}: projector failed: {p}");
            if p["checkpoint_seq"].as_u64() != Some(seq) || p["head_seq"].as_u64() != Some(seq) {
                return None;
            }
        }
        (seq >= at_least).then_some(seq)
    }

    /// Waits until every projector of a running server stands at the head (`status` reads
    /// `GET /v1/views/projections`), dumps `target`, and returns (seq, dump) once the
    /// projectors have not moved during the dump (a timer may append an event at any time;
    /// then it tries again).
    pub fn converged_dump(
        status: impl Fn() -> Option<Value>,
        runtime: &tokio::runtime::Runtime,
        target: &str,
        at_least: u64,
        context: &str,
    ) -> (u64, Dump) {
        let at_head = || status().and_then(|projectors| all_at_head(&projectors, at_least, context));
        for _ in 0..3_000 {
            if let Some(seq) = at_head() {
                let dump = dump(runtime, target);
                if at_head() == Some(seq) {
                    return (seq, dump);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{context}: the projections never stood still at the head (waited 30 s)");
    }

    /// Names the first read model that differs between `a` and `b` (called `names`), for a
    /// readable failure.
    pub fn first_difference(a: &Dump, b: &Dump, names: (&str, &str)) -> String {
        let (a, b) = (serde_json::to_value(a).expect("dump"), serde_json::to_value(b).expect("dump"));
        for (table, rows) in a.as_object().expect("dump object") {
            if &b[table] != rows {
                let (ra, rb) =
                    (rows.as_array().cloned().unwrap_or_default(), b[table].as_array().cloned().unwrap_or_default());
                let i = ra.iter().zip(&rb).position(|(x, y)| x != y).unwrap_or(ra.len().min(rb.len()));
                return format!(
                    "{table}: {} rows vs {}; first difference at row {i}: {} {:?} vs {} {:?}",
                    ra.len(),
                    rb.len(),
                    names.0,
                    ra.get(i),
                    names.1,
                    rb.get(i)
                );
            }
        }
        "no difference".into()
    }
}
