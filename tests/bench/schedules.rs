//! `taskfactory-schedbench`: many schedules in one trigger — how fast they are created, how long
//! the trigger takes to load them, how much memory it takes, and how late their fires are under a
//! sustained rate (BENCHMARKS.md, issue 13's schedule goals).
//!
//! ```text
//! just bench-schedules --schedules 10000 --rate 2000
//! just bench-schedules --schedules 100000 --rate 2000 --duration-secs 300
//! ```
//!
//! The release binaries run as processes of their own, on a fresh `nats-server` and database
//! from the test harness. By default only the trigger runs (the fires' runs wait in
//! `FACTORY_TRIGGERS`), with its reconciler slowed to once an hour (it would republish every fire
//! whose run does not appear): the figures are the scheduler's own. `--with-runs` starts the
//! orchestrator and a noop executor too, and leaves the reconciler at its default.
//!
//! 1. **create** — `--schedules` activities, each with a schedule whose fires, all schedules
//!    together, come at `--rate` per second, evenly (schedule `i` fires every `schedules / rate`
//!    seconds at its own offset; a period that does not divide a minute is written as several
//!    cron expressions over a cycle of minutes). Created `--create-concurrency` at a time;
//!    the CreateActivity rate is reported per tenth of them, against the number present.
//! 2. **load** — the trigger is stopped and started again: the time until its admin API answers,
//!    and until its scheduler has every schedule in hand (`taskfactory_schedules_active`).
//! 3. **sustain** — for `--duration-secs`, every occurrence in the window is looked up: fired
//!    (lateness = the fire's publish minus the instant it was due: its `scheduledFor` plus its
//!    jitter, if `--jitter-secs` gives one; p50 / p99 / max) or not (missed: a
//!    misfire decision, or nothing at all).
//!
//! Peak and final RSS of each service, Postgres transactions per fire and the load average are
//! reported. Nothing is asserted.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use clap::Parser;
use futures::StreamExt as _;
use taskfactory_model::spec::spec_from_yaml;
use taskfactory_proto::v1::CreateActivityRequest;
use taskfactory_tests::{EnvOptions, Running, Service, TestEnv, wait_for, workspace_root};

#[derive(Parser, Debug, Clone)]
#[command(name = "taskfactory-schedbench")]
struct Args {
    /// Schedules (activities) created.
    #[arg(long, default_value_t = 10_000)]
    schedules: usize,
    /// Fires per second, all schedules together.
    #[arg(long, default_value_t = 2000)]
    rate: usize,
    /// Seconds the sustained rate is observed.
    #[arg(long = "duration-secs", default_value_t = 60)]
    duration_secs: u64,
    /// Each schedule's jitter in seconds (0: none). Cron counts whole seconds, so without jitter
    /// every fire of a second comes due at its first instant, a burst; a jitter of the period
    /// spreads them over it. Lateness is measured from the instant a fire is due (its
    /// occurrence plus its deterministic jitter), so jitter itself is never counted as late.
    #[arg(long = "jitter-secs", default_value_t = 0)]
    jitter_secs: u64,
    /// CreateActivity calls in flight at once.
    #[arg(long = "create-concurrency", default_value_t = 16)]
    create_concurrency: usize,
    /// Also run the orchestrator and a noop executor (the fires' runs are made and run).
    #[arg(long = "with-runs")]
    with_runs: bool,
    /// Print the report as JSON too.
    #[arg(long)]
    json: bool,
    /// Where the service binaries are (relative to the workspace root).
    #[arg(long, default_value = "target/release")]
    binaries: String,
}

