//! `incident --task ID | --worker ID | --from T --to T`: a timeline report of
//! everything that happened — claims, heartbeats, lease expiries, retries
//! with their backoff, failures with errors, operator actions with actors —
//! grouped into one lane per step (task-level and queue events get lanes of
//! their own). Markdown for tickets, a self-contained HTML page with a visual
//! timeline (an inline SVG: one row per lane, a bar per lease from claim to
//! its end, a marker per event with its details on hover) for post-mortems,
//! or JSON for tools.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use domain::{Event, FailOutcome, TaskId, Timestamp};
use serde::Serialize;

use crate::describe::{TaskBook, event_step, summary};
use crate::events::parse_task;
use crate::progress::Progress;
use crate::source::{Point, Source, decode};
use crate::{Input, Outcome};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Markdown,
    Html,
    Json,
}

#[derive(Args)]
pub struct IncidentArgs {
    #[command(flatten)]
    pub input: Input,
    /// Everything that happened to this task.
    #[arg(long, value_name = "ID", conflicts_with = "worker")]
    task: Option<String>,
    /// Every lease this worker took and how each ended.
    #[arg(long, value_name = "ID")]
    worker: Option<String>,
    /// Start of the window (with --task or --worker: narrows it).
    #[arg(long, value_name = "SEQ|TIME")]
    from: Option<Point>,
    /// End of the window.
    #[arg(long, value_name = "SEQ|TIME")]
    to: Option<Point>,
    #[arg(long, value_enum, default_value = "markdown")]
    format: Format,
    /// Write the report to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Most events one report may hold: a wider window is refused (exit 2), not cut short,
    /// since a timeline missing its end would mislead a post-mortem. Narrow the window, or
    /// raise this for a JSON report a tool reads.
    #[arg(long, value_name = "N", default_value_t = MAX_EVENTS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    max_events: u64,
}

/// Default of `--max-events`: a Markdown timeline of this many rows is already past reading,
/// and the HTML page draws a marker per event (about 200 MB of report at this size in JSON).
pub const MAX_EVENTS_DEFAULT: u64 = 100_000;

impl IncidentArgs {
    /// A report on one task between seqs (or over its whole life): it needs the task's records
    /// and the log's head, not the whole log (a time point is looked up in the whole log).
    pub fn reads_one_task_by_seq(&self) -> bool {
        let by_seq = |point: Option<Point>| !matches!(point, Some(Point::Time(_)));
        self.task.is_some() && by_seq(self.from) && by_seq(self.to)
    }
}

/// One event on the timeline.
#[derive(Serialize, Clone)]
struct Entry {
    seq: u64,
    time: String,
    /// Milliseconds since the first event of the report.
    offset_ms: f64,
    actor: String,
    command_id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    category: &'static str,
    lane: String,
    task: Option<String>,
    step: Option<String>,
    detail: String,
    /// For claims: until when the lease ran (its end event, or the report's end).
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_end_ms: Option<f64>,
    /// For claims: the lease was still held at the end of the report (`lease_end_ms` is the
    /// report's end, not the lease's).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    lease_open: bool,
    /// For an event that ends a lease: its claim came before the report (the lease ran from
    /// before the report's start to this event).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    lease_claimed_before: bool,
    /// Where `lane` is in the report's lanes.
    #[serde(skip)]
    lane_index: usize,
    /// The (task, step, epoch) of the lease the event concerns.
    #[serde(skip)]
    lease: Option<(TaskId, u16, u32)>,
}

/// A row of the Markdown and HTML timelines: one event, or a run of heartbeats of one lease
/// with no other event of that lease between them (a step heartbeating for a day is tens of
/// thousands of events that each say "still running"; the JSON report keeps every one).
struct Row<'a> {
    first: &'a Entry,
    last: &'a Entry,
    count: usize,
}

