//! The read side the API calls: typed, serializable answers from the read
//! models, with filters and cursor pagination. The API only adapts these to
//! REST and GraphQL; it writes no SQL of its own. With the `graphql`
//! feature (enabled by the API) the same row structs are also GraphQL
//! objects, so each row shape is written once for both.
//!
//! Pagination is by keyset (the cursor is the last row's sort key), never by
//! offset, so a page costs the same at the end of a million rows as at the
//! start, and rows arriving meanwhile do not shift later pages.

use serde::Serialize;
use sqlx::{FromRow, QueryBuilder};
use uuid::Uuid;

use crate::checkpoint::{self, to_hex};
use crate::error::QueryError;
use crate::store::{Store, on_backend};

/// Largest page any query returns.
pub const PAGE_SIZE_MAX: u32 = 500;
/// Page size when the caller gives none.
pub const PAGE_SIZE_DEFAULT: u32 = 50;
/// Most per-minute throughput rows one dashboard answer holds.
pub const DASHBOARD_MINUTES_MAX: i64 = 24 * 60;

/// Where a page starts and how long it is.
#[derive(Clone, Debug, Default)]
pub struct PageRequest {
    /// `next_cursor` of the previous page; `None` for the first.
    pub after: Option<String>,
    /// 0 means the default; capped at `PAGE_SIZE_MAX`.
    pub limit: u32,
}

impl PageRequest {
    pub fn first(limit: u32) -> Self {
        Self { after: None, limit }
    }

    fn limit(&self) -> i64 {
        i64::from(if self.limit == 0 { PAGE_SIZE_DEFAULT } else { self.limit.min(PAGE_SIZE_MAX) })
    }
}

/// What a page may hold: with the `graphql` feature, a GraphQL output type
/// (the derived page object needs it); without, anything. A bound that
/// depends on a feature has to be a trait of its own.
#[cfg(feature = "graphql")]
pub trait PageItem: async_graphql::OutputType {}
#[cfg(feature = "graphql")]
impl<T: async_graphql::OutputType> PageItem for T {}
/// What a page may hold (anything, without the `graphql` feature).
#[cfg(not(feature = "graphql"))]
pub trait PageItem {}
#[cfg(not(feature = "graphql"))]
impl<T> PageItem for T {}

/// One page of results; `next_cursor` is `None` on the last page.
///
/// In GraphQL each page type has its own name (a generic object needs one
/// per row type); the fields are the same as in REST.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
#[cfg_attr(
    feature = "graphql",
    graphql(
        concrete(name = "TaskPage", params(TaskSummary)),
        concrete(name = "QueueEntryPage", params(QueueEntry)),
        concrete(name = "DeadLetterPage", params(DeadLetter)),
        concrete(name = "WorkerPage", params(WorkerView)),
        concrete(name = "AuditEntryPage", params(AuditEntry))
    )
)]
pub struct Page<T: PageItem> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

fn page<T: PageItem>(mut items: Vec<T>, limit: i64, cursor: impl Fn(&T) -> String) -> Page<T> {
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next_cursor = if more { items.last().map(cursor) } else { None };
    Page { items, next_cursor }
}

fn bad_cursor(cursor: &str) -> QueryError {
    QueryError::BadCursor(format!("{cursor:?} is not a cursor this query returned"))
}

fn parse_seq_cursor(cursor: &Option<String>) -> Result<i64, QueryError> {
    match cursor {
        None => Ok(i64::MIN),
        Some(c) => c.parse().map_err(|_| bad_cursor(c)),
    }
}

/// A (sort key, task, step) cursor: `key.uuid.index`.
fn parse_step_cursor(cursor: &Option<String>) -> Result<Option<(i64, Uuid, i64)>, QueryError> {
    let Some(c) = cursor else { return Ok(None) };
    let mut parts = c.split('.');
    let parsed = (|| {
        let key = parts.next()?.parse().ok()?;
        let task = Uuid::parse_str(parts.next()?).ok()?;
        let index = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some((key, task, index))
    })();
    parsed.map(Some).ok_or_else(|| bad_cursor(c))
}

fn step_cursor(key: i64, task: &Uuid, index: i64) -> String {
    format!("{key}.{task}.{index}")
}

// ----- tasks -----

