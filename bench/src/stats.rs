//! What a workload measures and how it is reported: per-command latency
//! histograms (µs, HdrHistogram) kept per producer or worker and merged at
//! the end so no lock sits on the hot path; the pickup tracker (create
//! acknowledged → returned by a claim, whichever side finishes second does
//! the subtraction); the run's phase (warm-up, measuring, stopping); and CPU
//! accounting from getrusage and /proc, so every figure comes with what the
//! load generator itself cost.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Notify;

/// Latencies are recorded in µs up to 60 s with 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// One command's latency histogram and error count.
pub struct Command {
    pub latency_us: Histogram<u64>,
    pub errors: u64,
}

impl Default for Command {
    fn default() -> Self {
        Command { latency_us: histogram(), errors: 0 }
    }
}

impl Command {
    pub fn record(&mut self, elapsed: Duration) {
        let us = (elapsed.as_micros() as u64).clamp(1, 60_000_000);
        self.latency_us.saturating_record(us);
    }
    pub fn merge(&mut self, other: &Command) {
        self.latency_us.add(&other.latency_us).expect("same histogram bounds");
        self.errors += other.errors;
    }
    pub fn p_ms(&self, quantile: f64) -> f64 {
        if self.latency_us.is_empty() {
            return 0.0;
        }
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Everything one producer or worker measured; merged into the workload's total.
#[derive(Default)]
pub struct Tally {
    pub create: Command,
    pub claim: Command,
    pub complete: Command,
    pub fail: Command,
    pub pickup: Command,
    /// Open-loop creates only: latency measured from the scheduled time, always.
    pub create_from_schedule: Command,
    /// Open-loop creates only: how late a send on a free connection left after its
    /// scheduled time (the load generator's timer and CPU, not the system measured).
    pub send_late: Command,
    /// Tasks created (single tasks, or tasks inside batches) while measuring.
    pub created: u64,
    /// Tasks that reached their end (completed, or dead-lettered) while measuring.
    pub finished: u64,
    pub completed_steps: u64,
    pub retried_steps: u64,
    pub dead_lettered: u64,
    /// HTTP requests answered while measuring (creates, claims, completions and failures; the
    /// baseline's workers send SQL, not HTTP).
    pub http_requests: u64,
    /// Records the event feed's readers (`--feed-readers`) read while measuring.
    pub feed_records: u64,
    /// Records the event feed's followers (`--feed-followers`) received while measuring.
    pub followed_records: u64,
    /// Events the GraphQL subscribers (`--graphql-readers`) received while measuring.
    pub graphql_records: u64,
    /// Events the GraphQL followers (`--graphql-followers`) received while measuring.
    pub graphql_followed_records: u64,
    /// Errors outside the measuring window count too: a benchmark with errors is not a result.
    pub errors_total: u64,
    /// The first error seen, to say what went wrong.
    pub first_error: Option<String>,
}

impl Tally {
    pub fn merge(&mut self, other: &Tally) {
        self.create.merge(&other.create);
        self.claim.merge(&other.claim);
        self.complete.merge(&other.complete);
        self.fail.merge(&other.fail);
        self.pickup.merge(&other.pickup);
        self.create_from_schedule.merge(&other.create_from_schedule);
        self.send_late.merge(&other.send_late);
        self.created += other.created;
        self.finished += other.finished;
        self.completed_steps += other.completed_steps;
        self.retried_steps += other.retried_steps;
        self.dead_lettered += other.dead_lettered;
        self.http_requests += other.http_requests;
        self.feed_records += other.feed_records;
        self.graphql_records += other.graphql_records;
        self.graphql_followed_records += other.graphql_followed_records;
        self.followed_records += other.followed_records;
        self.errors_total += other.errors_total;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }

    pub fn error(&mut self, message: impl FnOnce() -> String) {
        self.errors_total += 1;
        if self.first_error.is_none() {
            self.first_error = Some(message());
        }
    }

    /// Every command's latency in one histogram.
    pub fn all_commands(&self) -> Command {
        let mut all = Command::default();
        for c in [&self.create, &self.claim, &self.complete, &self.fail] {
            all.merge(c);
        }
        all
    }
}

/// Where an open-loop request's latency starts. A request whose connection was
/// still busy with the previous one at its scheduled time counts from that time,
/// so a slow answer delays what queues behind it (no coordinated omission). One
/// whose connection was free counts from its send: tokio's timer rounds a
/// deadline up to the next millisecond and wakes up to about 1 ms late, and that
/// lateness belongs to the load generator, not to the system measured. The
/// latency from the schedule is kept too (`Tally::create_from_schedule`), and the
/// lateness itself (`Tally::send_late`).
pub struct OpenLoop {
    connection_free_since: Instant,
}

impl OpenLoop {
    pub fn new() -> Self {
        OpenLoop { connection_free_since: Instant::now() }
    }

    /// Called once woken for the request `scheduled` then; returns the instant its
    /// latency is measured from.
    pub fn origin(&self, scheduled: Instant, measuring: bool, tally: &mut Tally) -> Instant {
        let now = Instant::now();
        if self.connection_free_since > scheduled {
            return scheduled;
        }
        if measuring {
            tally.send_late.record(now.saturating_duration_since(scheduled));
        }
        now
    }

    /// Called when the request `scheduled` then was answered.
    pub fn answered(&mut self, scheduled: Instant, acknowledged: bool, measuring: bool, tally: &mut Tally) {
        self.connection_free_since = Instant::now();
        if acknowledged && measuring {
            tally.create_from_schedule.record(self.connection_free_since.saturating_duration_since(scheduled));
        }
    }
}

const WARMUP: u8 = 0;
const MEASURING: u8 = 1;
const STOPPING: u8 = 2;

/// The phase of a workload run, shared by its tasks.
pub struct Phase {
    state: AtomicU8,
    stop: Notify,
    /// The instant all bench times are measured from.
    pub epoch: Instant,
    /// Created minus finished, for the producers' backlog limit.
    pub backlog: AtomicU64,
}

impl Phase {
    pub fn new() -> Phase {
        Phase { state: AtomicU8::new(WARMUP), stop: Notify::new(), epoch: Instant::now(), backlog: AtomicU64::new(0) }
    }
    pub fn measuring(&self) -> bool {
        self.state.load(Ordering::Relaxed) == MEASURING
    }
    pub fn stopping(&self) -> bool {
        self.state.load(Ordering::Relaxed) == STOPPING
    }
    pub fn start_measuring(&self) {
        self.state.store(MEASURING, Ordering::Relaxed);
    }
    pub fn stop(&self) {
        self.state.store(STOPPING, Ordering::Relaxed);
        self.stop.notify_waiters();
    }
    /// Resolves once `stop` has been called.
    pub async fn stopped(&self) {
        let notified = self.stop.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.stopping() {
            return;
        }
        notified.await;
    }
    /// Nanoseconds since the epoch, the unit of the pickup tracker.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

const SHARDS: usize = 64;
/// Set on a stored time when the claim arrived first.
const CLAIMED_FIRST: u64 = 1 << 63;

/// Create-acknowledged → claimed, keyed by a task number both sides know.
/// Sharded so producers and workers on different threads rarely meet on one lock.
pub struct Pickups {
    shards: Vec<Mutex<HashMap<u64, u64>>>,
}

impl Pickups {
    pub fn new() -> Pickups {
        Pickups { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    /// For creates nothing will claim (the HTTP floor): records nothing, so no map grows by
    /// one entry per create for the whole run.
    pub fn untracked() -> Pickups {
        Pickups { shards: Vec::new() }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        let index = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % SHARDS;
        self.shards[index].lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The producer's acknowledgement arrived at `now_ns`; returns the pickup
    /// latency if the claim came first (then it is 0: the task was picked up
    /// before the producer even heard it was stored).
    pub fn acknowledged(&self, key: u64, now_ns: u64) -> Option<Duration> {
        if self.shards.is_empty() {
            return None;
        }
        let mut shard = self.shard(key);
        match shard.remove(&key) {
            Some(t) if t & CLAIMED_FIRST != 0 => Some(Duration::ZERO),
            Some(_) | None => {
                shard.insert(key, now_ns);
                None
            }
        }
    }

    /// A claim returned the task at `now_ns`; returns the pickup latency if
    /// the acknowledgement was seen first. Only the first claim of a task counts.
    pub fn claimed(&self, key: u64, now_ns: u64) -> Option<Duration> {
        if self.shards.is_empty() {
            return None;
        }
        let mut shard = self.shard(key);
        match shard.remove(&key) {
            Some(acked) if acked & CLAIMED_FIRST == 0 => Some(Duration::from_nanos(now_ns.saturating_sub(acked))),
            Some(t) => {
                shard.insert(key, t);
                None
            }
            None => {
                shard.insert(key, now_ns | CLAIMED_FIRST);
                None
            }
        }
    }
}

/// CPU seconds used by this process (user + system), from getrusage; 0 if it fails.
pub fn self_cpu_s() -> f64 {
    rusage_cpu_s(libc::RUSAGE_SELF).unwrap_or(0.0)
}

/// CPU seconds (user + system) getrusage reports for `who` (`RUSAGE_SELF`, `RUSAGE_THREAD`).
pub fn rusage_cpu_s(who: libc::c_int) -> std::io::Result<f64> {
    // SAFETY: getrusage writes into the struct we pass; the callers pass valid `who` values.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::getrusage(who, &mut usage) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The name and the CPU seconds (user + system) in a /proc `stat` line of a process or thread.
fn parse_stat(stat: &str) -> Option<(&str, f64)> {
    // The name is in parentheses and may hold spaces and parentheses of its own.
    let name = &stat[stat.find('(')? + 1..stat.rfind(')')?];
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name and state.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / clock_ticks_per_s()))
}

/// CPU seconds used by process `pid` (user + system), from /proc/PID/stat.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, seconds)| seconds)
}

/// CPU seconds of process `pid`'s live threads, summed by name, from /proc/PID/task/*/stat.
/// Names that differ only in a number at the end (`iou-wrk-1234`) are one group.
pub fn thread_cpu_s(pid: u32) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some((name, seconds)) = parse_stat(&stat) {
            let group = name.trim_end_matches(|c: char| c.is_ascii_digit()).trim_end_matches('-');
            *by_name.entry(group.to_owned()).or_insert(0.0) += seconds;
        }
    }
    by_name
}

/// CPU seconds of the whole machine (every core) since boot, from /proc/stat.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MachineCpu {
    /// What this machine's own processes and kernel ran: user, nice, system, irq and softirq.
    pub busy_s: f64,
    /// Time this VM's cores wanted to run and the host gave to other guests. Not work done
    /// here, so not in `busy_s`: counted there, a noisy neighbour made every task look dearer.
    pub steal_s: f64,
}

pub fn machine_cpu() -> Option<MachineCpu> {
    parse_machine_cpu(&std::fs::read_to_string("/proc/stat").ok()?, clock_ticks_per_s())
}

/// The `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal guest
/// guest_nice, in clock ticks. Idle and iowait are not busy; guest and guest_nice are already
/// in user and nice (proc(5)), so adding them would count them twice.
fn parse_machine_cpu(stat: &str, ticks_per_s: f64) -> Option<MachineCpu> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let values: Vec<f64> = line.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    let tick = |i: usize| values.get(i).copied().unwrap_or(0.0);
    let busy = tick(0) + tick(1) + tick(2) + tick(5) + tick(6);
    Some(MachineCpu { busy_s: busy / ticks_per_s, steal_s: tick(7) / ticks_per_s })
}