impl Row<'_> {
    fn seq(&self) -> String {
        if self.count == 1 { self.first.seq.to_string() } else { format!("{}–{}", self.first.seq, self.last.seq) }
    }

    fn kind(&self) -> String {
        if self.count == 1 { self.first.kind.to_owned() } else { format!("{} ×{}", self.first.kind, self.count) }
    }

    fn detail(&self) -> String {
        if self.count == 1 {
            return match (self.first.lease_open, self.first.lease_claimed_before) {
                (true, _) => format!("{} (still held at the end of the report)", self.first.detail),
                (_, true) => format!("{} (a lease claimed before the report)", self.first.detail),
                _ => self.first.detail.clone(),
            };
        }
        format!(
            "{} heartbeats over {:.1} s, the last at {} (+{:.1} ms): {}",
            self.count,
            (self.last.offset_ms - self.first.offset_ms) / 1000.0,
            self.last.time,
            self.last.offset_ms,
            self.last.detail
        )
    }
}

/// The timeline's rows, in the order of their first event.
fn rows(events: &[Entry]) -> Vec<Row<'_>> {
    let mut rows: Vec<Row<'_>> = Vec::with_capacity(events.len());
    let mut heartbeating: HashMap<(TaskId, u16, u32), usize> = HashMap::new();
    for entry in events {
        match (entry.category, entry.lease) {
            ("heartbeat", Some(lease)) => {
                if let Some(&row) = heartbeating.get(&lease) {
                    rows[row].last = entry;
                    rows[row].count += 1;
                    continue;
                }
                heartbeating.insert(lease, rows.len());
            }
            (_, Some(lease)) => {
                heartbeating.remove(&lease);
            }
            _ => {}
        }
        rows.push(Row { first: entry, last: entry, count: 1 });
    }
    rows
}

/// `items` grouped by their lane, in lane order (one pass: a window over a busy minute has
/// tens of thousands of lanes).
fn by_lane<T>(lanes: usize, items: impl IntoIterator<Item = (usize, T)>) -> Vec<Vec<T>> {
    let mut grouped: Vec<Vec<T>> = (0..lanes).map(|_| Vec::new()).collect();
    for (lane, item) in items {
        grouped[lane].push(item);
    }
    grouped
}

#[derive(Serialize, Default)]
struct Summary {
    events: usize,
    claims: usize,
    heartbeats: usize,
    completions: usize,
    failures: usize,
    lease_expiries: usize,
    releases: usize,
    retries_scheduled: usize,
    backoff_ms: Vec<u64>,
    dead_letters: usize,
    operator_actions: Vec<String>,
    workers: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    subject: String,
    source: String,
    first_seq: u64,
    last_seq: u64,
    start: Option<String>,
    end: Option<String>,
    duration_ms: f64,
    summary: Summary,
    /// What the report could not show, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notes: Vec<String>,
    lanes: Vec<String>,
    events: Vec<Entry>,
}

/// What kind of entry `event` is in a report: `operator` for an operator's action (also what
/// `diff` checks for leases an operator ended).
pub(crate) fn category(event: &Event) -> &'static str {
    match event {
        Event::TaskCreated { .. } | Event::StepsAdded { .. } => "created",
        Event::StepClaimed { .. } => "claim",
        Event::LeaseExtended { .. } => "heartbeat",
        Event::StepCompleted { .. } => "complete",
        Event::StepFailed { outcome: FailOutcome::DeadLetter, .. } => "dead_letter",
        Event::StepFailed { .. } => "failure",
        Event::LeaseExpired { .. } => "lease_expired",
        Event::StepReleased { .. } => "release",
        Event::StepRetryDue { .. } | Event::RunAtReached { .. } => "timer",
        Event::StepRetried { .. }
        | Event::StepResolved { .. }
        | Event::TaskCancelled { .. }
        | Event::TaskGivenUp { .. }
        | Event::QueuePaused { .. }
        | Event::QueueResumed { .. }
        | Event::QueueConcurrencySet { .. } => "operator",
    }
}

/// How a report names each task in its lanes: the last 12 hex digits of its id, unless an
/// earlier task of the report has the same (task ids are chosen by clients, so two may share
/// them, and their lanes were merged into one: a claim of each looked like a double lease,
/// found by a black-box check); that task is named by its whole id.
#[derive(Default)]
struct TaskLabels {
    by_task: HashMap<TaskId, String>,
    taken: HashMap<String, TaskId>,
}

