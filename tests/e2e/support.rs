//! Shared steps of the end-to-end tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use taskfactory_model::spec::spec_from_yaml;
use taskfactory_model::subjects;
use taskfactory_proto::v1::{
    Activity, CreateActivityRequest, GetRunRequest, ListRunsRequest, ListTasksRequest, Run,
    RunStatus, Task,
};
use taskfactory_tests::wait_for;

pub type Admin = taskfactory_trigger::auth::client::AdminClient;

/// A fire of `activity` for the event of stream sequence `sequence` (published at an instant
/// derived from it) with `Nats-Msg-Id` `msg_id`, as event ingress hands one to the store: for
/// tests that record fires directly.
pub fn event_fire(
    activity: &Activity,
    sequence: u64,
    msg_id: &str,
    dedupe_key: &str,
    rate_limit: Option<taskfactory_trigger::flow::RateLimit>,
) -> anyhow::Result<taskfactory_trigger::store::NewFire> {
    use taskfactory_model::ids::{ActivityId, FireId};
    let activity_id = ActivityId(activity.id.parse()?);
    let name = activity
        .spec
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    Ok(taskfactory_trigger::store::NewFire {
        id: FireId::derive(activity_id, dedupe_key),
        activity_id,
        activity_name: name,
        activity_version: activity.version,
        source: "event",
        dedupe_key: dedupe_key.to_owned(),
        scheduled_for: None,
        fired_at: chrono::Utc::now(),
        subject: "events.test.x".to_owned(),
        payload: None,
        event: Vec::new(),
        dst_note: None,
        traceparent: String::new(),
        origin: Some(Arc::new(taskfactory_trigger::event_ledger::EventOrigin {
            sequence,
            published_ns: 1_765_000_000_000_000_000 + i64::try_from(sequence)?,
            msg_id: Some(msg_id.to_owned()),
            subject: "events.test.x".to_owned(),
        })),
        rate_limit,
    })
}

pub async fn create(admin: &mut Admin, yaml: &str) -> anyhow::Result<Activity> {
    let spec = spec_from_yaml(yaml)?;
    Ok(admin
        .create_activity(CreateActivityRequest { spec: Some(spec) })
        .await
        .context("CreateActivity")?
        .into_inner())
}