fn progress(line: &str) {
    eprintln!("[{}] {line}", Utc::now().format("%H:%M:%S"));
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

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The cron expressions (seconds first) of schedule `index` of a set whose fires come every
/// `period` seconds each, spread evenly over the period by index.
fn cron_for(index: usize, period: u64) -> anyhow::Result<Vec<String>> {
    if period == 0 {
        bail!("a period of zero seconds");
    }
    let offset = index as u64 % period;
    // The cycle after which the pattern repeats on the minute grid.
    let cycle = lcm(period, 60);
    let minutes = cycle / 60;
    if 60 % minutes != 0 || cycle / period > 60 {
        bail!(
            "a period of {period} s cannot be written evenly in cron; choose --schedules / --rate \
             dividing 60, or a period whose cycle with the minute divides an hour"
        );
    }
    if minutes == 1 {
        return Ok(vec![format!("{offset}/{period} * * * * *")]);
    }
    let mut crons = Vec::new();
    let mut at = offset;
    while at < cycle {
        let (minute, second) = (at / 60, at % 60);
        crons.push(format!("{second} {minute}/{minutes} * * * *"));
        at += period;
    }
    Ok(crons)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u64, b: u64) -> u64 {
    a / gcd(a, b) * b
}

fn spec(index: usize, period: u64, jitter_secs: u64) -> anyhow::Result<String> {
    let crons = cron_for(index, period)?
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(format!(
        "name: s{index}\ntrigger: {{schedule: {{cron: [{crons}], timezone: UTC, misfire: MISFIRE_SKIP{jitter}}}}}\ntasks: [{{name: t, type: noop}}]\n",
        jitter = if jitter_secs == 0 {
            String::new()
        } else {
            format!(", jitter: {jitter_secs}s")
        }
    ))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct CreateStep {
    present: usize,
    per_sec: f64,
}

struct Report {
    args: Args,
    period: u64,
    load_before: String,
    creates: Vec<CreateStep>,
    create_total: Duration,
    restart_admin: Duration,
    restart_all_decided: Option<Duration>,
    window: (DateTime<Utc>, DateTime<Utc>),
    expected: u64,
    fired: u64,
    misfired: u64,
    undecided: u64,
    lateness_ms: Vec<f64>,
    /// Of the lateness, the part before the fire was recorded (`fired_at` minus due: 0 for a fire
    /// recorded ahead of its instant, whose `fired_at` is that instant).
    wake_ms: Vec<f64>,
    commits_per_fire: f64,
    rss: Vec<(Service, u64, u64)>,
    load_after: String,
}

impl Report {
    fn markdown(&self) -> String {
        let a = &self.args;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### `just bench-schedules --schedules {} --rate {} --duration-secs {}{}{}`\n",
            a.schedules,
            a.rate,
            a.duration_secs,
            if a.jitter_secs > 0 {
                format!(" --jitter-secs {}", a.jitter_secs)
            } else {
                String::new()
            },
            if a.with_runs { " --with-runs" } else { "" }
        );
        let _ = writeln!(
            out,
            "Each schedule fires every {} s; load average {} before, {} after.\n",
            self.period, self.load_before, self.load_after
        );
        out.push_str("| activities present | CreateActivity/s |\n|---:|---:|\n");
        for step in &self.creates {
            let _ = writeln!(out, "| {} | {:.0} |", step.present, step.per_sec);
        }
        let _ = writeln!(
            out,
            "\nAll {} created in {:.1} s.\n",
            a.schedules,
            self.create_total.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "Restart: admin API answering after {:.1} s; every schedule in the scheduler's hands after {}.\n",
            self.restart_admin.as_secs_f64(),
            self.restart_all_decided.map_or(
                "(not within the time allowed)".to_owned(),
                |d| format!("{:.1} s", d.as_secs_f64())
            )
        );
        let mut sorted = self.lateness_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let seconds = (self.window.1 - self.window.0).num_milliseconds() as f64 / 1000.0;
        let _ = writeln!(
            out,
            "| window | occurrences due | fired | fires/s | misfired | undecided | lateness p50 | p99 | max | Postgres commits per fire |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n| {:.0} s | {} | {} | {:.0} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} |\n",
            seconds,
            self.expected,
            self.fired,
            self.fired as f64 / seconds,
            self.misfired,
            self.undecided,
            percentile(&sorted, 50.0),
            percentile(&sorted, 99.0),
            sorted.last().copied().unwrap_or(f64::NAN),
            self.commits_per_fire
        );
        let mut wake = self.wake_ms.clone();
        wake.sort_by(f64::total_cmp);
        let ahead = wake.iter().filter(|ms| **ms <= 0.0).count();
        let over = |limit: f64| sorted.iter().filter(|ms| **ms > limit).count();
        let _ = writeln!(
            out,
            "Recorded ahead of their instant (`fired_at` = due): {ahead} of {} fires. Of the lateness, before the fire was recorded (`fired_at` minus due): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; the rest is recording (if not ahead) and publishing. Later than 10 ms: {} fires; later than 100 ms: {}.\n",
            wake.len(),
            percentile(&wake, 50.0),
            percentile(&wake, 99.0),
            wake.last().copied().unwrap_or(f64::NAN),
            over(10.0),
            over(100.0),
        );
        out.push_str("| service | peak RSS (VmHWM) | RSS at the end |\n|---|---:|---:|\n");
        for (service, peak, end) in &self.rss {
            let _ = writeln!(
                out,
                "| {} | {:.0} MiB | {:.0} MiB |",
                service.binary_name(),
                *peak as f64 / 1024.0,
                *end as f64 / 1024.0
            );
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let mut sorted = self.lateness_ms.clone();
        sorted.sort_by(f64::total_cmp);
        serde_json::json!({
            "schedules": self.args.schedules,
            "rate": self.args.rate,
            "period_secs": self.period,
            "jitter_secs": self.args.jitter_secs,
            "with_runs": self.args.with_runs,
            "create_per_sec": self.creates.iter().map(|s| serde_json::json!({"present": s.present, "per_sec": s.per_sec})).collect::<Vec<_>>(),
            "create_total_secs": self.create_total.as_secs_f64(),
            "restart_admin_secs": self.restart_admin.as_secs_f64(),
            "restart_all_decided_secs": self.restart_all_decided.map(|d| d.as_secs_f64()),
            "expected": self.expected,
            "fired": self.fired,
            "misfired": self.misfired,
            "undecided": self.undecided,
            "lateness_ms": {"p50": percentile(&sorted, 50.0), "p99": percentile(&sorted, 99.0), "max": sorted.last()},
            "commits_per_fire": self.commits_per_fire,
            "rss_kib": self.rss.iter().map(|(s, peak, end)| serde_json::json!({"service": s.binary_name(), "peak": peak, "end": end})).collect::<Vec<_>>(),
            "load_before": self.load_before,
            "load_after": self.load_after,
        })
    }
}

/// The trigger's `taskfactory_schedules_active` gauge (`None`: the trigger has no such gauge).
async fn active_schedules(addr: &str) -> anyhow::Result<Option<usize>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    if !response.starts_with("HTTP/1.1 200") && !response.starts_with("HTTP/1.0 200") {
        bail!("/metrics did not answer 200");
    }
    Ok(response
        .lines()
        .find_map(|line| line.strip_prefix("taskfactory_schedules_active "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as usize))
}

async fn commits(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.rate == 0 || args.schedules == 0 {
        bail!("--schedules and --rate must be positive");
    }
    if args.schedules % args.rate != 0 {
        bail!(
            "--schedules must be a multiple of --rate (each schedule fires every schedules/rate seconds)"
        );
    }
    let period = (args.schedules / args.rate) as u64;
    cron_for(0, period)?;
    let load_before = load_average();
    let env = TestEnv::new(EnvOptions {
        binaries: workspace_root().join(&args.binaries),
        ..Default::default()
    })
    .await?;
    let pool = env.db.pool().await?;
    let metrics_addr = format!("127.0.0.1:{}", taskfactory_tests::free_port());
    // Room for every schedule (the default limit is 10,000 live activities).
    let max_activities = args.schedules.max(10_000).to_string();
    let mut trigger_env = vec![
        ("TASKFACTORY_METRICS_ADDR", metrics_addr.as_str()),
        ("TASKFACTORY_MAX_ACTIVITIES", max_activities.as_str()),
    ];
    if !args.with_runs {
        trigger_env.push(("TASKFACTORY_RECONCILE_INTERVAL", "1h"));
    }
    let trigger_env = trigger_env.as_slice();
    let mut trigger = env.spawn_process(Service::Trigger, trigger_env)?;
    let mut others: Vec<(Service, Running)> = Vec::new();
    if args.with_runs {
        for service in [Service::Orchestrator, Service::Executor] {
            others.push((service, env.spawn_process(service, &[])?));
        }
    }
    let mut services = vec![Service::Trigger];
    services.extend(others.iter().map(|(s, _)| *s));
    env.wait_ready(&services).await?;

    // 1. create
    progress(&format!(
        "creating {} schedules ({} fires/s, each every {period} s)",
        args.schedules, args.rate
    ));
    let step = (args.schedules / 10).max(1);
    let mut creates = Vec::new();
    let started = Instant::now();
    let mut next = 0;
    while next < args.schedules {
        let upto = (next + step).min(args.schedules);
        let began = Instant::now();
        let mut admins = Vec::new();
        for _ in 0..args.create_concurrency.max(1) {
            admins.push(env.admin().await?);
        }
        let admins = Arc::new(tokio::sync::Mutex::new(admins));
        let mut calls = futures::stream::iter(next..upto)
            .map(|index| {
                let admins = admins.clone();
                async move {
                    let spec = spec_from_yaml(&spec(index, period, args.jitter_secs)?)?;
                    let mut admin = admins.lock().await.pop().context("an admin client")?;
                    let created = admin
                        .create_activity(CreateActivityRequest { spec: Some(spec) })
                        .await
                        .with_context(|| format!("CreateActivity s{index}"));
                    admins.lock().await.push(admin);
                    created.map(drop)
                }
            })
            .buffer_unordered(args.create_concurrency.max(1));
        while let Some(created) = calls.next().await {
            created?;
        }
        let per_sec = (upto - next) as f64 / began.elapsed().as_secs_f64();
        progress(&format!("  {upto} present: {per_sec:.0} CreateActivity/s"));
        creates.push(CreateStep {
            present: upto,
            per_sec,
        });
        next = upto;
    }
    let create_total = started.elapsed();

    // 2. load: the trigger starts again over all of them.
    progress("restarting the trigger");
    trigger.stop().await.context("the trigger did not stop")?;
    let began = Instant::now();
    trigger = env.spawn_process(Service::Trigger, trigger_env)?;
    wait_for("the admin API", Duration::from_secs(120), || async {
        Ok(env.admin().await.ok())
    })
    .await?;
    let restart_admin = began.elapsed();
    let schedules = i64::try_from(args.schedules)?;
    let restart_all_decided = wait_for(
        "every schedule in the scheduler's hands after the restart",
        Duration::from_secs(300),
        || async {
            Ok(match active_schedules(&metrics_addr).await {
                // Not set yet, or a release without the gauge (not measured, after a minute).
                Ok(None) => (began.elapsed() > Duration::from_secs(60)).then_some(None),
                Ok(Some(active)) => (active >= args.schedules).then(|| Some(began.elapsed())),
                Err(_) => None,
            })
        },
    )
    .await
    .ok()
    .flatten();
    progress(&format!(
        "restarted: admin API after {restart_admin:.1?}, all schedules in hand after {restart_all_decided:.1?}"
    ));

    // 3. sustain: a window of whole periods, starting on a whole second after things settled.
    let settle = Duration::from_secs(5);
    tokio::time::sleep(settle).await;
    let periods = args.duration_secs.div_ceil(period).max(1);
    let start = Utc::now() + chrono::Duration::seconds(2);
    let start = start - chrono::Duration::nanoseconds(i64::from(start.timestamp_subsec_nanos()));
    let end = start + chrono::Duration::seconds(i64::try_from(periods * period)?);
    let commits_before = commits(&pool).await?;
    progress(&format!("observing {start} .. {end}"));
    let trigger_pid = trigger.pid().context("the trigger's pid")?;
    // The last occurrences of the window are due up to a jitter after it.
    let wait = (end - Utc::now()).to_std().unwrap_or_default()
        + Duration::from_secs(args.jitter_secs)
        + Duration::from_secs(15);
    tokio::time::sleep(wait).await;
    let commits_after = commits(&pool).await?;
    let expected = u64::try_from(schedules)? * periods;
    // From the instant each fire was due: its occurrence plus its jitter, the same
    // deterministic delay the trigger computes.
    // Activity, scheduled for, fired at, published at.
    type Published = (uuid::Uuid, DateTime<Utc>, DateTime<Utc>, DateTime<Utc>);
    let published: Vec<Published> = sqlx::query_as(
        "SELECT activity_id, scheduled_for, fired_at, published_at FROM fires \
         WHERE scheduled_for >= $1 AND scheduled_for < $2 AND published_at IS NOT NULL",
    )
    .bind(start)
    .bind(end)
    .fetch_all(&pool)
    .await?;
    let jitter = Duration::from_secs(args.jitter_secs);
    let period_span = chrono::Duration::seconds(i64::try_from(period)?);
    let ms = |d: chrono::Duration| d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0;
    let mut wake_ms = Vec::with_capacity(published.len());
    let lateness_ms: Vec<f64> = published
        .iter()
        .map(|(activity, scheduled_for, fired_at, published_at)| {
            let delay = taskfactory_model::schedule::jitter_delay(
                &activity.to_string(),
                *scheduled_for,
                jitter,
                Some(*scheduled_for + period_span),
            );
            let due = *scheduled_for + chrono::Duration::from_std(delay).unwrap_or_default();
            wake_ms.push(ms(*fired_at - due));
            ms(*published_at - due)
        })
        .collect();
    let (fired, misfired): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE decision = 'FIRED'), \
                coalesce(sum(coalesce(occurrences, 1)) FILTER (WHERE decision <> 'FIRED'), 0)::int8 \
         FROM occurrences WHERE scheduled_for >= $1 AND scheduled_for < $2",
    )
    .bind(start)
    .bind(end)
    .fetch_one(&pool)
    .await?;
    let fires_in_window: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fires WHERE scheduled_for >= $1 AND scheduled_for < $2",
    )
    .bind(start)
    .bind(end)
    .fetch_one(&pool)
    .await?;
    let fired = u64::try_from(fires_in_window.max(fired))?;
    let misfired = u64::try_from(misfired)?;
    let undecided = expected.saturating_sub(fired + misfired);
    let mut rss = vec![(
        Service::Trigger,
        status_kib(trigger_pid, "VmHWM"),
        status_kib(trigger_pid, "VmRSS"),
    )];
    for (service, running) in &others {
        if let Some(pid) = running.pid() {
            rss.push((*service, status_kib(pid, "VmHWM"), status_kib(pid, "VmRSS")));
        }
    }
    let report = Report {
        args: args.clone(),
        period,
        load_before,
        creates,
        create_total,
        restart_admin,
        restart_all_decided,
        window: (start, end),
        expected,
        fired,
        misfired,
        undecided,
        lateness_ms,
        wake_ms,
        commits_per_fire: (commits_after - commits_before) as f64 / fired.max(1) as f64,
        rss,
        load_after: load_average(),
    };
    trigger.stop().await.ok();
    for (_, running) in others {
        running.stop().await.ok();
    }
    println!("{}", report.markdown());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_spreads_fires_evenly() {
        assert_eq!(cron_for(3, 5).unwrap(), ["3/5 * * * * *"]);
        // 50 s: a cycle of 5 minutes, 6 fires.
        let crons = cron_for(7, 50).unwrap();
        assert_eq!(
            crons,
            [
                "7 0/5 * * * *",
                "57 0/5 * * * *",
                "47 1/5 * * * *",
                "37 2/5 * * * *",
                "27 3/5 * * * *",
                "17 4/5 * * * *"
            ]
        );
        assert!(cron_for(0, 7).is_err());
    }
}
