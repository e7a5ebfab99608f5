//! What `request` and `kv` context sources may reach.
//!
//! A context source runs with the orchestrator's NATS connection (or the one the operator gave
//! sources), inside the control plane. So, whatever the allow-lists say, a source never reaches:
//!
//! - subjects starting with `$` (`$JS.API…`, `$KV…`, `$SYS…`, `$O…`: JetStream's API, KV and
//!   object stores, the system account), in any case;
//! - subjects starting with `_` (`_INBOX…` reply inboxes, in any case, and the rest of that
//!   reserved-looking namespace);
//! - the subjects of our streams and internal requests: `taskfactory.>`, `events.>` (a request
//!   there would publish an event), `triggers.>`, `tasks.>`, `results.>`, `dlq.>`, in any case;
//! - KV buckets named `taskfactory…` (ours: the lease, the cancelled runs), in any case.
//!
//! A request subject must also be one plain subject: printable ASCII without spaces, no
//! wildcard, no empty token, at most [`MAX_SUBJECT_LEN`] bytes. A bucket is letters, digits, `_`
//! and `-`; a key is what NATS allows in a key (`[-/_=.a-zA-Z0-9]`, no empty token).
//!
//! Beyond that, only what the operator allow-listed is reachable: [`SubjectAllowList`]
//! (`--sources-allow-subjects`, NATS filters) and [`BucketAllowList`] (`--sources-allow-buckets`,
//! names or `prefix*`). Both are empty by default: a fresh install refuses every `request` and
//! `kv` source, naming the flag to set.
//!
//! The checks run where the orchestrator resolves a source, on the rendered subject, bucket and
//! key; [`literal_subject_problem`] and friends apply them at validation to what a spec spells
//! literally (a template's literal first token included), so most mistakes show up before a run.

use std::fmt;

use crate::subjects;

/// The flag (and variable) of the subject allow-list, as error messages name it.
pub const ALLOW_SUBJECTS_FLAG: &str =
    "--sources-allow-subjects (TASKFACTORY_SOURCES_ALLOW_SUBJECTS)";
/// The flag (and variable) of the bucket allow-list, as error messages name it.
pub const ALLOW_BUCKETS_FLAG: &str = "--sources-allow-buckets (TASKFACTORY_SOURCES_ALLOW_BUCKETS)";

/// The longest request subject.
pub const MAX_SUBJECT_LEN: usize = 256;
/// The longest bucket name.
pub const MAX_BUCKET_LEN: usize = 64;
/// The longest KV key.
pub const MAX_KEY_LEN: usize = 512;

/// First tokens of our own subjects: streams and internal requests.
const OUR_FIRST_TOKENS: [&str; 6] = [
    "taskfactory",
    "events",
    "triggers",
    "tasks",
    "results",
    "dlq",
];

/// The prefix of our KV buckets.
const OUR_BUCKET_PREFIX: &str = "taskfactory";

/// Why a subject, bucket or key is not reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Not one well-formed subject, bucket name or key.
    Malformed(String),
    /// `$…`: JetStream, KV, object store and system subjects.
    Api,
    /// `_…`: reply inboxes.
    Inbox,
    /// One of our streams or internal requests (the first token, lowercase).
    Ours(String),
    /// One of our KV buckets.
    OurBucket,
    /// Not on the subject allow-list.
    SubjectNotAllowed,
    /// Not on the bucket allow-list.
    BucketNotAllowed,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Malformed(why) => f.write_str(why),
            Reason::Api => f.write_str(
                "JetStream, KV and system subjects ($…) are never reachable from a context source",
            ),
            Reason::Inbox => f.write_str(
                "reply inboxes (_INBOX…) and other subjects starting with '_' are never reachable from a context source",
            ),
            Reason::Ours(token) => write!(
                f,
                "taskfactory's own subjects ({token}.>) are never reachable from a context source"
            ),
            Reason::OurBucket => f.write_str(
                "taskfactory's own KV buckets (taskfactory…) are never reachable from a context source",
            ),
            Reason::SubjectNotAllowed => write!(
                f,
                "it is not on the operator's allow-list for request sources; allow it with {ALLOW_SUBJECTS_FLAG}"
            ),
            Reason::BucketNotAllowed => write!(
                f,
                "it is not on the operator's allow-list for kv sources; allow it with {ALLOW_BUCKETS_FLAG}"
            ),
        }
    }
}

