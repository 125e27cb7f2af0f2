//! What the API does, independent of how it was asked: REST handlers and
//! GraphQL resolvers both call these. Each operation checks the caller's
//! role, turns wire input into a `domain::Command`, sends it to the writer
//! (which checks namespace scopes against the ledger) and turns the
//! acknowledgement into a wire answer. Reads of a task fold the task's own
//! events from the log (MVCC, off the writer thread), optionally only up to
//! a past seq or time.

use std::time::Duration;

use axum::http::StatusCode;
use domain::{Command, Event, LeaseEpoch, LeaseRef, Namespace, RejectionCode, StepName, StreamId, TaskId, Timestamp};
use eventlog::{Acknowledgement, Envelope, StoredRecord, WriteError, decode_event};

use crate::auth::{Permission, Principal};
use crate::error::{ApiError, ApiResult};
use crate::server::AppState;
use crate::task_folds::{FoldedTask, TaskFolds};
use crate::wire::*;

/// Longest a claim may long-poll.
pub const CLAIM_WAIT_MS_MAX: u64 = 30_000;
/// Most steps completed by one `POST /v1/completions`.
pub const COMPLETIONS_MAX: usize = 1000;
/// Bytes an item's suffix (`/` and its index) adds to the request's X-Command-Id.
const ITEM_SUFFIX_BYTES_MAX: usize = 1 + (COMPLETIONS_MAX - 1).ilog10() as usize + 1;
/// Records read per page when folding a task's stream.
pub const STREAM_PAGE_RECORDS: usize = 10_000;

/// Who is asking, and the client's command id for safe retries (if any).
pub struct Caller<'a> {
    pub who: &'a Principal,
    pub command_id: Option<String>,
}

impl<'a> Caller<'a> {
    /// A caller with the client's command id, if any. Ids beginning as the server's own do
    /// (`srv-`) are refused: the dedup window keeps none of those, so a retry under one would
    /// run the command again.
    pub fn new(who: &'a Principal, command_id: Option<String>) -> ApiResult<Self> {
        if let Some(id) = &command_id
            && !eventlog::dedup::is_deduplicated(id)
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_command_id",
                format!(
                    "command ids beginning with {:?} are the ones the server mints for commands sent without one; \
                     choose another",
                    eventlog::dedup::MINTED_COMMAND_ID_PREFIX
                ),
            )
            .with_field("command_id"));
        }
        Ok(Self { who, command_id })
    }

    fn command_id(&self) -> String {
        // Without a client id there is nothing to deduplicate against: a minted id, which the
        // writer's dedup window does not keep.
        self.command_id.clone().unwrap_or_else(|| {
            format!("{}{}", eventlog::dedup::MINTED_COMMAND_ID_PREFIX, uuid::Uuid::new_v4().simple())
        })
    }
}

/// Sends one command to the writer and waits for its durable answer.
pub async fn execute(state: &AppState, caller: &Caller<'_>, command: Command) -> ApiResult<Acknowledgement> {
    execute_create(state, caller, command, &[]).await
}

/// [`execute`] for a create whose specs may name their task ids: `given_ids[i]` is the id
/// the request gave spec `i` (`None` where the server minted one), so a repeat under the
/// same command id that names other ids is told apart from the original.
async fn execute_create(
    state: &AppState,
    caller: &Caller<'_>,
    command: Command,
    given_ids: &[Option<TaskId>],
) -> ApiResult<Acknowledgement> {
    execute_counted(state, caller, command, given_ids, |_| true).await
}

/// [`execute_create`], counted in the command metrics (`taskledger_commands_total`, the
/// acknowledgement latency) only when `answers` says this attempt is the request's answer: a
/// long-polling claim tries again and again while it waits, and is one command, not one per
/// attempt (every attempt was counted, so one waiting worker looked like a high claim rate).
async fn execute_counted(
    state: &AppState,
    caller: &Caller<'_>,
    command: Command,
    given_ids: &[Option<TaskId>],
    answers: impl FnOnce(&Result<Acknowledgement, WriteError>) -> bool,
) -> ApiResult<Acknowledgement> {
    let target = command.target_task();
    let envelope = Envelope { command_id: caller.command_id(), actor: caller.who.actor(), command };
    let kind = envelope.command.kind();
    // At DEBUG, as the lines logged in it: made at INFO, it cost every command ~1 µs for nothing.
    let span = tracing::debug_span!("command", kind, command_id = %envelope.command_id, actor = %envelope.actor);
    let started = std::time::Instant::now();
    let submitted = span.in_scope(|| state.writer.submit_scoped(envelope, caller.who.scope.clone()));
    let result = match submitted {
        Ok(receiver) => tracing::Instrument::instrument(receiver, span.clone())
            .await
            .unwrap_or_else(|_| Err(WriteError::Unavailable("the writer stopped before answering".into()))),
        Err(e) => Err(e),
    };
    // A repeat must be of this very command (`check_same_command`); one that is not is
    // refused, and counted as an invalid envelope.
    let (result, conflict) = match result {
        Ok(ack) if ack.duplicate => match check_same_command(caller, given_ids, &ack) {
            Ok(()) => (Ok(ack), None),
            Err(conflict) => {
                (Err(WriteError::InvalidEnvelope("command id reused for another command".into())), Some(conflict))
            }
        },
        other => (other, None),
    };
    {
        let _entered = span.enter();
        if answers(&result) {
            state.metrics.record_command(kind, &result, started.elapsed());
        }
        match &result {
            Ok(ack) => match ack.seqs {
                Some(seqs) => tracing::debug!(seq = seqs.first, duplicate = ack.duplicate, "acknowledged"),
                None => tracing::debug!(duplicate = ack.duplicate, "acknowledged, nothing recorded"),
            },
            Err(error) => tracing::debug!(%error, "not recorded"),
        }
    }
    if let Some(conflict) = conflict {
        return Err(conflict);
    }
    match (result, target) {
        (Err(WriteError::Rejected(rejection)), Some(task)) if rejection.code == RejectionCode::TaskNotFound => {
            Err(finished_task(state, caller.who, task).await.unwrap_or_else(|| rejection.into()))
        }
        (result, _) => Ok(result?),
    }
}

