//! GraphQL at `/graphql` (GraphiQL on GET in a browser; subscriptions over
//! WebSocket at `/graphql/ws`). Queries read the log and the domain fold;
//! mutations mirror the REST commands through the same `commands` module;
//! subscriptions follow the live feed. The projection-backed queries answer
//! with `projections::query`'s row structs as typed objects (that crate's
//! `graphql` feature), with REST's field names in camelCase.
//!
//! Limits, checked before any resolver runs: query depth, complexity,
//! recursion, directives, aliases, and page size; one operation per request
//! (no batches). Authentication is the same bearer token as REST: the HTTP
//! header for queries and mutations, the `connection_init` payload
//! (`{"Authorization": "Bearer …"}`) for WebSocket subscriptions.

use std::sync::Arc;

use async_graphql::http::GraphiQLSource;
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, Selection, SelectionSet};
use async_graphql::{Context, ErrorExtensions, Object, Schema, SimpleObject, Subscription};
use async_graphql_axum::GraphQLResponse;
use axum::extract::{FromRequest, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use domain::StreamId;
use eventlog::{Subscription as LogSubscription, decode_event};
use futures_util::Stream;
use projections::ProjectorStatus;
use projections::query::{AuditEntry, Dashboard, DeadLetter, Page, TaskSummary, WorkerView};

use crate::auth::{HasTokens, Permission, Principal};
use crate::commands::{self, AsOf, Caller};
use crate::error::{ApiError, ApiResult};
use crate::readmodels::{self, AuditArgs, ListArgs};
use crate::server::AppState;
use crate::streams::{CatchUpMark, CatchingUp};
use crate::wire::*;

pub const DEPTH_MAX: usize = 12;
pub const COMPLEXITY_MAX: usize = 2_000;
pub const RECURSIVE_DEPTH_MAX: usize = 32;
pub const DIRECTIVES_MAX: usize = 8;
pub const ALIASES_MAX: usize = 64;
pub const PAGE_MAX: usize = 500;
/// Brackets (`{`, `[`, `(`) nested in a document's text: room for a payload literal
/// [`JSON_DEPTH_MAX`] levels deep inside a mutation's arguments. Parsing and converting a
/// nesting of ~1,500 levels overflowed a request thread's stack and aborted the server.
pub const NESTING_MAX: usize = JSON_DEPTH_MAX + 16;
/// Tokens (names, numbers, strings, punctuators; `.`, `-` and `+` each count one) in a document:
/// room for the largest payload inline (64 KiB of `-1,` or `1.5,` is ~45,000). Parsed, a token
/// costs up to ~700 bytes (a field or a spread), so one parse takes at most ~70 MB: a 3.8 MB
/// list of zeros took 320 MB and 4 s of a core before it was refused. Larger batches go in
/// variables, which are JSON.
pub const TOKENS_MAX: usize = 100_000;
/// Codes of the limits [`document_limits`] and [`lexical_checks`] apply.
const DOCUMENT_LIMIT_CODES: [&str; 4] = ["too_many_aliases", "query_too_complex", "query_too_deep", "query_too_large"];

pub type LedgerSchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

pub fn schema(state: AppState) -> LedgerSchema {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(state)
        .limit_depth(DEPTH_MAX)
        .limit_complexity(COMPLEXITY_MAX)
        .limit_recursive_depth(RECURSIVE_DEPTH_MAX)
        .limit_directives(DIRECTIVES_MAX)
        .extension(DocumentLimits)
        .finish()
}

impl From<ApiError> for async_graphql::Error {
    fn from(e: ApiError) -> Self {
        async_graphql::Error::new(e.message.clone()).extend_with(|_, ext| {
            ext.set("code", e.code);
            ext.set("status", e.status.as_u16());
            if let Some(field) = &e.field {
                ext.set("field", field.as_str());
            }
        })
    }
}

fn state<'a>(ctx: &Context<'a>) -> &'a AppState {
    ctx.data_unchecked::<AppState>()
}

fn who<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a Principal> {
    ctx.data_opt::<Principal>().ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>").into())
}

/// Waits (bounded) until the log's readers see `min_seq` and every acknowledged write:
/// read-your-writes for the queries answered from the log itself (task, taskHistory, queue).
/// Queries answered from SQL wait for the projectors instead (`readmodels::wait_min_seq`).
async fn wait_min_seq(state: &AppState, min_seq: Option<u64>) -> async_graphql::Result<()> {
    commands::wait_log_readable(state, min_seq).await?;
    Ok(())
}

fn parse_as_of(text: Option<String>) -> async_graphql::Result<Option<AsOf>> {
    Ok(text.as_deref().map(AsOf::parse).transpose()?)
}

#[derive(SimpleObject)]
pub struct LedgerHead {
    pub head_seq: u64,
    pub head_hash: String,
}

/// One step in a queue view.
#[derive(SimpleObject)]
pub struct QueueStep {
    pub task_id: String,
    pub step: String,
    pub handler: String,
    pub state: String,
    pub priority: i32,
    pub attempts: u32,
    pub worker: Option<String>,
    pub lease_deadline: Option<String>,
    pub retry_at: Option<String>,
}

#[derive(SimpleObject)]
pub struct QueuePage {
    pub namespace: String,
    pub paused: bool,
    pub concurrency_limit: Option<u32>,
    pub steps: Vec<QueueStep>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
    /// The seq the view was taken at.
    pub seq: u64,
}

/// Where a queue page starts: after this (task, step), in the order the page sorts its steps.
/// A key rather than an offset, so steps that leave or join the queue between pages neither
/// hide nor repeat the ones after the cursor.
type QueueCursor = (domain::TaskId, String);

/// Whole-ledger folds (`queue(asOf:)`) running at once, server-wide.
static WHOLE_LEDGER_FOLDS: std::sync::LazyLock<tokio::sync::Semaphore> =
    std::sync::LazyLock::new(|| tokio::sync::Semaphore::new(1));

fn parse_queue_cursor(cursor: &str) -> Result<QueueCursor, ApiError> {
    cursor
        .split_once(':')
        .and_then(|(task, step)| {
            Some((task.parse::<uuid::Uuid>().ok().and_then(|id| domain::TaskId::new(id).ok())?, step))
        })
        .map(|(task, step)| (task, step.to_owned()))
        .ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_cursor", "after must be a cursor from a previous page")
                .with_field("after")
        })
}

