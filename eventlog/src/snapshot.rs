//! Snapshot files: opaque state bodies tagged with the seq and chain hash they were taken at.
//!
//! Snapshots live beside the log in `<dir>/snapshots/snapshot-<seq, 20 digits>.bin`, one
//! checksummed file each, not in redb: they are large, written rarely, written from a thread
//! other than the writer's (so they must not take the single write transaction), and losing one
//! only costs replay time. A file is written to a temporary name, fsynced, renamed and the
//! directory fsynced, so a crash leaves either the old set or the new one. A file that fails
//! any check is reported and skipped, never trusted.
//!
//! Layout (little endian): magic (8) ‖ format version u32 ‖ seq u64 ‖ chain hash (32) ‖
//! body length u64 ‖ BLAKE3(body) (32) ‖ BLAKE3(all previous header bytes) (32) ‖ body.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::SnapshotError;
use crate::record::Hash;
use crate::store::Head;

const MAGIC: &[u8; 8] = b"TLSNAPSH";
/// 2: each step keeps the duration its lease was granted for (`Step::lease_granted_ms`).
const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8 + 32 + 8 + 32 + 32;
/// Largest snapshot body written or read; a header claiming more is corrupt.
pub const SNAPSHOT_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;

/// Header facts of one snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub seq: u64,
    pub chain_hash: Hash,
    pub body_len: u64,
    pub path: PathBuf,
}

/// A loaded, checked snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub info: SnapshotInfo,
    pub body: Vec<u8>,
}

/// One file of the snapshot directory, named for `seq`, with its header checked.
#[derive(Debug)]
pub struct SnapshotEntry {
    /// The seq in the file name.
    pub seq: u64,
    pub path: PathBuf,
    pub header: Result<SnapshotInfo, SnapshotError>,
}

/// The answer of a snapshot lookup: the snapshot chosen, if any, and every newer candidate
/// that was skipped because it failed a check.
#[derive(Debug)]
pub struct SnapshotPick {
    pub snapshot: Option<Snapshot>,
    pub skipped: Vec<SnapshotError>,
}

/// The snapshot directory of one log. Cheap to clone; usable from any thread.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    keep: usize,
    temp_counter: AtomicU64,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { action, path, source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
}

fn file_name(seq: u64) -> String {
    format!("snapshot-{seq:020}.bin")
}

fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("snapshot-")?.strip_suffix(".bin")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn encode_header(at: Head, body: &[u8]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..20].copy_from_slice(&at.seq.to_le_bytes());
    header[20..52].copy_from_slice(&at.hash);
    header[52..60].copy_from_slice(&(body.len() as u64).to_le_bytes());
    header[60..92].copy_from_slice(blake3::hash(body).as_bytes());
    let header_hash = blake3::hash(&header[..92]);
    header[92..124].copy_from_slice(header_hash.as_bytes());
    header
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut buf = [0u8; 8];
    buf.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(buf)
}

/// Checks a header read from `path`; returns its facts and the body hash.
fn decode_header(path: &Path, header: &[u8; HEADER_LEN]) -> Result<(SnapshotInfo, Hash), SnapshotError> {
    if &header[0..8] != MAGIC {
        return Err(corrupt(path, "bad magic"));
    }
    if blake3::hash(&header[..92]).as_bytes() != &header[92..124] {
        return Err(corrupt(path, "header checksum mismatch"));
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&header[8..12]);
    let version = u32::from_le_bytes(version);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::OtherVersion { path: path.to_path_buf(), version, supported: FORMAT_VERSION });
    }
    let body_len = u64_at(header, 52);
    if body_len > SNAPSHOT_BYTES_MAX {
        return Err(corrupt(path, format!("body length {body_len} above the limit")));
    }
    let mut chain_hash = [0u8; 32];
    chain_hash.copy_from_slice(&header[20..52]);
    let mut body_hash = [0u8; 32];
    body_hash.copy_from_slice(&header[60..92]);
    let info = SnapshotInfo { seq: u64_at(header, 12), chain_hash, body_len, path: path.to_path_buf() };
    if parse_file_name(&path.file_name().unwrap_or_default().to_string_lossy()) != Some(info.seq) {
        return Err(corrupt(path, format!("header seq {} does not match the file name", info.seq)));
    }
    Ok((info, body_hash))
}

