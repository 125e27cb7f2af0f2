//! The `/v1` HTTP routes: one handler per domain command, task reads folded
//! from the task's own events, and the live event feed. Handlers only adapt:
//! wire JSON → `domain::Command` → the writer → wire JSON. Authorization is
//! checked first (role here, namespace scope by the writer against the
//! ledger).

use std::time::Duration;

use crate::commands::{self, Caller};
use crate::readmodels;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json as AxumJson, Router};
use eventlog::{StoredRecord, Subscription};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::auth::{Permission, Principal};
use crate::error::{ApiError, ApiResult};
use crate::server::AppState;
use crate::wire::*;

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
        .route("/v1/completions", post(complete_steps))
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
        .route("/v1/views/tasks", get(list_tasks))
        .route("/v1/views/queue", get(list_queue))
        .route("/v1/views/dead-letters", get(list_dead_letters))
        .route("/v1/views/dashboard", get(dashboard))
        .route("/v1/views/audit", get(audit_log))
        .route("/v1/views/workers", get(workers))
        .route("/v1/views/projections", get(projector_status))
        .route("/v1/admin/projections/{projector}/rebuild", post(rebuild_projector))
        .route("/v1/ledger", get(ledger_head))
}

/// Refuses (400 `bad_request`) a query string sent to a command (a POST or PUT route): commands
/// carry everything in their body, and a parameter sent with one was ignored (found by a
/// black-box check: `POST /v1/tasks?x=1` created the task). The read routes check their own
/// parameters ([`route_query`]). As there, a request without a valid token is answered 401
/// first (by the route).
pub async fn refuse_query_on_commands(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !matches!(*request.method(), axum::http::Method::POST | axum::http::Method::PUT) {
        return next.run(request).await;
    }
    refuse_query_string(State(state), request, next).await
}

/// Refuses (400 `bad_request`) any query string, for routes that take none, once the request's
/// token is known valid (else the route answers 401).
pub async fn refuse_query_string(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(query) = request.uri().query().filter(|query| !query.is_empty()).map(str::to_owned) else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    if Principal::from_request_parts(&mut parts, &state).await.is_err() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    ApiError::bad_request(format!("this route takes no query parameters (got `{query}`)")).into_response()
}

/// `axum::Json`, with its rejections turned into this API's error format:
/// malformed JSON, unknown fields and wrong types are 400s with a clear
/// message; an oversized body is 413.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match AxumJson::<T>::from_request(request, state).await {
            Ok(AxumJson(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))
            }
            Err(JsonRejection::JsonSyntaxError(e)) => {
                let message = e.body_text();
                Err(nested_too_deep(&message)
                    .unwrap_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", message)))
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(not_declared_json()),
            Err(JsonRejection::BytesRejection(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::body_too_large(state.max_body_bytes))
            }
            Err(other) => Err(ApiError::bad_request(other.body_text())),
        }
    }
}

/// An optional JSON body: an empty body is `None` (for commands whose body
/// only carries optional fields, like a cancel reason).
pub struct MaybeJson<T>(pub Option<T>);

impl<T: DeserializeOwned> FromRequest<AppState> for MaybeJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let declared_json = declares_json(request.headers());
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::body_too_large(state.max_body_bytes)
            } else {
                ApiError::bad_request(e.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(MaybeJson(None));
        }
        // A body is read as JSON only when it says it is one, as `ApiJson` reads it.
        if !declared_json {
            return Err(not_declared_json());
        }
        serde_json::from_slice(&bytes).map(|v| MaybeJson(Some(v))).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
            }
            // No depth mapping here: these bodies hold only strings and booleans, so a nested
            // value is refused as the wrong type long before serde_json's recursion limit.
            _ => ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()),
        })
    }
}

/// Whether `Content-Type` names JSON (`application/json` or `application/…+json`, any
/// parameters), the test axum's `Json` applies.
fn declares_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// 415 `unsupported_media_type`: a body not declared as JSON.
fn not_declared_json() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send the body as JSON with Content-Type: application/json",
    )
}

