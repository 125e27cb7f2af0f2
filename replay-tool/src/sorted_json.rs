//! An event's `data` JSON written straight into a byte buffer, byte for byte
//! what `eventlog::json::event_data` followed by `serde_json::to_writer`
//! gives, without building a `serde_json::Value` tree: objects with their
//! keys sorted (serde_json's map is a `BTreeMap`), a struct variant's body
//! without its tag, and string fields named `payload` or `result` that hold
//! JSON inlined as values.
//!
//! Why: building, sorting and freeing a `Value` tree per event was about a
//! third of `export-audit`'s time. Here the only allocations are one scratch
//! buffer and one key list per nesting level, reused across events.
//!
//! It is a serde `Serializer`, so it follows every event type's derived
//! `Serialize` as `serde_json::to_value` does; a unit test checks it against
//! `event_data` for every event type.

use serde::ser::{self, Serialize};
use serde_json::Value;

/// Why a value could not be written (only map keys that are not strings or
/// numbers, which no event has).
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
}

/// Scratch space for one nesting level of objects: the fields' encoded
/// values one after another, and (key, start, end) of each.
#[derive(Default)]
struct Level {
    bytes: Vec<u8>,
    fields: Vec<(Key, usize, usize)>,
}

/// A field name: a struct's are static, a map's are owned.
enum Key {
    Static(&'static str),
    Owned(String),
}

impl Key {
    fn as_str(&self) -> &str {
        match self {
            Key::Static(s) => s,
            Key::Owned(s) => s,
        }
    }
}

/// Reusable state: one `Level` per depth of nested objects.
#[derive(Default)]
pub struct Writer {
    levels: Vec<Level>,
}

impl Writer {
    /// Appends the `data` JSON of `event` to `out`.
    pub fn event_data(&mut self, out: &mut Vec<u8>, event: &domain::Event) -> Result<(), Error> {
        if let domain::Event::TaskCreated { spec, at } = event {
            task_created(out, spec, *at);
            return Ok(());
        }
        event.serialize(Ser { out, pool: &mut self.levels, depth: 0, inline_json: false, untag: true })
    }
}

/// `TaskCreated`, the commonest event by far, written field by field in key
/// order (what the serializer below does for it, without the scratch copies).
fn task_created(out: &mut Vec<u8>, spec: &domain::TaskSpec, at: domain::Timestamp) {
    out.extend_from_slice(b"{\"at\":");
    int(out, at.as_micros());
    out.extend_from_slice(b",\"spec\":{\"id\":\"");
    let mut id = [0u8; 36];
    out.extend_from_slice(spec.id.as_uuid().hyphenated().encode_lower(&mut id).as_bytes());
    out.extend_from_slice(b"\",\"idempotency_key\":");
    match &spec.idempotency_key {
        Some(key) => write_str(out, key.as_str()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"name\":");
    write_str(out, &spec.name);
    out.extend_from_slice(b",\"namespace\":");
    write_str(out, spec.namespace.as_str());
    out.extend_from_slice(b",\"payload\":");
    json_text(out, spec.payload.as_str());
    out.extend_from_slice(b",\"priority\":");
    int(out, i64::from(spec.priority.get()));
    out.extend_from_slice(b",\"run_at\":");
    match spec.run_at {
        Some(t) => int(out, t.as_micros()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"steps\":[");
    for (n, step) in spec.steps.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"depends_on\":[");
        for (n, dep) in step.depends_on.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            write_str(out, dep.as_str());
        }
        out.extend_from_slice(b"],\"handler\":");
        write_str(out, step.handler.as_str());
        out.extend_from_slice(b",\"lease_ms\":");
        int(out, step.lease_ms.into());
        out.extend_from_slice(b",\"max_attempts\":");
        int(out, step.max_attempts.into());
        out.extend_from_slice(b",\"name\":");
        write_str(out, step.name.as_str());
        out.extend_from_slice(b",\"payload\":");
        json_text(out, step.payload.as_str());
        let retry = &step.retry;
        out.extend_from_slice(b",\"retry\":{\"base_ms\":");
        uint(out, retry.base_ms, b"");
        out.extend_from_slice(b",\"cap_ms\":");
        uint(out, retry.cap_ms, b"");
        out.extend_from_slice(b",\"jitter_pct\":");
        uint(out, retry.jitter_pct.into(), b"");
        out.extend_from_slice(b",\"multiplier_permille\":");
        uint(out, retry.multiplier_permille.into(), b"}}");
    }
    out.extend_from_slice(b"],\"tags\":[");
    for (n, tag) in spec.tags.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write_str(out, tag.as_str());
    }
    out.extend_from_slice(b"]}}");
}

