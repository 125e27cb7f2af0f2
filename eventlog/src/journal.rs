//! The write-ahead journal: how an append becomes durable with one small sequential write.
//!
//! A `Durability::Immediate` redb commit writes the dirtied B-tree pages and the header at
//! scattered offsets and fsyncs them; measured here it costs ~1.6 times a plain 256-byte append
//! and `fdatasync`, which capped the writer at ~0.5 times the disk's raw rate. So each batch's
//! records are first written to `<dir>/ledger.journal` as one frame and fsynced, and the redb
//! transaction is then committed without an fsync (`Durability::None`): it is visible to readers
//! at once, and made durable by a later `Immediate` commit — the *checkpoint* — when the journal
//! is full, when the store closes, and after recovery. A crash loses at most the non-durable redb
//! commits, and opening the store appends the journal's records after redb's head again. A batch
//! of many records has its frame written through io_uring ([`FrameIo`]) while the writer inserts
//! it into redb, and the redb commit waits for the frame.
//!
//! There are two journals (`ledger.journal`, `ledger.journal.1`), so that a checkpoint need not
//! stop the writer: while it runs, frames go to the other one, started on the head at that moment
//! (see `RedbStore::commit_batch`). A journal is only started over once the checkpoint of its
//! records is durable; recovery reads both and replays them in the order of their base seqs.
//!
//! Why the file is preallocated and overwritten in place: `fdatasync` of a write that grows a
//! file also commits the filesystem's metadata journal, and on ext4 (data=ordered) that commit
//! first writes out every other file's newly allocated dirty blocks — redb's pages among them.
//! Overwriting blocks that already hold zeros changes no metadata, so the sync is one data write
//! and a cache flush — or, with `O_DIRECT | O_DSYNC` where the filesystem allows it, one write
//! that returns when the frame is on the disk. The file is zero-filled to `capacity` when the
//! journal starts (a restarted store finds it full-size already), and a checkpoint starts it over.
//!
//! Layout (little-endian):
//! - Bytes 0..8192: two header slots, one per 4 KiB block (so a torn write of one, even on a
//!   device that rewrites whole 4 KiB blocks, leaves the other intact). A slot: magic
//!   `TLJRNL01`, format version (u32), generation (u64), base seq (u64), base hash (32), frame
//!   key (32, random per generation), BLAKE3 of those (first 16 bytes). The valid slot with the
//!   highest generation is current; a reset writes the other slot.
//! - From 8192: frames, each starting on a 4096-byte boundary: magic (u32), body length (u32),
//!   first seq (u64), record count (u32), reserved (u32, zero), generation (u64), checksum
//!   (16) = BLAKE3 keyed with the generation's frame key over the fields before it and the
//!   body, then the
//!   body: per record its length (u32) and its stored value exactly as in the events table
//!   (`hash ‖ body`). The key is secret to the file: record payloads are client data, and
//!   with an unkeyed checksum a client could plant bytes that read as a valid frame.
//!
//! Frames of a generation hold consecutive seqs from base + 1. Reading stops at the first frame
//! that is not valid for the current generation (never written, or torn by a crash before its
//! fsync returned, so never acknowledged); if a valid frame with a later seq follows it on a
//! 4096-byte boundary, the damage is in the middle of the journal and opening fails instead of
//! dropping acknowledged records. Frames of earlier generations fail the checksum, whose key
//! is the generation's; every read-write open and every checkpoint starts a new generation.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::OpenError;
use crate::fault::{FaultHandle, FaultOp, FaultTarget};
use crate::record::Hash;
use crate::store::Head;

