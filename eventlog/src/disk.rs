//! The free-space floor of the data directory. A disk that fills up under the log fails a
//! commit or a checkpoint halfway, and the writer must then stop until a restart (an fsync is
//! never retried); the SQL projections beside it fail too (SQLite's shared-memory file can even
//! bring the process down with SIGBUS on a full ext4 disk: found by a black-box check). So the
//! writer stops taking commands earlier, while there is still room to finish what it holds:
//! below `min_free_bytes` it refuses them (`WriteError::StorageLow`, HTTP 507 `storage_low`)
//! without writing anything, and takes them again by itself once space is freed.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::writer::WriterStats;

/// How long lease expiries wait once commands are taken again: a worker's heartbeats were
/// refused under the floor (with `Retry-After: 30`), and its lease expired the moment writes
/// resumed, before it could retry (found by a black-box check). Other timers fire at once.
pub const LEASE_GRACE_AFTER_FLOOR: Duration = Duration::from_secs(30);

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
    /// When the free space last came back above the floor.
    resumed_at: Option<Instant>,
}

impl DiskFloor {
    pub(crate) fn new(dir: PathBuf, min_free_bytes: u64) -> DiskFloor {
        DiskFloor { dir, free: free_bytes, min_free_bytes, checked_at: None, low: None, resumed_at: None }
    }

    pub(crate) fn is_low(&self) -> bool {
        self.low.is_some()
    }

    /// Whether lease expiries are held back: under the floor, and for
    /// [`LEASE_GRACE_AFTER_FLOOR`] after it.
    pub(crate) fn holding_lease_expiries(&self) -> bool {
        self.is_low() || self.resumed_at.is_some_and(|at| at.elapsed() < LEASE_GRACE_AFTER_FLOOR)
    }

    /// `Some(message)` while the free space is under the floor (looked at again at most every
    /// [`DISK_CHECK_INTERVAL`]); logs when that starts and ends, and keeps `stats` current.
    pub(crate) fn refusal(&mut self, stats: &WriterStats) -> Option<String> {
        if self.min_free_bytes == 0 {
            return None;
        }
        let now = Instant::now();
        if self.checked_at.is_none_or(|at| now.duration_since(at) >= DISK_CHECK_INTERVAL) {
            self.checked_at = Some(now);
            match (self.free)(&self.dir) {
                Ok(free) => {
                    stats.disk_free_bytes.store(free, Ordering::Relaxed);
                    let low = free < self.min_free_bytes;
                    if low && self.low.is_none() {
                        tracing::warn!(
                            free_mib = free >> 20,
                            min_free_mib = self.min_free_bytes >> 20,
                            dir = %self.dir.display(),
                            "the data directory's disk is under its free-space floor: commands are refused \
                             (507 storage_low) until space is freed"
                        );
                    } else if !low && self.low.is_some() {
                        tracing::info!(
                            free_mib = free >> 20,
                            "free space is back above the floor: commands are taken again (lease expiries wait {} s \
                             more, for workers whose heartbeats were refused)",
                            LEASE_GRACE_AFTER_FLOOR.as_secs()
                        );
                        self.resumed_at = Some(now);
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
                "the data directory's disk has {} MiB free, under the floor of {} MiB (--min-free-disk-mib): \
                 nothing was recorded; free some space and retry (writes resume by themselves)",
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
    fn commands_are_refused_under_the_floor_and_taken_again_above_it() {
        let stats = WriterStats::default();
        let mut floor = DiskFloor { free: stand_in, ..DiskFloor::new(PathBuf::from("."), 100 << 20) };
        FREE.store(500 << 20, Ordering::Relaxed);
        assert_eq!(floor.refusal(&stats), None);
        assert_eq!(stats.disk_free_bytes.load(Ordering::Relaxed), 500 << 20);

        FREE.store(40 << 20, Ordering::Relaxed);
        // Looked at again only once the interval has passed.
        assert_eq!(floor.refusal(&stats), None);
        floor.checked_at = None;
        let refusal = floor.refusal(&stats).expect("under the floor");
        assert!(refusal.contains("40 MiB free, under the floor of 100 MiB"), "{refusal}");
        assert!(stats.storage_low.load(Ordering::Relaxed) && floor.is_low());

        FREE.store(101 << 20, Ordering::Relaxed);
        floor.checked_at = None;
        assert_eq!(floor.refusal(&stats), None);
        assert!(!stats.storage_low.load(Ordering::Relaxed) && !floor.is_low());
        assert!(floor.holding_lease_expiries(), "leases get their grace after the floor");
        floor.resumed_at = Some(Instant::now() - LEASE_GRACE_AFTER_FLOOR);
        assert!(!floor.holding_lease_expiries());
    }

    #[test]
    fn no_floor_never_refuses_and_a_real_disk_has_a_figure() {
        let stats = WriterStats::default();
        let mut floor = DiskFloor::new(PathBuf::from("."), 0);
        assert_eq!(floor.refusal(&stats), None);
        assert!(free_bytes(Path::new(".")).unwrap() > 0);
        assert!(free_bytes(Path::new("/no/such/dir")).is_err());
    }
}