impl TaskLabels {
    fn label(&mut self, task: TaskId) -> &str {
        let Self { by_task, taken } = self;
        by_task.entry(task).or_insert_with(|| {
            let text = task.to_string();
            let short = text[text.len() - 12..].to_owned();
            match taken.get(&short) {
                Some(other) if *other != task => text,
                _ => {
                    taken.insert(short.clone(), task);
                    short
                }
            }
        })
    }
}

/// The (task, step index, epoch) of a lease an event concerns.
fn lease_of(event: &Event) -> Option<(TaskId, u16, u32)> {
    match event {
        Event::StepClaimed { task, step, epoch, .. }
        | Event::LeaseExtended { task, step, epoch, .. }
        | Event::StepCompleted { task, step, epoch, .. }
        | Event::StepFailed { task, step, epoch, .. }
        | Event::StepReleased { task, step, epoch, .. }
        | Event::LeaseExpired { task, step, epoch, .. } => Some((*task, step.0, epoch.0)),
        Event::StepsAdded { task, by_step, epoch, .. } => Some((*task, by_step.0, epoch.0)),
        _ => None,
    }
}

/// Whether `event` ends `lease`, an open lease (of a step of its task): the
/// holder finishing, failing or releasing it, its expiry, or an operator
/// ending the step or the whole task while it is held.
fn ends_lease(event: &Event, lease: &(TaskId, u16, u32)) -> bool {
    match event {
        Event::StepCompleted { .. }
        | Event::StepFailed { .. }
        | Event::StepReleased { .. }
        | Event::LeaseExpired { .. } => lease_of(event) == Some(*lease),
        Event::StepResolved { task, step, .. } => (*task, step.0) == (lease.0, lease.1),
        Event::TaskCancelled { task, .. } | Event::TaskGivenUp { task, .. } => *task == lease.0,
        _ => false,
    }
}

