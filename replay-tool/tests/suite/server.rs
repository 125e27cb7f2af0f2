//! `--server URL --token T`: the tool reads a server's NDJSON event feed
//! (`GET /v1/events?from_seq=1&follow=false` with a bearer token). A small
//! HTTP server on 127.0.0.1 serves the feed of a real log in the feed's shape
//! (`eventlog::json::record_json`); every answer must equal the one read from
//! the file, and the chain must recompute from the feed alone.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use crate::common::{build_story, path, replay, replay_ok};
use eventlog::LogReader;

const TOKEN: &str = "auditor-token";

/// Serves `body` to every request with the right token (401 otherwise) for `requests`
/// connections, announcing `head` as the server does (the head a feed without `follow` reads
/// to at least).
fn serve(body: String, requests: usize, head: Option<u64>) -> (String, std::thread::JoinHandle<Vec<String>>) {
    serve_by_request(move |_| body.clone(), requests, head)
}

/// [`serve`], with each answer's body chosen by its request line.
fn serve_by_request(
    body_for: impl Fn(&str) -> String + Send + 'static,
    requests: usize,
    head: Option<u64>,
) -> (String, std::thread::JoinHandle<Vec<String>>) {
    serve_with_headers(move |request| (String::new(), body_for(request)), requests, head)
}

/// [`serve_by_request`], with header lines (each ending in CRLF) and the body chosen by the
/// request line.
fn serve_with_headers(
    answer_for: impl Fn(&str) -> (String, String) + Send + 'static,
    requests: usize,
    head: Option<u64>,
) -> (String, std::thread::JoinHandle<Vec<String>>) {
    let head = head.map(|seq| format!("x-taskledger-head-seq: {seq}\r\n")).unwrap_or_default();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for stream in listener.incoming().take(requests) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut authorized = false;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                authorized |= line.trim().eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}"));
            }
            seen.push(request_line.trim().to_owned());
            let (headers, body) = answer_for(request_line.trim());
            let (status, payload) = if authorized { ("200 OK", body.as_str()) } else { ("401 Unauthorized", "{}") };
            write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-type: application/x-ndjson\r\n{head}{headers}content-length: {}\r\nconnection: close\r\n\r\n{payload}",
                payload.len()
            )
            .unwrap();
        }
        seen
    });
    (url, handle)
}

/// The story's log as the server's feed serves it.
fn story_feed(dir: &std::path::Path) -> String {
    build_story(dir, 10);
    let reader = LogReader::open_read_only(dir.join("ledger.redb")).unwrap();
    reader
        .read_range(1, u64::MAX, 1000)
        .unwrap()
        .iter()
        .map(|r| {
            let event = eventlog::decode_event(r).unwrap();
            format!("{}\n", serde_json::Value::Object(eventlog::json::record_json(r, &event)))
        })
        .collect()
}

#[test]
fn every_read_works_on_a_server_feed_as_on_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let feed = story_feed(dir.path());
    let data = path(dir.path());
    let runs: [&[&str]; 4] = [
        &["events"],
        &["state", "--as-of", "12", "--json"],
        &["incident", "--task", "018bcfe5-6803-7001-9aa6-6d2c7ddf743f", "--from", "2026-11-23T14:00:00Z"],
        &["diff", "--from", "3", "--to", "20", "--json"],
    ];
    let (url, server) = serve(feed, runs.len() + 2, Some(23));
    for args in runs {
        let from_file = replay_ok(&[args, &["--data", data]].concat());
        let from_feed = replay_ok(&[args, &["--server", &url, "--token", TOKEN]].concat());
        let from_feed = from_feed.replace(&url, data).replace(&format!("{data}/ledger.redb"), data);
        let from_file = from_file.replace(&format!("{data}/ledger.redb"), data);
        if args[0] == "state" {
            // Same state; only how it was reached differs (a feed has no snapshots).
            let strip = |text: &str| {
                let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
                v.as_object_mut()
                    .unwrap()
                    .retain(|k, _| k != "snapshot_seq" && k != "replayed" && k != "tasks_decoded");
                v
            };
            assert_eq!(strip(&from_feed), strip(&from_file));
            continue;
        }
        assert_eq!(from_feed, from_file, "{args:?}");
    }
    let verified = replay_ok(&["verify", "--server", &url, "--token", TOKEN, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&verified).unwrap();
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["records_checked"], 23, "the chain recomputes from the feed alone");
    let refused = replay(&["info", "--server", &url, "--token", "wrong"]);
    assert_eq!(refused.status.code(), Some(3));
    let said = crate::common::stderr(&refused);
    assert!(said.contains("read the event feed") && said.contains("the server answered 401"), "{said}");
    let requests = server.join().unwrap();
    assert!(requests.iter().all(|r| r == "GET /v1/events?from_seq=1&follow=false HTTP/1.1"), "{requests:?}");
}

