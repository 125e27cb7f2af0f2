//! The JSON shapes of the HTTP API and their conversion to and from domain
//! types. The API owns these: the domain's serde forms are for the log and
//! fixtures, these are for people and client libraries (RFC 3339 times, JSON
//! payloads as JSON, not as strings). Unknown fields are refused so a typo is
//! an error, not a silently ignored option.

use domain::{
    ClaimedStep, Event, HandlerName, IdempotencyKey, Json, Namespace, Priority, Rejection, RetryPolicy, StepName,
    StepSpec, Tag, Task, TaskId, TaskSpec, Text, Timestamp,
};
use eventlog::StoredRecord;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Deepest nesting of arrays and objects accepted in a payload or result. Every JSON reader of
/// the log's records (the feed, `taskledger-replay --server`, client libraries) must be able to
/// parse them, and common parsers stop at 128 levels, the record around a payload included.
pub const JSON_DEPTH_MAX: usize = 64;

/// Turns a JSON value into the domain's bounded JSON text: at most [`Json::MAX_BYTES`] and
/// [`JSON_DEPTH_MAX`] levels deep (a GraphQL literal could carry a depth REST's parser refuses).
pub fn json_text(field: &str, value: &Value) -> Result<Json, Rejection> {
    let depth = json_depth(value);
    if depth > JSON_DEPTH_MAX {
        return Err(Rejection::invalid(
            field,
            format!("{field} is nested {depth} levels deep; the limit is {JSON_DEPTH_MAX}"),
        ));
    }
    Json::new(field, serde_json::to_string(value).expect("values serialize"))
}

/// Levels of arrays and objects in `value` (a scalar is 0), without recursion.
fn json_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, depth)) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|child| (child, depth + 1))),
            Value::Object(fields) => stack.extend(fields.values().map(|child| (child, depth + 1))),
            _ => continue,
        }
        deepest = deepest.max(depth + 1);
    }
    deepest
}

/// The domain's JSON text back into a value (it was valid JSON when stored).
pub fn json_value(json: &Json) -> Value {
    serde_json::from_str(json.as_str()).unwrap_or(Value::String(json.as_str().to_owned()))
}

/// A JSON value read with each object's keys named once. `serde_json::Value` keeps the last of
/// a repeated key, so `{"k": 1, "k": 2}` was recorded as `{"k": 2}` while another reader of the
/// client's text may take the first: ambiguous input, refused like a repeated field of a request.
#[derive(Debug)]
pub struct UniqueKeys(pub Value);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor).map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        UniqueKeys::deserialize(deserializer).map(|v| v.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let UniqueKeys(value) = map.next_value()?;
            match object.entry(key) {
                serde_json::map::Entry::Vacant(place) => {
                    place.insert(value);
                }
                serde_json::map::Entry::Occupied(taken) => {
                    let key = taken.key();
                    return Err(serde::de::Error::custom(format!("the key {key:?} appears twice in one object")));
                }
            }
        }
        Ok(Value::Object(object))
    }
}

/// `#[serde(deserialize_with)]` for a payload or result: [`UniqueKeys`].
fn unique_keys<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
    UniqueKeys::deserialize(deserializer).map(|v| v.0)
}

/// [`unique_keys`] for an optional result.
fn unique_keys_optional<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Option::<UniqueKeys>::deserialize(deserializer).map(|v| v.map(|v| v.0))
}

pub fn time(ts: Timestamp) -> String {
    ts.to_rfc3339()
}

#[derive(Deserialize, async_graphql::InputObject, Default)]
#[serde(deny_unknown_fields)]
#[graphql(name = "RetryInput")]
pub struct RetryRequest {
    pub base_ms: Option<u64>,
    /// Growth per attempt, e.g. 2.0 doubles.
    pub multiplier: Option<f64>,
    pub cap_ms: Option<u64>,
    pub jitter_pct: Option<u8>,
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "StepInput")]
pub struct StepRequest {
    pub name: String,
    pub handler: String,
    #[serde(default, deserialize_with = "unique_keys")]
    #[graphql(default)]
    pub payload: Value,
    #[serde(default)]
    #[graphql(default)]
    pub depends_on: Vec<String>,
    pub max_attempts: Option<u32>,
    pub lease_ms: Option<u32>,
    pub retry: Option<RetryRequest>,
}

