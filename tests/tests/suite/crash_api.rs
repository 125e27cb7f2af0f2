//! Crash safety over the real API: `taskledger serve` killed with SIGKILL at random moments
//! while producers and workers drive it over HTTP loses nothing it acknowledged.
//!
//! Each server lifetime: start the real binary on the same data dir; check what the log holds
//! (below); wait until every projector stands at the head and take a dump of the server's read
//! models; then run producer and worker threads that record every acknowledged answer (command
//! id, the seqs they were told, what they were told was recorded) and kill the server with
//! SIGKILL after a random delay. Some kill points come before the server even listens (during
//! startup: open, repair, fold, projector start). After every kill, on the dead server's files:
//!
//! - `taskledger-replay verify` exits 0 (on a scratch copy repaired as a restart would, see below);
//! - the projections converged: the dump taken in the lifetime just ended, at seq S, equals the
//!   dump of `taskledger-replay materialize --as-of S` (a build from scratch) on that copy.
//!
//! After every restart, through the event feed (`/v1/events`):
//!
//! - seqs are gapless from 1, and the record at the previously checked head kept its hash;
//! - every acknowledged command's records are at exactly the seqs it was told, no other
//!   record carries its command id, and they hold what it was told (the tasks created, the
//!   steps and epochs claimed, the exact events of completions, failures and heartbeats);
//! - no command that was answered with a 4xx has any record;
//! - every lease a worker held when the server died has ended: it expired (and the step was
//!   claimed again later with a higher epoch) or an outcome that was committed but never
//!   acknowledged ended it. Leases are 300 ms, so this happens within the next lifetimes; a
//!   final phase runs only workers until every such lease is resolved.
//!
//! Creates whose answer was lost in the kill are retried with the same command id in the next
//! lifetime, as a client would: they must come back deduplicated or be recorded anew, and
//! are then held to the same checks.
//!
//! Why the copy: a killed server leaves redb's file needing a repair. The replay tool repairs
//! it in memory and never writes the file, but the harness checks the file the next server
//! start will read: it repairs a scratch copy by opening it read-write (what that start does)
//! and runs the tool on that.
//!
//! The seed is printed; rerun with `TASKLEDGER_CRASH_API_SEED=<seed>` (timing still varies).
//! `TASKLEDGER_CRASH_API_KILLS` sets the number of kill points (default 100). The projection
//! comparison runs on about 100 kill points per run, evenly spread, and after the last.

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Server, read_models, workspace_binary};

const KILLS_ENV: &str = "TASKLEDGER_CRASH_API_KILLS";
const SEED_ENV: &str = "TASKLEDGER_CRASH_API_SEED";
const KILLS_DEFAULT: u64 = 100;
/// Projection comparisons per run (spread evenly over the kill points), besides the last.
const PROJECTION_CHECKS: u64 = 100;
const PRODUCERS: u64 = 2;
const WORKERS: u64 = 2;
const NAMESPACES: [&str; 2] = ["alpha", "beta"];
const LEASE_MS: u64 = 300;
/// Longest the load runs in one lifetime before the kill.
const RUN_MS_MAX: u64 = 200;
/// How often (percent) the kill comes before the server has even said it listens.
const EARLY_KILL_PERCENT: u64 = 10;
const EARLY_KILL_MS_MAX: u64 = 50;
/// Every this many kills the feed is read again from seq 1 and every check redone.
const FULL_CHECK_EVERY_KILLS: u64 = 25;
/// Snapshots every few hundred events, so restarts fold from one and kills land in a write.
const SERVER_ARGS: [&str; 2] = ["--snapshot-every", "200"];

// Deterministic delays and command mixes from the printed seed.
use domain::testkit::SplitMix as Rng;

// ---------------------------------------------------------------------------------------------
// HTTP: a client that reports a dead server as an error instead of panicking
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(server: &Server) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Client { base: server.base.clone(), token: server.token.clone(), agent }
    }

    fn post(&self, path: &str, body: &Value, command_id: &str) -> Result<(u16, Value), String> {
        let response = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("X-Command-Id", command_id)
            .send_json(body);
        Self::json(response)
    }

    fn get(&self, path: &str) -> Result<(u16, Value), String> {
        let response =
            self.agent.get(format!("{}{path}", self.base)).header("Authorization", &format!("Bearer {}", self.token));
        Self::json(response.call())
    }

    fn get_text(&self, path: &str) -> Result<String, String> {
        let mut response = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &format!("Bearer {}", self.token))
            .call()
            .map_err(|e| e.to_string())?;
        assert_eq!(response.status().as_u16(), 200, "GET {path}");
        response.body_mut().read_to_string().map_err(|e| e.to_string())
    }

    fn json(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<(u16, Value), String> {
        let mut response = result.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().map_err(|e| e.to_string())?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }
}

