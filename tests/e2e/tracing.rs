//! Traces: the three services export OTLP/gRPC to an in-process receiver (the protocol Jaeger
//! ingests); one fire is one trace, continued from the event publisher's or the API caller's
//! context, and the run remembers its trace id.

use std::collections::HashMap;
use std::time::Duration;

use taskfactory_model::values::json_to_value;
use taskfactory_proto::v1::{GetRunRequest, RunStatus, TriggerActivityRequest};
use taskfactory_tests::otlp::{OtlpReceiver, ReceivedSpan};
use taskfactory_tests::{EnvOptions, Running, Service, TestEnv, wait_for};

use crate::support::{create, finished_run, runs};

const TRIGGER: &str = "taskfactory-trigger";
const ORCHESTRATOR: &str = "taskfactory-orchestrator";
const EXECUTOR: &str = "taskfactory-executor";

const THREE_TASKS: &str = r#"
name: traced-order
trigger:
  event:
    subject: "events.traced.*"
tasks:
  - name: line
    type: log
    forEach: event.lines
    params:
      sku: "{{ item }}"
"#;

/// A W3C trace id and span id the test's "publisher" owns.
fn caller_context() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (trace_id, span_id)
}

/// Starts the three services as processes exporting traces; `env_for` may add variables per
/// service.
async fn start_traced(
    env: &TestEnv,
    endpoint: &str,
    env_for: impl Fn(Service) -> Vec<(&'static str, String)>,
) -> anyhow::Result<Vec<Running>> {
    let mut running = Vec::new();
    for service in [Service::Trigger, Service::Orchestrator, Service::Executor] {
        let mut vars = vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ];
        vars.extend(env_for(service));
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        running.push(env.spawn_process(service, &vars)?);
    }
    env.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
        .await?;
    Ok(running)
}

/// The spans of a trace, by id, with helpers to walk it.
struct Trace {
    spans: HashMap<String, ReceivedSpan>,
}

impl Trace {
    fn new(spans: Vec<ReceivedSpan>) -> Self {
        Self {
            spans: spans.into_iter().map(|s| (s.span_id.clone(), s)).collect(),
        }
    }

    /// The spans of `trace_id` received once one named `name` is among them.
    async fn when_it_has(
        receiver: &OtlpReceiver,
        trace_id: &str,
        name: &str,
        what: &str,
    ) -> anyhow::Result<Self> {
        let spans = receiver
            .wait_until(what, Duration::from_secs(20), |spans| {
                spans
                    .iter()
                    .any(|s| s.trace_id == trace_id && s.name == name)
            })
            .await?;
        Ok(Self::new(
            spans
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect(),
        ))
    }

