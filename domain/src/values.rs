//! Validated value types. Every identifier and number that crosses the domain
//! boundary is wrapped in a type whose only constructor checks it, so code
//! further in never has to ask "is this namespace well-formed?" again.
//!
//! Deserialization goes through the same checks (`#[serde(try_from)]`): a
//! value read back from a log or a request is exactly as valid as one built in
//! code.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::rejection::Rejection;

/// Microseconds since the Unix epoch. The domain never reads a clock: every
/// `now` is passed in, and every event that depends on time records it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const fn from_micros(us: i64) -> Self {
        Self(us)
    }
    pub const fn as_micros(self) -> i64 {
        self.0
    }
    /// `self + ms` milliseconds, saturating instead of overflowing.
    pub fn plus_ms(self, ms: u64) -> Self {
        let us = i64::try_from(ms.saturating_mul(1000)).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(us))
    }
    /// Microseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn micros_since(self, earlier: Timestamp) -> u64 {
        u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}us", self.0)
    }
}

/// A task's identity: a UUIDv7 chosen by the caller (so a producer can retry a
/// create without a second round trip, and ids sort by creation time).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "uuid::Uuid", into = "uuid::Uuid")]
pub struct TaskId(uuid::Uuid);

impl TaskId {
    pub fn new(id: uuid::Uuid) -> Result<Self, Rejection> {
        if id.get_version_num() != 7 {
            return Err(Rejection::invalid(
                "task_id",
                format!("task id {id} is not a UUIDv7 (version {})", id.get_version_num()),
            ));
        }
        Ok(Self(id))
    }
    pub fn parse(text: &str) -> Result<Self, Rejection> {
        let id = uuid::Uuid::parse_str(text)
            .map_err(|e| Rejection::invalid("task_id", format!("task id {text:?} is not a UUID: {e}")))?;
        Self::new(id)
    }
    /// Builds a UUIDv7 from a millisecond timestamp and 80 caller-supplied
    /// random bits. The domain has no randomness of its own: tests and the API
    /// pass the bits in.
    pub fn from_parts(unix_ms: u64, random: u128) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
        let rand = random.to_be_bytes();
        bytes[6..].copy_from_slice(&rand[6..]);
        bytes[6] = (bytes[6] & 0x0f) | 0x70;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Self(uuid::Uuid::from_bytes(bytes))
    }
    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl TryFrom<uuid::Uuid> for TaskId {
    type Error = Rejection;
    fn try_from(id: uuid::Uuid) -> Result<Self, Rejection> {
        Self::new(id)
    }
}

impl From<TaskId> for uuid::Uuid {
    fn from(id: TaskId) -> uuid::Uuid {
        id.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", self.0)
    }
}

/// Checks a name against a character class and a length limit, with a message
/// that names the field. Shared by every string value type below.
fn check_name(
    field: &str,
    text: &str,
    max_len: usize,
    allowed: impl Fn(char) -> bool,
    describe: &str,
) -> Result<(), Rejection> {
    if text.is_empty() || text.len() > max_len {
        return Err(Rejection::invalid(
            field,
            format!("{field} must be 1 to {max_len} bytes long, got {}", text.len()),
        ));
    }
    if let Some(bad) = text.chars().find(|c| !allowed(*c)) {
        return Err(Rejection::invalid(field, format!("{field} {text:?} contains {bad:?}; allowed: {describe}")));
    }
    Ok(())
}

/// Most distinct values of one name type a thread remembers for [`name_type!`]'s interning.
const INTERNED_NAMES_MAX: usize = 4096;

/// Declares a string value type backed by `Arc<str>` (cheap to clone: queue
/// and handler names are shared by many steps) with a validating constructor.
///
/// With `intern = true`, decoding (postcard from the log or a snapshot, JSON from a request)
/// shares one `Arc` per distinct value and thread, and checks each distinct value once: folding
/// a million task creations in one namespace then makes no allocation for the namespace, the
/// step or the handler name. Each type has its own table, so a value valid as one type is never
/// taken for another, and the table stops growing at [`INTERNED_NAMES_MAX`] values (later new
/// values are simply allocated), so hostile input cannot grow it.
macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, field = $field:literal, max = $max:expr, allowed = $allowed:expr, describe = $describe:literal, intern = $intern:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            pub const MAX_BYTES: usize = $max;
            pub fn new(text: impl AsRef<str>) -> Result<Self, Rejection> {
                let text = text.as_ref();
                check_name($field, text, $max, $allowed, $describe)?;
                Ok(Self(Arc::from(text)))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
            fn decode(text: &str) -> Result<Self, Rejection> {
                if !$intern {
                    return Self::new(text);
                }
                thread_local!(static SEEN: std::cell::RefCell<std::collections::HashSet<Arc<str>>> = Default::default());
                SEEN.with(|seen| {
                    let mut seen = seen.borrow_mut();
                    if let Some(known) = seen.get(text) {
                        return Ok(Self(known.clone()));
                    }
                    let value = Self::new(text)?;
                    if seen.len() < INTERNED_NAMES_MAX {
                        seen.insert(value.0.clone());
                    }
                    Ok(value)
                })
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Text;
                impl serde::de::Visitor<'_> for Text {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string")
                    }
                    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<$name, E> {
                        $name::decode(text).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Text)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Rejection;
            fn try_from(text: String) -> Result<Self, Rejection> {
                Self::new(text)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
    };
}

