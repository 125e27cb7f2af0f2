//! The projections' integration tests, as one test binary (one link instead of
//! three; each links sqlx with both backends). Each module is one suite; run one
//! with a filter, e.g. `cargo nextest run -p projections postgres::`.

mod equivalence;
mod postgres;
mod read_models;
mod support;
