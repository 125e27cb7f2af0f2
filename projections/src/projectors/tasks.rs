//! `tasks`, `task_tags`, `task_steps` and `dead_letters`: every task's
//! summary and every step's outcome, for task pages and lists; and the steps
//! in `Error` of tasks that still wait for an operator (retry, resolve or give
//! up). A given-up task's failed steps leave the dead-letter list: nothing can
//! be done with them any more, and `task_steps` keeps their story.

use domain::StepState;
use eventlog::StoredRecord;
use uuid::Uuid;

use crate::mirror::{Mirror, MirrorStep, MirrorTask};
use crate::projectors::Touched;
use crate::sql::{Sink, SqlRow, Statements, Types};

pub(crate) fn ddl(t: &Types, s: &str, g: &str) -> Vec<String> {
    let uuid = t.uuid;
    vec![
        format!(
            "CREATE TABLE tasks{s} (
                task_id {uuid} PRIMARY KEY,
                namespace TEXT NOT NULL,
                name TEXT NOT NULL,
                state TEXT NOT NULL,
                priority BIGINT NOT NULL,
                run_at_us BIGINT,
                idempotency_key TEXT,
                payload TEXT NOT NULL,
                created_at_us BIGINT NOT NULL,
                created_seq BIGINT NOT NULL,
                updated_at_us BIGINT NOT NULL,
                updated_seq BIGINT NOT NULL,
                finished_at_us BIGINT,
                end_reason TEXT,
                step_count BIGINT NOT NULL,
                steps_done BIGINT NOT NULL,
                steps_failed BIGINT NOT NULL
            )"
        ),
        format!("CREATE UNIQUE INDEX tasks_created_{g} ON tasks{s} (created_seq)"),
        format!("CREATE INDEX tasks_namespace_{g} ON tasks{s} (namespace, created_seq)"),
        format!("CREATE INDEX tasks_state_{g} ON tasks{s} (state, created_seq)"),
        format!(
            "CREATE TABLE task_tags{s} (
                tag TEXT NOT NULL,
                created_seq BIGINT NOT NULL,
                task_id {uuid} NOT NULL,
                PRIMARY KEY (tag, created_seq)
            )"
        ),
        format!(
            "CREATE TABLE task_steps{s} (
                task_id {uuid} NOT NULL,
                step_index BIGINT NOT NULL,
                name TEXT NOT NULL,
                handler TEXT NOT NULL,
                state TEXT NOT NULL,
                depends_on TEXT NOT NULL,
                attempts BIGINT NOT NULL,
                max_attempts BIGINT NOT NULL,
                epoch BIGINT NOT NULL,
                worker TEXT,
                lease_deadline_us BIGINT,
                retry_at_us BIGINT,
                enqueued_at_us BIGINT,
                claimed_at_us BIGINT,
                finished_at_us BIGINT,
                last_error TEXT,
                result TEXT,
                resolution_note TEXT,
                PRIMARY KEY (task_id, step_index)
            )"
        ),
        format!(
            "CREATE TABLE dead_letters{s} (
                task_id {uuid} NOT NULL,
                step_index BIGINT NOT NULL,
                namespace TEXT NOT NULL,
                task_name TEXT NOT NULL,
                step_name TEXT NOT NULL,
                handler TEXT NOT NULL,
                attempts BIGINT NOT NULL,
                max_attempts BIGINT NOT NULL,
                last_error TEXT,
                failed_at_us BIGINT NOT NULL,
                PRIMARY KEY (task_id, step_index)
            )"
        ),
        format!("CREATE INDEX dead_letters_namespace_{g} ON dead_letters{s} (namespace, failed_at_us)"),
        format!("CREATE INDEX dead_letters_time_{g} ON dead_letters{s} (failed_at_us, task_id, step_index)"),
    ]
}

struct TaskRow<'a>(&'a MirrorTask);