/// A task without its payload and steps (lists).
#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct TaskSummary {
    pub task_id: Uuid,
    pub namespace: String,
    pub name: String,
    pub state: String,
    pub priority: i64,
    pub run_at_us: Option<i64>,
    pub idempotency_key: Option<String>,
    pub created_at_us: i64,
    pub created_seq: i64,
    pub updated_at_us: i64,
    pub updated_seq: i64,
    pub finished_at_us: Option<i64>,
    pub end_reason: Option<String>,
    pub step_count: i64,
    pub steps_done: i64,
    pub steps_failed: i64,
}

const TASK_COLUMNS: &str = "t.task_id, t.namespace, t.name, t.state, t.priority, t.run_at_us, t.idempotency_key, \
     t.created_at_us, t.created_seq, t.updated_at_us, t.updated_seq, t.finished_at_us, t.end_reason, t.step_count, \
     t.steps_done, t.steps_failed";

/// One step of a task with its outcome.
#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct StepView {
    pub step_index: i64,
    pub name: String,
    pub handler: String,
    pub state: String,
    /// Names of the steps it waits for, comma-separated.
    pub depends_on: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub epoch: i64,
    pub worker: Option<String>,
    pub lease_deadline_us: Option<i64>,
    pub retry_at_us: Option<i64>,
    pub enqueued_at_us: Option<i64>,
    pub claimed_at_us: Option<i64>,
    pub finished_at_us: Option<i64>,
    pub last_error: Option<String>,
    pub result: Option<String>,
    pub resolution_note: Option<String>,
}

/// A task with everything the projections know of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct TaskView {
    #[serde(flatten)]
    #[cfg_attr(feature = "graphql", graphql(flatten))]
    pub summary: TaskSummary,
    pub payload: String,
    pub tags: Vec<String>,
    pub steps: Vec<StepView>,
}

/// Filters of the task list (all optional, combined with AND).
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    pub namespace: Option<String>,
    /// A task state as in `TaskState::as_str` (`in_progress`, `complete`, ...).
    pub state: Option<String>,
    pub tag: Option<String>,
}

fn check_task_state(state: &Option<String>) -> Result<(), QueryError> {
    match state {
        Some(s) if !domain::TaskState::ALL.iter().any(|t| t.as_str() == s) => {
            Err(QueryError::BadFilter(format!("unknown task state {s:?}")))
        }
        _ => Ok(()),
    }
}

/// Refuses a step-state filter that names no state (`BadFilter`).
pub fn check_step_state(state: &Option<String>) -> Result<(), QueryError> {
    match state {
        Some(s) if !domain::StepState::ALL.iter().any(|t| t.as_str() == s) => {
            Err(QueryError::BadFilter(format!("unknown step state {s:?}")))
        }
        _ => Ok(()),
    }
}

/// A task by id, with its steps, payload and tags.
pub async fn task(store: &Store, task_id: Uuid) -> Result<Option<TaskView>, QueryError> {
    on_backend!(store, pool => {
        let summary: Option<TaskSummary> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {TASK_COLUMNS} FROM tasks t WHERE t.task_id = $1")))
                .bind(task_id)
                .fetch_optional(pool)
                .await?;
        let Some(summary) = summary else { return Ok(None) };
        let payload: String = sqlx::query_scalar("SELECT payload FROM tasks WHERE task_id = $1")
            .bind(task_id)
            .fetch_one(pool)
            .await?;
        let tags: Vec<String> = sqlx::query_scalar("SELECT tag FROM task_tags WHERE task_id = $1 ORDER BY tag")
            .bind(task_id)
            .fetch_all(pool)
            .await?;
        let steps: Vec<StepView> = sqlx::query_as(
            "SELECT step_index, name, handler, state, depends_on, attempts, max_attempts, epoch, worker, \
             lease_deadline_us, retry_at_us, enqueued_at_us, claimed_at_us, finished_at_us, last_error, result, \
             resolution_note FROM task_steps WHERE task_id = $1 ORDER BY step_index",
        )
        .bind(task_id)
        .fetch_all(pool)
        .await?;
        Ok(Some(TaskView { summary, payload, tags, steps }))
    })
}

