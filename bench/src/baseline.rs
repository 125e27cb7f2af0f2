//! The baseline: the usual PostgreSQL job queue ("a table + FOR UPDATE SKIP
//! LOCKED", as River, graphile-worker, tasker-core and many in-house queues
//! do it), written the way its best users write it, on the same throwaway
//! cluster with fsync on (so an acknowledged job is as durable as a
//! taskledger acknowledgement).
//!
//! - One `jobs` table (bigserial id, queue, kind, state enum, priority,
//!   run_at, attempts, payload jsonb, lease columns, timestamps) with a
//!   partial fetch index on `(queue, priority DESC, run_at, id) WHERE state =
//!   'ready'` and the rescuer's partial index on `locked_at WHERE state =
//!   'running'`.
//! - Producers: one `INSERT … RETURNING id` per job, a single round trip in
//!   autocommit; batches are one `INSERT … SELECT … FROM unnest($3)`.
//! - Workers: one claim statement (`UPDATE … WHERE id IN (SELECT … ORDER BY
//!   priority DESC, run_at, id LIMIT $K FOR UPDATE SKIP LOCKED) RETURNING`),
//!   then the whole claimed batch is completed in one `UPDATE … WHERE id =
//!   ANY($1)`: River's batching completer and graphile-worker's batched
//!   completion do the same, and completing K jobs one by one would be
//!   needless round trips.
//! - Waking idle workers: by default a worker whose claim came back empty
//!   sleeps 2 ms and claims again (`--baseline-wakeup poll:MS`). The other
//!   way, `--baseline-wakeup notify`, is graphile-worker's: a statement-level
//!   `AFTER INSERT` trigger calls `pg_notify` and one shared LISTEN connection
//!   wakes every waiting worker. Measured here it is about 5× slower on the
//!   lifecycle workload: a transaction that notifies holds PostgreSQL's
//!   global notify lock through its commit (WAL flush included), so notifying
//!   inserts commit one at a time and lose group commit. A short poll is the
//!   stronger baseline, so it is the default; the cost is idle workers
//!   querying 500 times a second each.
//! - Every statement is a prepared statement (sqlx caches them per
//!   connection); every producer and worker holds one pooled connection for
//!   the run, so no pool checkout sits on the hot path.
//! - The table starts with history and statistics, as a production queue's
//!   table has them (River keeps finished jobs for a day; autovacuum has
//!   analyzed it): `--baseline-history N` finished jobs, then `ANALYZE`.
//!   Without them PostgreSQL plans each connection's prepared statements,
//!   at their sixth run, for a table it takes to be near empty, and keeps
//!   those generic plans for the whole run. The completion's plan is then a
//!   sequential scan, or a bitmap scan of the `jobs_rescue` index: bitmap
//!   scans read every entry and never mark dead ones, so it reads an entry
//!   for every job claimed so far (no vacuum runs in a 13 s window). The
//!   queue slows as it runs: 6–8k jobs/s instead of 15–19k in most runs
//!   here (2026-12-06, plans from `auto_explain`). With statistics the plan
//!   is a plain index scan of `jobs_rescue`, which marks the dead entries it
//!   passes so btree drops them, and stays the size of the running set.
//!   Which plan a connection froze depended on the moment, so the same
//!   command gave either speed before the history was added;
//!   `--baseline-history 0` shows it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::Notify;

use crate::stats::{OpenLoop, Phase, Pickups, Tally};

