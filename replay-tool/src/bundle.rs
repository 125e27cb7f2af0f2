//! The audit-bundle format and its offline verifier, shared by `export-audit` /
//! `verify-export` (`audit.rs` in the binary) and the fuzz targets (`fuzz/`),
//! which is why it lives in the library: parsing a bundle someone handed you is
//! the tool's most exposed input. Reading goes through a caller's function, so
//! the same code checks a directory or bytes in memory.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use eventlog::fold::decode_event;
use eventlog::json::{event_data, hex, record_json, unhex};
use eventlog::record::{chain_hash, decode_stored_body};
use eventlog::{GENESIS_HASH, Hash};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub const BUNDLE_FORMAT: &str = "taskledger-audit-bundle/1";
pub const CHECKPOINT_FORMAT: &str = "taskledger-checkpoint/1";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
/// Problems listed before `verify-export` stops listing (it still counts them).
const PROBLEMS_SHOWN_MAX: usize = 50;
/// The columns of an exported record, in CSV order.
pub const COLUMNS: [&str; 13] = [
    "seq",
    "recorded_at",
    "recorded_at_us",
    "stream",
    "stream_version",
    "command_id",
    "actor",
    "type",
    "schema_version",
    "data",
    "prev_hash",
    "hash",
    "body",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub format: Format,
    pub bytes: u64,
    pub sha256: String,
    pub records: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Manifest {
    pub format: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub first_recorded_at: String,
    pub last_recorded_at: String,
    /// Chain hash of record `first_seq - 1` (zeros for the first record of the log).
    pub prev_hash: String,
    pub first_hash: String,
    pub last_hash: String,
    /// The log's head when the bundle was made.
    pub ledger_head_seq: u64,
    pub counts_by_type: BTreeMap<String, u64>,
    pub counts_by_actor: BTreeMap<String, u64>,
    pub chain_hash: String,
    pub files: Vec<FileEntry>,
    pub exported_at: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Checkpoint {
    pub format: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub prev_hash: String,
    pub last_hash: String,
    pub manifest_sha256: String,
    pub public_key: String,
    pub signature: String,
}

/// The exact text a checkpoint's signature covers.
pub fn checkpoint_message(c: &Checkpoint) -> String {
    format!(
        "{CHECKPOINT_FORMAT}\nfirst_seq={}\nlast_seq={}\nrecords={}\nprev_hash={}\nlast_hash={}\nmanifest_sha256={}\n",
        c.first_seq, c.last_seq, c.records, c.prev_hash, c.last_hash, c.manifest_sha256
    )
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn verifying_key(hex_text: &str) -> Result<VerifyingKey> {
    let bytes: [u8; 32] =
        unhex(hex_text).and_then(|b| b.try_into().ok()).ok_or_else(|| anyhow!("public key is not 64 hex digits"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| anyhow!("public key is not a valid Ed25519 key: {e}"))
}

/// Findings of `verify-export`, in order.
#[derive(Default, Serialize)]
pub struct Findings {
    pub bundle: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The data files the signed manifest names, which were checked.
    pub data_files: Vec<String>,
    pub records_checked: u64,
    pub signed_by: String,
    pub key_trusted: bool,
    pub extends_checkpoint: Option<bool>,
    pub problems: Vec<String>,
    pub problems_total: usize,
    pub clean: bool,
    /// How many of `problems` lead the list: those about the whole bundle (a digest, the record
    /// count, the chain's end), which explain the row problems after them.
    #[serde(skip)]
    headlines: usize,
}

impl Findings {
    fn problem(&mut self, message: impl Into<String>) {
        self.problems_total += 1;
        if self.problems.len() < PROBLEMS_SHOWN_MAX {
            self.problems.push(message.into());
        }
    }

    /// A problem about the whole bundle, shown before the rows' (one row inserted near the start
    /// of a large bundle shifted every row after it: a million row problems hid the digest and
    /// count that explain them, found by a black-box check).
    fn headline(&mut self, message: impl Into<String>) {
        self.problems_total += 1;
        // Past the shown maximum a headline is counted, not shown (the 52nd inserted past the end
        // of the 50 shown and panicked: found by a review).
        if self.headlines < PROBLEMS_SHOWN_MAX {
            self.problems.insert(self.headlines, message.into());
            self.headlines += 1;
            self.problems.truncate(PROBLEMS_SHOWN_MAX);
        }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T> {
    serde_json::from_slice(bytes).with_context(|| format!("parse {}", path.display()))
}

fn check_signature(c: &Checkpoint, trusted: Option<&Trusted>, what: &str, findings: &mut Findings) -> bool {
    if c.format != CHECKPOINT_FORMAT {
        findings.problem(format!("{what}: unknown format {:?}", c.format));
        return false;
    }
    if let Some(trusted) = trusted
        && !trusted.key.eq_ignore_ascii_case(&c.public_key)
    {
        findings.problem(format!("{what}: signed by key {}, not by {} ({})", c.public_key, trusted.whose, trusted.key));
        return false;
    }
    let verified = verifying_key(&c.public_key).and_then(|key| {
        let signature: [u8; 64] =
            unhex(&c.signature).and_then(|s| s.try_into().ok()).ok_or_else(|| anyhow!("not 128 hex digits"))?;
        key.verify(checkpoint_message(c).as_bytes(), &Signature::from_bytes(&signature)).map_err(|e| anyhow!("{e}"))
    });
    match verified {
        Ok(()) => true,
        Err(e) => {
            findings.problem(format!("{what}: the signature does not verify ({e:#})"));
            false
        }
    }
}

/// The key a bundle must be signed with, and how the auditor named it.
struct Trusted {
    key: String,
    whose: &'static str,
}

/// The rows of a data file as JSON objects, whichever format it is in, read a row at a time;
/// every byte read is counted and hashed (SHA-256) for the file's digest.
struct Rows<'a> {
    reader: std::io::BufReader<Box<dyn Read + 'a>>,
    format: Format,
    hasher: Sha256,
    bytes: u64,
    /// The row being read, reused.
    text: Vec<u8>,
    /// Rows read (the CSV header included), for messages.
    rows: u64,
}

impl<'a> Rows<'a> {
    fn new(reader: Box<dyn Read + 'a>, format: Format) -> Self {
        Rows {
            reader: std::io::BufReader::with_capacity(1 << 16, reader),
            format,
            hasher: Sha256::new(),
            bytes: 0,
            text: Vec::new(),
            rows: 0,
        }
    }

    /// Appends the next line (with its `\n`) to `text`, at most [`ROW_BYTES_MAX`] bytes of it;
    /// `false` at the end of the file.
    fn read_line(&mut self) -> Result<bool> {
        let room = (ROW_BYTES_MAX + 1).saturating_sub(self.text.len()) as u64;
        let start = self.text.len();
        let read = (&mut self.reader).take(room).read_until(b'\n', &mut self.text)?;
        self.hasher.update(&self.text[start..]);
        self.bytes += read as u64;
        if self.text.len() > ROW_BYTES_MAX {
            bail!("row {} is longer than {ROW_BYTES_MAX} bytes", self.rows + 1);
        }
        Ok(read > 0)
    }

    /// The next row, `None` at the end of the file.
    fn next_row(&mut self) -> Result<Option<Map<String, Value>>> {
        self.text.clear();
        match self.format {
            Format::Jsonl => {
                if !self.read_line()? {
                    return Ok(None);
                }
                self.rows += 1;
                let line = self.text.strip_suffix(b"\n").unwrap_or(&self.text);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                match serde_json::from_slice(line) {
                    Ok(Value::Object(map)) => Ok(Some(map)),
                    _ => Err(anyhow!("line {} is not a JSON object", self.rows)),
                }
            }
            Format::Csv => {
                if self.rows == 0 {
                    let header = self.csv_record()?.ok_or_else(|| anyhow!("the CSV file has no header"))?;
                    if header != COLUMNS {
                        bail!("the CSV header is not {}", COLUMNS.join(","));
                    }
                    self.text.clear();
                }
                let Some(cells) = self.csv_record()? else { return Ok(None) };
                if cells.len() != COLUMNS.len() {
                    bail!("a CSV row has {} cells, not {}", cells.len(), COLUMNS.len());
                }
                let mut map = Map::new();
                for (column, cell) in COLUMNS.iter().zip(cells) {
                    let value = match *column {
                        "seq" | "recorded_at_us" | "stream_version" | "schema_version" | "data" => {
                            serde_json::from_str(&cell).unwrap_or(Value::String(cell))
                        }
                        _ => Value::String(cell),
                    };
                    map.insert((*column).into(), value);
                }
                Ok(Some(map))
            }
        }
    }

    /// The next CSV record's cells: lines are joined while a quoted field is open (the
    /// quotes in a record are even once it is whole: a quote inside a field is doubled).
    fn csv_record(&mut self) -> Result<Option<Vec<String>>> {
        // Counted over each line as it comes: counting the whole record again after every line
        // took quadratic time on a field of many short lines.
        let mut quotes = 0usize;
        loop {
            let start = self.text.len();
            if !self.read_line()? {
                if self.text.is_empty() {
                    return Ok(None);
                }
                break;
            }
            quotes += self.text[start..].iter().filter(|b| **b == b'"').count();
            if quotes.is_multiple_of(2) {
                break;
            }
        }
        self.rows += 1;
        let text = std::str::from_utf8(&self.text).with_context(|| format!("row {} is not UTF-8", self.rows))?;
        // A quote inside an unquoted field joined two records here; the second was dropped
        // without a word (found by review).
        let mut records = parse_csv(text)?.into_iter();
        match (records.next(), records.next()) {
            (Some(cells), None) => Ok(Some(cells)),
            (None, _) => Ok(None),
            (Some(_), Some(_)) => {
                bail!("row {} runs into the next one (a stray quote in an unquoted field)", self.rows)
            }
        }
    }

    /// Reads what is left of the file into the digest; its size and SHA-256.
    fn finish(mut self) -> std::io::Result<(u64, String)> {
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let read = self.reader.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            self.hasher.update(&buffer[..read]);
            self.bytes += read as u64;
        }
        Ok((self.bytes, hex(&self.hasher.finalize())))
    }
}

/// A small RFC 4180 reader (quoted fields, doubled quotes, CRLF or LF).
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                any = false;
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        bail!("the CSV file ends inside a quoted field (truncated?)");
    }
    if any {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

/// Checks one row against its stored body and the chain; returns the hash to chain on.
fn check_row(row: &Map<String, Value>, expected_seq: u64, prev: &Hash, findings: &mut Findings) -> Option<Hash> {
    let position = findings.records_checked + 1;
    let at = |m: &str| format!("record at position {position} (seq {expected_seq} expected): {m}");
    let seq = row.get("seq").and_then(Value::as_u64);
    if seq != Some(expected_seq) {
        findings.problem(at(&format!(
            "has seq {}, so a record was deleted, inserted or reordered here",
            seq.map_or("none".into(), |s| s.to_string())
        )));
    }
    let text = |name: &str| row.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
    let Some(hash) = unhex(&text("hash")).and_then(|h| <Hash>::try_from(h).ok()) else {
        findings.problem(at("its hash is not 64 hex digits"));
        return None;
    };
    let Some(body) = unhex(&text("body")) else {
        findings.problem(at("its body is not hex"));
        return Some(hash);
    };
    if text("prev_hash") != hex(prev) {
        findings.problem(at("its prev_hash is not the hash of the record before it"));
    }
    if chain_hash(prev, expected_seq, &body) != hash {
        findings.problem(at("the chain hash does not recompute from the previous record and this body"));
    }
    let record = match decode_stored_body(expected_seq, hash, &body) {
        Ok(record) => record,
        Err(e) => {
            findings.problem(at(&format!("the stored body does not decode: {e}")));
            return Some(hash);
        }
    };
    let event = match decode_event(&record) {
        Ok(event) => event,
        Err(e) => {
            findings.problem(at(&format!("the event does not decode: {e}")));
            return Some(hash);
        }
    };
    // The readable columns must say what the signed bytes say.
    let mut expected = record_json(&record, &event);
    expected.insert("recorded_at_us".into(), record.recorded_at_us.into());
    expected.insert("data".into(), event_data(&event));
    for (name, value) in &expected {
        if name == "seq" || name == "hash" {
            continue;
        }
        if row.get(name) != Some(value) {
            findings.problem(at(&format!("column {name} differs from the record's stored body")));
        }
    }
    Some(hash)
}

/// Most bytes of `manifest.json` and of `checkpoint.json` read.
pub const MANIFEST_BYTES_MAX: u64 = 16 << 20;
/// Bytes a data file may hold beyond the size its manifest states and still be read, so that
/// the records inserted into it are named; a larger file is reported without being read.
pub const DATA_FILE_SLACK_BYTES: u64 = 1 << 20;
/// Longest row (a line of JSONL, a record of CSV) of a data file. A record's payload is at most
/// `eventlog::record::PAYLOAD_BYTES_MAX` (4 MiB: a task created with its steps' payloads); its
/// row holds it as hex (twice), again as JSON in `data` (where CSV doubles every quote: twice
/// more), and a few hundred bytes beside: 64 MiB leaves room, and no longer row is read into
/// memory. (A 4 MiB limit failed an honest bundle with a 2.4 MB task: found by review.)
pub const ROW_BYTES_MAX: usize = 16 * eventlog::record::PAYLOAD_BYTES_MAX;

/// Most bytes of the data file `file` read: its stated size and the slack.
fn data_file_limit(file: &FileEntry) -> u64 {
    file.bytes.saturating_add(DATA_FILE_SLACK_BYTES)
}

/// Opens the bundle file `path` if it is a regular file of at most `limit` bytes, for reading no
/// more than one byte past it: a bundle comes from outside, and its files were read whole
/// whatever their size (a 2 GB file, or a link to `/dev/zero`, took gigabytes: found by a
/// black-box check).
pub fn open_bounded(path: &Path, limit: u64) -> std::io::Result<Box<dyn Read>> {
    // Looked at before it is opened: opening a FIFO would wait for a writer forever. A symbolic
    // link is not followed: the bundle's file is the one in the bundle.
    let regular = |metadata: &std::fs::Metadata| {
        if metadata.is_file() { Ok(()) } else { Err(std::io::Error::other("not a regular file")) }
    };
    regular(&std::fs::symlink_metadata(path)?)?;
    let file = std::fs::File::open(path)?;
    let metadata = file.metadata()?;
    regular(&metadata)?;
    bounded(metadata.len(), limit)?;
    Ok(Box::new(file.take(limit.saturating_add(1))))
}

/// `Ok` when `len` bytes are within `limit`; else the error [`verify_bundle`]'s readers give.
pub fn bounded(len: u64, limit: u64) -> std::io::Result<()> {
    if len > limit {
        return Err(std::io::Error::other(format!("{len} bytes, more than the {limit} it may hold; not read")));
    }
    Ok(())
}

/// How [`verify_bundle`] opens a bundle's file by name: a reader of at most the given number of
/// bytes (and one more, to tell a larger file), or an error when it cannot or may not be read.
pub type Open<'a> = &'a dyn Fn(&str, u64) -> std::io::Result<Box<dyn Read + 'a>>;

/// The whole of a small file of the bundle (the manifest, the checkpoint).
fn read_small(open: Open<'_>, name: &str, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    open(name, limit)?.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    bounded(bytes.len() as u64, limit)?;
    Ok(bytes)
}

/// Verifies the bundle in directory `dir`, opening its files by name through `open` (the file
/// system in `verify-export`, memory in the fuzz target): the signature, every file's digest,
/// every record against its stored body and the chain, and — given `earlier`, a checkpoint the
/// auditor kept (its path and bytes) — that the bundle extends it. `trusted` is the hex public
/// key the auditor trusts; without it, the earlier checkpoint's signer. Data files are read as
/// a stream, a row at a time, so a bundle of any size takes the memory of one row (they were
/// read whole and parsed into maps, about ten times their size). Problems found are findings;
/// `Err` only when the manifest or checkpoint cannot be read or parsed at all.
pub fn verify_bundle(
    dir: &Path,
    open: Open<'_>,
    present: Option<&[String]>,
    trusted: Option<&str>,
    earlier: Option<(&Path, &[u8])>,
) -> Result<Findings> {
    let mut findings = Findings { bundle: dir.display().to_string(), ..Findings::default() };
    // A manifest or checkpoint missing or unreadable is the bundle's problem (exit status 1),
    // not the tool's: nothing further can be checked without them.
    let load = |name: &str| -> Result<Vec<u8>> {
        read_small(open, name, MANIFEST_BYTES_MAX).with_context(|| format!("read {}", dir.join(name).display()))
    };
    let signed = load(MANIFEST_FILE).and_then(|manifest_bytes| {
        let manifest: Manifest = parse_json(&manifest_bytes, &dir.join(MANIFEST_FILE))?;
        let checkpoint: Checkpoint = parse_json(&load(CHECKPOINT_FILE)?, &dir.join(CHECKPOINT_FILE))?;
        Ok((manifest_bytes, manifest, checkpoint))
    });
    let (manifest_bytes, manifest, checkpoint) = match signed {
        Ok(signed) => signed,
        Err(e) => {
            findings.problem(format!("{e:#}"));
            return Ok(findings);
        }
    };
    findings.data_files = manifest.files.iter().map(|file| file.name.clone()).collect();
    // A file the signed manifest does not name was added after signing: a reader could take a
    // forged `events.jsonl` beside a signed `events.csv` for the bundle's data.
    for name in present.into_iter().flatten() {
        if name != MANIFEST_FILE && name != CHECKPOINT_FILE && !findings.data_files.contains(name) {
            findings.headline(format!("{name} is in the bundle but not in its signed manifest (added after signing)"));
        }
    }
    let earlier = match earlier {
        Some((path, bytes)) => Some((path, parse_json::<Checkpoint>(bytes, path)?)),
        None => None,
    };
    findings.first_seq = manifest.first_seq;
    findings.last_seq = manifest.last_seq;
    findings.signed_by = checkpoint.public_key.clone();

    // 1. The signature, and that it covers this manifest. Without --pubkey, the key that signed
    // the checkpoint the auditor kept is the one trusted: otherwise anyone could sign a bundle
    // that continues the chain from it with a key of their own.
    let trusted = match (trusted, &earlier) {
        (Some(key), _) => Some(Trusted { key: key.to_owned(), whose: "the key you trust" }),
        (None, Some((_, kept))) => {
            Some(Trusted { key: kept.public_key.clone(), whose: "the key that signed your earlier checkpoint" })
        }
        (None, None) => None,
    };
    let signature_ok = check_signature(&checkpoint, trusted.as_ref(), "checkpoint.json", &mut findings);
    findings.key_trusted = signature_ok && trusted.is_some();
    // A bundle's own key proves nothing against tampering: whoever changes the data can sign the
    // changed bundle with a key of their own, consistent in every other check. It was reported
    // as intact (exit 0) with a hint in the signer line (found by a review).
    if trusted.is_none() {
        findings.headline(
            "nobody you trust signed it: the bundle's own key proves nothing (whoever changed a bundle can sign it \
             again), so pass --pubkey with the exporter's public key, or --checkpoint with a checkpoint.json you kept",
        );
    }
    if sha256_hex(&manifest_bytes) != checkpoint.manifest_sha256 {
        findings.problem("manifest.json was modified after it was signed (its SHA-256 is not the checkpoint's)");
    }
    if manifest.format != BUNDLE_FORMAT {
        findings.problem(format!("manifest.json: unknown format {:?}", manifest.format));
    }
    let claims = [
        ("first_seq", manifest.first_seq.to_string(), checkpoint.first_seq.to_string()),
        ("last_seq", manifest.last_seq.to_string(), checkpoint.last_seq.to_string()),
        ("records", manifest.records.to_string(), checkpoint.records.to_string()),
        ("prev_hash", manifest.prev_hash.clone(), checkpoint.prev_hash.clone()),
        ("last_hash", manifest.last_hash.clone(), checkpoint.last_hash.clone()),
    ];
    for (name, in_manifest, in_checkpoint) in claims {
        if in_manifest != in_checkpoint {
            findings.problem(format!("manifest {name} {in_manifest} differs from the signed {in_checkpoint}"));
        }
    }
    // The signed range must hold exactly the signed number of records (`extends` relies on it).
    let range_holds = match checkpoint.records {
        0 => checkpoint.last_seq.checked_add(1) == Some(checkpoint.first_seq),
        n => checkpoint.first_seq.checked_add(n - 1) == Some(checkpoint.last_seq),
    };
    if !range_holds {
        findings.headline(format!(
            "the checkpoint signs seq {}..{} but {} records",
            checkpoint.first_seq, checkpoint.last_seq, checkpoint.records
        ));
    }
    let mut summary = Summary::default();

    // 2. Every record against its body and the chain, and every file's digest. The hash the
    // bundle gives the last record of the earlier checkpoint is noted on the way (step 3).
    let kept_seq = earlier.as_ref().map(|(_, kept)| kept.last_seq);
    let mut kept_hash = None;
    let mut prev: Hash = unhex(&checkpoint.prev_hash).and_then(|h| h.try_into().ok()).unwrap_or(GENESIS_HASH);
    for file in &manifest.files {
        if file.name.contains(['/', '\\']) || file.name.starts_with('.') {
            findings.problem(format!("manifest names a file outside the bundle: {:?}", file.name));
            continue;
        }
        let limit = data_file_limit(file);
        let checked_before = findings.records_checked;
        let mut rows = match open(&file.name, limit) {
            Ok(reader) => Rows::new(reader, file.format),
            Err(e) => {
                findings.problem(format!("{}: cannot be read ({e})", file.name));
                continue;
            }
        };
        loop {
            match rows.next_row() {
                Ok(Some(row)) => {
                    let expected_seq = checkpoint.first_seq + findings.records_checked;
                    if kept_seq.is_some() && row.get("seq").and_then(Value::as_u64) == kept_seq {
                        kept_hash = row.get("hash").and_then(Value::as_str).map(str::to_owned);
                    }
                    if let Some(hash) = check_row(&row, expected_seq, &prev, &mut findings) {
                        prev = hash;
                    }
                    summary.add(&row);
                    findings.records_checked += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    findings.problem(format!("{}: {e:#}", file.name));
                    break;
                }
            }
        }
        let in_file = findings.records_checked - checked_before;
        if in_file != file.records {
            findings.headline(format!("{}: holds {in_file} records, the manifest says {}", file.name, file.records));
        }
        match rows.finish() {
            Ok((bytes, _)) if bytes > limit => {
                findings.problem(format!("{}: cannot be read ({})", file.name, bounded(bytes, limit).unwrap_err()));
            }
            Ok((bytes, sha256)) if bytes != file.bytes || sha256 != file.sha256 => findings.headline(format!(
                "{}: its SHA-256 or size differs from the manifest (the file was modified)",
                file.name
            )),
            Ok(_) => {}
            Err(e) => findings.problem(format!("{}: cannot be read ({e})", file.name)),
        }
    }
    if findings.records_checked != checkpoint.records {
        findings.headline(format!(
            "the bundle holds {} records, the checkpoint signed {} (records were deleted, inserted or truncated)",
            findings.records_checked, checkpoint.records
        ));
    }
    if hex(&prev) != checkpoint.last_hash {
        findings.headline("the chain does not end at the signed last hash (truncated or rewritten)");
    }
    // What the manifest says of the records, against the records (each row's columns were
    // checked against its signed body): a signer's summary is not taken on trust.
    let said = [
        ("counts_by_type", format!("{:?}", manifest.counts_by_type), format!("{:?}", summary.by_type)),
        ("counts_by_actor", format!("{:?}", manifest.counts_by_actor), format!("{:?}", summary.by_actor)),
        ("first_hash", manifest.first_hash.clone(), summary.first_hash.clone().unwrap_or_default()),
        ("first_recorded_at", manifest.first_recorded_at.clone(), summary.first_at.clone().unwrap_or_default()),
        ("last_recorded_at", manifest.last_recorded_at.clone(), summary.last_at.clone().unwrap_or_default()),
    ];
    for (name, in_manifest, in_records) in said {
        if findings.records_checked > 0 && in_manifest != in_records {
            findings.headline(format!("manifest {name} {in_manifest} is not what the records say: {in_records}"));
        }
    }

    // 3. Does it extend the checkpoint the auditor kept?
    if let Some((path, earlier)) = earlier {
        let what = format!("earlier checkpoint {}", path.display());
        let earlier_ok = check_signature(&earlier, trusted.as_ref(), &what, &mut findings);
        let extends = earlier_ok && extends(&earlier, &checkpoint, kept_hash, &mut findings);
        findings.extends_checkpoint = Some(extends);
    }

    findings.clean = findings.problems_total == 0;
    Ok(findings)
}

/// What the rows of a bundle say of themselves, for the manifest's summary of them.
#[derive(Default)]
struct Summary {
    by_type: BTreeMap<String, u64>,
    by_actor: BTreeMap<String, u64>,
    first_hash: Option<String>,
    first_at: Option<String>,
    last_at: Option<String>,
}

impl Summary {
    fn add(&mut self, row: &Map<String, Value>) {
        let text = |name: &str| row.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
        *self.by_type.entry(text("type")).or_default() += 1;
        *self.by_actor.entry(text("actor")).or_default() += 1;
        self.first_hash.get_or_insert_with(|| text("hash"));
        self.first_at.get_or_insert_with(|| text("recorded_at"));
        self.last_at = Some(text("recorded_at"));
    }
}

/// Whether `bundle` continues the history `earlier` signed.
fn extends(earlier: &Checkpoint, bundle: &Checkpoint, kept_hash: Option<String>, findings: &mut Findings) -> bool {
    let seq = earlier.last_seq;
    if seq > bundle.last_seq {
        findings.problem(format!(
            "the bundle ends at seq {}, before the checkpoint you hold at seq {seq}: it is stale (older than, or a \
             rollback of, what you already have)",
            bundle.last_seq
        ));
        return false;
    }
    if seq + 1 == bundle.first_seq {
        if earlier.last_hash != bundle.prev_hash {
            findings.problem(format!(
                "the bundle does not extend your checkpoint: it links to {} before seq {}, your checkpoint says {}",
                bundle.prev_hash, bundle.first_seq, earlier.last_hash
            ));
            return false;
        }
        return true;
    }
    if seq < bundle.first_seq {
        findings.problem(format!(
            "the bundle starts at seq {}, after your checkpoint at seq {seq}: export from seq {} to show it extends it",
            bundle.first_seq,
            seq + 1
        ));
        return false;
    }
    // The checkpoint's last record is inside the range: its hash must be there.
    match kept_hash {
        Some(hash) if hash == earlier.last_hash => true,
        Some(hash) => {
            findings.problem(format!(
                "history was rewritten: seq {seq} has hash {hash} in this bundle, your checkpoint says {}",
                earlier.last_hash
            ));
            false
        }
        None => {
            findings.problem(format!("the bundle has no record {seq} to compare with your checkpoint"));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows read, up to the first error, and the file's size and digest.
    type RowsRead = (Vec<Result<Map<String, Value>, String>>, (u64, String));

    fn rows_of(bytes: &'static [u8], format: Format) -> RowsRead {
        let mut rows = Rows::new(Box::new(bytes), format);
        let mut read = Vec::new();
        loop {
            match rows.next_row() {
                Ok(Some(row)) => read.push(Ok(row)),
                Ok(None) => break,
                Err(e) => {
                    read.push(Err(e.to_string()));
                    break;
                }
            }
        }
        (read, rows.finish().unwrap())
    }

    /// Whole-bundle problems go first, rows' after them; past the shown maximum both are counted
    /// and not shown (a 52nd headline panicked).
    #[test]
    fn headlines_go_first_and_past_the_maximum_are_only_counted() {
        let mut findings = Findings::default();
        findings.problem("row 1");
        for n in 0..PROBLEMS_SHOWN_MAX + 5 {
            findings.headline(format!("headline {n}"));
            findings.problem("row");
        }
        assert_eq!(findings.problems_total, 1 + 2 * (PROBLEMS_SHOWN_MAX + 5));
        assert_eq!(findings.problems.len(), PROBLEMS_SHOWN_MAX);
        assert!(findings.problems.iter().enumerate().all(|(n, p)| *p == format!("headline {n}")));
    }

    /// Rows are read one at a time as the whole-file reader read them, and the digest covers
    /// every byte, also those after a row that does not parse.
    #[test]
    fn rows_stream_from_the_file_and_its_digest_covers_every_byte() {
        let jsonl: &[u8] = b"{\"seq\": 1}\r\n{\"seq\": 2}\n{\"seq\": 3}";
        let (rows, (bytes, sha256)) = rows_of(jsonl, Format::Jsonl);
        let seqs: Vec<_> = rows.iter().map(|r| r.as_ref().unwrap()["seq"].as_u64().unwrap()).collect();
        assert_eq!((seqs, bytes, sha256), (vec![1, 2, 3], jsonl.len() as u64, sha256_hex(jsonl)));
        let broken: &[u8] = b"{\"seq\": 1}\nnot json\n{\"seq\": 3}\n";
        let (rows, (bytes, sha256)) = rows_of(broken, Format::Jsonl);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].as_ref().unwrap_err(), "line 2 is not a JSON object");
        assert_eq!((bytes, sha256), (broken.len() as u64, sha256_hex(broken)));

        let header = COLUMNS.join(",");
        let cells =
            |seq: u64, data: &str| format!("{seq},t,1,s,1,c,\"an actor, with a comma\",type,1,\"{data}\",p,h,b\n");
        let csv = format!("{header}\n{}{}", cells(1, "{\"\"k\"\":\n\"\"a, b\"\"}"), cells(2, "null"));
        let csv: &'static [u8] = Box::leak(csv.into_bytes().into_boxed_slice());
        let (rows, (bytes, _)) = rows_of(csv, Format::Csv);
        let rows: Vec<_> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["data"], serde_json::json!({ "k": "a, b" }));
        assert_eq!(rows[0]["actor"], "an actor, with a comma");
        assert_eq!(rows[1]["seq"], 2);
        assert_eq!(bytes, csv.len() as u64);
        let stray = format!("{header}\n{}{}", cells(1, "null").replacen(",s,", ",s\",", 1), cells(2, "null"));
        let (rows, _) = rows_of(Box::leak(stray.into_bytes().into_boxed_slice()), Format::Csv);
        assert!(rows[0].as_ref().unwrap_err().contains("runs into the next one"), "{rows:?}");
        let (rows, _) = rows_of(b"seq,nope\n1,2\n", Format::Csv);
        assert!(rows[0].as_ref().unwrap_err().starts_with("the CSV header is not"));
        let truncated = format!("{header}\n1,\"open");
        let (rows, _) = rows_of(Box::leak(truncated.into_bytes().into_boxed_slice()), Format::Csv);
        assert!(rows[0].as_ref().unwrap_err().contains("ends inside a quoted field"), "{rows:?}");
    }

    /// A quoted field of a million short lines is one record, read in one pass (counting its
    /// quotes again after every line took minutes).
    #[test]
    fn a_csv_field_of_many_lines_is_read_in_one_pass() {
        let mut csv = COLUMNS.join(",").into_bytes();
        csv.extend_from_slice(b"\n1,\"");
        csv.extend(std::iter::repeat_n(b'\n', 1_000_000));
        csv.extend_from_slice(b"\"\n");
        let (rows, (bytes, _)) = rows_of(Box::leak(csv.into_boxed_slice()), Format::Csv);
        assert!(rows[0].as_ref().unwrap_err().contains("cells"), "{rows:?}");
        assert!(bytes > 1_000_000);
    }

    /// A row longer than [`ROW_BYTES_MAX`] is refused without being held whole.
    #[test]
    fn a_row_too_long_is_refused() {
        let long: &'static [u8] = Box::leak(vec![b'x'; ROW_BYTES_MAX + 10].into_boxed_slice());
        let mut rows = Rows::new(Box::new(long), Format::Jsonl);
        let error = rows.next_row().unwrap_err().to_string();
        assert!(error.contains("longer than"), "{error}");
        assert!(rows.text.len() <= ROW_BYTES_MAX + 1);
        assert_eq!(rows.finish().unwrap().0, long.len() as u64);
    }
}
