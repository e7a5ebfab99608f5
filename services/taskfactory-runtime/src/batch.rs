//! Group commit: callers hand in one item each and wait for its own outcome; a writer takes
//! whatever items wait when a write can begin (at most a bound) and writes them together (one
//! transaction, one statement). Nothing waits to fill a batch: a lone item is written at once,
//! and batches form while earlier writes are in progress, so the batch size follows the load.
//!
//! The write function owns the rules of its batch (for example, writing the items one by one
//! when the batch as a whole is refused, so one bad item holds back no other); this module only
//! gathers items, bounds the writes in progress, and hands each caller its outcome.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// A handle to a group-commit writer of `I`s, each answered with an `O`. Cloned freely; the
/// writer ends once every handle is dropped and the items in hand are written.
pub struct GroupCommit<I, O> {
    queue: mpsc::UnboundedSender<(I, oneshot::Sender<O>)>,
}

impl<I, O> Clone for GroupCommit<I, O> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

/// The writer is gone (the service is stopping): the item was not written.
#[derive(Debug, thiserror::Error)]
#[error("the writer has stopped")]
pub struct Stopped;

impl<I: Send + 'static, O: Send + 'static> GroupCommit<I, O> {
    /// Starts a writer: up to `writes` batches in progress at once, each of at most `max_batch`
    /// items; `write` gets a batch and returns one outcome per item, in order.
    pub fn start<F, Fut>(max_batch: usize, writes: usize, write: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (queue, receiver) = mpsc::unbounded_channel();
        tokio::spawn(run(receiver, max_batch.max(1), writes.max(1), write));
        Self { queue }
    }

    /// Hands in one item and waits until its batch is written; returns its outcome.
    pub async fn submit(&self, item: I) -> Result<O, Stopped> {
        let (reply, outcome) = oneshot::channel();
        self.queue.send((item, reply)).map_err(|_| Stopped)?;
        outcome.await.map_err(|_| Stopped)
    }
}

async fn run<I, O, F, Fut>(
    mut receiver: mpsc::UnboundedReceiver<(I, oneshot::Sender<O>)>,
    max_batch: usize,
    writes: usize,
    write: F,
) where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<O>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(writes));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        // A write can begin: only now is the batch taken, so items gather while writes run.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let mut batch = Vec::new();
        if receiver.recv_many(&mut batch, max_batch).await == 0 {
            break;
        }
        let (items, replies): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
        let written = write(items);
        tracker.spawn(async move {
            let outcomes = written.await;
            drop(permit);
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn items_that_wait_together_are_written_together_and_each_hears_its_own() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = batches.clone();
        let writer = GroupCommit::start(100, 1, move |items: Vec<u32>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(items.len());
                // Slow enough that the others gather behind the first write.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                items.into_iter().map(|i| i * 10).collect()
            }
        });
        let calls: Vec<_> = (0..50u32)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.submit(i).await.unwrap() })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), i as u32 * 10);
        }
        let batches = batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 50);
        assert!(
            batches.len() < 50,
            "items waiting together share a write: {batches:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_is_never_larger_than_its_bound() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let writer = GroupCommit::start(7, 2, move |items: Vec<u32>| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(items.len());
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                items
            }
        });
        let calls: Vec<_> = (0..100u32)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.submit(i).await.unwrap() })
            })
            .collect();
        for call in calls {
            call.await.unwrap();
        }
        assert!(sizes.lock().unwrap().iter().all(|&n| n <= 7));
    }
}
