//! What storing definitions can cost the trigger, and the bounds on it.

use std::time::Duration;

use anyhow::Context as _;
use taskfactory_model::spec::spec_from_yaml;
use taskfactory_proto::v1::{
    ActivitySpec, CreateActivityRequest, DeleteActivityRequest, PreviewRunRequest,
    UpdateActivityRequest,
};
use taskfactory_tests::{EnvOptions, Service, TestEnv};
use taskfactory_trigger::admin::SpecLimits;

use crate::support::{Admin, preview, proc_status_kib, with_source};

/// How many live activities there are and their current specs' bytes, counted from the tables.
async fn live_specs(pool: &sqlx::PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*), COALESCE(sum(v.spec_bytes), 0)::bigint FROM activities a \
         JOIN activity_versions v ON v.activity_id = a.id AND v.version = a.current_version \
         WHERE a.deleted_at IS NULL",
    )
    .fetch_one(pool)
    .await?)
}

/// A manual activity whose one task carries `pad` bytes of text, so its JSON is a little over.
fn padded(name: &str, pad: usize) -> anyhow::Result<ActivitySpec> {
    Ok(spec_from_yaml(&format!(
        "name: {name}\ntrigger: {{manual: {{}}}}\ntasks:\n  - name: t\n    type: log\n    params:\n      pad: {}\n",
        "a".repeat(pad)
    ))?)
}

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

