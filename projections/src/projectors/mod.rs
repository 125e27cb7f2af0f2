//! The projectors: what each one is called, which tables it owns, its
//! version, and how a batch of events becomes rows.
//!
//! A projector is a closed set (an enum) rather than a trait object: there are
//! four, each is plain data plus two steps, `observe` (pure, per event, in
//! memory) and `write` (one bulk pass over the batch's net changes in the
//! batch's transaction). Within a batch, a row touched many times is written
//! once, in its final form: a task created, claimed and completed in one
//! batch costs one `tasks` row, not three statements.
//!
//! Table names carry a suffix: the live generation has none, a rebuild's
//! shadow generation has `__g<generation>`. Index names always carry the
//! generation, so shadow and live copies never collide, and a swap is a
//! rename of tables only.

use std::collections::HashMap;

use domain::{Event, TaskId};
use eventlog::StoredRecord;
use serde::Serialize;
use uuid::Uuid;

use crate::error::ApplyError;
use crate::mirror::{Applied, Mirror, MirrorTask};
use crate::sql::{self, Sink, SqlRow, Statements};
use crate::store::{Backend, StoreTx};

pub mod audit;
pub mod dashboard;
pub mod queue;
pub mod tasks;

/// The projectors this crate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectorKind {
    /// `audit_log`: one immutable row per event.
    Audit,
    /// `tasks`, `task_tags`, `task_steps`, `dead_letters`.
    Tasks,
    /// `queue`, `queue_settings`, `workers`.
    Queue,
    /// `dashboard_counts`, `dashboard_throughput`, `dashboard_latency`.
    Dashboard,
}

impl ProjectorKind {
    pub const ALL: [ProjectorKind; 4] = [Self::Audit, Self::Tasks, Self::Queue, Self::Dashboard];

    pub fn name(self) -> &'static str {
        match self {
            Self::Audit => "audit",
            Self::Tasks => "tasks",
            Self::Queue => "queue",
            Self::Dashboard => "dashboard",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Bumped whenever the rows a projector writes change meaning or shape;
    /// a stored projection of an older version is rebuilt in the background.
    pub fn version(self) -> i32 {
        match self {
            Self::Audit | Self::Tasks | Self::Queue | Self::Dashboard => 1,
        }
    }

    /// The tables it owns (without suffix), its mirror table last.
    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Self::Audit => &["audit_log"],
            Self::Tasks => &["tasks", "task_tags", "task_steps", "dead_letters", "tasks_mirror"],
            Self::Queue => &["queue", "queue_settings", "workers", "queue_mirror"],
            Self::Dashboard => &["dashboard_counts", "dashboard_throughput", "dashboard_latency", "dashboard_mirror"],
        }
    }

    /// Keeps a model of live tasks (and persists it in `<name>_mirror`).
    pub fn uses_mirror(self) -> bool {
        self != Self::Audit
    }

    fn mirror_table(self) -> &'static str {
        match self {
            Self::Audit => "",
            Self::Tasks => "tasks_mirror",
            Self::Queue => "queue_mirror",
            Self::Dashboard => "dashboard_mirror",
        }
    }

    /// CREATE TABLE statements for generation `generation` with table suffix
    /// `suffix`. On SQLite, every table keyed by something other than one
    /// integer is `WITHOUT ROWID`: the primary key is then the table's only
    /// b-tree instead of an extra index beside the rowid tree, which halves
    /// the writes of an upsert.
    pub fn table_ddl(self, backend: Backend, suffix: &str, generation: i64) -> Vec<String> {
        self.ddl(backend, suffix, generation)
            .into_iter()
            .filter(|statement| statement.starts_with("CREATE TABLE"))
            .map(|statement| {
                let integer_key = statement.contains("BIGINT PRIMARY KEY");
                if backend == Backend::Sqlite && !integer_key {
                    format!("{statement} WITHOUT ROWID")
                } else {
                    statement
                }
            })
            .collect()
    }

    /// CREATE INDEX statements of a generation. A rebuild creates them once
    /// its tables are filled: building an index over a full table is far
    /// cheaper than updating it row by row.
    pub fn index_ddl(self, backend: Backend, suffix: &str, generation: i64) -> Vec<String> {
        self.ddl(backend, suffix, generation).into_iter().filter(|s| !s.starts_with("CREATE TABLE")).collect()
    }

    fn ddl(self, backend: Backend, suffix: &str, generation: i64) -> Vec<String> {
        let t = sql::types(backend);
        let g = format!("g{generation}");
        let mut statements = match self {
            Self::Audit => audit::ddl(&t, suffix, &g),
            Self::Tasks => tasks::ddl(&t, suffix, &g),
            Self::Queue => queue::ddl(&t, suffix, &g),
            Self::Dashboard => dashboard::ddl(&t, suffix, &g),
        };
        if self.uses_mirror() {
            statements.push(format!(
                "CREATE TABLE {}{suffix} (task_id {} PRIMARY KEY, body {} NOT NULL)",
                self.mirror_table(),
                t.uuid,
                t.bytes
            ));
        }
        statements
    }

    pub(crate) fn new_plan(self) -> Plan {
        match self {
            Self::Audit => Plan::Audit(audit::Plan),
            Self::Tasks => Plan::Tasks(tasks::Plan::default()),
            Self::Queue => Plan::Queue(queue::Plan::default()),
            Self::Dashboard => Plan::Dashboard(dashboard::Plan::default()),
        }
    }

    /// Loads the persisted mirror of this projector's generation `suffix`.
    pub(crate) async fn load_mirror(self, tx: &mut StoreTx, suffix: &str) -> Result<Option<Mirror>, ApplyError> {
        if !self.uses_mirror() {
            return Ok(None);
        }
        let select = format!("SELECT task_id, body FROM {}{suffix}", self.mirror_table());
        let rows: Vec<(Uuid, Vec<u8>)> = crate::store::on_tx!(tx, t => {
            sqlx::query_as(sqlx::AssertSqlSafe(select)).fetch_all(&mut **t).await?
        });
        let bodies = rows
            .into_iter()
            .map(|(id, body)| Ok((TaskId::try_from(id).map_err(|e| ApplyError::Model(e.to_string()))?, body.into())))
            .collect::<Result<Vec<_>, ApplyError>>()?;
        Ok(Some(Mirror::from_bodies(bodies)))
    }
}

