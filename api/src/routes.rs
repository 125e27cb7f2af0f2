//! The `/v1` HTTP routes: one handler per domain command, task reads folded
//! from the task's own events, and the live event feed. Handlers only adapt:
//! wire JSON → `domain::Command` → the writer → wire JSON. Authorization is
//! checked first (role here, namespace scope by the writer against the
//! ledger).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json as AxumJson, Router};
use domain::{Command, Event, LeaseEpoch, LeaseRef, Namespace, StepName, StreamId, TaskId};
use eventlog::{Acknowledgement, Envelope, Subscription, decode_event};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::auth::{Permission, Principal};
use crate::error::{ApiError, ApiResult};
use crate::server::AppState;
use crate::wire::*;

/// Longest a claim may long-poll.
pub const CLAIM_WAIT_MS_MAX: u64 = 30_000;
/// Most records one feed or history page returns.
pub const PAGE_RECORDS_MAX: usize = 10_000;
/// The header carrying a client's command id (for safe retries).
pub const COMMAND_ID_HEADER: &str = "x-command-id";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/batch", post(create_batch))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/history", get(task_history))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/tasks/{id}/give-up", post(give_up_task))
        .route("/v1/claims", post(claim_steps))
        .route("/v1/tasks/{id}/steps/{step}/heartbeat", post(heartbeat))
        .route("/v1/tasks/{id}/steps/{step}/complete", post(complete_step))
        .route("/v1/tasks/{id}/steps/{step}/fail", post(fail_step))
        .route("/v1/tasks/{id}/steps/{step}/release", post(release_step))
        .route("/v1/tasks/{id}/steps/{step}/add-steps", post(add_steps))
        .route("/v1/tasks/{id}/steps/{step}/retry", post(retry_step))
        .route("/v1/tasks/{id}/steps/{step}/resolve", post(resolve_step))
        .route("/v1/queues/{namespace}/pause", post(pause_queue))
        .route("/v1/queues/{namespace}/resume", post(resume_queue))
        .route("/v1/queues/{namespace}/concurrency", put(set_concurrency))
        .route("/v1/queues/{namespace}", get(queue_status))
        .route("/v1/events", get(event_feed))
        .route("/v1/ledger", get(ledger_head))
}

/// `axum::Json`, with its rejections turned into this API's error format:
/// malformed JSON, unknown fields and wrong types are 400s with a clear
/// message; an oversized body is 413.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match AxumJson::<T>::from_request(request, state).await {
            Ok(AxumJson(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))
            }
            Err(JsonRejection::JsonSyntaxError(e)) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text()))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            )),
            Err(JsonRejection::BytesRejection(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", e.body_text()))
            }
            Err(other) => Err(ApiError::bad_request(other.body_text())),
        }
    }
}

/// An optional JSON body: an empty body is `None` (for commands whose body
/// only carries optional fields, like a cancel reason).
pub struct MaybeJson<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for MaybeJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", e.body_text())
            } else {
                ApiError::bad_request(e.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(MaybeJson(None));
        }
        serde_json::from_slice(&bytes).map(|v| MaybeJson(Some(v))).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()),
        })
    }
}

fn command_id(headers: &HeaderMap) -> ApiResult<String> {
    match headers.get(COMMAND_ID_HEADER) {
        Some(value) => value.to_str().map(str::to_owned).map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_command_id", "X-Command-Id must be visible ASCII")
        }),
        // Without a client id there is nothing to deduplicate against; a
        // fresh id keeps the dedup index honest.
        None => Ok(format!("srv-{}", uuid::Uuid::new_v4().simple())),
    }
}

async fn execute(
    state: &AppState,
    who: &Principal,
    headers: &HeaderMap,
    command: Command,
) -> ApiResult<Acknowledgement> {
    let envelope = Envelope { command_id: command_id(headers)?, actor: who.actor(), command };
    let kind = envelope.command.kind();
    let started = std::time::Instant::now();
    let result = match state.writer.submit_scoped(envelope, who.scope.clone()) {
        Ok(receiver) => receiver
            .await
            .unwrap_or_else(|_| Err(eventlog::WriteError::Unavailable("the writer stopped before answering".into()))),
        Err(e) => Err(e),
    };
    state.metrics.record_command(kind, &result, started.elapsed());
    Ok(result?)
}

fn command_response(ack: Acknowledgement) -> Response {
    AxumJson(CommandResponse {
        seq: ack.seqs.map(|s| s.first),
        last_seq: ack.seqs.map(|s| s.last),
        head_seq: ack.head_seq,
        duplicate: ack.duplicate,
        events: ack.events.iter().map(EventBody::from).collect(),
    })
    .into_response()
}