/// The steps of `ns` still in its queue (not finished, not dead-lettered: those are in
/// `deadLetters`), as the SQL queue view has them, ordered by task and step name.
fn queue_page(
    ledger: &domain::Ledger,
    ns: &domain::Namespace,
    state_filter: Option<&str>,
    first: usize,
    after: Option<&QueueCursor>,
    seq: u64,
) -> QueuePage {
    // The namespace's tasks in id order from the cursor's task on, each one's steps by name,
    // until one step past the page: the read holds up the writer, so it reads what the page
    // needs, not every live task.
    let mut steps: Vec<(domain::TaskId, &domain::Task, &domain::Step)> = Vec::with_capacity(first.min(64) + 1);
    for task in ledger.tasks_in(ns, after.map(|(task, _)| *task)) {
        let mut of_task: Vec<&domain::Step> = task
            .steps
            .iter()
            .filter(|s| !s.state.is_terminal())
            .filter(|s| state_filter.is_none_or(|f| s.state.as_str() == f))
            .filter(|s| after.is_none_or(|(t, step)| (task.id, s.name.as_str()) > (*t, step.as_str())))
            .collect();
        of_task.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        steps.extend(of_task.into_iter().map(|s| (task.id, task, s)));
        if steps.len() > first {
            break;
        }
    }
    let more = steps.len() > first;
    let page: Vec<QueueStep> = steps
        .into_iter()
        .take(first)
        .map(|(id, t, s)| QueueStep {
            task_id: id.to_string(),
            step: s.name.to_string(),
            handler: s.handler.to_string(),
            state: s.state.as_str().to_owned(),
            priority: t.priority.get(),
            attempts: s.attempts,
            worker: s.worker.as_ref().map(ToString::to_string),
            lease_deadline: s.lease_deadline.map(time),
            retry_at: s.retry_at.map(time),
        })
        .collect();
    let next_cursor = more.then(|| page.last().map(|last| format!("{}:{}", last.task_id, last.step))).flatten();
    let settings = ledger.queue_settings(ns);
    QueuePage {
        namespace: ns.to_string(),
        paused: settings.paused,
        concurrency_limit: settings.concurrency_limit,
        steps: page,
        next_cursor,
        seq,
    }
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// A task as it is now, or `asOf` a past seq or RFC 3339 time (folded
    /// through the domain from the task's events, not read from SQL).
    async fn task(
        &self,
        ctx: &Context<'_>,
        id: String,
        as_of: Option<String>,
        min_seq: Option<u64>,
    ) -> async_graphql::Result<Option<TaskBody>> {
        let state = state(ctx);
        wait_min_seq(state, min_seq).await?;
        match commands::task_view(state, who(ctx)?, &id, parse_as_of(as_of)?) {
            Ok(task) => Ok(Some(task)),
            Err(e) if e.status == StatusCode::NOT_FOUND => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A task's events from the log (authoritative), in order: at most `limit` (1 to 10,000;
    /// absent: 1,000) from stream version `fromVersion` (the first record is 1). A page shorter
    /// than the limit reached the task's last record; the next page starts at the last record's
    /// `streamVersion` + 1.
    async fn task_history(
        &self,
        ctx: &Context<'_>,
        id: String,
        min_seq: Option<u64>,
        from_version: Option<u64>,
        limit: Option<u32>,
    ) -> async_graphql::Result<Vec<RecordBody>> {
        let state = state(ctx);
        wait_min_seq(state, min_seq).await?;
        let limit = limit.map_or(commands::HISTORY_PAGE_DEFAULT, |l| l as usize);
        if limit == 0 || limit > commands::HISTORY_PAGE_MAX {
            let message = format!("limit must be 1 to {}", commands::HISTORY_PAGE_MAX);
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_page", message).with_field("limit").into());
        }
        Ok(commands::task_history(state, who(ctx)?, &id, from_version.unwrap_or(1), limit)?.records)
    }

    /// The non-final steps of a queue, now or `asOf` a past point (the whole
    /// ledger folded from the nearest snapshot).
    // GraphQL arguments are the resolver's parameters.
    #[allow(clippy::too_many_arguments)]
    async fn queue(
        &self,
        ctx: &Context<'_>,
        namespace: String,
        state: Option<String>,
        #[graphql(default = 100)] first: usize,
        after: Option<String>,
        as_of: Option<String>,
        min_seq: Option<u64>,
    ) -> async_graphql::Result<QueuePage> {
        let app = self::state(ctx).clone();
        let who = who(ctx)?;
        who.require(Permission::Read)?;
        wait_min_seq(&app, min_seq).await?;
        let ns = commands::parse_namespace(&namespace)?;
        if !who.may_see(&ns) {
            return Err(ApiError::forbidden(format!("your credentials do not cover namespace {ns}")).into());
        }
        if first == 0 || first > PAGE_MAX {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_page",
                format!("first must be 1 to {PAGE_MAX}"),
            )
            .with_field("first")
            .into());
        }
        let after = after.as_deref().map(parse_queue_cursor).transpose()?;
        projections::query::check_step_state(&state).map_err(|e| ApiError::from(e).with_field("state"))?;
        let filter = state;
        let point = parse_as_of(as_of)?;
        // A past queue folds a whole ledger, as large as the writer's: one at a time, server-wide
        // (a query of 64 aliased `queue(asOf:)` fields folded 64 ledgers at once).
        let _folding = match point {
            Some(_) => Some(WHOLE_LEDGER_FOLDS.acquire().await.expect("the fold semaphore is never closed")),
            None => None,
        };
        let page = tokio::task::spawn_blocking(move || -> Result<QueuePage, ApiError> {
            let reader = app.writer.reader();
            match point {
                None => {
                    let writer = app.writer.clone();
                    writer
                        .read(move |ledger| {
                            // Between batches, the durable head is the state the ledger shows.
                            let seq = ledger_seq(&app);
                            queue_page(ledger, &ns, filter.as_deref(), first, after.as_ref(), seq)
                        })
                        .map_err(ApiError::from)
                }
                Some(point) => {
                    let seq = match commands::as_of_within_log(&app, point)? {
                        AsOf::Seq(seq) => seq,
                        AsOf::Time(t) => seq_at_time(reader, t)?,
                    };
                    let (ledger, _) = eventlog::fold_to(reader, app.writer.snapshots(), seq)
                        .map_err(|e| ApiError::internal(e.to_string()))?;
                    Ok(queue_page(&ledger, &ns, filter.as_deref(), first, after.as_ref(), seq))
                }
            }
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
        Ok(page)
    }

    /// Tasks from the projections (filters combine with AND), a page at a time.
    #[allow(clippy::too_many_arguments)]
    async fn tasks(
        &self,
        ctx: &Context<'_>,
        namespace: Option<String>,
        state: Option<String>,
        tag: Option<String>,
        #[graphql(default = 50)] first: u32,
        after: Option<String>,
        min_seq: Option<u64>,
    ) -> async_graphql::Result<Page<TaskSummary>> {
        let args = ListArgs { first, after, min_seq };
        Ok(readmodels::tasks(self::state(ctx), who(ctx)?, namespace, state, tag, args).await?)
    }

    /// Steps in the dead-letter queue (state `error`).
    async fn dead_letters(
        &self,
        ctx: &Context<'_>,
        namespace: Option<String>,
        #[graphql(default = 50)] first: u32,
        after: Option<String>,
        min_seq: Option<u64>,
    ) -> async_graphql::Result<Page<DeadLetter>> {
        Ok(readmodels::dead_letters(state(ctx), who(ctx)?, namespace, ListArgs { first, after, min_seq }).await?)
    }

    /// Counts by namespace and state, per-minute throughput over `window`
    /// minutes, wait and run latency histograms.
    async fn dashboard(
        &self,
        ctx: &Context<'_>,
        namespace: Option<String>,
        window: Option<u32>,
        min_seq: Option<u64>,
    ) -> async_graphql::Result<Dashboard> {
        Ok(readmodels::dashboard(state(ctx), who(ctx)?, namespace, window, min_seq).await?)
    }

    /// The audit log: one row per event, filtered, a page at a time.
    #[allow(clippy::too_many_arguments)]
    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        task_id: Option<String>,
        actor: Option<String>,
        event_type: Option<String>,
        from_seq: Option<u64>,
        to_seq: Option<u64>,
        #[graphql(default = 50)] first: u32,
        after: Option<String>,
        min_seq: Option<u64>,
    ) -> async_graphql::Result<Page<AuditEntry>> {
        let filter = AuditArgs { task: task_id, actor, event_type, from_seq, to_seq, ..AuditArgs::default() };
        Ok(readmodels::audit_log(state(ctx), who(ctx)?, filter, ListArgs { first, after, min_seq }).await?)
    }

    /// Workers: last seen, leases held, outcomes.
    async fn workers(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: u32,
        after: Option<String>,
        min_seq: Option<u64>,
    ) -> async_graphql::Result<Page<WorkerView>> {
        Ok(readmodels::workers(state(ctx), who(ctx)?, ListArgs { first, after, min_seq }).await?)
    }

    /// Each projector's checkpoint and lag.
    async fn projections(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<ProjectorStatus>> {
        Ok(readmodels::projector_status(state(ctx), who(ctx)?)?)
    }

    /// The head of the log.
    async fn ledger(&self, ctx: &Context<'_>) -> async_graphql::Result<LedgerHead> {
        who(ctx)?.require(Permission::Read)?;
        commands::wait_log_readable(state(ctx), None).await?;
        commands::refuse_unreadable(state(ctx), None)?;
        let head = state(ctx).writer.reader().head().map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(LedgerHead { head_seq: head.seq, head_hash: eventlog::json::hex(&head.hash) })
    }
}

fn ledger_seq(state: &AppState) -> u64 {
    state.writer.reader().head().map(|h| h.seq).unwrap_or(0)
}

/// The last seq recorded at or before `t`.
fn seq_at_time(reader: &eventlog::LogReader, t: domain::Timestamp) -> Result<u64, ApiError> {
    let internal = |e: eventlog::ReadError| ApiError::internal(e.to_string());
    let head = reader.head().map_err(internal)?;
    // Binary search over seqs: recorded_at never decreases along the log.
    let (mut lo, mut hi) = (0u64, head.seq);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        let record = reader.read_range(mid, mid, 1).map_err(internal)?;
        match record.first() {
            Some(r) if r.recorded_at_us <= t.as_micros() => lo = mid,
            _ => hi = mid - 1,
        }
    }
    Ok(lo)
}

pub struct MutationRoot;

fn caller<'a>(ctx: &Context<'a>, command_id: Option<String>) -> async_graphql::Result<Caller<'a>> {
    Ok(Caller::new(who(ctx)?, command_id)?)
}

