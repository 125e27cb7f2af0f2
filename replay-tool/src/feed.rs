//! `--server URL --token T`: reads a running server's event feed
//! (`GET /v1/events?from_seq=…&follow=false`, NDJSON, bearer token) into
//! memory and turns each line back into a record and its domain event, so
//! every subcommand works on a live server as on a file. The payload is the
//! event re-encoded with postcard, as the writer encoded it; the chain can be
//! recomputed from it when payload JSON text was stored in canonical form.
//!
//! Most subcommands need the whole log (they fold it from seq 1); `events`
//! asks only for the window it shows ([`FeedWindow`]), and `incident --task`
//! only for the head and the task's history ([`head_only`]). The body is parsed line
//! by line as it arrives: it was read whole into one string first, and with
//! the records that made about three times the log's size in memory (found by
//! a black-box check: `events --from … --limit 10` on a 546 MB log took
//! 1.5 GB and 6.5 s).

use std::io::BufRead;

use anyhow::{Context, Result, anyhow, bail};
use domain::{Event, Timestamp};
use eventlog::StoredRecord;
use eventlog::fold::encode_event;
use eventlog::json::{FEED_HEAD_HEADER, unhex};
use serde_json::Value;

use crate::source::Source;

/// Most records read from a feed (held in memory).
pub const FEED_RECORDS_MAX: usize = 5_000_000;

/// Which part of the feed to read: from `from_seq`, at most `limit` records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedWindow {
    pub from_seq: u64,
    pub limit: Option<u64>,
}

impl FeedWindow {
    /// The whole log.
    pub const ALL: FeedWindow = FeedWindow { from_seq: 1, limit: None };
}

pub fn fetch(base: &str, token: &str, window: FeedWindow) -> Result<Source> {
    let from_seq = window.from_seq.max(1);
    let mut url = format!("{}/v1/events?from_seq={from_seq}&follow=false", base.trim_end_matches('/'));
    if let Some(limit) = window.limit {
        url.push_str(&format!("&limit={}", limit.max(1)));
    }
    let mut response =
        get(&url, token, "application/x-ndjson").with_context(|| format!("read the event feed at {url}"))?;
    // The head the server read to at least: a feed that ends before it was cut short.
    let head: Option<u64> = response
        .headers()
        .get(FEED_HEAD_HEADER)
        .map(|value| {
            value.to_str().ok().and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("{FEED_HEAD_HEADER} is not a seq"))
        })
        .transpose()?;
    let body = std::io::BufReader::with_capacity(1 << 20, response.body_mut().with_config().limit(u64::MAX).reader());
    let mut records = Vec::new();
    for (n, line) in body.lines().enumerate() {
        let line = line.context("read the feed body")?;
        if line.trim().is_empty() {
            continue;
        }
        if records.len() >= FEED_RECORDS_MAX {
            bail!("the feed has more than {FEED_RECORDS_MAX} records; copy the data directory and use --data");
        }
        let value: Value = serde_json::from_str(&line).with_context(|| format!("parse feed line {}", n + 1))?;
        let record = record_from_json(&value).with_context(|| format!("read feed line {}", n + 1))?;
        // Records are found by their place (`seq − first`): one dropped or repeated on the way
        // (a proxy, a faulty server) would put every later one in the wrong place, unnoticed
        // (found by a review).
        let expected = from_seq + records.len() as u64;
        if record.seq != expected {
            bail!("the feed sent seq {} where seq {expected} was due: read it again", record.seq);
        }
        records.push(record);
    }
    let last = records.last().map_or(from_seq - 1, |record: &StoredRecord| record.seq);
    let wanted_all = window.limit.is_none_or(|limit| (records.len() as u64) < limit);
    if let Some(head) = head.filter(|head| wanted_all && last < *head) {
        bail!("the feed ended at seq {last}, before the head {head} the server announced: read it again");
    }
    let window_head = if window == FeedWindow::ALL { None } else { head };
    Ok(Source::Feed { origin: base.to_owned(), token: token.to_owned(), first: from_seq, records, window_head })
}

/// A server's log as its head alone (`GET /v1/ledger`), for a report on one task: its records
/// are then read from the task's history ([`task_history`]), not from the whole feed.
pub fn head_only(base: &str, token: &str) -> Result<Source> {
    let url = format!("{}/v1/ledger", base.trim_end_matches('/'));
    let mut response = get(&url, token, "application/json").with_context(|| format!("read the head at {url}"))?;
    let ledger: Value = response.body_mut().read_json().context("parse the ledger's head")?;
    let head = ledger["head_seq"].as_u64().ok_or_else(|| anyhow!("{url} answered without a head_seq"))?;
    Ok(Source::Feed {
        origin: base.to_owned(),
        token: token.to_owned(),
        first: head + 1,
        records: Vec::new(),
        window_head: Some(head),
    })
}

/// Records per page of a task's history (the server's most).
const HISTORY_PAGE: usize = 10_000;