/// A `payload`/`result` field's JSON text as the value it holds (a string if it is not JSON).
fn json_text(out: &mut Vec<u8>, text: &str) {
    match serde_json::from_str::<Value>(text) {
        Ok(value) => serde_json::to_writer(&mut *out, &value).expect("writing to memory never fails"),
        Err(_) => write_str(out, text),
    }
}

/// `n` in decimal, then `tail`.
pub fn uint(out: &mut Vec<u8>, mut n: u64, tail: &[u8]) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(tail);
}

pub fn int(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    uint(out, n.unsigned_abs(), b"");
}

/// Whether a field of this name holding JSON text is written as the JSON value.
fn inlines(key: &str) -> bool {
    matches!(key, "payload" | "result")
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("writing to memory never fails");
}

struct Ser<'a> {
    out: &'a mut Vec<u8>,
    pool: &'a mut Vec<Level>,
    /// Nesting depth of objects (which `Level` an object at this point uses).
    depth: usize,
    /// This value is a `payload`/`result` field: JSON text becomes a value.
    inline_json: bool,
    /// The outermost enum: a variant's body is written without its tag.
    untag: bool,
}

impl<'a> Ser<'a> {
    fn take_level(pool: &mut Vec<Level>, depth: usize) -> Level {
        if pool.len() <= depth {
            pool.resize_with(depth + 1, Level::default);
        }
        let mut level = std::mem::take(&mut pool[depth]);
        level.bytes.clear();
        level.fields.clear();
        level
    }

    fn object(self) -> Object<'a> {
        let level = Self::take_level(self.pool, self.depth);
        Object { out: self.out, pool: self.pool, depth: self.depth, level, pending_key: None, close_variant: false }
    }

    fn array(self) -> Array<'a> {
        self.out.push(b'[');
        Array { out: self.out, pool: self.pool, depth: self.depth, first: true, close_variant: false }
    }

    /// `{"variant":` before a non-outermost variant's body.
    fn open_variant(&mut self, variant: &str) {
        self.out.push(b'{');
        write_str(self.out, variant);
        self.out.push(b':');
    }

    fn number(self, n: impl itoa_like::Int) -> Result<(), Error> {
        n.write(self.out);
        Ok(())
    }
}

/// Integers written as serde_json writes them.
mod itoa_like {
    pub trait Int {
        fn write(self, out: &mut Vec<u8>);
    }
    macro_rules! int {
        ($($t:ty),*) => {$(
            impl Int for $t {
                fn write(self, out: &mut Vec<u8>) {
                    serde_json::to_writer(&mut *out, &self).expect("writing to memory never fails");
                }
            }
        )*};
    }
    int!(i8, i16, i32, i64, i128, u8, u16, u32, u64, u128);
}

impl<'a> ser::Serializer for Ser<'a> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Array<'a>;
    type SerializeTuple = Array<'a>;
    type SerializeTupleStruct = Array<'a>;
    type SerializeTupleVariant = Array<'a>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Object<'a>;
    type SerializeStructVariant = Object<'a>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.out.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_i128(self, v: i128) -> Result<(), Error> {
        // As `to_value`: through a Number, which holds 64 bits.
        let value = serde_json::to_value(v).map_err(|e| Error(e.to_string()))?;
        serde_json::to_writer(&mut *self.out, &value).map_err(|e| Error(e.to_string()))
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        self.number(v)
    }
    fn serialize_u128(self, v: u128) -> Result<(), Error> {
        let value = serde_json::to_value(v).map_err(|e| Error(e.to_string()))?;
        serde_json::to_writer(&mut *self.out, &value).map_err(|e| Error(e.to_string()))
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        serde_json::to_writer(&mut *self.out, &Value::from(v)).map_err(|e| Error(e.to_string()))
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        serde_json::to_writer(&mut *self.out, &Value::from(v)).map_err(|e| Error(e.to_string()))
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        write_str(self.out, v.encode_utf8(&mut [0; 4]));
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        if self.inline_json
            && let Ok(value) = serde_json::from_str::<Value>(v)
        {
            serde_json::to_writer(&mut *self.out, &value).expect("writing to memory never fails");
            return Ok(());
        }
        write_str(self.out, v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        let mut array = self.array();
        for b in v {
            ser::SerializeSeq::serialize_element(&mut array, b)?;
        }
        ser::SerializeSeq::end(array)
    }
    fn serialize_none(self) -> Result<(), Error> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        self.serialize_none()
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<(), Error> {
        // `to_value` makes a unit variant its name, tagged or not.
        write_str(self.out, variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _name: &'static str, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        mut self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        let untag = self.untag;
        if !untag {
            self.open_variant(variant);
        }
        value.serialize(Ser {
            out: &mut *self.out,
            pool: &mut *self.pool,
            depth: self.depth + usize::from(!untag),
            inline_json: false,
            untag: false,
        })?;
        if !untag {
            self.out.push(b'}');
        }
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Array<'a>, Error> {
        Ok(self.array())
    }
    fn serialize_tuple(self, _len: usize) -> Result<Array<'a>, Error> {
        Ok(self.array())
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Array<'a>, Error> {
        Ok(self.array())
    }
    fn serialize_tuple_variant(
        mut self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Array<'a>, Error> {
        let untag = self.untag;
        if !untag {
            self.open_variant(variant);
            self.depth += 1;
        }
        let mut array = self.array();
        array.close_variant = !untag;
        Ok(array)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Object<'a>, Error> {
        Ok(self.object())
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Object<'a>, Error> {
        Ok(self.object())
    }
    fn serialize_struct_variant(
        mut self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Object<'a>, Error> {
        let untag = self.untag;
        if !untag {
            self.open_variant(variant);
            self.depth += 1;
        }
        let mut object = self.object();
        object.close_variant = !untag;
        Ok(object)
    }
}

