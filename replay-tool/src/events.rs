//! `events`: the log, filtered by task, namespace, event type, actor, and a
//! seq or time range; a readable table, or with `--json` one object per line
//! in the same shape as the server's feed (`eventlog::json::record_json`).

use std::collections::HashSet;
use std::io::Write;
use std::ops::ControlFlow;

use anyhow::{Context, Result};
use clap::Args;
use domain::{Event, TaskId};
use eventlog::fold::decode_event;
use eventlog::json::record_json;

use crate::describe::{TaskBook, event_step, summary};
use crate::progress::Progress;
use crate::source::{Point, Source, time_of};
use crate::{Input, Outcome};

#[derive(Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub input: Input,
    /// Only this task's events (its UUID).
    #[arg(long, value_name = "ID")]
    task: Option<String>,
    /// Only events of tasks in (or settings of) this namespace.
    #[arg(long, value_name = "NS")]
    namespace: Option<String>,
    /// Only these event types (repeat or comma-separate), e.g. step_failed,lease_expired.
    #[arg(long = "type", value_name = "TYPE", value_delimiter = ',')]
    types: Vec<String>,
    /// Only events recorded by this actor.
    #[arg(long, value_name = "ACTOR")]
    actor: Option<String>,
    /// First seq or time (RFC 3339) to show.
    #[arg(long, value_name = "SEQ|TIME")]
    from: Option<Point>,
    /// Last seq or time to show.
    #[arg(long, value_name = "SEQ|TIME")]
    to: Option<Point>,
    /// Stop after this many matching events.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// One JSON object per line (the feed's shape) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Checks `--type` values against the known event types.
pub fn parse_types(types: &[String]) -> Result<HashSet<u16>> {
    let mut codes = HashSet::new();
    for name in types.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let Some(code) = Event::TYPES.iter().position(|(n, _)| *n == name) else {
            let known: Vec<&str> = Event::TYPES.iter().map(|(n, _)| *n).collect();
            return Err(crate::source::usage(format!(
                "unknown event type {name:?}; known types: {}",
                known.join(", ")
            )));
        };
        codes.insert(code as u16);
    }
    Ok(codes)
}

pub fn parse_task(text: &str) -> Result<TaskId> {
    TaskId::parse(text).map_err(|r| crate::source::usage(format!("parse --task: {}", r.message)))
}

/// The part of a server's feed `events` needs: from `--from`, and up to `--to` or, when no
/// filter can skip records, no more than `--limit`. The whole feed when either point is a time
/// (finding a time's seq reads the log from its start: found by review).
pub fn feed_window(args: &EventsArgs) -> crate::feed::FeedWindow {
    let from_seq = match args.from {
        None => 1,
        Some(Point::Seq(seq)) => seq.max(1),
        Some(Point::Time(_)) => return crate::feed::FeedWindow::ALL,
    };
    let through_to = match args.to {
        None => None,
        Some(Point::Seq(to)) => Some(to.saturating_sub(from_seq).saturating_add(1)),
        Some(Point::Time(_)) => return crate::feed::FeedWindow::ALL,
    };
    let filtered = args.task.is_some() || args.namespace.is_some() || !args.types.is_empty() || args.actor.is_some();
    let limit = match (through_to, args.limit.filter(|_| !filtered)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    crate::feed::FeedWindow { from_seq, limit }
}

pub fn run(source: &Source, args: &EventsArgs) -> Result<Outcome> {
    let (first, last) = source.range(args.from, args.to)?;
    let types = parse_types(&args.types)?;
    let task = args.task.as_deref().map(parse_task).transpose()?;
    let namespace = args.namespace.as_deref();
    let mut book = TaskBook::default();
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut shown = 0u64;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if !args.json {
        writeln!(
            out,
            "{:>8}  {:<27}  {:<21}  {:<16}  {:<41}  DETAIL",
            "SEQ", "RECORDED AT", "TYPE", "ACTOR", "STREAM"
        )?;
    }
    let mut show = |record: &eventlog::StoredRecord, out: &mut dyn Write| -> Result<ControlFlow<()>> {
        if shown >= limit {
            return Ok(ControlFlow::Break(()));
        }
        if !types.is_empty() && !types.contains(&record.event_type) {
            return Ok(ControlFlow::Continue(()));
        }
        if args.actor.as_deref().is_some_and(|a| a != record.actor) {
            return Ok(ControlFlow::Continue(()));
        }
        let event = decode_event(record).map_err(|e| anyhow::anyhow!("{e}"))?;
        book.learn(&event);
        if let Some(ns) = namespace {
            let event_ns = match &event {
                Event::QueuePaused { namespace, .. }
                | Event::QueueResumed { namespace, .. }
                | Event::QueueConcurrencySet { namespace, .. } => Some(namespace.clone()),
                other => match other.task() {
                    Some(task) => book.namespace(source, task)?,
                    None => None,
                },
            };
            if event_ns.as_ref().map(|n| n.as_str()) != Some(ns) {
                return Ok(ControlFlow::Continue(()));
            }
        }
        shown += 1;
        if args.json {
            writeln!(out, "{}", serde_json::Value::Object(record_json(record, &event)))?;
        } else {
            let step = match (event.task(), event_step(&event)) {
                (Some(task), Some(step)) => book.step_name(source, task, step)?,
                _ => String::new(),
            };
            writeln!(
                out,
                "{:>8}  {:<27}  {:<21}  {:<16}  {:<41}  {}",
                record.seq,
                time_of(record),
                event.type_name(),
                record.actor,
                event.stream().to_string(),
                summary(&event, &step)
            )?;
        }
        Ok(ControlFlow::Continue(()))
    };
    match task {
        // One task: read its stream through the index rather than the whole log.
        Some(task) => {
            for record in source.task_records(task, last)? {
                if record.seq >= first && show(&record, &mut out)?.is_break() {
                    break;
                }
            }
        }
        None => {
            let progress = Progress::new(last, "scanning");
            source.scan(first, last, &progress, |record| show(record, &mut out))?;
        }
    }
    out.flush().context("write the events")?;
    // An empty answer says why on stderr (stdout stays the table or the JSON lines): a filter
    // with a typo, e.g. `--actor op-kim` for a command sent as `token:op-kim`, looked like "it
    // never happened" (found by a black-box check).
    if shown == 0 {
        let mut said = if first > last {
            format!("no record: the range is empty (seq {first} is after seq {last})")
        } else {
            format!("no record matched in seq {first}..{last}")
        };
        if let Some(actor) = args.actor.as_deref().filter(|a| !a.contains(':')) {
            said += &format!(
                " (commands sent through the server record their actor as token:<name>: --actor token:{actor}?)"
            );
        }
        eprintln!("{said}");
    }
    Ok(Outcome::Clean)
}
