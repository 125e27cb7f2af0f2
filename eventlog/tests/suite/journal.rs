//! The write-ahead journal on real files: what a crash leaves (the files copied while the store
//! is open, as SIGKILL leaves them: every write made, no checkpoint) is read back whole by the
//! store and by the read-only tools without modifying either file; a torn last frame is
//! dropped; damage in the middle of the journal, in its header, or a journal that belongs to
//! another log is refused with the place named, never accepted and never a panic.

use std::path::Path;

use eventlog::journal::{
    BLOCK_BYTES, FRAME_HEADER_BYTES, FRAMES_START, JOURNAL_BYTES_MIN, JOURNAL_FILE_NAME, SECOND_JOURNAL_FILE_NAME,
    SLOT_BYTES, SLOT_OFFSETS,
};
use eventlog::redb_store::OVERLAPPED_FRAME_RECORDS_MIN;
use eventlog::{JournalLoss, LogReader, LogStore, NewRecord, OpenError, RedbOptions, RedbStore, verify};

const BATCHES: u64 = 12;
const RECORDS_PER_BATCH: u64 = 3;

fn record(i: u64) -> NewRecord {
    NewRecord {
        stream: format!("task-{}", i % 5).into_bytes(),
        command_id: format!("cmd-{i}"),
        actor: "journal-test".into(),
        recorded_at_us: 1_700_000_000_000_000 + i as i64 * 1_000,
        event_type: (i % 3) as u16,
        schema_version: 1,
        payload: vec![(i % 251) as u8; 100],
    }
}

/// Appends `batches` batches of journaled records (no outcomes) starting at record `from`.
fn append_batches(store: &mut RedbStore, from: u64, batches: u64) {
    for b in 0..batches {
        let batch: Vec<NewRecord> = (0..RECORDS_PER_BATCH).map(|r| record(from + b * RECORDS_PER_BATCH + r)).collect();
        store.append(&batch, &[]).unwrap();
    }
}

/// The files of the open store in `dir` copied to a new directory: a crash image.
fn crash_image(dir: &Path) -> tempfile::TempDir {
    let image = tempfile::tempdir().unwrap();
    for name in ["ledger.redb", JOURNAL_FILE_NAME, SECOND_JOURNAL_FILE_NAME] {
        if name == SECOND_JOURNAL_FILE_NAME && !dir.join(name).exists() {
            continue;
        }
        std::fs::copy(dir.join(name), image.path().join(name)).unwrap();
    }
    image
}

/// A store with one checkpointed batch (with an outcome) and `BATCHES` journaled ones after
/// it, and the crash image taken before it closed.
fn crashed_store() -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    store.append(&[record(0)], &[("cmd-0".into(), b"ok".to_vec())]).unwrap();
    append_batches(&mut store, 1, BATCHES);
    let head = store.head().seq;
    assert_eq!(head, 1 + BATCHES * RECORDS_PER_BATCH);
    let image = crash_image(dir.path());
    drop(store);
    (image, head)
}