/// The tasks a batch touched, in first-touch order, and the last state of
/// those that finished (and so left the mirror) during it.
#[derive(Default)]
pub struct Touched {
    pub order: Vec<TaskId>,
    seen: HashMap<TaskId, ()>,
    pub finished: HashMap<TaskId, MirrorTask>,
}

impl Touched {
    fn note(&mut self, applied: Applied) {
        if let Some(task) = applied.task {
            if self.seen.insert(task, ()).is_none() {
                self.order.push(task);
            }
            if let Some(finished) = applied.finished {
                self.finished.insert(task, *finished);
            }
        }
    }

    /// The task's state at the end of the batch: live in the mirror, or its
    /// last state if it finished.
    pub fn current<'a>(&'a self, mirror: &'a Mirror, id: &TaskId) -> Option<&'a MirrorTask> {
        mirror.touched_task(id).or_else(|| self.finished.get(id))
    }
}

/// A batch's pending writes for one projector.
pub(crate) enum Plan {
    Audit(audit::Plan),
    Tasks(tasks::Plan),
    Queue(queue::Plan),
    Dashboard(dashboard::Plan),
}

struct MirrorRow<'a> {
    id: Uuid,
    body: &'a [u8],
}

impl SqlRow for MirrorRow<'_> {
    const COLUMNS: usize = 2;
    fn bind(&self, sink: &mut dyn Sink) {
        sink.uuid(self.id);
        sink.bytes(self.body);
    }
}

/// Folds a batch into the mirror and a plan, and renders the plan and the
/// mirror's changed tasks as statements for `backend`, without touching the
/// database (see `sql::Statements`). The caller runs them with the
/// checkpoint in one transaction; on error, or if that transaction fails, it
/// must drop the (now partly advanced) mirror.
pub(crate) fn prepare_batch(
    kind: ProjectorKind,
    backend: Backend,
    suffix: &str,
    mirror: Option<&mut Mirror>,
    records: &[StoredRecord],
    events: &[Event],
) -> Result<Statements, ApplyError> {
    let mut plan = kind.new_plan();
    let mut touched = Touched::default();
    let mut empty = Mirror::new();
    let mirror: &mut Mirror = match mirror {
        Some(mirror) => {
            for (record, event) in records.iter().zip(events) {
                let applied = mirror.apply(record.seq, event)?;
                plan.observe(record, event, &applied);
                touched.note(applied);
            }
            mirror
        }
        None => {
            for (record, event) in records.iter().zip(events) {
                plan.observe(record, event, &Applied::default());
            }
            &mut empty
        }
    };
    let mut out = Statements::new(backend);
    plan.render(&mut out, suffix, &touched, mirror, records, events);
    mirror.settle()?;
    if kind.uses_mirror() && !touched.order.is_empty() {
        let first_seq = records.first().map_or(u64::MAX, |r| r.seq);
        let table = format!("{}{suffix}", kind.mirror_table());
        let mut live = Vec::new();
        let mut gone = Vec::new();
        for id in &touched.order {
            match mirror.settled_body(id) {
                Some(body) => live.push(MirrorRow { id: *id.as_uuid(), body }),
                // A task created in this batch was never stored: nothing to delete.
                None => {
                    if touched.finished.get(id).is_none_or(|t| t.created_seq < first_seq) {
                        gone.push(*id.as_uuid());
                    }
                }
            }
        }
        out.delete_by_uuid(&table, "task_id", &gone);
        out.insert_rows(
            &format!("INSERT INTO {table} (task_id, body)"),
            "ON CONFLICT (task_id) DO UPDATE SET body = excluded.body",
            &live,
        );
    }
    Ok(out)
}

impl Plan {
    fn observe(&mut self, record: &StoredRecord, event: &Event, applied: &Applied) {
        match self {
            Plan::Audit(_) => {}
            Plan::Tasks(p) => p.observe(record),
            Plan::Queue(p) => p.observe(record.seq, event, applied),
            Plan::Dashboard(p) => p.observe(event, applied),
        }
    }

    fn render(
        &self,
        out: &mut Statements,
        suffix: &str,
        touched: &Touched,
        mirror: &Mirror,
        records: &[StoredRecord],
        events: &[Event],
    ) {
        match self {
            Plan::Audit(p) => p.render(out, suffix, records, events),
            Plan::Tasks(p) => p.render(out, suffix, touched, mirror),
            Plan::Queue(p) => p.render(out, suffix, touched, mirror),
            Plan::Dashboard(p) => p.render(out, suffix),
        }
    }
}
