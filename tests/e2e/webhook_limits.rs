//! Bounds on what strangers can make the trigger hold through the webhook gateway: connections,
//! their timeouts, and the bodies in flight.
//!
//! Requests are written by hand over TCP, so a test controls exactly what a sender does (half a
//! header line, nothing at all, a kept-alive connection left idle).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use taskfactory_tests::{EnvOptions, Service, TestEnv, wait_for};
use taskfactory_trigger::webhook::{self, Hook, HttpLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{open_fds, proc_status_kib};

const SECRET: &str = "s3cr3t-shared-with-the-shop-0001";
/// Beyond a timeout, how long a test waits for what the timeout should have done (2 shared cores).
const MARGIN: Duration = Duration::from_secs(5);

fn gateway(http_limits: HttpLimits) -> EnvOptions {
    EnvOptions {
        webhooks: vec![Hook::new("shop", "events.shop.orders", SECRET)],
        http_limits,
        ..Default::default()
    }
}

/// Reads until the server closes the connection (or resets it); returns what it sent and when it
/// closed. Fails if it is still open after `patience`.
async fn read_until_closed(
    stream: &mut TcpStream,
    patience: Duration,
) -> anyhow::Result<(String, Instant)> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => bail!(
                "the server kept the connection open for {patience:?} (after {:?})",
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(0) | Err(_)) => {
                return Ok((
                    String::from_utf8_lossy(&received).into_owned(),
                    Instant::now(),
                ));
            }
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

/// Reads one answer on a connection that stays open: its head and `Content-Length` body.
async fn read_answer(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(MARGIN, stream.read(&mut buffer))
            .await
            .context("no answer")??;
        if n == 0 {
            bail!(
                "closed before the whole answer: {:?}",
                String::from_utf8_lossy(&received)
            );
        }
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .context("an answer without Content-Length")?;
            if body.len() >= length {
                return Ok(text);
            }
        }
    }
}

