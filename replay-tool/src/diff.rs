//! `diff --from --to`: what changed between two points — tasks created, task
//! and step state changes, leases taken and lost, dead letters, queue
//! settings. The ledger at `from` comes from the nearest snapshot; it is then
//! told to keep finished tasks, so a task that ended inside the range still
//! shows where it ended. With `--summary` every list is only counted (state changes by
//! transition), so a day of a busy log is a screenful and its items are never held.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use anyhow::Result;
use domain::{Event, FailOutcome, Ledger, TaskId};
use serde::Serialize;

use crate::Outcome;
use crate::describe::{TaskBook, printable};
use crate::progress::Progress;
use crate::source::{Point, Source, time_of};

#[derive(Serialize)]
struct Diff {
    from_seq: u64,
    to_seq: u64,
    from_time: Option<String>,
    to_time: Option<String>,
    events: u64,
    events_by_type: BTreeMap<String, u64>,
    tasks_created: Listed<Created>,
    task_state_changes: Listed<Change>,
    step_state_changes: Listed<Change>,
    leases_taken: Listed<Lease>,
    leases_lost: Listed<Lease>,
    dead_letters: Listed<Lease>,
    queue_changes: Listed<String>,
}

/// One of a diff's lists: its items, or with `--summary` only how many there were (a state
/// change counted under its transition, `from -> to`). JSON gives the items, or the count (a
/// number; for state changes an object of counts by transition).
struct Listed<T> {
    keep: bool,
    items: Vec<T>,
    count: u64,
    /// For state changes with `--summary`: the count by transition.
    by_transition: Option<BTreeMap<String, u64>>,
}

impl<T> Listed<T> {
    fn new(keep: bool) -> Self {
        Listed { keep, items: Vec::new(), count: 0, by_transition: None }
    }

    /// Adds an item, made only if the list keeps its items.
    fn push(&mut self, item: impl FnOnce() -> T) {
        self.count += 1;
        if self.keep {
            self.items.push(item());
        }
    }
}

impl Listed<Change> {
    fn of_changes(keep: bool) -> Self {
        Listed { by_transition: (!keep).then(BTreeMap::new), ..Listed::new(keep) }
    }

    /// Adds a state change of `subject` (named only if the list keeps its items).
    fn push_change(&mut self, subject: impl FnOnce() -> String, from: String, to: String) {
        if let Some(counts) = &mut self.by_transition {
            *counts.entry(format!("{from} -> {to}")).or_default() += 1;
        }
        self.push(|| Change { subject: subject(), from, to });
    }
}

impl<T: Serialize> Serialize for Listed<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match (self.keep, &self.by_transition) {
            (true, _) => self.items.serialize(serializer),
            (false, Some(counts)) => counts.serialize(serializer),
            (false, None) => self.count.serialize(serializer),
        }
    }
}

#[derive(Serialize)]
struct Created {
    seq: u64,
    task: String,
    namespace: String,
    name: String,
}

#[derive(Serialize)]
struct Change {
    subject: String,
    from: String,
    to: String,
}

#[derive(Serialize)]
struct Lease {
    seq: u64,
    task: String,
    step: String,
    epoch: u32,
    worker: Option<String>,
    detail: String,
}

/// A task's state and its steps' (name, state), for before/after comparison.
type States = (String, Vec<(String, String)>);

fn states(ledger: &Ledger, task: &TaskId) -> Option<States> {
    ledger.task(task).map(|t| {
        (
            t.state.as_str().to_owned(),
            t.steps.iter().map(|s| (s.name.to_string(), s.state.as_str().to_owned())).collect(),
        )
    })
}

