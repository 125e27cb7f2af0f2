//! The write-ahead journal: how an append becomes durable with one small sequential write.
//!
//! A `Durability::Immediate` redb commit writes the dirtied B-tree pages and the header at
//! scattered offsets and fsyncs them; measured here it costs ~1.6 times a plain 256-byte append
//! and `fdatasync`, which capped the writer at ~0.5 times the disk's raw rate. So each batch's
//! records are first written to `<dir>/ledger.journal` as one frame and fsynced, and the redb
//! transaction is then committed without an fsync (`Durability::None`): it is visible to readers
//! at once, and made durable by a later `Immediate` commit — the *checkpoint* — when the journal
//! is full, when the store closes, and after recovery. A crash loses at most the non-durable redb
//! commits, and opening the store appends the journal's records after redb's head again.
//!
//! Why the file is preallocated and overwritten in place: `fdatasync` of a write that grows a
//! file also commits the filesystem's metadata journal, and on ext4 (data=ordered) that commit
//! first writes out every other file's newly allocated dirty blocks — redb's pages among them.
//! Overwriting blocks that already hold zeros changes no metadata, so the sync is one data write
//! and a cache flush — or, with `O_DIRECT | O_DSYNC` where the filesystem allows it, one write
//! that returns when the frame is on the disk. The file grows by zero-filled chunks up to
//! `capacity`, then the checkpoint starts it over.
//!
//! Layout (little-endian):
//! - Bytes 0..4096: two header slots, at 0 and 512 (a slot fits one sector, so a torn header
//!   write leaves the other slot intact). A slot: magic `TLJRNL01`, format version (u32),
//!   generation (u64), base seq (u64), base hash (32), BLAKE3 of those (first 16 bytes). The
//!   valid slot with the highest generation is current; a reset writes the other slot.
//! - From 4096: frames, each starting on a 4096-byte boundary: magic (u32), body length (u32),
//!   first seq (u64), record count (u32), reserved (u32, zero), checksum (16) = BLAKE3 of
//!   generation ‖ first seq ‖ count ‖ body length ‖ body, then the body: per record its length
//!   (u32) and its stored value exactly as in the events table (`hash ‖ body`).
//!
//! Frames of a generation hold consecutive seqs from base + 1. Reading stops at the first frame
//! that is not valid for the current generation (never written, or torn by a crash before its
//! fsync returned, so never acknowledged); if a valid frame with a later seq follows it on a
//! 4096-byte boundary, the damage is in the middle of the journal and opening fails instead of
//! dropping acknowledged records. Frames of earlier generations fail the checksum, which binds
//! the generation; every read-write open and every checkpoint starts a new generation.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::OpenError;
use crate::fault::{FaultHandle, FaultOp, FaultTarget};
use crate::record::Hash;
use crate::store::Head;

/// Name of the journal inside the ledger directory.
pub const JOURNAL_FILE_NAME: &str = "ledger.journal";
/// Frames start on multiples of this; the header block is one of them.
pub const BLOCK_BYTES: u64 = 4096;
/// Smallest journal accepted (the header block and a handful of frames).
pub const JOURNAL_BYTES_MIN: u64 = 64 * 1024;
/// Zeros written ahead of the cursor at a time, so the file grows rarely.
const GROW_BYTES: u64 = 4 * 1024 * 1024;

const HEADER_MAGIC: &[u8; 8] = b"TLJRNL01";
const JOURNAL_FORMAT_VERSION: u32 = 1;
const SLOT_OFFSETS: [u64; 2] = [0, 512];
const SLOT_BYTES: usize = 8 + 4 + 8 + 8 + 32 + 16;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"TLJF");
const FRAME_HEADER_BYTES: usize = 4 + 4 + 8 + 4 + 4 + 16;

/// The journal beside a log file (`ledger.redb` → `ledger.journal`).
pub fn journal_path(log_path: &Path) -> PathBuf {
    log_path.with_file_name(JOURNAL_FILE_NAME)
}

/// The current header: which generation the frames belong to and where they start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    pub generation: u64,
    /// The head the journal's records follow.
    pub base: Head,
    slot: usize,
}

/// What a journal file holds, read without modifying it.
#[derive(Debug)]
pub struct JournalContents {
    pub header: JournalHeader,
    /// `(seq, stored value)` in seq order, consecutive from `header.base.seq + 1`.
    pub records: Vec<(u64, Vec<u8>)>,
    /// File length.
    pub len: u64,
}

