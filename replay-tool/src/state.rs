//! `state --as-of SEQ|TIME [--task ID]`: the whole ledger (queues, live tasks,
//! timers) or one task exactly as it was at a point, with the ledger digest
//! so an answer can be compared with any other fold of the same prefix.
//!
//! The whole ledger is shown as counts (tasks and steps per namespace and
//! state, queue depths, timers) with its digest, from the nearest snapshot
//! plus a short replay that decodes only the tasks the replay touches
//! (`Source::summary_at`); `--tasks` folds every task into memory to list
//! them. One task is folded from its own stream (read through the stream
//! index) into a ledger that keeps finished tasks, so a task that ended is
//! still shown.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use domain::{Ledger, NamespaceCounts, QueueSettings, StepState, Task, TaskState, Timestamp};
use eventlog::json::hex;
use serde_json::{Value, json};

use crate::Outcome;
use crate::events::parse_task;
use crate::progress::Progress;
use crate::source::{Point, Source, SummaryAt, apply, time_of};

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
                "payload": json_value(s.payload.as_str()),
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
        "idempotency_key": task.idempotency_key.as_ref().map(|k| k.as_str()),
        "payload": json_value(task.payload.as_str()),
        "created_at": time(task.created_at),
        "run_at": task.run_at.map(time),
        "steps": steps,
    })
}