fn parse_task(id: &str) -> ApiResult<TaskId> {
    TaskId::parse(id).map_err(|r| ApiError::not_found(format!("no task {id:?}: {}", r.message)).with_field("id"))
}

fn parse_step(step: &str) -> ApiResult<StepName> {
    StepName::new(step).map_err(|r| ApiError::not_found(format!("no step {step:?}: {}", r.message)).with_field("step"))
}

fn parse_namespace(ns: &str) -> ApiResult<Namespace> {
    Ok(Namespace::new(ns)?)
}

fn lease(id: &str, step: &str, epoch: u32) -> ApiResult<LeaseRef> {
    Ok(LeaseRef { task: parse_task(id)?, step: parse_step(step)?, epoch: LeaseEpoch(epoch) })
}

fn mint_task_id() -> TaskId {
    TaskId::new(uuid::Uuid::now_v7()).expect("now_v7 mints a v7 uuid")
}

async fn create_task(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(request): ApiJson<CreateTaskRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Produce)?;
    let spec = request.into_spec(mint_task_id)?;
    let id = spec.id;
    let ack = execute(&state, &who, &headers, Command::CreateTask(spec)).await?;
    let existing = ack.existing_task;
    let created =
        ack.events.iter().any(|e| matches!(e, Event::TaskCreated { .. })) || (ack.duplicate && existing.is_none());
    let body = CreatedResponse {
        task_id: existing.unwrap_or(id).to_string(),
        created,
        seq: ack.seqs.map(|s| s.first),
        head_seq: ack.head_seq,
        duplicate: ack.duplicate,
    };
    let status = if created && !ack.duplicate { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, AxumJson(body)).into_response())
}

async fn create_batch(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(request): ApiJson<CreateBatchRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Produce)?;
    let specs = request
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.into_spec(mint_task_id).map_err(|r| r.within(&format!("tasks[{i}]"))))
        .collect::<Result<Vec<_>, _>>()?;
    let ids: Vec<String> = specs.iter().map(|s| s.id.to_string()).collect();
    let ack = execute(&state, &who, &headers, Command::CreateTasks(specs)).await?;
    let created = ack.events.len();
    let status = if created > 0 && !ack.duplicate { StatusCode::CREATED } else { StatusCode::OK };
    let body = BatchCreatedResponse {
        task_ids: ids,
        created,
        seq: ack.seqs.map(|s| s.first),
        last_seq: ack.seqs.map(|s| s.last),
        head_seq: ack.head_seq,
        duplicate: ack.duplicate,
    };
    Ok((status, AxumJson(body)).into_response())
}

async fn cancel_task(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
    MaybeJson(body): MaybeJson<ReasonRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Cancel)?;
    let reason = body.and_then(|b| b.reason).map(|r| text("reason", &r)).transpose()?;
    let ack = execute(&state, &who, &headers, Command::CancelTask { task: parse_task(&id)?, reason }).await?;
    Ok(command_response(ack))
}

async fn give_up_task(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path(id): Path<String>,
    MaybeJson(body): MaybeJson<ReasonRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Operate)?;
    let reason = body.and_then(|b| b.reason).map(|r| text("reason", &r)).transpose()?;
    let ack = execute(&state, &who, &headers, Command::GiveUpTask { task: parse_task(&id)?, reason }).await?;
    Ok(command_response(ack))
}

async fn claim_steps(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ClaimRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Work)?;
    if request.wait_ms > CLAIM_WAIT_MS_MAX {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_claim",
            format!("wait_ms must be at most {CLAIM_WAIT_MS_MAX}"),
        )
        .with_field("wait_ms"));
    }
    let command = Command::ClaimSteps {
        namespaces: request.namespaces.iter().map(Namespace::new).collect::<Result<_, _>>()?,
        worker: domain::WorkerId::new(&request.worker_id)?,
        max: request.max,
        lease_ms: request.lease_ms,
        handlers: request.handlers.iter().map(domain::HandlerName::new).collect::<Result<_, _>>()?,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(request.wait_ms);
    let mut head = state.writer.head_watch();
    loop {
        head.mark_unchanged();
        let ack = execute(&state, &who, &headers, command.clone()).await?;
        let now = tokio::time::Instant::now();
        if !ack.claimed.is_empty() || now >= deadline {
            return Ok(AxumJson(ClaimResponse {
                seq: ack.seqs.map(|s| s.first),
                head_seq: ack.head_seq,
                steps: ack.claimed.iter().map(ClaimedStepBody::from).collect(),
            })
            .into_response());
        }
        // Nothing ready: sleep until the log moves (new work may have been
        // enqueued) or the deadline passes, then try again.
        let _ = tokio::time::timeout_at(deadline, head.changed()).await;
    }
}