// ---------------------------------------------------------------------------------------------
// What the clients were told
// ---------------------------------------------------------------------------------------------

/// What an acknowledged command was told it recorded.
#[derive(Clone, Debug)]
enum Told {
    /// `task_created` records for these task ids, in order.
    Created(Vec<String>),
    /// `step_claimed` records for these (task id, epoch), in order.
    Claimed(Vec<(String, u64)>),
    /// Exactly these events (`{"type", "data"}`), in order.
    Events(Vec<Value>),
}

#[derive(Clone, Debug)]
struct Ack {
    id: String,
    first: u64,
    last: u64,
    told: Told,
    lifetime: u64,
}

/// A create whose answer was lost in the kill: retried with the same id next lifetime.
#[derive(Clone, Debug)]
struct Unanswered {
    id: String,
    path: &'static str,
    body: Value,
}

/// A lease a worker held when the server died.
#[derive(Clone, Debug)]
struct Orphan {
    task: String,
    epoch: u64,
    /// The seq of its `step_claimed` record (which names the step's index).
    claimed_at: u64,
    lifetime: u64,
}

#[derive(Default)]
struct ThreadLog {
    acks: Vec<Ack>,
    rejected: Vec<String>,
    unanswered: Vec<Unanswered>,
    orphans: Vec<Orphan>,
    unexpected: Vec<String>,
}

/// An answer: acknowledged (2xx), refused by the ledger (4xx), or lost with the server.
enum Reply {
    Ok(Value),
    Refused,
    Lost,
}

fn send(client: &Client, log: &mut ThreadLog, path: &str, body: &Value, id: &str) -> Reply {
    match client.post(path, body, id) {
        Ok((status, answer)) if (200..300).contains(&status) => Reply::Ok(answer),
        Ok((status, _)) if (400..500).contains(&status) => {
            log.rejected.push(id.to_owned());
            Reply::Refused
        }
        Ok((status, answer)) => {
            log.unexpected.push(format!("{path} ({id}) answered {status}: {answer}"));
            Reply::Refused
        }
        Err(_) => Reply::Lost,
    }
}

fn seq_of(answer: &Value, field: &str) -> Option<u64> {
    answer[field].as_u64()
}

fn step_spec(name: &str, depends_on: &[&str]) -> Value {
    json!({
        "name": name, "handler": "work", "depends_on": depends_on, "max_attempts": 100, "lease_ms": LEASE_MS,
        "retry": { "base_ms": 20, "multiplier": 1.0, "cap_ms": 20, "jitter_pct": 0 }
    })
}

fn task_body(rng: &mut Rng, n: u64) -> Value {
    let namespace = NAMESPACES[rng.below(NAMESPACES.len() as u64) as usize];
    if rng.percent(20) {
        json!({ "namespace": namespace, "payload": { "n": n }, "steps": [step_spec("a", &[]), step_spec("b", &["a"])] })
    } else {
        json!({
            "namespace": namespace, "handler": "work", "payload": { "n": n }, "max_attempts": 100, "lease_ms": LEASE_MS,
            "retry": { "base_ms": 20, "multiplier": 1.0, "cap_ms": 20, "jitter_pct": 0 }
        })
    }
}

/// Records the acknowledgement of a create (single or batch) or reports it lost.
fn record_create(log: &mut ThreadLog, lifetime: u64, unanswered: Unanswered, reply: Reply) {
    match reply {
        Reply::Ok(answer) => {
            let ids: Vec<String> = match answer["task_ids"].as_array() {
                Some(ids) => ids.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                None => answer["task_id"].as_str().map(str::to_owned).into_iter().collect(),
            };
            let first = seq_of(&answer, "seq").expect("a create records events");
            let last = seq_of(&answer, "last_seq").unwrap_or(first);
            log.acks.push(Ack { id: unanswered.id, first, last, told: Told::Created(ids), lifetime });
        }
        Reply::Refused => {}
        Reply::Lost => log.unanswered.push(unanswered),
    }
}

