//! The signature schemes a hook can take: taskfactory's own, and the ones GitHub, Stripe, Slack
//! and Standard Webhooks senders use, each checked exactly as its provider documents it.
//!
//! | provider | signature header | signed bytes | key | delivery id | timestamp |
//! |---|---|---|---|---|---|
//! | `taskfactory` | `Taskfactory-Signature: v1=<hex>[,v1=…]` | `{ts}.{id}.{body}` | the secret | `Taskfactory-Delivery` | `Taskfactory-Timestamp` |
//! | `github` | `X-Hub-Signature-256: sha256=<hex>` | the body | the secret | `X-GitHub-Delivery` | none |
//! | `stripe` | `Stripe-Signature: t=<ts>,v1=<hex>[,v1=…]` | `{ts}.{body}` | the whole `whsec_…` secret | the event's `id` | `t=` |
//! | `slack` | `X-Slack-Signature: v0=<hex>` | `v0:{ts}:{body}` | the signing secret | the event's `event_id` | `X-Slack-Request-Timestamp` |
//! | `standard-webhooks` | `webhook-signature: v1,<base64>[ v1,…]` | `{id}.{ts}.{body}` | base64 after `whsec_` | `webhook-id` | `webhook-timestamp` |
//!
//! Every MAC is HMAC-SHA256, compared in constant time; several signatures (a sender rolling
//! its secret) and several secrets (the receiver rolling) are tried pairwise. Signatures of other
//! schemes or versions in the same header (Stripe's `v0`, Standard Webhooks' `v1a`) are ignored.
//! A timestamp must be within [`TIMESTAMP_TOLERANCE`](super::TIMESTAMP_TOLERANCE) of our clock
//! (five minutes, what each provider's own libraries use).
//!
//! GitHub signs the body only: neither a time, nor its delivery id, nor its event name. So a
//! GitHub delivery is taken once by its id *and* once by its body's SHA-256: the same signed body
//! sent again under another id or event name is a duplicate, not a new event.
//!
//! Delivery ids are kept as long as a sender may send a delivery again
//! ([`Provider::delivery_retention`]): Stripe retries for three days and Standard Webhooks
//! senders for about as long, each time with a fresh timestamp, and a GitHub delivery can be sent
//! again by hand for three days; so theirs are kept [`LONG_DELIVERY_RETENTION`].

use std::borrow::Cow;
use std::time::Duration;

use axum::http::HeaderMap;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};

use super::{MAX_SIGNATURES, Rejection, Secret, check_delivery_id, parse_timestamp};

pub const GITHUB_SIGNATURE: &str = "X-Hub-Signature-256";
pub const GITHUB_DELIVERY: &str = "X-GitHub-Delivery";
pub const GITHUB_EVENT: &str = "X-GitHub-Event";
pub const STRIPE_SIGNATURE: &str = "Stripe-Signature";
pub const SLACK_SIGNATURE: &str = "X-Slack-Signature";
pub const SLACK_TIMESTAMP: &str = "X-Slack-Request-Timestamp";
pub const STANDARD_ID: &str = "webhook-id";
pub const STANDARD_TIMESTAMP: &str = "webhook-timestamp";
pub const STANDARD_SIGNATURE: &str = "webhook-signature";

