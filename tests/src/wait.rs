//! Waiting for conditions with a deadline instead of fixed sleeps.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// Upper bound on attempts, whatever the timeout/interval ratio: a zero interval must not
/// turn into a busy loop that starves the processes being waited on.
const MAX_ATTEMPTS: u32 = 100_000;

/// Smallest pause between attempts, for the same reason.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Polls `check` every `interval` until it returns `Ok`, for at most `timeout`.
/// Returns the last error (with the attempt count and elapsed time) on timeout.
pub fn poll_until<T, E: Display>(
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> Result<T, String> {
    let interval = interval.max(MIN_INTERVAL);
    let started = Instant::now();
    let deadline = started + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match check() {
            Ok(value) => return Ok(value),
            Err(err) => err.to_string(),
        };
        let now = Instant::now();
        if now >= deadline || attempts >= MAX_ATTEMPTS {
            return Err(timeout_message(attempts, started.elapsed(), &last));
        }
        std::thread::sleep(interval.min(deadline - now));
    }
}

/// [`poll_until`] that panics with the last error on timeout: the usual form in tests.
///
/// ```
/// use std::time::Duration;
/// let mut n = 0;
/// let v = trellis_tests::eventually(Duration::from_secs(1), Duration::from_millis(1), || {
///     n += 1;
///     if n == 3 { Ok(n) } else { Err(format!("n is {n}")) }
/// });
/// assert_eq!(v, 3);
/// ```
#[track_caller]
pub fn eventually<T, E: Display>(
    timeout: Duration,
    interval: Duration,
    check: impl FnMut() -> Result<T, E>,
) -> T {
    match poll_until(timeout, interval, check) {
        Ok(value) => value,
        Err(message) => panic!("{message}"),
    }
}

/// Async [`poll_until`]: each attempt is itself cut off at the deadline, so a hanging
/// future (e.g. a request to a wedged server) cannot outlive the timeout.
pub async fn poll_until_async<T, E: Display, F, Fut>(
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let interval = interval.max(MIN_INTERVAL);
    let started = Instant::now();
    let deadline = started + timeout;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(remaining, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => err.to_string(),
            Err(_) => "attempt still pending at the deadline".to_owned(),
        };
        let now = Instant::now();
        if now >= deadline || attempts >= MAX_ATTEMPTS {
            return Err(timeout_message(attempts, started.elapsed(), &last));
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
    }
}

/// Async [`eventually`]: panics with the last error on timeout.
#[track_caller]
pub fn eventually_async<T, E: Display, F, Fut>(
    timeout: Duration,
    interval: Duration,
    check: F,
) -> impl Future<Output = T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    // Captured here because #[track_caller] does not reach into the async body.
    let caller = std::panic::Location::caller();
    async move {
        match poll_until_async(timeout, interval, check).await {
            Ok(value) => value,
            Err(message) => panic!("{message} (eventually_async at {caller})"),
        }
    }
}

fn timeout_message(attempts: u32, elapsed: Duration, last: &str) -> String {
    format!("condition not met after {attempts} attempts in {elapsed:.1?}; last error: {last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_first_success() {
        let mut calls = 0;
        let value = eventually(Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            if calls < 3 {
                Err("not yet")
            } else {
                Ok(calls)
            }
        });
        assert_eq!(value, 3);
    }

    #[test]
    fn times_out_with_last_error() {
        let err = poll_until(Duration::from_millis(50), Duration::from_millis(5), || {
            Err::<(), _>("still broken")
        })
        .expect_err("must time out");
        assert!(err.contains("still broken"), "{err}");
    }

    #[test]
    #[should_panic(expected = "last error: nope")]
    fn eventually_panics_on_timeout() {
        eventually(Duration::from_millis(20), Duration::from_millis(5), || {
            Err::<(), _>("nope")
        });
    }

    #[tokio::test]
    async fn async_variant_cuts_off_hanging_attempts() {
        let err = poll_until_async(Duration::from_millis(100), Duration::from_millis(5), || {
            std::future::pending::<Result<(), String>>()
        })
        .await
        .expect_err("must time out");
        assert!(err.contains("pending"), "{err}");

        let mut calls = 0;
        let value = eventually_async(Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            let n = calls;
            async move {
                if n >= 2 {
                    Ok(n)
                } else {
                    Err("not yet")
                }
            }
        })
        .await;
        assert_eq!(value, 2);
    }
}
