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
