//! Authorization, tested exhaustively against the real server binary.
//!
//! `POLICY` below is the expected policy, written down once: for every REST
//! route, every GraphQL query field, mutation and subscription, and the audit
//! export (`taskledger-replay export-audit --server`), which roles may use it
//! and what a namespace-scoped token gets outside its namespaces. The tests
//! then derive every case (row × principal × target namespace), run each one
//! against a fresh fixture on a running `taskledger serve`, and compare what
//! happened with what the table says: 0 unexpected allows and 0 unexpected
//! denials. The route list is not trusted to the table: the routes declared in
//! `api/src/{routes,server}.rs`, the paths of the served `/openapi.json` and
//! the GraphQL schema (by introspection) must each have a row, so a route
//! added later without a policy row fails `the_policy_table_covers_…`.
//!
//! Principals: each of the five roles unscoped and scoped to `alpha` (plus
//! `alphaq`, the namespace the queue-control cases pause, so pausing never
//! stalls the other fixtures); targets: a namespace inside that scope
//! (`alpha`), one outside it (`beta`), and for list views no namespace at all.
//! Every case's write carries its own command id, so after the session the
//! event log shows exactly which cases wrote and with which actor.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tests::{Server, raw, workspace_binary};

// ----- the policy -----

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Producer,
    Worker,
    Operator,
    Auditor,
    Admin,
}

const ROLES: [Role; 5] = [Role::Producer, Role::Worker, Role::Operator, Role::Auditor, Role::Admin];

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Worker => "worker",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }
}

/// Who may use a row (the permissions of `api/src/auth.rs`, by role).
const ANY: &[Role] = &ROLES;
const PRODUCE: &[Role] = &[Role::Producer, Role::Operator, Role::Admin];
const CANCEL: &[Role] = &[Role::Producer, Role::Operator, Role::Admin];
const WORK: &[Role] = &[Role::Worker, Role::Admin];
const OPERATE: &[Role] = &[Role::Operator, Role::Admin];
const AUDIT: &[Role] = &[Role::Operator, Role::Auditor, Role::Admin];
const ADMIN: &[Role] = &[Role::Admin];

