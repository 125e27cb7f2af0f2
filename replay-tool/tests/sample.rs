//! Not a check: writes the story log to `$REPLAY_SAMPLE_DIR` when it is set,
//! so the README's examples can be reproduced by hand
//! (`REPLAY_SAMPLE_DIR=/tmp/story cargo test -p replay-tool --test sample`).

mod common;

#[test]
fn write_sample_log_when_asked() {
    if let Some(dir) = std::env::var_os("REPLAY_SAMPLE_DIR") {
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::remove_dir_all(&dir);
        let head = common::build_story(&dir, 10);
        println!("wrote {head} records to {}", dir.display());
    }
}