/// Tasks in creation order, filtered; the cursor is the last `created_seq`.
pub async fn tasks(store: &Store, filter: &TaskFilter, request: &PageRequest) -> Result<Page<TaskSummary>, QueryError> {
    check_task_state(&filter.state)?;
    let after = parse_seq_cursor(&request.after)?;
    let limit = request.limit();
    let items: Vec<TaskSummary> = on_backend!(store, pool => {
        let mut q = QueryBuilder::new("");
        push_tasks_query(&mut q, filter, after, limit);
        q.build_query_as().fetch_all(pool).await?
    });
    Ok(page(items, limit, |t| t.created_seq.to_string()))
}

/// A view's query whose plan [`plan`] shows.
#[derive(Clone, Copy, Debug)]
pub enum PlannedView<'a> {
    /// [`tasks`] under a filter.
    Tasks(&'a TaskFilter),
    /// [`queue`] of a namespace and a state, each optional.
    Queue { namespace: Option<&'a str>, state: Option<&'a str> },
}

/// The database's plan for the first page of a view, a line a step (SQLite's `EXPLAIN QUERY
/// PLAN` details, PostgreSQL's `EXPLAIN`): what a reader of a large store pays for it, shown
/// without running it.
pub async fn plan(store: &Store, view: PlannedView<'_>) -> Result<Vec<String>, QueryError> {
    fn push<DB>(q: &mut QueryBuilder<DB>, view: PlannedView<'_>)
    where
        DB: sqlx::Database,
        String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
        i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
        Uuid: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    {
        let limit = PageRequest::first(0).limit();
        match view {
            PlannedView::Tasks(filter) => push_tasks_query(q, filter, i64::MIN, limit),
            PlannedView::Queue { namespace, state } => push_queue_query(q, namespace, state, None, limit),
        }
    }
    match view {
        PlannedView::Tasks(filter) => check_task_state(&filter.state)?,
        PlannedView::Queue { state, .. } => check_step_state(&state.map(str::to_owned))?,
    }
    let lines = match store {
        Store::Sqlite(pool, _) => {
            let mut q = QueryBuilder::new("EXPLAIN QUERY PLAN ");
            push(&mut q, view);
            let rows: Vec<(i64, i64, i64, String)> = q.build_query_as().fetch_all(pool).await?;
            rows.into_iter().map(|(_, _, _, detail)| detail).collect()
        }
        Store::Postgres(pool) => {
            let mut q = QueryBuilder::new("EXPLAIN ");
            push(&mut q, view);
            let rows: Vec<(String,)> = q.build_query_as().fetch_all(pool).await?;
            rows.into_iter().map(|(line,)| line).collect()
        }
    };
    Ok(lines)
}

/// Appends the `tasks` query to `q`. With a tag, the tag table leads and orders the page: its
/// key is (tag, created_seq), so a page reads as many of the tag's rows as it shows. Ordered by
/// the tasks table's `created_seq` instead (the same value), the database read every task of
/// the tag and sorted them before the first row came out: 0.7 s for one page of a tag on 2.1M
/// events (found by a churn soak, 2026-12-07).
fn push_tasks_query<DB>(q: &mut QueryBuilder<DB>, filter: &TaskFilter, after: i64, limit: i64)
where
    DB: sqlx::Database,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    q.push(format!("SELECT {TASK_COLUMNS} FROM "));
    let order = match &filter.tag {
        Some(tag) => {
            q.push("task_tags g JOIN tasks t ON t.task_id = g.task_id WHERE g.tag = ");
            q.push_bind(tag.clone());
            q.push(" AND g.created_seq > ");
            "g.created_seq"
        }
        None => {
            q.push("tasks t WHERE t.created_seq > ");
            "t.created_seq"
        }
    };
    q.push_bind(after);
    if let Some(namespace) = &filter.namespace {
        q.push(" AND t.namespace = ");
        q.push_bind(namespace.clone());
    }
    if let Some(state) = &filter.state {
        q.push(" AND t.state = ");
        q.push_bind(state.clone());
    }
    q.push(format!(" ORDER BY {order} LIMIT "));
    q.push_bind(limit + 1);
}

// ----- queue -----

/// A step that is not terminal, where it stands.
#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct QueueEntry {
    pub task_id: Uuid,
    pub step_index: i64,
    pub namespace: String,
    pub task_name: String,
    pub step_name: String,
    pub handler: String,
    pub state: String,
    pub priority: i64,
    pub run_at_us: Option<i64>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub worker: Option<String>,
    pub lease_deadline_us: Option<i64>,
    pub retry_at_us: Option<i64>,
    pub enqueued_at_us: Option<i64>,
    /// What happens next, and when: claim order for enqueued steps, lease
    /// deadline for running ones, retry time for waiting ones, `run_at` (or
    /// creation) for pending ones.
    pub sort_key_us: i64,
}