async fn heartbeat(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path((id, step)): Path<(String, String)>,
    ApiJson(request): ApiJson<HeartbeatRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Work)?;
    let command = Command::Heartbeat { lease: lease(&id, &step, request.epoch)?, lease_ms: request.lease_ms };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

async fn complete_step(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path((id, step)): Path<(String, String)>,
    ApiJson(request): ApiJson<CompleteRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Work)?;
    let command = Command::CompleteStep {
        lease: lease(&id, &step, request.epoch)?,
        result: json_text("result", &request.result)?,
    };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

async fn fail_step(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path((id, step)): Path<(String, String)>,
    ApiJson(request): ApiJson<FailRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Work)?;
    let command = Command::FailStep {
        lease: lease(&id, &step, request.epoch)?,
        error: text("error", &request.error)?,
        retryable: request.retryable,
    };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

async fn release_step(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path((id, step)): Path<(String, String)>,
    ApiJson(request): ApiJson<ReleaseRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Work)?;
    let command = Command::ReleaseStep { lease: lease(&id, &step, request.epoch)? };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

async fn add_steps(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path((id, step)): Path<(String, String)>,
    ApiJson(request): ApiJson<AddStepsRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Work)?;
    let steps = request
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| step_spec(&format!("steps[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    let command = Command::AddSteps { lease: lease(&id, &step, request.epoch)?, steps };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

async fn retry_step(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path((id, step)): Path<(String, String)>,
    MaybeJson(body): MaybeJson<RetryStepRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Operate)?;
    let reset_attempts = body.is_some_and(|b| b.reset_attempts);
    let command = Command::RetryStep { task: parse_task(&id)?, step: parse_step(&step)?, reset_attempts };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

async fn resolve_step(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path((id, step)): Path<(String, String)>,
    ApiJson(request): ApiJson<ResolveRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Operate)?;
    let command = Command::ResolveStep {
        task: parse_task(&id)?,
        step: parse_step(&step)?,
        note: text("note", &request.note)?,
        result: request.result.as_ref().map(|r| json_text("result", r)).transpose()?,
    };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

async fn pause_queue(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path(namespace): Path<String>,
) -> ApiResult<Response> {
    who.require(Permission::Operate)?;
    let command = Command::PauseQueue { namespace: parse_namespace(&namespace)? };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

async fn resume_queue(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path(namespace): Path<String>,
) -> ApiResult<Response> {
    who.require(Permission::Operate)?;
    let command = Command::ResumeQueue { namespace: parse_namespace(&namespace)? };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

async fn set_concurrency(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    Path(namespace): Path<String>,
    ApiJson(request): ApiJson<ConcurrencyRequest>,
) -> ApiResult<Response> {
    who.require(Permission::Operate)?;
    let command = Command::SetQueueConcurrency { namespace: parse_namespace(&namespace)?, limit: request.limit };
    Ok(command_response(execute(&state, &who, &headers, command).await?))
}

/// A queue's live figures, read from the writer's ledger between batches.
async fn queue_status(
    State(state): State<AppState>,
    who: Principal,
    Path(namespace): Path<String>,
) -> ApiResult<Response> {
    who.require(Permission::Read)?;
    let ns = parse_namespace(&namespace)?;
    if !who.may_see(&ns) {
        return Err(ApiError::forbidden(format!("your credentials do not cover namespace {ns}")));
    }
    let writer = state.writer.clone();
    let body = tokio::task::spawn_blocking(move || {
        writer.read(move |ledger| {
            let settings = ledger.queue_settings(&ns);
            serde_json::json!({
                "namespace": ns.to_string(),
                "paused": settings.paused,
                "concurrency_limit": settings.concurrency_limit,
                "ready": ledger.ready_count(&ns),
                "in_progress": ledger.in_progress(&ns),
            })
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(AxumJson(body).into_response())
}

/// The task's events, read from its stream (MVCC, off the writer thread).
fn task_records(state: &AppState, task: &TaskId) -> ApiResult<Vec<(eventlog::StoredRecord, Event)>> {
    let key = StreamId::Task(*task).to_key();
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let records = state
            .writer
            .reader()
            .read_stream(&key, from, PAGE_RECORDS_MAX)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let Some(last) = records.last() else { break };
        from = last.stream_version + 1;
        let full = records.len() == PAGE_RECORDS_MAX;
        for record in records {
            let event = decode_event(&record).map_err(|e| ApiError::internal(e.to_string()))?;
            out.push((record, event));
        }
        if !full {
            break;
        }
    }
    Ok(out)
}

fn visible_task_records(
    state: &AppState,
    who: &Principal,
    id: &str,
) -> ApiResult<(TaskId, Vec<(eventlog::StoredRecord, Event)>)> {
    let task = parse_task(id)?;
    let records = task_records(state, &task)?;
    let namespace = records.first().and_then(|(_, e)| match e {
        Event::TaskCreated { spec, .. } => Some(spec.namespace.clone()),
        _ => None,
    });
    match namespace {
        Some(ns) if who.may_see(&ns) => Ok((task, records)),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "task_not_found", format!("no task {task}")).with_field("id")),
    }
}

async fn get_task(State(state): State<AppState>, who: Principal, Path(id): Path<String>) -> ApiResult<Response> {
    who.require(Permission::Read)?;
    let (task, records) = visible_task_records(&state, &who, &id)?;
    let mut view = domain::Ledger::retaining_terminal_tasks();
    for (record, event) in &records {
        view.apply(event).map_err(|e| ApiError::internal(format!("record {}: {e}", record.seq)))?;
    }
    let (last, _) = records.last().expect("a visible task has records");
    let t = view.task(&task).ok_or_else(|| ApiError::internal("task vanished from its own fold"))?;
    Ok(AxumJson(task_body(t, last.seq, last.stream_version)).into_response())
}

async fn task_history(State(state): State<AppState>, who: Principal, Path(id): Path<String>) -> ApiResult<Response> {
    who.require(Permission::Read)?;
    let (_, records) = visible_task_records(&state, &who, &id)?;
    let body: Vec<RecordBody> = records.iter().map(|(r, e)| record_body(r, e)).collect();
    Ok(AxumJson(body).into_response())
}

async fn ledger_head(State(state): State<AppState>, who: Principal) -> ApiResult<Response> {
    who.require(Permission::Read)?;
    let head = state.writer.reader().head().map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(AxumJson(serde_json::json!({
        "head_seq": head.seq,
        "head_hash": head.hash.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedQuery {
    #[serde(default = "first_seq")]
    from_seq: u64,
    /// Stop after this many records (default: follow forever).
    limit: Option<u64>,
    /// `false`: return what exists now and end.
    #[serde(default = "yes_follow")]
    follow: bool,
}

fn first_seq() -> u64 {
    1
}
fn yes_follow() -> bool {
    true
}

/// The event feed from any seq: NDJSON by default, Server-Sent Events for
/// `Accept: text/event-stream`. It catches up from disk and then follows
/// live appends, with no gap and no duplicate.
async fn event_feed(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    who.require(Permission::Audit)?;
    if who.scope.is_some() {
        return Err(ApiError::forbidden(
            "the raw event feed spans every namespace; a namespace-scoped token may not read it",
        ));
    }
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let sse =
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    let subscription = Subscription::new(state.writer.reader().clone(), state.writer.feed().clone(), query.from_seq);
    let stream = feed_stream(subscription, query.limit.unwrap_or(u64::MAX), query.follow, sse);
    let content_type = if sse { "text/event-stream" } else { "application/x-ndjson" };
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

fn feed_stream(
    subscription: Subscription,
    limit: u64,
    follow: bool,
    sse: bool,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold((subscription, 0u64), move |(mut sub, sent)| async move {
        if sent >= limit {
            return None;
        }
        let max = (limit - sent).min(1024) as usize;
        let batch = if follow {
            match tokio::time::timeout(Duration::from_secs(15), sub.next_batch_async(max)).await {
                Ok(Ok(batch)) => batch,
                Ok(Err(_)) => return None,
                // A keep-alive so proxies and clients see the stream is alive.
                Err(_) => {
                    return Some((Ok(Bytes::from_static(if sse { b": keep-alive\n\n" } else { b"\n" })), (sub, sent)));
                }
            }
        } else {
            match sub.try_next_batch(max) {
                Ok(batch) if !batch.is_empty() => batch,
                _ => return None,
            }
        };
        let mut out = Vec::with_capacity(batch.len() * 256);
        for record in &batch {
            let Ok(event) = decode_event(record) else { return None };
            let line = serde_json::to_vec(&record_body(record, &event)).expect("bodies serialize");
            if sse {
                out.extend_from_slice(format!("id: {}\nevent: {}\ndata: ", record.seq, event.type_name()).as_bytes());
                out.extend_from_slice(&line);
                out.extend_from_slice(b"\n\n");
            } else {
                out.extend_from_slice(&line);
                out.push(b'\n');
            }
        }
        let sent = sent + batch.len() as u64;
        Some((Ok(Bytes::from(out)), (sub, sent)))
    })
}
