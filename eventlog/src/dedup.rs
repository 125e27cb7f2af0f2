//! The command-id dedup window, kept in memory by the writer.
//!
//! Every record already carries the command id that produced it, so the
//! window does not need a table of its own: it is rebuilt at startup from the
//! last `window_events` records of the log. Keeping it out of redb saves a
//! random-key B-tree insert (and an eviction) per command in every commit —
//! about half the pages each commit used to write.
//!
//! The window is defined in events, so it is the same after a restart as
//! before: a command id is remembered while its last event is among the
//! newest `window_events` records. System (timer) records are not indexed,
//! nor are commands under ids a server minted (`MINTED_COMMAND_ID_PREFIX`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::error::ReadError;
use crate::reader::LogReader;
use crate::writer::SeqRange;

/// Records read per batch while rebuilding.
const REBUILD_BATCH: usize = 8192;
/// Most entries the index reserves room for up front. It reserves room for its whole window
/// (a command writes at least one event, so the window never holds more ids than events): a map
/// that grows rehashes every id at once, and growing past 458,752 ids stalled the writer for
/// 158 ms in the middle of a batch (`taskledger-bench`, half-rate after lifecycle, 2026-12-03),
/// every client waiting behind it. Reserving costs address space, not memory: the buckets are
/// touched as ids arrive (one control byte per bucket up front, 2 MiB for the default window).
/// Windows beyond this bound grow past it as before.
const PRESIZE_ENTRIES_MAX: u64 = 1 << 22;
/// The actor of the ledger's own timer events, which are not deduplicated.
pub const SYSTEM_ACTOR: &str = "system";

/// How the ids a server mints for commands sent without one begin (`srv-` and a random UUID's
/// hex). No client can repeat such a command, so the window keeps none of them: a server whose
/// clients send no ids keeps an empty window, instead of a million ids and their upkeep on
/// every command. The API refuses client ids that begin so.
pub const MINTED_COMMAND_ID_PREFIX: &str = "srv-";

/// Whether `command_id` is one the window keeps: not minted by a server.
pub fn is_deduplicated(command_id: &str) -> bool {
    !command_id.starts_with(MINTED_COMMAND_ID_PREFIX)
}

#[derive(Debug)]
pub struct DedupIndex {
    window_events: u64,
    /// One allocation per id, shared by both maps.
    /// foldhash with a per-process random seed (command ids come from clients).
    by_id: HashMap<Arc<str>, SeqRange, foldhash::fast::RandomState>,
    /// (last seq, command id), oldest first.
    order: VecDeque<(u64, Arc<str>)>,
}

impl DedupIndex {
    pub fn new(window_events: u64) -> Self {
        let window_events = window_events.max(1);
        let presize = window_events.min(PRESIZE_ENTRIES_MAX) as usize;
        Self {
            window_events,
            by_id: HashMap::with_capacity_and_hasher(presize, Default::default()),
            order: VecDeque::with_capacity(presize),
        }
    }

    /// Rebuilds the window from the newest `window_events` records.
    pub fn rebuild(reader: &LogReader, head_seq: u64, window_events: u64) -> Result<Self, ReadError> {
        let mut index = Self::new(window_events);
        let start = head_seq.saturating_sub(index.window_events).max(1);
        let mut next = start;
        let mut first_kept = None;
        while next <= head_seq {
            let records = reader.read_range(next, head_seq, REBUILD_BATCH)?;
            let Some(last) = records.last() else { break };
            next = last.seq + 1;
            for record in records.iter().filter(|r| r.actor != SYSTEM_ACTOR && is_deduplicated(&r.command_id)) {
                first_kept.get_or_insert_with(|| (record.seq, record.command_id.clone()));
                index.extend(&record.command_id, record.seq);
            }
        }
        // A command whose records begin before the window's first seq is kept whole, as the live
        // window keeps every command whose last record is in it: a repeat after a restart gets
        // all its events, not the part inside the window (which a create's repeat took for
        // another command: a 409 for a legitimate retry).
        if let Some((seq, command_id)) = first_kept.filter(|(seq, _)| *seq == start) {
            let first = first_seq_of_command(reader, seq, &command_id)?;
            if let Some(range) = index.by_id.get_mut(command_id.as_str()) {
                range.first = first;
            }
        }
        index.evict(head_seq);
        Ok(index)
    }

