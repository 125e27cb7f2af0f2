//! The storage floor: the least CPU a lifecycle task's durable records and read-model rows can
//! cost on this machine, measured in this process with the libraries taskledger stores them
//! with, and nothing of taskledger's own code on the timed path.
//!
//! Why: issue 7's 3× goal gives each lifecycle task a CPU budget (`cpu a task` in the report).
//! The HTTP floor (floor.rs) says what answering the task's requests costs at the least; this
//! says what storing it costs at the least. Their sum against the budget says how much of the
//! budget any implementation of this design (an HTTP API, a hash-chained log fsynced before it
//! answers, SQL read models on the same machine) has left for deciding commands, folding,
//! encoding and routing.
//!
//! What is timed, on one thread, with the thread's CPU clock (user and system time; the fsync's
//! wait is not CPU and is not counted):
//! - the log: for every record, its chain hash (BLAKE3, as `eventlog::record::chain_hash`), its
//!   value in the events table and its entry in the stream index, in redb, 1,000 tasks a
//!   transaction committed with `Durability::Immediate`. Left out, so the floor is lower than
//!   the log's: the time index, the dedup window, the journal, snapshots.
//! - the read models: the rows DESIGN.md requires a finished task to leave, with the indexes
//!   their queries use (the projectors' own DDL): an `audit_log` row per event, the task's
//!   `tasks` row and its step's `task_steps` row, in SQLite with the store's settings (WAL,
//!   `synchronous = NORMAL`, 64 MiB of cache, SQLite allocating through mimalloc), prepared
//!   statements stepped row by row, 1,000 tasks a transaction. Left out, so the floor is lower
//!   than the read models': the queue view's rows (a task created and finished within one batch
//!   needs none), the dashboard's and the workers' rows, the checkpoints, the mirrors.
//!
//! Each floor runs three times on fresh files and the least is reported.
//!
//! Not timed: making the events (the domain decides real lifecycle commands), encoding the
//! records (`eventlog::encode_event`, `stored_body`) and rendering the rows' values (the audit
//! summary is the projector's own). Both stores start empty in a temp dir.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_int};
use std::path::Path;
use std::ptr;

use anyhow::{Context, Result, anyhow, bail};
use domain::testkit::{Scenario, claim, complete, job};
use domain::{Event, Json};
use eventlog::record::{GENESIS_HASH, Hash, chain_hash, stored_body};
use libsqlite3_sys as ffi;
use projections::{Backend, ProjectorKind};
use redb::{Database, Durability, TableDefinition};

/// The log's tables as `eventlog` keeps them (`eventlog::reader`): seq → hash ‖ body, and
/// (stream, version) → seq.
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const STREAMS: TableDefinition<(&[u8], u64), u64> = TableDefinition::new("streams");

/// Tasks a transaction holds in both stores: as many as the writer's biggest lifecycle commits
/// hold and more, so a commit's fixed cost weighs next to nothing.
const TASKS_PER_TRANSACTION: usize = 1_000;

/// Tries of each floor; the least is reported.
const ATTEMPTS: usize = 3;

/// What storing a lifecycle task costs at the least.
pub struct StorageFloor {
    pub tasks: usize,
    pub records_per_task: f64,
    pub record_bytes_avg: f64,
    pub rows_per_task: f64,
    /// µs of CPU a task: the log's records, the read models' rows.
    pub log_us: f64,
    pub read_models_us: f64,
}

/// One log record, encoded as the log stores it.
struct Record {
    seq: u64,
    stream: Vec<u8>,
    version: u64,
    body: Vec<u8>,
}

