use clap::Parser;
use taskfactory_runtime::telemetry::{self, LogArgs};

/// taskfactory executor: runs tasks of the built-in types and reports their results.
#[derive(Parser)]
#[command(name = "taskfactory-executor", version)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    config: taskfactory_executor::Config,
}

fn main() -> anyhow::Result<()> {
    taskfactory_runtime::tokio_runtime()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init(&cli.log, "taskfactory-executor");
    let shutdown = taskfactory_runtime::shutdown::on_signal();
    let outcome = taskfactory_executor::run(cli.config, shutdown).await;
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