/// Runs a mutation's one command as the caller, under its `commandId`, as REST runs a route's.
async fn run(
    ctx: &Context<'_>,
    command_id: Option<String>,
    permission: Permission,
    command: ApiResult<domain::Command>,
) -> async_graphql::Result<CommandResponse> {
    Ok(commands::run(state(ctx), &caller(ctx, command_id)?, permission, command).await?)
}

#[Object]
impl MutationRoot {
    async fn create_task(
        &self,
        ctx: &Context<'_>,
        input: CreateTaskRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<CreatedResponse> {
        Ok(commands::create_task(state(ctx), &caller(ctx, command_id)?, input).await?.1)
    }

    async fn create_tasks(
        &self,
        ctx: &Context<'_>,
        input: CreateBatchRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<BatchCreatedResponse> {
        Ok(commands::create_batch(state(ctx), &caller(ctx, command_id)?, input).await?.1)
    }

    async fn claim_steps(
        &self,
        ctx: &Context<'_>,
        input: ClaimRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<ClaimResponse> {
        Ok(commands::claim(state(ctx), &caller(ctx, command_id)?, input).await?)
    }

    async fn cancel_task(
        &self,
        ctx: &Context<'_>,
        id: String,
        reason: Option<String>,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::cancel(&id, Some(ReasonRequest { reason }));
        run(ctx, command_id, Permission::Cancel, command).await
    }

    async fn give_up_task(
        &self,
        ctx: &Context<'_>,
        id: String,
        reason: Option<String>,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::give_up(&id, Some(ReasonRequest { reason }));
        run(ctx, command_id, Permission::Operate, command).await
    }

    async fn heartbeat(
        &self,
        ctx: &Context<'_>,
        task_id: String,
        step: String,
        input: HeartbeatRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::heartbeat(&task_id, &step, input);
        run(ctx, command_id, Permission::Work, command).await
    }

    async fn complete_step(
        &self,
        ctx: &Context<'_>,
        task_id: String,
        step: String,
        input: CompleteRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::complete(&task_id, &step, input);
        run(ctx, command_id, Permission::Work, command).await
    }

    /// Completes several leased steps, each its own command, in one commit; each result says
    /// how its completion went (see `POST /v1/completions`).
    async fn complete_steps(
        &self,
        ctx: &Context<'_>,
        input: CompleteBatchRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<CompletionsResponse> {
        Ok(commands::complete_batch(state(ctx), &caller(ctx, command_id)?, input).await?)
    }

    async fn fail_step(
        &self,
        ctx: &Context<'_>,
        task_id: String,
        step: String,
        input: FailRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::fail(&task_id, &step, input);
        run(ctx, command_id, Permission::Work, command).await
    }

    async fn release_step(
        &self,
        ctx: &Context<'_>,
        task_id: String,
        step: String,
        input: ReleaseRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::release(&task_id, &step, input);
        run(ctx, command_id, Permission::Work, command).await
    }

    async fn add_steps(
        &self,
        ctx: &Context<'_>,
        task_id: String,
        step: String,
        input: AddStepsRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::add_steps(&task_id, &step, input);
        run(ctx, command_id, Permission::Work, command).await
    }

    async fn retry_step(
        &self,
        ctx: &Context<'_>,
        task_id: String,
        step: String,
        #[graphql(default)] reset_attempts: bool,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::retry(&task_id, &step, Some(RetryStepRequest { reset_attempts }));
        run(ctx, command_id, Permission::Operate, command).await
    }

    async fn resolve_step(
        &self,
        ctx: &Context<'_>,
        task_id: String,
        step: String,
        input: ResolveRequest,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::resolve(&task_id, &step, input);
        run(ctx, command_id, Permission::Operate, command).await
    }

    async fn pause_queue(
        &self,
        ctx: &Context<'_>,
        namespace: String,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        run(ctx, command_id, Permission::Operate, commands::pause(&namespace)).await
    }

    async fn resume_queue(
        &self,
        ctx: &Context<'_>,
        namespace: String,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        run(ctx, command_id, Permission::Operate, commands::resume(&namespace)).await
    }

    async fn set_queue_concurrency(
        &self,
        ctx: &Context<'_>,
        namespace: String,
        limit: Option<u32>,
        command_id: Option<String>,
    ) -> async_graphql::Result<CommandResponse> {
        let command = commands::concurrency(&namespace, ConcurrencyRequest { limit });
        run(ctx, command_id, Permission::Operate, command).await
    }
}

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Records from `fromSeq` on (catch-up, then live), optionally only one
    /// task's or some event types.
    async fn events(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 1)] from_seq: u64,
        task_id: Option<String>,
        types: Option<Vec<String>>,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<RecordBody>>> {
        let who = who(ctx)?;
        who.require(Permission::Audit)?;
        if who.scope.is_some() {
            return Err(ApiError::forbidden("a namespace-scoped token may not follow every event").into());
        }
        let stream_key = task_id
            .as_deref()
            .map(|id| crate::readmodels::filter_task(id, "taskId"))
            .transpose()?
            .map(|t| StreamId::Task(t).to_key());
        // A type no event has would match nothing, forever: a typo must be told; so must an
        // empty list.
        if types.as_ref().is_some_and(Vec::is_empty) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_filter",
                "types names no event type, so nothing would ever match; leave it out for every type",
            )
            .with_field("types")
            .into());
        }
        if let Some(unknown) =
            types.iter().flatten().find(|name| !domain::Event::TYPES.iter().any(|(known, _)| known == name))
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_filter",
                format!("unknown event type {unknown:?}; types are named as in the feed, e.g. \"task_created\""),
            )
            .with_field("types")
            .into());
        }
        let state = state(ctx);
        crate::readmodels::check_feed_start(state, from_seq, "fromSeq")?;
        let slot = state.streams.take(&who.name)?;
        let subscription = LogSubscription::new(state.writer.reader().clone(), state.writer.feed().clone(), from_seq);
        Ok(slot.hold(record_stream(subscription, state, catching_up(ctx))).filter_map(move |item| {
            std::future::ready(match item {
                Ok((record, event)) => {
                    let keep = stream_key.as_ref().is_none_or(|k| &record.stream == k)
                        && types.as_ref().is_none_or(|t| t.iter().any(|name| name == event.type_name()));
                    keep.then(|| Ok(record_body(&record, &event)))
                }
                Err(error) => Some(Err(error.into())),
            })
        }))
    }

    /// A task's state after each of its events, from now on.
    async fn task(
        &self,
        ctx: &Context<'_>,
        id: String,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<TaskBody>>> {
        let who = who(ctx)?.clone();
        let state = state(ctx).clone();
        // Before the fold, which may read the task's whole history: a refusal costs nothing.
        let slot = state.streams.take(&who.name)?;
        commands::wait_log_readable(&state, None).await?;
        let (mut fold, current) = commands::current_fold(&state, &who, &id)?;
        let key = StreamId::Task(commands::parse_task(&id)?).to_key();
        let subscription =
            LogSubscription::new(state.writer.reader().clone(), state.writer.feed().clone(), current.last_seq + 1);
        // Each update is the task as of its own record, however far behind the subscriber reads.
        let updates = record_stream(subscription, &state, catching_up(ctx)).filter_map(move |item| {
            std::future::ready(match item {
                Ok((record, event)) if record.stream == key => fold.apply(&record, &event).ok().map(Ok),
                Ok(_) => None,
                Err(error) => Some(Err(error.into())),
            })
        });
        // It completes after the task's final state: nothing can follow it (it went on until the
        // client ended it, holding its stream slot: found by a client check).
        // (Ended without waiting for another record, which a finished task never gets.)
        let states = Box::pin(futures_util::stream::once(std::future::ready(Ok(current))).chain(updates));
        let until_final = futures_util::stream::unfold((states, false), |(mut states, finished)| async move {
            if finished {
                return None;
            }
            let item = states.next().await?;
            let finished = matches!(&item, Ok(body) if commands::has_finished(body));
            Some((item, (states, finished)))
        });
        Ok(slot.hold(until_final))
    }
}

use futures_util::StreamExt;

