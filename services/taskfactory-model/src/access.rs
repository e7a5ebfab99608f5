//! Who may do what through the admin API: roles, grants scoped to activities, and the one table
//! that says which role each RPC needs.
//!
//! Roles are ordered; each includes the ones below it:
//!
//! | role | may |
//! |---|---|
//! | `viewer` | read definitions, runs, tasks, schedules and occurrences (sensitive values redacted) |
//! | `operator` | also trigger, pause, resume, backfill, cancel runs, retry and complete tasks |
//! | `editor` | also create, update, delete and preview activities |
//! | `admin` | also see unredacted values and read the audit log |
//!
//! A grant is a role, optionally scoped to activities: `editor` (every activity), `editor:billing-*`
//! (names starting with `billing-`), `editor:billing` (that one name), `viewer:team=billing`
//! (activities whose label `team` is `billing`). A principal's grants add up. An RPC missing from
//! [`RPCS`] is refused to everyone (the table fails closed).

use std::collections::HashMap;
use std::fmt;

/// A role, from least to most powerful.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Viewer,
    Operator,
    Editor,
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Editor, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Editor => "editor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which activities a grant covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every activity, and what belongs to none (the audit log's other rows, ad-hoc schedules).
    All,
    /// The activity of exactly this name.
    Name(String),
    /// Activities whose name starts with this.
    NamePrefix(String),
    /// Activities whose label `key` has this value.
    Label { key: String, value: String },
}

impl Scope {
    pub fn covers(&self, activity: &ActivityRef<'_>) -> bool {
        match self {
            Scope::All => true,
            Scope::Name(name) => activity.name == name,
            Scope::NamePrefix(prefix) => activity.name.starts_with(prefix.as_str()),
            Scope::Label { key, value } => activity.labels.get(key) == Some(value),
        }
    }
}

/// A role over a scope.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Grant {
    pub role: Role,
    pub scope: Scope,
}

impl Grant {
    pub fn everywhere(role: Role) -> Self {
        Self {
            role,
            scope: Scope::All,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("{0:?} is not a role (viewer, operator, editor, admin)")]
    UnknownRole(String),
    #[error("{0:?} has an empty scope after ':'")]
    EmptyScope(String),
    #[error(
        "{0:?}: a name scope is a name or a name prefix ending in '*' (a-z, 0-9, '.', '_', '-')"
    )]
    BadName(String),
    #[error("{0:?}: a label scope is key=value, both non-empty")]
    BadLabel(String),
}

impl std::str::FromStr for Grant {
    type Err = GrantError;

    /// `role`, `role:name`, `role:prefix*` or `role:key=value`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (role, scope) = match text.split_once(':') {
            None => (text, None),
            Some((role, scope)) => (role, Some(scope)),
        };
        let role = Role::parse(role).ok_or_else(|| GrantError::UnknownRole(role.to_owned()))?;
        let scope = match scope {
            None => Scope::All,
            Some("") => return Err(GrantError::EmptyScope(text.to_owned())),
            Some(scope) => parse_scope(text, scope)?,
        };
        Ok(Grant { role, scope })
    }
}

fn parse_scope(grant: &str, scope: &str) -> Result<Scope, GrantError> {
    if let Some((key, value)) = scope.split_once('=') {
        if key.is_empty() || value.is_empty() || label_error(key, value).is_some() {
            return Err(GrantError::BadLabel(grant.to_owned()));
        }
        return Ok(Scope::Label {
            key: key.to_owned(),
            value: value.to_owned(),
        });
    }
    let (name, prefix) = match scope.strip_suffix('*') {
        Some(prefix) => (prefix, true),
        None => (scope, false),
    };
    let name_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !name_chars || (name.is_empty() && !prefix) {
        return Err(GrantError::BadName(grant.to_owned()));
    }
    Ok(match (prefix, name.is_empty()) {
        (true, true) => Scope::All,
        (true, false) => Scope::NamePrefix(name.to_owned()),
        (false, _) => Scope::Name(name.to_owned()),
    })
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Scope::All => write!(f, "{}", self.role),
            Scope::Name(name) => write!(f, "{}:{name}", self.role),
            Scope::NamePrefix(prefix) => write!(f, "{}:{prefix}*", self.role),
            Scope::Label { key, value } => write!(f, "{}:{key}={value}", self.role),
        }
    }
}

