//! The end-to-end test harness: real infrastructure, nothing mocked.
//!
//! - [`NatsServer`]: a fresh pinned `nats-server` (installed by `scripts/tools.sh nats`) on a free
//!   loopback port with its own store directory; killed on `Drop`, restartable. By default with
//!   the shipped users and permissions ([`NatsUsers`]): each service connects as its own user,
//!   test clients as `admin`.
//! - [`TestDb`]: a fresh Postgres database on the machine's server (`TEST_DATABASE_URL`, default
//!   `postgres://postgres@127.0.0.1:5432`), dropped afterwards.
//! - [`TestEnv`]: both, plus the three services — in-process (`run(config, shutdown)`) or as real
//!   processes when a test must kill or signal them.
//! - [`wait_for`]: poll with a deadline; tests never sleep to wait.
//! - [`auth`]: the admin API's tokens; every environment requires them unless a test turns
//!   [`EnvOptions::admin_auth`] off, and [`TestEnv::admin`] is an admin.

pub mod auth;
pub mod nats_users;
pub mod otlp;
pub mod tls;

pub use nats_users::NatsUsers;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use taskfactory_runtime::clock::ClockHandle;
use taskfactory_trigger::auth::client::{AdminClient, Credentials};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The workspace root (where `.tools/` and `target/` live).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Installs a global log subscriber once (`RUST_LOG` to see service logs in a failing test).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Polls `check` until it yields `Some`, or fails after `timeout` with `what` in the message.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(error) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {error:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `nats-server` of our own.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    config: PathBuf,
    tls: bool,
    users: Option<NatsUsers>,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    fn binary() -> PathBuf {
        if let Ok(path) = std::env::var("TASKFACTORY_NATS_SERVER") {
            return PathBuf::from(path);
        }
        workspace_root().join(".tools/bin/nats-server")
    }

    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None, None)
    }

    /// A server that speaks only TLS and verifies its clients' certificates.
    pub fn start_tls(tls: &tls::TlsFiles) -> anyhow::Result<Self> {
        Self::start_with(Some(tls), None)
    }

    /// A server with more configuration (users and permissions, say) after the defaults.
    pub fn start_with_config(extra: &str) -> anyhow::Result<Self> {
        Self::start_node(None, None, free_port(), extra)
    }

    /// A server that speaks only TLS (when `tls` is given) and verifies its clients'
    /// certificates, with the shipped users and permissions (when `users` is given).
    pub fn start_with(
        tls: Option<&tls::TlsFiles>,
        users: Option<&NatsUsers>,
    ) -> anyhow::Result<Self> {
        Self::start_node(tls, users, free_port(), "")
    }

    /// A JetStream cluster of `size` servers on loopback (routes between all of them); the first
    /// one answers once the cluster has elected its JetStream meta leader.
    pub async fn start_cluster(
        size: usize,
        users: Option<&NatsUsers>,
    ) -> anyhow::Result<Vec<Self>> {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::with_capacity(size);
        for (i, (client, cluster)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .filter(|(_, other)| other != cluster)
                .map(|(_, other)| format!("\"nats-route://127.0.0.1:{other}\""))
                .collect();
            let extra = format!(
                "server_name: n{i}\ncluster {{\n  name: taskfactory-test\n  listen: 127.0.0.1:{cluster}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            );
            nodes.push(Self::start_node(None, users, *client, &extra)?);
        }
        let url = nodes[0].url();
        wait_for(
            "the NATS cluster's JetStream",
            Duration::from_secs(30),
            || {
                let url = url.clone();
                let options = match users {
                    Some(users) => {
                        users.connect_options("admin", async_nats::ConnectOptions::new())
                    }
                    None => async_nats::ConnectOptions::new(),
                };
                async move {
                    let Ok(client) = options.connect(url).await else {
                        return Ok(None);
                    };
                    let ready = async_nats::jetstream::new(client)
                        .query_account()
                        .await
                        .is_ok();
                    Ok(ready.then_some(()))
                }
            },
        )
        .await?;
        Ok(nodes)
    }

    fn start_node(
        tls: Option<&tls::TlsFiles>,
        users: Option<&NatsUsers>,
        port: u16,
        extra: &str,
    ) -> anyhow::Result<Self> {
        let binary = Self::binary();
        if !binary.exists() {
            bail!(
                "{} not found: run `scripts/tools.sh nats` (just test does) or set TASKFACTORY_NATS_SERVER",
                binary.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("nats.conf");
        let authorization = match users {
            Some(users) => users.install(dir.path())?,
            None => String::new(),
        };
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: \"{}\"\n}}\n{}{authorization}{extra}",
                dir.path().join("store").display(),
                tls.map(tls::TlsFiles::server_config).unwrap_or_default()
            ),
        )?;
        let mut server = Self {
            child: None,
            port,
            config,
            tls: tls.is_some(),
            users: users.cloned(),
            _dir: dir,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let passwords = self.users.iter().flat_map(NatsUsers::server_env);
        let child = Command::new(Self::binary())
            .arg("-c")
            .arg(&self.config)
            .envs(passwords)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("nats-server did not listen on {} within 10s", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same port with the same store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh database, dropped afterwards.
pub struct TestDb {
    pub name: String,
    server_url: String,
}

impl TestDb {
    pub async fn create() -> anyhow::Result<Self> {
        let server_url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let name = format!("taskfactory_test_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&format!("{server_url}/postgres"))
            .await
            .with_context(|| {
                format!("connecting to the test Postgres at {server_url} (set TEST_DATABASE_URL)")
            })?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        Ok(Self { name, server_url })
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server_url, self.name)
    }

    pub async fn pool(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(sqlx::PgPool::connect(&self.url()).await?)
    }

    /// A pool made and migrated the way every service makes its own (`runtime::db`).
    pub async fn migrated_pool(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(taskfactory_runtime::db::connect_and_migrate(
            &taskfactory_runtime::config::DatabaseArgs::new(self.url()),
            Duration::from_secs(10),
        )
        .await?)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let url = format!("{}/postgres", self.server_url);
        let name = self.name.clone();
        // Drop runs outside any runtime guarantees: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(admin) = sqlx::PgPool::connect(&url).await {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .execute(&admin)
                        .await;
                    }
                });
            }
        })
        .join();
    }
}

