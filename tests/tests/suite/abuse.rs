//! GraphQL and HTTP abuse against the real server: the committed corpus in
//! `tests/abuse/` (one file per case, see its README) — depth, complexity,
//! 1,000 aliases, fragment cycles, batches of 1,000 operations, 10 MiB
//! bodies, deeply nested JSON, unknown fields, wrong content types, huge
//! request heads — and slow-drip clients that send their request one byte at
//! a time.
//!
//! Every case must be refused with its documented status and stable code
//! before any resolver or command runs (the log head does not move; the
//! abusive writes all target namespace `abuse`, which must never appear in
//! the log), and while abusive clients run on several threads a normal
//! client's requests keep succeeding. Slow-drip tests hold whether or not the
//! server limits connections and request-head read time: the drippers stay
//! well below any connection limit, and the header timeout is only exercised
//! when `taskledger serve --help` offers it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Server, raw, workspace_binary};

/// One corpus file.
#[derive(Clone, Debug)]
struct Case {
    name: String,
    /// What the case attacks (its `# probes:` line), shown when it fails.
    probes: String,
    method: String,
    path: String,
    expect_status: u16,
    expect_code: Option<String>,
    /// The whole raw request (head and body), ready to send.
    request: Vec<u8>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("abuse")
}

/// Expands `{{repeat N}}…{{/repeat}}` (with `{i}` for the copy's index).
fn expand(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{repeat ") {
        out.push_str(&rest[..start]);
        let after = &rest[start + "{{repeat ".len()..];
        let close = after.find("}}").expect("{{repeat N}}");
        let count: usize = after[..close].trim().parse().expect("repeat count");
        let body_and_rest = &after[close + 2..];
        let end = body_and_rest.find("{{/repeat}}").expect("{{/repeat}}");
        let body = &body_and_rest[..end];
        if body.contains("{i}") {
            for i in 0..count {
                out.push_str(&body.replace("{i}", &i.to_string()));
            }
        } else {
            out.push_str(&body.repeat(count));
        }
        rest = &body_and_rest[end + "{{/repeat}}".len()..];
    }
    out.push_str(rest);
    out
}

fn load_case(path: &Path, token: &str) -> Case {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).expect("read corpus file");
    let mut header = std::collections::BTreeMap::new();
    let mut lines = text.split_inclusive('\n');
    let mut consumed = 0;
    for line in lines.by_ref() {
        let Some(field) = line.strip_prefix('#') else { break };
        consumed += line.len();
        if let Some((key, value)) = field.trim().split_once(':') {
            header.insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    let body = expand(&text[consumed..]);
    let probes = header.get("probes").cloned().unwrap_or_else(|| panic!("{name}: no `# probes:` line"));
    let expect = header.get("expect").unwrap_or_else(|| panic!("{name}: no `# expect:` line"));
    let mut expect = expect.split_whitespace();
    let expect_status: u16 = expect.next().and_then(|s| s.parse().ok()).expect("expect: STATUS [code]");
    let expect_code = expect.next().map(str::to_owned);
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if extension == "http" {
        let raw = body.replace("{token}", token);
        let (head, body) = raw.split_once("\n\n").unwrap_or((raw.as_str(), ""));
        let body = body.trim_end_matches('\n');
        let head = head.replace("{length}", &body.len().to_string());
        let mut request = head.replace('\n', "\r\n").into_bytes();
        request.extend_from_slice(b"\r\n\r\n");
        request.extend_from_slice(body.as_bytes());
        let first = head.lines().next().unwrap_or("").to_owned();
        let mut parts = first.split_whitespace();
        return Case {
            name,
            probes,
            method: parts.next().unwrap_or("").to_owned(),
            path: parts.next().unwrap_or("").to_owned(),
            expect_status,
            expect_code,
            request,
        };
    }
    let (method, path, body) = if extension == "graphql" {
        ("POST".to_owned(), "/graphql".to_owned(), json!({ "query": body }).to_string())
    } else {
        let route = header.get("route").unwrap_or_else(|| panic!("{name}: no `# route:` line"));
        let (method, path) = route.split_once(' ').expect("route: METHOD PATH");
        (method.to_owned(), path.to_owned(), body.trim_end_matches('\n').to_owned())
    };
    let content_type = header.get("content-type").cloned().unwrap_or_else(|| "application/json".to_owned());
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: taskledger\r\nAuthorization: Bearer {token}\r\nContent-Type: \
         {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body.as_bytes());
    Case { name, probes, method, path, expect_status, expect_code, request }
}

fn corpus(token: &str) -> Vec<Case> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("read tests/abuse")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .collect();
    paths.sort();
    paths.iter().map(|p| load_case(p, token)).filter(|c| !c.name.starts_with("slow-drip")).collect()
}