/// Name of the journal inside the ledger directory.
pub const JOURNAL_FILE_NAME: &str = "ledger.journal";
/// Name of the second journal, which takes the frames while a checkpoint of the first runs
/// (and the other way round): see `RedbStore`'s checkpoint.
pub const SECOND_JOURNAL_FILE_NAME: &str = "ledger.journal.1";
/// Frames start on multiples of this.
pub const BLOCK_BYTES: u64 = 4096;
/// Where the first frame starts, after the two header blocks.
pub const FRAMES_START: u64 = 2 * BLOCK_BYTES;
/// Where each header slot is.
pub const SLOT_OFFSETS: [u64; 2] = [0, BLOCK_BYTES];
/// Smallest journal accepted (the header block and a handful of frames).
pub const JOURNAL_BYTES_MIN: u64 = 64 * 1024;

const HEADER_MAGIC: &[u8; 8] = b"TLJRNL01";
const JOURNAL_FORMAT_VERSION: u32 = 1;
/// Bytes of a header slot.
pub const SLOT_BYTES: usize = 8 + 4 + 8 + 8 + 32 + 32 + 16;
const SLOT_CHECKED_BYTES: usize = SLOT_BYTES - 16;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"TLJF");
/// Bytes of a frame's header, before its records.
pub const FRAME_HEADER_BYTES: usize = 4 + 4 + 8 + 4 + 4 + 8 + 16;

/// The journal of a log file: the same name with `.journal` (`ledger.redb` → `ledger.journal`),
/// so a copy such as `backup.redb` in a data dir never picks up the dir's live journal.
pub fn journal_path(log_path: &Path) -> PathBuf {
    log_path.with_extension("journal")
}

/// Both journals of a log file: [`journal_path`] and the same with `.journal.1`.
pub fn journal_paths(log_path: &Path) -> [PathBuf; 2] {
    [journal_path(log_path), log_path.with_extension("journal.1")]
}

/// Reads both journals at `paths` without modifying them, in the order their records follow the
/// log: by base seq (a journal starts a generation on the head at that moment, after everything
/// the other one holds), then generation.
pub fn read_all(paths: &[PathBuf]) -> Result<Vec<(PathBuf, JournalContents)>, OpenError> {
    let mut all = Vec::with_capacity(paths.len());
    for path in paths {
        if let Some(contents) = read(path)? {
            all.push((path.clone(), contents));
        }
    }
    all.sort_by_key(|(_, contents)| (contents.header.base.seq, contents.header.generation));
    Ok(all)
}

/// Whether a journal's loss is refused or accepted when the log file says it was in use (see
/// [`read_kept`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JournalLoss {
    /// Refuse to open ([`OpenError::JournalLost`]): the default.
    #[default]
    Refuse,
    /// Open with what the log file holds, with a warning: the operator's explicit choice
    /// (`--accept-journal-loss`) when the journal cannot be recovered.
    Accept,
}

impl JournalLoss {
    /// [`JournalLoss::Accept`] when the operator said so (`--accept-journal-loss`).
    pub fn accepted_if(accept: bool) -> Self {
        if accept { Self::Accept } else { Self::Refuse }
    }
}

/// Reads both journals at `paths` ([`read_all`]) and checks that they are still there as the
/// last writer left them, when the log file says a writer was using journals of
/// `in_use` bytes and did not close cleanly (`reader::META_JOURNALS_IN_USE`; `None`: it did,
/// and everything is in the log file). A writer starts both before it sets that mark and never
/// shortens them, so each must exist, hold a header and be at least that long; otherwise the
/// records only it held would be lost without a word. Not caught: a journal replaced by an
/// older copy of itself, or wiped after its header (its frames then read as never written).
///
/// Returns what they hold, and the losses accepted (each logged as a warning): empty when
/// nothing is lost.
pub fn read_kept(paths: &[PathBuf], in_use: Option<u64>, loss: JournalLoss) -> Result<ReadKept, OpenError> {
    let found = read_all(paths)?;
    let mut accepted = Vec::new();
    let Some(in_use) = in_use else { return Ok((found, accepted)) };
    for path in paths {
        let contents = found.iter().find(|(found, _)| found == path).map(|(_, contents)| contents);
        let len = contents.map(|c| c.len).or_else(|| std::fs::metadata(path).ok().map(|m| m.len()));
        let problem = match len {
            None => "is missing".to_owned(),
            Some(len) if len < in_use => format!("is {len} bytes, shorter than the {in_use} it was written with"),
            Some(_) if contents.is_none() => "has no header (wiped, or replaced)".to_owned(),
            Some(_) => continue,
        };
        match loss {
            JournalLoss::Refuse => return Err(OpenError::JournalLost { path: path.clone(), problem }),
            JournalLoss::Accept => {
                // What was given up, not the refusal's advice to pass the flag that was passed.
                let lost = format!(
                    "write-ahead journal {} {problem}, though the log file was last written through it and not \
                     closed cleanly: the records acknowledged since the last checkpoint that only it held are lost",
                    path.display()
                );
                tracing::warn!("accepted (--accept-journal-loss): {lost}");
                accepted.push(lost);
            }
        }
    }
    Ok((found, accepted))
}

