//! Projections: the read side of CQRS. Independent projectors follow the event
//! log and materialize SQL read models (queue, tasks, dashboard, audit log) on
//! SQLite or PostgreSQL.
//!
//! Not built yet (issue #4). The crate exists so the workspace layout of
//! DESIGN §2 holds from the start; it exports nothing that pretends to work.