/// Decoded records from a log subscription, following live appends until the server shuts
/// down: then the subscription ends (the client gets its `complete`) instead of being cut
/// with the connection. A record that cannot be read or decoded ends it with an error (503
/// `log_unreadable`) — never a clean end, nor a silent gap, that a client could take for the
/// whole history (as the REST feed aborts its body).
///
/// While its batches are long ones (it is catching up) it is counted in `catching_up`, its
/// socket's count, so that the socket is served on the bulk-read threads meanwhile
/// ([`crate::streams::serve_by_catch_up`]).
fn record_stream(
    subscription: LogSubscription,
    state: &AppState,
    catching_up: Option<Arc<CatchingUp>>,
) -> impl Stream<Item = Result<(eventlog::StoredRecord, domain::Event), ApiError>> + use<> {
    const BATCH_RECORDS_MAX: usize = 256;
    let mut stopping = state.stopping.clone();
    let bulk_reads = state.bulk_reads.clone();
    let mark = catching_up.map(CatchUpMark::new);
    let batches = futures_util::stream::unfold(Some((subscription, mark)), move |running| {
        let bulk_reads = bulk_reads.clone();
        async move {
            let (mut sub, mut mark) = running?;
            loop {
                if let Some(mark) = &mut mark {
                    mark.set(crate::streams::is_catching_up(&sub, BATCH_RECORDS_MAX));
                }
                match crate::streams::next_batch(Some(&bulk_reads), sub, BATCH_RECORDS_MAX, |batch| batch).await {
                    Ok((next, Some(batch))) => return Some((Ok(batch), Some((next, mark)))),
                    Ok((next, None)) => sub = next,
                    Err(message) => return Some((Err(message), None)),
                }
                sub.wait_published().await;
            }
        }
    });
    decoded_until_first_error(batches).take_until(async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    })
}

/// The count of subscriptions catching up on the socket `ctx` runs on (none over POST).
fn catching_up(ctx: &Context<'_>) -> Option<Arc<CatchingUp>> {
    ctx.data_opt::<Arc<CatchingUp>>().cloned()
}

/// Each record of each batch decoded, up to and including the first failure (a batch that
/// could not be read, a record that could not be decoded), after which the stream ends.
fn decoded_until_first_error(
    batches: impl Stream<Item = Result<Vec<eventlog::StoredRecord>, String>>,
) -> impl Stream<Item = Result<(eventlog::StoredRecord, domain::Event), ApiError>> {
    let unreadable = |message: String| ApiError::unavailable("log_unreadable", message, 5);
    let items = batches
        .map(move |batch| {
            let items: Vec<_> = match batch {
                Ok(records) => records
                    .into_iter()
                    .map(|record| match decode_event(&record) {
                        Ok(event) => Ok((record, event)),
                        Err(e) => Err(unreadable(format!("the record at seq {} cannot be decoded: {e}", record.seq))),
                    })
                    .collect(),
                Err(e) => vec![Err(unreadable(format!("the log cannot be read: {e}")))],
            };
            futures_util::stream::iter(items)
        })
        .flatten();
    // Ends right after the failure, without asking the log for more: a failure at the newest
    // record would otherwise leave the client waiting for its `complete` until the next append.
    futures_util::stream::unfold((Box::pin(items), false), |(mut items, failed)| async move {
        if failed {
            return None;
        }
        let item = items.next().await?;
        let failed = item.is_err();
        Some((item, (items, failed)))
    })
}

/// Counts aliased fields in every operation and fragment ([`document_limits`] refuses more than
/// `ALIASES_MAX`).
pub fn count_aliases(document: &ExecutableDocument) -> usize {
    fn in_set(set: &SelectionSet) -> usize {
        set.items
            .iter()
            .map(|item| match &item.node {
                Selection::Field(field) => {
                    usize::from(field.node.alias.is_some()) + in_set(&field.node.selection_set.node)
                }
                Selection::InlineFragment(fragment) => in_set(&fragment.node.selection_set.node),
                Selection::FragmentSpread(_) => 0,
            })
            .sum()
    }
    let operations: usize = document.operations.iter().map(|(_, op)| in_set(&op.node.selection_set.node)).sum();
    let fragments: usize = document.fragments.values().map(|f| in_set(&f.node.selection_set.node)).sum();
    operations + fragments
}

/// Why a document is refused before async-graphql sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum DocumentTooBig {
    /// Selection sets and fragment spreads nested deeper than [`RECURSIVE_DEPTH_MAX`].
    TooDeep,
}

/// Selections of every operation once every fragment spread is expanded (each field, inline
/// fragment and spread counts one, so a spread of a fragment that does not exist counts too),
/// computed with each fragment's size and height remembered, so in time linear in the
/// document and with recursion no deeper than [`RECURSIVE_DEPTH_MAX`]: a deeper nesting, or a
/// longer chain of spreads (in any fragment, used or not), is refused. async-graphql's own
/// checks expand spreads as they go: a 1.3 KB document of fragments that each spread the next
/// one twice took minutes of CPU before it was refused (found by a black-box check: one request
/// froze the server), and a chain of 100,000 spreads would overflow a stack. A cycle counts
/// one; validation refuses it.
pub fn expanded_selections(document: &ExecutableDocument) -> Result<u64, DocumentTooBig> {
    use std::collections::HashMap;
    /// Fragments by name: `None` while being walked (a cycle), then their size and height.
    type Known<'a> = HashMap<&'a str, Option<(u64, usize)>>;
    /// Size and height of `set`, whose selections sit `depth` levels down.
    fn walk<'a>(
        set: &'a SelectionSet,
        depth: usize,
        document: &'a ExecutableDocument,
        known: &mut Known<'a>,
    ) -> Result<(u64, usize), DocumentTooBig> {
        if depth > RECURSIVE_DEPTH_MAX {
            return Err(DocumentTooBig::TooDeep);
        }
        let (mut size, mut height) = (0u64, 0usize);
        for item in &set.items {
            let (inner_size, inner_height) = match &item.node {
                Selection::Field(field) => walk(&field.node.selection_set.node, depth + 1, document, known)?,
                Selection::InlineFragment(fragment) => {
                    walk(&fragment.node.selection_set.node, depth + 1, document, known)?
                }
                Selection::FragmentSpread(spread) => {
                    let name = spread.node.fragment_name.node.as_str();
                    match (known.get(name), document.fragments.get(&spread.node.fragment_name.node)) {
                        (Some(Some((_, height))), _) if depth + 1 + height > RECURSIVE_DEPTH_MAX => {
                            return Err(DocumentTooBig::TooDeep);
                        }
                        (Some(Some(known)), _) => *known,
                        // Being walked (a cycle), or no such fragment: validation refuses both.
                        (Some(None), _) | (None, None) => (0, 0),
                        (None, Some(fragment)) => {
                            known.insert(name, None);
                            let walked = walk(&fragment.node.selection_set.node, depth + 1, document, known)?;
                            known.insert(name, Some(walked));
                            walked
                        }
                    }
                }
            };
            size = size.saturating_add(1).saturating_add(inner_size);
            height = height.max(1 + inner_height);
        }
        Ok((size, height))
    }
    let mut known = Known::new();
    let mut total = 0u64;
    for (_, operation) in document.operations.iter() {
        total = total.saturating_add(walk(&operation.node.selection_set.node, 0, document, &mut known)?.0);
    }
    // Fragments no operation reached are walked too: validation follows their spreads as well.
    for (name, fragment) in &document.fragments {
        if !known.contains_key(name.as_str()) {
            known.insert(name.as_str(), None);
            let walked = walk(&fragment.node.selection_set.node, 1, document, &mut known)?;
            known.insert(name.as_str(), Some(walked));
        }
    }
    Ok(total)
}

/// The limits checked on a parsed document before async-graphql's own checks run, the same
/// for `POST /graphql` and the WebSocket: aliases, nesting (fragments included), and the
/// expanded size — async-graphql's complexity sums every operation, so a document over the
/// complexity limit in selections could not pass it. The error's code and text.
pub fn document_limits(document: &ExecutableDocument) -> Result<(), (&'static str, String)> {
    let aliases = count_aliases(document);
    if aliases > ALIASES_MAX {
        return Err(("too_many_aliases", format!("the query uses {aliases} aliases; the limit is {ALIASES_MAX}")));
    }
    match expanded_selections(document) {
        Err(DocumentTooBig::TooDeep) => Err((
            "query_too_deep",
            format!("the query nests selections and fragment spreads deeper than {RECURSIVE_DEPTH_MAX} levels"),
        )),
        Ok(selections) if selections > COMPLEXITY_MAX as u64 => Err((
            "query_too_complex",
            format!(
                "the query makes {selections} selections once its fragments are expanded; the limit is {COMPLEXITY_MAX}"
            ),
        )),
        Ok(_) => Ok(()),
    }
}

