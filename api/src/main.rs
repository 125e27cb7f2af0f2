//! `taskledger`: the server binary. Only its command-line surface exists so
//! far; the HTTP/GraphQL server is issue #5. Until then every subcommand says
//! plainly that it is not built and exits non-zero, so nothing pretends to work.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let subcommand = args.first().map(String::as_str).unwrap_or("serve");
    match subcommand {
        "--version" | "-V" => {
            println!("taskledger {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        other => {
            eprintln!(
                "taskledger {other}: not built yet. The server (HTTP command API, GraphQL, \
                 live feed) is tracked in issue #5; the event log and writer it will serve \
                 live in the `eventlog` crate."
            );
            ExitCode::from(2)
        }
    }
}