/// A feed that ends before the head the server announced was cut short (a server stopping,
/// a proxy): the tool refuses it rather than answer from part of the log.
#[test]
fn a_feed_cut_short_of_its_announced_head_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let feed = story_feed(dir.path());
    let (url, server) = serve(feed, 2, Some(30));
    for args in [&["info"][..], &["verify"]] {
        let refused = replay(&[args, &["--server", &url, "--token", TOKEN]].concat());
        assert_ne!(refused.status.code(), Some(0));
        let stderr = crate::common::stderr(&refused);
        assert!(stderr.contains("the feed ended at seq 23, before the head 30"), "{stderr}");
    }
    server.join().unwrap();
}

/// `rebuild` and `materialize` run projectors over a log file: they do not offer `--server`
/// (found by a black-box check: their help listed it, and a run refused it).
#[test]
fn the_commands_that_need_the_file_do_not_offer_a_server() {
    for command in ["rebuild", "materialize"] {
        let help = replay_ok(&[command, "--help"]);
        assert!(help.contains("--data") && !help.contains("--server"), "{help}");
        let refused = replay(&[command, "--server", "http://127.0.0.1:9", "--token", TOKEN]);
        assert_eq!(refused.status.code(), Some(2), "{command}");
    }
    assert!(replay_ok(&["info", "--help"]).contains("--server"));
}

/// `incident --task` between seqs reads the log's head and the task's history, not the whole
/// feed (on a large log the feed took gigabytes of memory for one task's report); with a time
/// point it reads the whole feed, as above. The history is read for as long as the server's
/// `Link` header names a next page (here pages of 3, as a server or proxy with a lower cap would
/// answer).
#[test]
fn incident_of_a_task_reads_only_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let feed = story_feed(dir.path());
    let data = path(dir.path());
    let task = "018bcfe5-6803-7001-9aa6-6d2c7ddf743f";
    let stream = format!("\"stream\":\"task:{task}\"");
    let history: Vec<String> = feed.lines().filter(|line| line.contains(&stream)).map(str::to_owned).collect();
    assert_eq!(history.len(), 9);
    let answer = move |request: &str| {
        let page_from = request
            .strip_prefix(&format!("GET /v1/tasks/{task}/history?from_version="))
            .and_then(|rest| rest.strip_suffix("&limit=10000 HTTP/1.1"))
            .and_then(|from| from.parse::<usize>().ok());
        if request.starts_with("GET /v1/ledger ") {
            (String::new(), r#"{"head_seq": 23, "head_hash": "00"}"#.to_owned())
        } else if let Some(from) = page_from {
            let page = &history[from - 1..(from + 2).min(history.len())];
            let link = if from + 2 < history.len() {
                format!("link: </v1/tasks/{task}/history?from_version={}&limit=3>; rel=\"next\"\r\n", from + 3)
            } else {
                String::new()
            };
            (link, format!("[{}]", page.join(",")))
        } else {
            (String::new(), format!("unexpected request {request}"))
        }
    };
    let runs: [&[&str]; 3] = [
        &["incident", "--task", task, "--format", "json"],
        &["incident", "--task", task],
        &["incident", "--task", task, "--from", "8", "--to", "18", "--format", "html"],
    ];
    // Each run: the head, then the history's three pages (the last run reads the history twice:
    // its window starts after the task's creation, which names its steps).
    let (url, server) = serve_with_headers(answer, 15, None);
    // The same report, but for the note that the queue's events were not read (a history holds
    // only the task's own; the story's queue events fall outside task 3's life anyway).
    let note = "the task's queue events (pauses, resumes, concurrency) are not shown: a server's task history \
                holds only the task's own events (read a backup with --data for them)";
    for args in runs {
        let from_file = replay_ok(&[args, &["--data", data]].concat());
        let from_feed = replay_ok(&[args, &["--server", &url, "--token", TOKEN]].concat());
        if args.contains(&"json") {
            let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
            let mut report = parse(&from_feed.replace(&url, data));
            assert_eq!(report["notes"], serde_json::json!([note]), "{args:?}");
            report.as_object_mut().unwrap().remove("notes");
            assert_eq!(report, parse(&from_file.replace(&format!("{data}/ledger.redb"), data)), "{args:?}");
            continue;
        }
        let without_note = {
            let markdown_note = format!("- note: {note}\n");
            let html_note = format!("<li>note: {note}</li>");
            assert!(from_feed.contains(&markdown_note) || from_feed.contains(&html_note), "{args:?}: {from_feed}");
            from_feed.replace(&markdown_note, "").replace(&html_note, "")
        };
        assert_eq!(
            without_note.replace(&url, data),
            from_file.replace(&format!("{data}/ledger.redb"), data),
            "{args:?}"
        );
    }
    let requests = server.join().unwrap();
    assert!(!requests.iter().any(|r| r.contains("/v1/events")), "{requests:?}");
    assert_eq!(requests.iter().filter(|r| r.contains("/v1/ledger")).count(), 3, "{requests:?}");
    assert_eq!(requests.iter().filter(|r| r.contains("from_version=7&")).count(), 4, "{requests:?}");
}

