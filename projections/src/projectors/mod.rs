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

use domain::{Event, FastMap, FastSet, TaskId};
use std::sync::Arc;

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

    /// The projector owning the table a database's "missing table" message names (PostgreSQL's
    /// `relation "audit_log" does not exist`, SQLite's `no such table: audit_log`), so that an
    /// answer can say which one to rebuild.
    pub fn owning_table_named_in(message: &str) -> Option<Self> {
        let name = match message.split_once('"') {
            Some((_, rest)) => rest.split('"').next()?,
            None => message.rsplit(": ").next()?.trim(),
        };
        let name = name.rsplit('.').next()?;
        Self::ALL.into_iter().find(|k| k.tables().contains(&name))
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

    /// Whether the projector updates or deletes rows it wrote earlier (the
    /// audit log only appends). See `checkpoint::Indexes` for what depends on it.
    pub fn rewrites_rows(self) -> bool {
        self != Self::Audit
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
                let integer_key = statement.contains(sql::types(backend).integer_key);
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

    /// DROP statements for the indexes older versions gave generation
    /// `generation` and this one no longer keeps. A live projector runs them
    /// as it loads, so an upgraded store stops paying for them at once rather
    /// than at its next rebuild.
    pub fn retired_index_ddl(self, generation: i64) -> Vec<String> {
        match self {
            Self::Audit => audit::retired_indexes(&format!("g{generation}")),
            Self::Tasks | Self::Queue | Self::Dashboard => Vec::new(),
        }
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

    /// Loads the persisted mirror of this projector's generation `suffix`,
    /// whose projector's checkpoint is at `checkpoint_seq`. The mirror table
    /// may be behind the checkpoint (see [`KeptMirror`]): the caller folds
    /// the events in between with [`KeptMirror::fold`].
    pub(crate) async fn load_mirror(
        self,
        tx: &mut StoreTx,
        suffix: &str,
        checkpoint_seq: u64,
    ) -> Result<Option<KeptMirror>, ApplyError> {
        if !self.uses_mirror() {
            return Ok(None);
        }
        let select = format!("SELECT task_id, body FROM {}{suffix}", self.mirror_table());
        let rows: Vec<(Uuid, Vec<u8>)> = crate::store::on_tx!(tx, t => {
            sqlx::query_as(sqlx::AssertSqlSafe(select)).fetch_all(&mut **t).await?
        });
        // Tables written before the marker existed were stored with every batch (see `initial_mirror`).
        let mut stored_seq = checkpoint_seq;
        let mut bodies = Vec::with_capacity(rows.len());
        for (id, body) in rows {
            if id == MIRROR_MARKER_ID {
                let seq: [u8; 8] = body
                    .as_slice()
                    .try_into()
                    .map_err(|_| ApplyError::Model(format!("{} marker is not 8 bytes", self.mirror_table())))?;
                stored_seq = u64::from_le_bytes(seq);
            } else {
                let id = TaskId::try_from(id).map_err(|e| ApplyError::Model(e.to_string()))?;
                bodies.push((id, body.into_boxed_slice()));
            }
        }
        if stored_seq > checkpoint_seq {
            return Err(ApplyError::Model(format!(
                "{} is at seq {stored_seq}, past its checkpoint {checkpoint_seq}",
                self.mirror_table()
            )));
        }
        Ok(Some(KeptMirror {
            mirror: Mirror::from_bodies(bodies),
            stored_seq,
            changed: FastSet::default(),
            touched: Touched::default(),
        }))
    }

    /// Statements that start a new generation's mirror table at seq 0 (its
    /// marker row; none for a projector without a mirror). A mirror table
    /// without a marker was written by a version that stored it with every
    /// batch, so it counts as being at its checkpoint.
    pub(crate) fn initial_mirror(self, backend: Backend, suffix: &str) -> Statements {
        let mut out = Statements::new(backend);
        if self.uses_mirror() {
            let marker = 0u64.to_le_bytes();
            out.insert_rows(
                &format!("INSERT INTO {}{suffix} (task_id, body)", self.mirror_table()),
                "",
                &[MirrorRow { id: MIRROR_MARKER_ID, body: &marker }],
            );
        }
        out
    }
}

/// The key of the mirror table's marker row, whose body is the seq (8 bytes,
/// little-endian) the table reflects. No task has the nil UUID (task ids are
/// UUIDv7).
const MIRROR_MARKER_ID: Uuid = Uuid::nil();

/// Default of how many events a mirror table may trail its projector by.
pub const MIRROR_STORE_EVERY_EVENTS: u64 = 65_536;

/// A projector's mirror and what its `<name>_mirror` table has not got yet.
///
/// Storing the changed tasks with every batch costs up to a third of a
/// rebuild's time in the tasks, queue and dashboard projectors (not storing
/// them at all: 7.0 → 6.1 s, 4.1 → 2.9 s and 2.7 → 1.6 s for 1,000,056
/// events), and a task that starts and ends between two stores never needs a
/// row. So the table is written only once the projector's checkpoint is
/// `store_mirror_every` events past it, in the same
/// transaction as that batch, with a marker row saying which seq it
/// reflects. Loading folds the events between the marker and the checkpoint
/// back in from the log (through the mirror only: their rows are already
/// written), so nothing is lost and nothing is applied twice. How much this
/// saves depends on how long tasks live: in `projections-bench`'s log about
/// 20,000 tasks wait across each 65,536-event window, so a store there still
/// writes about 23,000 bodies and 19,000 deletions, and a full rebuild
/// measured 45–50k events/s against 37–41k before.
pub(crate) struct KeptMirror {
    pub(crate) mirror: Mirror,
    /// The seq the mirror table reflects.
    pub(crate) stored_seq: u64,
    /// Tasks changed since `stored_seq` that the table holds or must hold:
    /// each is upserted, or deleted if it ended, at the next store.
    changed: FastSet<TaskId>,
    /// The tasks the last batch touched: rebuilt by every `fold`, its
    /// capacity kept (see `runtime::Scratch` for why).
    pub(crate) touched: Touched,
}

impl KeptMirror {
    /// Folds `records` into the mirror, showing each event and what it did to
    /// `observe`, and notes the tasks the table will need to hear of.
    /// `touched` holds the batch's tasks afterwards.
    pub(crate) fn fold(
        &mut self,
        records: &[Arc<StoredRecord>],
        events: &[Event],
        mut observe: impl FnMut(&StoredRecord, &Event, &Applied),
    ) -> Result<(), ApplyError> {
        let touched = &mut self.touched;
        touched.clear();
        for (record, event) in records.iter().zip(events) {
            let applied = self.mirror.apply(record.seq, event)?;
            observe(record, event, &applied);
            touched.note(applied);
        }
        for id in &touched.order {
            match touched.finished.get(id) {
                // Created and ended since the table was written: it never held this task.
                Some(task) if task.created_seq > self.stored_seq => {
                    self.changed.remove(id);
                }
                _ => {
                    self.changed.insert(*id);
                }
            }
        }
        Ok(())
    }

    /// Renders the statements that bring `table` up to `seq` (the batch's
    /// last), in sorted key order: the changed live tasks' bodies, deletions
    /// of the ended ones, and the marker. The mirror must be settled.
    fn render_store(&mut self, out: &mut Statements, table: &str, seq: u64) {
        let mut changed: Vec<TaskId> = self.changed.drain().collect();
        changed.sort_unstable();
        let mut live = Vec::with_capacity(changed.len() + 1);
        let mut gone = Vec::new();
        for id in &changed {
            match self.mirror.settled_body(id) {
                Some(body) => live.push(MirrorRow { id: *id.as_uuid(), body }),
                None => gone.push(*id.as_uuid()),
            }
        }
        let marker = seq.to_le_bytes();
        live.insert(0, MirrorRow { id: MIRROR_MARKER_ID, body: &marker });
        out.delete_by_uuid(table, "task_id", &gone);
        out.insert_rows(
            &format!("INSERT INTO {table} (task_id, body)"),
            "ON CONFLICT (task_id) DO UPDATE SET body = excluded.body",
            &live,
        );
        self.stored_seq = seq;
    }
}

/// The tasks a batch touched, in first-touch order, and the last state of
/// those that finished (and so left the mirror) during it.
#[derive(Default)]
pub struct Touched {
    pub order: Vec<TaskId>,
    seen: FastSet<TaskId>,
    pub finished: FastMap<TaskId, MirrorTask>,
}

impl Touched {
    /// Empties it for the next batch, keeping its capacity.
    pub fn clear(&mut self) {
        self.order.clear();
        self.seen.clear();
        self.finished.clear();
    }

    fn note(&mut self, applied: Applied) {
        if let Some(task) = applied.task {
            if self.seen.insert(task) {
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

/// Folds a batch into the mirror and a plan, and renders the plan (and, once
/// the mirror table trails by `store_mirror_every` events or more, the
/// mirror's changes) into `out` (empty, for the store's backend), without
/// touching the database (see `sql::Statements`). The caller runs the
/// statements with the checkpoint in one transaction; on error, or if that
/// transaction fails, it must drop the (now partly advanced) mirror.
pub(crate) fn prepare_batch(
    kind: ProjectorKind,
    suffix: &str,
    mirror: Option<&mut KeptMirror>,
    store_mirror_every: u64,
    records: &[Arc<StoredRecord>],
    events: &[Event],
    out: &mut Statements,
) -> Result<(), ApplyError> {
    let mut plan = kind.new_plan();
    match mirror {
        Some(kept) => {
            kept.fold(records, events, |record, event, applied| plan.observe(record, event, applied))?;
            plan.render(out, suffix, &kept.touched, &kept.mirror, records, events);
            kept.mirror.settle()?;
            let last_seq = records.last().map_or(kept.stored_seq, |r| r.seq);
            if last_seq.saturating_sub(kept.stored_seq) >= store_mirror_every.max(1) {
                kept.render_store(out, &format!("{}{suffix}", kind.mirror_table()), last_seq);
            }
        }
        None => {
            for (record, event) in records.iter().zip(events) {
                plan.observe(record, event, &Applied::default());
            }
            plan.render(out, suffix, &Touched::default(), &Mirror::new(), records, events);
        }
    }
    Ok(())
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
        records: &[Arc<StoredRecord>],
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

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions, Row};

    use super::ProjectorKind;
    use crate::store::Backend;

    /// Every row write on SQLite touches each b-tree of its table once: a table must be one
    /// b-tree plus its declared indexes, never a rowid tree with the primary key as an extra
    /// automatic index beside it (what `BIGINT PRIMARY KEY` makes of `audit_log`).
    #[tokio::test]
    async fn sqlite_tables_are_one_b_tree_besides_their_declared_indexes() {
        let mut conn = SqliteConnectOptions::new().in_memory(true).connect().await.unwrap();
        for kind in ProjectorKind::ALL {
            let ddl = kind.table_ddl(Backend::Sqlite, "", 1).into_iter().chain(kind.index_ddl(Backend::Sqlite, "", 1));
            for statement in ddl {
                sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut conn).await.unwrap();
            }
        }
        let rows = sqlx::query("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let automatic: Vec<String> = rows
            .iter()
            .map(|r| r.get::<String, _>("name"))
            .filter(|name| name.starts_with("sqlite_autoindex"))
            .collect();
        assert!(automatic.is_empty(), "tables with an automatic primary-key index: {automatic:?}");
        assert!(rows.iter().any(|r| r.get::<String, _>("tbl_name") == "audit_log"), "audit_log keeps its indexes");
    }

    #[test]
    fn a_missing_table_message_names_its_projector() {
        for (message, owner) in [
            ("relation \"audit_log\" does not exist", Some(ProjectorKind::Audit)),
            ("relation \"public.queue_settings\" does not exist", Some(ProjectorKind::Queue)),
            ("no such table: task_steps", Some(ProjectorKind::Tasks)),
            ("no such table: main.dashboard_counts", Some(ProjectorKind::Dashboard)),
            ("relation \"projector_checkpoints\" does not exist", None),
            ("no such table: queues", None),
        ] {
            assert_eq!(ProjectorKind::owning_table_named_in(message), owner, "{message}");
        }
    }
}
