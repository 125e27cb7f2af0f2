//! The JSON form of a record and its domain event, shared by every tool that
//! shows the log to people or other programs (the replay tool's `events
//! --json`, audit exports; the API's feed uses the same field names), so they
//! all agree: `{"seq", "recorded_at", "stream", "stream_version",
//! "command_id", "actor", "type", "schema_version", "hash", "data"}` where
//! `data` is the event's fields with payloads and results as JSON values
//! rather than strings of JSON.

use domain::{Event, Timestamp};
use serde_json::{Map, Value};

use crate::record::StoredRecord;

/// The HTTP header in which the server's event feed without `follow` names the head it reads
/// to at least (every write acknowledged before the request): a body that ends before that
/// seq was cut short. The server sets it; `taskledger-replay --server` checks it.
pub const FEED_HEAD_HEADER: &str = "x-taskledger-head-seq";

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Bytes of a hex string (either case); `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.as_bytes().chunks(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

/// The event's fields as a JSON object (its variant's body), with `payload`
/// and `result` fields turned from JSON text into JSON values.
pub fn event_data(event: &Event) -> Value {
    // Externally tagged: {"StepClaimed": {...}} -> the inner object.
    let mut data = match serde_json::to_value(event).expect("events always serialize") {
        Value::Object(mut map) => map.values_mut().next().map(std::mem::take).unwrap_or(Value::Null),
        other => other,
    };
    inline_json_fields(&mut data);
    data
}

fn inline_json_fields(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                let parsed = match field {
                    Value::String(text) if matches!(key.as_str(), "payload" | "result") => {
                        serde_json::from_str::<Value>(text).ok()
                    }
                    _ => None,
                };
                match parsed {
                    Some(parsed) => *field = parsed,
                    None => inline_json_fields(field),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(inline_json_fields),
        _ => {}
    }
}

/// One record as a JSON object with the feed's field names.
pub fn record_json(record: &StoredRecord, event: &Event) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("seq".into(), record.seq.into());
    map.insert("recorded_at".into(), Timestamp::from_micros(record.recorded_at_us).to_rfc3339().into());
    map.insert("stream".into(), event.stream().to_string().into());
    map.insert("stream_version".into(), record.stream_version.into());
    map.insert("command_id".into(), record.command_id.clone().into());
    map.insert("actor".into(), record.actor.clone().into());
    map.insert("type".into(), event.type_name().into());
    map.insert("schema_version".into(), record.schema_version.into());
    map.insert("hash".into(), hex(&record.hash).into());
    map.insert("data".into(), event_data(event));
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::testkit::job;

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(unhex("00AB10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn payloads_become_json_values() {
        let event = Event::TaskCreated { spec: job(1, "q"), at: Timestamp::from_micros(5) };
        let data = event_data(&event);
        assert_eq!(data["spec"]["payload"], serde_json::json!({"n": 1}));
        assert_eq!(data["spec"]["steps"][0]["payload"], Value::Null);
        assert_eq!(data["at"], 5);
    }
}
