//! The black-box tests, as one test binary (one link instead of one per suite: each
//! links the whole server). Every module starts the built `taskledger` (and
//! `taskledger-replay`) binaries and drives them as a client would; run one
//! suite with a filter, e.g. `cargo nextest run -p tests crash_api::`.
//! Build the binaries first (`cargo build --workspace --bins`, as the README
//! test command does): the tests run what is in the target directory.

mod abuse;
mod api;
mod authz;
mod backup;
mod cli;
mod compat;
mod crash_api;
mod graphql;
mod load;
mod postgres;
