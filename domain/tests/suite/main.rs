//! The domain's integration tests, as one test binary: scenarios, golden
//! fixtures and the proptest state machine. Run one with a filter, e.g.
//! `cargo nextest run -p domain state_machine::`.

mod fixtures;
mod scenarios;
mod state_machine;
