//! Black-box tests of `taskledger backup` and of the server's connection
//! limits: the real binaries, a real server on a loopback port, real files.
//!
//! A backup must be a consistent prefix of the log (at least everything
//! acknowledged before it started), verify cleanly with `taskledger-replay`,
//! and restore a server that answers exactly as the original did; offline it
//! must equal an online copy and never touch its source; it is refused
//! without an admin token and never leaves a file behind when it fails. The
//! connection limit and the header read timeout are checked by what a client
//! observes (served or not, closed or not), never by how long anything takes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use tests::{Server, workspace_binary};

/// The head a backup reported in its summary line.
#[derive(Debug, PartialEq, Eq)]
struct Reported {
    seq: u64,
    hash: String,
}

fn run(binary: &str, args: &[&str]) -> Output {
    let path = workspace_binary(binary);
    Command::new(&path).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", path.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn online_backup(server: &Server, token: &str, to: &Path) -> Output {
    run("taskledger", &["backup", "--server", &server.base, "--token", token, "--to", to.to_str().unwrap()])
}

fn offline_backup(data: &Path, to: &Path) -> Output {
    run("taskledger", &["backup", "--data", data.to_str().unwrap(), "--to", to.to_str().unwrap()])
}

/// Parses `backup FILE: N records, head seq H, head hash X, B bytes, T s`.
fn reported(output: &Output) -> Reported {
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "backup failed: {stdout}{}", text(&output.stderr));
    assert_eq!(stdout.lines().count(), 1, "one summary line: {stdout}");
    let after = |label: &str| -> String {
        let rest = stdout.split(label).nth(1).unwrap_or_else(|| panic!("no {label:?} in {stdout}"));
        rest.split([',', ' ']).next().unwrap().to_owned()
    };
    let records: u64 = stdout.split(": ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    let seq: u64 = after("head seq ").parse().unwrap();
    assert_eq!(records, seq, "a backup holds every record up to its head: {stdout}");
    let hash = after("head hash ");
    assert_eq!(hash.len(), 64, "{stdout}");
    Reported { seq, hash }
}

fn ledger_head(server: &Server) -> Reported {
    let head = server.get("/v1/ledger").body;
    Reported { seq: head["head_seq"].as_u64().unwrap(), hash: head["head_hash"].as_str().unwrap().to_owned() }
}

fn assert_verifies(file: &Path) {
    let out = run("taskledger-replay", &["verify", "--log", file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "verify {}: {stdout}{}", file.display(), text(&out.stderr));
    assert!(stdout.contains("result: clean"), "{stdout}");
}

fn staging(to: &Path) -> PathBuf {
    api::backup::staging_dir(to)
}

fn job(n: u64) -> Value {
    json!({ "namespace": "backup", "handler": "work", "payload": { "n": n } })
}

/// Restores `file` into a fresh data dir and starts a server on it.
fn restore(file: &Path, root: &Path) -> Server {
    let data = root.join("restored");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(file, data.join("ledger.redb")).unwrap();
    Server::start_in(&data, &[])
}

#[test]
fn an_online_backup_taken_while_producers_write_restores_the_same_tasks() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start();
    // Some history before, in batches, so the copy has more than one chunk to stream.
    for b in 0..20 {
        let tasks: Vec<Value> = (0..100).map(|i| job(b * 100 + i)).collect();
        let answer = server.post("/v1/tasks/batch", json!({ "tasks": tasks }));
        assert!(answer.status == 200 || answer.status == 201, "{answer:?}");
    }
    // (task id, seq it was acknowledged at)
    let acked: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let file = temp.path().join("ledger.bak");
    let (acked_before, backup) = std::thread::scope(|scope| {
        for p in 0..2u64 {
            let (server, acked, stop) = (&server, &acked, &stop);
            scope.spawn(move || {
                let mut n = 1_000_000 * (p + 1);
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let answer = server.post("/v1/tasks", job(n));
                    assert_eq!(answer.status, 201, "{answer:?}");
                    let id = answer.body["task_id"].as_str().unwrap().to_owned();
                    acked.lock().unwrap().push((id, answer.body["seq"].as_u64().unwrap()));
                }
            });
        }
        // Let the producers get going, then back up while they keep writing.
        while acked.lock().unwrap().len() < 50 {
            std::thread::yield_now();
        }
        let acked_before = acked.lock().unwrap().iter().map(|(_, seq)| *seq).max().unwrap();
        let backup = online_backup(&server, &server.token, &file);
        // Writes go on after the backup: they were never paused.
        let after = acked.lock().unwrap().len();
        while acked.lock().unwrap().len() < after + 20 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Release);
        (acked_before, backup)
    });
    let copy = reported(&backup);
    assert!(copy.seq >= acked_before, "the backup (head {}) holds every acknowledged seq ({acked_before})", copy.seq);
    assert!(copy.seq < server.head_seq(), "producers kept writing past the backup's head");
    assert!(!staging(&file).exists(), "the staging dir is gone");
    assert_verifies(&file);

    let restored = restore(&file, temp.path());
    assert_eq!(ledger_head(&restored), copy);
    let acked = acked.into_inner().unwrap();
    let (mut inside, mut outside) = (0, 0);
    for (id, seq) in &acked {
        let path = format!("/v1/tasks/{id}");
        let answer = restored.get(&path);
        if *seq <= copy.seq {
            inside += 1;
            assert_eq!(answer.status, 200, "task {id} at seq {seq} is in the backup");
            assert_eq!(answer.body, server.get(&path).body, "task {id} reads the same after the restore");
        } else {
            outside += 1;
            assert_eq!(answer.status, 404, "task {id} at seq {seq} came after the backup");
        }
    }
    assert!(inside > 0 && outside > 0, "tasks on both sides of the backup's head ({inside}, {outside})");
    // The restored ledger is live: it takes new writes after the copied head.
    let created = restored.post("/v1/tasks", job(7));
    assert_eq!((created.status, created.body["seq"].as_u64()), (201, Some(copy.seq + 1)));
}