/// Every run of an activity, newest first (all pages).
pub async fn runs(admin: &mut Admin, activity: &str) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_runs(ListRunsRequest {
                activity_id: activity.to_owned(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        runs.extend(page.runs);
        if page.next_page_token.is_empty() {
            return Ok(runs);
        }
        token = page.next_page_token;
    }
}

/// Every task of a run, in template and item order (all pages).
pub async fn tasks(admin: &mut Admin, run_id: &str) -> anyhow::Result<Vec<Task>> {
    let mut tasks = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_tasks(ListTasksRequest {
                run_id: run_id.to_owned(),
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        tasks.extend(page.tasks);
        if page.next_page_token.is_empty() {
            return Ok(tasks);
        }
        token = page.next_page_token;
    }
}

/// Waits until the run is in a terminal state and returns it with details.
pub async fn finished_run(admin: &Admin, run_id: &str, timeout: Duration) -> anyhow::Result<Run> {
    wait_for(&format!("run {run_id} to finish"), timeout, || {
        let mut admin = admin.clone();
        let run_id = run_id.to_owned();
        async move {
            let run = match admin.get_run(GetRunRequest { id: run_id }).await {
                Ok(run) => run.into_inner(),
                Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
                Err(status) => return Err(status.into()),
            };
            let done = matches!(
                run.status(),
                RunStatus::RunSucceeded
                    | RunStatus::RunFailed
                    | RunStatus::RunCancelled
                    | RunStatus::RunSkipped
            );
            Ok(done.then_some(run))
        }
    })
    .await
}

/// Publishes a JSON event through JetStream, optionally with a `Nats-Msg-Id`.
pub async fn publish_event(
    js: &async_nats::jetstream::Context,
    subject: &str,
    body: Vec<u8>,
    msg_id: Option<&str>,
) -> anyhow::Result<async_nats::jetstream::publish::PublishAck> {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(id) = msg_id {
        headers.insert("Nats-Msg-Id", id);
    }
    Ok(js
        .publish_with_headers(subject.to_owned(), headers, body.into())
        .await?
        .await?)
}

/// Waits until `count` (a `SELECT count(*)` with its text parameters `binds`) is at least `n`.
pub async fn wait_count(
    pool: &sqlx::PgPool,
    what: &str,
    count: &'static str,
    binds: &[&str],
    n: i64,
    within: Duration,
) -> anyhow::Result<()> {
    wait_for(what, within, || async {
        let mut query = sqlx::query_scalar::<_, i64>(count);
        for bind in binds {
            query = query.bind(*bind);
        }
        let counted = query.fetch_one(pool).await?;
        Ok((counted >= n).then_some(()))
    })
    .await
}

/// Waits until `activity` has at least `n` succeeded runs.
pub async fn wait_succeeded(
    pool: &sqlx::PgPool,
    activity: &str,
    n: i64,
    within: Duration,
) -> anyhow::Result<()> {
    wait_count(
        pool,
        &format!("{n} runs of {activity} succeeded"),
        "SELECT count(*) FROM runs WHERE activity_name = $1 AND status = 'SUCCEEDED'",
        &[activity],
        n,
        within,
    )
    .await
}

/// Publishes events to the events stream back to back, `(body, Nats-Msg-Id)` each, then waits
/// for every ack: a burst as fast as one client sends it.
pub async fn publish_burst(
    js: &async_nats::jetstream::Context,
    subject: &str,
    events: Vec<(Vec<u8>, String)>,
) -> anyhow::Result<()> {
    let mut acks = Vec::with_capacity(events.len());
    for (body, id) in events {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        acks.push(
            js.publish_with_headers(subject.to_owned(), headers, body.into())
                .await?,
        );
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

/// The dead letter of the message stored at `sequence` of `stream`, once it is there: its error.
pub async fn dead_letter(
    js: &async_nats::jetstream::Context,
    dlq_subject: &str,
    stream: &str,
    sequence: u64,
) -> anyhow::Result<String> {
    let dlq_subject = dlq_subject.to_owned();
    let stream = stream.to_owned();
    wait_for(
        &format!("the dead letter of {stream} #{sequence}"),
        Duration::from_secs(20),
        || {
            let (dlq_subject, stream) = (dlq_subject.clone(), stream.clone());
            async move {
                let letters = dead_letters(js, &dlq_subject).await?;
                Ok(letters
                    .into_iter()
                    .find(|l| l.stream == stream && l.sequence == sequence)
                    .map(|l| l.error))
            }
        },
    )
    .await
}

/// A dead letter: the stream and sequence of the message it copies, and the error it was refused
/// with.
#[derive(Debug)]
pub struct Letter {
    pub stream: String,
    pub sequence: u64,
    pub error: String,
}

/// Every dead letter on `dlq_subject`.
pub async fn dead_letters(
    js: &async_nats::jetstream::Context,
    dlq_subject: &str,
) -> anyhow::Result<Vec<Letter>> {
    let mut dlq = js.get_stream(subjects::DLQ_STREAM).await?;
    let last = dlq.info().await?.state.last_sequence;
    let mut letters = Vec::new();
    for seq in 1..=last {
        let Ok(message) = dlq.get_raw_message(seq).await else {
            continue;
        };
        if message.subject.as_str() != dlq_subject {
            continue;
        }
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        letters.push(Letter {
            stream: header(subjects::HEADER_ORIGINAL_STREAM),
            sequence: header(subjects::HEADER_ORIGINAL_SEQUENCE)
                .parse()
                .unwrap_or(0),
            error: header(subjects::HEADER_ERROR),
        });
    }
    Ok(letters)
}

/// Waits until the durable consumer has settled everything it was given, and returns how many
/// deliveries that took and how many messages the stream holds: equal when nothing was delivered
/// twice.
pub async fn settled(
    js: &async_nats::jetstream::Context,
    stream: &str,
    durable: &str,
) -> anyhow::Result<(u64, u64)> {
    wait_for(
        &format!("{durable} to settle"),
        Duration::from_secs(20),
        || async {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                .get_stream(stream)
                .await?
                .get_consumer(durable)
                .await
                .map_err(|e| anyhow::anyhow!("consumer {durable}: {e}"))?;
            let info = consumer.info().await?.clone();
            let messages = js.get_stream(stream).await?.info().await?.state.messages;
            Ok((info.num_pending == 0 && info.num_ack_pending == 0)
                .then_some((info.delivered.consumer_sequence, messages)))
        },
    )
    .await
}

/// One call a [`RecordingServer`] received.
#[derive(Clone, Debug)]
pub struct Call {
    pub key: String,
    pub body: serde_json::Value,
    pub started: std::time::Instant,
    pub finished: std::time::Instant,
}

/// A loopback HTTP endpoint (`POST <url>`) that records each call's `Idempotency-Key`, JSON body
/// and timing, answering `{"accepted": true}` after `delay`.
pub struct RecordingServer {
    pub url: String,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl RecordingServer {
    pub async fn start(delay: Duration) -> anyhow::Result<Self> {
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let state = calls.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let state = state.clone();
                    async move {
                        let started = std::time::Instant::now();
                        tokio::time::sleep(delay).await;
                        let key = headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                        state.lock().unwrap().push(Call {
                            key,
                            body,
                            started,
                            finished: std::time::Instant::now(),
                        });
                        axum::Json(serde_json::json!({"accepted": true}))
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, calls })
    }

    /// Every call so far: `(Idempotency-Key, body)`.
    pub fn calls(&self) -> Vec<(String, serde_json::Value)> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.key.clone(), c.body.clone()))
            .collect()
    }

    /// Every call so far, with timing, in the order they finished.
    pub fn timed_calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Calls per `Idempotency-Key`.
    pub fn counts(&self) -> HashMap<String, u32> {
        let mut counts = HashMap::new();
        for call in self.calls.lock().unwrap().iter() {
            *counts.entry(call.key.clone()).or_default() += 1;
        }
        counts
    }
}

/// `GET path` over plain HTTP/1.0: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP response: {response}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// One scrape of a `/metrics` endpoint (Prometheus text format), parsed: samples by name and
/// label set, and the names that have `# HELP`.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub help: std::collections::BTreeSet<String>,
}

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

