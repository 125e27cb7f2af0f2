//! Tasks folded once and kept, so that reading a task with a long history folds only what was
//! appended since it was last read.
//!
//! A task's current view is its fold over its own stream (`commands::current_task`). A step
//! that heartbeats for days has tens of thousands of records, and reading and folding them
//! costs ~0.4 µs each: 17 ms a read at 40,000. Records are never changed once written, so a
//! fold kept at stream version v, with the records after v folded on top, is exactly the fold
//! of the whole stream. Only tasks with at least [`TaskFolds::MIN_RECORDS`] records are kept
//! (a shorter fold costs less than keeping it); the least recently read go first beyond
//! [`TaskFolds::MAX_TASKS`] tasks or [`TaskFolds::MAX_WEIGHT`] bytes (an estimate, see
//! [`FoldedTask::weight`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use domain::{Namespace, TaskId};

use crate::commands::TaskFold;

/// A kept fold: the task's state after its record at `version` (seq `seq`).
pub struct FoldedTask {
    pub fold: TaskFold,
    /// The task's namespace (its first record's, which never changes): who may see it.
    pub namespace: Namespace,
    pub seq: u64,
    pub version: u64,
    /// An estimate of what the fold holds, in bytes: [`TaskFolds::BASE_WEIGHT`], and each
    /// record's payload with [`TaskFolds::RECORD_WEIGHT`] for the structure it may add (a
    /// heartbeat only moves a deadline: nothing). Grows as records are folded on top.
    pub weight: usize,
    /// Set when folding a record failed halfway: the fold is no longer the stream's, and a
    /// reader that was waiting for it must fold the task afresh.
    pub broken: bool,
}

struct Slot {
    folded: Arc<Mutex<FoldedTask>>,
    weight: usize,
    last_read: u64,
}

#[derive(Default)]
struct Slots {
    by_task: HashMap<TaskId, Slot>,
    weight: usize,
    reads: u64,
}

/// The kept folds (see the module docs). Each fold has its own lock: reads of one task wait
/// for each other, reads of different tasks do not.
#[derive(Default)]
pub struct TaskFolds {
    slots: Mutex<Slots>,
}

impl TaskFolds {
    /// Fewest records a task has before its fold is kept.
    pub const MIN_RECORDS: usize = 256;
    /// Most tasks whose folds are kept.
    pub const MAX_TASKS: usize = 1024;
    /// Most bytes the kept folds weigh in all; a fold above a sixteenth of it is not kept.
    pub const MAX_WEIGHT: usize = 64 << 20;
    /// A fold's own weight: its one-task ledger's maps and indexes.
    pub const BASE_WEIGHT: usize = 4096;
    /// What a record other than a heartbeat may add beside its payload: a step, an attempt,
    /// a timer.
    pub const RECORD_WEIGHT: usize = 256;

    fn slots(&self) -> MutexGuard<'_, Slots> {
        // Every change under this lock leaves the map consistent, so a panic elsewhere while
        // it was held cannot have broken it.
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The kept fold of `task`, if any, marked as just read.
    pub fn get(&self, task: TaskId) -> Option<Arc<Mutex<FoldedTask>>> {
        let mut slots = self.slots();
        slots.reads += 1;
        let now = slots.reads;
        let slot = slots.by_task.get_mut(&task)?;
        slot.last_read = now;
        Some(slot.folded.clone())
    }

    /// Keeps `folded` as `task`'s fold, unless it is too heavy, evicting the least recently
    /// read folds beyond the limits.
    pub fn insert(&self, task: TaskId, folded: FoldedTask) {
        let weight = folded.weight;
        if weight > Self::MAX_WEIGHT / 16 {
            return;
        }
        let mut slots = self.slots();
        slots.reads += 1;
        let now = slots.reads;
        let slot = Slot { folded: Arc::new(Mutex::new(folded)), weight, last_read: now };
        if let Some(old) = slots.by_task.insert(task, slot) {
            slots.weight -= old.weight;
        }
        slots.weight += weight;
        Self::evict(&mut slots);
    }

    /// Records that `folded`, `task`'s kept fold, now weighs `weight` (it grew by the records
    /// folded on top), evicting beyond the limits; one grown too heavy is dropped. Nothing
    /// changes when `folded` is no longer the one kept (evicted, and another kept since).
    pub fn reweigh(&self, task: TaskId, folded: &Arc<Mutex<FoldedTask>>, weight: usize) {
        let mut slots = self.slots();
        let Some(slot) = slots.by_task.get_mut(&task).filter(|slot| Arc::ptr_eq(&slot.folded, folded)) else {
            return;
        };
        let old = std::mem::replace(&mut slot.weight, weight);
        slots.weight = slots.weight - old + weight;
        if weight > Self::MAX_WEIGHT / 16 {
            Self::forget_in(&mut slots, task);
        }
        Self::evict(&mut slots);
    }

