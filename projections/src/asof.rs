//! Time travel: materialize the projectors as they were at seq N, or at time
//! T (the last record recorded at or before T), into a scratch SQLite file,
//! so "what did the queue look like at 14:03?" is answered with the same
//! queries as today's queue. Also the offline build the replay tool uses to
//! rebuild a store from a log file.

use std::path::{Path, PathBuf};

use eventlog::LogReader;
use serde::Serialize;

use crate::error::{AsOfError, RuntimeError};
use crate::projectors::ProjectorKind;
use crate::runtime::BULK_BATCH_EVENTS_MAX;
use crate::store::Store;

/// A point in the log's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AsOf {
    /// Right after the record with this seq (0: before the first).
    Seq(u64),
    /// After the last record recorded at or before this time (µs since the epoch).
    TimeUs(i64),
}

/// A materialized past.
#[derive(Debug)]
pub struct Materialized {
    pub store: Store,
    pub path: PathBuf,
    /// The seq the projections stand at.
    pub seq: u64,
}

/// The seq `at` names in this log.
pub fn resolve(reader: &LogReader, at: AsOf) -> Result<u64, AsOfError> {
    let head = reader.head().map_err(RuntimeError::from)?.seq;
    match at {
        AsOf::Seq(seq) if seq > head => Err(AsOfError::PastHead { seq, head }),
        AsOf::Seq(seq) => Ok(seq),
        AsOf::TimeUs(t) => {
            // Timestamps never decrease along the log: binary search for the
            // last seq recorded at or before `t`.
            let (mut lo, mut hi) = (0u64, head);
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                let record = reader.read_range(mid, mid, 1).map_err(RuntimeError::from)?;
                match record.first() {
                    Some(r) if r.recorded_at_us <= t => lo = mid,
                    _ => hi = mid - 1,
                }
            }
            Ok(lo)
        }
    }
}

/// Applies the log up to `to_seq` to `kinds` in `store`, each from its own
/// checkpoint (a fresh store builds from seq 1).
pub async fn build(
    store: &Store,
    reader: &LogReader,
    to_seq: u64,
    kinds: &[ProjectorKind],
) -> Result<(), RuntimeError> {
    crate::runtime::build_live(store, reader, to_seq, kinds, BULK_BATCH_EVENTS_MAX).await
}

/// Materializes every projector at `at` into a new SQLite file at `path`
/// (which must not exist yet).
pub async fn materialize(reader: &LogReader, at: AsOf, path: impl AsRef<Path>) -> Result<Materialized, AsOfError> {
    let path = path.as_ref().to_path_buf();
    if path.exists() {
        return Err(AsOfError::Scratch { path, reason: "it already exists".into() });
    }
    let seq = resolve(reader, at)?;
    let built = async {
        let store = Store::open_sqlite(&path).await?;
        match build(&store, reader, seq, &ProjectorKind::ALL).await {
            Ok(()) => Ok(store),
            Err(error) => {
                store.close().await;
                Err(AsOfError::from(error))
            }
        }
    };
    match built.await {
        Ok(store) => Ok(Materialized { store, path, seq }),
        Err(error) => {
            // No half-built file that looks like the past (a full disk left one with some
            // projectors' checkpoints and empty tables: found by a black-box check).
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut name = path.clone().into_os_string();
                name.push(suffix);
                let _ = std::fs::remove_file(name);
            }
            Err(error)
        }
    }
}