/// Non-terminal steps, optionally of one namespace and one step state, in
/// `sort_key_us` order, then by task id and step. (Claims take enqueued steps of
/// equal keys in the order they became claimable, which the rows do not hold:
/// a batch of tasks with client-given ids is listed by id.)
pub async fn queue(
    store: &Store,
    namespace: Option<&str>,
    state: Option<&str>,
    request: &PageRequest,
) -> Result<Page<QueueEntry>, QueryError> {
    check_step_state(&state.map(str::to_owned))?;
    let after = parse_step_cursor(&request.after)?;
    let limit = request.limit();
    let items: Vec<QueueEntry> = on_backend!(store, pool => {
        let mut q = QueryBuilder::new("");
        push_queue_query(&mut q, namespace, state, after, limit);
        q.build_query_as().fetch_all(pool).await?
    });
    Ok(page(items, limit, |e| step_cursor(e.sort_key_us, &e.task_id, e.step_index)))
}

const QUEUE_COLUMNS: &str = "task_id, step_index, namespace, task_name, step_name, handler, state, priority, \
     run_at_us, attempts, max_attempts, worker, lease_deadline_us, retry_at_us, enqueued_at_us, sort_key_us";
const QUEUE_ORDER: &str = " ORDER BY sort_key_us, task_id, step_index LIMIT ";

/// Appends the `queue` query to `q`. Each page reads at most a page of rows from each index it
/// searches, whatever the queue's size: with a state, the index on (namespace, state, key) or
/// on (state, key) gives the rows in page order; without one, a page of each state the queue
/// holds (the five that are not final) is read that way and the five merged. Sorting every row
/// of a namespace, or of the whole queue, took seconds a page once the backlog reached a
/// million steps, when an operator reads this view most.
fn push_queue_query<DB>(
    q: &mut QueryBuilder<DB>,
    namespace: Option<&str>,
    state: Option<&str>,
    after: Option<(i64, Uuid, i64)>,
    limit: i64,
) where
    DB: sqlx::Database,
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    Uuid: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    let one_state = |q: &mut QueryBuilder<DB>, state: &str| {
        q.push(format!("SELECT {QUEUE_COLUMNS} FROM queue WHERE state = "));
        q.push_bind(state.to_owned());
        if let Some(namespace) = namespace {
            q.push(" AND namespace = ");
            q.push_bind(namespace.to_owned());
        }
        if let Some((key, task, index)) = after {
            q.push(" AND (sort_key_us, task_id, step_index) > (");
            q.push_bind(key);
            q.push(", ");
            q.push_bind(task);
            q.push(", ");
            q.push_bind(index);
            q.push(")");
        }
        q.push(QUEUE_ORDER);
        q.push_bind(limit + 1);
    };
    match state {
        Some(state) => one_state(q, state),
        None => {
            let held = domain::StepState::ALL.into_iter().filter(|s| !s.is_terminal());
            for (i, state) in held.enumerate() {
                if i > 0 {
                    q.push(" UNION ALL ");
                }
                q.push("SELECT * FROM (");
                one_state(q, state.as_str());
                q.push(format!(") AS s{i}"));
            }
            q.push(QUEUE_ORDER);
            q.push_bind(limit + 1);
        }
    }
}

/// A namespace's operator settings.
#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct QueueSettingsView {
    pub namespace: String,
    pub paused: bool,
    pub concurrency_limit: Option<i64>,
    pub updated_at_us: i64,
}

/// Every namespace an operator has configured.
pub async fn queue_settings(store: &Store) -> Result<Vec<QueueSettingsView>, QueryError> {
    Ok(on_backend!(store, pool => {
        sqlx::query_as(
            "SELECT namespace, paused, concurrency_limit, updated_at_us FROM queue_settings ORDER BY namespace",
        )
        .fetch_all(pool)
        .await?
    }))
}

// ----- dead letters and workers -----

