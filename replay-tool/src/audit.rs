//! Audit bundles: `export-audit` writes a range of the log as data an auditor
//! can read (JSONL or CSV: actor, time, command id, stream, type, full
//! payload, chain hash) plus what they need to check it without the ledger:
//! each record's stored body bytes (the exact bytes its chain hash covers),
//! the hash linking the range to the record before it, a manifest with
//! counts and the SHA-256 of every file, and a checkpoint signed with
//! Ed25519. `verify-export` checks all of that offline, and — given a
//! checkpoint the auditor kept from an earlier bundle — that this bundle
//! extends the history they already hold rather than rewriting it.
//!
//! Chain hash (as in `eventlog::record`):
//! `BLAKE3("taskledger.record.v1" ‖ prev_hash ‖ seq as u64 LE ‖ body)`.
//! The checkpoint signs a small canonical text (see `checkpoint_message`)
//! that names the range, both end hashes and the manifest's SHA-256, so one
//! signature covers every file.

//!
//! The format and the verifier live in the library (`bundle.rs`), where the
//! fuzz targets reach them; this file is the command-line side.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write;

use crate::describe::printable;

use sha2::{Digest, Sha256};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use domain::Timestamp;
use ed25519_dalek::{Signer, SigningKey};
use eventlog::fold::decode_event;
use eventlog::json::{hex, unhex};
use eventlog::record::{chain_hash, stored_body};
use eventlog::{GENESIS_HASH, Hash};
use replay_tool::bundle::{
    BUNDLE_FORMAT, CHECKPOINT_FILE, CHECKPOINT_FORMAT, COLUMNS, Checkpoint, FileEntry, Format, MANIFEST_FILE, Manifest,
    checkpoint_message, open_bounded, sha256_hex, verify_bundle,
};

use crate::progress::Progress;
use crate::sorted_json;
use crate::source::{Point, Source};
use crate::{Input, Outcome};

#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub input: Input,
    /// First seq or time of the range (default: the first record).
    #[arg(long, value_name = "SEQ|TIME")]
    from: Option<Point>,
    /// Last seq or time of the range (default: the head).
    #[arg(long, value_name = "SEQ|TIME")]
    to: Option<Point>,
    /// Directory to write the bundle into (created; must be empty if it exists).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "jsonl")]
    format: Format,
    /// Ed25519 secret key file (from `keygen`) that signs the checkpoint.
    #[arg(long, value_name = "KEYFILE")]
    key: PathBuf,
}

#[derive(Args)]
pub struct VerifyExportArgs {
    /// The bundle directory.
    dir: PathBuf,
    /// The public key you trust (from `keygen`); without it, the key that signed `--checkpoint`.
    /// With neither, the bundle fails verification: its own key proves nothing.
    #[arg(long, value_name = "FILE")]
    pubkey: Option<PathBuf>,
    /// A checkpoint.json you kept from an earlier bundle: this bundle must extend it.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// How `keygen` marks a secret key file, so that it is never taken for a public one and a
/// public one (64 bare hex digits) is never taken for a secret: signing with a key derived
/// from the public bytes would make the signing secret public.
const SECRET_KEY_LABEL: &str = "taskledger ed25519 secret key:";

fn key_hex(text: &str, path: &Path, what: &str) -> Result<[u8; 32]> {
    let bytes = unhex(text.trim()).filter(|b| b.len() == 32).ok_or_else(|| {
        anyhow!("{what} {} is not 64 hex digits (make keys with `taskledger-replay keygen`)", path.display())
    })?;
    Ok(bytes.try_into().expect("checked length"))
}

/// A secret key file as `keygen` writes it: the label, then 64 hex digits.
fn read_secret_key(path: &Path) -> Result<[u8; 32]> {
    let text = fs::read_to_string(path).with_context(|| format!("read secret key {}", path.display()))?;
    let Some(hex) = text.trim().strip_prefix(SECRET_KEY_LABEL) else {
        bail!(
            "{} is not a secret key file from `taskledger-replay keygen` (it does not start with {SECRET_KEY_LABEL:?}); a public key (.pub) cannot sign",
            path.display()
        );
    };
    // Signing goes on (the key may sit on a single-user machine), but a key others can read can
    // sign checkpoints in anyone's name: say so, as ssh does (once the file is known to be one).
    #[cfg(unix)]
    if let Ok(metadata) = fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: secret key {} is readable by others (mode {mode:o}); `chmod 600` it, as keygen wrote it",
                path.display()
            );
        }
    }
    key_hex(hex, path, "secret key")
}