/// What a grant's scope is checked against.
#[derive(Clone, Copy, Debug)]
pub struct ActivityRef<'a> {
    pub name: &'a str,
    pub labels: &'a HashMap<String, String>,
}

/// How a caller proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// No authentication is configured (loopback, or `--insecure-no-auth`): everyone is admin.
    None,
    /// A bearer token from the tokens file.
    Token,
    /// An OIDC / JWT bearer token.
    Jwt,
    /// A client certificate (mutual TLS).
    Certificate,
}

impl AuthMethod {
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Token => "token",
            AuthMethod::Jwt => "jwt",
            AuthMethod::Certificate => "certificate",
        }
    }
}

/// An authenticated caller and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Who: a token's subject, a JWT's `sub`, a certificate's name; `anonymous` without auth.
    pub subject: String,
    pub method: AuthMethod,
    pub grants: Vec<Grant>,
}

/// Which activities a principal may act on with some role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Coverage<'a> {
    Everything,
    Only(Vec<&'a Scope>),
}

impl Principal {
    /// The caller when no authentication is configured: admin of everything.
    pub fn anonymous() -> Self {
        Self {
            subject: "anonymous".to_owned(),
            method: AuthMethod::None,
            grants: vec![Grant::everywhere(Role::Admin)],
        }
    }

    /// May act with `role` on this activity.
    pub fn may(&self, role: Role, activity: &ActivityRef<'_>) -> bool {
        self.grants
            .iter()
            .any(|g| g.role >= role && g.scope.covers(activity))
    }

    /// Holds `role` over some activities at least (what the API checks before reading a request).
    pub fn may_somewhere(&self, role: Role) -> bool {
        self.grants.iter().any(|g| g.role >= role)
    }

    /// May give an activity the label `key=value` with `role`: only a grant over everything or
    /// over that very label does (a name-scoped editor cannot move an activity into the reach of
    /// another team's label grants).
    pub fn may_label(&self, role: Role, key: &str, value: &str) -> bool {
        self.grants.iter().any(|g| {
            g.role >= role
                && match &g.scope {
                    Scope::All => true,
                    Scope::Label { key: k, value: v } => k == key && v == value,
                    Scope::Name(_) | Scope::NamePrefix(_) => false,
                }
        })
    }

    /// Holds `role` over everything, including what belongs to no activity.
    pub fn may_everywhere(&self, role: Role) -> bool {
        self.grants
            .iter()
            .any(|g| g.role >= role && g.scope == Scope::All)
    }

    /// The activities `role` reaches: everything, or those some scope covers.
    pub fn coverage(&self, role: Role) -> Coverage<'_> {
        if self.may_everywhere(role) {
            return Coverage::Everything;
        }
        Coverage::Only(
            self.grants
                .iter()
                .filter(|g| g.role >= role)
                .map(|g| &g.scope)
                .collect(),
        )
    }

    /// The grants as text, for logs and the audit log.
    pub fn grant_names(&self) -> Vec<String> {
        self.grants.iter().map(Grant::to_string).collect()
    }
}

impl Coverage<'_> {
    pub fn covers(&self, activity: &ActivityRef<'_>) -> bool {
        match self {
            Coverage::Everything => true,
            Coverage::Only(scopes) => scopes.iter().any(|s| s.covers(activity)),
        }
    }
}

/// One RPC of the admin API: the role it needs, and whether it changes anything (those are
/// audited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RpcRule {
    pub method: &'static str,
    pub role: Role,
    pub mutating: bool,
}

const fn rule(method: &'static str, role: Role, mutating: bool) -> RpcRule {
    RpcRule {
        method,
        role,
        mutating,
    }
}

