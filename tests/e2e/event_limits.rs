//! Bounds on what events can make the trigger hold: the bytes of events handled at once.

use std::time::Duration;

use anyhow::Context as _;
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::support::{create, proc_status_kib, publish_event, settled};

/// An event of `objects` small objects: the JSON whose tree costs the most for its bytes.
fn many_small_objects(objects: usize) -> anyhow::Result<Vec<u8>> {
    let items: Vec<_> = (0..objects)
        .map(|i| serde_json::json!({"id": i, "n": "abcdefgh"}))
        .collect();
    Ok(serde_json::to_vec(
        &serde_json::json!({"kind": "x", "items": items}),
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_in_hand_stay_within_their_byte_budget() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    // Room for about one of these events at a time, of the 32 handled at once.
    let trigger = env.spawn_process(
        Service::Trigger,
        &[("TASKFACTORY_EVENT_BYTES_IN_FLIGHT", "65536")],
    )?;
    let pid = trigger.pid().context("a process")?;
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: big-events\ntrigger: {event: {subject: 'events.big.*', filter: \"event.kind == 'x'\", dedupeKey: '{{ event.kind }}-{{ event.items | length }}-{{ subject }}'}}\ntasks: [{name: t, type: log}]",
    )
    .await?;
    let js = env.js().await?;
    let before = proc_status_kib(pid, "VmRSS");

    // Forty events of about 50 KB (each a tree of some 6 MB), published at once; and one larger
    // than the whole budget, which is handled too (with all of it).
    let body = many_small_objects(1800)?;
    let mut published = Vec::new();
    for i in 0..40 {
        let js = js.clone();
        let body = body.clone();
        published.push(tokio::spawn(async move {
            publish_event(&js, &format!("events.big.e{i}"), body, None).await
        }));
    }
    for publish in published {
        publish.await??;
    }
    publish_event(&js, "events.big.huge", many_small_objects(3000)?, None).await?;
    settled(&js, "FACTORY_EVENTS", "taskfactory-trigger-events").await?;

    let pool = env.db.pool().await?;
    let fires: i64 = wait_for("the events' fires", Duration::from_secs(30), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM fires")
            .fetch_one(&pool)
            .await?;
        Ok((n == 41).then_some(n))
    })
    .await?;
    assert_eq!(fires, 41);
    let peak = proc_status_kib(pid, "VmHWM");
    // Handled all at once, these events took the trigger over 200 MB higher.
    assert!(
        peak.saturating_sub(before) < 64 * 1024,
        "the trigger went from {before} KiB to {peak} KiB"
    );
    Ok(())
}

/// Fires one run for each of 24 events of about 50 KB of small objects (each a tree of some
/// 6 MB, and copies of it while the run is made), all at once, against an orchestrator process
/// with `room` bytes for triggers in hand; returns how much its peak memory grew (KiB).
async fn orchestrator_peak_growth_kib(room: &str) -> anyhow::Result<u64> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let orchestrator = env.spawn_process(
        Service::Orchestrator,
        &[
            ("TASKFACTORY_TRIGGER_BYTES_IN_FLIGHT", room),
            // Memory is measured here, not time (a debug build on a loaded machine).
            ("TASKFACTORY_EVALUATION_TIMEOUT", "60s"),
        ],
    )?;
    let pid = orchestrator.pid().context("a process")?;
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    // `vision`: nobody serves it, so the runs are only made.
    create(
        &mut admin,
        "name: big-triggers\ntrigger: {event: {subject: 'events.big.*'}}\ntasks: [{name: t, type: vision, params: {n: '{{ event.items | length }}'}}]",
    )
    .await?;
    let js = env.js().await?;
    let before = proc_status_kib(pid, "VmRSS");
    let body = many_small_objects(1800)?;
    let mut published = Vec::new();
    for i in 0..24 {
        let js = js.clone();
        let body = body.clone();
        published.push(tokio::spawn(async move {
            publish_event(&js, &format!("events.big.e{i}"), body, None).await
        }));
    }
    for publish in published {
        publish.await??;
    }
    let pool = env.db.pool().await?;
    wait_for("every event's run", Duration::from_secs(120), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE spawn_complete")
            .fetch_one(&pool)
            .await?;
        Ok((n == 24).then_some(()))
    })
    .await?;
    Ok(proc_status_kib(pid, "VmHWM").saturating_sub(before))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_events_queue_in_the_orchestrator_instead_of_being_held_at_once() -> anyhow::Result<()>
{
    // Room for every trigger the orchestrator takes at once (8), then for one of them.
    let unbounded = orchestrator_peak_growth_kib("1073741824").await?;
    let bounded = orchestrator_peak_growth_kib("65536").await?;
    eprintln!("orchestrator peak growth: room for all {unbounded} KiB, room for one {bounded} KiB");
    assert!(
        bounded * 2 < unbounded,
        "with room for one trigger the orchestrator grew {bounded} KiB, with room for all {unbounded} KiB"
    );
    Ok(())
}
