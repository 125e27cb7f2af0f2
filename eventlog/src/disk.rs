//! The free-space floor of the data directory. A disk that fills up under the log fails a
//! commit or a checkpoint halfway, and the writer must then stop until a restart (an fsync is
//! never retried); the SQL projections beside it fail too (SQLite's shared-memory file can even
//! bring the process down with SIGBUS on a full ext4 disk: found by a black-box check). So the
//! ledger stops taking new work earlier, while there is still room to finish what it holds:
//! under `min_free_bytes`, commands that bring new work (tasks, steps) are refused
//! (`WriteError::StorageLow`, HTTP 507 `storage_low`) without writing anything, while the work
//! in flight goes on (claims, heartbeats, outcomes, operator actions, timers: records bounded by
//! the live tasks), so no worker loses its lease to the floor. New work is taken again by itself
//! once the free space is back above the floor and a margin.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use domain::Command;

use crate::writer::WriterStats;

/// About how many bytes of disk a record's bytes become once checkpointed into the log (its
/// indexes, copy-on-write pages: ~2.3×) and projected into SQLite with its WAL (~2.9×), measured
/// on a full ext4 disk with 3 KB payloads.
pub const DISK_BYTES_PER_RECORD_BYTE: u64 = 5;

/// How long appended records count as still owed to the disk: the free space a look sees does
/// not show them until their journal is checkpointed and the projectors have written them (a
/// second or two under load; longer counts them twice, once in the free space seen). Without
/// this, batches accepted between two looks (5 × 3 MB in 0.6 s) filled a disk past a floor sized
/// to hold them (found by a black-box check).
const OWED_WINDOW_S: u64 = 3;

/// Roughly the record bytes `command` would append if it brings new work — a task, a batch of
/// them, steps added to a workflow, refused under the floor — and 0 for anything else (work
/// already in the log): its payloads and a fixed allowance per task and step.
pub fn new_work_bytes(command: &Command) -> u64 {
    let steps =
        |steps: &[domain::StepSpec]| -> u64 { steps.iter().map(|s| 128 + s.payload.as_str().len() as u64).sum() };
    let task = |spec: &domain::TaskSpec| 256 + spec.payload.as_str().len() as u64 + steps(&spec.steps);
    match command {
        Command::CreateTask(spec) => task(spec),
        Command::CreateTasks(specs) => specs.iter().map(task).sum(),
        Command::AddSteps { steps: added, .. } => 128 + steps(added),
        _ => 0,
    }
}

/// Once under the floor, new work is taken again only above it by this share of it (1/16), so
/// that a disk hovering at the floor does not flip at every look (and log each flip).
const RESUME_MARGIN_DIVISOR: u64 = 16;

/// How often the writer looks at the free space (a `statvfs` call), at most.
pub const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Bytes available to the server on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call; `stats` is a plain C
    // struct the call fills in, read only when it succeeds.
    unsafe {
        let mut stats: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stats) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
    }
}

/// The writer's view of the floor: whether commands are refused now.
pub(crate) struct DiskFloor {
    dir: PathBuf,
    /// [`free_bytes`], or a stand-in in tests.
    free: fn(&Path) -> std::io::Result<u64>,
    min_free_bytes: u64,
    checked_at: Option<Instant>,
    /// The free bytes last seen while under the floor.
    low: Option<u64>,
    /// The free bytes at the last look (`u64::MAX` before one succeeded).
    last_free: u64,
    /// Record bytes appended per second over the last `OWED_WINDOW_S` seconds:
    /// `(second since start, bytes)`.
    recent: [(u64, u64); OWED_WINDOW_S as usize],
    started: Instant,
}

impl DiskFloor {
    pub(crate) fn new(dir: PathBuf, min_free_bytes: u64) -> DiskFloor {
        DiskFloor {
            dir,
            free: free_bytes,
            min_free_bytes,
            checked_at: None,
            low: None,
            last_free: u64::MAX,
            recent: [(0, 0); OWED_WINDOW_S as usize],
            started: Instant::now(),
        }
    }

    /// Counts `bytes` of records just appended as owed to the disk for a while.
    pub(crate) fn note_appended(&mut self, bytes: u64) {
        let second = self.started.elapsed().as_secs();
        let slot = &mut self.recent[(second % OWED_WINDOW_S) as usize];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 += bytes;
    }