/// Every RPC of `taskfactory.v1.AdminService`. A test checks this against the service's
/// descriptor both ways: an RPC added to the contract without a row here fails it.
pub const RPCS: &[RpcRule] = &[
    rule("GetActivity", Role::Viewer, false),
    rule("ListActivities", Role::Viewer, false),
    rule("ListActivityVersions", Role::Viewer, false),
    rule("ListScheduleTimes", Role::Viewer, false),
    rule("ListOccurrences", Role::Viewer, false),
    rule("ListEventDecisions", Role::Viewer, false),
    rule("ListRuns", Role::Viewer, false),
    rule("GetRun", Role::Viewer, false),
    rule("ListTasks", Role::Viewer, false),
    rule("GetTask", Role::Viewer, false),
    rule("TriggerActivity", Role::Operator, true),
    rule("PauseActivity", Role::Operator, true),
    rule("ResumeActivity", Role::Operator, true),
    rule("Backfill", Role::Operator, true),
    rule("CancelRun", Role::Operator, true),
    rule("RetryTask", Role::Operator, true),
    rule("CompleteTask", Role::Operator, true),
    rule("CreateActivity", Role::Editor, true),
    rule("UpdateActivity", Role::Editor, true),
    rule("DeleteActivity", Role::Editor, true),
    rule("PreviewRun", Role::Editor, true),
    rule("ListAuditEvents", Role::Admin, false),
];

/// The gRPC service whose RPCs [`RPCS`] governs.
pub const ADMIN_SERVICE: &str = "taskfactory.v1.AdminService";

/// The rule of a method name (`CreateActivity`), if it has one.
pub fn rpc_rule(method: &str) -> Option<&'static RpcRule> {
    RPCS.iter().find(|r| r.method == method)
}

/// The rule of a gRPC request path (`/taskfactory.v1.AdminService/CreateActivity`):
/// `Ok(None)` for a path outside the admin service (health, reflection), `Err` for an admin
/// method without a rule.
pub fn rule_of_path(path: &str) -> Result<Option<&'static RpcRule>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(path.to_owned());
    };
    let Some((service, method)) = rest.split_once('/') else {
        return Err(path.to_owned());
    };
    if service != ADMIN_SERVICE {
        return Ok(None);
    }
    rpc_rule(method).map(Some).ok_or_else(|| method.to_owned())
}