/// A refused subject, bucket or key: `subject "x" is refused: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is refused: {reason}")]
pub struct Refused {
    /// `subject`, `bucket` or `key`.
    pub what: &'static str,
    pub value: String,
    pub reason: Reason,
}

impl Refused {
    fn new(what: &'static str, value: &str, reason: Reason) -> Self {
        // A hostile value is shown, but not at any length.
        let value = if value.len() > MAX_SUBJECT_LEN + 16 {
            let mut end = MAX_SUBJECT_LEN;
            while !value.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &value[..end])
        } else {
            value.to_owned()
        };
        Self {
            what,
            value,
            reason,
        }
    }
}

/// Why a request subject is never reachable, whatever the allow-list says (`None`: it may be, if
/// allow-listed).
pub fn subject_refusal(subject: &str) -> Option<Reason> {
    if let Some(problem) = plain_subject_problem(subject) {
        return Some(Reason::Malformed(problem));
    }
    let first = subject.split('.').next().unwrap_or_default();
    reserved_first_token(first)
}

/// What is wrong with a subject as one plain subject.
fn plain_subject_problem(subject: &str) -> Option<String> {
    if subject.is_empty() {
        return Some("it is empty".to_owned());
    }
    if subject.len() > MAX_SUBJECT_LEN {
        return Some(format!("it is longer than {MAX_SUBJECT_LEN} bytes"));
    }
    if let Some(problem) = character_problem(subject) {
        return Some(problem);
    }
    if subject.contains(['*', '>']) {
        return Some(
            "it contains a wildcard (* or >): a request goes to exactly one subject".to_owned(),
        );
    }
    if subject.split('.').any(str::is_empty) {
        return Some("it has an empty token (a leading, trailing or doubled dot)".to_owned());
    }
    None
}

/// Printable ASCII without spaces, or what is not.
fn character_problem(text: &str) -> Option<String> {
    let bad = text.chars().find(|c| !c.is_ascii_graphic())?;
    Some(if bad.is_whitespace() {
        "it contains whitespace".to_owned()
    } else if bad.is_control() {
        "it contains a control character".to_owned()
    } else {
        "it contains a character outside printable ASCII".to_owned()
    })
}

fn reserved_first_token(first: &str) -> Option<Reason> {
    if first.starts_with('$') {
        return Some(Reason::Api);
    }
    if first.starts_with('_') {
        return Some(Reason::Inbox);
    }
    let lower = first.to_ascii_lowercase();
    OUR_FIRST_TOKENS
        .contains(&lower.as_str())
        .then_some(Reason::Ours(lower))
}

/// Why a KV bucket is never reachable, whatever the allow-list says.
pub fn bucket_refusal(bucket: &str) -> Option<Reason> {
    if bucket.is_empty() {
        return Some(Reason::Malformed("it is empty".to_owned()));
    }
    if bucket.len() > MAX_BUCKET_LEN {
        return Some(Reason::Malformed(format!(
            "it is longer than {MAX_BUCKET_LEN} bytes"
        )));
    }
    if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Some(Reason::Malformed(
            "a bucket name is letters, digits, '_' and '-'".to_owned(),
        ));
    }
    bucket
        .to_ascii_lowercase()
        .starts_with(OUR_BUCKET_PREFIX)
        .then_some(Reason::OurBucket)
}

/// Why a KV key is not one plain key.
pub fn key_refusal(key: &str) -> Option<Reason> {
    let problem = if key.is_empty() {
        "it is empty".to_owned()
    } else if key.len() > MAX_KEY_LEN {
        format!("it is longer than {MAX_KEY_LEN} bytes")
    } else if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.'))
    {
        "a key is letters, digits and - / _ = . (no wildcards, no spaces)".to_owned()
    } else if key.split('.').any(str::is_empty) {
        "it has an empty token (a leading, trailing or doubled dot)".to_owned()
    } else {
        return None;
    };
    Some(Reason::Malformed(problem))
}

/// The subjects `request` sources may use: NATS subject filters (`inventory.>`,
/// `pricing.*.quote`). Empty: none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectAllowList {
    filters: Vec<String>,
}

