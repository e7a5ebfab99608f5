//! What callers below `admin` do not see: values that look like credentials.
//!
//! Specs should hold no secret (they name secrets instead), but nothing stops a user from writing
//! a bearer token into a header, and events, context answers and task outputs are other people's
//! data. So everything the admin API shows a non-admin passes through [`redact_json`]:
//!
//! - the value of any object key that names a credential (`password`, `token`, `apiKey`,
//!   `Authorization`, `secret`, `cookie`, …; compared without case, `-` or `_`);
//! - every value in a `headers` object except a few harmless headers (`Content-Type`, `Accept`, …);
//! - any string that looks like a credential by its shape: `Bearer …`/`Basic …`, a JWT, a PEM
//!   private key, well-known key prefixes (`sk_live_`, `ghp_`, `xoxb-`, `AKIA…`, our own `tf_`);
//! - the password of a URL with user information (`postgres://u:pw@h/db` → `postgres://u:[redacted]@h/db`).
//!
//! Each becomes the string [`REDACTED`]. Structure (keys, list lengths, types of the rest) stays,
//! so a viewer can still see why a run made the tasks it made.

use prost_types::{Struct, Value as ProtoValue};
use serde_json::Value;
use taskfactory_proto::v1::{
    Activity, ActivitySpec, PreviewRunResponse, Run, Task, TaskInstance, context_source,
};

use crate::values;

/// What a hidden value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Key fragments that name a credential (lowercase, without `-` and `_`).
const SENSITIVE_KEY_PARTS: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "privatekey",
    "authorization",
    "credential",
    "cookie",
    "sessionid",
    "signature",
    "dsn",
    "connectionstring",
];

/// Headers whose values are shown in a `headers` object.
const HARMLESS_HEADERS: &[&str] = &[
    "accept",
    "acceptencoding",
    "acceptlanguage",
    "cachecontrol",
    "contentencoding",
    "contentlength",
    "contenttype",
    "useragent",
    "idempotencykey",
];

fn normalized(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '-' && *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether an object key names a credential.
pub fn is_sensitive_key(key: &str) -> bool {
    let key = normalized(key);
    SENSITIVE_KEY_PARTS.iter().any(|part| key.contains(part))
}

/// Whether a string looks like a credential by its shape alone.
pub fn looks_secret(text: &str) -> bool {
    let trimmed = text.trim();
    let lower = trimmed.to_ascii_lowercase();
    for scheme in ["bearer ", "basic ", "token ", "digest "] {
        if lower.starts_with(scheme) && trimmed.len() > scheme.len() {
            return true;
        }
    }
    if lower.contains("-----begin") && lower.contains("private key") {
        return true;
    }
    for prefix in [
        "sk_live_",
        "sk_test_",
        "rk_live_",
        "ghp_",
        "gho_",
        "ghs_",
        "github_pat_",
        "glpat-",
        "xoxb-",
        "xoxp-",
        "xapp-",
        "tf_",
    ] {
        if trimmed.starts_with(prefix) && trimmed.len() >= prefix.len() + 8 {
            return true;
        }
    }
    is_aws_access_key(trimmed) || is_jwt(trimmed)
}

fn is_aws_access_key(text: &str) -> bool {
    (text.starts_with("AKIA") || text.starts_with("ASIA"))
        && text.len() == 20
        && text
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

fn is_jwt(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    parts.len() == 3
        && parts[0].starts_with("eyJ")
        && parts[..2].iter().all(|p| p.len() >= 4)
        && parts.iter().all(|p| {
            p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '=')
        })
}

/// A URL's password replaced, if it has one: `scheme://user:pw@host` → `scheme://user:[redacted]@host`.
fn without_url_password(text: &str) -> Option<String> {
    let scheme_end = text.find("://")?;
    let rest = &text[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let at = authority.rfind('@')?;
    let userinfo = &authority[..at];
    let colon = userinfo.find(':')?;
    let password = &userinfo[colon + 1..];
    if password.is_empty() || password == REDACTED {
        return None;
    }
    Some(format!(
        "{}{}:{REDACTED}{}",
        &text[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    ))
}

/// Query parameters whose values are credentials by their name alone, beyond
/// [`is_sensitive_key`] (`?key=…`, `?sig=…`).
const SENSITIVE_QUERY_KEYS: &[&str] = &["key", "sig", "code", "auth", "jwt"];

/// A URL with the values of its credential-named query parameters replaced, if it has any:
/// `https://h/p?api_key=abc&x=1` → `https://h/p?api_key=[redacted]&x=1`.
fn without_query_secrets(text: &str) -> Option<String> {
    // Any URL (`scheme://…`, the scheme in any case): http, but also a DSN's `?password=`.
    let scheme_end = text.find("://")?;
    if scheme_end == 0
        || !text[..scheme_end]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return None;
    }
    let (base, rest) = text.split_once('?')?;
    let (query, fragment) = match rest.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (rest, None),
    };
    let mut hidden = false;
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value))
                if !value.is_empty()
                    && value != REDACTED
                    && (is_sensitive_key(name)
                        || SENSITIVE_QUERY_KEYS.contains(&normalized(name).as_str())) =>
            {
                hidden = true;
                format!("{name}={REDACTED}")
            }
            _ => pair.to_owned(),
        })
        .collect();
    if !hidden {
        return None;
    }
    let mut out = format!("{base}?{}", parts.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    Some(out)
}

