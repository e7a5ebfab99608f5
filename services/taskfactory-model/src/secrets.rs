//! Named secrets: how a spec refers to one, where it may be sent, what a sensitive source leaves
//! in the record.
//!
//! A spec never holds a secret. It names one (`secretHeaders: {Authorization: {secret:
//! STRIPE_KEY, prefix: "Bearer "}}`), in a field that is never a template, so event data cannot
//! make anyone send a secret anywhere: the reference comes literally from the spec, and the value
//! goes only into the header it names. The service that sends the request resolves the name at
//! that moment (`runtime::secrets`: the orchestrator for `http` sources, the executor for `http`
//! tasks — the orchestrator never sees a task's secret) and stores nothing.
//!
//! Each secret is bound by the operator to the hosts it may be sent to ([`SecretBindings`],
//! `TASKFACTORY_SECRETS_HOSTS`); a secret bound to no host is sent nowhere. So an editor who may
//! write specs cannot point an operator's secret at a host of their own. A URL carrying secrets
//! must also spell its scheme and host literally ([`literal_origin_problem`]), so the host is
//! known when the spec is written, and redirects to another origin are not followed.
//!
//! A source marked `sensitive` is used for the evaluation and then kept only as [`redacted`]:
//! no hash either, because a hash of a guessable value (a balance, a flag) is the value.

use std::fmt;

use taskfactory_proto::v1::SecretRef;

use crate::egress;

/// The longest secret name.
pub const MAX_NAME_LEN: usize = 64;

/// The flag (and variable) binding secrets to hosts, as errors name it.
pub const HOSTS_FLAG: &str = "--secrets-hosts (TASKFACTORY_SECRETS_HOSTS)";

/// Why a secret name is not one: `[A-Z][A-Z0-9_]{0,63}` (it becomes
/// `TASKFACTORY_SECRET_<NAME>` and a file name, so nothing else fits).
pub fn name_error(name: &str) -> Option<String> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= MAX_NAME_LEN;
    (!ok).then(|| {
        format!(
            "{name:?} is not a secret name: 1–{MAX_NAME_LEN} characters of A-Z, 0-9 and '_', starting with a letter"
        )
    })
}

/// Why an HTTP header name is not one (an RFC 9110 token).
fn header_name_error(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
    (!ok).then(|| format!("{name:?} is not an HTTP header name"))
}

/// The marker a sensitive source's value is stored as.
pub fn redacted() -> serde_json::Value {
    serde_json::json!({"redacted": true})
}

/// Problems of one `secretHeaders` map, as `(field path under it, message)`: header names,
/// secret names, prefixes, and headers also given in plain `headers` (`plain`, any case).
pub fn secret_headers_problems<'a>(
    secret_headers: impl IntoIterator<Item = (&'a String, &'a SecretRef)>,
    plain: &[&str],
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    for (header, reference) in secret_headers {
        if let Some(problem) = header_name_error(header) {
            problems.push((header.clone(), problem));
        }
        if plain.iter().any(|p| p.eq_ignore_ascii_case(header)) {
            problems.push((
                header.clone(),
                "is also given in headers: give each header once".to_owned(),
            ));
        }
        if reference.secret.is_empty() {
            problems.push((
                format!("{header}.secret"),
                "is required: the name of a secret (TASKFACTORY_SECRET_<NAME>)".to_owned(),
            ));
        } else if let Some(problem) = name_error(&reference.secret) {
            problems.push((format!("{header}.secret"), problem));
        }
        if reference.prefix.chars().any(|c| c.is_control()) {
            problems.push((
                format!("{header}.prefix"),
                "may not contain control characters".to_owned(),
            ));
        }
        if crate::sources::is_template(&reference.prefix) {
            problems.push((
                format!("{header}.prefix"),
                "is literal text, never a template".to_owned(),
            ));
        }
    }
    problems
}

/// Why a URL template that carries secrets does not spell its origin literally: it must start
/// with `http(s)://host[:port]` followed by `/`, `?`, `#` or its end, all before any template
/// tag, so that nothing rendered can change where the secret goes.
pub fn literal_origin_problem(url: &str) -> Option<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some(format!("{url:?} is not an http or https URL"));
    };
    if !matches!(scheme, "http" | "https") {
        return Some(format!("{url:?} is not an http or https URL"));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if authority.is_empty() || authority.contains(['{', '}', '@', '\\']) {
        return Some(
            "a request that carries secrets must spell its scheme and host literally (templates only after the host, in the path or query)".to_owned(),
        );
    }
    None
}