/// A task: either `handler` (a single job, one step named `main`) or `steps`
/// (a workflow).
#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "CreateTaskInput")]
pub struct CreateTaskRequest {
    /// A UUIDv7; the server mints one when absent.
    pub id: Option<String>,
    pub namespace: String,
    pub name: Option<String>,
    #[serde(default, deserialize_with = "unique_keys")]
    #[graphql(default)]
    pub payload: Value,
    #[serde(default)]
    #[graphql(default)]
    pub priority: i32,
    /// RFC 3339; the task's steps wait until then.
    pub run_at: Option<String>,
    #[serde(default)]
    #[graphql(default)]
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    pub handler: Option<String>,
    pub max_attempts: Option<u32>,
    pub lease_ms: Option<u32>,
    pub retry: Option<RetryRequest>,
    pub steps: Option<Vec<StepRequest>>,
}

const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const DEFAULT_LEASE_MS: u32 = 30_000;

fn retry_policy(field: &str, request: Option<&RetryRequest>) -> Result<RetryPolicy, Rejection> {
    let default = RetryPolicy::default();
    let Some(r) = request else { return Ok(default) };
    let multiplier_permille = match r.multiplier {
        None => default.multiplier_permille,
        Some(m) if m.is_finite() && (1.0..=100.0).contains(&m) => (m * 1000.0).round() as u32,
        Some(m) => {
            return Err(Rejection::new(
                domain::RejectionCode::InvalidRetryPolicy,
                Some(&format!("{field}.multiplier")),
                format!("multiplier must be between 1.0 and 100.0, got {m}"),
            ));
        }
    };
    let policy = RetryPolicy {
        base_ms: r.base_ms.unwrap_or(default.base_ms),
        multiplier_permille,
        // Without a cap, the default one, raised to a longer base up to the largest cap: a base
        // past even that is then the base's fault, and the answer names it.
        cap_ms: r.cap_ms.unwrap_or(default.cap_ms.max(r.base_ms.unwrap_or(0)).min(domain::RETRY_CAP_MS_MAX)),
        jitter_pct: r.jitter_pct.unwrap_or(default.jitter_pct),
    };
    policy.validate()?;
    Ok(policy)
}

pub fn step_spec(field: &str, s: &StepRequest) -> Result<StepSpec, Rejection> {
    let at = |r: Rejection| r.within(field);
    Ok(StepSpec {
        name: StepName::new(&s.name).map_err(at)?,
        handler: HandlerName::new(&s.handler).map_err(at)?,
        payload: json_text("payload", &s.payload).map_err(at)?,
        depends_on: s
            .depends_on
            .iter()
            .map(StepName::new)
            .collect::<Result<_, _>>()
            .map_err(|r| r.within(&format!("{field}.depends_on")))?,
        max_attempts: s.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        retry: retry_policy("retry", s.retry.as_ref()).map_err(at)?,
        lease_ms: s.lease_ms.unwrap_or(DEFAULT_LEASE_MS),
    })
}

impl CreateTaskRequest {
    /// The task id the request names, if any (else the server mints one).
    pub fn given_id(&self) -> Result<Option<TaskId>, Rejection> {
        self.id
            .as_deref()
            .map(|text| TaskId::parse(text).map_err(|r| Rejection { field: Some("id".into()), ..r }))
            .transpose()
    }

