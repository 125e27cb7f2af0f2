//! `incident` (Markdown, HTML, JSON; by task, worker and time window) and
//! `diff` on the story log, with golden outputs.

use crate::common::{
    HOSTILE, build_cancelled_lease, build_heartbeats, build_hostile, build_story, golden, path, replay, replay_ok,
};
use serde_json::Value;

const TASK_3: &str = "018bcfe5-6803-7001-9aa6-6d2c7ddf743f";

fn story() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    build_story(dir.path(), 10);
    let data = path(dir.path()).to_owned();
    (dir, data)
}

/// Replaces the temp directory in a report so it can be compared with a golden file.
fn stable(text: &str, data: &str) -> String {
    text.replace(data, "<data>")
}

#[test]
fn incident_of_a_task_in_markdown_json_and_html() {
    let (_dir, data) = story();
    let md = replay_ok(&["incident", "--data", &data, "--task", TASK_3]);
    golden("incident-task-3.md", &stable(&md, &data));
    assert!(md.contains("1 retries scheduled (backoff: 855 ms)"), "{md}");
    assert!(md.contains("seq 17 step_retried by operator-kim"), "{md}");

    let json: Value =
        serde_json::from_str(&replay_ok(&["incident", "--data", &data, "--task", TASK_3, "--format", "json"])).unwrap();
    assert_eq!(json["summary"]["dead_letters"], 1);
    assert_eq!(json["summary"]["claims"], 3);
    let seqs: Vec<u64> = json["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [3, 7, 8, 9, 10, 11, 17, 18, 19]);
    // Each claim's lease bar ends at the event that ended it.
    assert_eq!(json["events"][1]["lease_end_ms"], 2000.0);

    let html_path = _dir.path().join("report.html");
    replay_ok(&["incident", "--data", &data, "--task", TASK_3, "--format", "html", "--out", path(&html_path)]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<svg") && html.contains("</svg>"));
    assert_eq!(html.matches("<circle").count(), 9, "one marker per event");
    assert_eq!(html.matches("<rect").count(), 3, "one bar per lease");
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"), "self-contained");
    golden("incident-task-3.html", &stable(&html, &data));
}

/// A step heartbeating for hours is one timeline row per run of heartbeats in Markdown and
/// HTML, and every heartbeat in JSON.
#[test]
fn incident_timelines_show_a_run_of_heartbeats_as_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let head = build_heartbeats(dir.path(), 40);
    let data = path(dir.path());
    let task = &domain::testkit::task_id(1).to_string();
    let report: Value =
        serde_json::from_str(&replay_ok(&["incident", "--data", data, "--task", task, "--format", "json"])).unwrap();
    assert_eq!(report["events"].as_array().unwrap().len() as u64, head, "JSON lists every event");
    assert_eq!(report["summary"]["heartbeats"], 80);

    let markdown = replay_ok(&["incident", "--data", data, "--task", task]);
    let timeline: Vec<&str> =
        markdown.split("## Timeline").nth(1).unwrap().lines().filter(|l| l.starts_with("| ")).collect();
    let kinds: Vec<&str> = timeline.iter().skip(1).map(|row| row.split(" | ").nth(4).unwrap()).collect();
    // The queue's pause and resume while the task waited are in its report (they explain the
    // wait), in their own lane.
    assert_eq!(
        kinds,
        [
            "task_created",
            "step_claimed",
            "lease_extended ×40",
            "step_failed",
            "queue_paused",
            "step_retry_due",
            "queue_resumed",
            "step_claimed",
            "lease_extended ×40",
            "step_completed"
        ]
    );
    assert!(markdown.contains("| `queue:emails` | 2 |"), "{markdown}");
    let first_run = timeline.iter().find(|row| row.contains("lease_extended ×40")).unwrap();
    assert!(first_run.starts_with("| 3–42 |"), "{first_run}");
    assert!(first_run.contains("40 heartbeats over 39.0 s"), "{first_run}");
    assert!(markdown.contains("`--format json` lists each"), "{markdown}");
    assert!(markdown.contains(&format!("/run` | {} |", head - 3)), "the lanes table counts every event: {markdown}");

    let html = replay_ok(&["incident", "--data", data, "--task", task, "--format", "html"]);
    assert_eq!(html.matches("<circle").count(), 10, "one marker per row");
    assert_eq!(html.matches("<rect").count(), 2, "one bar per lease");
    assert_eq!(html.matches("lease_extended ×40").count(), 4, "two markers' titles and two table rows");
}

/// `--max-events` is a limit, not a cut: a report that would hold more events is refused with
/// a usage error naming the limit and where it was passed, and prints nothing; one at the limit
/// is whole. Reports of a window had no cap (a busy hour is millions of events in memory and
/// an HTML page no browser opens).
#[test]
fn an_incident_report_past_its_event_limit_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let head = build_heartbeats(dir.path(), 40);
    let data = path(dir.path());
    let task = &domain::testkit::task_id(1).to_string();
    let at_limit = head.to_string();
    let whole: Value = serde_json::from_str(&replay_ok(&[
        "incident",
        "--data",
        data,
        "--task",
        task,
        "--max-events",
        &at_limit,
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(whole["events"].as_array().unwrap().len() as u64, head, "the task's events and its queue's");
    let window_end = head.to_string();
    for (what, args) in [
        ("task", vec!["--task", task.as_str(), "--max-events", "50"]),
        ("worker", vec!["--worker", "w-1", "--max-events", "10"]),
        ("window", vec!["--from", "1", "--to", window_end.as_str(), "--max-events", "10"]),
    ] {
        let mut argv = vec!["incident", "--data", data];
        argv.extend(args);
        let refused = replay(&argv);
        let stderr = crate::common::stderr(&refused);
        assert_eq!(refused.status.code(), Some(2), "{what}: {stderr}");
        assert!(refused.stdout.is_empty(), "{what}: no partial report");
        let limit = argv.last().unwrap();
        assert!(stderr.contains(&format!("more than {limit} events of seq ")), "{what}: {stderr}");
        assert!(stderr.contains("raise --max-events"), "{what}: {stderr}");
    }
    let zero = replay(&["incident", "--data", data, "--task", task, "--max-events", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{}", crate::common::stderr(&zero));
}

/// A lease still held when the report ends is marked so and drawn to the timeline's right edge
/// (its bar ended where it began, as if it had ended at once); one claimed before the report's
/// window is drawn from the left edge to the event that ended it (it had no bar at all).
#[test]
fn incident_leases_open_at_the_end_or_claimed_before_the_window_are_drawn() {
    let (_dir, data) = story();
    let open: Value = serde_json::from_str(&replay_ok(&[
        "incident", "--data", &data, "--task", TASK_3, "--to", "18", "--format", "json",
    ]))
    .unwrap();
    let events = open["events"].as_array().unwrap();
    let last_claim = events.iter().rfind(|e| e["type"] == "step_claimed").unwrap();
    assert_eq!((last_claim["seq"].as_u64(), last_claim["lease_open"].as_bool()), (Some(18), Some(true)));
    assert!(events.iter().filter(|e| e["seq"] != 18).all(|e| e.get("lease_open").is_none()), "{open}");
    let markdown = replay_ok(&["incident", "--data", &data, "--task", TASK_3, "--to", "18"]);
    assert!(markdown.contains("(still held at the end of the report)"), "{markdown}");
    let html = replay_ok(&["incident", "--data", &data, "--task", TASK_3, "--to", "18", "--format", "html"]);
    assert!(html.contains("(still held at the end of the report)</title></rect>"), "{html}");

    let inside: Value = serde_json::from_str(&replay_ok(&[
        "incident", "--data", &data, "--task", TASK_3, "--from", "8", "--format", "json",
    ]))
    .unwrap();
    let first = &inside["events"][0];
    assert_eq!((first["seq"].as_u64(), first["lease_claimed_before"].as_bool()), (Some(8), Some(true)), "{inside}");
    let html = replay_ok(&["incident", "--data", &data, "--task", TASK_3, "--from", "8", "--format", "html"]);
    assert!(html.contains("(claimed before the report)</title></rect>"), "{html}");
    assert_eq!(html.matches("<rect").count(), 3, "the lease ended at seq 8 and the two claimed in the window");
}

#[test]
fn incident_of_a_worker_follows_its_leases_to_their_end() {
    let (_dir, data) = story();
    let json: Value =
        serde_json::from_str(&replay_ok(&["incident", "--data", &data, "--worker", "w-3", "--format", "json"]))
            .unwrap();
    let kinds: Vec<&str> = json["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["step_claimed", "lease_expired"], "w-3's only lease expired");
    assert_eq!(json["summary"]["lease_expiries"], 1);
    assert_eq!(json["summary"]["backoff_ms"], serde_json::json!([815]));
}

/// A window that opens while the worker holds a lease still follows that
/// lease: w-3 claimed at seq 12, and its lease expired at seq 13.
#[test]
fn incident_of_a_worker_from_inside_a_lease_follows_it() {
    let (_dir, data) = story();
    let json: Value = serde_json::from_str(&replay_ok(&[
        "incident", "--data", &data, "--worker", "w-3", "--from", "13", "--to", "23", "--format", "json",
    ]))
    .unwrap();
    let seqs: Vec<u64> = json["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [13], "the expiry of the lease w-3 held when the window opened");
    assert_eq!(json["summary"]["lease_expiries"], 1);
}

/// A lease an operator ends by cancelling its task ends there, and the cancel
/// is in the worker's report.
#[test]
fn incident_of_a_worker_ends_a_lease_at_its_tasks_cancel() {
    let dir = tempfile::tempdir().unwrap();
    build_cancelled_lease(dir.path());
    let data = path(dir.path());
    let json: Value =
        serde_json::from_str(&replay_ok(&["incident", "--data", data, "--worker", "w-9", "--format", "json"])).unwrap();
    let events = json["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["step_claimed", "task_cancelled", "step_claimed", "step_completed"]);
    assert_eq!(events[0]["lease_end_ms"], 1000.0, "the first lease ends at the cancel");
    assert_eq!(events[2]["lease_end_ms"], 3500.0);
    // A window opening inside the cancelled lease still shows its end.
    let from_cancel: Value = serde_json::from_str(&replay_ok(&[
        "incident", "--data", data, "--worker", "w-9", "--from", "4", "--format", "json",
    ]))
    .unwrap();
    let seqs: Vec<u64> = from_cancel["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [4, 5, 6]);
    // `diff` counts that lease as lost, with who ended it (it counted expiries only: found by a
    // black-box check); a worker's own completion is not a loss.
    let diff: Value =
        serde_json::from_str(&replay_ok(&["diff", "--data", data, "--from", "3", "--to", "6", "--json"])).unwrap();
    let lost = diff["leases_lost"].as_array().unwrap();
    assert_eq!(lost.len(), 1, "{diff}");
    assert_eq!((lost[0]["seq"].as_u64(), lost[0]["worker"].as_str()), (Some(4), Some("w-9")), "{diff}");
    assert_eq!(lost[0]["detail"], "ended by task_cancelled (operator-kim)", "{diff}");
}

#[test]
fn incident_of_a_time_window() {
    let (_dir, data) = story();
    let json: Value = serde_json::from_str(&replay_ok(&[
        "incident",
        "--data",
        &data,
        "--from",
        "2026-11-23T14:00:07Z",
        "--to",
        "2026-11-23T14:00:13.5Z",
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!((json["first_seq"].as_u64(), json["last_seq"].as_u64()), (Some(9), Some(16)));
    assert_eq!(json["lanes"].as_array().unwrap().len(), 2);
    // A window with nothing in it says so (it printed "seq 24..23, - .. -").
    let empty =
        replay_ok(&["incident", "--data", &data, "--from", "2026-11-23T15:00:00Z", "--to", "2026-11-23T16:00:00Z"]);
    assert!(empty.contains("no events in this window (seq 24..23)"), "{empty}");
    let none = replay(&["incident", "--data", &data]);
    assert_eq!(none.status.code(), Some(2), "a usage error");
    // A worker id the log never names is a typo, not a worker that did nothing (found by a
    // black-box check: an empty report, exit 0).
    let typo = replay(&["incident", "--data", &data, "--worker", "no-such-worker"]);
    assert_eq!(typo.status.code(), Some(3), "{}", crate::common::stderr(&typo));
    assert!(crate::common::stderr(&typo).contains("worker no-such-worker never claimed a step in this log"));
    assert!(crate::common::stderr(&none).contains("--task ID, --worker ID, or a window --from T --to T"));
}

#[test]
fn diff_between_two_points() {
    let (_dir, data) = story();
    golden("diff-6-22.txt", &replay_ok(&["diff", "--data", &data, "--from", "6", "--to", "2026-11-23T14:01:13.5Z"]));
    let json: Value =
        serde_json::from_str(&replay_ok(&["diff", "--data", &data, "--from", "0", "--to", "23", "--json"])).unwrap();
    assert_eq!(json["events"], 23);
    assert_eq!(json["tasks_created"].as_array().unwrap().len(), 4);
    assert_eq!(json["leases_taken"].as_array().unwrap().len(), 6);
    assert_eq!(json["leases_lost"][0]["worker"], "w-3");
    assert_eq!(json["dead_letters"][0]["detail"], "boom");
    let finished: Vec<(&str, &str)> = json["task_state_changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["from"].as_str().unwrap(), c["to"].as_str().unwrap()))
        .collect();
    assert!(
        finished.contains(&("(new)", "cancelled")),
        "a task that ended inside the range shows its end: {finished:?}"
    );
    // A lease taken before the range names its worker when it is lost inside it.
    let inside: Value =
        serde_json::from_str(&replay_ok(&["diff", "--data", &data, "--from", "12", "--to", "14", "--json"])).unwrap();
    assert_eq!(inside["leases_lost"][0]["worker"], "w-3", "{inside}");
    let backwards = replay(&["diff", "--data", &data, "--from", "9", "--to", "3"]);
    assert!(crate::common::stderr(&backwards).contains("is after --to"));
}

/// `diff --summary` counts what the full diff lists, state changes by transition, and lists
/// nothing: the same counts in text and JSON as the full diff's lengths.
#[test]
fn diff_summary_counts_what_the_full_diff_lists() {
    let (_dir, data) = story();
    let args = ["diff", "--data", &data, "--from", "0", "--to", "23", "--json"];
    let full: Value = serde_json::from_str(&replay_ok(&args)).unwrap();
    let summary: Value = serde_json::from_str(&replay_ok(&[&args[..], &["--summary"]].concat())).unwrap();
    assert_eq!(summary["events"], full["events"]);
    assert_eq!(summary["events_by_type"], full["events_by_type"]);
    for list in ["tasks_created", "leases_taken", "leases_lost", "dead_letters", "queue_changes"] {
        let items = full[list].as_array().unwrap();
        assert_eq!(summary[list].as_u64(), Some(items.len() as u64), "{list}");
    }
    assert!(!full["queue_changes"].as_array().unwrap().is_empty(), "the story pauses a queue");
    for list in ["task_state_changes", "step_state_changes"] {
        let mut counted = std::collections::BTreeMap::<String, u64>::new();
        for change in full[list].as_array().unwrap() {
            *counted
                .entry(format!("{} -> {}", change["from"].as_str().unwrap(), change["to"].as_str().unwrap()))
                .or_default() += 1;
        }
        let by_transition: std::collections::BTreeMap<String, u64> =
            serde_json::from_value(summary[list].clone()).unwrap();
        assert_eq!(by_transition, counted, "{list}");
    }
    // A window with no state change still gives them as objects (no transitions), not counts.
    let quiet: Value =
        serde_json::from_str(&replay_ok(&["diff", "--data", &data, "--from", "5", "--to", "5", "--json", "--summary"]))
            .unwrap();
    assert_eq!(quiet["task_state_changes"], serde_json::json!({}), "{quiet}");
    assert_eq!(quiet["tasks_created"], 0, "{quiet}");
    let text = replay_ok(&["diff", "--data", &data, "--from", "0", "--to", "23", "--summary"]);
    let created = full["tasks_created"].as_array().unwrap().len();
    assert!(text.contains(&format!("tasks created ({created})")), "{text}");
    assert!(text.contains("(new) -> cancelled  1"), "{text}");
    assert!(!text.contains(full["tasks_created"][0]["task"].as_str().unwrap()), "no task is listed: {text}");
}

/// Text a client wrote (a task's name, an error, a note) cannot become markup in a report or
/// control a terminal (found by a black-box check: the Markdown report passed `<script>`
/// through, and `diff` printed a dead letter's error raw, escape sequences and all).
#[test]
fn text_from_the_log_is_escaped_in_every_report() {
    let dir = tempfile::tempdir().unwrap();
    build_hostile(dir.path());
    let data = path(dir.path());
    let task = "018bcfe5-6801-7001-aa5c-30b0ba7a6f8e";
    let json: Value =
        serde_json::from_str(&replay_ok(&["diff", "--data", data, "--from", "0", "--to", "4", "--json"])).unwrap();
    assert_eq!(json["dead_letters"][0]["detail"], HOSTILE, "JSON keeps the text as written");
    let task = json["tasks_created"][0]["task"].as_str().unwrap_or(task).to_owned();
    let diff = replay_ok(&["diff", "--data", data, "--from", "0", "--to", "4"]);
    let markdown = replay_ok(&["incident", "--data", data, "--task", &task]);
    let html = replay_ok(&["incident", "--data", data, "--task", &task, "--format", "html"]);
    let events = replay_ok(&["events", "--data", data]);
    for (name, text) in [("diff", &diff), ("markdown", &markdown), ("html", &html), ("events", &events)] {
        assert!(!text.contains(['\u{1b}', '\r', '\u{7}']), "{name}: {text:?}");
        assert!(!text.lines().any(|line| line.starts_with("fake line")), "{name}: {text}");
    }
    for (name, text) in [("markdown", &markdown), ("html", &html)] {
        assert!(!text.contains("<script>alert") && !text.contains("<img"), "{name}: {text}");
    }
    assert!(markdown.contains("&lt;script>alert(1)&lt;/script>"), "{markdown}");
    assert!(!markdown.contains("![x](") && markdown.contains("!\\[x\\](https"), "no image: {markdown}");
    assert!(diff.contains("dead letters (1)"), "{diff}");
}

/// Output into a pipe whose reader has gone (`| head`) ends the tool quietly,
/// killed by SIGPIPE as other command-line tools are, with no panic message
/// (it used to panic on the failed write, or abort with status 134).
#[test]
fn a_closed_pipe_ends_the_tool_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (_dir, data) = story();
    for args in [
        &["diff", "--data", &data, "--from", "1", "--to", "23"][..],
        &["state", "--data", &data, "--as-of", "20"],
        &["events", "--data", &data],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskledger-replay"))
            .args(args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{args:?}: {:?}", out.status);
        assert!(out.stderr.is_empty(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