pub fn run(source: &Source, from: Point, to: Point, as_json: bool, summary: bool) -> Result<Outcome> {
    let a = source.upto(from)?;
    let b = source.upto(to)?;
    if a > b {
        return Err(crate::source::usage(format!("--from (seq {a}) is after --to (seq {b})")));
    }
    let progress = Progress::new(b, "folding");
    let (ledger, _) = source.ledger_at(a, &progress)?;
    let mut ledger = ledger.into_retaining();
    let mut diff = Diff {
        from_seq: a,
        to_seq: b,
        from_time: source.record(a)?.map(|r| time_of(&r)),
        to_time: source.record(b)?.map(|r| time_of(&r)),
        events: 0,
        events_by_type: BTreeMap::new(),
        tasks_created: Listed::new(!summary),
        task_state_changes: Listed::of_changes(!summary),
        step_state_changes: Listed::of_changes(!summary),
        leases_taken: Listed::new(!summary),
        leases_lost: Listed::new(!summary),
        dead_letters: Listed::new(!summary),
        queue_changes: Listed::new(!summary),
    };
    let mut before: BTreeMap<TaskId, Option<States>> = BTreeMap::new();
    let mut workers: BTreeMap<(TaskId, u16, u32), String> = BTreeMap::new();
    let mut book = TaskBook::default();
    source.scan(a + 1, b, &progress, |record| {
        let event = crate::source::decode(record)?;
        book.learn(&event);
        if let Some(task) = event.task() {
            before.entry(task).or_insert_with(|| states(&ledger, &task));
        }
        // The holder of a lease taken in the range, else (a lease taken before `--from`) the
        // step's worker in the ledger as it was before this event.
        let worker_of = |task: TaskId, step: u16, epoch: u32| {
            workers.get(&(task, step, epoch)).cloned().or_else(|| {
                let held = ledger.task(&task).and_then(|t| t.step(domain::StepIndex(step)));
                held.filter(|s| s.epoch.0 == epoch).and_then(|s| s.worker.as_ref()).map(|w| w.to_string())
            })
        };
        let lease = |task: TaskId, step: domain::StepIndex, epoch: u32, worker: Option<String>, detail: String| Lease {
            seq: record.seq,
            task: task.to_string(),
            step: ledger.task(&task).and_then(|t| t.step(step)).map_or(format!("#{}", step.0), |s| s.name.to_string()),
            epoch,
            worker,
            detail,
        };
        // Leases an operator's action ended (a cancel, a give-up, a resolve or retry of the
        // step): lost to their workers as surely as by expiry, and counted only for expiries
        // before (found by a black-box check). A worker's own end (complete, fail, release) is
        // not a loss, and an expiry is counted below. Whether it ended is read from the ledger
        // after the event.
        let held: Vec<(TaskId, domain::StepIndex, u32, Lease)> = match event.task() {
            Some(task) if crate::incident::category(&event) == "operator" => {
                let detail = format!("ended by {} ({})", event.type_name(), record.actor);
                ledger.task(&task).map_or_else(Vec::new, |t| {
                    t.steps
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.lease_deadline.is_some())
                        .map(|(i, s)| {
                            let (step, epoch) = (domain::StepIndex(i as u16), s.epoch.0);
                            (
                                task,
                                step,
                                epoch,
                                lease(task, step, epoch, worker_of(task, step.0, epoch), detail.clone()),
                            )
                        })
                        .collect()
                })
            }
            _ => Vec::new(),
        };
        match &event {
            Event::TaskCreated { spec, .. } => diff.tasks_created.push(|| Created {
                seq: record.seq,
                task: spec.id.to_string(),
                namespace: spec.namespace.to_string(),
                name: spec.name.clone(),
            }),
            Event::StepClaimed { task, step, worker, epoch, .. } => {
                workers.insert((*task, step.0, epoch.0), worker.to_string());
                diff.leases_taken.push(|| lease(*task, *step, epoch.0, Some(worker.to_string()), String::new()));
            }
            Event::LeaseExpired { task, step, epoch, outcome, .. } => {
                let w = worker_of(*task, step.0, epoch.0);
                let detail = match outcome {
                    FailOutcome::Retry { delay_ms, .. } => format!("retry in {delay_ms} ms"),
                    FailOutcome::DeadLetter => "dead-lettered".to_owned(),
                };
                diff.leases_lost.push(|| lease(*task, *step, epoch.0, w.clone(), detail.clone()));
                if matches!(outcome, FailOutcome::DeadLetter) {
                    diff.dead_letters.push(|| lease(*task, *step, epoch.0, w, "lease expired".into()));
                }
            }
            Event::StepFailed { task, step, epoch, error, outcome: FailOutcome::DeadLetter, .. } => {
                let w = worker_of(*task, step.0, epoch.0);
                diff.dead_letters.push(|| lease(*task, *step, epoch.0, w, error.as_str().to_owned()));
            }
            Event::QueuePaused { .. } | Event::QueueResumed { .. } | Event::QueueConcurrencySet { .. } => {
                diff.queue_changes.push(|| format!("seq {}: {}", record.seq, crate::describe::summary(&event, "")));
            }
            _ => {}
        }
        ledger.apply(&event).map_err(|e| anyhow::anyhow!("record {}: {e}", record.seq))?;
        for (task, step, epoch, lost) in held {
            let step = ledger.task(&task).and_then(|t| t.step(step));
            if step.is_none_or(|s| s.lease_deadline.is_none() || s.epoch.0 != epoch) {
                diff.leases_lost.push(|| lost);
            }
        }
        diff.events += 1;
        *diff.events_by_type.entry(event.type_name().to_owned()).or_default() += 1;
        Ok(ControlFlow::Continue(()))
    })?;
    drop(progress);
    for (task, old) in &before {
        let Some((state, steps)) = states(&ledger, task) else { continue };
        let (old_state, old_steps) = old.clone().unwrap_or_else(|| ("(new)".into(), Vec::new()));
        if old_state != state {
            diff.task_state_changes.push_change(|| task.to_string(), old_state, state);
        }
        for (name, now) in steps {
            let was = old_steps.iter().find(|(n, _)| *n == name).map_or("(new)".to_owned(), |(_, s)| s.clone());
            if was != now {
                diff.step_state_changes.push_change(|| format!("{task}/{name}"), was, now);
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string(&diff)?);
        return Ok(Outcome::Clean);
    }
    print_text(&diff);
    Ok(Outcome::Clean)
}