pub struct Array<'a> {
    out: &'a mut Vec<u8>,
    pool: &'a mut Vec<Level>,
    depth: usize,
    first: bool,
    /// Also close the `{"variant":` written before the array.
    close_variant: bool,
}

impl Array<'_> {
    fn element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        value.serialize(Ser {
            out: &mut *self.out,
            pool: &mut *self.pool,
            depth: self.depth,
            inline_json: false,
            untag: false,
        })
    }

    fn finish(self) -> Result<(), Error> {
        self.out.push(b']');
        if self.close_variant {
            self.out.push(b'}');
        }
        Ok(())
    }
}

impl ser::SerializeSeq for Array<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTuple for Array<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_element<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for Array<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeTupleVariant for Array<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
        self.element(value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

/// An object being written: its fields are encoded into this depth's
/// scratch level, then copied out in key order.
pub struct Object<'a> {
    out: &'a mut Vec<u8>,
    pool: &'a mut Vec<Level>,
    depth: usize,
    level: Level,
    /// A map's key, between `serialize_key` and `serialize_value`.
    pending_key: Option<String>,
    /// Also close the `{"variant":` written before the object.
    close_variant: bool,
}

impl Object<'_> {
    fn field<T: ?Sized + Serialize>(&mut self, key: Key, value: &T) -> Result<(), Error> {
        let start = self.level.bytes.len();
        let inline_json = inlines(key.as_str());
        value.serialize(Ser {
            out: &mut self.level.bytes,
            pool: &mut *self.pool,
            depth: self.depth + 1,
            inline_json,
            untag: false,
        })?;
        let end = self.level.bytes.len();
        // A repeated key keeps the last value, as a map insert does.
        if let Some(at) = self.level.fields.iter().position(|(k, _, _)| k.as_str() == key.as_str()) {
            self.level.fields[at] = (key, start, end);
        } else {
            self.level.fields.push((key, start, end));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), Error> {
        let Level { bytes, fields } = &mut self.level;
        fields.sort_unstable_by(|(a, _, _), (b, _, _)| a.as_str().cmp(b.as_str()));
        self.out.push(b'{');
        for (n, (key, start, end)) in fields.iter().enumerate() {
            if n > 0 {
                self.out.push(b',');
            }
            write_str(self.out, key.as_str());
            self.out.push(b':');
            self.out.extend_from_slice(&bytes[*start..*end]);
        }
        self.out.push(b'}');
        if self.close_variant {
            self.out.push(b'}');
        }
        // Hand the scratch back for the next object at this depth.
        self.pool[self.depth] = std::mem::take(&mut self.level);
        Ok(())
    }
}