/// Sends a raw request from one thread while reading the answer on this
/// one, so a server that answers (413) before the upload ends is still heard.
fn exchange(addr: &str, request: &[u8]) -> std::io::Result<raw::RawAnswer> {
    let mut stream = raw::connect(addr, Duration::from_secs(30))?;
    let mut writer = stream.try_clone()?;
    let request = request.to_vec();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&request);
    });
    let answer = raw::read_answer(&mut stream);
    let _ = sender.join();
    answer
}

/// The stable code of an answer body (REST `error.code` or GraphQL `errors[0].extensions.code`).
fn code_of(body: &str) -> Option<String> {
    let body = body.trim();
    // A chunked body: take the JSON between the chunk-size lines.
    let json_text = body.find('{').map(|i| &body[i..body.rfind('}').map_or(body.len(), |j| j + 1)]).unwrap_or("");
    let value: Value = serde_json::from_str(json_text).ok()?;
    value["error"]["code"].as_str().or_else(|| value["errors"][0]["extensions"]["code"].as_str()).map(str::to_owned)
}

fn check(case: &Case, answer: &raw::RawAnswer) -> Result<(), String> {
    if answer.status != case.expect_status {
        return Err(format!(
            "{} ({}): expected {}, got {}: {}",
            case.name,
            case.probes,
            case.expect_status,
            answer.status,
            excerpt(answer)
        ));
    }
    if let Some(code) = &case.expect_code {
        let got = code_of(&answer.body);
        if got.as_deref() != Some(code.as_str()) {
            return Err(format!("{}: expected code {code}, got {got:?}: {}", case.name, excerpt(answer)));
        }
        let message_ok = answer.body.contains("\"message\"");
        if !message_ok {
            return Err(format!("{}: no message: {}", case.name, excerpt(answer)));
        }
    }
    Ok(())
}

fn excerpt(answer: &raw::RawAnswer) -> String {
    answer.body.chars().take(300).collect()
}

/// Whether anything an abusive request asked for reached the log.
fn abuse_in_log(server: &Server) -> bool {
    let (status, text) = server.get_text("/v1/events?follow=false&limit=1000000");
    assert_eq!(status, 200);
    text.contains("\"abuse\"")
}