/// A step in `Error` whose task waits for an operator.
#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct DeadLetter {
    pub task_id: Uuid,
    pub step_index: i64,
    pub namespace: String,
    pub task_name: String,
    pub step_name: String,
    pub handler: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub last_error: Option<String>,
    pub failed_at_us: i64,
}

/// Dead letters, oldest failure first, optionally of one namespace.
pub async fn dead_letters(
    store: &Store,
    namespace: Option<&str>,
    request: &PageRequest,
) -> Result<Page<DeadLetter>, QueryError> {
    let after = parse_step_cursor(&request.after)?;
    let limit = request.limit();
    let items: Vec<DeadLetter> = on_backend!(store, pool => {
        let mut q = QueryBuilder::new(
            "SELECT task_id, step_index, namespace, task_name, step_name, handler, attempts, max_attempts, \
             last_error, failed_at_us FROM dead_letters WHERE 1 = 1",
        );
        if let Some(namespace) = namespace {
            q.push(" AND namespace = ");
            q.push_bind(namespace.to_owned());
        }
        if let Some((key, task, index)) = after {
            q.push(" AND (failed_at_us, task_id, step_index) > (");
            q.push_bind(key);
            q.push(", ");
            q.push_bind(task);
            q.push(", ");
            q.push_bind(index);
            q.push(")");
        }
        q.push(" ORDER BY failed_at_us, task_id, step_index LIMIT ");
        q.push_bind(limit + 1);
        q.build_query_as().fetch_all(pool).await?
    });
    Ok(page(items, limit, |d| step_cursor(d.failed_at_us, &d.task_id, d.step_index)))
}

/// A worker's activity.
#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct WorkerView {
    pub worker: String,
    pub first_seen_us: i64,
    /// Its last claim, heartbeat or outcome (`i64::MIN` if it never acted itself).
    pub last_seen_us: i64,
    pub leases_held: i64,
    pub claims: i64,
    pub completed: i64,
    pub failed: i64,
    pub released: i64,
    pub expired: i64,
    pub cancelled: i64,
}

/// Workers by name; the cursor is the last name.
pub async fn workers(store: &Store, request: &PageRequest) -> Result<Page<WorkerView>, QueryError> {
    let limit = request.limit();
    let after = request.after.clone().unwrap_or_default();
    let items: Vec<WorkerView> = on_backend!(store, pool => {
        sqlx::query_as(
            "SELECT worker, first_seen_us, last_seen_us, leases_held, claims, completed, failed, released, expired, \
             cancelled FROM workers WHERE worker > $1 ORDER BY worker LIMIT $2",
        )
        .bind(after)
        .bind(limit + 1)
        .fetch_all(pool)
        .await?
    });
    Ok(page(items, limit, |w| w.worker.clone()))
}

// ----- dashboard -----

/// How many tasks or steps of a namespace are in one state.
#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct StateCount {
    pub namespace: String,
    /// `task` or `step`.
    pub kind: String,
    pub state: String,
    pub count: i64,
}

/// What happened in a namespace during one minute (`minute_us`, its start).
#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct MinuteThroughput {
    pub namespace: String,
    pub minute_us: i64,
    pub created: i64,
    pub completed: i64,
    pub failed: i64,
    pub retried: i64,
    pub dead_lettered: i64,
}

/// One bucket of a namespace's wait or run latency histogram.
#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct LatencyBucket {
    pub namespace: String,
    /// `wait` (enqueued → claimed) or `run` (claimed → completed or failed).
    pub kind: String,
    /// Inclusive upper bound in ms; -1 for the unbounded last bucket.
    pub le_ms: i64,
    pub count: i64,
}

/// Counts by state, per-minute throughput and latency histograms.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct Dashboard {
    pub counts: Vec<StateCount>,
    pub throughput: Vec<MinuteThroughput>,
    pub latency: Vec<LatencyBucket>,
}

