//! `rebuild` and `materialize --as-of` run the projections crate's projectors
//! over a log file: every projector ends at the asked seq with the log's
//! chain hash there, and a rebuild into an existing store resumes from its
//! checkpoints.

use crate::common::{build_story, path, replay, replay_ok};

#[test]
fn materialize_as_of_a_time_and_rebuild_to_the_head() {
    let dir = tempfile::tempdir().unwrap();
    build_story(&dir.path().join("data"), 10);
    let data = dir.path().join("data");
    let events = replay_ok(&["events", "--data", path(&data), "--json", "--from", "12", "--to", "12"]);
    let hash_12 =
        serde_json::from_str::<serde_json::Value>(events.trim()).unwrap()["hash"].as_str().unwrap().to_owned();

    let file = dir.path().join("asof.sqlite");
    let out =
        replay_ok(&["materialize", "--data", path(&data), "--as-of", "2026-11-23T14:00:08Z", "--out", path(&file)]);
    assert!(out.starts_with("projections at seq 12 in"), "{out}");
    for projector in ["audit", "dashboard", "queue", "tasks"] {
        assert!(out.contains(&format!("{projector:<10} v1 live   at seq 12 ({hash_12})")), "{projector}: {out}");
    }
    assert!(file.is_file());
    let again = replay(&["materialize", "--data", path(&data), "--as-of", "3", "--out", path(&file)]);
    assert_eq!(again.status.code(), Some(3), "an existing file is never overwritten");

    let store = dir.path().join("rebuilt.sqlite");
    for _ in 0..2 {
        let out = replay_ok(&["rebuild", "--data", path(&data), "--into", path(&store)]);
        assert!(out.starts_with("projections at seq 23"), "{out}");
        assert_eq!(out.matches("at seq 23 (").count(), 4, "{out}");
    }
}

/// A materialization that cannot write (a file-size limit standing for a full disk) fails and
/// leaves no file: a half-built one, with some projectors' checkpoints and empty tables, looked
/// like the past (found by a black-box check on a full disk).
#[cfg(target_os = "linux")]
#[test]
fn a_materialization_that_cannot_write_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    crate::common::build_bulk(&data, 2_000, 0);
    let file = dir.path().join("asof.sqlite");
    let failed = crate::common::replay_with_files_under(
        512 * 1024,
        &["materialize", "--data", path(&data), "--out", path(&file)],
    );
    assert_ne!(failed.status.code(), Some(0), "{}", crate::common::stderr(&failed));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!file.exists(), "a half-built file was left: {left:?}");
    replay_ok(&["materialize", "--data", path(&data), "--out", path(&file)]);
}