/// A normal client: creates a task, reads it back, asks GraphQL for the
/// head; counts successes and failures until `stop`.
fn normal_client(base: &str, token: &str, stop: &AtomicBool, ok: &AtomicU64, failures: &std::sync::Mutex<Vec<String>>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let auth = format!("Bearer {token}");
    let fail = |what: String| failures.lock().unwrap().push(what);
    while !stop.load(Ordering::Relaxed) {
        let created = agent
            .post(format!("{base}/v1/tasks"))
            .header("Authorization", &auth)
            .send_json(json!({ "namespace": "normal", "handler": "normal" }));
        let id = match created {
            Ok(mut r) if r.status() == 201 => {
                let body: Value =
                    serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default()).unwrap_or_default();
                body["task_id"].as_str().unwrap_or_default().to_owned()
            }
            Ok(r) => {
                fail(format!("create: {}", r.status()));
                continue;
            }
            Err(e) => {
                fail(format!("create: {e}"));
                continue;
            }
        };
        match agent.get(format!("{base}/v1/tasks/{id}")).header("Authorization", &auth).call() {
            Ok(r) if r.status() == 200 => {}
            Ok(r) => fail(format!("read: {}", r.status())),
            Err(e) => fail(format!("read: {e}")),
        }
        match agent
            .post(format!("{base}/graphql"))
            .header("Authorization", &auth)
            .send_json(json!({ "query": "{ ledger { headSeq } }" }))
        {
            Ok(r) if r.status() == 200 => {}
            Ok(r) => fail(format!("graphql: {}", r.status())),
            Err(e) => fail(format!("graphql: {e}")),
        }
        ok.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn every_corpus_case_is_refused_with_its_documented_code_before_anything_runs() {
    let server = Server::start();
    let cases = corpus(&server.token);
    assert!(cases.len() >= 20, "the corpus has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let head = server.head_seq();
        match exchange(&server.addr(), &case.request) {
            Ok(answer) => {
                if let Err(e) = check(case, &answer) {
                    failures.push(e);
                }
            }
            Err(e) => failures.push(format!("{}: no answer: {e}", case.name)),
        }
        if server.head_seq() != head {
            failures.push(format!("{}: the log head moved from {head}", case.name));
        }
        assert_eq!(server.get("/healthz").status, 200, "the server survived {}", case.name);
    }
    println!("abuse: {} corpus cases, {} failures", cases.len(), failures.len());
    for case in &cases {
        println!(
            "  {:<45} {} {:<22} -> {} {}",
            case.name,
            case.method,
            &case.path[..case.path.len().min(22)],
            case.expect_status,
            case.expect_code.as_deref().unwrap_or("")
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!abuse_in_log(&server), "an abusive request wrote to the log");
}

#[test]
fn a_normal_client_is_served_while_abusive_clients_hammer_the_server() {
    let server = Server::start();
    let cases = corpus(&server.token);
    let stop = AtomicBool::new(false);
    let ok = AtomicU64::new(0);
    let normal_failures = std::sync::Mutex::new(Vec::new());
    let abusive_sent = AtomicU64::new(0);
    let abusive_wrong = std::sync::Mutex::new(Vec::new());
    let addr = server.addr();
    std::thread::scope(|scope| {
        scope.spawn(|| normal_client(&server.base, &server.token, &stop, &ok, &normal_failures));
        let abusers: Vec<_> = (0..4)
            .map(|t| {
                let (cases, addr, sent, wrong) = (&cases, &addr, &abusive_sent, &abusive_wrong);
                scope.spawn(move || {
                    // Every case twice, each thread starting elsewhere in the corpus.
                    for round in 0..2 * cases.len() {
                        let case = &cases[(round + t * 7) % cases.len()];
                        match exchange(addr, &case.request) {
                            Ok(answer) => {
                                if let Err(e) = check(case, &answer) {
                                    wrong.lock().unwrap().push(e);
                                }
                            }
                            Err(e) => wrong.lock().unwrap().push(format!("{}: {e}", case.name)),
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for abuser in abusers {
            abuser.join().expect("abusive client");
        }
        // Let the normal client finish at least a few rounds after the abuse too.
        let seen = ok.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while ok.load(Ordering::Relaxed) < seen + 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let normal_failures = normal_failures.into_inner().unwrap();
    let abusive_wrong = abusive_wrong.into_inner().unwrap();
    println!(
        "abuse: {} abusive requests on 4 threads; normal client {} rounds (create, read, GraphQL), {} failures",
        abusive_sent.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed),
        normal_failures.len()
    );
    assert!(normal_failures.is_empty(), "the normal client failed: {normal_failures:?}");
    assert!(ok.load(Ordering::Relaxed) >= 3, "the normal client got through");
    assert!(abusive_wrong.is_empty(), "{}", abusive_wrong.join("\n"));
    assert!(!abuse_in_log(&server), "an abusive request wrote to the log");
}

/// The slow-drip request, from the corpus.
fn drip_request(token: &str) -> Vec<u8> {
    load_case(&corpus_dir().join("slow-drip-head.http"), token).request
}

/// Sends `request` one byte at a time with `pause` between bytes, then reads
/// the answer. `Ok(Some(status))`: answered; `Ok(None)`: the server closed
/// the connection (a header timeout, or a connection limit's choice).
fn drip(addr: &str, request: &[u8], pause: Duration, give_up: Instant) -> Result<Option<u16>, String> {
    let mut stream = raw::connect(addr, Duration::from_secs(30)).map_err(|e| format!("connect: {e}"))?;
    for byte in request {
        if stream.write_all(std::slice::from_ref(byte)).is_err() {
            return Ok(None);
        }
        if Instant::now() > give_up {
            return Err("still dripping at the bounded wait".into());
        }
        std::thread::sleep(pause);
    }
    match raw::read_answer(&mut stream) {
        Ok(answer) => Ok(Some(answer.status)),
        Err(_) => Ok(None),
    }
}

#[test]
fn slow_drip_clients_do_not_stop_other_clients_being_served() {
    let server = Server::start();
    let request = drip_request(&server.token);
    let drippers = 24;
    // About 3 s per request: 30 ms between bytes (well inside any sane header timeout).
    let pause = Duration::from_millis(30);
    let stop = AtomicBool::new(false);
    let ok = AtomicU64::new(0);
    let normal_failures = std::sync::Mutex::new(Vec::new());
    let give_up = Instant::now() + Duration::from_secs(60);
    let addr = server.addr();
    let results: Vec<Result<Option<u16>, String>> = std::thread::scope(|scope| {
        scope.spawn(|| normal_client(&server.base, &server.token, &stop, &ok, &normal_failures));
        let handles: Vec<_> = (0..drippers).map(|_| scope.spawn(|| drip(&addr, &request, pause, give_up))).collect();
        let results = handles.into_iter().map(|h| h.join().expect("dripper")).collect();
        stop.store(true, Ordering::Relaxed);
        results
    });
    let normal_failures = normal_failures.into_inner().unwrap();
    let answered = results.iter().filter(|r| matches!(r, Ok(Some(_)))).count();
    let closed = results.iter().filter(|r| matches!(r, Ok(None))).count();
    println!(
        "abuse: {drippers} slow-drip clients ({} bytes, {} ms apart): {answered} answered, {closed} closed by the \
         server; normal client {} rounds meanwhile, {} failures",
        request.len(),
        pause.as_millis(),
        ok.load(Ordering::Relaxed),
        normal_failures.len()
    );
    assert!(
        normal_failures.is_empty(),
        "the normal client failed while drippers held connections: {normal_failures:?}"
    );
    assert!(ok.load(Ordering::Relaxed) >= 3, "the normal client was served while the drippers dripped");
    for result in &results {
        match result {
            Ok(Some(status)) => assert!(*status < 500, "a dripper got {status}"),
            Ok(None) => {}
            Err(e) => panic!("a dripper hung: {e}"),
        }
    }
}

/// With a short header-read timeout (when the server has one), a client
/// slower than it is cut off, and others are served meanwhile.
#[test]
fn a_dripper_slower_than_the_header_timeout_is_cut_off() {
    let help = std::process::Command::new(workspace_binary("taskledger"))
        .args(["serve", "--help"])
        .output()
        .expect("taskledger serve --help");
    if !String::from_utf8_lossy(&help.stdout).contains("--header-read-timeout-ms") {
        println!("abuse: this server has no --header-read-timeout-ms; nothing to check");
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_in(&temp.path().join("data"), &["--header-read-timeout-ms", "500"]);
    let request = drip_request(&server.token);
    let give_up = Instant::now() + Duration::from_secs(30);
    let addr = server.addr();
    let stop = AtomicBool::new(false);
    let ok = AtomicU64::new(0);
    let normal_failures = std::sync::Mutex::new(Vec::new());
    let results: Vec<Result<Option<u16>, String>> = std::thread::scope(|scope| {
        scope.spawn(|| normal_client(&server.base, &server.token, &stop, &ok, &normal_failures));
        // 100 ms a byte: the head (~150 bytes) would take 15 s, far past 500 ms.
        let handles: Vec<_> =
            (0..8).map(|_| scope.spawn(|| drip(&addr, &request, Duration::from_millis(100), give_up))).collect();
        let results = handles.into_iter().map(|h| h.join().expect("dripper")).collect();
        stop.store(true, Ordering::Relaxed);
        results
    });
    for result in &results {
        match result {
            Ok(None) | Ok(Some(408)) => {}
            other => panic!("a dripper past the header timeout got {other:?}"),
        }
    }
    let normal_failures = normal_failures.into_inner().unwrap();
    println!(
        "abuse: 8 drippers past a 500 ms header timeout all cut off; normal client {} rounds, {} failures",
        ok.load(Ordering::Relaxed),
        normal_failures.len()
    );
    assert!(normal_failures.is_empty(), "{normal_failures:?}");
    assert!(ok.load(Ordering::Relaxed) >= 1);
    let created = server.get("/v1/views/tasks?namespace=drip");
    assert_eq!(created.status, 200);
}

/// Cache sizes and request timeouts out of range are refused before anything is opened, with
/// the range in the message; in range, the banner prints what was set.
#[test]
fn flags_out_of_range_are_refused_and_in_range_are_reported() {
    let temp = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--log-cache-mib", "0"),
        ("--projections-cache-mib", "1048577"),
        ("--log-cache-mib", "-3"),
        // Below 10 s every read waiting for a seq (5 s) could be cut off; 0 would cut off all.
        ("--request-timeout-ms", "0"),
        ("--request-timeout-ms", "9999"),
        ("--request-timeout-ms", "3600001"),
        // Zero would refuse every request or hold nothing: each must be at least 1.
        ("--max-body-bytes", "0"),
        ("--max-concurrent-requests", "0"),
        ("--max-connections", "0"),
        ("--header-read-timeout-ms", "0"),
        ("--writer-queue", "0"),
        // Its slots are allocated at startup: 10^10 of them never listened.
        ("--writer-queue", "1048577"),
        ("--dedup-window", "0"),
        ("--feed-capacity", "0"),
        ("--stream-cache", "0"),
    ] {
        let data = temp.path().join("refused");
        let out = std::process::Command::new(workspace_binary("taskledger"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .arg(format!("{flag}={value}"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(&format!("invalid value '{value}'")),
            "{flag} {value}: {stderr}"
        );
        assert!(!data.exists(), "{flag} {value} created the data dir");
    }
    let server = Server::start_in(
        &temp.path().join("ok"),
        &["--log-cache-mib", "3", "--projections-cache-mib", "5", "--snapshot-every", "0"],
    );
    let banner = &server.banner;
    assert!(banner.contains("caches: 3 MiB of log pages, 5 MiB of SQLite projection pages per connection"), "{banner}");
    assert!(banner.contains("stream heads cached, no snapshots,"), "{banner}");
}
