//! The taskledger server as a library: the HTTP command API, auth, wire
//! types and operational routes. `main.rs` is only the command line around
//! [`server::serve`]. Only this crate knows HTTP: it converts wire JSON to
//! domain commands at the edge and domain results back.

pub mod auth;
pub mod backup;
pub mod commands;
pub mod error;
pub mod feed_lines;
pub mod graphql;
pub mod graphql_ws;
pub mod metrics;
pub mod projections_slot;
pub mod readmodels;
pub mod request_log;
pub mod routes;
pub mod server;
pub mod streams;
pub mod task_folds;
pub mod wire;