/// Hides credentials in free text (an error message), in place, word by word: a word shaped
/// like a credential, the word after `Bearer`/`Basic`/`Digest`, and the password and credential
/// query parameters of any URL in it. Returns how many were hidden.
pub fn redact_text(text: &mut String) -> usize {
    let mut hidden = 0;
    let mut out = String::with_capacity(text.len());
    let mut after_scheme = false;
    for piece in text.split_inclusive(char::is_whitespace) {
        let word = piece.trim_end();
        let gap = &piece[word.len()..];
        // Quotes and punctuation around a word are kept as they are.
        let start = word
            .find(|c: char| !matches!(c, '"' | '\'' | '(' | '<' | '['))
            .unwrap_or(word.len());
        let end = word
            .rfind(|c: char| !matches!(c, '"' | '\'' | ')' | '>' | ']' | ',' | ';' | ':' | '.'))
            .map_or(start, |i| {
                i + word[i..].chars().next().map_or(1, char::len_utf8)
            });
        let (lead, core, tail) = if start < end {
            (&word[..start], &word[start..end], &word[end..])
        } else {
            (word, "", "")
        };
        let mut value = serde_json::Value::String(core.to_owned());
        let mut changed = redact_json(&mut value);
        if after_scheme && !core.is_empty() && changed == 0 {
            value = serde_json::Value::String(REDACTED.to_owned());
            changed = 1;
        }
        after_scheme = ["bearer", "basic", "digest"]
            .iter()
            .any(|scheme| core.eq_ignore_ascii_case(scheme));
        hidden += changed;
        out.push_str(lead);
        out.push_str(value.as_str().unwrap_or(core));
        out.push_str(tail);
        out.push_str(gap);
    }
    if hidden > 0 {
        *text = out;
    }
    hidden
}

/// Hides credentials in `value`, in place; returns how many values were hidden.
pub fn redact_json(value: &mut Value) -> usize {
    match value {
        Value::Object(map) => {
            let mut hidden = 0;
            for (key, inner) in map.iter_mut() {
                if is_sensitive_key(key) {
                    hidden += hide(inner);
                } else if normalized(key) == "headers" {
                    hidden += redact_headers(inner);
                } else {
                    hidden += redact_json(inner);
                }
            }
            hidden
        }
        Value::Array(items) => items.iter_mut().map(redact_json).sum(),
        Value::String(text) => {
            if looks_secret(text) {
                *text = REDACTED.to_owned();
                return 1;
            }
            let mut hidden = 0;
            if let Some(safe) = without_url_password(text) {
                *text = safe;
                hidden += 1;
            }
            if let Some(safe) = without_query_secrets(text) {
                *text = safe;
                hidden += 1;
            }
            hidden
        }
        _ => 0,
    }
}

fn redact_headers(headers: &mut Value) -> usize {
    let Value::Object(map) = headers else {
        return redact_json(headers);
    };
    let mut hidden = 0;
    for (name, value) in map.iter_mut() {
        if HARMLESS_HEADERS.contains(&normalized(name).as_str()) && !is_sensitive_key(name) {
            hidden += redact_json(value);
        } else {
            hidden += hide(value);
        }
    }
    hidden
}

/// Replaces a value with the marker, unless there is nothing to hide (null, empty, a bool).
fn hide(value: &mut Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 0,
        Value::String(text) if text.is_empty() || text == REDACTED => 0,
        Value::Object(map) if map.is_empty() => 0,
        Value::Array(items) if items.is_empty() => 0,
        _ => {
            *value = Value::String(REDACTED.to_owned());
            1
        }
    }
}

fn redact_value(value: &mut ProtoValue) {
    let mut json = values::value_to_json(value);
    if redact_json(&mut json) > 0 {
        *value = values::json_to_value(&json);
    }
}

fn redact_struct(value: &mut Struct) {
    let mut json = values::struct_to_json(value);
    if redact_json(&mut json) > 0 {
        *value = values::json_to_struct(&json);
    }
}