/// serde_json gives up at 128 levels of nesting, before `wire::json_text` measures a
/// payload's depth. Such a body gets that check's answer (422 `invalid_value`), not
/// `malformed_json`: its syntax may be fine, its depth is what is refused.
fn nested_too_deep(parser_message: &str) -> Option<ApiError> {
    parser_message.contains("recursion limit exceeded").then(|| {
        let message = format!(
            "the body is nested more than 127 levels deep; a payload or result may be nested {} levels at most",
            crate::wire::JSON_DEPTH_MAX
        );
        domain::Rejection::new(domain::RejectionCode::InvalidValue, None, message).into()
    })
}

fn caller<'a>(who: &'a Principal, headers: &HeaderMap) -> ApiResult<Caller<'a>> {
    // Two ids for one command: which one the client means to retry under cannot be known.
    if headers.get_all(COMMAND_ID_HEADER).iter().nth(1).is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_command_id",
            "X-Command-Id was given more than once; send one",
        )
        .with_field("command_id"));
    }
    let command_id = match headers.get(COMMAND_ID_HEADER) {
        Some(value) => Some(value.to_str().map(str::to_owned).map_err(|_| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_command_id", "X-Command-Id must be visible ASCII")
        })?),
        None => None,
    };
    Caller::new(who, command_id)
}

type StepPath = Path<(String, String)>;

async fn create_task(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(request): ApiJson<CreateTaskRequest>,
) -> ApiResult<Response> {
    let (status, body) = commands::create_task(&state, &caller(&who, &headers)?, request).await?;
    Ok((status, AxumJson(body)).into_response())
}

async fn create_batch(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(request): ApiJson<CreateBatchRequest>,
) -> ApiResult<Response> {
    let (status, body) = commands::create_batch(&state, &caller(&who, &headers)?, request).await?;
    Ok((status, AxumJson(body)).into_response())
}

async fn claim_steps(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ClaimRequest>,
) -> ApiResult<AxumJson<ClaimResponse>> {
    Ok(AxumJson(commands::claim(&state, &caller(&who, &headers)?, request).await?))
}

/// Runs a command built from the request and answers with its events.
async fn run(
    state: &AppState,
    who: &Principal,
    headers: &HeaderMap,
    permission: Permission,
    command: ApiResult<domain::Command>,
) -> ApiResult<AxumJson<CommandResponse>> {
    Ok(AxumJson(commands::run(state, &caller(who, headers)?, permission, command).await?))
}

async fn cancel_task(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path(id): Path<String>,
    MaybeJson(body): MaybeJson<ReasonRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Cancel, commands::cancel(&id, body)).await
}

async fn give_up_task(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path(id): Path<String>,
    MaybeJson(body): MaybeJson<ReasonRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Operate, commands::give_up(&id, body)).await
}

async fn heartbeat(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path((id, step)): StepPath,
    ApiJson(body): ApiJson<HeartbeatRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Work, commands::heartbeat(&id, &step, body)).await
}

async fn complete_step(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path((id, step)): StepPath,
    ApiJson(body): ApiJson<CompleteRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Work, commands::complete(&id, &step, body)).await
}

async fn complete_steps(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    ApiJson(request): ApiJson<CompleteBatchRequest>,
) -> ApiResult<AxumJson<CompletionsResponse>> {
    Ok(AxumJson(commands::complete_batch(&state, &caller(&who, &headers)?, request).await?))
}

async fn fail_step(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path((id, step)): StepPath,
    ApiJson(body): ApiJson<FailRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Work, commands::fail(&id, &step, body)).await
}

async fn release_step(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path((id, step)): StepPath,
    ApiJson(body): ApiJson<ReleaseRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Work, commands::release(&id, &step, body)).await
}

async fn add_steps(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path((id, step)): StepPath,
    ApiJson(body): ApiJson<AddStepsRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Work, commands::add_steps(&id, &step, body)).await
}

async fn retry_step(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path((id, step)): StepPath,
    MaybeJson(body): MaybeJson<RetryStepRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Operate, commands::retry(&id, &step, body)).await
}

async fn resolve_step(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path((id, step)): StepPath,
    ApiJson(body): ApiJson<ResolveRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Operate, commands::resolve(&id, &step, body)).await
}