/// What a namespace-scoped token gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// No token needed at all.
    Public,
    /// Any valid token of an allowed role; namespaces play no part.
    Global,
    /// Names a namespace: outside the token's scope is 403.
    Namespace,
    /// An optional namespace filter: a scoped token must name a namespace it covers (else 403).
    Filter,
    /// Addresses a task (or its step) by id: another namespace's task is 404, as if it did not exist.
    ById,
    /// Spans every namespace: a scoped token is 403.
    Unscoped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Surface {
    Rest(&'static str, &'static str),
    Query(&'static str),
    Mutation(&'static str),
    Subscription(&'static str),
    /// `taskledger-replay export-audit --server URL --token T` (reads the feed).
    Export,
}

/// The state a case's target must be in for an allowed request to succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fixture {
    Nothing,
    /// A task whose step is enqueued (with a handler of its own, so claims stay apart).
    Enqueued,
    /// A step claimed by the fixture worker (its lease epoch is known).
    Claimed,
    /// A step in error (dead-lettered) and its task blocked by failures.
    Dead,
    /// Queue settings: the case addresses `alphaq`/`betaq`, which no task uses.
    QueueSettings,
}

struct Row {
    surface: Surface,
    roles: &'static [Role],
    scope: Scope,
    fixture: Fixture,
}

const fn row(surface: Surface, roles: &'static [Role], scope: Scope, fixture: Fixture) -> Row {
    Row { surface, roles, scope, fixture }
}

use Fixture::*;
use Scope::*;
use Surface::*;

/// The expected policy. Summarized in RELIABILITY.md ("Authorization").
const POLICY: &[Row] = &[
    // REST commands and task reads.
    row(Rest("POST", "/v1/tasks"), PRODUCE, Namespace, Nothing),
    row(Rest("POST", "/v1/tasks/batch"), PRODUCE, Namespace, Nothing),
    row(Rest("GET", "/v1/tasks/{id}"), ANY, ById, Enqueued),
    row(Rest("GET", "/v1/tasks/{id}/history"), ANY, ById, Enqueued),
    row(Rest("POST", "/v1/tasks/{id}/cancel"), CANCEL, ById, Enqueued),
    row(Rest("POST", "/v1/tasks/{id}/give-up"), OPERATE, ById, Dead),
    row(Rest("POST", "/v1/claims"), WORK, Namespace, Enqueued),
    row(Rest("POST", "/v1/tasks/{id}/steps/{step}/heartbeat"), WORK, ById, Claimed),
    row(Rest("POST", "/v1/tasks/{id}/steps/{step}/complete"), WORK, ById, Claimed),
    // Per item: a completion of another namespace's step is a 404 in its result, as on its own.
    row(Rest("POST", "/v1/completions"), WORK, ById, Claimed),
    row(Rest("POST", "/v1/tasks/{id}/steps/{step}/fail"), WORK, ById, Claimed),
    row(Rest("POST", "/v1/tasks/{id}/steps/{step}/release"), WORK, ById, Claimed),
    row(Rest("POST", "/v1/tasks/{id}/steps/{step}/add-steps"), WORK, ById, Claimed),
    row(Rest("POST", "/v1/tasks/{id}/steps/{step}/retry"), OPERATE, ById, Dead),
    row(Rest("POST", "/v1/tasks/{id}/steps/{step}/resolve"), OPERATE, ById, Dead),
    row(Rest("POST", "/v1/queues/{namespace}/pause"), OPERATE, Namespace, QueueSettings),
    row(Rest("POST", "/v1/queues/{namespace}/resume"), OPERATE, Namespace, QueueSettings),
    row(Rest("PUT", "/v1/queues/{namespace}/concurrency"), OPERATE, Namespace, QueueSettings),
    row(Rest("GET", "/v1/queues/{namespace}"), ANY, Namespace, Nothing),
    // The feed, the read models, the ledger head.
    row(Rest("GET", "/v1/events"), AUDIT, Unscoped, Nothing),
    row(Rest("GET", "/v1/views/tasks"), ANY, Filter, Nothing),
    row(Rest("GET", "/v1/views/queue"), ANY, Filter, Nothing),
    row(Rest("GET", "/v1/views/dead-letters"), ANY, Filter, Nothing),
    row(Rest("GET", "/v1/views/dashboard"), ANY, Filter, Nothing),
    row(Rest("GET", "/v1/views/audit"), AUDIT, Unscoped, Nothing),
    row(Rest("GET", "/v1/views/workers"), AUDIT, Unscoped, Nothing),
    row(Rest("GET", "/v1/views/projections"), ANY, Global, Nothing),
    row(Rest("GET", "/v1/ledger"), ANY, Global, Nothing),
    // Operational routes. GraphiQL is a static page a browser opens without
    // a token; everything it does afterwards goes through POST /graphql.
    row(Rest("GET", "/healthz"), ANY, Public, Nothing),
    row(Rest("GET", "/readyz"), ANY, Public, Nothing),
    row(Rest("GET", "/metrics"), ANY, Global, Nothing),
    row(Rest("GET", "/openapi.json"), ANY, Global, Nothing),
    // A backup holds every namespace's history: admin only, and never for a scoped token.
    row(Rest("GET", "/v1/admin/backup"), ADMIN, Unscoped, Nothing),
    // So does a projection rebuild (it rewrites every namespace's rows).
    row(Rest("POST", "/v1/admin/projections/{projector}/rebuild"), ADMIN, Unscoped, Nothing),
    row(Rest("GET", "/graphql"), ANY, Public, Nothing),
    // GraphQL transports: any valid token gets in (then each field decides).
    row(Rest("POST", "/graphql"), ANY, Global, Nothing),
    row(Rest("GET", "/graphql/ws"), ANY, Global, Nothing),
    // GraphQL queries.
    row(Query("task"), ANY, ById, Enqueued),
    row(Query("taskHistory"), ANY, ById, Enqueued),
    row(Query("queue"), ANY, Namespace, Nothing),
    row(Query("tasks"), ANY, Filter, Nothing),
    row(Query("deadLetters"), ANY, Filter, Nothing),
    row(Query("dashboard"), ANY, Filter, Nothing),
    row(Query("auditLog"), AUDIT, Unscoped, Nothing),
    row(Query("workers"), AUDIT, Unscoped, Nothing),
    row(Query("projections"), ANY, Global, Nothing),
    row(Query("ledger"), ANY, Global, Nothing),
    // GraphQL mutations: the same policy as their REST twins.
    row(Mutation("createTask"), PRODUCE, Namespace, Nothing),
    row(Mutation("createTasks"), PRODUCE, Namespace, Nothing),
    row(Mutation("claimSteps"), WORK, Namespace, Enqueued),
    row(Mutation("cancelTask"), CANCEL, ById, Enqueued),
    row(Mutation("giveUpTask"), OPERATE, ById, Dead),
    row(Mutation("heartbeat"), WORK, ById, Claimed),
    row(Mutation("completeStep"), WORK, ById, Claimed),
    row(Mutation("completeSteps"), WORK, ById, Claimed),
    row(Mutation("failStep"), WORK, ById, Claimed),
    row(Mutation("releaseStep"), WORK, ById, Claimed),
    row(Mutation("addSteps"), WORK, ById, Claimed),
    row(Mutation("retryStep"), OPERATE, ById, Dead),
    row(Mutation("resolveStep"), OPERATE, ById, Dead),
    row(Mutation("pauseQueue"), OPERATE, Namespace, QueueSettings),
    row(Mutation("resumeQueue"), OPERATE, Namespace, QueueSettings),
    row(Mutation("setQueueConcurrency"), OPERATE, Namespace, QueueSettings),
    // GraphQL subscriptions (WebSocket).
    row(Subscription("events"), AUDIT, Unscoped, Nothing),
    row(Subscription("task"), ANY, ById, Enqueued),
    // The audit export reads the event feed.
    row(Export, AUDIT, Unscoped, Nothing),
];

/// Rows whose allowed cases must write at least one event. Pause and resume
/// are left out: they write nothing when the queue already is in that state,
/// and the cases run concurrently; and admin routes, which write no event
/// (a projection rebuild rewrites SQL tables, not the log).
fn must_write(row: &Row) -> bool {
    let write = match row.surface {
        Rest(method, path) => method != "GET" && !path.starts_with("/graphql") && !path.starts_with("/v1/admin/"),
        Mutation(_) => true,
        _ => false,
    };
    write
        && !matches!(row.surface, Rest(_, "/v1/queues/{namespace}/pause" | "/v1/queues/{namespace}/resume"))
        && !matches!(row.surface, Mutation("pauseQueue" | "resumeQueue"))
}

// ----- principals, credentials, targets, outcomes -----

#[derive(Clone, Debug)]
struct Principal {
    role: Role,
    scoped: bool,
}

impl Principal {
    fn name(&self) -> String {
        if self.scoped { format!("{}@alpha", self.role.name()) } else { self.role.name().to_owned() }
    }
    fn token(&self) -> String {
        format!("tok-{}", self.name())
    }
}

fn principals() -> Vec<Principal> {
    ROLES.iter().flat_map(|&role| [Principal { role, scoped: false }, Principal { role, scoped: true }]).collect()
}

/// How a request authenticates.
#[derive(Clone, Debug)]
enum Credential {
    Valid(Principal),
    Missing,
    /// Not a `Bearer` header at all.
    Malformed,
    Unknown,
    Revoked,
}

impl Credential {
    /// The Authorization header value, if any.
    fn header(&self) -> Option<String> {
        match self {
            Credential::Valid(p) => Some(format!("Bearer {}", p.token())),
            Credential::Missing => None,
            Credential::Malformed => Some(format!("Basic {}", "dG9rLWFkbWluOg==")),
            Credential::Unknown => Some("Bearer tok-nobody".to_owned()),
            Credential::Revoked => Some(format!("Bearer {REVOKED_TOKEN}")),
        }
    }
    fn label(&self) -> String {
        match self {
            Credential::Valid(p) => p.name(),
            other => format!("{other:?}").to_lowercase(),
        }
    }
}

const REVOKED_TOKEN: &str = "tok-revoked-admin";
const FIXTURE_TOKEN: &str = "tok-fixtures";
const IN: &str = "alpha";
const OUT: &str = "beta";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The row names no namespace.
    NotApplicable,
    Inside,
    Outside,
    /// A list view asked without a namespace filter.
    Unnamed,
}

fn targets(scope: Scope) -> &'static [Target] {
    match scope {
        Public | Global | Unscoped => &[Target::NotApplicable],
        Namespace | ById => &[Target::Inside, Target::Outside],
        Filter => &[Target::Inside, Target::Outside, Target::Unnamed],
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Allow,
    Unauthorized,
    Forbidden,
    NotFound,
    /// Anything else (a 409, a 500, a broken connection): always a failure.
    Other(String),
}

/// What the table says a credential gets from a row at a target.
fn expected(row: &Row, credential: &Credential, target: Target) -> Outcome {
    if row.scope == Public {
        return Outcome::Allow;
    }
    let Credential::Valid(p) = credential else { return Outcome::Unauthorized };
    if !row.roles.contains(&p.role) {
        return Outcome::Forbidden;
    }
    if !p.scoped {
        return Outcome::Allow;
    }
    match (row.scope, target) {
        (Unscoped, _) => Outcome::Forbidden,
        (Namespace, Target::Outside) | (Filter, Target::Outside | Target::Unnamed) => Outcome::Forbidden,
        (ById, Target::Outside) => Outcome::NotFound,
        _ => Outcome::Allow,
    }
}

// ----- the server with its tokens -----

fn tokens_file() -> Vec<Value> {
    let entry = tests::token_entry;
    let mut tokens: Vec<Value> = principals()
        .iter()
        .map(|p| {
            let scope: &[&str] = if p.scoped { &[IN, "alphaq"] } else { &[] };
            entry(&p.name(), &p.token(), &[p.role.name()], scope, false)
        })
        .collect();
    tokens.push(entry("fixtures", FIXTURE_TOKEN, &["admin"], &[], false));
    tokens.push(entry("revoked-admin", REVOKED_TOKEN, &["admin"], &[], true));
    tokens
}

/// A server whose tokens file holds every principal; `Server::token` is the fixture token.
fn start_server() -> (tempfile::TempDir, Server) {
    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("data");
    tests::write_tokens(&data, tokens_file(), FIXTURE_TOKEN);
    let server = Server::start_in(&data, &[]);
    (temp, server)
}

/// A fresh connection per request: a refused POST is answered before its
/// body is read, after which the server closes the connection, and a pooled
/// client may race that close with its next request ("peer disconnected").
/// This suite is about who may do what, not about connection reuse.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .max_idle_connections_per_host(0)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

struct Http {
    status: u16,
    body: Value,
}

fn send(
    agent: &ureq::Agent,
    base: &str,
    method: &str,
    path: &str,
    authorization: Option<&str>,
    command_id: Option<&str>,
    body: Option<&Value>,
) -> Result<Http, String> {
    let url = format!("{base}{path}");
    let response = match method {
        "GET" => {
            let mut r = agent.get(&url);
            if let Some(a) = authorization {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        "POST" | "PUT" => {
            let mut r = if method == "POST" { agent.post(&url) } else { agent.put(&url) };
            if let Some(a) = authorization {
                r = r.header("Authorization", a);
            }
            if let Some(id) = command_id {
                r = r.header("X-Command-Id", id);
            }
            match body {
                Some(b) => r.send_json(b),
                None => r.send_empty(),
            }
        }
        other => panic!("no client for method {other}"),
    };
    let mut response = response.map_err(|e| format!("{method} {path}: {e}"))?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    Ok(Http { status, body: serde_json::from_str(&text).unwrap_or(Value::Null) })
}

// ----- fixtures -----

/// The object a case acts on.
#[derive(Clone, Debug, Default)]
struct Subject {
    namespace: Option<String>,
    task: String,
    epoch: u64,
    handler: String,
}

fn fixture_post(agent: &ureq::Agent, base: &str, path: &str, body: Value) -> Value {
    let answer = send(agent, base, "POST", path, Some(&format!("Bearer {FIXTURE_TOKEN}")), None, Some(&body))
        .unwrap_or_else(|e| panic!("fixture {path}: {e}"));
    assert!((200..300).contains(&answer.status), "fixture {path} {body}: {} {}", answer.status, answer.body);
    answer.body
}

fn prepare(agent: &ureq::Agent, base: &str, row: &Row, target: Target, case: usize) -> Subject {
    let namespace = match (target, row.fixture) {
        (Target::Inside, QueueSettings) => Some(format!("{IN}q")),
        (Target::Outside, QueueSettings) => Some(format!("{OUT}q")),
        (Target::Inside, _) => Some(IN.to_owned()),
        (Target::Outside, _) => Some(OUT.to_owned()),
        _ => None,
    };
    let handler = format!("h-{case}");
    let mut t = Subject { namespace: namespace.clone(), handler: handler.clone(), ..Subject::default() };
    if matches!(row.fixture, Nothing | QueueSettings) {
        return t;
    }
    let ns = namespace.unwrap_or_else(|| IN.to_owned());
    let created = fixture_post(
        agent,
        base,
        "/v1/tasks",
        json!({ "namespace": ns, "handler": handler, "max_attempts": 1, "payload": { "case": case } }),
    );
    t.task = created["task_id"].as_str().expect("task id").to_owned();
    if matches!(row.fixture, Claimed | Dead) {
        let claimed = fixture_post(
            agent,
            base,
            "/v1/claims",
            json!({ "namespaces": [ns], "handlers": [handler], "worker_id": "fixture", "max": 1, "lease_ms": 600_000 }),
        );
        let step = &claimed["steps"][0];
        assert_eq!(step["task_id"], json!(t.task), "the fixture claim took its own task");
        t.epoch = step["epoch"].as_u64().expect("epoch");
    }
    if row.fixture == Dead {
        fixture_post(
            agent,
            base,
            &format!("/v1/tasks/{}/steps/main/fail", t.task),
            json!({ "epoch": t.epoch, "error": "fixture", "retryable": false }),
        );
    }
    t
}

// ----- one case -----

struct Case {
    row: usize,
    credential: Credential,
    target: Target,
}

impl Case {
    fn command_id(&self, index: usize) -> String {
        format!("authz-{index}")
    }
}

/// The REST request of a row: path (with query) and body.
fn rest_request(path: &str, t: &Subject, case: usize) -> (String, Option<Value>) {
    let ns = t.namespace.clone().unwrap_or_default();
    let concrete = path
        .replace("{id}", &t.task)
        .replace("{step}", "main")
        .replace("{namespace}", &ns)
        .replace("{projector}", "queue");
    let filter = match &t.namespace {
        Some(ns) => format!("?namespace={ns}"),
        None => String::new(),
    };
    let body = match path {
        "/v1/tasks" => json!({ "namespace": ns, "handler": "h" }),
        "/v1/tasks/batch" => json!({ "tasks": [{ "namespace": ns, "handler": "h" }] }),
        "/v1/claims" => json!({ "namespaces": [ns], "handlers": [t.handler], "worker_id": "authz", "max": 1 }),
        "/v1/tasks/{id}/cancel" | "/v1/tasks/{id}/give-up" => json!({ "reason": "authz" }),
        "/v1/tasks/{id}/steps/{step}/heartbeat" | "/v1/tasks/{id}/steps/{step}/release" => {
            json!({ "epoch": t.epoch })
        }
        "/v1/tasks/{id}/steps/{step}/complete" => json!({ "epoch": t.epoch, "result": { "ok": true } }),
        "/v1/completions" => {
            json!({ "completions": [{ "task_id": t.task, "step": "main", "epoch": t.epoch, "result": { "ok": true } }] })
        }
        "/v1/tasks/{id}/steps/{step}/fail" => json!({ "epoch": t.epoch, "error": "authz", "retryable": false }),
        "/v1/tasks/{id}/steps/{step}/add-steps" => {
            json!({ "epoch": t.epoch, "steps": [{ "name": "extra", "handler": "h" }] })
        }
        "/v1/tasks/{id}/steps/{step}/retry" => json!({ "reset_attempts": true }),
        "/v1/tasks/{id}/steps/{step}/resolve" => json!({ "note": "authz" }),
        "/v1/queues/{namespace}/pause" | "/v1/queues/{namespace}/resume" => json!({}),
        "/v1/admin/projections/{projector}/rebuild" => json!({}),
        "/v1/queues/{namespace}/concurrency" => json!({ "limit": case + 1 }),
        "/graphql" => json!({ "query": "{ __typename }" }),
        "/v1/events" => return ("/v1/events?follow=false".to_owned(), None),
        p if p.starts_with("/v1/views/") => return (format!("{p}{filter}"), None),
        "/v1/tasks/{id}"
        | "/v1/tasks/{id}/history"
        | "/v1/queues/{namespace}"
        | "/v1/ledger"
        | "/healthz"
        | "/readyz"
        | "/metrics"
        | "/openapi.json"
        | "/v1/admin/backup" => return (concrete, None),
        other => panic!("no request written for REST row {other}: add one to rest_request"),
    };
    (concrete, Some(body))
}

/// The GraphQL document of a query field, mutation or subscription row.
fn graphql_document(field: &str, t: &Subject, cmd: &str, case: usize) -> String {
    let (id, epoch, h) = (&t.task, t.epoch, &t.handler);
    let ns = t.namespace.clone().unwrap_or_default();
    let ns_arg = t.namespace.as_ref().map(|ns| format!("(namespace: \"{ns}\")")).unwrap_or_default();
    let step = format!(r#"taskId: "{id}", step: "main""#);
    match field {
        "task" => format!(r#"{{ task(id: "{id}") {{ id state }} }}"#),
        "taskHistory" => format!(r#"{{ taskHistory(id: "{id}") {{ seq }} }}"#),
        "queue" => format!(r#"{{ queue(namespace: "{ns}") {{ namespace }} }}"#),
        "tasks" => format!("{{ tasks{ns_arg} {{ items {{ taskId }} nextCursor }} }}"),
        "deadLetters" => format!("{{ deadLetters{ns_arg} {{ items {{ taskId }} nextCursor }} }}"),
        "dashboard" => format!("{{ dashboard{ns_arg} {{ counts {{ state count }} }} }}"),
        "auditLog" => "{ auditLog { items { seq } nextCursor } }".to_owned(),
        "workers" => "{ workers { items { worker } nextCursor } }".to_owned(),
        "projections" => "{ projections { projector lag } }".to_owned(),
        "ledger" => "{ ledger { headSeq } }".to_owned(),
        "createTask" => format!(
            r#"mutation {{ createTask(input: {{namespace: "{ns}", handler: "h"}}, commandId: "{cmd}") {{ taskId }} }}"#
        ),
        "createTasks" => format!(
            r#"mutation {{ createTasks(input: {{tasks: [{{namespace: "{ns}", handler: "h"}}]}}, commandId: "{cmd}") {{ created }} }}"#
        ),
        "claimSteps" => format!(
            r#"mutation {{ claimSteps(input: {{namespaces: ["{ns}"], handlers: ["{h}"], workerId: "authz", max: 1}}, commandId: "{cmd}") {{ steps {{ taskId }} }} }}"#
        ),
        "cancelTask" => {
            format!(r#"mutation {{ cancelTask(id: "{id}", reason: "authz", commandId: "{cmd}") {{ seq }} }}"#)
        }
        "giveUpTask" => format!(r#"mutation {{ giveUpTask(id: "{id}", commandId: "{cmd}") {{ seq }} }}"#),
        "heartbeat" | "completeStep" | "releaseStep" => {
            format!(r#"mutation {{ {field}({step}, input: {{epoch: {epoch}}}, commandId: "{cmd}") {{ seq }} }}"#)
        }
        "completeSteps" => format!(
            r#"mutation {{ completeSteps(input: {{completions: [{{taskId: "{id}", step: "main", epoch: {epoch}}}]}}, commandId: "{cmd}") {{ results {{ status error {{ code }} }} }} }}"#
        ),
        "failStep" => format!(
            r#"mutation {{ failStep({step}, input: {{epoch: {epoch}, error: "authz", retryable: false}}, commandId: "{cmd}") {{ seq }} }}"#
        ),
        "addSteps" => format!(
            r#"mutation {{ addSteps({step}, input: {{epoch: {epoch}, steps: [{{name: "extra", handler: "h"}}]}}, commandId: "{cmd}") {{ seq }} }}"#
        ),
        "retryStep" => {
            format!(r#"mutation {{ retryStep({step}, resetAttempts: true, commandId: "{cmd}") {{ seq }} }}"#)
        }
        "resolveStep" => {
            format!(r#"mutation {{ resolveStep({step}, input: {{note: "authz"}}, commandId: "{cmd}") {{ seq }} }}"#)
        }
        "pauseQueue" | "resumeQueue" => {
            format!(r#"mutation {{ {field}(namespace: "{ns}", commandId: "{cmd}") {{ seq }} }}"#)
        }
        "setQueueConcurrency" => format!(
            r#"mutation {{ setQueueConcurrency(namespace: "{ns}", limit: {}, commandId: "{cmd}") {{ seq }} }}"#,
            case + 1
        ),
        "events" => "subscription { events(fromSeq: 1) { seq } }".to_owned(),
        "task-subscription" => format!(r#"subscription {{ task(id: "{id}") {{ id }} }}"#),
        other => panic!("no GraphQL document written for {other}: add one to graphql_document"),
    }
}

fn classify_rest(answer: &Http) -> Outcome {
    classify_status(answer.status, &answer.body["error"], &answer.body)
}

/// A batch of completions answers with one result per item (REST: 200; GraphQL: data); its
/// one item's status is what counts.
fn classify_batch_item(batch: &Value, body: &Value) -> Outcome {
    let item = &batch["results"][0];
    classify_status(item["status"].as_u64().map_or(0, |s| s as u16), &item["error"], body)
}

fn classify_status(status: u16, error: &Value, body: &Value) -> Outcome {
    match (status, error["code"].as_str().unwrap_or("")) {
        (200..=299, _) => Outcome::Allow,
        (401, "unauthorized") => Outcome::Unauthorized,
        (403, "forbidden" | "namespace_forbidden") => Outcome::Forbidden,
        (404, "task_not_found" | "step_not_found") => Outcome::NotFound,
        (status, _) => Outcome::Other(format!("{status} {body}")),
    }
}

fn classify_graphql_errors(errors: &Value) -> Outcome {
    let first = &errors[0];
    let code = first["extensions"]["code"].as_str().unwrap_or("");
    match (first["extensions"]["status"].as_u64(), code) {
        (Some(401) | None, "unauthorized") => Outcome::Unauthorized,
        (Some(403), "forbidden" | "namespace_forbidden") => Outcome::Forbidden,
        (Some(404), "task_not_found" | "step_not_found") => Outcome::NotFound,
        _ => Outcome::Other(errors.to_string()),
    }
}

fn classify_graphql(answer: &Http, field: &str) -> Outcome {
    if answer.status == 401 {
        return match answer.body["errors"][0]["extensions"]["code"].as_str() {
            Some("unauthorized") => Outcome::Unauthorized,
            _ => Outcome::Other(format!("401 without the unauthorized code: {}", answer.body)),
        };
    }
    if let Some(errors) = answer.body["errors"].as_array().filter(|e| !e.is_empty()) {
        return classify_graphql_errors(&Value::Array(errors.clone()));
    }
    match &answer.body["data"][field] {
        // A batch's one item's status is what counts, as on REST.
        batch @ Value::Object(_) if field == "completeSteps" => classify_batch_item(batch, &answer.body),
        // `task(id)` answers null for a task the caller may not see, exactly as for one that does not exist.
        Value::Null if field == "task" => Outcome::NotFound,
        Value::Null => Outcome::Other(format!("{} {}", answer.status, answer.body)),
        _ if answer.status == 200 => Outcome::Allow,
        _ => Outcome::Other(format!("{} {}", answer.status, answer.body)),
    }
}

/// A WebSocket session: `connection_init` with the credential, then (if
/// `document`) one subscription and its first message.
fn websocket(addr: &str, credential: &Credential, document: Option<&str>) -> Outcome {
    let url = format!("ws://{addr}/graphql/ws");
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).expect("ws url");
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse().expect("header"));
    let stream = match std::net::TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => return Outcome::Other(format!("connect: {e}")),
    };
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let (mut socket, _) = match tungstenite::client(request, stream) {
        Ok(s) => s,
        Err(e) => return Outcome::Other(format!("handshake: {e}")),
    };
    let payload = match credential.header() {
        Some(h) => json!({ "Authorization": h }),
        None => json!({}),
    };
    let read = |socket: &mut tungstenite::WebSocket<std::net::TcpStream>| -> Option<Value> {
        loop {
            match socket.read() {
                Ok(tungstenite::Message::Text(text)) => return serde_json::from_str(&text).ok(),
                Ok(tungstenite::Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    };
    let init = json!({ "type": "connection_init", "payload": payload }).to_string();
    if socket.send(tungstenite::Message::Text(init.into())).is_err() {
        return Outcome::Other("send connection_init".into());
    }
    match read(&mut socket) {
        Some(m) if m["type"] == "connection_ack" => {}
        // Refused: the server answers with an error and closes (or just closes).
        _ => return Outcome::Unauthorized,
    }
    let Some(document) = document else { return Outcome::Allow };
    let subscribe = json!({ "id": "1", "type": "subscribe", "payload": { "query": document } }).to_string();
    if socket.send(tungstenite::Message::Text(subscribe.into())).is_err() {
        return Outcome::Other("send subscribe".into());
    }
    let outcome = match read(&mut socket) {
        Some(m) if m["type"] == "next" => match m["payload"]["errors"].as_array() {
            Some(errors) if !errors.is_empty() => classify_graphql_errors(&m["payload"]["errors"]),
            _ => Outcome::Allow,
        },
        Some(m) if m["type"] == "error" => classify_graphql_errors(&m["payload"]),
        other => Outcome::Other(format!("first subscription message: {other:?}")),
    };
    let _ = socket.close(None);
    outcome
}

/// `taskledger-replay export-audit --server … --token …`.
fn export(base: &str, credential: &Credential, key: &std::path::Path, out: &std::path::Path) -> Outcome {
    let mut command = std::process::Command::new(workspace_binary("taskledger-replay"));
    command.args(["export-audit", "--server", base, "--to", "1", "--key"]).arg(key).arg("--out").arg(out);
    command.env_remove("TASKLEDGER_TOKEN");
    let token = match credential {
        Credential::Valid(p) => Some(p.token()),
        Credential::Missing => None,
        // The tool always sends `Bearer <token>`; a malformed one is a token with a space in it.
        Credential::Malformed => Some("not a token".to_owned()),
        Credential::Unknown => Some("tok-nobody".to_owned()),
        Credential::Revoked => Some(REVOKED_TOKEN.to_owned()),
    };
    if let Some(token) = &token {
        command.args(["--token", token]);
    }
    let output = command.output().expect("run taskledger-replay");
    // The HTTP status as the tool reports it with the server's code, not any "401" in the
    // message: the server's port (40123, say) made 403s read as 401s (a flaky misclassification
    // seen once in CI).
    let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
    if output.status.success() {
        Outcome::Allow
    } else if stderr.contains("the server answered 401 unauthorized: unauthorized: ")
        || (token.is_none() && stderr.contains("--token"))
    {
        Outcome::Unauthorized
    } else if stderr.contains("the server answered 403 forbidden: forbidden: ") {
        // With the server's own message, which names what the token lacks.
        Outcome::Forbidden
    } else {
        Outcome::Other(format!("exit {:?}: {stderr}", output.status.code()))
    }
}

struct Env<'a> {
    server: &'a Server,
    key: std::path::PathBuf,
    out_dir: std::path::PathBuf,
}

fn run_case(env: &Env, agent: &ureq::Agent, case: &Case, index: usize) -> Outcome {
    let row = &POLICY[case.row];
    let base = &env.server.base;
    let t = prepare(agent, base, row, case.target, index);
    let cmd = case.command_id(index);
    let authorization = case.credential.header();
    match row.surface {
        Rest("GET", "/graphql/ws") => websocket(&env.server.addr(), &case.credential, None),
        Rest(method, path) => {
            let (path, body) = rest_request(path, &t, index);
            match send(agent, base, method, &path, authorization.as_deref(), Some(&cmd), body.as_ref()) {
                Ok(answer) if path == "/graphql" && method == "POST" => classify_graphql(&answer, "__typename"),
                Ok(answer) if path == "/v1/completions" && answer.status == 200 => {
                    classify_batch_item(&answer.body, &answer.body)
                }
                Ok(answer) => classify_rest(&answer),
                Err(e) => Outcome::Other(e),
            }
        }
        Query(field) | Mutation(field) => {
            let body = json!({ "query": graphql_document(field, &t, &cmd, index) });
            match send(agent, base, "POST", "/graphql", authorization.as_deref(), None, Some(&body)) {
                Ok(answer) => classify_graphql(&answer, field),
                Err(e) => Outcome::Other(e),
            }
        }
        Subscription(field) => {
            let name = if field == "task" { "task-subscription" } else { field };
            websocket(&env.server.addr(), &case.credential, Some(&graphql_document(name, &t, &cmd, index)))
        }
        Export => export(base, &case.credential, &env.key, &env.out_dir.join(format!("bundle-{index}"))),
    }
}

fn describe(case: &Case) -> String {
    format!("{:?} as {} at {:?}", POLICY[case.row].surface, case.credential.label(), case.target)
}

/// Runs the cases on a few threads (group commit keeps the fixtures cheap);
/// returns the mismatches, each described.
fn run_all(env: &Env, cases: &[Case], threads: usize) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let mismatches = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let agent = agent();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(index) else { break };
                    let want = expected(&POLICY[case.row], &case.credential, case.target);
                    let got = run_case(env, &agent, case, index);
                    if got != want {
                        mismatches.lock().unwrap().push(format!("{}: expected {want:?}, got {got:?}", describe(case)));
                    }
                }
            });
        }
    });
    mismatches.into_inner().unwrap()
}

fn keygen(dir: &std::path::Path) -> std::path::PathBuf {
    let key = dir.join("auditor");
    let status = std::process::Command::new(workspace_binary("taskledger-replay"))
        .args(["keygen", "--out"])
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run keygen");
    assert!(status.success());
    key.with_extension("key")
}

/// Every record of the log, from the feed.
fn feed(server: &Server) -> Vec<Value> {
    let (status, text) = server.get_text("/v1/events?follow=false&limit=1000000");
    assert_eq!(status, 200);
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("feed line")).collect()
}

// ----- the tests -----

/// A route call's path: a string literal, or a `const NAME: &str = "…"`
/// declared somewhere in the api source (e.g. `crate::backup::BACKUP_ROUTE`).
fn route_path(call: &str, dir: &std::path::Path) -> String {
    let argument = call.split(',').next().unwrap_or("").trim();
    if let Some(literal) = argument.strip_prefix('"') {
        return literal.split('"').next().expect("route path").to_owned();
    }
    let name = argument.rsplit("::").next().unwrap_or(argument);
    let declaration = format!("const {name}: &str = \"");
    for entry in std::fs::read_dir(dir).expect("api/src") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).unwrap_or_default();
        if let Some(at) = text.find(&declaration) {
            return text[at + declaration.len()..].split('"').next().expect("const path").to_owned();
        }
    }
    panic!("route path {argument:?}: neither a literal nor a const declared in api/src");
}

/// The REST routes declared in the api source: `.route("PATH", get(..).post(..))`.
fn declared_routes() -> BTreeSet<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../api/src");
    let mut routes = BTreeSet::new();
    for file in ["routes.rs", "server.rs"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("read api source");
        // The server's routes, not those its unit tests build.
        let mut rest = text.split("#[cfg(test)]").next().unwrap_or_default();
        while let Some(at) = rest.find(".route(") {
            let call = &rest[at + ".route(".len()..];
            // The call's text, up to its matching parenthesis.
            let mut depth = 1usize;
            let end = call
                .char_indices()
                .find(|&(_, c)| {
                    if c == '(' {
                        depth += 1;
                    } else if c == ')' {
                        depth -= 1;
                    }
                    depth == 0
                })
                .map_or(call.len(), |(i, _)| i);
            let call = &call[..end];
            let path = route_path(call, &dir);
            for method in ["get", "post", "put", "delete", "patch"] {
                let mut from = 0;
                while let Some(i) = call[from..].find(&format!("{method}(")) {
                    let i = from + i;
                    let before = call[..i].chars().last();
                    if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_')) {
                        routes.insert((method.to_uppercase(), path.clone()));
                    }
                    from = i + 1;
                }
            }
            rest = &rest[at + 1..];
        }
    }
    routes
}

#[test]
fn the_policy_table_covers_every_route_field_and_export() {
    let (_temp, server) = start_server();
    let rest_rows: BTreeSet<(String, String)> = POLICY
        .iter()
        .filter_map(|r| match r.surface {
            Rest(m, p) => Some((m.to_owned(), p.to_owned())),
            _ => None,
        })
        .collect();

    // Routes in the source and in the served OpenAPI document.
    let declared = declared_routes();
    assert!(declared.len() >= 30, "found only {} routes in api/src: {declared:?}", declared.len());
    let openapi = server.get("/openapi.json");
    assert_eq!(openapi.status, 200);
    let documented: BTreeSet<(String, String)> = openapi.body["paths"]
        .as_object()
        .expect("openapi paths")
        .iter()
        .flat_map(|(path, methods)| {
            methods.as_object().into_iter().flatten().map(move |(m, _)| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let missing: Vec<_> = declared.union(&documented).filter(|r| !rest_rows.contains(*r)).collect();
    assert!(missing.is_empty(), "routes without a policy row (add them to POLICY): {missing:?}");
    let stale: Vec<_> = rest_rows.iter().filter(|r| !declared.contains(*r)).collect();
    assert!(stale.is_empty(), "policy rows for routes the server does not declare: {stale:?}");
    // The OpenAPI document lists exactly the declared routes (it once only
    // printed the difference, and the /v1/views/* routes went undocumented).
    let undocumented: Vec<_> = declared.difference(&documented).collect();
    assert!(undocumented.is_empty(), "routes the server declares but api/openapi.json lacks: {undocumented:?}");
    let phantom: Vec<_> = documented.difference(&declared).collect();
    assert!(phantom.is_empty(), "operations in api/openapi.json the server does not declare: {phantom:?}");

    // GraphQL fields, by introspection.
    let introspection = server.post(
        "/graphql",
        json!({ "query": "{ __schema { queryType { fields { name } } mutationType { fields { name } } subscriptionType { fields { name } } } }" }),
    );
    let schema = &introspection.body["data"]["__schema"];
    let names = |kind: &str| -> BTreeSet<String> {
        schema[kind]["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let rows = |pick: fn(&Surface) -> Option<&'static str>| -> BTreeSet<String> {
        POLICY.iter().filter_map(|r| pick(&r.surface)).map(str::to_owned).collect()
    };
    let pairs = [
        ("queryType", rows(|s| if let Query(f) = s { Some(f) } else { None })),
        ("mutationType", rows(|s| if let Mutation(f) = s { Some(f) } else { None })),
        ("subscriptionType", rows(|s| if let Subscription(f) = s { Some(f) } else { None })),
    ];
    for (kind, covered) in pairs {
        let fields = names(kind);
        assert_eq!(fields, covered, "{kind}: schema fields vs policy rows (add a row for each new field)");
    }
    assert!(POLICY.iter().any(|r| r.surface == Export), "the audit export has a row");
}

/// The methods an OpenAPI path item may hold (other keys are not operations).
const OPENAPI_METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

#[test]
fn the_openapi_document_says_which_operations_need_a_token_as_the_server_does() {
    let (_temp, server) = start_server();
    let openapi = server.get("/openapi.json");
    assert_eq!(openapi.status, 200);
    assert_eq!(openapi.body["security"], json!([{ "bearer": [] }]), "a bearer token by default");
    let agent = agent();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for (path, item) in openapi.body["paths"].as_object().expect("openapi paths") {
        for (method, operation) in item.as_object().expect("path item") {
            if !OPENAPI_METHODS.contains(&method.as_str()) {
                continue;
            }
            // `security: []` opts an operation out of the default bearer token.
            let public = operation.get("security").is_some_and(|s| s.as_array().is_some_and(Vec::is_empty));
            // Path parameters get a placeholder: authentication comes before them.
            let concrete = path.split('/').map(|seg| if seg.starts_with('{') { "x" } else { seg }).collect::<Vec<_>>();
            let concrete = if path == "/v1/events" { "/v1/events?follow=false".to_owned() } else { concrete.join("/") };
            let method = method.to_uppercase();
            let answer = send(&agent, &server.base, &method, &concrete, None, None, Some(&json!({})))
                .unwrap_or_else(|e| panic!("{method} {concrete}: {e}"));
            let refused = answer.status == 401;
            if public == refused {
                let documented = if public { "without a token" } else { "with a bearer token" };
                wrong.push(format!("{method} {path}: documented {documented}, answered {} without one", answer.status));
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "checked only {checked} operations");
    assert!(wrong.is_empty(), "api/openapi.json disagrees with the server on authentication:\n{}", wrong.join("\n"));
}

#[test]
fn every_principal_gets_exactly_what_the_policy_table_says() {
    let (temp, server) = start_server();
    let env = Env { server: &server, key: keygen(temp.path()), out_dir: temp.path().to_path_buf() };
    let mut cases = Vec::new();
    for (row_index, row) in POLICY.iter().enumerate() {
        for principal in principals() {
            for &target in targets(row.scope) {
                cases.push(Case { row: row_index, credential: Credential::Valid(principal.clone()), target });
            }
        }
    }
    let allowed = cases.iter().filter(|c| expected(&POLICY[c.row], &c.credential, c.target) == Outcome::Allow).count();
    let mismatches = run_all(&env, &cases, 6);
    let unexpected_allows = mismatches.iter().filter(|m| m.ends_with("got Allow")).count();
    println!(
        "authz: {} rows, {} cases ({} allowed, {} denied); unexpected allows {}, other mismatches {}",
        POLICY.len(),
        cases.len(),
        allowed,
        cases.len() - allowed,
        unexpected_allows,
        mismatches.len() - unexpected_allows
    );
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));

    // The log after this multi-role session: every event carries the actor
    // of the token that caused it, denied cases wrote nothing, and every
    // allowed write wrote something.
    let records = feed(&server);
    let mut by_command: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for record in &records {
        // A batch's item `i` is recorded under `<its request's command id>/i`.
        let command_id = record["command_id"].as_str().expect("command id");
        let request_id = command_id.split_once('/').map_or(command_id, |(request, _)| request);
        by_command.entry(request_id.to_owned()).or_default().push(record);
    }
    let mut problems = Vec::new();
    for (command_id, recs) in &by_command {
        let expected_actor = match command_id.strip_prefix("authz-").and_then(|i| i.parse::<usize>().ok()) {
            Some(index) => {
                let case = &cases[index];
                if expected(&POLICY[case.row], &case.credential, case.target) != Outcome::Allow {
                    problems.push(format!("denied case wrote {} events: {}", recs.len(), describe(case)));
                }
                format!("token:{}", case.credential.label())
            }
            // Fixtures: the server mints `srv-…` ids for requests without X-Command-Id.
            None => "token:fixtures".to_owned(),
        };
        for record in recs {
            if record["actor"] != json!(expected_actor) {
                problems.push(format!(
                    "seq {} ({command_id}) has actor {} not {expected_actor}",
                    record["seq"], record["actor"]
                ));
            }
        }
    }
    for (index, case) in cases.iter().enumerate() {
        let row = &POLICY[case.row];
        if must_write(row)
            && expected(row, &case.credential, case.target) == Outcome::Allow
            && !by_command.contains_key(&case.command_id(index))
        {
            problems.push(format!("allowed write recorded nothing: {}", describe(case)));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The audit projection says the same about every seq.
    let head = server.head_seq();
    let mut audit_actors = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let page = server.get(&format!("/v1/views/audit?first=500&min_seq={head}{cursor}"));
        assert_eq!(page.status, 200, "{page:?}");
        for item in page.body["items"].as_array().expect("items") {
            audit_actors.insert(item["seq"].as_u64().unwrap(), item["actor"].as_str().unwrap().to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => after = Some(c.to_owned()),
            None => break,
        }
    }
    let feed_actors: BTreeMap<u64, String> =
        records.iter().map(|r| (r["seq"].as_u64().unwrap(), r["actor"].as_str().unwrap().to_owned())).collect();
    assert_eq!(audit_actors, feed_actors, "the audit log and the feed agree on every event's actor");
    let actors: BTreeSet<&String> = feed_actors.values().collect();
    println!("authz: {} events from {} actors after the session", records.len(), actors.len());
}

#[test]
fn missing_malformed_unknown_and_revoked_tokens_get_401_everywhere() {
    let (temp, server) = start_server();
    let env = Env { server: &server, key: keygen(temp.path()), out_dir: temp.path().to_path_buf() };
    let mut cases = Vec::new();
    for (row_index, row) in POLICY.iter().enumerate() {
        for credential in [Credential::Missing, Credential::Malformed, Credential::Unknown, Credential::Revoked] {
            let target = targets(row.scope)[0];
            cases.push(Case { row: row_index, credential, target });
        }
    }
    let mismatches = run_all(&env, &cases, 6);
    println!("authz: {} unauthenticated cases, {} mismatches", cases.len(), mismatches.len());
    assert!(mismatches.is_empty(), "{} mismatches:\n{}", mismatches.len(), mismatches.join("\n"));

    // Header forms no HTTP library sends, over a raw socket.
    let malformed: [&[u8]; 8] = [
        b"Authorization: Bearer\r\n",
        b"Authorization: Bearer \r\n",
        b"Authorization: tok-admin\r\n",
        b"Authorization: Bearer tok-admin extra\r\n",
        b"Authorization: Bearer \xfftok\r\n",
        b"Authorization: Basic dG9rLWFkbWluOg==\r\n",
        b"Authorization: BEARER tok-fixtures-wrong\r\n",
        // Two headers, even of the valid token: which one counts would be a guess.
        b"Authorization: Bearer tok-fixtures\r\nAuthorization: Bearer tok-fixtures\r\n",
    ];
    for header in malformed {
        for (method, path, body) in [
            ("GET", "/v1/ledger", ""),
            ("POST", "/graphql", r#"{"query":"{ __typename }"}"#),
            ("POST", "/v1/tasks", "{}"),
        ] {
            let mut request = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .into_bytes();
            request.extend_from_slice(header);
            request.extend_from_slice(b"\r\n");
            request.extend_from_slice(body.as_bytes());
            let answer = raw::exchange(&server.addr(), &request, Duration::from_secs(10)).expect("raw exchange");
            assert_eq!(answer.status, 401, "{method} {path} with {:?}: {answer:?}", String::from_utf8_lossy(header));
            assert!(answer.body.contains("unauthorized"), "{answer:?}");
        }
    }
    // The scheme's case does not matter (RFC 9110): `BEARER` and `bEaReR` are `Bearer`.
    for scheme in ["BEARER", "bEaReR"] {
        for (method, path, body) in [("GET", "/v1/ledger", ""), ("POST", "/graphql", r#"{"query":"{ __typename }"}"#)] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\nAuthorization: {scheme} {FIXTURE_TOKEN}\r\n\r\n{body}",
                body.len()
            );
            let answer =
                raw::exchange(&server.addr(), request.as_bytes(), Duration::from_secs(10)).expect("raw exchange");
            assert_eq!(answer.status, 200, "{scheme} on {path}: {answer:?}");
        }
    }
    // Only the fixtures wrote: every record's actor is the fixture token.
    let records = feed(&server);
    let strangers: Vec<&Value> = records.iter().filter(|r| r["actor"] != "token:fixtures").collect();
    assert!(strangers.is_empty(), "unauthenticated requests wrote: {strangers:?}");
}

#[test]
fn a_token_revoked_in_the_tokens_file_stops_working_after_a_restart() {
    let (temp, server) = start_server();
    let data = temp.path().join("data");
    let producer = Principal { role: Role::Producer, scoped: false }.token();
    let created = server.post_as(&producer, "/v1/tasks", json!({ "namespace": IN, "handler": "h" }), None);
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(server.stop(), Some(0));

    let mut entries = tokens_file();
    for entry in &mut entries {
        if entry["name"] == "producer" {
            entry["revoked"] = json!(true);
        }
    }
    tests::write_tokens(&data, entries, FIXTURE_TOKEN);
    let server = Server::start_in(&data, &[]);
    let refused = server.post_as(&producer, "/v1/tasks", json!({ "namespace": IN, "handler": "h" }), None);
    assert_eq!((refused.status, refused.code()), (401, "unauthorized"), "{refused:?}");
    assert!(refused.body["error"]["message"].as_str().unwrap().contains("revoked"), "{refused:?}");
    let gql = server.post_as(&producer, "/graphql", json!({ "query": "{ ledger { headSeq } }" }), None);
    assert_eq!(gql.status, 401, "{gql:?}");
    // The other tokens still work, and the revoked holder's past events keep their actor.
    let head = server.get("/v1/ledger");
    assert_eq!(head.body["head_seq"], json!(1));
    assert_eq!(feed(&server)[0]["actor"], "token:producer");
}

#[test]
fn a_command_id_replayed_by_another_token_returns_nothing_of_the_original() {
    let (_temp, server) = start_server();
    // The fixture token creates and claims a task in `beta` with known command ids.
    let created = server.post_as(
        FIXTURE_TOKEN,
        "/v1/tasks",
        json!({ "namespace": OUT, "handler": "h", "payload": { "secret": 42 } }),
        Some("shared-create"),
    );
    assert_eq!(created.status, 201);
    let secret_task = created.body["task_id"].as_str().unwrap().to_owned();
    let claim = json!({ "namespaces": [OUT], "worker_id": "w-beta", "max": 1, "lease_ms": 600_000 });
    let claimed = server.post_as(FIXTURE_TOKEN, "/v1/claims", claim.clone(), Some("shared-claim"));
    assert_eq!(claimed.body["steps"].as_array().unwrap().len(), 1);
    let head = server.head_seq();

    // Tokens scoped to `alpha` reuse those ids on their own requests.
    let producer = Principal { role: Role::Producer, scoped: true }.token();
    let worker = Principal { role: Role::Worker, scoped: true }.token();
    let attempts = [
        server.post_as(&producer, "/v1/tasks", json!({ "namespace": IN, "handler": "h" }), Some("shared-create")),
        server.post_as(
            &worker,
            "/v1/claims",
            json!({ "namespaces": [IN], "worker_id": "w-alpha", "max": 1 }),
            Some("shared-claim"),
        ),
        // Outside their scope, the scope is checked before the id (found by a black-box check:
        // a 409 told them another tenant had used it, where any other id answers 403 or 404).
        server.post_as(&producer, &format!("/v1/tasks/{secret_task}/cancel"), json!({}), Some("shared-claim")),
        server.post_as(&producer, "/v1/tasks", json!({ "namespace": OUT, "handler": "h" }), Some("shared-create")),
    ];
    let expected = [
        (409, "command_id_conflict"),
        (409, "command_id_conflict"),
        (404, "task_not_found"),
        (403, "namespace_forbidden"),
    ];
    for (answer, expected) in attempts.iter().zip(expected) {
        // The cancel names the task itself: its 404 says no task of that id is there to see.
        let text = answer.body.to_string().replace(&format!("no live task {secret_task} "), "");
        assert!(!text.contains(&secret_task) && !text.contains("secret"), "the original leaked: {answer:?}");
        assert_eq!((answer.status, answer.code()), expected, "{answer:?}");
    }
    let gql = server.post_as(
        &worker,
        "/graphql",
        json!({ "query": r#"mutation { claimSteps(input: {namespaces: ["alpha"], workerId: "w", max: 1}, commandId: "shared-claim") { steps { taskId epoch } } }"# }),
        None,
    );
    assert!(!gql.body.to_string().contains(&secret_task), "{gql:?}");
    assert_eq!(gql.body["errors"][0]["extensions"]["code"], "command_id_conflict", "{gql:?}");
    assert_eq!(server.head_seq(), head, "nothing was written");

    // The same token retrying its own command id still gets its original answer.
    let again = server.post_as(FIXTURE_TOKEN, "/v1/claims", claim, Some("shared-claim"));
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["steps"][0]["task_id"], json!(secret_task));
}
