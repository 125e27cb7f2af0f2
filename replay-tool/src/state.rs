//! `state --as-of SEQ|TIME [--task ID]`: the whole ledger (queues, live tasks,
//! timers) or one task exactly as it was at a point, with the ledger digest
//! so an answer can be compared with any other fold of the same prefix.
//!
//! The whole ledger comes from the nearest snapshot plus a short replay; one
//! task is folded from its own stream (read through the stream index) into a
//! ledger that keeps finished tasks, so a task that ended is still shown.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use domain::{Ledger, StepState, Task, Timestamp};
use eventlog::json::hex;
use serde_json::{Value, json};

use crate::Outcome;
use crate::events::parse_task;
use crate::progress::Progress;
use crate::source::{Point, Source, apply, time_of};

fn time(ts: Timestamp) -> String {
    ts.to_rfc3339()
}

fn json_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// A task and its steps as JSON (field names follow the API's task body).
pub fn task_json(task: &Task) -> Value {
    let steps: Vec<Value> = task
        .steps
        .iter()
        .map(|s| {
            json!({
                "name": s.name.as_str(),
                "handler": s.handler.as_str(),
                "state": s.state.as_str(),
                "depends_on": s.deps.iter().map(|d| task.steps[d.get()].name.as_str()).collect::<Vec<_>>(),
                "attempts": s.attempts,
                "max_attempts": s.max_attempts,
                "lease_epoch": s.epoch.0,
                "worker": s.worker.as_ref().map(|w| w.as_str()),
                "lease_deadline": s.lease_deadline.map(time),
                "retry_at": s.retry_at.map(time),
                "last_error": s.last_error.as_ref().map(|e| e.as_str()),
                "result": s.result.as_ref().map(|r| json_value(r.as_str())),
            })
        })
        .collect();
    json!({
        "id": task.id.to_string(),
        "namespace": task.namespace.as_str(),
        "name": &*task.name,
        "state": task.state.as_str(),
        "priority": task.priority.get(),
        "tags": task.tags.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "payload": json_value(task.payload.as_str()),
        "created_at": time(task.created_at),
        "run_at": task.run_at.map(time),
        "steps": steps,
    })
}

pub fn run(source: &Source, as_of: Option<Point>, task: Option<&str>, as_json: bool) -> Result<Outcome> {
    let head = source.head()?;
    let seq = match as_of {
        Some(point) => source.upto(point)?,
        None => head.seq,
    };
    let at = source.record(seq)?.map(|r| time_of(&r)).unwrap_or_else(|| "(before the first record)".into());
    match task {
        Some(task) => show_task(source, seq, &at, task, as_json),
        None => show_ledger(source, seq, &at, as_json),
    }
}

fn show_task(source: &Source, seq: u64, at: &str, text: &str, as_json: bool) -> Result<Outcome> {
    let id = parse_task(text)?;
    let mut ledger = Ledger::retaining_terminal_tasks();
    let records = source.task_records(id, seq)?;
    for record in &records {
        apply(&mut ledger, record)?;
    }
    let Some(task) = ledger.task(&id) else {
        if source.task_records(id, u64::MAX)?.is_empty() {
            bail!("task {id} is not in this log");
        }
        bail!("task {id} did not exist yet at seq {seq} ({at})");
    };
    let last_seq = records.last().map_or(0, |r| r.seq);
    if as_json {
        let mut body = task_json(task);
        body["as_of_seq"] = seq.into();
        body["as_of_time"] = at.into();
        body["last_seq"] = last_seq.into();
        body["version"] = records.len().into();
        println!("{body}");
        return Ok(Outcome::Clean);
    }
    println!("task {id} as of seq {seq} ({at})");
    println!("  name       {:?} in {} (priority {})", &*task.name, task.namespace, task.priority.get());
    println!("  state      {}", task.state.as_str());
    println!("  created    {}", time(task.created_at));
    if let Some(run_at) = task.run_at {
        println!("  run_at     {} ({})", time(run_at), if task.run_at_reached { "reached" } else { "not yet" });
    }
    println!("  events     {} (last at seq {last_seq})", records.len());
    println!("  steps");
    for step in &task.steps {
        let mut facts = vec![format!("attempts {}/{}", step.attempts, step.max_attempts)];
        if let (Some(worker), Some(deadline)) = (&step.worker, step.lease_deadline) {
            facts.push(format!("leased to {worker} (epoch {}) until {}", step.epoch, time(deadline)));
        }
        if let Some(retry_at) = step.retry_at {
            facts.push(format!("retry at {}", time(retry_at)));
        }
        if let Some(error) = &step.last_error {
            facts.push(format!("last error {:?}", error.as_str()));
        }
        println!("    {:<16} {:<18} {}", step.name.as_str(), step.state.as_str(), facts.join(", "));
    }
    Ok(Outcome::Clean)
}