fn frame_offset(n: u64) -> u64 {
    // The batches' frames of this size fit one block each.
    FRAMES_START + BLOCK_BYTES * n
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_crash_image_is_read_whole_by_tools_and_recovered_by_the_store() {
    let (image, head) = crashed_store();
    let log = image.path().join("ledger.redb");
    let journal = image.path().join(JOURNAL_FILE_NAME);
    let before = (std::fs::read(&log).unwrap(), std::fs::read(&journal).unwrap());

    // A plain read-only open must not show a log without its journaled tail.
    match LogReader::open_read_only(&log) {
        Err(OpenError::JournalPending { records, .. }) => assert_eq!(records, head - 1),
        Err(OpenError::Database { source: redb::DatabaseError::RepairAborted, .. }) => {}
        other => panic!("a read-only open of a crash image gave {:?}", other.map(|_| ())),
    }
    // Repaired in memory: every record, verified, and neither file touched.
    let reader = LogReader::open_repaired(&log).unwrap();
    assert_eq!(reader.head().unwrap().seq, head);
    let report = verify(&reader, |_, _| {}).unwrap();
    assert!(report.is_clean(), "{:?}", report.first_problem);
    assert_eq!(report.records, head);
    drop(reader);
    RedbStore::check_file(&log, 1 << 20, JournalLoss::Refuse).unwrap();
    assert!(before == (std::fs::read(&log).unwrap(), std::fs::read(&journal).unwrap()), "a tool modified a file");

    // The store replays the journal, and writes go on after it.
    let mut store = RedbStore::open(image.path(), RedbOptions::default()).unwrap();
    assert_eq!(store.head().seq, head);
    let records = store.reader().read_range(1, head, 1000).unwrap();
    for (i, stored) in records.iter().enumerate() {
        assert_eq!(stored.command_id, format!("cmd-{i}"));
    }
    append_batches(&mut store, head, 1);
    assert_eq!(store.head().seq, head + RECORDS_PER_BATCH);
    drop(store);
    // Closed cleanly: the log file alone holds everything.
    let reader = LogReader::open_read_only(&log).unwrap();
    assert_eq!(reader.head().unwrap().seq, head + RECORDS_PER_BATCH);
    assert!(verify(&reader, |_, _| {}).unwrap().is_clean());
}

#[test]
fn a_large_batchs_frame_written_while_the_batch_goes_into_redb_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    store.append(&[record(0)], &[("cmd-0".into(), b"ok".to_vec())]).unwrap();
    let per_batch = 4 * OVERLAPPED_FRAME_RECORDS_MIN as u64;
    let mut next = 1;
    for _ in 0..5 {
        let batch: Vec<NewRecord> = (next..next + per_batch).map(record).collect();
        let appended = store.append(&batch, &[]).unwrap();
        assert_eq!(appended.head.seq, next + per_batch, "record(i) is at seq i + 1");
        next += per_batch;
    }
    let io_uring_allowed = io_uring::IoUring::new(2).is_ok();
    match store.async_frames() {
        Some(frames) => assert_eq!(frames, 5, "every large batch's frame went through io_uring"),
        None => assert!(!io_uring_allowed, "io_uring is allowed here, yet the store writes without it"),
    }
    let head = store.head().seq;
    // Readers see every batch at once (each committed after its frame was durable).
    assert_eq!(store.reader().head().unwrap().seq, head);
    let image = crash_image(dir.path());
    drop(store);

    let store = RedbStore::open(image.path(), RedbOptions::default()).unwrap();
    assert_eq!(store.head().seq, head, "the journal held every acknowledged batch");
    let records = store.reader().read_range(1, head, 10_000).unwrap();
    assert_eq!(records.len() as u64, head);
    for (i, stored) in records.iter().enumerate() {
        assert_eq!(stored.command_id, format!("cmd-{i}"));
        assert_eq!(stored.payload, record(i as u64).payload);
    }
    assert!(verify(&store.reader(), |_, _| {}).unwrap().is_clean());
}

#[test]
fn a_torn_last_frame_is_dropped_as_never_acknowledged() {
    let (image, head) = crashed_store();
    // The last batch's frame half written: its checksum no longer holds.
    let journal = image.path().join(JOURNAL_FILE_NAME);
    let mut bytes = std::fs::read(&journal).unwrap();
    let last = frame_offset(BATCHES - 1) as usize;
    bytes[last + 100..last + BLOCK_BYTES as usize].fill(0);
    std::fs::write(&journal, bytes).unwrap();

    let store = RedbStore::open(image.path(), RedbOptions::default()).unwrap();
    assert_eq!(store.head().seq, head - RECORDS_PER_BATCH);
    assert!(verify(&store.reader(), |_, _| {}).unwrap().is_clean());
}

