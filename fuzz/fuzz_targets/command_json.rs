//! Fuzz target: a request body on its way to the writer. The first byte picks
//! the route; the rest is the JSON body, parsed with `serde_json` into the
//! API's wire type (`api::wire`), turned into a `domain::Command` by the same
//! builders the routes use (`api::commands`, `CreateTaskRequest::into_spec`),
//! then decided against a ledger holding one claimed task and, when accepted,
//! applied to a copy of it, whose indexes must still agree. This is the path
//! every producer, worker and operator request takes, with the DAG validation
//! (`domain::spec`) and the rejection codes on the way: nothing may panic,
//! hang or allocate without bound.

#![no_main]

use std::sync::LazyLock;

use api::commands;
use api::wire::*;
use domain::{Command, HandlerName, Ledger, Namespace, TaskId, Timestamp, WorkerId};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

/// The task every path-addressed command names, and its one step.
const TASK: &str = "01a208b8-484c-7104-b1b9-2c7afa4a7f67";
const STEP: &str = "main";
/// Decisions are made at one fixed time, an hour after the base task was claimed.
const NOW_US: i64 = 1_767_225_600_000_000;

/// A ledger with the task `TASK` in `emails` (one step, `main`) claimed once (epoch 1).
static BASE: LazyLock<Ledger> = LazyLock::new(|| {
    let mut ledger = Ledger::new();
    let at = Timestamp::from_micros(NOW_US - 3_600_000_000);
    let create: CreateTaskRequest = serde_json::from_str(&format!(
        r#"{{"id":"{TASK}","namespace":"emails","handler":"send-welcome","lease_ms":7200000,"payload":{{"user":42}}}}"#
    ))
    .expect("the base task parses");
    let spec = create.into_spec(|| unreachable!("the id is given")).expect("the base task is valid");
    let claim = Command::ClaimSteps {
        namespaces: vec![Namespace::new("emails").expect("valid")],
        worker: WorkerId::new("worker-1").expect("valid"),
        max: 1,
        lease_ms: None,
        handlers: Vec::new(),
    };
    for command in [Command::CreateTask(spec), claim] {
        for event in ledger.decide(&command, at).expect("the base commands are accepted") {
            ledger.apply(&event).expect("the base events apply");
        }
    }
    ledger
});

fn parse<T: DeserializeOwned>(body: &[u8]) -> Option<T> {
    serde_json::from_slice(body).ok()
}

fn mint() -> TaskId {
    TaskId::parse("01a20966-ed08-76a4-8615-b02b36f4c4eb").expect("a valid v7 id")
}

/// What `POST /v1/claims` builds (mirrors `api::commands::claim`, whose waiting loop is not fuzzed).
fn claim(request: &ClaimRequest) -> Option<Command> {
    Some(Command::ClaimSteps {
        namespaces: request.namespaces.iter().map(Namespace::new).collect::<Result<_, _>>().ok()?,
        worker: WorkerId::new(&request.worker_id).ok()?,
        max: request.max,
        lease_ms: request.lease_ms,
        handlers: request.handlers.iter().map(HandlerName::new).collect::<Result<_, _>>().ok()?,
    })
}

fn command(route: u8, body: &[u8]) -> Option<Command> {
    match route % 13 {
        0 => {
            let spec = parse::<CreateTaskRequest>(body)?.into_spec(mint).ok()?;
            Some(Command::CreateTask(spec))
        }
        1 => {
            let batch: CreateBatchRequest = parse(body)?;
            let specs = batch.tasks.into_iter().map(|t| t.into_spec(mint)).collect::<Result<Vec<_>, _>>().ok()?;
            Some(Command::CreateTasks(specs))
        }
        2 => claim(&parse(body)?),
        3 => commands::heartbeat(TASK, STEP, parse(body)?).ok(),
        4 => commands::complete(TASK, STEP, parse(body)?).ok(),
        5 => commands::fail(TASK, STEP, parse(body)?).ok(),
        6 => commands::release(TASK, STEP, parse(body)?).ok(),
        7 => commands::add_steps(TASK, STEP, parse(body)?).ok(),
        8 => commands::retry(TASK, STEP, parse(body)?).ok(),
        9 => commands::resolve(TASK, STEP, parse(body)?).ok(),
        10 => commands::cancel(TASK, parse(body)?).ok(),
        11 => commands::give_up(TASK, parse(body)?).ok(),
        _ => commands::concurrency("emails", parse(body)?).ok(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else { return };
    let Some(command) = command(route, body) else { return };
    if let Command::CreateTask(spec) = &command {
        // A spec the builder accepted was validated on the way (names, DAG, limits).
        let _ = spec.validate();
    }
    let now = Timestamp::from_micros(NOW_US);
    let Ok(events) = BASE.decide(&command, now) else { return };
    let mut ledger = BASE.clone();
    for event in &events {
        ledger.apply(event).expect("an event the ledger decided applies to it");
    }
    ledger.check_indexes().expect("indexes agree after applying decided events");
});
