//! Fuzz target: `taskledger-replay verify-export` on a bundle someone handed
//! the auditor. The input is the bundle's files joined by NUL bytes:
//! `manifest.json`, `checkpoint.json`, the events file (returned for every
//! name the manifest lists, JSONL or CSV), and optionally an earlier
//! checkpoint the auditor kept. It runs `replay_tool::bundle::verify_bundle`,
//! the verifier itself, with the bundle's files in memory. Every defect must
//! be a finding or an error, never a panic, a hang or an unbounded allocation;
//! and a bundle found clean must really say so (no problems counted).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use replay_tool::bundle::{CHECKPOINT_FILE, MANIFEST_FILE, bounded, verify_bundle};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |b| *b == 0);
    let manifest = parts.next().unwrap_or_default();
    let checkpoint = parts.next().unwrap_or_default();
    let events = parts.next().unwrap_or_default();
    let earlier = parts.next();
    let open = |name: &str, limit: u64| -> std::io::Result<Box<dyn std::io::Read + '_>> {
        let bytes = match name {
            MANIFEST_FILE => manifest,
            CHECKPOINT_FILE => checkpoint,
            _ => events,
        };
        bounded(bytes.len() as u64, limit)?;
        Ok(Box::new(bytes))
    };
    let earlier = earlier.map(|bytes| (Path::new("earlier-checkpoint.json"), bytes));
    if let Ok(findings) = verify_bundle(Path::new("bundle"), &open, None, None, earlier) {
        assert_eq!(findings.clean, findings.problems_total == 0);
        assert!(findings.problems.len() <= findings.problems_total);
    }
});