pub fn run(source: &Source, args: &IncidentArgs) -> Result<Outcome> {
    let task = args.task.as_deref().map(parse_task).transpose()?;
    if task.is_none() && args.worker.is_none() && (args.from.is_none() || args.to.is_none()) {
        return Err(crate::source::usage("say what to report on: --task ID, --worker ID, or a window --from T --to T"));
    }
    let (first, last) = source.range(args.from, args.to)?;
    let mut book = TaskBook::default();
    let mut picked: Vec<(eventlog::StoredRecord, Event)> = Vec::new();
    let mut notes = Vec::new();
    // Checked as events are picked, so a window too wide fails before it fills memory.
    let too_many = |picked: &[(eventlog::StoredRecord, Event)]| -> Result<()> {
        match picked.last() {
            Some((record, _)) if picked.len() as u64 > args.max_events => Err(crate::source::usage(format!(
                "the report would hold more than {max} events of seq {first}..{last} (it passed {max} at seq \
                 {seq}): narrow it with --from and --to, or raise --max-events",
                max = args.max_events,
                seq = record.seq
            ))),
            _ => Ok(()),
        }
    };
    match task {
        Some(task) => {
            for record in source.task_records(task, last)?.into_iter().filter(|r| r.seq >= first) {
                let event = decode(&record)?;
                picked.push((record, event));
                too_many(&picked)?;
            }
            if picked.is_empty() && source.task_records(task, u64::MAX)?.is_empty() {
                bail!("task {task} is not in this log");
            }
            // What an operator did to the task's queue while it was there (a pause explains a
            // wait): its queue's events between the task's first and last record of the window.
            if !source.holds_whole_log() {
                notes.push(
                    "the task's queue events (pauses, resumes, concurrency) are not shown: a server's task history \
                     holds only the task's own events (read a backup with --data for them)"
                        .to_owned(),
                );
            }
            if let (true, Some((begin, _)), Some((end, _))) = (source.holds_whole_log(), picked.first(), picked.last())
            {
                let (begin, end) = (begin.seq, end.seq);
                if let Some(namespace) = book.namespace(source, task)?
                    && let Some(queue) = source.stream_records(&domain::StreamId::Queue(namespace), end)?
                {
                    for record in queue.into_iter().filter(|r| r.seq > begin) {
                        let event = decode(&record)?;
                        picked.push((record, event));
                        too_many(&picked)?;
                    }
                    picked.sort_by_key(|(record, _)| record.seq);
                }
            }
        }
        None => {
            let worker = args.worker.as_deref();
            // The worker's leases: every one seen (their events are reported) and those
            // still open (an operator ending their step or task is reported too), starting
            // with the leases it held when the window opens.
            let mut leases: HashSet<(TaskId, u16, u32)> = HashSet::new();
            let mut open: HashSet<(TaskId, u16, u32)> = HashSet::new();
            if let Some(w) = worker
                && first > 1
            {
                let (ledger, _) = source.ledger_at(first - 1, &Progress::new(first - 1, "folding"))?;
                for task in ledger.tasks() {
                    for (index, step) in task.steps.iter().enumerate() {
                        if step.state == domain::StepState::InProgress
                            && step.worker.as_ref().is_some_and(|held_by| held_by.as_str() == w)
                        {
                            open.insert((task.id, index as u16, step.epoch.0));
                        }
                    }
                }
                leases.extend(open.iter().copied());
            }
            let progress = Progress::new(last, "scanning");
            source.scan(first, last, &progress, |record| {
                let event = decode(record)?;
                book.learn(&event);
                let keep = match worker {
                    None => true,
                    Some(w) => {
                        let ended = open.len();
                        open.retain(|lease| !ends_lease(&event, lease));
                        match (&event, lease_of(&event)) {
                            (Event::StepClaimed { worker, .. }, Some(lease)) if worker.as_str() == w => {
                                leases.insert(lease);
                                open.insert(lease);
                                true
                            }
                            (_, Some(lease)) => leases.contains(&lease),
                            _ => open.len() != ended,
                        }
                    }
                };
                if keep {
                    picked.push((record.clone(), event));
                    too_many(&picked)?;
                }
                Ok(ControlFlow::Continue(()))
            })?;
            // A worker id the log never names is a typo, not a worker that did nothing.
            if let Some(w) = worker
                && picked.is_empty()
                && !claimed_by(source, w)?
            {
                bail!("worker {w} never claimed a step in this log");
            }
        }
    }
    let subject = match (&task, &args.worker) {
        (Some(task), _) => format!("task {task}"),
        (None, Some(worker)) => format!("worker {worker}"),
        (None, None) => "time window".to_owned(),
    };
    let mut report = build(source, &mut book, subject, first, last, &picked)?;
    report.notes = notes;
    let text = match args.format {
        Format::Markdown => markdown(&report),
        Format::Html => html(&report),
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&report)?),
    };
    match &args.out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("write the report to {}", path.display()))?;
            eprintln!("wrote {} ({} events)", path.display(), report.events.len());
        }
        None => print!("{text}"),
    }
    Ok(Outcome::Clean)
}