pub fn run(
    source: &Source,
    as_of: Option<Point>,
    task: Option<&str>,
    list_tasks: bool,
    as_json: bool,
) -> Result<Outcome> {
    let head = source.head()?;
    let seq = match as_of {
        Some(point) => source.upto(point)?,
        None => head.seq,
    };
    let at = source.record(seq)?.map(|r| time_of(&r)).unwrap_or_else(|| "before the first record".into());
    match task {
        Some(task) => show_task(source, seq, &at, task, as_json),
        None => show_ledger(source, seq, &at, list_tasks, as_json),
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

fn show_ledger(source: &Source, seq: u64, at: &str, list_tasks: bool, as_json: bool) -> Result<Outcome> {
    let progress = Progress::new(seq, "folding");
    // Listing every task needs them all in memory; the counts do not.
    let (at_seq, ledger) = if list_tasks {
        let (ledger, stats) = source.ledger_at(seq, &progress)?;
        let summary = SummaryAt {
            summary: ledger.summary(),
            settings: ledger.all_queue_settings(),
            digest: ledger.digest(),
            stats,
            tasks_decoded: ledger.live_task_count(),
        };
        (summary, Some(ledger))
    } else {
        (source.summary_at(seq, &progress)?, None)
    };
    drop(progress);
    let SummaryAt { summary, settings, digest, stats, tasks_decoded } = at_seq;
    for skipped in &stats.skipped_snapshots {
        eprintln!("note: snapshot skipped: {skipped}");
    }
    let mut tasks: Vec<&Task> = ledger.as_ref().map(|l| l.tasks().collect()).unwrap_or_default();
    tasks.sort_by_key(|t| t.id);
    let settings: BTreeMap<String, QueueSettings> = settings.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
    let mut namespaces: Vec<&str> = summary.by_namespace.keys().map(String::as_str).collect();
    namespaces.extend(settings.keys().map(String::as_str).filter(|n| !summary.by_namespace.contains_key(*n)));
    namespaces.sort_unstable();
    let empty = NamespaceCounts::default();
    let counts_of = |ns: &str| summary.by_namespace.get(ns).unwrap_or(&empty);
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for counts in summary.by_namespace.values() {
        for state in TaskState::ALL {
            if counts.tasks_in(state) > 0 {
                *by_state.entry(state.as_str()).or_default() += counts.tasks_in(state);
            }
        }
    }
    let nonzero_steps = |counts: &NamespaceCounts| -> BTreeMap<&str, u64> {
        StepState::ALL.iter().filter(|s| counts.steps_in(**s) > 0).map(|s| (s.as_str(), counts.steps_in(*s))).collect()
    };
    let nonzero_tasks = |counts: &NamespaceCounts| -> BTreeMap<&str, u64> {
        TaskState::ALL.iter().filter(|s| counts.tasks_in(**s) > 0).map(|s| (s.as_str(), counts.tasks_in(*s))).collect()
    };
    let digest = hex(&digest);
    let queue_json: Vec<Value> = namespaces
        .iter()
        .map(|ns| {
            let queue = settings.get(*ns).cloned().unwrap_or_default();
            let counts = counts_of(ns);
            json!({
                "namespace": ns,
                "paused": queue.paused,
                "concurrency_limit": queue.concurrency_limit,
                "ready": counts.steps_in(StepState::Enqueued),
                "in_progress": counts.steps_in(StepState::InProgress),
                "steps_by_state": nonzero_steps(counts),
                "tasks_by_state": nonzero_tasks(counts),
            })
        })
        .collect();
    if as_json {
        let mut body = json!({
            "as_of_seq": seq,
            "as_of_time": at,
            "snapshot_seq": stats.snapshot_seq,
            "replayed": stats.replayed,
            "tasks_decoded": tasks_decoded,
            "digest": digest,
            "live_tasks": summary.live_tasks,
            "tasks_by_state": by_state,
            "timers": summary.timers,
            "next_timer_due": summary.next_timer_due.map(time),
            "queues": queue_json,
        });
        if list_tasks {
            body["tasks"] = tasks.iter().map(|t| task_json(t)).collect::<Vec<_>>().into();
        }
        println!("{body}");
        return Ok(Outcome::Clean);
    }
    println!("ledger as of seq {seq} ({at})");
    println!(
        "  folded     from snapshot at seq {} + {} events ({tasks_decoded} tasks decoded)",
        stats.snapshot_seq, stats.replayed
    );
    println!("  digest     {digest}");
    let counts: Vec<String> = by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
    println!(
        "  live tasks {}{} (finished tasks have left the ledger: use --task ID)",
        summary.live_tasks,
        if counts.is_empty() { String::new() } else { format!(": {}", counts.join(", ")) }
    );
    println!(
        "  timers     {}{}",
        summary.timers,
        summary.next_timer_due.map(|t| format!(", next due {}", time(t))).unwrap_or_default()
    );
    if !namespaces.is_empty() {
        println!("  queues (steps)");
        println!(
            "    {:<20} {:<7} {:>5} {:>6} {:>8} {:>8} {:>9} {:>5}",
            "NAMESPACE", "PAUSED", "LIMIT", "READY", "RUNNING", "PENDING", "RETRYING", "DEAD"
        );
        for ns in &namespaces {
            let queue = settings.get(*ns).cloned().unwrap_or_default();
            let counts = counts_of(ns);
            println!(
                "    {:<20} {:<7} {:>5} {:>6} {:>8} {:>8} {:>9} {:>5}",
                ns,
                if queue.paused { "yes" } else { "no" },
                queue.concurrency_limit.map_or("-".into(), |l| l.to_string()),
                counts.steps_in(StepState::Enqueued),
                counts.steps_in(StepState::InProgress),
                counts.steps_in(StepState::Pending),
                counts.steps_in(StepState::WaitingForRetry),
                counts.steps_in(StepState::Error),
            );
        }
        let live: Vec<TaskState> = TaskState::ALL.into_iter().filter(|s| !s.is_terminal()).collect();
        println!("  tasks by namespace and state");
        let header: Vec<String> = live.iter().map(|s| format!("{:>19}", s.as_str().to_uppercase())).collect();
        println!("    {:<20} {}", "NAMESPACE", header.join(" "));
        for ns in &namespaces {
            let counts = counts_of(ns);
            let cells: Vec<String> = live.iter().map(|s| format!("{:>19}", counts.tasks_in(*s))).collect();
            println!("    {:<20} {}", ns, cells.join(" "));
        }
    }
    if list_tasks {
        if !tasks.is_empty() {
            println!("  tasks");
        }
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
    } else if summary.live_tasks > 0 {
        println!("  (every task with --tasks; one task's history with --task ID)");
    }
    if let Some(ledger) = ledger {
        // About to exit: freeing every task one by one would only add time.
        std::mem::forget(ledger);
    }
    Ok(Outcome::Clean)
}