impl SubjectAllowList {
    /// Parses a comma-separated list of filters; an entry that is not a filter is an error
    /// naming it.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut filters = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Some(problem) = subjects::subject_error(entry, true) {
                return Err(format!(
                    "{ALLOW_SUBJECTS_FLAG}: entry {entry:?} is not a subject filter: {problem}"
                ));
            }
            filters.push(entry.to_owned());
        }
        Ok(Self { filters })
    }

    pub fn allows(&self, subject: &str) -> bool {
        self.filters
            .iter()
            .any(|filter| subjects::subject_matches(filter, subject))
    }
}

/// The KV buckets `kv` sources may read: names, `prefix*`, or `*` (any). Empty: none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketAllowList {
    patterns: Vec<String>,
}

impl BucketAllowList {
    /// Parses a comma-separated list; an entry that is not a name or `prefix*` is an error naming
    /// it.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let name = entry.strip_suffix('*').unwrap_or(entry);
            let ok = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && (!name.is_empty() || entry == "*");
            if !ok {
                return Err(format!(
                    "{ALLOW_BUCKETS_FLAG}: entry {entry:?} is not a bucket name or a name ending in '*'"
                ));
            }
            patterns.push(entry.to_owned());
        }
        Ok(Self { patterns })
    }

    pub fn allows(&self, bucket: &str) -> bool {
        self.patterns
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => bucket.starts_with(prefix),
                None => pattern == bucket,
            })
    }
}

/// Whether a `request` source may send to `subject` (rendered): never to the control plane, and
/// only where the allow-list says.
pub fn check_request_subject(subject: &str, allow: &SubjectAllowList) -> Result<(), Refused> {
    if let Some(reason) = subject_refusal(subject) {
        return Err(Refused::new("subject", subject, reason));
    }
    if !allow.allows(subject) {
        return Err(Refused::new("subject", subject, Reason::SubjectNotAllowed));
    }
    Ok(())
}

/// Whether a `kv` source may read `key` of `bucket` (both rendered).
pub fn check_kv(bucket: &str, key: &str, allow: &BucketAllowList) -> Result<(), Refused> {
    if let Some(reason) = bucket_refusal(bucket) {
        return Err(Refused::new("bucket", bucket, reason));
    }
    if let Some(reason) = key_refusal(key) {
        return Err(Refused::new("key", key, reason));
    }
    if !allow.allows(bucket) {
        return Err(Refused::new("bucket", bucket, Reason::BucketNotAllowed));
    }
    Ok(())
}

/// The first tokens a `publish` task may never publish under: JetStream's and the system's API
/// (`$…`), reply inboxes (`_…`), and taskfactory's own streams and internal subjects. Events
/// (`events.>`) are what a publish task is for, but not `events.taskfactory.>`, where runs are
/// announced.
const PUBLISH_REFUSED: [&str; 5] = ["taskfactory", "triggers", "tasks", "results", "dlq"];

/// Why a `publish` task may not publish on `subject` (the rendered one, at run time), if so.
pub fn publish_subject_refusal(subject: &str) -> Option<String> {
    if let Some(problem) = plain_subject_problem(subject) {
        return Some(problem);
    }
    publish_prefix_refusal(subject)
}

/// The refusal by the subject's first tokens alone (also applies to a template's literal start).
fn publish_prefix_refusal(subject: &str) -> Option<String> {
    let mut tokens = subject.split('.');
    let first = tokens.next().unwrap_or_default();
    if first.starts_with('$') {
        return Some(
            "JetStream, KV and system subjects ($…) are never published by a task".to_owned(),
        );
    }
    if first.starts_with('_') {
        return Some("reply inboxes (_…) are never published by a task".to_owned());
    }
    let lower = first.to_ascii_lowercase();
    if PUBLISH_REFUSED.contains(&lower.as_str()) {
        return Some(format!(
            "taskfactory's own subjects ({lower}.>) are never published by a task"
        ));
    }
    let second = tokens.next();
    if lower == "events" && second.is_some_and(|t| t.eq_ignore_ascii_case("taskfactory")) {
        return Some(
            "events.taskfactory.> is where taskfactory announces runs; a task never publishes there"
                .to_owned(),
        );
    }
    None
}

