//! `pulsectl`: parses the command line and runs the command; exits 1 with the reason on failure.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = pulsectl::Cli::parse();
    match pulsectl::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pulsectl: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
