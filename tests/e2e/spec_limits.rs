//! What storing definitions can cost the trigger, and the bounds on it.

use anyhow::Context as _;
use taskfactory_model::spec::spec_from_yaml;
use taskfactory_proto::v1::{ActivitySpec, CreateActivityRequest};
use taskfactory_tests::{EnvOptions, Service, TestEnv};

use crate::support::{Admin, proc_status_kib};

/// A manual activity of `tasks` small task templates (about 60 bytes of JSON each): what costs
/// the most memory for its size.
fn many_tasks(name: &str, tasks: usize) -> anyhow::Result<ActivitySpec> {
    let mut yaml =
        format!("name: {name}\ntrigger: {{event: {{subject: events.{name}}}}}\ntasks:\n");
    for i in 0..tasks {
        yaml.push_str(&format!(
            "  - {{name: t{i}, type: log, params: {{a: x, b: y}}}}\n"
        ));
    }
    Ok(spec_from_yaml(&yaml)?)
}

async fn create(admin: &mut Admin, spec: ActivitySpec) -> Result<(), tonic::Status> {
    admin
        .create_activity(CreateActivityRequest { spec: Some(spec) })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_registry_keeps_the_triggers_of_live_activities_not_their_tasks() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    create(&mut admin, many_tasks("wide", 100)?).await?;

    let registry = taskfactory_trigger::registry::Registry::new();
    registry.reload(&env.db.pool().await?).await?;
    let snapshot = registry.current();
    let live = snapshot
        .activities
        .values()
        .find(|a| a.name == "wide")
        .context("the activity is live")?;
    assert!(
        live.spec.tasks.is_empty(),
        "{} tasks",
        live.spec.tasks.len()
    );
    assert_eq!(
        live.event_trigger().map(|t| t.subject.as_str()),
        Some("events.wide")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_specs_do_not_grow_the_triggers_memory_with_their_number() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let trigger = env.spawn_process(Service::Trigger, &[])?;
    let pid = trigger.pid().context("a process")?;
    env.wait_ready(&[Service::Trigger]).await?;
    let admin = env.admin().await?;

    // Specs of 4 000 tasks (about 250 KB), created four at a time.
    let mut rss = Vec::new();
    for round in 0..4 {
        let mut calls = Vec::new();
        for i in 0..4 {
            let mut admin = admin.clone();
            let spec = many_tasks(&format!("wide-{round}-{i}"), 4000)?;
            calls.push(tokio::spawn(async move { create(&mut admin, spec).await }));
        }
        for call in calls {
            call.await??;
        }
        rss.push(proc_status_kib(pid, "VmRSS"));
    }
    // After the first round the memory the calls take is there to reuse (give or take what the
    // allocator keeps per thread); twelve more live activities add their triggers only (a
    // registry of their tasks took 160 MB more).
    let growth = rss[3].saturating_sub(rss[0]);
    assert!(
        growth < 48 * 1024,
        "{growth} KiB more for 12 more activities ({rss:?})"
    );
    Ok(())
}
