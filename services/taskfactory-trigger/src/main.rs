use clap::Parser;
use taskfactory_runtime::telemetry::{self, LogArgs};

/// taskfactory trigger: schedules, event ingress and the admin gRPC API.
#[derive(Parser)]
#[command(name = "taskfactory-trigger", version)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: taskfactory_trigger::Config,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Create or update activities from YAML or JSON spec files (or directories of them).
    Apply(taskfactory_trigger::apply::ApplyArgs),
}

fn main() -> anyhow::Result<()> {
    taskfactory_runtime::tokio_runtime()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init(&cli.log, "taskfactory-trigger");
    let outcome = match cli.command {
        Some(Command::Apply(args)) => taskfactory_trigger::apply::run(args).await,
        None => {
            let shutdown = taskfactory_runtime::shutdown::on_signal();
            taskfactory_trigger::run(cli.config, shutdown).await
        }
    };
    telemetry.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
