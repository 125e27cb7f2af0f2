//! `diff --from --to`: what changed between two points.
use crate::Outcome;
use crate::source::{Point, Source};
use anyhow::Result;
pub fn run(_source: &Source, _from: Point, _to: Point, _json: bool) -> Result<Outcome> {
    Ok(Outcome::NotBuilt)
}