impl SqlRow for TaskRow<'_> {
    const COLUMNS: usize = 17;
    fn bind(&self, sink: &mut dyn Sink) {
        let t = self.0;
        sink.uuid(*t.id.as_uuid());
        sink.text(&t.namespace);
        sink.text(&t.name);
        sink.text(t.state.as_str());
        sink.i64(i64::from(t.priority));
        sink.opt_i64(t.run_at_us);
        sink.opt_text(t.idempotency_key.as_deref());
        sink.text(&t.payload);
        sink.i64(t.created_at_us);
        sink.i64(t.created_seq as i64);
        sink.i64(t.updated_at_us);
        sink.i64(t.updated_seq as i64);
        sink.opt_i64(t.finished_at_us);
        sink.opt_text(t.end_reason.as_deref());
        sink.i64(t.steps.len() as i64);
        sink.i64(t.steps.iter().filter(|s| s.state.satisfies_dependents()).count() as i64);
        sink.i64(t.steps.iter().filter(|s| s.state == StepState::Error).count() as i64);
    }
}

struct TagRow<'a> {
    tag: &'a str,
    created_seq: i64,
    task_id: Uuid,
}

impl SqlRow for TagRow<'_> {
    const COLUMNS: usize = 3;
    fn bind(&self, sink: &mut dyn Sink) {
        sink.text(self.tag);
        sink.i64(self.created_seq);
        sink.uuid(self.task_id);
    }
}

struct StepRow<'a> {
    task: &'a MirrorTask,
    index: usize,
    step: &'a MirrorStep,
}

pub(crate) fn depends_on(task: &MirrorTask, step: &MirrorStep) -> String {
    step.deps.iter().map(|d| task.steps[usize::from(*d)].name.as_str()).collect::<Vec<_>>().join(",")
}

impl SqlRow for StepRow<'_> {
    const COLUMNS: usize = 18;
    fn bind(&self, sink: &mut dyn Sink) {
        let s = self.step;
        sink.uuid(*self.task.id.as_uuid());
        sink.i64(self.index as i64);
        sink.text(&s.name);
        sink.text(&s.handler);
        sink.text(s.state.as_str());
        sink.text(&depends_on(self.task, s));
        sink.i64(i64::from(s.attempts));
        sink.i64(i64::from(s.max_attempts));
        sink.i64(i64::from(s.epoch));
        sink.opt_text(s.worker.as_deref());
        sink.opt_i64(s.lease_deadline_us);
        sink.opt_i64(s.retry_at_us);
        sink.opt_i64(s.enqueued_at_us);
        sink.opt_i64(s.claimed_at_us);
        sink.opt_i64(s.finished_at_us);
        sink.opt_text(s.last_error.as_deref());
        sink.opt_text(s.result.as_deref());
        sink.opt_text(s.resolution_note.as_deref());
    }
}

struct DeadLetterRow<'a> {
    task: &'a MirrorTask,
    index: usize,
    step: &'a MirrorStep,
}

impl SqlRow for DeadLetterRow<'_> {
    const COLUMNS: usize = 10;
    fn bind(&self, sink: &mut dyn Sink) {
        let s = self.step;
        sink.uuid(*self.task.id.as_uuid());
        sink.i64(self.index as i64);
        sink.text(&self.task.namespace);
        sink.text(&self.task.name);
        sink.text(&s.name);
        sink.text(&s.handler);
        sink.i64(i64::from(s.attempts));
        sink.i64(i64::from(s.max_attempts));
        sink.opt_text(s.last_error.as_deref());
        sink.i64(s.finished_at_us.unwrap_or(self.task.updated_at_us));
    }
}

fn task_rows<'a>(tasks: &[&'a MirrorTask]) -> Vec<TaskRow<'a>> {
    tasks.iter().map(|t| TaskRow(t)).collect()
}

fn step_rows<'a>(tasks: &[&'a MirrorTask]) -> Vec<StepRow<'a>> {
    tasks
        .iter()
        .flat_map(|t| t.steps.iter().enumerate().map(move |(index, step)| StepRow { task: t, index, step }))
        .collect()
}

#[derive(Default)]
pub(crate) struct Plan {
    first_seq: Option<u64>,
}

impl Plan {
    pub(crate) fn observe(&mut self, record: &StoredRecord) {
        self.first_seq.get_or_insert(record.seq);
    }