/// What [`read_kept`] returns: each journal found with its contents, in log order, and the
/// losses accepted.
pub type ReadKept = (Vec<(PathBuf, JournalContents)>, Vec<String>);

/// The current header: which generation the frames belong to and where they start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    pub generation: u64,
    /// The head the journal's records follow.
    pub base: Head,
    /// Keys the frames' checksums (see the module docs).
    key: [u8; 32],
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
    checksum_with(blake3::Hasher::new(), parts)
}

/// The first 16 bytes of `hasher`'s BLAKE3 over `parts`.
fn checksum_with(mut hasher: blake3::Hasher, parts: &[&[u8]]) -> [u8; 16] {
    for part in parts {
        hasher.update(part);
    }
    let mut out = [0; 16];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    out
}

fn encode_slot(header: &JournalHeader) -> [u8; SLOT_BYTES] {
    let mut slot = [0u8; SLOT_BYTES];
    slot[..8].copy_from_slice(HEADER_MAGIC);
    slot[8..12].copy_from_slice(&JOURNAL_FORMAT_VERSION.to_le_bytes());
    slot[12..20].copy_from_slice(&header.generation.to_le_bytes());
    slot[20..28].copy_from_slice(&header.base.seq.to_le_bytes());
    slot[28..60].copy_from_slice(&header.base.hash);
    slot[60..92].copy_from_slice(&header.key);
    let sum = checksum(&[&slot[..SLOT_CHECKED_BYTES]]);
    slot[SLOT_CHECKED_BYTES..].copy_from_slice(&sum);
    slot
}