    fn owed_record_bytes(&self) -> u64 {
        let second = self.started.elapsed().as_secs();
        self.recent.iter().filter(|(at, _)| second.saturating_sub(*at) < OWED_WINDOW_S).map(|(_, bytes)| bytes).sum()
    }

    /// `Err(message)` if new work of about `bytes` of records must be refused: under the floor
    /// (see [`Self::look`]), or because what the disk is still owed for recent records and
    /// this work would take it under the floor once written.
    pub(crate) fn admits(&self, bytes: u64) -> Result<(), String> {
        if let Some(free) = self.low {
            return Err(self.message(free));
        }
        if self.min_free_bytes == 0 || self.last_free == u64::MAX {
            return Ok(());
        }
        let owed = DISK_BYTES_PER_RECORD_BYTE.saturating_mul(self.owed_record_bytes().saturating_add(bytes));
        let after = self.last_free.saturating_sub(owed);
        if after < self.min_free_bytes {
            return Err(format!(
                "the data directory's disk has {} MiB free, and what it is still owed for recent records and this \
                 command (about {} MiB once written) would take it under the floor of {} MiB (--min-free-disk-mib): \
                 no new tasks or steps are taken until that is written, and nothing was recorded; retry",
                self.last_free >> 20,
                owed >> 20,
                self.min_free_bytes >> 20
            ));
        }
        Ok(())
    }

    /// Once under the floor, the free bytes above which new work is taken again.
    fn resume_at(&self) -> u64 {
        self.min_free_bytes.saturating_add(self.min_free_bytes / RESUME_MARGIN_DIVISOR)
    }

    fn message(&self, free: u64) -> String {
        // Between the floor and the point new work is taken again, "under the floor" read as a
        // contradiction (found by a black-box check: "102 MiB free, under the floor of 100 MiB").
        let where_ = if free < self.min_free_bytes {
            format!("under the floor of {} MiB", self.min_free_bytes >> 20)
        } else {
            format!(
                "not yet back above {} MiB (the floor of {} MiB and a sixteenth of it)",
                self.resume_at() >> 20,
                self.min_free_bytes >> 20
            )
        };
        format!(
            "the data directory's disk has {} MiB free, {where_} (--min-free-disk-mib): no new tasks or steps are \
             taken, and nothing was recorded; work in flight goes on. Free some space and retry (new work is taken \
             again by itself)",
            free >> 20,
        )
    }

    #[cfg(test)]
    fn is_low(&self) -> bool {
        self.low.is_some()
    }

