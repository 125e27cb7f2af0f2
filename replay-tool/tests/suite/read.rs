//! `info`, `events` and `state` against a real log written by the `Writer`:
//! golden outputs for the story log, every filter, and `state --as-of`
//! cross-checked against a fold stopped by hand at every seq.

use crate::common::{build_story, fold_by_hand, golden, hex, path, replay, replay_ok, stdout};
use serde_json::Value;

const TASK_2: &str = "018bcfe5-6802-7001-bc6e-f372fe94f82a";
const TASK_3: &str = "018bcfe5-6803-7001-9aa6-6d2c7ddf743f";

fn story() -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let head = build_story(dir.path(), 10);
    (dir, head)
}

fn lines_json(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn info_reports_head_time_range_tasks_queues_and_snapshots() {
    let (dir, head) = story();
    let mut info: Value =
        serde_json::from_str(&replay_ok(&["info", "--data", path(dir.path()), "--json", "--full"])).unwrap();
    assert_eq!(info["records"], head);
    assert!(info["file_bytes"].as_u64().unwrap() > 0);
    let object = info.as_object_mut().unwrap();
    object.remove("log");
    object.remove("file_bytes");
    golden("info.json", &format!("{}\n", serde_json::to_string_pretty(&info).unwrap()));
    let text = replay_ok(&["info", "--log", path(&dir.path().join("ledger.redb")), "--full"]);
    assert!(text.contains("tasks        4 (1 live): cancelled 1, complete 2, in_progress 1"), "{text}");
    assert!(text.contains("snapshot     seq 20 (ok)"), "{text}");
    // Without --full the live tasks come from the snapshot at 20 plus the records after it.
    let quick: Value = serde_json::from_str(&replay_ok(&["info", "--data", path(dir.path()), "--json"])).unwrap();
    assert_eq!(quick["tasks"]["live_by_state"], info["tasks"]["live_by_state"]);
    assert_eq!(quick["tasks"]["live"], 1);
    assert_eq!(quick["tasks"]["total"], Value::Null);
    assert_eq!((quick["folded"]["snapshot_seq"].as_u64(), quick["folded"]["replayed"].as_u64()), (Some(20), Some(3)));
    let text = replay_ok(&["info", "--data", path(dir.path())]);
    assert!(text.contains("tasks        1 live: in_progress 1 (finished tasks are counted with --full"), "{text}");
}

#[test]
fn events_table_and_json_with_every_filter() {
    let (dir, head) = story();
    let data = path(dir.path());
    golden("events.txt", &replay_ok(&["events", "--data", data]));

    let all = lines_json(&replay_ok(&["events", "--data", data, "--json"]));
    assert_eq!(all.len() as u64, head);
    let first = all[0].as_object().unwrap();
    let mut keys: Vec<&str> = first.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "actor",
            "command_id",
            "data",
            "hash",
            "recorded_at",
            "schema_version",
            "seq",
            "stream",
            "stream_version",
            "type"
        ]
    );
    assert_eq!(all[0]["data"]["spec"]["payload"], serde_json::json!({"n": 1}), "payloads are JSON, as on the feed");
    assert_eq!(all[22]["hash"].as_str().unwrap().len(), 64);

    let seqs = |args: &[&str]| -> Vec<u64> {
        let mut full = vec!["events", "--data", data, "--json"];
        full.extend_from_slice(args);
        lines_json(&replay_ok(&full)).iter().map(|v| v["seq"].as_u64().unwrap()).collect()
    };
    assert_eq!(seqs(&["--task", TASK_2]), [2, 12, 13, 14, 15, 16]);
    assert_eq!(seqs(&["--namespace", "reports"]), [2, 12, 13, 14, 15, 16, 20]);
    assert_eq!(seqs(&["--type", "step_failed,lease_expired"]), [8, 11, 13]);
    assert_eq!(seqs(&["--type", "step_failed", "--type", "lease_expired"]), [8, 11, 13]);
    assert_eq!(seqs(&["--actor", "operator-kim"]), [17, 20, 21]);
    assert_eq!(seqs(&["--actor", "system"]), [9, 13, 14]);
    assert_eq!(seqs(&["--from", "5", "--to", "8"]), [5, 6, 7, 8]);
    let backwards = replay(&["events", "--data", data, "--from", "8", "--to", "5"]);
    assert_eq!(backwards.status.code(), Some(2), "{}", crate::common::stderr(&backwards));
    assert!(crate::common::stderr(&backwards).contains("--from (seq 8) is after --to (seq 5)"));
    // Two seqs out of order by one are out of order too (found by a black-box check: an empty
    // answer, exit 0); a start past the head is refused like an end past it, while just after
    // the head is an empty range.
    let by_one = replay(&["events", "--data", data, "--from", "8", "--to", "7"]);
    assert_eq!(by_one.status.code(), Some(2), "{}", crate::common::stderr(&by_one));
    let beyond = replay(&["events", "--data", data, "--from", "99"]);
    assert_eq!(beyond.status.code(), Some(3), "{}", crate::common::stderr(&beyond));
    assert!(crate::common::stderr(&beyond).contains("seq 99 is beyond the head of the log (23)"));
    assert_eq!(seqs(&["--from", "24"]), Vec::<u64>::new());
    // An empty answer says why on stderr (stdout stays empty for scripts).
    let nobody = replay(&["events", "--data", data, "--json", "--actor", "kim"]);
    assert_eq!((nobody.status.code(), stdout(&nobody)), (Some(0), String::new()));
    let said = crate::common::stderr(&nobody);
    assert!(said.contains("no record matched in seq 1..23") && said.contains("--actor token:kim?"), "{said}");
    let malformed = replay(&["events", "--data", data, "--task", "not-a-task"]);
    assert_eq!(malformed.status.code(), Some(2), "{}", crate::common::stderr(&malformed));
    assert_eq!(seqs(&["--from", "2026-11-23T14:00:08Z", "--to", "2026-11-23T14:00:13.5Z"]), [13, 14, 15, 16]);
    assert_eq!(seqs(&["--task", TASK_3, "--from", "9", "--limit", "2"]), [9, 10]);
    assert_eq!(seqs(&["--namespace", "emails", "--type", "task_created", "--from", "3"]), [3, 22]);

    let bad = replay(&["events", "--data", data, "--type", "step_exploded"]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    assert!(
        crate::common::stderr(&bad).contains("unknown event type \"step_exploded\""),
        "{}",
        crate::common::stderr(&bad)
    );
}

