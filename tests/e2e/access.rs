//! Who may do what through the admin API: the RPC × role matrix, scopes by name prefix and
//! label, what a viewer reads of secrets, and the audit log.

use std::str::FromStr as _;
use std::time::Duration;

use taskfactory_model::access::{RPCS, Role, rpc_rule};
use taskfactory_proto::v1::{
    CancelRunRequest, CompleteTaskRequest, CreateActivityRequest, GetActivityRequest,
    GetRunRequest, ListActivitiesRequest, ListActivityVersionsRequest, ListAuditEventsRequest,
    ListRunsRequest, PauseActivityRequest, PreviewRunRequest, TaskStatus, TriggerActivityRequest,
    UpdateActivityRequest,
};
use taskfactory_tests::auth::token_entry;
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};
use tonic::Code;

use crate::support::{self, Admin, create};

/// Calls any admin RPC with an empty request (the answer's body is ignored): the code says
/// whether the call got past the access checks.
async fn call_empty(env: &TestEnv, token: Option<&str>, method: &str) -> anyhow::Result<Code> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", env.grpc_addr))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path =
        http::uri::PathAndQuery::from_str(&format!("/taskfactory.v1.AdminService/{method}"))?;
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    Ok(match grpc.unary(request, path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_answers_every_role_as_the_matrix_says() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let tokens = env.tokens.as_ref().expect("auth is on by default");
    let nobody = "tf_a-token-with-no-roles-at-all-0123456789";
    tokens.write(&token_entry("test-nobody", nobody, &[]))?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;

    let callers = [
        (Some(Role::Viewer), tokens.viewer.as_str()),
        (Some(Role::Operator), tokens.operator.as_str()),
        (Some(Role::Editor), tokens.editor.as_str()),
        (Some(Role::Admin), tokens.admin.as_str()),
        (None, nobody),
    ];
    // Every RPC of the contract, as the contract itself lists them.
    let methods = taskfactory_proto::admin_methods();
    assert_eq!(methods.len(), RPCS.len());
    let mut denied_mutations = 0;
    for method in &methods {
        let rule =
            rpc_rule(method).unwrap_or_else(|| panic!("{method} is missing from the access table"));
        for (role, token) in callers {
            let code = call_empty(&env, Some(token), method).await?;
            let allowed = role.is_some_and(|r| r >= rule.role);
            if allowed {
                assert!(
                    !matches!(
                        code,
                        Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented
                    ),
                    "{method} as {role:?} must be let through, got {code:?}"
                );
            } else {
                assert_eq!(
                    code,
                    Code::PermissionDenied,
                    "{method} as {role:?} must be refused"
                );
                if rule.mutating {
                    denied_mutations += 1;
                }
            }
        }
        // Without credentials nothing but health and reflection answers.
        assert_eq!(
            call_empty(&env, None, method).await?,
            Code::Unauthenticated,
            "{method} without a token"
        );
    }

    // Every refused call that would have changed something is in the audit log.
    let mut admin = env.admin().await?;
    let denied = audit_events(&mut admin, ListAuditEventsRequest::default())
        .await?
        .into_iter()
        .filter(|e| e.outcome == "PERMISSION_DENIED")
        .count();
    assert_eq!(denied, denied_mutations);
    Ok(())
}

async fn audit_events(
    admin: &mut Admin,
    request: ListAuditEventsRequest,
) -> anyhow::Result<Vec<taskfactory_proto::v1::AuditEvent>> {
    let mut events = Vec::new();
    let mut request = ListAuditEventsRequest {
        page_size: 1000,
        ..request
    };
    loop {
        let page = admin.list_audit_events(request.clone()).await?.into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return Ok(events);
        }
        request.page_token = page.next_page_token;
    }
}