/// Runs both floors over `tasks` lifecycle tasks (each created, claimed in batches of `k` and
/// completed) in a temp dir under `dir`.
pub fn measure(tasks: usize, k: u32, dir: &Path) -> Result<StorageFloor> {
    let events = lifecycle_events(tasks, k.max(1))?;
    let records = encode(&events);
    let scratch = tempfile::tempdir_in(dir).context("make the storage floor's temp dir")?;
    let (mut log_s, mut models_s, mut rows) = (f64::INFINITY, f64::INFINITY, 0);
    // The least of a few tries, each on fresh files: a floor is what the work costs when nothing
    // else on the shared machine (another tenant, the kernel's writeback) slows it down.
    for attempt in 0..ATTEMPTS {
        log_s = log_s.min(log_floor(&records, &scratch.path().join(format!("floor-{attempt}.redb")))?);
        let sqlite = scratch.path().join(format!("floor-{attempt}.sqlite"));
        let (written, seconds) = read_model_floor(&events, &records, tasks, &sqlite)?;
        (rows, models_s) = (written, models_s.min(seconds));
    }
    let per_task = |s: f64| s * 1e6 / tasks as f64;
    Ok(StorageFloor {
        tasks,
        records_per_task: records.len() as f64 / tasks as f64,
        record_bytes_avg: records.iter().map(|r| 32 + r.body.len()).sum::<usize>() as f64 / records.len() as f64,
        rows_per_task: rows as f64 / tasks as f64,
        log_us: per_task(log_s),
        read_models_us: per_task(models_s),
    })
}

/// An event with what its record carries besides it.
struct Logged {
    event: Event,
    command_id: String,
    actor: &'static str,
    at_us: i64,
}

/// The events of `tasks` lifecycle tasks, decided by the domain as the server decides them: the
/// bench's create body (one step, its payload), claims of up to `k`, a completion each.
fn lifecycle_events(tasks: usize, k: u32) -> Result<Vec<Logged>> {
    let mut scenario = Scenario::new();
    let mut out = Vec::with_capacity(tasks * 3);
    let mut commands = 0u64;
    let mut log = |scenario: &mut Scenario, command, actor| {
        commands += 1;
        // A command id as the server mints one: a UUID's text.
        let command_id = format!("0193a5c4-7e1f-7c2a-9d1e-{commands:012x}");
        let at_us = scenario.now.as_micros();
        let events = scenario.when(command).map_err(|r| anyhow!("the domain refused a lifecycle command: {r}"))?;
        out.extend(events.iter().cloned().map(|event| Logged { event, command_id: command_id.clone(), actor, at_us }));
        scenario.advance_ms(1);
        anyhow::Ok(events)
    };
    let mut created = 0usize;
    while created < tasks {
        let batch = (tasks - created).min(k as usize);
        for n in created..created + batch {
            let mut spec = job(n as u64 + 1, "lifecycle");
            let payload = format!(r#"{{"n":{n},"to":"user-{n}@example.com","template":"welcome"}}"#);
            spec.payload = Json::new("payload", payload).map_err(|r| anyhow!("{r}"))?;
            log(&mut scenario, domain::Command::CreateTask(spec), "producer")?;
        }
        let claimed = log(&mut scenario, claim("lifecycle", "w-0", batch as u32), "worker")?;
        for event in &claimed {
            let Event::StepClaimed { task, epoch, .. } = event else { bail!("a claim made {event:?}") };
            log(&mut scenario, complete(*task, "run", epoch.0), "worker")?;
        }
        created += batch;
    }
    Ok(out)
}

fn encode(events: &[Logged]) -> Vec<Record> {
    let mut versions: HashMap<Vec<u8>, u64> = HashMap::new();
    events
        .iter()
        .enumerate()
        .map(|(i, logged)| {
            let new = eventlog::encode_event(&logged.event, &logged.command_id, logged.actor, logged.at_us);
            let version = *versions.entry(new.stream.clone()).and_modify(|v| *v += 1).or_insert(1);
            let stored = new.into_stored(i as u64 + 1, version, GENESIS_HASH);
            Record {
                seq: stored.seq,
                version: stored.stream_version,
                body: stored_body(&stored),
                stream: stored.stream,
            }
        })
        .collect()
}

/// CPU seconds this thread has used (user + system).
fn thread_cpu_s() -> Result<f64> {
    crate::stats::rusage_cpu_s(libc::RUSAGE_THREAD).context("getrusage(RUSAGE_THREAD)")
}

/// The CPU seconds appending `records` to a fresh redb file takes, 1,000 tasks a commit.
fn log_floor(records: &[Record], path: &Path) -> Result<f64> {
    let db = Database::create(path).context("create the floor's redb file")?;
    let records_per_transaction = TASKS_PER_TRANSACTION * 3;
    let mut prev: Hash = GENESIS_HASH;
    let mut value = Vec::new();
    let mut index: Vec<(&[u8], u64, u64)> = Vec::new();
    let start = thread_cpu_s()?;
    for chunk in records.chunks(records_per_transaction) {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut events = txn.open_table(EVENTS)?;
            for r in chunk {
                let hash = chain_hash(&prev, r.seq, &r.body);
                value.clear();
                value.extend_from_slice(&hash);
                value.extend_from_slice(&r.body);
                events.insert(r.seq, value.as_slice())?;
                prev = hash;
            }
            // The stream index in key order, as the log writes it, so each leaf is written once.
            index.clear();
            index.extend(chunk.iter().map(|r| (r.stream.as_slice(), r.version, r.seq)));
            index.sort_unstable();
            let mut streams = txn.open_table(STREAMS)?;
            for (stream, version, seq) in &index {
                streams.insert((*stream, *version), *seq)?;
            }
        }
        txn.commit()?;
    }
    Ok(thread_cpu_s()? - start)
}

