//! Reads served from the SQL projections (task lists, queues, dashboard,
//! audit log, dead letters, workers, projector status), for REST and
//! GraphQL alike. The queries themselves live in `projections::query`; this
//! module only checks who may read what, honours `minSeq`, and maps errors.
//! It answers with the typed rows of `projections::query`: GraphQL serves
//! them as objects, REST as JSON through [`to_json`].
//!
//! Namespace-scoped tokens must name a namespace they cover; the audit log
//! and workers span every namespace and need an unscoped token with the
//! audit permission. Projector status (checkpoints and lag, no task data) is
//! open to every token.

use std::time::Duration;

use axum::http::StatusCode;
use domain::Timestamp;
use projections::ProjectorStatus;
use projections::query::{
    self, AuditEntry, AuditFilter, Dashboard, DeadLetter, Page, PageRequest, QueueEntry, TaskFilter, TaskSummary,
    WorkerView,
};
use serde::Serialize;
use serde_json::Value;

use crate::auth::{Permission, Principal};
use crate::error::{ApiError, ApiResult};
use crate::server::AppState;

/// Longest a read waits for projections to reach `minSeq`.
pub const MIN_SEQ_WAIT: Duration = Duration::from_secs(5);

impl From<projections::QueryError> for ApiError {
    fn from(e: projections::QueryError) -> Self {
        match e {
            projections::QueryError::BadCursor(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_cursor", m).with_field("after")
            }
            projections::QueryError::BadFilter(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_filter", m),
            // The database is not reachable (PostgreSQL down, or no connection in time): an
            // outage of a dependency, not a fault of the request or of this server.
            e if e.is_unreachable() => ApiError::unavailable(
                "projections_unavailable",
                format!(
                    "the projections database did not answer in time: it is unreachable, or every connection is \
                     busy (a lock held on a projection table keeps them) ({e}); the log, commands and task reads work"
                ),
                5,
            ),
            // A table gone (dropped by hand, a schema dropped and created again): not a fault
            // of this server's code, and the answer says how to repair it (500 `internal` did
            // not: found by a black-box check).
            // Damage inside the file (pages overwritten): 500 `internal` named no remedy.
            e if e.damaged() => ApiError::unavailable(
                "projections_unavailable",
                format!(
                    "the projections database is damaged ({e}); it holds nothing the log does not: rebuild the \
                     projector with POST /v1/admin/projections/{{projector}}/rebuild, or stop the server, move the \
                     file and its -wal and -shm files aside, and start it again"
                ),
                30,
            ),
            e if let Some(missing) = e.missing_table() => ApiError::unavailable(
                "projections_unavailable",
                format!(
                    "a projection table is missing ({missing}): rebuild its projector with POST \
                     /v1/admin/projections/{}/rebuild (after a dropped schema, rebuild each projector: {}; the \
                     first rebuild creates the schema again)",
                    projections::ProjectorKind::owning_table_named_in(&missing)
                        .map_or("{projector}", projections::ProjectorKind::name),
                    projections::ProjectorKind::ALL.map(projections::ProjectorKind::name).join(", ")
                ),
                30,
            ),
            projections::QueryError::Sql(e) => ApiError::internal(format!("projection query failed: {e}")),
        }
    }
}

/// Longest a view's query may take: a lock held on a projection table (a DBA's `LOCK TABLE`,
/// a migration) would otherwise hold the read until the request timeout, with a message about
/// commands (found by a black-box check: 28 s, then 408s at 60 s).
pub const VIEW_QUERY_WAIT: Duration = Duration::from_secs(5);

/// A view's query, bounded by [`VIEW_QUERY_WAIT`] (then 503 `projections_unavailable`).
async fn answered<T>(query: impl std::future::Future<Output = Result<T, projections::QueryError>>) -> ApiResult<T> {
    match tokio::time::timeout(VIEW_QUERY_WAIT, query).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(ApiError::unavailable(
            "projections_unavailable",
            format!(
                "the projections database did not answer within {} s (a lock held on a projection table, or an \
                 overloaded database); the log, commands and task reads work",
                VIEW_QUERY_WAIT.as_secs()
            ),
            5,
        )),
    }
}

/// A read model as REST's JSON. Through `Value` (whose objects sort their
/// keys) rather than straight from the struct, so the bytes stay what REST
/// has always answered.
pub fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("read models serialize")
}

