//! How the admin API tells who is calling: tokens from the auth file (reloaded on change), OIDC
//! JWTs against a JWKS file or URL, client certificates; and the rule that without any of them it
//! serves loopback only.

use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use taskfactory_proto::v1::{ListActivitiesRequest, ListAuditEventsRequest};
use taskfactory_tests::auth::token_entry;
use taskfactory_tests::{EnvOptions, Service, TestEnv, free_port, wait_for, workspace_root};
use taskfactory_trigger::auth::AuthArgs;
use taskfactory_trigger::auth::client::ClientArgs;
use tonic::Code;

async fn list_code(env: &TestEnv, token: Option<&str>) -> anyhow::Result<Code> {
    let mut client = env.admin_as(token).await?;
    Ok(
        match client
            .list_activities(ListActivitiesRequest::default())
            .await
        {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        },
    )
}

async fn refusal(env: &TestEnv, token: Option<&str>) -> anyhow::Result<tonic::Status> {
    let mut client = env.admin_as(token).await?;
    Ok(client
        .list_activities(ListActivitiesRequest::default())
        .await
        .expect_err("refused"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_valid_credentials_only_health_and_reflection_answer() -> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;

    let status = refusal(&env, None).await?;
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("authorization: Bearer"),
        "{status:?}"
    );
    let status = refusal(&env, Some("tf_not-a-token-we-know-0123456789")).await?;
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("not recognised"));
    // A token of the right shape but another scheme.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", env.grpc_addr))?
        .connect()
        .await?;
    let admin_token = env.tokens.as_ref().expect("auth on").admin.clone();
    let mut basic =
        taskfactory_proto::v1::admin_service_client::AdminServiceClient::with_interceptor(
            channel.clone(),
            move |mut request: tonic::Request<()>| {
                request.metadata_mut().insert(
                    "authorization",
                    format!("Basic {admin_token}").parse().expect("ascii"),
                );
                Ok(request)
            },
        );
    let status = basic
        .list_activities(ListActivitiesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // Health and reflection stay open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    assert_eq!(answer.into_inner().status, 1, "SERVING");
    use futures::StreamExt as _;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    let mut reflection = ServerReflectionClient::new(channel);
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([
            tonic_reflection::pb::v1::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
        ]))
        .await?
        .into_inner();
    assert!(answers.next().await.expect("an answer").is_ok());

    // Refusals are counted, never audited (nobody to record) and never carried out.
    let mut admin = env.admin().await?;
    let events = admin
        .list_audit_events(ListAuditEventsRequest::default())
        .await?
        .into_inner()
        .events;
    assert!(events.is_empty(), "{events:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_auth_file_is_read_again_when_it_changes_and_a_broken_one_keeps_the_last()
-> anyhow::Result<()> {
    let env = TestEnv::new(EnvOptions::default()).await?;
    let tokens = env.tokens.as_ref().expect("auth on");
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;

    let rotated = "tf_rotated-in-token-0123456789abcdef";
    assert_eq!(list_code(&env, Some(rotated)).await?, Code::Unauthenticated);
    // The viewer's token is replaced by a new one, without a restart.
    tokens.write_document(&format!(
        "tokens:\n{}{}",
        token_entry("test-admin", &tokens.admin, &["admin"]),
        token_entry("rotated", rotated, &["viewer"]),
    ))?;
    wait_for("the new token", Duration::from_secs(15), || async {
        Ok((list_code(&env, Some(rotated)).await? == Code::Ok).then_some(()))
    })
    .await?;
    assert_eq!(
        list_code(&env, Some(&tokens.viewer)).await?,
        Code::Unauthenticated,
        "the removed token no longer works"
    );

    // A file that does not parse changes nothing.
    tokens.write_document("tokens: [{subject: broken}]\n")?;
    tokio::time::sleep(Duration::from_secs(3)).await; // two polls of the file, to see nothing happen
    assert_eq!(list_code(&env, Some(rotated)).await?, Code::Ok);

    // An expired token is refused, saying so.
    let expired = "tf_expired-token-0123456789abcdef0";
    tokens.write_document(&format!(
        "tokens:\n{}  - subject: old\n    sha256: {}\n    roles: [viewer]\n    expiresAt: 2020-01-01T00:00:00Z\n",
        token_entry("test-admin", &tokens.admin, &["admin"]),
        taskfactory_trigger::auth::file::token_hash_hex(expired),
    ))?;
    let status = wait_for(
        "the expiring token's entry",
        Duration::from_secs(15),
        || async {
            let status = refusal(&env, Some(expired)).await?;
            Ok(status.message().contains("expired").then_some(status))
        },
    )
    .await?;
    assert_eq!(status.code(), Code::Unauthenticated);
    Ok(())
}

/// An EC P-256 signing key, its JWK, and tokens it signs.
struct Signer {
    kid: String,
    key: EncodingKey,
    jwk: serde_json::Value,
}

impl Signer {
    fn generate(kid: &str) -> anyhow::Result<Self> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let raw = pair.public_key_raw();
        anyhow::ensure!(
            raw.len() == 65 && raw[0] == 4,
            "an uncompressed P-256 point"
        );
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Ok(Self {
            kid: kid.to_owned(),
            key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())?,
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
            }),
        })
    }

    fn sign(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &self.key)?)
    }
}

