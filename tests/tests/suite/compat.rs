//! Upgrades: a data directory written by an older build, opened by this one. Every
//! directory under `fixtures/compat/` was written by the build its `expected.json` names
//! (`fixtures/compat/make_fixture.py`: every event type, live tasks in every non-terminal
//! state, the server killed as in a crash, so journals and projections are left as a crash
//! leaves them). This build must read each log as it was (the same head and hash, every task
//! as the old build answered it), restore its live tasks so that work goes on where it
//! stopped, bring the old projections up to date (rebuilding those whose version changed),
//! and leave a log that `taskledger-replay verify` passes. Old fixtures are never
//! regenerated: a stored format that changes gets a new one beside them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use tests::{Server, read_models, workspace_binary};

use crate::api::{epoch, step_path};

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/compat");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.join("expected.json").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixtures under {}", root.display());
    dirs
}

/// Where `expected` and `actual` differ: every field the old build answered must be answered
/// the same (fields added since may be there too). `None` when they agree.
fn first_difference(expected: &Value, actual: &Value, path: &str) -> Option<String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => e.iter().find_map(|(key, value)| match a.get(key) {
            Some(found) => first_difference(value, found, &format!("{path}.{key}")),
            None => Some(format!("{path}.{key}: missing (was {value})")),
        }),
        (Value::Array(e), Value::Array(a)) if e.len() == a.len() => {
            e.iter().zip(a).enumerate().find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]")))
        }
        _ => (expected != actual).then(|| format!("{path}: {actual} (was {expected})")),
    }
}