    fn children<'a>(&'a self, parent: &str) -> Vec<&'a ReceivedSpan> {
        let mut children: Vec<&ReceivedSpan> = self
            .spans
            .values()
            .filter(|s| s.parent_span_id == parent)
            .collect();
        children.sort_by_key(|s| s.start_unix_nanos);
        children
    }

    /// The one child of `parent` named `name` exported by `service`.
    fn child<'a>(
        &'a self,
        parent: &ReceivedSpan,
        service: &str,
        name: &str,
    ) -> anyhow::Result<&'a ReceivedSpan> {
        let found: Vec<&ReceivedSpan> = self
            .children(&parent.span_id)
            .into_iter()
            .filter(|s| s.service == service && s.name == name)
            .collect();
        anyhow::ensure!(
            found.len() == 1,
            "expected one {name:?} span of {service} under {:?} ({}), found {}; its children: {:?}",
            parent.name,
            parent.service,
            found.len(),
            self.children(&parent.span_id)
                .iter()
                .map(|s| format!("{}/{}", s.service, s.name))
                .collect::<Vec<_>>()
        );
        Ok(found[0])
    }

    fn print(&self, parent: &str, depth: usize) {
        for span in self.children(parent) {
            eprintln!(
                "{}{} [{}] {} {:?}",
                "  ".repeat(depth),
                span.name,
                span.service,
                span.kind,
                span.attributes
            );
            self.print(&span.span_id, depth + 1);
        }
    }

    fn named<'a>(&'a self, service: &str, name: &str) -> Vec<&'a ReceivedSpan> {
        self.spans
            .values()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_triggered_run_is_one_trace_across_the_three_services() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = TestEnv::new(EnvOptions::default()).await?;
    // The executor batches for 10 minutes: its spans arrive only because shutdown flushes them.
    let mut services = start_traced(&env, &receiver.endpoint(), |service| match service {
        Service::Executor => vec![("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned())],
        _ => Vec::new(),
    })
    .await?;
    let mut admin = env.admin().await?;
    create(&mut admin, THREE_TASKS).await?;

    // The user publishes the event inside their own trace.
    let (trace_id, publisher_span) = caller_context();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", format!("00-{trace_id}-{publisher_span}-01"));
    let body = serde_json::json!({"lines": ["a", "b", "c"]});
    env.js()
        .await?
        .publish_with_headers(
            "events.traced.created",
            headers,
            serde_json::to_vec(&body)?.into(),
        )
        .await?
        .await?;

    let run = wait_for("the run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "traced-order").await?.into_iter().next()) }
    })
    .await?;
    let run = finished_run(&admin, &run.id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(run.tasks_spawned, 3);
    assert_eq!(run.trace_id, trace_id, "GetRun returns the run's trace id");

    // Trigger and orchestrator export within moments; six result records (each task's start and
    // its outcome) mean the orchestrator saw every attempt.
    receiver
        .wait_until(
            "the trigger's and orchestrator's spans",
            Duration::from_secs(20),
            |spans| {
                spans
                    .iter()
                    .filter(|s| s.trace_id == trace_id && s.name == "record result log")
                    .count()
                    == 6
            },
        )
        .await?;
    assert!(
        !receiver
            .trace(&trace_id)
            .iter()
            .any(|s| s.service == EXECUTOR),
        "the executor exported before its batch delay: the flush-at-shutdown check proves nothing"
    );
    services.pop().expect("the executor").stop().await?;
    receiver
        .wait_until("the executor's spans", Duration::from_secs(10), |spans| {
            spans
                .iter()
                .filter(|s| s.trace_id == trace_id && s.service == EXECUTOR)
                .count()
                >= 6
        })
        .await?;
    let trace = Trace::new(receiver.trace(&trace_id));
    if std::env::var("SHOW_TRACE").is_ok() {
        trace.print(&publisher_span, 0);
    }

    // Every span hangs from the publisher's span: one tree, nothing orphaned.
    for span in trace.spans.values() {
        let mut at = span;
        let mut hops = 0;
        while at.parent_span_id != publisher_span {
            at = trace.spans.get(&at.parent_span_id).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}/{} has a parent outside the trace ({})",
                    span.service,
                    span.name,
                    at.parent_span_id
                )
            })?;
            hops += 1;
            anyhow::ensure!(hops < 64, "a cycle in the trace");
        }
    }

    // Trigger: the event is processed as a child of the publisher's span, and fires.
    let roots = trace.children(&publisher_span);
    assert_eq!(roots.len(), 1, "{roots:?}");
    let consumed = roots[0];
    assert_eq!(consumed.service, TRIGGER);
    // Named after the destination's template: user subjects may hold ids.
    assert_eq!(consumed.name, "process events");
    assert_eq!(consumed.kind, "consumer");
    assert_eq!(consumed.attribute("messaging.system"), Some("nats"));
    assert_eq!(
        consumed.attribute("messaging.destination.name"),
        Some("events.traced.created")
    );
    assert_eq!(
        consumed.attribute("messaging.destination.template"),
        Some("events")
    );
    let fire = trace.child(consumed, TRIGGER, "fire traced-order")?;
    assert_eq!(fire.attribute("activity.name"), Some("traced-order"));
    assert_eq!(fire.attribute("activity.version"), Some("1"));
    assert_eq!(fire.attribute("fire.source"), Some("event"));
    assert_eq!(fire.attribute("run.id"), Some(run.id.as_str()));
    let announced = trace
        .children(&fire.span_id)
        .into_iter()
        .find(|s| s.name.starts_with("publish triggers."))
        .ok_or_else(|| anyhow::anyhow!("the fire published no TriggerEvent"))?;
    assert_eq!(announced.kind, "producer");

    // Orchestrator: the trigger is processed, the run evaluated, one span per task spawned.
    let taken = trace
        .children(&announced.span_id)
        .into_iter()
        .find(|s| s.service == ORCHESTRATOR)
        .ok_or_else(|| anyhow::anyhow!("no orchestrator span under the TriggerEvent"))?;
    assert!(
        taken.name.starts_with("process triggers."),
        "{}",
        taken.name
    );
    let run_span = trace.child(taken, ORCHESTRATOR, "run traced-order")?;
    assert_eq!(run_span.attribute("run.id"), Some(run.id.as_str()));
    assert_eq!(run_span.attribute("run.status"), Some("RUN_RUNNING"));
    assert_eq!(run_span.attribute("run.tasks"), Some("3"));
    let evaluation = trace.child(run_span, ORCHESTRATOR, "evaluate templates")?;
    assert_eq!(evaluation.attribute("evaluation.tasks"), Some("3"));
    assert_eq!(evaluation.attribute("evaluation.items"), Some("3"));
    let spawned = trace
        .children(&run_span.span_id)
        .into_iter()
        .filter(|s| s.name == "spawn log")
        .collect::<Vec<_>>();
    assert_eq!(spawned.len(), 3, "one span per task spawned");

    // Each task: published → executor attempt → result published → result recorded.
    let mut task_ids = Vec::new();
    for spawn in spawned {
        let task_id = spawn.attribute("task.id").unwrap_or_default().to_owned();
        task_ids.push(task_id.clone());
        let published = trace.child(spawn, ORCHESTRATOR, "publish tasks.log")?;
        assert_eq!(published.kind, "producer");
        assert_eq!(
            published.attribute("messaging.message.id"),
            Some(task_id.as_str())
        );
        let consumed = trace.child(published, EXECUTOR, "process tasks.log")?;
        assert_eq!(consumed.kind, "consumer");
        let attempt = trace.child(consumed, EXECUTOR, "execute log")?;
        assert_eq!(attempt.attribute("task.id"), Some(task_id.as_str()));
        assert_eq!(attempt.attribute("task.attempt"), Some("1"));
        assert_eq!(attempt.attribute("task.status"), Some("SUCCEEDED"));
        // Two reports, each recorded under its own publish: the start, then the outcome.
        let reports: Vec<_> = trace
            .children(&attempt.span_id)
            .into_iter()
            .filter(|s| s.service == EXECUTOR && s.name == "publish results.traced-order.{run_id}")
            .collect();
        assert_eq!(reports.len(), 2, "{task_id}: {reports:?}");
        let mut statuses = Vec::new();
        for reported in reports {
            assert_eq!(
                reported.attribute("messaging.destination.name"),
                Some(format!("results.traced-order.{}", run.id).as_str())
            );
            let received = trace
                .children(&reported.span_id)
                .into_iter()
                .find(|s| s.service == ORCHESTRATOR)
                .ok_or_else(|| anyhow::anyhow!("no orchestrator span under {task_id}'s report"))?;
            let recorded = trace.child(received, ORCHESTRATOR, "record result log")?;
            statuses.push(
                recorded
                    .attribute("task.status")
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        statuses.sort();
        assert_eq!(statuses, ["RUNNING", "SUCCEEDED"]);
    }
    task_ids.sort();
    task_ids.dedup();
    assert_eq!(task_ids.len(), 3);
    // The last result completes the run, and its announcement is part of the same trace.
    assert_eq!(
        trace
            .named(ORCHESTRATOR, "publish events.taskfactory.run.completed")
            .len(),
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_call_with_a_traceparent_continues_the_callers_trace() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = TestEnv::new(EnvOptions::default()).await?;
    // The orchestrator and executor export to a collector that is not there: they must work on.
    let nowhere = format!("http://127.0.0.1:{}", taskfactory_tests::free_port());
    let mut services = start_traced(&env, &receiver.endpoint(), |service| match service {
        Service::Trigger => Vec::new(),
        _ => vec![("OTEL_EXPORTER_OTLP_ENDPOINT", nowhere.clone())],
    })
    .await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        r#"
name: traced-manual
trigger:
  manual: {}
tasks:
  - name: only
    type: noop
"#,
    )
    .await?;

    let (trace_id, caller_span) = caller_context();
    let mut request = tonic::Request::new(TriggerActivityRequest {
        id: "traced-manual".to_owned(),
        payload: Some(json_to_value(&serde_json::json!({"why": "tracing"}))),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse()?,
    );
    let fired = admin.trigger_activity(request).await?.into_inner();
    let run = finished_run(&admin, &fired.run_id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(run.trace_id, trace_id);
    let again = admin
        .get_run(GetRunRequest {
            id: fired.run_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(again.trace_id, trace_id);

    let trace = Trace::when_it_has(
        &receiver,
        &trace_id,
        "fire traced-manual",
        "the admin call's spans",
    )
    .await?;
    let server = trace
        .children(&caller_span)
        .into_iter()
        .find(|s| s.name == "taskfactory.v1.AdminService/TriggerActivity")
        .ok_or_else(|| anyhow::anyhow!("no server span under the caller's span"))?;
    assert_eq!(server.service, TRIGGER);
    assert_eq!(server.kind, "server");
    assert_eq!(server.attribute("rpc.system"), Some("grpc"));
    assert_eq!(server.attribute("rpc.method"), Some("TriggerActivity"));
    assert_eq!(server.attribute("rpc.grpc.status_code"), Some("0"));
    assert_eq!(server.status, "unset");
    let fire = trace.child(server, TRIGGER, "fire traced-manual")?;
    assert_eq!(fire.attribute("fire.source"), Some("manual"));

    // A refused call has its gRPC status on its span; the caller's mistake is not our error.
    let (trace_id, caller_span) = caller_context();
    let mut request = tonic::Request::new(TriggerActivityRequest {
        id: "no-such-activity".to_owned(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse()?,
    );
    let refused = admin
        .trigger_activity(request)
        .await
        .expect_err("no such activity");
    assert_eq!(refused.code(), tonic::Code::NotFound);
    let spans = receiver
        .wait_until(
            "the refused call's span",
            Duration::from_secs(20),
            |spans| spans.iter().any(|s| s.trace_id == trace_id),
        )
        .await?;
    let server = spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.parent_span_id == caller_span)
        .expect("waited for it");
    assert_eq!(server.name, "taskfactory.v1.AdminService/TriggerActivity");
    assert_eq!(server.attribute("rpc.grpc.status_code"), Some("5"));
    assert_eq!(server.status, "unset");

    // A collector that is not there does not hold up a clean shutdown either.
    for service in services.drain(..).rev() {
        service.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_delivery_with_a_traceparent_continues_the_senders_trace() -> anyhow::Result<()> {
    const SECRET: &str = "a-webhook-secret-of-enough-bytes";
    let receiver = OtlpReceiver::start().await?;
    let env = TestEnv::new(EnvOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let hooks = dir.path().join("hooks.yaml");
    std::fs::write(
        &hooks,
        "hooks:\n  - name: shop\n    subject: events.shop.orders\n    secretEnv: SHOP_SECRET\n",
    )?;
    let hooks = hooks.display().to_string();
    let _services = start_traced(&env, &receiver.endpoint(), |service| match service {
        Service::Trigger => vec![
            ("TASKFACTORY_WEBHOOKS", hooks.clone()),
            ("SHOP_SECRET", SECRET.to_owned()),
        ],
        _ => Vec::new(),
    })
    .await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: shop-order\ntrigger: {event: {subject: events.shop.orders}}\n\
         tasks: [{name: ship, type: noop}]\n",
    )
    .await?;

    let (trace_id, sender_span) = caller_context();
    let body = br#"{"order": "o-9"}"#.to_vec();
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let signature = taskfactory_trigger::webhook::sign(SECRET.as_bytes(), &timestamp, "d-1", &body);
    let url = format!("http://{}/hooks/shop", env.http_addr);
    // reqwest is built without a default TLS provider; plain HTTP still asks for one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let answer = wait_for("the webhook gateway", Duration::from_secs(30), || {
        let (url, body, timestamp, signature) = (
            url.clone(),
            body.clone(),
            timestamp.clone(),
            signature.clone(),
        );
        let traceparent = format!("00-{trace_id}-{sender_span}-01");
        async move {
            let sent = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .header(taskfactory_trigger::webhook::HEADER_DELIVERY, "d-1")
                .header(taskfactory_trigger::webhook::HEADER_TIMESTAMP, timestamp)
                .header(
                    taskfactory_trigger::webhook::HEADER_SIGNATURE,
                    format!("v1={signature}"),
                )
                .header("traceparent", traceparent)
                .body(body)
                .send()
                .await;
            Ok(sent.ok().map(|response| response.status().as_u16()))
        }
    })
    .await?;
    assert_eq!(answer, 202);

    let run = wait_for("the run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "shop-order").await?.into_iter().next()) }
    })
    .await?;
    let run = finished_run(&admin, &run.id, Duration::from_secs(30)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(run.trace_id, trace_id);

    let trace = Trace::when_it_has(
        &receiver,
        &trace_id,
        "fire shop-order",
        "the delivery's spans",
    )
    .await?;
    let roots = trace.children(&sender_span);
    assert_eq!(roots.len(), 1, "{roots:?}");
    let delivery = roots[0];
    assert_eq!(delivery.name, "POST /hooks/{name}");
    assert_eq!(delivery.kind, "server");
    assert_eq!(delivery.attribute("webhook.name"), Some("shop"));
    assert_eq!(delivery.attribute("http.response.status_code"), Some("202"));
    let published = trace.child(delivery, TRIGGER, "publish events")?;
    let consumed = trace.child(published, TRIGGER, "process events")?;
    let fire = trace.child(consumed, TRIGGER, "fire shop-order")?;
    assert_eq!(fire.attribute("fire.source"), Some("webhook"));
    Ok(())
}

/// A run that waits under its concurrency key shows the wait in its event's trace: the run is
/// admitted (`run.admission` queued), and later started in the same trace, saying how long it
/// waited (`run.waited_ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queued_runs_wait_shows_in_its_events_trace() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _services = start_traced(&env, &receiver.endpoint(), |_| Vec::new()).await?;
    let mut admin = env.admin().await?;
    let server = crate::support::RecordingServer::start(Duration::from_millis(1000)).await?;
    create(
        &mut admin,
        &format!(
            "name: one-at-a-time\ntrigger: {{event: {{subject: 'events.waits.*'}}}}\nflow: {{concurrency: {{limit: 1}}}}\ntasks: [{{name: call, type: http, params: {{url: '{}'}}}}]",
            server.url
        ),
    )
    .await?;
    let js = env.js().await?;
    let mut traces = Vec::new();
    for n in 0..2 {
        let (trace_id, span) = caller_context();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", format!("00-{trace_id}-{span}-01"));
        headers.insert("Nats-Msg-Id", format!("w{n}"));
        js.publish_with_headers("events.waits.x", headers, b"{}".to_vec().into())
            .await?
            .await?;
        traces.push(trace_id);
    }
    // The second event's run waits for the first's call, about a second.
    let second = traces[1].clone();
    let spans = receiver
        .wait_until(
            "the waiting run's start",
            Duration::from_secs(30),
            |spans| {
                spans.iter().any(|s| {
                    s.trace_id == second && s.attribute("run.admission") == Some("started")
                })
            },
        )
        .await?;
    let runs: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == second && s.name == "run one-at-a-time")
        .collect();
    let admissions: Vec<&str> = runs
        .iter()
        .filter_map(|s| s.attribute("run.admission"))
        .collect();
    assert!(
        admissions.contains(&"queued") && admissions.contains(&"started"),
        "{admissions:?}"
    );
    let started = runs
        .iter()
        .find(|s| s.attribute("run.admission") == Some("started"))
        .unwrap();
    let waited: u64 = started
        .attribute("run.waited_ms")
        .ok_or_else(|| anyhow::anyhow!("no run.waited_ms: {:?}", started.attributes))?
        .parse()?;
    assert!(waited >= 500, "waited {waited} ms");
    Ok(())
}
