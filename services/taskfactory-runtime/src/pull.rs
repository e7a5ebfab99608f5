//! The pull requests of one consume loop, read from a subscription of its own that outlives each
//! request.
//!
//! async-nats's `Batch` ends at the first status the server sends, and unsubscribes. On a
//! consumer replicated on several servers, nats-server sends a pull's messages only once their
//! delivery is replicated, but it sends `409 Batch Completed` and `409 Message Size Exceeds
//! MaxBytes` at once (consumer.go, 2.12–2.14): the messages that came after such a status found
//! no subscriber, and stayed unacknowledged until `ack_wait` ran out (a delivery counted, none
//! handled). Here the subscription lives as long as the loop. A request is over once every message
//! it asked for arrived; or once the server said it is over and the messages it still owed
//! (`Nats-Pending-Messages` says how many it did not hand out) arrived, or [`GRACE`] after that. A
//! message later still arrives on the same subscription, and is read with the next request.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subscriber};
use futures::StreamExt;
use tokio::time::Instant;

use crate::telemetry::error_chain;

/// How long a request the server said is over waits for the messages it still owes.
const GRACE: Duration = Duration::from_secs(1);

/// Past a request's expiry, how long before it is taken as over without the server saying so
/// (a request a restarted server forgot).
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);

/// One consume loop's pulls.
pub(crate) struct Puller {
    inbox: String,
    subscription: Subscriber,
    requests: u64,
    current: Option<Request>,
}

/// The request being read.
struct Request {
    /// Where its messages and statuses come: the subscription's inbox and its number.
    reply: String,
    asked: usize,
    received: usize,
    /// Messages still to come once the server said the request is over.
    owed: Option<usize>,
    /// Whether it ended because the next message would pass the bytes asked for.
    too_large: bool,
    deadline: Instant,
}

/// What reading a request gave.
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every value is a message; boxing it would allocate for each to shrink the rare ends"
)]
pub(crate) enum Pulled {
    Message(jetstream::Message),
    /// The request is over. `too_large`: the server ended it because the next message would
    /// pass the bytes asked for.
    Over {
        too_large: bool,
    },
    /// The server refused or ended the request otherwise (the consumer is gone, its leader
    /// changed, nobody answers), or the subscription closed: start over.
    Failed(String),
}

impl Puller {
    pub(crate) async fn new(client: &async_nats::Client) -> Result<Self, async_nats::Error> {
        let inbox = client.new_inbox();
        let subscription = client.subscribe(format!("{inbox}.*")).await?;
        Ok(Self {
            inbox,
            subscription,
            requests: 0,
            current: None,
        })
    }

    /// Asks `consumer` for up to `messages` messages, of at most `max_bytes` together (0: no
    /// bound), waiting up to `expires` for them; read them with [`Puller::next`].
    pub(crate) async fn request(
        &mut self,
        consumer: &PullConsumer,
        messages: usize,
        max_bytes: usize,
        expires: Duration,
    ) -> Result<(), async_nats::Error> {
        self.requests += 1;
        let reply = format!("{}.{}", self.inbox, self.requests);
        self.current = Some(Request {
            reply: reply.clone(),
            asked: messages,
            received: 0,
            owed: None,
            too_large: false,
            deadline: Instant::now() + expires + EXPIRY_MARGIN,
        });
        let batch = BatchConfig {
            batch: messages,
            expires: Some(expires),
            max_bytes,
            ..Default::default()
        };
        consumer.request_batch(batch, reply.into()).await?;
        Ok(())
    }

    /// The next message of the request, or its end.
    pub(crate) async fn next(&mut self, context: &jetstream::Context) -> Pulled {
        loop {
            let Some(request) = self.current.as_mut() else {
                return Pulled::Over { too_large: false };
            };
            if request.received >= request.asked || request.owed == Some(0) {
                let too_large = request.too_large;
                self.current = None;
                return Pulled::Over { too_large };
            }
            let message =
                match tokio::time::timeout_at(request.deadline, self.subscription.next()).await {
                    Ok(Some(message)) => message,
                    Ok(None) => {
                        self.current = None;
                        return Pulled::Failed("the pull's subscription closed".to_owned());
                    }
                    Err(_) => {
                        let too_large = request.too_large;
                        self.current = None;
                        return Pulled::Over { too_large };
                    }
                };
            let status = message.status.unwrap_or(StatusCode::OK);
            if status == StatusCode::OK {
                request.received += 1;
                if let Some(owed) = request.owed.as_mut() {
                    *owed = owed.saturating_sub(1);
                }
                return Pulled::Message(jetstream::Message {
                    message,
                    context: context.clone(),
                });
            }
            // Heartbeats, and the end of a request already over (a `Batch Completed` sent after
            // the last message it asked for).
            if status == StatusCode::IDLE_HEARTBEAT || message.subject.as_str() != request.reply {
                continue;
            }
            let description = message.description.clone().unwrap_or_default();
            let too_large = description.contains("Exceeds MaxBytes");
            let over = status == StatusCode::TIMEOUT
                || status == StatusCode::NOT_FOUND
                || (status == StatusCode::REQUEST_TERMINATED
                    && (too_large || description.contains("Batch Completed")));
            if !over {
                self.current = None;
                return Pulled::Failed(format!("{status} {description}"));
            }
            // Of what it asked for, the server did not hand out `pending`; the rest it sent, or
            // sends once their delivery is replicated.
            let pending = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Pending-Messages"))
                .and_then(|value| value.as_str().parse::<usize>().ok())
                .unwrap_or(0);
            request.owed = Some(
                request
                    .asked
                    .saturating_sub(request.received)
                    .saturating_sub(pending),
            );
            request.too_large = too_large;
            request.deadline = request.deadline.min(Instant::now() + GRACE);
        }
    }

    /// On shutdown: messages delivered, or still on their way, but not started go back to the
    /// server at once (a NAK without delay), so another replica — or this one after a restart —
    /// gets them without waiting for `ack_wait`.
    pub(crate) async fn hand_back(&mut self, context: &jetstream::Context) {
        const IN_TRANSIT: Duration = Duration::from_millis(250);
        self.current = None;
        while let Ok(Some(message)) =
            tokio::time::timeout(IN_TRANSIT, self.subscription.next()).await
        {
            if message
                .status
                .is_some_and(|status| status != StatusCode::OK)
            {
                continue;
            }
            let message = jetstream::Message {
                message,
                context: context.clone(),
            };
            if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
                tracing::debug!(error = %error_chain(&*error), "could not hand back a message");
            }
        }
    }
}