#[test]
fn state_as_of_equals_a_fold_stopped_there_at_every_seq() {
    let (dir, head) = story();
    let data = path(dir.path());
    for n in 0..=head {
        let out: Value =
            serde_json::from_str(&replay_ok(&["state", "--data", data, "--as-of", &n.to_string(), "--json"])).unwrap();
        assert_eq!(out["as_of_seq"], n);
        let fold = fold_by_hand(dir.path(), n);
        assert_eq!(out["digest"].as_str().unwrap(), hex(&fold.digest()), "as of {n}");
        // The counts, read mostly from a snapshot's bytes, are the fold's.
        assert_eq!(out["live_tasks"], fold.live_task_count(), "as of {n}");
        assert_eq!(out["timers"], fold.timer_count(), "as of {n}");
        for queue in out["queues"].as_array().unwrap() {
            let ns = domain::Namespace::new(queue["namespace"].as_str().unwrap()).unwrap();
            assert_eq!(queue["ready"], fold.ready_count(&ns), "as of {n}");
            assert_eq!(queue["in_progress"], fold.in_progress(&ns), "as of {n}");
            assert_eq!(queue["paused"], fold.queue_settings(&ns).paused, "as of {n}");
        }
        let live: u64 = fold.tasks().filter(|t| t.state == domain::TaskState::InProgress).count() as u64;
        assert_eq!(out["tasks_by_state"]["in_progress"].as_u64().unwrap_or(0), live, "as of {n}");
        // --tasks lists every task, folded in full, with the same digest.
        let listed: Value = serde_json::from_str(&replay_ok(&[
            "state",
            "--data",
            data,
            "--as-of",
            &n.to_string(),
            "--json",
            "--tasks",
        ]))
        .unwrap();
        assert_eq!(listed["digest"], out["digest"], "as of {n}");
        assert_eq!(listed["tasks"].as_array().unwrap().len(), fold.live_task_count(), "as of {n}");
    }
    // Snapshots are used: seq 12 starts from the one at 10.
    let out: Value = serde_json::from_str(&replay_ok(&["state", "--data", data, "--as-of", "12", "--json"])).unwrap();
    assert_eq!((out["snapshot_seq"].as_u64(), out["replayed"].as_u64()), (Some(10), Some(2)));
    // A time means the last record at or before it.
    let by_time: Value =
        serde_json::from_str(&replay_ok(&["state", "--data", data, "--as-of", "2026-11-23T14:00:08.4Z", "--json"]))
            .unwrap();
    assert_eq!(by_time["as_of_seq"], 12);
    golden("state-as-of-12.txt", &replay_ok(&["state", "--data", data, "--as-of", "12"]));
    golden("state-as-of-12-tasks.txt", &replay_ok(&["state", "--data", data, "--as-of", "12", "--tasks"]));
}

#[test]
fn state_of_one_task_shows_it_even_after_it_finished() {
    let (dir, _) = story();
    let data = path(dir.path());
    let at = |seq: &str| -> Value {
        serde_json::from_str(&replay_ok(&["state", "--data", data, "--task", TASK_3, "--as-of", seq, "--json"]))
            .unwrap()
    };
    assert_eq!(at("8")["steps"][0]["state"], "waiting_for_retry");
    assert_eq!(at("11")["state"], "blocked_by_failures");
    assert_eq!(at("11")["steps"][0]["last_error"], "boom");
    assert_eq!(at("23")["state"], "complete");
    // Every field of the API's task body, the task's idempotency key and each step's payload
    // included (both were left out: found by a black-box check).
    let finished = at("23");
    assert!(finished.as_object().unwrap().contains_key("idempotency_key"), "{finished}");
    assert!(finished["steps"][0].as_object().unwrap().contains_key("payload"), "{finished}");
    golden("state-task-2-at-12.txt", &replay_ok(&["state", "--data", data, "--task", TASK_2, "--as-of", "12"]));
    let early = replay(&["state", "--data", data, "--task", "018bcfe5-6804-7002-b8dd-e6e5fd29f054", "--as-of", "5"]);
    assert_eq!(early.status.code(), Some(3));
    assert!(crate::common::stderr(&early).contains("did not exist yet at seq 5"));
    let beyond = replay(&["state", "--data", data, "--as-of", "99"]);
    assert!(crate::common::stderr(&beyond).contains("beyond the head of the log (23)"));
}

#[test]
fn missing_inputs_are_explained() {
    let out = replay(&["info", "--data", "/nonexistent/dir"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(crate::common::stderr(&out).contains("no such file"), "{}", crate::common::stderr(&out));
    let out = replay(&["info"]);
    assert!(crate::common::stderr(&out).contains("--data DIR, --log FILE, or --server URL --token T"));
}