/// A producer: single creates, small batches and two-step workflows, until the server dies.
fn producer(client: Client, lifetime: u64, thread: u64, mut rng: Rng, stop: &AtomicBool) -> ThreadLog {
    let mut log = ThreadLog::default();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("l{lifetime}-p{thread}-{n}");
        let (path, body) = if rng.percent(25) {
            let count = 2 + rng.below(3);
            (
                "/v1/tasks/batch",
                json!({ "tasks": (0..count).map(|i| task_body(&mut rng, n * 10 + i)).collect::<Vec<_>>() }),
            )
        } else {
            ("/v1/tasks", task_body(&mut rng, n))
        };
        let reply = send(&client, &mut log, path, &body, &id);
        let lost = matches!(reply, Reply::Lost);
        record_create(&mut log, lifetime, Unanswered { id, path, body }, reply);
        if lost {
            break;
        }
        // Producers pace themselves so workers keep up and the log stays small.
        std::thread::sleep(Duration::from_millis(10 + rng.below(20)));
    }
    log
}

/// A lease the worker holds: (task id, step name, epoch, seq of its claim record).
type Lease = (String, String, u64, u64);

/// A worker: claims (long-polling briefly), then completes most steps, fails some, heartbeats
/// some, and simply holds a few (they expire). Whatever it holds when the server dies is an
/// orphan: the worker "died" too and never comes back for it.
fn worker(client: Client, lifetime: u64, thread: u64, mut rng: Rng, stop: &AtomicBool) -> ThreadLog {
    let mut log = ThreadLog::default();
    let mut held: Vec<Lease> = Vec::new();
    let mut n = 0;
    'run: while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("l{lifetime}-w{thread}-{n}");
        let body = json!({
            "namespaces": NAMESPACES, "worker_id": format!("w{thread}"), "max": 3, "lease_ms": LEASE_MS, "wait_ms": 50
        });
        let answer = match send(&client, &mut log, "/v1/claims", &body, &id) {
            Reply::Ok(answer) => answer,
            Reply::Refused => continue,
            Reply::Lost => break,
        };
        let steps = answer["steps"].as_array().cloned().unwrap_or_default();
        if let Some(first) = seq_of(&answer, "seq") {
            let claimed: Vec<(String, u64)> = steps
                .iter()
                .map(|s| (s["task_id"].as_str().unwrap_or("").to_owned(), s["epoch"].as_u64().unwrap_or(0)))
                .collect();
            let last = first + claimed.len() as u64 - 1;
            log.acks.push(Ack { id: id.clone(), first, last, told: Told::Claimed(claimed), lifetime });
            for (i, step) in steps.iter().enumerate() {
                held.push((
                    step["task_id"].as_str().unwrap_or("").to_owned(),
                    step["step"].as_str().unwrap_or("").to_owned(),
                    step["epoch"].as_u64().unwrap_or(0),
                    first + i as u64,
                ));
            }
        }
        // Settle what was held, except the few that are kept to expire.
        let mut keep = Vec::new();
        for lease in std::mem::take(&mut held) {
            if stop.load(Ordering::Relaxed) {
                keep.push(lease);
                continue;
            }
            let roll = rng.below(100);
            if roll < 8 {
                keep.push(lease);
                continue;
            }
            let (task, step, epoch, _) = &lease;
            n += 1;
            let id = format!("l{lifetime}-w{thread}-{n}");
            let (action, body) = match roll {
                8..=17 => ("fail", json!({ "epoch": epoch, "error": "crash test", "retryable": true })),
                18..=27 => ("heartbeat", json!({ "epoch": epoch, "lease_ms": LEASE_MS })),
                _ => ("complete", json!({ "epoch": epoch, "result": { "by": format!("w{thread}") } })),
            };
            let path = format!("/v1/tasks/{task}/steps/{step}/{action}");
            match send(&client, &mut log, &path, &body, &id) {
                Reply::Ok(answer) => {
                    if let (Some(first), Some(last)) = (seq_of(&answer, "seq"), seq_of(&answer, "last_seq")) {
                        let events = answer["events"].as_array().cloned().unwrap_or_default();
                        log.acks.push(Ack { id, first, last, told: Told::Events(events), lifetime });
                    }
                    if action == "heartbeat" {
                        keep.push(lease);
                    }
                }
                // A lease lost to expiry (a held one, or a slow heartbeat): nothing to hold.
                Reply::Refused => {}
                Reply::Lost => {
                    keep.push(lease);
                    held = keep;
                    break 'run;
                }
            }
        }
        held = keep;
    }
    log.orphans =
        held.into_iter().map(|(task, _, epoch, claimed_at)| Orphan { task, epoch, claimed_at, lifetime }).collect();
    log
}

// ---------------------------------------------------------------------------------------------
// What the log holds
// ---------------------------------------------------------------------------------------------

struct Record {
    command_id: String,
    kind: String,
    data: Value,
    hash: String,
}