async fn update(admin: &mut Admin, spec: ActivitySpec) -> Result<(), tonic::Status> {
    admin
        .update_activity(UpdateActivityRequest {
            id: spec.name.clone(),
            spec: Some(spec),
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spec_over_the_size_limit_is_refused_with_its_size_and_the_limit() -> anyhow::Result<()> {
    // The default limit: 1 MiB.
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;

    // 3.9 MB: under the 4 MiB gRPC messages took before, so it reaches the check.
    let big = padded("big", 3_900_000)?;
    let refused = create(&mut admin, big.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("is 3900")
            && refused
                .message()
                .contains("over the limit of 1048576 bytes (--max-spec-bytes)"),
        "{}",
        refused.message()
    );
    let listed = admin
        .list_activities(taskfactory_proto::v1::ListActivitiesRequest::default())
        .await?
        .into_inner();
    assert!(listed.activities.is_empty(), "nothing was stored");

    // Just under the limit is taken; the same activity updated to 3.9 MB is not, nor previewed.
    create(&mut admin, padded("big", 1_000_000)?)
        .await
        .context("a spec just under the limit")?;
    let refused = update(&mut admin, big.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("--max-spec-bytes"),
        "{refused:?}"
    );
    let refused = admin
        .preview_run(PreviewRunRequest {
            spec: Some(big),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("--max-spec-bytes"),
        "{refused:?}"
    );

    // A message over what the API decodes (6 MiB here) is refused before it is decoded.
    let huge = padded("huge", 7_000_000)?;
    let refused = create(&mut admin, huge).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains("found 70")
            && refused.message().contains("the limit is: 6291456 bytes"),
        "{}",
        refused.message()
    );
    Ok(())
}

/// A manual activity with `sources` static context sources.
fn with_sources(name: &str, sources: usize) -> anyhow::Result<ActivitySpec> {
    let listed: Vec<String> = (0..sources)
        .map(|i| format!("{{name: s{i}, static: {i}}}"))
        .collect();
    Ok(spec_from_yaml(&format!(
        "name: {name}\ntrigger: {{manual: {{}}}}\ncontext: [{}]\ntasks: [{{name: t, type: log}}]\n",
        listed.join(", ")
    ))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spec_with_more_context_sources_than_the_limit_is_refused_naming_the_field()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    let limit = taskfactory_model::spec::MAX_CONTEXT_SOURCES;
    let expected = format!("context: 40 sources, over the limit of {limit}");

    let refused = create(&mut admin, with_sources("many", 40)?)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains(&expected),
        "{}",
        refused.message()
    );

    create(&mut admin, with_sources("many", limit)?)
        .await
        .context("a spec with as many sources as the limit")?;
    let refused = update(&mut admin, with_sources("many", 40)?)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains(&expected),
        "{}",
        refused.message()
    );
    let refused = admin
        .preview_run(PreviewRunRequest {
            spec: Some(with_sources("draft", 40)?),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains(&expected),
        "{}",
        refused.message()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_activities_together_stay_within_their_limits() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        spec_limits: SpecLimits {
            max_definitions_bytes: 10_000,
            max_activities: 6,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;

    // Specs of about 2 KB: four fit in 10 000 bytes, a fifth does not.
    for i in 0..4 {
        create(&mut admin, padded(&format!("a{i}"), 2_000)?)
            .await
            .with_context(|| format!("spec {i}"))?;
    }
    let refused = create(&mut admin, padded("a4", 2_000)?).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("over the limit of 10000 bytes (--max-definitions-bytes)"),
        "{}",
        refused.message()
    );
    // Growing one is refused, shrinking one is taken, and a deleted one frees its room.
    let refused = update(&mut admin, padded("a0", 4_000)?).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    update(&mut admin, padded("a0", 100)?).await?;
    admin
        .delete_activity(DeleteActivityRequest {
            id: "a1".to_owned(),
        })
        .await?;
    create(&mut admin, padded("a4", 2_000)?).await?;

    // Eight creates at once where two fit (about 3 500 bytes are left): exactly two are taken.
    let room_for_two = padded("b", 1_300)?;
    let mut calls = Vec::new();
    for i in 0..8 {
        let mut admin = admin.clone();
        let mut spec = room_for_two.clone();
        spec.name = format!("b{i}");
        calls.push(tokio::spawn(async move { create(&mut admin, spec).await }));
    }
    let mut taken = 0;
    for call in calls {
        match call.await? {
            Ok(()) => taken += 1,
            Err(status) => assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}"),
        }
    }
    let pool = env.db.pool().await?;
    let (_, total) = live_specs(&pool).await?;
    assert!(total <= 10_000, "the live specs take {total} bytes");
    assert_eq!(taken, 2, "the live specs take {total} bytes");
    let kept: i64 = sqlx::query_scalar("SELECT bytes FROM definitions_totals")
        .fetch_one(&pool)
        .await?;
    assert_eq!(kept, total, "the kept total is the live specs'");

    // Six live activities: a seventh is refused however small.
    let refused = create(&mut admin, padded("c", 1)?).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("there are 6 live activities already, the limit (--max-activities)"),
        "{}",
        refused.message()
    );
    Ok(())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_page_of_large_specs_holds_about_one_specs_worth() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        spec_limits: SpecLimits {
            max_spec_bytes: 10_000,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    for i in 0..5 {
        create(&mut admin, padded(&format!("p{i}"), 4_000)?).await?;
    }

    // Specs of about 4 KB and pages of 10 000 bytes: two a page, then the last one.
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_activities(taskfactory_proto::v1::ListActivitiesRequest {
                page_size: 10,
                page_token: token.clone(),
            })
            .await?
            .into_inner();
        pages.push(
            page.activities
                .iter()
                .map(|a| a.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default())
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        pages,
        [vec!["p0", "p1"], vec!["p2", "p3"], vec!["p4"]],
        "{pages:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_with_specs_beyond_the_slots_wait_for_one() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        spec_limits: SpecLimits {
            spec_calls_at_once: 1,
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    let _orchestrator = env.start(Service::Orchestrator);
    env.wait_ready(&[Service::Trigger, Service::Orchestrator])
        .await?;
    let mut admin = env.admin().await?;
    create(&mut admin, padded("small", 10)?).await?;

    // A preview whose source's server takes the connection and says nothing holds the one slot.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let spec = with_source(
        "slow",
        &format!(
            "{{name: slow, http: {{url: \"http://{}/slow\"}}, onError: USE_DEFAULT, default: 0}}",
            server.local_addr()?
        ),
    );
    let previewing = {
        let mut admin = admin.clone();
        tokio::spawn(async move { preview(&mut admin, &spec, serde_json::json!({})).await })
    };
    let (held, _) = tokio::time::timeout(Duration::from_secs(20), server.accept())
        .await
        .context("the preview's source never called")??;

    // Another call with a spec waits for the slot: still unanswered a second later.
    let mut getting = {
        let mut admin = admin.clone();
        tokio::spawn(async move {
            admin
                .get_activity(taskfactory_proto::v1::GetActivityRequest {
                    id: "small".to_owned(),
                    version: 0,
                })
                .await
        })
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut getting)
            .await
            .is_err(),
        "GetActivity was answered while the preview held the only slot"
    );
    // Once the preview is done, it is answered.
    drop(held);
    previewing.await??;
    tokio::time::timeout(Duration::from_secs(10), getting).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_reads_only_the_activities_that_changed() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    let activities = 40;
    for i in 0..activities {
        create(&mut admin, padded(&format!("a{i:02}"), 10)?).await?;
    }
    let pool = env.db.pool().await?;
    let registry = taskfactory_trigger::registry::Registry::new();
    assert_eq!(
        registry.reload(&pool).await?,
        activities,
        "the first load reads all"
    );
    assert!(
        registry.reload(&pool).await? <= 1,
        "nothing changed: nothing to read"
    );

    // One created, one changed, one deleted: three read, not the 41 live ones.
    create(&mut admin, padded("new", 10)?).await?;
    update(&mut admin, padded("a07", 20)?).await?;
    admin
        .delete_activity(DeleteActivityRequest {
            id: "a09".to_owned(),
        })
        .await?;
    let read = registry.reload(&pool).await?;
    assert!((3..=5).contains(&read), "read {read} activities");
    let snapshot = registry.current();
    let names: std::collections::BTreeSet<&str> = snapshot
        .activities
        .values()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names.len(), activities, "{names:?}");
    assert!(names.contains("new") && !names.contains("a09"), "{names:?}");
    let changed = snapshot
        .activities
        .values()
        .find(|a| a.name == "a07")
        .context("a07 is live")?;
    assert_eq!(changed.version, 2);
    assert_eq!(
        snapshot.changed.as_ref().map(Vec::len),
        Some(3),
        "the snapshot says which activities changed"
    );

    // The totals the limits are checked against are the live activities'.
    let (count, bytes): (i64, i64) =
        sqlx::query_as("SELECT activities, bytes FROM definitions_totals")
            .fetch_one(&pool)
            .await?;
    assert_eq!((count, bytes), live_specs(&pool).await?);
    Ok(())
}

/// Reloads asked for at once share loads: while one load runs, the requests that come meanwhile
/// wait for it and are then answered together by one more. Every CreateActivity asks for a
/// reload after its commit, and 32 creates at once used to run 32 loads one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_asked_for_at_once_share_loads() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    create(&mut admin, padded("before", 10)?).await?;
    let pool = env.db.pool().await?;
    let registry = taskfactory_trigger::registry::Registry::new();
    registry.reload(&pool).await?;
    create(&mut admin, padded("after", 10)?).await?;
    let loads_before = registry.loads();

    // The first load waits on a lock the test holds, so the other requests surely come while it
    // runs.
    let mut holder = pool.begin().await?;
    sqlx::query("LOCK TABLE activities IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await?;
    let requests = 16;
    let reloads = futures::future::join_all((0..requests).map(|_| registry.reload(&pool)));
    let release = async {
        taskfactory_tests::wait_for(
            "the first load waiting on the lock",
            Duration::from_secs(10),
            || async {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_locks \
                     WHERE NOT granted AND relation = 'activities'::regclass",
                )
                .fetch_one(&pool)
                .await?;
                Ok((waiting > 0).then_some(()))
            },
        )
        .await?;
        holder.rollback().await?;
        anyhow::Ok(())
    };
    let (reloaded, released) = tokio::join!(reloads, release);
    released?;
    let read: usize = reloaded.into_iter().sum::<Result<usize, _>>()?;
    assert_eq!(
        registry.loads() - loads_before,
        2,
        "{requests} reloads asked for at once: the one that ran first, then one for the rest"
    );
    assert!(
        (1..=2).contains(&read),
        "only the new activity was read (give or take one a snapshot saw in flight): {read}"
    );
    assert!(
        registry
            .current()
            .activities
            .values()
            .any(|a| a.name == "after"),
        "the change is in the snapshot"
    );
    Ok(())
}