fn replay_tool(args: &[&str]) -> (i32, String) {
    let output =
        Command::new(workspace_binary("taskledger-replay")).args(args).output().expect("run taskledger-replay");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

fn claim_as(server: &Server, namespace: &str, worker: &str) -> Vec<Value> {
    let answer =
        server.post("/v1/claims", json!({ "namespaces": [namespace], "worker_id": worker, "max": 10, "wait_ms": 0 }));
    assert_eq!(answer.status, 200, "claim in {namespace}: {answer:?}");
    answer.body["steps"].as_array().expect("steps").clone()
}

fn complete_all(server: &Server, steps: &[Value], context: &str) {
    for step in steps {
        let answer =
            server.post(&step_path(step, "complete"), json!({ "epoch": epoch(step), "result": {"by": "new"} }));
        assert_eq!(answer.status, 200, "{context}: complete {step}: {answer:?}");
    }
}

fn task_ids(steps: &[Value]) -> Vec<&str> {
    steps.iter().map(|s| s["task_id"].as_str().expect("task_id")).collect()
}

fn check(fixture: &Path) {
    let name = fixture.file_name().expect("fixture name").to_string_lossy().into_owned();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).expect("expected.json"))
            .expect("expected.json is JSON");
    let context = format!("fixture {name} ({})", expected["generated_by"]);
    let temp = tempfile::tempdir().expect("temp dir");
    let unpacked = Command::new("tar")
        .arg("xzf")
        .arg(fixture.join("data.tar.gz"))
        .arg("-C")
        .arg(temp.path())
        .status()
        .expect("run tar");
    assert!(unpacked.success(), "{context}: tar xzf failed");
    let data = temp.path().join("data");
    let log = std::fs::File::create(temp.path().join("server.log")).expect("server log");
    let server = Server::start_with_log(&data, &[], log);

    // The log as the old build left it: the same head, with the same hash.
    let old_head = expected["head_seq"].as_u64().expect("head_seq");
    assert!(server.head_seq() >= old_head, "{context}: the head went back");
    let (status, feed) = server.get_text(&format!("/v1/events?from_seq={old_head}&follow=false"));
    assert_eq!(status, 200, "{context}: feed");
    let record: Value = serde_json::from_str(feed.lines().next().expect("a record")).expect("a JSON record");
    assert_eq!(record["seq"], old_head, "{context}");
    assert_eq!(record["hash"], expected["head_hash"], "{context}: the head's hash changed");

    // Every task as the old build answered it at its head.
    let tasks = expected["tasks"].as_object().expect("tasks");
    for (label, old) in tasks {
        let id = old["id"].as_str().expect("id");
        let now = server.get(&format!("/v1/tasks/{id}?as_of={old_head}"));
        assert_eq!(now.status, 200, "{context}: task {label}: {now:?}");
        if let Some(difference) = first_difference(old, &now.body, label) {
            panic!("{context}: task {label} reads differently at seq {old_head}: {difference}");
        }
    }
    for (namespace, old) in expected["queues"].as_object().expect("queues") {
        let now = server.get(&format!("/v1/queues/{namespace}"));
        assert_eq!(now.status, 200, "{context}: queue {namespace}: {now:?}");
        for setting in ["paused", "concurrency_limit"] {
            assert_eq!(now.body[setting], old[setting], "{context}: queue {namespace}'s {setting}");
        }
    }

    // Work goes on where it stopped: the enqueued job is claimed, the paused queue holds its
    // task until resumed, the workflow runs its released step and the step added to it, the
    // dead letter is resolved and the task pending until 2030 cancelled.
    let id_of = |label: &str| tasks[label]["id"].as_str().expect("id").to_owned();
    let mail = claim_as(&server, "mail", "w-new");
    assert!(task_ids(&mail).contains(&id_of("enqueued").as_str()), "{context}: mail claims {mail:?}");
    complete_all(&server, &mail, &context);
    assert!(claim_as(&server, "frozen", "w-new").is_empty(), "{context}: a paused queue gave work");
    assert_eq!(server.post("/v1/queues/frozen/resume", json!({})).status, 200, "{context}: resume");
    let frozen = claim_as(&server, "frozen", "w-new");
    assert_eq!(task_ids(&frozen), [id_of("paused_queue")], "{context}");
    complete_all(&server, &frozen, &context);
    for step in ["load", "report"] {
        let etl = claim_as(&server, "etl", "w-new");
        assert_eq!(task_ids(&etl), [id_of("workflow")], "{context}: etl claims");
        assert_eq!(etl[0]["step"], step, "{context}: the workflow's next step");
        complete_all(&server, &etl, &context);
    }
    let workflow = server.get(&format!("/v1/tasks/{}", id_of("workflow")));
    assert_eq!(workflow.body["state"], "complete", "{context}: {workflow:?}");
    let resolved = server
        .post(&format!("/v1/tasks/{}/steps/main/resolve", id_of("blocked")), json!({ "note": "after the upgrade" }));
    assert_eq!(resolved.status, 200, "{context}: resolve: {resolved:?}");
    let cancelled = server.post(&format!("/v1/tasks/{}/cancel", id_of("pending_2030")), json!({}));
    assert_eq!(cancelled.status, 200, "{context}: cancel: {cancelled:?}");

    // The projections, old rows and new, agree with the log: every task's view row with the
    // task, and every row with a rebuild from scratch.
    let runtime = read_models::runtime();
    let sqlite = data.join("projections.sqlite");
    let status = || {
        let answer = server.get("/v1/views/projections");
        assert_eq!(answer.status, 200, "{context}: projector status: {answer:?}");
        Some(answer.body)
    };
    let (seq, dump) = read_models::converged_dump(
        status,
        &runtime,
        sqlite.to_str().expect("utf-8 path"),
        server.head_seq(),
        &context,
    );
    let view = server.get(&format!("/v1/views/tasks?min_seq={seq}&first=100"));
    assert_eq!(view.status, 200, "{context}: tasks view: {view:?}");
    let rows = view.body["items"].as_array().expect("items");
    for (label, old) in tasks {
        let id = old["id"].as_str().expect("id");
        let row = rows.iter().find(|row| row["task_id"] == id);
        let now = server.get(&format!("/v1/tasks/{id}"));
        assert_eq!(
            row.map(|row| &row["state"]),
            Some(&now.body["state"]),
            "{context}: task {label}'s row in the tasks view"
        );
    }
    assert_eq!(server.stop(), Some(0), "{context}: the server did not stop cleanly");

    let dir = data.to_str().expect("utf-8 path");
    let (code, output) = replay_tool(&["verify", "--data", dir]);
    assert_eq!(code, 0, "{context}: verify after the upgrade:\n{output}");
    let scratch = temp.path().join("rebuilt.sqlite");
    let scratch = scratch.to_str().expect("utf-8 path");
    let (code, output) = replay_tool(&["materialize", "--data", dir, "--as-of", &seq.to_string(), "--out", scratch]);
    assert_eq!(code, 0, "{context}: materialize:\n{output}");
    let rebuilt = read_models::dump(&runtime, scratch);
    assert!(
        rebuilt == dump,
        "{context}: the upgraded projections differ from a rebuild: {}",
        read_models::first_difference(&dump, &rebuilt, ("upgraded", "rebuilt"))
    );
}

#[test]
fn data_directories_written_by_older_builds_open_and_work_goes_on() {
    for fixture in fixtures() {
        check(&fixture);
    }
}