/// A task's records, read from the server (`GET /v1/tasks/{id}/history`, a page at a time, for
/// as long as the server's `Link` header names a next page): for a task first met inside a
/// window of the feed, whose start (its name and steps) lies before it.
pub fn task_history(base: &str, token: &str, task: domain::TaskId) -> Result<Vec<StoredRecord>> {
    let mut records = Vec::new();
    loop {
        let from = records.last().map_or(1, |r: &StoredRecord| r.stream_version + 1);
        let url =
            format!("{}/v1/tasks/{task}/history?from_version={from}&limit={HISTORY_PAGE}", base.trim_end_matches('/'));
        let mut response =
            get(&url, token, "application/json").with_context(|| format!("read task {task}'s history at {url}"))?;
        let more = response.headers().contains_key("link");
        let page: Vec<Value> =
            response.body_mut().with_config().limit(u64::MAX).read_json().context("parse the task's history")?;
        for record in &page {
            let record = record_from_json(record)?;
            // A page that does not go on from where the last ended (a server that ignored
            // `from_version` was read page after page, for ever: found by a review).
            let expected = records.len() as u64 + 1;
            if record.stream_version != expected {
                bail!("task {task}'s history sent version {} where version {expected} was due", record.stream_version);
            }
            records.push(record);
        }
        if !more || page.is_empty() {
            return Ok(records);
        }
    }
}

/// `GET url` with the bearer token, accepting `accept`.
/// An answer other than 2xx is an error carrying the server's own message (its error body's
/// `code` and `message`): "http status: 403" alone left an on-call engineer guessing which role
/// the token lacked (found by a black-box check).
fn get(url: &str, token: &str, accept: &str) -> Result<ureq::http::Response<ureq::Body>> {
    let mut response = ureq::get(url)
        .config()
        .http_status_as_error(false)
        .build()
        .header("Authorization", &format!("Bearer {token}"))
        .header("Accept", accept)
        .call()?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body: Option<Value> = response.body_mut().with_config().limit(64 << 10).read_json().ok();
    let error = body.as_ref().map(|body| &body["error"]);
    let code = error.and_then(|e| e["code"].as_str()).unwrap_or("");
    let message = error.and_then(|e| e["message"].as_str()).unwrap_or("");
    let hint = if status == ureq::http::StatusCode::NOT_FOUND && code != "task_not_found" {
        " (is --server the server's base URL, e.g. http://127.0.0.1:8080, without a path?)"
    } else {
        ""
    };
    let detail: Vec<&str> = [code, message].into_iter().filter(|part| !part.is_empty()).collect();
    let detail = if detail.is_empty() { String::new() } else { format!(": {}", detail.join(": ")) };
    bail!("the server answered {status}{detail}{hint}")
}

/// Puts payload and result values back into the JSON text the domain keeps.
fn textify_json_fields(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                // An absent optional result stays null; `step_completed` always has one (fixed below).
                if key == "payload" || key == "result" && !field.is_null() {
                    *field = Value::String(field.to_string());
                } else {
                    textify_json_fields(field);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(textify_json_fields),
        _ => {}
    }
}

fn variant_name(type_name: &str) -> String {
    type_name
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

/// One feed line back into a stored record.
pub fn record_from_json(value: &Value) -> Result<StoredRecord> {
    let field = |name: &str| value.get(name).ok_or_else(|| anyhow!("missing field {name:?}"));
    let kind = field("type")?.as_str().ok_or_else(|| anyhow!("type is not a string"))?;
    let mut data = field("data")?.clone();
    textify_json_fields(&mut data);
    if kind == "step_completed" && data.get("result").is_some_and(Value::is_null) {
        data["result"] = Value::String("null".into());
    }
    let mut tagged = serde_json::Map::new();
    tagged.insert(variant_name(kind), data);
    let event: Event =
        serde_json::from_value(Value::Object(tagged)).with_context(|| format!("decode a {kind} event"))?;
    let recorded_at = field("recorded_at")?.as_str().ok_or_else(|| anyhow!("recorded_at is not a string"))?;
    let recorded_at = Timestamp::parse_rfc3339(recorded_at).map_err(|e| anyhow!(e))?;
    let text = |name: &str| -> Result<String> {
        Ok(field(name)?.as_str().ok_or_else(|| anyhow!("{name} is not a string"))?.to_owned())
    };
    let number = |name: &str| field(name)?.as_u64().ok_or_else(|| anyhow!("{name} is not a number"));
    let mut new = encode_event(&event, &text("command_id")?, &text("actor")?, recorded_at.as_micros());
    // Up to FEED_RECORDS_MAX records stay in memory: each keeps its payload at its size, not the
    // encoder's spare room.
    new.payload.shrink_to_fit();
    let hash: [u8; 32] =
        unhex(&text("hash")?).and_then(|h| h.try_into().ok()).ok_or_else(|| anyhow!("hash is not 64 hex digits"))?;
    Ok(StoredRecord {
        seq: number("seq")?,
        stream: new.stream,
        stream_version: number("stream_version")?,
        recorded_at_us: new.recorded_at_us,
        command_id: new.command_id,
        actor: new.actor,
        event_type: new.event_type,
        schema_version: u16::try_from(number("schema_version")?)?,
        payload: new.payload,
        hash,
    })
}
