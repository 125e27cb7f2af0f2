//! A copy-on-write view of a log file: reads come from the file, writes stay in memory.
//!
//! Two things need a log opened read-write without being allowed to change it: redb's
//! integrity check (it rebuilds allocator state as it goes) and reading a log a crashed
//! server left behind (redb repairs it on open). Both used to copy the whole file to a
//! scratch directory first — as much free disk as the log, and seconds of I/O for a large
//! one. [`OverlayBackend`] gives redb the file through a read-only descriptor and keeps
//! every block redb writes in memory, so the file is never written and nothing is copied.
//! What redb writes on such an open is small (the header, the allocator state), so the
//! overlay stays small too.
//!
//! Locks: the overlay is private to this process, so redb has no lock to take on it (the
//! backend reports locking as unsupported, and redb runs it as an exclusive writer). The
//! file itself is held with a shared `flock` for as long as the overlay is open: a server
//! holding the file keeps us out, we keep a server from starting on it while we read, and
//! other readers of the file (a `LogReader` beside us) are not in the way.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::Path;

use parking_lot::RwLock;
use redb::backends::FileBackend;
use redb::{Database, StorageBackend};

use crate::error::OpenError;

/// Granularity of the overlay: a block written in part is first filled from the file.
const BLOCK_BYTES: u64 = 4096;

/// A redb backend over a file that is only ever read; writes land in memory.
#[derive(Debug)]
pub struct OverlayBackend {
    file: FileBackend,
    state: RwLock<Overlay>,
}

struct Overlay {
    /// The length redb sees.
    len: u64,
    /// Bytes of the file still visible: the file's length, lowered by any shrink (bytes
    /// past a shrink read as zeros when the storage grows again).
    file_visible: u64,
    /// Block number → its current bytes, for every block written.
    blocks: BTreeMap<u64, Box<[u8]>>,
}

// By hand: the derived impl would print every byte held.
impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("len", &self.len)
            .field("file_visible", &self.file_visible)
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

impl OverlayBackend {
    /// Opens `path` read-only. The file is never written through this backend.
    /// Fails with `WouldBlock` while another process has the file open for writing. On a
    /// filesystem without `flock` it goes on unlocked, as redb does.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = File::open(path)?;
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the file is open for writing elsewhere (is a server running on it?)",
                ));
            }
            Err(std::fs::TryLockError::Error(error)) if error.kind() == io::ErrorKind::Unsupported => {}
            Err(std::fs::TryLockError::Error(error)) => return Err(error),
        }
        let len = file.metadata()?.len();
        let file = FileBackend::new(file).map_err(io::Error::other)?;
        Ok(Self { file, state: RwLock::new(Overlay { len, file_visible: len, blocks: BTreeMap::new() }) })
    }
}

/// Opens the log at `path` through an overlay, with redb's full integrity check first when
/// `check_integrity`. A log a crash left unclean is repaired, in memory.
pub(crate) fn open_database(path: &Path, cache_bytes: usize, check_integrity: bool) -> Result<Database, OpenError> {
    let backend = OverlayBackend::open(path).map_err(|source| OpenError::File { path: path.to_path_buf(), source })?;
    let mut builder = Database::builder();
    builder.set_cache_size(cache_bytes).set_check_integrity_on_open(check_integrity);
    builder.create_with_backend(backend).map_err(|source| OpenError::Database { path: path.to_path_buf(), source })
}

/// The pieces of `offset..end` that fall in each block: (block, offset within it, length).
fn pieces(offset: u64, end: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let block = at / BLOCK_BYTES;
        let within = at - block * BLOCK_BYTES;
        let take = (BLOCK_BYTES - within).min(end - at);
        at += take;
        Some((block, within as usize, take as usize))
    })
}

impl Overlay {
    /// Fills `out` with the file's bytes at `offset` (zeros past what is visible), ignoring
    /// written blocks.
    fn read_file(&self, file: &FileBackend, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let from_file = self.file_visible.saturating_sub(offset).min(out.len() as u64) as usize;
        if from_file > 0 {
            file.read(offset, &mut out[..from_file])?;
        }
        out[from_file..].fill(0);
        Ok(())
    }