/// A public key file: 64 hex digits (a secret key file is refused, not used).
fn read_public_key(path: &Path) -> Result<[u8; 32]> {
    let text = fs::read_to_string(path).with_context(|| format!("read public key {}", path.display()))?;
    if text.trim().starts_with(SECRET_KEY_LABEL) {
        bail!("{} is a secret key; give the public key (the .pub file keygen wrote beside it)", path.display());
    }
    key_hex(&text, path, "public key")
}

pub fn keygen(prefix: &Path) -> Result<Outcome> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow!("read OS randomness: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    let secret_path = PathBuf::from(format!("{}.key", prefix.display()));
    let public_path = PathBuf::from(format!("{}.pub", prefix.display()));
    for path in [&secret_path, &public_path] {
        // A dangling link counts: writing through it would create a file wherever it points.
        if fs::symlink_metadata(path).is_ok() {
            bail!("write key {}: the file exists; refusing to overwrite a key", path.display());
        }
    }
    if let Some(parent) = secret_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&secret_path).with_context(|| format!("create {}", secret_path.display()))?;
    // From here a failure removes what this call created: a secret key without its public key
    // (or a half-written one) would block the next keygen and sign nothing verifiable.
    let mut created = vec![secret_path.clone()];
    let public = hex(key.verifying_key().as_bytes());
    let written = writeln!(file, "{SECRET_KEY_LABEL} {}", hex(&key.to_bytes()))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", secret_path.display()))
        .and_then(|()| {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&public_path)
                .with_context(|| format!("create {}", public_path.display()))?;
            created.push(public_path.clone());
            writeln!(file, "{public}")
                .and_then(|()| file.sync_all())
                .with_context(|| format!("write {}", public_path.display()))
        });
    if let Err(error) = written {
        for path in created {
            let _ = fs::remove_file(path);
        }
        return Err(error);
    }
    println!("secret key  {} (keep it private; it signs audit checkpoints)", secret_path.display());
    println!("public key  {} = {public}", public_path.display());
    Ok(Outcome::Clean)
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_owned() }
}

/// Bytes of formatted rows written (and hashed) at a time.
const EXPORT_CHUNK_BYTES: usize = 1 << 20;
/// Chunks queued for the writing thread.
const EXPORT_CHUNKS_IN_FLIGHT: usize = 4;

/// Records read per batch handed to the formatting thread.
const EXPORT_BATCH_RECORDS: usize = 1024;
/// Batches queued for the formatting thread.
const EXPORT_BATCHES_IN_FLIGHT: usize = 8;

/// Records read and checked, on their way to the formatting thread.
struct Batch {
    records: Vec<eventlog::StoredRecord>,
    /// Per record: its stored body and the chain hash before it.
    rows: Vec<(Vec<u8>, Hash)>,
}

