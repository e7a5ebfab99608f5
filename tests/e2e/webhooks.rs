//! The webhook gateway: signed deliveries become events (and runs whose source is WEBHOOK); every
//! delivery that cannot be authenticated, is too large, goes to an unknown hook or is not JSON is
//! refused with nothing published.
//!
//! Requests are written by hand over TCP, so the tests control exactly what is sent (a declared
//! length with no body, a chunked body without any length).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt;
use taskfactory_model::values::struct_to_json;
use taskfactory_proto::v1::{RunStatus, TriggerSource};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};
use taskfactory_trigger::webhook::{self, Hook, Provider, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{create, finished_run, runs, tasks};

const SECRET: &str = "s3cr3t-shared-with-the-shop-0001";
const OLD_SECRET: &str = "the-secret-being-rotated-out-002";
const SUBJECT: &str = "events.shop.orders";

fn shop_hook() -> Hook {
    Hook {
        name: "shop".to_owned(),
        subject: SUBJECT.to_owned(),
        secrets: vec![Secret::new(SECRET), Secret::new(OLD_SECRET)],
        max_body_bytes: Some(1024),
        ..Hook::new("shop", SUBJECT, SECRET)
    }
}

fn options() -> EnvOptions {
    EnvOptions {
        webhooks: vec![shop_hook()],
        ..Default::default()
    }
}

/// Request headers, `(name, value)`.
type Headers = Vec<(String, String)>;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The three headers of a delivery signed with `secret` at `timestamp`.
fn signed(secret: &str, timestamp: i64, delivery: &str, body: &[u8]) -> Headers {
    let timestamp = timestamp.to_string();
    let signature = webhook::sign(secret.as_bytes(), &timestamp, delivery, body);
    vec![
        (webhook::HEADER_DELIVERY.to_owned(), delivery.to_owned()),
        (webhook::HEADER_TIMESTAMP.to_owned(), timestamp),
        (
            webhook::HEADER_SIGNATURE.to_owned(),
            format!("v1={signature}"),
        ),
    ]
}

/// An HTTP answer: the status and the JSON body (`null` if none).
#[derive(Debug)]
struct Answer {
    status: u16,
    body: serde_json::Value,
}

impl Answer {
    fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_default()
    }
}

/// `POST path` with a `Content-Length` body.
async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> anyhow::Result<Answer> {
    let mut request = request_head(path, headers);
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    exchange(addr, &bytes).await
}

fn request_head(path: &str, headers: &[(String, String)]) -> String {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
    {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head
}

/// Sends raw request bytes and reads the answer until the server closes the connection.
async fn exchange(addr: SocketAddr, request: &[u8]) -> anyhow::Result<Answer> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    // A server refusing a body early may close before taking all of it; its answer still counts.
    let _ = stream.write_all(request).await;
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            Err(_) if !response.is_empty() => break,
            Err(error) => return Err(error.into()),
        }
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP response: {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let body = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).with_context(|| format!("answer body {body:?}"))?
    };
    Ok(Answer { status, body })
}

/// Messages stored on `subject` in FACTORY_EVENTS.
async fn messages_on(env: &TestEnv, subject: &str) -> anyhow::Result<usize> {
    let js = env.js().await?;
    let stream = js.get_stream("FACTORY_EVENTS").await?;
    let mut subjects = stream.info_with_subjects(subject).await?;
    let mut count = 0;
    while let Some(entry) = subjects.next().await {
        let (name, n) = entry?;
        if name == subject {
            count += n;
        }
    }
    Ok(count)
}