fn build(
    source: &Source,
    book: &mut TaskBook,
    subject: String,
    first: u64,
    last: u64,
    picked: &[(eventlog::StoredRecord, Event)],
) -> Result<Report> {
    let start_us = picked.first().map_or(0, |(r, _)| r.recorded_at_us);
    let end_us = picked.last().map_or(0, |(r, _)| r.recorded_at_us);
    let ms = |us: i64| (us - start_us) as f64 / 1000.0;
    let mut summary = Summary::default();
    let mut lanes: Vec<String> = Vec::new();
    let mut lane_indexes: HashMap<String, usize> = HashMap::new();
    let mut events: Vec<Entry> = Vec::new();
    let mut open_claims: BTreeMap<(TaskId, u16, u32), usize> = BTreeMap::new();
    let mut workers: Vec<String> = Vec::new();
    let mut labels = TaskLabels::default();
    let mut claimed_here: HashSet<(TaskId, u16, u32)> = HashSet::new();
    for (record, event) in picked {
        book.learn(event);
        let step = match (event.task(), event_step(event)) {
            (Some(task), Some(step)) => Some(book.step_name(source, task, step)?),
            _ => None,
        };
        let lane = match (event.task(), &step) {
            (Some(task), Some(step)) => format!("{}/{step}", labels.label(task)),
            (Some(task), None) => format!("{} (task)", labels.label(task)),
            (None, _) => event.stream().to_string(),
        };
        let lane_index = *lane_indexes.entry(lane.clone()).or_insert_with(|| {
            lanes.push(lane.clone());
            lanes.len() - 1
        });
        let cat = category(event);
        match event {
            Event::StepClaimed { worker, .. } => {
                summary.claims += 1;
                if !workers.contains(&worker.to_string()) {
                    workers.push(worker.to_string());
                }
            }
            Event::LeaseExtended { .. } => summary.heartbeats += 1,
            Event::StepCompleted { .. } => summary.completions += 1,
            Event::StepFailed { .. } => summary.failures += 1,
            Event::LeaseExpired { .. } => summary.lease_expiries += 1,
            Event::StepReleased { .. } => summary.releases += 1,
            _ => {}
        }
        if let Event::StepFailed { outcome, .. } | Event::LeaseExpired { outcome, .. } = event {
            match outcome {
                FailOutcome::Retry { delay_ms, .. } => {
                    summary.retries_scheduled += 1;
                    summary.backoff_ms.push(*delay_ms);
                }
                FailOutcome::DeadLetter => summary.dead_letters += 1,
            }
        }
        let detail = summary_text(event, step.as_deref());
        if cat == "operator" {
            summary.operator_actions.push(format!(
                "seq {} {} by {}: {detail}",
                record.seq,
                event.type_name(),
                record.actor
            ));
        }
        let index = events.len();
        if let Some(task) = event.task() {
            let of_task = open_claims.range((task, 0, 0)..=(task, u16::MAX, u32::MAX));
            let ended: Vec<_> = of_task.filter(|(lease, _)| ends_lease(event, lease)).map(|(l, c)| (*l, *c)).collect();
            for (lease, claim) in ended {
                open_claims.remove(&lease);
                events[claim].lease_end_ms = Some(ms(record.recorded_at_us));
            }
        }
        if let (Event::StepClaimed { .. }, Some(lease)) = (event, lease_of(event)) {
            open_claims.insert(lease, index);
            claimed_here.insert(lease);
        }
        // A lease ended here whose claim the report does not show (a window opening inside it).
        let lease_claimed_before = lease_of(event)
            .is_some_and(|lease| !claimed_here.contains(&lease) && ends_lease(event, &lease))
            && !matches!(event, Event::StepsAdded { .. });
        events.push(Entry {
            seq: record.seq,
            time: Timestamp::from_micros(record.recorded_at_us).to_rfc3339(),
            offset_ms: ms(record.recorded_at_us),
            actor: record.actor.clone(),
            command_id: record.command_id.clone(),
            kind: event.type_name(),
            category: cat,
            lane,
            task: event.task().map(|t| t.to_string()),
            step,
            detail,
            lease_end_ms: None,
            lease_open: false,
            lease_claimed_before,
            lane_index,
            lease: lease_of(event),
        });
    }
    // Leases still held at the end of the report run to its end (the timeline's right edge).
    for index in open_claims.values() {
        events[*index].lease_end_ms = Some(ms(end_us));
        events[*index].lease_open = true;
    }
    summary.events = events.len();
    summary.workers = workers;
    Ok(Report {
        subject,
        source: source.origin(),
        first_seq: picked.first().map_or(first, |(r, _)| r.seq),
        last_seq: picked.last().map_or(last, |(r, _)| r.seq),
        start: picked.first().map(|(r, _)| Timestamp::from_micros(r.recorded_at_us).to_rfc3339()),
        end: picked.last().map(|(r, _)| Timestamp::from_micros(r.recorded_at_us).to_rfc3339()),
        duration_ms: ms(end_us),
        summary,
        notes: Vec::new(),
        lanes,
        events,
    })
}

fn summary_text(event: &Event, step: Option<&str>) -> String {
    summary(event, step.unwrap_or(""))
}

