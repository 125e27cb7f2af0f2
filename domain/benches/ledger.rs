//! Benchmark of the pure write model: decide+apply throughput for
//! create → claim → complete cycles with a large number of live tasks, and
//! heap bytes per live single-step task (measured with a counting allocator),
//! and the longest single create while the live set grows.
//! Prints figures; asserts nothing.
//!
//! Run: `cargo bench -p domain --bench ledger` (`-- --live 100000 --cycles 1000000`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use domain::testkit::{claim, complete, job, task_id};
use domain::{Command, Event, Ledger, Timestamp};

/// Counts bytes currently allocated, so memory per task can be measured
/// without an external profiler.
struct CountingAllocator;

static ALLOCATED: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn decide_apply(ledger: &mut Ledger, command: &Command, now: Timestamp) -> Vec<Event> {
    let events = ledger.decide(command, now).expect("accepted");
    for event in &events {
        ledger.apply(event).expect("applies");
    }
    events
}

fn main() {
    let live = arg("--live", 100_000);
    let cycles = arg("--cycles", 1_000_000);
    let mut ledger = Ledger::new();
    let mut now = Timestamp::from_micros(1_700_000_000_000_000);

    // Build the live set; commands are built up front so only decide+apply is timed.
    let creates: Vec<Command> = (0..live).map(|n| Command::CreateTask(job(n, "bench"))).collect();
    let heap_before = ALLOCATED.load(Ordering::Relaxed);
    let started = Instant::now();
    // The longest single create: the task map doubling (moving every live
    // task's entry) shows up here, as the writer's stall would.
    let mut longest_create_ns = 0u128;
    for command in &creates {
        let t = Instant::now();
        decide_apply(&mut ledger, command, now);
        longest_create_ns = longest_create_ns.max(t.elapsed().as_nanos());
    }
    let create_secs = started.elapsed().as_secs_f64();
    let heap_per_task = (ALLOCATED.load(Ordering::Relaxed) - heap_before) as f64 / live as f64;
    drop(creates);

    // Steady state: each cycle creates one task, claims the oldest ready step
    // and completes it, so the live set stays at `live`.
    let claim_cmd = claim("bench", "bench-worker", 1);
    let mut next = live;
    let (mut create_ns, mut claim_ns, mut complete_ns) = (0u128, 0u128, 0u128);
    for _ in 0..cycles {
        now = Timestamp::from_micros(now.as_micros() + 1);
        let create = Command::CreateTask(job(next, "bench"));
        next += 1;
        let t = Instant::now();
        decide_apply(&mut ledger, &create, now);
        create_ns += t.elapsed().as_nanos();

        let t = Instant::now();
        let claimed = decide_apply(&mut ledger, &claim_cmd, now);
        claim_ns += t.elapsed().as_nanos();
        let Event::StepClaimed { task, epoch, .. } = &claimed[0] else { unreachable!("a claim") };
        let done = complete(*task, "run", epoch.0);

        let t = Instant::now();
        decide_apply(&mut ledger, &done, now);
        complete_ns += t.elapsed().as_nanos();
    }
    assert_eq!(ledger.live_task_count() as u64, live);
    assert!(ledger.task(&task_id(next - 1)).is_some());

    let per_s = |ns: u128| cycles as f64 / (ns as f64 / 1e9);
    let claim_complete = per_s(claim_ns + complete_ns) * 2.0;
    println!("ledger decide+apply benchmark ({live} live single-step tasks, {cycles} cycles, one core)");
    println!("  create (initial fill)    {:>12.0} commands/s", live as f64 / create_secs);
    println!("  longest create (fill)    {:>12.3} ms (the task map growing)", longest_create_ns as f64 / 1e6);
    println!("  create (steady state)    {:>12.0} commands/s", per_s(create_ns));
    println!("  claim (1 step)           {:>12.0} commands/s", per_s(claim_ns));
    println!("  complete                 {:>12.0} commands/s", per_s(complete_ns));
    println!("  claim+complete combined  {:>12.0} commands/s   (goal >= 1,000,000)", claim_complete);
    println!("  heap per live task       {:>12.0} bytes        (goal <= 1024)", heap_per_task);
}