/// At validation: what is wrong with a `publish` task's subject as the spec spells it — a
/// literal one completely, a template by the literal tokens before its first tag.
pub fn literal_publish_subject_problem(subject: &str) -> Option<String> {
    if !is_template(subject) {
        return publish_subject_refusal(subject);
    }
    let prefix = literal_prefix(subject);
    // Only whole tokens count: `$JS.API.{{ x }}` is refused, `{{ x }}.y` is checked when it renders.
    let whole = match prefix.rfind('.') {
        Some(at) => &prefix[..at],
        None if prefix.starts_with(['$', '_']) => prefix,
        None => return None,
    };
    publish_prefix_refusal(whole)
}

/// Whether a spec string is a template (else it is used as written).
pub fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%") || text.contains("{#")
}

/// The text before a template's first tag (all of it for a literal).
fn literal_prefix(text: &str) -> &str {
    ["{{", "{%", "{#"]
        .iter()
        .filter_map(|tag| text.find(tag))
        .min()
        .map_or(text, |at| &text[..at])
}

/// At validation: what is wrong with a request subject as the spec spells it — a literal one
/// completely, a template by its literal first token (`$JS.API.{{ x }}` is refused already).
/// The allow-list is the orchestrator's and is applied when the source resolves.
pub fn literal_subject_problem(subject: &str) -> Option<Refused> {
    if !is_template(subject) {
        return subject_refusal(subject).map(|reason| Refused::new("subject", subject, reason));
    }
    let prefix = literal_prefix(subject);
    let (first, _) = prefix.split_once('.')?;
    reserved_first_token(first).map(|reason| Refused::new("subject", subject, reason))
}

/// At validation: what is wrong with a bucket as the spec spells it (a template by its literal
/// prefix: `taskfactory_{{ x }}` is refused already).
pub fn literal_bucket_problem(bucket: &str) -> Option<Refused> {
    if !is_template(bucket) {
        return bucket_refusal(bucket).map(|reason| Refused::new("bucket", bucket, reason));
    }
    let prefix = literal_prefix(bucket).to_ascii_lowercase();
    (prefix.starts_with(OUR_BUCKET_PREFIX)
        || (!prefix.is_empty() && OUR_BUCKET_PREFIX.starts_with(prefix.as_str())))
    .then(|| Refused::new("bucket", bucket, Reason::OurBucket))
}

