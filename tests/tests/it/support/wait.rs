//! Waiting on a condition with a deadline, never a fixed sleep: [`wait_until`] looks at the
//! condition again and again until it holds, and when the deadline passes it fails the test
//! saying what it waited for and what it saw last ([`poll_until`] returns that instead).

use std::fmt::{self, Debug, Display};
use std::time::Duration;

use tokio::time::Instant;

/// When [`wait_until`] gives up, and how long it pauses between two looks (100 ms unless
/// set with [`Deadline::every`]).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    every: Duration,
}

impl Deadline {
    const EVERY: Duration = Duration::from_millis(100);

    /// `within` from now.
    pub fn after(within: Duration) -> Self {
        Self::at(Instant::now() + within)
    }

    /// At `at` (one deadline shared by several waits).
    pub fn at(at: Instant) -> Self {
        Self {
            at,
            every: Self::EVERY,
        }
    }

    /// Pauses `every` between two looks instead.
    pub fn every(self, every: Duration) -> Self {
        Self { every, ..self }
    }
}

impl From<Duration> for Deadline {
    fn from(within: Duration) -> Self {
        Self::after(within)
    }
}

impl From<Instant> for Deadline {
    fn from(at: Instant) -> Self {
        Self::at(at)
    }
}

/// An observation shown as written (e.g. a report over several lines), not quoted.
pub struct Text(pub String);

impl Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Calls `probe` until it answers `Ok(value)`, and returns the value. An `Err` carries what
/// the probe saw instead; once `deadline` has passed (the probe has one last look at it),
/// the test fails with `what` it waited for and the last thing the probe saw. Any panic in
/// the probe (e.g. "the service under test exited") fails the test at once.
pub async fn wait_until<T, O: Debug>(
    deadline: impl Into<Deadline>,
    what: impl Display,
    probe: impl AsyncFnMut() -> Result<T, O>,
) -> T {
    let started = Instant::now();
    match poll_until(deadline, probe).await {
        Ok(value) => value,
        Err(seen) => panic!(
            "gave up waiting for {what} after {:.1} s; last seen: {seen:?}",
            started.elapsed().as_secs_f64()
        ),
    }
}

/// [`wait_until`] for a caller that reports a timeout itself: the last thing the probe saw
/// once `deadline` has passed.
pub async fn poll_until<T, O>(
    deadline: impl Into<Deadline>,
    mut probe: impl AsyncFnMut() -> Result<T, O>,
) -> Result<T, O> {
    let deadline = deadline.into();
    loop {
        let seen = match probe().await {
            Ok(value) => return Ok(value),
            Err(seen) => seen,
        };
        let now = Instant::now();
        if now >= deadline.at {
            return Err(seen);
        }
        tokio::time::sleep(deadline.every.min(deadline.at - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Deadline, wait_until};

    #[tokio::test]
    async fn wait_until_returns_the_value_once_the_condition_holds() {
        let mut looks = 0;
        let got = wait_until(
            Deadline::after(Duration::from_secs(5)).every(Duration::from_millis(1)),
            "the third look",
            async || {
                looks += 1;
                if looks == 3 {
                    Ok(looks * 10)
                } else {
                    Err(looks)
                }
            },
        )
        .await;
        assert_eq!((got, looks), (30, 3));
    }

    #[tokio::test]
    #[should_panic(expected = "gave up waiting for 7 rows in t after 0.")]
    async fn wait_until_fails_with_what_it_waited_for_and_the_last_observation() {
        let mut rows = 0;
        wait_until(Duration::from_millis(50), "7 rows in t", async || {
            rows += 1;
            Err::<(), _>(format!("{rows} rows"))
        })
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "last seen: (1, \"ok\")")]
    async fn the_failure_shows_the_last_observation_with_its_debug_format() {
        wait_until(Duration::ZERO, "anything", async || Err::<(), _>((1, "ok"))).await;
    }
}
