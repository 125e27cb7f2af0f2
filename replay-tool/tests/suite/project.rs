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