#[test]
fn damage_before_intact_frames_is_refused_with_its_offset() {
    for (frame, byte) in [(0, 20), (3, 45), (7, 200), (BATCHES - 2, 1)] {
        let (image, _) = crashed_store();
        let journal = image.path().join(JOURNAL_FILE_NAME);
        let offset = frame_offset(frame) + byte;
        flip(&journal, offset);
        for attempt in ["store", "tool"] {
            let error = match attempt {
                "store" => RedbStore::open(image.path(), RedbOptions::default()).map(drop).unwrap_err(),
                _ => LogReader::open_repaired(image.path().join("ledger.redb")).map(drop).unwrap_err(),
            };
            match &error {
                OpenError::Journal { offset: at, message, .. } => {
                    assert_eq!(*at, frame_offset(frame), "{attempt}: {message}");
                    assert!(message.contains("would be lost"), "{attempt}: {message}");
                }
                other => panic!("{attempt}: frame {frame} byte {byte}: {other}"),
            }
        }
    }
}

#[test]
fn a_damaged_header_is_refused_when_records_depend_on_it() {
    // `crashed_store`'s first batch was a checkpoint: the journal's current header is
    // generation 3 in slot 1 (the second journal took generation 2 when the store opened), and
    // slot 0 keeps generation 1.
    let (image, head) = crashed_store();
    let journal = image.path().join(JOURNAL_FILE_NAME);
    let pristine = std::fs::read(&journal).unwrap();
    // The current slot's base seq: the frames behind it would be lost.
    flip(&journal, SLOT_OFFSETS[1] + 21);
    let error = RedbStore::open(image.path(), RedbOptions::default()).map(drop).unwrap_err();
    assert!(matches!(error, OpenError::Journal { offset, .. } if offset == SLOT_OFFSETS[1]), "{error}");
    assert!(error.to_string().contains("header") && error.to_string().contains("generation 3"), "{error}");
    // The current slot wiped (all zeros): the same.
    let mut wiped = pristine.clone();
    wiped[SLOT_OFFSETS[1] as usize..SLOT_OFFSETS[1] as usize + SLOT_BYTES].fill(0);
    std::fs::write(&journal, &wiped).unwrap();
    let error = RedbStore::open(image.path(), RedbOptions::default()).map(drop).unwrap_err();
    assert!(error.to_string().contains("wiped"), "{error}");
    // The superseded slot: harmless, everything opens.
    std::fs::write(&journal, &pristine).unwrap();
    flip(&journal, 21);
    let store = RedbStore::open(image.path(), RedbOptions::default()).unwrap();
    assert_eq!(store.head().seq, head);
}

#[test]
fn a_torn_first_header_write_leaves_an_empty_journal() {
    // A new log whose very first header write was torn: slot 0 half written, slot 1 never.
    let dir = tempfile::tempdir().unwrap();
    drop(RedbStore::open(dir.path(), RedbOptions::default()).unwrap());
    let journal = dir.path().join(JOURNAL_FILE_NAME);
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes[..FRAMES_START as usize].fill(0);
    bytes[..40].copy_from_slice(&[0x5a; 40]);
    std::fs::write(&journal, &bytes).unwrap();
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    append_batches(&mut store, 0, 2);
    assert_eq!(store.head().seq, 2 * RECORDS_PER_BATCH);
}

#[test]
fn a_journal_of_another_log_is_refused() {
    let (image, _) = crashed_store();
    // Another log with the same number of records, but different ones.
    let other = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(other.path(), RedbOptions::default()).unwrap();
    let mut changed = record(0);
    changed.payload = b"another history".to_vec();
    store.append(&[changed], &[("cmd-0".into(), b"ok".to_vec())]).unwrap();
    append_batches(&mut store, 1, BATCHES);
    let other_image = crash_image(other.path());
    drop(store);
    std::fs::copy(other_image.path().join(JOURNAL_FILE_NAME), image.path().join(JOURNAL_FILE_NAME)).unwrap();
    let error = RedbStore::open(image.path(), RedbOptions::default()).map(drop).unwrap_err();
    assert!(matches!(error, OpenError::Journal { .. }), "{error}");
    assert!(error.to_string().contains("seq 1"), "{error}");
}