/// How long the delivery ids of GitHub, Stripe and Standard Webhooks hooks are kept: longer than
/// each sends a delivery again.
pub const LONG_DELIVERY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest GitHub event name taken (they are short: `push`, `pull_request`, …).
const MAX_EVENT_NAME_CHARS: usize = 64;
/// A Standard Webhooks secret's key, decoded (the specification's bounds).
const STANDARD_KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// Whose signature scheme a hook's deliveries carry (`provider:` in the webhooks file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// `Taskfactory-Delivery`, `Taskfactory-Timestamp` and `Taskfactory-Signature`.
    #[default]
    Taskfactory,
    Github,
    Stripe,
    Slack,
    StandardWebhooks,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Taskfactory => "taskfactory",
            Provider::Github => "github",
            Provider::Stripe => "stripe",
            Provider::Slack => "slack",
            Provider::StandardWebhooks => "standard-webhooks",
        }
    }

    /// How long the hook's delivery ids are remembered.
    pub fn delivery_retention(self) -> Duration {
        match self {
            Provider::Github | Provider::Stripe | Provider::StandardWebhooks => {
                LONG_DELIVERY_RETENTION
            }
            Provider::Taskfactory | Provider::Slack => super::DELIVERY_RETENTION,
        }
    }

    /// The header carrying the delivery id, when one does (for logs of refused deliveries).
    pub fn delivery_header(self) -> Option<&'static str> {
        match self {
            Provider::Taskfactory => Some(super::HEADER_DELIVERY),
            Provider::Github => Some(GITHUB_DELIVERY),
            Provider::StandardWebhooks => Some(STANDARD_ID),
            Provider::Stripe | Provider::Slack => None,
        }
    }

    /// Whether a delivery whose id was received before is answered 200 "duplicate" (the
    /// providers send a delivery again, with the same id, when they did not see our answer) rather
    /// than refused as a replay (taskfactory's own senders are told to use a new id).
    pub fn answers_duplicates(self) -> bool {
        self != Provider::Taskfactory
    }

    /// What is wrong with a secret for this provider, if anything.
    pub fn secret_error(self, secret: &Secret) -> Option<String> {
        match self {
            Provider::StandardWebhooks => match standard_key(secret.bytes()) {
                Some(key) if STANDARD_KEY_BYTES.contains(&key.len()) => None,
                Some(key) => Some(format!(
                    "a standard-webhooks secret decodes to {} bytes; the specification asks for 24 to 64",
                    key.len()
                )),
                None => Some("a standard-webhooks secret is base64, after whsec_".to_owned()),
            },
            _ if secret.bytes().len() < super::MIN_SECRET_BYTES => Some(format!(
                "a secret is {} bytes; at least {} are needed",
                secret.bytes().len(),
                super::MIN_SECRET_BYTES
            )),
            _ => None,
        }
    }

    /// The HMAC key of a secret; `None` for one that is not a key (it then verifies nothing:
    /// never an empty key, which anyone could sign with).
    fn key(self, secret: &Secret) -> Option<Cow<'_, [u8]>> {
        let key = match self {
            Provider::StandardWebhooks => Cow::Owned(standard_key(secret.bytes())?),
            _ => Cow::Borrowed(secret.bytes()),
        };
        (!key.is_empty()).then_some(key)
    }
}

/// Standard base64, padded or not (secrets are copied by hand).
const BASE64_ANY_PADDING: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// A Standard Webhooks secret's key: base64 after an optional `whsec_`.
fn standard_key(secret: &[u8]) -> Option<Vec<u8>> {
    let encoded = secret.strip_prefix(b"whsec_").unwrap_or(secret);
    BASE64_ANY_PADDING.decode(encoded).ok()
}

