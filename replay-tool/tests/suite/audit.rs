//! Audit bundles end to end: `keygen`, `export-audit` (JSONL and CSV) and
//! `verify-export` offline. A fresh bundle verifies; every kind of tampering
//! — a modified, deleted, inserted, swapped or truncated record, a single
//! byte changed anywhere in the data file, an edited manifest, a bundle
//! re-signed with another key, a stale or foreign earlier checkpoint — is
//! detected with a non-zero exit and the problem named.

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::{build_bulk, build_story, path, replay, replay_ok, stdout};

struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    keys: PathBuf,
    root: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    build_story(&data, 0);
    let keys = dir.path().join("keys");
    replay_ok(&["keygen", "--out", path(&keys.join("auditor"))]);
    replay_ok(&["keygen", "--out", path(&keys.join("mallory"))]);
    Fixture { root: dir.path().to_path_buf(), _dir: dir, data, keys }
}

impl Fixture {
    fn export(&self, name: &str, extra: &[&str]) -> PathBuf {
        let out = self.root.join(name);
        let key = self.keys.join("auditor.key");
        let mut args = vec!["export-audit", "--data", path(&self.data), "--out", path(&out), "--key", path(&key)];
        args.extend_from_slice(extra);
        replay_ok(&args);
        out
    }

    fn pubkey(&self) -> String {
        path(&self.keys.join("auditor.pub")).to_owned()
    }

    /// Runs verify-export with the trusted key; returns (exit code, stdout).
    fn check(&self, bundle: &Path, extra: &[&str]) -> (Option<i32>, String) {
        let pubkey = self.pubkey();
        let mut args = vec!["verify-export", path(bundle), "--pubkey", &pubkey];
        args.extend_from_slice(extra);
        let out = replay(&args);
        (out.status.code(), stdout(&out))
    }
}