/// The log as read through the feed: records by seq, and where each command id is.
#[derive(Default)]
struct LogIndex {
    records: Vec<Record>,
    /// Command id → (first seq, last seq, number of records).
    spans: HashMap<String, (u64, u64, u64)>,
}

impl LogIndex {
    fn head(&self) -> u64 {
        self.records.len() as u64
    }

    fn record(&self, seq: u64) -> &Record {
        &self.records[(seq - 1) as usize]
    }

    /// Reads the feed from the last known record on, checking that the known head kept its hash
    /// (the chain, checked by `verify`, then vouches for everything before it) and that seqs
    /// are gapless.
    fn extend(&mut self, client: &Client, context: &str) {
        let known = self.head();
        let from = known.max(1);
        let mut next = from;
        // In pages: a long run's log outgrows what one response body may hold.
        loop {
            let text = client
                .get_text(&format!("/v1/events?from_seq={next}&follow=false&limit={FEED_PAGE}"))
                .unwrap_or_else(|e| panic!("{context}: read the feed: {e}"));
            let page_start = next;
            self.extend_page(&text, known, &mut next, context);
            if next - page_start < FEED_PAGE {
                break;
            }
        }
        assert!(next > known, "{context}: the feed no longer has record {known}");
    }

    fn extend_page(&mut self, text: &str, known: u64, next: &mut u64, context: &str) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{context}: feed line: {e}"));
            let seq = value["seq"].as_u64().expect("seq");
            assert_eq!(seq, *next, "{context}: the feed jumped from seq {next} to {seq}: seqs are not gapless");
            *next += 1;
            let record = Record {
                command_id: value["command_id"].as_str().expect("command_id").to_owned(),
                kind: value["type"].as_str().expect("type").to_owned(),
                data: value["data"].clone(),
                hash: value["hash"].as_str().expect("hash").to_owned(),
            };
            if seq == known {
                assert_eq!(record.hash, self.record(known).hash, "{context}: record {known} changed since it was read");
                continue;
            }
            let span = self.spans.entry(record.command_id.clone()).or_insert((seq, seq, 0));
            span.1 = seq;
            span.2 += 1;
            self.records.push(record);
        }
    }
}

/// Records per feed request when the checker catches up with the log.
const FEED_PAGE: u64 = 10_000;

/// Checks one acknowledgement against the log.
fn check_ack(index: &LogIndex, ack: &Ack, context: &str) {
    let count = ack.last + 1 - ack.first;
    assert_eq!(
        index.spans.get(&ack.id).copied(),
        Some((ack.first, ack.last, count)),
        "{context}: command {} (acknowledged in lifetime {}) is not exactly at seqs {}..={} it was told",
        ack.id,
        ack.lifetime,
        ack.first,
        ack.last
    );
    let records: Vec<&Record> = (ack.first..=ack.last).map(|seq| index.record(seq)).collect();
    let what = |i: usize| format!("{context}: command {} at seq {}", ack.id, ack.first + i as u64);
    match &ack.told {
        Told::Created(ids) => {
            assert_eq!(ids.len() as u64, count, "{}: told {} tasks", what(0), ids.len());
            for (i, (record, id)) in records.iter().zip(ids).enumerate() {
                assert_eq!(record.kind, "task_created", "{}", what(i));
                assert_eq!(record.data["spec"]["id"].as_str(), Some(id.as_str()), "{}", what(i));
            }
        }
        Told::Claimed(steps) => {
            assert_eq!(steps.len() as u64, count, "{}: told {} steps", what(0), steps.len());
            for (i, (record, (task, epoch))) in records.iter().zip(steps).enumerate() {
                assert_eq!(record.kind, "step_claimed", "{}", what(i));
                assert_eq!(record.data["task"].as_str(), Some(task.as_str()), "{}", what(i));
                assert_eq!(record.data["epoch"].as_u64(), Some(*epoch), "{}", what(i));
            }
        }
        Told::Events(events) => {
            assert_eq!(events.len() as u64, count, "{}: told {} events", what(0), events.len());
            for (i, (record, event)) in records.iter().zip(events).enumerate() {
                assert_eq!(record.kind, event["type"].as_str().unwrap_or(""), "{}", what(i));
                assert_eq!(record.data, event["data"], "{}", what(i));
            }
        }
    }
}

/// How a lease held at a crash ended, if it has.
#[derive(Debug, PartialEq, Eq)]
enum LeaseEnd {
    /// Still running, or expired but not yet claimed again.
    Open,
    /// It expired, and the step was claimed again with a higher epoch.
    ExpiredAndReclaimed,
    /// A completion, failure or release that was committed but never acknowledged ended it.
    EndedByUnacknowledgedOutcome,
}

