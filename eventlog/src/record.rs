//! Record types, their stored encoding and the hash chain.
//!
//! The log stores opaque payloads; this file is the only place that knows how a record is laid
//! out on disk, so the encoder and the decoder (and their checks) cannot drift apart.
//!
//! Stored value of record `seq` = `hash (32 bytes) ‖ body`, where
//! `body = RECORD_FORMAT_VERSION ‖ postcard(RecordBody)` and
//! `hash = BLAKE3("taskledger.record.v1" ‖ prev_hash ‖ seq.to_le_bytes() ‖ body)`;
//! the genesis `prev_hash` is 32 zero bytes. The seq is the table key, not part of the body,
//! but it is bound into the hash.

use serde::{Deserialize, Serialize};

use crate::error::RecordError;

/// Hash of a record; the chain link to its predecessor.
pub type Hash = [u8; 32];

/// `prev_hash` of record 1.
pub const GENESIS_HASH: Hash = [0; 32];

/// Domain separation prefix of the record hash.
pub const HASH_DOMAIN: &[u8] = b"taskledger.record.v1";

/// First byte of every stored body; bump when `RecordBody` changes.
pub const RECORD_FORMAT_VERSION: u8 = 1;

/// Most bytes a stored body adds to its byte fields: four length varints (≤ 10 each), the
/// stream version and the time (≤ 10 each), the event type and schema version (≤ 3 each).
const ENCODED_OVERHEAD_MAX: usize = 4 * 10 + 10 + 10 + 3 + 3;

/// Limits checked before a record is written.
pub const STREAM_BYTES_MAX: usize = 1024;
pub const COMMAND_ID_BYTES_MAX: usize = 256;
pub const ACTOR_BYTES_MAX: usize = 256;
pub const PAYLOAD_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A record as handed to [`crate::LogStore::append`]; the store assigns seq, version and hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// Opaque stream key (a task id, a queue name...). Must not be empty.
    pub stream: Vec<u8>,
    pub command_id: String,
    pub actor: String,
    /// Microseconds since the Unix epoch; never decreases along the log.
    pub recorded_at_us: i64,
    pub event_type: u16,
    pub schema_version: u16,
    pub payload: Vec<u8>,
}

impl NewRecord {
    /// This record as the log would hold it at `seq` and `stream_version` with `hash`, without
    /// writing it (tools and tests that build records as the store does).
    pub fn into_stored(self, seq: u64, stream_version: u64, hash: Hash) -> StoredRecord {
        StoredRecord {
            seq,
            stream: self.stream,
            stream_version,
            recorded_at_us: self.recorded_at_us,
            command_id: self.command_id,
            actor: self.actor,
            event_type: self.event_type,
            schema_version: self.schema_version,
            payload: self.payload,
            hash,
        }
    }
}

/// A record as it is in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// Position in the log, gapless from 1.
    pub seq: u64,
    pub stream: Vec<u8>,
    /// Position in its stream, gapless from 1.
    pub stream_version: u64,
    pub recorded_at_us: i64,
    pub command_id: String,
    pub actor: String,
    pub event_type: u16,
    pub schema_version: u16,
    pub payload: Vec<u8>,
    /// Chain hash of this record (see the module docs).
    pub hash: Hash,
}

/// The serialised part of a record. Borrowing keeps decoding allocation-free until the caller
/// decides to own the record (verification never does).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub(crate) struct RecordBody<'a> {
    #[serde(borrow, serialize_with = "as_bytes")]
    pub stream: &'a [u8],
    pub stream_version: u64,
    pub recorded_at_us: i64,
    #[serde(borrow)]
    pub command_id: &'a str,
    #[serde(borrow)]
    pub actor: &'a str,
    pub event_type: u16,
    pub schema_version: u16,
    #[serde(borrow, serialize_with = "as_bytes")]
    pub payload: &'a [u8],
}

