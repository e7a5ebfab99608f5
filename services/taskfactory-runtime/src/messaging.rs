//! The one publish helper and the one consume loop.
//!
//! - Publishing: every message we put on a stream goes through [`publish`], which sets
//!   `Nats-Msg-Id` (JetStream drops a repeat inside the duplicate window) and is the single place
//!   where outgoing headers are built.
//! - Consuming: [`consume`] pulls from a durable consumer only as many messages as it has free
//!   handler slots (so nothing waits in a buffer past `ack_wait`), runs the handler for each, and
//!   on shutdown stops pulling, hands back what was delivered but not started, and lets the
//!   messages in hand finish. A message in hand is never abandoned halfway.
//! - Settling: a handler ([`Handler`]) returns `Result<(), E>`, and its error says what becomes
//!   of the message ([`Unfinished::then`]): delivered again after a backoff, delivered again after
//!   a delay of its own, or dead-lettered. [`consume`] settles every message, and dead-letters in
//!   one format for every consumer ([`dead_letter`]). No message is delivered forever: past its
//!   consumer's delivery limit ([`ConsumerSpec::max_deliveries`]) it is dead-lettered with its
//!   last error and terminated, and one delivered past the limit without its handler ever
//!   finishing (the process crashed, or the handler hung past `ack_wait`) is dead-lettered before
//!   the handler sees it again.
//! - Tracing: each publish is a producer span whose context goes out in the message headers; each
//!   handler runs in a consumer span that continues the context the message carries
//!   ([`crate::propagation`]). Names and attributes follow the OpenTelemetry messaging
//!   conventions (`publish <subject>`, `process <subject>`, `messaging.*`).

use crate::pull::{Pulled, Puller};
use crate::telemetry::error_chain;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, Message};
use bytes::Bytes;
use futures::StreamExt;
use taskfactory_model::subjects;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// Publishes `payload` to `subject` with `Nats-Msg-Id` = `msg_id` and any extra headers; returns
/// the ack future (await it before acking what caused the publish).
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    extra_headers: Option<HeaderMap>,
    payload: Bytes,
) -> Result<PublishAckFuture, PublishError> {
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("publish {}", subjects::destination_template(&subject)),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %subject,
        messaging.destination.template = %subjects::destination_template(&subject),
        messaging.message.id = %msg_id,
        messaging.message.body.size = payload.len(),
    );
    let mut headers = extra_headers.unwrap_or_default();
    headers.insert(
        subjects::HEADER_MSG_ID,
        subjects::header_safe_msg_id(msg_id).as_ref(),
    );
    crate::propagation::inject_nats(&span, &mut headers);
    js.send_publish(
        subject,
        PublishMessage::build().payload(payload).headers(headers),
    )
    .instrument(span)
    .await
}

/// Publishes and waits for the stream's ack. `Ok(true)` when the server dropped it as a duplicate.
pub async fn publish_confirmed(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    extra_headers: Option<HeaderMap>,
    payload: Bytes,
) -> Result<bool, PublishError> {
    let ack = publish(js, subject, msg_id, extra_headers, payload)
        .await?
        .await?;
    Ok(ack.duplicate)
}

/// What becomes of a message its handler did not finish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// A transient failure (the database, NATS): delivered again after a backoff that grows with
    /// each delivery ([`backoff`]), until the delivery limit.
    Backoff,
    /// Delivered again after this delay (a task's own retry policy); counts toward the limit.
    RetryAfter(Duration),
    /// Never delivered again: dead-lettered with the error, then terminated. `refused`: the
    /// message was refused as not ours, and is counted in
    /// [`REFUSED_MESSAGES`](crate::metrics::REFUSED_MESSAGES) with this reason.
    DeadLetter { refused: Option<&'static str> },
}

/// A handler's error: its text is the message's dead-letter error, and it says what becomes of
/// the message.
pub trait Unfinished: std::fmt::Display + Send {
    fn then(&self) -> Then;

