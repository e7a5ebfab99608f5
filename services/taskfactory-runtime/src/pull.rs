//! The pull requests of one consume loop, read from a subscription of its own that outlives each
//! request.
//!
//! async-nats's `Batch` ends at the first status the server sends, and unsubscribes. On a
//! consumer replicated on several servers, nats-server sends a pull's messages only once their
//! delivery is replicated, but it sends `409 Batch Completed` and `409 Message Size Exceeds
//! MaxBytes` at once (consumer.go, 2.12–2.14): the messages that came after such a status found
//! no subscriber, and stayed unacknowledged until `ack_wait` ran out (a delivery counted, none
//! handled). Here the subscription lives as long as the loop. A request is over once every message
//! it asked for arrived, or the bytes it asked for; or once the server said it is over and the
//! messages it still owed (`Nats-Pending-Messages` says how many it did not hand out) arrived, or
//! [`GRACE`] after that. Messages owed still are counted as late: they arrive on the same
//! subscription, and the next ones read are taken as those ([`Pulled::Message`]'s `late`), while a
//! request is read or meanwhile ([`Puller::late_message`]).

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
    /// Where the current request's statuses come (the inbox and its number), and when it is
    /// taken as over.
    reply: String,
    deadline: Instant,
    tally: Tally,
    closed: bool,
}

