//! The `stratus` command line: `stratus serve` runs a node; every other command talks to one
//! over its API (`stratus <noun> <verb>`, or the generic `get`, `list` and `delete`). Names are
//! accepted wherever a uuid is (resolved through the API); changes are jobs, waited for unless
//! `--async`, with a progress bar under `--wait`.

mod commands;
mod output;
mod progress;
mod session;

pub use output::Format;
pub use session::{exit, Failure, Login, Session, Wait};

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "stratus",
    version,
    about = "Stratus: run a management node, or drive one"
)]
pub struct Cli {
    /// The node's URL, `http://IP:PORT` (else the saved login's).
    #[arg(long, global = true, env = "STRATUS_URL")]
    pub server: Option<String>,
    /// A bearer token (else the saved login's).
    #[arg(long, global = true, env = "STRATUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How to print answers.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Format,
    /// Wait for a change's job with a progress bar naming its step.
    #[arg(long, global = true, conflicts_with = "async_")]
    pub wait: bool,
    /// Submit a change and print its job without waiting.
    #[arg(long = "async", global = true)]
    pub async_: bool,
    #[command(subcommand)]
    pub command: commands::Command,
}

/// Run the CLI; returns the process's exit code.
pub async fn main(cli: Cli) -> i32 {
    match commands::run(cli).await {
        Ok(()) => 0,
        Err(commands::Outcome::Failed(f)) => {
            eprintln!("{f}");
            f.exit_code()
        }
        Err(commands::Outcome::Local(e)) => {
            eprintln!("error: {e:#}");
            exit::ERROR
        }
    }
}

#[doc(hidden)]
pub fn command_for_completions() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}
