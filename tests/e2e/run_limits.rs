//! The orchestrator's memory: runs being spawned hold at most `--evaluation-bytes-in-flight` of
//! task params together; more runs queue for room instead of overcommitting.

use std::time::Duration;

use anyhow::Context as _;
use taskfactory_proto::v1::TriggerActivityRequest;
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};

use crate::support::{create, proc_status_kib};

/// Fires `runs` runs of an activity of 1,000 tasks carrying 3 KB of params each (3 MB a run), all
/// at once, against an orchestrator process with `room` bytes for runs in flight; returns how
/// much its peak memory grew (KiB).
async fn peak_growth_kib(room: &str, runs: usize) -> anyhow::Result<u64> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    let orchestrator = env.spawn_process(
        Service::Orchestrator,
        &[
            ("TASKFACTORY_EVALUATION_BYTES_IN_FLIGHT", room),
            // Memory is measured here, not time: eight 1,000-item evaluations at once in a debug
            // build on a loaded 2-core CI machine can pass the 800 ms default and fail a run.
            ("TASKFACTORY_EVALUATION_TIMEOUT", "60s"),
        ],
    )?;
    let pid = orchestrator.pid().context("a process")?;
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let blob = "x".repeat(3000);
    // `vision`: nobody serves it, so the tasks are only recorded and queued.
    create(
        &mut admin,
        &format!(
            "name: wide\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: vision, forEach: 'range(1000)', params: {{blob: '{blob}', n: '{{{{ item }}}}'}}}}]\n"
        ),
    )
    .await?;
    let before = proc_status_kib(pid, "VmRSS");
    let mut fired = Vec::new();
    for n in 0..runs {
        let mut admin = admin.clone();
        fired.push(tokio::spawn(async move {
            admin
                .trigger_activity(TriggerActivityRequest {
                    id: "wide".to_owned(),
                    idempotency_key: format!("run-{n}"),
                    ..Default::default()
                })
                .await
        }));
    }
    for fire in fired {
        fire.await??;
    }
    let pool = env.db.pool().await?;
    let expected = i64::try_from(runs * 1000)?;
    wait_for("every run's tasks", Duration::from_secs(240), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
            .fetch_one(&pool)
            .await?;
        let spawned: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE spawn_complete")
            .fetch_one(&pool)
            .await?;
        let failed: Option<String> =
            sqlx::query_scalar("SELECT error FROM runs WHERE status = 'FAILED' LIMIT 1")
                .fetch_optional(&pool)
                .await?;
        if let Some(error) = failed {
            anyhow::bail!("a run failed instead of queueing: {error}");
        }
        anyhow::ensure!(
            n == expected && spawned == i64::try_from(runs)?,
            "{n} of {expected} tasks, {spawned} of {runs} runs spawned (room {room})"
        );
        Ok(Some(()))
    })
    .await?;
    Ok(proc_status_kib(pid, "VmHWM").saturating_sub(before))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_runs_queue_for_room_instead_of_overcommitting() -> anyhow::Result<()> {
    // Room for every run at once, then for one (its params are 3 MB; 4 MiB of room).
    let unbounded = peak_growth_kib("1073741824", 8).await?;
    let bounded = peak_growth_kib("4194304", 8).await?;
    eprintln!("orchestrator peak growth: room for all {unbounded} KiB, room for one {bounded} KiB");
    assert!(
        bounded * 3 < unbounded * 2,
        "with room for one run the orchestrator grew {bounded} KiB, with room for all {unbounded} KiB"
    );
    Ok(())
}

/// A run takes room before its context sources are resolved, for what they may hold
/// (`--max-source-bytes` each, out of `--source-bytes-in-flight`): with room for one run's
/// sources, runs fired together resolve theirs one run at a time. (They were resolved before any
/// room was taken: every run's sources at once, however many runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_take_room_for_their_sources_before_resolving_them() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    // Room for one run's sources (1 MiB for each of its two), and for runs to be evaluated.
    let _orchestrator = env.spawn_process(
        Service::Orchestrator,
        &[
            ("TASKFACTORY_SOURCE_BYTES_IN_FLIGHT", "2097152"),
            ("TASKFACTORY_EVALUATION_BYTES_IN_FLIGHT", "3145728"),
            ("TASKFACTORY_MAX_RUN_BYTES", "1048576"),
            ("TASKFACTORY_MAX_SOURCE_BYTES", "1048576"),
        ],
    )?;
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let server = crate::support::RecordingServer::start(Duration::from_millis(300)).await?;
    let mut admin = env.admin().await?;
    let source = |name: &str| {
        format!(
            "{{name: {name}, http: {{url: '{}', method: POST, body: {{run: '{{{{ trigger.dedupe_key }}}}'}}}}}}",
            server.url
        )
    };
    // `vision`: nobody serves it, so the tasks are only recorded and queued.
    create(
        &mut admin,
        &format!(
            "name: sourced\ntrigger: {{manual: {{}}}}\ncontext: [{}, {}]\ntasks: [{{name: t, type: vision}}]\n",
            source("a"),
            source("b")
        ),
    )
    .await?;
    let runs = 4;
    let mut fired = Vec::new();
    for n in 0..runs {
        let mut admin = admin.clone();
        fired.push(tokio::spawn(async move {
            admin
                .trigger_activity(TriggerActivityRequest {
                    id: "sourced".to_owned(),
                    idempotency_key: format!("run-{n}"),
                    ..Default::default()
                })
                .await
        }));
    }
    for fire in fired {
        fire.await??;
    }
    wait_for("every run's sources", Duration::from_secs(60), || async {
        Ok((server.timed_calls().len() >= runs * 2).then_some(()))
    })
    .await?;
    let calls = server.timed_calls();
    let run_of = |call: &crate::support::Call| call.body["run"].as_str().unwrap_or("").to_owned();
    for one in &calls {
        for other in &calls {
            if run_of(one) == run_of(other) {
                continue;
            }
            let overlap = one.started < other.finished && other.started < one.finished;
            assert!(
                !overlap,
                "the sources of runs {:?} and {:?} were resolved at the same time, with room for one",
                run_of(one),
                run_of(other)
            );
        }
    }
    Ok(())
}
