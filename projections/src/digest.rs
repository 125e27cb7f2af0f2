//! A canonical dump of every read-model row, and its digest. Two projections
//! of the same log prefix, however they were built (incrementally with
//! crashes in between, rebuilt from scratch, as-of, on SQLite or PostgreSQL),
//! must have equal dumps; the equivalence tests and `taskledger-replay` use
//! this to prove it. Checkpoint bookkeeping (wall-clock times) and the
//! internal mirror tables are left out: they are not read models.

use serde::Serialize;
use sqlx::FromRow;
use uuid::Uuid;

use crate::error::QueryError;
use crate::query::{
    AuditEntry, DeadLetter, LatencyBucket, MinuteThroughput, QueueEntry, QueueSettingsView, StateCount, StepView,
    TaskSummary, WorkerView,
};
use crate::store::{Store, on_backend};

#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
pub struct TaskRow {
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub summary: TaskSummary,
    pub payload: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
pub struct TagRow {
    pub tag: String,
    pub created_seq: i64,
    pub task_id: Uuid,
}

#[derive(Clone, Debug, PartialEq, Serialize, FromRow)]
pub struct StepRow {
    pub task_id: Uuid,
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub step: StepView,
}

/// Every read-model row, in primary-key order. Tables of projectors that a
/// store does not hold come back empty.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Dump {
    pub audit_log: Vec<AuditEntry>,
    pub tasks: Vec<TaskRow>,
    pub task_tags: Vec<TagRow>,
    pub task_steps: Vec<StepRow>,
    pub dead_letters: Vec<DeadLetter>,
    pub queue: Vec<QueueEntry>,
    pub queue_settings: Vec<QueueSettingsView>,
    pub workers: Vec<WorkerView>,
    pub dashboard_counts: Vec<StateCount>,
    pub dashboard_throughput: Vec<MinuteThroughput>,
    pub dashboard_latency: Vec<LatencyBucket>,
}

impl Dump {
    /// BLAKE3 of the dump's canonical JSON, hex.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).expect("dumps serialize");
        blake3::hash(&json).to_hex().to_string()
    }
}

#[derive(FromRow)]
struct AuditRaw {
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

/// Reads every read-model row of `store`'s live tables.
pub async fn dump(store: &Store) -> Result<Dump, QueryError> {
    on_backend!(store, pool => {
        let audit: Vec<AuditRaw> = sqlx::query_as(
            "SELECT seq, recorded_at_us, actor, command_id, stream, task_id, event_type, summary, hash \
             FROM audit_log ORDER BY seq",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        Ok(Dump {
            audit_log: audit
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
                    hash: crate::checkpoint::to_hex(&r.hash),
                })
                .collect(),
            tasks: sqlx::query_as(
                "SELECT task_id, namespace, name, state, priority, run_at_us, idempotency_key, created_at_us, \
                 created_seq, updated_at_us, updated_seq, finished_at_us, end_reason, step_count, steps_done, \
                 steps_failed, payload FROM tasks ORDER BY created_seq",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
            task_tags: sqlx::query_as("SELECT tag, created_seq, task_id FROM task_tags ORDER BY tag, created_seq")
                .fetch_all(pool)
                .await
                .unwrap_or_default(),
            task_steps: sqlx::query_as(
                "SELECT task_id, step_index, name, handler, state, depends_on, attempts, max_attempts, epoch, worker, \
                 lease_deadline_us, retry_at_us, enqueued_at_us, claimed_at_us, finished_at_us, last_error, result, \
                 resolution_note FROM task_steps ORDER BY task_id, step_index",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
            dead_letters: sqlx::query_as(
                "SELECT task_id, step_index, namespace, task_name, step_name, handler, attempts, max_attempts, \
                 last_error, failed_at_us FROM dead_letters ORDER BY task_id, step_index",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
            queue: sqlx::query_as(
                "SELECT task_id, step_index, namespace, task_name, step_name, handler, state, priority, run_at_us, \
                 attempts, max_attempts, worker, lease_deadline_us, retry_at_us, enqueued_at_us, sort_key_us \
                 FROM queue ORDER BY task_id, step_index",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
            queue_settings: sqlx::query_as(
                "SELECT namespace, paused, concurrency_limit, updated_at_us FROM queue_settings ORDER BY namespace",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
            workers: sqlx::query_as(
                "SELECT worker, first_seen_us, last_seen_us, leases_held, claims, completed, failed, released, \
                 expired, cancelled FROM workers ORDER BY worker",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
            dashboard_counts: sqlx::query_as(
                "SELECT namespace, kind, state, count FROM dashboard_counts ORDER BY namespace, kind, state",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
            dashboard_throughput: sqlx::query_as(
                "SELECT namespace, minute_us, created, completed, failed, retried, dead_lettered \
                 FROM dashboard_throughput ORDER BY namespace, minute_us",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
            dashboard_latency: sqlx::query_as(
                "SELECT namespace, kind, le_ms, count FROM dashboard_latency ORDER BY namespace, kind, le_ms",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
        })
    })
}
