//! The binaries' honesty contract: a subcommand that is not built yet says so
//! on stderr and exits non-zero; `--version` works.

use std::process::Command;
use tests::workspace_binary;

fn run(binary: &str, args: &[&str]) -> std::process::Output {
    let path = workspace_binary(binary);
    Command::new(&path).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", path.display()))
}

#[test]
fn subcommands_not_yet_built_say_so_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let out = run("taskledger", &["backup", "--to", dir.path().join("copy").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not built yet"));
}

#[test]
fn binaries_report_their_version() {
    for binary in ["taskledger", "taskledger-replay"] {
        let out = run(binary, &["--version"]);
        assert!(out.status.success(), "{binary} --version failed");
        assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    }
}