fn copy_bundle(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn edit_lines(file: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let mut lines: Vec<String> = fs::read_to_string(file).unwrap().lines().map(str::to_owned).collect();
    edit(&mut lines);
    fs::write(file, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

#[test]
fn a_fresh_bundle_verifies_in_both_formats() {
    let f = fixture();
    for format in ["jsonl", "csv"] {
        let bundle = f.export(format, &["--format", format, "--from", "3", "--to", "2026-11-23T14:01:13.5Z"]);
        let (code, out) = f.check(&bundle, &[]);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("range      seq 3..22 (20 records checked)"), "{out}");
        assert!(out.contains("(the key you trust)"), "{out}");
        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["records"], 20);
        assert_eq!(manifest["counts_by_type"]["step_claimed"], 6);
        assert_eq!(manifest["counts_by_actor"]["operator-kim"], 3);
        assert_eq!(manifest["files"][0]["records"], 20);
        // The link to the record before the range is the log's hash of seq 2.
        let events = replay_ok(&["events", "--data", path(&f.data), "--json", "--from", "2", "--to", "2"]);
        let second: serde_json::Value = serde_json::from_str(events.trim()).unwrap();
        assert_eq!(manifest["prev_hash"], second["hash"]);
    }
    // Without --pubkey or --checkpoint nobody trusted signed it: the bundle's own key proves
    // nothing, so the bundle does not pass, and the one problem says why.
    let bundle = f.root.join("jsonl");
    let unverified = replay(&["verify-export", path(&bundle)]);
    let out = String::from_utf8_lossy(&unverified.stdout);
    assert_eq!(unverified.status.code(), Some(1), "{out}");
    assert!(out.contains("(the key in the bundle, which proves nothing: pass --pubkey)"), "{out}");
    assert!(out.contains("PROBLEM    nobody you trust signed it"), "{out}");
    assert!(out.contains("FAILED verification (1 problems)"), "{out}");
}

#[test]
fn every_record_tampering_is_detected_and_named() {
    let f = fixture();
    let original = f.export("original", &[]);
    type Tamper = fn(&mut Vec<String>);
    let cases: [(&str, Tamper, &str); 6] = [
        ("modify", |l| l[6] = l[6].replace("\"w-2\"", "\"w-9\""), "column data differs"),
        ("delete", |l| drop(l.remove(4)), "a record was deleted, inserted or reordered"),
        ("insert", |l| l.insert(7, l[7].clone()), "a record was deleted, inserted or reordered"),
        ("reorder", |l| l.swap(9, 10), "a record was deleted, inserted or reordered"),
        ("truncate", |l| drop(l.pop()), "truncated"),
        ("rechain", |l| l[3] = l[3].replace("cmd-004", "cmd-404"), "differs from the record's stored body"),
    ];
    for (name, tamper, expected) in cases {
        let bundle = f.root.join(format!("tampered-{name}"));
        copy_bundle(&original, &bundle);
        edit_lines(&bundle.join("events.jsonl"), tamper);
        let (code, out) = f.check(&bundle, &[]);
        assert_eq!(code, Some(1), "{name}: {out}");
        assert!(out.contains("events.jsonl: its SHA-256 or size differs from the manifest"), "{name}: {out}");
        assert!(out.contains(expected), "{name}: expected {expected:?} in\n{out}");
    }
}

#[test]
fn tampering_that_also_fixes_the_digests_is_still_caught_by_the_chain_and_signature() {
    let f = fixture();
    let original = f.export("original", &[]);
    let bundle = f.root.join("forged");
    copy_bundle(&original, &bundle);
    // Delete a record and rewrite the manifest's digest and count to match.
    edit_lines(&bundle.join("events.jsonl"), |l| drop(l.remove(11)));
    let data = fs::read(bundle.join("events.jsonl")).unwrap();
    let manifest_path = bundle.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    use sha2::Digest;
    manifest["files"][0]["sha256"] = crate::common::hex(&sha2::Sha256::digest(&data)).into();
    manifest["files"][0]["bytes"] = data.len().into();
    manifest["records"] = 22.into();
    fs::write(&manifest_path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let (code, out) = f.check(&bundle, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("manifest.json was modified after it was signed"), "{out}");
    assert!(out.contains("record at position 12 (seq 12 expected): has seq 13"), "{out}");
    assert!(out.contains("the chain hash does not recompute"), "{out}");
    assert!(!out.contains("SHA-256 or size differs"), "{out}");
}

#[test]
fn every_single_byte_change_to_the_data_file_is_detected() {
    let f = fixture();
    let original = f.export("original", &["--from", "15", "--to", "18"]);
    let bytes = fs::read(original.join("events.jsonl")).unwrap();
    let bundle = f.root.join("flipped");
    copy_bundle(&original, &bundle);
    // Every byte would take minutes through the binary; a prime stride covers every field kind.
    for offset in (0..bytes.len()).step_by(37).chain([bytes.len() - 1]) {
        let mut changed = bytes.clone();
        changed[offset] ^= 0x01;
        fs::write(bundle.join("events.jsonl"), &changed).unwrap();
        let (code, out) = f.check(&bundle, &[]);
        assert_eq!(code, Some(1), "a flip at byte {offset} went unnoticed:\n{out}");
        assert!(out.contains("SHA-256 or size differs"), "byte {offset}: {out}");
    }
}

#[test]
fn an_edited_manifest_or_checkpoint_is_detected() {
    let f = fixture();
    let original = f.export("original", &[]);
    let bundle = f.root.join("manifest-edit");
    copy_bundle(&original, &bundle);
    let manifest = fs::read_to_string(bundle.join("manifest.json")).unwrap();
    fs::write(bundle.join("manifest.json"), manifest.replace("\"operator-kim\": 3", "\"operator-kim\": 2")).unwrap();
    let (code, out) = f.check(&bundle, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("manifest.json was modified after it was signed"), "{out}");

    let bundle = f.root.join("checkpoint-edit");
    copy_bundle(&original, &bundle);
    let checkpoint = fs::read_to_string(bundle.join("checkpoint.json")).unwrap();
    fs::write(bundle.join("checkpoint.json"), checkpoint.replace("\"records\": 23", "\"records\": 22")).unwrap();
    let (code, out) = f.check(&bundle, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the signature does not verify"), "{out}");
}

/// A file the signed manifest does not name is reported (a forged `events.jsonl` beside a signed
/// `events.csv` passed as intact, and a reader would take it for the data: found by a black-box
/// check), the report names the data file it checked, a data file that is a symbolic link is not
/// followed, and a bundle without its manifest or checkpoint fails (exit 1), not the tool (3).
#[test]
fn files_the_manifest_does_not_name_and_missing_signed_files_are_problems() {
    let f = fixture();
    let original = f.export("csv", &["--format", "csv"]);
    let (code, out) = f.check(&original, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("data       events.csv\n"), "{out}");

    let bundle = f.root.join("forged");
    copy_bundle(&original, &bundle);
    fs::write(bundle.join("events.jsonl"), "{\"seq\":1,\"actor\":\"token:nobody\"}\n").unwrap();
    let (code, out) = f.check(&bundle, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("events.jsonl is in the bundle but not in its signed manifest"), "{out}");

    let bundle = f.root.join("linked");
    copy_bundle(&original, &bundle);
    fs::rename(bundle.join("events.csv"), bundle.join("real.csv")).unwrap();
    std::os::unix::fs::symlink("real.csv", bundle.join("events.csv")).unwrap();
    let (code, out) = f.check(&bundle, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("events.csv: cannot be read (not a regular file)"), "{out}");

    for missing in ["manifest.json", "checkpoint.json"] {
        let bundle = f.root.join(format!("without-{missing}"));
        copy_bundle(&original, &bundle);
        fs::remove_file(bundle.join(missing)).unwrap();
        let (code, out) = f.check(&bundle, &[]);
        assert_eq!(code, Some(1), "{missing}: {out}");
        assert!(out.contains(&format!("read {}", bundle.join(missing).display())), "{missing}: {out}");
        assert!(out.contains("result: the bundle FAILED verification"), "{missing}: {out}");
    }
}

#[test]
fn a_bundle_signed_with_another_key_is_refused() {
    let f = fixture();
    let bundle = f.root.join("mallory");
    let key = f.keys.join("mallory.key");
    replay_ok(&["export-audit", "--data", path(&f.data), "--out", path(&bundle), "--key", path(&key)]);
    let (code, out) = f.check(&bundle, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not by the key you trust"), "{out}");
    assert!(out.contains("(NOT the key you trust)"), "{out}");
    // Consistent under its own key, which anyone could have used: not verified.
    assert_eq!(replay(&["verify-export", path(&bundle)]).status.code(), Some(1));
}

#[test]
fn a_bundle_must_extend_the_checkpoint_the_auditor_kept() {
    let f = fixture();
    let first = f.export("first", &["--to", "10"]);
    let kept = f.root.join("kept-checkpoint.json");
    fs::copy(first.join("checkpoint.json"), &kept).unwrap();
    let kept_arg = ["--checkpoint", path(&kept)];

    // The next bundle continues right after it, or overlaps it: both extend it.
    for (name, from) in [("next", "11"), ("overlap", "4")] {
        let bundle = f.export(name, &["--from", from]);
        let (code, out) = f.check(&bundle, &kept_arg);
        assert_eq!(code, Some(0), "{name}: {out}");
        assert!(out.contains("extends    the earlier checkpoint: yes"), "{name}: {out}");
    }
    // A bundle that ends before the checkpoint is stale.
    let stale = f.export("stale", &["--to", "7"]);
    let (code, out) = f.check(&stale, &kept_arg);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("it is stale"), "{out}");
    // One that starts after it cannot show the link.
    let gap = f.export("gap", &["--from", "15"]);
    let (code, out) = f.check(&gap, &kept_arg);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("export from seq 11"), "{out}");

    // A different history (another log) does not extend it, though it is well signed.
    let other = f.root.join("other-data");
    build_bulk(&other, 6, 0);
    let key = f.keys.join("auditor.key");
    let forked = f.root.join("forked");
    replay_ok(&["export-audit", "--data", path(&other), "--out", path(&forked), "--key", path(&key)]);
    let (code, out) = f.check(&forked, &kept_arg);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("history was rewritten: seq 10"), "{out}");
    // Without --pubkey, the kept checkpoint's signer is the key trusted: a bundle of this very
    // history signed by another key does not extend it (it did: anyone could sign a
    // continuation of an auditor's checkpoint).
    let mallory = f.root.join("mallory-next");
    let key = f.keys.join("mallory.key");
    replay_ok(&["export-audit", "--data", path(&f.data), "--out", path(&mallory), "--key", path(&key), "--from", "11"]);
    let checked = replay(&["verify-export", path(&mallory), "--checkpoint", path(&kept)]);
    let out = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(1), "{out}");
    assert!(out.contains("not by the key that signed your earlier checkpoint"), "{out}");
    let next = f.root.join("next");
    let checked = replay(&["verify-export", path(&next), "--checkpoint", path(&kept)]);
    let out = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(0), "{out}");
    assert!(out.contains("(the key that signed your earlier checkpoint)"), "{out}");
    // A forged earlier checkpoint is refused.
    let forged = f.root.join("forged-checkpoint.json");
    fs::write(&forged, fs::read_to_string(&kept).unwrap().replace("\"last_seq\": 10", "\"last_seq\": 9")).unwrap();
    let next = f.root.join("next");
    let (code, out) = f.check(&next, &["--checkpoint", path(&forged)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("the signature does not verify"), "{out}");
}