impl ser::SerializeStruct for Object<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        self.field(Key::Static(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeStructVariant for Object<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        self.field(Key::Static(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

impl ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<(), Error> {
        // As `to_value`'s map keys: strings, or numbers and chars written as text.
        match serde_json::to_value(key).map_err(|e| Error(e.to_string()))? {
            Value::String(text) => self.pending_key = Some(text),
            Value::Number(n) => self.pending_key = Some(n.to_string()),
            Value::Bool(b) => self.pending_key = Some(b.to_string()),
            _ => return Err(Error("a map key must be a string".into())),
        }
        Ok(())
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
        let key = self.pending_key.take().ok_or_else(|| Error("a map value without its key".into()))?;
        self.field(Key::Owned(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

#[cfg(test)]
mod tests {
    use domain::testkit::{job, ns, step, task_id, text, worker, workflow};
    use domain::{Attempt, Event, FailOutcome, IdempotencyKey, Json, LeaseEpoch, StepIndex, Tag, Timestamp};

    use super::*;

    /// Every event type, with payloads and results that need sorting,
    /// escaping and inlining (and text that only looks like JSON).
    fn every_event() -> Vec<Event> {
        let at = Timestamp::from_micros(1_795_442_400_000_001);
        let (task, s0) = (task_id(3), StepIndex(0));
        let mut spec = workflow(3, "mail.v2", vec![step("a", "h:1", &[]), step("b", "h/2", &["a"])]);
        spec.payload = Json::new("payload", r#"{"z":[1,{"y":null,"b":"x\"y"}],"a":-1.5e3,"é":"\u0001"}"#).unwrap();
        spec.tags = vec![Tag::new("tag \"q\"").unwrap(), Tag::new("ü").unwrap()];
        spec.idempotency_key = Some(IdempotencyKey::new("k,1").unwrap());
        spec.run_at = Some(Timestamp::from_micros(-5));
        spec.priority = serde_json::from_str("-7").unwrap();
        spec.steps[1].payload = Json::new("payload", "\"just a string\"").unwrap();
        let result = Json::new("result", r#"{"b":2,"a":[true,false]}"#).unwrap();
        let retry = FailOutcome::Retry { retry_at: at, delay_ms: 1500 };
        vec![
            Event::TaskCreated { spec, at },
            Event::TaskCreated { spec: job(4, "q"), at },
            Event::StepClaimed {
                task,
                step: s0,
                worker: worker("w-1"),
                epoch: LeaseEpoch(1),
                attempt: Attempt(1),
                lease_deadline: at,
                at,
            },
            Event::LeaseExtended { task, step: s0, epoch: LeaseEpoch(1), lease_deadline: at, at },
            Event::StepCompleted { task, step: s0, epoch: LeaseEpoch(2), result: result.clone(), at },
            Event::StepFailed {
                task,
                step: s0,
                epoch: LeaseEpoch(1),
                error: text("{\"not\":\"inlined\"}"),
                retryable: true,
                outcome: retry.clone(),
                at,
            },
            Event::StepFailed {
                task,
                step: StepIndex(1),
                epoch: LeaseEpoch(1),
                error: text("boom"),
                retryable: false,
                outcome: FailOutcome::DeadLetter,
                at,
            },
            Event::StepReleased { task, step: s0, epoch: LeaseEpoch(1), at },
            Event::LeaseExpired { task, step: s0, epoch: LeaseEpoch(3), outcome: retry, at },
            Event::StepsAdded { task, by_step: s0, epoch: LeaseEpoch(1), steps: vec![step("c", "h", &["a", "b"])], at },
            Event::StepRetryDue { task, step: s0, at },
            Event::RunAtReached { task, at },
            Event::StepRetried { task, step: s0, reset_attempts: true, at },
            Event::StepResolved { task, step: s0, note: text("by hand"), result: Some(result), at },
            Event::StepResolved { task, step: s0, note: text("n"), result: None, at },
            Event::TaskCancelled { task, reason: Some(text("r")), at },
            Event::TaskGivenUp { task, reason: None, at },
            Event::QueuePaused { namespace: ns("q"), at },
            Event::QueueResumed { namespace: ns("q"), at },
            Event::QueueConcurrencySet { namespace: ns("q"), limit: Some(4), at },
            Event::QueueConcurrencySet { namespace: ns("q"), limit: None, at },
        ]
    }

    #[test]
    fn writes_what_event_data_serializes_to() {
        let mut writer = Writer::default();
        let events = every_event();
        let mut types: Vec<&str> = events.iter().map(Event::type_name).collect();
        types.dedup();
        assert_eq!(types.len(), Event::TYPES.len(), "every event type is covered");
        for event in &events {
            let mut out = Vec::new();
            writer.event_data(&mut out, event).unwrap();
            let expected = serde_json::to_vec(&eventlog::json::event_data(event)).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), String::from_utf8(expected).unwrap(), "{event:?}");
        }
    }
}