/// A value bound to a statement's parameter.
enum Param {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// The rows a finished lifecycle task leaves, as (statement index, values).
fn rows(events: &[Logged], records: &[Record]) -> Vec<(usize, Vec<Param>)> {
    use Param::{Blob, Int, Null, Text};
    let mut out = Vec::with_capacity(events.len() + events.len() * 2 / 3);
    let mut created: HashMap<domain::TaskId, (u64, i64, domain::TaskSpec)> = HashMap::new();
    let mut claimed_at: HashMap<domain::TaskId, i64> = HashMap::new();
    let mut prev = GENESIS_HASH;
    for (logged, record) in events.iter().zip(records) {
        let hash = chain_hash(&prev, record.seq, &record.body);
        prev = hash;
        let event = &logged.event;
        out.push((
            AUDIT,
            vec![
                Int(record.seq as i64),
                Int(logged.at_us),
                Text(logged.actor.to_owned()),
                Text(logged.command_id.clone()),
                Text(event.stream().to_string()),
                event.task().map_or(Null, |t| Blob(t.as_uuid().as_bytes().to_vec())),
                Text(event.type_name().to_owned()),
                Text(projections::projectors::audit::summary(event)),
                Blob(hash.to_vec()),
            ],
        ));
        match event {
            Event::TaskCreated { spec, at } => {
                created.insert(spec.id, (record.seq, at.as_micros(), spec.clone()));
            }
            Event::StepClaimed { task, at, .. } => {
                claimed_at.insert(*task, at.as_micros());
            }
            Event::StepCompleted { task, at, epoch, .. } => {
                let (created_seq, created_at, spec) = created.remove(task).expect("created before completed");
                let step = &spec.steps[0];
                let id = task.as_uuid().as_bytes().to_vec();
                let (seq, done) = (record.seq as i64, at.as_micros());
                out.push((
                    TASKS,
                    vec![
                        Blob(id.clone()),
                        Text(spec.namespace.as_str().to_owned()),
                        Text(spec.name.to_string()),
                        Text("complete".to_owned()),
                        Int(i64::from(spec.priority.get())),
                        Null,
                        Null,
                        Text(spec.payload.as_str().to_owned()),
                        Int(created_at),
                        Int(created_seq as i64),
                        Int(done),
                        Int(seq),
                        Int(done),
                        // `end_reason`: set only by a cancel or a give-up.
                        Null,
                        Int(1),
                        Int(1),
                        Int(0),
                    ],
                ));
                out.push((
                    STEPS,
                    vec![
                        Blob(id),
                        Int(0),
                        Text(step.name.as_str().to_owned()),
                        Text(step.handler.as_str().to_owned()),
                        Text("complete".to_owned()),
                        // `depends_on`: the names joined with commas, none here.
                        Text(String::new()),
                        Int(1),
                        Int(i64::from(step.max_attempts)),
                        Int(i64::from(epoch.0)),
                        // `worker`: the lease's holder, cleared when the lease ends.
                        Null,
                        Null,
                        Null,
                        Int(created_at),
                        claimed_at.remove(task).map_or(Null, Int),
                        Int(done),
                        Null,
                        Text("null".to_owned()),
                        Null,
                    ],
                ));
            }
            _ => {}
        }
    }
    out
}

const AUDIT: usize = 0;
const TASKS: usize = 1;
const STEPS: usize = 2;
const INSERTS: [&str; 3] = [
    "INSERT INTO audit_log (seq, recorded_at_us, actor, command_id, stream, task_id, event_type, summary, hash) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    "INSERT INTO tasks (task_id, namespace, name, state, priority, run_at_us, idempotency_key, payload, \
     created_at_us, created_seq, updated_at_us, updated_seq, finished_at_us, end_reason, step_count, steps_done, \
     steps_failed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    "INSERT INTO task_steps (task_id, step_index, name, handler, state, depends_on, attempts, max_attempts, epoch, \
     worker, lease_deadline_us, retry_at_us, enqueued_at_us, claimed_at_us, finished_at_us, last_error, result, \
     resolution_note) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
];

/// An open SQLite connection, closed on drop.
struct Sqlite(*mut ffi::sqlite3);

impl Sqlite {
    fn open(path: &Path) -> Result<Self> {
        let name = CString::new(path.to_str().context("a UTF-8 temp path")?)?;
        let mut db = ptr::null_mut();
        // SAFETY: a valid C string and out pointer; the flags create a read-write file.
        let rc = unsafe {
            ffi::sqlite3_open_v2(
                name.as_ptr(),
                &mut db,
                // As sqlx opens the projections' connections: no mutex around each call, a
                // private cache.
                ffi::SQLITE_OPEN_READWRITE
                    | ffi::SQLITE_OPEN_CREATE
                    | ffi::SQLITE_OPEN_NOMUTEX
                    | ffi::SQLITE_OPEN_PRIVATECACHE,
                ptr::null(),
            )
        };
        let db = Sqlite(db);
        db.check(rc, "open")?;
        Ok(db)
    }

    fn check(&self, rc: c_int, what: &str) -> Result<()> {
        if rc == ffi::SQLITE_OK || rc == ffi::SQLITE_DONE || rc == ffi::SQLITE_ROW {
            return Ok(());
        }
        // SAFETY: sqlite3_errmsg accepts any connection handle, and returns a C string it owns.
        let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(self.0)) }.to_string_lossy().into_owned();
        Err(anyhow!("SQLite {what}: {message} ({rc})"))
    }

