//! `--server URL --token T`: reads a running server's whole event feed
//! (`GET /v1/events?from_seq=1&follow=false`, NDJSON, bearer token) into
//! memory and turns each line back into a record and its domain event, so
//! every subcommand works on a live server as on a file. The payload is the
//! event re-encoded with postcard, as the writer encoded it; the chain can be
//! recomputed from it when payload JSON text was stored in canonical form.

use anyhow::{Context, Result, anyhow, bail};
use domain::{Event, Timestamp};
use eventlog::StoredRecord;
use eventlog::fold::encode_event;
use eventlog::json::{FEED_HEAD_HEADER, unhex};
use serde_json::Value;

use crate::source::Source;

/// Most records read from a feed (held in memory).
pub const FEED_RECORDS_MAX: usize = 5_000_000;

pub fn fetch(base: &str, token: &str) -> Result<Source> {
    let url = format!("{}/v1/events?from_seq=1&follow=false", base.trim_end_matches('/'));
    let mut response = ureq::get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .header("Accept", "application/x-ndjson")
        .call()
        .with_context(|| format!("read the event feed at {url}"))?;
    // The head the server read to at least: a feed that ends before it was cut short.
    let head: Option<u64> = response
        .headers()
        .get(FEED_HEAD_HEADER)
        .map(|value| {
            value.to_str().ok().and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("{FEED_HEAD_HEADER} is not a seq"))
        })
        .transpose()?;
    let text = response.body_mut().with_config().limit(u64::MAX).read_to_string().context("read the feed body")?;
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if records.len() >= FEED_RECORDS_MAX {
            bail!("the feed has more than {FEED_RECORDS_MAX} records; copy the data directory and use --data");
        }
        let value: Value = serde_json::from_str(line).with_context(|| format!("parse feed line {}", n + 1))?;
        records.push(record_from_json(&value).with_context(|| format!("read feed line {}", n + 1))?);
    }
    let last = records.last().map_or(0, |record| record.seq);
    if let Some(head) = head.filter(|head| last < *head) {
        bail!("the feed ended at seq {last}, before the head {head} the server announced: read it again");
    }
    Ok(Source::Feed { origin: base.to_owned(), records })
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