/// The formatting thread: decodes each record's event (so the events are
/// allocated and freed on this thread), counts the event types, and writes
/// the rows into chunks of about `EXPORT_CHUNK_BYTES`, each sent to the
/// writing thread; every batch is sent back when done. Returns the count of
/// records by event type.
fn format_rows(
    format: Format,
    batches: Receiver<Batch>,
    done: SyncSender<Batch>,
    chunks: SyncSender<Vec<u8>>,
) -> Result<BTreeMap<String, u64>> {
    let stopped = |_| anyhow!("the writing thread stopped");
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut chunk: Vec<u8> = Vec::with_capacity(EXPORT_CHUNK_BYTES + 64 * 1024);
    let mut parts = EventParts::default();
    let mut times = TimeText::default();
    if format == Format::Csv {
        chunk.extend_from_slice(COLUMNS.join(",").as_bytes());
        chunk.push(b'\n');
    }
    for batch in batches {
        for (record, (body, prev)) in batch.records.iter().zip(&batch.rows) {
            let event = decode_event(record).map_err(|e| anyhow!("{e}"))?;
            if let Some(n) = by_type.get_mut(event.type_name()) {
                *n += 1;
            } else {
                by_type.insert(event.type_name().to_owned(), 1);
            }
            parts.set(&event);
            format_row(&mut chunk, format, record, &parts, times.of(record.recorded_at_us), prev, body);
            if chunk.len() >= EXPORT_CHUNK_BYTES {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(EXPORT_CHUNK_BYTES + 64 * 1024));
                chunks.send(full).map_err(stopped)?;
            }
        }
        // Full or gone: then this thread frees it, which is only slower.
        let _ = done.try_send(batch);
    }
    if !chunk.is_empty() {
        chunks.send(chunk).map_err(stopped)?;
    }
    Ok(by_type)
}

/// What a row shows of an event, written into buffers that are reused from
/// row to row.
#[derive(Default)]
struct EventParts {
    /// The event's `data` JSON (see `sorted_json`).
    data: Vec<u8>,
    type_name: &'static str,
    stream: String,
    json: sorted_json::Writer,
}

impl EventParts {
    fn set(&mut self, event: &domain::Event) {
        self.data.clear();
        self.json.event_data(&mut self.data, event).expect("events always serialize");
        self.type_name = event.type_name();
        self.stream.clear();
        match event.stream() {
            // What `StreamId`'s `Display` writes, without the formatting machinery.
            domain::StreamId::Task(id) => {
                self.stream.push_str("task:");
                self.stream.push_str(id.as_uuid().hyphenated().encode_lower(&mut [0u8; 36]));
            }
            other => {
                let _ = write!(self.stream, "{other}");
            }
        }
    }

    #[cfg(test)]
    fn of(event: &domain::Event) -> Self {
        let mut parts = Self::default();
        parts.set(event);
        parts
    }
}

/// RFC 3339 times of records, formatted once per second: consecutive
/// records mostly share their second, and only the microseconds change.
#[derive(Default)]
struct TimeText {
    /// The second `prefix` is for, and `YYYY-MM-DDTHH:MM:SS.` of it.
    second: Option<i64>,
    prefix: String,
    text: Vec<u8>,
}

impl TimeText {
    /// `Timestamp::from_micros(us).to_rfc3339()`, as a borrowed string.
    fn of(&mut self, us: i64) -> &str {
        let second = us.div_euclid(1_000_000);
        if self.second != Some(second) {
            let full = Timestamp::from_micros(second * 1_000_000).to_rfc3339();
            // Always `….ffffffZ`: six digits of microseconds and the zone.
            self.prefix.clear();
            self.prefix.push_str(&full[..full.len() - 7]);
            self.second = Some(second);
        }
        self.text.clear();
        self.text.extend_from_slice(self.prefix.as_bytes());
        let micros = us.rem_euclid(1_000_000);
        for place in [100_000, 10_000, 1_000, 100, 10, 1] {
            self.text.push(b'0' + (micros / place % 10) as u8);
        }
        self.text.push(b'Z');
        std::str::from_utf8(&self.text).expect("ASCII")
    }
}

/// Writes chunks to `file` as they come, hashing them (SHA-256); returns the
/// file's size and digest.
fn write_hashed(file: fs::File, chunks: Receiver<Vec<u8>>) -> std::io::Result<(u64, String)> {
    let mut file = file;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    for chunk in chunks {
        hasher.update(&chunk);
        file.write_all(&chunk)?;
        bytes += chunk.len() as u64;
    }
    file.flush()?;
    Ok((bytes, hex(&hasher.finalize())))
}

/// Appends `text` as a JSON string.
fn json_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("writing to memory never fails");
}