    /// Headers added to the message's dead letter, beyond the ones every dead letter has.
    fn dead_letter_headers(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// What a consumer does with each message. `Ok` acks it; an error settles it as the error says
/// ([`Unfinished::then`]).
pub trait Handler: Send + Sync + 'static {
    type Error: Unfinished;

    fn handle(&self, message: &Message) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Waits until the handler can take messages; [`consume`] pulls none before. A message it
    /// took could only be handed back, and every delivery counts toward the message's limit (an
    /// executor's: the task's attempts). Ready at once unless a handler says otherwise.
    fn ready(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// The delay before redelivering a message that failed transiently on its `delivered`th
/// delivery: 1 s, doubling, at most 30 s.
pub fn backoff(delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 5)).unwrap_or(5);
    Duration::from_secs(1 << doublings).min(Duration::from_secs(30))
}

/// How a consumed message was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Done: everything it caused is written and published.
    Ack,
    /// A transient failure: deliver it again after the delay.
    Retry(Duration),
    /// Never deliver it again (it has been dead-lettered or recorded as rejected).
    Term,
}

impl Disposition {
    fn name(self) -> &'static str {
        match self {
            Disposition::Ack => "ack",
            Disposition::Retry(_) => "nak",
            Disposition::Term => "term",
        }
    }
}

/// Settles a message; a failure to ack only means it will be delivered again, which every handler
/// tolerates, so it is logged and not propagated. A message not done is an error of its
/// consumer span.
pub async fn settle(message: &Message, disposition: Disposition) {
    let kind = match disposition {
        Disposition::Ack => AckKind::Ack,
        Disposition::Retry(delay) => AckKind::Nak(Some(delay)),
        Disposition::Term => AckKind::Term,
    };
    let span = tracing::Span::current();
    span.record("messaging.nats.settle", disposition.name());
    if disposition != Disposition::Ack {
        span.record("otel.status_code", "ERROR");
    }
    if let Err(error) = message.ack_with(kind).await {
        tracing::warn!(subject = %message.subject, error = %error_chain(&*error), ?disposition, "could not settle message; it will be redelivered");
    }
}

/// Tells the server the message is still being worked on (resets its `ack_wait`).
pub async fn keep_alive(message: &Message) {
    if let Err(error) = message.ack_with(AckKind::Progress).await {
        tracing::debug!(subject = %message.subject, error = %error_chain(&*error), "progress ack failed");
    }
}

/// Bytes of messages in hand at once, shared by a consumer's handlers: one permit per byte of a
/// message's payload. A message larger than the whole budget takes all of it, so it is handled
/// alone rather than never. What a message costs in memory is a multiple of its bytes (a JSON
/// tree of small objects takes tens of times its text), so this bounds that too.
#[derive(Clone)]
pub struct ByteBudget {
    room: Arc<Semaphore>,
    bytes: u32,
}

impl ByteBudget {
    pub fn new(bytes: usize) -> Self {
        let bytes = u32::try_from(bytes.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        Self {
            room: Arc::new(Semaphore::new(bytes as usize)),
            bytes,
        }
    }

    /// Waits for room for `bytes` (all of the budget for more than it); the room is given back
    /// when the permit is dropped.
    pub async fn room_for(&self, bytes: usize) -> tokio::sync::OwnedSemaphorePermit {
        let permits = u32::try_from(bytes.max(1))
            .unwrap_or(u32::MAX)
            .min(self.bytes);
        self.room
            .clone()
            .acquire_many_owned(permits)
            .await
            .expect("a byte budget is never closed")
    }
}

/// Keeps a message in hand alive: a progress ack every `every` until the returned guard is
/// dropped (on every path, a panic included).
pub fn heartbeat(message: &Message, every: Duration) -> Heartbeat {
    let message = message.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            keep_alive(&message).await;
        }
    });
    Heartbeat(task)
}

