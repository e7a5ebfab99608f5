//! The pull requests of one consume loop, each read from a subscription of its own that lasts
//! until the messages the server still owes it have come.
//!
//! async-nats's `Batch` ends at the first status the server sends, and unsubscribes. On a
//! consumer replicated on several servers, nats-server sends a pull's messages only once their
//! delivery is replicated, but it sends `409 Batch Completed` and `409 Message Size Exceeds
//! MaxBytes` at once (consumer.go, 2.12–2.14): the messages that came after such a status found
//! no subscriber, and stayed unacknowledged until `ack_wait` ran out (a delivery counted, none
//! handled). Here a request is over once every message it asked for came, or the bytes it asked
//! for (the server then ends it without a word); or once the server said it is over and the
//! messages it still owed (`Nats-Pending-Messages` says how many it did not hand out) came, or
//! [`GRACE`] after that. Only then is its subscription dropped. A message later still (a leader
//! change lost it, or replication took longer than the grace) is delivered again after
//! `ack_wait`, as any message lost in transit is. Each request has a subscription (and inbox) of
//! its own, so nothing of one is ever counted for another.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::{self, AckKind};
use async_nats::{StatusCode, Subscriber};
use futures::StreamExt;
use tokio::time::Instant;

use crate::telemetry::error_chain;

/// How long a request the server said is over waits for the messages it still owes.
const GRACE: Duration = Duration::from_secs(2);

/// Past a request's expiry, how long before it is taken as over without the server saying so
/// (a request a restarted server forgot).
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);

/// One consume loop's pulls.
pub(crate) struct Puller {
    client: async_nats::Client,
    current: Option<Current>,
}

/// The request being read.
struct Current {
    subscription: Subscriber,
    /// Where its messages and statuses come.
    reply: String,
    /// When it is taken as over.
    deadline: Instant,
    asked: Asked,
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
    pub(crate) fn new(client: async_nats::Client) -> Self {
        Self {
            client,
            current: None,
        }
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
        self.current = None;
        let reply = self.client.new_inbox();
        let subscription = self.client.subscribe(reply.clone()).await?;
        let batch = BatchConfig {
            batch: messages,
            expires: Some(expires),
            max_bytes,
            ..Default::default()
        };
        consumer.request_batch(batch, reply.clone().into()).await?;
        self.current = Some(Current {
            subscription,
            reply,
            deadline: Instant::now() + expires + EXPIRY_MARGIN,
            asked: Asked::new(messages, max_bytes),
        });
        Ok(())
    }

