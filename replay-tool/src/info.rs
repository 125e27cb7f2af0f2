//! `info`: the first look at a log — head, size, time range, how many tasks
//! are in each state (finished ones included, so the whole log is folded),
//! queue settings, and which snapshots exist and whether they are usable.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use anyhow::Result;
use domain::{Ledger, TaskState};
use eventlog::json::hex;
use serde_json::{Value, json};

use crate::Outcome;
use crate::progress::Progress;
use crate::source::{Source, apply, time_of};

pub fn run(source: &Source, as_json: bool) -> Result<Outcome> {
    let head = source.head()?;
    let first = source.record(1)?;
    let last = source.record(head.seq)?;
    let progress = Progress::new(head.seq, "folding");
    let mut ledger = Ledger::retaining_terminal_tasks();
    source.scan(1, head.seq, &progress, |record| {
        apply(&mut ledger, record)?;
        Ok(ControlFlow::Continue(()))
    })?;
    drop(progress);
    let mut by_state: BTreeMap<&str, u64> = TaskState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for task in ledger.tasks() {
        *by_state.entry(task.state.as_str()).or_default() += 1;
    }
    let live: u64 = ledger.tasks().filter(|t| !t.state.is_terminal()).count() as u64;
    let mut queues: Vec<Value> = Vec::new();
    let state = ledger.to_state();
    for (namespace, settings) in &state.queue_settings {
        queues.push(json!({"namespace": namespace.as_str(), "paused": settings.paused, "concurrency_limit": settings.concurrency_limit}));
    }
    let (file_bytes, snapshots) = match source {
        Source::File { path, snapshots, .. } => {
            let bytes = std::fs::metadata(path).map(|m| m.len()).ok();
            let mut list = Vec::new();
            for entry in snapshots.list().unwrap_or_default() {
                let status = match &entry.header {
                    Ok(info) if source.record(info.seq).ok().flatten().map(|r| r.hash) == Some(info.chain_hash) => {
                        "ok".to_owned()
                    }
                    Ok(_) => "does not match this log".to_owned(),
                    Err(e) => format!("unusable: {e}"),
                };
                let body_bytes = entry.header.as_ref().map(|i| i.body_len).ok();
                list.push(json!({"seq": entry.seq, "status": status, "body_bytes": body_bytes}));
            }
            (bytes, list)
        }
        Source::Feed { .. } => (None, Vec::new()),
    };
    let tasks_total = ledger.tasks().count();
    let report = json!({
        "log": source.origin(),
        "file_bytes": file_bytes,
        "head": {"seq": head.seq, "hash": hex(&head.hash)},
        "records": head.seq,
        "first_recorded_at": first.as_ref().map(time_of),
        "last_recorded_at": last.as_ref().map(time_of),
        "tasks": {"total": tasks_total, "live": live, "by_state": by_state},
        "queues": queues,
        "snapshots": snapshots,
    });
    if as_json {
        println!("{report}");
        return Ok(Outcome::Clean);
    }
    println!("log          {}", source.origin());
    if let Some(bytes) = file_bytes {
        println!("file size    {bytes} bytes ({:.1} MiB)", bytes as f64 / (1024.0 * 1024.0));
    }
    println!("head         seq {} hash {}", head.seq, hex(&head.hash));
    println!("records      {}", head.seq);
    match (&first, &last) {
        (Some(first), Some(last)) => println!("time range   {} .. {}", time_of(first), time_of(last)),
        _ => println!("time range   (empty log)"),
    }
    let counts: Vec<String> =
        by_state.iter().filter(|(_, n)| **n > 0).map(|(state, n)| format!("{state} {n}")).collect();
    println!(
        "tasks        {tasks_total} ({live} live){}",
        if counts.is_empty() { String::new() } else { format!(": {}", counts.join(", ")) }
    );
    for (namespace, settings) in &state.queue_settings {
        let limit = settings.concurrency_limit.map_or("none".to_owned(), |l| l.to_string());
        println!(
            "queue        {namespace}: {}, concurrency limit {limit}",
            if settings.paused { "paused" } else { "running" }
        );
    }
    if let Source::File { .. } = source {
        if snapshots.is_empty() {
            println!("snapshots    none");
        }
        for snapshot in &snapshots {
            println!("snapshot     seq {} ({})", snapshot["seq"], snapshot["status"].as_str().unwrap_or_default());
        }
    }
    Ok(Outcome::Clean)
}