#[test]
fn an_offline_backup_of_a_stopped_dir_equals_the_online_one_and_leaves_the_source_alone() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let server = Server::start_in(&data, &[]);
    let ids: Vec<String> =
        (0..30).map(|n| server.post("/v1/tasks", job(n)).body["task_id"].as_str().unwrap().to_owned()).collect();
    let head = ledger_head(&server);

    let online_file = temp.path().join("online.bak");
    let online = reported(&online_backup(&server, &server.token, &online_file));
    assert_eq!(online, head, "nothing was written meanwhile, so the copy ends at the head");

    // Offline, while the server holds the file: refused, pointing at --server.
    let offline_file = temp.path().join("offline.bak");
    let refused = offline_backup(&data, &offline_file);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("running server") && stderr.contains("--server"), "{stderr}");
    assert!(!offline_file.exists() && !staging(&offline_file).exists());

    let answers: Vec<Value> = ids.iter().map(|id| server.get(&format!("/v1/tasks/{id}")).body).collect();
    assert_eq!(server.stop(), Some(0));
    let source = std::fs::read(data.join("ledger.redb")).unwrap();
    let offline = reported(&offline_backup(&data, &offline_file));
    assert_eq!(offline, online);
    assert_eq!(std::fs::read(data.join("ledger.redb")).unwrap(), source, "the source is never modified");
    assert_verifies(&offline_file);

    // An existing file is never replaced.
    let again = offline_backup(&data, &offline_file);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("already exists"), "{}", text(&again.stderr));
    assert_eq!(reported(&offline_backup(&data, &temp.path().join("third.bak"))), offline);

    let restored = restore(&offline_file, temp.path());
    for (id, answer) in ids.iter().zip(&answers) {
        assert_eq!(&restored.get(&format!("/v1/tasks/{id}")).body, answer);
    }
}

#[test]
fn an_offline_backup_of_a_killed_servers_dir_holds_every_acknowledged_task_and_leaves_both_files_alone() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let server = Server::start_in(&data, &[]);
    let ids: Vec<String> =
        (0..40).map(|n| server.post("/v1/tasks", job(n)).body["task_id"].as_str().unwrap().to_owned()).collect();
    let head = ledger_head(&server);
    let answers: Vec<Value> = ids.iter().map(|id| server.get(&format!("/v1/tasks/{id}")).body).collect();
    server.kill();
    // Killed before any checkpoint: the newest records are only in the write-ahead journal.
    let journal = data.join("ledger.journal");
    let journaled = eventlog::journal::read(&journal).unwrap().map_or(0, |contents| contents.records.len());
    assert!(journaled > 0, "the kill came after a checkpoint; nothing to recover from the journal");
    let sources = (std::fs::read(data.join("ledger.redb")).unwrap(), std::fs::read(&journal).unwrap());

    let file = temp.path().join("killed.bak");
    let output = offline_backup(&data, &file);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(reported(&output), head, "every acknowledged record is in the copy");
    assert!(
        sources == (std::fs::read(data.join("ledger.redb")).unwrap(), std::fs::read(&journal).unwrap()),
        "the killed server's files are never modified"
    );
    assert_verifies(&file);
    let restored = restore(&file, temp.path());
    for (id, answer) in ids.iter().zip(&answers) {
        assert_eq!(&restored.get(&format!("/v1/tasks/{id}")).body, answer);
    }
}

