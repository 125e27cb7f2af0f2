//! Audit bundles.
use crate::source::Source;
use crate::{Input, Outcome};
use anyhow::Result;
use clap::Args;
use std::path::Path;
#[derive(Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub input: Input,
}
#[derive(Args)]
pub struct VerifyExportArgs {
    dir: std::path::PathBuf,
}
pub fn export(_source: &Source, _args: &ExportArgs) -> Result<Outcome> {
    Ok(Outcome::NotBuilt)
}
pub fn verify_export(_args: &VerifyExportArgs) -> Result<Outcome> {
    Ok(Outcome::NotBuilt)
}
pub fn keygen(_out: &Path) -> Result<Outcome> {
    Ok(Outcome::NotBuilt)
}