fn read_header(path: &Path) -> Result<(SnapshotInfo, Hash, File), SnapshotError> {
    let mut file = File::open(path).map_err(io_error("open snapshot", path))?;
    let mut header = [0u8; HEADER_LEN];
    file.read_exact(&mut header).map_err(|error| {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(path, "shorter than its header")
        } else {
            io_error("read snapshot", path)(error)
        }
    })?;
    let (info, body_hash) = decode_header(path, &header)?;
    let file_len = file.metadata().map_err(io_error("stat snapshot", path))?.len();
    if file_len != HEADER_LEN as u64 + info.body_len {
        return Err(corrupt(
            path,
            format!("file is {file_len} bytes, header says {}", HEADER_LEN as u64 + info.body_len),
        ));
    }
    Ok((info, body_hash, file))
}

/// A snapshot file whose header passed its checks, open at the start of its body, for readers
/// that stream the body instead of loading it (`taskledger-replay verify` compares it with a
/// fold as it reads). The body is not checked yet: hash it and compare with `body_hash`.
#[derive(Debug)]
pub struct OpenedSnapshot {
    pub info: SnapshotInfo,
    /// BLAKE3 of the body, as the header records it.
    pub body_hash: Hash,
    /// Positioned at the first body byte; exactly `info.body_len` bytes follow.
    pub file: File,
}

/// Opens one snapshot file and checks its header (not its body).
pub fn open_snapshot(path: &Path) -> Result<OpenedSnapshot, SnapshotError> {
    let (info, body_hash, file) = read_header(path)?;
    Ok(OpenedSnapshot { info, body_hash, file })
}

/// Reads and fully checks one snapshot file.
pub fn load_snapshot(path: &Path) -> Result<Snapshot, SnapshotError> {
    let (info, body_hash, mut file) = read_header(path)?;
    let len = usize::try_from(info.body_len).map_err(|_| corrupt(path, "body too large"))?;
    let mut body = vec![0u8; len];
    file.read_exact(&mut body).map_err(io_error("read snapshot", path))?;
    if blake3::hash(&body).as_bytes() != &body_hash {
        return Err(corrupt(path, "body checksum mismatch"));
    }
    Ok(Snapshot { info, body })
}

impl SnapshotStore {
    /// The snapshot directory `dir` (created on first write), keeping the newest `keep` files
    /// (at least one).
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Self {
        Self { inner: Arc::new(Inner { dir: dir.into(), keep: keep.max(1), temp_counter: AtomicU64::new(0) }) }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Durably writes a snapshot of state as of `at`, then prunes all but the newest files.
    /// A snapshot at the same seq is replaced.
    pub fn write(&self, at: Head, body: &[u8]) -> Result<SnapshotInfo, SnapshotError> {
        if body.len() as u64 > SNAPSHOT_BYTES_MAX {
            return Err(SnapshotError::TooLarge { len: body.len() as u64, max: SNAPSHOT_BYTES_MAX });
        }
        let dir = &self.inner.dir;
        fs::create_dir_all(dir).map_err(io_error("create snapshot directory", dir))?;
        let path = dir.join(file_name(at.seq));
        let temp = dir.join(format!(
            ".{}.{}.{}.tmp",
            file_name(at.seq),
            std::process::id(),
            self.inner.temp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| {
            let mut file = File::create(&temp).map_err(io_error("create snapshot", &temp))?;
            file.write_all(&encode_header(at, body))
                .and_then(|()| file.write_all(body))
                .map_err(io_error("write snapshot", &temp))?;
            file.sync_all().map_err(io_error("fsync snapshot", &temp))?;
            fs::rename(&temp, &path).map_err(io_error("rename snapshot", &path))
        })();
        if let Err(error) = written {
            let _ = fs::remove_file(&temp);
            return Err(error);
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("fsync snapshot directory", dir))?;
        self.prune()?;
        Ok(SnapshotInfo { seq: at.seq, chain_hash: at.hash, body_len: body.len() as u64, path })
    }

    /// Every snapshot file, oldest first, with its header checked (not its body).
    pub fn list(&self) -> Result<Vec<SnapshotEntry>, SnapshotError> {
        let dir = &self.inner.dir;
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_error("list snapshot directory", dir)(error)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("list snapshot directory", dir))?;
            let name = entry.file_name();
            if let Some(seq) = parse_file_name(&name.to_string_lossy()) {
                let path = entry.path();
                let header = read_header(&path).map(|(info, _, _)| info);
                found.push(SnapshotEntry { seq, path, header });
            }
        }
        found.sort_by_key(|entry| entry.seq);
        Ok(found)
    }