    /// Looks at the free space again if [`DISK_CHECK_INTERVAL`] has passed: whether it is under
    /// the floor (see [`Self::admits`]); logs when that starts and ends, and keeps `stats` current.
    pub(crate) fn look(&mut self, stats: &WriterStats) {
        let now = Instant::now();
        if self.checked_at.is_none_or(|at| now.duration_since(at) >= DISK_CHECK_INTERVAL) {
            self.checked_at = Some(now);
            match (self.free)(&self.dir) {
                Ok(free) => {
                    stats.disk_free_bytes.store(free, Ordering::Relaxed);
                    self.last_free = free;
                    let resume_at = self.resume_at();
                    let low = match self.low {
                        None => free < self.min_free_bytes,
                        Some(_) => free < resume_at,
                    };
                    if low && self.low.is_none() {
                        tracing::warn!(
                            free_mib = free >> 20,
                            min_free_mib = self.min_free_bytes >> 20,
                            dir = %self.dir.display(),
                            "the data directory's disk is under its free-space floor: new tasks and steps are refused \
                             (507 storage_low) until space is freed; work in flight goes on"
                        );
                    } else if !low && self.low.is_some() {
                        tracing::info!(
                            free_mib = free >> 20,
                            "free space is back above the floor: new work is taken again"
                        );
                    }
                    self.low = low.then_some(free);
                    stats.storage_low.store(low, Ordering::Relaxed);
                }
                // A file system that cannot say (none here) does not stop the writer.
                Err(error) => tracing::debug!(%error, "statvfs of the data directory failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    static FREE: AtomicU64 = AtomicU64::new(0);

    fn stand_in(_: &Path) -> std::io::Result<u64> {
        Ok(FREE.load(Ordering::Relaxed))
    }

    #[test]
    fn new_work_is_refused_under_the_floor_and_taken_again_above_it_and_a_margin() {
        let stats = WriterStats::default();
        let mut floor = DiskFloor { free: stand_in, ..DiskFloor::new(PathBuf::from("."), 160 << 20) };
        FREE.store(500 << 20, Ordering::Relaxed);
        floor.look(&stats);
        assert_eq!(floor.admits(0), Ok(()));
        assert_eq!(stats.disk_free_bytes.load(Ordering::Relaxed), 500 << 20);

        FREE.store(40 << 20, Ordering::Relaxed);
        // Looked at again only once the interval has passed.
        floor.look(&stats);
        assert_eq!(floor.admits(0), Ok(()));
        floor.checked_at = None;
        floor.look(&stats);
        let refusal = floor.admits(0).expect_err("under the floor");
        assert!(refusal.contains("40 MiB free, under the floor of 160 MiB"), "{refusal}");
        assert!(stats.storage_low.load(Ordering::Relaxed) && floor.is_low());

        // Back above the floor but within its margin (1/16: 10 MiB): still refused.
        FREE.store(165 << 20, Ordering::Relaxed);
        floor.checked_at = None;
        floor.look(&stats);
        let refusal = floor.admits(0).expect_err("a disk hovering at the floor does not flip");
        assert!(refusal.contains("165 MiB free, not yet back above 170 MiB"), "{refusal}");
        FREE.store(171 << 20, Ordering::Relaxed);
        floor.checked_at = None;
        floor.look(&stats);
        assert_eq!(floor.admits(0), Ok(()));
        assert!(!stats.storage_low.load(Ordering::Relaxed) && !floor.is_low());
    }

    /// The largest floor the flag takes, and past it: no overflow (a floor near `u64::MAX`
    /// panicked adding its margin: found by a black-box check).
    #[test]
    fn a_huge_floor_refuses_everything_without_overflowing() {
        let stats = WriterStats::default();
        let mut floor = DiskFloor { free: stand_in, ..DiskFloor::new(PathBuf::from("."), u64::MAX) };
        FREE.store(500 << 20, Ordering::Relaxed);
        floor.look(&stats);
        assert!(floor.admits(0).is_err());
        floor.checked_at = None;
        floor.look(&stats);
        assert!(floor.admits(0).is_err());
    }

    /// Records appended between two looks count as owed to the disk (about five times their
    /// bytes), so a burst of large creates stops short of the floor rather than past it.
    #[test]
    fn new_work_that_would_take_the_disk_under_the_floor_is_refused() {
        let stats = WriterStats::default();
        let mut floor = DiskFloor { free: stand_in_200, ..DiskFloor::new(PathBuf::from("."), 100 << 20) };
        floor.look(&stats);
        assert_eq!(floor.admits(1 << 20), Ok(()));
        floor.note_appended(15 << 20);
        assert_eq!(floor.admits(1 << 20), Ok(()), "200 - 5 × 16 MiB = 120 MiB stays above 100");
        let refused = floor.admits(6 << 20).expect_err("200 - 5 × 21 MiB = 95 MiB");
        assert!(refused.contains("would take it under the floor of 100 MiB"), "{refused}");
        let none = DiskFloor::new(PathBuf::from("."), 0);
        assert_eq!(none.admits(u64::MAX / 8), Ok(()), "no floor");
    }

    fn stand_in_200(_: &Path) -> std::io::Result<u64> {
        Ok(200 << 20)
    }

    #[test]
    fn only_new_work_is_refused() {
        use domain::testkit::{claim, complete, job, task_id};
        let one = new_work_bytes(&Command::CreateTask(job(1, "q")));
        assert!(one > 0);
        assert!(new_work_bytes(&Command::CreateTasks(vec![job(1, "q"), job(2, "q")])) > one);
        assert_eq!(new_work_bytes(&claim("q", "w", 1)), 0);
        assert_eq!(new_work_bytes(&complete(task_id(1), "run", 1)), 0);
    }

    #[test]
    fn no_floor_never_refuses_and_a_real_disk_has_a_figure() {
        let stats = WriterStats::default();
        let mut floor = DiskFloor::new(PathBuf::from("."), 0);
        floor.look(&stats);
        assert_eq!(floor.admits(u64::MAX / 8), Ok(()));
        assert!(stats.disk_free_bytes.load(Ordering::Relaxed) > 0, "measured without a floor too");
        assert!(free_bytes(Path::new(".")).unwrap() > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }
}