fn print_text(d: &Diff) {
    let when = |t: &Option<String>| t.clone().unwrap_or_else(|| "start".into());
    println!(
        "diff seq {} ({}) .. seq {} ({}): {} events",
        d.from_seq,
        when(&d.from_time),
        d.to_seq,
        when(&d.to_time),
        d.events
    );
    let types: Vec<String> = d.events_by_type.iter().map(|(t, n)| format!("{t} {n}")).collect();
    if !types.is_empty() {
        println!("  by type: {}", types.join(", "));
    }
    println!("tasks created ({})", d.tasks_created.count);
    for c in &d.tasks_created.items {
        println!("  seq {:<6} {}  {:<12} {:?}", c.seq, c.task, c.namespace, c.name);
    }
    let changes = |title: &str, list: &Listed<Change>| {
        println!("{title} ({})", list.count);
        for c in &list.items {
            println!("  {}  {} -> {}", c.subject, c.from, c.to);
        }
        for (transition, n) in list.by_transition.iter().flatten() {
            println!("  {transition}  {n}");
        }
    };
    changes("task state changes", &d.task_state_changes);
    changes("step state changes", &d.step_state_changes);
    let leases = |title: &str, list: &Listed<Lease>| {
        println!("{title} ({})", list.count);
        for l in &list.items {
            let worker = l.worker.as_deref().map(|w| format!(" worker {w}")).unwrap_or_default();
            // A dead letter's detail is the worker's error, as written: raw, it could rewrite the
            // terminal (found by a black-box check; every other subcommand escaped it already).
            let detail = if l.detail.is_empty() { String::new() } else { format!(": {}", printable(&l.detail)) };
            println!("  seq {:<6} {}/{} epoch {}{worker}{detail}", l.seq, l.task, l.step, l.epoch);
        }
    };
    leases("leases taken", &d.leases_taken);
    leases("leases lost", &d.leases_lost);
    leases("dead letters", &d.dead_letters);
    println!("queue changes ({})", d.queue_changes.count);
    for q in &d.queue_changes.items {
        println!("  {q}");
    }
}