fn as_bytes<S: serde::Serializer>(bytes: &&[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

/// Validates the limits of a record about to be written.
pub(crate) fn check_new(record: &NewRecord) -> Result<(), String> {
    if record.stream.is_empty() {
        return Err("stream key is empty".into());
    }
    if record.stream.len() > STREAM_BYTES_MAX {
        return Err(format!("stream key is {} bytes, above {STREAM_BYTES_MAX}", record.stream.len()));
    }
    if record.command_id.len() > COMMAND_ID_BYTES_MAX {
        return Err(format!("command id is {} bytes, above {COMMAND_ID_BYTES_MAX}", record.command_id.len()));
    }
    if record.actor.len() > ACTOR_BYTES_MAX {
        return Err(format!("actor is {} bytes, above {ACTOR_BYTES_MAX}", record.actor.len()));
    }
    if record.payload.len() > PAYLOAD_BYTES_MAX {
        return Err(format!("payload is {} bytes, above {PAYLOAD_BYTES_MAX}", record.payload.len()));
    }
    Ok(())
}

/// The chain hash of the record at `seq` whose stored body is `body`.
pub fn chain_hash(prev_hash: &Hash, seq: u64, body: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(HASH_DOMAIN);
    hasher.update(prev_hash);
    hasher.update(&seq.to_le_bytes());
    hasher.update(body);
    *hasher.finalize().as_bytes()
}

/// Encodes `record` as record `seq` at `stream_version` after `prev_hash`; returns the stored
/// value and the decoded record, which has been checked against the input.
pub(crate) fn encode(
    record: &NewRecord,
    seq: u64,
    stream_version: u64,
    prev_hash: &Hash,
) -> Result<(Vec<u8>, StoredRecord), RecordError> {
    let body = RecordBody {
        stream: &record.stream,
        stream_version,
        recorded_at_us: record.recorded_at_us,
        command_id: &record.command_id,
        actor: &record.actor,
        event_type: record.event_type,
        schema_version: record.schema_version,
        payload: &record.payload,
    };
    // Room for the whole value, so it is never grown (a copy) while serialized: the hash, the
    // format byte, the four byte fields and their varint lengths, and the integers' varints.
    let fields = record.stream.len() + record.command_id.len() + record.actor.len() + record.payload.len();
    let mut value = Vec::with_capacity(32 + 1 + fields + ENCODED_OVERHEAD_MAX);
    value.extend_from_slice(&[0; 32]);
    value.push(RECORD_FORMAT_VERSION);
    let value = postcard::to_extend(&body, value).map_err(|source| RecordError::Decode { seq, source })?;
    let hash = chain_hash(prev_hash, seq, &value[32..]);
    let mut value = value;
    value[..32].copy_from_slice(&hash);

    // Check the record before it is written: it must decode back to what was asked for.
    let decoded = decode(seq, &value)?;
    if decoded.body != body {
        return Err(RecordError::Disagrees { seq, message: "encoded record does not decode to its input".into() });
    }
    let stored = decoded.to_stored(seq);
    Ok((value, stored))
}

/// A stored value split and decoded, borrowing from the value.
pub(crate) struct Decoded<'a> {
    pub hash: Hash,
    /// The hashed part of the value (format byte and postcard body).
    pub body_bytes: &'a [u8],
    pub body: RecordBody<'a>,
}

impl Decoded<'_> {
    pub fn to_stored(&self, seq: u64) -> StoredRecord {
        StoredRecord {
            seq,
            stream: self.body.stream.to_vec(),
            stream_version: self.body.stream_version,
            recorded_at_us: self.body.recorded_at_us,
            command_id: self.body.command_id.to_owned(),
            actor: self.body.actor.to_owned(),
            event_type: self.body.event_type,
            schema_version: self.body.schema_version,
            payload: self.body.payload.to_vec(),
            hash: self.hash,
        }
    }

    /// Checks that this record's hash links it to `prev_hash` as record `seq`.
    pub fn check_link(&self, seq: u64, prev_hash: &Hash) -> Result<(), RecordError> {
        if chain_hash(prev_hash, seq, self.body_bytes) == self.hash {
            Ok(())
        } else {
            Err(RecordError::HashMismatch { seq })
        }
    }
}

/// The stored body of `record` (format byte ‖ postcard body): exactly the bytes its chain hash
/// covers, for tools that must let someone recompute the chain without the log (audit exports).
/// The encoding is deterministic, so this equals what the log stores; callers that hand the
/// bytes on should still check `chain_hash(prev, seq, body) == record.hash`.
pub fn stored_body(record: &StoredRecord) -> Vec<u8> {
    let body = RecordBody {
        stream: &record.stream,
        stream_version: record.stream_version,
        recorded_at_us: record.recorded_at_us,
        command_id: &record.command_id,
        actor: &record.actor,
        event_type: record.event_type,
        schema_version: record.schema_version,
        payload: &record.payload,
    };
    let mut bytes = Vec::with_capacity(1 + 64 + record.payload.len());
    bytes.push(RECORD_FORMAT_VERSION);
    postcard::to_extend(&body, bytes).expect("a record body always serializes")
}

/// Decodes a stored body (as [`stored_body`] returns it) as record `seq` whose chain hash is
/// `hash`, checking its shape but not its chain link (use [`chain_hash`] for that).
pub fn decode_stored_body(seq: u64, hash: Hash, body: &[u8]) -> Result<StoredRecord, RecordError> {
    let mut value = Vec::with_capacity(32 + body.len());
    value.extend_from_slice(&hash);
    value.extend_from_slice(body);
    Ok(decode(seq, &value)?.to_stored(seq))
}