/// Refuses (400 `min_seq_ahead_of_log`) a `min_seq` beyond the log's head. Acknowledged
/// seqs count even before they are readable (a checkpoint running, see the writer's
/// `head_watch`): readers reach them once they are.
pub fn check_min_seq_in_log(state: &AppState, seq: u64) -> ApiResult<()> {
    let head = log_head(state)?;
    if seq > head {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "min_seq_ahead_of_log",
            format!("seq {seq} is beyond the log's head ({head}); use a seq a write answered with"),
        )
        .with_field("min_seq"));
    }
    Ok(())
}

/// A task id given as a filter: one that cannot name a task is a bad filter (400), not a task
/// not found, since nothing was looked up.
pub fn filter_task(text: &str, field: &str) -> ApiResult<domain::TaskId> {
    domain::TaskId::parse(text).map_err(|r| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_filter",
            format!("{field} {text:?} is not a task id: {}", r.message),
        )
        .with_field(field)
    })
}

/// The newest seq written: readable, or acknowledged and still held back by a checkpoint.
fn log_head(state: &AppState) -> ApiResult<u64> {
    let readable = state.writer.reader().head().map_err(|e| ApiError::internal(e.to_string()))?.seq;
    Ok(readable.max(state.writer.acknowledged_head()))
}

/// The header an EventSource resumes with, and the field name of a refusal about it.
pub const LAST_EVENT_ID: &str = "Last-Event-ID";

/// A feed starts at most just after the head. Further on it would wait for seqs the log has
/// not reached, and a client resuming there (after seq N it saw) from a server restored from
/// an older backup would be handed other events under the seqs it knew: it must hear of it.
pub fn check_feed_start(state: &AppState, from_seq: u64, field: &str) -> ApiResult<()> {
    let head = log_head(state)?;
    if from_seq > head.saturating_add(1) {
        // `Last-Event-ID` names the last seq the client saw, one before where the feed starts:
        // the message names the value as the client sent it.
        let asked = if field == LAST_EVENT_ID {
            format!("Last-Event-ID names a seq up to {head}, not {}", from_seq - 1)
        } else {
            format!("a feed starts at seq {} at most, not {from_seq}", head + 1)
        };
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "from_seq_ahead_of_log",
            format!(
                "the log's head is seq {head}, so {asked}; a client that saw seqs beyond the head reads another log (a server restored from an older backup?)"
            ),
        )
        .with_field(field));
    }
    Ok(())
}

/// Waits until every projector has applied `min_seq` (read-your-writes).
///
/// A seq beyond the log's head is refused at once (400
/// `min_seq_ahead_of_log`) instead of waiting: a write is acknowledged only
/// after it is committed, so every seq a client was ever given is at or below
/// the head, and waiting for one that does not exist could only time out.
///
/// Every view reads through here, so it also refuses while another process holds the
/// projections database's lock ([`check_projections_lock`]).
pub async fn wait_min_seq(state: &AppState, min_seq: Option<u64>) -> ApiResult<()> {
    check_projections_lock(state)?;
    let Some(seq) = min_seq else { return Ok(()) };
    check_min_seq_in_log(state, seq)?;
    if state.projections.get()?.wait_for_seq(seq, MIN_SEQ_WAIT).await {
        Ok(())
    } else {
        Err(ApiError::unavailable(
            "min_seq_not_reached",
            format!("projections did not reach seq {seq} within {} s; retry", MIN_SEQ_WAIT.as_secs()),
            1,
        ))
    }
}

/// Refuses (503 `projections_unavailable`) while another process holds the projections
/// database's lock, taken while this server's connection to it was lost: its tables may hold
/// that process's rows, not this log's; and while the projections wait for a database that
/// was unreachable when the server started ([`crate::projections_slot`]).
pub fn check_projections_lock(state: &AppState) -> ApiResult<()> {
    match state.projections.get()?.fence().held_elsewhere() {
        None => Ok(()),
        Some(holder) => Err(ApiError::unavailable(
            "projections_unavailable",
            format!(
                "another process holds the projections database's lock ({holder}): its views may hold that \
                 process's rows, not this log's; stop it (the log, commands and task reads work)"
            ),
            5,
        )),
    }
}

/// The namespace a read is limited to: the caller's filter, which a scoped
/// token must give and must cover.
fn scoped_namespace(who: &Principal, namespace: Option<String>) -> ApiResult<Option<String>> {
    who.require(Permission::Read)?;
    match (&who.scope, namespace) {
        (None, ns) => Ok(ns),
        (Some(scope), Some(ns)) if scope.iter().any(|s| s.as_str() == ns) => Ok(Some(ns)),
        (Some(_), Some(ns)) => Err(ApiError::forbidden(format!("your credentials do not cover namespace {ns}"))),
        (Some(_), None) => Err(ApiError::forbidden("a namespace-scoped token must name a namespace it covers")),
    }
}