const BILLING: &str = "name: billing-sync\nlabels: {team: billing}\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]\n";
const OTHER: &str =
    "name: payroll\nlabels: {team: hr}\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scoped_roles_reach_only_their_activities() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let tokens = env.tokens.as_ref().expect("auth is on by default");
    let team_editor = "tf_team-editor-token-0123456789abcdef";
    let prefix_operator = "tf_prefix-operator-token-0123456789abcd";
    let prefix_editor = "tf_prefix-editor-token-0123456789abcdef";
    tokens.write(&format!(
        "{}{}{}",
        token_entry("billing-team", team_editor, &["editor:team=billing"]),
        token_entry("billing-ops", prefix_operator, &["operator:billing-*"]),
        token_entry(
            "billing-namer",
            prefix_editor,
            &["editor:billing-*", "admin:team=sandbox"]
        )
    ))?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    create(&mut admin, OTHER).await?;

    // An editor of team=billing creates within its label, and nothing else.
    let mut team = env.admin_as(Some(team_editor)).await?;
    let created = create(&mut team, BILLING).await?;
    assert_eq!(created.created_by, "billing-team");
    let refused = create(
        &mut team,
        "name: hr-thing\nlabels: {team: hr}\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]\n",
    )
    .await
    .unwrap_err();
    let status = refused.downcast_ref::<tonic::Status>().expect("a status");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("team=hr"), "{}", status.message());

    // It cannot move its activity out of its scope, and cannot see the other one at all.
    let mut moved = taskfactory_model::spec::spec_from_yaml(BILLING)?;
    moved.labels.insert("team".to_owned(), "hr".to_owned());
    let status = team
        .update_activity(UpdateActivityRequest {
            id: "billing-sync".to_owned(),
            spec: Some(moved),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = team
        .get_activity(GetActivityRequest {
            id: "payroll".to_owned(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "existence is not told");
    let listed = team
        .list_activities(ListActivitiesRequest::default())
        .await?
        .into_inner();
    let names: Vec<_> = listed
        .activities
        .iter()
        .filter_map(|a| a.spec.as_ref().map(|s| s.name.as_str()))
        .collect();
    assert_eq!(names, vec!["billing-sync"]);

    // An editor by name prefix edits billing-* but gives no labels: a label would move the
    // activity into the reach of whoever holds grants over it (here, its own admin:team=sandbox).
    let mut namer = env.admin_as(Some(prefix_editor)).await?;
    create(
        &mut namer,
        "name: billing-plain\ntrigger: {manual: {}}\ntasks: [{name: t, type: log}]\n",
    )
    .await?;
    let mut relabelled = taskfactory_model::spec::spec_from_yaml(BILLING)?;
    relabelled
        .labels
        .insert("team".to_owned(), "sandbox".to_owned());
    let status = namer
        .update_activity(UpdateActivityRequest {
            id: "billing-sync".to_owned(),
            spec: Some(relabelled.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("give itself the role admin"),
        "{status:?}"
    );
    // Nor remove one: that takes the activity out of the team's reach.
    let mut unlabelled = taskfactory_model::spec::spec_from_yaml(BILLING)?;
    unlabelled.labels.clear();
    let status = namer
        .update_activity(UpdateActivityRequest {
            id: "billing-sync".to_owned(),
            spec: Some(unlabelled),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("may not remove the label team=billing"),
        "{status:?}"
    );
    // Nor a label of another team, on a new activity or in a preview.
    relabelled.name = "billing-fresh".to_owned();
    relabelled
        .labels
        .insert("team".to_owned(), "payroll".to_owned());
    let status = namer
        .preview_run(PreviewRunRequest {
            spec: Some(relabelled.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("team=payroll"), "{status:?}");
    let status = namer
        .create_activity(CreateActivityRequest {
            spec: Some(relabelled),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Keeping the labels an activity has is fine.
    namer
        .update_activity(UpdateActivityRequest {
            id: "billing-sync".to_owned(),
            spec: Some(taskfactory_model::spec::spec_from_yaml(
                &BILLING.replace("tasks:", "description: v2\ntasks:"),
            )?),
        })
        .await?;

    // An operator of billing-* triggers and pauses billing-sync, but may not edit it; payroll
    // does not exist for it.
    let mut ops = env.admin_as(Some(prefix_operator)).await?;
    let fired = ops
        .trigger_activity(TriggerActivityRequest {
            id: "billing-sync".to_owned(),
            idempotency_key: "k1".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let status = ops
        .trigger_activity(TriggerActivityRequest {
            id: "payroll".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    ops.pause_activity(PauseActivityRequest {
        id: "billing-sync".to_owned(),
        note: "by ops".to_owned(),
    })
    .await?;
    let status = ops
        .update_activity(UpdateActivityRequest {
            id: "billing-sync".to_owned(),
            spec: Some(taskfactory_model::spec::spec_from_yaml(BILLING)?),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Runs follow their activity: the team sees billing's run, not payroll's.
    let payroll_run = admin
        .trigger_activity(TriggerActivityRequest {
            id: "payroll".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    support::finished_run(&admin, &fired.run_id, Duration::from_secs(30)).await?;
    support::finished_run(&admin, &payroll_run, Duration::from_secs(30)).await?;
    let runs = team
        .list_runs(ListRunsRequest::default())
        .await?
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].id, fired.run_id);
    let status = team
        .get_run(GetRunRequest {
            id: payroll_run.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = ops
        .cancel_run(CancelRunRequest {
            id: payroll_run,
            reason: "nope".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    Ok(())
}

const LEAKY: &str = r#"
name: leaky
trigger: {manual: {}}
context:
  - name: creds
    static: {apiKey: live-key-0123456789, region: eu}
tasks:
  - name: call
    type: log
    params:
      headers: {Authorization: "Bearer live-bearer-0123456789"}
      region: "{{ context.creds.region }}"
      apiKey: "{{ context.creds.apiKey }}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_viewer_never_reads_a_secret_that_an_admin_can() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let tokens = env.tokens.as_ref().expect("auth is on by default");
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    create(&mut admin, LEAKY).await?;
    let run_id = admin
        .trigger_activity(TriggerActivityRequest {
            id: "leaky".to_owned(),
            payload: Some(taskfactory_model::values::json_to_value(
                &serde_json::json!({"password": "hunter2-hunter2", "user": "ada"}),
            )),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id;
    support::finished_run(&admin, &run_id, Duration::from_secs(30)).await?;

    let secrets = [
        "live-key-0123456789",
        "live-bearer-0123456789",
        "hunter2-hunter2",
    ];
    let mut viewer = env.admin_as(Some(&tokens.viewer)).await?;
    let mut editor = env.admin_as(Some(&tokens.editor)).await?;
    let seen_by = |client: &mut Admin| {
        let mut client = client.clone();
        let run_id = run_id.clone();
        async move {
            let activity = client
                .get_activity(GetActivityRequest {
                    id: "leaky".to_owned(),
                    version: 0,
                })
                .await?
                .into_inner();
            let run = client
                .get_run(GetRunRequest { id: run_id.clone() })
                .await?
                .into_inner();
            let runs = client
                .list_runs(ListRunsRequest::default())
                .await?
                .into_inner();
            let tasks = support::tasks(&mut client, &run_id).await?;
            let listed = client
                .list_activities(ListActivitiesRequest::default())
                .await?
                .into_inner();
            anyhow::Ok(format!("{activity:?}{run:?}{runs:?}{tasks:?}{listed:?}"))
        }
    };
    for (who, client) in [("viewer", &mut viewer), ("editor", &mut editor)] {
        let text = seen_by(client).await?;
        for secret in secrets {
            assert!(!text.contains(secret), "{who} read {secret}");
        }
        assert!(text.contains("[redacted]"));
        assert!(text.contains("ada"), "what is not secret stays readable");
    }
    let text = seen_by(&mut admin).await?;
    for secret in secrets {
        assert!(text.contains(secret), "the admin reads {secret}");
    }

    // A preview shows an editor the resolved context redacted too.
    let preview = editor
        .preview_run(PreviewRunRequest {
            id: "leaky".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let text = format!("{preview:?}");
    assert!(!text.contains("live-key-0123456789"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_change_is_in_the_append_only_audit_log_with_who_what_and_versions()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let tokens = env.tokens.as_ref().expect("auth is on by default");
    let _services = env.start_all().await?;
    let mut editor = env.admin_as(Some(&tokens.editor)).await?;
    let mut operator = env.admin_as(Some(&tokens.operator)).await?;
    let mut viewer = env.admin_as(Some(&tokens.viewer)).await?;
    let mut admin = env.admin().await?;

    create(
        &mut editor,
        "name: approval\ntrigger: {manual: {}}\ntasks: [{name: approve, type: human, timeout: 1h}]\n",
    )
    .await?;
    let mut changed = taskfactory_model::spec::spec_from_yaml(
        "name: approval\ndescription: v2\ntrigger: {manual: {}}\ntasks: [{name: approve, type: human, timeout: 1h}]\n",
    )?;
    editor
        .update_activity(UpdateActivityRequest {
            id: "approval".to_owned(),
            spec: Some(changed.clone()),
        })
        .await?;
    changed.description = "v3".to_owned();
    let mut traced = tonic::Request::new(UpdateActivityRequest {
        id: "approval".to_owned(),
        spec: Some(changed),
    });
    traced.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?,
    );
    editor.update_activity(traced).await?;
    let fired = operator
        .trigger_activity(TriggerActivityRequest {
            id: "approval".to_owned(),
            idempotency_key: "order-42".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let task = wait_for("the human task", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        let run = fired.run_id.clone();
        async move {
            let tasks = support::tasks(&mut admin, &run).await?;
            Ok(tasks
                .into_iter()
                .find(|t| t.status == TaskStatus::Waiting as i32))
        }
    })
    .await?;
    operator
        .complete_task(CompleteTaskRequest {
            id: task.id.clone(),
            output: Some(taskfactory_model::values::json_to_value(
                &serde_json::json!({"approved": true}),
            )),
            ..Default::default()
        })
        .await?;
    editor
        .preview_run(PreviewRunRequest {
            id: "approval".to_owned(),
            ..Default::default()
        })
        .await?;
    let refused = viewer
        .pause_activity(PauseActivityRequest {
            id: "approval".to_owned(),
            note: "let me".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // A call that fails is recorded with its outcome too.
    let missing = operator
        .cancel_run(CancelRunRequest {
            id: uuid::Uuid::new_v4().to_string(),
            reason: "gone".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let events = audit_events(&mut admin, ListAuditEventsRequest::default()).await?;
    let summary: Vec<(String, String, String)> = events
        .iter()
        .rev()
        .map(|e| (e.rpc.clone(), e.principal.clone(), e.outcome.clone()))
        .collect();
    let expected = [
        ("CreateActivity", "test-editor", "OK"),
        ("UpdateActivity", "test-editor", "OK"),
        ("UpdateActivity", "test-editor", "OK"),
        ("TriggerActivity", "test-operator", "OK"),
        ("CompleteTask", "test-operator", "OK"),
        ("PreviewRun", "test-editor", "OK"),
        ("PauseActivity", "test-viewer", "PERMISSION_DENIED"),
        ("CancelRun", "test-operator", "NOT_FOUND"),
    ];
    assert_eq!(
        summary,
        expected
            .iter()
            .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
            .collect::<Vec<_>>()
    );
    let oldest_first: Vec<_> = events.iter().rev().collect();
    assert_eq!(oldest_first[0].version_after, 1);
    assert_eq!(
        (
            oldest_first[1].version_before,
            oldest_first[1].version_after
        ),
        (1, 2)
    );
    assert_eq!(
        oldest_first[2].trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
        "the caller's trace"
    );
    assert_eq!(oldest_first[3].idempotency_key, "order-42");
    assert_eq!(oldest_first[3].grants, vec!["operator".to_owned()]);
    assert_eq!(oldest_first[3].auth_method, "token");
    assert_eq!(oldest_first[4].target_kind, "task");
    assert_eq!(oldest_first[4].target_id, task.id);
    assert_eq!(oldest_first[4].activity_name, "approval");
    assert!(oldest_first[6].error.contains("needs the role operator"));
    // The auth layer refuses before it reads which activity a call is about.
    for event in &events[..] {
        if event.rpc != "CancelRun" && event.outcome != "PERMISSION_DENIED" {
            assert_eq!(event.activity_name, "approval", "{event:?}");
        }
    }
    // Filters.
    let by_operator = audit_events(
        &mut admin,
        ListAuditEventsRequest {
            principal: "test-operator".to_owned(),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(by_operator.len(), 3);

    // Versions say who made them.
    let versions = admin
        .list_activity_versions(ListActivityVersionsRequest {
            id: "approval".to_owned(),
        })
        .await?
        .into_inner()
        .versions;
    assert!(versions.iter().all(|v| v.created_by == "test-editor"));

    // Only admins read the log, and nobody rewrites it.
    assert_eq!(
        editor
            .list_audit_events(ListAuditEventsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let pool = env.db.pool().await?;
    for statement in [
        "UPDATE audit_events SET principal = 'someone-else'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let error = sqlx::query(statement).execute(&pool).await.unwrap_err();
        assert!(
            error.to_string().contains("append-only"),
            "{statement}: {error}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_that_gives_up_does_not_keep_its_change_out_of_the_audit_log() -> anyhow::Result<()>
{
    // A context source that answers slowly: the preview outlives the caller's deadline.
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            axum::Json(serde_json::json!({"ok": true}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/slow", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        &format!(
            "name: slow\ntrigger: {{manual: {{}}}}\ncontext: [{{name: s, http: {{url: '{url}'}}, timeout: 5s}}]\ntasks: [{{name: t, type: log}}]\n"
        ),
    )
    .await?;
    let mut hasty = tonic::Request::new(PreviewRunRequest {
        id: "slow".to_owned(),
        ..Default::default()
    });
    hasty.set_timeout(Duration::from_millis(300));
    let status = admin.preview_run(hasty).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let recorded = wait_for("the preview's audit row", Duration::from_secs(15), || {
        let mut admin = admin.clone();
        async move {
            let events = audit_events(
                &mut admin,
                ListAuditEventsRequest {
                    rpc: "PreviewRun".to_owned(),
                    ..Default::default()
                },
            )
            .await?;
            Ok(events.into_iter().next())
        }
    })
    .await?;
    assert_eq!(
        recorded.outcome, "OK",
        "the preview ran to its end: {recorded:?}"
    );
    assert_eq!(recorded.activity_name, "slow");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_checked_against_a_version_that_moved_meanwhile_is_refused() -> anyhow::Result<()>
{
    // The scope and label checks of an update look at the version they read; a change that lands
    // in between (say, an admin removing the label that gave the caller its scope) wins.
    use taskfactory_trigger::store;
    let db = taskfactory_tests::TestDb::create().await?;
    let pool = db.migrated_pool().await?;
    let spec = taskfactory_model::spec::spec_from_yaml(BILLING)?;
    let json = taskfactory_proto::to_json(&spec);
    let version = |json| store::NewVersion {
        spec: json,
        spec_bytes: taskfactory_model::sizes::json_bytes(json),
        limits: taskfactory_trigger::admin::SpecLimits::default().totals(),
        enabled: true,
        trigger_kind: "manual",
        created_by: "test",
    };
    let id = taskfactory_model::ids::ActivityId(uuid::Uuid::new_v4());
    store::create_activity(
        &pool,
        id,
        "billing-sync",
        version(&json),
        chrono::Utc::now(),
    )
    .await?;
    let mut changed = spec.clone();
    changed.description = "v2".to_owned();
    let changed = taskfactory_proto::to_json(&changed);
    let (record, _) =
        store::update_activity(&pool, id, 1, version(&changed), chrono::Utc::now()).await?;
    assert_eq!(record.version, 2);
    let stale = store::update_activity(&pool, id, 1, version(&json), chrono::Utc::now())
        .await
        .unwrap_err();
    assert!(
        matches!(
            stale,
            store::StoreError::Moved {
                expected: 1,
                now: 2
            }
        ),
        "{stale:?}"
    );
    Ok(())
}