fn checksum(parts: &[&[u8]]) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = [0; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

fn encode_slot(generation: u64, base: Head) -> [u8; SLOT_BYTES] {
    let mut slot = [0u8; SLOT_BYTES];
    slot[..8].copy_from_slice(HEADER_MAGIC);
    slot[8..12].copy_from_slice(&JOURNAL_FORMAT_VERSION.to_le_bytes());
    slot[12..20].copy_from_slice(&generation.to_le_bytes());
    slot[20..28].copy_from_slice(&base.seq.to_le_bytes());
    slot[28..60].copy_from_slice(&base.hash);
    let sum = checksum(&[&slot[..60]]);
    slot[60..76].copy_from_slice(&sum);
    slot
}

/// A slot: `Ok(None)` when never written (all zero), an error when damaged.
fn decode_slot(bytes: &[u8]) -> Result<Option<(u64, Head)>, String> {
    if bytes.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    if &bytes[..8] != HEADER_MAGIC {
        return Err("not a taskledger journal header".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if checksum(&[&bytes[..60]]) != bytes[60..76] {
        return Err("header checksum mismatch".into());
    }
    if version != JOURNAL_FORMAT_VERSION {
        return Err(format!("journal format version {version}, this build reads {JOURNAL_FORMAT_VERSION}"));
    }
    let generation = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes"));
    let hash: Hash = bytes[28..60].try_into().expect("32 bytes");
    Ok(Some((generation, Head { seq, hash })))
}

fn journal_error(path: &Path, offset: u64, message: impl Into<String>) -> OpenError {
    OpenError::Journal { path: path.to_path_buf(), offset, message: message.into() }
}

/// Builds one frame from the stored values of a batch.
#[derive(Default)]
pub struct FrameBuilder {
    body: Vec<u8>,
    count: u32,
}

impl FrameBuilder {
    pub fn push(&mut self, value: &[u8]) {
        self.body.extend_from_slice(&u32::try_from(value.len()).expect("records are far below 4 GiB").to_le_bytes());
        self.body.extend_from_slice(value);
        self.count += 1;
    }

    /// Bytes the frame takes in the file, padding included.
    pub fn file_bytes(&self) -> u64 {
        (FRAME_HEADER_BYTES as u64 + self.body.len() as u64).div_ceil(BLOCK_BYTES) * BLOCK_BYTES
    }

    fn encode(&self, generation: u64, first_seq: u64) -> Vec<u8> {
        let body_len = u32::try_from(self.body.len()).expect("a batch is far below 4 GiB");
        let mut frame = Vec::with_capacity(self.file_bytes() as usize);
        frame.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        frame.extend_from_slice(&body_len.to_le_bytes());
        frame.extend_from_slice(&first_seq.to_le_bytes());
        frame.extend_from_slice(&self.count.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        let sum = frame_checksum(generation, first_seq, self.count, body_len, &self.body);
        frame.extend_from_slice(&sum);
        frame.extend_from_slice(&self.body);
        frame.resize(self.file_bytes() as usize, 0);
        frame
    }
}

fn frame_checksum(generation: u64, first_seq: u64, count: u32, body_len: u32, body: &[u8]) -> [u8; 16] {
    checksum(&[
        &generation.to_le_bytes(),
        &first_seq.to_le_bytes(),
        &count.to_le_bytes(),
        &body_len.to_le_bytes(),
        body,
    ])
}

/// A frame valid for `generation` at `offset`: its first seq, its records, and the next offset.
fn read_frame(file: &File, len: u64, offset: u64, generation: u64) -> Option<(u64, Vec<Vec<u8>>, u64)> {
    if offset + FRAME_HEADER_BYTES as u64 > len {
        return None;
    }
    let mut head = [0u8; FRAME_HEADER_BYTES];
    file.read_exact_at(&mut head, offset).ok()?;
    if u32::from_le_bytes(head[..4].try_into().ok()?) != FRAME_MAGIC {
        return None;
    }
    let body_len = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let first_seq = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let count = u32::from_le_bytes(head[16..20].try_into().ok()?);
    if head[20..24] != [0; 4] {
        return None;
    }
    let end = offset + FRAME_HEADER_BYTES as u64 + u64::from(body_len);
    if end > len {
        return None;
    }
    let mut body = vec![0u8; body_len as usize];
    file.read_exact_at(&mut body, offset + FRAME_HEADER_BYTES as u64).ok()?;
    if frame_checksum(generation, first_seq, count, body_len, &body) != head[24..40] {
        return None;
    }
    let mut records = Vec::with_capacity(count as usize);
    let mut rest = body.as_slice();
    for _ in 0..count {
        let value_len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        records.push(rest.get(4..4 + value_len)?.to_vec());
        rest = &rest[4 + value_len..];
    }
    if !rest.is_empty() {
        return None;
    }
    Some((first_seq, records, end.div_ceil(BLOCK_BYTES) * BLOCK_BYTES))
}

/// Reads the journal at `path` without modifying it; `Ok(None)` if there is none (or it was
/// never written).
pub fn read(path: &Path) -> Result<Option<JournalContents>, OpenError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(OpenError::File { path: path.to_path_buf(), source }),
    };
    let len = file.metadata().map_err(|source| OpenError::File { path: path.to_path_buf(), source })?.len();
    if len < BLOCK_BYTES {
        // Created but never given its header block: nothing was ever journaled in it.
        return Ok(None);
    }
    let mut block = vec![0u8; BLOCK_BYTES as usize];
    file.read_exact_at(&mut block, 0).map_err(|source| OpenError::File { path: path.to_path_buf(), source })?;
    let mut current: Option<JournalHeader> = None;
    let mut damaged = Vec::new();
    for (slot, offset) in SLOT_OFFSETS.iter().enumerate() {
        let offset = *offset as usize;
        match decode_slot(&block[offset..offset + SLOT_BYTES]) {
            Ok(Some((generation, base))) => {
                if current.is_none_or(|c| generation > c.generation) {
                    current = Some(JournalHeader { generation, base, slot });
                }
            }
            Ok(None) => {}
            Err(message) => damaged.push((offset as u64, message)),
        }
    }
    let Some(header) = current else {
        return match damaged.into_iter().next() {
            // No slot was ever written: an empty journal.
            None => Ok(None),
            Some((offset, message)) => Err(journal_error(path, offset, message)),
        };
    };
    // A damaged slot may be the newer header (torn, or rotted): harmless if no frame was
    // written under the generation it would have started, fatal if one was.
    if let Some((offset, message)) = damaged.first()
        && read_frame(&file, len, BLOCK_BYTES, header.generation + 1).is_some()
    {
        return Err(journal_error(path, *offset, format!("{message}, and frames were written under it")));
    }
    let mut records = Vec::new();
    let mut next_seq = header.base.seq + 1;
    let mut offset = BLOCK_BYTES;
    while let Some((first_seq, frame, next)) = read_frame(&file, len, offset, header.generation) {
        if first_seq != next_seq {
            break;
        }
        for value in frame {
            records.push((next_seq, value));
            next_seq += 1;
        }
        offset = next;
    }
    // Nothing valid may follow the end: that would be acknowledged records behind damage.
    let mut probe = offset + BLOCK_BYTES;
    while probe < len {
        if let Some((first_seq, _, _)) = read_frame(&file, len, probe, header.generation)
            && first_seq >= next_seq
        {
            return Err(journal_error(
                path,
                offset,
                format!(
                    "the frame at offset {offset} is damaged, yet a later frame (offset {probe}, from seq {first_seq}) \
                     is intact: records from seq {next_seq} would be lost"
                ),
            ));
        }
        probe += BLOCK_BYTES;
    }
    Ok(Some(JournalContents { header, records, len }))
}

/// A reusable buffer whose slice starts on a [`BLOCK_BYTES`] boundary, as `O_DIRECT` needs.
#[derive(Debug, Default)]
struct AlignedBuffer {
    raw: Vec<u8>,
}

impl AlignedBuffer {
    fn holding(&mut self, bytes: &[u8]) -> &[u8] {
        let need = bytes.len() + BLOCK_BYTES as usize;
        if self.raw.len() < need {
            self.raw = vec![0; need];
        }
        let start = self.raw.as_ptr().align_offset(BLOCK_BYTES as usize);
        let slice = &mut self.raw[start..start + bytes.len()];
        slice.copy_from_slice(bytes);
        slice
    }
}

/// The journal a store appends to. Owned by the store's single writer.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// Buffered: the header, the zero fill, reads.
    file: File,
    /// The same file opened `O_DIRECT | O_DSYNC` for frames, when the filesystem allows it:
    /// one write that returns once the frame is on the disk, without a separate flush (~20 %
    /// less than a write and an `fdatasync` here). `None` falls back to write + `fdatasync`.
    direct: Option<File>,
    aligned: AlignedBuffer,
    header: JournalHeader,
    /// Where the next frame goes.
    cursor: u64,
    /// File length (zeros beyond the cursor).
    len: u64,
    capacity: u64,
    /// Whether frames were written since the last reset.
    dirty: bool,
    faults: Option<FaultHandle>,
}

impl Journal {
    /// Opens (or creates) the journal at `path` for appending and starts a new generation after
    /// `base`, the durable head of the log. Whatever the file held before is given up: the
    /// caller has put its records into the log first.
    pub fn start(
        path: &Path,
        capacity: u64,
        previous: Option<JournalHeader>,
        base: Head,
        faults: Option<FaultHandle>,
    ) -> Result<Self, OpenError> {
        let file_error = |source| OpenError::File { path: path.to_path_buf(), source };
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(file_error)?;
        let len = file.metadata().map_err(file_error)?.len();
        // A new generation in the slot the current header is not in.
        let header = JournalHeader {
            generation: previous.map_or(1, |p| p.generation + 1),
            base,
            slot: previous.map_or(0, |p| 1 - p.slot),
        };
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path).ok()
        };
        let mut journal = Self {
            path: path.to_path_buf(),
            file,
            direct,
            aligned: AlignedBuffer::default(),
            header,
            cursor: BLOCK_BYTES,
            len,
            capacity: capacity.max(JOURNAL_BYTES_MIN),
            dirty: false,
            faults,
        };
        journal.ensure_len(BLOCK_BYTES + GROW_BYTES.min(journal.capacity - BLOCK_BYTES)).map_err(file_error)?;
        journal.write_header().map_err(file_error)?;
        if previous.is_none() {
            // A new file: make its directory entry durable too.
            if let Some(dir) = path.parent() {
                File::open(dir).and_then(|d| d.sync_all()).map_err(file_error)?;
            }
        }
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether records were journaled since the last checkpoint.
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// Whether a frame of `frame_bytes` fits before the checkpoint is due.
    pub fn has_room(&self, frame_bytes: u64) -> bool {
        self.cursor + frame_bytes <= self.capacity
    }

    fn check_fault(&self, op: FaultOp) -> io::Result<()> {
        match &self.faults {
            Some(faults) => faults.check_on(op, FaultTarget::Journal),
            None => Ok(()),
        }
    }

    /// Zero-fills the file up to `len` (no further than the capacity).
    fn ensure_len(&mut self, len: u64) -> io::Result<()> {
        let len = len.min(self.capacity);
        if self.len >= len {
            return Ok(());
        }
        self.check_fault(FaultOp::Write)?;
        let zeros = vec![0u8; (1 << 20).min(len - self.len) as usize];
        while self.len < len {
            let n = zeros.len().min((len - self.len) as usize);
            self.file.write_all_at(&zeros[..n], self.len)?;
            self.len += n as u64;
        }
        // Allocated and durable now, so frames written into it change no metadata.
        self.check_fault(FaultOp::SyncData)?;
        self.file.sync_data()
    }

    fn write_header(&mut self) -> io::Result<()> {
        self.check_fault(FaultOp::Write)?;
        let slot = encode_slot(self.header.generation, self.header.base);
        self.file.write_all_at(&slot, SLOT_OFFSETS[self.header.slot])?;
        self.check_fault(FaultOp::SyncData)?;
        self.file.sync_data()
    }

    /// Writes the frame of records `first_seq..` and fsyncs it. The caller checked the room.
    pub fn append(&mut self, frame: &FrameBuilder, first_seq: u64) -> io::Result<()> {
        let bytes = frame.encode(self.header.generation, first_seq);
        let end = self.cursor + bytes.len() as u64;
        if end > self.len {
            self.ensure_len(end.max(self.len + GROW_BYTES))?;
        }
        self.check_fault(FaultOp::Write)?;
        match &self.direct {
            Some(direct) => {
                direct.write_all_at(self.aligned.holding(&bytes), self.cursor)?;
                // The write was durable when it returned; an injected sync failure stands for
                // a device that took the data and then reported an error.
                self.check_fault(FaultOp::SyncData)?;
            }
            None => {
                self.file.write_all_at(&bytes, self.cursor)?;
                self.check_fault(FaultOp::SyncData)?;
                self.file.sync_data()?;
            }
        }
        self.cursor = end;
        self.dirty = true;
        Ok(())
    }

    /// After a checkpoint made the log durable up to `base`: a new, empty generation.
    pub fn reset(&mut self, base: Head) -> io::Result<()> {
        self.header = JournalHeader { generation: self.header.generation + 1, base, slot: 1 - self.header.slot };
        self.write_header()?;
        self.cursor = BLOCK_BYTES;
        self.dirty = false;
        Ok(())
    }
}