    fn exec(&self, sql: &str) -> Result<()> {
        let text = CString::new(sql)?;
        // SAFETY: an open connection and a C string; no callback.
        let rc = unsafe { ffi::sqlite3_exec(self.0, text.as_ptr(), None, ptr::null_mut(), ptr::null_mut()) };
        self.check(rc, sql)
    }

    fn prepare(&self, sql: &str) -> Result<Statement<'_>> {
        let text = CString::new(sql)?;
        let mut statement = ptr::null_mut();
        // SAFETY: an open connection, a C string (-1: up to its NUL), an out pointer.
        let rc = unsafe { ffi::sqlite3_prepare_v2(self.0, text.as_ptr(), -1, &mut statement, ptr::null_mut()) };
        self.check(rc, sql)?;
        Ok(Statement { db: self, raw: statement })
    }
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        // SAFETY: every statement borrowed this connection and was finalized before it drops.
        unsafe { ffi::sqlite3_close(self.0) };
    }
}

/// A prepared statement, finalized on drop.
struct Statement<'a> {
    db: &'a Sqlite,
    raw: *mut ffi::sqlite3_stmt,
}

impl Statement<'_> {
    /// Binds `values` (borrowed until the step: `SQLITE_STATIC`), steps once and resets.
    fn run(&self, values: &[Param]) -> Result<()> {
        // Every parameter is bound afresh each run, so no pointer of an earlier run is stepped.
        // SAFETY: a live statement.
        debug_assert_eq!(unsafe { ffi::sqlite3_bind_parameter_count(self.raw) } as usize, values.len());
        for (i, value) in values.iter().enumerate() {
            let at = i as c_int + 1;
            // SAFETY: a live statement; text and blobs outlive the step below, which is the
            // last use of the bindings before the reset.
            let rc = unsafe {
                match value {
                    Param::Null => ffi::sqlite3_bind_null(self.raw, at),
                    Param::Int(v) => ffi::sqlite3_bind_int64(self.raw, at, *v),
                    Param::Text(t) => {
                        ffi::sqlite3_bind_text(self.raw, at, t.as_ptr().cast(), t.len() as c_int, ffi::SQLITE_STATIC())
                    }
                    Param::Blob(b) => {
                        ffi::sqlite3_bind_blob(self.raw, at, b.as_ptr().cast(), b.len() as c_int, ffi::SQLITE_STATIC())
                    }
                }
            };
            self.db.check(rc, "bind")?;
        }
        // SAFETY: a live, fully bound statement.
        let rc = unsafe { ffi::sqlite3_step(self.raw) };
        self.db.check(rc, "step")?;
        // SAFETY: as above.
        unsafe { ffi::sqlite3_reset(self.raw) };
        Ok(())
    }
}