fn is_namespace_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
}

fn is_identifier_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')
}

fn is_visible_char(c: char) -> bool {
    !c.is_control()
}

name_type!(
    /// A queue: `[a-z0-9._-]{1,64}`. Tasks live in exactly one namespace; workers
    /// claim from namespaces; pause and concurrency limits are per namespace.
    Namespace, field = "namespace", max = 64, allowed = is_namespace_char,
    describe = "a-z 0-9 . _ -", intern = true
);
name_type!(
    /// A step's name, unique within its task: `[A-Za-z0-9._:/-]{1,64}`.
    StepName, field = "step", max = 64, allowed = is_identifier_char,
    describe = "A-Z a-z 0-9 . _ : / -", intern = true
);
name_type!(
    /// Which worker code runs a step: `[A-Za-z0-9._:/-]{1,128}`.
    HandlerName, field = "handler", max = 128, allowed = is_identifier_char,
    describe = "A-Z a-z 0-9 . _ : / -", intern = true
);
name_type!(
    /// A worker's self-chosen identity, recorded on every lease it takes.
    WorkerId, field = "worker_id", max = 128, allowed = is_identifier_char,
    describe = "A-Z a-z 0-9 . _ : / -", intern = true
);
name_type!(
    /// A free-form label on a task, for filtering.
    Tag, field = "tag", max = 64, allowed = is_visible_char,
    describe = "any non-control character", intern = true
);
name_type!(
    /// A producer's idempotency key: a repeated create with the same key in the
    /// same namespace returns the original task.
    IdempotencyKey, field = "idempotency_key", max = 256, allowed = is_visible_char,
    describe = "any non-control character", intern = false
);

/// Claim priority: higher runs first. Bounded so that aging arithmetic
/// (priority × aging interval) cannot overflow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i32", into = "i32")]
pub struct Priority(i32);

impl Priority {
    pub const MIN: i32 = -1000;
    pub const MAX: i32 = 1000;
    pub fn new(value: i32) -> Result<Self, Rejection> {
        if !(Self::MIN..=Self::MAX).contains(&value) {
            return Err(Rejection::invalid(
                "priority",
                format!("priority must be between {} and {}, got {value}", Self::MIN, Self::MAX),
            ));
        }
        Ok(Self(value))
    }
    pub fn get(self) -> i32 {
        self.0
    }
}

impl TryFrom<i32> for Priority {
    type Error = Rejection;
    fn try_from(value: i32) -> Result<Self, Rejection> {
        Self::new(value)
    }
}

impl From<Priority> for i32 {
    fn from(p: Priority) -> i32 {
        p.0
    }
}

/// The fencing token of a lease. Every claim of a step takes the next epoch;
/// a heartbeat, completion, failure or release must present the current one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseEpoch(pub u32);

impl LeaseEpoch {
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for LeaseEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which attempt of a step is (or was last) running; the first run is 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attempt(pub u32);

/// A step's position in its task (`steps[i]`). Events name steps by index to
/// stay small; commands name them by `StepName`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StepIndex(pub u16);

impl StepIndex {
    pub fn get(self) -> usize {
        usize::from(self.0)
    }
}

/// A JSON document as text (payloads, results). The domain keeps it opaque and
/// bounded; the API checks that it is well-formed JSON at the edge. Kept as
/// text rather than a parsed value because postcard (the log encoding) cannot
/// carry self-describing values, and text is also what goes back on the wire.
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Json(Box<str>);

impl Json {
    /// Largest payload or result accepted, in bytes.
    pub const MAX_BYTES: usize = 64 * 1024;

