//! `taskledger backup`: a consistent copy of the log, from a running server
//! (online) or from a stopped data dir (offline), written as a fresh redb log
//! file that `taskledger serve` and `taskledger-replay` open like
//! `<data>/ledger.redb`.
//!
//! Both ends of the online wire format live in this file so they cannot drift
//! apart: the admin-only route [`serve_backup`] (`GET /v1/admin/backup`) and the
//! client [`run`].
//!
//! **Consistency.** A backup is the log prefix `1..=H`, where `H` is the head
//! when the backup starts. The log is append-only and hash-chained, so that
//! prefix never changes once written: the server may read it in many short
//! MVCC read transactions (no long-lived snapshot pinning redb pages, and the
//! writer is never paused) and still hand out exactly the records that were
//! there at `H`.
//!
//! **Wire format** (`Content-Type: application/vnd.taskledger.backup.v1`): one
//! JSON header line `{"format":"taskledger.backup","version":1,"head_seq":H,
//! "head_hash":"<hex>"}` then `H` frames, `seq (u64 LE) ‖ chain hash (32) ‖
//! body length (u32 LE) ‖ body`, where `body` is the record's stored body —
//! exactly the bytes its chain hash covers ([`eventlog::record::stored_body`]),
//! then the end of the stream. A read error on the server aborts the
//! connection, so a client never mistakes a cut stream for a complete one: it
//! expects exactly `H` frames and then the end.
//!
//! **Rebuilding.** The client appends the records in order to a new
//! [`RedbStore`] through its ordinary [`LogStore::append`]: the store assigns
//! seq, stream version and chain hash itself and builds every index, and since
//! encoding is deterministic each rebuilt record must hash exactly like the
//! original; the client checks that for every record, checks the final head
//! against the advertised one, verifies the written file once more from disk,
//! and only then renames it into place. Until then the copy lives in
//! `FILE.tmp/` (a directory, because a `RedbStore` is a directory holding
//! `ledger.redb`), which the backup creates (refusing to start if it exists)
//! and any failure removes: there is never a half-written `FILE`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use eventlog::record::{PAYLOAD_BYTES_MAX, chain_hash, decode_stored_body, stored_body};
use eventlog::{
    GENESIS_HASH, Hash, Head, LogReader, LogStore, NewRecord, OpenError, RedbOptions, RedbStore, StoredRecord,
};
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::server::AppState;

/// The route serving a backup stream.
pub const BACKUP_ROUTE: &str = "/v1/admin/backup";
/// Content type of the backup stream.
pub const CONTENT_TYPE: &str = "application/vnd.taskledger.backup.v1";
/// `format` of the header line.
pub const FORMAT: &str = "taskledger.backup";
/// `version` of the header line; bump when the framing changes.
pub const FORMAT_VERSION: u32 = 1;
/// seq (8) ‖ hash (32) ‖ body length (4).
const FRAME_HEADER_BYTES: usize = 8 + 32 + 4;
/// Largest stored body a frame may carry: the largest payload plus room for the
/// stream key, command id, actor and the postcard framing around them.
const FRAME_BODY_BYTES_MAX: usize = PAYLOAD_BYTES_MAX + 64 * 1024;
/// Longest header line accepted.
const HEADER_LINE_BYTES_MAX: u64 = 4096;
/// Most records read from the log in one read transaction.
const READ_BATCH_RECORDS_MAX: usize = 1024;
/// Bytes of record bodies the server aims to put in one chunk of the stream
/// (the next read asks for fewer records when records are large).
const READ_BATCH_BYTES_TARGET: usize = 4 * 1024 * 1024;
/// Most records in one append (one fsync) of the rebuilt log.
const APPEND_BATCH_RECORDS_MAX: usize = 8192;
/// Most body bytes in one append of the rebuilt log.
const APPEND_BATCH_BYTES_MAX: usize = 32 * 1024 * 1024;