/// Decodes the stored value of record `seq`, checking its shape (not its chain link).
pub(crate) fn decode(seq: u64, value: &[u8]) -> Result<Decoded<'_>, RecordError> {
    if value.len() < 33 {
        return Err(RecordError::TooShort { seq, len: value.len() });
    }
    let (hash_bytes, body_bytes) = value.split_at(32);
    let mut hash = [0; 32];
    hash.copy_from_slice(hash_bytes);
    let version = body_bytes[0];
    if version != RECORD_FORMAT_VERSION {
        return Err(RecordError::FormatVersion { seq, found: version });
    }
    let (body, rest): (RecordBody<'_>, &[u8]) =
        postcard::take_from_bytes(&body_bytes[1..]).map_err(|source| RecordError::Decode { seq, source })?;
    if !rest.is_empty() {
        return Err(RecordError::TrailingBytes { seq, trailing: rest.len() });
    }
    if body.stream.is_empty() || body.stream_version == 0 {
        return Err(RecordError::Disagrees { seq, message: "empty stream key or stream version 0".into() });
    }
    Ok(Decoded { hash, body_bytes, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NewRecord {
        NewRecord {
            stream: b"task-1".to_vec(),
            command_id: "cmd-1".into(),
            actor: "alice".into(),
            recorded_at_us: 1_700_000_000_000_000,
            event_type: 7,
            schema_version: 1,
            payload: vec![1, 2, 3],
        }
    }

    /// The value is allocated once, at its full size: growing it while serializing copied it
    /// (a twenty-fifth of the writer's time in batch creates, perf 2026-12-06).
    #[test]
    fn an_encoded_value_is_never_grown_whatever_its_fields() {
        let widest = NewRecord {
            stream: vec![b'Q'; STREAM_BYTES_MAX],
            command_id: "c".repeat(COMMAND_ID_BYTES_MAX),
            actor: "a".repeat(ACTOR_BYTES_MAX),
            recorded_at_us: i64::MIN,
            event_type: u16::MAX,
            schema_version: u16::MAX,
            payload: vec![9; 70_000],
        };
        for record in [sample(), widest] {
            let fields = record.stream.len() + record.command_id.len() + record.actor.len() + record.payload.len();
            let (value, _) = encode(&record, u64::MAX, u64::MAX, &GENESIS_HASH).unwrap();
            assert!(value.len() <= 32 + 1 + fields + ENCODED_OVERHEAD_MAX, "{} bytes", value.len());
            assert_eq!(value.capacity(), 32 + 1 + fields + ENCODED_OVERHEAD_MAX, "the first allocation held it");
        }
    }

    #[test]
    fn encoding_is_stable_known_answer() {
        let (value, stored) = encode(&sample(), 1, 1, &GENESIS_HASH).unwrap();
        // Layout: hash, format byte, then postcard fields in declaration order.
        let expected_body: Vec<u8> = [
            &[RECORD_FORMAT_VERSION][..],
            &[6],
            b"task-1",
            &[1],                                              // stream_version
            &[0x80, 0x80, 0xf2, 0x81, 0x83, 0x89, 0x85, 0x06], // zigzag varint of the time
            &[5],
            b"cmd-1",
            &[5],
            b"alice",
            &[7, 1, 3, 1, 2, 3],
        ]
        .concat();
        assert_eq!(&value[32..], &expected_body[..]);
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"taskledger.record.v1");
        hasher.update(&[0; 32]);
        hasher.update(&1u64.to_le_bytes());
        hasher.update(&expected_body);
        assert_eq!(stored.hash, *hasher.finalize().as_bytes());
        assert_eq!(&value[..32], &stored.hash);
    }

    #[test]
    fn chain_links_and_detects_tampering() {
        let (v1, r1) = encode(&sample(), 1, 1, &GENESIS_HASH).unwrap();
        let (v2, r2) = encode(&sample(), 2, 2, &r1.hash).unwrap();
        assert_ne!(r1.hash, r2.hash);
        decode(1, &v1).unwrap().check_link(1, &GENESIS_HASH).unwrap();
        decode(2, &v2).unwrap().check_link(2, &r1.hash).unwrap();
        // Same bytes at another position do not link.
        assert!(decode(2, &v1).unwrap().check_link(2, &r1.hash).is_err());
        let mut tampered = v2.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(decode(2, &tampered).unwrap().check_link(2, &r1.hash).is_err());
    }

    #[test]
    fn decode_rejects_garbage_without_panicking() {
        for len in 0..80 {
            let value: Vec<u8> = (0..len).map(|i| (i * 37) as u8).collect();
            let _ = decode(1, &value);
        }
        let (mut value, _) = encode(&sample(), 1, 1, &GENESIS_HASH).unwrap();
        value.push(0);
        assert!(matches!(decode(1, &value), Err(RecordError::TrailingBytes { .. })));
    }

    #[test]
    fn stored_body_is_the_hashed_part_of_the_value() {
        let (value, stored) = encode(&sample(), 3, 2, &[9; 32]).unwrap();
        let body = stored_body(&stored);
        assert_eq!(body, &value[32..]);
        assert_eq!(chain_hash(&[9; 32], 3, &body), stored.hash);
        assert_eq!(decode_stored_body(3, stored.hash, &body).unwrap(), stored);
        assert!(decode_stored_body(3, stored.hash, &body[..body.len() - 1]).is_err());
    }
}