async fn pause_queue(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path(namespace): Path<String>,
    MaybeJson(_): MaybeJson<NoFields>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Operate, commands::pause(&namespace)).await
}

async fn resume_queue(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path(namespace): Path<String>,
    MaybeJson(_): MaybeJson<NoFields>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Operate, commands::resume(&namespace)).await
}

async fn set_concurrency(
    State(s): State<AppState>,
    who: Principal,
    h: HeaderMap,
    Path(namespace): Path<String>,
    ApiJson(body): ApiJson<ConcurrencyRequest>,
) -> ApiResult<AxumJson<CommandResponse>> {
    run(&s, &who, &h, Permission::Operate, commands::concurrency(&namespace, body)).await
}

/// A queue's live figures, read from the writer's ledger between batches.
async fn queue_status(
    State(state): State<AppState>,
    who: Principal,
    Path(namespace): Path<String>,
    query: QueryParams<NoQuery>,
) -> ApiResult<Response> {
    route_query(query)?;
    who.require(Permission::Read)?;
    let ns = commands::parse_namespace(&namespace)?;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskQuery {
    /// The task as it was at a past seq or RFC 3339 time.
    as_of: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoQuery {}

/// A body that names no field (`{}`), for the routes that take none (pause, resume). It is
/// read whole, so the connection stays usable (left unread, a body sent after the headers made
/// the server close the connection under the client: found by a black-box check), and anything
/// but no body or an empty object is refused, like any route's junk.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// A route's query string, as axum extracts it.
type QueryParams<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// A route's query string: a parameter it does not take is refused (400 `bad_request`), so a
/// guessed one is not silently ignored.
fn route_query<T>(query: QueryParams<T>) -> ApiResult<T> {
    query.map(|Query(q)| q).map_err(|e| {
        let text = e.body_text();
        // serde names the parameter it could not read first ("…query string: from_version: invalid
        // digit…"): the error's field says which, as for a body's.
        let field = text
            .split_once("query string: ")
            .and_then(|(_, rest)| rest.split_once(": "))
            .map(|(name, _)| name)
            .filter(|name| !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            .map(str::to_owned);
        let error = ApiError::bad_request(text);
        match field {
            Some(field) => error.with_field(field),
            None => error,
        }
    })
}

async fn get_task(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    query: QueryParams<TaskQuery>,
) -> ApiResult<Response> {
    let as_of = route_query(query)?
        .as_of
        .map(|text| commands::AsOf::parse(&text).map_err(|e| e.with_field("as_of")))
        .transpose()?;
    commands::wait_log_readable(&state, None).await?;
    let view = commands::task_view(&state, &who, &id, as_of)
        .map_err(|e| if e.code == "invalid_as_of" { e.with_field("as_of") } else { e })?;
    Ok(AxumJson(view).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// The first record's stream version (the task's first record is 1).
    #[serde(default)]
    from_version: u64,
    /// Most records in the page (0 or absent: 1,000; at most 10,000).
    #[serde(default)]
    limit: u64,
}

/// A page of a task's history as a JSON array of records; when the task has more, a `Link`
/// header (RFC 8288) names the next page.
async fn task_history(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    query: QueryParams<HistoryQuery>,
) -> ApiResult<Response> {
    let query = route_query(query)?;
    commands::wait_log_readable(&state, None).await?;
    let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
    let page = commands::task_history(&state, &who, &id, query.from_version, limit)?;
    let mut response = AxumJson(&page.records).into_response();
    if let Some(next) = page.next_from_version {
        let link =
            format!("</v1/tasks/{}/history?from_version={next}&limit={}>; rel=\"next\"", page.task, page.records.len());
        // The id as the log writes it (the request's may be braced or uppercase): a valid URI.
        if let Ok(value) = axum::http::HeaderValue::from_str(&link) {
            response.headers_mut().insert(axum::http::header::LINK, value);
        }
    }
    Ok(response)
}

async fn ledger_head(
    State(state): State<AppState>,
    who: Principal,
    query: QueryParams<NoQuery>,
) -> ApiResult<Response> {
    route_query(query)?;
    who.require(Permission::Read)?;
    commands::wait_log_readable(&state, None).await?;
    commands::refuse_unreadable(&state, None)?;
    let head = state.writer.reader().head().map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(AxumJson(serde_json::json!({
        "head_seq": head.seq,
        "head_hash": eventlog::json::hex(&head.hash),
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
    query: QueryParams<FeedQuery>,
) -> ApiResult<Response> {
    who.require(Permission::Audit)?;
    if who.scope.is_some() {
        return Err(ApiError::forbidden(
            "the raw event feed spans every namespace; a namespace-scoped token may not read it",
        ));
    }
    let query = route_query(query)?;
    // "What exists now" includes every write acknowledged before this request; the answer
    // says up to which seq, so a reader can tell a whole feed from one cut short.
    let readable = if query.follow { None } else { Some(commands::wait_log_readable(&state, None).await?) };
    let sse = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(accepts_event_stream);
    // An EventSource reconnects to the URL it started with, saying where it got to: it resumes
    // after that record, not from the URL's `from_seq` again. An empty id is no id (as in the
    // SSE specification).
    let last_event = if sse { headers.get("last-event-id").map(|v| v.to_str().unwrap_or("?").trim()) } else { None };
    let last_event = last_event.filter(|id| !id.is_empty());
    let from_seq = match last_event {
        Some(id) => id.parse::<u64>().ok().and_then(|seq| seq.checked_add(1)).ok_or_else(|| {
            ApiError::bad_request(format!("Last-Event-ID must be the seq of a record the feed sent, not {id:?}"))
        })?,
        None => query.from_seq,
    };
    let field = if last_event.is_some() { readmodels::LAST_EVENT_ID } else { "from_seq" };
    crate::readmodels::check_feed_start(&state, from_seq, field)?;
    let slot = state.streams.take(&who.name)?;
    let subscription = Subscription::new(state.writer.reader().clone(), state.writer.feed().clone(), from_seq);
    let ends = crate::server::stopping_or_revoked(&state, &who);
    let mut limit = query.limit.unwrap_or(u64::MAX);
    if let Some(readable) = readable {
        // What exists now ends at the head the answer names: it read on to wherever the writes
        // had got by the time a slow reader caught up, and under steady writes never ended
        // (found by a review).
        limit = limit.min((readable + 1).saturating_sub(from_seq));
    }
    let stream = slot.hold(feed_stream(&state, subscription, limit, query.follow, sse, ends));
    let content_type = if sse { "text/event-stream" } else { "application/x-ndjson" };
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(seq) = readable {
        // After a failed checkpoint, the feed ends before acknowledged records it cannot read:
        // the header names them, so the reader sees the feed was cut short.
        let seq =
            if state.writer.has_unreadable_records(None) { seq.max(state.writer.acknowledged_head()) } else { seq };
        response.headers_mut().insert(eventlog::json::FEED_HEAD_HEADER, HeaderValue::from(seq));
    }
    Ok(response)
}

/// Whether an `Accept` header asks for Server-Sent Events rather than NDJSON (the default):
/// a `text/event-stream` media range (any case) with a quality above 0 and at least that of
/// any range NDJSON matches (`application/x-ndjson`, `application/*`, `*/*`). A malformed
/// quality refuses its range.
fn accepts_event_stream(accept: &str) -> bool {
    let (mut sse, mut ndjson) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let mut quality = 1.0f32;
        for parameter in parts {
            if let Some((key, value)) = parameter.split_once('=')
                && key.trim().eq_ignore_ascii_case("q")
            {
                quality = value.trim().parse::<f32>().ok().filter(|q| (0.0..=1.0).contains(q)).unwrap_or(0.0);
            }
        }
        match media.as_str() {
            "text/event-stream" => sse = sse.max(quality),
            "application/x-ndjson" | "application/*" | "*/*" => ndjson = ndjson.max(quality),
            _ => {}
        }
    }
    sse > 0.0 && sse >= ndjson
}

/// The feed's body. A following feed ends, after a whole record, when the server shuts down
/// or a reload of the tokens revokes the reader's token (`stopping`): the client resumes from
/// the seq after the last one it got (with a valid token). A feed without
/// `follow` reads on to its end through a shutdown's grace, its batches made on the HTTP
/// workers from then on. A record that cannot be read or
/// decoded aborts the body (no clean end), so no reader mistakes the part before it for the
/// whole. A reader catching up gets its batches made on the bulk-read threads
/// ([`crate::streams::next_batch`]); each record's line is made once for all feeds
/// ([`crate::feed_lines`]).
fn feed_stream(
    state: &AppState,
    subscription: Subscription,
    limit: u64,
    follow: bool,
    sse: bool,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + use<> {
    type Next = Option<(Subscription, u64, tokio::sync::watch::Receiver<bool>)>;
    let fail = |message: String| -> Option<(Result<Bytes, std::io::Error>, Next)> {
        Some((Err(std::io::Error::other(message)), None))
    };
    let (bulk_reads, lines, server_stopping) =
        (state.bulk_reads.clone(), state.feed_lines.clone(), state.stopping.clone());
    futures_util::stream::unfold(Some((subscription, 0u64, stopping)), move |state| {
        let (bulk_reads, lines, server_stopping) = (bulk_reads.clone(), lines.clone(), server_stopping.clone());
        async move {
            let (mut sub, sent, mut stopping) = state?;
            loop {
                if sent >= limit || (follow && *stopping.borrow()) {
                    return None;
                }
                let max = (limit - sent).min(1024) as usize;
                let lines = lines.clone();
                let encode = move |batch: Vec<StoredRecord>| encode_feed_batch(&batch, sse, &lines);
                // Once the server stops, a feed reading on through the grace makes its batches
                // here: the bulk-read threads may get no CPU while other processes want it. (Not
                // once its token is revoked, which `stopping` also says: it reads on as before.)
                let bulk_reads = (!*server_stopping.borrow()).then_some(&bulk_reads);
                let made = match crate::streams::next_batch(bulk_reads, sub, max, encode).await {
                    Ok((next, made)) => {
                        sub = next;
                        made
                    }
                    Err(message) => return fail(message),
                };
                match made {
                    Some(Ok((body, records))) => return Some((Ok(body), Some((sub, sent + records, stopping)))),
                    Some(Err(message)) => return fail(message),
                    None if !follow => return None,
                    None => {}
                }
                // Caught up: wait for the writer's next records, with a keep-alive every 15 s so
                // proxies and clients see the stream is alive.
                let published = tokio::time::timeout(Duration::from_secs(15), sub.wait_published());
                let waited = tokio::select! {
                    waited = published => waited,
                    _ = stopping.wait_for(|stop| *stop) => return None,
                };
                if waited.is_err() {
                    let keep_alive = Bytes::from_static(if sse { b": keep-alive\n\n" } else { b"\n" });
                    return Some((Ok(keep_alive), Some((sub, sent, stopping))));
                }
            }
        }
    })
}

/// A batch of the feed as its body's bytes (NDJSON lines or Server-Sent Events), and how many
/// records it holds; a record that cannot be decoded fails the whole batch.
fn encode_feed_batch(
    batch: &[StoredRecord],
    sse: bool,
    lines: &crate::feed_lines::FeedLines,
) -> Result<(Bytes, u64), String> {
    use std::io::Write as _;
    let mut out = Vec::with_capacity(batch.len() * 256);
    for record in batch {
        let line = lines.line_of(record)?;
        if sse {
            write!(out, "id: {}\nevent: {}\ndata: ", line.seq, line.event_type).expect("writes to a Vec");
            out.extend_from_slice(&line.json);
            out.extend_from_slice(b"\n\n");
        } else {
            out.extend_from_slice(&line.json);
            out.push(b'\n');
        }
    }
    Ok((Bytes::from(out), batch.len() as u64))
}

// ----- read models (SQL projections) -----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewQuery {
    namespace: Option<String>,
    state: Option<String>,
    tag: Option<String>,
    first: Option<u32>,
    after: Option<String>,
    min_seq: Option<u64>,
    window_minutes: Option<u32>,
    task: Option<String>,
    actor: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    from_seq: Option<u64>,
    to_seq: Option<u64>,
    from: Option<String>,
    to: Option<String>,
}

type ViewParams = QueryParams<ViewQuery>;

/// The parameters every listing view takes (a page and read-your-writes).
const LIST_PARAMS: [&str; 3] = ["first", "after", "min_seq"];

/// A view's query: the parameters of every view parse into one struct, and a parameter of
/// another view is refused like an unknown one (400 `bad_request`), not silently ignored.
fn view_query(params: ViewParams, takes: &[&str]) -> ApiResult<ViewQuery> {
    let query = route_query(params)?;
    if let Some(other) = query.given().into_iter().find(|name| !takes.contains(name)) {
        return Err(ApiError::bad_request(format!(
            "this view does not take the query parameter `{other}`; it takes: {}",
            takes.join(", ")
        ))
        .with_field(other));
    }
    Ok(query)
}

impl ViewQuery {
    fn list(&self) -> readmodels::ListArgs {
        readmodels::ListArgs { first: self.first.unwrap_or(0), after: self.after.clone(), min_seq: self.min_seq }
    }

    /// The names of the parameters the query gave.
    fn given(&self) -> Vec<&'static str> {
        let given = [
            ("namespace", self.namespace.is_some()),
            ("state", self.state.is_some()),
            ("tag", self.tag.is_some()),
            ("first", self.first.is_some()),
            ("after", self.after.is_some()),
            ("min_seq", self.min_seq.is_some()),
            ("window_minutes", self.window_minutes.is_some()),
            ("task", self.task.is_some()),
            ("actor", self.actor.is_some()),
            ("type", self.event_type.is_some()),
            ("from_seq", self.from_seq.is_some()),
            ("to_seq", self.to_seq.is_some()),
            ("from", self.from.is_some()),
            ("to", self.to.is_some()),
        ];
        given.into_iter().filter(|(_, present)| *present).map(|(name, _)| name).collect()
    }
}

async fn list_tasks(
    State(state): State<AppState>,
    who: Principal,
    params: ViewParams,
) -> ApiResult<AxumJson<serde_json::Value>> {
    let q = view_query(params, &["namespace", "state", "tag", "first", "after", "min_seq"])?;
    let args = q.list();
    Ok(AxumJson(readmodels::to_json(&readmodels::tasks(&state, &who, q.namespace, q.state, q.tag, args).await?)))
}

async fn list_queue(
    State(state): State<AppState>,
    who: Principal,
    params: ViewParams,
) -> ApiResult<AxumJson<serde_json::Value>> {
    let q = view_query(params, &["namespace", "state", "first", "after", "min_seq"])?;
    let args = q.list();
    Ok(AxumJson(readmodels::to_json(&readmodels::queue(&state, &who, q.namespace, q.state, args).await?)))
}

async fn list_dead_letters(
    State(state): State<AppState>,
    who: Principal,
    params: ViewParams,
) -> ApiResult<AxumJson<serde_json::Value>> {
    let q = view_query(params, &["namespace", "first", "after", "min_seq"])?;
    let args = q.list();
    Ok(AxumJson(readmodels::to_json(&readmodels::dead_letters(&state, &who, q.namespace, args).await?)))
}

async fn dashboard(
    State(state): State<AppState>,
    who: Principal,
    params: ViewParams,
) -> ApiResult<AxumJson<serde_json::Value>> {
    let q = view_query(params, &["namespace", "window_minutes", "min_seq"])?;
    Ok(AxumJson(readmodels::to_json(
        &readmodels::dashboard(&state, &who, q.namespace, q.window_minutes, q.min_seq).await?,
    )))
}

async fn audit_log(
    State(state): State<AppState>,
    who: Principal,
    params: ViewParams,
) -> ApiResult<AxumJson<serde_json::Value>> {
    let q = view_query(
        params,
        &["task", "actor", "type", "from_seq", "to_seq", "from", "to", "first", "after", "min_seq"],
    )?;
    let args = q.list();
    let filter = readmodels::AuditArgs {
        task: q.task,
        actor: q.actor,
        event_type: q.event_type,
        from_seq: q.from_seq,
        to_seq: q.to_seq,
        from_time: q.from,
        to_time: q.to,
    };
    Ok(AxumJson(readmodels::to_json(&readmodels::audit_log(&state, &who, filter, args).await?)))
}

async fn workers(
    State(state): State<AppState>,
    who: Principal,
    params: ViewParams,
) -> ApiResult<AxumJson<serde_json::Value>> {
    let q = view_query(params, &LIST_PARAMS)?;
    Ok(AxumJson(readmodels::to_json(&readmodels::workers(&state, &who, q.list()).await?)))
}

async fn projector_status(
    State(state): State<AppState>,
    who: Principal,
    query: QueryParams<NoQuery>,
) -> ApiResult<AxumJson<serde_json::Value>> {
    route_query(query)?;
    Ok(AxumJson(readmodels::to_json(&readmodels::projector_status(&state, &who)?)))
}

/// POST /v1/admin/projections/{projector}/rebuild: builds the projector's tables again from the
/// log beside the live ones, which go on serving, and swaps them in once caught up, so a table
/// dropped or rows changed by hand in the projections database are repaired without a restart
/// (they stalled the projector, or stayed wrong, until its checkpoint row was deleted). Admin
/// only; answered at once (202): the build's progress is the projector's `shadow` row in
/// `/v1/views/projections`. Asked again while one runs, it starts nothing more.
async fn rebuild_projector(
    State(state): State<AppState>,
    who: Principal,
    Path(name): Path<String>,
    // No body, or an empty object: anything else is refused like any other route's junk. (A
    // query string is refused by `refuse_query_on_commands`.)
    MaybeJson(_): MaybeJson<NoFields>,
) -> ApiResult<Response> {
    who.require_unscoped_admin("rebuild a projection")?;
    let Some(kind) = projections::ProjectorKind::from_name(&name) else {
        let mut known: Vec<&str> = projections::ProjectorKind::ALL.iter().map(|k| k.name()).collect();
        known.sort_unstable();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "projector_not_found",
            format!("no projector {name:?}; the projectors are {}", known.join(", ")),
        ));
    };
    let projections = state.projections.get()?;
    if let Err(fenced) = projections.fence().check() {
        return Err(ApiError::unavailable("projections_unavailable", fenced.to_string(), 5));
    }
    // A rebuild writes a whole projector's tables again: not under the disk's floor (it filled
    // the disk to 0 in a black-box check).
    if state.writer.stats().storage_low.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::storage_low(
            "the data directory's disk is under --min-free-disk-mib: a rebuild would write a projector's tables \
             again; free some space first",
        ));
    }
    let status = projections.status().map_err(|e| ApiError::internal(e.to_string()))?;
    let running = status.iter().any(|s| s.projector == kind.name() && s.slot == "shadow" && s.running);
    if !running {
        let projections = projections.clone();
        tracing::info!(projector = kind.name(), actor = %who.actor(), "projection rebuild started");
        tokio::spawn(async move {
            match projections.rebuild(kind).await {
                Ok(live) => {
                    tracing::info!(projector = kind.name(), seq = live.last_seq, "projection rebuilt and swapped in")
                }
                Err(projections::RuntimeError::RebuildInProgress(_)) => {}
                Err(error) => tracing::error!(projector = kind.name(), %error, "projection rebuild failed"),
            }
        });
    }
    let body = serde_json::json!({ "projector": kind.name(), "rebuilding": true, "started": !running });
    Ok((StatusCode::ACCEPTED, AxumJson(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::accepts_event_stream;

    #[test]
    fn event_streams_are_chosen_by_media_range_not_by_substring() {
        for yes in [
            "text/event-stream",
            "TEXT/Event-Stream",
            "application/json, text/event-stream;q=0.5",
            " text/event-stream ; charset=utf-8",
            "text/event-stream, */*",
            "application/x-ndjson;q=0.5, text/event-stream",
        ] {
            assert!(accepts_event_stream(yes), "{yes}");
        }
        for no in [
            "text/event-stream;q=0",
            "text/event-stream; q=0.0",
            "application/x-ndjson",
            "*/*",
            "text/event-streams",
            "",
            "application/x-ndjson, text/event-stream;q=0.1",
            "text/event-stream;q=NaN",
            "text/event-stream;q=2",
        ] {
            assert!(!accepts_event_stream(no), "{no}");
        }
    }
}