fn metrics_text() -> String {
    taskfactory_runtime::metrics::handle().render()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_deliveries_are_published_and_fire_webhook_runs() -> anyhow::Result<()> {
    let env = TestEnv::new(options()).await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    create(
        &mut admin,
        "name: shop-orders\ntrigger: {event: {subject: events.shop.orders}}\ntasks: [{name: t, type: log, params: {order: '{{ event.order }}'}}]",
    )
    .await?;

    let body = br#"{"order": "o-1"}"#;
    let answer = post(
        env.http_addr,
        "/hooks/shop",
        &signed(SECRET, now(), "d-1", body),
        body,
    )
    .await?;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.body["deliveryId"], "d-1");
    assert_eq!(answer.body["subject"], SUBJECT);
    assert!(answer.body["sequence"].as_u64().unwrap() >= 1, "{answer:?}");

    let run = wait_for("the webhook's run", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok(runs(&mut admin, "shop-orders").await?.into_iter().next()) }
    })
    .await?;
    let run = finished_run(&admin, &run.id, Duration::from_secs(20)).await?;
    assert_eq!(run.status(), RunStatus::RunSucceeded);
    assert_eq!(run.source(), TriggerSource::Webhook);
    assert_eq!(run.subject, SUBJECT);
    assert_eq!(run.dedupe_key, "webhook:shop:d-1");
    let task = tasks(&mut admin, &run.id).await?.remove(0);
    assert_eq!(
        struct_to_json(task.params.as_ref().unwrap())["order"],
        "o-1"
    );

    // Rotation: the hook's previous secret still verifies, and of several signatures one is enough.
    let body = br#"{"order": "o-2"}"#;
    let answer = post(
        env.http_addr,
        "/hooks/shop",
        &signed(OLD_SECRET, now(), "d-2", body),
        body,
    )
    .await?;
    assert_eq!(answer.status, 202, "{answer:?}");
    let body = br#"{"order": "o-3"}"#;
    let mut headers = signed(SECRET, now(), "d-3", body);
    headers[2].1 = format!("v1={},{}", "00".repeat(32), headers[2].1);
    let answer = post(env.http_addr, "/hooks/shop", &headers, body).await?;
    assert_eq!(answer.status, 202, "{answer:?}");

    wait_for("three webhook runs", Duration::from_secs(20), || {
        let mut admin = admin.clone();
        async move { Ok((runs(&mut admin, "shop-orders").await?.len() == 3).then_some(())) }
    })
    .await?;
    assert_eq!(messages_on(&env, SUBJECT).await?, 3);
    assert!(
        metrics_text().contains(r#"taskfactory_webhook_deliveries_total{outcome="accepted"}"#),
        "{}",
        metrics_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unauthenticated_deliveries_get_401_and_publish_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new(options()).await?;
    let trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let addr = env.http_addr;

    let body = br#"{"order": "o-1"}"#.to_vec();
    let accepted = signed(SECRET, now(), "d-1", &body);
    let answer = post(addr, "/hooks/shop", &accepted, &body).await?;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(messages_on(&env, SUBJECT).await?, 1);

    let mut flipped = body.clone();
    flipped[5] ^= 0x01;
    let without = |header: &str| -> Headers {
        signed(SECRET, now(), "d-9", &body)
            .into_iter()
            .filter(|(name, _)| name != header)
            .collect()
    };
    let cases: Vec<(&str, Headers, Vec<u8>, &str)> = vec![
        (
            "wrong secret",
            signed("not-the-shop-secret-at-all-0000", now(), "d-2", &body),
            body.clone(),
            "signature does not match",
        ),
        (
            "one flipped body bit",
            signed(SECRET, now(), "d-3", &body),
            flipped,
            "signature does not match",
        ),
        (
            "a timestamp 6 minutes old",
            signed(SECRET, now() - 360, "d-4", &body),
            body.clone(),
            "5 minutes",
        ),
        (
            "a timestamp 6 minutes ahead",
            signed(SECRET, now() + 360, "d-5", &body),
            body.clone(),
            "5 minutes",
        ),
        (
            "the accepted request sent again",
            accepted.clone(),
            body.clone(),
            "already received",
        ),
        (
            "the accepted delivery id, freshly signed over another body",
            signed(SECRET, now(), "d-1", br#"{"order": "o-2"}"#),
            br#"{"order": "o-2"}"#.to_vec(),
            "already received",
        ),
        (
            "no delivery header",
            without(webhook::HEADER_DELIVERY),
            body.clone(),
            "missing Taskfactory-Delivery header",
        ),
        (
            "no timestamp header",
            without(webhook::HEADER_TIMESTAMP),
            body.clone(),
            "missing Taskfactory-Timestamp header",
        ),
        (
            "no signature header",
            without(webhook::HEADER_SIGNATURE),
            body.clone(),
            "missing Taskfactory-Signature header",
        ),
        (
            "a malformed delivery id",
            signed(SECRET, now(), "d 6", &body),
            body.clone(),
            "malformed Taskfactory-Delivery header",
        ),
    ];
    for (case, headers, sent, expected) in cases {
        let answer = post(addr, "/hooks/shop", &headers, &sent).await?;
        assert_eq!(answer.status, 401, "{case}: {answer:?}");
        assert!(answer.error().contains(expected), "{case}: {answer:?}");
    }

    // Nothing was published and no delivery id but the accepted one was used up.
    assert_eq!(messages_on(&env, SUBJECT).await?, 1);
    let pool = env.db.pool().await?;
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT delivery_id FROM webhook_deliveries ORDER BY delivery_id")
            .fetch_all(&pool)
            .await?;
    assert_eq!(ids, ["d-1"]);
    let metrics = metrics_text();
    for outcome in ["unauthorized", "stale", "replayed"] {
        assert!(
            metrics.contains(&format!(
                r#"taskfactory_webhook_deliveries_total{{outcome="{outcome}"}}"#
            )),
            "{outcome}: {metrics}"
        );
    }
    trigger.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_unknown_and_non_json_deliveries_are_refused() -> anyhow::Result<()> {
    let env = TestEnv::new(options()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let addr = env.http_addr;
    let padded = |size: usize| -> Vec<u8> {
        let mut body = br#"{"pad": ""#.to_vec();
        body.resize(size - 2, b'x');
        body.extend_from_slice(br#""}"#);
        body
    };

    // Exactly the hook's cap is taken.
    let body = padded(1024);
    let answer = post(
        addr,
        "/hooks/shop",
        &signed(SECRET, now(), "fits", &body),
        &body,
    )
    .await?;
    assert_eq!(answer.status, 202, "{answer:?}");

    // A declared length over the cap is refused before the body is sent.
    let body = padded(1025);
    let mut head = request_head("/hooks/shop", &signed(SECRET, now(), "big-1", &body));
    head.push_str("Content-Length: 1025\r\n\r\n");
    let answer = exchange(addr, head.as_bytes()).await?;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.error().contains("1024 bytes"), "{answer:?}");

    // A chunked body with no declared length is cut off where it passes the cap.
    let body = padded(2048);
    let mut request = request_head("/hooks/shop", &signed(SECRET, now(), "big-2", &body));
    request.push_str("Transfer-Encoding: chunked\r\n\r\n");
    let mut bytes = request.into_bytes();
    for chunk in body.chunks(512) {
        bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        bytes.extend_from_slice(chunk);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    let answer = exchange(addr, &bytes).await?;
    assert_eq!(answer.status, 413, "{answer:?}");

    let body = br#"{"order": 1}"#;
    let answer = post(
        addr,
        "/hooks/nope",
        &signed(SECRET, now(), "u-1", body),
        body,
    )
    .await?;
    assert_eq!(answer.status, 404, "{answer:?}");
    assert!(
        answer.error().contains(r#"no webhook named "nope""#),
        "{answer:?}"
    );

    let body = b"order=1";
    let answer = post(
        addr,
        "/hooks/shop",
        &signed(SECRET, now(), "j-1", body),
        body,
    )
    .await?;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.error().contains("not valid JSON"), "{answer:?}");

    assert_eq!(
        messages_on(&env, SUBJECT).await?,
        1,
        "only the delivery that fits"
    );
    let metrics = metrics_text();
    for outcome in ["too_large", "unknown_hook", "bad_request"] {
        assert!(
            metrics.contains(&format!(
                r#"taskfactory_webhook_deliveries_total{{outcome="{outcome}"}}"#
            )),
            "{outcome}: {metrics}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_that_could_not_be_published_can_be_sent_again() -> anyhow::Result<()> {
    let mut env = TestEnv::new(options()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let addr = env.http_addr;
    let body = br#"{"order": "o-1"}"#;

    env.nats.kill();
    let answer = post(
        addr,
        "/hooks/shop",
        &signed(SECRET, now(), "d-1", body),
        body,
    )
    .await?;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(
        answer.error().contains("send the same delivery again"),
        "{answer:?}"
    );

    env.nats.restart()?;
    wait_for(
        "the same delivery to be accepted",
        Duration::from_secs(30),
        || async move {
            let answer = post(
                addr,
                "/hooks/shop",
                &signed(SECRET, now(), "d-1", body),
                body,
            )
            .await?;
            match answer.status {
                202 => Ok(Some(())),
                503 => Ok(None),
                _ => bail!("unexpected answer {answer:?}"),
            }
        },
    )
    .await?;
    // However the first attempt fared inside NATS, the event is in the stream once.
    assert_eq!(messages_on(&env, SUBJECT).await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_over_the_nats_max_payload_is_413_not_503() -> anyhow::Result<()> {
    // The hook's cap (here --max-event-bytes, 10 MiB) is above the test server's max_payload (8 MB).
    let env = TestEnv::new(EnvOptions {
        max_event_bytes: 10 * 1024 * 1024,
        webhooks: vec![Hook {
            max_body_bytes: None,
            ..shop_hook()
        }],
        ..Default::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let mut body = br#"{"pad": ""#.to_vec();
    body.resize(9 * 1024 * 1024, b'x');
    body.extend_from_slice(br#""}"#);
    let headers = signed(SECRET, now(), "huge-1", &body);
    let answer = post(env.http_addr, "/hooks/shop", &headers, &body).await?;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.error().contains("NATS server"), "{answer:?}");
    assert_eq!(messages_on(&env, SUBJECT).await?, 0);
    // Nothing was kept: the delivery id is still free.
    let pool = env.db.pool().await?;
    let kept: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries")
        .fetch_one(&pool)
        .await?;
    assert_eq!(kept, 0);
    Ok(())
}

/// A provider's delivery answered as one taken before: 200, and nothing published again.
fn assert_duplicate(answer: &Answer) {
    assert_eq!(
        (answer.status, &answer.body["duplicate"]),
        (200, &serde_json::json!(true)),
        "{answer:?}"
    );
}

/// HMAC-SHA256 of `parts` under `key`, written here from the providers' documents (not the
/// gateway's code).
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// `application/x-www-form-urlencoded` bytes, as a browser or GitHub encodes them.
fn form_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn header(name: &str, value: impl Into<String>) -> (String, String) {
    (name.to_owned(), value.into())
}

const GITHUB_SECRET: &str = "github-webhook-secret-0001";
const STRIPE_SECRET: &str = "whsec_stripe-endpoint-secret-0001";
const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn github(secret: &str, delivery: &str, event: &str, body: &[u8]) -> Headers {
    let signature = hex::encode(hmac_sha256(secret.as_bytes(), &[body]));
    vec![
        header("X-GitHub-Delivery", delivery),
        header("X-GitHub-Event", event),
        header("X-Hub-Signature-256", format!("sha256={signature}")),
        header("User-Agent", "GitHub-Hookshot/044aadd"),
    ]
}

fn stripe(secret: &str, timestamp: i64, body: &[u8]) -> Headers {
    let t = timestamp.to_string();
    let v1 = hex::encode(hmac_sha256(secret.as_bytes(), &[t.as_bytes(), b".", body]));
    vec![header("Stripe-Signature", format!("t={t},v1={v1}"))]
}

fn slack(secret: &str, timestamp: i64, body: &[u8]) -> Headers {
    let t = timestamp.to_string();
    let v0 = hex::encode(hmac_sha256(
        secret.as_bytes(),
        &[b"v0:", t.as_bytes(), b":", body],
    ));
    vec![
        header("X-Slack-Request-Timestamp", t),
        header("X-Slack-Signature", format!("v0={v0}")),
    ]
}

fn standard(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Headers {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("base64");
    let t = timestamp.to_string();
    let mac = hmac_sha256(&key, &[id.as_bytes(), b".", t.as_bytes(), b".", body]);
    vec![
        header("webhook-id", id),
        header("webhook-timestamp", t),
        header(
            "webhook-signature",
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(mac)
            ),
        ),
    ]
}

/// GitHub, Stripe, Slack and Standard Webhooks senders post straight to their hooks: each signed
/// delivery fires one run (GitHub's event names the subject), a delivery sent again is answered
/// 200 "duplicate" and publishes nothing, forgeries and stale timestamps get 401, and Slack's
/// url_verification is answered with its challenge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_deliveries_fire_once_and_are_answered_as_each_provider_expects()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions {
        webhooks: vec![
            Hook::from_provider("gh", "events.github", GITHUB_SECRET, Provider::Github),
            Hook::from_provider("pay", "events.stripe", STRIPE_SECRET, Provider::Stripe),
            Hook::from_provider("chat", "events.slack", SLACK_SECRET, Provider::Slack),
            Hook::from_provider(
                "std",
                "events.standard",
                STANDARD_SECRET,
                Provider::StandardWebhooks,
            ),
        ],
        ..Default::default()
    })
    .await?;
    let _services = env.start_all().await?;
    let mut admin = env.admin().await?;
    for (name, subject, field) in [
        ("pushes", "events.github.push", "ref"),
        ("payments", "events.stripe", "type"),
        ("mentions", "events.slack", "event_id"),
        ("standard", "events.standard", "type"),
    ] {
        create(
            &mut admin,
            &format!(
                "name: {name}\ntrigger: {{event: {{subject: {subject}}}}}\ntasks: [{{name: t, type: log, params: {{got: '{{{{ event.{field} }}}}'}}}}]"
            ),
        )
        .await?;
    }
    let send = |path: &'static str, headers: Headers, body: &'static [u8]| {
        let addr = env.http_addr;
        async move { post(addr, path, &headers, body).await }
    };

    // GitHub: no timestamp; the delivery GUID is the id, and a redelivery carries the same one.
    let push =
        br#"{"ref": "refs/heads/main", "after": "6113728f27ae82c7b1a177c8d03f9e96e0adf246"}"#;
    let guid = "72d3162e-cc78-11e3-81ab-4c9367dc0958";
    let forged = send(
        "/hooks/gh",
        github("not-the-secret-at-all", guid, "push", push),
        push,
    )
    .await?;
    assert_eq!(forged.status, 401, "{forged:?}");
    let answer = send("/hooks/gh", github(GITHUB_SECRET, guid, "push", push), push).await?;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.body["subject"], "events.github.push");
    let again = send("/hooks/gh", github(GITHUB_SECRET, guid, "push", push), push).await?;
    assert_duplicate(&again);
    // GitHub signs neither the id nor the event name: the same signed body under another id, or
    // another event, is the delivery taken before, not a new event.
    let replayed = send(
        "/hooks/gh",
        github(GITHUB_SECRET, "a-new-guid-0001", "push", push),
        push,
    )
    .await?;
    assert_duplicate(&replayed);
    let moved = send(
        "/hooks/gh",
        github(GITHUB_SECRET, "a-new-guid-0002", "release", push),
        push,
    )
    .await?;
    assert_duplicate(&moved);
    // GitHub's `form` content type: the JSON is the payload field, the signature over the form.
    let form = format!(
        "payload={}",
        form_encode(
            br#"{"ref": "refs/heads/dev", "after": "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"}"#
        )
    );
    let form: &'static [u8] = Box::leak(form.into_bytes().into_boxed_slice());
    let mut headers = github(
        GITHUB_SECRET,
        "9e3f0c2a-cc78-11e3-81ab-4c9367dc0958",
        "push",
        form,
    );
    headers.push(header("Content-Type", "application/x-www-form-urlencoded"));
    let answer = send("/hooks/gh", headers, form).await?;
    assert_eq!(answer.status, 202, "{answer:?}");
    let ping = br#"{"zen": "Keep it logically awesome.", "hook_id": 1}"#;
    let answer = send(
        "/hooks/gh",
        github(
            GITHUB_SECRET,
            "0b6f4c4e-0000-11e3-81ab-4c9367dc0958",
            "ping",
            ping,
        ),
        ping,
    )
    .await?;
    assert_eq!(answer.body["subject"], "events.github.ping", "{answer:?}");

    // Stripe: the event's id is the delivery; a retry is signed anew with a new timestamp.
    let paid = br#"{"id": "evt_1NG8Du2eZvKYlo2CUI79vXWy", "object": "event", "type": "payment_intent.succeeded"}"#;
    let answer = send("/hooks/pay", stripe(STRIPE_SECRET, now(), paid), paid).await?;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.body["deliveryId"], "evt_1NG8Du2eZvKYlo2CUI79vXWy");
    let retry = send("/hooks/pay", stripe(STRIPE_SECRET, now() + 1, paid), paid).await?;
    assert_duplicate(&retry);
    let stale = send("/hooks/pay", stripe(STRIPE_SECRET, now() - 600, paid), paid).await?;
    assert_eq!(stale.status, 401, "{stale:?}");
    // The key is the whole whsec_ secret.
    let stripped = send(
        "/hooks/pay",
        stripe(STRIPE_SECRET.trim_start_matches("whsec_"), now(), paid),
        paid,
    )
    .await?;
    assert_eq!(stripped.status, 401, "{stripped:?}");

    // Slack: url_verification gets its challenge back (and publishes nothing); events by event_id.
    let challenge = br#"{"token": "Jhj5dZrVaK7ZwHHjRyZWjbDl", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}"#;
    let unsigned = send(
        "/hooks/chat",
        slack("another-signing-secret-000", now(), challenge),
        challenge,
    )
    .await?;
    assert_eq!(unsigned.status, 401, "{unsigned:?}");
    let answer = send(
        "/hooks/chat",
        slack(SLACK_SECRET, now(), challenge),
        challenge,
    )
    .await?;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.body["challenge"],
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );
    let mention = br#"{"type": "event_callback", "event_id": "Ev08MFMKH6", "event": {"type": "app_mention", "text": "hi"}}"#;
    let answer = send("/hooks/chat", slack(SLACK_SECRET, now(), mention), mention).await?;
    assert_eq!(answer.status, 202, "{answer:?}");
    let stale = send(
        "/hooks/chat",
        slack(SLACK_SECRET, now() - 301, mention),
        mention,
    )
    .await?;
    assert_eq!(stale.status, 401, "{stale:?}");
    let mut retried = slack(SLACK_SECRET, now(), mention);
    retried.push(header("X-Slack-Retry-Num", "1"));
    let retried = send("/hooks/chat", retried, mention).await?;
    assert_eq!(retried.status, 200, "{retried:?}");

    // Standard Webhooks: webhook-id, the key base64 after whsec_.
    let created = br#"{"type": "invoice.created", "data": {"id": "inv_1"}}"#;
    let answer = send(
        "/hooks/std",
        standard(
            STANDARD_SECRET,
            "msg_2bJ0e3Yd6YdRJd3ZjLq5bB8RRvU",
            now(),
            created,
        ),
        created,
    )
    .await?;
    assert_eq!(answer.status, 202, "{answer:?}");
    let ahead = send(
        "/hooks/std",
        standard(STANDARD_SECRET, "msg_ahead", now() + 400, created),
        created,
    )
    .await?;
    assert_eq!(ahead.status, 401, "{ahead:?}");
    let whole_key = {
        let mut headers = standard(STANDARD_SECRET, "msg_other", now(), created);
        let t = headers[1].1.clone();
        use base64::Engine as _;
        headers[2].1 = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(hmac_sha256(
                STANDARD_SECRET.as_bytes(),
                &[b"msg_other.", t.as_bytes(), b".", created]
            ))
        );
        headers
    };
    let answer = send("/hooks/std", whole_key, created).await?;
    assert_eq!(answer.status, 401, "{answer:?}");

    // One run each, named by the provider's delivery id (two for GitHub's pushes: the form's too).
    for (activity, key, got) in [
        ("pushes", format!("webhook:gh:{guid}"), "refs/heads/main"),
        (
            "payments",
            "webhook:pay:evt_1NG8Du2eZvKYlo2CUI79vXWy".to_owned(),
            "payment_intent.succeeded",
        ),
        (
            "mentions",
            "webhook:chat:Ev08MFMKH6".to_owned(),
            "Ev08MFMKH6",
        ),
        (
            "standard",
            "webhook:std:msg_2bJ0e3Yd6YdRJd3ZjLq5bB8RRvU".to_owned(),
            "invoice.created",
        ),
    ] {
        let run = wait_for(activity, Duration::from_secs(20), || {
            let mut admin = admin.clone();
            let key = key.clone();
            async move {
                Ok(runs(&mut admin, activity)
                    .await?
                    .into_iter()
                    .find(|run| run.dedupe_key == key))
            }
        })
        .await?;
        let run = finished_run(&admin, &run.id, Duration::from_secs(20)).await?;
        assert_eq!(run.status(), RunStatus::RunSucceeded, "{activity}");
        assert_eq!(run.source(), TriggerSource::Webhook, "{activity}");
        let task = tasks(&mut admin, &run.id).await?.remove(0);
        assert_eq!(struct_to_json(task.params.as_ref().unwrap())["got"], got);
        let expected = if activity == "pushes" { 2 } else { 1 };
        wait_for(activity, Duration::from_secs(20), || {
            let mut admin = admin.clone();
            async move { Ok((runs(&mut admin, activity).await?.len() == expected).then_some(())) }
        })
        .await?;
    }
    let pushes = runs(&mut admin, "pushes").await?;
    let dev = pushes
        .iter()
        .find(|run| run.dedupe_key == "webhook:gh:9e3f0c2a-cc78-11e3-81ab-4c9367dc0958")
        .context("the form-encoded push's run")?;
    let dev = finished_run(&admin, &dev.id, Duration::from_secs(20)).await?;
    let task = tasks(&mut admin, &dev.id).await?.remove(0);
    assert_eq!(
        struct_to_json(task.params.as_ref().unwrap())["got"],
        "refs/heads/dev"
    );
    // Delivery ids are kept as long as each provider sends a delivery again.
    let pool = env.db.pool().await?;
    let kept: Vec<(String, f64)> = sqlx::query_as(
        "SELECT hook, extract(epoch FROM expires_at - received_at)::float8 FROM webhook_deliveries \
         GROUP BY hook, 2 ORDER BY hook",
    )
    .fetch_all(&pool)
    .await?;
    let week = 7.0 * 24.0 * 3600.0;
    let kept: Vec<(&str, bool)> = kept
        .iter()
        .map(|(hook, secs)| {
            (
                hook.as_str(),
                (*secs - week).abs() < 60.0 || (*secs - 900.0).abs() < 60.0 && hook == "chat",
            )
        })
        .collect();
    assert_eq!(
        kept,
        [("chat", true), ("gh", true), ("pay", true), ("std", true)],
        "{kept:?}"
    );
    for (subject, published) in [
        ("events.github.push", 2),
        ("events.github.ping", 1),
        ("events.stripe", 1),
        ("events.slack", 1),
        ("events.standard", 1),
    ] {
        assert_eq!(messages_on(&env, subject).await?, published, "{subject}");
    }
    assert_eq!(messages_on(&env, "events.github.release").await?, 0);
    let metrics = metrics_text();
    for outcome in ["duplicate", "challenge"] {
        assert!(
            metrics.contains(&format!(
                r#"taskfactory_webhook_deliveries_total{{outcome="{outcome}"}}"#
            )),
            "{metrics}"
        );
    }
    Ok(())
}

/// Delivery ids are pruned at their own expiry, whatever hooks the pruning replica has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivery_ids_are_pruned_at_their_own_expiry() -> anyhow::Result<()> {
    let env = TestEnv::new(options()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let pool = env.db.pool().await?;
    sqlx::query(
        "INSERT INTO webhook_deliveries (hook, delivery_id, received_at, expires_at) VALUES \
         ('gone', 'a', now() - interval '8 days', now() - interval '1 day'), \
         ('shop', 'b', now() - interval '20 minutes', now() - interval '5 minutes'), \
         ('gh', 'c', now() - interval '1 day', now() + interval '6 days'), \
         ('shop', 'd', now(), now() + interval '15 minutes')",
    )
    .execute(&pool)
    .await?;
    assert_eq!(webhook::prune_expired(&pool).await?, 2);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT delivery_id FROM webhook_deliveries ORDER BY delivery_id")
            .fetch_all(&pool)
            .await?;
    assert_eq!(left, ["c", "d"]);
    Ok(())
}