const ISSUER: &str = "https://idp.example.com/";
const AUDIENCE: &str = "taskfactory";

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "ada@example.com", "exp": now + 600, "iat": now,
        "roles": ["taskfactory:viewer", "some-other-app:admin"],
    });
    if let (Some(base), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            if value.is_null() {
                base.remove(key);
            } else {
                base.insert(key.clone(), value.clone());
            }
        }
    }
    claims
}

fn oidc_args(jwks: String) -> AuthArgs {
    AuthArgs {
        oidc_issuer: Some(ISSUER.to_owned()),
        oidc_audience: Some(AUDIENCE.to_owned()),
        oidc_jwks: Some(jwks),
        oidc_role_prefix: "taskfactory:".to_owned(),
        oidc_clock_skew: Duration::from_secs(30),
        oidc_unknown_key_refetch: Duration::from_millis(200),
        ..AuthArgs::default()
    }
}

/// A token whose header and claims are whatever we say, signed by nothing (`none`) or with HS256
/// keyed by the public key (the classic confusion attack).
fn unsigned(alg: &str, claims: &serde_json::Value, key: &[u8]) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(serde_json::json!({"alg": alg, "typ": "JWT", "kid": "k1"})
        .to_string()
        .as_bytes());
    let body = b64(claims.to_string().as_bytes());
    let signature = if alg == "HS256" {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
        mac.update(format!("{header}.{body}").as_bytes());
        b64(&mac.finalize().into_bytes())
    } else {
        String::new()
    };
    format!("{header}.{body}.{signature}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oidc_tokens_are_checked_for_signature_algorithm_issuer_audience_and_time()
-> anyhow::Result<()> {
    let signer = Signer::generate("k1")?;
    let stranger = Signer::generate("k1")?; // same kid, another key
    let dir = tempfile::tempdir()?;
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::json!({"keys": [signer.jwk]}).to_string())?;
    let env = TestEnv::new(EnvOptions {
        auth: oidc_args(jwks.display().to_string()),
        ..EnvOptions::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;

    let good = signer.sign(&claims(serde_json::json!({})))?;
    assert_eq!(list_code(&env, Some(&good)).await?, Code::Ok);
    // Its roles: viewer (the prefix picked it out), nothing from the other application.
    let mut client = env.admin_as(Some(&good)).await?;
    let status = client
        .list_audit_events(ListAuditEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().starts_with("ada@example.com (viewer)"),
        "{status:?}"
    );

    let now = chrono::Utc::now().timestamp();
    let public_jwk = serde_json::to_vec(&signer.jwk)?;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            signer.sign(&claims(serde_json::json!({"exp": now - 120})))?,
            "expired",
        ),
        (
            "wrong audience",
            signer.sign(&claims(serde_json::json!({"aud": "someone-else"})))?,
            "audience",
        ),
        (
            "wrong issuer",
            signer.sign(&claims(
                serde_json::json!({"iss": "https://evil.example.com/"}),
            ))?,
            "issuer",
        ),
        (
            "wrong key",
            stranger.sign(&claims(serde_json::json!({})))?,
            "signature",
        ),
        (
            "not yet valid",
            signer.sign(&claims(serde_json::json!({"nbf": now + 600})))?,
            "not valid yet",
        ),
        (
            "no expiry",
            signer.sign(&claims(serde_json::json!({"exp": null})))?,
            "exp",
        ),
        (
            "alg none",
            unsigned("none", &claims(serde_json::json!({})), b""),
            "algorithm",
        ),
        (
            "HS256 keyed with the public key",
            unsigned("HS256", &claims(serde_json::json!({})), &public_jwk),
            "algorithm",
        ),
        (
            "garbage",
            "eyJhbGciOiJFUzI1NiJ9.not-base64!.x".to_owned(),
            "",
        ),
    ];
    for (case, token, says) in cases {
        let status = refusal(&env, Some(&token)).await?;
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        assert!(
            status.message().contains(says),
            "{case}: {:?} should mention {says:?}",
            status.message()
        );
    }
    // Within the allowed clock skew, a token just past its expiry still passes.
    let recent = signer.sign(&claims(serde_json::json!({"exp": now - 5})))?;
    assert_eq!(list_code(&env, Some(&recent)).await?, Code::Ok);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oidc_keys_from_a_url_follow_a_rotation() -> anyhow::Result<()> {
    let first = Signer::generate("first")?;
    let second = Signer::generate("second")?;
    let keys = std::sync::Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [first.jwk]}),
    ));
    let served = keys.clone();
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let served = served.clone();
            async move { axum::Json(served.lock().expect("not poisoned").clone()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/jwks", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let env = TestEnv::new(EnvOptions {
        auth: oidc_args(url),
        ..EnvOptions::default()
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;
    let old = first.sign(&claims(serde_json::json!({})))?;
    let new = second.sign(&claims(serde_json::json!({})))?;
    assert_eq!(list_code(&env, Some(&old)).await?, Code::Ok);
    let status = refusal(&env, Some(&new)).await?;
    assert!(
        status.message().contains("no key of the JWKS"),
        "{status:?}"
    );

    // The provider rotates: a token with the new kid makes the keys be fetched again.
    *keys.lock().expect("not poisoned") = serde_json::json!({"keys": [second.jwk]});
    wait_for("the rotated key", Duration::from_secs(15), || async {
        Ok((list_code(&env, Some(&new)).await? == Code::Ok).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_certificates_identify_callers_and_a_foreign_ca_is_refused() -> anyhow::Result<()> {
    let ours = taskfactory_tests::tls::TlsFiles::generate()?;
    let foreign = taskfactory_tests::tls::TlsFiles::generate()?;
    let env = TestEnv::new(EnvOptions {
        auth: AuthArgs {
            tls_cert: Some(ours.server_cert.clone()),
            tls_key: Some(ours.server_key.clone()),
            client_ca: Some(ours.ca.clone()),
            ..AuthArgs::default()
        },
        ..EnvOptions::default()
    })
    .await?;
    let tokens = env.tokens.as_ref().expect("auth on");
    // The test's client certificate is called taskfactory-client: an operator.
    tokens.write_document(&format!(
        "tokens:\n{}certificates:\n  - {{subject: taskfactory-client, roles: [operator]}}\n",
        tokens.entries()
    ))?;
    let _trigger = env.start(Service::Trigger);
    let url = format!("https://127.0.0.1:{}", env.grpc_addr.port());
    let client = |ca: &std::path::Path,
                  cert: Option<(&std::path::Path, &std::path::Path)>,
                  token: Option<&str>| ClientArgs {
        admin_url: url.clone(),
        token: token.map(str::to_owned),
        ca: Some(ca.to_path_buf()),
        cert: cert.map(|(c, _)| c.to_path_buf()),
        key: cert.map(|(_, k)| k.to_path_buf()),
    };

    let with_cert = client(&ours.ca, Some((&ours.client_cert, &ours.client_key)), None);
    let mut admin = wait_for(
        "the admin API over TLS",
        Duration::from_secs(30),
        || async { Ok(with_cert.connect().await.ok()) },
    )
    .await?;
    admin
        .list_activities(ListActivitiesRequest::default())
        .await?;
    let status = admin
        .list_audit_events(ListAuditEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status
            .message()
            .starts_with("taskfactory-client (operator)"),
        "{status:?}"
    );

    // A token still works over TLS without a certificate.
    let mut by_token = client(&ours.ca, None, Some(&tokens.admin))
        .connect()
        .await?;
    by_token
        .list_audit_events(ListAuditEventsRequest::default())
        .await?;
    // Without either: unauthenticated.
    let mut anonymous = client(&ours.ca, None, None).connect().await?;
    assert_eq!(
        anonymous
            .list_activities(ListActivitiesRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );

    // A certificate from another CA does not even get a connection through.
    let outsider = client(
        &ours.ca,
        Some((&foreign.client_cert, &foreign.client_key)),
        None,
    );
    // (With TLS 1.3 the client may finish its side of the handshake before the server refuses
    // the certificate: then the first call fails instead of the connection.)
    if let Ok(mut client) = outsider.connect().await {
        let answer = client
            .list_activities(ListActivitiesRequest::default())
            .await;
        match answer {
            Ok(_) => panic!("a client certificate from a foreign CA was accepted"),
            Err(status) => assert!(
                !matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ),
                "refused by the TLS handshake, not by the API: {status:?}"
            ),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_authentication_the_trigger_refuses_to_listen_beyond_loopback() -> anyhow::Result<()>
{
    let env = TestEnv::new(EnvOptions {
        admin_auth: false,
        ..EnvOptions::default()
    })
    .await?;
    let exposed = format!("0.0.0.0:{}", free_port());
    let output =
        std::process::Command::new(workspace_root().join("target/debug/taskfactory-trigger"))
            .env("NATS_URL", env.nats_urls())
            .env("DATABASE_URL", env.db.url())
            .env("TASKFACTORY_GRPC_ADDR", &exposed)
            .env("TASKFACTORY_STARTUP_PATIENCE", "5s")
            .env("RUST_LOG", "warn")
            .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("without authentication") && stderr.contains("--insecure-no-auth"),
        "{stderr}"
    );

    // With the explicit flag it starts, and says so loudly.
    let insecure = env.spawn_process(
        Service::Trigger,
        &[
            ("TASKFACTORY_GRPC_ADDR", exposed.as_str()),
            ("TASKFACTORY_INSECURE_NO_AUTH", "true"),
        ],
    )?;
    let port = exposed.rsplit(':').next().unwrap_or_default().to_owned();
    wait_for(
        "the insecure admin API",
        Duration::from_secs(30),
        || async {
            Ok(tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
                .await
                .ok())
        },
    )
    .await?;
    insecure.stop().await?;
    Ok(())
}