    pub fn into_spec(self, mint: impl FnOnce() -> TaskId) -> Result<TaskSpec, Rejection> {
        let id = match self.given_id()? {
            Some(id) => id,
            None => mint(),
        };
        let steps = match (&self.handler, &self.steps) {
            (Some(handler), None) => vec![StepSpec {
                name: StepName::new("main").expect("valid"),
                handler: HandlerName::new(handler)?,
                payload: Json::null(),
                depends_on: Vec::new(),
                max_attempts: self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
                retry: retry_policy("retry", self.retry.as_ref())?,
                lease_ms: self.lease_ms.unwrap_or(DEFAULT_LEASE_MS),
            }],
            (None, Some(steps)) => {
                if self.max_attempts.is_some() || self.lease_ms.is_some() || self.retry.is_some() {
                    return Err(Rejection::invalid(
                        "steps",
                        "max_attempts, lease_ms and retry go on each step when `steps` is given",
                    ));
                }
                steps.iter().enumerate().map(|(i, s)| step_spec(&format!("steps[{i}]"), s)).collect::<Result<_, _>>()?
            }
            _ => {
                return Err(Rejection::invalid(
                    "handler",
                    "give either `handler` (a single job) or `steps` (a workflow)",
                ));
            }
        };
        Ok(TaskSpec {
            id,
            namespace: Namespace::new(&self.namespace)?,
            name: self.name.unwrap_or_else(|| self.namespace.clone()),
            payload: json_text("payload", &self.payload)?,
            priority: Priority::new(self.priority)?,
            run_at: self
                .run_at
                .as_deref()
                .map(Timestamp::parse_rfc3339)
                .transpose()
                .map_err(|m| Rejection::invalid("run_at", m))?,
            tags: self.tags.iter().map(Tag::new).collect::<Result<_, _>>()?,
            idempotency_key: self.idempotency_key.as_deref().map(IdempotencyKey::new).transpose()?,
            steps,
        })
    }
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "CreateBatchInput")]
pub struct CreateBatchRequest {
    pub tasks: Vec<CreateTaskRequest>,
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "ClaimInput")]
pub struct ClaimRequest {
    pub namespaces: Vec<String>,
    pub worker_id: String,
    #[serde(default = "one")]
    #[graphql(default = 1)]
    pub max: u32,
    pub lease_ms: Option<u32>,
    #[serde(default)]
    #[graphql(default)]
    pub handlers: Vec<String>,
    /// Long-poll: wait up to this long for work when none is ready.
    #[serde(default)]
    #[graphql(default)]
    pub wait_ms: u64,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "HeartbeatInput")]
pub struct HeartbeatRequest {
    pub epoch: u32,
    pub lease_ms: Option<u32>,
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "CompleteInput")]
pub struct CompleteRequest {
    pub epoch: u32,
    #[serde(default, deserialize_with = "unique_keys")]
    #[graphql(default)]
    pub result: Value,
}

/// `POST /v1/completions` (and the `completeSteps` mutation): several leased
/// steps completed in one request.
#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "CompleteStepsInput")]
pub struct CompleteBatchRequest {
    pub completions: Vec<CompletionRequest>,
}

/// One step of a [`CompleteBatchRequest`].
#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "CompletionInput")]
pub struct CompletionRequest {
    pub task_id: String,
    pub step: String,
    pub epoch: u32,
    #[serde(default, deserialize_with = "unique_keys")]
    #[graphql(default)]
    pub result: Value,
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "FailInput")]
pub struct FailRequest {
    pub epoch: u32,
    pub error: String,
    #[serde(default = "yes")]
    #[graphql(default = true)]
    pub retryable: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "ReleaseInput")]
pub struct ReleaseRequest {
    pub epoch: u32,
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "AddStepsInput")]
pub struct AddStepsRequest {
    pub epoch: u32,
    pub steps: Vec<StepRequest>,
}

#[derive(Deserialize, async_graphql::InputObject, Default)]
#[serde(deny_unknown_fields)]
#[graphql(name = "RetryStepInput")]
pub struct RetryStepRequest {
    #[serde(default)]
    #[graphql(default)]
    pub reset_attempts: bool,
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "ResolveInput")]
pub struct ResolveRequest {
    pub note: String,
    #[serde(default, deserialize_with = "unique_keys_optional")]
    pub result: Option<Value>,
}

#[derive(Deserialize, async_graphql::InputObject, Default)]
#[serde(deny_unknown_fields)]
#[graphql(name = "ReasonInput")]
pub struct ReasonRequest {
    pub reason: Option<String>,
}

#[derive(Deserialize, async_graphql::InputObject)]
#[serde(deny_unknown_fields)]
#[graphql(name = "ConcurrencyInput")]
pub struct ConcurrencyRequest {
    /// `null` removes the limit.
    pub limit: Option<u32>,
}

/// Free text from a request (an error, a note, a reason). NUL is refused: PostgreSQL
/// stores no text holding it, so a read model there could never take the event.
pub fn text(field: &str, value: &str) -> Result<Text, Rejection> {
    if value.contains('\0') {
        return Err(Rejection::invalid(
            field,
            format!("{field} contains U+0000 (NUL); any other character is allowed"),
        ));
    }
    Text::new(field, value)
}

// ----- responses -----