impl Drop for Statement<'_> {
    fn drop(&mut self) {
        // SAFETY: finalized once, here.
        unsafe { ffi::sqlite3_finalize(self.raw) };
    }
}

/// The rows written and the CPU seconds writing them took, 1,000 tasks a transaction, into a
/// fresh SQLite file with the projectors' tables and indexes.
fn read_model_floor(events: &[Logged], records: &[Record], tasks: usize, path: &Path) -> Result<(usize, f64)> {
    if !projections::sqlite_memory::install() {
        bail!("SQLite was started before the storage floor could point it at mimalloc, as the server does");
    }
    let rows = rows(events, records);
    let db = Sqlite::open(path)?;
    for pragma in ["journal_mode = WAL", "synchronous = NORMAL", "cache_size = -65536", "temp_store = file"] {
        db.exec(&format!("PRAGMA {pragma}"))?;
    }
    for kind in [ProjectorKind::Audit, ProjectorKind::Tasks] {
        for ddl in kind.table_ddl(Backend::Sqlite, "", 1).into_iter().chain(kind.index_ddl(Backend::Sqlite, "", 1)) {
            db.exec(&ddl)?;
        }
    }
    let statements = INSERTS.iter().map(|sql| db.prepare(sql)).collect::<Result<Vec<_>>>()?;
    let per_transaction = rows.len().div_ceil(tasks.div_ceil(TASKS_PER_TRANSACTION).max(1));
    let start = thread_cpu_s()?;
    for chunk in rows.chunks(per_transaction.max(1)) {
        db.exec("BEGIN")?;
        for (statement, values) in chunk {
            statements[*statement].run(values)?;
        }
        db.exec("COMMIT")?;
    }
    let seconds = thread_cpu_s()? - start;
    drop(statements);
    Ok((rows.len(), seconds))
}
