//! Load and soak against the real server binary, in three phases run one
//! after the other (in one test, so that nothing else on the machine's two
//! cores competes with the measurement):
//!
//! 1. **Sustainable rate**: closed-loop clients with no think time run
//!    create → claim → complete cycles against a server with default limits;
//!    what they complete per second is the sustainable rate.
//! 2. **Overload**: 64 clients with no think time create tasks against a
//!    server started with `--writer-queue 4`. The writer's bounded channel is
//!    the one place the server sheds load (the request concurrency limit
//!    queues instead), and with its default of 16,384 slots a two-core load
//!    generator cannot fill it: 64 clients have at most 64 commands in flight.
//!    A small queue makes the shedding deterministic. Every answer must be
//!    201 or 503 `overloaded` with `Retry-After`; no 500, no transport error,
//!    no hang (every request has a 30 s bound); exactly the acknowledged
//!    creates are in the log; the server's RSS stays under `OVERLOAD_RSS_MAX_KIB`.
//! 3. **Soak**: half the sustainable rate (at most `SOAK_RATE_MAX`) for `TASKLEDGER_SOAK_SECS` seconds
//!    (default 60) with zero errors, and resident memory drift — mean RSS of
//!    the last third against the first third, after a warm-up — under 10 %.
//!    The soak server runs with `--dedup-window 1000`, so the in-memory
//!    command-id window (1,000,000 events by default, growing until full by
//!    design) fills during the warm-up instead of masquerading as a leak;
//!    likewise `--feed-capacity 1024` for the ring of recent records kept
//!    for live subscribers (65,536 by default: 15–25 MiB that, at a few
//!    hundred cycles/s, fills over the whole soak), and `--stream-cache 1000`
//!    for the writer's cache of stream heads (1,000,000 by default, one per
//!    task created, so it filled for the whole soak).
//!    Likewise the page caches: redb keeps up to `--log-cache-mib` of the
//!    log's pages in memory (256 MiB by default) and SQLite up to
//!    `--projections-cache-mib` per connection (64 MiB), so until the files
//!    are that large RSS grows with them by design. The soak server runs with
//!    caches of `SOAK_LOG_CACHE_MIB` and `SOAK_PROJECTIONS_CACHE_MIB`, which
//!    the files outgrow early on; the asserted drift is also net of the
//!    growth of `ledger.redb` and `projections.sqlite` (each counted up to its
//!    cache's size) over the same thirds, which matters only while a cache is
//!    still filling. The gross drift is printed too.
//!
//! Figures are printed in the form RELIABILITY.md quotes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Server, rss_kib};

