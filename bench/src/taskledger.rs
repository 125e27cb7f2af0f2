//! The workloads against the real `taskledger serve`, over HTTP/1 keep-alive
//! connections exactly as a client library would drive it.
//!
//! Producers send their own UUIDv7 task ids (clock prefix, then a run tag
//! and a counter, so ids sort in creation order like clock-minted ones); the
//! counter in the last 48 bits is the key the pickup tracker shares between
//! a producer and whichever worker claims the task. Workers claim up to K
//! steps, then finish every claimed step at once, as a worker process running
//! K handlers in parallel would: the completions in one `POST /v1/completions`
//! (or, with `--completions each`, one request per step, each on its own
//! connection) and each failure in a request of its own.
//! After a full batch the next claim does not wait (there is probably more);
//! after a partial or empty one it long-polls with `wait_ms`. Only the
//! non-waiting claims go into the claim latency histogram: a long-poll's time
//! is mostly waiting for work, which is what pickup latency measures.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use hyper::StatusCode;
use serde::Deserialize;

use crate::http::{Conn, Target};
use crate::stats::{OpenLoop, Phase, Pickups, Tally};

/// Hands out task numbers and formats them as UUIDv7 ids.
pub struct Ids {
    next: AtomicU64,
    /// 12 bits that differ between runs, in the version-7 "rand_a" field.
    tag: u16,
}

impl Ids {
    pub fn new() -> Ids {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        Ids { next: AtomicU64::new(1), tag: (nanos as u16) & 0x0fff }
    }

    /// The next task number.
    pub fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Writes task `n`'s id into `out`.
    pub fn write(&self, out: &mut String, n: u64) {
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis()
            as u64
            & 0xffff_ffff_ffff;
        let _ =
            write!(out, "{:08x}-{:04x}-7{:03x}-8000-{:012x}", ms >> 16, ms & 0xffff, self.tag, n & 0xffff_ffff_ffff);
    }
}

/// The task number inside an id written by [`Ids::write`].
pub fn task_number(id: &str) -> Option<u64> {
    u64::from_str_radix(id.get(id.len().checked_sub(12)?..)?, 16).ok()
}

#[derive(Deserialize)]
struct ClaimAnswer<'a> {
    #[serde(borrow)]
    steps: Vec<ClaimedStep<'a>>,
}

#[derive(Deserialize)]
struct ClaimedStep<'a> {
    task_id: &'a str,
    step: &'a str,
    epoch: u32,
    attempt: u32,
}

/// How workers decide a step's outcome.
#[derive(Clone, Copy)]
pub enum Fates {
    /// Every step completes.
    AllComplete,
    /// Some attempts fail and are retried; some steps fail permanently (dead letter).
    Mixed { transient_permille: u64, permanent_permille: u64, max_attempts: u32 },
}

// The same task, step and attempt always get the same fate.
use domain::splitmix64 as mix;

enum Outcome {
    Complete,
    Fail { retryable: bool },
}

impl Fates {
    fn decide(&self, task: u64, step: &str, attempt: u32) -> Outcome {
        match *self {
            Fates::AllComplete => Outcome::Complete,
            Fates::Mixed { transient_permille, permanent_permille, .. } => {
                let step_key = task.wrapping_mul(31).wrapping_add(step.bytes().map(u64::from).sum::<u64>());
                if mix(step_key) % 1000 < permanent_permille {
                    Outcome::Fail { retryable: false }
                } else if mix(step_key ^ (u64::from(attempt) << 48)) % 1000 < transient_permille {
                    Outcome::Fail { retryable: true }
                } else {
                    Outcome::Complete
                }
            }
        }
    }
    fn max_attempts(&self) -> u32 {
        match *self {
            Fates::AllComplete => 3,
            Fates::Mixed { max_attempts, .. } => max_attempts,
        }
    }
}