    /// The seqs a command id was recorded at, if it is in the window as of `head_seq`. Ids
    /// are evicted only when others are inserted, so an id past the window can still be in the
    /// map (a server whose other commands carry minted ids inserts none): it is answered as
    /// gone, as it is after a restart, whose rebuild keeps only the window.
    pub fn get(&self, command_id: &str, head_seq: u64) -> Option<SeqRange> {
        self.by_id.get(command_id).copied().filter(|range| range.last >= self.oldest_kept(head_seq))
    }

    /// The oldest seq the window holds when the log's head is `head_seq`.
    fn oldest_kept(&self, head_seq: u64) -> u64 {
        head_seq.saturating_sub(self.window_events) + 1
    }

    /// Records that `command_id` wrote `range`, then forgets ids that fell
    /// out of the window as of `head_seq`.
    pub fn insert(&mut self, command_id: &str, range: SeqRange, head_seq: u64) {
        let id: Arc<str> = Arc::from(command_id);
        self.by_id.insert(id.clone(), range);
        self.order.push_back((range.last, id));
        self.evict(head_seq);
    }

    /// A command's events are contiguous, so a record extends the range of
    /// its command id (or starts one).
    fn extend(&mut self, command_id: &str, seq: u64) {
        let id = match self.by_id.get_key_value(command_id) {
            Some((id, _)) => id.clone(),
            None => Arc::from(command_id),
        };
        self.by_id.entry(id.clone()).and_modify(|range| range.last = seq).or_insert(SeqRange { first: seq, last: seq });
        self.order.push_back((seq, id));
    }

    fn evict(&mut self, head_seq: u64) {
        let oldest_kept = self.oldest_kept(head_seq);
        while let Some((last, id)) = self.order.front() {
            if *last >= oldest_kept {
                break;
            }
            // Only forget the id if this entry is its newest one.
            if self.by_id.get(&**id).is_some_and(|r| r.last == *last) {
                self.by_id.remove(&**id);
            }
            self.order.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The first seq of the command `command_id` whose records include `seq` (a command's records
/// are contiguous).
fn first_seq_of_command(reader: &LogReader, seq: u64, command_id: &str) -> Result<u64, ReadError> {
    let mut first = seq;
    while first > 1 {
        let from = first.saturating_sub(REBUILD_BATCH as u64).max(1);
        let records = reader.read_range(from, first - 1, REBUILD_BATCH)?;
        let same = records.iter().rev().take_while(|r| r.command_id == command_id).count();
        first -= same as u64;
        if same == 0 || same < records.len() {
            break;
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_has_room_for_its_whole_window_from_the_start() {
        let index = DedupIndex::new(1_000_000);
        assert!(index.by_id.capacity() >= 1_000_000, "{}", index.by_id.capacity());
        assert!(index.order.capacity() >= 1_000_000, "{}", index.order.capacity());
        // Small windows reserve only what they can hold.
        assert!(DedupIndex::new(10).by_id.capacity() < 1000);
    }

    #[test]
    fn ids_leave_the_window_by_event_count() {
        let mut index = DedupIndex::new(10);
        index.insert("a", SeqRange { first: 1, last: 3 }, 3);
        index.insert("b", SeqRange { first: 4, last: 12 }, 12);
        assert_eq!(index.get("a", 12), Some(SeqRange { first: 1, last: 3 }), "seq 3 is within the last 10 of 12");
        index.insert("c", SeqRange { first: 13, last: 13 }, 13);
        index.insert("d", SeqRange { first: 14, last: 14 }, 14);
        assert_eq!(index.get("a", 14), None);
        assert_eq!(index.get("b", 14), Some(SeqRange { first: 4, last: 12 }));
        assert_eq!(index.len(), 3);
    }

    /// The head moves on without inserts when the other commands carry minted ids (or are
    /// timers): an id past the window is gone all the same, as after a restart's rebuild.
    #[test]
    fn an_id_past_the_window_is_gone_though_nothing_was_inserted_since() {
        let mut index = DedupIndex::new(10);
        index.insert("a", SeqRange { first: 1, last: 3 }, 3);
        assert_eq!(index.get("a", 12), Some(SeqRange { first: 1, last: 3 }));
        assert_eq!(index.get("a", 13), None);
        assert_eq!(index.len(), 1, "still held until an insert evicts it");
    }
}