/// What a delivery's headers claim, read before its body.
#[derive(Debug, Default)]
pub struct Claim {
    /// The delivery id, when a header carries it (Stripe and Slack carry it in the body).
    pub delivery: Option<String>,
    /// The signed timestamp, as sent (digits), and its value.
    pub timestamp: Option<(String, i64)>,
    /// The signatures to try, decoded (32 bytes each).
    pub signatures: Vec<Vec<u8>>,
    /// GitHub's event name (`X-GitHub-Event`), appended to the hook's subject.
    pub event: Option<String>,
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, Rejection> {
    super::required_header(headers, name)
}

fn malformed(header: &'static str, why: &'static str) -> Rejection {
    Rejection::MalformedHeader { header, why }
}

fn timestamp(headers: &HeaderMap, name: &'static str) -> Result<(String, i64), Rejection> {
    let text = header(headers, name)?;
    let value = parse_timestamp(text).map_err(|why| malformed(name, why))?;
    Ok((text.to_owned(), value))
}

fn delivery(headers: &HeaderMap, name: &'static str) -> Result<String, Rejection> {
    let id = header(headers, name)?;
    check_delivery_id(id).map_err(|why| malformed(name, why))?;
    Ok(id.to_owned())
}

/// A hex HMAC-SHA256 (64 hex digits).
pub(super) fn hex_mac(text: &str) -> Option<Vec<u8>> {
    hex::decode(text).ok().filter(|bytes| bytes.len() == 32)
}

/// Reads what the headers of a delivery to a `provider` hook claim; a missing or malformed
/// header is named.
pub fn claim(provider: Provider, headers: &HeaderMap) -> Result<Claim, Rejection> {
    match provider {
        Provider::Taskfactory => {
            let delivery = delivery(headers, super::HEADER_DELIVERY)?;
            let timestamp = timestamp(headers, super::HEADER_TIMESTAMP)?;
            let signatures = super::parse_signatures(header(headers, super::HEADER_SIGNATURE)?)
                .map_err(|why| malformed(super::HEADER_SIGNATURE, why))?;
            Ok(Claim {
                delivery: Some(delivery),
                timestamp: Some(timestamp),
                signatures,
                event: None,
            })
        }
        Provider::Github => {
            let delivery = delivery(headers, GITHUB_DELIVERY)?;
            let event = header(headers, GITHUB_EVENT)?;
            let event_ok = !event.is_empty()
                && event.len() <= MAX_EVENT_NAME_CHARS
                && event
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !event_ok {
                return Err(malformed(GITHUB_EVENT, "1 to 64 of a-z, 0-9, _"));
            }
            let signature = header(headers, GITHUB_SIGNATURE)?
                .strip_prefix("sha256=")
                .and_then(hex_mac)
                .ok_or_else(|| malformed(GITHUB_SIGNATURE, "sha256= and 64 hex digits"))?;
            Ok(Claim {
                delivery: Some(delivery),
                timestamp: None,
                signatures: vec![signature],
                event: Some(event.to_owned()),
            })
        }
        Provider::Stripe => {
            let text = header(headers, STRIPE_SIGNATURE)?;
            let parts: Vec<&str> = text.split(',').map(str::trim).collect();
            if parts.len() > 2 * MAX_SIGNATURES {
                return Err(malformed(STRIPE_SIGNATURE, "more than 16 parts"));
            }
            let mut timestamp = None;
            let mut signatures = Vec::new();
            for part in parts {
                // As Stripe's libraries read it: a part of another scheme (`v0`, test mode's),
                // or not of the form `scheme=value`, is no signature to try.
                let Some((scheme, value)) = part.split_once('=') else {
                    continue;
                };
                match scheme {
                    "t" => {
                        let seconds = parse_timestamp(value)
                            .map_err(|_| malformed(STRIPE_SIGNATURE, "t= is unix seconds"))?;
                        if timestamp.replace((value.to_owned(), seconds)).is_some() {
                            return Err(malformed(STRIPE_SIGNATURE, "t= is given twice"));
                        }
                    }
                    "v1" => {
                        if signatures.len() == MAX_SIGNATURES {
                            return Err(malformed(STRIPE_SIGNATURE, "more than 8 v1= signatures"));
                        }
                        // One that is not 64 hex digits matches nothing.
                        signatures.extend(hex_mac(value));
                    }
                    _ => {}
                }
            }
            let timestamp = timestamp.ok_or_else(|| malformed(STRIPE_SIGNATURE, "no t="))?;
            if signatures.is_empty() {
                return Err(malformed(STRIPE_SIGNATURE, "no v1= signature"));
            }
            Ok(Claim {
                delivery: None,
                timestamp: Some(timestamp),
                signatures,
                event: None,
            })
        }
        Provider::Slack => {
            let timestamp = timestamp(headers, SLACK_TIMESTAMP)?;
            let signature = header(headers, SLACK_SIGNATURE)?
                .strip_prefix("v0=")
                .and_then(hex_mac)
                .ok_or_else(|| malformed(SLACK_SIGNATURE, "v0= and 64 hex digits"))?;
            Ok(Claim {
                delivery: None,
                timestamp: Some(timestamp),
                signatures: vec![signature],
                event: None,
            })
        }
        Provider::StandardWebhooks => {
            let delivery = delivery(headers, STANDARD_ID)?;
            // The id and the timestamp are joined by dots in what is signed.
            if delivery.contains('.') {
                return Err(malformed(STANDARD_ID, "an id holds no '.'"));
            }
            let timestamp = timestamp(headers, STANDARD_TIMESTAMP)?;
            let text = header(headers, STANDARD_SIGNATURE)?;
            let entries: Vec<&str> = text.split(' ').filter(|e| !e.is_empty()).collect();
            if entries.len() > MAX_SIGNATURES {
                return Err(malformed(STANDARD_SIGNATURE, "more than 8 signatures"));
            }
            let mut signatures = Vec::new();
            for entry in entries {
                // As the specification's libraries read it: entries of other versions (`v1a`,
                // asymmetric) and malformed ones are no signature to try.
                if let Some(("v1", value)) = entry.split_once(',')
                    && let Ok(bytes) = BASE64_ANY_PADDING.decode(value)
                    && bytes.len() == 32
                {
                    signatures.push(bytes);
                }
            }
            if signatures.is_empty() {
                return Err(malformed(STANDARD_SIGNATURE, "no v1 signature"));
            }
            Ok(Claim {
                delivery: Some(delivery),
                timestamp: Some(timestamp),
                signatures,
                event: None,
            })
        }
    }
}

/// The MAC of a delivery to a `provider` hook under `key`.
fn mac(provider: Provider, key: &[u8], claim: &Claim, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    let timestamp = claim
        .timestamp
        .as_ref()
        .map_or(&b""[..], |(text, _)| text.as_bytes());
    let delivery = claim.delivery.as_deref().unwrap_or_default().as_bytes();
    let parts: [&[u8]; 5] = match provider {
        Provider::Taskfactory => [timestamp, b".", delivery, b".", body],
        Provider::Github => [body, b"", b"", b"", b""],
        Provider::Stripe => [timestamp, b".", body, b"", b""],
        Provider::Slack => [b"v0:", timestamp, b":", body, b""],
        Provider::StandardWebhooks => [delivery, b".", timestamp, b".", body],
    };
    for part in parts {
        mac.update(part);
    }
    mac
}

/// The signature a `provider` sender would send for this delivery under `secret` (for tests and
/// senders), as its header carries it.
pub fn sign(provider: Provider, secret: &Secret, claim: &Claim, body: &[u8]) -> String {
    let key = provider.key(secret).unwrap_or_default();
    let bytes = mac(provider, &key, claim, body).finalize().into_bytes();
    match provider {
        Provider::Taskfactory | Provider::Stripe => format!("v1={}", hex::encode(bytes)),
        Provider::Github => format!("sha256={}", hex::encode(bytes)),
        Provider::Slack => format!("v0={}", hex::encode(bytes)),
        Provider::StandardWebhooks => format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ),
    }
}

