//! Whether a database role is fit to run `sql` context sources, and whether a connection came
//! back from a source clean.
//!
//! A source's query runs in a `READ ONLY` transaction and must be one query that reads; what is
//! left to fear is what a role may do *inside* such a transaction: read the server's files
//! (`pg_read_file`, `lo_import`), signal other backends (`pg_terminate_backend` on the product's
//! own connections), reload the configuration, read every table or every query text in flight.
//! Each of those is a privilege, so the orchestrator reads the role's privileges at start
//! ([`RoleFacts`]) and refuses a role with any of them ([`role_problems`]), unless the operator
//! overrides it for that database.
//!
//! What survives the transaction's rollback is checked after each query ([`SessionState`]): a
//! session-level advisory lock (`pg_advisory_lock`) or anything else that outlives it means the
//! connection is closed rather than reused, and the source fails.

use std::fmt;

/// Predefined roles whose members can read or write outside the tables granted to them, signal
/// other backends, or see other sessions' queries (all of them exist from PostgreSQL 14 on, some
/// later; those the server lacks are skipped).
pub const DANGEROUS_ROLES: &[&str] = &[
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_signal_backend",
    "pg_signal_autovacuum_worker",
    "pg_read_all_data",
    "pg_write_all_data",
    "pg_monitor",
    "pg_read_all_settings",
    "pg_read_all_stats",
    "pg_stat_scan_tables",
    "pg_checkpoint",
    "pg_maintain",
    "pg_create_subscription",
    "pg_use_reserved_connections",
];

/// Functions whose EXECUTE privilege is itself the danger (signatures as `to_regprocedure`
/// takes them; those the server lacks are skipped). `pg_terminate_backend` and
/// `pg_cancel_backend` are not here: PostgreSQL lets every role execute them, and they reach only
/// backends of the caller's own role unless it is in `pg_signal_backend` — both checked.
pub const DANGEROUS_FUNCTIONS: &[&str] = &[
    "pg_read_file(text)",
    "pg_read_file(text,boolean)",
    "pg_read_file(text,bigint,bigint)",
    "pg_read_file(text,bigint,bigint,boolean)",
    "pg_read_binary_file(text)",
    "pg_read_binary_file(text,boolean)",
    "pg_read_binary_file(text,bigint,bigint)",
    "pg_read_binary_file(text,bigint,bigint,boolean)",
    "pg_ls_dir(text)",
    "pg_ls_dir(text,boolean,boolean)",
    "pg_stat_file(text)",
    "pg_stat_file(text,boolean)",
    "pg_ls_logdir()",
    "pg_ls_waldir()",
    "pg_ls_tmpdir()",
    "pg_ls_archive_statusdir()",
    "pg_current_logfile()",
    "pg_reload_conf()",
    "pg_rotate_logfile()",
    "pg_promote(boolean,integer)",
    "pg_switch_wal()",
    "pg_create_restore_point(text)",
    "pg_backup_start(text,boolean)",
    "pg_backup_stop(boolean)",
    "pg_log_backend_memory_contexts(integer)",
    "lo_import(text)",
    "lo_import(text,oid)",
    "lo_export(oid,text)",
    "pg_file_write(text,text,boolean)",
    "dblink_connect_u(text)",
    "dblink_connect_u(text,text)",
];

/// What the server says about the role a source database's DSN logs in as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleFacts {
    pub role: String,
    pub superuser: bool,
    pub create_role: bool,
    pub create_db: bool,
    pub replication: bool,
    pub bypass_rls: bool,
    /// Those of [`DANGEROUS_ROLES`] it is a member of (directly or not).
    pub member_of: Vec<String>,
    /// Those of [`DANGEROUS_FUNCTIONS`] it may execute.
    pub executable: Vec<String>,
    /// It is, or is a member of, the role the orchestrator itself uses (`DATABASE_URL`): it could
    /// then signal the product's own connections and read and write its tables. Also when it may
    /// read the product's result-token key (a source on the product's own database with a
    /// blanket `GRANT SELECT`): with it, results could be forged for any task.
    pub is_product_role: bool,
}

/// One privilege a source role must not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Privilege {
    Superuser,
    CreateRole,
    CreateDb,
    Replication,
    BypassRls,
    MemberOf(String),
    Executes(String),
    ProductRole,
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Privilege::Superuser => f.write_str("is a superuser (or may become one with SET ROLE)"),
            Privilege::CreateRole => f.write_str("may create roles (CREATEROLE)"),
            Privilege::CreateDb => f.write_str("may create databases (CREATEDB)"),
            Privilege::Replication => f.write_str("may start replication (REPLICATION)"),
            Privilege::BypassRls => f.write_str("bypasses row-level security (BYPASSRLS)"),
            Privilege::MemberOf(role) => write!(f, "is a member of {role}"),
            Privilege::Executes(function) => write!(f, "may execute {function}"),
            Privilege::ProductRole => {
                f.write_str("is (or is a member of) the role taskfactory's own DATABASE_URL uses, or may read taskfactory's own tables")
            }
        }
    }
}

