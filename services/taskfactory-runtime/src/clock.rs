//! Time, as the scheduler sees it: the system clock in production, a clock the test drives in
//! tests. Everything that decides *when* a schedule fires asks a [`Clock`]; nothing else about
//! the service changes with it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// A source of the current instant, and of waiting for one.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;

    /// Completes once `now() >= deadline`.
    fn sleep_until(&self, deadline: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            // Re-check after waking: the wall clock may have been stepped while we slept.
            loop {
                let left = deadline - Utc::now();
                let Ok(left) = left.to_std() else { return };
                if left.is_zero() {
                    return;
                }
                tokio::time::sleep(left).await;
            }
        })
    }
}

/// A clock that moves only when told to ([`ManualClock::set`], [`ManualClock::advance`]); sleepers
/// wake as soon as it reaches their deadline.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<watch::Sender<DateTime<Utc>>>,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(watch::Sender::new(start)),
        }
    }

    /// Moves the clock to `to` (never backwards: an earlier instant is ignored).
    pub fn set(&self, to: DateTime<Utc>) {
        self.now.send_if_modified(|now| {
            if to > *now {
                *now = to;
                true
            } else {
                false
            }
        });
    }

    pub fn advance(&self, by: chrono::Duration) {
        let to = *self.now.borrow() + by;
        self.set(to);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut changes = self.now.subscribe();
        Box::pin(async move {
            // The sender lives as long as any clone of the clock; if it is gone, time stops.
            let _ = changes.wait_for(|now| *now >= deadline).await;
        })
    }
}

/// A shareable clock with a `Default` (the system clock), for configuration structs.
#[derive(Clone)]
pub struct ClockHandle(pub Arc<dyn Clock>);

impl ClockHandle {
    pub fn system() -> Self {
        Self(Arc::new(SystemClock))
    }

    pub fn manual(clock: &ManualClock) -> Self {
        Self(Arc::new(clock.clone()))
    }
}

impl Default for ClockHandle {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for ClockHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Clock(now = {})", self.0.now())
    }
}

impl std::ops::Deref for ClockHandle {
    type Target = dyn Clock;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_it_reaches_their_deadline() {
        let start = Utc::now();
        let clock = ManualClock::new(start);
        let sleeper = tokio::spawn(clock.sleep_until(start + chrono::Duration::seconds(60)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!sleeper.is_finished(), "woke before the clock moved");
        clock.advance(chrono::Duration::seconds(59));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!sleeper.is_finished(), "woke a second early");
        clock.advance(chrono::Duration::seconds(1));
        tokio::time::timeout(Duration::from_secs(1), sleeper)
            .await
            .expect("woke once the deadline came")
            .unwrap();
        clock.set(start); // backwards: ignored
        assert_eq!(clock.now(), start + chrono::Duration::seconds(60));
    }

    #[tokio::test]
    async fn the_system_clock_sleeps_until_the_deadline() {
        let clock = SystemClock;
        let deadline = clock.now() + chrono::Duration::milliseconds(50);
        clock.sleep_until(deadline).await;
        assert!(clock.now() >= deadline);
        // A deadline in the past returns at once.
        tokio::time::timeout(
            Duration::from_millis(100),
            clock.sleep_until(deadline - chrono::Duration::seconds(10)),
        )
        .await
        .unwrap();
    }
}