/// Whether any of the claimed signatures is the MAC of the delivery under any of `secrets`.
/// Every pair is compared, each in constant time.
pub fn verify(provider: Provider, secrets: &[Secret], claim: &Claim, body: &[u8]) -> bool {
    let mut matched = false;
    for secret in secrets {
        let Some(key) = provider.key(secret) else {
            continue;
        };
        let mac = mac(provider, &key, claim, body);
        for signature in &claim.signatures {
            if mac.clone().verify_slice(signature).is_ok() {
                matched = true;
            }
        }
    }
    matched
}

/// The keys a verified delivery is taken once by: its id, and for GitHub (which signs neither the
/// id nor the event name) also its body's SHA-256.
pub fn delivery_keys(provider: Provider, delivery: &str, signed_body: &[u8]) -> Vec<String> {
    let mut keys = vec![delivery.to_owned()];
    if provider == Provider::Github {
        keys.push(format!(
            "sha256:{}",
            hex::encode(Sha256::digest(signed_body))
        ));
    }
    keys
}

/// The JSON of a GitHub delivery sent with the content type `application/x-www-form-urlencoded`
/// (GitHub's `form`): its `payload` field. `None` if the delivery is not form-encoded.
pub fn github_form_payload(
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Result<bytes::Bytes, Rejection>> {
    let form = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !form {
        return None;
    }
    let payload = url::form_urlencoded::parse(body)
        .find(|(name, _)| name == "payload")
        .map(|(_, value)| bytes::Bytes::from(value.into_owned().into_bytes()));
    Some(payload.ok_or_else(|| {
        Rejection::Invalid(
            "a form-encoded GitHub delivery carries its JSON in a payload field".to_owned(),
        )
    }))
}

/// What a verified delivery is, once its body is read.
#[derive(Debug, PartialEq, Eq)]
pub enum Identified {
    /// An event: its delivery id (accepted once per hook) and the subject it is published on.
    Event { delivery: String, subject: String },
    /// Slack's `url_verification`: answered with its challenge, not published.
    Challenge(String),
}

#[derive(serde::Deserialize)]
struct StripeBody {
    id: Option<String>,
}

#[derive(serde::Deserialize)]
struct SlackBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    challenge: Option<String>,
    event_id: Option<String>,
}