#[test]
fn keygen_and_export_refuse_to_overwrite() {
    let f = fixture();
    let again = replay(&["keygen", "--out", path(&f.keys.join("auditor"))]);
    assert_eq!(again.status.code(), Some(3));
    assert!(crate::common::stderr(&again).contains("refusing to overwrite a key"));
    let bundle = f.export("once", &[]);
    let key = f.keys.join("auditor.key");
    let twice = replay(&["export-audit", "--data", path(&f.data), "--out", path(&bundle), "--key", path(&key)]);
    assert!(crate::common::stderr(&twice).contains("the directory is not empty"));
    let file = f.root.join("a-file");
    fs::write(&file, "x").unwrap();
    let onto_file = replay(&["export-audit", "--data", path(&f.data), "--out", path(&file), "--key", path(&key)]);
    assert!(crate::common::stderr(&onto_file).contains("it is a file, not a directory"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        // A secret key others can read still signs, with a warning.
        let open_key = f.root.join("open.key");
        fs::copy(&key, &open_key).unwrap();
        fs::set_permissions(&open_key, fs::Permissions::from_mode(0o644)).unwrap();
        let out = f.root.join("open-bundle");
        let signed = replay(&["export-audit", "--data", path(&f.data), "--out", path(&out), "--key", path(&open_key)]);
        assert!(signed.status.success());
        assert!(
            crate::common::stderr(&signed).contains("readable by others (mode 644)"),
            "{}",
            crate::common::stderr(&signed)
        );
        // A public key given to sign is refused without a warning about its mode.
        let public = f.keys.join("auditor.pub");
        fs::set_permissions(&public, fs::Permissions::from_mode(0o644)).unwrap();
        let out = f.root.join("pub-bundle");
        let refused = replay(&["export-audit", "--data", path(&f.data), "--out", path(&out), "--key", path(&public)]);
        let said = crate::common::stderr(&refused);
        assert!(said.contains("a public key (.pub) cannot sign") && !said.contains("readable by others"), "{said}");
        // A dangling link where the public key goes is not written through (it created the
        // file it pointed to: found by a black-box check).
        let target = f.root.join("elsewhere");
        std::os::unix::fs::symlink(&target, f.keys.join("linked.pub")).unwrap();
        let linked = replay(&["keygen", "--out", path(&f.keys.join("linked"))]);
        assert_eq!(linked.status.code(), Some(3), "{}", crate::common::stderr(&linked));
        assert!(!target.exists() && !f.keys.join("linked.key").exists());
    }
}

/// A data file far larger than its manifest says, or not a regular file, is reported without
/// being read whole (a 2 GB file or a link to `/dev/zero` took gigabytes: found by a black-box
/// check); a few inserted records are still read and named.
#[test]
fn data_files_are_read_only_up_to_the_size_the_manifest_allows() {
    let f = fixture();
    let bundle = f.export("sizes", &[]);
    let events = bundle.join("events.jsonl");
    let grown = f.root.join("grown");
    copy_bundle(&bundle, &grown);
    let file = fs::OpenOptions::new().write(true).open(grown.join("events.jsonl")).unwrap();
    file.set_len(1 << 30).unwrap();
    let (code, out) = f.check(&grown, &[]);
    assert_ne!(code, Some(0));
    assert!(out.contains("more than the") && out.contains("not read"), "{out}");
    #[cfg(unix)]
    {
        let zero = f.root.join("zero");
        copy_bundle(&bundle, &zero);
        fs::remove_file(zero.join("events.jsonl")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", zero.join("events.jsonl")).unwrap();
        let (code, out) = f.check(&zero, &[]);
        assert_ne!(code, Some(0));
        assert!(out.contains("not a regular file"), "{out}");
    }
    assert!(fs::metadata(&events).unwrap().len() < 1 << 20, "the story's bundle is small");
    // A FIFO is not opened (that would wait for a writer forever: found by review).
    let fifo = f.root.join("fifo");
    copy_bundle(&bundle, &fifo);
    fs::remove_file(fifo.join("events.jsonl")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(fifo.join("events.jsonl")).status().unwrap().success());
    let (code, out) = f.check(&fifo, &[]);
    assert_ne!(code, Some(0));
    assert!(out.contains("not a regular file"), "{out}");
}

/// A bundle holding the largest records the log takes verifies: a row of a task created with
/// its steps' payloads passes 4 MiB (a 4 MiB row limit failed such an honest bundle as
/// tampered: found by review).
#[test]
fn a_bundle_of_the_largest_records_verifies() {
    let f = fixture();
    let data = f.root.join("large");
    crate::common::build_large(&data);
    for format in ["jsonl", "csv"] {
        let out = f.root.join(format!("large-{format}"));
        let key = f.keys.join("auditor.key");
        replay_ok(&[
            "export-audit",
            "--data",
            path(&data),
            "--out",
            path(&out),
            "--key",
            path(&key),
            "--format",
            format,
        ]);
        let file = out.join(format!("events.{format}"));
        assert!(fs::metadata(&file).unwrap().len() > 4 << 20, "{format}: a row over 4 MiB");
        let (code, out) = f.check(&out, &[]);
        assert_eq!(code, Some(0), "{format}: {out}");
        assert!(out.contains("(2 records checked)"), "{out}");
    }
}

/// A bundle's names and keys are printed with their control characters escaped: a file name
/// holding a newline and a terminal escape printed a forged "intact" line (found by review).
#[test]
fn verify_export_prints_a_hostile_manifest_escaped() {
    let f = fixture();
    let bundle = f.export("hostile", &[]);
    let manifest = bundle.join("manifest.json");
    let mut value: serde_json::Value = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    value["files"][0]["name"] = "x\nresult: the bundle is intact\n\u{1b}[8m".into();
    fs::write(&manifest, value.to_string()).unwrap();
    let (code, out) = f.check(&bundle, &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(!out.contains('\u{1b}') && !out.lines().any(|l| l.starts_with("result: the bundle is intact")), "{out}");
}

/// A public key is never taken for a secret one, nor a secret for a public one (found by a
/// black-box check: `--key k.pub` signed with a key derived from the public bytes, so the
/// signing secret was public and anyone could forge checkpoints).
#[test]
fn the_key_files_cannot_be_mistaken_for_each_other() {
    let f = fixture();
    let (secret, public) = (f.keys.join("auditor.key"), f.keys.join("auditor.pub"));
    assert!(fs::read_to_string(&secret).unwrap().starts_with("taskledger ed25519 secret key: "));
    let bundle = f.root.join("with-public");
    let refused = replay(&["export-audit", "--data", path(&f.data), "--out", path(&bundle), "--key", path(&public)]);
    assert_eq!(refused.status.code(), Some(3));
    assert!(
        crate::common::stderr(&refused).contains("a public key (.pub) cannot sign"),
        "{}",
        crate::common::stderr(&refused)
    );
    assert!(!bundle.join("checkpoint.json").exists(), "nothing was signed");
    let bundle = f.export("signed", &[]);
    let wrong = replay(&["verify-export", path(&bundle), "--pubkey", path(&secret)]);
    assert_eq!(wrong.status.code(), Some(3));
    assert!(crate::common::stderr(&wrong).contains("is a secret key"), "{}", crate::common::stderr(&wrong));
}

/// An export that cannot write its data file (a file-size limit here, standing for a full disk)
/// names the write's own error and leaves no half bundle: it said only that "the writing thread
/// stopped", and left a partial data file, so a second try was refused because the directory
/// was not empty (found by a black-box check on a full disk).
#[cfg(target_os = "linux")]
#[test]
fn an_export_that_cannot_write_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    build_bulk(&data, 3_000, 0);
    let keys = dir.path().join("keys");
    replay_ok(&["keygen", "--out", path(&keys.join("auditor"))]);
    let out = dir.path().join("bundle");
    let key = keys.join("auditor.key");
    let failed = crate::common::replay_with_files_under(
        256 * 1024,
        &["export-audit", "--data", path(&data), "--out", path(&out), "--key", path(&key)],
    );
    let said = crate::common::stderr(&failed);
    assert_ne!(failed.status.code(), Some(0), "{said}");
    assert!(said.contains("File too large"), "the write's own error: {said}");
    assert!(!out.exists(), "no half bundle: {:?}", fs::read_dir(&out).map(|d| d.count()));
    // Without the limit the same command writes the bundle.
    replay_ok(&["export-audit", "--data", path(&data), "--out", path(&out), "--key", path(&key)]);
}

/// Signs `bundle` again with the auditor's key after `edit` changed its manifest (and, through
/// the same value, the checkpoint's claims): what a signer who summarises wrongly would sign.
fn resign(f: &Fixture, bundle: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut replay_tool::bundle::Checkpoint)) {
    use ed25519_dalek::{Signer, SigningKey};
    use replay_tool::bundle::{Checkpoint, checkpoint_message, sha256_hex};
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("manifest.json")).unwrap()).unwrap();
    let mut checkpoint: Checkpoint =
        serde_json::from_slice(&fs::read(bundle.join("checkpoint.json")).unwrap()).unwrap();
    edit(&mut manifest, &mut checkpoint);
    let manifest = serde_json::to_vec_pretty(&manifest).unwrap();
    fs::write(bundle.join("manifest.json"), &manifest).unwrap();
    checkpoint.manifest_sha256 = sha256_hex(&manifest);
    let secret = fs::read_to_string(f.keys.join("auditor.key")).unwrap();
    let seed = secret.trim().rsplit(' ').next().unwrap();
    let seed: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&seed[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    checkpoint.signature =
        eventlog::json::hex(&SigningKey::from_bytes(&seed).sign(checkpoint_message(&checkpoint).as_bytes()).to_bytes());
    fs::write(bundle.join("checkpoint.json"), serde_json::to_vec_pretty(&checkpoint).unwrap()).unwrap();
}