/// A spec as a non-admin sees it: static values, defaults, HTTP URLs, headers and bodies, request
/// payloads and task params go through [`redact_json`]; names, queries, expressions and the rest
/// stay as written.
pub fn redact_spec(spec: &mut ActivitySpec) {
    for source in &mut spec.context {
        if let Some(default) = source.default.as_mut() {
            redact_value(default);
        }
        match source.kind.as_mut() {
            Some(context_source::Kind::Static(value)) => redact_value(value),
            Some(context_source::Kind::Http(http)) => {
                let mut url = serde_json::Value::String(std::mem::take(&mut http.url));
                redact_json(&mut url);
                http.url = url.as_str().unwrap_or_default().to_owned();
                for (name, value) in http.headers.iter_mut() {
                    let harmless = HARMLESS_HEADERS.contains(&normalized(name).as_str());
                    if !harmless && !value.is_empty() {
                        *value = REDACTED.to_owned();
                    }
                }
                if let Some(body) = http.body.as_mut() {
                    redact_value(body);
                }
            }
            Some(context_source::Kind::Request(request)) => {
                if let Some(payload) = request.payload.as_mut() {
                    redact_value(payload);
                }
            }
            _ => {}
        }
    }
    for template in &mut spec.tasks {
        if let Some(params) = template.params.as_mut() {
            redact_struct(params);
        }
    }
}

pub fn redact_activity(activity: &mut Activity) {
    if let Some(spec) = activity.spec.as_mut() {
        redact_spec(spec);
    }
}

/// A run as a non-admin sees it: its context snapshot and its trigger's payload redacted.
pub fn redact_run(run: &mut Run) {
    if let Some(context) = run.context.as_mut() {
        redact_struct(context);
    }
    if let Some(payload) = run.payload.as_mut() {
        redact_value(payload);
    }
    redact_text(&mut run.error);
    redact_text(&mut run.concurrency_key);
    redact_text(&mut run.throttle_key);
    redact_evaluation(&mut run.evaluation);
}

/// Errors and notes of an evaluation (they may quote a URL a source or task called).
fn redact_evaluation(evaluation: &mut [taskfactory_proto::v1::TemplateEvaluation]) {
    for template in evaluation {
        redact_text(&mut template.error);
        for note in &mut template.notes {
            redact_text(note);
        }
    }
}

/// A task as a non-admin sees it: its params, its output and every attempt's output redacted.
pub fn redact_task(task: &mut Task) {
    if let Some(params) = task.params.as_mut() {
        redact_struct(params);
    }
    if let Some(output) = task.output.as_mut() {
        redact_value(output);
    }
    redact_text(&mut task.last_error);
    redact_text(&mut task.concurrency_key);
    for attempt in &mut task.attempt_history {
        if let Some(output) = attempt.output.as_mut() {
            redact_value(output);
        }
        redact_text(&mut attempt.error);
    }
}

pub fn redact_task_instance(task: &mut TaskInstance) {
    if let Some(params) = task.params.as_mut() {
        redact_struct(params);
    }
}