/// Whether a task is in a final state (nothing more can happen to it).
pub fn has_finished(task: &TaskBody) -> bool {
    domain::TaskState::ALL.iter().any(|s| s.is_terminal() && s.as_str() == task.state)
}

/// The answer to a command on a task the writer does not hold: a task that has
/// finished (the writer keeps only live ones) is a conflict naming its final
/// state, not "not found" — a worker whose task an operator cancelled learns
/// why its completion was refused. `None` when the task is unknown, or in a
/// namespace the caller may not see (scopes do not reveal other tasks).
async fn finished_task(state: &AppState, who: &Principal, task: TaskId) -> Option<ApiError> {
    // The refusal came after the task's last event was acknowledged: wait until it is readable.
    wait_log_readable(state, None).await.ok()?;
    let body = current_task(state, who, task).ok()?;
    has_finished(&body).then(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "invalid_state",
            format!("task {task} has finished ({}); its history is at /v1/tasks/{task}/history", body.state),
        )
        .with_field("task")
    })
}

/// A repeated command id answers with the original outcome (its events, a
/// claim's live leases), which belongs to whoever sent it first, for the
/// command it was sent with. The writer deduplicates by id alone, so:
/// another token reusing the id (guessed or seen) would read the original,
/// whatever its role or namespaces — refused with a conflict that reveals
/// nothing of the original; and the same caller reusing an id for a different
/// command (another kind, or another task) would be told its command was done
/// when it was not — refused with a conflict saying so. The writer compares
/// the command with the original's events (`Ledger::repeats`,
/// `differs_from_original`: kind, task, specs, worker, step, epoch, result,
/// queue, …); a create's given ids, which the command does not tell from
/// minted ones, must name the tasks the original created from those specs.
fn check_same_command(caller: &Caller<'_>, given_ids: &[Option<TaskId>], ack: &Acknowledgement) -> ApiResult<()> {
    if ack.events.is_empty() {
        return Ok(());
    }
    let conflict = |message: &str| {
        Err(ApiError::new(StatusCode::CONFLICT, "command_id_conflict", message).with_field("command_id"))
    };
    if ack.original_actor.as_deref() != Some(caller.who.actor().as_str()) {
        return conflict("this command id was already used by another caller; send a fresh X-Command-Id (commandId)");
    }
    // A spec the original created a task from answers that task's id; one whose idempotency
    // key named a task (an existing one, or one an earlier spec of the batch created) answers
    // that task, whatever id it gives (then and now). The created tasks come in spec order, so
    // a spec created its task when it answers the next one still unaccounted for.
    let mut created = ack.events.iter().filter_map(Event::created_task).peekable();
    let other_ids = given_ids.iter().zip(&ack.task_ids).any(|(given, answered)| {
        let created_here = created.next_if_eq(answered).is_some();
        created_here && given.is_some_and(|given| given != *answered)
    });
    if ack.differs_from_original || other_ids {
        return conflict(
            "this command id was already used for a different command; send a fresh X-Command-Id (commandId) for each command",
        );
    }
    Ok(())
}

pub fn command_response(ack: &Acknowledgement) -> CommandResponse {
    CommandResponse {
        seq: ack.seqs.map(|s| s.first),
        last_seq: ack.seqs.map(|s| s.last),
        head_seq: ack.head_seq,
        duplicate: ack.duplicate,
        events: ack.events.iter().map(EventBody::from).collect(),
    }
}

/// Checks the role, runs the command, answers with its events and seqs.
pub async fn run(
    state: &AppState,
    caller: &Caller<'_>,
    permission: Permission,
    command: ApiResult<Command>,
) -> ApiResult<CommandResponse> {
    caller.who.require(permission)?;
    let ack = execute(state, caller, command?).await?;
    Ok(command_response(&ack))
}

