//! `info`: the first look at a log — head, size, time range, how many live
//! tasks are in each state (from the newest snapshot plus the records after
//! it, see `Source::summary_at`), queue settings, and which snapshots exist
//! and whether they are usable. `--full` also counts finished tasks by how
//! they ended, which takes a fold of the whole log.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use anyhow::Result;
use domain::{Ledger, TaskState};
use eventlog::json::hex;
use serde_json::{Value, json};

use crate::Outcome;
use crate::progress::Progress;
use crate::source::{Source, apply, time_of};

pub fn run(source: &Source, full: bool, as_json: bool) -> Result<Outcome> {
    let head = source.head()?;
    let first = source.record(1)?;
    let last = source.record(head.seq)?;
    let progress = Progress::new(head.seq, "folding");
    let at_head = source.summary_at(head.seq, &progress)?;
    drop(progress);
    for skipped in &at_head.stats.skipped_snapshots {
        eprintln!("note: snapshot skipped: {skipped}");
    }
    let mut live_by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for counts in at_head.summary.by_namespace.values() {
        for state in TaskState::ALL.into_iter().filter(|s| counts.tasks_in(*s) > 0) {
            *live_by_state.entry(state.as_str()).or_default() += counts.tasks_in(state);
        }
    }
    let live = at_head.summary.live_tasks;
    // Finished tasks have left the ledger and its snapshots: counting them by
    // how they ended takes a fold of the whole log that keeps them.
    let finished = if full {
        let progress = Progress::new(head.seq, "folding");
        let mut ledger = Ledger::retaining_terminal_tasks();
        source.scan(1, head.seq, &progress, |record| {
            apply(&mut ledger, record)?;
            Ok(ControlFlow::Continue(()))
        })?;
        let mut by_state: BTreeMap<&str, u64> = TaskState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for task in ledger.tasks() {
            *by_state.entry(task.state.as_str()).or_default() += 1;
        }
        let total = ledger.tasks().count() as u64;
        std::mem::forget(ledger);
        Some((total, by_state))
    } else {
        None
    };
    let mut queues: Vec<Value> = Vec::new();
    for (namespace, settings) in &at_head.settings {
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
    let tasks = match &finished {
        Some((total, by_state)) => {
            json!({"total": total, "live": live, "by_state": by_state, "live_by_state": live_by_state})
        }
        None => json!({"total": null, "live": live, "by_state": null, "live_by_state": live_by_state}),
    };
    let report = json!({
        "log": source.origin(),
        "file_bytes": file_bytes,
        "head": {"seq": head.seq, "hash": hex(&head.hash)},
        "records": head.seq,
        "first_recorded_at": first.as_ref().map(time_of),
        "last_recorded_at": last.as_ref().map(time_of),
        "tasks": tasks,
        "folded": {"snapshot_seq": at_head.stats.snapshot_seq, "replayed": at_head.stats.replayed},
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
    let live_counts: Vec<String> = live_by_state.iter().map(|(state, n)| format!("{state} {n}")).collect();
    match &finished {
        Some((total, by_state)) => {
            let counts: Vec<String> =
                by_state.iter().filter(|(_, n)| **n > 0).map(|(state, n)| format!("{state} {n}")).collect();
            println!(
                "tasks        {total} ({live} live){}",
                if counts.is_empty() { String::new() } else { format!(": {}", counts.join(", ")) }
            );
        }
        None => println!(
            "tasks        {live} live{} (finished tasks are counted with --full, which folds the whole log)",
            if live_counts.is_empty() { String::new() } else { format!(": {}", live_counts.join(", ")) }
        ),
    }
    println!("folded       from snapshot at seq {} + {} events", at_head.stats.snapshot_seq, at_head.stats.replayed);
    for (namespace, settings) in &at_head.settings {
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
