//! Each record's line of the event feed (its JSON, as `GET /v1/events` sends it), made once
//! for every feed that sends it.
//!
//! Every follower of the feed sends every record, and each made its own line of it: decoded,
//! turned into a body and serialized, a few µs of an HTTP worker's CPU a record and a follower,
//! at the commands' priority. Followers keeping up read the same newest records within moments
//! of each other, so the newest lines are kept here, by seq, for the next follower to copy. A
//! record never changes once written, so a line kept is right for as long as the server runs.

use std::sync::Mutex;

use axum::body::Bytes;
use eventlog::{StoredRecord, decode_event};

use crate::wire::record_body;

/// How many of the newest lines are kept: about a quarter of a second of the writer's records
/// at its sustained rate here (~18k records/s at half the lifecycle's maximum), 2–4 MB at the
/// feed's usual 300–900 bytes a line.
pub const FEED_LINES_KEPT: usize = 4096;

/// The longest line kept: a longer one is made for each feed that sends it. So the lines kept
/// hold at most 32 MiB, whatever the records' size (a slot is never emptied, and 4,096 records
/// of 48.7 KB held 200–280 MB for as long as the server ran: found by a review).
pub const FEED_LINE_KEPT_BYTES_MAX: usize = 8 * 1024;

/// A record's feed line: its seq, its event type's name (Server-Sent Events name the event) and
/// its JSON, without the newline.
#[derive(Clone)]
pub struct FeedLine {
    pub seq: u64,
    pub event_type: &'static str,
    pub json: Bytes,
}

/// The newest feed lines made, a slot a seq (seq modulo [`FEED_LINES_KEPT`]).
pub struct FeedLines {
    slots: Box<[Mutex<Option<FeedLine>>]>,
}

impl Default for FeedLines {
    fn default() -> Self {
        FeedLines { slots: (0..FEED_LINES_KEPT).map(|_| Mutex::new(None)).collect() }
    }
}

impl FeedLines {
    /// `record`'s line: the one kept, or made now (and kept, unless its slot holds a newer
    /// record's: a reader catching up does not push out the lines the followers share; or it is
    /// longer than [`FEED_LINE_KEPT_BYTES_MAX`]). An error when the record cannot be decoded.
    pub fn line_of(&self, record: &StoredRecord) -> Result<FeedLine, String> {
        let slot = &self.slots[(record.seq % FEED_LINES_KEPT as u64) as usize];
        if let Some(kept) = slot.lock().expect("feed line slot").as_ref().filter(|kept| kept.seq == record.seq) {
            return Ok(kept.clone());
        }
        let event = decode_event(record).map_err(|error| error.to_string())?;
        let json = serde_json::to_vec(&record_body(record, &event)).expect("bodies serialize");
        let line = FeedLine { seq: record.seq, event_type: event.type_name(), json: Bytes::from(json) };
        if line.json.len() > FEED_LINE_KEPT_BYTES_MAX {
            return Ok(line);
        }
        let mut kept = slot.lock().expect("feed line slot");
        if kept.as_ref().is_none_or(|kept| kept.seq < record.seq) {
            *kept = Some(line.clone());
        }
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> StoredRecord {
        let event = domain::Event::QueuePaused {
            namespace: domain::Namespace::new("q").unwrap(),
            at: domain::Timestamp::from_micros(0),
        };
        let new = eventlog::encode_event(&event, "c", "a", 0);
        StoredRecord {
            seq,
            stream: new.stream,
            stream_version: seq,
            recorded_at_us: 0,
            command_id: new.command_id,
            actor: new.actor,
            event_type: new.event_type,
            schema_version: new.schema_version,
            payload: new.payload,
            hash: [0; 32],
        }
    }

    /// A line kept is the same bytes a fresh one is; an older record's line does not push a
    /// newer one out of the slot they share; a record that cannot be decoded is an error.
    #[test]
    fn a_line_is_made_once_and_kept_for_its_seq_until_a_newer_one_takes_the_slot() {
        let lines = FeedLines::default();
        let newer = record(1 + FEED_LINES_KEPT as u64);
        let made = lines.line_of(&newer).unwrap();
        let fresh = serde_json::to_vec(&record_body(&newer, &decode_event(&newer).unwrap())).unwrap();
        assert_eq!((made.seq, made.event_type, &made.json[..]), (newer.seq, "queue_paused", &fresh[..]));
        let again = lines.line_of(&newer).unwrap();
        assert_eq!(again.json.as_ptr(), made.json.as_ptr(), "kept, not made again");
        // Seq 1 shares the slot: its line is made and sent, and the newer one stays.
        let older = lines.line_of(&record(1)).unwrap();
        assert!(String::from_utf8_lossy(&older.json).contains("\"seq\":1,"));
        assert_eq!(lines.line_of(&newer).unwrap().json.as_ptr(), made.json.as_ptr());
        let mut broken = record(2);
        broken.payload = vec![0xff; 3];
        assert!(lines.line_of(&broken).is_err());
    }

    /// A line longer than the most kept is made each time it is asked for, and keeps nothing.
    #[test]
    fn a_long_line_is_not_kept() {
        let lines = FeedLines::default();
        let short = lines.line_of(&record(3)).unwrap();
        assert!(short.json.len() <= FEED_LINE_KEPT_BYTES_MAX);
        assert_eq!(lines.line_of(&record(3)).unwrap().json.as_ptr(), short.json.as_ptr());
        let mut long = record(4);
        long.command_id = "c".repeat(FEED_LINE_KEPT_BYTES_MAX);
        let made = lines.line_of(&long).unwrap();
        assert!(made.json.len() > FEED_LINE_KEPT_BYTES_MAX);
        assert_ne!(lines.line_of(&long).unwrap().json.as_ptr(), made.json.as_ptr(), "made again");
        assert!(lines.slots[4].lock().unwrap().is_none(), "nothing kept");
    }
}
