//! `regmirror render`: turns envoy/registries.toml into the Envoy, filter and cache configs.
//! (Owned by the generator work; see docs/design.md.)

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The registries declaration.
    #[arg(long, default_value = "envoy/registries.toml")]
    pub registries: PathBuf,
    /// Directory the rendered files are written to.
    #[arg(long, default_value = "envoy")]
    pub out: PathBuf,
    /// Write nothing; exit 1 when a checked-in file differs from a fresh render.
    #[arg(long)]
    pub check: bool,
}

pub fn run(_args: &RenderArgs) -> ExitCode {
    ExitCode::FAILURE
}
