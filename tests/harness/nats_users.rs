//! NATS users exactly as shipped: the test server includes `k8s/config/nats-permissions.conf`,
//! copied unchanged next to its configuration, and gets a fresh password for every user the file
//! names (the file reads them from environment variables). Each client connects as a user with
//! that user's inbox prefix, `_INBOX_<user>`, as the file's comments prescribe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use taskfactory_runtime::config::NatsArgs;

/// The shipped permissions file.
pub fn permissions_file() -> PathBuf {
    crate::workspace_root().join("k8s/config/nats-permissions.conf")
}

/// The name the file is copied under, next to the server's configuration (`include` paths are
/// relative to the including file).
const INCLUDED_AS: &str = "nats-permissions.conf";

/// Every user of the shipped file with a password of this server's own.
#[derive(Clone, Debug)]
pub struct NatsUsers {
    /// user → (the environment variable the file reads its password from, the password)
    users: BTreeMap<String, (String, String)>,
}

impl NatsUsers {
    /// Reads the users from the shipped file and makes up their passwords.
    pub fn generate() -> anyhow::Result<Self> {
        let path = permissions_file();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut users = BTreeMap::new();
        for (user, variable) in users_and_password_variables(&text)? {
            // Starts with a letter: nats-server parses the variable's value (digits would be a
            // number).
            let password = format!("p{}", uuid::Uuid::new_v4().simple());
            users.insert(user, (variable, password));
        }
        for needed in ["admin", "trigger", "orchestrator", "executor"] {
            if !users.contains_key(needed) {
                bail!("{} has no user {needed:?}", path.display());
            }
        }
        Ok(Self { users })
    }

    /// Puts the permissions file into `dir`; returns the line that includes it.
    pub fn install(&self, dir: &Path) -> anyhow::Result<String> {
        std::fs::copy(permissions_file(), dir.join(INCLUDED_AS))?;
        Ok(format!("include ./{INCLUDED_AS}\n"))
    }

    /// The nats-server process's environment: every password variable.
    pub fn server_env(&self) -> impl Iterator<Item = (&str, &str)> {
        self.users
            .values()
            .map(|(variable, password)| (variable.as_str(), password.as_str()))
    }

    pub fn password(&self, user: &str) -> &str {
        match self.users.get(user) {
            Some((_, password)) => password,
            None => panic!("the shipped NATS permissions have no user {user:?}"),
        }
    }

    /// The inbox prefix `user` may subscribe to.
    pub fn inbox_prefix(user: &str) -> String {
        format!("_INBOX_{user}")
    }

    /// `options` connecting as `user`.
    pub fn connect_options(
        &self,
        user: &str,
        options: async_nats::ConnectOptions,
    ) -> async_nats::ConnectOptions {
        options
            .user_and_password(user.to_owned(), self.password(user).to_owned())
            .custom_inbox_prefix(Self::inbox_prefix(user))
    }

    /// A service's flags connecting as `user`.
    pub fn apply(&self, user: &str, args: &mut NatsArgs) {
        args.user = Some(user.to_owned());
        args.password = Some(self.password(user).to_owned());
        args.inbox_prefix = Self::inbox_prefix(user);
    }

    /// A process's environment connecting as `user` (`NATS_USER`, `NATS_PASSWORD`,
    /// `NATS_INBOX_PREFIX`).
    pub fn env(&self, user: &str) -> Vec<(&'static str, String)> {
        vec![
            ("NATS_USER", user.to_owned()),
            ("NATS_PASSWORD", self.password(user).to_owned()),
            ("NATS_INBOX_PREFIX", Self::inbox_prefix(user)),
        ]
    }
}

/// How tests and services connect as users (beside [`crate::TestEnv::nats_client`], which is
/// `admin`).
impl crate::TestEnv {
    /// A client connected as `user` of the shipped permissions (without users: anonymous).
    pub async fn nats_client_as(&self, user: &str) -> anyhow::Result<async_nats::Client> {
        let mut options = match &self.tls {
            Some(tls) => tls.connect_options(),
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(users) = &self.nats_users {
            options = users.connect_options(user, options);
        }
        Ok(options
            .connect(taskfactory_runtime::nats::server_urls(&self.nats_urls()))
            .await?)
    }

    /// A service's NATS flags connecting as `user`: the servers, TLS, the user's password and
    /// inbox prefix, the stream replicas.
    pub fn nats_args(&self, user: &str) -> taskfactory_runtime::config::NatsArgs {
        let mut args = taskfactory_runtime::config::NatsArgs::local(self.nats_urls());
        args.stream_replicas = self.options.stream_replicas;
        args.max_deliveries = self.options.max_deliveries;
        args.declare_every = self.options.declare_every;
        if let Some(tls) = &self.tls {
            args.ca = Some(tls.ca.clone());
            args.cert = Some(tls.client_cert.clone());
            args.key = Some(tls.client_key.clone());
        }
        if let Some(users) = &self.nats_users {
            users.apply(user, &mut args);
        }
        args
    }

    /// A process's environment connecting as `user` (nothing without users).
    pub fn nats_env(&self, user: &str) -> Vec<(&'static str, String)> {
        self.nats_users
            .as_ref()
            .map(|users| users.env(user))
            .unwrap_or_default()
    }
}

/// `(user, password variable)` for each `user = …` followed by `password = $…` in the file.
fn users_and_password_variables(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut user = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("user = ") {
            user = Some(name.trim().to_owned());
        } else if let Some(variable) = line.strip_prefix("password = $") {
            let Some(name) = user.take() else {
                bail!("a password variable ${variable} before any user");
            };
            pairs.push((name, variable.trim().to_owned()));
        }
    }
    if pairs.is_empty() {
        bail!("no `user = …` with `password = $…` found");
    }
    Ok(pairs)
}
