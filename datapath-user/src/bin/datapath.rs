//! `datapath`: the node agent and its command line.

use datapath::cli::{parse, run};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("datapath: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // A client verb writing into a closed pipe (`datapath conntrack list |
    // head -1`) ends quietly, as Unix tools do, instead of panicking in
    // println!. The agent keeps SIGPIPE ignored: a client hanging up on its
    // socket must not kill it.
    if !matches!(cli.command, datapath::cli::Command::Agent(_)) {
        use nix::sys::signal::{SigHandler, Signal, signal};
        // SAFETY: restores the default disposition; no handler runs.
        let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    }
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("datapath: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
