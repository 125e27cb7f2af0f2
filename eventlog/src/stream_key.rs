//! Stream keys held by value when they are short (a task's stream key is 17 bytes), for the maps
//! keyed by stream that hold an entry per task: the writer's stream heads (a million by default)
//! and `verify`'s stream versions. A `Vec<u8>` key is an allocation of its own, made and freed
//! with each entry, and a pointer to follow on every comparison; in the writer's batch creates
//! the stream-head map's inserts and lookups were a sixth of the writer's time (perf,
//! 2026-12-06). Hashes, compares and orders as the byte slice, so maps are looked up with a
//! record's `&[u8]` directly.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

/// Bytes held inline: the enum is then 24 bytes, a `Vec<u8>`'s size.
const INLINE: usize = 22;

#[derive(Clone, Debug)]
pub(crate) enum StreamKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl StreamKey {
    pub(crate) fn new(stream: &[u8]) -> Self {
        if stream.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..stream.len()].copy_from_slice(stream);
            StreamKey::Inline { len: stream.len() as u8, bytes }
        } else {
            StreamKey::Heap(stream.into())
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            StreamKey::Inline { len, bytes } => &bytes[..*len as usize],
            StreamKey::Heap(bytes) => bytes,
        }
    }
}

impl Borrow<[u8]> for StreamKey {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Hash for StreamKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state)
    }
}

impl PartialEq for StreamKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for StreamKey {}

impl Ord for StreamKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl PartialOrd for StreamKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Short keys are held inline and long ones on the heap, and either is found by its bytes,
    /// so a stream never gets two versions because of how its key was stored.
    #[test]
    fn stream_keys_are_found_by_their_bytes_whatever_their_length() {
        let mut map: HashMap<StreamKey, u64> = HashMap::new();
        let keys: Vec<Vec<u8>> =
            [0, 1, 17, INLINE, INLINE + 1, 1024].iter().map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect()).collect();
        for (i, key) in keys.iter().enumerate() {
            map.insert(StreamKey::new(key), i as u64);
        }
        assert_eq!(map.len(), keys.len());
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(map.get(key.as_slice()), Some(&(i as u64)), "key of {} bytes", key.len());
            assert_eq!(StreamKey::new(key).as_slice(), key.as_slice());
        }
        assert_eq!(map.get(&b"\x00\x00"[..]), None, "a zero-padded inline key is not a longer key");
    }

    #[test]
    fn a_key_is_its_bytes_inline_or_not_and_as_small_as_a_vec() {
        assert_eq!(std::mem::size_of::<StreamKey>(), std::mem::size_of::<Vec<u8>>());
        let task = [b'T'; 17];
        let long = [b'Q'; 65];
        for bytes in [&task[..], &long[..], &[][..], &[7u8; INLINE][..], &[7u8; INLINE + 1][..]] {
            let key = StreamKey::new(bytes);
            assert_eq!(key.as_slice(), bytes);
            assert_eq!(matches!(key, StreamKey::Inline { .. }), bytes.len() <= INLINE);
            let mut map: HashMap<StreamKey, u64> = HashMap::new();
            map.insert(key.clone(), 1);
            assert_eq!(map.get(bytes), Some(&1), "looked up by the slice, it hashes as the slice");
        }
        // Ordered as the bytes, whichever way each is held.
        assert!(StreamKey::new(&[1u8; 30]) < StreamKey::new(&[2u8; 3]));
        assert!(StreamKey::new(&[2u8; 3]) > StreamKey::new(&[1u8; 30]));
        assert!(StreamKey::new(b"Ta") < StreamKey::new(b"Tab"));
    }
}
