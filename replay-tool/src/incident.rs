//! `incident`: a timeline report.
use crate::source::Source;
use crate::{Input, Outcome};
use anyhow::Result;
use clap::Args;
#[derive(Args)]
pub struct IncidentArgs {
    #[command(flatten)]
    pub input: Input,
}
pub fn run(_source: &Source, _args: &IncidentArgs) -> Result<Outcome> {
    Ok(Outcome::NotBuilt)
}
