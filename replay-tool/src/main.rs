//! `taskledger-replay`: the incident and audit tool (issue #6). Not built yet:
//! every subcommand says so and exits non-zero rather than pretending.

use std::process::ExitCode;

fn main() -> ExitCode {
    let subcommand = std::env::args().nth(1).unwrap_or_else(|| "help".to_owned());
    if subcommand == "--version" || subcommand == "-V" {
        println!("taskledger-replay {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "taskledger-replay {subcommand}: not built yet (issue #6: info, events, verify, \
         state, diff, incident, export-audit, verify-export)."
    );
    ExitCode::from(2)
}