/// Stops the heartbeat when dropped.
pub struct Heartbeat(tokio::task::JoinHandle<()>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends a message that cannot be processed to a dead-letter subject: its payload and headers,
/// with the error ([`HEADER_ERROR`](subjects::HEADER_ERROR)), where it came from (original
/// subject, stream and stream sequence), how many times it was delivered, and `extra` headers.
/// Deduplicated by the original stream, sequence and time it was stored.
pub async fn dead_letter(
    js: &jetstream::Context,
    dlq_subject: String,
    message: &Message,
    error: &str,
    extra: &[(&'static str, String)],
) -> Result<(), PublishError> {
    // The message's own headers, but none the server would act on again when storing the letter
    // (an expected stream or sequence would refuse it; a TTL, rollup or schedule would change it).
    let mut headers = HeaderMap::new();
    if let Some(original) = &message.headers {
        for (name, values) in original.iter() {
            if is_server_directive(name.as_ref()) {
                continue;
            }
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    headers.insert(subjects::HEADER_ERROR, one_line(error).as_str());
    headers.insert(subjects::HEADER_ORIGINAL_SUBJECT, message.subject.as_str());
    let (stream, sequence, delivered, published) = match message.info() {
        Ok(info) => (
            info.stream.to_owned(),
            info.stream_sequence,
            info.delivered,
            info.published.unix_timestamp_nanos(),
        ),
        Err(_) => (String::new(), 0, 1, 0),
    };
    headers.insert(subjects::HEADER_ORIGINAL_STREAM, stream.as_str());
    headers.insert(
        subjects::HEADER_ORIGINAL_SEQUENCE,
        sequence.to_string().as_str(),
    );
    headers.insert(subjects::HEADER_DELIVERIES, delivered.to_string().as_str());
    for (name, value) in extra {
        headers.insert(*name, one_line(value).as_str());
    }
    // The time it was stored too: a stream deleted and declared again numbers from 1 again.
    let msg_id = format!("dlq:{stream}:{sequence}:{published}");
    publish_confirmed(
        js,
        dlq_subject,
        &msg_id,
        Some(headers),
        message.payload.clone(),
    )
    .await?;
    Ok(())
}

/// Whether a header asks the server to do something when the message is stored.
fn is_server_directive(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "nats-expected-",
        "nats-batch-",
        "nats-schedule",
        "nats-counter",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
        || ["nats-ttl", "nats-rollup", "nats-incr"].contains(&name.as_str())
}

/// A header value: one line, at most 2 KiB.
pub fn one_line(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() > 2048 {
        let cut = (0..=2048)
            .rev()
            .find(|i| line.is_char_boundary(*i))
            .unwrap_or(0);
        line.truncate(cut);
    }
    line
}

/// Where and how a consume loop pulls.
pub struct ConsumerSpec {
    pub stream: &'static str,
    pub durable: String,
    pub filter_subject: String,
    /// Messages in hand at once; also the fetch batch.
    pub concurrency: usize,
    /// Bytes of messages in hand at once, at most (0: bounded by `concurrency` alone): each
    /// pull asks the server for no more than the room left, so many small messages can be in
    /// hand together and a few large ones cannot exceed it. With nothing in hand a pull takes
    /// one message of any size the server allows.
    pub bytes_in_hand: usize,
    pub ack_wait: Duration,
    /// At shutdown, how long handlers in flight may take to finish; messages of those still
    /// running after it are redelivered (after `ack_wait`) once the process is gone.
    pub drain_timeout: Duration,
    /// Deliveries of one message before it is given up on and dead-lettered.
    pub max_deliveries: u32,
    /// The dead-letter subject of a message, from its subject.
    pub dead_letters: fn(&str) -> String,
    /// What the consumer takes in, for logs and the refused-messages metric (`trigger`,
    /// `result`, `event`, `task`).
    pub kind: &'static str,
}

impl ConsumerSpec {
    /// The durable consumer's configuration, as [`ensure_consumer`] declares it.
    pub fn config(&self) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(self.durable.clone()),
            filter_subject: self.filter_subject.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // The limit is ours (dead-letter, then terminate): the server's would leave the
            // message in the stream, undelivered and unrecorded.
            max_deliver: -1,
            // Each replica pulls only for its free slots; this only bounds all replicas together.
            max_ack_pending: 10_000,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        }
    }
}

/// Creates (or updates) the durable consumer.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
) -> Result<PullConsumer, async_nats::Error> {
    let stream = js.get_stream(spec.stream).await?;
    let consumer = stream.create_consumer(spec.config()).await.map_err(|e| {
        format!(
            "could not create consumer {} on {}: {e}",
            spec.durable, spec.stream
        )
    })?;
    Ok(consumer)
}

/// Puts a durable consumer back as `ours` declares it (`ours` as [`ConsumerSpec::config`] makes
/// it), for the keeper ([`crate::nats::keep_declared`]): created if it was deleted; if any
/// setting we choose was changed, or one that would keep it from delivering what we pull
/// (headers only, a cap on a pull's batch, bytes or expiry), those are put back and the others
/// kept. `Err` says what cannot be put back (a setting the server does not update, such as the
/// ack or deliver policy) and what to do.
pub async fn put_back_consumer(
    js: &jetstream::Context,
    stream: &str,
    ours: &consumer::pull::Config,
) -> Result<(), String> {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    let durable = ours.durable_name.clone().unwrap_or_default();
    let handle = match js.get_stream_no_info(stream).await {
        Ok(handle) => handle,
        // The stream itself is missing or unreachable: the keeper's stream declaration says so.
        Err(_) => return Ok(()),
    };
    let current = match handle.consumer_info(&durable).await {
        Ok(info) => Some(info.config),
        Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => None,
        Err(error) => {
            tracing::debug!(consumer = %durable, error = %error_chain(&error), "cannot look at the consumer");
            return Ok(());
        }
    };
    let ours_full = consumer::IntoConsumerConfig::into_consumer_config(ours.clone());
    let wanted = match &current {
        None => ours_full,
        Some(current) => consumer::Config {
            durable_name: ours_full.durable_name,
            filter_subject: ours_full.filter_subject,
            filter_subjects: Vec::new(),
            ack_policy: ours_full.ack_policy,
            ack_wait: ours_full.ack_wait,
            max_deliver: ours_full.max_deliver,
            max_ack_pending: ours_full.max_ack_pending,
            deliver_policy: ours_full.deliver_policy,
            headers_only: false,
            max_batch: current.max_batch.min(0),
            max_bytes: current.max_bytes.min(0),
            max_expires: Duration::ZERO,
            ..current.clone()
        },
    };
    if current.as_ref() == Some(&wanted) {
        return Ok(());
    }
    match js.create_consumer_on_stream(wanted, stream).await {
        Ok(_) if current.is_none() => {
            tracing::warn!(consumer = %durable, %stream, "consumer was missing; declared it again");
            Ok(())
        }
        Ok(_) => {
            tracing::warn!(consumer = %durable, %stream, "consumer settings were changed; put them back");
            Ok(())
        }
        Err(error) => Err(format!(
            "consumer {durable} on {stream} cannot be put back ({}); delete it (nats consumer rm {stream} {durable}) and the service declares it again within TASKFACTORY_DECLARE_EVERY",
            error_chain(&error)
        )),
    }
}

/// Pulls messages and runs `handler` on each, at most `spec.concurrency` at a time, until
/// `shutdown`; then waits (up to `spec.drain_timeout`) for the handlers in flight.
///
/// Messages are requested only once the handler is ready ([`Handler::ready`]) and only for free
/// handler slots (a pull batch sized to them), so no message
/// ever waits in a client buffer while its `ack_wait` runs out — the prefetch pitfall that would
/// otherwise redeliver, and run twice, messages nobody had started. The consumer is recreated
/// whenever pulling fails (server restart, consumer deleted).
pub async fn consume<H: Handler>(
    js: jetstream::Context,
    spec: ConsumerSpec,
    shutdown: CancellationToken,
    handler: Arc<H>,
) {
    let settler = Arc::new(Settler {
        js: js.clone(),
        durable: spec.durable.clone(),
        max_deliveries: spec.max_deliveries.max(1),
        dead_letters: spec.dead_letters,
        kind: spec.kind,
    });
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let held = Arc::new(HeldBytes::default());
    // Its own task, stopped (mid-request if need be) when the loop ends.
    let sampler = tokio::spawn(sample_consumer(
        js.clone(),
        spec.stream,
        spec.durable.clone(),
        shutdown.clone(),
    ));
    let mut backoff = Duration::from_millis(100);
    let mut puller = Puller::new(js.client());
    'reconnect: while !shutdown.is_cancelled() {
        let mut consumer = match ensure_consumer(&js, &spec).await {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::warn!(consumer = %spec.durable, error = %error_chain(&*error), "cannot consume yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'reconnect,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };

        let mut empty_pulls = 0u32;
        // Set when a message did not fit even with nothing in hand: the next pull takes it
        // alone, whatever its size.
        let mut take_one_whole = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break 'reconnect,
                _ = handler.ready() => {}
            }
            // Wait for one free slot, then take every other free one.
            let first = tokio::select! {
                _ = shutdown.cancelled() => break 'reconnect,
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            };
            let mut free = vec![first];
            while let Ok(slot) = slots.clone().try_acquire_owned() {
                free.push(slot);
            }
            let held_at_pull = held.bytes();
            let max_bytes = if spec.bytes_in_hand == 0 {
                0
            } else if take_one_whole {
                take_one_whole = false;
                free.truncate(1);
                0
            } else {
                let (bytes, one_only) = tokio::select! {
                    _ = shutdown.cancelled() => break 'reconnect,
                    room = held.room(spec.bytes_in_hand, max_payload(&js)) => room,
                };
                if one_only {
                    free.truncate(1);
                }
                bytes
            };
            // A request that could not be sent fails like one the server refused.
            let mut unsent = puller
                .request(&consumer, free.len(), max_bytes, PULL_EXPIRY)
                .await
                .err()
                .map(|error| error_chain(&*error));
            let mut received = false;
            loop {
                let next = match unsent.take() {
                    Some(error) => Pulled::Failed(error),
                    None => tokio::select! {
                        _ = shutdown.cancelled() => break 'reconnect,
                        next = puller.next(&js) => next,
                    },
                };
                match next {
                    Pulled::Message(message) => {
                        received = true;
                        backoff = Duration::from_millis(100);
                        let Some(slot) = free.pop() else {
                            // More than asked for: never expected; give it back at once.
                            settle(&message, Disposition::Retry(Duration::ZERO)).await;
                            continue;
                        };
                        crate::metrics::record_delivery(
                            &spec.durable,
                            message.info().map_or(1, |info| info.delivered),
                        );
                        let (handler, settler) = (handler.clone(), settler.clone());
                        let span = consumer_span(&message, &spec.durable);
                        let bytes = held.take(message.length);
                        tracker.spawn(
                            async move {
                                settler.run(&*handler, &message).await;
                                drop((slot, bytes));
                            }
                            .instrument(span),
                        );
                    }
                    // The next message would pass the bytes asked for: the next pull waits for
                    // room, or takes it alone if nothing is in hand.
                    Pulled::Over { too_large: true } => {
                        if !received {
                            if held.bytes() == 0 {
                                tracing::warn!(consumer = %spec.durable, "a message larger than a pull may ask for; taking it alone");
                                take_one_whole = true;
                            } else {
                                tokio::select! {
                                    _ = shutdown.cancelled() => break 'reconnect,
                                    _ = held.released_since(held_at_pull) => {}
                                }
                            }
                        }
                        received = true;
                        break;
                    }
                    // Complete, or expired with slots left: pull again.
                    Pulled::Over { too_large: false } => break,
                    Pulled::Failed(error) => {
                        tracing::warn!(consumer = %spec.durable, %error, "pull failed; re-subscribing");
                        crate::metrics::count_consumer_recreated(&spec.durable);
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'reconnect,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue 'reconnect;
                    }
                }
            }
            // Pulls that keep coming back empty while the stream holds messages for us: the
            // consumer went silent (seen after server restarts). Look, and start over if so.
            empty_pulls = if received { 0 } else { empty_pulls + 1 };
            if empty_pulls >= STALL_PULLS {
                empty_pulls = 0;
                match consumer.info().await {
                    Ok(info) if info.num_pending > 0 && info.num_ack_pending == 0 => {
                        tracing::warn!(consumer = %spec.durable, pending = info.num_pending, "consumer stalled: messages pending but none delivered; recreating it");
                        crate::metrics::count_consumer_recreated(&spec.durable);
                        continue 'reconnect;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(consumer = %spec.durable, error = %error_chain(&error), "consumer is gone or unreachable; recreating it");
                        crate::metrics::count_consumer_recreated(&spec.durable);
                        continue 'reconnect;
                    }
                }
            }
        }
    }
    sampler.abort();
    puller.hand_back(&js).await;
    tracker.close();
    if tokio::time::timeout(spec.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(consumer = %spec.durable, in_flight = tracker.len(), "drain timeout: leaving messages in flight to be redelivered");
    }
}

/// Bytes of the messages a consume loop has in hand, and a signal when some are given back.
#[derive(Default)]
struct HeldBytes {
    bytes: std::sync::atomic::AtomicUsize,
    given_back: tokio::sync::Notify,
}

/// A message's bytes, counted in hand until dropped.
struct Held {
    held: Arc<HeldBytes>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held
            .bytes
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
        self.held.given_back.notify_waiters();
    }
}