#[test]
fn a_full_journal_checkpoints_and_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let options = RedbOptions { journal_bytes: eventlog::journal::JOURNAL_BYTES_MIN, ..RedbOptions::default() };
    let mut store = RedbStore::open(dir.path(), options.clone()).unwrap();
    // 14 one-block frames fit a 64 KiB journal after its header blocks; 40 batches cross two
    // checkpoints.
    append_batches(&mut store, 0, 40);
    let head = store.head().seq;
    let image = crash_image(dir.path());
    drop(store);
    let journal_len = std::fs::metadata(image.path().join(JOURNAL_FILE_NAME)).unwrap().len();
    assert!(journal_len <= eventlog::journal::JOURNAL_BYTES_MIN, "the journal grew to {journal_len} bytes");
    let store = RedbStore::open(image.path(), options).unwrap();
    assert_eq!(store.head().seq, head);
    let report = verify(&store.reader(), |_, _| {}).unwrap();
    assert!(report.is_clean() && report.records == head, "{report:?}");
}

/// Reopens a crash image and checks it holds exactly records 0..head, verified.
fn assert_image_holds(image: &Path, head: u64) {
    let store = RedbStore::open(image, RedbOptions { journal_bytes: JOURNAL_BYTES_MIN, ..RedbOptions::default() })
        .unwrap_or_else(|e| panic!("the crash image at head {head} does not open: {e}"));
    assert_eq!(store.head().seq, head);
    let records = store.reader().read_range(1, head, 100_000).unwrap();
    assert_eq!(records.len() as u64, head);
    for (i, stored) in records.iter().enumerate() {
        assert_eq!(stored.command_id, format!("cmd-{i}"));
    }
    let report = verify(&store.reader(), |_, _| {}).unwrap();
    assert!(report.is_clean() && report.records == head, "{report:?}");
}

/// With `checkpoint_beside_appends`, the append that finds the journal full moves to the second
/// journal and the checkpoint runs on its own thread; appends after it are durable (a crash
/// image has them) but held: readers see them only once `settle` says so. Over several rounds
/// the two journals take turns, and a crash image taken at any point, before or after the
/// settle, reopens with every appended record.
#[test]
fn a_checkpoint_beside_appends_holds_them_until_it_is_done_and_a_crash_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let options = RedbOptions { journal_bytes: JOURNAL_BYTES_MIN, ..RedbOptions::default() };
    let mut store = RedbStore::open(dir.path(), options).unwrap();
    store.checkpoint_beside_appends();
    let mut next = 0u64;
    for round in 0..4 {
        // Fill the journal until an append is held (14 one-block frames fit in 64 KiB).
        let mut held = None;
        for _ in 0..40 {
            let batch: Vec<NewRecord> = (next..next + RECORDS_PER_BATCH).map(record).collect();
            next += RECORDS_PER_BATCH;
            let appended = store.append(&batch, &[]).unwrap();
            assert_eq!(appended.head, store.head());
            if !appended.readable {
                held = Some(appended);
                break;
            }
            assert_eq!(store.reader().head().unwrap().seq, appended.head.seq, "round {round}: a readable append");
        }
        let held = held.unwrap_or_else(|| panic!("round {round}: no append was held"));
        assert!(dir.path().join(SECOND_JOURNAL_FILE_NAME).exists());
        // Two more held appends: the checkpoint is only settled when asked.
        for _ in 0..2 {
            let batch: Vec<NewRecord> = (next..next + RECORDS_PER_BATCH).map(record).collect();
            next += RECORDS_PER_BATCH;
            assert!(!store.append(&batch, &[]).unwrap().readable, "round {round}");
        }
        let readable = store.reader().head().unwrap().seq;
        assert_eq!(readable, held.records[0].seq - 1, "round {round}: readers see up to the held appends");
        assert!(store.reader().read_range(readable + 1, readable + 1, 1).unwrap().is_empty());
        let image = crash_image(dir.path());
        assert_image_holds(image.path(), next);
        assert_eq!(store.settle(true).unwrap(), store.head(), "round {round}");
        assert_eq!(store.reader().head().unwrap(), store.head(), "round {round}");
        let image = crash_image(dir.path());
        assert_image_holds(image.path(), next);
    }
    drop(store);
    // Closed cleanly: the log file alone holds everything, and neither journal anything past it.
    let log = dir.path().join("ledger.redb");
    let reader = LogReader::open_read_only(&log).unwrap();
    assert_eq!(reader.head().unwrap().seq, next);
    drop(reader);
    assert_image_holds(dir.path(), next);
}

