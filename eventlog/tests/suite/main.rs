//! The event log's integration tests, as one test binary (one link instead of
//! one per suite: each binary links redb, the domain and the writer, and separate binaries
//! made CI builds slow and large). Each module is one suite; run one with a filter,
//! e.g. `cargo nextest run -p eventlog faults::`.

mod bench_smoke;
mod bitflips;
mod corruption;
mod crash;
mod faults;
mod feed;
mod journal;
mod replay_errors;
mod store_model;
mod support;
mod upgrade;
mod verify_problems;
mod verify_speed;
mod writer;