/// A task id from a path: one that cannot name a task is a task not found.
pub fn parse_task(id: &str) -> ApiResult<TaskId> {
    TaskId::parse(id).map_err(|r| {
        ApiError::new(StatusCode::NOT_FOUND, "task_not_found", format!("no task {id:?}: {}", r.message))
            .with_field("id")
    })
}

/// A step name from a path: one that cannot name a step is a step not found.
pub fn parse_step(step: &str) -> ApiResult<StepName> {
    StepName::new(step).map_err(|r| {
        ApiError::new(StatusCode::NOT_FOUND, "step_not_found", format!("no step {step:?}: {}", r.message))
            .with_field("step")
    })
}

pub fn parse_namespace(ns: &str) -> ApiResult<Namespace> {
    Ok(Namespace::new(ns)?)
}

fn lease(id: &str, step: &str, epoch: u32) -> ApiResult<LeaseRef> {
    Ok(LeaseRef { task: parse_task(id)?, step: parse_step(step)?, epoch: LeaseEpoch(epoch) })
}

fn mint_task_id() -> TaskId {
    TaskId::new(uuid::Uuid::now_v7()).expect("now_v7 mints a v7 uuid")
}

// ----- command builders (wire request -> domain command) -----

pub fn cancel(id: &str, request: Option<ReasonRequest>) -> ApiResult<Command> {
    let reason = request.and_then(|b| b.reason).map(|r| text("reason", &r)).transpose()?;
    Ok(Command::CancelTask { task: parse_task(id)?, reason })
}

pub fn give_up(id: &str, request: Option<ReasonRequest>) -> ApiResult<Command> {
    let reason = request.and_then(|b| b.reason).map(|r| text("reason", &r)).transpose()?;
    Ok(Command::GiveUpTask { task: parse_task(id)?, reason })
}

pub fn heartbeat(id: &str, step: &str, request: HeartbeatRequest) -> ApiResult<Command> {
    Ok(Command::Heartbeat { lease: lease(id, step, request.epoch)?, lease_ms: request.lease_ms })
}

pub fn complete(id: &str, step: &str, request: CompleteRequest) -> ApiResult<Command> {
    Ok(Command::CompleteStep { lease: lease(id, step, request.epoch)?, result: json_text("result", &request.result)? })
}

pub fn fail(id: &str, step: &str, request: FailRequest) -> ApiResult<Command> {
    Ok(Command::FailStep {
        lease: lease(id, step, request.epoch)?,
        error: text("error", &request.error)?,
        retryable: request.retryable,
    })
}

pub fn release(id: &str, step: &str, request: ReleaseRequest) -> ApiResult<Command> {
    Ok(Command::ReleaseStep { lease: lease(id, step, request.epoch)? })
}

pub fn add_steps(id: &str, step: &str, request: AddStepsRequest) -> ApiResult<Command> {
    let steps = request
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| step_spec(&format!("steps[{i}]"), s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Command::AddSteps { lease: lease(id, step, request.epoch)?, steps })
}

pub fn retry(id: &str, step: &str, request: Option<RetryStepRequest>) -> ApiResult<Command> {
    let reset_attempts = request.is_some_and(|b| b.reset_attempts);
    Ok(Command::RetryStep { task: parse_task(id)?, step: parse_step(step)?, reset_attempts })
}

pub fn resolve(id: &str, step: &str, request: ResolveRequest) -> ApiResult<Command> {
    Ok(Command::ResolveStep {
        task: parse_task(id)?,
        step: parse_step(step)?,
        note: text("note", &request.note)?,
        result: request.result.as_ref().map(|r| json_text("result", r)).transpose()?,
    })
}

pub fn pause(namespace: &str) -> ApiResult<Command> {
    Ok(Command::PauseQueue { namespace: parse_namespace(namespace)? })
}

pub fn resume(namespace: &str) -> ApiResult<Command> {
    Ok(Command::ResumeQueue { namespace: parse_namespace(namespace)? })
}

pub fn concurrency(namespace: &str, request: ConcurrencyRequest) -> ApiResult<Command> {
    Ok(Command::SetQueueConcurrency { namespace: parse_namespace(namespace)?, limit: request.limit })
}

// ----- operations with their own answers -----