/// Counts, per-minute throughput since `since_minute_us` (the newest
/// `DASHBOARD_MINUTES_MAX` minutes per namespace at most) and latency
/// histograms, optionally of one namespace.
pub async fn dashboard(
    store: &Store,
    namespace: Option<&str>,
    since_minute_us: Option<i64>,
) -> Result<Dashboard, QueryError> {
    let ns = namespace.map(str::to_owned);
    let since = since_minute_us.unwrap_or(i64::MIN);
    on_backend!(store, pool => {
        let counts: Vec<StateCount> = sqlx::query_as(
            "SELECT namespace, kind, state, count FROM dashboard_counts \
             WHERE ($1 IS NULL OR namespace = $1) ORDER BY namespace, kind, state",
        )
        .bind(ns.clone())
        .fetch_all(pool)
        .await?;
        let mut throughput: Vec<MinuteThroughput> = sqlx::query_as(
            "SELECT namespace, minute_us, created, completed, failed, retried, dead_lettered \
             FROM dashboard_throughput WHERE ($1 IS NULL OR namespace = $1) AND minute_us >= $2 \
             ORDER BY minute_us DESC, namespace LIMIT $3",
        )
        .bind(ns.clone())
        .bind(since)
        .bind(DASHBOARD_MINUTES_MAX * 64)
        .fetch_all(pool)
        .await?;
        throughput.reverse();
        let latency: Vec<LatencyBucket> = sqlx::query_as(
            "SELECT namespace, kind, le_ms, count FROM dashboard_latency \
             WHERE ($1 IS NULL OR namespace = $1) ORDER BY namespace, kind, le_ms",
        )
        .bind(ns)
        .fetch_all(pool)
        .await?;
        Ok(Dashboard { counts, throughput, latency })
    })
}

// ----- audit -----

/// One event as the audit log records it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct AuditEntry {
    pub seq: i64,
    pub recorded_at_us: i64,
    pub actor: String,
    pub command_id: String,
    pub stream: String,
    pub task_id: Option<Uuid>,
    pub event_type: String,
    pub summary: String,
    /// The record's chain hash, hex.
    pub hash: String,
}

#[derive(FromRow)]
struct AuditRow {
    seq: i64,
    recorded_at_us: i64,
    actor: String,
    command_id: String,
    stream: String,
    task_id: Option<Uuid>,
    event_type: String,
    summary: String,
    hash: Vec<u8>,
}

/// Filters of the audit log (all optional, combined with AND; ranges inclusive).
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub task: Option<Uuid>,
    pub actor: Option<String>,
    /// An event type name (`step_claimed`, ...).
    pub event_type: Option<String>,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
    pub from_us: Option<i64>,
    pub to_us: Option<i64>,
}

/// Audit rows in seq order; the cursor is the last seq.
pub async fn audit_log(
    store: &Store,
    filter: &AuditFilter,
    request: &PageRequest,
) -> Result<Page<AuditEntry>, QueryError> {
    if let Some(t) = &filter.event_type
        && !domain::Event::TYPES.iter().any(|(name, _)| name == t)
    {
        return Err(QueryError::BadFilter(format!("unknown event type {t:?}")));
    }
    // Seqs above i64::MAX match nothing; saturate rather than wrap.
    let from_seq = filter.from_seq.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX).saturating_sub(1));
    let mut after = parse_seq_cursor(&request.after)?.max(from_seq);
    let mut to_seq = filter.to_seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
    // A time range becomes a seq range (see `first_seq_where`): no index on the time. An
    // empty table needs none (rows appended meanwhile meet the time conditions below).
    let last: Option<i64> = if filter.from_us.is_some() || filter.to_us.is_some() {
        on_backend!(store, pool => sqlx::query_scalar(LAST_AUDIT_SEQ).fetch_optional(pool).await?)
    } else {
        None
    };
    if let (Some(from_us), Some(last)) = (filter.from_us, last) {
        // Every row before the first one at or after `from_us` is earlier.
        after = after.max(first_seq_where(store, after, last, |at| at >= from_us).await?.saturating_sub(1));
    }
    if let (Some(to_us), Some(last)) = (filter.to_us, last) {
        let later = first_seq_where(store, after, last, |at| at > to_us).await?.saturating_sub(1);
        to_seq = Some(to_seq.map_or(later, |s| s.min(later)));
    }
    let limit = request.limit();
    let rows: Vec<AuditRow> = on_backend!(store, pool => {
        let mut q = QueryBuilder::new(
            "SELECT seq, recorded_at_us, actor, command_id, stream, task_id, event_type, summary, hash \
             FROM audit_log WHERE seq > ",
        );
        q.push_bind(after);
        if let Some(to_seq) = to_seq {
            q.push(" AND seq <= ");
            q.push_bind(to_seq);
        }
        if let Some(task) = filter.task {
            q.push(" AND task_id = ");
            q.push_bind(task);
        }
        if let Some(actor) = &filter.actor {
            q.push(" AND actor = ");
            q.push_bind(actor.clone());
        }
        if let Some(event_type) = &filter.event_type {
            q.push(" AND event_type = ");
            q.push_bind(event_type.clone());
        }
        // The seq range already holds the time range's rows; these also keep out rows
        // appended since it was found (a range reaching into the future).
        if let Some(from_us) = filter.from_us {
            q.push(" AND recorded_at_us >= ");
            q.push_bind(from_us);
        }
        if let Some(to_us) = filter.to_us {
            q.push(" AND recorded_at_us <= ");
            q.push_bind(to_us);
        }
        q.push(" ORDER BY seq LIMIT ");
        q.push_bind(limit + 1);
        q.build_query_as().fetch_all(pool).await?
    });
    let items = rows
        .into_iter()
        .map(|r| AuditEntry {
            seq: r.seq,
            recorded_at_us: r.recorded_at_us,
            actor: r.actor,
            command_id: r.command_id,
            stream: r.stream,
            task_id: r.task_id,
            event_type: r.event_type,
            summary: r.summary,
            hash: to_hex(&r.hash),
        })
        .collect();
    Ok(page(items, limit, |e| e.seq.to_string()))
}