/// Room under which a pull is not worth making while messages are in hand: it waits for some to
/// be given back instead.
const MIN_PULL_BYTES: usize = 16 * 1024;

impl HeldBytes {
    fn take(self: &Arc<Self>, bytes: usize) -> Held {
        self.bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
        Held {
            held: self.clone(),
            bytes,
        }
    }

    /// Waits until a pull is worth making; returns the bytes it may ask for, and whether it
    /// must take one message only: the room left under `limit`, or, with nothing in hand and a
    /// limit below the largest message the server takes (`largest`), one message of any size.
    async fn room(&self, limit: usize, largest: usize) -> (usize, bool) {
        loop {
            let released = self.given_back.notified();
            let held = self.bytes.load(std::sync::atomic::Ordering::Acquire);
            if held == 0 {
                return if limit >= largest {
                    (limit, false)
                } else {
                    (largest, true)
                };
            }
            let room = limit.saturating_sub(held);
            if room >= MIN_PULL_BYTES.min(limit) {
                return (room, false);
            }
            released.await;
        }
    }

    fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until fewer bytes than `before` are in hand (at once if that is so already).
    async fn released_since(&self, before: usize) {
        loop {
            let released = self.given_back.notified();
            if self.bytes() < before || self.bytes() == 0 {
                return;
            }
            released.await;
        }
    }
}