fn lease_end(index: &LogIndex, orphan: &Orphan) -> LeaseEnd {
    let claim = index.record(orphan.claimed_at);
    let step = claim.data["step"].as_u64();
    let same_step =
        |r: &Record| r.data["task"].as_str() == Some(orphan.task.as_str()) && r.data["step"].as_u64() == step;
    let mut expired = false;
    for record in &index.records[orphan.claimed_at as usize..] {
        if !same_step(record) {
            continue;
        }
        let epoch = record.data["epoch"].as_u64();
        match record.kind.as_str() {
            "lease_expired" if epoch == Some(orphan.epoch) => expired = true,
            "step_completed" | "step_failed" | "step_released" if epoch == Some(orphan.epoch) => {
                return LeaseEnd::EndedByUnacknowledgedOutcome;
            }
            "step_claimed" if expired && epoch > Some(orphan.epoch) => return LeaseEnd::ExpiredAndReclaimed,
            _ => {}
        }
    }
    LeaseEnd::Open
}

// ---------------------------------------------------------------------------------------------
// Projections
// ---------------------------------------------------------------------------------------------

/// The server's read models once its projectors stand at the head (at `at_least` or later).
fn converged_dump(
    client: &Client,
    data: &Path,
    runtime: &tokio::runtime::Runtime,
    at_least: u64,
    context: &str,
) -> (u64, projections::digest::Dump) {
    let status = || {
        let (status, body) = client.get("/v1/views/projections").ok()?;
        assert_eq!(status, 200, "{context}: projector status: {body}");
        Some(body)
    };
    let target = data.join("projections.sqlite");
    read_models::converged_dump(status, runtime, target.to_str().expect("utf-8 path"), at_least, context)
}

// ---------------------------------------------------------------------------------------------
// The dead server's files
// ---------------------------------------------------------------------------------------------