/// What a signed manifest says of its records (counts by type and actor, the first hash, the
/// times, each file's count, a range as long as the count) must be what the records say: a
/// signer's summary is not taken on trust (found by a review: a checkpoint signing seq 1..1000
/// over 23 records verified intact, and `--checkpoint` relies on that last seq).
#[test]
fn a_signed_summary_must_say_what_the_records_say() {
    type Edit = fn(&mut serde_json::Value, &mut replay_tool::bundle::Checkpoint);
    let f = fixture();
    let original = f.export("original", &[]);
    let (code, out) = f.check(&original, &[]);
    assert_eq!(code, Some(0), "{out}");
    let cases: [(&str, Edit, &str); 6] = [
        ("types", |m, _| m["counts_by_type"]["task_created"] = 99.into(), "manifest counts_by_type"),
        ("actors", |m, _| m["counts_by_actor"]["nobody"] = 1.into(), "manifest counts_by_actor"),
        ("first", |m, _| m["first_hash"] = "00".repeat(32).into(), "manifest first_hash"),
        ("time", |m, _| m["last_recorded_at"] = "2030-01-01T00:00:00Z".into(), "manifest last_recorded_at"),
        ("file", |m, _| m["files"][0]["records"] = 7.into(), "holds 23 records, the manifest says 7"),
        (
            "range",
            |m, c| {
                m["last_seq"] = 1000.into();
                c.last_seq = 1000;
            },
            "the checkpoint signs seq 1..1000 but 23 records",
        ),
    ];
    for (name, edit, said) in cases {
        let bundle = f.root.join(name);
        copy_bundle(&original, &bundle);
        resign(&f, &bundle, edit);
        let (code, out) = f.check(&bundle, &[]);
        assert_eq!(code, Some(1), "{name}: {out}");
        assert!(out.contains(said), "{name}: {out}");
        assert!(!out.contains("the signature does not verify"), "{name}: re-signed as it should be: {out}");
    }
}