/// Most backoffs a summary lists one by one; past it, their range and median (a task retried
/// 38,400 times made a summary line of 230,000 characters: found by a black-box check).
const BACKOFFS_LISTED_MAX: usize = 8;

fn backoff_summary(backoff_ms: &[u64]) -> String {
    if backoff_ms.len() <= BACKOFFS_LISTED_MAX {
        let listed: Vec<String> = backoff_ms.iter().map(|ms| format!("{ms} ms")).collect();
        return listed.join(", ");
    }
    let mut sorted = backoff_ms.to_vec();
    sorted.sort_unstable();
    let first: Vec<String> = backoff_ms[..3].iter().map(|ms| format!("{ms} ms")).collect();
    format!(
        "{}, …; {} ms to {} ms, median {} ms",
        first.join(", "),
        sorted[0],
        sorted[sorted.len() - 1],
        sorted[sorted.len() / 2]
    )
}

fn summary_lines(r: &Report) -> Vec<String> {
    let s = &r.summary;
    let mut lines = vec![
        format!("{} events in {} lanes over {:.3} s", s.events, r.lanes.len(), r.duration_ms / 1000.0),
        format!(
            "{} claims, {} heartbeats, {} completions, {} failures, {} lease expiries, {} releases",
            s.claims, s.heartbeats, s.completions, s.failures, s.lease_expiries, s.releases
        ),
    ];
    if s.retries_scheduled > 0 {
        lines.push(format!("{} retries scheduled (backoff: {})", s.retries_scheduled, backoff_summary(&s.backoff_ms)));
    }
    if s.dead_letters > 0 {
        lines.push(format!("{} dead letters", s.dead_letters));
    }
    if !s.workers.is_empty() {
        lines.push(format!("workers: {}", s.workers.join(", ")));
    }
    lines.extend(r.notes.iter().map(|note| format!("note: {note}")));
    lines
}

fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Incident report: {}\n", r.subject);
    if r.events.is_empty() {
        let _ = writeln!(out, "Log `{}`: no events in this window (seq {}..{}).\n", r.source, r.first_seq, r.last_seq);
    } else {
        let _ = writeln!(
            out,
            "Log `{}`, seq {}..{}, {} .. {}.\n",
            r.source,
            r.first_seq,
            r.last_seq,
            r.start.as_deref().unwrap_or("-"),
            r.end.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(out, "## Summary\n");
    for line in summary_lines(r) {
        let _ = writeln!(out, "- {line}");
    }
    if !r.summary.operator_actions.is_empty() {
        let _ = writeln!(out, "- operator actions:");
        for action in &r.summary.operator_actions {
            let _ = writeln!(out, "  - {}", markdown_text(action));
        }
    }
    let _ = writeln!(out, "\n## Lanes\n");
    let _ = writeln!(out, "| Lane | Events | First | Last | Last event |");
    let _ = writeln!(out, "|---|---:|---|---|---|");
    let grouped = by_lane(r.lanes.len(), r.events.iter().map(|e| (e.lane_index, e)));
    for (lane, mine) in r.lanes.iter().zip(&grouped) {
        let (Some(first), Some(last)) = (mine.first(), mine.last()) else { continue };
        let _ = writeln!(out, "| `{lane}` | {} | {} | {} | {} |", mine.len(), first.time, last.time, last.kind);
    }
    let rows = rows(&r.events);
    let _ = writeln!(out, "\n## Timeline\n");
    if rows.len() < r.events.len() {
        let _ = writeln!(out, "Heartbeats of one lease in a row are one row here (`--format json` lists each).\n");
    }
    let _ = writeln!(out, "| Seq | Time | +ms | Lane | Event | Actor | Detail |");
    let _ = writeln!(out, "|---:|---|---:|---|---|---|---|");
    for row in &rows {
        let e = row.first;
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | `{}` | {} | {} | {} |",
            row.seq(),
            e.time,
            e.offset_ms,
            e.lane,
            row.kind(),
            markdown_text(&e.actor),
            markdown_text(&row.detail())
        );
    }
    out
}