/// Creates a task: 201 when created, 200 when an idempotency key or a
/// repeated command id matched.
pub async fn create_task(
    state: &AppState,
    caller: &Caller<'_>,
    request: CreateTaskRequest,
) -> ApiResult<(StatusCode, CreatedResponse)> {
    caller.who.require(Permission::Produce)?;
    let given = request.given_id()?;
    let spec = request.into_spec(mint_task_id)?;
    let id = spec.id;
    let ack = execute_create(state, caller, Command::CreateTask(spec), &[given]).await?;
    let created = ack.events.iter().any(|e| matches!(e, Event::TaskCreated { .. }));
    let body = CreatedResponse {
        // The task created, or the one the idempotency key named; for a repeated command
        // id the one the original recorded, not the id minted for this retry (found by
        // tests/tests/suite/crash_api.rs).
        task_id: ack.task_ids.first().copied().unwrap_or(id).to_string(),
        created,
        seq: ack.seqs.map(|s| s.first),
        head_seq: ack.head_seq,
        duplicate: ack.duplicate,
    };
    let status = if created && !ack.duplicate { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, body))
}

pub async fn create_batch(
    state: &AppState,
    caller: &Caller<'_>,
    request: CreateBatchRequest,
) -> ApiResult<(StatusCode, BatchCreatedResponse)> {
    caller.who.require(Permission::Produce)?;
    let (given, specs): (Vec<_>, Vec<_>) = request
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let within = |r: domain::Rejection| r.within(&format!("tasks[{i}]"));
            let given = t.given_id().map_err(within)?;
            Ok((given, t.into_spec(mint_task_id).map_err(within)?))
        })
        .collect::<Result<Vec<_>, domain::Rejection>>()?
        .into_iter()
        .unzip();
    let ack = execute_create(state, caller, Command::CreateTasks(specs), &given).await?;
    let created = ack.events.len() as u64;
    let status = if created > 0 && !ack.duplicate { StatusCode::CREATED } else { StatusCode::OK };
    let body = BatchCreatedResponse {
        // One per task of the request, in order: the task created, or the one its
        // idempotency key named (an existing task, or one earlier in the batch).
        task_ids: ack.task_ids.iter().map(|id| id.to_string()).collect(),
        created,
        seq: ack.seqs.map(|s| s.first),
        last_seq: ack.seqs.map(|s| s.last),
        head_seq: ack.head_seq,
        duplicate: ack.duplicate,
    };
    Ok((status, body))
}

/// Completes several leased steps in one request. Each completion is its own
/// command, so a stale lease fails only its own item; all are sent to the
/// writer before any answer is awaited, so they share its next commit. With
/// an X-Command-Id `C`, item `i` is recorded under `C/i`, and a retried
/// request answers each item as it was first answered.
pub async fn complete_batch(
    state: &AppState,
    caller: &Caller<'_>,
    request: CompleteBatchRequest,
) -> ApiResult<CompletionsResponse> {
    caller.who.require(Permission::Work)?;
    let count = request.completions.len();
    if count == 0 || count > COMPLETIONS_MAX {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_batch",
            format!("a batch holds 1 to {COMPLETIONS_MAX} completions, got {count}"),
        )
        .with_field("completions"));
    }
    let longest = eventlog::writer::COMMAND_ID_BYTES_MAX - ITEM_SUFFIX_BYTES_MAX;
    if caller.command_id.as_ref().is_some_and(|id| id.len() > longest) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_command_id",
            format!("on /v1/completions X-Command-Id is at most {longest} bytes (item i is recorded as <id>/i)"),
        )
        .with_field("command_id"));
    }
    let answers = futures_util::future::join_all(request.completions.into_iter().enumerate().map(|(i, item)| {
        let item_caller =
            Caller { who: caller.who, command_id: caller.command_id.as_ref().map(|id| format!("{id}/{i}")) };
        async move {
            let command =
                complete(&item.task_id, &item.step, CompleteRequest { epoch: item.epoch, result: item.result });
            let answer = match command {
                Ok(command) => execute(state, &item_caller, command).await,
                Err(e) => Err(e),
            };
            (item.task_id, item.step, answer)
        }
    }))
    .await;
    let mut head_seq = 0;
    let results = answers
        .into_iter()
        .map(|(task_id, step, answer)| match answer {
            Ok(ack) => {
                head_seq = head_seq.max(ack.head_seq);
                CompletionResult {
                    task_id,
                    step,
                    status: StatusCode::OK.as_u16(),
                    seq: ack.seqs.map(|s| s.first),
                    duplicate: ack.duplicate,
                    error: None,
                }
            }
            Err(e) => CompletionResult {
                task_id,
                step,
                status: e.status.as_u16(),
                seq: None,
                duplicate: false,
                error: Some(ErrorDetail {
                    code: e.code.to_owned(),
                    message: e.message,
                    field: e.field,
                    retry_after_s: e.retry_after_s,
                }),
            },
        })
        .collect();
    if head_seq == 0 {
        head_seq = state.writer.reader().head().map(|h| h.seq).unwrap_or(0);
    }
    Ok(CompletionsResponse { results, head_seq })
}