const SCHEMA: &str = r#"
CREATE TYPE job_state AS ENUM ('ready', 'running', 'completed', 'retryable', 'failed', 'cancelled');
CREATE TABLE jobs (
    id           bigserial PRIMARY KEY,
    queue        text        NOT NULL,
    kind         text        NOT NULL,
    state        job_state   NOT NULL DEFAULT 'ready',
    priority     smallint    NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    max_attempts integer     NOT NULL DEFAULT 3,
    payload      jsonb       NOT NULL DEFAULT '{}',
    result       jsonb,
    last_error   text,
    locked_by    text,
    locked_at    timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX jobs_fetch ON jobs (queue, priority DESC, run_at, id) WHERE state = 'ready';
CREATE INDEX jobs_rescue ON jobs (locked_at) WHERE state = 'running';
"#;

const NOTIFY_TRIGGER: &str = r#"
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobs_inserted', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_notify AFTER INSERT ON jobs FOR EACH STATEMENT EXECUTE FUNCTION jobs_notify();
"#;

/// Finished jobs of an earlier day, in a queue of their own.
const HISTORY: &str = "INSERT INTO jobs (queue, kind, payload, state, attempts, locked_by, locked_at, created_at, finished_at) \
     SELECT 'history', 'send-email', '{}', 'completed', 1, 'w-0', now() - interval '1 day', now() - interval '1 day', \
            now() - interval '1 day' FROM generate_series(1, $1::bigint)";

const INSERT: &str = "INSERT INTO jobs (queue, kind, payload) VALUES ($1, $2, $3::jsonb) RETURNING id";
const INSERT_MANY: &str =
    "INSERT INTO jobs (queue, kind, payload) SELECT $1, $2, p::jsonb FROM unnest($3::text[]) AS p";
const CLAIM: &str = "UPDATE jobs SET state = 'running', attempts = attempts + 1, locked_by = $1, locked_at = now() \
     WHERE id IN (SELECT id FROM jobs WHERE state = 'ready' AND queue = $2 AND run_at <= now() \
                  ORDER BY priority DESC, run_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) \
     RETURNING id, kind, attempts, payload::text";
const COMPLETE: &str = "UPDATE jobs SET state = 'completed', finished_at = now(), result = '{\"ok\":true}' \
     WHERE id = ANY($1) AND state = 'running' AND locked_by = $2";

/// How idle workers learn about new jobs.
#[derive(Clone, Copy, Debug)]
pub enum Wakeup {
    /// LISTEN/NOTIFY through an insert trigger.
    Notify,
    /// Sleep this long after an empty claim.
    Poll(Duration),
}

impl std::str::FromStr for Wakeup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "notify" {
            return Ok(Wakeup::Notify);
        }
        s.strip_prefix("poll:")
            .and_then(|ms| ms.parse::<u64>().ok())
            .map(|ms| Wakeup::Poll(Duration::from_millis(ms)))
            .ok_or_else(|| format!("expected `notify` or `poll:MS`, got {s:?}"))
    }
}