#[test]
fn a_journal_without_its_log_file_is_refused() {
    let (image, _) = crashed_store();
    std::fs::remove_file(image.path().join("ledger.redb")).unwrap();
    let error = RedbStore::open(image.path(), RedbOptions::default()).map(drop).unwrap_err();
    assert!(matches!(error, OpenError::Journal { .. }), "{error}");
    assert!(error.to_string().contains("does not exist"), "{error}");
    assert!(!image.path().join("ledger.redb").exists(), "no new log was started over the journal");
}

/// Single-bit changes anywhere in the bytes that carry meaning (the current header slot, each
/// frame's header and records): opening never panics and never yields other records; each
/// change is refused, except in the last frame, which a torn write also leaves damaged: that
/// frame is dropped and the records before it are kept.
#[test]
fn a_changed_bit_anywhere_is_refused_or_drops_only_the_last_frame() {
    let (image, head) = crashed_store();
    let journal = image.path().join(JOURNAL_FILE_NAME);
    let pristine = std::fs::read(&journal).unwrap();
    // The current slot (generation 3, slot 1) and each frame's used bytes.
    let mut meaningful: Vec<u64> = (SLOT_OFFSETS[1]..SLOT_OFFSETS[1] + SLOT_BYTES as u64).collect();
    for frame in 0..BATCHES {
        let at = frame_offset(frame) as usize;
        let body = u32::from_le_bytes(pristine[at + 4..at + 8].try_into().unwrap()) as usize;
        meaningful.extend((at..at + FRAME_HEADER_BYTES + body).map(|o| o as u64));
    }
    let mut state = 0x5eed_u64;
    let (mut refused, mut torn) = (0, 0);
    for trial in 0..300 {
        let offset = meaningful[(crate::support::next(&mut state) % meaningful.len() as u64) as usize];
        let mut bytes = pristine.clone();
        bytes[offset as usize] ^= 1 << (crate::support::next(&mut state) % 8);
        let dir = tempfile::tempdir().unwrap();
        for name in ["ledger.redb", SECOND_JOURNAL_FILE_NAME] {
            std::fs::copy(image.path().join(name), dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join(JOURNAL_FILE_NAME), &bytes).unwrap();
        match RedbStore::open(dir.path(), RedbOptions::default()) {
            Err(OpenError::Journal { .. }) => refused += 1,
            Err(other) => panic!("trial {trial}, offset {offset}: {other}"),
            Ok(store) => {
                let kept = store.head().seq;
                assert!(offset >= frame_offset(BATCHES - 1), "trial {trial}: a change at {offset} was accepted");
                assert_eq!(kept, head - RECORDS_PER_BATCH, "trial {trial}: only the last frame may go");
                let records = store.reader().read_range(1, kept, 1000).unwrap();
                for (i, stored) in records.iter().enumerate() {
                    assert_eq!(stored.command_id, format!("cmd-{i}"), "trial {trial}, offset {offset}");
                }
                assert!(verify(&store.reader(), |_, _| {}).unwrap().is_clean(), "trial {trial}");
                torn += 1;
            }
        }
    }
    assert!(refused > 200 && torn > 0, "refused {refused}, torn {torn}");
}

#[test]
fn a_copy_of_the_log_file_does_not_take_the_dirs_journal() {
    let (image, head) = crashed_store();
    // A stale copy of the log file beside the live journal: it has its own (absent) journals,
    // so it is refused unless their loss is accepted, and then never reads the live ones.
    let copy = image.path().join("copy.redb");
    std::fs::copy(image.path().join("ledger.redb"), &copy).unwrap();
    assert!(matches!(LogReader::open_repaired(&copy).map(drop), Err(OpenError::JournalLost { .. })));
    let (reader, losses) = LogReader::open_repaired_with(&copy, JournalLoss::Accept).unwrap();
    assert_eq!(losses.len(), 2, "{losses:?}");
    assert!(reader.head().unwrap().seq < head, "the copy read the live journal's records");
}

/// What each way of opening a crash image says: `Ok(head)` or the error. (A plain read-only
/// open never accepts a loss: it is left out when the loss is accepted.)
fn opens(image: &Path, loss: JournalLoss) -> Vec<Result<u64, String>> {
    let log = image.join("ledger.redb");
    let read_only = match LogReader::open_read_only(&log) {
        _ if loss == JournalLoss::Accept => None,
        // Not a verdict on the journals: the file needs redb's repair first.
        Err(OpenError::Database { source: redb::DatabaseError::RepairAborted, .. }) => None,
        other => Some(other.map(|reader| reader.head().unwrap().seq).map_err(|e| e.to_string())),
    };
    let repaired = LogReader::open_repaired_with(&log, loss).map(|(reader, _)| reader.head().unwrap().seq);
    let store = RedbStore::open(image, RedbOptions { journal_loss: loss, ..RedbOptions::default() })
        .map(|store| store.head().seq);
    read_only.into_iter().chain([repaired.map_err(|e| e.to_string()), store.map_err(|e| e.to_string())]).collect()
}

/// A journal deleted, wiped or cut after a crash lost records without a word (the store could
/// not know what had been in it): now the log file says its journals were in use, and every
/// open refuses, naming the journal and what is wrong, until the loss is accepted.
#[test]
fn a_journal_deleted_wiped_or_cut_after_a_crash_is_refused_until_its_loss_is_accepted() {
    type Damage = fn(&Path);
    // (what, how, what the error says, whether the frames survive it)
    let cases: [(&str, Damage, &str, bool); 5] = [
        ("deleted", |p| std::fs::remove_file(p).unwrap(), "is missing", false),
        (
            "zeroed",
            |p| std::fs::write(p, vec![0u8; std::fs::metadata(p).unwrap().len() as usize]).unwrap(),
            "no header",
            false,
        ),
        ("cut after its frames", |p| cut(p, frame_offset(BATCHES + 1)), "shorter than", true),
        ("cut inside its header", |p| cut(p, 100), "shorter than", false),
        ("emptied", |p| cut(p, 0), "shorter than", false),
    ];
    for (name, damage, problem, frames_survive) in cases {
        for journal in [JOURNAL_FILE_NAME, SECOND_JOURNAL_FILE_NAME] {
            let (image, head) = crashed_store();
            damage(&image.path().join(journal));
            for (i, opened) in opens(image.path(), JournalLoss::Refuse).into_iter().enumerate() {
                let error = opened.expect_err(&format!("{journal} {name}: open #{i} was accepted"));
                assert!(error.contains(journal) && error.contains(problem), "{journal} {name}: {error}");
                assert!(error.contains("--accept-journal-loss"), "{error}");
            }
            // Accepted: what the files hold. The frames were all in the first journal. The loss
            // is reported as what was given up, not as the refusal's advice to pass the flag.
            let (_, losses) =
                LogReader::open_repaired_with(image.path().join("ledger.redb"), JournalLoss::Accept).unwrap();
            assert!(
                losses.iter().any(|lost| lost.contains(journal) && lost.contains(problem) && lost.contains("are lost")),
                "{journal} {name}: {losses:?}"
            );
            assert!(losses.iter().all(|lost| !lost.contains("--accept-journal-loss")), "{losses:?}");
            let kept = if journal == JOURNAL_FILE_NAME && !frames_survive { 1 } else { head };
            for (i, opened) in opens(image.path(), JournalLoss::Accept).into_iter().enumerate() {
                assert_eq!(opened, Ok(kept), "{journal} {name}: open #{i} with the loss accepted");
            }
            // The accepting start made the dir whole again: a plain start opens it.
            let store = RedbStore::open(image.path(), RedbOptions::default()).unwrap();
            assert_eq!(store.head().seq, kept, "{journal} {name}");
        }
    }
}

/// Both journals holding records (the older one's checkpoint had not committed when the process
/// died), and one lost. Accepted, the older one's loss drops the newer one too, which no longer
/// follows the log: that start failed with "the journal follows seq …", the flag it was told to
/// pass did not help (found by review).
#[test]
fn an_accepted_loss_of_the_older_journal_drops_the_newer_one_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = RedbOptions { journal_bytes: JOURNAL_BYTES_MIN, ..RedbOptions::default() };
    let mut store = RedbStore::open(dir.path(), options).unwrap();
    store.checkpoint_beside_appends();
    // The log file as it is durably before the first journal's checkpoint (only journaled
    // commits so far): what a crash before that checkpoint committed leaves of it.
    append_batches(&mut store, 0, 1);
    let image = crash_image(dir.path());
    // The first journal fills; the second one takes (and holds) the next batches.
    let mut next = RECORDS_PER_BATCH;
    let mut first_held = None;
    while first_held.is_none_or(|held| next < held + 2 * RECORDS_PER_BATCH) {
        let batch: Vec<NewRecord> = (next..next + RECORDS_PER_BATCH).map(record).collect();
        next += RECORDS_PER_BATCH;
        let appended = store.append(&batch, &[]).unwrap();
        if !appended.readable && first_held.is_none() {
            first_held = Some(appended.records[0].seq);
        }
    }
    for name in [JOURNAL_FILE_NAME, SECOND_JOURNAL_FILE_NAME] {
        std::fs::copy(dir.path().join(name), image.path().join(name)).unwrap();
    }
    // The second journal follows the first one's last record.
    let second = eventlog::journal::read(&image.path().join(SECOND_JOURNAL_FILE_NAME)).unwrap().unwrap();
    let in_first = second.header.base.seq;
    assert!(in_first > 0 && !second.records.is_empty(), "both journals hold records");
    drop(store);
    // Whole, it holds every record.
    assert_image_holds(crash_image(image.path()).path(), next);
    for (lost, kept) in [(JOURNAL_FILE_NAME, 0), (SECOND_JOURNAL_FILE_NAME, in_first)] {
        let copy = crash_image(image.path());
        std::fs::remove_file(copy.path().join(lost)).unwrap();
        assert!(opens(copy.path(), JournalLoss::Refuse).iter().all(Result::is_err), "{lost}");
        let log = copy.path().join("ledger.redb");
        let (reader, losses) = LogReader::open_repaired_with(&log, JournalLoss::Accept).unwrap();
        assert_eq!(reader.head().unwrap().seq, kept, "{lost}");
        assert_eq!(losses.len(), if kept == 0 { 2 } else { 1 }, "{lost}: {losses:?}");
        assert!(losses.iter().all(|l| l.contains("ledger.journal")), "{losses:?}");
        drop(reader);
        let accepting = RedbOptions { journal_loss: JournalLoss::Accept, ..RedbOptions::default() };
        let mut store = RedbStore::open(copy.path(), accepting).unwrap();
        assert_eq!(store.head().seq, kept, "{lost}");
        assert!(verify(&store.reader(), |_, _| {}).unwrap().is_clean(), "{lost}");
        append_batches(&mut store, kept, 1);
        drop(store);
        let store = RedbStore::open(copy.path(), RedbOptions::default()).unwrap();
        assert_eq!(store.head().seq, kept + RECORDS_PER_BATCH, "{lost}");
    }
}