#[derive(Serialize, async_graphql::SimpleObject)]
pub struct CommandResponse {
    /// The seq of the first event this command recorded (absent if it changed nothing).
    pub seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The log head once the command was durable: pass it as `minSeq` to read your writes.
    pub head_seq: u64,
    pub duplicate: bool,
    pub events: Vec<EventBody>,
}

/// The answer to `POST /v1/completions`: one result per requested step, in
/// request order.
#[derive(Serialize, async_graphql::SimpleObject)]
pub struct CompletionsResponse {
    pub results: Vec<CompletionResult>,
    /// The log head once every recorded completion was durable.
    pub head_seq: u64,
}

/// What became of one completion: `status` is the HTTP status the same
/// completion would have had on its own (200, or the error's status).
#[derive(Serialize, async_graphql::SimpleObject)]
pub struct CompletionResult {
    pub task_id: String,
    pub step: String,
    pub status: u16,
    pub seq: Option<u64>,
    pub duplicate: bool,
    pub error: Option<ErrorDetail>,
}

/// An error's code, message and offending field, as in an error response's `error`, and for
/// an item refused as overloaded (503) the seconds to wait before sending it again — what a
/// lone request's `Retry-After` header would say.
#[derive(Serialize, async_graphql::SimpleObject)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    pub field: Option<String>,
    pub retry_after_s: Option<u32>,
}

#[derive(Serialize, async_graphql::SimpleObject)]
pub struct CreatedResponse {
    pub task_id: String,
    /// False when an idempotency key matched an existing task.
    pub created: bool,
    pub seq: Option<u64>,
    pub head_seq: u64,
    pub duplicate: bool,
}

#[derive(Serialize, async_graphql::SimpleObject)]
pub struct BatchCreatedResponse {
    /// One per task of the request, in order: the task it created, or the one its
    /// idempotency key named (an existing task, or one earlier in the batch).
    pub task_ids: Vec<String>,
    /// Tasks created now (the others' keys matched).
    pub created: u64,
    pub seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub head_seq: u64,
    pub duplicate: bool,
}

#[derive(Serialize, async_graphql::SimpleObject)]
pub struct ClaimedStepBody {
    pub task_id: String,
    pub namespace: String,
    pub step: String,
    pub handler: String,
    pub payload: Value,
    pub task_payload: Value,
    pub epoch: u32,
    pub attempt: u32,
    pub lease_deadline: String,
}

impl From<&ClaimedStep> for ClaimedStepBody {
    fn from(c: &ClaimedStep) -> Self {
        Self {
            task_id: c.task.to_string(),
            namespace: c.namespace.to_string(),
            step: c.step.to_string(),
            handler: c.handler.to_string(),
            payload: json_value(&c.payload),
            task_payload: json_value(&c.task_payload),
            epoch: c.epoch.0,
            attempt: c.attempt.0,
            lease_deadline: time(c.lease_deadline),
        }
    }
}

#[derive(Serialize, async_graphql::SimpleObject)]
pub struct ClaimResponse {
    pub seq: Option<u64>,
    pub head_seq: u64,
    pub steps: Vec<ClaimedStepBody>,
    /// A repeat of an earlier command id: the original claim's steps whose leases are still live, with their deadlines as they are now.
    pub duplicate: bool,
}

/// A domain event as JSON: `{"type": "step_claimed", ...fields}`.
#[derive(Serialize, async_graphql::SimpleObject)]
pub struct EventBody {
    #[serde(rename = "type")]
    #[graphql(name = "type")]
    pub kind: String,
    pub data: Value,
}

impl From<&Event> for EventBody {
    fn from(event: &Event) -> Self {
        Self { kind: event.type_name().to_owned(), data: eventlog::json::event_data(event) }
    }
}

/// One record of the log, as the feed and history endpoints return it.
#[derive(Serialize, async_graphql::SimpleObject)]
pub struct RecordBody {
    pub seq: u64,
    pub recorded_at: String,
    pub stream: String,
    pub stream_version: u64,
    pub command_id: String,
    pub actor: String,
    #[serde(rename = "type")]
    #[graphql(name = "type")]
    pub kind: String,
    pub schema_version: u16,
    pub hash: String,
    pub data: Value,
}

