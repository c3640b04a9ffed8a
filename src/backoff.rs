//! Capped exponential backoff between attempts of the same work.
//!
//! Guarantees (pure but for [`Backoff::wait`]): the first delay is `first`, each
//! next one doubles, and none exceeds `max`; waiting ends early, and says so, when
//! the given token is cancelled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        debug_assert!(first <= max, "the first delay is within the cap");
        Backoff {
            first,
            next: first,
            max,
        }
    }

    /// The delay before the next attempt; the one after it is twice as long, up
    /// to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// The delay the next [`Backoff::next_delay`] returns.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Starts over from the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps the next delay; false when `cancel` fired first.
    pub async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = cancel.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let delays: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(200));
    }

    #[tokio::test]
    async fn waiting_ends_when_cancelled() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        assert!(!b.wait(&cancel).await);
    }
}