/// Claims steps; with `wait_ms`, waits for work to arrive (at most half the request timeout,
/// so the answer is never cut off: `AppContext::long_poll_limit`): the writer bumps
/// a namespace's counter after each commit that leaves it with claimable
/// steps, and a waiting claim tries again only when one of its namespaces'
/// counters moved (not on every commit, which would send the writer an
/// empty claim per waiting worker per commit).
pub async fn claim(state: &AppState, caller: &Caller<'_>, request: ClaimRequest) -> ApiResult<ClaimResponse> {
    caller.who.require(Permission::Work)?;
    if request.wait_ms > CLAIM_WAIT_MS_MAX {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_claim",
            format!("wait_ms must be at most {CLAIM_WAIT_MS_MAX}"),
        )
        .with_field("wait_ms"));
    }
    let command = Command::ClaimSteps {
        namespaces: request.namespaces.iter().map(Namespace::new).collect::<Result<_, _>>()?,
        worker: domain::WorkerId::new(&request.worker_id)?,
        max: request.max,
        lease_ms: request.lease_ms,
        handlers: request.handlers.iter().map(domain::HandlerName::new).collect::<Result<_, _>>()?,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(request.wait_ms).min(state.long_poll_limit);
    let Command::ClaimSteps { namespaces, .. } = &command else { unreachable!("built above") };
    let namespaces = namespaces.clone();
    let counters = |work: &eventlog::ReadyWork| -> Vec<u64> {
        namespaces.iter().map(|ns| work.get(ns).copied().unwrap_or(0)).collect()
    };
    let mut work = state.writer.work_watch();
    let mut stopping = state.stopping.clone();
    let mut first = true;
    loop {
        // A token revoked by a reload of the tokens while its claim waits takes nothing more (a
        // waiting claim went on taking leases for up to its wait: found by review).
        if !std::mem::take(&mut first) && !state.tokens.still_valid(caller.who) {
            return Err(ApiError::unauthorized("this token was revoked, removed or changed by a reload of the tokens"));
        }
        // Counters as they were before the claim was decided: work made ready
        // after that moves one of them.
        let before = counters(&work.borrow_and_update());
        // A server shutting down answers what it has instead of waiting on.
        let mut answers = false;
        let ack = execute_counted(state, caller, command.clone(), &[], |result| {
            answers = match result {
                Ok(ack) => !ack.claimed.is_empty() || tokio::time::Instant::now() >= deadline || *stopping.borrow(),
                Err(_) => true,
            };
            answers
        })
        .await?;
        if answers {
            return Ok(ClaimResponse {
                seq: ack.seqs.map(|s| s.first),
                head_seq: ack.head_seq,
                steps: ack.claimed.iter().map(ClaimedStepBody::from).collect(),
                duplicate: ack.duplicate,
            });
        }
        loop {
            let changed = tokio::select! {
                changed = tokio::time::timeout_at(deadline, work.changed()) => changed,
                _ = stopping.wait_for(|stop| *stop) => break,
            };
            match changed {
                Ok(Ok(())) if counters(&work.borrow_and_update()) == before => continue,
                Ok(Ok(())) | Err(_) => break,
                // The writer is gone: the next claim reports it.
                Ok(Err(_)) => break,
            }
        }
    }
}

// ----- reads folded from the log -----

/// A point in the log's past: a seq, or a time (RFC 3339).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsOf {
    Seq(u64),
    Time(Timestamp),
}

impl AsOf {
    /// `"1234"` is a seq; anything else must be an RFC 3339 time.
    pub fn parse(text: &str) -> ApiResult<AsOf> {
        if let Ok(seq) = text.parse::<u64>() {
            return Ok(AsOf::Seq(seq));
        }
        Timestamp::parse_rfc3339(text).map(AsOf::Time).map_err(|m| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_as_of", format!("asOf must be a seq or a time: {m}"))
                .with_field("asOf")
        })
    }

    /// Refuses a seq beyond the log's head (400 `invalid_as_of`): the past has no such point.
    /// A time after the last record is the head, as it stands.
    pub fn within(self, head_seq: u64) -> ApiResult<AsOf> {
        match self {
            AsOf::Seq(seq) if seq > head_seq => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_as_of",
                format!("seq {seq} is beyond the log's head ({head_seq})"),
            )
            .with_field("asOf")),
            point => Ok(point),
        }
    }

    fn includes(&self, record: &StoredRecord) -> bool {
        match self {
            AsOf::Seq(seq) => record.seq <= *seq,
            AsOf::Time(t) => record.recorded_at_us <= t.as_micros(),
        }
    }
}