    /// The newest snapshot at or below `seq` that is intact and that `accept` agrees with
    /// (the store checks the chain hash against the log there). Everything newer that failed
    /// is reported in [`SnapshotPick::skipped`].
    pub fn latest_at_or_below(&self, seq: u64, mut accept: impl FnMut(&Snapshot) -> bool) -> SnapshotPick {
        let mut skipped = Vec::new();
        let entries = match self.list() {
            Ok(entries) => entries,
            Err(error) => {
                skipped.push(error);
                Vec::new()
            }
        };
        for entry in entries.into_iter().rev().filter(|entry| entry.seq <= seq) {
            match load_snapshot(&entry.path) {
                Ok(snapshot) if accept(&snapshot) => {
                    return SnapshotPick { snapshot: Some(snapshot), skipped };
                }
                Ok(_) => skipped.push(corrupt(&entry.path, "chain hash does not match the log at its seq")),
                Err(error) => skipped.push(error),
            }
        }
        SnapshotPick { snapshot: None, skipped }
    }

    /// Deletes all but the newest `keep` snapshot files and any leftover temporary files.
    fn prune(&self) -> Result<(), SnapshotError> {
        let entries = self.list()?;
        let excess = entries.len().saturating_sub(self.inner.keep);
        for entry in &entries[..excess] {
            fs::remove_file(&entry.path).map_err(io_error("remove old snapshot", &entry.path))?;
        }
        // A crash between writing a temporary file and renaming it leaves the
        // temporary behind. Only the writer's snapshot thread writes here, and
        // it prunes after its own rename, so every temporary now is a leftover.
        let dir = fs::read_dir(self.dir()).map_err(io_error("list snapshots", self.dir()))?;
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".snapshot-") && name.ends_with(".tmp") {
                fs::remove_file(entry.path()).map_err(io_error("remove leftover temporary snapshot", &entry.path()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(seq: u64) -> Head {
        Head { seq, hash: [seq as u8; 32] }
    }

    #[test]
    fn leftover_temporary_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path().join("snapshots"), 1);
        store.write(head(1), b"x").unwrap();
        let leftover = store.dir().join(".snapshot-00000000000000000001.bin.1.0.tmp");
        std::fs::write(&leftover, b"torn").unwrap();
        store.write(head(2), b"y").unwrap();
        assert!(!leftover.exists());
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn write_load_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path().join("snapshots"), 2);
        for seq in [10, 20, 30] {
            store.write(head(seq), &[seq as u8; 100]).unwrap();
        }
        let seqs: Vec<u64> = store.list().unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![20, 30]);
        let pick = store.latest_at_or_below(25, |_| true);
        let snapshot = pick.snapshot.unwrap();
        assert_eq!(snapshot.info.seq, 20);
        assert_eq!(snapshot.info.chain_hash, [20; 32]);
        assert_eq!(snapshot.body, [20u8; 100]);
        assert!(pick.skipped.is_empty());
        assert!(store.latest_at_or_below(19, |_| true).snapshot.is_none());
    }

    #[test]
    fn corrupt_snapshot_is_reported_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path(), 5);
        store.write(head(1), b"old state").unwrap();
        let newest = store.write(head(2), b"new state").unwrap();
        let original = fs::read(&newest.path).unwrap();
        for offset in 0..original.len() {
            let mut bytes = original.clone();
            bytes[offset] ^= 0x40;
            fs::write(&newest.path, &bytes).unwrap();
            let pick = store.latest_at_or_below(u64::MAX, |_| true);
            assert_eq!(pick.snapshot.unwrap().body, b"old state", "flip at {offset}");
            assert_eq!(pick.skipped.len(), 1, "flip at {offset}");
        }
        // Truncation is caught as well.
        fs::write(&newest.path, &original[..original.len() - 1]).unwrap();
        let pick = store.latest_at_or_below(u64::MAX, |_| true);
        assert_eq!(pick.snapshot.unwrap().info.seq, 1);
        // A snapshot the caller rejects (foreign chain hash) is skipped too.
        fs::write(&newest.path, &original).unwrap();
        let pick = store.latest_at_or_below(u64::MAX, |s| s.info.seq != 2);
        assert_eq!(pick.snapshot.unwrap().info.seq, 1);
        assert_eq!(pick.skipped.len(), 1);
    }
}