/// Text from the log (a client's error, note or task name) in a Markdown table cell or list
/// item: `&` and `<` as entities, so that no renderer takes it for HTML (a `<script>` in an
/// error went through as it was: found by a black-box check), and `\`, `[`, `]` and `|`
/// escaped, so that it makes no link or image (a remote image in an error is a tracking pixel:
/// found by review) and stays in its cell.
fn markdown_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '\\' | '[' | ']' | '|' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn color(category: &str) -> &'static str {
    match category {
        "created" => "#6b7280",
        "claim" => "#2563eb",
        "heartbeat" => "#60a5fa",
        "complete" => "#16a34a",
        "failure" => "#f59e0b",
        "dead_letter" => "#b91c1c",
        "lease_expired" => "#dc2626",
        "release" => "#a855f7",
        "timer" => "#0891b2",
        _ => "#111827",
    }
}

fn html(r: &Report) -> String {
    const LABEL_W: f64 = 260.0;
    const PLOT_W: f64 = 900.0;
    const ROW_H: f64 = 28.0;
    let span = r.duration_ms.max(1.0);
    let x = |ms: f64| LABEL_W + ms / span * PLOT_W;
    let height = ROW_H * r.lanes.len() as f64 + 40.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" role="img" aria-label="timeline">"#,
        LABEL_W + PLOT_W + 20.0
    );
    for tick in 0..=4 {
        let ms = span * f64::from(tick) / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{0}" y1="0" x2="{0}" y2="{1}" stroke="#e5e7eb"/><text x="{0}" y="{2}" font-size="11" text-anchor="middle" fill="#6b7280">+{3:.1} s</text>"##,
            x(ms),
            height - 24.0,
            height - 8.0,
            ms / 1000.0
        );
    }
    let rows = rows(&r.events);
    let leases = by_lane(r.lanes.len(), r.events.iter().map(|e| (e.lane_index, e)));
    let markers = by_lane(r.lanes.len(), rows.iter().map(|row| (row.first.lane_index, row)));
    for (index, lane) in r.lanes.iter().enumerate() {
        let y = ROW_H * index as f64 + 4.0;
        let mid = y + ROW_H / 2.0 - 4.0;
        let _ = write!(
            svg,
            r##"<text x="4" y="{}" font-size="12" font-family="monospace">{}</text><line x1="{LABEL_W}" y1="{mid}" x2="{}" y2="{mid}" stroke="#d1d5db"/>"##,
            mid + 4.0,
            escape(lane),
            LABEL_W + PLOT_W
        );
        for e in &leases[index] {
            // A lease still held runs to the right edge; one claimed before the report from the
            // left edge to the event that ended it.
            let bar = match (e.lease_end_ms, e.lease_open, e.lease_claimed_before) {
                (Some(_), true, _) => Some((x(e.offset_ms), LABEL_W + PLOT_W, "still held at the end of the report")),
                (Some(end), false, _) => Some((x(e.offset_ms), x(end), "")),
                (None, _, true) => Some((LABEL_W, x(e.offset_ms), "claimed before the report")),
                (None, _, false) => None,
            };
            if let Some((from, to, note)) = bar {
                let note = if note.is_empty() { String::new() } else { format!(" ({note})") };
                let _ = write!(
                    svg,
                    r##"<rect x="{from}" y="{}" width="{}" height="10" rx="3" fill="#bfdbfe"><title>lease {} .. +{:.1} ms{note}</title></rect>"##,
                    mid - 5.0,
                    (to - from).max(2.0),
                    escape(&e.detail),
                    e.lease_end_ms.unwrap_or(e.offset_ms)
                );
            }
        }
        for row in &markers[index] {
            let e = row.first;
            let _ = write!(
                svg,
                r#"<circle cx="{}" cy="{mid}" r="5" fill="{}"><title>seq {} {} +{:.1} ms by {}: {}</title></circle>"#,
                x(e.offset_ms),
                color(e.category),
                row.seq(),
                row.kind(),
                e.offset_ms,
                escape(&e.actor),
                escape(&row.detail())
            );
        }
    }
    svg.push_str("</svg>");
    let legend: String = [
        "created",
        "claim",
        "heartbeat",
        "complete",
        "failure",
        "lease_expired",
        "dead_letter",
        "release",
        "timer",
        "operator",
    ]
    .iter()
    .map(|c| format!(r#"<span class="key"><i style="background:{}"></i>{c}</span>"#, color(c)))
    .collect();
    let summary: String = summary_lines(r).iter().map(|l| format!("<li>{}</li>", escape(l))).collect();
    let actions: String =
        r.summary.operator_actions.iter().map(|a| format!("<li>operator: {}</li>", escape(a))).collect();
    let table: String = rows
        .iter()
        .map(|row| {
            let e = row.first;
            format!(
                r#"<tr><td>{}</td><td>{}</td><td>{:.1}</td><td><code>{}</code></td><td><i class="dot" style="background:{}"></i>{}</td><td>{}</td><td>{}</td></tr>"#,
                row.seq(),
                e.time,
                e.offset_ms,
                escape(&e.lane),
                color(e.category),
                row.kind(),
                escape(&e.actor),
                escape(&row.detail())
            )
        })
        .collect();
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Incident report: {subject}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:24px;color:#111827}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border-bottom:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}}
.key{{margin-right:12px;font-size:12px}}.key i,.dot{{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:4px}}
.timeline{{overflow-x:auto;border:1px solid #e5e7eb;padding:8px;margin:12px 0}}
</style></head>
<body>
<h1>Incident report: {subject}</h1>
<p>Log <code>{source}</code>, seq {first}..{last}, {start} .. {end}.</p>
<ul>{summary}{actions}</ul>
<h2>Timeline</h2>
<p>One row per step (and per task or queue for their own events); bars are leases from claim to their end; hover a marker for its details (heartbeats of one lease in a row share a marker and a table row).</p>
<div>{legend}</div>
<div class="timeline">{svg}</div>
<h2>Events</h2>
<table><tr><th>Seq</th><th>Time</th><th>+ms</th><th>Lane</th><th>Event</th><th>Actor</th><th>Detail</th></tr>
{table}</table>
</body></html>
"#,
        subject = escape(&r.subject),
        source = escape(&r.source),
        first = r.first_seq,
        last = r.last_seq,
        start = r.start.as_deref().unwrap_or("-"),
        end = r.end.as_deref().unwrap_or("-"),
    )
}

/// Whether any step in the log was claimed by worker `worker`.
fn claimed_by(source: &Source, worker: &str) -> Result<bool> {
    let head = source.head()?.seq;
    let mut found = false;
    source.scan(1, head, &Progress::new(head, "looking for the worker"), |record| {
        if let Event::StepClaimed { worker: by, .. } = decode(record)?
            && by.as_str() == worker
        {
            found = true;
            return Ok(ControlFlow::Break(()));
        }
        Ok(ControlFlow::Continue(()))
    })?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use domain::TaskId;

    #[test]
    fn tasks_that_share_their_last_digits_get_lanes_of_their_own() {
        let a = TaskId::parse("01a24810-0000-7000-8000-bbbbbbbbbbbb").unwrap();
        let b = TaskId::parse("01a24811-0000-7000-8000-bbbbbbbbbbbb").unwrap();
        let c = TaskId::parse("01a24812-0000-7000-8000-cccccccccccc").unwrap();
        let mut labels = super::TaskLabels::default();
        assert_eq!(labels.label(a), "bbbbbbbbbbbb");
        assert_eq!(labels.label(b), "01a24811-0000-7000-8000-bbbbbbbbbbbb");
        assert_eq!(labels.label(c), "cccccccccccc");
        assert_eq!(labels.label(a), "bbbbbbbbbbbb", "a task keeps its label");
    }

    #[test]
    fn many_backoffs_are_summed_up_not_listed() {
        assert_eq!(super::backoff_summary(&[855]), "855 ms");
        let many: Vec<u64> = (1..=1000).rev().collect();
        assert_eq!(super::backoff_summary(&many), "1000 ms, 999 ms, 998 ms, …; 1 ms to 1000 ms, median 501 ms");
    }
}