/// Which hosts each secret may be sent to: `NAME=host[,host…]` entries separated by `;`, hosts
/// as the egress allow-list spells them (`api.example.com`, `*.example.com`, `host:port`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretBindings {
    bindings: Vec<(String, Vec<HostRule>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRule {
    /// Lowercase; a leading `*.` matches any subdomain.
    pattern: String,
    port: Option<u16>,
    /// Written `http://host`: the secret may cross to it in clear (else https only).
    plain_http: bool,
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.plain_http {
            f.write_str("http://")?;
        }
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.pattern),
            None => f.write_str(&self.pattern),
        }
    }
}

impl SecretBindings {
    /// Parses the bindings; a malformed entry is an error naming it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut bindings: Vec<(String, Vec<HostRule>)> = Vec::new();
        for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, hosts) = entry
                .split_once('=')
                .ok_or_else(|| format!("{HOSTS_FLAG}: entry {entry:?} is not NAME=host[,host…]"))?;
            let name = name.trim();
            if let Some(problem) = name_error(name) {
                return Err(format!("{HOSTS_FLAG}: {problem}"));
            }
            let mut rules = Vec::new();
            for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                rules.push(parse_host_rule(host).map_err(|e| format!("{HOSTS_FLAG}: {e}"))?);
            }
            if rules.is_empty() {
                return Err(format!("{HOSTS_FLAG}: secret {name} is bound to no host"));
            }
            match bindings.iter_mut().find(|(n, _)| n == name) {
                Some((_, existing)) => existing.extend(rules),
                None => bindings.push((name.to_owned(), rules)),
            }
        }
        Ok(Self { bindings })
    }

    /// Whether secret `name` may be sent to `host` on `port` over `scheme` (`https`; plain `http`
    /// only to a host bound as `http://host`); `Err` says why not.
    pub fn check(&self, name: &str, scheme: &str, host: &str, port: u16) -> Result<(), String> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let Some((_, rules)) = self.bindings.iter().find(|(n, _)| n == name) else {
            return Err(format!(
                "secret {name:?} is bound to no host, so it is sent nowhere; bind it with {HOSTS_FLAG} (e.g. {name}=api.example.com)"
            ));
        };
        let reachable = |rule: &&HostRule| {
            egress::matches_host(&rule.pattern, &host) && rule.port.is_none_or(|p| p == port)
        };
        let secure = scheme.eq_ignore_ascii_case("https");
        if rules
            .iter()
            .filter(reachable)
            .any(|rule| secure || rule.plain_http)
        {
            return Ok(());
        }
        if rules.iter().any(|rule| reachable(&rule)) {
            return Err(format!(
                "secret {name:?} goes to {host} over https only, not {scheme}: bind it as http://{host} to allow plain http ({HOSTS_FLAG})"
            ));
        }
        let bound: Vec<String> = rules.iter().map(ToString::to_string).collect();
        Err(format!(
            "secret {name:?} may not be sent to {host}:{port}: it is bound to {} ({HOSTS_FLAG})",
            bound.join(", ")
        ))
    }
}

