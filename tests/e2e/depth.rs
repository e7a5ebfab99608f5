//! Defence in depth behind NATS: what someone who can publish where they should not (on
//! `triggers.>`, `results.>`, `taskfactory.internal.definitions-changed`) can no longer do. Each
//! forgery is refused once (dead-lettered with its reason, counted), never carried out, never
//! retried; what the services do themselves goes on working.

use std::time::{Duration, Instant};

use taskfactory_model::subjects;
use taskfactory_tests::{EnvOptions, Service, TestEnv, free_port, wait_for};

use crate::support::{create, scrape};

// ---------------------------------------------------------------------------------------------
// A flood of definitions-changed signals.

/// CPU time a process has used (user and system), from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command may hold spaces: the fields after it start past the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // Clock ticks are 1/100 s on Linux (USER_HZ).
    Ok(Duration::from_millis(ticks * 10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_definitions_changed_signals_costs_a_few_reloads() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    // The replica under the flood runs as its own process (its CPU time and metrics are its
    // own), and polls too rarely to matter: a change reaches it through the signal.
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let flooded = env.spawn_process(
        Service::Trigger,
        &[
            ("TASKFACTORY_METRICS_ADDR", &metrics_addr.to_string()),
            (
                "TASKFACTORY_GRPC_ADDR",
                &format!("127.0.0.1:{}", free_port()),
            ),
            ("TASKFACTORY_RELOAD_INTERVAL", "1h"),
        ],
    )?;
    let pid = flooded.pid().expect("a process");
    // The replica that changes definitions (and announces each change).
    let _changer = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    // Enough definitions that reloading them is work.
    for n in 0..40 {
        create(
            &mut admin,
            &format!("name: a{n}\ntrigger: {{schedule: {{cron: ['0 3 1 1 *'], timezone: UTC}}}}\ntasks: [{{name: t, type: log, params: {{n: {n}}}}}]\n"),
        )
        .await?;
    }
    let pool = env.db.pool().await?;
    let generation = || async {
        let (generation,): (i64,) = sqlx::query_as("SELECT last_value FROM definitions_generation")
            .fetch_one(&pool)
            .await?;
        anyhow::Ok(generation as f64)
    };
    let flooded_metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| async move {
        anyhow::Ok(scrape(metrics_addr).await?.count(name, labels))
    };
    let loaded = || flooded_metric(taskfactory_runtime::metrics::DEFINITIONS_GENERATION, &[]);
    let reloads = || async {
        let mut all = 0.0;
        for outcome in [&[("outcome", "changed")], &[("outcome", "unchanged")]] {
            all +=
                flooded_metric(taskfactory_runtime::metrics::DEFINITION_RELOADS, outcome).await?;
        }
        anyhow::Ok(all)
    };
    let signals = || flooded_metric(taskfactory_runtime::metrics::DEFINITIONS_SIGNALS, &[]);
    let current = generation().await?;
    wait_for(
        "the flooded replica to load every definition",
        Duration::from_secs(20),
        || async { Ok((loaded().await.ok() == Some(current)).then_some(())) },
    )
    .await?;

    let nats = env.nats_client().await?;
    let reloads_before = reloads().await?;
    let signals_before = signals().await?;
    let cpu_before = cpu_time(pid)?;
    let flood_started = Instant::now();
    const SIGNALS: usize = 5000;
    for _ in 0..SIGNALS {
        nats.publish(subjects::DEFINITIONS_CHANGED, bytes::Bytes::new())
            .await?;
    }
    nats.flush().await?;
    let flood_took = flood_started.elapsed();
    // A real change after the flood, announced by the other replica, is picked up promptly.
    let changed_at = Instant::now();
    create(
        &mut admin,
        "name: after-the-flood\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]\n",
    )
    .await?;
    let changed = generation().await?;
    wait_for(
        "the change to be picked up",
        Duration::from_secs(5),
        || async { Ok((loaded().await? == changed).then_some(())) },
    )
    .await?;
    let picked_up = changed_at.elapsed();
    // Every signal handled, the change's own included: the flood is over.
    let all_signals = signals_before + SIGNALS as f64 + 1.0;
    wait_for(
        "every signal to be handled",
        Duration::from_secs(120),
        || async { Ok((signals().await? >= all_signals).then_some(())) },
    )
    .await?;
    let flood_over = flood_started.elapsed();
    let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
    let all = reloads().await? - reloads_before;
    eprintln!(
        "{SIGNALS} signals published in {flood_took:?}, handled within {flood_over:?}: {all} reloads, {cpu:?} of CPU; a change picked up after {picked_up:?}"
    );
    // At most one reload per quarter second while signals come, and the change's own.
    let bound = 2.0 + 4.0 * flood_over.as_secs_f64().ceil();
    assert!(
        all <= bound,
        "{all} reloads for {SIGNALS} signals (bound {bound})"
    );
    assert!(
        cpu < Duration::from_secs(2),
        "{SIGNALS} signals cost {cpu:?} of CPU"
    );
    drop(flooded);
    Ok(())
}