    pub fn new(field: &str, text: impl Into<Box<str>>) -> Result<Self, Rejection> {
        let text = text.into();
        if text.len() > Self::MAX_BYTES {
            return Err(Rejection::new(
                crate::RejectionCode::PayloadTooLarge,
                Some(field),
                format!("{field} is {} bytes; the limit is {} bytes", text.len(), Self::MAX_BYTES),
            ));
        }
        Ok(Self(text))
    }
    pub fn null() -> Self {
        Self("null".into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Bounded free text (an error message, an operator's note, a reason).
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Text(Box<str>);

impl Text {
    pub const MAX_BYTES: usize = 4096;

    pub fn new(field: &str, text: impl Into<Box<str>>) -> Result<Self, Rejection> {
        let text = text.into();
        if text.len() > Self::MAX_BYTES {
            return Err(Rejection::invalid(
                field,
                format!("{field} is {} bytes; the limit is {} bytes", text.len(), Self::MAX_BYTES),
            ));
        }
        Ok(Self(text))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// Bounded text types check their limit when read back too, without the
/// extra copy a `try_from = "String"` round trip would cost on every encode.
macro_rules! bounded_text_deserialize {
    ($name:ident, $field:literal) => {
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = Box::<str>::deserialize(d)?;
                Self::new($field, text).map_err(serde::de::Error::custom)
            }
        }
    };
}
bounded_text_deserialize!(Json, "payload");
bounded_text_deserialize!(Text, "text");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RejectionCode;

    /// Decoded names share one allocation per distinct value, are still checked (a value valid
    /// for one type is refused by another whose table may hold it), and encode as plain strings.
    #[test]
    fn decoded_names_are_interned_per_type_and_still_checked() {
        let a: HandlerName = serde_json::from_str("\"mail:send\"").unwrap();
        let b: HandlerName = postcard::from_bytes(&postcard::to_stdvec("mail:send").unwrap()).unwrap();
        assert!(Arc::ptr_eq(&a.0, &b.0), "the same handler name decoded twice shares its text");
        let err = serde_json::from_str::<Namespace>("\"mail:send\"").unwrap_err();
        assert!(err.to_string().contains("namespace"), "{err}");
        assert!(serde_json::from_str::<HandlerName>("\"bad name\"").is_err());
        assert!(serde_json::from_str::<HandlerName>("5").unwrap_err().to_string().contains("expected a string"));
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"mail:send\"");
        assert_eq!(postcard::to_stdvec(&a).unwrap(), postcard::to_stdvec("mail:send").unwrap());
        let k1: IdempotencyKey = serde_json::from_str("\"k-1\"").unwrap();
        let k2: IdempotencyKey = serde_json::from_str("\"k-1\"").unwrap();
        assert!(!Arc::ptr_eq(&k1.0, &k2.0), "idempotency keys are one per task: not interned");
        assert_eq!(k1, k2);
    }

    #[test]
    fn namespace_accepts_the_documented_alphabet_only() {
        assert!(Namespace::new("emails.v2_eu-west").is_ok());
        for bad in ["", "Emails", "a b", "ü", &"x".repeat(65)] {
            let err = Namespace::new(bad).unwrap_err();
            assert_eq!(err.code, RejectionCode::InvalidValue, "{bad:?}");
            assert_eq!(err.field.as_deref(), Some("namespace"));
        }
        assert!(Namespace::new("x".repeat(64)).is_ok());
    }

    #[test]
    fn task_id_must_be_uuid_v7() {
        let v7 = TaskId::from_parts(1_700_000_000_000, 0x1234_5678_9abc_def0_1234);
        assert_eq!(v7.as_uuid().get_version_num(), 7);
        assert_eq!(TaskId::parse(&v7.to_string()).unwrap(), v7);
        let v4 = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
        assert_eq!(TaskId::parse(v4).unwrap_err().field.as_deref(), Some("task_id"));
        assert!(TaskId::parse("not-a-uuid").is_err());
    }

    #[test]
    fn deserialization_runs_the_same_checks() {
        let err = serde_json::from_str::<Namespace>("\"UPPER\"").unwrap_err();
        assert!(err.to_string().contains("namespace"), "{err}");
        assert!(serde_json::from_str::<Priority>("5000").is_err());
        assert_eq!(serde_json::from_str::<Priority>("-7").unwrap().get(), -7);
    }

    #[test]
    fn payload_limit_is_explicit() {
        assert!(Json::new("payload", "x".repeat(Json::MAX_BYTES)).is_ok());
        let err = Json::new("payload", "x".repeat(Json::MAX_BYTES + 1)).unwrap_err();
        assert_eq!(err.code, RejectionCode::PayloadTooLarge);
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        assert_eq!(Timestamp(i64::MAX - 1).plus_ms(10), Timestamp(i64::MAX));
        assert_eq!(Timestamp(5).micros_since(Timestamp(10)), 0);
    }
}
