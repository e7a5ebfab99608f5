//! `PreviewRun`, the orchestrator's half: the trigger service sends the spec and the would-be
//! TriggerEvent on `taskfactory.internal.preview`; one orchestrator (queue group) resolves the
//! context and evaluates the templates exactly as a real run would — the same code path — and
//! answers with the would-be tasks and the evaluation. Nothing is recorded or published.
//!
//! Messages are proto3 JSON: the request `{"spec": ActivitySpec, "event": TriggerEvent}`, the
//! answer a `PreviewRunResponse`, or `{"error": "...", "code": "..."}` (the code, when there is
//! one, is the gRPC code the admin API answers with).
//!
//! **Bounds.** A preview's sources take room in `--source-bytes-in-flight` as a run's do (it
//! waits for it behind runs and other previews, and a source that cannot fit even alone fails,
//! naming it). At most [`PREVIEWS_AT_ONCE`] are in hand; one more is answered "busy" at once.
//! Each is given up after [`PREVIEW_DEADLINE`], a little before the trigger stops waiting
//! (`subjects::PREVIEW_TIMEOUT`), with its sources and its wait for room: an orchestrator holds
//! nothing for a preview nobody waits for, however long its sources' timeouts.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use taskfactory_model::ids::{ActivityId, RunId};
use taskfactory_model::subjects;
use taskfactory_proto::v1::{
    ActivitySpec, PreviewRunResponse, TaskInstance, TemplateEvaluation, TriggerEvent,
};
use tokio_util::sync::CancellationToken;

use crate::spawn::{Purpose, Spawner};

/// Previews in hand at once, at most. Few: a preview is a person at the admin API, and each may
/// hold up to a spec and its context; the source room, not this, bounds what their sources hold.
const PREVIEWS_AT_ONCE: usize = 4;

/// How long a preview may take here: the trigger's wait, less time for the answer to reach it.
const PREVIEW_DEADLINE: Duration = subjects::PREVIEW_TIMEOUT.saturating_sub(Duration::from_secs(5));

/// Answers preview requests until shutdown.
pub async fn serve(nats: async_nats::Client, spawner: Arc<Spawner>, shutdown: CancellationToken) {
    taskfactory_runtime::messaging::answer_requests(
        nats,
        subjects::PREVIEW_REQUESTS,
        subjects::PREVIEW_QUEUE,
        "PreviewRun",
        taskfactory_runtime::messaging::AtOnce {
            requests: PREVIEWS_AT_ONCE,
            busy: serde_json::json!({
                "error": format!("this orchestrator is answering {PREVIEWS_AT_ONCE} previews at once already; retry in a moment"),
                "code": "unavailable",
            }),
        },
        shutdown,
        move |headers, payload| {
            let spawner = spawner.clone();
            async move {
                if let Err(refusal) = crate::admin_requests::admit(
                    &spawner.pool,
                    "preview",
                    headers.as_ref(),
                    &payload,
                )
                .await
                {
                    return serde_json::json!({ "error": refusal.message, "code": "permission_denied" });
                }
                match tokio::time::timeout(PREVIEW_DEADLINE, preview(&spawner, &payload)).await {
                    Ok(Ok(response)) => taskfactory_proto::to_json(&response),
                    Ok(Err(error)) => serde_json::json!({ "error": error }),
                    Err(_) => serde_json::json!({
                        "error": format!(
                            "the preview did not finish within {}s: its context sources waited that long for room in --source-bytes-in-flight (TASKFACTORY_SOURCE_BYTES_IN_FLIGHT), which runs and other previews hold, or took that long to answer; retry, or give them shorter timeouts",
                            PREVIEW_DEADLINE.as_secs()
                        ),
                        "code": "deadline_exceeded",
                    }),
                }
            }
        },
    )
    .await;
}

async fn preview(spawner: &Spawner, body: &[u8]) -> Result<PreviewRunResponse, String> {
    let request: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("preview request is not JSON: {e}"))?;
    let spec: ActivitySpec = taskfactory_proto::from_json(&request["spec"])
        .map_err(|e| format!("preview request spec: {e}"))?;
    let mut event: TriggerEvent = taskfactory_proto::from_json(&request["event"])
        .map_err(|e| format!("preview request event: {e}"))?;
    crate::spawn::make_storable_trigger(&mut event);
    let activity_id: ActivityId = event
        .activity_id
        .parse()
        .map_err(|_| "preview request event has no valid activity id".to_owned())?;
    let run_id = RunId::derive(activity_id, &event.dedupe_key);
    let (run, tasks) = spawner
        .evaluate_spec(&spec, &event, activity_id, run_id, Purpose::Preview)
        .await;
    let tasks = tasks
        .iter()
        .map(|task| TaskInstance::decode(task.instance.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("encoding the would-be tasks: {e}"))?;
    let mut evaluation: Vec<TemplateEvaluation> = match &run.evaluation {
        serde_json::Value::Array(items) => items
            .iter()
            .filter_map(|item| taskfactory_proto::from_json(item).ok())
            .collect(),
        _ => Vec::new(),
    };
    if !run.error.is_empty() && !evaluation.iter().any(|e| e.error == run.error) {
        // The run would fail: say why, where a reader of the evaluation looks.
        evaluation.push(TemplateEvaluation {
            template: "run".to_owned(),
            error: run.error.clone(),
            ..Default::default()
        });
    }
    Ok(PreviewRunResponse {
        context: Some(taskfactory_model::values::json_to_struct(&run.context)),
        tasks,
        evaluation,
    })
}
