//! The audit-bundle format and its offline verifier, shared by `export-audit` /
//! `verify-export` (`audit.rs` in the binary) and the fuzz targets (`fuzz/`),
//! which is why it lives in the library: parsing a bundle someone handed you is
//! the tool's most exposed input. Reading goes through a caller's function, so
//! the same code checks a directory or bytes in memory.

use std::collections::BTreeMap;
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
    pub records_checked: u64,
    pub signed_by: String,
    pub key_trusted: bool,
    pub extends_checkpoint: Option<bool>,
    pub problems: Vec<String>,
    pub problems_total: usize,
    pub clean: bool,
}

impl Findings {
    fn problem(&mut self, message: impl Into<String>) {
        self.problems_total += 1;
        if self.problems.len() < PROBLEMS_SHOWN_MAX {
            self.problems.push(message.into());
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

/// Most bytes of `manifest.json` and of `checkpoint.json` read.
pub const MANIFEST_BYTES_MAX: u64 = 16 << 20;
/// Bytes a data file may hold beyond the size its manifest states and still be read, so that
/// the records inserted into it are named; a larger file is reported without being read.
pub const DATA_FILE_SLACK_BYTES: u64 = 1 << 20;
/// The largest data file, whatever the manifest says: `verify-export` holds it in memory, and
/// `export-audit` refuses a range that would need a larger one (about 2 million events).
pub const DATA_FILE_BYTES_MAX: u64 = 2 << 30;

/// Most bytes of the data file `file` read: its stated size and the slack, within
/// [`DATA_FILE_BYTES_MAX`].
fn data_file_limit(file: &FileEntry) -> u64 {
    file.bytes.saturating_add(DATA_FILE_SLACK_BYTES).min(DATA_FILE_BYTES_MAX)
}

/// Reads the bundle file `path` if it is a regular file of at most `limit` bytes: a bundle
/// comes from outside, and its files were read whole whatever their size (a 2 GB file, or a
/// link to `/dev/zero`, took gigabytes: found by a black-box check).
pub fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    // Looked at before it is opened: opening a FIFO would wait for a writer forever.
    let regular = |metadata: &std::fs::Metadata| {
        if metadata.is_file() { Ok(()) } else { Err(std::io::Error::other("not a regular file")) }
    };
    regular(&std::fs::metadata(path)?)?;
    let file = std::fs::File::open(path)?;
    let metadata = file.metadata()?;
    regular(&metadata)?;
    bounded(metadata.len(), limit)?;
    // Grown as it is read, not reserved from the size: a sparse file's size costs nothing to claim.
    let mut bytes = Vec::with_capacity(metadata.len().min(64 << 20) as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    bounded(bytes.len() as u64, limit)?;
    Ok(bytes)
}

/// `Ok` when `len` bytes are within `limit`; else the error [`verify_bundle`]'s readers give.
pub fn bounded(len: u64, limit: u64) -> std::io::Result<()> {
    if len > limit {
        return Err(std::io::Error::other(format!("{len} bytes, more than the {limit} it may hold; not read")));
    }
    Ok(())
}

/// Verifies the bundle in directory `dir`, reading its files by name through `read`, which
/// refuses a file of more bytes than its second argument (the file system in
/// `verify-export`, memory in the fuzz target): the signature, every file's
/// digest, every record against its stored body and the chain, and — given `earlier`, a
/// checkpoint the auditor kept (its path and bytes) — that the bundle extends it. `trusted`
/// is the hex public key the auditor trusts; without it, the earlier checkpoint's signer. Problems found are findings; `Err` only when
/// the manifest or checkpoint cannot be read or parsed at all.
pub fn verify_bundle(
    dir: &Path,
    read: &dyn Fn(&str, u64) -> std::io::Result<Vec<u8>>,
    trusted: Option<&str>,
    earlier: Option<(&Path, &[u8])>,
) -> Result<Findings> {
    let mut findings = Findings { bundle: dir.display().to_string(), ..Findings::default() };
    let load =
        |name: &str| read(name, MANIFEST_BYTES_MAX).with_context(|| format!("read {}", dir.join(name).display()));
    let manifest_bytes = load(MANIFEST_FILE)?;
    let manifest: Manifest = parse_json(&manifest_bytes, &dir.join(MANIFEST_FILE))?;
    let checkpoint: Checkpoint = parse_json(&load(CHECKPOINT_FILE)?, &dir.join(CHECKPOINT_FILE))?;
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
        if file.name.contains(['/', '\\']) || file.name.starts_with('.') {
            findings.problem(format!("manifest names a file outside the bundle: {:?}", file.name));
            continue;
        }
        let bytes = match read(&file.name, data_file_limit(file)) {
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
    if let Some((path, earlier)) = earlier {
        let what = format!("earlier checkpoint {}", path.display());
        let earlier_ok = check_signature(&earlier, trusted.as_ref(), &what, &mut findings);
        let extends = earlier_ok && extends(&earlier, &checkpoint, read, &manifest, &mut findings);
        findings.extends_checkpoint = Some(extends);
    }

    findings.clean = findings.problems_total == 0;
    Ok(findings)
}

/// Whether `bundle` continues the history `earlier` signed.
fn extends(
    earlier: &Checkpoint,
    bundle: &Checkpoint,
    read: &dyn Fn(&str, u64) -> std::io::Result<Vec<u8>>,
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
        let bytes = read(&file.name, data_file_limit(file)).ok()?;
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