/// Waits (bounded) until the log's readers see `min_seq`, and in any case every write
/// acknowledged before this call: a read answered from the log (a task, its history, a queue)
/// then sees every write any client was told of. They differ only while a checkpoint runs,
/// when acknowledged batches are durable in the journal but not readable yet (tens of ms).
/// Answers the seq waited for: every acknowledged write (and `min_seq`) is readable up to it.
pub async fn wait_log_readable(state: &AppState, min_seq: Option<u64>) -> ApiResult<u64> {
    if let Some(seq) = min_seq {
        // A seq that does not exist yet could only time out.
        crate::readmodels::check_min_seq_in_log(state, seq)?;
    }
    // Every acknowledged write, or what can be read of them after a failed checkpoint.
    let acknowledged = state.writer.readable_goal();
    let seq = min_seq.unwrap_or(0).max(acknowledged);
    let mut readable = state.writer.head_watch();
    match tokio::time::timeout(crate::readmodels::MIN_SEQ_WAIT, readable.wait_for(|head| *head >= seq)).await {
        Ok(Ok(_)) => Ok(seq),
        _ if min_seq.is_some_and(|wanted| wanted > acknowledged) => Err(ApiError::unavailable(
            "min_seq_not_reached",
            format!("seq {seq} was not reached within {} s", crate::readmodels::MIN_SEQ_WAIT.as_secs()),
            1,
        )),
        _ => Err(ApiError::unavailable(
            "log_not_readable",
            format!(
                "acknowledged writes up to seq {seq} were not readable within {} s; retry",
                crate::readmodels::MIN_SEQ_WAIT.as_secs()
            ),
            1,
        )),
    }
}

/// `point` checked against the log: a seq beyond its head is a 400 `invalid_as_of`, and after a
/// failed checkpoint a point among the acknowledged records it held (unreadable until a
/// restart) is a 503 `log_not_readable` (it was a 400 saying the seq was beyond the head, or an
/// answer without them: found by review).
pub fn as_of_within_log(state: &AppState, point: AsOf) -> ApiResult<AsOf> {
    let reader = state.writer.reader();
    let head = reader.head().map_err(|e| ApiError::internal(e.to_string()))?.seq;
    if state.writer.has_unreadable_records(None) {
        let among_held = match point {
            AsOf::Seq(seq) => seq > head && seq <= state.writer.acknowledged_head(),
            // At or after the last readable record's time: the held records may be in it.
            AsOf::Time(t) => {
                let last = reader.read_range(head, head, 1).map_err(|e| ApiError::internal(e.to_string()))?;
                last.first().is_none_or(|record| t.as_micros() >= record.recorded_at_us)
            }
        };
        if among_held {
            refuse_unreadable(state, None)?;
        }
    }
    point.within(head)
}

/// Refuses a read that would miss acknowledged records a failed checkpoint left unreadable
/// until a restart: those of `stream`, or any for a read of the whole log (`None`). Answering
/// without them would tell a client its acknowledged write does not exist.
pub fn refuse_unreadable(state: &AppState, stream: Option<&[u8]>) -> ApiResult<()> {
    if !state.writer.has_unreadable_records(stream) {
        return Ok(());
    }
    let reason = match state.writer.health() {
        eventlog::Health::Failed(reason) => reason,
        eventlog::Health::Healthy => "a checkpoint failed".to_owned(),
    };
    let what = if stream.is_some() { "this task's acknowledged records" } else { "acknowledged records" };
    Err(ApiError::unavailable(
        "log_not_readable",
        format!(
            "{what} (up to seq {}) are durable in the write-ahead journal but cannot be read until the server \
             restarts ({reason}); restart it",
            state.writer.acknowledged_head()
        ),
        30,
    ))
}

/// A task's records (optionally only those up to `as_of`), provided the
/// caller may read and may see its namespace; otherwise "not found", so scopes
/// do not reveal which tasks exist elsewhere.
pub fn task_records(
    state: &AppState,
    who: &Principal,
    id: &str,
    as_of: Option<AsOf>,
) -> ApiResult<(TaskId, Vec<(StoredRecord, Event)>)> {
    who.require(Permission::Read)?;
    let task = parse_task(id)?;
    let as_of = as_of.map(|point| as_of_within_log(state, point)).transpose()?;
    Ok((task, visible_task_records(state, who, task, as_of)?))
}

/// [`task_records`] without the read permission's check.
fn visible_task_records(
    state: &AppState,
    who: &Principal,
    task: TaskId,
    as_of: Option<AsOf>,
) -> ApiResult<Vec<(StoredRecord, Event)>> {
    visible_task_range(state, who, task, as_of, 1, usize::MAX)
}