pub fn record_body(record: &StoredRecord, event: &Event) -> RecordBody {
    let body = EventBody::from(event);
    RecordBody {
        seq: record.seq,
        recorded_at: time(Timestamp::from_micros(record.recorded_at_us)),
        stream: event.stream().to_string(),
        stream_version: record.stream_version,
        command_id: record.command_id.clone(),
        actor: record.actor.clone(),
        kind: body.kind,
        schema_version: record.schema_version,
        hash: eventlog::json::hex(&record.hash),
        data: body.data,
    }
}

#[derive(Serialize, async_graphql::SimpleObject)]
pub struct StepBody {
    pub name: String,
    pub handler: String,
    pub state: String,
    pub depends_on: Vec<String>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub lease_epoch: u32,
    pub worker: Option<String>,
    pub lease_deadline: Option<String>,
    pub retry_at: Option<String>,
    pub last_error: Option<String>,
    pub payload: Value,
    pub result: Option<Value>,
}

#[derive(Serialize, async_graphql::SimpleObject)]
pub struct TaskBody {
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub state: String,
    pub priority: i32,
    pub tags: Vec<String>,
    pub idempotency_key: Option<String>,
    pub payload: Value,
    pub created_at: String,
    pub run_at: Option<String>,
    pub steps: Vec<StepBody>,
    /// The seq of the task's latest event, and how many events its stream has.
    pub last_seq: u64,
    pub version: u64,
}

pub fn task_body(task: &Task, last_seq: u64, version: u64) -> TaskBody {
    TaskBody {
        id: task.id.to_string(),
        namespace: task.namespace.to_string(),
        name: task.name.to_string(),
        state: task.state.as_str().to_owned(),
        priority: task.priority.get(),
        tags: task.tags.iter().map(ToString::to_string).collect(),
        idempotency_key: task.idempotency_key.as_ref().map(ToString::to_string),
        payload: json_value(&task.payload),
        created_at: time(task.created_at),
        run_at: task.run_at.map(time),
        steps: task
            .steps
            .iter()
            .map(|s| StepBody {
                name: s.name.to_string(),
                handler: s.handler.to_string(),
                state: s.state.as_str().to_owned(),
                depends_on: s.deps.iter().map(|d| task.steps[d.get()].name.to_string()).collect(),
                attempts: s.attempts,
                max_attempts: s.max_attempts,
                lease_epoch: s.epoch.0,
                worker: s.worker.as_ref().map(ToString::to_string),
                lease_deadline: s.lease_deadline.map(time),
                retry_at: s.retry_at.map(time),
                last_error: s.last_error.as_ref().map(|e| e.as_str().to_owned()),
                payload: json_value(&s.payload),
                result: s.result.as_ref().map(json_value),
            })
            .collect(),
        last_seq,
        version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_keys_reads_every_json_value_and_refuses_a_key_named_twice() {
        let text = r#"{"a": [1, -2, 3.5, 18446744073709551615, "s", null, true, {"k": {}}], "k": {"k": []}}"#;
        let read: UniqueKeys = serde_json::from_str(text).unwrap();
        assert_eq!(read.0, serde_json::from_str::<Value>(text).unwrap());
        for twice in [r#"{"k": 1, "k": 1}"#, r#"[{"a": {"k": 1, "k": 2}}]"#, r#"{"k": 1, "j": 2, "k": 3}"#] {
            let error = serde_json::from_str::<UniqueKeys>(twice).unwrap_err();
            assert!(error.to_string().contains(r#"the key "k" appears twice"#), "{error}");
            assert_eq!(error.classify(), serde_json::error::Category::Data);
        }
    }

    fn nested(levels: usize) -> Value {
        (0..levels).fold(Value::Null, |inner, _| Value::Array(vec![inner]))
    }

    /// Found by a black-box check: a GraphQL literal 126+ levels deep was recorded, and then
    /// every JSON reader of the feed (`taskledger-replay --server` included) failed on it.
    #[test]
    fn payloads_deeper_than_the_limit_are_refused() {
        assert_eq!(json_depth(&serde_json::json!({"a": [1, {"b": 2}], "c": 3})), 3);
        assert!(json_text("payload", &nested(JSON_DEPTH_MAX)).is_ok());
        let refused = json_text("payload", &nested(JSON_DEPTH_MAX + 1)).unwrap_err();
        assert_eq!(refused.code, domain::RejectionCode::InvalidValue);
        assert!(refused.message.contains("nested 65 levels deep; the limit is 64"), "{}", refused.message);
    }
}