/// A whole request to a hook that does not exist (answered 404 at once, no signature needed).
fn unknown_hook_request(close: bool) -> Vec<u8> {
    format!(
        "POST /hooks/nope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{}Content-Length: 2\r\n\r\n{{}}",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// The head of a signed delivery to the `shop` hook, declaring a body of `length` bytes.
fn signed_head(delivery: &str, body: &[u8], length: usize, extra: &str) -> Vec<u8> {
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let signature = webhook::sign(SECRET.as_bytes(), &timestamp, delivery, body);
    format!(
        "POST /hooks/shop HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n\
         {}: {delivery}\r\n{}: {timestamp}\r\n{}: v1={signature}\r\n{extra}Content-Length: {length}\r\n\r\n",
        webhook::HEADER_DELIVERY,
        webhook::HEADER_TIMESTAMP,
        webhook::HEADER_SIGNATURE,
    )
    .into_bytes()
}

fn status(answer: &str) -> Option<u16> {
    answer.split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_connections_that_send_their_headers_slowly_are_closed() -> anyhow::Result<()> {
    let timeout = Duration::from_secs(1);
    let env = TestEnv::new(gateway(HttpLimits {
        header_timeout: timeout,
        ..Default::default()
    }))
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;

    let opened = Instant::now();
    // Half a header line, then nothing.
    let mut stalled = TcpStream::connect(env.http_addr).await?;
    stalled
        .write_all(b"POST /hooks/shop HTTP/1.1\r\nHost: 127.0.0.1\r\nTaskfactory-Deli")
        .await?;
    // Nothing at all.
    let mut silent = TcpStream::connect(env.http_addr).await?;
    // A header byte every 100 ms: always sending, never done.
    let mut trickling = TcpStream::connect(env.http_addr).await?;
    let (mut trickle_read, mut trickle_write) = trickling.split();
    let trickle = async {
        let head = b"POST /hooks/shop HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ".iter();
        for byte in head.chain(std::iter::repeat(&b'a')) {
            if trickle_write.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let trickle_closed = async {
        let deadline = tokio::time::Instant::now() + timeout + MARGIN;
        let mut buffer = [0u8; 1024];
        loop {
            match tokio::time::timeout_at(deadline, trickle_read.read(&mut buffer)).await {
                Err(_) => bail!("the trickling connection was kept open"),
                Ok(Ok(0) | Err(_)) => return Ok(Instant::now()),
                Ok(Ok(_)) => {}
            }
        }
    };
    let closed = tokio::select! {
        closed = trickle_closed => closed?,
        _ = trickle => bail!("the trickle ended before the connection closed"),
    };
    let mut closings = vec![("trickling", closed)];
    for (name, stream) in [("stalled", &mut stalled), ("silent", &mut silent)] {
        let (_, closed) = read_until_closed(stream, timeout + MARGIN)
            .await
            .with_context(|| format!("the {name} connection"))?;
        closings.push((name, closed));
    }
    for (name, closed) in closings {
        let after = closed - opened;
        assert!(
            after >= timeout,
            "the {name} connection was closed after {after:?}, before the header timeout"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_kept_alive_webhook_connections_are_closed() -> anyhow::Result<()> {
    let timeout = Duration::from_secs(1);
    let env = TestEnv::new(gateway(HttpLimits {
        header_timeout: timeout,
        ..Default::default()
    }))
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;

    let mut stream = TcpStream::connect(env.http_addr).await?;
    // Two requests on one connection: it is kept alive between them.
    let mut sent = Instant::now();
    for _ in 0..2 {
        sent = Instant::now();
        stream.write_all(&unknown_hook_request(false)).await?;
        let answer = read_answer(&mut stream).await?;
        assert_eq!(status(&answer), Some(404), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    let (rest, closed) = read_until_closed(&mut stream, timeout + MARGIN).await?;
    assert!(
        !rest.contains("HTTP/1.1 2"),
        "nothing but perhaps a timeout answer: {rest:?}"
    );
    // The timer starts when the answer is sent: after the request was.
    assert!(
        closed - sent >= timeout,
        "closed {:?} after the last request, before the idle timeout",
        closed - sent
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_webhook_gateway_serves_at_most_its_connection_cap_at_once() -> anyhow::Result<()> {
    let cap = 3;
    let timeout = Duration::from_secs(2);
    let env = TestEnv::new(gateway(HttpLimits {
        max_connections: cap,
        header_timeout: timeout,
        ..Default::default()
    }))
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;

    // The cap taken by connections that never finish their headers.
    let opened = Instant::now();
    let mut held = Vec::new();
    for _ in 0..cap {
        let mut stream = TcpStream::connect(env.http_addr).await?;
        stream
            .write_all(b"POST /hooks/shop HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await?;
        held.push(stream);
    }
    // More connections, each with a whole request: taken only as the held ones are let go.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(env.http_addr).await?;
        stream.write_all(&unknown_hook_request(true)).await?;
        waiting.push(tokio::spawn(async move {
            read_until_closed(&mut stream, timeout + MARGIN).await
        }));
    }
    // Meanwhile the gauge shows the cap (checked after the answers, which say more when wrong).
    let counted = wait_for(
        "the gateway to count its open connections",
        MARGIN,
        || async {
            let text = taskfactory_runtime::metrics::handle().render();
            Ok(text
                .lines()
                .any(|line| line == format!("taskfactory_webhook_connections {cap}"))
                .then_some(()))
        },
    )
    .await;

    for waiter in waiting {
        let (answer, answered) = waiter.await??;
        assert_eq!(status(&answer), Some(404), "{answer}");
        let after = answered - opened;
        assert!(
            after >= timeout,
            "answered after {after:?}, while the cap of {cap} was taken by other connections"
        );
    }
    counted?;
    for mut stream in held {
        read_until_closed(&mut stream, MARGIN).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_bodies_wait_for_room_among_those_in_flight() -> anyhow::Result<()> {
    let body_timeout = Duration::from_secs(10);
    let env = TestEnv::new(EnvOptions {
        max_event_bytes: 1024,
        ..gateway(HttpLimits {
            body_timeout,
            body_bytes_in_flight: 1024,
            ..Default::default()
        })
    })
    .await?;
    let _trigger = env.start(Service::Trigger);
    env.wait_ready(&[Service::Trigger]).await?;

    // A sender that declares a body at the cap takes all the room, and sends nothing; its
    // `100 Continue` says the gateway set the room aside and waits for the body.
    let mut holder = TcpStream::connect(env.http_addr).await?;
    holder
        .write_all(&signed_head("held", b"", 1024, "Expect: 100-continue\r\n"))
        .await?;
    let mut buffer = [0u8; 256];
    let n = tokio::time::timeout(MARGIN, holder.read(&mut buffer))
        .await
        .context("no 100 Continue")??;
    let interim = String::from_utf8_lossy(&buffer[..n]).into_owned();
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim:?}");

    // A small delivery waits for that room: still unanswered a second later.
    let body = br#"{"order": "o-1"}"#;
    let mut request = signed_head("small", body, body.len(), "");
    request.extend_from_slice(body);
    let mut sender = TcpStream::connect(env.http_addr).await?;
    sender.write_all(&request).await?;
    let mut answer =
        tokio::spawn(async move { read_until_closed(&mut sender, body_timeout + MARGIN).await });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut answer)
            .await
            .is_err(),
        "the delivery was answered while another body held all the room"
    );
    // The holder goes away: its room is given back, and the delivery is taken.
    drop(holder);
    let (answer, _) = answer.await??;
    assert_eq!(status(&answer), Some(202), "{answer}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_cap_cost_the_trigger_no_descriptors_or_memory() -> anyhow::Result<()>
{
    let cap = 50;
    let env = TestEnv::new(EnvOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let hooks = dir.path().join("webhooks.yaml");
    std::fs::write(
        &hooks,
        format!("hooks: [{{name: shop, subject: events.shop.orders, secret: {SECRET}}}]\n"),
    )?;
    let trigger = env.spawn_process(
        Service::Trigger,
        &[
            ("TASKFACTORY_WEBHOOKS", hooks.to_str().context("path")?),
            ("TASKFACTORY_HTTP_MAX_CONNECTIONS", &cap.to_string()),
            ("TASKFACTORY_HTTP_HEADER_TIMEOUT", "60s"),
        ],
    )?;
    let pid = trigger.pid().context("a process")?;
    env.wait_ready(&[Service::Trigger]).await?;
    wait_for("the webhook gateway", MARGIN, || async {
        Ok(TcpStream::connect(env.http_addr).await.ok())
    })
    .await?;
    let fds_before = open_fds(pid)?;
    let rss_before = proc_status_kib(pid, "VmRSS");

    // Three times the cap, each with 15 KiB of a head that never ends (those beyond the cap wait
    // in the accept queue, 128 deep).
    let mut padding = String::from("POST /hooks/shop HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    while padding.len() < 15 * 1024 {
        padding.push_str("X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let mut streams = Vec::new();
    for _ in 0..3 * cap {
        let mut stream = TcpStream::connect(env.http_addr).await?;
        stream.write_all(padding.as_bytes()).await?;
        streams.push(stream);
    }
    // Give or take a few descriptors the process opens or closes meanwhile (database
    // connections, the probe's connection).
    let slack = 8;
    wait_for("the gateway to take the cap's worth", MARGIN, || async {
        Ok((open_fds(pid)? + 2 >= fds_before + cap).then_some(()))
    })
    .await?;
    let fds = open_fds(pid)?;
    let rss = proc_status_kib(pid, "VmRSS");
    assert!(
        fds <= fds_before + cap + slack,
        "{} descriptors more with {} connections open and a cap of {cap}",
        fds - fds_before,
        streams.len()
    );
    // 50 connections of 15 KiB heads cost about 1 MiB; the 150 would take 2.25 MiB of heads alone.
    // The descriptors above are the cap's exact check; this one bounds memory with room for what
    // else the process allocates meanwhile (2072 KiB was seen once under load with a 2 MiB bound).
    assert!(
        rss.saturating_sub(rss_before) < 4 * 1024,
        "{} KiB more with {} connections open and a cap of {cap}",
        rss - rss_before,
        streams.len()
    );
    Ok(())
}