/// At most `max` of a task's records from stream version `from_version` on (up to `as_of`),
/// once the caller is known to be allowed to see the task: a task in a namespace outside the
/// caller's scope is as unknown as one that never existed.
fn visible_task_range(
    state: &AppState,
    who: &Principal,
    task: TaskId,
    as_of: Option<AsOf>,
    from_version: u64,
    max: usize,
) -> ApiResult<Vec<(StoredRecord, Event)>> {
    let key = StreamId::Task(task).to_key();
    // A point before the records a failed checkpoint held is read as it was.
    if !matches!(as_of, Some(AsOf::Seq(seq)) if seq <= state.writer.readable_goal()) {
        refuse_unreadable(state, Some(&key))?;
    }
    let read = |from: u64, max: usize| read_task_page(state, &key, from, max);
    let decode = decode_task_record;
    // The task's namespace is in its first record, read and checked before anything else: a task
    // outside the caller's scope is answered as fast as one that never existed (reading a page
    // first made its 404 slower the longer its history). `as_of` before the task's creation is
    // a task not created yet.
    let first = read(1, 1)?.into_iter().next().filter(|record| as_of.is_none_or(|a| a.includes(record)));
    let first = first.map(|record| decode(&record).map(|event| (record, event))).transpose()?;
    let visible = match &first {
        Some((_, Event::TaskCreated { spec, .. })) => who.may_see(&spec.namespace),
        _ => false,
    };
    let Some(first) = first.filter(|_| visible) else {
        return Err(task_not_found(task));
    };
    let mut records = Vec::new();
    let mut from = from_version.max(1);
    if from == 1 && max > 0 {
        records.push(first);
        from = 2;
    }
    'pages: while records.len() < max {
        let page = read(from, STREAM_PAGE_RECORDS.min(max - records.len()))?;
        let full = page.len() == STREAM_PAGE_RECORDS.min(max - records.len());
        for record in page {
            if as_of.is_some_and(|a| !a.includes(&record)) {
                break 'pages;
            }
            from = record.stream_version + 1;
            let event = decode(&record)?;
            records.push((record, event));
        }
        if !full {
            break;
        }
    }
    Ok(records)
}

/// A task as it is (or was, `as_of`), folded through the domain from its own events.
pub fn task_view(state: &AppState, who: &Principal, id: &str, as_of: Option<AsOf>) -> ApiResult<TaskBody> {
    match as_of {
        Some(_) => Ok(TaskFold::start(state, who, id, as_of)?.1),
        None => {
            who.require(Permission::Read)?;
            current_task(state, who, parse_task(id)?)
        }
    }
}

/// A task as it is now, and a fold of it to apply its next records to (the `task`
/// subscription's); the caller must be allowed to read it.
pub fn current_fold(state: &AppState, who: &Principal, id: &str) -> ApiResult<(TaskFold, TaskBody)> {
    who.require(Permission::Read)?;
    let (fold, body) = current(state, who, parse_task(id)?, true)?;
    Ok((fold.ok_or_else(|| ApiError::internal("a fold asked for and not given"))?, body))
}

fn current_task(state: &AppState, who: &Principal, task: TaskId) -> ApiResult<TaskBody> {
    Ok(current(state, who, task, false)?.1)
}

/// A task as it is now: its kept fold with the records appended since folded on top (see
/// [`crate::task_folds`]), else a fold of its whole stream, kept when the stream is long; and,
/// when `owned`, a copy of the fold for the caller.
fn current(state: &AppState, who: &Principal, task: TaskId, owned: bool) -> ApiResult<(Option<TaskFold>, TaskBody)> {
    let Some(kept) = state.task_folds.get(task) else {
        let records = visible_task_records(state, who, task, None)?;
        let (fold, body) = TaskFold::over(task, &records)?;
        if records.len() >= TaskFolds::MIN_RECORDS
            && let (Some((last, _)), Some((_, Event::TaskCreated { spec, .. }))) = (records.last(), records.first())
        {
            let weight = TaskFolds::BASE_WEIGHT
                + records.iter().map(|(record, event)| fold_weight(record, event)).sum::<usize>();
            let (seq, version) = (last.seq, last.stream_version);
            let copy = owned.then(|| fold.clone());
            let namespace = spec.namespace.clone();
            state.task_folds.insert(task, FoldedTask { fold, namespace, seq, version, weight, broken: false });
            return Ok((copy, body));
        }
        return Ok((owned.then_some(fold), body));
    };
    let key = StreamId::Task(task).to_key();
    refuse_unreadable(state, Some(&key))?;
    // A fold whose folding failed halfway (an error, or a panic that poisoned its lock) is not
    // the stream's any more: it is dropped, and the task folded afresh.
    let Ok(mut guard) = kept.lock() else {
        state.task_folds.forget(task, &kept);
        return current(state, who, task, owned);
    };
    if guard.broken {
        drop(guard);
        return current(state, who, task, owned);
    }
    if !who.may_see(&guard.namespace) {
        return Err(task_not_found(task));
    }
    let mut from = guard.version + 1;
    let weight = guard.weight;
    loop {
        let page = read_task_page(state, &key, from, STREAM_PAGE_RECORDS)?;
        for record in &page {
            let event = decode_task_record(record)?;
            if let Err(e) = guard.fold.fold(record, &event) {
                guard.broken = true;
                state.task_folds.forget(task, &kept);
                return Err(e);
            }
            guard.seq = record.seq;
            guard.version = record.stream_version;
            guard.weight += fold_weight(record, &event);
        }
        if page.len() < STREAM_PAGE_RECORDS {
            break;
        }
        from = guard.version + 1;
    }
    if guard.weight != weight {
        state.task_folds.reweigh(task, &kept, guard.weight);
    }
    Ok((owned.then(|| guard.fold.clone()), guard.fold.body_at(guard.seq, guard.version)?))
}