fn parse_host_rule(entry: &str) -> Result<HostRule, String> {
    let (plain_http, entry) = match entry.strip_prefix("http://") {
        Some(rest) => (true, rest),
        None => (false, entry.strip_prefix("https://").unwrap_or(entry)),
    };
    let (host, port) = match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("host {entry:?}: {port:?} is not a port"))?;
            (host, Some(port))
        }
        _ => (entry, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let pattern = host.strip_prefix("*.").unwrap_or(host);
    let ok = !pattern.is_empty()
        && pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    if !ok {
        return Err(format!(
            "{entry:?} is not a host, *.suffix, host:port or IP"
        ));
    }
    Ok(HostRule {
        pattern: host.to_ascii_lowercase(),
        port,
        plain_http,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn secret_names_are_upper_case_identifiers() {
        for good in ["STRIPE_KEY", "A", "GITHUB_TOKEN_2"] {
            assert_eq!(name_error(good), None, "{good}");
        }
        for bad in [
            "",
            "stripe_key",
            "1KEY",
            "_KEY",
            "KEY-2",
            "../etc/passwd",
            "KEY.TXT",
            "KEY ",
            "{{ event.secret }}",
            &"K".repeat(65),
        ] {
            assert!(name_error(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn urls_carrying_secrets_spell_their_origin_literally() {
        for good in [
            "https://api.stripe.com/v1/charges/{{ event.id }}",
            "https://api.stripe.com",
            "http://127.0.0.1:8080/x?q={{ event.q }}",
            "https://api.stripe.com#{{ x }}",
        ] {
            assert_eq!(literal_origin_problem(good), None, "{good}");
        }
        for bad in [
            "{{ event.url }}",
            "https://{{ event.host }}/x",
            "https://api.stripe.com{{ event.rest }}",
            "https://api.stripe.com.{{ x }}/",
            "https://user@{{ x }}/",
            "https://api.stripe.com@evil.com/",
            "ftp://api.stripe.com/",
            "https:///x",
            "api.stripe.com/x",
        ] {
            assert!(literal_origin_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn secrets_go_only_to_their_hosts() {
        let bindings = SecretBindings::parse(
            "STRIPE_KEY=api.stripe.com; GITHUB=*.github.com,127.0.0.1:8080;STRIPE_KEY=files.stripe.com",
        )
        .unwrap();
        assert!(
            bindings
                .check("STRIPE_KEY", "https", "api.stripe.com", 443)
                .is_ok()
        );
        assert!(
            bindings
                .check("STRIPE_KEY", "https", "API.Stripe.com.", 443)
                .is_ok()
        );
        assert!(
            bindings
                .check("STRIPE_KEY", "https", "files.stripe.com", 443)
                .is_ok()
        );
        assert!(
            bindings
                .check("GITHUB", "https", "api.github.com", 443)
                .is_ok()
        );
        assert!(bindings.check("GITHUB", "https", "127.0.0.1", 8080).is_ok());
        let refused = bindings
            .check("GITHUB", "https", "127.0.0.1", 9090)
            .unwrap_err();
        assert!(
            refused.contains("bound to *.github.com, 127.0.0.1:8080"),
            "{refused}"
        );
        assert!(
            bindings
                .check("GITHUB", "https", "github.com", 443)
                .is_err()
        );
        assert!(
            bindings
                .check("STRIPE_KEY", "https", "api.stripe.com.evil.com", 443)
                .is_err()
        );
        let unbound = bindings
            .check("OTHER", "https", "api.stripe.com", 443)
            .unwrap_err();
        // Plain http only where the binding says so.
        let clear = bindings
            .check("STRIPE_KEY", "http", "api.stripe.com", 80)
            .unwrap_err();
        assert!(clear.contains("over https only"), "{clear}");
        let local = SecretBindings::parse("LOCAL=http://127.0.0.1:8080").unwrap();
        assert!(local.check("LOCAL", "http", "127.0.0.1", 8080).is_ok());
        assert!(local.check("LOCAL", "https", "127.0.0.1", 8080).is_ok());
        assert!(unbound.contains("TASKFACTORY_SECRETS_HOSTS"), "{unbound}");
        assert!(
            SecretBindings::default()
                .check("A", "https", "x", 1)
                .is_err()
        );
        for bad in [
            "STRIPE_KEY",
            "stripe=api",
            "A=",
            "A=http://x/",
            "A=host:port",
        ] {
            assert!(SecretBindings::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_headers_are_checked_and_name_what_is_wrong() {
        let refs: Vec<(String, SecretRef)> = vec![
            (
                "Authorization".to_owned(),
                SecretRef {
                    secret: "STRIPE_KEY".to_owned(),
                    prefix: "Bearer ".to_owned(),
                },
            ),
            (
                "X-Key".to_owned(),
                SecretRef {
                    secret: "lower".to_owned(),
                    prefix: "{{ event.p }}".to_owned(),
                },
            ),
            ("Bad Header".to_owned(), SecretRef::default()),
        ];
        let problems = secret_headers_problems(refs.iter().map(|(h, r)| (h, r)), &["x-key"]);
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "X-Key",
                "X-Key.secret",
                "X-Key.prefix",
                "Bad Header",
                "Bad Header.secret"
            ]
        );
    }

    proptest! {
        #[test]
        fn a_url_with_a_literal_origin_keeps_it_whatever_renders_after(
            host in "[a-z]{1,10}(\\.[a-z]{1,10}){0,2}",
            tail in prop::sample::select(vec!["/", "/v1/", "?q=", "#", ":8443/"]),
            rendered in "[a-z@:./\\?#%]{0,20}",
        ) {
            let template = format!("https://{host}{tail}{{{{ x }}}}");
            prop_assert!(literal_origin_problem(&template).is_none());
            if literal_origin_problem(&template).is_none() {
                let url = template.replace("{{ x }}", &rendered);
                let parsed = url::Url::parse(&url);
                if let Ok(parsed) = parsed {
                    prop_assert_eq!(parsed.host_str(), Some(host.as_str()));
                }
            }
        }
    }
}