/// A reload reads the activities changed by transactions its previous snapshot could not see.
/// It read those changed since that snapshot's oldest running transaction: one long write
/// transaction anywhere on the Postgres server (a backup, a bulk load in another database) made
/// each reload read again everything changed since it began, and creating N activities read
/// N(N+1)/2 of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_transaction_elsewhere_does_not_make_reloads_read_everything_again()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    let pool = env.db.pool().await?;
    let registry = taskfactory_trigger::registry::Registry::new();
    registry.reload(&pool).await?;

    // Someone else's long write transaction, in a database of its own on the same server.
    let other = taskfactory_tests::TestDb::create().await?;
    let other_pool = other.pool().await?;
    let mut long = other_pool.begin().await?;
    sqlx::query("CREATE TABLE bulk (n int)")
        .execute(&mut *long)
        .await?;

    let activities = 40;
    let mut read = 0;
    for i in 0..activities {
        crate::support::create(
            &mut admin,
            &format!(
                "name: q{i:03}\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: noop}}]\n"
            ),
        )
        .await?;
        read += registry.reload(&pool).await?;
    }
    long.rollback().await?;
    // One read per create (give or take one whose commit a reload's snapshot saw still running).
    assert!(
        read <= 2 * activities,
        "{activities} activities created one at a time cost reads of {read} (all of them each time: {})",
        activities * (activities + 1) / 2
    );
    Ok(())
}

