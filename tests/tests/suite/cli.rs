//! The binaries' command-line contract: a subcommand given too little says
//! what it needs on stderr and exits non-zero without writing anything;
//! `--version` works.

use std::process::Command;
use tests::workspace_binary;

fn run(binary: &str, args: &[&str]) -> std::process::Output {
    let path = workspace_binary(binary);
    Command::new(&path).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", path.display()))
}

#[test]
fn backup_without_a_source_says_what_it_needs_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("copy");
    let out = run("taskledger", &["backup", "--to", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server"));
    let out = run("taskledger", &["backup", "--to", to.to_str().unwrap(), "--server", "http://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
    assert!(!to.exists());
}

#[test]
fn binaries_report_their_version() {
    for binary in ["taskledger", "taskledger-replay"] {
        let out = run(binary, &["--version"]);
        assert!(out.status.success(), "{binary} --version failed");
        assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    }
}

/// A server killed with SIGKILL leaves its log needing redb's repair; the
/// replay tool reads it repaired in memory and never writes to the file.
#[test]
fn the_replay_tool_reads_a_crashed_servers_data_dir_without_modifying_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = tests::Server::start_in(&data, &[]);
    for name in ["a", "b"] {
        let created = server.post(
            "/v1/tasks",
            serde_json::json!({"namespace": "crash", "name": name, "steps": [{"name": "run", "handler": "h"}]}),
        );
        assert_eq!(created.status, 201, "{:?}", created.body);
    }
    server.kill();
    let log = data.join("ledger.redb");
    let before = std::fs::read(&log).unwrap();
    let data_arg = data.to_str().unwrap();

    let info = run("taskledger-replay", &["info", "--data", data_arg]);
    let (stdout, stderr) = (String::from_utf8_lossy(&info.stdout), String::from_utf8_lossy(&info.stderr));
    assert!(info.status.success(), "info failed: {stderr}");
    assert!(stderr.contains("not closed cleanly"), "{stderr}");
    assert!(stdout.contains("2 live"), "{stdout}");

    let verify = run("taskledger-replay", &["verify", "--data", data_arg]);
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&verify.stderr));
    assert!(stdout.contains("result: clean"), "{stdout}");

    assert!(std::fs::read(&log).unwrap() == before, "the crashed log was modified");

    // The log file copied alone, without its journals: the records acknowledged from them are
    // not in it. The tool refuses, saying what is missing and the way out (it claimed to read
    // "the records of its journal" and showed none, then read it with a warning), and `verify`
    // finds a problem; with `--accept-journal-loss` it reads what the file holds.
    let alone = dir.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    std::fs::copy(&log, alone.join("ledger.redb")).unwrap();
    let alone_arg = alone.to_str().unwrap();
    let info = run("taskledger-replay", &["info", "--data", alone_arg]);
    let stderr = String::from_utf8_lossy(&info.stderr);
    assert_eq!(info.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("ledger.journal is missing") && stderr.contains("--accept-journal-loss"), "{stderr}");
    // Nothing said about reading it repaired before the refusal (found by review).
    assert!(!stderr.contains("reading it repaired"), "{stderr}");
    let verify = run("taskledger-replay", &["verify", "--data", alone_arg, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(verify.status.code(), Some(1), "{report}");
    // One problem, the journal's: redb's own check of the file passes (it said "failed").
    assert_eq!(report["storage"], "passed", "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{report}");
    assert_eq!(problems[0]["kind"], "journal", "{report}");
    assert!(problems[0]["message"].as_str().unwrap().contains("ledger.journal is missing"), "{report}");
    let verify = run("taskledger-replay", &["verify", "--data", alone_arg, "--accept-journal-loss"]);
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert_eq!(verify.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("result: clean, but for the journal records lost (accepted)"), "{stdout}");
    let info = run("taskledger-replay", &["info", "--data", alone_arg, "--accept-journal-loss"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&info.stdout), String::from_utf8_lossy(&info.stderr));
    assert!(info.status.success(), "info failed: {stderr}");
    assert!(stderr.contains("warning:") && stderr.contains("ledger.journal is missing"), "{stderr}");
    assert!(!stdout.contains("2 live"), "the journals' tasks came from somewhere: {stdout}");
    // An offline backup refuses too, and takes the same flag (it had none to take).
    let to = dir.path().join("alone-backup.redb");
    let backup = run("taskledger", &["backup", "--data", alone_arg, "--to", to.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&backup.stderr);
    assert_eq!(backup.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ledger.journal is missing") && !to.exists(), "{stderr}");
    let backup =
        run("taskledger", &["backup", "--data", alone_arg, "--to", to.to_str().unwrap(), "--accept-journal-loss"]);
    let stderr = String::from_utf8_lossy(&backup.stderr);
    assert!(backup.status.success() && to.is_file(), "{stderr}");
    assert!(stderr.contains("warning:") && stderr.contains("ledger.journal is missing"), "{stderr}");
    // The flag is for a file, not a server's feed.
    let feed =
        run("taskledger-replay", &["info", "--server", "http://127.0.0.1:9", "--token", "t", "--accept-journal-loss"]);
    assert_eq!(feed.status.code(), Some(2), "{}", String::from_utf8_lossy(&feed.stderr));
}

/// `verify` on the data dir of a running server cannot run (exit 3) and says why: it reported
/// the lock as two problems found in the log (exit 1: found by a black-box check).
#[test]
fn verify_on_a_running_servers_dir_cannot_run_and_says_why() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let server = tests::Server::start_in(&data, &[]);
    let out = std::process::Command::new(tests::workspace_binary("taskledger-replay"))
        .args(["verify", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("open by a running server"), "{stderr}");
    drop(server);
}

/// A PostgreSQL URL's password is never printed, whatever fails (the replay tool printed it in
/// clear on success and in every error: found by a black-box check; the server masked it), and
/// a server that cannot reach PostgreSQL at startup says why (it said only "pool timed out").
/// (The server starts without its views then: `postgres::a_server_starts_while_its_postgresql_is_down…`.)
#[test]
fn a_postgresql_password_is_never_printed_and_a_failed_connection_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    drop(tests::Server::start_in(&data, &[]));
    // Nothing listens on port 1.
    let url = "postgres://app:Secr3tPw77@127.0.0.1:1/projections";
    let rebuild = run("taskledger-replay", &["rebuild", "--data", data.to_str().unwrap(), "--into", url]);
    let stderr = String::from_utf8_lossy(&rebuild.stderr);
    assert_eq!(rebuild.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("postgres://app:***@127.0.0.1:1/projections") && !stderr.contains("Secr3tPw"), "{stderr}");
    let said = |url: &str| {
        let log = dir.path().join("server.log");
        let server =
            tests::Server::start_with_log(&data, &["--projections", url], std::fs::File::create(&log).unwrap());
        let banner = server.banner.clone();
        assert_eq!(server.stop(), Some(0));
        (banner, std::fs::read_to_string(&log).unwrap())
    };
    let (banner, stderr) = said(url);
    assert!(banner.contains("postgres://app:***@127.0.0.1:1/projections") && !banner.contains("Secr3tPw"), "{banner}");
    assert!(!stderr.contains("Secr3tPw") && stderr.contains("refused"), "{stderr}");
    // A PostgreSQL that takes connections and never answers: the start gives up on it in time
    // (it waited for good, deaf to SIGTERM: found by review).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("postgres://app@{}/projections?password=Secr3tPw77", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            held.push(stream);
        }
    });
    let (banner, stderr) = said(&url);
    assert!(!banner.contains("Secr3tPw"), "{banner}");
    assert!(stderr.contains("did not answer within 5 s") && !stderr.contains("Secr3tPw"), "{stderr}");
}
