//! `taskfactory-trigger apply FILE|DIR…`: creates or updates activities from spec files through
//! the admin API, like `kubectl apply`. A spec whose content did not change keeps its version.

use std::path::{Path, PathBuf};
use tracing::Instrument as _;

use anyhow::{Context as _, bail};
use taskfactory_model::spec;
use taskfactory_proto::v1::{CreateActivityRequest, GetActivityRequest, UpdateActivityRequest};

use crate::auth::client::{AdminClient, ClientArgs};

#[derive(Clone, Debug, clap::Args)]
pub struct ApplyArgs {
    /// The admin API to apply to, and the credentials to use (an editor's).
    #[command(flatten)]
    pub client: ClientArgs,
    /// Spec files (.yaml, .yml, .json) or directories of them.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

fn spec_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                })
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// The admin API client `apply` uses: its calls carry the credentials and the trace context of
/// the span they are made in (one span per file), so with traces on an apply shows up in Jaeger
/// with what it did.
type Client = AdminClient;

pub async fn run(args: ApplyArgs) -> anyhow::Result<()> {
    let files = spec_files(&args.paths)?;
    let mut client = args.client.connect().await?;
    let mut failures = 0;
    for file in &files {
        let span = tracing::info_span!("apply", file = %file.display());
        if let Err(error) = apply_file(&mut client, file).instrument(span).await {
            failures += 1;
            eprintln!("{}: {error:#}", file.display());
        }
    }
    if failures > 0 {
        bail!("{failures} of {} specs were not applied", files.len());
    }
    Ok(())
}

async fn apply_file(client: &mut Client, file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).context("reading the file")?;
    let spec = spec::spec_from_yaml(&text)?;
    let name = spec.name.clone();
    let existing = client
        .get_activity(GetActivityRequest {
            id: name.clone(),
            version: 0,
        })
        .await;
    match existing {
        Ok(current) => {
            let before = current.into_inner().version;
            let updated = client
                .update_activity(UpdateActivityRequest {
                    id: name.clone(),
                    spec: Some(spec),
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            if updated.version == before {
                println!("{name}: unchanged (version {before})");
            } else {
                println!("{name}: updated to version {}", updated.version);
            }
        }
        Err(status) if status.code() == tonic::Code::NotFound => {
            let created = client
                .create_activity(CreateActivityRequest { spec: Some(spec) })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!(
                "{name}: created (id {}, version {})",
                created.id, created.version
            );
        }
        Err(status) => bail!("{}", status.message()),
    }
    Ok(())
}
