//! taskledger-replay's black-box tests, as one test binary (one link instead of
//! seven). Each module drives the built `taskledger-replay` binary; run one with a
//! filter, e.g. `cargo nextest run -p replay-tool audit::`.

mod audit;
mod common;
mod project;
mod read;
mod report;
mod sample;
mod server;
mod verify;