fn unscoped_auditor(who: &Principal) -> ApiResult<()> {
    who.require(Permission::Audit)?;
    if who.scope.is_some() {
        return Err(ApiError::forbidden("this view spans every namespace; a namespace-scoped token may not read it"));
    }
    Ok(())
}

pub struct ListArgs {
    pub first: u32,
    pub after: Option<String>,
    pub min_seq: Option<u64>,
}

impl ListArgs {
    fn page(&self) -> PageRequest {
        PageRequest { after: self.after.clone(), limit: self.first }
    }
}

pub async fn tasks(
    state: &AppState,
    who: &Principal,
    namespace: Option<String>,
    task_state: Option<String>,
    tag: Option<String>,
    args: ListArgs,
) -> ApiResult<Page<TaskSummary>> {
    let namespace = scoped_namespace(who, namespace)?;
    wait_min_seq(state, args.min_seq).await?;
    let filter = TaskFilter { namespace, state: task_state, tag };
    answered(query::tasks(state.projections.get()?.store(), &filter, &args.page())).await
}

pub async fn queue(
    state: &AppState,
    who: &Principal,
    namespace: Option<String>,
    step_state: Option<String>,
    args: ListArgs,
) -> ApiResult<Page<QueueEntry>> {
    let namespace = scoped_namespace(who, namespace)?;
    wait_min_seq(state, args.min_seq).await?;
    answered(query::queue(state.projections.get()?.store(), namespace.as_deref(), step_state.as_deref(), &args.page()))
        .await
}

pub async fn dead_letters(
    state: &AppState,
    who: &Principal,
    namespace: Option<String>,
    args: ListArgs,
) -> ApiResult<Page<DeadLetter>> {
    let namespace = scoped_namespace(who, namespace)?;
    wait_min_seq(state, args.min_seq).await?;
    answered(query::dead_letters(state.projections.get()?.store(), namespace.as_deref(), &args.page())).await
}

/// Counts, per-minute throughput for the last `window_minutes`, latency histograms.
pub async fn dashboard(
    state: &AppState,
    who: &Principal,
    namespace: Option<String>,
    window_minutes: Option<u32>,
    min_seq: Option<u64>,
) -> ApiResult<Dashboard> {
    let namespace = scoped_namespace(who, namespace)?;
    wait_min_seq(state, min_seq).await?;
    let since = window_minutes.map(|m| {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        now_us - i64::from(m) * 60_000_000
    });
    answered(query::dashboard(state.projections.get()?.store(), namespace.as_deref(), since)).await
}

#[derive(Default)]
pub struct AuditArgs {
    pub task: Option<String>,
    pub actor: Option<String>,
    pub event_type: Option<String>,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    pub from_time: Option<String>,
    pub to_time: Option<String>,
}

pub async fn audit_log(
    state: &AppState,
    who: &Principal,
    filter: AuditArgs,
    args: ListArgs,
) -> ApiResult<Page<AuditEntry>> {
    unscoped_auditor(who)?;
    wait_min_seq(state, args.min_seq).await?;
    let time = |t: Option<String>, field: &'static str| -> ApiResult<Option<i64>> {
        t.map(|t| {
            Timestamp::parse_rfc3339(&t)
                .map(|ts| ts.as_micros())
                .map_err(|m| ApiError::new(StatusCode::BAD_REQUEST, "invalid_filter", m).with_field(field))
        })
        .transpose()
    };
    let task = filter.task.as_deref().map(|t| filter_task(t, "task")).transpose()?.map(|id| *id.as_uuid());
    let filter = AuditFilter {
        task,
        actor: filter.actor,
        event_type: filter.event_type,
        from_seq: filter.from_seq,
        to_seq: filter.to_seq,
        from_us: time(filter.from_time, "from")?,
        to_us: time(filter.to_time, "to")?,
    };
    answered(query::audit_log(state.projections.get()?.store(), &filter, &args.page())).await
}

pub async fn workers(state: &AppState, who: &Principal, args: ListArgs) -> ApiResult<Page<WorkerView>> {
    unscoped_auditor(who)?;
    wait_min_seq(state, args.min_seq).await?;
    answered(query::workers(state.projections.get()?.store(), &args.page())).await
}

/// Each projector's checkpoint, lag and last error.
pub fn projector_status(state: &AppState, who: &Principal) -> ApiResult<Vec<ProjectorStatus>> {
    who.require(Permission::Read)?;
    state.projections.get()?.status().map_err(|e| ApiError::internal(e.to_string()))
}
