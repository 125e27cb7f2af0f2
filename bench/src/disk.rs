//! The disk's own fsync tail, measured in the same run as the workloads.
//!
//! Every acknowledgement waits for an fdatasync, so no acknowledgement
//! percentile can beat the disk's percentile for one small durable append at
//! the same moment. On a shared machine that tail moves from minute to minute
//! (a quiet hour gave p99 well under 1 ms, another 13 ms), so the report
//! prints it beside the latency goals instead of leaving the reader to guess
//! whether a p99 was the server's or the disk's.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::stats::Command;

/// What `probe` measured.
pub struct FsyncTail {
    pub syncs: u64,
    pub latency: Command,
}

/// Appends 256 bytes and fdatasyncs them every `interval` for `seconds`, in a
/// temp file beside the server's data dir (the system temp dir), the way an
/// idle writer commits one small batch at a time.
pub fn probe(seconds: f64, interval: Duration) -> Result<FsyncTail> {
    let mut file = tempfile::NamedTempFile::new().context("create the fsync probe file")?;
    file.write_all(&[0; 4096]).context("write the fsync probe file")?;
    file.as_file().sync_all().context("sync the fsync probe file")?;
    let record = [0x5a_u8; 256];
    let mut latency = Command::default();
    let mut syncs = 0;
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < until {
        file.as_file().write_all_at(&record, 4096 + syncs * 256).context("append to the fsync probe file")?;
        let started = Instant::now();
        file.as_file().sync_data().context("fdatasync the fsync probe file")?;
        latency.record(started.elapsed());
        syncs += 1;
        std::thread::sleep(interval);
    }
    Ok(FsyncTail { syncs, latency })
}