/// What reading a request gave.
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every value is a message; boxing it would allocate for each to shrink the rare ends"
)]
pub(crate) enum Pulled {
    /// `late`: one an earlier request was owed.
    Message {
        message: jetstream::Message,
        late: bool,
    },
    /// The request is over. `too_large`: the server ended it because the next message would
    /// pass the bytes asked for.
    Over { too_large: bool },
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
            reply: String::new(),
            deadline: Instant::now(),
            tally: Tally::default(),
            closed: false,
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
        self.reply = format!("{}.{}", self.inbox, self.requests);
        self.deadline = Instant::now() + expires + EXPIRY_MARGIN;
        self.tally.ask(messages, max_bytes);
        let batch = BatchConfig {
            batch: messages,
            expires: Some(expires),
            max_bytes,
            ..Default::default()
        };
        if let Err(error) = consumer
            .request_batch(batch, self.reply.clone().into())
            .await
        {
            self.tally.forget();
            return Err(error.into());
        }
        Ok(())
    }

    /// The next message of the request, or its end.
    pub(crate) async fn next(&mut self, context: &jetstream::Context) -> Pulled {
        loop {
            if !self.tally.asking() {
                return Pulled::Over { too_large: false };
            }
            if self.tally.is_over() {
                return Pulled::Over {
                    too_large: self.tally.end(),
                };
            }
            let message =
                match tokio::time::timeout_at(self.deadline, self.subscription.next()).await {
                    Ok(Some(message)) => message,
                    Ok(None) => {
                        self.tally.forget();
                        self.closed = true;
                        return Pulled::Failed("the pull's subscription closed".to_owned());
                    }
                    Err(_) => {
                        return Pulled::Over {
                            too_large: self.tally.expire(),
                        };
                    }
                };
            let status = message.status.unwrap_or(StatusCode::OK);
            if status == StatusCode::OK {
                let late = self.tally.message(message.length);
                return Pulled::Message {
                    message: jetstream::Message {
                        message,
                        context: context.clone(),
                    },
                    late,
                };
            }
            // Heartbeats, and the end of a request already over (a `Batch Completed` sent after
            // the last message it asked for).
            if status == StatusCode::IDLE_HEARTBEAT || message.subject.as_str() != self.reply {
                continue;
            }
            let description = message.description.clone().unwrap_or_default();
            let too_large = description.contains("Exceeds MaxBytes");
            let over = status == StatusCode::TIMEOUT
                || status == StatusCode::NOT_FOUND
                || (status == StatusCode::REQUEST_TERMINATED
                    && (too_large || description.contains("Batch Completed")));
            if !over {
                self.tally.forget();
                return Pulled::Failed(format!("{status} {description}"));
            }
            let pending = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Pending-Messages"))
                .and_then(|value| value.as_str().parse::<usize>().ok())
                .unwrap_or(0);
            self.tally.said_over(pending, too_large);
            self.deadline = self.deadline.min(Instant::now() + GRACE);
        }
    }

    /// Between requests: the next message an earlier request was owed, once it comes; never while
    /// none is owed. Cancel-safe.
    pub(crate) async fn late_message(
        &mut self,
        context: &jetstream::Context,
    ) -> jetstream::Message {
        loop {
            if self.tally.late == 0 || self.closed {
                std::future::pending::<()>().await;
            }
            let Some(message) = self.subscription.next().await else {
                self.closed = true;
                continue;
            };
            if message
                .status
                .is_some_and(|status| status != StatusCode::OK)
            {
                continue;
            }
            self.tally.late -= 1;
            return jetstream::Message {
                message,
                context: context.clone(),
            };
        }
    }

    /// Whether the subscription is gone: make another [`Puller`].
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// On shutdown: stops listening, and gives back at once (a NAK without delay) the messages
    /// that came but were not started, so that another replica — or this one after a restart —
    /// gets them without waiting for `ack_wait`.
    pub(crate) async fn hand_back(&mut self, context: &jetstream::Context) {
        /// Long enough for the server to see the unsubscribe, and the messages sent before it.
        const IN_TRANSIT: Duration = Duration::from_secs(2);
        self.tally.forget();
        if let Err(error) = self.subscription.drain().await {
            tracing::debug!(error = %error, "could not stop listening for pulled messages");
        }
        let _ = tokio::time::timeout(IN_TRANSIT, async {
            while let Some(message) = self.subscription.next().await {
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

/// The counting of a [`Puller`]: which request a message is for, and when a request is over.
/// The server's data messages name their stream subject, not the request, so messages are
/// counted: those earlier requests were still owed come first.
#[derive(Debug, Default)]
struct Tally {
    current: Option<Asked>,
    /// Messages earlier requests were still owed when they ended.
    late: usize,
}

/// The request being read.
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

impl Tally {
    fn ask(&mut self, messages: usize, max_bytes: usize) {
        self.current = Some(Asked {
            messages,
            received: 0,
            max_bytes,
            bytes: 0,
            owed: None,
            too_large: false,
        });
    }

    fn asking(&self) -> bool {
        self.current.is_some()
    }

    /// Every message asked for came, or the bytes asked for (then the server ends the request
    /// without a word), or what the server owed once it said the request is over.
    fn is_over(&self) -> bool {
        self.current.as_ref().is_none_or(|asked| {
            asked.received >= asked.messages
                || asked.owed == Some(0)
                || (asked.max_bytes > 0 && asked.bytes >= asked.max_bytes)
        })
    }

    /// A message of `length` bytes came: whether it is one an earlier request was owed.
    fn message(&mut self, length: usize) -> bool {
        if self.late > 0 {
            self.late -= 1;
            return true;
        }
        if let Some(asked) = self.current.as_mut() {
            asked.received += 1;
            asked.bytes = asked.bytes.saturating_add(length);
            if let Some(owed) = asked.owed.as_mut() {
                *owed = owed.saturating_sub(1);
            }
        }
        false
    }

    /// The server says the request is over, `pending` of its messages not handed out: the rest
    /// it sent, or sends once their delivery is replicated.
    fn said_over(&mut self, pending: usize, too_large: bool) {
        if let Some(asked) = self.current.as_mut() {
            asked.owed = Some(
                asked
                    .messages
                    .saturating_sub(asked.received)
                    .saturating_sub(pending),
            );
            asked.too_large = too_large;
        }
    }

    /// Ends the request (over, or its grace ran out); what it is still owed comes late. Whether
    /// it ended for a message too large.
    fn end(&mut self) -> bool {
        let Some(asked) = self.current.take() else {
            return false;
        };
        self.late = self.late.saturating_add(asked.owed.unwrap_or(0));
        asked.too_large
    }

    /// The request's time ran out. Without a word from the server it forgot the request (it
    /// restarted, or we reconnected), and what it owed will not come.
    fn expire(&mut self) -> bool {
        if self
            .current
            .as_ref()
            .is_some_and(|asked| asked.owed.is_none())
        {
            self.current = None;
            self.late = 0;
            return false;
        }
        self.end()
    }

    /// The request failed: nothing more is counted for it.
    fn forget(&mut self) {
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_over_once_every_message_it_asked_for_came() {
        let mut tally = Tally::default();
        tally.ask(3, 0);
        for _ in 0..2 {
            assert!(!tally.message(10));
            assert!(!tally.is_over());
        }
        assert!(!tally.message(10));
        assert!(tally.is_over());
        assert!(!tally.end());
        assert_eq!(tally.late, 0);
    }

    /// On a replicated consumer the server says `Batch Completed` (or `Exceeds MaxBytes`) before
    /// the messages it handed out come: the request waits for them.
    #[test]
    fn messages_that_come_after_the_server_said_the_request_is_over_are_waited_for() {
        let mut tally = Tally::default();
        tally.ask(10, 1000);
        assert!(!tally.message(300));
        // Three handed out (one came), seven not: the next one would pass the bytes.
        tally.said_over(7, true);
        assert!(!tally.is_over(), "two are still owed");
        assert!(!tally.message(300));
        assert!(!tally.is_over());
        assert!(!tally.message(300));
        assert!(tally.is_over());
        assert!(tally.end(), "ended for a message too large");
        assert_eq!(tally.late, 0);
    }

    #[test]
    fn a_request_whose_bytes_are_used_up_exactly_is_over_without_a_word() {
        let mut tally = Tally::default();
        tally.ask(10, 1000);
        tally.message(600);
        assert!(!tally.is_over());
        tally.message(400);
        assert!(tally.is_over());
    }

    /// Messages still owed when the grace ran out come later: they are told apart from the next
    /// request's, which is then counted right.
    #[test]
    fn what_a_request_was_still_owed_is_late_and_does_not_count_for_the_next() {
        let mut tally = Tally::default();
        tally.ask(5, 0);
        tally.message(1);
        tally.said_over(2, false);
        assert!(!tally.is_over(), "two owed");
        assert!(!tally.end(), "the grace ran out");
        assert_eq!(tally.late, 2);
        tally.ask(2, 0);
        assert!(tally.message(1), "late");
        assert!(tally.message(1), "late");
        assert!(!tally.is_over(), "none of its own yet");
        assert!(!tally.message(1));
        assert!(!tally.message(1));
        assert!(tally.is_over());
    }

    #[test]
    fn a_request_the_server_never_answered_owes_nothing() {
        let mut tally = Tally::default();
        tally.ask(5, 0);
        tally.said_over(5, false);
        tally.end();
        assert_eq!(tally.late, 0, "none handed out");
        tally.ask(3, 0);
        tally.late = 2;
        // Not a word by the deadline: the server forgot it, and what it owed.
        assert!(!tally.expire());
        assert_eq!(tally.late, 0);
        assert!(!tally.asking());
    }

    #[test]
    fn a_failed_request_counts_nothing_more() {
        let mut tally = Tally::default();
        tally.ask(5, 0);
        tally.forget();
        assert!(!tally.asking());
        assert!(
            !tally.message(1),
            "not late, and no request to count it for"
        );
        assert_eq!(tally.late, 0);
    }
}