    fn read(&self, file: &FileBackend, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let end = offset.checked_add(out.len() as u64).filter(|end| *end <= self.len).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("read past the end ({} bytes)", self.len))
        })?;
        // Runs of unwritten blocks are read from the file in one call each.
        let mut at = offset;
        while at < end {
            let block = at / BLOCK_BYTES;
            let next_written = self.blocks.range(block..).next().map(|(written, _)| *written);
            if next_written == Some(block) {
                let (_, within, take) = pieces(at, end).next().expect("at < end");
                out[(at - offset) as usize..][..take].copy_from_slice(&self.blocks[&block][within..within + take]);
                at += take as u64;
            } else {
                let run_end = next_written.map_or(end, |written| (written * BLOCK_BYTES).min(end));
                self.read_file(file, at, &mut out[(at - offset) as usize..(run_end - offset) as usize])?;
                at = run_end;
            }
        }
        Ok(())
    }

    /// All or nothing: the blocks a write needs are read in first, so a failed read leaves
    /// the overlay as it was.
    fn write(&mut self, file: &FileBackend, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write past the largest offset"))?;
        let mut fresh = Vec::new();
        for (block, within, take) in pieces(offset, end) {
            if !self.blocks.contains_key(&block) && (within, take) != (0, BLOCK_BYTES as usize) {
                let mut bytes = vec![0u8; BLOCK_BYTES as usize].into_boxed_slice();
                self.read_file(file, block * BLOCK_BYTES, &mut bytes)?;
                fresh.push((block, bytes));
            }
        }
        self.blocks.extend(fresh);
        let mut from = 0;
        for (block, within, take) in pieces(offset, end) {
            let bytes = self.blocks.entry(block).or_insert_with(|| vec![0u8; BLOCK_BYTES as usize].into_boxed_slice());
            bytes[within..within + take].copy_from_slice(&data[from..from + take]);
            from += take;
        }
        self.len = self.len.max(end);
        Ok(())
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            self.file_visible = self.file_visible.min(len);
            // Whole blocks past the end go; the tail of a block cut in two reads as zeros.
            let keep = len.div_ceil(BLOCK_BYTES);
            self.blocks.split_off(&keep);
            if !len.is_multiple_of(BLOCK_BYTES)
                && let Some(bytes) = self.blocks.get_mut(&(len / BLOCK_BYTES))
            {
                bytes[(len % BLOCK_BYTES) as usize..].fill(0);
            }
        }
        self.len = len;
    }
}

impl StorageBackend for OverlayBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.read().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.state.read().read(&self.file, offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.state.write().set_len(len);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.state.write().write(&self.file, offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Write { offset: u64, data: Vec<u8> },
        Read { offset: u64, len: usize },
        SetLen(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..40_000u64, proptest::collection::vec(any::<u8>(), 0..9_000))
                .prop_map(|(offset, data)| Op::Write { offset, data }),
            4 => (0..40_000u64, 0..9_000usize).prop_map(|(offset, len)| Op::Read { offset, len }),
            1 => (0..40_000u64).prop_map(Op::SetLen),
        ]
    }

    #[test]
    fn a_writer_and_an_overlay_keep_each_other_out_and_readers_are_not_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let writer = redb::Database::create(&path).unwrap();
        let refused = OverlayBackend::open(&path).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock, "{refused}");
        drop(writer);

        let overlay = redb::Database::builder().create_with_backend(OverlayBackend::open(&path).unwrap()).unwrap();
        assert!(matches!(redb::Database::create(&path), Err(redb::DatabaseError::DatabaseAlreadyOpen)));
        let reader = redb::Database::builder().open_read_only(&path).unwrap();
        let second = OverlayBackend::open(&path).unwrap();
        drop((overlay, reader, second));
        redb::Database::create(&path).unwrap();
    }

    proptest! {
        /// The overlay reads exactly like a file that took the same writes, and the file
        /// under it is never changed.
        #[test]
        fn reads_like_a_written_file_and_leaves_the_file_alone(
            base_len in 0..20_000usize,
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("base");
            let base: Vec<u8> = (0..base_len).map(|i| (i * 31 % 251) as u8).collect();
            std::fs::write(&path, &base).unwrap();
            let overlay = OverlayBackend::open(&path).unwrap();
            let mut model = base.clone();
            for op in ops {
                match op {
                    Op::Write { offset, data } => {
                        overlay.write(offset, &data).unwrap();
                        // Like pwrite: writing nothing changes nothing, even past the end.
                        if !data.is_empty() {
                            let end = offset as usize + data.len();
                            if model.len() < end {
                                model.resize(end, 0);
                            }
                            model[offset as usize..end].copy_from_slice(&data);
                        }
                    }
                    Op::Read { offset, len } => {
                        let mut out = vec![0xAA; len];
                        let read = overlay.read(offset, &mut out);
                        if offset as usize + len <= model.len() {
                            read.unwrap();
                            prop_assert_eq!(&out[..], &model[offset as usize..offset as usize + len]);
                        } else {
                            prop_assert!(read.is_err());
                        }
                    }
                    Op::SetLen(len) => {
                        overlay.set_len(len).unwrap();
                        model.resize(len as usize, 0);
                    }
                }
                prop_assert_eq!(overlay.len().unwrap(), model.len() as u64);
            }
            prop_assert_eq!(std::fs::read(&path).unwrap(), base);
        }
    }
}