/// Appends `bytes` as lower-case hex.
fn hex_into(out: &mut Vec<u8>, bytes: &[u8]) {
    /// Both digits of every byte: one lookup and one two-byte copy per byte.
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut pairs = [[0u8; 2]; 256];
        let mut b = 0;
        while b < 256 {
            pairs[b] = [DIGITS[b >> 4], DIGITS[b & 0xf]];
            b += 1;
        }
        pairs
    };
    let start = out.len();
    out.resize(start + bytes.len() * 2, 0);
    for (pair, b) in out[start..].chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&PAIRS[usize::from(*b)]);
    }
}

/// Appends one row, byte for byte what `row()` gives as a JSON object
/// (`serde_json` maps keep their keys sorted) or as CSV cells in `COLUMNS`
/// order, without building the map.
fn format_row(
    out: &mut Vec<u8>,
    format: Format,
    record: &eventlog::StoredRecord,
    event: &EventParts,
    recorded_at: &str,
    prev: &Hash,
    body: &[u8],
) {
    let (data, stream) = (&event.data, &event.stream);
    match format {
        Format::Jsonl => {
            out.extend_from_slice(b"{\"actor\":");
            json_str(out, &record.actor);
            out.extend_from_slice(b",\"body\":\"");
            hex_into(out, body);
            out.extend_from_slice(b"\",\"command_id\":");
            json_str(out, &record.command_id);
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(data);
            out.extend_from_slice(b",\"hash\":\"");
            hex_into(out, &record.hash);
            out.extend_from_slice(b"\",\"prev_hash\":\"");
            hex_into(out, prev);
            out.extend_from_slice(b"\",\"recorded_at\":");
            json_str(out, recorded_at);
            out.extend_from_slice(b",\"recorded_at_us\":");
            sorted_json::int(out, record.recorded_at_us);
            out.extend_from_slice(b",\"schema_version\":");
            sorted_json::uint(out, record.schema_version.into(), b",\"seq\":");
            sorted_json::uint(out, record.seq, b",\"stream\":");
            json_str(out, stream);
            out.extend_from_slice(b",\"stream_version\":");
            sorted_json::uint(out, record.stream_version, b",\"type\":");
            json_str(out, event.type_name);
            out.extend_from_slice(b"}\n");
        }
        Format::Csv => {
            let cell = |out: &mut Vec<u8>, text: &str| out.extend_from_slice(csv_field(text).as_bytes());
            let _ = write!(out, "{},", record.seq);
            cell(out, recorded_at);
            let _ = write!(out, ",{},", record.recorded_at_us);
            cell(out, stream);
            let _ = write!(out, ",{},", record.stream_version);
            cell(out, &record.command_id);
            out.push(b',');
            cell(out, &record.actor);
            out.push(b',');
            cell(out, event.type_name);
            let _ = write!(out, ",{},", record.schema_version);
            cell(out, std::str::from_utf8(data).expect("JSON is UTF-8"));
            out.push(b',');
            hex_into(out, prev);
            out.push(b',');
            hex_into(out, &record.hash);
            out.push(b',');
            hex_into(out, body);
            out.push(b'\n');
        }
    }
}

pub fn export(source: &Source, args: &ExportArgs) -> Result<Outcome> {
    let key = SigningKey::from_bytes(&read_secret_key(&args.key)?);
    let head = source.head()?;
    let (first, last) = source.range(args.from, args.to)?;
    if first > last || last == 0 {
        bail!("the range is empty (seq {first}..{last}, head {})", head.seq);
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("write bundle to {}: it is a file, not a directory", args.out.display());
    }
    if args.out.exists() && fs::read_dir(&args.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("write bundle to {}: the directory is not empty", args.out.display());
    }
    let created = !args.out.exists();
    fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let written = write_bundle(source, args, &key, head, first, last);
    if written.is_err() {
        // No half a bundle: a partial data file stayed behind, and a second try was refused
        // because the directory was not empty (found by a black-box check on a full disk).
        for name in ["events.jsonl", "events.csv", MANIFEST_FILE, CHECKPOINT_FILE] {
            let _ = fs::remove_file(args.out.join(name));
        }
        if created {
            let _ = fs::remove_dir(&args.out);
        }
    }
    written
}