/// CPU used over a stretch of wall time, by the bench, the server (if any)
/// and the whole machine.
pub struct CpuMeter {
    started: Instant,
    client: f64,
    server: Option<(u32, f64)>,
    server_threads: BTreeMap<String, f64>,
    machine: Option<MachineCpu>,
}

/// CPU as a percentage of one core over the measured stretch.
#[derive(Clone, Debug, Default)]
pub struct CpuUse {
    pub client_pct: f64,
    pub server_pct: Option<f64>,
    /// The server's threads by name (see [`thread_cpu_s`]), busiest first; those under 0.5 %
    /// left out.
    pub server_threads: Vec<(String, f64)>,
    /// The machine's busy CPU, steal left out (see [`MachineCpu`]).
    pub machine_pct: Option<f64>,
    /// CPU the host took from this VM's cores for other guests.
    pub steal_pct: Option<f64>,
}

impl CpuMeter {
    pub fn start(server_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            started: Instant::now(),
            client: self_cpu_s(),
            server: server_pid.and_then(|pid| Some((pid, process_cpu_s(pid)?))),
            server_threads: server_pid.map(thread_cpu_s).unwrap_or_default(),
            machine: machine_cpu(),
        }
    }
    pub fn finish(&self) -> CpuUse {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let pct = |seconds: f64| seconds / wall * 100.0;
        let mut server_threads: Vec<(String, f64)> = match self.server {
            Some((pid, _)) => thread_cpu_s(pid)
                .into_iter()
                .map(|(name, after)| {
                    let before = self.server_threads.get(&name).copied().unwrap_or(0.0);
                    (name, pct(after - before))
                })
                .filter(|(_, p)| *p >= 0.5)
                .collect(),
            None => Vec::new(),
        };
        server_threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        let machine = self.machine.zip(machine_cpu());
        CpuUse {
            client_pct: pct(self_cpu_s() - self.client),
            server_pct: self.server.and_then(|(pid, before)| Some(pct(process_cpu_s(pid)? - before))),
            server_threads,
            machine_pct: machine.map(|(before, after)| pct(after.busy_s - before.busy_s)),
            steal_pct: machine.map(|(before, after)| pct(after.steal_s - before.steal_s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_is_busy_with_its_own_work_and_steal_and_guest_time_are_not_counted_in_it() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  1000 20 300 5000 40 6 70 800 900 9\ncpu0 500 10 150 2500 20 3 35 400 450 4\n";
        let cpu = parse_machine_cpu(stat, 100.0).expect("a cpu line");
        assert_eq!(cpu, MachineCpu { busy_s: (1000.0 + 20.0 + 300.0 + 6.0 + 70.0) / 100.0, steal_s: 8.0 });
        // Kernels before 2.6.11 stop after irq and softirq: no steal.
        let old = parse_machine_cpu("cpu  10 0 10 100 0 0 0\n", 100.0).expect("a cpu line");
        assert_eq!(old, MachineCpu { busy_s: 0.2, steal_s: 0.0 });
        assert_eq!(parse_machine_cpu("intr 1 2 3\n", 100.0), None);
        assert_eq!(parse_machine_cpu("cpu  10 x 10\n", 100.0), None);
    }
}