#[test]
fn a_backup_needs_an_admin_token_and_leaves_nothing_when_refused() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let entry = |name: &str, roles: &[&str], namespaces: &[&str]| {
        tests::token_entry(name, &format!("tok-{name}"), roles, namespaces, false)
    };
    let tokens = vec![
        entry("admin", &["admin"], &[]),
        entry("auditor", &["auditor"], &[]),
        entry("operator", &["operator"], &[]),
        entry("scoped-admin", &["admin"], &["mail"]),
    ];
    tests::write_tokens(&data, tokens, "tok-admin");
    let server = Server::start_in(&data, &[]);
    server.post("/v1/tasks", job(1));

    let file = temp.path().join("refused.bak");
    for (token, status) in
        [("tok-nope", "401"), ("tok-auditor", "403"), ("tok-operator", "403"), ("tok-scoped-admin", "403")]
    {
        let out = online_backup(&server, token, &file);
        assert!(!out.status.success(), "{token} must be refused");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(&format!("HTTP {status}")), "{token}: {stderr}");
        assert!(!file.exists() && !staging(&file).exists(), "{token}: nothing left behind");
    }
    // The same route answers the stable error codes to any client.
    assert_eq!(server.get_as("tok-auditor", "/v1/admin/backup").code(), "forbidden");
    assert_eq!(server.get_as("tok-nope", "/v1/admin/backup").status, 401);

    // Nothing of the user's is removed or replaced: an existing `FILE.tmp` (removed with its
    // contents once, found by a black-box check) and a dangling link at `FILE` (replaced once).
    std::fs::create_dir(staging(&file)).unwrap();
    std::fs::write(staging(&file).join("notes.txt"), "mine").unwrap();
    for token in ["tok-nope", "tok-admin"] {
        let out = online_backup(&server, token, &file);
        assert!(!out.status.success(), "{token}");
        assert!(text(&out.stderr).contains("already exists"), "{token}: {}", text(&out.stderr));
        assert_eq!(std::fs::read_to_string(staging(&file).join("notes.txt")).unwrap(), "mine", "{token}");
    }
    std::fs::remove_dir_all(staging(&file)).unwrap();
    let link = temp.path().join("link.bak");
    std::os::unix::fs::symlink(temp.path().join("nowhere"), &link).unwrap();
    assert!(!online_backup(&server, "tok-admin", &link).status.success());
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link is left alone");
    assert!(!staging(&link).exists());

    assert_eq!(reported(&online_backup(&server, "tok-admin", &file)).seq, 1);
}

/// Sends `GET /healthz` on `stream` (kept alive).
fn send_request(stream: &mut TcpStream) {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: taskledger\r\n\r\n").unwrap();
}

/// Reads one whole response (head and Content-Length body); returns its status line.
fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .expect("a Content-Length");
            if buf.len() >= end + 4 + length {
                return head.lines().next().unwrap().to_owned();
            }
        }
        let n = stream.read(&mut chunk).expect("read a response");
        assert!(n > 0, "the server closed the connection mid-response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn exchange(stream: &mut TcpStream) -> String {
    send_request(stream);
    read_response(stream)
}

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    // Only a guard against a hung test; no assertion depends on it.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    stream
}

#[test]
fn a_connection_beyond_the_limit_is_served_only_once_another_closes() {
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_in(&temp.path().join("data"), &["--max-connections", "2"]);
    let mut a = connect(&server);
    let mut b = connect(&server);
    assert_eq!(exchange(&mut a), "HTTP/1.1 200 OK");
    assert_eq!(exchange(&mut b), "HTTP/1.1 200 OK");

    // The kernel completes the third handshake, but the server does not accept it.
    let mut c = connect(&server);
    send_request(&mut c);
    for _ in 0..20 {
        assert_eq!(exchange(&mut b), "HTTP/1.1 200 OK", "the admitted connections are served meanwhile");
    }
    c.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let pending = c.read(&mut byte);
    assert!(
        matches!(&pending, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the third connection got no answer while two were open: {pending:?}"
    );
    c.set_nonblocking(false).unwrap();

    drop(a);
    assert_eq!(read_response(&mut c), "HTTP/1.1 200 OK", "served once a slot was free");
    assert_eq!(exchange(&mut b), "HTTP/1.1 200 OK");
}

#[test]
fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    let temp = tempfile::tempdir().unwrap();
    let server =
        Server::start_in(&temp.path().join("data"), &["--max-connections", "1", "--header-read-timeout-ms", "300"]);
    // A slow-drip client takes the only slot and never completes its head...
    let mut slow = connect(&server);
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: taskledger\r\n").unwrap();
    // ...so this client is served only because the server closes the slow one.
    let mut next = connect(&server);
    assert_eq!(exchange(&mut next), "HTTP/1.1 200 OK");
    let mut rest = Vec::new();
    let closed = slow.read_to_end(&mut rest);
    assert!(closed.is_ok() || closed.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset));
}