/// The largest message the server takes, with room for its subject and headers.
fn max_payload(js: &jetstream::Context) -> usize {
    js.client()
        .server_info()
        .max_payload
        .saturating_add(64 * 1024)
}

/// Settles what handlers return, the same way for every consumer.
struct Settler {
    js: jetstream::Context,
    durable: String,
    max_deliveries: u32,
    dead_letters: fn(&str) -> String,
    kind: &'static str,
}

impl Settler {
    /// Runs the handler on a message (unless it is past the delivery limit) and settles it.
    async fn run<H: Handler>(&self, handler: &H, message: &Message) {
        let delivered = message.info().map_or(1, |info| info.delivered);
        let over_limit = u64::try_from(delivered).unwrap_or(0) > u64::from(self.max_deliveries);
        let disposition = if over_limit {
            // Every earlier delivery ended without a settlement: its handler crashed the process
            // or hung past ack_wait. Running it again would do the same.
            let error = format!(
                "delivered {delivered} times, over the limit of {}, without its handler ever finishing it (the process stopped, or the handler ran past ack_wait)",
                self.max_deliveries
            );
            self.dead_letter(message, &error, &[], None).await
        } else {
            match handler.handle(message).await {
                Ok(()) => Disposition::Ack,
                Err(error) => self.unfinished(message, delivered, error).await,
            }
        };
        settle(message, disposition).await;
    }