/// A slot: `Ok(None)` when never written (all zero), an error when damaged.
fn decode_slot(bytes: &[u8], slot: usize) -> Result<Option<JournalHeader>, String> {
    if bytes.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    if &bytes[..8] != HEADER_MAGIC {
        return Err("not a taskledger journal header".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if checksum(&[&bytes[..SLOT_CHECKED_BYTES]]) != bytes[SLOT_CHECKED_BYTES..SLOT_BYTES] {
        return Err("header checksum mismatch".into());
    }
    if version != JOURNAL_FORMAT_VERSION {
        return Err(format!("journal format version {version}, this build reads {JOURNAL_FORMAT_VERSION}"));
    }
    let generation = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes"));
    if generation == u64::MAX || seq == u64::MAX {
        return Err("header generation or base seq out of range".into());
    }
    let hash: Hash = bytes[28..60].try_into().expect("32 bytes");
    let key: [u8; 32] = bytes[60..92].try_into().expect("32 bytes");
    Ok(Some(JournalHeader { generation, base: Head { seq, hash }, key, slot }))
}

/// A fresh frame key: from the kernel's random source, or, where that is unreadable, hashed
/// from the time, the process and an address (unguessable enough for its one purpose).
fn new_key() -> [u8; 32] {
    use std::io::Read;
    let mut key = [0u8; 32];
    if File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key)).is_ok() {
        return key;
    }
    let mut hasher = blake3::Hasher::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    hasher.update(&now.as_nanos().to_le_bytes());
    hasher.update(&std::process::id().to_le_bytes());
    hasher.update(&(&key as *const _ as usize).to_le_bytes());
    *hasher.finalize().as_bytes()
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

    fn encode(&self, generation: u64, key: &[u8; 32], first_seq: u64) -> Vec<u8> {
        let body_len = u32::try_from(self.body.len()).expect("a batch is far below 4 GiB");
        let mut frame = Vec::with_capacity(self.file_bytes() as usize);
        frame.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        frame.extend_from_slice(&body_len.to_le_bytes());
        frame.extend_from_slice(&first_seq.to_le_bytes());
        frame.extend_from_slice(&self.count.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(&generation.to_le_bytes());
        let sum = frame_checksum(key, &frame, &self.body);
        frame.extend_from_slice(&sum);
        frame.extend_from_slice(&self.body);
        frame.resize(self.file_bytes() as usize, 0);
        frame
    }
}

/// The checksum of a frame: keyed, over its header fields (before the checksum) and its body.
fn frame_checksum(key: &[u8; 32], fields: &[u8], body: &[u8]) -> [u8; 16] {
    checksum_with(blake3::Hasher::new_keyed(key), &[&fields[..FRAME_HEADER_BYTES - 16], body])
}

/// The generation a frame at `offset` says it was written under, valid or not (`None`: no
/// frame starts there).
fn frame_generation_at(file: &File, len: u64, offset: u64) -> Option<u64> {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    if offset + FRAME_HEADER_BYTES as u64 > len || file.read_exact_at(&mut head, offset).is_err() {
        return None;
    }
    (u32::from_le_bytes(head[..4].try_into().ok()?) == FRAME_MAGIC)
        .then(|| u64::from_le_bytes(head[24..32].try_into().expect("8 bytes")))
}

/// A frame valid under `key` at `offset`: its first seq, its records, and the next offset.
fn read_frame(file: &File, len: u64, offset: u64, key: &[u8; 32]) -> Option<(u64, Vec<Vec<u8>>, u64)> {
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
    if frame_checksum(key, &head, &body) != head[FRAME_HEADER_BYTES - 16..] {
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
    if len < FRAMES_START {
        // Created but never given its header blocks: nothing was ever journaled in it.
        return Ok(None);
    }
    let mut slots = Vec::with_capacity(2);
    for (slot, offset) in SLOT_OFFSETS.iter().enumerate() {
        let mut bytes = [0u8; SLOT_BYTES];
        file.read_exact_at(&mut bytes, *offset)
            .map_err(|source| OpenError::File { path: path.to_path_buf(), source })?;
        slots.push((*offset, decode_slot(&bytes, slot)));
    }
    let current =
        slots.iter().filter_map(|(_, slot)| slot.as_ref().ok().copied().flatten()).max_by_key(|h| h.generation);
    let damaged: Option<(u64, String)> = slots.iter().find_map(|(offset, slot)| match slot {
        Err(message) => Some((*offset, message.clone())),
        Ok(_) => None,
    });
    // Every header write blanks the first frame block (see `Journal::write_header`), so the
    // frame found there was written under the newest header that was ever written.
    let first_frame_generation = frame_generation_at(&file, len, FRAMES_START);
    let Some(header) = current else {
        return match damaged {
            // No slot was ever written: an empty journal.
            None => Ok(None),
            // The very first header write was torn (the other slot was never written): no
            // frame can follow a header whose write never completed.
            Some(_) if slots.iter().any(|(_, slot)| matches!(slot, Ok(None))) && first_frame_generation.is_none() => {
                Ok(None)
            }
            Some((offset, message)) => Err(journal_error(path, offset, message)),
        };
    };
    // A newer header than the current one was written, and is damaged or wiped: harmless if
    // nothing was journaled under it, fatal if something was (its frames' key was in it).
    if let Some(newer) = first_frame_generation.filter(|g| *g > header.generation) {
        let (offset, message) = damaged.unwrap_or((SLOT_OFFSETS[1 - header.slot], "header slot wiped".to_owned()));
        return Err(journal_error(
            path,
            offset,
            format!("{message}, and frames were written under it (generation {newer})"),
        ));
    }
    let mut records = Vec::new();
    let mut next_seq = header.base.seq + 1;
    let mut offset = FRAMES_START;
    while let Some((first_seq, frame, next)) = read_frame(&file, len, offset, &header.key) {
        if first_seq != next_seq {
            break;
        }
        for value in frame {
            records.push((next_seq, value));
            next_seq = next_seq.checked_add(1).ok_or_else(|| journal_error(path, offset, "seq out of range"))?;
        }
        offset = next;
    }
    // Nothing valid may follow the end: that would be acknowledged records behind damage.
    let mut probe = offset;
    while probe < len {
        if let Some((first_seq, _, _)) = read_frame(&file, len, probe, &header.key)
            && first_seq >= next_seq
            && (probe > offset || first_seq > next_seq)
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
    len: usize,
}

impl AlignedBuffer {
    fn hold(&mut self, bytes: &[u8]) {
        let need = bytes.len() + BLOCK_BYTES as usize;
        if self.raw.len() < need {
            self.raw = vec![0; need];
        }
        self.len = bytes.len();
        let start = self.start();
        self.raw[start..start + bytes.len()].copy_from_slice(bytes);
    }

    fn start(&self) -> usize {
        self.raw.as_ptr().align_offset(BLOCK_BYTES as usize)
    }

    fn held(&self) -> &[u8] {
        let start = self.start();
        &self.raw[start..start + self.len]
    }
}

/// A frame on its way to the disk through [`FrameIo`]: written (and, without `O_DIRECT`,
/// fsynced by a linked `fdatasync`).
#[derive(Debug)]
struct FrameJob {
    file: Arc<File>,
    data: FrameData,
    offset: u64,
    sync: bool,
}

#[derive(Debug)]
enum FrameData {
    /// For the `O_DIRECT` file; the buffer comes back to be reused.
    Aligned(AlignedBuffer),
    Plain(Vec<u8>),
}

impl FrameData {
    fn bytes(&self) -> &[u8] {
        match self {
            FrameData::Aligned(buffer) => buffer.held(),
            FrameData::Plain(bytes) => bytes,
        }
    }
}

/// Writes journal frames through an io_uring, so that the writer can insert a batch into redb
/// while its frame is on the way to the disk (`RedbStore::commit_batch`) instead of one after
/// the other. At 64 submitters a batch of ~33 records spent ~70 µs encoding and inserting and
/// ~105 µs in the frame's write, one after the other (2026-12-04). One frame is in flight at a
/// time; submitting and waiting are the writer's own system calls. (A thread of our own that
/// wrote the frames was tried first: waking it and being woken by it on two busy cores cost what
/// the overlap saved.)
pub struct FrameIo {
    ring: io_uring::IoUring,
    /// The frame being written: its buffer must live until the kernel is done with it.
    in_flight: Option<FrameJob>,
    /// Frames written through the ring.
    written: u64,
}

impl std::fmt::Debug for FrameIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameIo").field("in_flight", &self.in_flight.is_some()).finish_non_exhaustive()
    }
}

/// What a frame's write came to, from its completions: `written`, the write's result (bytes or
/// `-errno`), and `synced`, the linked fsync's (`None` when none was linked) for a frame of
/// `len` bytes. A short write breaks the link, so its fsync is cancelled (`-ECANCELED`) without
/// running: `finish(from)` writes the rest and syncs it itself, and that sync stands for the
/// cancelled one. (The cancelled fsync was taken for a failure, and a durable frame stopped the
/// writer: found by a review.)
fn frame_outcome(
    written: i32,
    synced: Option<i32>,
    len: usize,
    finish: impl FnOnce(usize) -> io::Result<()>,
) -> io::Result<()> {
    match written {
        n if n < 0 => Err(io::Error::from_raw_os_error(-n)),
        n if (n as usize) < len => finish(n as usize),
        _ => match synced {
            Some(n) if n < 0 => Err(io::Error::from_raw_os_error(-n)),
            _ => Ok(()),
        },
    }
}

/// `user_data` of a frame's write and of its fsync.
const WRITE_TAG: u64 = 1;
const SYNC_TAG: u64 = 2;

impl FrameIo {
    pub fn start() -> io::Result<Self> {
        Ok(Self { ring: io_uring::IoUring::new(4)?, in_flight: None, written: 0 })
    }

    /// Frames written through the ring so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn send(&mut self, job: FrameJob) -> io::Result<()> {
        use io_uring::{opcode, squeue, types};
        use std::os::fd::AsRawFd;
        if self.in_flight.is_some() {
            return Err(io::Error::other("a journal frame is already in flight"));
        }
        let fd = types::Fd(job.file.as_raw_fd());
        let bytes = job.data.bytes();
        let len = u32::try_from(bytes.len()).map_err(|_| io::Error::other("journal frame over 4 GiB"))?;
        let write = opcode::Write::new(fd, bytes.as_ptr(), len).offset(job.offset).build().user_data(WRITE_TAG);
        let mut submission = self.ring.submission();
        // SAFETY: the buffer and the file live in `self.in_flight` until `wait` has both
        // completions (or `drop` waited for them).
        unsafe {
            if job.sync {
                submission.push(&write.flags(squeue::Flags::IO_LINK)).map_err(|_| io::Error::other("ring full"))?;
                let sync = opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(SYNC_TAG);
                submission.push(&sync).map_err(|_| io::Error::other("ring full"))?;
            } else {
                submission.push(&write).map_err(|_| io::Error::other("ring full"))?;
            }
        }
        drop(submission);
        self.in_flight = Some(job);
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    // Nothing may be in flight; but be sure before the buffer can go.
                    let _ = self.wait();
                    return Err(error);
                }
            }
        }
    }

    fn wait(&mut self) -> io::Result<(FrameData, io::Result<()>)> {
        let job = self.in_flight.take().ok_or_else(|| io::Error::other("no journal frame in flight"))?;
        let mut written: Option<i32> = None;
        let mut synced: Option<i32> = None;
        while written.is_none() || (job.sync && synced.is_none()) {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.in_flight = Some(job);
                    return Err(error);
                }
            }
            for cqe in self.ring.completion() {
                match cqe.user_data() {
                    WRITE_TAG => written = Some(cqe.result()),
                    SYNC_TAG => synced = Some(cqe.result()),
                    _ => {}
                }
            }
        }
        let bytes = job.data.bytes();
        let result = frame_outcome(written.expect("waited for"), synced, bytes.len(), |from| {
            job.file.write_all_at(&bytes[from..], job.offset + from as u64).and_then(|()| job.file.sync_data())
        });
        if result.is_ok() {
            self.written += 1;
        }
        Ok((job.data, result))
    }
}

