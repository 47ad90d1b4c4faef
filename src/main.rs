//! The `natsched` binary: command line, logging and signals around [`natsched::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use natsched::client::{Connection, ScheduleArgs};
use natsched::config::{Config, LogFormat};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// mimalloc rather than glibc's malloc: schedules are allocated on the store thread and freed
/// on the timer and firing threads, and glibc's arenas spent about a fifth of the daemon's CPU
/// on that traffic when draining a backlog (measured with perf; see README "Performance").
/// Built with `no_thp`: with transparent huge pages every fresh arena page was a 2 MiB fault to
/// zero, which cost a quarter of the CPU of a backlog drain.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` that lets a closed stdout end the output quietly (`natsched list | head -1`):
/// Rust ignores SIGPIPE, and `println!` panics on the broken pipe instead.
macro_rules! print_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(err) = writeln!(out, $($arg)*)
            && err.kind() != std::io::ErrorKind::BrokenPipe
        {
            eprintln!("natsched: cannot write the output: {err}");
        }
    }};
}

#[derive(Parser)]
#[command(
    name = "natsched",
    version,
    about = "Durable scheduled messages for NATS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the scheduler daemon.
    Run {
        /// Path of the TOML configuration file.
        #[arg(long, short, default_value = "/etc/natsched/natsched.toml")]
        config: PathBuf,
    },
    /// Schedule a message.
    Schedule {
        #[command(flatten)]
        args: ScheduleArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// Cancel a pending schedule.
    Cancel {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a pending schedule.
    Get {
        id: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// List pending schedules in due order, a page at a time.
    List {
        /// Subject filter; NATS wildcards allowed.
        #[arg(long, default_value = ">")]
        subject: String,
        /// Page size, 1 to 1000.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Where the previous page ended.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show the daemon's counters and fire lateness.
    Stats {
        #[command(flatten)]
        connection: Connection,
    },
    /// Check a configuration file; exits 1 with the reason if it is invalid.
    CheckConfig { file: PathBuf },
    /// Write a stopped natsched's pending schedules as JSON lines (a backup).
    ///
    /// `natsched import` schedules them again. Exits 1 if anything could not be read (each
    /// problem is reported on stderr).
    Export(natsched::backup::ExportArgs),
    /// Schedule an export's schedules through a running natsched, keeping their ids.
    ///
    /// Importing a file again replaces each pending schedule by itself. Exits 1 if any line
    /// was not imported (each is reported on stderr).
    Import {
        #[command(flatten)]
        args: natsched::backup::ImportArgs,
        #[command(flatten)]
        connection: Connection,
    },
    /// Load-test a running natsched through NATS and print one JSON line of results.
    Bench(natsched::loadgen::LoadOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Run { .. });
    if !daemon {
        // The client commands only speak up when something is wrong; RUST_LOG overrides it.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(
                EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
            )
            .init();
    }
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Bench(options) => bench(options),
        Command::Schedule { args, connection } => {
            client(async move { natsched::client::schedule(&connection, &args).await })
        }
        Command::Cancel { id, connection } => {
            client(async move { natsched::client::cancel(&connection, &id).await })
        }
        Command::Get { id, connection } => {
            client(async move { natsched::client::get(&connection, &id).await })
        }
        Command::List {
            subject,
            limit,
            cursor,
            connection,
        } => client(async move {
            natsched::client::list(&connection, &subject, limit, cursor.as_deref()).await
        }),
        Command::Stats { connection } => {
            client(async move { natsched::client::stats(&connection).await })
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::Export(args) => export(&args),
        Command::Import { args, connection } => import(&args, &connection),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if daemon {
                tracing::error!("{err}");
            }
            eprintln!("natsched: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: PathBuf) -> Result<(), String> {
    let config = Config::from_file(&config_path).map_err(|e| e.to_string())?;
    let log_filter = init_daemon_logging(&config);
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime
        .block_on(async {
            // Listening from the start: a SIGTERM while the store opens or NATS is still
            // unreachable stops natsched cleanly instead of killing it (and a SIGHUP, which
            // would kill it too, reloads the log level).
            let shutdown = shutdown_signal()?;
            watch_file_size_limit()?;
            reload_on_sighup(config_path.clone(), log_filter)?;
            natsched::run(config, shutdown)
                .await
                .map_err(|e| e.to_string())
        })
        .map_err(|e| format!("{e} (config {})", config_path.display()))
}

/// `natsched check-config`: the file parses and validates, and what start-up would refuse
/// before connecting passes too (server URLs, credentials given twice, credential files
/// that cannot be read).
fn check_config(file: &std::path::Path) -> Result<(), String> {
    let config = Config::from_file(file).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let options = async_nats::ConnectOptions::new();
    runtime
        .block_on(natsched::connect::for_daemon(&config.nats, options))
        .map_err(|e| format!("invalid config file {}: {e}", file.display()))?;
    print_line!("{}: ok", file.display());
    Ok(())
}

/// Runs one client command and prints its output.
fn client(
    command: impl std::future::Future<Output = Result<String, natsched::client::ClientError>>,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let output = runtime.block_on(command).map_err(|e| e.to_string())?;
    print_line!("{output}");
    Ok(())
}

fn export(args: &natsched::backup::ExportArgs) -> Result<(), String> {
    let exported = natsched::backup::export_to(args, &mut |problem| {
        eprintln!("natsched: {problem}");
    })
    .map_err(|e| e.to_string())?;
    if let Some(output) = &args.output {
        eprintln!(
            "natsched: exported {} schedules to {}",
            exported.schedules,
            output.display()
        );
    }
    match exported.unreadable {
        0 => Ok(()),
        n => Err(format!(
            "{n} unreadable records or segments were left out of the export (reported above)"
        )),
    }
}

fn import(
    args: &natsched::backup::ImportArgs,
    connection: &natsched::client::Connection,
) -> Result<(), String> {
    // Several threads: parsing a long line must not hold up the answers of those in flight.
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let imported = runtime
        .block_on(natsched::backup::import(args, connection, &mut |problem| {
            eprintln!("natsched: {problem}");
        }))
        .map_err(|e| e.to_string())?;
    if connection.json {
        print_line!(
            "{}",
            serde_json::to_string(&imported).expect("summary serializes")
        );
    } else {
        print_line!("{}", imported.summary());
    }
    match imported.complete() {
        true => Ok(()),
        false => Err("not everything was imported (reported above)".to_owned()),
    }
}

fn bench(options: natsched::loadgen::LoadOptions) -> Result<(), String> {
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let report = runtime
        .block_on(natsched::loadgen::run(&options))
        .map_err(|e| e.to_string())?;
    print_line!(
        "{}",
        serde_json::to_string(&report).expect("report serializes")
    );
    Ok(())
}

/// A write past the file-size limit (`ulimit -f`, systemd's `LimitFSIZE=`) raises SIGXFSZ,
/// which by default kills the process. Handled, the write fails with EFBIG instead, and the
/// store treats that like a full disk: new schedules get 503, stored ones keep firing, and
/// natsched recovers once the limit allows the write.
fn watch_file_size_limit() -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut limit = signal(SignalKind::from_raw(libc::SIGXFSZ))
        .map_err(|e| format!("cannot listen for SIGXFSZ: {e}"))?;
    tokio::spawn(async move {
        while limit.recv().await.is_some() {
            tracing::warn!("a write reached the file-size limit (SIGXFSZ); it fails instead");
        }
    });
    Ok(())
}

/// A future that completes on SIGINT or SIGTERM (after telling systemd the daemon stops);
/// the handlers are installed at once.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot listen for SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot listen for SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    })
}

/// Changes the daemon's log filter while it runs.
type LogFilter = reload::Handle<EnvFilter, Registry>;

/// Logs to stderr as the config says (`log_format`, `log_level`, or `RUST_LOG` when set).
/// Returns the handle SIGHUP reloads `log_level` through, unless `RUST_LOG` decides.
fn init_daemon_logging(config: &Config) -> Option<LogFilter> {
    use std::io::IsTerminal;
    let from_env = EnvFilter::try_from_default_env().ok();
    let overridden = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(config.log_level()));
    let (filter, handle) = reload::Layer::new(filter);
    let json = config.log_format == LogFormat::Json;
    // Colours only for a person at a terminal, never into the journal or a file.
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    (!overridden).then_some(handle)
}

/// On SIGHUP, reads the config file again and applies its `log_level`. The rest of the file
/// takes effect at the next start (README "Operations": why).
fn reload_on_sighup(path: PathBuf, filter: Option<LogFilter>) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup =
        signal(SignalKind::hangup()).map_err(|e| format!("cannot listen for SIGHUP: {e}"))?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let config = match Config::from_file(&path) {
                Ok(config) => config,
                Err(err) => {
                    tracing::error!(error = %err, "SIGHUP: the config file is not valid; nothing changed");
                    continue;
                }
            };
            let Some(filter) = &filter else {
                tracing::warn!(
                    "SIGHUP: RUST_LOG is set and decides the log level; nothing changed"
                );
                continue;
            };
            match filter.reload(EnvFilter::new(config.log_level())) {
                Ok(()) => tracing::info!(
                    log_level = config.log_level(),
                    "SIGHUP: log level reloaded (other settings change at the next start)"
                ),
                Err(err) => tracing::error!(error = %err, "SIGHUP: cannot change the log level"),
            }
        }
    });
    Ok(())
}