    async fn unfinished<E: Unfinished>(
        &self,
        message: &Message,
        delivered: i64,
        error: E,
    ) -> Disposition {
        let then = error.then();
        let last = u64::try_from(delivered).unwrap_or(0) >= u64::from(self.max_deliveries);
        match then {
            Then::DeadLetter { refused } => {
                let headers = error.dead_letter_headers();
                self.dead_letter(message, &error.to_string(), &headers, refused)
                    .await
            }
            Then::Backoff | Then::RetryAfter(_) if last => {
                let text = format!("gave up after {delivered} deliveries (the limit): {error}");
                let headers = error.dead_letter_headers();
                self.dead_letter(message, &text, &headers, None).await
            }
            Then::Backoff => {
                let delay = backoff(delivered);
                tracing::warn!(consumer = %self.durable, subject = %message.subject, delivered, retry_in = ?delay, error = %error, "message not processed; will retry");
                Disposition::Retry(delay)
            }
            Then::RetryAfter(delay) => Disposition::Retry(delay),
        }
    }

    /// Dead-letters the message and terminates it; if the dead letter cannot be stored, the
    /// message is redelivered instead (nothing is dropped unrecorded).
    async fn dead_letter(
        &self,
        message: &Message,
        error: &str,
        headers: &[(&'static str, String)],
        refused: Option<&'static str>,
    ) -> Disposition {
        let subject = (self.dead_letters)(&message.subject);
        match dead_letter(&self.js, subject.clone(), message, error, headers).await {
            Ok(()) => {
                tracing::error!(consumer = %self.durable, subject = %message.subject, dead_letters = %subject, %error, "message dead-lettered");
                crate::metrics::count_dead_lettered(self.kind);
                if let Some(reason) = refused {
                    crate::metrics::record_refused(self.kind, reason);
                }
                Disposition::Term
            }
            Err(e) => {
                tracing::warn!(consumer = %self.durable, subject = %message.subject, error = %error_chain(&e), "could not dead-letter a message; it will be redelivered");
                Disposition::Retry(Duration::from_secs(5))
            }
        }
    }
}

/// The span a handler runs in: `process <subject>`, a child of the context the message carries.
fn consumer_span(message: &Message, durable: &str) -> tracing::Span {
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let message_id = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(subjects::HEADER_MSG_ID))
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {}", subjects::destination_template(&message.subject)),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.destination.template = %subjects::destination_template(&message.subject),
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %message.subject,
        messaging.consumer.group.name = %durable,
        messaging.message.id = %message_id,
        messaging.message.body.size = message.payload.len(),
        messaging.nats.delivered = delivered,
        messaging.nats.settle = tracing::field::Empty,
    );
    crate::propagation::set_parent(
        &span,
        crate::propagation::extract_nats(message.headers.as_ref()),
    );
    span
}

