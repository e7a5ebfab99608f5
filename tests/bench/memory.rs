//! `taskfactory-membench`: each service's memory under the attacks of issue 12, beside the limits
//! the shipped manifests give it (BENCHMARKS.md, "Memory under attack").
//!
//! ```text
//! just bench-memory                # = cargo build --release --bins, then this binary, release
//! just bench-memory --only events
//! ```
//!
//! Every scenario starts the release binaries as processes of their own (as a deployment runs
//! them) with the default limits, on a fresh `nats-server` and database from the test harness, and
//! reads `/proc/<pid>/status`: the resident set before the attack (`idle`), its high-water mark
//! (`VmHWM`, the peak), and the resident set when the attack is over and the service has had
//! `--settle-secs` to give memory back (`after`). Nothing is asserted; the tests bound the same
//! things at small scale.
//!
//! 1. **runs** — 8 runs of 10,000 tasks with 6 KB of params each, fired at once (80,000 tasks,
//!    480 MB of params); the executor runs them (`noop`).
//! 2. **specs** — 31 specs of 3.9 MB (refused), then specs of about 1 MiB in the shape that costs
//!    the most memory for its size (thousands of small task templates), created four at a time
//!    until the definitions total refuses one; then every page of `ListActivities`.
//! 3. **events** — 300 events of about 1 MB published to JetStream at once, in the shape that
//!    costs the most to parse (tens of thousands of small objects), and 100 signed webhook
//!    deliveries of about 1 MB at once; each event fires a run.
//! 4. **connections** — 19,000 idle webhook connections (this process's descriptor limit is
//!    20,000) and 1,000 that send their headers a byte a second, held past the header timeout.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use taskfactory_model::spec::spec_from_yaml;
use taskfactory_proto::v1::{CreateActivityRequest, ListActivitiesRequest, TriggerActivityRequest};
use taskfactory_tests::{EnvOptions, Running, Service, TestEnv, wait_for, workspace_root};
use taskfactory_trigger::webhook;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

#[derive(Parser, Debug, Clone)]
#[command(name = "taskfactory-membench")]
struct Args {
    /// Run only these scenarios (runs, specs, events, connections); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seconds a service is left alone after an attack before `after` is read.
    #[arg(long = "settle-secs", default_value_t = 20)]
    settle_secs: u64,
    /// Idle webhook connections opened by the connections scenario.
    #[arg(long, default_value_t = 19_000)]
    connections: usize,
    /// Runs fired at once by the runs scenario.
    #[arg(long, default_value_t = 8)]
    runs: usize,
    /// Events published at once by the events scenario.
    #[arg(long, default_value_t = 300)]
    events: usize,
}

const SECRET: &str = "membench-shared-secret-0123456789";

fn progress(line: &str) {
    eprintln!("[{}] {line}", chrono::Utc::now().format("%H:%M:%S"));
}