/// What a worker does.
#[derive(Clone)]
pub struct WorkerSpec {
    pub namespace: &'static str,
    pub max: u32,
    pub wait_ms: u64,
    /// Long-poll on every claim (the idle-worker pickup case) instead of only after a partial batch.
    pub always_wait: bool,
    pub fates: Fates,
    /// Complete a claim's steps in one `POST /v1/completions` (failures still go one by one)
    /// instead of one request per step.
    pub batch_completions: bool,
}

#[derive(Deserialize)]
struct CompletionsAnswer {
    results: Vec<CompletionStatus>,
}

#[derive(Deserialize)]
struct CompletionStatus {
    status: u16,
}

/// One request a worker sends after a claim, and which claimed steps it carries.
struct StepRequest {
    path: String,
    body: Bytes,
    steps: Vec<usize>,
}

/// A step whose completion (or failure) ends its task: a single job's only
/// step, or the last step of the 3-step workflow.
fn is_last_step(step: &str) -> bool {
    step == "main" || step == "c"
}

/// A step whose first claim is the task's pickup.
fn is_first_step(step: &str) -> bool {
    step == "main" || step == "a"
}

pub async fn worker(
    target: Target,
    index: usize,
    spec: WorkerSpec,
    phase: Arc<Phase>,
    pickups: Arc<Pickups>,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut claim_conn = Conn::connect(&target).await?;
    let mut step_conns = Vec::with_capacity(spec.max as usize);
    for _ in 0..spec.max {
        step_conns.push(Conn::connect(&target).await?);
    }
    let claim_body = |wait_ms: u64| {
        Bytes::from(format!(
            r#"{{"namespaces":["{}"],"worker_id":"w-{index}","max":{},"wait_ms":{wait_ms}}}"#,
            spec.namespace, spec.max
        ))
    };
    let polling = claim_body(spec.wait_ms);
    let immediate = claim_body(0);
    let mut wait = true;
    let mut claimed = Vec::new();
    while !phase.stopping() {
        let body = if wait || spec.always_wait { polling.clone() } else { immediate.clone() };
        let started = Instant::now();
        let answer = tokio::select! {
            answer = claim_conn.post("/v1/claims", body) => answer,
            _ = phase.stopped() => break,
        };
        let (status, bytes) = match answer {
            Ok(a) => a,
            Err(e) => {
                tally.error(|| format!("claim: {e:#}"));
                break;
            }
        };
        let at_ns = phase.now_ns();
        if status != StatusCode::OK {
            tally.error(|| format!("claim: {status} {}", String::from_utf8_lossy(&bytes)));
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let parsed: ClaimAnswer<'_> = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                tally.error(|| format!("claim answer: {e}"));
                continue;
            }
        };
        let measuring = phase.measuring();
        if measuring {
            tally.http_requests += 1;
        }
        if measuring && !(wait || spec.always_wait) {
            tally.claim.record(started.elapsed());
        }
        wait = parsed.steps.len() < spec.max as usize;
        claimed.clear();
        for step in &parsed.steps {
            let number = task_number(step.task_id).unwrap_or(0);
            if step.attempt == 1
                && is_first_step(step.step)
                && let Some(pickup) = pickups.claimed(number, at_ns)
                && measuring
            {
                tally.pickup.record(pickup);
            }
            let outcome = spec.fates.decide(number, step.step, step.attempt);
            let ends = match outcome {
                Outcome::Complete => is_last_step(step.step),
                Outcome::Fail { retryable } => !retryable || step.attempt >= spec.fates.max_attempts(),
            };
            claimed.push((step.task_id.to_owned(), step.step.to_owned(), step.epoch, outcome, ends));
        }
        drop(parsed);
        let requests = step_requests(&claimed, spec.batch_completions);
        let results = futures_util::future::join_all(requests.iter().zip(step_conns.iter_mut()).map(
            |(request, conn)| async move {
                let started = Instant::now();
                let answer = conn.post(&request.path, request.body.clone()).await;
                (started.elapsed(), answer)
            },
        ))
        .await;
        let measuring = phase.measuring();
        if measuring {
            tally.http_requests += requests.len() as u64;
        }
        for (request, (elapsed, answer)) in requests.iter().zip(results) {
            let body = match answer {
                Ok((StatusCode::OK, body)) => body,
                Ok((status, body)) => {
                    tally.error(|| format!("{}: {status} {}", request.path, String::from_utf8_lossy(&body)));
                    continue;
                }
                Err(e) => {
                    tally.error(|| format!("{}: {e:#}", request.path));
                    return Ok(tally);
                }
            };
            let statuses: Vec<u16> = if request.path == "/v1/completions" {
                match serde_json::from_slice::<CompletionsAnswer>(&body) {
                    Ok(a) => a.results.iter().map(|r| r.status).collect(),
                    Err(e) => {
                        tally.error(|| format!("completions answer: {e}"));
                        continue;
                    }
                }
            } else {
                vec![200]
            };
            if statuses.len() != request.steps.len() {
                tally.error(|| {
                    format!("{}: {} results for {} steps", request.path, statuses.len(), request.steps.len())
                });
                continue;
            }
            for (&index, status) in request.steps.iter().zip(statuses) {
                let (_, _, _, outcome, ends) = &claimed[index];
                if status != 200 {
                    tally.error(|| {
                        format!("{} item {index}: {status} {}", request.path, String::from_utf8_lossy(&body))
                    });
                    continue;
                }
                if *ends {
                    phase.backlog.fetch_sub(1, Ordering::Relaxed);
                }
                if !measuring {
                    continue;
                }
                if matches!(outcome, Outcome::Complete) {
                    tally.complete.record(elapsed);
                    tally.completed_steps += 1;
                } else {
                    tally.fail.record(elapsed);
                    if *ends {
                        tally.dead_lettered += 1;
                    } else {
                        tally.retried_steps += 1;
                    }
                }
                if *ends {
                    tally.finished += 1;
                }
            }
        }
    }
    Ok(tally)
}

