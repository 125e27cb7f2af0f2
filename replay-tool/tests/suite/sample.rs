//! Not a check: writes the story log to `$REPLAY_SAMPLE_DIR` when it is set,
//! so the README's examples can be reproduced by hand
//! (`REPLAY_SAMPLE_DIR=/tmp/story cargo test -p replay-tool --test suite sample::`);
//! with `REPLAY_BULK_TASKS=N` it writes N created/claimed/completed jobs
//! instead (3N events, a snapshot every 10,000), for rough timings.

#[test]
fn write_sample_log_when_asked() {
    if let Some(dir) = std::env::var_os("REPLAY_SAMPLE_DIR") {
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::remove_dir_all(&dir);
        let head = match std::env::var("REPLAY_BULK_TASKS").ok().and_then(|n| n.parse().ok()) {
            Some(tasks) => crate::common::build_bulk(&dir, tasks, 10_000),
            None => crate::common::build_story(&dir, 10),
        };
        println!("wrote {head} records to {}", dir.display());
    }
}
