//! The `idemgate` command: parse arguments, set up logging, load the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use idemgate::telemetry::{self, LogFormat};

/// jemalloc keeps a long-lived record's memory apart from the request-path churn around
/// it, where glibc's arenas fragment (README, Performance, for the numbers).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Run a built-in orders API with the proxy in front of it (proxy.toml.example's routes).
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Where the admin listener listens.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let code = run(Cli::parse());
    telemetry::flush();
    code
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::Demo {
            listen,
            admin_listen,
        }) => {
            telemetry::init(cli.log_format.unwrap_or_else(LogFormat::detect));
            block_on(demo(listen, admin_listen))
        }
        None => {
            telemetry::init(cli.log_format.unwrap_or_else(LogFormat::detect));
            serve(&cli.config)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match idemgate::config::load(path) {
        Ok(config) => {
            // A closed pipe (`check | head`) is not an error worth a panic.
            let text = format!("{}: ok\n{}", path.display(), config.describe_routes());
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{e}\n").as_bytes());
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
    block_on(idemgate::serve_until_signalled(
        config,
        Some(path.to_path_buf()),
    ))
}

async fn demo(listen: std::net::SocketAddr, admin: std::net::SocketAddr) -> Result<(), String> {
    let api = idemgate::demo::start_api()
        .await
        .map_err(|e| format!("demo API: {e}"))?;
    let mut config = idemgate::demo::config(&api)?;
    config.server.listen = listen;
    config.server.admin_listen = Some(admin);
    let text = idemgate::demo::instructions(&listen.to_string());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
    idemgate::serve_until_signalled(config, None).await
}

fn block_on(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    // The proxy listener is served on runtimes of its own (one per core, see
    // `server::workers`); this one runs the acceptor, admin, record API and the store's
    // background work, for which one thread is plenty (and one fewer malloc arena).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