/// A claimed step: task id, step name, lease epoch, its fate, and whether it ends its task.
type Claimed = (String, String, u32, Outcome, bool);

/// The requests that finish `claimed`: one per step, or, with `batch_completions`, one
/// `POST /v1/completions` for all the completions and one request per failure.
fn step_requests(claimed: &[Claimed], batch_completions: bool) -> Vec<StepRequest> {
    let mut requests = Vec::new();
    let mut batch = String::new();
    let mut batched = Vec::new();
    for (index, (task_id, step, epoch, outcome, _)) in claimed.iter().enumerate() {
        match outcome {
            Outcome::Complete if batch_completions => {
                batch.push_str(if batched.is_empty() { "" } else { "," });
                let _ = write!(
                    batch,
                    r#"{{"task_id":"{task_id}","step":"{step}","epoch":{epoch},"result":{{"ok":true}}}}"#
                );
                batched.push(index);
            }
            Outcome::Complete => requests.push(StepRequest {
                path: format!("/v1/tasks/{task_id}/steps/{step}/complete"),
                body: Bytes::from(format!(r#"{{"epoch":{epoch},"result":{{"ok":true}}}}"#)),
                steps: vec![index],
            }),
            Outcome::Fail { retryable } => requests.push(StepRequest {
                path: format!("/v1/tasks/{task_id}/steps/{step}/fail"),
                body: Bytes::from(format!(r#"{{"epoch":{epoch},"error":"handler failed","retryable":{retryable}}}"#)),
                steps: vec![index],
            }),
        }
    }
    if !batched.is_empty() {
        requests.push(StepRequest {
            path: "/v1/completions".to_owned(),
            body: Bytes::from(format!(r#"{{"completions":[{batch}]}}"#)),
            steps: batched,
        });
    }
    requests
}

/// What producers create.
#[derive(Clone, Copy)]
pub enum TaskShape {
    /// A single-step job.
    Single,
    /// Mixed: single jobs with a short retry backoff, and every `dag_every`-th task a 3-step workflow.
    Mixed { dag_every: u64 },
}

const RETRY: &str = r#"{"base_ms":20,"multiplier":2.0,"cap_ms":100,"jitter_pct":20}"#;

/// Appends one task's JSON to `out`.
fn write_task(out: &mut String, ids: &Ids, n: u64, namespace: &str, shape: TaskShape) {
    out.push_str(r#"{"id":""#);
    ids.write(out, n);
    let _ = write!(
        out,
        r#"","namespace":"{namespace}","payload":{{"n":{n},"to":"user-{n}@example.com","template":"welcome"}},"#
    );
    match shape {
        TaskShape::Single => out.push_str(r#""handler":"send-email"}"#),
        TaskShape::Mixed { dag_every } if dag_every > 0 && n.is_multiple_of(dag_every) => {
            let _ = write!(
                out,
                r#""name":"etl","steps":[{{"name":"a","handler":"extract","max_attempts":3,"retry":{RETRY}}},{{"name":"b","handler":"transform","depends_on":["a"],"max_attempts":3,"retry":{RETRY}}},{{"name":"c","handler":"load","depends_on":["a","b"],"max_attempts":3,"retry":{RETRY}}}]}}"#
            );
        }
        TaskShape::Mixed { .. } => {
            let _ = write!(out, r#""handler":"send-email","max_attempts":3,"retry":{RETRY}}}"#);
        }
    }
}

/// A closed-loop producer: one create at a time on its own connection,
/// pausing while more than `max_backlog` tasks are unfinished.
pub async fn producer(
    target: Target,
    namespace: &'static str,
    shape: TaskShape,
    max_backlog: u64,
    ids: Arc<Ids>,
    phase: Arc<Phase>,
    pickups: Arc<Pickups>,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut conn = Conn::connect(&target).await?;
    let mut body = String::with_capacity(512);
    while !phase.stopping() {
        if phase.backlog.load(Ordering::Relaxed) >= max_backlog {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let sent = Create { ids: &ids, namespace, shape, phase: &phase, pickups: &pickups };
        if sent.send(&mut conn, &mut body, Instant::now(), &mut tally).await == Sent::ConnectionLost {
            break;
        }
    }
    Ok(tally)
}

/// How one create ended.
#[derive(PartialEq, Eq)]
enum Sent {
    Acknowledged,
    Refused,
    ConnectionLost,
}

/// What a producer needs to send one single create and account for it.
struct Create<'a> {
    ids: &'a Ids,
    namespace: &'a str,
    shape: TaskShape,
    phase: &'a Phase,
    pickups: &'a Pickups,
}

impl Create<'_> {
    /// Creates the next task; once acknowledged, records its latency (measured
    /// from `since`: the send, or its scheduled time) and its pickup. A refused
    /// create is an error and does not count towards the backlog.
    async fn send(&self, conn: &mut Conn, body: &mut String, since: Instant, tally: &mut Tally) -> Sent {
        let n = self.ids.next();
        body.clear();
        write_task(body, self.ids, n, self.namespace, self.shape);
        self.phase.backlog.fetch_add(1, Ordering::Relaxed);
        match conn.post("/v1/tasks", Bytes::copy_from_slice(body.as_bytes())).await {
            Ok((StatusCode::CREATED, _)) => {}
            Ok((status, answer)) => {
                self.phase.backlog.fetch_sub(1, Ordering::Relaxed);
                tally.error(|| format!("create: {status} {}", String::from_utf8_lossy(&answer)));
                return Sent::Refused;
            }
            Err(e) => {
                tally.error(|| format!("create: {e:#}"));
                return Sent::ConnectionLost;
            }
        }
        let elapsed = since.elapsed();
        let pickup = self.pickups.acknowledged(n, self.phase.now_ns());
        if self.phase.measuring() {
            tally.create.record(elapsed);
            tally.created += 1;
            tally.http_requests += 1;
            if let Some(p) = pickup {
                tally.pickup.record(p);
            }
        }
        Sent::Acknowledged
    }
}

/// An open-loop producer: creates on a fixed schedule (`interval` apart,
/// starting at `offset`) whether or not the last one was answered yet, and
/// measures each acknowledgement from its scheduled time when its connection
/// was still busy then (see `OpenLoop`), so a stall shows up in the latency
/// instead of silently lowering the rate.
#[allow(clippy::too_many_arguments)]
pub async fn paced_producer(
    target: Target,
    namespace: &'static str,
    interval: Duration,
    offset: Duration,
    ids: Arc<Ids>,
    phase: Arc<Phase>,
    pickups: Arc<Pickups>,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut conn = Conn::connect(&target).await?;
    let mut body = String::with_capacity(512);
    let mut next = tokio::time::Instant::now() + offset;
    let mut clock = OpenLoop::new();
    while !phase.stopping() {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = phase.stopped() => break,
        }
        let scheduled = next.into_std();
        next += interval;
        let since = clock.origin(scheduled, phase.measuring(), &mut tally);
        let sent = Create { ids: &ids, namespace, shape: TaskShape::Single, phase: &phase, pickups: &pickups };
        let sent = sent.send(&mut conn, &mut body, since, &mut tally).await;
        clock.answered(scheduled, sent == Sent::Acknowledged, phase.measuring(), &mut tally);
        if sent == Sent::ConnectionLost {
            break;
        }
    }
    Ok(tally)
}

/// Records a feed reader asks for in one request.
const FEED_PAGE_RECORDS: u64 = 10_000;

/// A reader of the event feed (`--feed-readers`): the log from its first record, a page of
/// `FEED_PAGE_RECORDS` at a time, and from the first again once it reaches the head — a
/// consumer catching up, whose batches come from disk, not the live ring.
pub async fn feed_reader(target: Target, phase: Arc<Phase>) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut conn = Conn::connect(&target).await?;
    let mut from_seq = 1u64;
    while !phase.stopping() {
        let path = format!("/v1/events?from_seq={from_seq}&limit={FEED_PAGE_RECORDS}&follow=false");
        let (status, body) = conn.get(&path).await?;
        if !status.is_success() {
            tally.error(|| format!("GET {path}: {status} {}", String::from_utf8_lossy(&body)));
            break;
        }
        let records = body.iter().filter(|&&byte| byte == b'\n').count() as u64;
        if phase.measuring() {
            tally.feed_records += records;
        }
        from_seq = if records == 0 { 1 } else { from_seq + records };
    }
    Ok(tally)
}

/// A follower of the event feed (`--feed-followers`): `GET /v1/events` from the head on,
/// following the log as it grows (NDJSON), the way a downstream consumer that keeps up reads it.
pub async fn feed_follower(target: Target, phase: Arc<Phase>) -> Result<Tally> {
    use http_body_util::BodyExt;

    let mut tally = Tally::default();
    let mut conn = Conn::connect(&target).await?;
    let (status, head) = conn.get("/v1/ledger").await?;
    let head: serde_json::Value = serde_json::from_slice(&head)?;
    let Some(head) = head["head_seq"].as_u64().filter(|_| status.is_success()) else {
        tally.error(|| format!("GET /v1/ledger: {status} {head}"));
        return Ok(tally);
    };
    let path = format!("/v1/events?from_seq={}", head + 1);
    let (status, mut body) = conn.get_streaming(&path).await?;
    if !status.is_success() {
        tally.error(|| format!("GET {path}: {status}"));
        return Ok(tally);
    }
    // A record's line ends with `}` and a newline; a keep-alive is a newline alone.
    let mut last_byte = 0u8;
    while !phase.stopping() {
        let frame = match tokio::time::timeout(Duration::from_millis(200), body.frame()).await {
            Err(_) => continue,
            Ok(None) => break,
            Ok(Some(frame)) => frame?,
        };
        let Ok(data) = frame.into_data() else { continue };
        let mut records = 0u64;
        for &byte in data.iter() {
            records += u64::from(byte == b'\n' && last_byte == b'}');
            last_byte = byte;
        }
        if phase.measuring() {
            tally.followed_records += records;
        }
    }
    Ok(tally)
}

/// What a GraphQL subscriber (`--graphql-readers`, `--graphql-followers`) selects of each
/// event: what a consumer copying the log downstream needs.
const GRAPHQL_EVENT_FIELDS: &str = "seq stream streamVersion type recordedAt data";

/// How a GraphQL subscriber reads the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphqlSubscriber {
    /// `--graphql-readers`: from the log's first record; once it has the records that were there
    /// when it subscribed, it ends that subscription and starts another from the first — a
    /// consumer catching up, over and over.
    CatchingUp,
    /// `--graphql-followers`: from the head on, for the whole run — a consumer keeping up (a
    /// dashboard, a downstream copy).
    Following,
}

/// A GraphQL subscriber to `events` over graphql-transport-ws, on a thread of its own
/// (tungstenite is blocking), reading as `kind` says.
pub fn graphql_subscriber(target: &Target, phase: &Phase, kind: GraphqlSubscriber) -> Result<Tally> {
    use anyhow::{Context, bail};
    use serde_json::{Value, json};
    use tungstenite::Message;

    let mut tally = Tally::default();
    let stream = std::net::TcpStream::connect(target.addr).context("connect the GraphQL subscriber")?;
    stream.set_nodelay(true)?;
    // Reads give up now and then, so that the end of the run is noticed.
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let url = format!("ws://{}/graphql/ws", target.addr);
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut socket, _) = tungstenite::client(request, stream).context("WebSocket handshake")?;
    let send = |socket: &mut tungstenite::WebSocket<_>, value: Value| {
        socket.send(Message::Text(value.to_string().into())).context("send to the GraphQL socket")
    };
    send(&mut socket, json!({ "type": "connection_init", "payload": { "Authorization": target.bearer() } }))?;
    // The next `next` or `error` for subscription `id` (messages for ended ones are skipped);
    // None when the run ends first.
    let next_for = |socket: &mut tungstenite::WebSocket<_>, id: &str| -> Result<Option<Value>> {
        loop {
            if phase.stopping() {
                return Ok(None);
            }
            let text = match socket.read() {
                Ok(Message::Text(text)) => text,
                Ok(Message::Close(frame)) => bail!("the server closed the GraphQL socket: {frame:?}"),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("read the GraphQL socket"),
            };
            let message: Value = serde_json::from_str(&text)?;
            match message["type"].as_str() {
                Some("connection_ack") if id.is_empty() => return Ok(Some(message)),
                Some("next" | "error" | "complete") if message["id"] == id => return Ok(Some(message)),
                _ => {}
            }
        }
    };
    if next_for(&mut socket, "")?.is_none() {
        return Ok(tally);
    }
    let mut round = 0u64;
    while !phase.stopping() {
        round += 1;
        let head_id = format!("head-{round}");
        send(
            &mut socket,
            json!({ "id": head_id, "type": "subscribe", "payload": { "query": "{ ledger { headSeq } }" } }),
        )?;
        let Some(answer) = next_for(&mut socket, &head_id)? else { break };
        let Some(head) = answer["payload"]["data"]["ledger"]["headSeq"].as_u64() else {
            bail!("GraphQL ledger query: {answer}");
        };
        let id = format!("events-{round}");
        let from_seq = match kind {
            GraphqlSubscriber::CatchingUp => 1,
            GraphqlSubscriber::Following => head + 1,
        };
        let query = format!("subscription {{ events(fromSeq: {from_seq}) {{ {GRAPHQL_EVENT_FIELDS} }} }}");
        send(&mut socket, json!({ "id": id, "type": "subscribe", "payload": { "query": query } }))?;
        loop {
            let Some(message) = next_for(&mut socket, &id)? else { break };
            let Some(seq) = message["payload"]["data"]["events"]["seq"].as_u64() else {
                tally.error(|| format!("GraphQL events subscription: {message}"));
                return Ok(tally);
            };
            if phase.measuring() {
                match kind {
                    GraphqlSubscriber::CatchingUp => tally.graphql_records += 1,
                    GraphqlSubscriber::Following => tally.graphql_followed_records += 1,
                }
            }
            if kind == GraphqlSubscriber::CatchingUp && seq >= head {
                send(&mut socket, json!({ "id": id, "type": "complete" }))?;
                break;
            }
        }
    }
    Ok(tally)
}

/// A producer of batches of `size` single-step tasks through `/v1/tasks/batch`.
pub async fn batch_producer(
    target: Target,
    namespace: &'static str,
    size: usize,
    ids: Arc<Ids>,
    phase: Arc<Phase>,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut conn = Conn::connect(&target).await?;
    let mut body = String::with_capacity(size * 160 + 16);
    while !phase.stopping() {
        body.clear();
        body.push_str(r#"{"tasks":["#);
        for i in 0..size {
            if i > 0 {
                body.push(',');
            }
            write_task(&mut body, &ids, ids.next(), namespace, TaskShape::Single);
        }
        body.push_str("]}");
        let started = Instant::now();
        match conn.post("/v1/tasks/batch", Bytes::copy_from_slice(body.as_bytes())).await {
            Ok((StatusCode::CREATED, _)) => {}
            Ok((status, answer)) => {
                tally.error(|| format!("batch create: {status} {}", String::from_utf8_lossy(&answer)));
                continue;
            }
            Err(e) => {
                tally.error(|| format!("batch create: {e:#}"));
                break;
            }
        }
        if phase.measuring() {
            tally.create.record(started.elapsed());
            tally.created += size as u64;
            tally.http_requests += 1;
        }
    }
    Ok(tally)
}

/// One producer creating `count` tasks one at a time, `interval` apart, for
/// the idle-worker pickup case (nothing else is running).
pub async fn trickle_producer(
    target: Target,
    namespace: &'static str,
    interval: Duration,
    ids: Arc<Ids>,
    phase: Arc<Phase>,
    pickups: Arc<Pickups>,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut conn = Conn::connect(&target).await?;
    let mut body = String::with_capacity(512);
    while !phase.stopping() {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = phase.stopped() => break,
        }
        let sent = Create { ids: &ids, namespace, shape: TaskShape::Single, phase: &phase, pickups: &pickups };
        if sent.send(&mut conn, &mut body, Instant::now(), &mut tally).await == Sent::ConnectionLost {
            break;
        }
    }
    Ok(tally)
}

/// Waits until `/readyz` says the projections have caught up (or `limit` passes).
pub async fn settle(target: &Target, limit: Duration) -> Result<bool> {
    let mut conn = Conn::connect(target).await?;
    let deadline = Instant::now() + limit;
    loop {
        let (status, _) = conn.get("/readyz").await?;
        if status == StatusCode::OK {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_v7_and_carry_their_number() {
        let ids = Ids::new();
        let mut id = String::new();
        ids.write(&mut id, 0x1234_5678_9abc);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "7", "version nibble in {id}");
        assert_eq!(&id[19..20], "8", "variant nibble in {id}");
        assert_eq!(task_number(&id), Some(0x1234_5678_9abc));
    }

    #[test]
    fn tasks_are_json() {
        let ids = Ids::new();
        for shape in [TaskShape::Single, TaskShape::Mixed { dag_every: 1 }, TaskShape::Mixed { dag_every: 2 }] {
            let mut out = String::new();
            write_task(&mut out, &ids, 7, "ns", shape);
            let value: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
            assert_eq!(value["namespace"], "ns");
        }
    }
}