    /// Drops `folded` if it is still `task`'s kept fold (one whose folding failed halfway).
    pub fn forget(&self, task: TaskId, folded: &Arc<Mutex<FoldedTask>>) {
        let mut slots = self.slots();
        if slots.by_task.get(&task).is_some_and(|slot| Arc::ptr_eq(&slot.folded, folded)) {
            Self::forget_in(&mut slots, task);
        }
    }

    fn forget_in(slots: &mut Slots, task: TaskId) {
        if let Some(old) = slots.by_task.remove(&task) {
            slots.weight -= old.weight;
        }
    }

    fn evict(slots: &mut Slots) {
        while slots.by_task.len() > Self::MAX_TASKS || slots.weight > Self::MAX_WEIGHT {
            // A linear scan: evictions follow inserts, each of which followed a fold of at
            // least `MIN_RECORDS` records, which costs more than scanning `MAX_TASKS` slots.
            let Some(oldest) = slots.by_task.iter().min_by_key(|(_, slot)| slot.last_read).map(|(task, _)| *task)
            else {
                return;
            };
            Self::forget_in(slots, oldest);
        }
    }

    /// How many folds are kept, and their weight in bytes.
    pub fn len_and_weight(&self) -> (usize, usize) {
        let slots = self.slots();
        (slots.by_task.len(), slots.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(task: TaskId, weight: usize) -> FoldedTask {
        let namespace = Namespace::new("ns").expect("a valid namespace");
        FoldedTask { fold: TaskFold::empty(task), namespace, seq: 1, version: 1, weight, broken: false }
    }

    fn task(n: u128) -> TaskId {
        TaskId::from_parts(1_700_000_000_000, n)
    }

    #[test]
    fn the_least_recently_read_fold_goes_first_beyond_the_most_tasks() {
        let folds = TaskFolds::default();
        for n in 0..TaskFolds::MAX_TASKS as u128 {
            folds.insert(task(n), folded(task(n), 10));
        }
        assert!(folds.get(task(0)).is_some(), "read task 0, so task 1 is now the least recently read");
        folds.insert(task(9_999), folded(task(9_999), 10));
        assert_eq!(folds.len_and_weight(), (TaskFolds::MAX_TASKS, TaskFolds::MAX_TASKS * 10));
        assert!(folds.get(task(1)).is_none(), "the least recently read went");
        assert!(folds.get(task(0)).is_some() && folds.get(task(2)).is_some() && folds.get(task(9_999)).is_some());
    }

    #[test]
    fn folds_weigh_at_most_the_limit_and_a_heavy_one_is_not_kept() {
        let folds = TaskFolds::default();
        let heaviest = TaskFolds::MAX_WEIGHT / 16;
        folds.insert(task(1), folded(task(1), heaviest + 1));
        assert_eq!(folds.len_and_weight(), (0, 0), "above a sixteenth of the limit: not kept");
        for n in 0..16 {
            folds.insert(task(n), folded(task(n), heaviest));
        }
        assert_eq!(folds.len_and_weight(), (16, TaskFolds::MAX_WEIGHT));
        folds.insert(task(16), folded(task(16), 1));
        assert_eq!(folds.len_and_weight(), (16, TaskFolds::MAX_WEIGHT - heaviest + 1), "task 0 went to make room");
        assert!(folds.get(task(0)).is_none());

        let sixteen = folds.get(task(16)).unwrap();
        folds.reweigh(task(16), &sixteen, 100);
        assert_eq!(folds.len_and_weight(), (16, TaskFolds::MAX_WEIGHT - heaviest + 100));
        folds.reweigh(task(16), &sixteen, heaviest + 1);
        assert!(folds.get(task(16)).is_none(), "grown above a sixteenth of the limit: dropped");
        assert_eq!(folds.len_and_weight(), (15, TaskFolds::MAX_WEIGHT - heaviest));
        let two = folds.get(task(2)).unwrap();
        folds.forget(task(2), &two);
        assert_eq!(folds.len_and_weight(), (14, TaskFolds::MAX_WEIGHT - 2 * heaviest));
        folds.reweigh(task(2), &two, 5);
        assert_eq!(folds.len_and_weight(), (14, TaskFolds::MAX_WEIGHT - 2 * heaviest), "a forgotten task stays gone");
    }

    /// A reader may hold a fold that was evicted and replaced by another of the same task: what
    /// it does to its own must not touch the one kept now.
    #[test]
    fn a_fold_no_longer_kept_changes_nothing_of_the_one_kept_since() {
        let folds = TaskFolds::default();
        folds.insert(task(1), folded(task(1), 10));
        let old = folds.get(task(1)).unwrap();
        folds.insert(task(1), folded(task(1), 20));
        folds.reweigh(task(1), &old, 1_000);
        assert_eq!(folds.len_and_weight(), (1, 20));
        folds.forget(task(1), &old);
        assert_eq!(folds.len_and_weight(), (1, 20));
        let new = folds.get(task(1)).unwrap();
        folds.forget(task(1), &new);
        assert_eq!(folds.len_and_weight(), (0, 0));
    }
}