impl Drop for FrameIo {
    fn drop(&mut self) {
        if self.in_flight.is_some() {
            let _ = self.wait();
        }
    }
}

/// A frame [`Journal::begin_append`] sent to the disk; [`Journal::finish_append`] waits for it.
#[must_use = "a frame in flight must be waited for before the journal is used again"]
#[derive(Debug)]
pub struct FrameInFlight {
    end: u64,
}

/// The journal a store appends to. Owned by the store's single writer.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// Buffered: the header, the zero fill, reads.
    file: Arc<File>,
    /// The same file opened `O_DIRECT | O_DSYNC` for frames, when the filesystem allows it:
    /// one write that returns once the frame is on the disk, without a separate flush (~20 %
    /// less than a write and an `fdatasync` here). `None` falls back to write + `fdatasync`.
    direct: Option<Arc<File>>,
    /// `None` while a frame in it is in flight.
    aligned: Option<AlignedBuffer>,
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
    /// `base`, the durable head of the log, numbered above `previous` and `generation_floor`
    /// (the other journal's). Whatever the file held before is given up: the caller has put its
    /// records into the log first.
    pub fn start(
        path: &Path,
        capacity: u64,
        previous: Option<JournalHeader>,
        generation_floor: u64,
        base: Head,
        faults: Option<FaultHandle>,
    ) -> Result<Self, OpenError> {
        let file_error = |source| OpenError::File { path: path.to_path_buf(), source };
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(file_error)?;
        let len = file.metadata().map_err(file_error)?.len();
        // A new generation in the slot the current header is not in.
        let header = JournalHeader {
            generation: previous.map_or(0, |p| p.generation).max(generation_floor) + 1,
            base,
            key: new_key(),
            slot: previous.map_or(0, |p| 1 - p.slot),
        };
        let direct = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path).ok().map(Arc::new)
        };
        let mut journal = Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
            direct,
            aligned: Some(AlignedBuffer::default()),
            header,
            cursor: FRAMES_START,
            len,
            capacity: capacity.max(JOURNAL_BYTES_MIN),
            dirty: false,
            faults,
        };
        // All of it at once: growing while frames arrive would stall the append that grows it
        // (a 4 MiB zero fill and its fsync, measured at 10-25 ms).
        journal.ensure_len(journal.capacity).map_err(file_error)?;
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

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.header.generation
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

    /// Writes the header into its slot, then blanks the first frame block, each synced. Every
    /// earlier frame is in the log by now. In this order a crash between the two leaves the new
    /// header over frames of the old generation, whose checksums fail under its key: an empty
    /// journal. The other order left the old header over a blank block and intact later
    /// frames, which reads as damage followed by acknowledged records, and no start would open
    /// it (found by review). The blank tells a reader that finds a newer slot damaged that
    /// nothing was journaled under it.
    fn write_header(&mut self) -> io::Result<()> {
        self.check_fault(FaultOp::Write)?;
        self.file.write_all_at(&encode_slot(&self.header), SLOT_OFFSETS[self.header.slot])?;
        self.check_fault(FaultOp::SyncData)?;
        self.file.sync_data()?;
        self.check_fault(FaultOp::Write)?;
        self.file.write_all_at(&[0u8; BLOCK_BYTES as usize], FRAMES_START)?;
        self.check_fault(FaultOp::SyncData)?;
        self.file.sync_data()
    }

    /// Writes the frame of records `first_seq..` and fsyncs it, on the calling thread. The
    /// caller checked the room.
    pub fn append(&mut self, frame: &FrameBuilder, first_seq: u64) -> io::Result<()> {
        let (bytes, end) = self.frame_bytes(frame, first_seq)?;
        let direct = match (&self.direct, self.aligned.as_mut()) {
            (Some(direct), Some(aligned)) => {
                aligned.hold(&bytes);
                match direct.write_all_at(aligned.held(), self.cursor) {
                    Ok(()) => true,
                    // The filesystem took the open but not this write's alignment: buffered from now on.
                    Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct = None;
                        false
                    }
                    Err(error) => return Err(error),
                }
            }
            _ => false,
        };
        if direct {
            // The write was durable when it returned; an injected sync failure stands for a
            // device that took the data and then reported an error.
            self.check_fault(FaultOp::SyncData)?;
        } else {
            self.file.write_all_at(&bytes, self.cursor)?;
            self.check_fault(FaultOp::SyncData)?;
            self.file.sync_data()?;
        }
        self.cursor = end;
        self.dirty = true;
        Ok(())
    }

    /// The frame's bytes and where it ends, with room made and the write fault checked: what
    /// both ways of appending do first.
    fn frame_bytes(&mut self, frame: &FrameBuilder, first_seq: u64) -> io::Result<(Vec<u8>, u64)> {
        let bytes = frame.encode(self.header.generation, &self.header.key, first_seq);
        let end = self.cursor + bytes.len() as u64;
        if end > self.len {
            // Only a file shortened under the store gets here: `start` filled it to capacity.
            self.ensure_len(end)?;
        }
        self.check_fault(FaultOp::Write)?;
        Ok((bytes, end))
    }

    /// Like [`Journal::append`], but returns once the frame is submitted to `io`;
    /// [`Journal::finish_append`] waits until it is durable. Nothing else may be done with
    /// this journal, or with `io`, in between. The caller checked the room.
    pub fn begin_append(
        &mut self,
        io: &mut FrameIo,
        frame: &FrameBuilder,
        first_seq: u64,
    ) -> io::Result<FrameInFlight> {
        let (bytes, end) = self.frame_bytes(frame, first_seq)?;
        let job = match (&self.direct, self.aligned.take()) {
            (Some(direct), Some(mut aligned)) => {
                aligned.hold(&bytes);
                FrameJob { file: direct.clone(), data: FrameData::Aligned(aligned), offset: self.cursor, sync: false }
            }
            (_, aligned) => {
                self.aligned = aligned;
                FrameJob { file: self.file.clone(), data: FrameData::Plain(bytes), offset: self.cursor, sync: true }
            }
        };
        io.send(job)?;
        Ok(FrameInFlight { end })
    }

    /// Waits for the frame [`Journal::begin_append`] sent: returns once it is durable, or with
    /// the error its write or fsync met.
    pub fn finish_append(&mut self, io: &mut FrameIo, in_flight: FrameInFlight) -> io::Result<()> {
        let (data, mut result) = io.wait()?;
        if let FrameData::Aligned(aligned) = data {
            if matches!(&result, Err(error) if error.raw_os_error() == Some(libc::EINVAL)) {
                // The filesystem took the open but not this write's alignment: buffered from now on.
                self.direct = None;
                result = self.file.write_all_at(aligned.held(), self.cursor).and_then(|()| self.file.sync_data());
            }
            self.aligned = Some(aligned);
        }
        result?;
        // An injected sync failure stands for a device that took the data and then reported an
        // error (the frame may be on the disk).
        self.check_fault(FaultOp::SyncData)?;
        self.cursor = in_flight.end;
        self.dirty = true;
        Ok(())
    }

    /// A new, empty generation after `base`, numbered above `generation_floor` too: after a
    /// checkpoint made the log durable up to `base`, or, for the journal that takes the frames
    /// while the other one's checkpoint runs, on the head at that moment.
    pub fn reset(&mut self, base: Head, generation_floor: u64) -> io::Result<()> {
        self.header = JournalHeader {
            generation: self.header.generation.max(generation_floor) + 1,
            base,
            key: new_key(),
            slot: 1 - self.header.slot,
        };
        self.write_header()?;
        self.cursor = FRAMES_START;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_durable_when_its_write_and_sync_are_or_when_a_short_write_is_finished() {
        let finished = |result: io::Result<()>| {
            let mut from = None;
            let outcome = frame_outcome(60, Some(-libc::ECANCELED), 100, |at| {
                from = Some(at);
                result
            });
            (outcome.map_err(|e| e.raw_os_error()), from)
        };
        // A short write, its linked fsync cancelled: the rest is written and synced here.
        assert_eq!(finished(Ok(())), (Ok(()), Some(60)));
        assert_eq!(finished(Err(io::Error::from_raw_os_error(libc::ENOSPC))), (Err(Some(libc::ENOSPC)), Some(60)));
        let never = |_: usize| -> io::Result<()> { panic!("nothing is left to write") };
        assert!(frame_outcome(100, Some(0), 100, never).is_ok());
        assert!(frame_outcome(100, None, 100, never).is_ok());
        assert_eq!(frame_outcome(100, Some(-libc::EIO), 100, never).unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(
            frame_outcome(-libc::ENOSPC, Some(-libc::ECANCELED), 100, never).unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
    }
}