/// Names a verified delivery (its body is JSON): its id and subject, or Slack's challenge. The
/// body is read for the few fields needed, without building the rest.
pub fn identify(
    provider: Provider,
    subject: &str,
    claim: &Claim,
    body: &[u8],
) -> Result<Identified, Rejection> {
    let bad = Rejection::Invalid;
    let delivery = match provider {
        Provider::Taskfactory | Provider::StandardWebhooks | Provider::Github => claim
            .delivery
            .clone()
            .ok_or_else(|| bad("no delivery id".to_owned()))?,
        Provider::Stripe => {
            let event: StripeBody = serde_json::from_slice(body)
                .map_err(|e| bad(format!("a Stripe event's id is a string: {e}")))?;
            let id = event
                .id
                .ok_or_else(|| bad("a Stripe event has an id (evt_…)".to_owned()))?;
            check_delivery_id(&id).map_err(|why| bad(format!("a Stripe event's id is {why}")))?;
            id
        }
        Provider::Slack => {
            let event: SlackBody = serde_json::from_slice(body).map_err(|e| {
                bad(format!(
                    "a Slack request's type, challenge and event_id are strings: {e}"
                ))
            })?;
            if event.kind.as_deref() == Some("url_verification") {
                let challenge = event.challenge.ok_or_else(|| {
                    bad("a Slack url_verification request has a challenge".to_owned())
                })?;
                return Ok(Identified::Challenge(challenge));
            }
            match event.event_id {
                Some(id) => {
                    check_delivery_id(&id)
                        .map_err(|why| bad(format!("a Slack event_id is {why}")))?;
                    id
                }
                // Not an Events API callback: named by what was signed, so the same request
                // sent again within the window is the same delivery.
                None => {
                    let timestamp = claim.timestamp.as_ref().map_or("", |(t, _)| t.as_str());
                    let digest = Sha256::new()
                        .chain_update(timestamp.as_bytes())
                        .chain_update(b":")
                        .chain_update(body)
                        .finalize();
                    format!("slack-{}", hex::encode(&digest[..16]))
                }
            }
        }
    };
    let subject = match &claim.event {
        Some(event) => format!("{subject}.{event}"),
        None => subject.to_owned(),
    };
    if let Some(problem) = taskfactory_model::subjects::subject_error(&subject, false) {
        return Err(bad(format!("the event's subject {problem}")));
    }
    if subject.starts_with(super::RESERVED_SUBJECTS) {
        return Err(bad(format!(
            "the event's subject {subject:?} is under {}, which taskfactory announces on",
            super::RESERVED_SUBJECTS
        )));
    }
    Ok(Identified::Event { delivery, subject })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("a header value"));
        }
        map
    }

    fn secrets(secret: &str) -> Vec<Secret> {
        vec![Secret::new(secret)]
    }

    /// The provider's signature header value is accepted for `body` and refused for any other.
    fn verifies(provider: Provider, secret: &str, pairs: &[(&'static str, &str)], body: &[u8]) {
        let claim = claim(provider, &headers(pairs)).expect("well-formed headers");
        assert!(
            verify(provider, &secrets(secret), &claim, body),
            "{provider:?}"
        );
        let mut tampered = body.to_vec();
        tampered.push(b' ');
        assert!(!verify(provider, &secrets(secret), &claim, &tampered));
        assert!(!verify(
            provider,
            &secrets("an entirely different secret!"),
            &claim,
            body
        ));
    }

    #[test]
    fn github_deliveries_verify_as_github_documents() {
        // docs.github.com, "Validating webhook deliveries": the documented test values.
        let documented = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let pairs = [
            (GITHUB_DELIVERY, "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            (GITHUB_EVENT, "push"),
            (GITHUB_SIGNATURE, documented),
        ];
        verifies(
            Provider::Github,
            "It's a Secret to Everybody",
            &pairs,
            b"Hello, World!",
        );
        let claim = claim(Provider::Github, &headers(&pairs)).unwrap();
        assert_eq!(
            sign(
                Provider::Github,
                &Secret::new("It's a Secret to Everybody"),
                &claim,
                b"Hello, World!"
            ),
            documented
        );
        // octokit/webhooks-methods.js, test/sign.test.ts.
        verifies(
            Provider::Github,
            "mysecret",
            &[
                (GITHUB_DELIVERY, "1"),
                (GITHUB_EVENT, "issues"),
                (
                    GITHUB_SIGNATURE,
                    "sha256=4864d2759938a15468b5df9ade20bf161da9b4f737ea61794142f3484236bda3",
                ),
            ],
            br#"{"foo":"bar"}"#,
        );
        // Taken once by id and once by body: GitHub signs neither the id nor the event name.
        assert_eq!(
            delivery_keys(Provider::Github, "72d3162e", b"Hello, World!"),
            [
                "72d3162e",
                "sha256:dffd6021bb2bd5b0af676290809ec3a53191dd81c7f70a4b28688a362182986f"
            ]
        );
        assert_eq!(delivery_keys(Provider::Stripe, "evt_1", b"{}"), ["evt_1"]);
        // The event names the subject, never one taskfactory announces on; the legacy SHA-1
        // header alone is not taken.
        assert!(
            identify(Provider::Github, "events.taskfactory", &claim, b"{}")
                .unwrap_err()
                .to_string()
                .contains("which taskfactory announces on")
        );
        assert_eq!(
            identify(Provider::Github, "events.github", &claim, b"{}").unwrap(),
            Identified::Event {
                delivery: "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_owned(),
                subject: "events.github.push".to_owned()
            }
        );
        let legacy = claim_error(
            Provider::Github,
            &[
                (GITHUB_DELIVERY, "1"),
                (GITHUB_EVENT, "push"),
                ("X-Hub-Signature", "sha1=0123"),
            ],
        );
        assert_eq!(legacy, "missing X-Hub-Signature-256 header");
        let event = claim_error(
            Provider::Github,
            &[
                (GITHUB_DELIVERY, "1"),
                (GITHUB_EVENT, "push.>"),
                (GITHUB_SIGNATURE, documented),
            ],
        );
        assert_eq!(
            event,
            "malformed X-GitHub-Event header: 1 to 64 of a-z, 0-9, _"
        );
    }

    fn claim_error(provider: Provider, pairs: &[(&'static str, &str)]) -> String {
        claim(provider, &headers(pairs))
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn slack_requests_verify_as_slack_documents() {
        // docs.slack.dev, "Verifying requests from Slack" (also python-slack-sdk's test).
        let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let pairs = [
            (SLACK_TIMESTAMP, "1531420618"),
            (
                SLACK_SIGNATURE,
                "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            ),
        ];
        verifies(
            Provider::Slack,
            "8f742231b10e8888abcd99yyyzzz85a5",
            &pairs,
            body.as_bytes(),
        );
        let mut appended = body.to_owned();
        appended.push_str("------");
        let claim = claim(Provider::Slack, &headers(&pairs)).unwrap();
        assert!(!verify(
            Provider::Slack,
            &secrets("8f742231b10e8888abcd99yyyzzz85a5"),
            &claim,
            appended.as_bytes()
        ));
        // A different timestamp is a different signed string.
        let moved = claim_with_timestamp(&claim, "1531420619");
        assert!(!verify(
            Provider::Slack,
            &secrets("8f742231b10e8888abcd99yyyzzz85a5"),
            &moved,
            body.as_bytes()
        ));
        // The Events API's url_verification is answered with its challenge; events are named by
        // their event_id.
        let challenge = br#"{"token": "Jhj5dZrVaK7ZwHHjRyZWjbDl", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}"#;
        assert_eq!(
            identify(Provider::Slack, "events.slack", &claim, challenge).unwrap(),
            Identified::Challenge(
                "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P".to_owned()
            )
        );
        let callback = br#"{"type": "event_callback", "event_id": "Ev0PV52K21", "event": {"type": "app_mention"}}"#;
        assert_eq!(
            identify(Provider::Slack, "events.slack", &claim, callback).unwrap(),
            Identified::Event {
                delivery: "Ev0PV52K21".to_owned(),
                subject: "events.slack".to_owned()
            }
        );
        let no_challenge = br#"{"type": "url_verification"}"#;
        assert!(
            identify(Provider::Slack, "events.slack", &claim, no_challenge)
                .unwrap_err()
                .to_string()
                .contains("has a challenge")
        );
    }

    fn claim_with_timestamp(claim: &Claim, timestamp: &str) -> Claim {
        Claim {
            delivery: claim.delivery.clone(),
            timestamp: Some((timestamp.to_owned(), parse_timestamp(timestamp).unwrap())),
            signatures: claim.signatures.clone(),
            event: claim.event.clone(),
        }
    }

    #[test]
    fn standard_webhooks_verify_as_the_specifications_libraries_do() {
        // standard-webhooks/standard-webhooks: the test vector of every library's tests.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let pairs = |signature: &str| {
            headers(&[
                (STANDARD_ID, "msg_p5jXN8AQM9LWM0D4loKWxJek"),
                (STANDARD_TIMESTAMP, "1614265330"),
                (STANDARD_SIGNATURE, signature),
            ])
        };
        let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        let check = |signature: &str| {
            let claim = claim(Provider::StandardWebhooks, &pairs(signature)).unwrap();
            verify(Provider::StandardWebhooks, &secrets(secret), &claim, body)
        };
        assert!(check(good));
        // Several entries, any valid v1 will do; other versions are ignored.
        assert!(check(&format!(
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {good} v1a,aGVsbG8="
        )));
        // The libraries' negatives: one character off; the right MAC under another version.
        assert!(!check("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="));
        assert_eq!(
            claim(
                Provider::StandardWebhooks,
                &pairs("v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
            )
            .unwrap_err()
            .to_string(),
            "malformed webhook-signature header: no v1 signature"
        );
        // The key is the base64 after whsec_, not the secret's text.
        assert!(!check("v1,TcxlhK9b6UD6iVI1ZU2tTqp8PEVfYRseNNfa6b+LcUg="));
        let claim = claim(Provider::StandardWebhooks, &pairs(good)).unwrap();
        assert_eq!(
            sign(
                Provider::StandardWebhooks,
                &Secret::new(secret),
                &claim,
                body
            ),
            good
        );
        // The Rust library's own vector.
        verifies(
            Provider::StandardWebhooks,
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            &[
                (STANDARD_ID, "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk"),
                (STANDARD_TIMESTAMP, "1649367553"),
                (
                    STANDARD_SIGNATURE,
                    "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
                ),
            ],
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        // Ids are joined to the timestamp by dots in what is signed: a dot in one is refused.
        assert_eq!(
            claim_error(
                Provider::StandardWebhooks,
                &[
                    (STANDARD_ID, "msg.1"),
                    (STANDARD_TIMESTAMP, "1614265330"),
                    (STANDARD_SIGNATURE, good),
                ]
            ),
            "malformed webhook-id header: an id holds no '.'"
        );
        // Secrets: whsec_ and base64 of 24 to 64 bytes.
        let error = |secret: &str| Provider::StandardWebhooks.secret_error(&Secret::new(secret));
        assert_eq!(error(secret), None);
        assert_eq!(
            error("whsec_not base64!").unwrap(),
            "a standard-webhooks secret is base64, after whsec_"
        );
        assert!(
            error("whsec_c2hvcnQ=")
                .unwrap()
                .contains("decodes to 5 bytes")
        );
        // The prefix and the padding may be left out (secrets are copied by hand).
        assert_eq!(error("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), None);
        assert_eq!(error("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAQ"), None);
        assert_eq!(
            standard_key(b"whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAQ").map(|k| k.len()),
            Some(25)
        );
        // A secret that is no key verifies nothing, not even what an empty key signs.
        let empty_key_mac = {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"").unwrap();
            mac.update(b"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.");
            mac.update(body);
            mac.finalize().into_bytes().to_vec()
        };
        let forged = Claim {
            signatures: vec![empty_key_mac],
            ..super::claim(Provider::StandardWebhooks, &pairs(good)).unwrap()
        };
        assert!(!verify(
            Provider::StandardWebhooks,
            &secrets("whsec_!!!"),
            &forged,
            body
        ));
        // Malformed entries are passed over, as the libraries do; one good v1 is enough.
        assert!(check(&format!("v1 v1,%%% v1,aGVsbG8= {good}")));
    }

    #[test]
    fn stripe_signatures_verify_as_stripes_libraries_compute_them() {
        // Stripe publishes no fixed vector: this one was computed with Python's hmac and with
        // stripe-python's WebhookSignature._compute_signature (which agree), for stripe-node's
        // test payload. The key is the whole whsec_ secret.
        let secret = "whsec_test_secret";
        let body = b"{\n  \"id\": \"evt_test_webhook\",\n  \"object\": \"event\"\n}";
        let v1 = "v1=c2f890decbc5ede7c5060bb9a6d31e0626a4342bacb9aeae2adb1bcea72f9812";
        verifies(
            Provider::Stripe,
            secret,
            &[(STRIPE_SIGNATURE, &format!("t=1492774577,{v1}"))],
            body,
        );
        // A test-mode v0 and a bad v1 beside the good one change nothing (a secret being rolled).
        verifies(
            Provider::Stripe,
            secret,
            &[(
                STRIPE_SIGNATURE,
                &format!(
                    "t=1492774577,v1={},{v1},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39",
                    "0".repeat(64)
                ),
            )],
            body,
        );
        let claim = claim(
            Provider::Stripe,
            &headers(&[(STRIPE_SIGNATURE, &format!("t=1492774577,{v1}"))]),
        )
        .unwrap();
        assert_eq!(
            sign(Provider::Stripe, &Secret::new(secret), &claim, body),
            v1
        );
        // The MAC under the secret without its prefix is not taken.
        let stripped = claim_of(
            Provider::Stripe,
            &[(
                STRIPE_SIGNATURE,
                "t=1492774577,v1=102603b27657da2610fc5e259fef6b6bb5aa725b8a6bc5e37bf5aec3180c2934",
            )],
        );
        assert!(!verify(Provider::Stripe, &secrets(secret), &stripped, body));
        // The event's id names the delivery.
        assert_eq!(
            identify(Provider::Stripe, "events.stripe", &claim, body).unwrap(),
            Identified::Event {
                delivery: "evt_test_webhook".to_owned(),
                subject: "events.stripe".to_owned()
            }
        );
        assert!(
            identify(
                Provider::Stripe,
                "events.stripe",
                &claim,
                b"{\"object\": \"event\"}"
            )
            .unwrap_err()
            .to_string()
            .contains("has an id")
        );
        assert!(
            identify(Provider::Stripe, "events.stripe", &claim, b"{\"id\": 7}")
                .unwrap_err()
                .to_string()
                .contains("id is a string")
        );
        // Parts that are no v1 signature are passed over, as Stripe's libraries do.
        verifies(
            Provider::Stripe,
            secret,
            &[(STRIPE_SIGNATURE, &format!("t=1492774577,v1=00,junk,{v1}"))],
            body,
        );
        // Headers without what is needed are named.
        let many = format!("t=1,{}", [v1; 9].join(","));
        for (header, why) in [
            (
                "v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39,t=1",
                "no v1= signature",
            ),
            (v1, "no t="),
            ("t=1,t=2,v1=00", "t= is given twice"),
            ("t=1,v1=00", "no v1= signature"),
            ("t=soon,v1=00", "t= is unix seconds"),
            (many.as_str(), "more than 8 v1= signatures"),
        ] {
            assert_eq!(
                claim_error(Provider::Stripe, &[(STRIPE_SIGNATURE, header)]),
                format!("malformed Stripe-Signature header: {why}"),
                "{header}"
            );
        }
    }

    fn claim_of(provider: Provider, pairs: &[(&'static str, &str)]) -> Claim {
        claim(provider, &headers(pairs)).unwrap()
    }

    #[test]
    fn providers_are_named_in_the_webhooks_file() {
        #[derive(serde::Deserialize)]
        struct Entry {
            provider: Provider,
        }
        for (text, provider) in [
            ("provider: github", Provider::Github),
            ("provider: stripe", Provider::Stripe),
            ("provider: slack", Provider::Slack),
            ("provider: standard-webhooks", Provider::StandardWebhooks),
            ("provider: taskfactory", Provider::Taskfactory),
        ] {
            let entry: Entry = serde_yaml_ng::from_str(text).unwrap();
            assert_eq!(entry.provider, provider);
            assert_eq!(format!("provider: {}", provider.name()), text);
        }
        let error = serde_yaml_ng::from_str::<Entry>("provider: gitlab")
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("unknown variant `gitlab`"), "{error}");
        assert!(error.contains("standard-webhooks"), "{error}");
    }
}