/// A preview as a non-admin sees it: the resolved context and the tasks' params redacted.
pub fn redact_preview(preview: &mut PreviewRunResponse) {
    if let Some(context) = preview.context.as_mut() {
        redact_struct(context);
    }
    for task in &mut preview.tasks {
        redact_task_instance(task);
    }
    redact_evaluation(&mut preview.evaluation);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_spec_keeps_its_shape_and_loses_its_credentials() {
        let mut spec: ActivitySpec = crate::spec::spec_from_yaml(
            r#"
name: leaky
trigger: {manual: {}}
context:
  - name: prices
    http:
      url: "https://user:pw@prices.example.com/v1"
      headers: {Authorization: "Bearer live-key-123", Accept: application/json}
  - name: creds
    static: {apiKey: k-1, region: eu}
tasks:
  - name: call
    type: http
    params: {url: "https://example.com", headers: {X-Api-Key: abc}, body: {n: 1}}
"#,
        )
        .unwrap();
        redact_spec(&mut spec);
        let json = taskfactory_proto::to_json(&spec);
        assert_eq!(
            json["context"][0]["http"]["url"],
            "https://user:[redacted]@prices.example.com/v1"
        );
        assert_eq!(
            json["context"][0]["http"]["headers"]["Authorization"],
            REDACTED
        );
        assert_eq!(
            json["context"][0]["http"]["headers"]["Accept"],
            "application/json"
        );
        assert_eq!(
            json["context"][1]["static"],
            json!({"apiKey": REDACTED, "region": "eu"})
        );
        assert_eq!(json["tasks"][0]["params"]["headers"]["X-Api-Key"], REDACTED);
        assert_eq!(json["tasks"][0]["params"]["body"], json!({"n": 1}));
        assert_eq!(json["name"], "leaky");
        // Still a valid spec.
        let again: ActivitySpec = taskfactory_proto::from_json(&json).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn credential_keys_are_hidden_whatever_their_spelling() {
        let mut value = json!({
            "api_key": "k-123", "X-Api-Key": "k-456", "password": "hunter2", "clientSecret": {"a": 1},
            "refresh_token": "r", "nested": [{"Authorization": "x"}], "count": 3, "name": "ada",
            "token": null, "enabled": true
        });
        let hidden = redact_json(&mut value);
        assert_eq!(
            value,
            json!({
                "api_key": REDACTED, "X-Api-Key": REDACTED, "password": REDACTED, "clientSecret": REDACTED,
                "refresh_token": REDACTED, "nested": [{"Authorization": REDACTED}], "count": 3, "name": "ada",
                "token": null, "enabled": true
            })
        );
        assert_eq!(hidden, 6);
    }

    #[test]
    fn headers_show_only_harmless_ones() {
        let mut value = json!({"headers": {"Content-Type": "application/json", "X-Custom": "abc", "accept": "*/*"}});
        redact_json(&mut value);
        assert_eq!(
            value,
            json!({"headers": {"Content-Type": "application/json", "X-Custom": REDACTED, "accept": "*/*"}})
        );
    }

    #[test]
    fn strings_shaped_like_credentials_are_hidden_anywhere() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl";
        let mut value = json!([
            "Bearer abc.def",
            "basic dXNlcjpwdw==",
            jwt,
            "sk_live_0123456789abcdef",
            "AKIAIOSFODNN7EXAMPLE",
            "-----BEGIN PRIVATE KEY-----\nMII...",
            "tf_0123456789abcdef0123",
            "hello",
            "Bearer",
            "eyJ.not",
            "ghp_",
            "AKIA-short"
        ]);
        redact_json(&mut value);
        let shown: Vec<&str> = value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(&shown[..7], &[REDACTED; 7]);
        assert_eq!(
            &shown[7..],
            &["hello", "Bearer", "eyJ.not", "ghp_", "AKIA-short"]
        );
    }

    #[test]
    fn url_passwords_are_hidden_and_the_rest_kept() {
        let mut value = json!({"url": "postgres://app:s3cret@db:5432/x?sslmode=require", "plain": "https://example.com/a@b", "user_only": "https://ada@example.com/"});
        redact_json(&mut value);
        assert_eq!(
            value,
            json!({"url": "postgres://app:[redacted]@db:5432/x?sslmode=require", "plain": "https://example.com/a@b", "user_only": "https://ada@example.com/"})
        );
    }

    #[test]
    fn credential_query_parameters_are_hidden() {
        let mut value = json!([
            "https://h.example/p?api_key=abc123&page=2",
            "https://hooks.example/x?sig=deadbeef&v=1#top",
            "https://h.example/p?page=2",
            "not a url?token=abc"
        ]);
        redact_json(&mut value);
        assert_eq!(
            value,
            json!([
                "https://h.example/p?api_key=[redacted]&page=2",
                "https://hooks.example/x?sig=[redacted]&v=1#top",
                "https://h.example/p?page=2",
                "not a url?token=abc"
            ])
        );
    }

    #[test]
    fn errors_keep_their_words_and_lose_their_credentials() {
        let mut text = "GET https://api.x/v1?api_key=abc123&page=2 answered 404: \"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln\" (token sk_live_0123456789abcdef), \
            from HTTPS://h/p?API_KEY=x and postgres://u@h/db?password=pw."
            .to_owned();
        let hidden = redact_text(&mut text);
        assert_eq!(
            text,
            "GET https://api.x/v1?api_key=[redacted]&page=2 answered 404: \"Bearer [redacted]\" (token [redacted]), \
            from HTTPS://h/p?API_KEY=[redacted] and postgres://u@h/db?password=[redacted]."
        );
        assert_eq!(hidden, 5);
        let mut plain = "connection refused (os error 111)".to_owned();
        assert_eq!(redact_text(&mut plain), 0);
        assert_eq!(plain, "connection refused (os error 111)");
    }

    #[test]
    fn redacting_twice_changes_nothing_more() {
        let mut value = json!({"token": "abc", "headers": {"Authorization": "Bearer x"}, "u": "https://a:b@h/"});
        redact_json(&mut value);
        let once = value.clone();
        assert_eq!(redact_json(&mut value), 0);
        assert_eq!(value, once);
    }
}