/// Whether a label key and value are well-formed: `None` if so, else what is wrong.
/// Keys: 1–63 of `a-z 0-9 . _ - /`, starting with a letter or digit; values: 0–63 of
/// `A-Z a-z 0-9 . _ -`.
pub fn label_error(key: &str, value: &str) -> Option<String> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && key.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/')
        });
    if !key_ok {
        return Some(format!(
            "{key:?} is not a valid label key: 1–63 of a-z, 0-9, '.', '_', '-', '/', starting with a letter or digit"
        ));
    }
    let value_ok = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    (!value_ok).then(|| {
        format!("{value:?} is not a valid label value: at most 63 of A-Z, a-z, 0-9, '.', '_', '-'")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn principal(grants: &[&str]) -> Principal {
        Principal {
            subject: "someone".to_owned(),
            method: AuthMethod::Token,
            grants: grants.iter().map(|g| g.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn grants_parse_and_print_back() {
        for text in [
            "viewer",
            "operator:billing-*",
            "editor:billing",
            "admin:team=billing",
            "viewer:team/area=a.b_c-D",
        ] {
            let grant: Grant = text.parse().unwrap();
            assert_eq!(grant.to_string(), text);
        }
        assert_eq!(
            "editor:*".parse::<Grant>().unwrap(),
            Grant::everywhere(Role::Editor)
        );
    }

    #[test]
    fn bad_grants_say_what_is_wrong() {
        assert_eq!(
            "root".parse::<Grant>(),
            Err(GrantError::UnknownRole("root".to_owned()))
        );
        assert!(matches!(
            "Editor".parse::<Grant>(),
            Err(GrantError::UnknownRole(_))
        ));
        assert!(matches!(
            "editor:".parse::<Grant>(),
            Err(GrantError::EmptyScope(_))
        ));
        assert!(matches!(
            "editor:Billing*".parse::<Grant>(),
            Err(GrantError::BadName(_))
        ));
        assert!(matches!(
            "editor:a b".parse::<Grant>(),
            Err(GrantError::BadName(_))
        ));
        assert!(matches!(
            "editor:=x".parse::<Grant>(),
            Err(GrantError::BadLabel(_))
        ));
        assert!(matches!(
            "editor:team=".parse::<Grant>(),
            Err(GrantError::BadLabel(_))
        ));
        assert!(matches!(
            "editor:team=a b".parse::<Grant>(),
            Err(GrantError::BadLabel(_))
        ));
    }

    #[test]
    fn roles_include_the_ones_below() {
        let editor = principal(&["editor"]);
        let none = labels(&[]);
        let any = ActivityRef {
            name: "x",
            labels: &none,
        };
        assert!(editor.may(Role::Viewer, &any));
        assert!(editor.may(Role::Operator, &any));
        assert!(editor.may(Role::Editor, &any));
        assert!(!editor.may(Role::Admin, &any));
    }

    #[test]
    fn scopes_cover_names_prefixes_and_labels() {
        let p = principal(&[
            "viewer",
            "editor:billing-*",
            "operator:team=ops",
            "admin:audit",
        ]);
        let ops = labels(&[("team", "ops")]);
        let none = labels(&[]);
        let billing = ActivityRef {
            name: "billing-run",
            labels: &none,
        };
        let opsy = ActivityRef {
            name: "nightly",
            labels: &ops,
        };
        let other = ActivityRef {
            name: "billing",
            labels: &none,
        };
        assert!(p.may(Role::Editor, &billing));
        assert!(
            !p.may(Role::Editor, &other),
            "prefix billing- does not cover billing"
        );
        assert!(p.may(Role::Viewer, &other));
        assert!(p.may(Role::Operator, &opsy));
        assert!(!p.may(Role::Editor, &opsy));
        assert!(p.may(
            Role::Admin,
            &ActivityRef {
                name: "audit",
                labels: &none
            }
        ));
        assert!(!p.may(
            Role::Admin,
            &ActivityRef {
                name: "audits",
                labels: &none
            }
        ));
        assert!(p.may_somewhere(Role::Admin));
        assert!(!p.may_everywhere(Role::Admin));
        assert!(p.may_everywhere(Role::Viewer));
        assert_eq!(p.coverage(Role::Viewer), Coverage::Everything);
        match p.coverage(Role::Operator) {
            Coverage::Only(scopes) => assert_eq!(scopes.len(), 3),
            Coverage::Everything => panic!("operator is scoped"),
        }
    }

    #[test]
    fn labels_are_given_only_with_a_grant_over_them() {
        let p = principal(&["editor:billing-*", "editor:team=ops", "viewer"]);
        assert!(p.may_label(Role::Editor, "team", "ops"));
        assert!(
            !p.may_label(Role::Editor, "team", "payroll"),
            "a name scope gives no label"
        );
        assert!(!p.may_label(Role::Admin, "team", "ops"));
        assert!(principal(&["editor"]).may_label(Role::Editor, "team", "anything"));
    }

    #[test]
    fn a_principal_without_grants_may_nothing() {
        let p = principal(&[]);
        assert!(!p.may_somewhere(Role::Viewer));
        assert_eq!(p.coverage(Role::Viewer), Coverage::Only(vec![]));
    }

    #[test]
    fn the_rpc_table_fails_closed() {
        assert_eq!(
            rule_of_path("/taskfactory.v1.AdminService/CreateActivity").unwrap(),
            rpc_rule("CreateActivity")
        );
        assert_eq!(rule_of_path("/grpc.health.v1.Health/Check"), Ok(None));
        assert_eq!(
            rule_of_path("/taskfactory.v1.AdminService/DropEverything"),
            Err("DropEverything".to_owned())
        );
        assert!(rule_of_path("nonsense").is_err());
        let mut names: Vec<_> = RPCS.iter().map(|r| r.method).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RPCS.len(), "each RPC has one rule");
    }

    #[test]
    fn labels_are_checked() {
        assert_eq!(label_error("team", "billing"), None);
        assert_eq!(label_error("example.com/team", "Billing_1"), None);
        assert_eq!(label_error("team", ""), None);
        assert!(label_error("", "x").is_some());
        assert!(label_error("Team", "x").is_some());
        assert!(label_error("team", "a b").is_some());
        assert!(label_error(&"k".repeat(64), "x").is_some());
        assert!(label_error("team", &"v".repeat(64)).is_some());
    }
}

#[cfg(test)]
mod contract {
    use super::*;

    #[test]
    fn every_rpc_of_the_contract_is_in_the_table_and_nothing_else() {
        let methods = taskfactory_proto::admin_methods();
        assert!(methods.len() >= 20, "the contract's methods are found");
        for method in &methods {
            assert!(
                rpc_rule(method).is_some(),
                "{method} has no row in access::RPCS: decide which role it needs"
            );
        }
        for rule in RPCS {
            assert!(
                methods.iter().any(|m| m == rule.method),
                "access::RPCS names {}, which the contract does not have",
                rule.method
            );
        }
    }
}