impl Scrape {
    /// Parses the text format; a line that does not parse is an error naming it.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut scrape = Scrape::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split_whitespace().next().unwrap_or_default();
                scrape.help.insert(name.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let sample = parse_sample(line).with_context(|| format!("metrics line {line:?}"))?;
            scrape.samples.push(sample);
        }
        Ok(scrape)
    }

    /// The value of the sample with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: std::collections::BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// The value of the sample with exactly these labels, or 0 when there is none (a counter
    /// not counted yet).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Every sample of `name` whose labels include `labels`.
    pub fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> Vec<&'a Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
            })
            .collect()
    }
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| anyhow::anyhow!("no value"))?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = std::collections::BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars
                .next()
                .ok_or_else(|| anyhow::anyhow!("unclosed labels"))?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        anyhow::bail!("label {key} has no quoted value");
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().map(|(_, c)| c) {
                            Some('"') => break,
                            Some('\\') => match chars.next().map(|(_, c)| c) {
                                Some('n') => value.push('\n'),
                                Some(other) => value.push(other),
                                None => anyhow::bail!("unfinished escape"),
                            },
                            Some(other) => value.push(other),
                            None => anyhow::bail!("unclosed label value"),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        };
        rest = &inner[end + 1..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no value"))?;
    let value: f64 = value
        .parse()
        .with_context(|| format!("value {value:?} is not a number"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Scrapes `/metrics` at `addr`.
pub async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<Scrape> {
    let (status, body) = http_get(addr, "/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics answered {status}: {body}");
    Scrape::parse(&body)
}

#[test]
fn the_metrics_parser_reads_labels_escapes_and_special_values() {
    let scrape = Scrape::parse(
        "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"uo\\\\te\"} 3\n\
         b 2.5\nc_bucket{le=\"+Inf\"} 7\n",
    )
    .unwrap();
    assert_eq!(
        scrape.get("a_total", &[("y", "q\"uo\\te"), ("x", "1")]),
        Some(3.0)
    );
    assert_eq!(scrape.get("b", &[]), Some(2.5));
    assert_eq!(scrape.get("c_bucket", &[("le", "+Inf")]), Some(7.0));
    assert_eq!(
        scrape.count("a_total", &[("x", "1")]),
        0.0,
        "exact label sets only"
    );
    assert_eq!(scrape.matching("a_total", &[("x", "1")]).len(), 1);
    assert!(scrape.help.contains("a_total"));
}

/// Waits until KV bucket `bucket` exists (a service makes it at start).
pub async fn wait_bucket(js: &async_nats::jetstream::Context, bucket: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("KV bucket {bucket}"),
        Duration::from_secs(30),
        || async { Ok(js.get_key_value(bucket).await.ok().map(|_| ())) },
    )
    .await
}

/// A login role of the kind the README recommends for `sql` sources (LOGIN, SELECT on the tables
/// named, nothing else), with a unique name; dropped, with its grants, afterwards.
pub struct SourceRole {
    pub name: String,
    pub password: String,
    db: String,
    server: String,
}

impl SourceRole {
    /// Creates the role and grants it SELECT on `tables` of `db`.
    pub async fn create(db: &taskfactory_tests::TestDb, tables: &[&str]) -> anyhow::Result<Self> {
        let name = format!("tf_sources_{}", uuid::Uuid::new_v4().simple());
        let password = uuid::Uuid::new_v4().simple().to_string();
        let pool = db.pool().await?;
        for statement in [format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'")]
            .into_iter()
            .chain(
                tables
                    .iter()
                    .map(|table| format!("GRANT SELECT ON {table} TO {name}")),
            )
        {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&pool)
                .await?;
        }
        pool.close().await;
        let url = db.url();
        let (server, db_name) = url.rsplit_once('/').expect("a database URL");
        Ok(Self {
            name,
            password,
            db: db_name.to_owned(),
            server: server.to_owned(),
        })
    }

    /// The DSN logging in as this role.
    pub fn dsn(&self) -> String {
        let host = self
            .server
            .rsplit_once('@')
            .map(|(_, host)| host)
            .unwrap_or("127.0.0.1:5432");
        format!(
            "postgres://{}:{}@{host}/{}",
            self.name, self.password, self.db
        )
    }
}

impl Drop for SourceRole {
    fn drop(&mut self) {
        let (name, db, server) = (self.name.clone(), self.db.clone(), self.server.clone());
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&format!("{server}/{db}")).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP OWNED BY {name}")))
                        .execute(&pool)
                        .await;
                    pool.close().await;
                }
                if let Ok(pool) = sqlx::PgPool::connect(&format!("{server}/postgres")).await {
                    let _ = sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                    )
                    .bind(&name)
                    .execute(&pool)
                    .await;
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {name}")))
                        .execute(&pool)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A manual activity with one source (given as YAML flow) and a log task.
pub fn with_source(name: &str, source: &str) -> String {
    format!(
        "name: {name}\ntrigger: {{manual: {{}}}}\ncontext: [{source}]\ntasks: [{{name: t, type: log}}]\n"
    )
}

/// Previews an unsaved spec with `payload`; the answer, or the gRPC error.
pub async fn preview(
    admin: &mut Admin,
    yaml: &str,
    payload: serde_json::Value,
) -> Result<taskfactory_proto::v1::PreviewRunResponse, tonic::Status> {
    let spec = spec_from_yaml(yaml).expect("the test's YAML parses");
    admin
        .preview_run(taskfactory_proto::v1::PreviewRunRequest {
            spec: Some(spec),
            payload: Some(taskfactory_model::values::json_to_value(&payload)),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The error the preview reports for source `name` (empty when it resolved).
pub fn source_error(preview: &taskfactory_proto::v1::PreviewRunResponse, name: &str) -> String {
    preview
        .evaluation
        .iter()
        .find(|e| e.template == format!("context.{name}"))
        .map(|e| e.error.clone())
        .unwrap_or_default()
}

/// The installation's result-token key (tests that play an executor sign their results with it,
/// as an executor copies the token from its TaskInstance).
pub async fn result_key(env: &taskfactory_tests::TestEnv) -> anyhow::Result<Vec<u8>> {
    let pool = env.db.pool().await?;
    let key = sqlx::query_scalar("SELECT key FROM result_token_key WHERE id = 1")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    Ok(key)
}

/// A result for `task` as an executor (played by the test) reports it, with the token it was
/// handed ([`result_key`]).
pub fn played_result(
    key: &[u8],
    task: &taskfactory_proto::v1::Task,
    attempt: u32,
    status: taskfactory_proto::v1::TaskStatus,
) -> taskfactory_proto::v1::TaskResult {
    taskfactory_proto::v1::TaskResult {
        result_token: taskfactory_model::results::result_token(
            key,
            task.id.parse().expect("a task id"),
        ),
        task_id: task.id.clone(),
        run_id: task.run_id.clone(),
        activity_id: task.activity_id.clone(),
        attempt,
        status: status as i32,
        error: format!("attempt {attempt}"),
        executor: "played-by-the-test".to_owned(),
        r#type: task.r#type.clone(),
        ..Default::default()
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`), 0 if absent.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// The file descriptors a process has open.
pub fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Fires an activity by hand with an idempotency key; its run id.
pub async fn fire(admin: &mut Admin, activity: &str, key: &str) -> anyhow::Result<String> {
    Ok(admin
        .trigger_activity(taskfactory_proto::v1::TriggerActivityRequest {
            id: activity.to_owned(),
            idempotency_key: key.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .run_id)
}

/// Publishes through JetStream with a `Nats-Msg-Id` and returns the stored message's sequence.
pub async fn publish(
    js: &async_nats::jetstream::Context,
    subject: String,
    msg_id: &str,
    body: Vec<u8>,
) -> anyhow::Result<u64> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    Ok(js
        .publish_with_headers(subject, headers, body.into())
        .await?
        .await?
        .sequence)
}

/// A slow NATS service on `subjects` (a subscription, not a queue group): answers each question
/// `{"asked": <its subject>}` after `delay`, counting the questions it holds at once. Stops when
/// dropped.
pub struct SlowService {
    most: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowService {
    pub async fn start(
        nats: &async_nats::Client,
        subjects: &str,
        delay: Duration,
    ) -> anyhow::Result<Self> {
        use futures::StreamExt as _;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let mut questions = nats.subscribe(subjects.to_owned()).await?;
        // Subscribed on the server before a question can be asked.
        nats.flush().await?;
        let (holding, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let task = {
            let (nats, holding, most) = (nats.clone(), holding.clone(), most.clone());
            tokio::spawn(async move {
                while let Some(question) = questions.next().await {
                    let (nats, holding, most) = (nats.clone(), holding.clone(), most.clone());
                    tokio::spawn(async move {
                        let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        // The service takes its time: questions asked together overlap here.
                        tokio::time::sleep(delay).await;
                        holding.fetch_sub(1, Ordering::SeqCst);
                        if let Some(reply) = question.reply {
                            let answer = serde_json::json!({"asked": question.subject.as_str()});
                            let _ = nats
                                .publish(
                                    reply,
                                    serde_json::to_vec(&answer).unwrap_or_default().into(),
                                )
                                .await;
                        }
                    });
                }
            })
        };
        Ok(Self { most, task })
    }

    /// The most questions it has held at once.
    pub fn most_at_once(&self) -> usize {
        self.most.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SlowService {
    fn drop(&mut self) {
        self.task.abort();
    }
}