/// A subscription selects one root field (GraphQL's "Single root field" rule, which
/// async-graphql does not apply: two `events` fields under aliases were merged into one stream,
/// found by a client-library check). Fields are counted by response key, through fragments.
pub fn single_root_field(document: &ExecutableDocument) -> Result<(), (&'static str, String)> {
    fn keys<'d>(
        document: &'d ExecutableDocument,
        set: &'d SelectionSet,
        into: &mut std::collections::BTreeSet<&'d str>,
        seen: &mut Vec<&'d str>,
    ) {
        for selection in &set.items {
            match &selection.node {
                Selection::Field(field) => {
                    into.insert(field.node.response_key().node.as_str());
                }
                Selection::InlineFragment(fragment) => keys(document, &fragment.node.selection_set.node, into, seen),
                Selection::FragmentSpread(spread) => {
                    let name = spread.node.fragment_name.node.as_str();
                    if let Some(fragment) = document.fragments.get(&spread.node.fragment_name.node)
                        && !seen.contains(&name)
                    {
                        seen.push(name);
                        keys(document, &fragment.node.selection_set.node, into, seen);
                    }
                }
            }
        }
    }
    for (name, operation) in document.operations.iter() {
        if operation.node.ty != async_graphql::parser::types::OperationType::Subscription {
            continue;
        }
        let mut fields = std::collections::BTreeSet::new();
        keys(document, &operation.node.selection_set.node, &mut fields, &mut Vec::new());
        fields.remove("__typename");
        if fields.len() > 1 {
            let which = name.map(|n| format!("subscription {n}")).unwrap_or_else(|| "the subscription".to_owned());
            let fields: Vec<&str> = fields.into_iter().collect();
            return Err((
                "invalid_query",
                format!(
                    "{which} selects {} root fields ({}); a subscription selects one",
                    fields.len(),
                    fields.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Every variable of a non-null type without a default is given a value that is not null (the
/// GraphQL specification's CoerceVariableValues, a request error): async-graphql ran the
/// operation anyway and answered each field that read the variable with "Variable id is not
/// defined." at that field, a 200 with a misleading message. The operation that runs is the one
/// `operation_name` names, or the document's only one (any other case async-graphql refuses).
pub fn required_variables(
    document: &ExecutableDocument,
    operation_name: Option<&str>,
    variables: &async_graphql::Variables,
) -> Result<(), (&'static str, String)> {
    let operation = match (&document.operations, operation_name) {
        (DocumentOperations::Single(operation), None) => operation,
        // A name the document's one anonymous operation does not have: async-graphql says so.
        (DocumentOperations::Single(_), Some(_)) => return Ok(()),
        (DocumentOperations::Multiple(operations), Some(name)) => match operations.get(name) {
            Some(operation) => operation,
            None => return Ok(()),
        },
        (DocumentOperations::Multiple(operations), None) if operations.len() == 1 => {
            operations.values().next().expect("one operation")
        }
        (DocumentOperations::Multiple(_), None) => return Ok(()),
    };
    for definition in &operation.node.variable_definitions {
        let definition = &definition.node;
        if definition.var_type.node.nullable {
            continue;
        }
        let (name, ty) = (&definition.name.node, &definition.var_type.node);
        match variables.get(name) {
            None if definition.default_value.is_none() => {
                return Err(("invalid_query", format!("variable ${name} of required type {ty} was not provided")));
            }
            Some(async_graphql::Value::Null) => {
                return Err(("invalid_query", format!("variable ${name} of required type {ty} may not be null")));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The checks made on a document's text before anything parses it: brackets nested deeper
/// than [`NESTING_MAX`] (`query_too_deep`), more than [`TOKENS_MAX`] tokens
/// (`query_too_large`), and an input object literal naming a field twice (`invalid_query`).
/// The parser and the conversion of literals recurse once per level (found by a black-box
/// check: a 4 KB list literal 2,000 levels deep overflowed a stack and aborted the whole server,
/// for any token). The parser keeps the last of a repeated field (`{namespace: "a", namespace:
/// "b"}` created a task in `b`), where GraphQL's validation refuses the document and REST
/// refuses a repeated key; only the text still has both. Strings, block strings and comments
/// are skipped as GraphQL lexes them; a string left open at a line end is taken to end there,
/// so the scan counts every bracket the parser could see.
pub fn lexical_checks(query: &str) -> Result<(), (&'static str, String)> {
    let bytes = query.as_bytes();
    let (mut at, mut tokens) = (0usize, 0usize);
    // The brackets open, and for each `{` inside parentheses (an input object literal: values
    // appear only in argument lists and variable definitions) the field names it has named.
    let mut open: Vec<(u8, Option<std::collections::HashSet<&str>>)> = Vec::new();
    let mut parentheses_open = 0usize;
    // Only names and digits run together: `0-0-0` is three numbers to the parser, `...F...F`
    // two spreads (a review found both passing as one word, hundreds of MB per request).
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    while at < bytes.len() {
        let byte = bytes[at];
        let start = at;
        at += 1;
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => continue,
            // U+FEFF, which GraphQL ignores like white space (a review hid a repeated field
            // behind one).
            0xEF if bytes[at..].starts_with(&BOM[1..]) => {
                at += 2;
                continue;
            }
            b'#' => {
                at = comment_end(bytes, at);
                continue;
            }
            b'"' if bytes[at..].starts_with(b"\"\"") => {
                at += 2;
                while at < bytes.len() && !bytes[at..].starts_with(b"\"\"\"") {
                    at += if bytes[at..].starts_with(b"\\\"\"\"") { 4 } else { 1 };
                }
                at += 3;
            }
            b'"' => {
                while at < bytes.len() && !matches!(bytes[at], b'"' | b'\n' | b'\r') {
                    at += if bytes[at] == b'\\' { 2 } else { 1 };
                }
                at += 1;
            }
            b'{' | b'[' | b'(' => {
                if open.len() == NESTING_MAX {
                    return Err((
                        "query_too_deep",
                        format!("the query nests brackets deeper than {NESTING_MAX} levels"),
                    ));
                }
                parentheses_open += usize::from(byte == b'(');
                let literal = byte == b'{' && parentheses_open > 0;
                open.push((byte, literal.then(Default::default)));
            }
            b'}' | b']' | b')' => {
                if let Some((b'(', _)) = open.pop() {
                    parentheses_open -= 1;
                }
            }
            _ if is_word(byte) => {
                while at < bytes.len() && is_word(bytes[at]) {
                    at += 1;
                }
                if let Some((_, Some(names))) = open.last_mut()
                    && !byte.is_ascii_digit()
                    && bytes.get(significant_from(bytes, at)) == Some(&b':')
                {
                    let name = &query[start..at];
                    if !names.insert(name) {
                        return Err(("invalid_query", format!("There can only be one input field named \"{name}\"")));
                    }
                }
            }
            _ => {}
        }
        tokens += 1;
        if tokens > TOKENS_MAX {
            return Err(("query_too_large", format!("the query has more than {TOKENS_MAX} tokens")));
        }
    }
    Ok(())
}

/// Where the comment whose text starts at `at` ends (its line's end).
fn comment_end(bytes: &[u8], mut at: usize) -> usize {
    while at < bytes.len() && !matches!(bytes[at], b'\n' | b'\r') {
        at += 1;
    }
    at
}

/// U+FEFF in UTF-8: GraphQL's "unicode BOM", ignored like white space anywhere.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// The first byte at or after `at` that is not white space, a comma, a BOM or a comment.
fn significant_from(bytes: &[u8], mut at: usize) -> usize {
    while let Some(&byte) = bytes.get(at) {
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => at += 1,
            0xEF if bytes[at..].starts_with(&BOM) => at += BOM.len(),
            b'#' => at = comment_end(bytes, at + 1),
            _ => break,
        }
    }
    at
}

/// Applies [`lexical_checks`] and [`document_limits`] to every request the schema runs, whichever way it arrived (the
/// WebSocket once ran queries and mutations past the alias limit `POST /graphql` applied).
struct DocumentLimits;

impl async_graphql::extensions::ExtensionFactory for DocumentLimits {
    fn create(&self) -> std::sync::Arc<dyn async_graphql::extensions::Extension> {
        std::sync::Arc::new(DocumentLimits)
    }
}

#[async_graphql::async_trait::async_trait]
impl async_graphql::extensions::Extension for DocumentLimits {
    /// The checks on the document, before async-graphql parses it: its parse step also checks
    /// the recursion depth, which expands fragment spreads too. The document parsed here is the
    /// one async-graphql then runs; one that does not parse is left to its parse to report.
    async fn prepare_request(
        &self,
        ctx: &async_graphql::extensions::ExtensionContext<'_>,
        mut request: async_graphql::Request,
        next: async_graphql::extensions::NextPrepareRequest<'_>,
    ) -> async_graphql::ServerResult<async_graphql::Request> {
        let refused = |(code, message): (&'static str, String)| {
            let mut error = async_graphql::ServerError::new(message, None);
            error.extensions.get_or_insert_with(Default::default).set("code", code);
            error
        };
        lexical_checks(&request.query).map_err(refused)?;
        if let Ok(document) = async_graphql::parser::parse_query(&request.query) {
            document_limits(&document).map_err(refused)?;
            single_root_field(&document).map_err(refused)?;
            required_variables(&document, request.operation_name.as_deref(), &request.variables).map_err(refused)?;
            request.set_parsed_query(document);
        }
        next.run(ctx, request).await
    }

    async fn parse_query(
        &self,
        ctx: &async_graphql::extensions::ExtensionContext<'_>,
        query: &str,
        variables: &async_graphql::Variables,
        next: async_graphql::extensions::NextParseQuery<'_>,
    ) -> async_graphql::ServerResult<ExecutableDocument> {
        next.run(ctx, query, variables).await.map_err(with_code)
    }

    /// An argument its field could not parse carries the code and status REST gives the same
    /// input (`invalid_request`, 400), over POST and the WebSocket alike (the WebSocket's came
    /// with no code: found by a client check); `graphql_handler` answers a query whose only
    /// errors are these with a 400.
    async fn resolve(
        &self,
        ctx: &async_graphql::extensions::ExtensionContext<'_>,
        info: async_graphql::extensions::ResolveInfo<'_>,
        next: async_graphql::extensions::NextResolve<'_>,
    ) -> async_graphql::ServerResult<Option<async_graphql::Value>> {
        next.run(ctx, info).await.map_err(|mut error| {
            if unparsed_argument_message(&error.message)
                && error.extensions.as_ref().is_none_or(|x| x.get("code").is_none())
            {
                let extensions = error.extensions.get_or_insert_with(Default::default);
                extensions.set("code", "invalid_request");
                extensions.set("status", 400);
            }
            error
        })
    }

    /// Validation's errors get their codes here, so that the WebSocket's carry them as
    /// `POST /graphql`'s do (they came without: found by a client-library check).
    async fn validation(
        &self,
        ctx: &async_graphql::extensions::ExtensionContext<'_>,
        next: async_graphql::extensions::NextValidation<'_>,
    ) -> Result<async_graphql::ValidationResult, Vec<async_graphql::ServerError>> {
        next.run(ctx).await.map_err(|errors| errors.into_iter().map(with_code).collect())
    }
}

/// `error` with a code in its extensions when it has none: a document that does not parse or
/// validate is `invalid_query`, unless the message names a depth or complexity limit.
fn with_code(mut error: async_graphql::ServerError) -> async_graphql::ServerError {
    let code = code_of_refusal(&error.message);
    if let Some(message) = naming_the_limit(&error.message) {
        error.message = message;
    }
    let extensions = error.extensions.get_or_insert_with(Default::default);
    if extensions.get("code").is_none() {
        extensions.set("code", code);
    }
    error
}

/// async-graphql's refusals for the depth and complexity limits, which do not say what the
/// limits are, said so a client can act on them.
fn naming_the_limit(message: &str) -> Option<String> {
    match message {
        "Query is nested too deep." => Some(format!("the query nests fields deeper than {DEPTH_MAX} levels")),
        "Query is too complex." => {
            Some(format!("the query selects more than {COMPLEXITY_MAX} fields, with fragments expanded"))
        }
        _ => None,
    }
}

/// The code of a document refused before any resolver ran, from async-graphql's message.
fn code_of_refusal(message: &str) -> &'static str {
    let message = message.to_lowercase();
    if message.contains("nested too deep") || message.contains("recursion depth") {
        "query_too_deep"
    } else if message.contains("too complex") {
        "query_too_complex"
    } else {
        "invalid_query"
    }
}

/// POST /graphql: one operation per request, authenticated like REST (401
/// without a valid token, before the body is even read). The body is read
/// here, not by `async_graphql_axum`'s extractor, so that the server's body
/// limit applies (that extractor streams the body past `DefaultBodyLimit`)
/// and every refusal is a JSON error with a stable code: 415 for a body that
/// is not `application/json`, 413 `body_too_large`, 400 `batch_not_supported`
/// for an array of operations, 400 `malformed_json`/`invalid_request`.
pub async fn graphql_handler(
    State(state): State<AppState>,
    axum::Extension(schema): axum::Extension<LedgerSchema>,
    request: axum::extract::Request,
) -> Response {
    // Authenticate before anything else, like every REST route: without a
    // valid token not even introspection is answered.
    let headers = request.headers();
    let mut given = headers.get_all(axum::http::header::AUTHORIZATION).iter();
    let authorization = given.next().and_then(|v| v.to_str().ok());
    let several = given.next().is_some();
    let Some(principal) = principal_from(&state, authorization).filter(|_| !several) else {
        let message = match authorization {
            None => "missing Authorization: Bearer <token> header",
            Some(_) if several => "send one Authorization header, not several",
            Some(_) => "unknown, revoked or malformed token; send Authorization: Bearer <token>",
        };
        return graphql_error(StatusCode::UNAUTHORIZED, "unauthorized", message.to_owned());
    };
    let command_id_header = headers.contains_key(crate::routes::COMMAND_ID_HEADER);
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return graphql_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the GraphQL request as JSON ({\"query\": ...}) with Content-Type: application/json".to_owned(),
        );
    }
    let body = match axum::body::Bytes::from_request(request, &state).await {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let too_large = ApiError::body_too_large(state.max_body_bytes);
            return graphql_error(StatusCode::PAYLOAD_TOO_LARGE, too_large.code, too_large.message);
        }
        Err(e) => return graphql_error(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return graphql_error(
            StatusCode::BAD_REQUEST,
            "batch_not_supported",
            "send one operation per request (a JSON object), not an array of operations".to_owned(),
        );
    }
    // A key named twice in one object (in `variables`, say) is refused, as REST refuses it: the
    // parse below keeps the last.
    if let Err(e) = serde_json::from_slice::<UniqueKeys>(&body)
        && e.classify() == serde_json::error::Category::Data
    {
        return graphql_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("the GraphQL request is not valid: {e}"),
        );
    }
    let request = match serde_json::from_slice::<async_graphql::Request>(&body) {
        Ok(request) => request.data(principal),
        Err(e) => {
            let code =
                if e.classify() == serde_json::error::Category::Data { "invalid_request" } else { "malformed_json" };
            return graphql_error(StatusCode::BAD_REQUEST, code, format!("the GraphQL request is not valid: {e}"));
        }
    };
    if let Err((code, message)) = lexical_checks(&request.query) {
        return graphql_error(StatusCode::BAD_REQUEST, code, message);
    }
    let document = match async_graphql::parser::parse_query(&request.query) {
        Ok(document) => document,
        Err(e) => return graphql_error(StatusCode::BAD_REQUEST, "invalid_query", e.to_string()),
    };
    // The operation that runs: the one `operationName` names, or the document's only one.
    let mutates = document.operations.iter().any(|(name, operation)| {
        let runs = match request.operation_name.as_deref() {
            Some(wanted) => name.is_some_and(|name| name.as_str() == wanted),
            None => true,
        };
        runs && operation.node.ty == async_graphql::parser::types::OperationType::Mutation
    });
    // The schema parses the text again: this copy is not held through it.
    drop(document);
    // A mutation's id is its `commandId` argument: a document may hold several. The header was
    // ignored, so a client retrying with it created the task again (found by a black-box check).
    if mutates && command_id_header {
        return graphql_error(
            StatusCode::BAD_REQUEST,
            "invalid_command_id",
            "/graphql does not read X-Command-Id (a document may hold several mutations): give each mutation \
             its commandId argument"
                .to_owned(),
        );
    }
    // The document limits are the schema's `DocumentLimits` extension's: its refusal has no path
    // and keeps its code below, like every check made before a resolver runs.
    let mut response = schema.execute(request).await;
    // Errors without a path come from the document limits or validation (limits, unknown
    // fields, fragment cycles): no resolver ran. Give them a stable code and a 400.
    // An argument that parses as GraphQL but not as the field's type (a negative `first`,
    // a number past the type's range) fails when its field is resolved, so it has a path;
    // it is bad input all the same, and no resolver ran for it. In a mutation, though, the
    // fields beside it did run (and may have written): the answer stays a 200 whose data says
    // what was done.
    let bad_argument = |e: &async_graphql::ServerError| !mutates && unparsed_argument(e);
    if !response.errors.is_empty() && response.errors.iter().all(|e| e.path.is_empty() || bad_argument(e)) {
        let mut counted = false;
        for error in &mut response.errors {
            let given = error.extensions.as_ref().and_then(|x| x.get("code")).and_then(|code| match code {
                async_graphql::Value::String(code) => {
                    DOCUMENT_LIMIT_CODES.iter().find(|known| **known == code).copied()
                }
                _ => None,
            });
            let code = given.unwrap_or_else(|| code_of_refusal(&error.message));
            let extensions = error.extensions.get_or_insert_with(Default::default);
            extensions.set("code", code);
            // The request's own status says it (the `resolve` hook's is for a 200's errors).
            extensions.unset("status");
            if !std::mem::replace(&mut counted, true) {
                crate::error::count_error_answer(StatusCode::BAD_REQUEST, code);
            }
        }
        let mut http = GraphQLResponse::from(response).into_response();
        *http.status_mut() = StatusCode::BAD_REQUEST;
        return http;
    }
    // An argument of a mutation that did not parse has its code and status from the `resolve`
    // hook (the fields beside it ran, so the answer is a 200).
    GraphQLResponse::from(response).into_response()
}

/// An error of an argument its field could not parse, as the `resolve` hook left it.
fn unparsed_argument(error: &async_graphql::ServerError) -> bool {
    let code = error.extensions.as_ref().and_then(|x| x.get("code"));
    unparsed_argument_message(&error.message)
        && matches!(code, Some(async_graphql::Value::String(code)) if code == "invalid_request")
}

/// Whether `message` is async-graphql's for an argument it could not parse: a value of the wrong
/// type or out of its range, or a null where a value is required (a nullable variable left out
/// and used in an input object's required field came back with no code).
fn unparsed_argument_message(message: &str) -> bool {
    message.starts_with("Failed to parse \"")
        || message.starts_with("Expected input type \"")
        || message.contains("(occurred while parsing \"")
}

fn graphql_error(status: StatusCode, code: &'static str, message: String) -> Response {
    crate::error::count_error_answer(status, code);
    let body = serde_json::json!({ "data": null, "errors": [{ "message": message, "extensions": { "code": code } }] });
    (status, axum::Json(body)).into_response()
}

pub(crate) fn principal_from(state: &AppState, authorization: Option<&str>) -> Option<Principal> {
    state.tokens().authenticate(crate::auth::bearer_token(authorization?)?)
}

/// GET /graphql: the GraphiQL page, for a browser. A client that accepts JSON and not HTML
/// (a GraphQL client sending its query over GET) is answered 405 with a JSON error naming
/// POST (`Allow: POST`): it got the page with a 200, and failed to parse it (found by a client-library check).
pub async fn graphiql(headers: axum::http::HeaderMap) -> Response {
    let accept: Vec<&str> =
        headers.get_all(axum::http::header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
    let accept = accept.join(",").to_ascii_lowercase();
    if accept.contains("json") && !accept.contains("text/html") && !accept.contains("*/*") {
        let mut refused = graphql_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "GraphQL queries go over POST /graphql (JSON, with Content-Type: application/json); GET serves GraphiQL to browsers".to_owned(),
        );
        refused.headers_mut().insert(axum::http::header::ALLOW, axum::http::HeaderValue::from_static("POST"));
        return refused;
    }
    Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql/ws").finish()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, event_type: u16, payload: Vec<u8>) -> eventlog::StoredRecord {
        eventlog::StoredRecord {
            seq,
            stream: b"Qq".to_vec(),
            stream_version: seq,
            recorded_at_us: 0,
            command_id: "c".into(),
            actor: "a".into(),
            event_type,
            schema_version: 1,
            payload,
            hash: [0; 32],
        }
    }

    fn paused(seq: u64) -> eventlog::StoredRecord {
        let event = domain::Event::QueuePaused {
            namespace: domain::Namespace::new("q").unwrap(),
            at: domain::Timestamp::from_micros(0),
        };
        let new = eventlog::encode_event(&event, "c", "a", 0);
        eventlog::StoredRecord { schema_version: new.schema_version, ..record(seq, new.event_type, new.payload) }
    }

    async fn outcomes(batches: Vec<Result<Vec<eventlog::StoredRecord>, String>>) -> Vec<Result<u64, String>> {
        decoded_until_first_error(futures_util::stream::iter(batches))
            .map(|item| item.map(|(record, _)| record.seq).map_err(|e| format!("{} {}", e.code, e.message)))
            .collect()
            .await
    }

    /// A queue's pages walk its namespace's tasks in id order and each task's steps by name,
    /// across a cursor that falls inside a workflow, leaving out finished steps, other
    /// namespaces and tasks that have left the ledger.
    #[test]
    fn queue_pages_walk_the_namespace_from_the_cursor() {
        use domain::testkit::{Scenario, claim, complete, job, step, task_id, workflow};
        let mut s = Scenario::new();
        s.ok(domain::Command::CreateTask(job(1, "q")));
        s.ok(domain::Command::CreateTask(job(2, "other")));
        let flow = workflow(3, "q", vec![step("c", "h", &[]), step("a", "h", &["c"]), step("b", "h", &["c"])]);
        s.ok(domain::Command::CreateTask(flow));
        s.ok(domain::Command::CreateTask(job(4, "q")));
        s.ok(domain::Command::CreateTask(job(5, "q")));
        s.ok(claim("q", "w", 1));
        s.ok(complete(task_id(1), "run", 1));
        assert!(s.ledger.task(&task_id(1)).is_none(), "a finished task leaves the ledger");
        s.ok(domain::Command::CancelTask { task: task_id(5), reason: None });
        let ns = domain::Namespace::new("q").unwrap();
        let mut seen = Vec::new();
        let mut after: Option<QueueCursor> = None;
        let mut pages = 0;
        loop {
            let page = queue_page(&s.ledger, &ns, None, 2, after.as_ref(), 7);
            pages += 1;
            seen.extend(page.steps.iter().map(|step| (step.task_id.clone(), step.step.clone())));
            let Some(cursor) = page.next_cursor else { break };
            after = Some(parse_queue_cursor(&cursor).unwrap());
        }
        let expected: Vec<(String, String)> = [(3, "a"), (3, "b"), (3, "c"), (4, "run")]
            .into_iter()
            .map(|(n, step)| (task_id(n).to_string(), step.to_owned()))
            .collect();
        assert_eq!(seen, expected);
        assert_eq!(pages, 2);
        let pending = queue_page(&s.ledger, &ns, Some("pending"), 10, None, 7);
        let names: Vec<&str> = pending.steps.iter().map(|step| step.step.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        s.ledger.check_indexes().unwrap();
        s.ledger.check_indexes_in_place().unwrap();
    }

    fn parsed(query: &str) -> ExecutableDocument {
        async_graphql::parser::parse_query(query).unwrap()
    }

    /// Brackets are counted as the parser sees them: not in strings, block strings or comments.
    #[test]
    fn brackets_nested_too_deep_or_too_many_tokens_are_refused_before_parsing() {
        let list =
            |levels: usize| format!("{{ ledger(x: {}0{}) {{ headSeq }} }}", "[".repeat(levels), "]".repeat(levels));
        // The selection set and the argument list are two levels.
        assert_eq!(lexical_checks(&list(NESTING_MAX - 2)), Ok(()));
        assert_eq!(lexical_checks(&list(NESTING_MAX - 1)).unwrap_err().0, "query_too_deep");
        assert_eq!(lexical_checks(&list(2000)).unwrap_err().0, "query_too_deep");
        let hidden = "[".repeat(NESTING_MAX + 1);
        for quiet in [
            format!("{{ ledger(x: \"{hidden}\") {{ headSeq }} }}"),
            format!("{{ ledger(x: \"\\\"{hidden}\") {{ headSeq }} }}"),
            format!("{{ ledger(x: \"\"\"{hidden} \\\"\"\" {hidden}\"\"\") {{ headSeq }} }}"),
            format!("# {hidden}\n{{ ledger {{ headSeq }} }}"),
        ] {
            assert_eq!(lexical_checks(&quiet), Ok(()), "{quiet}");
        }
        // A string left open at a line end ends there for the scan: what follows is counted.
        assert_eq!(lexical_checks(&format!("{{ ledger(x: \"open\n{hidden}")).unwrap_err().0, "query_too_deep");
        assert_eq!(
            lexical_checks(&format!("\"\"\"{hidden}")),
            Ok(()),
            "an open block string hides nothing the parser sees"
        );
        // Commas are not tokens; numbers, names and punctuators are.
        let zeros = |count: usize| format!("{{ ledger(x: [{}]) {{ headSeq }} }}", "0,".repeat(count));
        assert_eq!(lexical_checks(&zeros(TOKENS_MAX - 20)), Ok(()));
        assert_eq!(lexical_checks(&zeros(TOKENS_MAX)).unwrap_err().0, "query_too_large");
        // Signs, dots and spreads are tokens of their own, as the parser sees them.
        let run = |unit: &str| format!("{{ ledger(x: [{}]) {{ headSeq }} }}", unit.repeat(TOKENS_MAX / 2));
        for unit in ["0-", "...F", "1.5,"] {
            assert_eq!(lexical_checks(&run(unit)).unwrap_err().0, "query_too_large", "{unit}");
        }
        // The largest payload a task may carry fits inline.
        let payload = format!("{{ text: \"{}\", list: [{}] }}", "x".repeat(30_000), "1 ".repeat(16_000));
        let create = format!(
            "mutation {{ createTask(input: {{ namespace: \"q\", handler: \"h\", payload: {payload} }}) {{ seq }} }}"
        );
        assert_eq!(lexical_checks(&create), Ok(()));
    }

    /// An input object literal names each field once; selection sets may repeat an alias.
    #[test]
    fn an_input_field_named_twice_is_refused_before_parsing() {
        for twice in [
            "mutation { createTask(input: {namespace: \"a\", namespace: \"b\", handler: \"h\"}) { seq } }",
            "{ ledger(x: {a: {b: 1, b: 2}}) { headSeq } }",
            "{ ledger(x: [{a: 1}, {a: 1, c: 2, a: 3}]) { headSeq } }",
            "query($x: In = {a: 1, a: 2}) { ledger { headSeq } }",
            "{ ledger(x: {a # a comment\n : 1, a: 2}) { headSeq } }",
            "{ ledger @skip(if: {a: 1, a: 2}) { headSeq } }",
            "{ ledger(x: {a\u{feff}: 1, \u{feff}a\u{feff}\u{feff} : 2}) { headSeq } }",
        ] {
            let refused = lexical_checks(twice).unwrap_err();
            assert_eq!(refused.0, "invalid_query", "{twice}");
            assert!(refused.1.starts_with("There can only be one input field named"), "{twice}");
        }
        for once in [
            "{ ledger(x: {a: {a: 1}, b: {a: 2}}) { headSeq } }",
            "{ ledger(x: [{a: 1}, {a: 2}]) { headSeq } }",
            "{ a: ledger { headSeq } a: ledger { headSeq } }",
            "{ ledger(x: {a: \"a: 1, a: 2\", b: \"\"\"a: 1\"\"\"}) { headSeq } }",
            "{ ledger(x: {a: ENUM_A, b: a}) { headSeq } }",
        ] {
            assert_eq!(lexical_checks(once), Ok(()), "{once}");
        }
    }

    /// Fragments that each spread the next one twice: counted in linear time, and refused.
    #[test]
    fn fragment_fan_out_is_counted_without_expanding_it() {
        let fan_out = |levels: usize, last: &str| {
            let mut query = String::from("{ ...F0 } ");
            for i in 0..levels {
                query += &format!("fragment F{i} on QueryRoot {{ ...F{n} ...F{n} }} ", n = i + 1);
            }
            parsed(&(query + &format!("fragment F{levels} on QueryRoot {{ {last} }}")))
        };
        for last in ["ledger { headSeq }", "...Nope"] {
            let document = fan_out(25, last);
            assert!(expanded_selections(&document).unwrap() > 1 << 25, "{last}");
            assert_eq!(document_limits(&document).unwrap_err().0, "query_too_complex", "{last}");
            // 31 levels, as the black-box check sent: past the recursion limit as well.
            assert!(document_limits(&fan_out(30, last)).is_err(), "{last}");
        }
        // { ...A ...A }: two spreads, each of one field with one selection below it.
        assert_eq!(expanded_selections(&parsed("{ ...A ...A } fragment A on QueryRoot { ledger { headSeq } }")), Ok(6));
        let cycle = parsed("{ ...A } fragment A on QueryRoot { ...B } fragment B on QueryRoot { ...A }");
        assert_eq!(expanded_selections(&cycle), Ok(3));
        // Several operations add up, as async-graphql's complexity does.
        let two = parsed("query a { ledger { headSeq } } query b { ledger { headSeq } }");
        assert_eq!(expanded_selections(&two), Ok(4));
    }

    /// A chain of spreads deeper than the recursion limit is refused without following it to
    /// its end, used by an operation or not (a chain of 100,000 would have overflowed the stack).
    #[test]
    fn a_long_chain_of_spreads_is_refused_as_too_deep() {
        for used in [true, false] {
            let mut query = String::from(if used { "{ ...a0 } " } else { "{ ledger { headSeq } } " });
            for i in 0..100_000 {
                query += &format!("fragment a{i} on QueryRoot {{ ...a{} }} ", i + 1);
            }
            query += "fragment a100000 on QueryRoot { ledger { headSeq } }";
            let document = parsed(&query);
            assert_eq!(expanded_selections(&document), Err(DocumentTooBig::TooDeep), "used: {used}");
            assert_eq!(document_limits(&document).unwrap_err().0, "query_too_deep");
        }
        // A fragment known at a shallow depth is still too deep when spread far down.
        let nest = |levels: usize| {
            let mut text = String::new();
            for _ in 0..levels {
                text += "...on QueryRoot { ";
            }
            text += "ledger { headSeq }";
            text += &" }".repeat(levels);
            text
        };
        let shallow = parsed(&format!("{{ ...Deep }} fragment Deep on QueryRoot {{ {} }}", nest(20)));
        assert!(expanded_selections(&shallow).is_ok());
        let wrapped = "...on QueryRoot { ".repeat(15) + "...Deep" + &" }".repeat(15);
        let deeper = parsed(&format!("{{ ...Deep {wrapped} }} fragment Deep on QueryRoot {{ {} }}", nest(20)));
        assert_eq!(expanded_selections(&deeper), Err(DocumentTooBig::TooDeep));
    }

    /// A subscription that meets a record it cannot decode, or a batch it cannot read, says so
    /// with an error and ends there: nothing after it is sent, and nothing is skipped silently
    /// (undecodable records were dropped, and a read error ended the stream cleanly).
    #[tokio::test]
    async fn a_subscription_ends_with_an_error_at_the_first_unreadable_record() {
        let undecodable = record(3, u16::MAX, vec![0xff; 4]);
        let got =
            outcomes(vec![Ok(vec![paused(1), paused(2)]), Ok(vec![undecodable, paused(4)]), Ok(vec![paused(5)])]).await;
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[..2], [Ok(1), Ok(2)]);
        let error = got[2].as_ref().unwrap_err();
        assert!(error.starts_with("log_unreadable the record at seq 3 cannot be decoded"), "{error}");

        let got = outcomes(vec![Ok(vec![paused(1)]), Err("I/O error".into()), Ok(vec![paused(2)])]).await;
        assert_eq!(got, [Ok(1), Err("log_unreadable the log cannot be read: I/O error".into())]);

        // The failure at the newest record ends the stream at once, without waiting for the log
        // to grow (a review found it asked for the next batch first).
        let quiet_log = futures_util::stream::iter(vec![Ok(vec![paused(1), record(2, u16::MAX, vec![0xff])])])
            .chain(futures_util::stream::pending());
        let ended =
            tokio::time::timeout(std::time::Duration::from_secs(5), decoded_until_first_error(quiet_log).count()).await;
        assert_eq!(ended, Ok(2), "the stream ended after the failure");
    }
}
