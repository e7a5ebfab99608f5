//! High availability: several trigger processes, one scheduling leader, hand-over on SIGKILL.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use taskfactory_tests::{EnvOptions, Running, Service, TestEnv, free_port, wait_for};

use crate::support::create;

const ACTIVITIES: usize = 5;

fn every_second(name: &str) -> String {
    format!(
        r#"
name: {name}
trigger:
  schedule:
    cron: ["* * * * * *"]
    timezone: UTC
    misfire: MISFIRE_ALL
    catchupWindow: 5m
tasks:
  - name: note
    type: log
    params: {{at: "{{{{ trigger.scheduled_for }}}}"}}
"#
    )
}

/// The current leader's instance id and term, from the fence in Postgres.
async fn fence(pool: &sqlx::PgPool) -> anyhow::Result<Option<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT holder, term FROM scheduler_fence WHERE singleton")
            .fetch_optional(pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_triggers_lose_and_double_nothing_while_the_leader_is_killed_again_and_again()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        lease_ttl: Duration::from_secs(2),
        ..EnvOptions::default()
    })
    .await?;
    let pool = env.db.pool().await?;
    let _orchestrator = env.start(Service::Orchestrator);

    let addresses: HashMap<&str, String> = HashMap::from([
        ("trigger-a", env.grpc_addr.to_string()),
        ("trigger-b", format!("127.0.0.1:{}", free_port())),
    ]);
    let spawn = |id: &str| -> anyhow::Result<Running> {
        env.spawn_process(
            Service::Trigger,
            &[
                ("TASKFACTORY_INSTANCE_ID", id),
                ("TASKFACTORY_GRPC_ADDR", addresses[id].as_str()),
            ],
        )
    };
    let mut triggers: HashMap<String, Running> = HashMap::new();
    for id in ["trigger-a", "trigger-b"] {
        triggers.insert(id.to_owned(), spawn(id)?);
    }
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    let mut created = Vec::new();
    for i in 0..ACTIVITIES {
        let activity = create(&mut admin, &every_second(&format!("ha-{i}"))).await?;
        created.push((uuid::Uuid::parse_str(&activity.id)?, Utc::now()));
    }
    drop(admin);

    // Kill the leader every few seconds, restart it at once as a standby, and check that the
    // other one takes over within a few seconds.
    let started = Instant::now();
    let mut kills = 0;
    let mut longest_handover = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(65) {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (leader, term) = wait_for("a leader", Duration::from_secs(15), || async {
            fence(&pool).await
        })
        .await?;
        let Some(process) = triggers.remove(&leader) else {
            anyhow::bail!("the fence names an unknown holder {leader:?}");
        };
        process.kill();
        let killed_at = Instant::now();
        kills += 1;
        triggers.insert(leader.clone(), spawn(&leader)?);
        wait_for("another term", Duration::from_secs(15), || async {
            Ok(fence(&pool).await?.filter(|(_, t)| *t > term))
        })
        .await?;
        longest_handover = longest_handover.max(killed_at.elapsed());
    }
    let end = Utc::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (_, trigger) in triggers.drain() {
        trigger.stop().await?;
    }

    // Every fire made exactly one run.
    let fires: i64 = sqlx::query_scalar("SELECT count(*) FROM fires")
        .fetch_one(&pool)
        .await?;
    wait_for("a run for every fire", Duration::from_secs(60), || async {
        let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
            .fetch_one(&pool)
            .await?;
        anyhow::ensure!(runs <= fires, "{runs} runs for {fires} fires");
        Ok((runs == fires).then_some(()))
    })
    .await?;
    assert!(fires >= 300, "only {fires} fires");

    // Against the expected fire times: every second from the activity's first fire through the
    // end, each exactly once.
    for (activity, created_at) in &created {
        let times: Vec<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT scheduled_for FROM runs WHERE activity_id = $1 ORDER BY scheduled_for",
        )
        .bind(activity)
        .fetch_all(&pool)
        .await?;
        let distinct: BTreeSet<_> = times.iter().collect();
        assert_eq!(
            distinct.len(),
            times.len(),
            "no duplicate runs for {activity}"
        );
        let first = *times.first().expect("it fired");
        let last = *times.last().expect("it fired");
        assert!(
            first <= *created_at + chrono::Duration::seconds(2),
            "fired from the start: first {first}, created {created_at}"
        );
        assert!(last >= end, "fired through the end: last {last}, end {end}");
        let expected = (last - first).num_seconds() + 1;
        let missing: Vec<DateTime<Utc>> = (0..expected)
            .map(|k| first + chrono::Duration::seconds(k))
            .filter(|t| !distinct.contains(t))
            .collect();
        assert!(missing.is_empty(), "lost fires of {activity}: {missing:?}");
    }
    // Hand-overs came quickly enough that nothing was even late enough to count as missed.
    let missed: i64 = sqlx::query_scalar("SELECT count(*) FROM occurrences")
        .fetch_one(&pool)
        .await?;
    assert_eq!(missed, 0, "no occurrence was missed");
    assert!(kills >= 10, "the leader was killed {kills} times");
    assert!(
        longest_handover < Duration::from_secs(10),
        "hand-over took {longest_handover:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_bucket_deleted_at_runtime_is_taken_again_and_schedules_keep_firing()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        lease_ttl: Duration::from_secs(2),
        ..EnvOptions::default()
    })
    .await?;
    let pool = env.db.pool().await?;
    let _services = env.start_all().await?;
    let js = env.js().await?;
    let mut admin = env.admin().await?;
    create(&mut admin, &every_second("kept")).await?;
    let fires = || async {
        let fires: i64 = sqlx::query_scalar("SELECT count(*) FROM fires")
            .fetch_one(&pool)
            .await?;
        anyhow::Ok(fires)
    };
    wait_for("the schedule to fire", Duration::from_secs(20), || async {
        Ok((fires().await? >= 2).then_some(()))
    })
    .await?;
    let epoch = || async {
        let epoch: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT epoch FROM scheduler_fence WHERE singleton")
                .fetch_optional(&pool)
                .await?;
        anyhow::Ok(epoch)
    };
    let first_epoch = epoch().await?.expect("a leader");

    // An operator (or an accident) deletes the lease bucket while the leader holds the lease.
    assert!(js.delete_stream("KV_taskfactory_leases").await?.success);
    // The trigger declares it again and leads in a new term (the recreated bucket is a newer
    // epoch), and the schedule goes on firing; nobody restarted anything.
    wait_for("a term of a new epoch", Duration::from_secs(20), || async {
        Ok(epoch().await?.filter(|e| *e > first_epoch))
    })
    .await?;
    assert!(js.get_stream("KV_taskfactory_leases").await.is_ok());
    let before = fires().await?;
    wait_for(
        "fires after the new term",
        Duration::from_secs(20),
        || async { Ok((fires().await? >= before + 3).then_some(())) },
    )
    .await?;
    // Every second fired once, the outage included (caught up: MISFIRE_ALL).
    let times: Vec<DateTime<Utc>> =
        sqlx::query_scalar("SELECT scheduled_for FROM fires ORDER BY scheduled_for")
            .fetch_all(&pool)
            .await?;
    let distinct: BTreeSet<_> = times.iter().collect();
    assert_eq!(distinct.len(), times.len(), "no second fire of a second");
    let (first, last) = (times[0], times[times.len() - 1]);
    assert_eq!(
        times.len() as i64,
        (last - first).num_seconds() + 1,
        "no second lost"
    );
    Ok(())
}