/// Writes the bundle's files into the empty directory `args.out`.
fn write_bundle(
    source: &Source,
    args: &ExportArgs,
    key: &SigningKey,
    head: eventlog::Head,
    first: u64,
    last: u64,
) -> Result<Outcome> {
    let prev_hash = match first {
        1 => GENESIS_HASH,
        n => source.record(n - 1)?.ok_or_else(|| anyhow!("the log has no record {}", n - 1))?.hash,
    };
    let name = match args.format {
        Format::Jsonl => "events.jsonl",
        Format::Csv => "events.csv",
    };
    let path = args.out.join(name);
    let file = fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let mut prev = prev_hash;
    let mut records = 0u64;
    let mut by_actor: BTreeMap<String, u64> = BTreeMap::new();
    let (mut first_at, mut first_hash, mut last_us) = (String::new(), String::new(), 0i64);
    let progress = Progress::new(last, "exporting");
    // Three threads: this one reads records, checks each chain link and
    // counts; a formatting thread decodes the events and writes the rows into
    // chunks; a writing thread hashes (SHA-256) and writes each chunk, so
    // the file is never read back. Batches go back to this thread to be
    // freed where they were allocated (freeing memory another thread
    // allocated is slower).
    let (chunks, to_disk) = sync_channel::<Vec<u8>>(EXPORT_CHUNKS_IN_FLIGHT);
    let (batches, to_format) = sync_channel::<Batch>(EXPORT_BATCHES_IN_FLIGHT);
    let (formatted, returned) = sync_channel::<Batch>(EXPORT_BATCHES_IN_FLIGHT + 2);
    let format = args.format;
    let written = std::thread::scope(|scope| -> Result<((u64, String), BTreeMap<String, u64>)> {
        let disk = std::thread::Builder::new()
            .name("export-write".into())
            .spawn_scoped(scope, move || write_hashed(file, to_disk))
            .context("start the writing thread")?;
        let rows = std::thread::Builder::new()
            .name("export-format".into())
            .spawn_scoped(scope, move || format_rows(format, to_format, formatted, chunks))
            .context("start the formatting thread")?;
        let scanned = source.scan_batches(first, last, EXPORT_BATCH_RECORDS, &progress, |batch| {
            // Free what the formatting thread is done with.
            while returned.try_recv().is_ok() {}
            let mut checked = Vec::with_capacity(batch.len());
            for record in &batch {
                let body = stored_body(record);
                if chain_hash(&prev, record.seq, &body) != record.hash {
                    bail!("record {}: its chain hash does not recompute; run `verify` before exporting", record.seq);
                }
                if records == 0 {
                    first_at = crate::source::time_of(record);
                    first_hash = hex(&record.hash);
                }
                records += 1;
                if let Some(n) = by_actor.get_mut(&record.actor) {
                    *n += 1;
                } else {
                    by_actor.insert(record.actor.clone(), 1);
                }
                last_us = record.recorded_at_us;
                checked.push((body, prev));
                prev = record.hash;
            }
            batches
                .send(Batch { records: batch, rows: checked })
                .map_err(|_| anyhow!("write {}: the formatting thread stopped", path.display()))?;
            Ok(ControlFlow::Continue(()))
        });
        drop(batches);
        let rows = rows.join().map_err(|_| anyhow!("write {}: the formatting thread failed", path.display()))?;
        let disk = disk.join().map_err(|_| anyhow!("write {}: the writing thread failed", path.display()))?;
        // A failed write (a full disk) stops the formatting thread, which then only knows that the
        // writing thread stopped: the write's own error is the one to report. A decoding error
        // stops the formatting thread, and so the reading: it comes next.
        let written = disk.with_context(|| format!("write {}", path.display()))?;
        let types = rows.with_context(|| format!("write {}", path.display()))?;
        scanned?;
        Ok((written, types))
    });
    drop(progress);
    let ((file_bytes, file_sha256), by_type) = written?;
    let last_at = Timestamp::from_micros(last_us).to_rfc3339();
    if records != last - first + 1 {
        bail!("read {records} records for seq {first}..{last}; the log is incomplete");
    }
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default();
    let manifest = Manifest {
        format: BUNDLE_FORMAT.into(),
        first_seq: first,
        last_seq: last,
        records,
        first_recorded_at: first_at,
        last_recorded_at: last_at,
        prev_hash: hex(&prev_hash),
        first_hash,
        last_hash: hex(&prev),
        ledger_head_seq: head.seq,
        counts_by_type: by_type,
        counts_by_actor: by_actor,
        chain_hash: "BLAKE3(\"taskledger.record.v1\" || prev_hash || seq as u64 little-endian || body)".into(),
        files: vec![FileEntry {
            name: name.into(),
            format: args.format,
            bytes: file_bytes,
            sha256: file_sha256,
            records,
        }],
        exported_at: Timestamp::from_micros(now_us).to_rfc3339(),
    };
    let manifest_bytes = format!("{}\n", serde_json::to_string_pretty(&manifest)?).into_bytes();
    let manifest_path = args.out.join(MANIFEST_FILE);
    fs::write(&manifest_path, &manifest_bytes).with_context(|| format!("write {}", manifest_path.display()))?;
    let mut checkpoint = Checkpoint {
        format: CHECKPOINT_FORMAT.into(),
        first_seq: first,
        last_seq: last,
        records,
        prev_hash: manifest.prev_hash.clone(),
        last_hash: manifest.last_hash.clone(),
        manifest_sha256: sha256_hex(&manifest_bytes),
        public_key: hex(key.verifying_key().as_bytes()),
        signature: String::new(),
    };
    checkpoint.signature = hex(&key.sign(checkpoint_message(&checkpoint).as_bytes()).to_bytes());
    let checkpoint_path = args.out.join(CHECKPOINT_FILE);
    fs::write(&checkpoint_path, format!("{}\n", serde_json::to_string_pretty(&checkpoint)?))
        .with_context(|| format!("write {}", checkpoint_path.display()))?;
    println!("audit bundle {}", args.out.display());
    println!(
        "  range      seq {first}..{last} ({records} records, {} .. {})",
        manifest.first_recorded_at, manifest.last_recorded_at
    );
    println!("  links to   {} (chain hash of seq {})", manifest.prev_hash, first - 1);
    println!("  ends at    {}", manifest.last_hash);
    println!("  files      {name} (sha256 {}), {MANIFEST_FILE}, {CHECKPOINT_FILE}", manifest.files[0].sha256);
    println!("  signed by  {}", checkpoint.public_key);
    Ok(Outcome::Clean)
}