/// How many requests [`answer_requests`] handles at once, and what it answers those beyond them.
pub struct AtOnce {
    pub requests: usize,
    /// The answer to a request that arrives while `requests` are in hand, sent at once.
    pub busy: serde_json::Value,
}

/// Answers core NATS requests on `subject` (in a queue group, so one replica answers each) until
/// shutdown: each in its own task and span, continuing the requester's trace, with the handler's
/// JSON as the reply; at most `at_once.requests` of them at a time, the others answered
/// `at_once.busy` right away (waiting, they would pile up in memory, unanswered). `what` says in
/// the log what stops working if the subscription fails.
pub async fn answer_requests<F, Fut>(
    nats: async_nats::Client,
    subject: &'static str,
    queue: &'static str,
    what: &'static str,
    at_once: AtOnce,
    shutdown: CancellationToken,
    handler: F,
) where
    F: Fn(Option<HeaderMap>, Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = serde_json::Value> + Send + 'static,
{
    let mut requests = match nats.queue_subscribe(subject, queue.to_owned()).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(%subject, error = %error_chain(&error), "cannot subscribe; {what} will not work");
            return;
        }
    };
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(
        at_once.requests.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let busy: Bytes = serde_json::to_vec(&at_once.busy).unwrap_or_default().into();
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => break,
            request = requests.next() => match request {
                Some(request) => request,
                None => break,
            },
        };
        let Some(reply) = request.reply.clone() else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::info!(%subject, at_once = at_once.requests, "busy; a request answered so");
            if let Err(error) = nats.publish(reply, busy.clone()).await {
                tracing::warn!(%subject, error = %error_chain(&error), "cannot answer a request");
            }
            continue;
        };
        let (nats, handler) = (nats.clone(), handler.clone());
        let span = request_span(&request);
        tokio::spawn(
            async move {
                let _slot = slot;
                let answer = handler(request.headers, request.payload).await;
                let body = serde_json::to_vec(&answer).unwrap_or_default();
                if let Err(error) = nats.publish(reply, body.into()).await {
                    tracing::warn!(%subject, error = %error_chain(&error), "cannot answer a request");
                }
            }
            .instrument(span),
        );
    }
    let _ = requests.unsubscribe().await;
}