/// A start that accepts a lost journal creates it again; a crash before the new file is whole
/// (here: its zero fill fails) left the mark over an empty journal, and the next start refused
/// it (found by review): the mark is cleared before the journal is created again.
#[test]
fn a_crash_while_an_accepted_lost_journal_is_created_again_is_not_refused_next_time() {
    let (image, _) = crashed_store();
    std::fs::remove_file(image.path().join(JOURNAL_FILE_NAME)).unwrap();
    let faults = eventlog::FaultHandle::default();
    faults.arm_on(
        eventlog::FaultPlan {
            op: eventlog::FaultOp::Write,
            nth: 1,
            mode: eventlog::FaultMode::FromThenOn,
            error: eventlog::FaultError::Io,
        },
        eventlog::FaultTarget::Journal,
    );
    let failing =
        RedbOptions { journal_loss: JournalLoss::Accept, journal_faults: Some(faults), ..RedbOptions::default() };
    assert!(RedbStore::open(image.path(), failing).is_err());
    assert_eq!(std::fs::metadata(image.path().join(JOURNAL_FILE_NAME)).unwrap().len(), 0);
    let store = RedbStore::open(image.path(), RedbOptions::default()).unwrap();
    assert_eq!(store.head().seq, 1);
}

fn cut(path: &Path, len: u64) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