/// Every privilege the role has that a source role must not have (empty: fit).
pub fn role_problems(facts: &RoleFacts) -> Vec<Privilege> {
    let mut problems = Vec::new();
    for (has, privilege) in [
        (facts.superuser, Privilege::Superuser),
        (facts.is_product_role, Privilege::ProductRole),
        (facts.create_role, Privilege::CreateRole),
        (facts.create_db, Privilege::CreateDb),
        (facts.replication, Privilege::Replication),
        (facts.bypass_rls, Privilege::BypassRls),
    ] {
        if has {
            problems.push(privilege);
        }
    }
    for role in &facts.member_of {
        if DANGEROUS_ROLES.contains(&role.as_str()) {
            problems.push(Privilege::MemberOf(role.clone()));
        }
    }
    for function in &facts.executable {
        if DANGEROUS_FUNCTIONS.contains(&function.as_str()) {
            problems.push(Privilege::Executes(function.clone()));
        }
    }
    problems
}

/// The problems as one clause: `is a superuser, may execute pg_read_file(text)`.
pub fn describe(problems: &[Privilege]) -> String {
    let parts: Vec<String> = problems.iter().map(ToString::to_string).collect();
    parts.join(", ")
}

/// What a connection holds after a source's transaction ended: anything here outlived it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionState {
    /// Session-level advisory locks (`pg_advisory_lock`, shared or not).
    pub advisory_locks: i64,
    /// Relations in the session's temporary schema.
    pub temp_relations: i64,
    /// Channels the session listens on.
    pub listening_channels: i64,
}

/// Why the connection must not be reused (`None`: it is clean).
pub fn leftover_problem(state: &SessionState) -> Option<String> {
    let mut parts = Vec::new();
    if state.advisory_locks > 0 {
        parts.push(format!(
            "{} session-level advisory lock(s)",
            state.advisory_locks
        ));
    }
    if state.temp_relations > 0 {
        parts.push(format!("{} temporary relation(s)", state.temp_relations));
    }
    if state.listening_channels > 0 {
        parts.push(format!("{} LISTEN channel(s)", state.listening_channels));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "the query left {} on its connection, which outlive the transaction; the connection was closed",
            parts.join(" and ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_select_only_role_is_fit() {
        let facts = RoleFacts {
            role: "taskfactory_sources".to_owned(),
            ..RoleFacts::default()
        };
        assert!(role_problems(&facts).is_empty());
    }

    #[test]
    fn each_dangerous_privilege_is_named() {
        let facts = RoleFacts {
            role: "postgres".to_owned(),
            superuser: true,
            bypass_rls: true,
            member_of: vec!["pg_signal_backend".to_owned(), "app_readers".to_owned()],
            executable: vec!["pg_read_file(text)".to_owned(), "abs(integer)".to_owned()],
            is_product_role: true,
            ..RoleFacts::default()
        };
        let problems = role_problems(&facts);
        assert_eq!(
            problems,
            vec![
                Privilege::Superuser,
                Privilege::ProductRole,
                Privilege::BypassRls,
                Privilege::MemberOf("pg_signal_backend".to_owned()),
                Privilege::Executes("pg_read_file(text)".to_owned()),
            ]
        );
        let text = describe(&problems);
        assert!(text.starts_with(
            "is a superuser (or may become one with SET ROLE), is (or is a member of) the role"
        ));
        assert!(text.contains("is a member of pg_signal_backend"));
        assert!(text.contains("may execute pg_read_file(text)"));
    }

    #[test]
    fn leftovers_are_named_and_a_clean_session_passes() {
        assert_eq!(leftover_problem(&SessionState::default()), None);
        let problem = leftover_problem(&SessionState {
            advisory_locks: 1,
            ..SessionState::default()
        })
        .unwrap();
        assert!(
            problem.contains("1 session-level advisory lock(s)"),
            "{problem}"
        );
        assert!(problem.contains("connection was closed"), "{problem}");
    }

    proptest! {
        #[test]
        fn a_role_is_fit_exactly_when_it_has_none_of_the_privileges(
            flags in proptest::collection::vec(any::<bool>(), 6),
            roles in proptest::collection::vec(prop::sample::select(DANGEROUS_ROLES.to_vec()), 0..3),
            functions in proptest::collection::vec(prop::sample::select(DANGEROUS_FUNCTIONS.to_vec()), 0..3),
        ) {
            let facts = RoleFacts {
                role: "r".to_owned(),
                superuser: flags[0],
                create_role: flags[1],
                create_db: flags[2],
                replication: flags[3],
                bypass_rls: flags[4],
                is_product_role: flags[5],
                member_of: roles.iter().map(|r| (*r).to_owned()).collect(),
                executable: functions.iter().map(|f| (*f).to_owned()).collect(),
            };
            let problems = role_problems(&facts);
            let dangerous = flags.iter().any(|f| *f) || !roles.is_empty() || !functions.is_empty();
            prop_assert_eq!(problems.is_empty(), !dangerous);
            prop_assert_eq!(
                problems.len(),
                flags.iter().filter(|f| **f).count() + roles.len() + functions.len()
            );
        }
    }
}