/// A fresh database with the jobs table, a pool, and (with NOTIFY) the
/// listener task that wakes idle workers.
pub struct Queue {
    pub pool: PgPool,
    pub wakeup: Wakeup,
    pub inserted: Arc<Notify>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl Queue {
    /// `history`: finished jobs the table starts with (then `ANALYZE`), see the module comment.
    pub async fn create(url: &str, connections: u32, wakeup: Wakeup, history: u64) -> Result<Queue> {
        let pool = PgPoolOptions::new()
            .max_connections(connections + 2)
            .min_connections(0)
            .connect(url)
            .await
            .with_context(|| format!("connect to {url}"))?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await.context("create the jobs table")?;
        if history > 0 {
            sqlx::query(HISTORY).bind(i64::try_from(history)?).execute(&pool).await.context("add history")?;
            sqlx::raw_sql("ANALYZE jobs").execute(&pool).await.context("analyze the jobs table")?;
        }
        let inserted = Arc::new(Notify::new());
        let mut listener = None;
        if let Wakeup::Notify = wakeup {
            sqlx::raw_sql(NOTIFY_TRIGGER).execute(&pool).await.context("create the notify trigger")?;
            let mut l = PgListener::connect_with(&pool).await.context("open the LISTEN connection")?;
            l.listen("jobs_inserted").await.context("LISTEN jobs_inserted")?;
            let wake = inserted.clone();
            listener = Some(tokio::spawn(async move {
                while l.recv().await.is_ok() {
                    wake.notify_waiters();
                }
            }));
        }
        Ok(Queue { pool, wakeup, inserted, listener })
    }

    pub async fn close(self) {
        if let Some(l) = self.listener {
            l.abort();
        }
        self.pool.close().await;
    }
}

fn payload(n: u64) -> String {
    format!(r#"{{"n":{n},"to":"user-{n}@example.com","template":"welcome"}}"#)
}

/// A closed-loop producer: one INSERT at a time, pausing while more than
/// `max_backlog` jobs are unfinished.
pub async fn producer(
    pool: PgPool,
    queue: &'static str,
    max_backlog: u64,
    phase: Arc<Phase>,
    pickups: Arc<Pickups>,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut conn = pool.acquire().await.context("acquire a connection")?;
    let mut n = 0u64;
    while !phase.stopping() {
        if phase.backlog.load(Ordering::Relaxed) >= max_backlog {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        n += 1;
        phase.backlog.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let id: i64 = match sqlx::query_scalar(INSERT)
            .bind(queue)
            .bind("send-email")
            .bind(payload(n))
            .fetch_one(&mut *conn)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                tally.error(|| format!("insert: {e}"));
                break;
            }
        };
        let elapsed = started.elapsed();
        let pickup = pickups.acknowledged(id as u64, phase.now_ns());
        if phase.measuring() {
            tally.create.record(elapsed);
            tally.created += 1;
            if let Some(p) = pickup {
                tally.pickup.record(p);
            }
        }
    }
    Ok(tally)
}

/// How an insert-side producer is paced.
pub enum Pace {
    /// Open loop: one insert every `interval`, starting at `offset`; latency is
    /// measured as `OpenLoop` says.
    Fixed { interval: Duration, offset: Duration },
    /// One at a time, `interval` apart (the idle-worker case).
    Trickle { interval: Duration },
}

pub async fn paced_producer(
    pool: PgPool,
    queue: &'static str,
    pace: Pace,
    phase: Arc<Phase>,
    pickups: Arc<Pickups>,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut conn = pool.acquire().await.context("acquire a connection")?;
    let mut n = 0u64;
    let mut clock = OpenLoop::new();
    let mut next = tokio::time::Instant::now();
    if let Pace::Fixed { offset, .. } = pace {
        next += offset;
    }
    while !phase.stopping() {
        let scheduled = match pace {
            Pace::Fixed { interval, .. } => {
                let at = next;
                next += interval;
                at
            }
            Pace::Trickle { interval } => tokio::time::Instant::now() + interval,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(scheduled) => {}
            _ = phase.stopped() => break,
        }
        let scheduled = scheduled.into_std();
        let since = clock.origin(scheduled, phase.measuring(), &mut tally);
        n += 1;
        phase.backlog.fetch_add(1, Ordering::Relaxed);
        let id: i64 = match sqlx::query_scalar(INSERT)
            .bind(queue)
            .bind("send-email")
            .bind(payload(n))
            .fetch_one(&mut *conn)
            .await
        {
            Ok(id) => id,
            Err(e) => {
                tally.error(|| format!("insert: {e}"));
                break;
            }
        };
        let elapsed = since.elapsed();
        clock.answered(scheduled, true, phase.measuring(), &mut tally);
        let pickup = pickups.acknowledged(id as u64, phase.now_ns());
        if phase.measuring() {
            tally.create.record(elapsed);
            tally.created += 1;
            if let Some(p) = pickup {
                tally.pickup.record(p);
            }
        }
    }
    Ok(tally)
}

/// Inserts batches of `size` jobs in one statement each.
pub async fn batch_producer(pool: PgPool, queue: &'static str, size: usize, phase: Arc<Phase>) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut conn = pool.acquire().await.context("acquire a connection")?;
    let mut n = 0u64;
    while !phase.stopping() {
        let payloads: Vec<String> = (0..size)
            .map(|_| {
                n += 1;
                payload(n)
            })
            .collect();
        let started = Instant::now();
        if let Err(e) = sqlx::query(INSERT_MANY).bind(queue).bind("send-email").bind(payloads).execute(&mut *conn).await
        {
            tally.error(|| format!("insert batch: {e}"));
            break;
        }
        if phase.measuring() {
            tally.create.record(started.elapsed());
            tally.created += size as u64;
        }
    }
    Ok(tally)
}

/// A worker: claim up to `max`, complete them all in one statement; when a
/// claim comes back empty, wait for an insert notification (or poll).
#[allow(clippy::too_many_arguments)]
pub async fn worker(
    queue_handle: Arc<Notify>,
    wakeup: Wakeup,
    pool: PgPool,
    queue: &'static str,
    index: usize,
    max: u32,
    phase: Arc<Phase>,
    pickups: Arc<Pickups>,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut conn = pool.acquire().await.context("acquire a connection")?;
    let worker_id = format!("w-{index}");
    let mut ids: Vec<i64> = Vec::with_capacity(max as usize);
    while !phase.stopping() {
        // Registered before the claim, so an insert committed while the
        // claim runs still wakes this worker.
        let inserted = queue_handle.notified();
        tokio::pin!(inserted);
        inserted.as_mut().enable();
        let started = Instant::now();
        let rows: Vec<(i64, String, i32, String)> =
            match sqlx::query_as(CLAIM).bind(&worker_id).bind(queue).bind(i64::from(max)).fetch_all(&mut *conn).await {
                Ok(rows) => rows,
                Err(e) => {
                    tally.error(|| format!("claim: {e}"));
                    break;
                }
            };
        let at_ns = phase.now_ns();
        let measuring = phase.measuring();
        if measuring {
            tally.claim.record(started.elapsed());
        }
        if rows.is_empty() {
            match wakeup {
                Wakeup::Notify => {
                    tokio::select! {
                        _ = &mut inserted => {}
                        // A safety net, as real workers have: re-check now and then.
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = phase.stopped() => break,
                    }
                }
                Wakeup::Poll(interval) => {
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = phase.stopped() => break,
                    }
                }
            }
            continue;
        }
        ids.clear();
        for (id, _kind, attempts, _payload) in &rows {
            if *attempts == 1
                && let Some(p) = pickups.claimed(*id as u64, at_ns)
                && measuring
            {
                tally.pickup.record(p);
            }
            ids.push(*id);
        }
        let started = Instant::now();
        let done = match sqlx::query(COMPLETE).bind(&ids).bind(&worker_id).execute(&mut *conn).await {
            Ok(done) => done.rows_affected(),
            Err(e) => {
                tally.error(|| format!("complete: {e}"));
                break;
            }
        };
        if done != ids.len() as u64 {
            tally.error(|| format!("complete: {done} of {} jobs updated", ids.len()));
        }
        phase.backlog.fetch_sub(ids.len() as u64, Ordering::Relaxed);
        if phase.measuring() {
            tally.complete.record(started.elapsed());
            tally.completed_steps += ids.len() as u64;
            tally.finished += ids.len() as u64;
        }
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;
    use projections::testing::TempPostgres;

    /// The plan PostgreSQL keeps for a prepared statement once it settles on a generic one,
    /// as `EXPLAIN` prints it.
    async fn generic_plan(pool: &PgPool, statement: &str, types: &str, values: &str) -> String {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET plan_cache_mode = force_generic_plan; PREPARE s({types}) AS {statement}"
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
        let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN EXECUTE s({values})")))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        // The pool hands this connection out again: leave it as it was.
        sqlx::raw_sql("DEALLOCATE s; RESET plan_cache_mode").execute(&mut *conn).await.unwrap();
        lines.join("\n")
    }

    /// Why the baseline's table starts with history: on a fresh, never-analyzed table the
    /// completion's generic plan (the one a worker's prepared statement keeps for the run) is
    /// a sequential scan or a bitmap scan, whose cost grows with every job claimed; with
    /// history and statistics it is a plain index scan, which stays the size of the running
    /// set. The claim uses the fetch index either way.
    #[tokio::test]
    async fn the_completion_plan_does_not_grow_with_the_table_once_it_has_history_and_statistics() {
        for (history, steady) in [(0, false), (10_000, true)] {
            let url = TempPostgres::shared().create_database("baseline_plans").await.unwrap();
            let queue = Queue::create(&url, 1, Wakeup::Poll(Duration::from_millis(2)), history).await.unwrap();
            // The first seconds of a run: jobs created, some claimed, no statistics yet.
            let payloads: Vec<String> = (0..2_000).map(payload).collect();
            sqlx::query(INSERT_MANY)
                .bind("lifecycle")
                .bind("send-email")
                .bind(payloads)
                .execute(&queue.pool)
                .await
                .unwrap();
            for _ in 0..20 {
                sqlx::query(CLAIM).bind("w-0").bind("lifecycle").bind(16i64).execute(&queue.pool).await.unwrap();
            }
            let complete = generic_plan(&queue.pool, COMPLETE, "bigint[], text", "'{1,2,3}', 'w-0'").await;
            let index_scan = complete.contains("Index Scan using") && !complete.contains("Bitmap");
            assert_eq!(index_scan && !complete.contains("Seq Scan"), steady, "history {history}:\n{complete}");
            let claim = generic_plan(&queue.pool, CLAIM, "text, text, bigint", "'w-0', 'lifecycle', 16").await;
            assert!(claim.contains("jobs_fetch"), "history {history}, the claim's plan:\n{claim}");
            queue.close().await;
        }
    }
}