#[test]
fn a_clean_close_leaves_a_log_file_that_needs_no_journal() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(dir.path(), RedbOptions::default()).unwrap();
    append_batches(&mut store, 0, 3);
    let head = store.head().seq;
    // Running: the mark is set, so the file alone (copied without its journals) is refused.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("ledger.redb"), copy.path().join("ledger.redb")).unwrap();
    assert!(opens(copy.path(), JournalLoss::Refuse).iter().all(Result::is_err));
    drop(store);
    for journal in [JOURNAL_FILE_NAME, SECOND_JOURNAL_FILE_NAME] {
        std::fs::remove_file(dir.path().join(journal)).unwrap();
    }
    assert_eq!(opens(dir.path(), JournalLoss::Refuse), vec![Ok(head), Ok(head), Ok(head)]);
}

/// A start with the journal turned off takes in what a crash left in the journals and retires
/// them: it used to read them again at every start, and never let them go.
#[test]
fn a_start_without_a_journal_takes_in_the_crashed_journals_and_retires_them() {
    let (image, head) = crashed_store();
    let no_journal = || RedbOptions { journal_bytes: 0, ..RedbOptions::default() };
    let mut store = RedbStore::open(image.path(), no_journal()).unwrap();
    assert_eq!(store.head().seq, head);
    for journal in [JOURNAL_FILE_NAME, SECOND_JOURNAL_FILE_NAME] {
        assert!(!image.path().join(journal).exists(), "{journal} was kept");
    }
    append_batches(&mut store, head, 1);
    drop(store);
    // Whatever starts next: every record, from the log file alone.
    assert_eq!(opens(image.path(), JournalLoss::Refuse), vec![Ok(head + 3), Ok(head + 3), Ok(head + 3)]);
    let store = RedbStore::open(image.path(), no_journal()).unwrap();
    assert_eq!(store.head().seq, head + 3);
}

