//! `blendnet`: the BlendNet daemon and its command line.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = blendnet_daemon::cli::Cli::parse();
    match blendnet_daemon::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
