//! `dwh-helper status`: where every table, partition, the archive and the
//! AppMetrica windows stand, read from the DWH and the broker (no running
//! instance needed).

use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::status::report::{self, State};
use crate::store::Dwh;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print the report as JSON (for scripts) instead of a table
    #[arg(long)]
    json: bool,
}

/// Prints the report; exit code 1 when the verdict is `failing` or `stalled`
/// (a person must act).
pub async fn status(config: Config, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let dwh = Dwh::connect(&config.dwh)?;
    let report = report::gather(&config, &dwh, None).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if matches!(report.verdict.state, State::Failing | State::Stalled) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