/// `events` reads only the window it shows: from `--from` (a seq), and no more than `--limit`
/// or up to `--to` when no filter can skip records (it read the whole feed into memory first:
/// 1.5 GB and 6.5 s for ten records of a 546 MB log, found by a black-box check). The server
/// here answers with records 5 to 7, as a server asked for that window does.
#[test]
fn events_reads_only_the_window_it_shows() {
    let dir = tempfile::tempdir().unwrap();
    let feed = story_feed(dir.path());
    let data = path(dir.path());
    let window: String = feed.lines().skip(4).take(3).map(|line| format!("{line}\n")).collect();
    // The last: `--to` past the window, within the head the server announced.
    let runs: [&[&str]; 3] = [
        &["events", "--from", "5", "--limit", "3"],
        &["events", "--from", "5", "--to", "7", "--json"],
        &["events", "--from", "5", "--to", "20", "--limit", "3"],
    ];
    // A task first met inside the window is named from its history, read from the server.
    let histories = feed.clone();
    let answer = move |request: &str| match request.split(['/', ' ', '?']).skip_while(|part| *part != "tasks").nth(1) {
        Some(task) => {
            let stream = format!("\"stream\":\"task:{task}\"");
            let lines: Vec<&str> = histories.lines().filter(|line| line.contains(&stream)).collect();
            format!("[{}]", lines.join(","))
        }
        None => window.clone(),
    };
    // Each table names the steps of two tasks: two history reads per table.
    let (url, server) = serve_by_request(answer, runs.len() + 4, Some(23));
    for args in runs {
        let from_file = replay_ok(&[args, &["--data", data]].concat());
        let from_feed = replay_ok(&[args, &["--server", &url, "--token", TOKEN]].concat());
        assert_eq!(from_feed.replace(&url, data), from_file.replace(&format!("{data}/ledger.redb"), data), "{args:?}");
        assert_eq!(
            from_file.lines().filter(|l| !l.trim().is_empty()).count(),
            if args.contains(&"--json") { 3 } else { 4 }
        );
    }
    let requests = server.join().unwrap();
    let feeds: Vec<&String> = requests.iter().filter(|r| r.starts_with("GET /v1/events")).collect();
    assert_eq!(feeds, ["GET /v1/events?from_seq=5&follow=false&limit=3 HTTP/1.1"; 3], "{requests:?}");
    assert_eq!(requests.iter().filter(|r| r.contains("/history")).count(), 4, "{requests:?}");
}

/// A feed that drops or repeats a record, and a task history that does not go on from the
/// version asked for, are refused: records are found by their place, and a server ignoring
/// `from_version` was read page after page for ever (found by a review).
#[test]
fn a_feed_with_a_gap_or_a_history_out_of_order_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let feed = story_feed(dir.path());
    let lines: Vec<&str> = feed.lines().collect();
    let dropped: String = lines.iter().enumerate().filter(|(i, _)| *i != 4).map(|(_, l)| format!("{l}\n")).collect();
    let repeated: String = lines.iter().take(6).chain(lines.iter().skip(5)).map(|l| format!("{l}\n")).collect();
    for (body, said) in
        [(dropped, "the feed sent seq 6 where seq 5 was due"), (repeated, "sent seq 6 where seq 7 was due")]
    {
        let (url, server) = serve(body, 1, Some(23));
        let refused = replay(&["info", "--server", &url, "--token", TOKEN]);
        assert_ne!(refused.status.code(), Some(0));
        let stderr = crate::common::stderr(&refused);
        assert!(stderr.contains(said), "{stderr}");
        server.join().unwrap();
    }

    let task = "018bcfe5-6803-7001-9aa6-6d2c7ddf743f";
    let stream = format!("\"stream\":\"task:{task}\"");
    let first_page: Vec<String> =
        feed.lines().filter(|line| line.contains(&stream)).take(3).map(str::to_owned).collect();
    // Every page is the first, with a link to the next: a server that ignores `from_version`.
    let answer = move |request: &str| {
        if request.starts_with("GET /v1/ledger ") {
            (String::new(), r#"{"head_seq": 23, "head_hash": "00"}"#.to_owned())
        } else {
            let link = format!("link: </v1/tasks/{task}/history?from_version=4&limit=3>; rel=\"next\"\r\n");
            (link, format!("[{}]", first_page.join(",")))
        }
    };
    let (url, server) = serve_with_headers(answer, 3, None);
    let refused = replay(&["incident", "--task", task, "--server", &url, "--token", TOKEN]);
    assert_ne!(refused.status.code(), Some(0));
    let stderr = crate::common::stderr(&refused);
    assert!(stderr.contains("history sent version 1 where version 4 was due"), "{stderr}");
    server.join().unwrap();
}