/// The bytes a record may add to a kept fold (see [`FoldedTask::weight`]).
fn fold_weight(record: &StoredRecord, event: &Event) -> usize {
    match event {
        Event::LeaseExtended { .. } => 0,
        _ => record.payload.len() + TaskFolds::RECORD_WEIGHT,
    }
}

fn task_not_found(task: TaskId) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "task_not_found", format!("no task {task}")).with_field("id")
}

fn read_task_page(state: &AppState, key: &[u8], from: u64, max: usize) -> ApiResult<Vec<StoredRecord>> {
    state.writer.reader().read_stream(key, from, max).map_err(|e| ApiError::internal(e.to_string()))
}

fn decode_task_record(record: &StoredRecord) -> ApiResult<Event> {
    decode_event(record).map_err(|e| ApiError::internal(e.to_string()))
}

/// One task folded through the domain from its own events, record by record: the view after
/// each of them (the `task` subscription's updates), without reading the task's stream again.
#[derive(Clone)]
pub struct TaskFold {
    view: domain::Ledger,
    task: TaskId,
}

impl TaskFold {
    /// The task's fold from its first record up to `as_of`, and its view there; the caller must
    /// be allowed to read it ([`task_records`]). Reads of the task as it is now start from its
    /// kept fold instead ([`current_fold`]).
    fn start(state: &AppState, who: &Principal, id: &str, as_of: Option<AsOf>) -> ApiResult<(TaskFold, TaskBody)> {
        let (task, records) = task_records(state, who, id, as_of)?;
        TaskFold::over(task, &records)
    }

    /// The fold of `task`'s records (as [`task_records`] returns them), and its view after them.
    fn over(task: TaskId, records: &[(StoredRecord, Event)]) -> ApiResult<(TaskFold, TaskBody)> {
        let mut fold = TaskFold::empty(task);
        for (record, event) in records {
            fold.fold(record, event)?;
        }
        let (last, _) = records.last().ok_or_else(|| ApiError::internal("a task without records"))?;
        let body = fold.body(last)?;
        Ok((fold, body))
    }

    /// Applies the task's next record; its view after it.
    pub fn apply(&mut self, record: &StoredRecord, event: &Event) -> ApiResult<TaskBody> {
        self.fold(record, event)?;
        self.body(record)
    }

    fn fold(&mut self, record: &StoredRecord, event: &Event) -> ApiResult<()> {
        self.view.apply(event).map_err(|e| ApiError::internal(format!("record {}: {e}", record.seq)))
    }

    /// A fold of no records yet.
    pub(crate) fn empty(task: TaskId) -> TaskFold {
        TaskFold { view: domain::Ledger::retaining_terminal_tasks(), task }
    }

    /// The view after `record`, the last one folded.
    fn body(&self, record: &StoredRecord) -> ApiResult<TaskBody> {
        self.body_at(record.seq, record.stream_version)
    }

    /// The view after the last record folded, at `seq` and stream `version`.
    fn body_at(&self, seq: u64, version: u64) -> ApiResult<TaskBody> {
        let t = self.view.task(&self.task).ok_or_else(|| ApiError::internal("task vanished from its own fold"))?;
        Ok(task_body(t, seq, version))
    }
}

/// Most records one page of a task's history holds.
pub const HISTORY_PAGE_MAX: usize = 10_000;
/// Records a page of a task's history holds when the request names no limit.
pub const HISTORY_PAGE_DEFAULT: usize = 1_000;

/// One page of a task's history: its records from a stream version on, in order.
pub struct HistoryPage {
    /// The task, as its id is written canonically (for a link to the next page).
    pub task: TaskId,
    pub records: Vec<RecordBody>,
    /// Where the next page starts; `None` when this page reached the task's last record.
    pub next_from_version: Option<u64>,
}

/// At most `limit` records of a task's history (0: [`HISTORY_PAGE_DEFAULT`]; capped at
/// [`HISTORY_PAGE_MAX`]) from stream version `from_version` (0 reads as 1): a task heartbeating
/// for a day has tens of thousands of events, and its history is read a page at a time. A page
/// past the task's last record is empty.
pub fn task_history(
    state: &AppState,
    who: &Principal,
    id: &str,
    from_version: u64,
    limit: usize,
) -> ApiResult<HistoryPage> {
    who.require(Permission::Read)?;
    let task = parse_task(id)?;
    let limit = if limit == 0 { HISTORY_PAGE_DEFAULT } else { limit.min(HISTORY_PAGE_MAX) };
    let mut records = visible_task_range(state, who, task, None, from_version, limit + 1)?;
    let more = records.len() > limit;
    records.truncate(limit);
    let next_from_version = records.last().filter(|_| more).map(|(record, _)| record.stream_version + 1);
    Ok(HistoryPage { task, records: records.iter().map(|(r, e)| record_body(r, e)).collect(), next_from_version })
}
