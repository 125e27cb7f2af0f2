//! Runs `taskledger-bench --quick --json` against the real server and a real
//! throwaway PostgreSQL, and checks what it prints: every JSON line parses,
//! every workload of both systems (and the HTTP and storage floors) ran,
//! finished tasks and saw no errors; the lifecycle ran in two rounds, each with its ratio.
//! Timings are not asserted (they belong to the benchmark's own output).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The `taskledger` server binary: `TASKLEDGER_BENCH_SERVER_BIN`, or the one
/// cargo built beside this test (`cargo build --workspace --bins`), or the
/// release build.
fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TASKLEDGER_BENCH_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let mut dir = std::env::current_exe().expect("test executable has a path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let beside = dir.join("taskledger");
    if beside.exists() {
        return beside;
    }
    let release = dir.parent().map(|t| t.join("release").join("taskledger"));
    match release {
        Some(path) if path.exists() => path,
        _ => panic!(
            "no taskledger server binary beside {}; run `cargo build -p api --bin taskledger` first \
             (or set TASKLEDGER_BENCH_SERVER_BIN)",
            dir.display()
        ),
    }
}

#[test]
fn quick_run_prints_a_result_for_every_workload() {
    let output = Command::new(env!("CARGO_BIN_EXE_taskledger-bench"))
        .args(["--quick", "--json", "--rounds", "2", "--server-bin"])
        .arg(server_binary())
        .output()
        .expect("run taskledger-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "taskledger-bench failed ({}):\n{stderr}\n{stdout}", output.status);

    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let rows: Vec<&Value> = lines.iter().filter(|v| v.get("system").is_some()).collect();
    let expected = [
        ("taskledger", "lifecycle"),
        ("taskledger", "half-rate"),
        ("taskledger", "idle-pickup"),
        ("taskledger", "mixed"),
        ("taskledger", "batch-create"),
        ("pg-skip-locked", "lifecycle"),
        ("pg-skip-locked", "half-rate"),
        ("pg-skip-locked", "idle-pickup"),
        ("pg-skip-locked", "batch-create"),
        ("http-floor", "create"),
    ];
    for (system, workload) in expected {
        let row = rows
            .iter()
            .find(|r| r["system"] == system && r["workload"] == workload)
            .unwrap_or_else(|| panic!("no {system} {workload} line in:\n{stdout}\n{stderr}"));
        assert_eq!(row["errors"], 0, "{system} {workload} had errors: {row}");
        assert!(row["tasks_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{system} {workload} did nothing: {row}");
        let done = if matches!(workload, "batch-create" | "create") { &row["created"] } else { &row["finished"] };
        assert!(done.as_u64().unwrap_or(0) > 0, "{system} {workload} finished no task: {row}");
        for key in ["p50_ms", "p99_ms", "pickup_p99_ms"] {
            assert!(row[key].is_number(), "{system} {workload}: {key} missing in {row}");
        }
    }
    let lifecycle = rows.iter().find(|r| r["system"] == "taskledger" && r["workload"] == "lifecycle").unwrap();
    assert!(lifecycle["pickup_p99_ms"].is_number());
    // The server's CPU by thread: its writer among them, each a positive share.
    let threads = lifecycle["server_threads_cpu_pct"].as_object().unwrap_or_else(|| panic!("no threads: {lifecycle}"));
    assert!(threads.keys().any(|name| name.starts_with("taskledger-writ")), "no writer thread in {threads:?}");
    assert!(threads.values().all(|p| p.as_f64().is_some_and(|p| p > 0.0)), "{threads:?}");
    // HTTP requests per task: a create each, then claims and completions; the floor's are its
    // creates alone; the baseline's workers send SQL.
    let per_task = |system: &str, workload: &str| {
        let row = rows.iter().find(|r| r["system"] == system && r["workload"] == workload).unwrap();
        row["http_requests_per_task"].as_f64()
    };
    assert!(per_task("taskledger", "lifecycle").is_some_and(|n| n > 1.0), "{lifecycle}");
    assert!(per_task("http-floor", "create").is_some_and(|n| (n - 1.0).abs() < 0.01));
    assert_eq!(per_task("pg-skip-locked", "lifecycle"), None);
    let mixed = rows.iter().find(|r| r["workload"] == "mixed").unwrap();
    assert!(mixed["completed_steps"].as_u64().unwrap_or(0) > 0, "mixed completed no step: {mixed}");
    let disk = rows.iter().find(|r| r["system"] == "disk").unwrap_or_else(|| panic!("no disk line in:\n{stdout}"));
    assert_eq!(disk["workload"], "fdatasync-probe");
    assert!(disk["syncs"].as_u64().unwrap_or(0) > 0, "the disk probe synced nothing: {disk}");
    let (p50, p99, max) = (disk["p50_ms"].as_f64(), disk["p99_ms"].as_f64(), disk["max_ms"].as_f64());
    assert!(matches!((p50, p99, max), (Some(a), Some(b), Some(c)) if 0.0 < a && a <= b && b <= c), "{disk}");
    let ratios = lines.iter().find(|v| v.get("ratio_lifecycle").is_some()).expect("a ratio_lifecycle line");
    for key in ["ratio_lifecycle", "ratio_http_floor"] {
        assert!(ratios[key].as_f64().unwrap_or(0.0) > 0.0, "{key} in {ratios}");
    }
    // Two lifecycle rounds back to back: the first is the table's, and the median of two is
    // their mean.
    let rounds: Vec<f64> = ratios["ratio_lifecycle_rounds"]
        .as_array()
        .unwrap_or_else(|| panic!("no ratio_lifecycle_rounds in {ratios}"))
        .iter()
        .map(|r| r.as_f64().unwrap_or(0.0))
        .collect();
    assert!(rounds.len() == 2 && rounds.iter().all(|r| *r > 0.0), "{ratios}");
    assert_eq!(Some(rounds[0]), ratios["ratio_lifecycle"].as_f64(), "{ratios}");
    let median = ratios["ratio_lifecycle_median"].as_f64().unwrap_or(0.0);
    assert!((median - (rounds[0] + rounds[1]) / 2.0).abs() <= 0.002, "{ratios}");
    assert!(stderr.contains("lifecycle in 2 rounds"), "{stderr}");
    // The goal's CPU arithmetic: the machine's share a task is the server's and the load
    // generator's and more; 3× the baseline's rate leaves the cores' time a third of a task's.
    let us = |key: &str| ratios[key].as_f64().unwrap_or_else(|| panic!("no {key} in {ratios}"));
    let (machine, server, client) = (
        us("lifecycle_cpu_us_per_task"),
        us("lifecycle_server_cpu_us_per_task"),
        us("lifecycle_client_cpu_us_per_task"),
    );
    assert!(server > 0.0 && client > 0.0 && machine >= 0.9 * (server + client), "{ratios}");
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let baseline = rows.iter().find(|r| r["system"] == "pg-skip-locked" && r["workload"] == "lifecycle").unwrap();
    let budget = cores * 1e6 / (3.0 * baseline["tasks_per_s"].as_f64().unwrap());
    assert!((us("cpu_us_per_task_at_3x") - budget).abs() <= 0.01 * budget + 0.002, "{ratios}");
    // The storage floor stored every quick task's three records (create, claim, completion) and
    // five rows (three audit rows, the task's and its step's), at a positive cost each; the
    // design floor is the HTTP floor's share of a task and the storage floor's two parts.
    let storage = rows
        .iter()
        .find(|r| r["system"] == "storage-floor")
        .unwrap_or_else(|| panic!("no storage floor in:\n{stdout}"));
    assert_eq!(
        (storage["tasks"].as_u64(), storage["records_per_task"].as_f64()),
        (Some(3_000), Some(3.0)),
        "{storage}"
    );
    assert_eq!(storage["rows_per_task"].as_f64(), Some(5.0), "{storage}");
    assert!(storage["record_bytes_avg"].as_f64().is_some_and(|b| b > 32.0), "{storage}");
    let (log, models) = (storage["log_cpu_us_per_task"].as_f64(), storage["read_models_cpu_us_per_task"].as_f64());
    assert!(matches!((log, models), (Some(l), Some(m)) if l > 0.0 && m > 0.0), "{storage}");
    let (design, http) = (us("design_floor_cpu_us_per_task"), us("design_floor_http_cpu_us_per_task"));
    let floor = rows.iter().find(|r| r["system"] == "http-floor").unwrap();
    let per_create = floor["machine_cpu_pct"].as_f64().unwrap() * 1e4 / floor["tasks_per_s"].as_f64().unwrap();
    assert!((http - per_create * (1.0 + 2.0 / 8.0)).abs() <= 0.01 * http + 0.002, "quick K=8: {ratios} {floor}");
    assert!((design - (http + log.unwrap() + models.unwrap())).abs() <= 0.01 * design + 0.003, "{ratios} {storage}");
}
