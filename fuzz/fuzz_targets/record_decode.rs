//! Fuzz target: decoding a log record from arbitrary bytes — the stored value
//! (chain hash ‖ format byte ‖ postcard body, `eventlog::record`), the event in
//! its payload (`eventlog::fold::decode_event`, postcard `domain::Event`), its
//! JSON form (the feed and audit exports) and applying it to an empty ledger.
//! The input is what a corrupted or hostile log file would hand the reader:
//! every path must answer an error, never panic, hang or allocate without
//! bound. Whatever decodes must re-encode to a body that decodes to the same
//! record, since audit bundles hand out re-encoded bodies.

#![no_main]

use domain::{Event, Ledger};
use eventlog::fold::{decode_event, decode_payload};
use eventlog::json::{event_data, record_json};
use eventlog::record::{chain_hash, decode_stored_body, stored_body};
use libfuzzer_sys::fuzz_target;

/// Any seq: decoding does not depend on it beyond error messages.
const SEQ: u64 = 7;

fn event_paths(event: &Event) {
    let _ = event_data(event);
    let bytes = postcard::to_stdvec(event).expect("a decoded event re-encodes");
    let again: Event = postcard::from_bytes(&bytes).expect("a re-encoded event decodes");
    assert_eq!(&again, event, "an event changes through encode/decode");
    // The ledger refuses what it cannot apply (an `Inconsistency`); it must not panic.
    let _ = Ledger::new().apply(event);
}

fuzz_target!(|data: &[u8]| {
    // A stored value as redb holds it: 32-byte chain hash, then the body.
    if data.len() >= 32 {
        let (hash, body) = data.split_at(32);
        let hash: [u8; 32] = hash.try_into().expect("32 bytes");
        if let Ok(record) = decode_stored_body(SEQ, hash, body) {
            let body_again = stored_body(&record);
            let back = decode_stored_body(SEQ, hash, &body_again).expect("a re-encoded body decodes");
            assert_eq!(back, record, "a record changes through encode/decode");
            let _ = chain_hash(&hash, SEQ, body);
            if let Ok(event) = decode_event(&record) {
                let _ = record_json(&record, &event);
                event_paths(&event);
            }
        }
    }
    // The whole input as an event payload.
    if let Ok(event) = postcard::from_bytes::<Event>(data) {
        decode_payload(SEQ, event.type_code(), event.schema_version(), data).expect("the header it names agrees");
        event_paths(&event);
    }
});
