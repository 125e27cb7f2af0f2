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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use domain::Timestamp;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use eventlog::fold::decode_event;
use eventlog::json::{event_data, hex, record_json, unhex};
use eventlog::record::{chain_hash, decode_stored_body, stored_body};
use eventlog::{GENESIS_HASH, Hash};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::progress::Progress;
use crate::source::{Point, Source};
use crate::{Input, Outcome};

pub const BUNDLE_FORMAT: &str = "taskledger-audit-bundle/1";
pub const CHECKPOINT_FORMAT: &str = "taskledger-checkpoint/1";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const CHECKPOINT_FILE: &str = "checkpoint.json";
/// Problems listed before `verify-export` stops listing (it still counts them).
const PROBLEMS_SHOWN_MAX: usize = 50;
/// The columns of an exported record, in CSV order.
const COLUMNS: [&str; 13] = [
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
    /// The public key you trust (from `keygen`); without it the bundle's own key is used,
    /// which proves integrity but not who signed.
    #[arg(long, value_name = "FILE")]
    pubkey: Option<PathBuf>,
    /// A checkpoint.json you kept from an earlier bundle: this bundle must extend it.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct FileEntry {
    name: String,
    format: Format,
    bytes: u64,
    sha256: String,
    records: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Manifest {
    format: String,
    first_seq: u64,
    last_seq: u64,
    records: u64,
    first_recorded_at: String,
    last_recorded_at: String,
    /// Chain hash of record `first_seq - 1` (zeros for the first record of the log).
    prev_hash: String,
    first_hash: String,
    last_hash: String,
    /// The log's head when the bundle was made.
    ledger_head_seq: u64,
    counts_by_type: BTreeMap<String, u64>,
    counts_by_actor: BTreeMap<String, u64>,
    chain_hash: String,
    files: Vec<FileEntry>,
    exported_at: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Checkpoint {
    format: String,
    first_seq: u64,
    last_seq: u64,
    records: u64,
    prev_hash: String,
    last_hash: String,
    manifest_sha256: String,
    public_key: String,
    signature: String,
}

/// The exact text a checkpoint's signature covers.
fn checkpoint_message(c: &Checkpoint) -> String {
    format!(
        "{CHECKPOINT_FORMAT}\nfirst_seq={}\nlast_seq={}\nrecords={}\nprev_hash={}\nlast_hash={}\nmanifest_sha256={}\n",
        c.first_seq, c.last_seq, c.records, c.prev_hash, c.last_hash, c.manifest_sha256
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn read_key_hex(path: &Path, what: &str) -> Result<[u8; 32]> {
    let text = fs::read_to_string(path).with_context(|| format!("read {what} {}", path.display()))?;
    let bytes = unhex(text.trim()).filter(|b| b.len() == 32).ok_or_else(|| {
        anyhow!("{what} {} is not 64 hex digits (make keys with `taskledger-replay keygen`)", path.display())
    })?;
    Ok(bytes.try_into().expect("checked length"))
}

fn verifying_key(hex_text: &str) -> Result<VerifyingKey> {
    let bytes: [u8; 32] =
        unhex(hex_text).and_then(|b| b.try_into().ok()).ok_or_else(|| anyhow!("public key is not 64 hex digits"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| anyhow!("public key is not a valid Ed25519 key: {e}"))
}

pub fn keygen(prefix: &Path) -> Result<Outcome> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow!("read OS randomness: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    let secret_path = PathBuf::from(format!("{}.key", prefix.display()));
    let public_path = PathBuf::from(format!("{}.pub", prefix.display()));
    for path in [&secret_path, &public_path] {
        if path.exists() {
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
    writeln!(file, "{}", hex(&key.to_bytes())).with_context(|| format!("write {}", secret_path.display()))?;
    let public = hex(key.verifying_key().as_bytes());
    fs::write(&public_path, format!("{public}\n")).with_context(|| format!("write {}", public_path.display()))?;
    println!("secret key  {} (keep it private; it signs audit checkpoints)", secret_path.display());
    println!("public key  {} = {public}", public_path.display());
    Ok(Outcome::Clean)
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_owned() }
}

/// One exported row: the feed's record fields plus what offline checking needs.
fn row(record: &eventlog::StoredRecord, event: &domain::Event, prev: &Hash, body: &[u8]) -> Map<String, Value> {
    let mut map = record_json(record, event);
    map.insert("recorded_at_us".into(), record.recorded_at_us.into());
    map.insert("prev_hash".into(), hex(prev).into());
    map.insert("body".into(), hex(body).into());
    map
}

pub fn export(source: &Source, args: &ExportArgs) -> Result<Outcome> {
    let key = SigningKey::from_bytes(&read_key_hex(&args.key, "secret key")?);
    let head = source.head()?;
    let (first, last) = source.range(args.from, args.to)?;
    if first > last || last == 0 {
        bail!("the range is empty (seq {first}..{last}, head {})", head.seq);
    }
    if args.out.exists() && fs::read_dir(&args.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("write bundle to {}: the directory is not empty", args.out.display());
    }
    fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
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
    let mut out = std::io::BufWriter::new(file);
    if args.format == Format::Csv {
        writeln!(out, "{}", COLUMNS.join(","))?;
    }
    let mut prev = prev_hash;
    let mut records = 0u64;
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_actor: BTreeMap<String, u64> = BTreeMap::new();
    let (mut first_at, mut last_at, mut first_hash) = (String::new(), String::new(), String::new());
    let progress = Progress::new(last, "exporting");
    source.scan(first, last, &progress, |record| {
        let event = decode_event(record).map_err(|e| anyhow!("{e}"))?;
        let body = stored_body(record);
        if chain_hash(&prev, record.seq, &body) != record.hash {
            bail!("record {}: its chain hash does not recompute; run `verify` before exporting", record.seq);
        }
        let row = row(record, &event, &prev, &body);
        match args.format {
            Format::Jsonl => writeln!(out, "{}", Value::Object(row))?,
            Format::Csv => {
                let cells: Vec<String> = COLUMNS
                    .iter()
                    .map(|c| match &row[*c] {
                        Value::String(s) => csv_field(s),
                        other => csv_field(&other.to_string()),
                    })
                    .collect();
                writeln!(out, "{}", cells.join(","))?;
            }
        }
        if records == 0 {
            first_at = crate::source::time_of(record);
            first_hash = hex(&record.hash);
        }
        last_at = crate::source::time_of(record);
        records += 1;
        *by_type.entry(event.type_name().to_owned()).or_default() += 1;
        *by_actor.entry(record.actor.clone()).or_default() += 1;
        prev = record.hash;
        Ok(ControlFlow::Continue(()))
    })?;
    drop(progress);
    out.flush().with_context(|| format!("write {}", path.display()))?;
    drop(out);
    if records != last - first + 1 {
        bail!("read {records} records for seq {first}..{last}; the log is incomplete");
    }
    let data = fs::read(&path).with_context(|| format!("read back {}", path.display()))?;
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
            bytes: data.len() as u64,
            sha256: sha256_hex(&data),
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

/// Findings of `verify-export`, in order.
#[derive(Default, Serialize)]
struct Findings {
    bundle: String,
    first_seq: u64,
    last_seq: u64,
    records_checked: u64,
    signed_by: String,
    key_trusted: bool,
    extends_checkpoint: Option<bool>,
    problems: Vec<String>,
    problems_total: usize,
    clean: bool,
}

impl Findings {
    fn problem(&mut self, message: impl Into<String>) {
        self.problems_total += 1;
        if self.problems.len() < PROBLEMS_SHOWN_MAX {
            self.problems.push(message.into());
        }
    }
}

fn load_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<(T, Vec<u8>)> {
    let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let value = serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
    Ok((value, bytes))
}

fn check_signature(c: &Checkpoint, trusted: Option<&str>, what: &str, findings: &mut Findings) -> bool {
    if c.format != CHECKPOINT_FORMAT {
        findings.problem(format!("{what}: unknown format {:?}", c.format));
        return false;
    }
    if let Some(trusted) = trusted
        && !trusted.eq_ignore_ascii_case(&c.public_key)
    {
        findings.problem(format!("{what}: signed by key {}, not by the key you trust ({trusted})", c.public_key));
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

/// Rows of the events file as JSON objects, whichever format it is in.
fn read_rows(bytes: &[u8], format: Format) -> Result<Vec<Map<String, Value>>> {
    let text = std::str::from_utf8(bytes).context("the events file is not UTF-8")?;
    match format {
        Format::Jsonl => text
            .lines()
            .enumerate()
            .map(|(i, line)| match serde_json::from_str(line) {
                Ok(Value::Object(map)) => Ok(map),
                _ => Err(anyhow!("line {} is not a JSON object", i + 1)),
            })
            .collect(),
        Format::Csv => {
            let mut rows = parse_csv(text)?.into_iter();
            let header = rows.next().ok_or_else(|| anyhow!("the CSV file has no header"))?;
            if header != COLUMNS {
                bail!("the CSV header is not {}", COLUMNS.join(","));
            }
            rows.map(|cells| {
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
                Ok(map)
            })
            .collect()
        }
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

pub fn verify_export(args: &VerifyExportArgs) -> Result<Outcome> {
    let dir = &args.dir;
    let mut findings = Findings { bundle: dir.display().to_string(), ..Findings::default() };
    let (manifest, manifest_bytes): (Manifest, Vec<u8>) = load_json(&dir.join(MANIFEST_FILE))?;
    let (checkpoint, _): (Checkpoint, Vec<u8>) = load_json(&dir.join(CHECKPOINT_FILE))?;
    let trusted = args.pubkey.as_deref().map(|p| read_key_hex(p, "public key").map(|k| hex(&k))).transpose()?;
    findings.first_seq = manifest.first_seq;
    findings.last_seq = manifest.last_seq;
    findings.signed_by = checkpoint.public_key.clone();

    // 1. The signature, and that it covers this manifest.
    let signature_ok = check_signature(&checkpoint, trusted.as_deref(), "checkpoint.json", &mut findings);
    findings.key_trusted = signature_ok && trusted.is_some();
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

    // 2. Every file's digest, then every record against its body and the chain.
    let mut prev: Hash = unhex(&checkpoint.prev_hash).and_then(|h| h.try_into().ok()).unwrap_or(GENESIS_HASH);
    for file in &manifest.files {
        let path = dir.join(&file.name);
        if file.name.contains(['/', '\\']) || file.name.starts_with('.') {
            findings.problem(format!("manifest names a file outside the bundle: {:?}", file.name));
            continue;
        }
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                findings.problem(format!("{}: cannot be read ({e})", file.name));
                continue;
            }
        };
        if bytes.len() as u64 != file.bytes || sha256_hex(&bytes) != file.sha256 {
            findings.problem(format!(
                "{}: its SHA-256 or size differs from the manifest (the file was modified)",
                file.name
            ));
        }
        let rows = match read_rows(&bytes, file.format) {
            Ok(rows) => rows,
            Err(e) => {
                findings.problem(format!("{}: {e:#}", file.name));
                continue;
            }
        };
        for row in &rows {
            let expected_seq = checkpoint.first_seq + findings.records_checked;
            if let Some(hash) = check_row(row, expected_seq, &prev, &mut findings) {
                prev = hash;
            }
            findings.records_checked += 1;
        }
    }
    if findings.records_checked != checkpoint.records {
        findings.problem(format!(
            "the bundle holds {} records, the checkpoint signed {} (records were deleted, inserted or truncated)",
            findings.records_checked, checkpoint.records
        ));
    }
    if hex(&prev) != checkpoint.last_hash {
        findings.problem("the chain does not end at the signed last hash (truncated or rewritten)");
    }

    // 3. Does it extend the checkpoint the auditor kept?
    if let Some(path) = &args.checkpoint {
        let (earlier, _): (Checkpoint, Vec<u8>) = load_json(path)?;
        let what = format!("earlier checkpoint {}", path.display());
        let earlier_ok = check_signature(&earlier, trusted.as_deref(), &what, &mut findings);
        let extends = earlier_ok && extends(&earlier, &checkpoint, dir, &manifest, &mut findings);
        findings.extends_checkpoint = Some(extends);
    }

    findings.clean = findings.problems_total == 0;
    if args.json {
        println!("{}", serde_json::to_string(&findings)?);
    } else {
        let mut out = String::new();
        writeln!(out, "bundle {}", findings.bundle)?;
        writeln!(
            out,
            "  range      seq {}..{} ({} records checked)",
            findings.first_seq, findings.last_seq, findings.records_checked
        )?;
        let signer = if findings.key_trusted {
            "the key you trust"
        } else {
            "the key in the bundle (pass --pubkey to check who signed)"
        };
        writeln!(out, "  signed by  {} ({signer})", findings.signed_by)?;
        if let Some(extends) = findings.extends_checkpoint {
            writeln!(out, "  extends    the earlier checkpoint: {}", if extends { "yes" } else { "NO" })?;
        }
        for problem in &findings.problems {
            writeln!(out, "  PROBLEM    {problem}")?;
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

/// Whether `bundle` continues the history `earlier` signed.
fn extends(
    earlier: &Checkpoint,
    bundle: &Checkpoint,
    dir: &Path,
    manifest: &Manifest,
    findings: &mut Findings,
) -> bool {
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
    let found = manifest.files.iter().find_map(|file| {
        let bytes = fs::read(dir.join(&file.name)).ok()?;
        let rows = read_rows(&bytes, file.format).ok()?;
        rows.iter()
            .find(|r| r.get("seq").and_then(Value::as_u64) == Some(seq))
            .and_then(|r| r.get("hash").and_then(Value::as_str).map(str::to_owned))
    });
    match found {
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