/// The RSS bound under overload (KiB): a debug build serving 64 clients
/// uses well under this; running out of memory would cross it.
const OVERLOAD_RSS_MAX_KIB: u64 = 1024 * 1024;
const OVERLOAD_CLIENTS: usize = 64;
const OVERLOAD_SECS: u64 = 8;
const MEASURE_CLIENTS: usize = 8;
const MEASURE_SECS: u64 = 5;
const SOAK_CLIENTS: usize = 4;
const SOAK_DRIFT_MAX: f64 = 0.10;
/// The soak runs at half the sustainable rate, but at most this many cycles/s. Before the soak
/// bounded the stream cache, above ~300 cycles/s a 60 s soak measured +15 % net drift from the
/// still-filling bounds; the cap stays as a margin. The 600 s run in RELIABILITY.md is where
/// the long-run drift is read.
const SOAK_RATE_MAX: f64 = 250.0;
/// redb's page cache in the soak (`--log-cache-mib`). With the default 256 MiB the cache went
/// on filling for the whole soak and its growth, netted out of the drift, dwarfed what was
/// left: a CI run measured +51 % gross, +10.2 % net, on a 40 MiB base.
const SOAK_LOG_CACHE_MIB: u64 = 4;
/// SQLite's page cache per connection in the soak (`--projections-cache-mib`).
const SOAK_PROJECTIONS_CACHE_MIB: u64 = 2;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// One HTTP exchange: status, Retry-After, JSON body; or a transport error.
fn call(
    agent: &ureq::Agent,
    token: &str,
    url: &str,
    body: Option<Value>,
) -> Result<(u16, Option<String>, Value), String> {
    let auth = format!("Bearer {token}");
    let result = match body {
        Some(body) => agent.post(url).header("Authorization", &auth).send_json(body),
        None => agent.get(url).header("Authorization", &auth).call(),
    };
    let mut response = result.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = response.body_mut().read_to_string().map_err(|e| e.to_string())?;
    Ok((status, retry_after, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// One create → claim → complete cycle in namespace `ns`. Claims may take
/// another client's task; every client completes what it claims, so live
/// tasks stay bounded by the number of clients.
fn cycle(agent: &ureq::Agent, server: &Server, ns: &str) -> Result<(), String> {
    let check = |what: &str, r: Result<(u16, Option<String>, Value), String>, want: u16| match r {
        Ok((status, _, body)) if status == want => Ok(body),
        Ok((status, _, body)) => Err(format!("{what}: {status} {body}")),
        Err(e) => Err(format!("{what}: {e}")),
    };
    let t = &server.token;
    check("create", call(agent, t, &server.url("/v1/tasks"), Some(json!({ "namespace": ns, "handler": "h" }))), 201)?;
    let claim = json!({ "namespaces": [ns], "worker_id": "load", "max": 1, "lease_ms": 60_000 });
    let claimed = check("claim", call(agent, t, &server.url("/v1/claims"), Some(claim)), 200)?;
    if let Some(step) = claimed["steps"].as_array().and_then(|s| s.first()) {
        let path = format!(
            "/v1/tasks/{}/steps/{}/complete",
            step["task_id"].as_str().unwrap_or(""),
            step["step"].as_str().unwrap_or("")
        );
        check("complete", call(agent, t, &server.url(&path), Some(json!({ "epoch": step["epoch"] }))), 200)?;
    }
    Ok(())
}

/// Phase 1: cycles per second with `MEASURE_CLIENTS` closed-loop clients.
fn sustainable_rate(server: &Server) -> f64 {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let errors = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..MEASURE_CLIENTS {
            scope.spawn(|| {
                let agent = agent();
                while !stop.load(Ordering::Relaxed) {
                    match cycle(&agent, server, "measure") {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            0
                        }
                    };
                }
            });
        }
        std::thread::sleep(Duration::from_secs(MEASURE_SECS));
        stop.store(true, Ordering::Relaxed);
    });
    let errors = errors.into_inner().unwrap();
    assert!(errors.is_empty(), "errors while measuring the sustainable rate: {errors:?}");
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

#[derive(Default)]
struct Tally {
    created: AtomicU64,
    shed: AtomicU64,
    reads: AtomicU64,
    errors: Mutex<Vec<String>>,
}

fn overload(server: &Server) {
    let pid = server.pid().expect("server pid");
    let tally = Tally::default();
    let stop = AtomicBool::new(false);
    let rss_max = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..OVERLOAD_CLIENTS {
            scope.spawn(|| {
                let agent = agent();
                let url = server.url("/v1/tasks");
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({ "namespace": "overload", "handler": "h" });
                    match call(&agent, &server.token, &url, Some(body)) {
                        Ok((201, _, _)) => {
                            tally.created.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((503, Some(retry), body))
                            if body["error"]["code"] == "overloaded" && retry.parse::<u32>().is_ok_and(|s| s >= 1) =>
                        {
                            tally.shed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((status, retry, body)) => {
                            tally.errors.lock().unwrap().push(format!("{status} retry-after {retry:?} {body}"))
                        }
                        Err(e) => tally.errors.lock().unwrap().push(e),
                    }
                }
            });
        }
        // Reads are never shed: a reader alongside must always be answered.
        scope.spawn(|| {
            let agent = agent();
            while !stop.load(Ordering::Relaxed) {
                match call(&agent, &server.token, &server.url("/v1/ledger"), None) {
                    Ok((200, _, _)) => tally.reads.fetch_add(1, Ordering::Relaxed),
                    other => {
                        tally.errors.lock().unwrap().push(format!("read: {other:?}"));
                        0
                    }
                };
            }
        });
        while started.elapsed() < Duration::from_secs(OVERLOAD_SECS) {
            if let Some(rss) = rss_kib(pid) {
                rss_max.fetch_max(rss, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let secs = started.elapsed().as_secs_f64();
    let (created, shed) = (tally.created.load(Ordering::Relaxed), tally.shed.load(Ordering::Relaxed));
    let errors = tally.errors.into_inner().unwrap();
    let rss_max = rss_max.load(Ordering::Relaxed);
    println!(
        "load: overload: {OVERLOAD_CLIENTS} clients, no think time, --writer-queue 4, {secs:.1} s: {} requests \
         ({:.0}/s offered), {created} created ({:.0}/s), {shed} shed with 503 + Retry-After ({:.1} %), {} reads \
         answered, {} errors; server RSS max {} MiB (bound {} MiB)",
        created + shed + errors.len() as u64,
        (created + shed) as f64 / secs,
        created as f64 / secs,
        100.0 * shed as f64 / (created + shed).max(1) as f64,
        tally.reads.load(Ordering::Relaxed),
        errors.len(),
        rss_max / 1024,
        OVERLOAD_RSS_MAX_KIB / 1024
    );
    assert!(
        errors.is_empty(),
        "{} answers neither 201 nor 503 + Retry-After: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(shed > 0, "the overload was shed with 503 at least once");
    assert!(created > 0, "some creates got through");
    assert!(rss_max > 0 && rss_max < OVERLOAD_RSS_MAX_KIB, "server RSS {rss_max} KiB");
    assert_eq!(server.head_seq(), created, "exactly the acknowledged creates are in the log; nothing shed was written");
    assert_eq!(server.get("/healthz").body["writer"], "healthy");
}

fn soak(server: &Server, rate: f64, secs: u64) {
    let pid = server.pid().expect("server pid");
    let warmup = Duration::from_secs((secs / 6).clamp(1, 10));
    let total = Duration::from_secs(secs);
    let interval = Duration::from_secs_f64(SOAK_CLIENTS as f64 / rate);
    let done = AtomicU64::new(0);
    let errors = Mutex::new(Vec::new());
    let samples = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..SOAK_CLIENTS {
            let (done, errors) = (&done, &errors);
            scope.spawn(move || {
                let agent = agent();
                // Staggered, fixed-rate ticks: a slow cycle is not made up later in a burst.
                let mut next = started + interval.mul_f64(client as f64 / SOAK_CLIENTS as f64);
                while next < started + total {
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    match cycle(&agent, server, "soak") {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().unwrap().push(e);
                            0
                        }
                    };
                    next = (next + interval).max(Instant::now() - interval);
                }
            });
        }
        while started.elapsed() < total {
            if let Some(rss) = rss_kib(pid) {
                let kib = |name: &str| std::fs::metadata(server.data.join(name)).map_or(0, |m| m.len() / 1024);
                let sqlite = kib("projections.sqlite") + kib("projections.sqlite-wal");
                // Only as much as each cache can hold counts as cached.
                let log =
                    kib("ledger.redb").min(SOAK_LOG_CACHE_MIB * 1024) + sqlite.min(SOAK_PROJECTIONS_CACHE_MIB * 1024);
                samples.lock().unwrap().push((started.elapsed(), rss, log));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let errors = errors.into_inner().unwrap();
    let samples: Vec<(u64, u64)> = samples
        .into_inner()
        .unwrap()
        .into_iter()
        .filter(|(at, _, _)| *at >= warmup)
        .map(|(_, rss, log)| (rss, log))
        .collect();
    assert!(samples.len() >= 6, "{} RSS samples after warm-up", samples.len());
    let third = samples.len() / 3;
    let mean = |s: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| s.iter().map(f).sum::<u64>() as f64 / s.len() as f64;
    let (head, tail) = (&samples[..third], &samples[samples.len() - third..]);
    let (first, last) = (mean(head, |s| s.0), mean(tail, |s| s.0));
    let log_growth = (mean(tail, |s| s.1) - mean(head, |s| s.1)).max(0.0);
    let gross = (last - first) / first;
    let drift = (last - first - log_growth) / first;
    let cycles = done.load(Ordering::Relaxed);
    println!(
        "load: soak: {secs} s at {:.1} cycles/s target ({:.1} achieved; a cycle is create+claim+complete), \
         {SOAK_CLIENTS} clients, {cycles} cycles ({} requests), {} errors; RSS after {} s warm-up: first third \
         {:.1} MiB, last third {:.1} MiB, start {:.1} MiB, end {:.1} MiB; gross drift {:+.1} %, log and projections grew \
         {:.1} MiB meanwhile (cached by redb and SQLite), drift net of it {:+.1} % (limit {:.0} %)",
        rate,
        cycles as f64 / elapsed,
        cycles * 3,
        errors.len(),
        warmup.as_secs(),
        first / 1024.0,
        last / 1024.0,
        samples[0].0 as f64 / 1024.0,
        samples.last().unwrap().0 as f64 / 1024.0,
        gross * 100.0,
        log_growth / 1024.0,
        drift * 100.0,
        SOAK_DRIFT_MAX * 100.0
    );
    assert!(errors.is_empty(), "{} soak errors: {:?}", errors.len(), &errors[..errors.len().min(10)]);
    assert!(cycles > 0);
    assert!(drift < SOAK_DRIFT_MAX, "RSS drift net of the log's growth {:.1} % over {secs} s", drift * 100.0);
}

#[test]
fn overload_is_shed_with_503_and_a_soak_at_half_the_sustainable_rate_holds_steady() {
    let secs: u64 = std::env::var("TASKLEDGER_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);

    let temp = tempfile::tempdir().unwrap();
    let server = Server::start_in(&temp.path().join("measure"), &[]);
    let rate = sustainable_rate(&server);
    println!(
        "load: sustainable: {rate:.1} cycles/s ({:.0} commands/s) with {MEASURE_CLIENTS} closed-loop clients over {MEASURE_SECS} s",
        rate * 3.0
    );
    drop(server);

    let log_path = temp.path().join("overload.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server = Server::start_with_log(&temp.path().join("overload"), &["--writer-queue", "4"], log);
    overload(&server);
    drop(server);
    // Shedding is the server working as designed (and counted in /metrics): a log line at ERROR
    // for every shed request would flood the log exactly when the server is busiest.
    let log = std::fs::read_to_string(&log_path).unwrap();
    let errors: Vec<&str> = log.lines().filter(|line| line.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{} ERROR lines while shedding load, the first: {}", errors.len(), errors[0]);

    let server = Server::start_in(
        &temp.path().join("soak"),
        &[
            "--dedup-window",
            "1000",
            "--feed-capacity",
            "1024",
            "--stream-cache",
            "1000",
            "--log-cache-mib",
            &SOAK_LOG_CACHE_MIB.to_string(),
            "--projections-cache-mib",
            &SOAK_PROJECTIONS_CACHE_MIB.to_string(),
        ],
    );
    soak(&server, (rate / 2.0).min(SOAK_RATE_MAX), secs);
}
