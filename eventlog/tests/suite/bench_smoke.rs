//! Runs `eventlog-bench --json` with tiny sizes, submitters as tasks and as threads, and checks
//! what it prints: every line parses, every case ran and acknowledged events, the writer rows say
//! how their submitters ran. Timings are not asserted (they belong to the benchmark's output).

use std::process::Command;

use serde_json::Value;

fn run_bench(extra: &[&str]) -> Vec<Value> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temporary directory");
    let output = Command::new(env!("CARGO_BIN_EXE_eventlog-bench"))
        .args(["--json", "--allow-tmpfs", "--seconds", "0.3", "--warmup", "0.1", "--submitters", "4"])
        .args(["--live-tasks", "3000", "--dir"])
        .arg(dir.path())
        .args(extra)
        .output()
        .expect("run eventlog-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "eventlog-bench failed ({}):\n{stderr}\n{stdout}", output.status);
    let rows: Vec<Value> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .filter(|v: &Value| v.get("case").is_some())
        .collect();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("read the bench dir").collect();
    assert!(leftovers.is_empty(), "the bench left files behind: {leftovers:?}");
    rows
}

fn row<'a>(rows: &'a [Value], case: &str) -> &'a Value {
    rows.iter().find(|r| r["case"] == case).unwrap_or_else(|| panic!("no {case} row in {rows:#?}"))
}

#[test]
fn every_case_runs_with_submitters_as_tasks() {
    let rows = run_bench(&[]);
    for case in ["raw_fdatasync", "redb_floor_1", "redb_floor_4", "writer_1_submitter", "writer_4_submitters"] {
        let row = row(&rows, case);
        assert!(row["events_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{case} did nothing: {row}");
        assert!(row["p99_us"].is_number(), "{case}: no p99 in {row}");
    }
    for case in ["writer_1_submitter", "writer_4_submitters"] {
        let row = row(&rows, case);
        assert_eq!(row["submitters_as"], "tasks", "{row}");
        assert_eq!(row["overloaded"], 0, "{row}");
        assert!(row["ratio_to_fdatasync"].is_number(), "{row}");
    }
    let stall = rows.iter().find(|r| r["case"].as_str().is_some_and(|c| c.starts_with("snapshot_stall_")));
    let stall = stall.unwrap_or_else(|| panic!("no snapshot_stall row in {rows:#?}"));
    assert!(stall["max_stall_us"].is_number(), "{stall}");
    assert_eq!(stall["live_tasks"], 3000, "{stall}");
    let restarts: Vec<_> =
        rows.iter().filter(|r| r["case"].as_str().is_some_and(|c| c.starts_with("restart_"))).collect();
    assert_eq!(restarts.len(), 2, "with and without a snapshot: {rows:#?}");
    for restart in restarts {
        assert_eq!(restart["live_tasks"], 3000, "{restart}");
    }
    let verify = row(&rows, "verify");
    assert!(verify["records"].as_u64().unwrap_or(0) >= 3000, "{verify}");
}

#[test]
fn writer_cases_run_with_a_thread_per_submitter() {
    let rows = run_bench(&["--cases", "writer1,writerN", "--submitter-threads"]);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for case in ["writer_1_submitter", "writer_4_submitters"] {
        let row = row(&rows, case);
        assert_eq!(row["submitters_as"], "threads", "{row}");
        assert!(row["commands_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{case} did nothing: {row}");
    }
}
