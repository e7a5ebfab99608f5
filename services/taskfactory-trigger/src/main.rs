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
    /// Make a new bearer token for the admin API: prints the token, then the auth file entry
    /// that holds its hash.
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// Who the token is for (its subject in logs and the audit log).
    #[arg(long)]
    subject: String,
    /// Its roles: viewer, operator, editor, admin, each optionally scoped (`editor:billing-*`,
    /// `viewer:team=billing`).
    #[arg(long = "role", required = true)]
    roles: Vec<String>,
}

fn new_token(args: &TokenArgs) -> anyhow::Result<()> {
    for role in &args.roles {
        role.parse::<taskfactory_model::access::Grant>()
            .map_err(|e| anyhow::anyhow!("--role {e}"))?;
    }
    let (token, hash) = taskfactory_trigger::auth::file::new_token();
    // JSON strings are YAML strings: quoted, so any subject is written safely.
    println!("{token}");
    println!("# the auth file's entry for it (the token itself is stored nowhere):");
    println!("tokens:");
    println!("  - subject: {}", serde_json::to_string(&args.subject)?);
    println!("    sha256: {hash}");
    println!("    roles: {}", serde_json::to_string(&args.roles)?);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    taskfactory_runtime::tokio_runtime()?.block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init(&cli.log, "taskfactory-trigger");
    let outcome = match cli.command {
        Some(Command::Apply(args)) => taskfactory_trigger::apply::run(args).await,
        Some(Command::Token(args)) => new_token(&args),
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