/// A subscriber that missed snapshots (several changes came while it was busy) learns from the
/// registry what changed in between, so it never compares every activity; the event matcher's
/// map holds the activities with an event trigger only. The scheduler used to compare all its
/// schedules whenever it had missed a snapshot, which under a stream of creates was on almost
/// every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscriber_behind_by_several_snapshots_learns_only_what_changed_in_between()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut admin = env.admin().await?;
    for i in 0..5 {
        create(&mut admin, padded(&format!("m{i}"), 10)?).await?;
    }
    let listens = |name: &str| -> anyhow::Result<ActivitySpec> {
        Ok(spec_from_yaml(&format!(
            "name: {name}\ntrigger: {{event: {{subject: events.orders.created}}}}\ntasks: [{{name: t, type: noop}}]\n"
        ))?)
    };
    create(&mut admin, listens("e0")?).await?;
    let pool = env.db.pool().await?;
    let registry = taskfactory_trigger::registry::Registry::new();
    registry.reload(&pool).await?;
    let first = registry.current().serial;
    let id_of = |name: &str| {
        registry
            .current()
            .activities
            .values()
            .find(|a| a.name == name)
            .map(|a| a.id)
    };
    assert_eq!(
        registry.changes(first - 1, first),
        None,
        "a full load says nothing about what changed"
    );

    create(&mut admin, padded("new", 10)?).await?;
    registry.reload(&pool).await?;
    update(&mut admin, padded("m1", 20)?).await?;
    create(&mut admin, listens("e1")?).await?;
    registry.reload(&pool).await?;
    let m2 = id_of("m2").context("m2 is live")?;
    admin
        .delete_activity(DeleteActivityRequest {
            id: "m2".to_owned(),
        })
        .await?;
    registry.reload(&pool).await?;
    let last = registry.current().serial;
    assert_eq!(
        last,
        first + 3,
        "one snapshot per reload that found a change"
    );

    let names = |ids: Vec<taskfactory_model::ids::ActivityId>| {
        let snapshot = registry.current();
        let mut names: Vec<String> = ids
            .iter()
            .map(|id| {
                snapshot
                    .activities
                    .get(id)
                    .map_or_else(|| format!("gone {}", *id == m2), |a| a.name.clone())
            })
            .collect();
        names.sort();
        names
    };
    let all = registry
        .changes(first, last)
        .context("every change is known")?;
    assert_eq!(names(all), ["e1", "gone true", "m1", "new"]);
    let later = registry
        .changes(first + 1, last)
        .context("every change is known")?;
    assert_eq!(names(later), ["e1", "gone true", "m1"]);
    assert_eq!(registry.changes(last, last), Some(Vec::new()));

    let listeners: std::collections::BTreeSet<String> = registry
        .current()
        .listeners
        .values()
        .map(|a| a.name.clone())
        .collect();
    assert_eq!(
        listeners.into_iter().collect::<Vec<_>>(),
        ["e0", "e1"],
        "only activities with an event trigger"
    );
    Ok(())
}

/// Past a thousand activities the registry has `activities` analyzed itself, so the planner
/// looks changes up by their transaction (the `activities_changed` index) even when autovacuum
/// is off or behind a bulk load. Without statistics every reload scanned every activity, and a
/// create cost in proportion to how many existed (the Postgres these tests run on has
/// autovacuum off).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_registry_keeps_the_activities_statistics_current_as_they_grow() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let pool = env.db.pool().await?;
    let analyzed = || async {
        let at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT greatest(last_analyze, last_autoanalyze) FROM pg_stat_user_tables WHERE relname = 'activities'",
        )
        .fetch_one(&pool)
        .await?;
        anyhow::Ok(at)
    };
    let before = analyzed().await?;
    let mut admins = Vec::new();
    for _ in 0..8 {
        admins.push(env.admin().await?);
    }
    let admins = std::sync::Arc::new(tokio::sync::Mutex::new(admins));
    let mut creates = futures::stream::iter(0..1000)
        .map(|i| {
            let admins = admins.clone();
            async move {
                let mut admin = admins.lock().await.pop().context("an admin client")?;
                let created = create(&mut admin, padded(&format!("bulk{i:04}"), 1)?).await;
                admins.lock().await.push(admin);
                created.map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(8);
    while let Some(created) = creates.next().await {
        created?;
    }
    let after =
        taskfactory_tests::wait_for("activities analyzed", Duration::from_secs(30), || async {
            Ok(analyzed().await?.filter(|at| Some(*at) > before))
        })
        .await?;
    assert!(Some(after) > before);
    // And the planner now takes the index for a reload's read of recent changes.
    let recent: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 5")
            .fetch_one(&pool)
            .await?;
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN SELECT id FROM activities WHERE deleted_at IS NULL \
         AND changed_xid >= '{recent}'::xid8"
    )))
    .fetch_all(&pool)
    .await?;
    assert!(
        plan.iter().any(|line| line.contains("activities_changed")),
        "{plan:#?}"
    );
    Ok(())
}