/// Which service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Trigger,
    Orchestrator,
    Executor,
}

impl Service {
    /// Its user in the shipped NATS permissions.
    pub fn nats_user(self) -> &'static str {
        match self {
            Service::Trigger => "trigger",
            Service::Orchestrator => "orchestrator",
            Service::Executor => "executor",
        }
    }

    pub fn binary_name(self) -> &'static str {
        match self {
            Service::Trigger => "taskfactory-trigger",
            Service::Orchestrator => "taskfactory-orchestrator",
            Service::Executor => "taskfactory-executor",
        }
    }
}

/// A running service. A service process still running when its handle is dropped is killed, so
/// a failing test leaves nothing behind.
pub enum Running {
    InProcess {
        shutdown: CancellationToken,
        task: JoinHandle<anyhow::Result<()>>,
    },
    Process(ChildGuard),
}

/// Kills its process on drop.
pub struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Running {
    /// Stops it gracefully and waits; returns whether it exited cleanly.
    pub async fn stop(self) -> anyhow::Result<()> {
        match self {
            Running::InProcess { shutdown, task } => {
                shutdown.cancel();
                tokio::time::timeout(Duration::from_secs(30), task)
                    .await
                    .context("service did not stop within 30s")??
            }
            Running::Process(mut guard) => {
                let child = guard.0.as_mut().expect("the child is present");
                signal(child, "TERM")?;
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    if let Some(status) = child.try_wait()? {
                        if !status.success() {
                            bail!("service exited with {status}");
                        }
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        bail!("service did not exit within 30s of SIGTERM");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// The process id (processes only).
    pub fn pid(&self) -> Option<u32> {
        match self {
            Running::Process(guard) => guard.0.as_ref().map(Child::id),
            Running::InProcess { .. } => None,
        }
    }

    /// SIGKILL (processes only).
    pub fn kill(self) {
        if let Running::Process(guard) = self {
            drop(guard);
        } else if let Running::InProcess { shutdown, task } = self {
            shutdown.cancel();
            task.abort();
        }
    }
}

/// Sends a signal to a child process (`TERM`, `INT`, `KILL`).
pub fn signal(child: &Child, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {} failed", child.id());
    }
    Ok(())
}

/// Knobs a test may turn.
#[derive(Clone, Debug)]
pub struct EnvOptions {
    /// Orchestrator: how long a trigger may be in hand without a progress ack.
    pub orchestrator_ack_wait: Duration,
    /// Executor: the egress allow list (tests talk to loopback servers).
    pub egress_allow: String,
    /// Executor (in-process): how long a task may run without a heartbeat before redelivery.
    pub executor_ack_wait: Duration,
    /// Executor (in-process): tasks of one type run at once (its `--concurrency`).
    pub executor_concurrency: usize,
    /// Trigger: the largest event body taken in.
    pub max_event_bytes: usize,
    /// Trigger (in-process): the scheduler's clock; tests that drive time pass a manual one.
    pub clock: ClockHandle,
    /// Trigger: how long the scheduling lease lives without renewal.
    pub lease_ttl: Duration,
    /// Orchestrator: databases `sql` context sources may query, `(name, dsn)`.
    pub sql_databases: Vec<(String, String)>,
    /// Orchestrator: what `request` and `kv` sources may reach (none by default, as in
    /// production).
    pub sources_allow_subjects: String,
    pub sources_allow_buckets: String,
    /// Orchestrator: how long tasks of a type nobody serves may wait before they die.
    pub unserved_grace: Duration,
    /// Trigger (in-process): webhooks; with any, the gateway listens on [`TestEnv::http_addr`].
    pub webhooks: Vec<taskfactory_trigger::webhook::Hook>,
    /// Trigger (in-process): the webhook gateway's bounds on connections and requests.
    pub http_limits: taskfactory_trigger::webhook::HttpLimits,
    /// Trigger (in-process): how large a spec may be, and all live specs together.
    pub spec_limits: taskfactory_trigger::admin::SpecLimits,
    /// Trigger (in-process): schedules deciding at once, at most.
    pub schedule_decisions_at_once: u32,
    /// The trigger's reconciler interval (2 s in tests unless set).
    pub reconcile_interval: Duration,
    /// NATS speaks only TLS and verifies clients; services and test clients get certificates.
    pub nats_tls: bool,
    /// NATS servers: 1, or a JetStream cluster of this many ([`TestEnv::nats_peers`]).
    pub nats_servers: usize,
    /// Replicas of the streams and KV buckets the services declare.
    pub stream_replicas: usize,
    /// The admin API requires a token ([`TestEnv::tokens`]); off, it serves loopback without
    /// authentication.
    pub admin_auth: bool,
    /// Trigger (in-process): the admin API's authentication settings (OIDC, TLS); the tokens
    /// file of `admin_auth` is added to them.
    pub auth: taskfactory_trigger::auth::AuthArgs,
    /// NATS with the shipped users and permissions (`k8s/config/nats-permissions.conf`): each
    /// service connects as its own user, [`TestEnv::nats_client`] as `admin`.
    pub nats_users: bool,
    /// Every service: deliveries of a message before it is dead-lettered.
    pub max_deliveries: u32,
    /// Every service: how often it declares again streams and buckets deleted or changed.
    pub declare_every: Duration,
    /// Where [`TestEnv::spawn_process`] finds the service binaries: `target/debug` (what
    /// `cargo build --bins` makes), or `target/release` for measurements.
    pub binaries: PathBuf,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            orchestrator_ack_wait: Duration::from_secs(30),
            egress_allow: "127.0.0.1".to_owned(),
            executor_ack_wait: Duration::from_secs(30),
            executor_concurrency: 16,
            max_event_bytes: 1024 * 1024,
            clock: ClockHandle::system(),
            lease_ttl: Duration::from_secs(5),
            sql_databases: Vec::new(),
            sources_allow_subjects: String::new(),
            sources_allow_buckets: String::new(),
            unserved_grace: Duration::from_secs(600),
            webhooks: Vec::new(),
            http_limits: taskfactory_trigger::webhook::HttpLimits::default(),
            spec_limits: taskfactory_trigger::admin::SpecLimits::default(),
            schedule_decisions_at_once: 2048,
            reconcile_interval: Duration::from_secs(2),
            nats_tls: false,
            nats_servers: 1,
            stream_replicas: 1,
            admin_auth: true,
            auth: taskfactory_trigger::auth::AuthArgs::default(),
            nats_users: true,
            max_deliveries: 20,
            declare_every: Duration::from_secs(1),
            binaries: workspace_root().join("target/debug"),
        }
    }
}

/// NATS, Postgres and the services.
pub struct TestEnv {
    pub nats: NatsServer,
    pub db: TestDb,
    pub grpc_addr: SocketAddr,
    /// Where the trigger's webhook gateway listens (only when hooks are configured).
    pub http_addr: SocketAddr,
    pub options: EnvOptions,
    /// With `nats_tls`: the CA and certificates.
    pub tls: Option<tls::TlsFiles>,
    /// With `nats_servers` > 1: the cluster's other servers (`nats` is the first).
    pub nats_peers: Vec<NatsServer>,
    /// With `admin_auth`: the admin API's tokens and auth file.
    pub tokens: Option<auth::AdminTokens>,
    /// With `nats_users`: the users and their passwords.
    pub nats_users: Option<NatsUsers>,
}

impl TestEnv {
    /// Fresh NATS and database; no services yet.
    pub async fn new(options: EnvOptions) -> anyhow::Result<Self> {
        init_logs();
        let tls = if options.nats_tls {
            Some(tls::TlsFiles::generate()?)
        } else {
            None
        };
        let users = match options.nats_users {
            true => Some(NatsUsers::generate()?),
            false => None,
        };
        let (nats, nats_peers) = match &tls {
            Some(tls) => (
                NatsServer::start_with(Some(tls), users.as_ref())?,
                Vec::new(),
            ),
            None if options.nats_servers > 1 => {
                let mut nodes =
                    NatsServer::start_cluster(options.nats_servers, users.as_ref()).await?;
                let first = nodes.remove(0);
                (first, nodes)
            }
            None => (NatsServer::start_with(None, users.as_ref())?, Vec::new()),
        };
        let db = TestDb::create().await?;
        let grpc_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let http_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let tokens = if options.admin_auth {
            Some(auth::AdminTokens::generate()?)
        } else {
            None
        };
        Ok(Self {
            tokens,
            nats,
            db,
            grpc_addr,
            http_addr,
            options,
            tls,
            nats_peers,
            nats_users: users,
        })
    }

    /// Starts a service in this process.
    pub fn start(&self, service: Service) -> Running {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let nats = self.nats_urls();
        let database = self.db.url();
        let task = match service {
            Service::Trigger => {
                let mut config =
                    taskfactory_trigger::Config::local(&nats, &database, self.grpc_addr);
                config.nats = self.nats_args(service.nats_user());
                config.max_event_bytes = self.options.max_event_bytes;
                config.reconcile_interval = self.options.reconcile_interval;
                config.clock = self.options.clock.clone();
                config.lease_ttl = self.options.lease_ttl;
                config.http_addr = self.http_addr;
                config.hooks = self.options.webhooks.clone();
                config.http_limits = self.options.http_limits.clone();
                config.spec_limits = self.options.spec_limits;
                config.schedule_decisions_at_once = self.options.schedule_decisions_at_once;
                config.auth = self.options.auth.clone();
                if let Some(tokens) = &self.tokens {
                    config.auth.auth_file = Some(tokens.file.clone());
                }
                tokio::spawn(taskfactory_trigger::run(config, token))
            }
            Service::Orchestrator => {
                let mut config = taskfactory_orchestrator::Config::local(&nats, &database);
                config.nats = self.nats_args(service.nats_user());
                config.ack_wait = self.options.orchestrator_ack_wait;
                config.sql_databases = self.options.sql_databases.clone();
                config.sources_allow_subjects = self.options.sources_allow_subjects.clone();
                config.sources_allow_buckets = self.options.sources_allow_buckets.clone();
                config.unserved_grace = self.options.unserved_grace;
                config.egress_allow = self.options.egress_allow.clone();
                tokio::spawn(taskfactory_orchestrator::run(config, token))
            }
            Service::Executor => {
                let mut config = taskfactory_executor::Config::local(&nats);
                config.nats = self.nats_args(service.nats_user());
                config.egress_allow = self.options.egress_allow.clone();
                config.ack_wait = self.options.executor_ack_wait;
                config.concurrency = self.options.executor_concurrency;
                tokio::spawn(taskfactory_executor::run(config, token))
            }
        };
        Running::InProcess { shutdown, task }
    }

    /// Starts a service as its own process (built by `cargo build --bins`), for tests that kill
    /// or signal it.
    pub fn spawn_process(
        &self,
        service: Service,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Running> {
        let mut command = self.process_command(service, extra_env)?;
        Ok(Running::Process(ChildGuard(Some(command.spawn()?))))
    }

    /// [`TestEnv::spawn_process`], with the process's stdout and stderr written to `log` (for
    /// tests that read what a service logged).
    pub fn spawn_process_logged(
        &self,
        service: Service,
        extra_env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> anyhow::Result<Running> {
        let mut command = self.process_command(service, extra_env)?;
        let file = std::fs::File::create(log)?;
        command.stdout(file.try_clone()?).stderr(file);
        Ok(Running::Process(ChildGuard(Some(command.spawn()?))))
    }

    fn process_command(
        &self,
        service: Service,
        extra_env: &[(&str, &str)],
    ) -> anyhow::Result<Command> {
        let binary = self.options.binaries.join(service.binary_name());
        if !binary.exists() {
            bail!(
                "{} not found: run `cargo build --bins` first (just test does; add --release for \
                 measurements)",
                binary.display()
            );
        }
        let mut command = Command::new(binary);
        command
            .env("NATS_URL", self.nats_urls())
            .env(
                "TASKFACTORY_STREAM_REPLICAS",
                self.options.stream_replicas.to_string(),
            )
            .env("DATABASE_URL", self.db.url())
            .env("TASKFACTORY_GRPC_ADDR", self.grpc_addr.to_string())
            .env("TASKFACTORY_HTTP_ADDR", self.http_addr.to_string())
            .env(
                "TASKFACTORY_ACK_WAIT",
                format!("{}ms", self.options.orchestrator_ack_wait.as_millis()),
            )
            .env("TASKFACTORY_EGRESS_ALLOW", &self.options.egress_allow)
            .env(
                "TASKFACTORY_SOURCES_ALLOW_SUBJECTS",
                &self.options.sources_allow_subjects,
            )
            .env(
                "TASKFACTORY_SOURCES_ALLOW_BUCKETS",
                &self.options.sources_allow_buckets,
            )
            .env("TASKFACTORY_RECONCILE_INTERVAL", "2s")
            .env(
                "TASKFACTORY_MAX_DELIVERIES",
                self.options.max_deliveries.to_string(),
            )
            .env(
                "TASKFACTORY_DECLARE_EVERY",
                format!("{}ms", self.options.declare_every.as_millis()),
            )
            .env(
                "TASKFACTORY_LEASE_TTL",
                format!("{}ms", self.options.lease_ttl.as_millis()),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdin(Stdio::null());
        if std::env::var("RUST_LOG").is_err() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        if let Some(tokens) = &self.tokens {
            command.env("TASKFACTORY_AUTH_FILE", &tokens.file);
        }
        for (name, dsn) in &self.options.sql_databases {
            command.env(
                format!("TASKFACTORY_SQL_{}", name.to_ascii_uppercase()),
                dsn,
            );
        }
        if let Some(tls) = &self.tls {
            for (key, value) in tls.client_env() {
                command.env(key, value);
            }
        }
        command.envs(self.nats_env(service.nats_user()));
        for (key, value) in extra_env {
            command.env(key, value);
        }
        Ok(command)
    }

    /// Starts all three services in-process and waits until they are ready.
    pub async fn start_all(&self) -> anyhow::Result<Vec<Running>> {
        let running = vec![
            self.start(Service::Trigger),
            self.start(Service::Orchestrator),
            self.start(Service::Executor),
        ];
        self.wait_ready(&[Service::Trigger, Service::Orchestrator, Service::Executor])
            .await?;
        Ok(running)
    }

    /// Waits until the services' consumers exist and the admin API answers.
    pub async fn wait_ready(&self, services: &[Service]) -> anyhow::Result<()> {
        let js = self.js().await?;
        for service in services {
            match service {
                Service::Trigger => {
                    wait_for("the admin API", Duration::from_secs(30), || async {
                        Ok(self.admin().await.ok())
                    })
                    .await?;
                    wait_consumer(&js, "FACTORY_EVENTS", "taskfactory-trigger-events").await?;
                    if !self.options.webhooks.is_empty() {
                        wait_for("the webhook gateway", Duration::from_secs(30), || async {
                            Ok(tokio::net::TcpStream::connect(self.http_addr).await.ok())
                        })
                        .await?;
                    }
                }
                Service::Orchestrator => {
                    wait_consumer(&js, "FACTORY_TRIGGERS", "taskfactory-orchestrator-triggers")
                        .await?;
                    wait_consumer(&js, "FACTORY_RESULTS", "taskfactory-orchestrator-results")
                        .await?;
                }
                Service::Executor => {
                    wait_consumer(&js, "FACTORY_TASKS", "taskfactory-executor-log").await?;
                }
            }
        }
        Ok(())
    }

    /// An admin API client with the admin's token (none when `admin_auth` is off).
    pub async fn admin(&self) -> anyhow::Result<AdminClient> {
        self.admin_as(self.tokens.as_ref().map(|t| t.admin.as_str()))
            .await
    }

    /// An admin API client with this token (or none).
    pub async fn admin_as(&self, token: Option<&str>) -> anyhow::Result<AdminClient> {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.grpc_addr))?
            .connect()
            .await?;
        let credentials = Credentials::from_token(token).map_err(anyhow::Error::msg)?;
        Ok(
            taskfactory_proto::v1::admin_service_client::AdminServiceClient::with_interceptor(
                channel,
                credentials,
            ),
        )
    }

    /// A client that may do anything (the `admin` user when NATS has users).
    pub async fn nats_client(&self) -> anyhow::Result<async_nats::Client> {
        self.nats_client_as("admin").await
    }

    /// Every NATS server's URL, comma-separated (as `NATS_URL` takes them).
    pub fn nats_urls(&self) -> String {
        std::iter::once(&self.nats)
            .chain(&self.nats_peers)
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub async fn js(&self) -> anyhow::Result<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::new(self.nats_client().await?))
    }
}

async fn wait_consumer(
    js: &async_nats::jetstream::Context,
    stream: &str,
    consumer: &str,
) -> anyhow::Result<()> {
    wait_for(
        &format!("consumer {consumer}"),
        Duration::from_secs(30),
        || async {
            let Ok(stream) = js.get_stream(stream).await else {
                return Ok(None);
            };
            Ok(stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(consumer)
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await
}