/// A crash at every journal write in turn (frames, and the two writes of each header reset when
/// a full journal starts over): the crash image opens with every acknowledged record. The reset
/// blanked the first frame block before writing the new header, so a crash between the two left
/// the old header over a blank block and intact later frames, which no start would open (found
/// by review): the header now goes first.
#[test]
fn a_crash_at_any_journal_write_leaves_a_log_that_opens_with_every_acknowledged_record() {
    for nth in 1..=90 {
        let dir = tempfile::tempdir().unwrap();
        let faults = eventlog::FaultHandle::default();
        let options = RedbOptions {
            journal_bytes: JOURNAL_BYTES_MIN,
            journal_faults: Some(faults.clone()),
            ..RedbOptions::default()
        };
        let mut store = RedbStore::open(dir.path(), options).unwrap();
        faults.arm_on(
            eventlog::FaultPlan {
                op: eventlog::FaultOp::Write,
                nth,
                mode: eventlog::FaultMode::FromThenOn,
                error: eventlog::FaultError::Io,
            },
            eventlog::FaultTarget::Journal,
        );
        let mut acknowledged = 0;
        for b in 0..40 {
            let batch: Vec<NewRecord> = (0..RECORDS_PER_BATCH).map(|r| record(b * RECORDS_PER_BATCH + r)).collect();
            match store.append(&batch, &[]) {
                Ok(appended) => acknowledged = appended.head.seq,
                Err(_) => break,
            }
        }
        let image = crash_image(dir.path());
        drop(store);
        let reopened =
            RedbStore::open(image.path(), RedbOptions { journal_bytes: JOURNAL_BYTES_MIN, ..RedbOptions::default() })
                .unwrap_or_else(|e| panic!("a crash at journal write {nth} left a log that does not open: {e}"));
        assert!(reopened.head().seq >= acknowledged, "write {nth}: head {} < {acknowledged}", reopened.head().seq);
        let report = verify(&reopened.reader(), |_, _| {}).unwrap();
        assert!(report.is_clean(), "write {nth}: {report:?}");
    }
}