/// A field of `/proc/<pid>/status` in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// The memory limit the shipped manifest gives a service's container (`resources.limits.memory`).
fn manifest_limit(service: Service) -> String {
    let file = workspace_root().join("k8s").join(format!(
        "{}.yaml",
        service.binary_name().trim_start_matches("taskfactory-")
    ));
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.split("limits:")
        .nth(1)
        .and_then(|rest| {
            rest.lines()
                .find_map(|line| line.trim().strip_prefix("memory:"))
                .map(|value| value.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// One service process being watched.
struct Watched {
    service: Service,
    running: Running,
    pid: u32,
    idle_kib: u64,
}

impl Watched {
    fn start(env: &TestEnv, service: Service, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let running = env.spawn_process(service, extra)?;
        let pid = running.pid().context("a process")?;
        Ok(Self {
            service,
            running,
            pid,
            idle_kib: 0,
        })
    }

    fn mark_idle(&mut self) {
        self.idle_kib = status_kib(self.pid, "VmRSS");
    }
}

/// What a scenario measured.
struct Outcome {
    scenario: &'static str,
    what: String,
    rows: Vec<Row>,
    notes: Vec<String>,
}

struct Row {
    service: Service,
    idle_kib: u64,
    peak_kib: u64,
    after_kib: u64,
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

impl Outcome {
    fn table(&self) -> String {
        let mut out = format!("### {}: {}\n\n", self.scenario, self.what);
        out.push_str("| service | idle | peak (VmHWM) | after | manifest limit |\n|---|---:|---:|---:|---:|\n");
        for row in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | **{}** | {} | {} |",
                row.service.binary_name(),
                mib(row.idle_kib),
                mib(row.peak_kib),
                mib(row.after_kib),
                manifest_limit(row.service)
            );
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out.push('\n');
        out
    }
}

/// Reads the peaks, waits `settle`, reads what is left, and stops the services.
async fn finish(
    scenario: &'static str,
    what: String,
    watched: Vec<Watched>,
    settle: Duration,
    notes: Vec<String>,
) -> anyhow::Result<Outcome> {
    let peaks: Vec<u64> = watched.iter().map(|w| status_kib(w.pid, "VmHWM")).collect();
    progress(&format!("{scenario}: settling for {settle:?}"));
    tokio::time::sleep(settle).await;
    let mut rows = Vec::new();
    for (w, peak_kib) in watched.into_iter().zip(peaks) {
        rows.push(Row {
            service: w.service,
            idle_kib: w.idle_kib,
            peak_kib,
            after_kib: status_kib(w.pid, "VmRSS"),
        });
        w.running
            .stop()
            .await
            .context("a service did not stop cleanly")?;
    }
    Ok(Outcome {
        scenario,
        what,
        rows,
        notes,
    })
}

fn options() -> EnvOptions {
    EnvOptions {
        binaries: workspace_root().join("target/release"),
        ..Default::default()
    }
}

async fn ready(env: &TestEnv, watched: &mut [Watched]) -> anyhow::Result<()> {
    let services: Vec<Service> = watched.iter().map(|w| w.service).collect();
    env.wait_ready(&services).await?;
    // Let start-up allocations settle before the idle mark.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for w in watched.iter_mut() {
        w.mark_idle();
    }
    Ok(())
}

async fn create(env: &TestEnv, yaml: &str) -> anyhow::Result<()> {
    env.admin()
        .await?
        .create_activity(CreateActivityRequest {
            spec: Some(spec_from_yaml(yaml)?),
        })
        .await
        .context("CreateActivity")?;
    Ok(())
}

/// Waits until `runs` runs have ended; returns how many of them succeeded.
async fn runs_ended(env: &TestEnv, runs: i64, timeout: Duration) -> anyhow::Result<i64> {
    let pool = &env.db.pool().await?;
    let started = Instant::now();
    let last_report = &std::sync::Mutex::new(Instant::now());
    wait_for("the runs to end", timeout, move || async move {
        let (ended, succeeded, tasks_done): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM runs WHERE status NOT IN ('PENDING', 'RUNNING')), \
                    (SELECT count(*) FROM runs WHERE status = 'SUCCEEDED'), \
                    (SELECT count(*) FROM tasks WHERE status = 'SUCCEEDED')",
        )
        .fetch_one(pool)
        .await?;
        let mut last = last_report
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        if last.elapsed() > Duration::from_secs(15) {
            progress(&format!(
                "  {ended} of {runs} runs ended, {tasks_done} tasks succeeded ({:.0?})",
                started.elapsed()
            ));
            *last = Instant::now();
        }
        Ok((ended >= runs).then_some(succeeded))
    })
    .await
}

async fn runs_scenario(args: &Args) -> anyhow::Result<Outcome> {
    let env = TestEnv::new(options()).await?;
    let mut watched = vec![
        Watched::start(&env, Service::Trigger, &[])?,
        Watched::start(&env, Service::Orchestrator, &[])?,
        Watched::start(&env, Service::Executor, &[])?,
    ];
    ready(&env, &mut watched).await?;
    let blob = "x".repeat(6000);
    create(
        &env,
        &format!(
            "name: wide\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: noop, forEach: 'range(10000)', params: {{blob: '{blob}', n: '{{{{ item }}}}'}}}}]\n"
        ),
    )
    .await?;
    progress(&format!(
        "runs: firing {} runs of 10,000 tasks × 6 KB",
        args.runs
    ));
    let started = Instant::now();
    let mut fired = FuturesUnordered::new();
    for n in 0..args.runs {
        let mut admin = env.admin().await?;
        fired.push(async move {
            admin
                .trigger_activity(TriggerActivityRequest {
                    id: "wide".to_owned(),
                    idempotency_key: format!("run-{n}"),
                    ..Default::default()
                })
                .await
        });
    }
    while let Some(fire) = fired.next().await {
        fire.context("TriggerActivity")?;
    }
    let runs = i64::try_from(args.runs)?;
    let succeeded = runs_ended(&env, runs, Duration::from_secs(1800)).await?;
    let notes = vec![format!(
        "{succeeded} of {runs} runs succeeded, {} tasks, in {:.0?}",
        runs * 10_000,
        started.elapsed()
    )];
    finish(
        "runs",
        format!(
            "{} runs of 10,000 tasks with 6 KB params fired at once, run by a noop executor",
            args.runs
        ),
        watched,
        Duration::from_secs(args.settle_secs),
        notes,
    )
    .await
}

/// A spec of small task templates about `bytes` long as YAML (its JSON is a little shorter).
fn many_tasks(name: &str, bytes: usize) -> String {
    let mut yaml = format!("name: {name}\ntrigger: {{manual: {{}}}}\ntasks:\n");
    let mut i = 0;
    while yaml.len() < bytes {
        let _ = writeln!(
            yaml,
            "  - {{name: t{i}, type: log, params: {{a: x, b: y}}}}"
        );
        i += 1;
    }
    yaml
}

async fn specs_scenario(args: &Args) -> anyhow::Result<Outcome> {
    let env = TestEnv::new(options()).await?;
    let mut watched = vec![Watched::start(&env, Service::Trigger, &[])?];
    ready(&env, &mut watched).await?;
    let mut notes = Vec::new();

    progress("specs: 31 specs of 3.9 MB, four at a time");
    let mut refused = BTreeMap::<String, usize>::new();
    let huge: Vec<_> = (0..31)
        .map(|i| {
            spec_from_yaml(&format!(
                "name: huge-{i}\ntrigger: {{manual: {{}}}}\ntasks: [{{name: t, type: log, params: {{pad: {}}}}}]\n",
                "a".repeat(3_900_000)
            ))
        })
        .collect::<Result<_, _>>()?;
    let mut calls = futures::stream::iter(huge.into_iter().map(|spec| {
        let env = &env;
        async move {
            env.admin()
                .await?
                .create_activity(CreateActivityRequest { spec: Some(spec) })
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    }))
    .buffer_unordered(4);
    while let Some(call) = calls.next().await {
        let answer = match call {
            Ok(()) => "created".to_owned(),
            Err(error) => match error.downcast_ref::<tonic::Status>() {
                Some(status) => format!("{:?}", status.code()),
                None => return Err(error),
            },
        };
        *refused.entry(answer).or_default() += 1;
    }
    drop(calls);
    notes.push(format!("31 specs of 3.9 MB: {refused:?}"));

    progress("specs: ~1 MiB specs of small templates until the definitions total refuses one");
    let mut created = 0usize;
    let mut batch = 0usize;
    let stop = loop {
        let mut calls = FuturesUnordered::new();
        for i in 0..4 {
            let yaml = many_tasks(&format!("wide-{batch}-{i}"), 900_000);
            let env = &env;
            calls.push(async move { create(env, &yaml).await });
        }
        let mut stop = None;
        while let Some(call) = calls.next().await {
            match call {
                Ok(()) => created += 1,
                Err(error) => stop = Some(format!("{error:#}")),
            }
        }
        batch += 1;
        if let Some(stop) = stop {
            break stop;
        }
        if batch > 100 {
            bail!("no limit refused {created} specs of 1 MB");
        }
    };
    notes.push(format!(
        "{created} specs of about 1 MiB (some 15,000 task templates each) created, then: {}",
        stop.chars().take(240).collect::<String>()
    ));

    progress("specs: every page of ListActivities");
    let mut admin = env.admin().await?;
    let mut token = String::new();
    let mut listed = 0;
    loop {
        let page = admin
            .list_activities(ListActivitiesRequest {
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        listed += page.activities.len();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    notes.push(format!(
        "ListActivities: {listed} activities over every page"
    ));
    finish(
        "specs",
        "31 specs of 3.9 MB, then about 1 MiB specs of small templates up to the definitions total"
            .to_owned(),
        watched,
        Duration::from_secs(args.settle_secs),
        notes,
    )
    .await
}

/// An event of about `bytes` bytes of small objects: the JSON whose tree costs the most.
fn event_of(bytes: usize, i: usize) -> Vec<u8> {
    let mut body = format!("{{\"kind\":\"big\",\"i\":{i},\"items\":[");
    let mut n = 0;
    while body.len() + 40 < bytes {
        if n > 0 {
            body.push(',');
        }
        let _ = write!(body, "{{\"id\":{n},\"n\":\"abcdefgh\"}}");
        n += 1;
    }
    body.push_str("]}");
    body.into_bytes()
}

async fn post_webhook(addr: SocketAddr, delivery: &str, body: &[u8]) -> anyhow::Result<u16> {
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let signature = webhook::sign(SECRET.as_bytes(), &timestamp, delivery, body);
    let mut stream = TcpStream::connect(addr).await?;
    let head = format!(
        "POST /hooks/shop HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{}: {delivery}\r\n{}: {timestamp}\r\n{}: v1={signature}\r\n\r\n",
        body.len(),
        webhook::HEADER_DELIVERY,
        webhook::HEADER_TIMESTAMP,
        webhook::HEADER_SIGNATURE,
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| {
            format!(
                "no status in {:?}",
                text.chars().take(200).collect::<String>()
            )
        })
}

fn hooks_file(dir: &tempfile::TempDir) -> anyhow::Result<PathBuf> {
    let path = dir.path().join("webhooks.yaml");
    std::fs::write(
        &path,
        format!(
            "hooks: [{{name: shop, subject: events.mem.hook, secret: {SECRET}, maxBodyBytes: 1048576}}]\n"
        ),
    )?;
    Ok(path)
}

async fn events_scenario(args: &Args) -> anyhow::Result<Outcome> {
    let env = TestEnv::new(options()).await?;
    let dir = tempfile::tempdir()?;
    let hooks = hooks_file(&dir)?;
    let hooks = hooks.to_str().context("path")?;
    let mut watched = vec![
        Watched::start(&env, Service::Trigger, &[("TASKFACTORY_WEBHOOKS", hooks)])?,
        Watched::start(&env, Service::Orchestrator, &[])?,
        Watched::start(&env, Service::Executor, &[])?,
    ];
    ready(&env, &mut watched).await?;
    wait_for("the webhook gateway", Duration::from_secs(10), || async {
        Ok(TcpStream::connect(env.http_addr).await.ok())
    })
    .await?;
    create(
        &env,
        "name: big-events\ntrigger: {event: {subject: 'events.mem.*', filter: \"event.kind == 'big'\"}}\ntasks: [{name: t, type: noop, params: {n: '{{ event.items | length }}'}}]\n",
    )
    .await?;
    // Just under 1 MiB, the default largest event (a webhook's signature headers fit beside it).
    let size = 1_000_000;
    let hook_deliveries = 100;
    progress(&format!(
        "events: {} events of 1 MB to JetStream and {hook_deliveries} webhook deliveries of 1 MB, at once",
        args.events
    ));
    let started = Instant::now();
    let js = env.js().await?;
    let published = Arc::new(AtomicUsize::new(0));
    let nats = {
        let js = js.clone();
        let published = published.clone();
        let events = args.events;
        tokio::spawn(async move {
            let mut acks = futures::stream::iter((0..events).map(|i| {
                let js = js.clone();
                async move {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("big-{i}").as_str());
                    js.publish_with_headers(
                        format!("events.mem.e{i}"),
                        headers,
                        Bytes::from(event_of(size, i)),
                    )
                    .await?
                    .await?;
                    anyhow::Ok(())
                }
            }))
            .buffer_unordered(64);
            while let Some(ack) = acks.next().await {
                ack?;
                published.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };
    let addr = env.http_addr;
    let mut statuses = BTreeMap::<u16, usize>::new();
    let mut posts = futures::stream::iter((0..hook_deliveries).map(|i| async move {
        post_webhook(addr, &format!("delivery-{i}"), &event_of(size, 10_000 + i)).await
    }))
    .buffer_unordered(hook_deliveries);
    while let Some(status) = posts.next().await {
        *statuses.entry(status?).or_default() += 1;
    }
    drop(posts);
    nats.await??;
    let accepted = statuses.get(&202).copied().unwrap_or(0);
    let runs = i64::try_from(args.events + accepted)?;
    let succeeded = runs_ended(&env, runs, Duration::from_secs(1800)).await?;
    let notes = vec![
        format!(
            "{} events published to JetStream; webhook answers {statuses:?}",
            published.load(Ordering::Relaxed)
        ),
        format!(
            "{succeeded} of {runs} runs succeeded in {:.0?}",
            started.elapsed()
        ),
    ];
    finish(
        "events",
        format!(
            "{} events of 1 MB (some 37,000 small objects each) on JetStream and {hook_deliveries} signed webhook deliveries of 1 MB, at once; each fires a run",
            args.events
        ),
        watched,
        Duration::from_secs(args.settle_secs),
        notes,
    )
    .await
}

async fn connections_scenario(args: &Args) -> anyhow::Result<Outcome> {
    let env = TestEnv::new(options()).await?;
    let dir = tempfile::tempdir()?;
    let hooks = hooks_file(&dir)?;
    let mut watched = vec![Watched::start(
        &env,
        Service::Trigger,
        &[("TASKFACTORY_WEBHOOKS", hooks.to_str().context("path")?)],
    )?];
    ready(&env, &mut watched).await?;
    let pid = watched[0].pid;
    wait_for("the webhook gateway", Duration::from_secs(10), || async {
        Ok(TcpStream::connect(env.http_addr).await.ok())
    })
    .await?;
    let fds_idle = open_fds(pid);
    let addr = env.http_addr;
    let slow = 1000;
    progress(&format!(
        "connections: {} idle and {slow} slow-header connections",
        args.connections
    ));
    let started = Instant::now();
    let connect = |i: usize| async move {
        let stream = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await;
        (i, stream)
    };
    // Slow senders first, so they are among those served: one byte of a head a second.
    let mut held = Vec::new();
    let mut attempts =
        futures::stream::iter((0..args.connections + slow).map(connect)).buffer_unordered(512);
    let mut slow_streams = Vec::new();
    let mut failed = 0usize;
    while let Some((i, stream)) = attempts.next().await {
        match stream {
            Ok(Ok(stream)) if i < slow => slow_streams.push(stream),
            Ok(Ok(stream)) => held.push(stream),
            _ => failed += 1,
        }
    }
    drop(attempts);
    let established = held.len() + slow_streams.len();
    progress(&format!(
        "  {established} connected ({failed} not within 3 s) in {:.0?}",
        started.elapsed()
    ));
    let slow_writer = tokio::spawn(async move {
        let head = b"POST /hooks/shop HTTP/1.1\r\nHost: x\r\n";
        let mut open = slow_streams;
        for byte in head.iter().cycle().take(40) {
            let mut still = Vec::new();
            for mut stream in open {
                if stream.write_all(&[*byte]).await.is_ok() {
                    still.push(stream);
                }
            }
            open = still;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        open.len()
    });
    // Hold them past the header timeout (10 s), watching descriptors and memory.
    let mut fds_peak = 0;
    for _ in 0..60 {
        fds_peak = fds_peak.max(open_fds(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let slow_left = slow_writer.await?;
    // How many of the held connections the gateway closed (a read returns at once).
    let mut closed = 0usize;
    for stream in &mut held {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    let fds_end = open_fds(pid);
    let notes = vec![
        format!(
            "{established} connections established by the kernel ({failed} connects not answered within 3 s: beyond the accept queue)"
        ),
        format!(
            "trigger descriptors: {fds_idle} idle, {fds_peak} at most while held, {fds_end} after 30 s (cap 1,024 connections)"
        ),
        format!(
            "after 30 s the gateway had closed {closed} of {} idle connections; {slow_left} of {slow} slow senders still open after 40 s",
            held.len()
        ),
    ];
    drop(held);
    finish(
        "connections",
        format!(
            "{} idle webhook connections and {slow} sending their headers a byte a second, held 30 s",
            args.connections
        ),
        watched,
        Duration::from_secs(args.settle_secs),
        notes,
    )
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry =
        taskfactory_runtime::telemetry::install(taskfactory_runtime::telemetry::Settings {
            service: "taskfactory-membench",
            format: Default::default(),
            default_log_filter: "warn",
            logs_to_stderr: true,
            traces: false,
            otlp_endpoint: None,
        });
    for service in [Service::Trigger, Service::Orchestrator, Service::Executor] {
        let binary = workspace_root()
            .join("target/release")
            .join(service.binary_name());
        if !binary.exists() {
            bail!(
                "{} not found: `cargo build --release --bins` first (just bench-memory does)",
                binary.display()
            );
        }
    }
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut report = String::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let _ = writeln!(
        report,
        "taskfactory-membench, release binaries, load average at start: {}\n",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if wanted("runs") {
        report.push_str(&runs_scenario(&args).await.context("runs")?.table());
    }
    if wanted("specs") {
        report.push_str(&specs_scenario(&args).await.context("specs")?.table());
    }
    if wanted("events") {
        report.push_str(&events_scenario(&args).await.context("events")?.table());
    }
    if wanted("connections") {
        report.push_str(
            &connections_scenario(&args)
                .await
                .context("connections")?
                .table(),
        );
    }
    print!("{report}");
    Ok(())
}