    /// The next message of the request, or its end.
    pub(crate) async fn next(&mut self, context: &jetstream::Context) -> Pulled {
        loop {
            let Some(current) = self.current.as_mut() else {
                return Pulled::Over { too_large: false };
            };
            if current.asked.is_over() {
                let too_large = current.asked.too_large;
                self.current = None;
                return Pulled::Over { too_large };
            }
            let message = match tokio::time::timeout_at(
                current.deadline,
                current.subscription.next(),
            )
            .await
            {
                Ok(Some(message)) => message,
                Ok(None) => {
                    self.current = None;
                    return Pulled::Failed("the pull's subscription closed".to_owned());
                }
                Err(_) => {
                    let too_large = current.asked.too_large;
                    self.current = None;
                    return Pulled::Over { too_large };
                }
            };
            let status = message.status.unwrap_or(StatusCode::OK);
            if status == StatusCode::OK {
                current.asked.message(message.length);
                return Pulled::Message(jetstream::Message {
                    message,
                    context: context.clone(),
                });
            }
            if status == StatusCode::IDLE_HEARTBEAT || message.subject.as_str() != current.reply {
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
            let pending = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Pending-Messages"))
                .and_then(|value| value.as_str().parse::<usize>().ok())
                .unwrap_or(0);
            current.asked.said_over(pending, too_large);
            current.deadline = current.deadline.min(Instant::now() + GRACE);
        }
    }

    /// On shutdown: stops listening, and gives back at once (a NAK without delay) the messages
    /// that came and were not started, so that another replica — or this one after a restart —
    /// gets them without waiting for `ack_wait`. (Those still on their way when the client
    /// stopped listening wait for `ack_wait`.)
    pub(crate) async fn hand_back(&mut self, context: &jetstream::Context) {
        /// At most this long, should the client be cut off from the server.
        const IN_TRANSIT: Duration = Duration::from_secs(2);
        let Some(mut current) = self.current.take() else {
            return;
        };
        if let Err(error) = current.subscription.drain().await {
            tracing::debug!(error = %error, "could not stop listening for pulled messages");
        }
        let _ = tokio::time::timeout(IN_TRANSIT, async {
            while let Some(message) = current.subscription.next().await {
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
        })
        .await;
    }
}

/// The counting of one request: when it is over.
#[derive(Debug)]
struct Asked {
    messages: usize,
    received: usize,
    /// Bytes asked for (0: no bound), and of the messages received.
    max_bytes: usize,
    bytes: usize,
    /// Messages still to come once the server said the request is over.
    owed: Option<usize>,
    /// Whether it ended because the next message would pass the bytes asked for.
    too_large: bool,
}

impl Asked {
    fn new(messages: usize, max_bytes: usize) -> Self {
        Self {
            messages,
            received: 0,
            max_bytes,
            bytes: 0,
            owed: None,
            too_large: false,
        }
    }

    /// Every message asked for came, or the bytes asked for (then the server ends the request
    /// without a word), or what the server owed once it said the request is over.
    fn is_over(&self) -> bool {
        self.received >= self.messages
            || self.owed == Some(0)
            || (self.max_bytes > 0 && self.bytes >= self.max_bytes)
    }

    /// A message of `length` bytes came.
    fn message(&mut self, length: usize) {
        self.received += 1;
        self.bytes = self.bytes.saturating_add(length);
        if let Some(owed) = self.owed.as_mut() {
            *owed = owed.saturating_sub(1);
        }
    }

    /// The server says the request is over, `pending` of its messages not handed out: the rest
    /// it sent, or sends once their delivery is replicated.
    fn said_over(&mut self, pending: usize, too_large: bool) {
        self.owed = Some(
            self.messages
                .saturating_sub(self.received)
                .saturating_sub(pending),
        );
        self.too_large = too_large;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_over_once_every_message_it_asked_for_came() {
        let mut asked = Asked::new(3, 0);
        for _ in 0..2 {
            asked.message(10);
            assert!(!asked.is_over());
        }
        asked.message(10);
        assert!(asked.is_over());
        assert!(!asked.too_large);
    }

    /// On a replicated consumer the server says `Batch Completed` (or `Exceeds MaxBytes`) before
    /// the messages it handed out come: the request waits for them.
    #[test]
    fn messages_that_come_after_the_server_said_the_request_is_over_are_waited_for() {
        let mut asked = Asked::new(10, 1000);
        asked.message(300);
        // Three handed out (one came), seven not: the next one would pass the bytes.
        asked.said_over(7, true);
        assert!(!asked.is_over(), "two are still owed");
        asked.message(300);
        assert!(!asked.is_over());
        asked.message(300);
        assert!(asked.is_over());
        assert!(asked.too_large, "ended for a message too large");
    }

    #[test]
    fn a_request_whose_bytes_are_used_up_exactly_is_over_without_a_word() {
        let mut asked = Asked::new(10, 1000);
        asked.message(600);
        assert!(!asked.is_over());
        asked.message(400);
        assert!(asked.is_over());
    }

    #[test]
    fn a_request_that_expired_with_nothing_handed_out_owes_nothing() {
        let mut asked = Asked::new(5, 0);
        asked.message(1);
        asked.said_over(4, false);
        assert!(asked.is_over());
        assert!(!asked.too_large);
    }

    #[test]
    fn a_status_after_the_messages_finds_nothing_owed() {
        let mut asked = Asked::new(4, 0);
        asked.message(1);
        asked.message(1);
        // Expired: two handed out (both came), two not.
        asked.said_over(2, false);
        assert!(asked.is_over());
    }
}
