//! Shared helpers for the black-box tests in `tests/tests/`: locating the
//! binaries cargo built so a test can run them as a user would.

use std::path::PathBuf;

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