/// The span an internal request (core NATS request/reply) is answered in: `process <subject>`, a
/// child of the requester's context.
fn request_span(message: &async_nats::Message) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("process {}", message.subject),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = %message.subject,
    );
    crate::propagation::set_parent(
        &span,
        crate::propagation::extract_nats(message.headers.as_ref()),
    );
    span
}

/// Trace context headers for a core NATS request made in the current span.
pub fn request_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    crate::propagation::inject_nats(&tracing::Span::current(), &mut headers);
    headers
}

/// Samples the durable consumer's state into the consumer gauges every
/// [`SAMPLE_EVERY`](crate::metrics::SAMPLE_EVERY) until shutdown, apart from the pull loop so it
/// never slows it. The consumer is looked up by name, so a recreated one is read the same way; a
/// failed read is logged at debug and skipped (the pull loop deals with a lost consumer).
async fn sample_consumer(
    js: jetstream::Context,
    stream: &'static str,
    durable: String,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(crate::metrics::SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let info = async {
            let stream = js.get_stream_no_info(stream).await?;
            Ok::<_, async_nats::Error>(stream.consumer_info(&durable).await?)
        };
        match info.await {
            Ok(info) => crate::metrics::set_consumer_state(
                &durable,
                info.num_pending,
                info.num_ack_pending,
                info.num_redelivered,
            ),
            Err(error) => {
                tracing::debug!(consumer = %durable, error = %error_chain(&*error), "cannot read the consumer's state")
            }
        }
    }
}

/// Empty pulls in a row (each up to [`PULL_EXPIRY`]) after which the consumer is checked for a
/// stall.
const STALL_PULLS: u32 = 3;

/// How long one pull request waits for messages before it is renewed; a request a restarted
/// server forgot is taken as over a few seconds after it (`pull`), and the consumer checked after
/// [`STALL_PULLS`] of those.
const PULL_EXPIRY: Duration = Duration::from_secs(5);
