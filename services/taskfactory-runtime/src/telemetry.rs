//! Logs: readable in development, JSON in production (`TASKFACTORY_LOG_FORMAT=json`), filtered
//! by `RUST_LOG` (default `info`). Ids are fields (`run.id`, `task.id`), never baked into messages.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long = "log-format", env = "TASKFACTORY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub format: LogFormat,
}

/// Installs the global subscriber; a second call (tests running several services in one process)
/// is a no-op.
pub fn init_logging(args: &LogArgs) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match args.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