fn replay_tool(args: &[&str], context: &str) -> (i32, String) {
    let output = Process::new(workspace_binary("taskledger-replay"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{context}: run taskledger-replay: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

/// Copies the log, its write-ahead journals and the snapshots of the dead server into `scratch`
/// and opens it read-write once, which makes redb repair it and replays the journal, as the
/// next server start would.
fn repaired_copy(data: &Path, scratch: &Path, context: &str) {
    std::fs::create_dir_all(scratch.join("snapshots")).expect("scratch dir");
    std::fs::copy(data.join("ledger.redb"), scratch.join("ledger.redb"))
        .unwrap_or_else(|e| panic!("{context}: copy the log: {e}"));
    for name in [eventlog::journal::JOURNAL_FILE_NAME, eventlog::journal::SECOND_JOURNAL_FILE_NAME] {
        let journal = data.join(name);
        if journal.exists() {
            std::fs::copy(&journal, scratch.join(name)).unwrap_or_else(|e| panic!("{context}: copy {name}: {e}"));
        }
    }
    if let Ok(entries) = std::fs::read_dir(data.join("snapshots")) {
        for entry in entries.flatten() {
            let _ = std::fs::copy(entry.path(), scratch.join("snapshots").join(entry.file_name()));
        }
    }
    let store = eventlog::RedbStore::open(scratch, eventlog::RedbOptions::default())
        .unwrap_or_else(|e| panic!("{context}: the killed server's log does not open: {e}"));
    drop(store);
}

/// `verify` exits 0 on the log; with `converged`, a from-scratch `materialize --as-of` equals
/// the server's read models at that seq.
fn check_files(
    log_dir: &Path,
    converged: Option<&(u64, projections::digest::Dump)>,
    runtime: &tokio::runtime::Runtime,
    context: &str,
) -> bool {
    let dir = log_dir.to_str().expect("utf-8 path");
    let (code, output) = replay_tool(&["verify", "--data", dir], context);
    assert_eq!(code, 0, "{context}: taskledger-replay verify is not clean:\n{output}");
    let Some((seq, server_dump)) = converged else { return false };
    let out = log_dir.join(format!("asof-{seq}.sqlite"));
    let out_str = out.to_str().expect("utf-8 path");
    let (code, output) =
        replay_tool(&["materialize", "--data", dir, "--as-of", &seq.to_string(), "--out", out_str], context);
    assert_eq!(code, 0, "{context}: taskledger-replay materialize --as-of {seq}:\n{output}");
    let rebuilt = read_models::dump(runtime, out_str);
    assert!(
        &rebuilt == server_dump,
        "{context}: the server's projections at seq {seq} differ from a rebuild from scratch: {}",
        read_models::first_difference(server_dump, &rebuilt, ("server", "rebuild"))
    );
    true
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Totals {
    kill_points: u64,
    early_kills: u64,
    acks: u64,
    ack_checks: u64,
    rejected: u64,
    retried_unanswered: u64,
    retried_deduplicated: u64,
    orphans: u64,
    orphans_reclaimed: u64,
    orphans_ended_by_outcome: u64,
    projection_checks: u64,
    restarts: u64,
}

struct State {
    index: LogIndex,
    acks: Vec<Ack>,
    /// Acks not yet compared with the log.
    unchecked: usize,
    rejected: HashSet<String>,
    unanswered: Vec<Unanswered>,
    orphans: Vec<Orphan>,
    totals: Totals,
}

/// Restart checks: the feed, every acknowledgement, every refusal, every orphaned lease.
fn check_log(state: &mut State, client: &Client, full: bool, context: &str) {
    if full {
        state.index = LogIndex::default();
        state.unchecked = 0;
    }
    state.index.extend(client, context);
    for ack in &state.acks[state.unchecked..] {
        check_ack(&state.index, ack, context);
        state.totals.ack_checks += 1;
    }
    state.unchecked = state.acks.len();
    for id in &state.rejected {
        assert!(!state.index.spans.contains_key(id), "{context}: command {id} was refused, yet it is in the log");
    }
    let index = &state.index;
    let totals = &mut state.totals;
    state.orphans.retain(|orphan| match lease_end(index, orphan) {
        LeaseEnd::Open => true,
        LeaseEnd::ExpiredAndReclaimed => {
            totals.orphans_reclaimed += 1;
            false
        }
        LeaseEnd::EndedByUnacknowledgedOutcome => {
            totals.orphans_ended_by_outcome += 1;
            false
        }
    });
}

/// Retries the creates whose answers were lost, with their command ids.
fn retry_unanswered(state: &mut State, client: &Client, lifetime: u64, context: &str) {
    let mut log = ThreadLog::default();
    for unanswered in std::mem::take(&mut state.unanswered) {
        let reply = send(client, &mut log, unanswered.path, &unanswered.body, &unanswered.id);
        if let Reply::Ok(answer) = &reply
            && answer["duplicate"] == json!(true)
        {
            state.totals.retried_deduplicated += 1;
        }
        assert!(!matches!(reply, Reply::Lost), "{context}: the server died during a retry");
        state.totals.retried_unanswered += 1;
        record_create(&mut log, lifetime, unanswered, reply);
    }
    absorb(state, log, context);
}

fn absorb(state: &mut State, log: ThreadLog, context: &str) {
    assert!(log.unexpected.is_empty(), "{context}: unexpected answers: {:#?}", log.unexpected);
    state.totals.acks += log.acks.len() as u64;
    state.totals.rejected += log.rejected.len() as u64;
    state.totals.orphans += log.orphans.len() as u64;
    state.acks.extend(log.acks);
    state.rejected.extend(log.rejected);
    state.unanswered.extend(log.unanswered);
    state.orphans.extend(log.orphans);
}

/// Runs the load threads against `client` until `stop`; returns their logs.
fn run_load(
    client: &Client,
    lifetime: u64,
    seed: u64,
    producers: u64,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<ThreadLog>> {
    let mut threads = Vec::new();
    for thread in 0..producers + WORKERS {
        let (client, stop) = (client.clone(), stop.clone());
        let rng =
            Rng(seed ^ lifetime.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ (thread + 1).wrapping_mul(0xa076_1d64_78bd_642f));
        threads.push(std::thread::spawn(move || {
            if thread < producers {
                producer(client, lifetime, thread, rng, &stop)
            } else {
                worker(client, lifetime, thread, rng, &stop)
            }
        }));
    }
    threads
}

/// Starts the server and kills it before it has finished starting.
fn early_kill(data: &Path, delay_ms: u64, context: &str) {
    let mut child = Process::new(workspace_binary("taskledger"))
        .arg("serve")
        .arg("--data")
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(SERVER_ARGS)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{context}: start taskledger: {e}"));
    std::thread::sleep(Duration::from_millis(delay_ms));
    // `Child::kill` is SIGKILL on Unix; a server that already failed to start would show here.
    let _ = child.kill();
    let status = child.wait().expect("wait for the server");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{context}: the server exited on its own: {status}");
}

#[test]
fn acknowledged_commands_survive_sigkill_of_the_server() {
    let kills = std::env::var(KILLS_ENV).ok().map_or(KILLS_DEFAULT, |v| v.parse().expect("a number of kills"));
    let seed = std::env::var(SEED_ENV).ok().map_or_else(
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64),
        |v| v.parse().expect("a numeric seed"),
    );
    eprintln!("crash_api: {kills} kill points, seed {seed} (rerun with {SEED_ENV}={seed})");
    let started = Instant::now();
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    let runtime = read_models::runtime();
    let mut rng = Rng(seed);
    let projection_every = (kills / PROJECTION_CHECKS).max(1);
    let mut state = State {
        index: LogIndex::default(),
        acks: Vec::new(),
        unchecked: 0,
        rejected: HashSet::new(),
        unanswered: Vec::new(),
        orphans: Vec::new(),
        totals: Totals::default(),
    };
    // The server's read models at a seq where every projector stood at the head, from the
    // lifetime that just ended; compared with a rebuild once the server is dead.
    let mut converged: Option<(u64, projections::digest::Dump)> = None;

    for kill in 0..kills {
        let context = format!("seed {seed}, kill point {kill}");
        if kill > 0 && rng.percent(EARLY_KILL_PERCENT) {
            early_kill(&data, rng.below(EARLY_KILL_MS_MAX), &context);
            state.totals.early_kills += 1;
        } else {
            let server = Server::start_in(&data, &SERVER_ARGS);
            state.totals.restarts += 1;
            let client = Client::new(&server);
            retry_unanswered(&mut state, &client, kill, &context);
            check_log(&mut state, &client, kill % FULL_CHECK_EVERY_KILLS == 0, &context);
            let head = state.index.head();
            converged = Some(converged_dump(&client, &data, &runtime, head, &context));

            let stop = Arc::new(AtomicBool::new(false));
            let threads = run_load(&client, kill, seed, PRODUCERS, &stop);
            std::thread::sleep(Duration::from_millis(rng.below(RUN_MS_MAX)));
            let status = server.kill();
            stop.store(true, Ordering::Relaxed);
            assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL), "{context}: not killed: {status:?}");
            for thread in threads {
                absorb(&mut state, thread.join().expect("a load thread panicked"), &context);
            }
        }
        state.totals.kill_points += 1;

        let scratch = tempfile::tempdir().expect("scratch dir");
        repaired_copy(&data, scratch.path(), &context);
        let compare = kill % projection_every == 0 || kill + 1 == kills;
        if check_files(scratch.path(), if compare { converged.as_ref() } else { None }, &runtime, &context) {
            state.totals.projection_checks += 1;
            converged = None;
        }
        if (kill + 1) % FULL_CHECK_EVERY_KILLS == 0 {
            eprintln!(
                "crash_api: {} kill points in {:.1?}; log head {}, {} acknowledgements, {} open orphaned leases",
                kill + 1,
                started.elapsed(),
                state.index.head(),
                state.acks.len(),
                state.orphans.len()
            );
        }
    }

    // Final phase: only workers, until every lease held at a crash has ended.
    let context = format!("seed {seed}, final phase");
    let server = Server::start_in(&data, &SERVER_ARGS);
    let client = Client::new(&server);
    retry_unanswered(&mut state, &client, kills, &context);
    for round in 0.. {
        check_log(&mut state, &client, round == 0, &context);
        if state.orphans.is_empty() && state.unanswered.is_empty() {
            break;
        }
        assert!(round < 100, "{context}: leases held at a crash never ended: {:#?}", state.orphans);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = run_load(&client, kills + 1 + round, seed, 0, &stop);
        std::thread::sleep(Duration::from_millis(LEASE_MS));
        stop.store(true, Ordering::Relaxed);
        for thread in threads {
            absorb(&mut state, thread.join().expect("a worker panicked"), &context);
        }
        // Leases the final workers still hold are theirs, not a crash's: they stopped cleanly.
        state.orphans.retain(|o| o.lifetime < kills + 1);
    }
    let converged = converged_dump(&client, &data, &runtime, state.index.head(), &context);
    assert_eq!(server.stop(), Some(0), "{context}: SIGTERM drains and exits 0");
    // A cleanly stopped server's dir is read as is, without a repair.
    assert!(check_files(&data, Some(&converged), &runtime, &context));
    state.totals.projection_checks += 1;

    let t = &state.totals;
    println!(
        "crash_api: {} kill points ({} during startup) in {:.1?}, seed {seed}; {} server starts; log head {}; \
         {} acknowledged commands ({} checks against the log), {} refused (none in the log), {} lost answers retried \
         ({} deduplicated); {} leases held at a kill, {} expired and claimed again, {} ended by a committed but \
         unacknowledged outcome; {} projection comparisons with a rebuild from scratch",
        t.kill_points,
        t.early_kills,
        started.elapsed(),
        t.restarts + 1,
        state.index.head(),
        t.acks,
        t.ack_checks,
        t.rejected,
        t.retried_unanswered,
        t.retried_deduplicated,
        t.orphans,
        t.orphans_reclaimed,
        t.orphans_ended_by_outcome,
        t.projection_checks
    );
    assert!(t.acks > 0, "seed {seed}: nothing was acknowledged");
    assert!(t.orphans_reclaimed > 0, "seed {seed}: no lease held at a crash was seen to expire and be reclaimed");
}

/// The retry pattern the harness relies on, in isolation: a create (single or batch) repeated
/// with its command id answers with the task ids it recorded, not ids minted for the repeat.
#[test]
fn a_repeated_create_names_the_tasks_it_recorded() {
    let server = Server::start();
    let client = Client::new(&server);
    let single = json!({ "namespace": "retry", "handler": "work" });
    let (status, first) = client.post("/v1/tasks", &single, "create-once").expect("create");
    assert_eq!(status, 201, "{first}");
    let (status, again) = client.post("/v1/tasks", &single, "create-once").expect("repeat");
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], json!(true));
    assert_eq!((&again["task_id"], &again["seq"]), (&first["task_id"], &first["seq"]));

    let batch = json!({ "tasks": [single.clone(), single] });
    let (_, first) = client.post("/v1/tasks/batch", &batch, "batch-once").expect("batch");
    let (_, again) = client.post("/v1/tasks/batch", &batch, "batch-once").expect("repeat");
    assert_eq!(again["duplicate"], json!(true));
    assert_eq!((&again["task_ids"], &again["seq"]), (&first["task_ids"], &first["seq"]));
    assert_eq!(server.head_seq(), 3, "the repeats recorded nothing");
}