fn show_ledger(source: &Source, seq: u64, at: &str, as_json: bool) -> Result<Outcome> {
    let progress = Progress::new(seq, "folding");
    let (ledger, stats) = source.ledger_at(seq, &progress)?;
    drop(progress);
    for skipped in &stats.skipped_snapshots {
        eprintln!("note: snapshot skipped: {skipped}");
    }
    let mut tasks: Vec<&Task> = ledger.tasks().collect();
    tasks.sort_by_key(|t| t.id);
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for task in &tasks {
        *by_state.entry(task.state.as_str()).or_default() += 1;
    }
    // Per namespace: how many steps are in each state, plus settings.
    let mut queues: BTreeMap<String, BTreeMap<&str, usize>> = BTreeMap::new();
    for task in &tasks {
        let counts = queues.entry(task.namespace.to_string()).or_default();
        for step in &task.steps {
            *counts.entry(step.state.as_str()).or_default() += 1;
        }
    }
    for (namespace, _) in ledger.to_state().queue_settings {
        queues.entry(namespace.to_string()).or_default();
    }
    let digest = hex(&ledger.digest());
    let queue_json: Vec<Value> = queues
        .iter()
        .map(|(namespace, steps)| {
            let ns = domain::Namespace::new(namespace).expect("names come from the ledger");
            let settings = ledger.queue_settings(&ns);
            json!({
                "namespace": namespace,
                "paused": settings.paused,
                "concurrency_limit": settings.concurrency_limit,
                "ready": ledger.ready_count(&ns),
                "in_progress": ledger.in_progress(&ns),
                "steps_by_state": steps,
            })
        })
        .collect();
    if as_json {
        let body = json!({
            "as_of_seq": seq,
            "as_of_time": at,
            "snapshot_seq": stats.snapshot_seq,
            "replayed": stats.replayed,
            "digest": digest,
            "live_tasks": tasks.len(),
            "tasks_by_state": by_state,
            "timers": ledger.timer_count(),
            "next_timer_due": ledger.next_timer_due().map(time),
            "queues": queue_json,
            "tasks": tasks.iter().map(|t| task_json(t)).collect::<Vec<_>>(),
        });
        println!("{body}");
        return Ok(Outcome::Clean);
    }
    println!("ledger as of seq {seq} ({at})");
    println!("  folded     from snapshot at seq {} + {} events", stats.snapshot_seq, stats.replayed);
    println!("  digest     {digest}");
    let counts: Vec<String> = by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!(
        "  live tasks {}{} (finished tasks have left the ledger: use --task ID)",
        tasks.len(),
        if counts.is_empty() { String::new() } else { format!(": {}", counts.join(", ")) }
    );
    println!(
        "  timers     {}{}",
        ledger.timer_count(),
        ledger.next_timer_due().map(|t| format!(", next due {}", time(t))).unwrap_or_default()
    );
    if !queues.is_empty() {
        println!("  queues");
        println!(
            "    {:<20} {:<7} {:>5} {:>6} {:>8} {:>8} {:>9} {:>5}",
            "NAMESPACE", "PAUSED", "LIMIT", "READY", "RUNNING", "PENDING", "RETRYING", "DEAD"
        );
        for q in &queue_json {
            let count = |state: StepState| q["steps_by_state"][state.as_str()].as_u64().unwrap_or(0);
            println!(
                "    {:<20} {:<7} {:>5} {:>6} {:>8} {:>8} {:>9} {:>5}",
                q["namespace"].as_str().unwrap_or_default(),
                if q["paused"] == true { "yes" } else { "no" },
                q["concurrency_limit"].as_u64().map_or("-".into(), |l| l.to_string()),
                q["ready"].as_u64().unwrap_or(0),
                q["in_progress"].as_u64().unwrap_or(0),
                count(StepState::Pending),
                count(StepState::WaitingForRetry),
                count(StepState::Error),
            );
        }
    }
    if !tasks.is_empty() {
        println!("  tasks");
        for task in &tasks {
            let steps: Vec<String> = task.steps.iter().map(|s| format!("{}={}", s.name, s.state.as_str())).collect();
            println!(
                "    {}  {:<12} {:<20} {}",
                task.id,
                task.namespace.as_str(),
                task.state.as_str(),
                steps.join(" ")
            );
        }
    }
    Ok(Outcome::Clean)
}