pub fn verify_export(args: &VerifyExportArgs) -> Result<Outcome> {
    let dir = &args.dir;
    let trusted = args.pubkey.as_deref().map(|p| read_public_key(p).map(|k| hex(&k))).transpose()?;
    let earlier = match &args.checkpoint {
        Some(path) => Some((path.as_path(), fs::read(path).with_context(|| format!("read {}", path.display()))?)),
        None => None,
    };
    let open = |name: &str, limit: u64| open_bounded(&dir.join(name), limit);
    let present: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("list the bundle {}", dir.display()))?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("list the bundle {}", dir.display()))?;
    let earlier = earlier.as_ref().map(|(path, bytes)| (*path, bytes.as_slice()));
    let findings = verify_bundle(dir, &open, Some(&present), trusted.as_deref(), earlier)?;
    if args.json {
        println!("{}", serde_json::to_string(&findings)?);
    } else {
        let mut out = String::new();
        writeln!(out, "bundle {}", printable(&findings.bundle))?;
        writeln!(
            out,
            "  range      seq {}..{} ({} records checked)",
            findings.first_seq, findings.last_seq, findings.records_checked
        )?;
        let data: Vec<String> = findings.data_files.iter().map(|name| printable(name)).collect();
        writeln!(out, "  data       {}", if data.is_empty() { "-".to_owned() } else { data.join(", ") })?;
        let signer = if findings.key_trusted && args.pubkey.is_some() {
            "the key you trust"
        } else if findings.key_trusted {
            "the key that signed your earlier checkpoint"
        } else if args.pubkey.is_some() || args.checkpoint.is_some() {
            "NOT the key you trust"
        } else {
            "the key in the bundle, which proves nothing: pass --pubkey"
        };
        // The bundle is untrusted input: its key, file names and hashes are printed with their
        // control characters escaped (a file name holding a newline and a terminal escape could
        // print a forged "intact" line and hide the real one: found by review).
        writeln!(out, "  signed by  {} ({signer})", printable(&findings.signed_by))?;
        if let Some(extends) = findings.extends_checkpoint {
            writeln!(out, "  extends    the earlier checkpoint: {}", if extends { "yes" } else { "NO" })?;
        }
        for problem in &findings.problems {
            writeln!(out, "  PROBLEM    {}", printable(problem))?;
        }
        if findings.problems_total > findings.problems.len() {
            writeln!(out, "  ... and {} more problems", findings.problems_total - findings.problems.len())?;
        }
        if findings.clean {
            writeln!(out, "result: the bundle is intact")?;
        } else {
            writeln!(out, "result: the bundle FAILED verification ({} problems)", findings.problems_total)?;
        }
        print!("{out}");
    }
    Ok(if findings.clean { Outcome::Clean } else { Outcome::Problems })
}