    pub(crate) fn render(&self, out: &mut Statements, s: &str, touched: &Touched, mirror: &Mirror) {
        let first_seq = self.first_seq.unwrap_or(u64::MAX);
        let current: Vec<&MirrorTask> = touched.order.iter().filter_map(|id| touched.current(mirror, id)).collect();
        // Tasks created in this batch have no rows yet: those are plain inserts
        // (a `COPY` on PostgreSQL), the others upserts.
        let (created, existing): (Vec<&MirrorTask>, Vec<&MirrorTask>) =
            current.iter().partition(|t| t.created_seq >= first_seq);
        let tasks_head = format!(
            "INSERT INTO tasks{s} (task_id, namespace, name, state, priority, run_at_us, idempotency_key, payload, \
             created_at_us, created_seq, updated_at_us, updated_seq, finished_at_us, end_reason, step_count, \
             steps_done, steps_failed)"
        );
        let steps_head = format!(
            "INSERT INTO task_steps{s} (task_id, step_index, name, handler, state, depends_on, attempts, \
             max_attempts, epoch, worker, lease_deadline_us, retry_at_us, enqueued_at_us, claimed_at_us, \
             finished_at_us, last_error, result, resolution_note)"
        );
        out.insert_rows(&tasks_head, "", &task_rows(&created));
        out.insert_rows(
            &tasks_head,
            "ON CONFLICT (task_id) DO UPDATE SET state = excluded.state, updated_at_us = excluded.updated_at_us, \
             updated_seq = excluded.updated_seq, finished_at_us = excluded.finished_at_us, \
             end_reason = excluded.end_reason, step_count = excluded.step_count, \
             steps_done = excluded.steps_done, steps_failed = excluded.steps_failed",
            &task_rows(&existing),
        );

        let tag_rows: Vec<TagRow<'_>> = created
            .iter()
            .flat_map(|t| {
                // Distinct: creates refuse a repeated tag, but a log written before that rule
                // may hold one, and the table is keyed by (tag, task).
                t.tags.iter().enumerate().filter(|(i, tag)| !t.tags[..*i].contains(tag)).map(|(_, tag)| TagRow {
                    tag,
                    created_seq: t.created_seq as i64,
                    task_id: *t.id.as_uuid(),
                })
            })
            .collect();
        out.insert_rows(&format!("INSERT INTO task_tags{s} (tag, created_seq, task_id)"), "", &tag_rows);

        out.insert_rows(&steps_head, "", &step_rows(&created));
        out.insert_rows(
            &steps_head,
            "ON CONFLICT (task_id, step_index) DO UPDATE SET state = excluded.state, attempts = excluded.attempts, \
             epoch = excluded.epoch, worker = excluded.worker, lease_deadline_us = excluded.lease_deadline_us, \
             retry_at_us = excluded.retry_at_us, enqueued_at_us = excluded.enqueued_at_us, \
             claimed_at_us = excluded.claimed_at_us, finished_at_us = excluded.finished_at_us, \
             last_error = excluded.last_error, result = excluded.result, resolution_note = excluded.resolution_note",
            &step_rows(&existing),
        );

        // Dead letters: replace the touched tasks' rows by their current `Error` steps.
        let previously_failed: Vec<Uuid> = existing.iter().map(|t| *t.id.as_uuid()).collect();
        out.delete_by_uuid(&format!("dead_letters{s}"), "task_id", &previously_failed);
        let dead_rows: Vec<DeadLetterRow<'_>> = current
            .iter()
            .filter(|t| !t.state.is_terminal())
            .flat_map(|t| {
                t.steps
                    .iter()
                    .enumerate()
                    .filter(|(_, step)| step.state == StepState::Error)
                    .map(move |(index, step)| DeadLetterRow { task: t, index, step })
            })
            .collect();
        out.insert_rows(
            &format!(
                "INSERT INTO dead_letters{s} (task_id, step_index, namespace, task_name, step_name, handler, attempts, \
                 max_attempts, last_error, failed_at_us)"
            ),
            "",
            &dead_rows,
        );
    }
}