/// At validation: what is wrong with a literal key (a template is checked when it renders).
pub fn literal_key_problem(key: &str) -> Option<Refused> {
    if is_template(key) {
        return None;
    }
    key_refusal(key).map(|reason| Refused::new("key", key, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn everything() -> SubjectAllowList {
        SubjectAllowList::parse(">").unwrap()
    }

    #[test]
    fn the_control_plane_is_refused_whatever_the_allow_list_says() {
        for subject in [
            "$JS.API.STREAM.DELETE.FACTORY_EVENTS",
            "$JS.API.STREAM.PURGE.FACTORY_DLQ",
            "$JS.API.STREAM.INFO.FACTORY_TASKS",
            "$js.api.stream.info.x",
            "$KV.taskfactory_leases.scheduler",
            "$SYS.REQ.SERVER.PING",
            "$O.bucket.x",
            "$G",
            "_INBOX.abc",
            "_inbox.abc",
            "_INBOX_custom.abc",
            "_R_.x",
            "taskfactory.internal.commands",
            "TaskFactory.internal.preview",
            "triggers.billing",
            "tasks.http",
            "TASKS.http",
            "results.a.b",
            "dlq.events",
            "events.orders.created",
        ] {
            let refused = check_request_subject(subject, &everything()).unwrap_err();
            assert!(
                !matches!(
                    refused.reason,
                    Reason::Malformed(_) | Reason::SubjectNotAllowed
                ),
                "{subject}: {refused}"
            );
            assert!(refused.to_string().contains("is refused"), "{refused}");
        }
    }

    #[test]
    fn malformed_subjects_are_refused_naming_the_problem() {
        for (subject, problem) in [
            ("", "empty"),
            ("$JS.API.>", "wildcard"),
            ("inventory.*", "wildcard"),
            ("inventory.a*", "wildcard"),
            (">", "wildcard"),
            (".inventory", "empty token"),
            ("inventory.", "empty token"),
            ("inventory..query", "empty token"),
            ("inventory query", "whitespace"),
            ("inventory\t.query", "whitespace"),
            ("inventory.\u{0}query", "control"),
            ("inventory.\u{7f}", "control"),
            ("ïnventory.query", "outside printable ASCII"),
            ("\u{ff04}JS.API.x", "outside printable ASCII"),
        ] {
            let refused = check_request_subject(subject, &everything()).unwrap_err();
            assert!(
                matches!(refused.reason, Reason::Malformed(_)),
                "{subject:?}: {refused}"
            );
            assert!(refused.to_string().contains(problem), "{refused}");
        }
        let long = format!("inventory.{}", "q".repeat(MAX_SUBJECT_LEN));
        let refused = check_request_subject(&long, &everything()).unwrap_err();
        assert!(refused.to_string().contains("longer than"), "{refused}");
        assert!(refused.to_string().len() < 2 * MAX_SUBJECT_LEN + 200);
    }

    #[test]
    fn by_default_nothing_is_allowed_and_the_flag_is_named() {
        let refused =
            check_request_subject("inventory.query", &SubjectAllowList::default()).unwrap_err();
        assert_eq!(refused.reason, Reason::SubjectNotAllowed);
        assert!(
            refused
                .to_string()
                .contains("TASKFACTORY_SOURCES_ALLOW_SUBJECTS")
        );
        let refused = check_kv("config", "flags", &BucketAllowList::default()).unwrap_err();
        assert_eq!(refused.reason, Reason::BucketNotAllowed);
        assert!(refused.to_string().contains("--sources-allow-buckets"));
    }

    #[test]
    fn allow_lists_match_subjects_and_buckets() {
        let subjects = SubjectAllowList::parse("inventory.>, pricing.*.quote").unwrap();
        assert!(check_request_subject("inventory.query", &subjects).is_ok());
        assert!(check_request_subject("pricing.eu.quote", &subjects).is_ok());
        assert!(check_request_subject("pricing.eu.list", &subjects).is_err());
        assert!(check_request_subject("inventory", &subjects).is_err());
        assert!(SubjectAllowList::parse("a..b").is_err());
        assert!(SubjectAllowList::parse("a.>.b").is_err());
        let buckets = BucketAllowList::parse("config, cache_*").unwrap();
        assert!(check_kv("config", "flags", &buckets).is_ok());
        assert!(check_kv("cache_eu", "a/b=c.d", &buckets).is_ok());
        assert!(check_kv("configs", "flags", &buckets).is_err());
        assert!(BucketAllowList::parse("a.b").is_err());
        assert!(BucketAllowList::parse("**").is_err());
        let any = BucketAllowList::parse("*").unwrap();
        assert!(check_kv("anything", "k", &any).is_ok());
        for bucket in [
            "taskfactory_leases",
            "taskfactory_cancelled_runs",
            "TaskFactory-x",
        ] {
            assert_eq!(
                check_kv(bucket, "k", &any).unwrap_err().reason,
                Reason::OurBucket
            );
        }
        for (bucket, key) in [
            ("con.fig", "k"),
            ("config>", "k"),
            ("", "k"),
            ("config", ""),
            ("config", "a.*"),
            ("config", ">"),
            ("config", "a..b"),
            ("config", ".a"),
            ("config", "a."),
            ("config", "a b"),
        ] {
            assert!(
                matches!(
                    check_kv(bucket, key, &any).unwrap_err().reason,
                    Reason::Malformed(_)
                ),
                "{bucket}/{key}"
            );
        }
    }

    #[test]
    fn validation_sees_literals_and_literal_first_tokens() {
        assert!(literal_subject_problem("$JS.API.STREAM.INFO.x").is_some());
        assert!(literal_subject_problem("$JS.API.{{ event.x }}").is_some());
        assert!(literal_subject_problem("TASKS.{{ event.type }}").is_some());
        assert!(literal_subject_problem("inventory.{{ event.x }}").is_none());
        assert!(literal_subject_problem("{{ event.subject }}").is_none());
        assert!(literal_subject_problem("inventory.query").is_none());
        assert!(literal_subject_problem("a..b").is_some());
        assert!(literal_bucket_problem("taskfactory_leases").is_some());
        assert!(literal_bucket_problem("taskfactory_{{ event.x }}").is_some());
        assert!(literal_bucket_problem("task{{ event.x }}").is_some());
        assert!(literal_bucket_problem("{{ event.bucket }}").is_none());
        assert!(literal_bucket_problem("config").is_none());
        assert!(literal_key_problem("a.*").is_some());
        assert!(literal_key_problem("{{ event.key }}").is_none());
    }

    /// A subject-like string: tokens of letters and a few symbols, sometimes odd ones.
    fn subject_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec("[a-zA-Z0-9_$>*\\- ]{0,6}", 1..5).prop_map(|t| t.join("."))
    }

    proptest! {
        #[test]
        fn an_allowed_subject_is_plain_not_ours_and_allow_listed(
            subject in subject_strategy(),
            filter in subject_strategy(),
        ) {
            let allow = SubjectAllowList::parse(&filter).unwrap_or_default();
            if check_request_subject(&subject, &allow).is_ok() {
                let first = subject.split('.').next().unwrap().to_ascii_lowercase();
                prop_assert!(!first.starts_with('$') && !first.starts_with('_'));
                prop_assert!(!OUR_FIRST_TOKENS.contains(&first.as_str()));
                prop_assert!(!subject.contains(['*', '>', ' ']));
                prop_assert!(subject.split('.').all(|t| !t.is_empty()));
                prop_assert!(allow.allows(&subject));
            }
        }

        #[test]
        fn control_plane_subjects_are_refused_in_any_case(
            prefix in prop::sample::select(vec!["$JS.API", "$KV", "$SYS", "_INBOX", "taskfactory", "triggers", "tasks", "results", "dlq", "events"]),
            upper in proptest::collection::vec(any::<bool>(), 16),
            rest in "[a-zA-Z0-9_]{1,8}(\\.[a-zA-Z0-9_]{1,8}){0,3}",
        ) {
            let cased: String = prefix
                .chars()
                .zip(upper.iter().cycle())
                .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
                .collect();
            let subject = format!("{cased}.{rest}");
            prop_assert!(check_request_subject(&subject, &everything()).is_err(), "{}", subject);
            prop_assert!(literal_subject_problem(&subject).is_some(), "{}", subject);
        }

        #[test]
        fn any_string_is_judged_without_panicking(text in "\\PC{0,300}") {
            let _ = check_request_subject(&text, &everything());
            let _ = check_kv(&text, &text, &BucketAllowList::parse("*").unwrap());
            let _ = literal_subject_problem(&text);
            let _ = literal_bucket_problem(&text);
        }

        #[test]
        fn our_buckets_are_refused_in_any_case(
            upper in proptest::collection::vec(any::<bool>(), 11),
            rest in "[a-zA-Z0-9_-]{0,20}",
        ) {
            let cased: String = OUR_BUCKET_PREFIX
                .chars()
                .zip(&upper)
                .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
                .collect();
            let bucket = format!("{cased}{rest}");
            prop_assert!(check_kv(&bucket, "k", &BucketAllowList::parse("*").unwrap()).is_err());
        }
    }

    #[test]
    fn publish_tasks_keep_to_events() {
        for allowed in [
            "events.orders.created",
            "orders.created",
            "events.TaskFactoryX.y",
            "billing",
        ] {
            assert_eq!(publish_subject_refusal(allowed), None, "{allowed}");
        }
        for refused in [
            "$JS.API.STREAM.UPDATE.FACTORY_EVENTS",
            "$JS.ACK.FACTORY_TASKS.x.1.1.1.1.1",
            "$KV.taskfactory_leases.x",
            "$SYS.REQ.SERVER.PING",
            "_INBOX.abc",
            "_INBOX_trigger.x",
            "taskfactory.internal.commands",
            "TaskFactory.internal.commands",
            "triggers.a",
            "tasks.http",
            "results.a.b",
            "dlq.tasks.http",
            "events.taskfactory.run.completed",
            "events.TASKFACTORY.run.completed",
            "events.>",
            "events..x",
            "",
        ] {
            assert!(publish_subject_refusal(refused).is_some(), "{refused}");
        }
        assert!(literal_publish_subject_problem("$JS.API.{{ x }}").is_some());
        assert!(literal_publish_subject_problem("$JS{{ x }}").is_some());
        assert!(literal_publish_subject_problem("events.taskfactory.{{ x }}").is_some());
        assert!(literal_publish_subject_problem("tasks.{{ x }}").is_some());
        assert_eq!(literal_publish_subject_problem("events.{{ x }}"), None);
        assert_eq!(literal_publish_subject_problem("{{ event.subject }}"), None);
        assert_eq!(
            literal_publish_subject_problem("tas{{ x }}"),
            None,
            "checked when it renders"
        );
    }
}