#[cfg(test)]
mod tests {
    use domain::testkit::{job, task_id, text};
    use domain::{Event, FailOutcome, Json, LeaseEpoch, StepIndex, Timestamp};
    use eventlog::json::record_json;
    use serde_json::{Map, Value};

    use super::*;

    /// One exported row: the feed's record fields plus what offline checking needs.
    fn row(record: &eventlog::StoredRecord, event: &domain::Event, prev: &Hash, body: &[u8]) -> Map<String, Value> {
        let mut map = record_json(record, event);
        map.insert("recorded_at_us".into(), record.recorded_at_us.into());
        map.insert("prev_hash".into(), hex(prev).into());
        map.insert("body".into(), hex(body).into());
        map
    }

    /// `format_row` writes exactly what formatting `row()` as a JSON object or as
    /// CSV cells did, for payloads that need escaping and quoting.
    #[test]
    fn format_row_matches_the_row_map() {
        let mut spec = job(1, "emails");
        spec.payload = Json::new("payload", r#"{"to":"a,b","note":"say \"hi\"\nbye"}"#).unwrap();
        let events = [
            Event::TaskCreated { spec, at: Timestamp::from_micros(1_795_442_400_000_001) },
            Event::StepFailed {
                task: task_id(1),
                step: StepIndex(0),
                epoch: LeaseEpoch(1),
                error: text("boom, \"badly\""),
                retryable: false,
                outcome: FailOutcome::DeadLetter,
                at: Timestamp::from_micros(1_795_442_400_000_002),
            },
        ];
        for (n, event) in events.iter().enumerate() {
            let new = eventlog::fold::encode_event(event, "cmd,\"1\"", "actor é", 1_795_442_400_000_002);
            let record = new.into_stored(n as u64 + 7, n as u64 + 1, [n as u8; 32]);
            let prev = [9u8; 32];
            let body = stored_body(&record);
            let map = row(&record, event, &prev, &body);
            let at = TimeText::default().of(record.recorded_at_us).to_owned();
            assert_eq!(at, Timestamp::from_micros(record.recorded_at_us).to_rfc3339());
            let mut jsonl = Vec::new();
            format_row(&mut jsonl, Format::Jsonl, &record, &EventParts::of(event), &at, &prev, &body);
            assert_eq!(String::from_utf8(jsonl).unwrap(), format!("{}\n", Value::Object(map.clone())));
            let cells: Vec<String> = COLUMNS
                .iter()
                .map(|c| match &map[*c] {
                    Value::String(s) => csv_field(s),
                    other => csv_field(&other.to_string()),
                })
                .collect();
            let mut csv = Vec::new();
            format_row(&mut csv, Format::Csv, &record, &EventParts::of(event), &at, &prev, &body);
            assert_eq!(String::from_utf8(csv).unwrap(), format!("{}\n", cells.join(",")));
        }
    }
}
