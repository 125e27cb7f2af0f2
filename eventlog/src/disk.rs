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

/// Whether `command` brings new work, refused under the floor: a task, a batch of them, steps
/// added to a workflow. Everything else concerns work already in the log.
pub fn brings_new_work(command: &Command) -> bool {
    matches!(command, Command::CreateTask(_) | Command::CreateTasks(_) | Command::AddSteps { .. })
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
}

impl DiskFloor {
    pub(crate) fn new(dir: PathBuf, min_free_bytes: u64) -> DiskFloor {
        DiskFloor { dir, free: free_bytes, min_free_bytes, checked_at: None, low: None }
    }

    #[cfg(test)]
    fn is_low(&self) -> bool {
        self.low.is_some()
    }

    /// `Some(message)` while the free space is under the floor (looked at again at most every
    /// [`DISK_CHECK_INTERVAL`]); logs when that starts and ends, and keeps `stats` current.
    pub(crate) fn refusal(&mut self, stats: &WriterStats) -> Option<String> {
        let now = Instant::now();
        if self.checked_at.is_none_or(|at| now.duration_since(at) >= DISK_CHECK_INTERVAL) {
            self.checked_at = Some(now);
            match (self.free)(&self.dir) {
                Ok(free) => {
                    stats.disk_free_bytes.store(free, Ordering::Relaxed);
                    let resume_at = self.min_free_bytes + self.min_free_bytes / RESUME_MARGIN_DIVISOR;
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
        self.low.map(|free| {
            format!(
                "the data directory's disk has {} MiB free, under the floor of {} MiB (--min-free-disk-mib): no new \
                 tasks or steps are taken, and nothing was recorded; work in flight goes on. Free some space and \
                 retry (new work is taken again by itself)",
                free >> 20,
                self.min_free_bytes >> 20
            )
        })
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
        assert_eq!(floor.refusal(&stats), None);
        assert_eq!(stats.disk_free_bytes.load(Ordering::Relaxed), 500 << 20);

        FREE.store(40 << 20, Ordering::Relaxed);
        // Looked at again only once the interval has passed.
        assert_eq!(floor.refusal(&stats), None);
        floor.checked_at = None;
        let refusal = floor.refusal(&stats).expect("under the floor");
        assert!(refusal.contains("40 MiB free, under the floor of 160 MiB"), "{refusal}");
        assert!(stats.storage_low.load(Ordering::Relaxed) && floor.is_low());

        // Back above the floor but within its margin (1/16: 10 MiB): still refused.
        FREE.store(165 << 20, Ordering::Relaxed);
        floor.checked_at = None;
        assert!(floor.refusal(&stats).is_some(), "a disk hovering at the floor does not flip");
        FREE.store(171 << 20, Ordering::Relaxed);
        floor.checked_at = None;
        assert_eq!(floor.refusal(&stats), None);
        assert!(!stats.storage_low.load(Ordering::Relaxed) && !floor.is_low());
    }

    #[test]
    fn only_new_work_is_refused() {
        use domain::testkit::{claim, complete, job, task_id};
        assert!(brings_new_work(&Command::CreateTask(job(1, "q"))));
        assert!(brings_new_work(&Command::CreateTasks(vec![job(1, "q")])));
        assert!(!brings_new_work(&claim("q", "w", 1)));
        assert!(!brings_new_work(&complete(task_id(1), "run", 1)));
    }

    #[test]
    fn no_floor_never_refuses_and_a_real_disk_has_a_figure() {
        let stats = WriterStats::default();
        let mut floor = DiskFloor::new(PathBuf::from("."), 0);
        assert_eq!(floor.refusal(&stats), None);
        assert!(stats.disk_free_bytes.load(Ordering::Relaxed) > 0, "measured without a floor too");
        assert!(free_bytes(Path::new(".")).unwrap() > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }
}
