//! The `idemgate` command: parse arguments, set up logging, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idemgate::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "idemgate",
    version,
    about = "Makes the unsafe endpoints of an HTTP API safe to retry"
)]
struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        env = "IDEMGATE_CONFIG",
        default_value = "proxy.toml"
    )]
    config: PathBuf,
    /// Log format (default: pretty on a terminal, json otherwise).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config, print the resolved routes; exit 0 if valid, 2 if not.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        None => {
            telemetry::init(cli.log_format.unwrap_or_else(LogFormat::detect));
            serve(&cli.config)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match idemgate::config::load(path) {
        Ok(config) => {
            println!("{}: ok", path.display());
            print!("{}", config.describe_routes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn serve(path: &std::path::Path) -> ExitCode {
    let config = match idemgate::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(idemgate::serve_until_signalled(
        config,
        Some(path.to_path_buf()),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