/// A server killed while its journal held records it acknowledged, restarted with
/// `--journal-mib 0`, still has them: that start read ledger.redb alone, answered a repeated id
/// as a new command at a seq already acknowledged, and the next default start refused the dir
/// (found by a black-box check).
#[test]
fn a_crashed_dir_started_without_a_journal_keeps_the_journals_records() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let server = Server::start_in(&data, &[]);
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let id = format!("nojournal-{i}");
        let answer =
            server.post_as(&server.token.clone(), "/v1/tasks", json!({ "namespace": "nj", "handler": "h" }), Some(&id));
        assert_eq!(answer.status, 201, "{answer:?}");
        acknowledged.push((id, answer.body["task_id"].clone()));
    }
    server.kill();
    let server = Server::start_in(&data, &["--journal-mib", "0"]);
    assert_eq!(server.head_seq(), 10, "every acknowledged record is there");
    for (id, task) in &acknowledged {
        let again =
            server.post_as(&server.token.clone(), "/v1/tasks", json!({ "namespace": "nj", "handler": "h" }), Some(id));
        assert_eq!((again.status, &again.body["task_id"]), (200, task), "{id}: {again:?}");
    }
    drop(server);
    let server = Server::start_in(&data, &[]);
    assert_eq!(server.head_seq(), 10, "the default start takes the dir back");
}

/// A SIGTERM while the server is still starting (its tokens written, the ledger being opened)
/// stops it cleanly once it is up: the signal's default action killed it outright (found by a
/// black-box check).
#[test]
fn a_sigterm_during_startup_stops_the_server_cleanly() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let mut child = Process::new(workspace_binary("taskledger"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("admin.token").exists() {
        assert!(Instant::now() < deadline, "the server never wrote its admin token");
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = child.id().to_string();
    assert!(Process::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert_eq!((status.code(), status.signal()), (Some(0), None), "{status:?}");

    // Two at once: the second ends it at once (130) unless it was already gone (0); never the
    // signal's default action, and the log opens clean either way.
    let mut child = Process::new(workspace_binary("taskledger"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(temp.path().join("twice"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while !temp.path().join("twice").join("admin.token").exists() {
        assert!(Instant::now() < deadline, "the second server never wrote its admin token");
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = child.id().to_string();
    let _ = Process::new("kill").args(["-TERM", &pid, &pid]).status();
    let status = child.wait().unwrap();
    assert!(matches!((status.code(), status.signal()), (Some(0 | 130), None)), "{status:?}");
    let server = Server::start_in(&temp.path().join("twice"), &[]);
    assert_eq!(server.head_seq(), 0);
}