/// The first line of a backup stream.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StreamHeader {
    pub format: String,
    pub version: u32,
    pub head_seq: u64,
    pub head_hash: String,
}

// ----- the server side -----

/// `GET /v1/admin/backup`: the records `1..=H` of the log, `H` being the head
/// now. Admin only, and only for a token without a namespace scope: a backup
/// holds every namespace's full history, and restoring it hands over all of
/// it. (Auditors export verifiable slices with `taskledger-replay
/// export-audit` instead.)
pub async fn serve_backup(State(state): State<AppState>, who: Principal) -> ApiResult<Response> {
    who.require_unscoped_admin("take a backup")?;
    // Every acknowledged write, or none of the copy: one that left out records a failed
    // checkpoint held would look whole (found by a black-box check on a full disk).
    crate::commands::wait_log_readable(&state, None).await?;
    crate::commands::refuse_unreadable(&state, None)?;
    let reader = state.writer.reader().clone();
    let head = reader.head().map_err(|e| ApiError::internal(format!("read the log head: {e}")))?;
    tracing::info!(head_seq = head.seq, actor = %who.actor(), "backup stream started");
    let header = StreamHeader {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        head_seq: head.seq,
        head_hash: eventlog::json::hex(&head.hash),
    };
    let mut first = serde_json::to_vec(&header).expect("the header serializes");
    first.push(b'\n');
    let start = Streaming { reader, head, next_seq: 1, batch_max: READ_BATCH_RECORDS_MAX, header: Some(first) };
    let stream = futures_util::stream::unfold(start, |mut s| async move {
        if let Some(header) = s.header.take() {
            return Some((Ok(Bytes::from(header)), s));
        }
        if s.next_seq > s.head.seq {
            tracing::info!(head_seq = s.head.seq, "backup stream finished");
            return None;
        }
        match s.next_chunk().await {
            Ok(chunk) => Some((Ok(chunk), s)),
            Err(error) => {
                // Ending with an error aborts the connection, which the client
                // reports as a cut stream; nothing after it is sent.
                tracing::error!(seq = s.next_seq, %error, "backup stream failed");
                s.next_seq = u64::MAX;
                Some((Err(std::io::Error::other(error)), s))
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-taskledger-head-seq", HeaderValue::from(head.seq));
    Ok(response)
}

/// Where a backup stream is.
struct Streaming {
    reader: LogReader,
    head: Head,
    next_seq: u64,
    batch_max: usize,
    header: Option<Vec<u8>>,
}

impl Streaming {
    /// The frames of the next records, read in one read transaction off the
    /// async threads (reads touch the disk).
    async fn next_chunk(&mut self) -> Result<Bytes, String> {
        let (reader, from, to, max) = (self.reader.clone(), self.next_seq, self.head.seq, self.batch_max);
        let records = tokio::task::spawn_blocking(move || reader.read_range(from, to, max))
            .await
            .map_err(|e| format!("join the log reader: {e}"))?
            .map_err(|e| format!("read records from {from}: {e}"))?;
        if records.is_empty() {
            return Err(format!("record {from} is missing below the head {to}"));
        }
        let mut chunk = Vec::with_capacity(records.len() * 256);
        for record in &records {
            if record.seq != self.next_seq {
                return Err(format!("expected record {}, read {}", self.next_seq, record.seq));
            }
            let body = stored_body(record);
            let len = u32::try_from(body.len()).map_err(|_| format!("record {} is too large to frame", record.seq))?;
            chunk.extend_from_slice(&record.seq.to_le_bytes());
            chunk.extend_from_slice(&record.hash);
            chunk.extend_from_slice(&len.to_le_bytes());
            chunk.extend_from_slice(&body);
            self.next_seq += 1;
        }
        // Large records: ask for fewer next time, so a chunk stays near the target size.
        let per_record = (chunk.len() / records.len()).max(1);
        self.batch_max = (READ_BATCH_BYTES_TARGET / per_record).clamp(1, READ_BATCH_RECORDS_MAX);
        Ok(Bytes::from(chunk))
    }
}

// ----- the client side -----

/// Where a backup is taken from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A running server (`--server URL --token T`).
    Server { url: String, token: String },
    /// A stopped data dir (`--data DIR`), read only; `journal_loss` as `--accept-journal-loss`.
    DataDir { dir: PathBuf, journal_loss: eventlog::JournalLoss },
}

/// What a finished backup wrote.
#[derive(Clone, Debug)]
pub struct Summary {
    pub to: PathBuf,
    pub records: u64,
    pub head: Head,
    pub bytes: u64,
    pub took: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backup {}: {} records, head seq {}, head hash {}, {} bytes, {:.3} s",
            self.to.display(),
            self.records,
            self.head.seq,
            eventlog::json::hex(&self.head.hash),
            self.bytes,
            self.took.as_secs_f64()
        )
    }
}

/// The staging directory of a backup to `to`: `<to>.tmp/`.
pub fn staging_dir(to: &Path) -> PathBuf {
    let mut name = to.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Whether anything is at `path`, a dangling symbolic link included (`Path::exists` follows
/// links, so a rename would have replaced one).
fn taken(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Takes a backup from `source` into the new file `to`.
pub fn run(source: &Source, to: &Path) -> anyhow::Result<Summary> {
    let started = Instant::now();
    if taken(to) {
        bail!("{} already exists; choose a new file name or remove it first", to.display());
    }
    // The staging directory is created here or not at all, so a failure removes only what this
    // backup made: an existing `FILE.tmp` (a leftover of an interrupted backup, or anything
    // else) is the user's to look at. It was removed outright once, with whatever it held.
    let staging = staging_dir(to);
    if let Err(e) = std::fs::create_dir(&staging) {
        if e.kind() == std::io::ErrorKind::AlreadyExists || taken(&staging) {
            bail!(
                "{} already exists (an interrupted backup leaves it behind); remove it, or choose another file name",
                staging.display()
            );
        }
        return Err(e).with_context(|| format!("create {}", staging.display()));
    }
    let result = write_staged(source, &staging).and_then(|head| publish(&staging, to).map(|bytes| (head, bytes)));
    let _ = std::fs::remove_dir_all(&staging);
    // A full disk shows through redb as "Database repair aborted" and the like: the free space
    // says what the error does not (found by a black-box check).
    let (head, bytes) = result.map_err(|error| match eventlog::disk::free_bytes(&staging_parent(&staging)) {
        Ok(free) if free < LOW_DISK_NOTE_BYTES => {
            error.context(format!("only {} MiB free on the disk the backup is written to", free >> 20))
        }
        _ => error,
    })?;
    Ok(Summary { to: to.to_path_buf(), records: head.seq, head, bytes, took: started.elapsed() })
}

/// Under this much free space, a failed backup's message says how much there is.
const LOW_DISK_NOTE_BYTES: u64 = 256 << 20;

fn staging_parent(staging: &Path) -> PathBuf {
    match staging.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes and checks the copy in `staging`; returns its head.
fn write_staged(source: &Source, staging: &Path) -> anyhow::Result<Head> {
    let expected = match source {
        Source::DataDir { dir, journal_loss } => copy_offline(dir, *journal_loss, staging)?,
        Source::Server { url, token } => copy_online(url, token, staging)?,
    };
    // Check it again as it is on disk, as a reader of the backup will see it.
    let path = staging.join(eventlog::redb_store::LOG_FILE_NAME);
    let reader = LogReader::open_read_only(&path).with_context(|| format!("reopen the copy {}", path.display()))?;
    let report = eventlog::verify(&reader, |_, _| {}).with_context(|| format!("verify the copy {}", path.display()))?;
    if let Some(problem) = &report.first_problem {
        bail!("the copy does not verify at seq {}: {}", problem.seq, problem.message);
    }
    if report.head != expected {
        bail!("the copy's head (seq {}) is not the source's (seq {})", report.head.seq, expected.seq);
    }
    Ok(expected)
}

/// Makes the staged log durable and renames it to `to`; returns its size.
fn publish(staging: &Path, to: &Path) -> anyhow::Result<u64> {
    let staged = staging.join(eventlog::redb_store::LOG_FILE_NAME);
    let file = std::fs::File::open(&staged).with_context(|| format!("open {}", staged.display()))?;
    file.sync_all().with_context(|| format!("fsync {}", staged.display()))?;
    let bytes = file.metadata().with_context(|| format!("stat {}", staged.display()))?.len();
    drop(file);
    // `rename` replaces silently: a file (or link) created at `to` while the backup ran would
    // be lost. A hard link is made only where nothing is, in one step; on a file system without
    // hard links, check and rename (leaving the moment between the two).
    match std::fs::hard_link(&staged, to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("{} appeared while the backup ran; not replacing it", to.display());
        }
        Err(_) => {
            if taken(to) {
                bail!("{} appeared while the backup ran; not replacing it", to.display());
            }
            std::fs::rename(&staged, to).with_context(|| format!("rename {} to {}", staged.display(), to.display()))?;
        }
    }
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(&parent)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("fsync directory {}", parent.display()))?;
    Ok(bytes)
}

/// Rebuilds a log record by record, checking each link as it goes.
struct Sink {
    store: RedbStore,
    batch: Vec<NewRecord>,
    /// (seq, chain hash) the records of `batch` must get.
    expected: Vec<(u64, Hash)>,
    batch_bytes: usize,
    next_seq: u64,
    prev_hash: Hash,
}

impl Sink {
    fn create(staging: &Path) -> anyhow::Result<Sink> {
        let store = RedbStore::open(staging, RedbOptions::default())
            .with_context(|| format!("create the copy in {}", staging.display()))?;
        if store.head() != Head::EMPTY {
            bail!("{} already holds a log", staging.display());
        }
        Ok(Sink {
            store,
            batch: Vec::new(),
            expected: Vec::new(),
            batch_bytes: 0,
            next_seq: 1,
            prev_hash: GENESIS_HASH,
        })
    }

    /// Takes `record`, whose stored body is `body`, as the next record.
    fn push(&mut self, record: StoredRecord, body: &[u8]) -> anyhow::Result<()> {
        if record.seq != self.next_seq {
            bail!("expected record {}, got {}", self.next_seq, record.seq);
        }
        if chain_hash(&self.prev_hash, record.seq, body) != record.hash {
            bail!("record {} does not link to record {}: the chain hash differs", record.seq, record.seq - 1);
        }
        self.prev_hash = record.hash;
        self.next_seq += 1;
        self.batch_bytes += body.len();
        self.expected.push((record.seq, record.hash));
        self.batch.push(NewRecord {
            stream: record.stream,
            command_id: record.command_id,
            actor: record.actor,
            recorded_at_us: record.recorded_at_us,
            event_type: record.event_type,
            schema_version: record.schema_version,
            payload: record.payload,
        });
        if self.batch.len() >= APPEND_BATCH_RECORDS_MAX || self.batch_bytes >= APPEND_BATCH_BYTES_MAX {
            self.flush()?;
        }
        Ok(())
    }

    /// Appends the pending records in one durable transaction.
    fn flush(&mut self) -> anyhow::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let first = self.expected[0].0;
        let appended = self
            .store
            .append(&self.batch, &[])
            .with_context(|| format!("write records {first}..={} to the copy", first + self.batch.len() as u64 - 1))?;
        if appended.records.len() != self.expected.len() {
            bail!("the copy took {} records of {}", appended.records.len(), self.expected.len());
        }
        for (written, (seq, hash)) in appended.records.iter().zip(&self.expected) {
            if written.seq != *seq {
                bail!("record {seq} was written to the copy as seq {}", written.seq);
            }
            if written.hash != *hash {
                bail!("record {seq} rebuilt in the copy hashes differently from the original");
            }
        }
        self.batch.clear();
        self.expected.clear();
        self.batch_bytes = 0;
        Ok(())
    }

    /// Writes what is pending and checks the copy's head is `expected`.
    fn finish(mut self, expected: Head) -> anyhow::Result<Head> {
        self.flush()?;
        let head = self.store.head();
        if head.seq != expected.seq {
            bail!("the copy ends at seq {} but the source's head is {}", head.seq, expected.seq);
        }
        if head.hash != expected.hash {
            bail!("the copy's head hash differs from the source's head hash at seq {}", head.seq);
        }
        Ok(head)
    }
}

/// Copies the log of the stopped data dir `dir`; returns the head copied.
fn copy_offline(dir: &Path, journal_loss: eventlog::JournalLoss, staging: &Path) -> anyhow::Result<Head> {
    let path = dir.join(eventlog::redb_store::LOG_FILE_NAME);
    if !path.is_file() {
        bail!("no ledger at {} (is {} a taskledger data dir?)", path.display(), dir.display());
    }
    let reader = match LogReader::open_read_only(&path) {
        // A server that crashed or was killed left the file unclean, or records in its
        // journal: read both repaired in memory (neither file is modified).
        Err(error)
            if matches!(
                error,
                OpenError::Database { source: redb::DatabaseError::RepairAborted, .. }
                    | OpenError::JournalPending { .. }
            ) || matches!(error, OpenError::JournalLost { .. }) && journal_loss == eventlog::JournalLoss::Accept =>
        {
            LogReader::open_repaired_with(&path, journal_loss).map(|(reader, losses)| {
                for lost in losses {
                    eprintln!(
                        "taskledger backup: warning: {lost}; copying what the log file holds, as --accept-journal-loss says"
                    );
                }
                reader
            })
        }
        other => other,
    }
    .map_err(|error| match error {
        OpenError::Database { source: redb::DatabaseError::DatabaseAlreadyOpen, .. } => anyhow!(
            "{} is open by a running server; take an online backup instead: \
             taskledger backup --server http://ADDRESS --token TOKEN --to FILE",
            path.display()
        ),
        other => anyhow!(other).context(format!("open {} read-only", path.display())),
    })?;
    let head = reader.head().with_context(|| format!("read the head of {}", path.display()))?;
    let mut sink = Sink::create(staging)?;
    let mut from = 1;
    let mut max = READ_BATCH_RECORDS_MAX;
    while from <= head.seq {
        let records = reader
            .read_range(from, head.seq, max)
            .with_context(|| format!("read records from {from} of {}", path.display()))?;
        if records.is_empty() {
            bail!("record {from} of {} is missing below its head {}", path.display(), head.seq);
        }
        let mut bytes = 0;
        let count = records.len();
        for record in records {
            let body = stored_body(&record);
            bytes += body.len();
            from = record.seq + 1;
            sink.push(record, &body)?;
        }
        max = (READ_BATCH_BYTES_TARGET / (bytes / count).max(1)).clamp(1, READ_BATCH_RECORDS_MAX);
    }
    sink.finish(head)
}

/// Copies the log of the server at `url`; returns the head it advertised.
fn copy_online(url: &str, token: &str, staging: &Path) -> anyhow::Result<Head> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        // The server sends continuously; a minute of silence is a dead peer.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    let endpoint = format!("{}{BACKUP_ROUTE}", url.trim_end_matches('/'));
    let response = agent
        .get(&endpoint)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .with_context(|| format!("request a backup from {url}"))?;
    let status = response.status();
    if status != ureq::http::StatusCode::OK {
        let mut body = response.into_body();
        let text = body.with_config().limit(64 * 1024).read_to_string().unwrap_or_default();
        let detail = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                let code = v["error"]["code"].as_str()?.to_owned();
                let message = v["error"]["message"].as_str()?.to_owned();
                Some(format!("{code}: {message}"))
            })
            .unwrap_or_else(|| text.trim().chars().take(200).collect());
        bail!("the server refused the backup: HTTP {} ({detail})", status.as_u16());
    }
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    if content_type != CONTENT_TYPE {
        bail!(
            "{endpoint} answered {content_type:?}, not a backup stream ({CONTENT_TYPE}); is this a taskledger server?"
        );
    }
    let mut stream = BufReader::with_capacity(256 * 1024, response.into_body().into_reader());

    let mut line = Vec::new();
    (&mut stream).take(HEADER_LINE_BYTES_MAX).read_until(b'\n', &mut line).context("read the backup header")?;
    let header: StreamHeader = serde_json::from_slice(&line).context("parse the backup header")?;
    if header.format != FORMAT || header.version != FORMAT_VERSION {
        bail!(
            "the server sends backup format {} v{}; this build reads {FORMAT} v{FORMAT_VERSION}",
            header.format,
            header.version
        );
    }
    let head_hash: Hash = eventlog::json::unhex(&header.head_hash)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| anyhow!("the backup header's head hash is not 32 bytes of hex"))?;
    let advertised = Head { seq: header.head_seq, hash: head_hash };

    let mut sink = Sink::create(staging)?;
    let mut frame = [0u8; FRAME_HEADER_BYTES];
    let mut body = Vec::new();
    for expected_seq in 1..=advertised.seq {
        stream
            .read_exact(&mut frame)
            .with_context(|| format!("the stream ended after {} of {} records", expected_seq - 1, advertised.seq))?;
        let seq = u64::from_le_bytes(frame[..8].try_into().expect("8 bytes"));
        let hash: Hash = frame[8..40].try_into().expect("32 bytes");
        let len = u32::from_le_bytes(frame[40..44].try_into().expect("4 bytes")) as usize;
        if seq != expected_seq {
            bail!("the stream sent record {seq} where {expected_seq} belongs");
        }
        if len > FRAME_BODY_BYTES_MAX {
            bail!("record {seq} claims a body of {len} bytes, above the limit {FRAME_BODY_BYTES_MAX}");
        }
        body.resize(len, 0);
        stream
            .read_exact(&mut body)
            .with_context(|| format!("the stream ended inside record {seq} of {}", advertised.seq))?;
        let record = decode_stored_body(seq, hash, &body).with_context(|| format!("decode record {seq}"))?;
        sink.push(record, &body)?;
    }
    let mut extra = [0u8; 1];
    if stream.read(&mut extra).context("read the end of the stream")? != 0 {
        bail!("the stream continues after the advertised head seq {}", advertised.seq);
    }
    sink.finish(advertised)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What appears at the backup's name while it runs is kept: the copy is linked there only
    /// where nothing is.
    #[test]
    fn publishing_never_replaces_what_is_at_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("b.tmp");
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join(eventlog::redb_store::LOG_FILE_NAME), b"copy").unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"theirs").unwrap();
        let error = publish(&staging, &file).unwrap_err().to_string();
        assert!(error.contains("appeared while the backup ran"), "{error}");
        assert_eq!(std::fs::read(&file).unwrap(), b"theirs");
        let dangling = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(publish(&staging, &dangling).is_err());
        assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
        let free = dir.path().join("free");
        assert_eq!(publish(&staging, &free).unwrap(), 4);
        assert_eq!(std::fs::read(&free).unwrap(), b"copy");
    }

    #[test]
    fn the_staging_dir_sits_beside_the_target() {
        assert_eq!(staging_dir(Path::new("/b/ledger.bak")), PathBuf::from("/b/ledger.bak.tmp"));
        assert_eq!(staging_dir(Path::new("copy")), PathBuf::from("copy.tmp"));
    }
}