/// The newest audit row's seq.
const LAST_AUDIT_SEQ: &str = "SELECT seq FROM audit_log ORDER BY seq DESC LIMIT 1";

/// The first seq above `after` from which on every audit row's time meets
/// `at_or_later` (false, then true, along the log), or `last` + 1 (`last`:
/// the newest row's seq) if none does: found by binary search over seq, the
/// table's key, in about log2(rows) lookups.
///
/// That a time range is a seq range is the log's own rule: it refuses a
/// record stamped before the one it follows (`AppendError::TimeWentBackwards`),
/// and its reader's time queries rest on it too. An index on the time would
/// be updated by every event the audit projector writes, to serve a filter
/// auditors use now and then; it was a quarter of `audit_log`'s indexes.
async fn first_seq_where(
    store: &Store,
    after: i64,
    last: i64,
    at_or_later: impl Fn(i64) -> bool,
) -> Result<i64, QueryError> {
    const FIRST_FROM: &str = "SELECT seq, recorded_at_us FROM audit_log WHERE seq >= $1 ORDER BY seq LIMIT 1";
    // The answer is in [low, high]: rows before `low` fail, rows from `high` on (none past `last`) meet it.
    let (mut low, mut high) = (after.saturating_add(1).max(0), last.saturating_add(1));
    while low < high {
        let middle = low + (high - low) / 2;
        let row: Option<(i64, i64)> =
            on_backend!(store, pool => sqlx::query_as(FIRST_FROM).bind(middle).fetch_optional(pool).await?);
        match row {
            Some((_, at)) if at_or_later(at) => high = middle,
            Some((seq, _)) => low = seq + 1,
            // No row from `middle` on.
            None => high = middle,
        }
    }
    Ok(low)
}

// ----- checkpoints -----

/// A stored checkpoint with its lag behind the log head.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct CheckpointView {
    pub projector: String,
    pub slot: String,
    pub version: i32,
    pub generation: i64,
    pub last_seq: u64,
    pub last_hash: String,
    pub updated_at_us: i64,
    pub head_seq: u64,
    pub lag: u64,
}

/// Every stored checkpoint (live and shadow) and its lag behind `head_seq`
/// (the log's head, e.g. `LogReader::head()`).
pub async fn checkpoints(store: &Store, head_seq: u64) -> Result<Vec<CheckpointView>, QueryError> {
    let all = checkpoint::all(store).await.map_err(|e| match e {
        crate::error::ApplyError::Sql(e) => QueryError::Sql(e),
        other => QueryError::BadFilter(other.to_string()),
    })?;
    Ok(all
        .into_iter()
        .map(|c| CheckpointView {
            lag: head_seq.saturating_sub(c.last_seq),
            projector: c.projector,
            slot: c.slot,
            version: c.version,
            generation: c.generation,
            last_seq: c.last_seq,
            last_hash: to_hex(&c.last_hash),
            updated_at_us: c.updated_at_us,
            head_seq,
        })
        .collect())
}
