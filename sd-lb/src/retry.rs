//! Retry: call through a balancer until an attempt succeeds, attempts run out, the deadline
//! passes, or a callback says stop.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use sd_core::{Balancer, Error, Tried};
use tokio::time::Instant;

use crate::metrics::RetryMetrics;

/// Calls through a [`Balancer`], retrying failed attempts (go-kit's `Retry` and
/// `RetryWithCallback`).
///
/// - At most `max` attempts; an attempt whose pick failed (e.g. [`Error::NoEndpoints`]) counts
///   as one, and its error is recorded.
/// - A retry does not go back to an endpoint that already failed in this call while another
///   one has not ([`Balancer::endpoint_avoiding`]; round robin, random and P2C steer around
///   them, other balancers may not).
/// - One `deadline` over all attempts: when it passes, the attempt in flight is dropped
///   (cancelled), reported to the balancer as a failure (so outlier detection sees an instance
///   that hangs) and to the budget, and the call fails with [`StopReason::Deadline`]. It runs
///   from the moment the
///   call first has to wait (what runs before, the pick and the synchronous start of the first
///   attempt, takes no time worth timing), so a call that succeeds at once never reads the clock.
/// - No pause between attempts unless asked for: fixed ([`with_backoff`](Self::with_backoff))
///   or exponential with full jitter
///   ([`with_exponential_backoff`](Self::with_exponential_backoff)).
/// - An optional [`RetryBudget`] ([`with_budget`](Self::with_budget)), shared by calls, stops
///   retrying when too many attempts fail ([`StopReason::Budget`]), so a failing service does
///   not get `max` times its load.
/// - An optional callback ([`with_callback`](Self::with_callback)) sees each attempt's error,
///   unchanged, and decides whether to go on (and may replace the final error).
/// - The error, [`RetryError`], carries every attempt's error and why the retrying stopped.
///
/// `call` takes a generic closure and returns a future that is not boxed; when the first attempt
/// succeeds at once, the call allocates nothing and touches neither the clock nor the timer. The
/// deadline timer is armed (on the tokio runtime, which must then be running with time enabled)
/// only once an attempt has to wait.
///
/// ```
/// use std::time::Duration;
/// use sd_core::FixedEndpointer;
/// use sd_lb::{Retry, RoundRobin, StopReason};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), sd_core::Error> {
/// let balancer = RoundRobin::new(FixedEndpointer::new(vec!["down:80", "up:80"]));
/// let retry = Retry::new(balancer, 3, Duration::from_secs(1))?;
///
/// let reply = retry
///     .call(|addr| async move {
///         if addr == "down:80" { Err("connection refused") } else { Ok(format!("hello from {addr}")) }
///     })
///     .await;
/// assert_eq!(reply.unwrap(), "hello from up:80");
///
/// let err = retry.call(|_| async { Err::<(), _>("no") }).await.unwrap_err();
/// assert_eq!(err.reason(), StopReason::MaxAttempts);
/// assert_eq!(err.errors().len(), 3);
/// # Ok(())
/// # }
/// ```
pub struct Retry<B, C = AlwaysRetry> {
    balancer: B,
    max: usize,
    deadline: Duration,
    backoff: Option<Duration>,
    /// With a cap, the backoff is exponential with full jitter, up to the cap.
    backoff_cap: Option<Duration>,
    budget: Option<Arc<RetryBudget>>,
    callback: C,
    metrics: RetryMetrics,
}

impl<B: Balancer> Retry<B> {
    /// Retries through `balancer`: at most `max` attempts, all within `deadline`.
    ///
    /// Fails with [`Error::InvalidArgument`] if `max` is 0 or `deadline` is zero (neither could
    /// ever make a call).
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{Retry, RoundRobin};
    ///
    /// let rr = || RoundRobin::new(FixedEndpointer::new(vec![1]));
    /// assert!(Retry::new(rr(), 3, Duration::from_millis(500)).is_ok());
    /// let err = Retry::new(rr(), 0, Duration::from_millis(500)).unwrap_err();
    /// assert!(err.to_string().contains("at least 1"));
    /// assert!(Retry::new(rr(), 3, Duration::ZERO).is_err());
    /// ```
    pub fn new(balancer: B, max: usize, deadline: Duration) -> Result<Self, Error> {
        if max == 0 {
            return Err(Error::invalid_argument(
                "retry max attempts is 0: use at least 1 (1 means no retry)",
            ));
        }
        if deadline.is_zero() {
            return Err(Error::invalid_argument(
                "retry deadline is zero: give the attempts some time (e.g. Duration::from_secs(1))",
            ));
        }
        Ok(Retry {
            balancer,
            max,
            deadline,
            backoff: None,
            backoff_cap: None,
            budget: None,
            callback: AlwaysRetry,
            metrics: RetryMetrics::new(),
        })
    }
}

impl<B: Balancer, C> Retry<B, C> {
    /// Waits `backoff` after each failed attempt before the next one (the wait counts against
    /// the deadline). Without it, the next attempt starts at once.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{Retry, RoundRobin};
    ///
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 3, Duration::from_secs(1))
    ///     .unwrap()
    ///     .with_backoff(Duration::from_millis(50));
    /// assert_eq!(retry.backoff(), Some(Duration::from_millis(50)));
    /// ```
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = (!backoff.is_zero()).then_some(backoff);
        self.backoff_cap = None;
        self
    }

    /// Waits after each failed attempt a random time between zero and `base × 2^(n-1)` after the
    /// n-th failure, at most `cap` ("full jitter", as in the AWS Architecture Blog's
    /// *Exponential Backoff and Jitter*): clients that failed together do not retry together.
    /// The waits count against the deadline.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{Retry, RoundRobin};
    ///
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 5, Duration::from_secs(5))
    ///     .unwrap()
    ///     .with_exponential_backoff(Duration::from_millis(10), Duration::from_secs(1));
    /// assert_eq!(retry.backoff(), Some(Duration::from_millis(10)));
    /// ```
    pub fn with_exponential_backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.backoff = (!base.is_zero()).then_some(base);
        self.backoff_cap = Some(cap.max(base));
        self
    }

    /// Shares `budget` (usually one per service, across all its `Retry`s): a retry is made only
    /// while the budget allows it, and a call whose retries it refuses fails with
    /// [`StopReason::Budget`]. Without a budget, every failed attempt may be retried up to
    /// `max`, which multiplies the load on a failing service.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{Retry, RetryBudget, RoundRobin, StopReason};
    ///
    /// # futures::executor::block_on(async {
    /// let budget = Arc::new(RetryBudget::new(4, 0.1).unwrap());
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 10, Duration::from_secs(1))
    ///     .unwrap()
    ///     .with_budget(budget.clone());
    /// let err = retry.call(|_| async { Err::<(), _>("down") }).await.unwrap_err();
    /// assert_eq!(err.reason(), StopReason::Budget);
    /// assert_eq!(err.attempts(), 2, "4 tokens: retries stop at half of them");
    /// # });
    /// ```
    pub fn with_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Calls `callback(attempt, &error)` after each failed attempt (`attempt` counts from 1);
    /// retrying goes on only while it returns `true` (go-kit's `RetryWithCallback`). It is also
    /// called after the last attempt; returning `false` there makes the reason
    /// [`StopReason::Callback`] rather than [`StopReason::MaxAttempts`].
    ///
    /// Annotate the closure's argument types: they fix the call's error type.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{AttemptError, Retry, RoundRobin, StopReason};
    ///
    /// # futures::executor::block_on(async {
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 5, Duration::from_secs(1))
    ///     .unwrap()
    ///     // Retry only errors that say so.
    ///     .with_callback(|_attempt: usize, err: &AttemptError<&str>| {
    ///         err.call_error().is_none_or(|e| e.starts_with("retryable"))
    ///     });
    /// let err = retry.call(|_| async { Err::<(), _>("fatal: bad request") }).await.unwrap_err();
    /// assert_eq!(err.reason(), StopReason::Callback);
    /// assert_eq!(err.attempts(), 1);
    /// # });
    /// ```
    pub fn with_callback<C2>(self, callback: C2) -> Retry<B, C2> {
        Retry {
            balancer: self.balancer,
            max: self.max,
            deadline: self.deadline,
            backoff: self.backoff,
            backoff_cap: self.backoff_cap,
            budget: self.budget,
            callback,
            metrics: self.metrics,
        }
    }

    /// The balancer attempts pick from.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sd_core::{Balancer, FixedEndpointer};
    /// use sd_lb::{Retry, RoundRobin};
    ///
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
    /// assert_eq!(retry.balancer().endpoint().unwrap(), 1);
    /// ```
    pub fn balancer(&self) -> &B {
        &self.balancer
    }

    /// The most attempts one call makes.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sd_core::FixedEndpointer;
    /// # use sd_lb::{Retry, RoundRobin};
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
    /// assert_eq!(retry.max_attempts(), 2);
    /// ```
    pub fn max_attempts(&self) -> usize {
        self.max
    }

    /// The time one call may take, over all its attempts.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sd_core::FixedEndpointer;
    /// # use sd_lb::{Retry, RoundRobin};
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
    /// assert_eq!(retry.deadline(), Duration::from_secs(1));
    /// ```
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The wait between attempts, if one was set with [`with_backoff`](Self::with_backoff).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sd_core::FixedEndpointer;
    /// # use sd_lb::{Retry, RoundRobin};
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
    /// assert_eq!(retry.backoff(), None);
    /// ```
    pub fn backoff(&self) -> Option<Duration> {
        self.backoff
    }

    /// Calls `f` with a picked endpoint until an attempt succeeds, and returns its result; or
    /// fails with a [`RetryError`] holding every attempt's error and why retrying stopped.
    ///
    /// `f` returns the attempt's future; it is dropped (cancelled) if the deadline passes while
    /// it runs. For [`P2c`](crate::P2c), move the endpoint guard into the future so the request
    /// counts as in flight until it ends.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::time::Duration;
    /// use sd_core::FixedEndpointer;
    /// use sd_lb::{Retry, RoundRobin};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![10, 20])), 3, Duration::from_secs(1)).unwrap();
    /// let calls = AtomicUsize::new(0);
    /// let sum = retry
    ///     .call(|n| {
    ///         let attempt = calls.fetch_add(1, Ordering::SeqCst);
    ///         async move { if attempt == 0 { Err("flaky") } else { Ok(n + 1) } }
    ///     })
    ///     .await;
    /// assert_eq!(sum.unwrap(), 21);
    /// # }
    /// ```
    pub async fn call<F, Fut, T, Er>(&self, mut f: F) -> Result<T, RetryError<Er>>
    where
        F: FnMut(B::Endpoint) -> Fut,
        Fut: Future<Output = Result<T, Er>>,
        C: RetryCallback<Er>,
    {
        let mut errors = Vec::new(); // allocates only on the first push
        let mut attempts = 0;
        let mut replacement = None;
        // The picks that failed: retries go to other endpoints while there are any.
        let mut tried = Tried::new();
        let outcome = {
            let mut run = pin!(self.attempts(
                &mut f,
                &mut errors,
                &mut attempts,
                &mut replacement,
                &mut tried
            ));
            // Poll once before reading the clock and arming the timer: a call whose attempt
            // completes at once never pays for either (nor needs a runtime). The deadline runs
            // from here, the moment the call first has to wait.
            match poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await {
                Poll::Ready(outcome) => outcome,
                // A deadline too far to represent is no deadline.
                Poll::Pending => match Instant::now().checked_add(self.deadline) {
                    Some(at) => tokio::time::timeout_at(at, run)
                        .await
                        .unwrap_or(Err(StopReason::Deadline)),
                    None => run.await,
                },
            }
        };
        if matches!(outcome, Err(StopReason::Deadline)) && tried.last().is_some() {
            // A pick whose outcome is unknown: the deadline cut its attempt short, and it
            // failed (a hung instance must reach outlier detection and the budget as one that
            // answers with errors does).
            self.balancer.report(&tried, false);
            tried.finish();
            if let Some(budget) = &self.budget {
                budget.failed();
            }
        }
        outcome.map_err(|reason| {
            self.metrics.stopped(reason);
            RetryError {
                errors,
                reason,
                attempts,
                deadline: self.deadline,
                replacement,
            }
        })
    }

    async fn attempts<F, Fut, T, Er>(
        &self,
        f: &mut F,
        errors: &mut Vec<AttemptError<Er>>,
        started: &mut usize,
        replacement: &mut Option<Er>,
        tried: &mut Tried,
    ) -> Result<T, StopReason>
    where
        F: FnMut(B::Endpoint) -> Fut,
        Fut: Future<Output = Result<T, Er>>,
        C: RetryCallback<Er>,
    {
        for attempt in 1..=self.max {
            if attempt > 1 {
                self.metrics.retry();
            }
            *started = attempt;
            let err = match self.balancer.endpoint_avoiding(tried) {
                Ok(endpoint) => match f(endpoint).await {
                    Ok(value) => {
                        self.balancer.report(tried, true);
                        if let Some(budget) = &self.budget {
                            budget.succeeded();
                        }
                        return Ok(value);
                    }
                    Err(e) => AttemptError::Call(e),
                },
                Err(e) => AttemptError::Balancer(e),
            };
            // The callback sees the failure before the balancer hears of it, so what it logs
            // comes before an ejection the failure causes.
            let decision = self.callback.decide(attempt, &err);
            if err.call_error().is_some() {
                self.balancer.report(tried, false);
            }
            tried.failed();
            // The attempt is over: a draining endpoint need not wait for our backoff.
            tried.finish();
            if let Some(budget) = &self.budget {
                budget.failed();
            }
            errors.push(err);
            match decision {
                Decision::Retry => {}
                Decision::Stop => return Err(StopReason::Callback),
                Decision::StopWith(e) => {
                    *replacement = Some(e);
                    return Err(StopReason::Callback);
                }
            }
            if attempt < self.max {
                if self.budget.as_ref().is_some_and(|b| !b.allows_retry()) {
                    return Err(StopReason::Budget);
                }
                if let Some(wait) = self.wait(attempt) {
                    // Boxed: only failed calls get here (and the error list has allocated
                    // already), and a timer inline would make every call's future bigger.
                    Box::pin(tokio::time::sleep(wait)).await;
                }
            }
        }
        Err(StopReason::MaxAttempts)
    }

    /// The wait after failed attempt number `attempt`: the fixed backoff, or a full-jitter draw
    /// below the exponential bound.
    fn wait(&self, attempt: usize) -> Option<Duration> {
        let base = self.backoff?;
        let Some(cap) = self.backoff_cap else {
            return Some(base);
        };
        let doublings = u32::try_from(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(32);
        let bound = base.saturating_mul(1 << doublings.min(31)).min(cap);
        Some(bound.mul_f64(fastrand::f64()))
    }
}

impl<B: fmt::Debug, C> fmt::Debug for Retry<B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("balancer", &self.balancer)
            .field("max", &self.max)
            .field("deadline", &self.deadline)
            .field("backoff", &self.backoff)
            .field("callback", &std::any::type_name::<C>())
            .finish()
    }
}

/// A budget for retries shared by calls, after gRPC's retry throttling (gRFC A6, the
/// `retryThrottling` service config): a bucket of tokens, full at first. Each failed attempt
/// takes one token, each successful call gives back `token_ratio` of one (never above
/// `max_tokens`), and retries are made only while more than half of `max_tokens` are left. So
/// while calls succeed retries cost nothing, and when most of them fail the load of retries
/// falls to about `token_ratio` retries per success instead of `max - 1` per call: no retry
/// storm. gRPC's example setting is `max_tokens` 10 and `token_ratio` 0.1.
///
/// The success path reads one shared counter and writes it only while the bucket is not full.
///
/// ```
/// use sd_lb::RetryBudget;
///
/// let budget = RetryBudget::new(10, 0.1).unwrap();
/// assert_eq!(budget.tokens(), 10.0);
/// assert!(RetryBudget::new(0, 0.1).is_err());
/// assert!(RetryBudget::new(10, 0.0).is_err());
/// ```
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a token.
    tokens: AtomicU32,
    max: u32,
    ratio: u32,
}

impl RetryBudget {
    /// A budget of `max_tokens` (1 to 1 000) regaining `token_ratio` (above 0, at most 1) of a
    /// token per successful call.
    ///
    /// ```
    /// assert!(sd_lb::RetryBudget::new(100, 0.5).is_ok());
    /// ```
    pub fn new(max_tokens: u32, token_ratio: f64) -> Result<Self, Error> {
        if !(1..=1000).contains(&max_tokens) {
            return Err(Error::invalid_argument(format!(
                "retry budget of {max_tokens} tokens: use 1 to 1000 (gRPC's example is 10)"
            )));
        }
        if !(token_ratio > 0.0 && token_ratio <= 1.0) {
            return Err(Error::invalid_argument(format!(
                "retry budget token ratio {token_ratio}: use more than 0 and at most 1 (gRPC's example is 0.1)"
            )));
        }
        let max = max_tokens * 1000;
        Ok(RetryBudget {
            tokens: AtomicU32::new(max),
            max,
            ratio: ((token_ratio * 1000.0).round() as u32).max(1),
        })
    }

    /// The tokens left.
    ///
    /// ```
    /// let b = sd_lb::RetryBudget::new(3, 1.0).unwrap();
    /// assert_eq!(b.tokens(), 3.0);
    /// ```
    pub fn tokens(&self) -> f64 {
        f64::from(self.tokens.load(Ordering::Relaxed)) / 1000.0
    }

    /// Whether a retry may be made now: more than half of the tokens left.
    ///
    /// ```
    /// let b = sd_lb::RetryBudget::new(2, 0.1).unwrap();
    /// assert!(b.allows_retry());
    /// ```
    pub fn allows_retry(&self) -> bool {
        self.tokens.load(Ordering::Relaxed) > self.max / 2
    }

    fn succeeded(&self) {
        // Full (the usual case while calls succeed): a read, no write.
        if self.tokens.load(Ordering::Relaxed) >= self.max {
            return;
        }
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(self.ratio).min(self.max))
            });
    }

    fn failed(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(1000))
            });
    }
}

/// Decides, after a failed attempt, whether [`Retry`] goes on.
///
/// Any `Fn(usize, &AttemptError<Er>) -> bool` is one (the attempt number counts from 1);
/// [`AlwaysRetry`] is the default.
///
/// ```
/// use sd_lb::{AlwaysRetry, AttemptError, RetryCallback};
///
/// let err = AttemptError::Call("timeout");
/// assert!(AlwaysRetry.retry(1, &err));
/// let only_timeouts = |_: usize, e: &AttemptError<&str>| e.call_error() == Some(&"timeout");
/// assert!(only_timeouts.retry(1, &err));
/// ```
pub trait RetryCallback<Er> {
    /// Whether to make another attempt after attempt number `attempt` failed with `error`.
    fn retry(&self, attempt: usize, error: &AttemptError<Er>) -> bool;

    /// The full decision after a failed attempt: go on, stop, or stop and make `Er` the call's
    /// final error (go-kit's callback returning a replacement error). The default asks
    /// [`retry`](Self::retry); [`decide_with`] makes a callback from a closure returning a
    /// [`Decision`].
    fn decide(&self, attempt: usize, error: &AttemptError<Er>) -> Decision<Er> {
        if self.retry(attempt, error) {
            Decision::Retry
        } else {
            Decision::Stop
        }
    }
}

/// What a [`RetryCallback`] decided after a failed attempt.
///
/// ```
/// use sd_lb::{AttemptError, Decision, RetryCallback};
///
/// let only_twice = |attempt: usize, _: &AttemptError<&str>| attempt < 2;
/// assert_eq!(only_twice.decide(1, &AttemptError::Call("x")), Decision::Retry);
/// assert_eq!(only_twice.decide(2, &AttemptError::Call("x")), Decision::Stop);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<Er> {
    /// Make another attempt (within `max` and the deadline).
    Retry,
    /// Stop; the call fails with every attempt's error ([`StopReason::Callback`]).
    Stop,
    /// Stop, and make this the call's final error ([`RetryError::final_error`], the error's
    /// `source()`).
    StopWith(Er),
}

/// A [`RetryCallback`] from a closure that returns a [`Decision`] (see [`decide_with`]).
///
/// ```
/// use sd_lb::{decide_with, AttemptError, Decision, RetryCallback};
///
/// let callback = decide_with(|attempt: usize, _: &AttemptError<&str>| {
///     if attempt < 3 { Decision::Retry } else { Decision::StopWith("gave up") }
/// });
/// assert_eq!(callback.decide(1, &AttemptError::Call("x")), Decision::Retry);
/// assert_eq!(callback.decide(3, &AttemptError::Call("x")), Decision::StopWith("gave up"));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct DecideWith<F>(F);

/// A callback that decides with `f`, which may replace the call's final error.
///
/// ```
/// use std::time::Duration;
/// use sd_core::FixedEndpointer;
/// use sd_lb::{decide_with, AttemptError, Decision, Retry, RoundRobin};
///
/// # futures::executor::block_on(async {
/// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 5, Duration::from_secs(1))
///     .unwrap()
///     .with_callback(decide_with(|_: usize, e: &AttemptError<String>| match e.call_error() {
///         Some(msg) if msg.as_str() == "401" => Decision::StopWith(String::from("not authorized: stop")),
///         _ => Decision::Retry,
///     }));
/// let err = retry.call(|_| async { Err::<(), _>(String::from("401")) }).await.unwrap_err();
/// assert_eq!(err.attempts(), 1);
/// assert_eq!(err.final_error().map(String::as_str), Some("not authorized: stop"));
/// # });
/// ```
pub fn decide_with<Er, F>(f: F) -> DecideWith<F>
where
    F: Fn(usize, &AttemptError<Er>) -> Decision<Er>,
{
    DecideWith(f)
}

impl<Er, F> RetryCallback<Er> for DecideWith<F>
where
    F: Fn(usize, &AttemptError<Er>) -> Decision<Er>,
{
    fn retry(&self, attempt: usize, error: &AttemptError<Er>) -> bool {
        matches!((self.0)(attempt, error), Decision::Retry)
    }

    fn decide(&self, attempt: usize, error: &AttemptError<Er>) -> Decision<Er> {
        (self.0)(attempt, error)
    }
}

impl<Er, F> RetryCallback<Er> for F
where
    F: Fn(usize, &AttemptError<Er>) -> bool,
{
    fn retry(&self, attempt: usize, error: &AttemptError<Er>) -> bool {
        self(attempt, error)
    }
}

/// The default [`RetryCallback`]: retries every error, until `max` attempts or the deadline.
///
/// ```
/// use sd_lb::{AlwaysRetry, AttemptError, RetryCallback};
///
/// assert!(AlwaysRetry.retry(99, &AttemptError::Call(())));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysRetry;

impl<Er> RetryCallback<Er> for AlwaysRetry {
    fn retry(&self, _attempt: usize, _error: &AttemptError<Er>) -> bool {
        true
    }
}

/// Why one attempt failed: the balancer had nothing to pick, or the call itself failed.
///
/// ```
/// use sd_lb::AttemptError;
///
/// let e: AttemptError<std::io::Error> =
///     AttemptError::Balancer(sd_core::Error::NoEndpoints { last_error: None });
/// assert!(e.to_string().starts_with("no endpoint to call"));
/// assert!(e.call_error().is_none());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError<Er> {
    /// The balancer could not pick an endpoint (the balancer's error is the `source()`).
    #[error("no endpoint to call")]
    Balancer(#[source] Error),
    /// The call returned this error (message and `source()` are the call error's own).
    #[error(transparent)]
    Call(Er),
}

impl<Er> AttemptError<Er> {
    /// The call's own error, if the call failed (rather than the pick).
    ///
    /// ```
    /// use sd_lb::AttemptError;
    ///
    /// assert_eq!(AttemptError::Call(7).call_error(), Some(&7));
    /// ```
    pub fn call_error(&self) -> Option<&Er> {
        match self {
            AttemptError::Call(e) => Some(e),
            AttemptError::Balancer(_) => None,
        }
    }

    /// The balancer's error, if the pick failed.
    ///
    /// ```
    /// use sd_lb::AttemptError;
    ///
    /// let e = AttemptError::<()>::Balancer(sd_core::Error::Stopped);
    /// assert!(matches!(e.balancer_error(), Some(sd_core::Error::Stopped)));
    /// ```
    pub fn balancer_error(&self) -> Option<&Error> {
        match self {
            AttemptError::Balancer(e) => Some(e),
            AttemptError::Call(_) => None,
        }
    }
}

/// Why [`Retry::call`] gave up.
///
/// ```
/// use sd_lb::StopReason;
///
/// assert_eq!(StopReason::Deadline.to_string(), "the deadline passed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum StopReason {
    /// Every one of the `max` attempts failed.
    #[error("every attempt failed")]
    MaxAttempts,
    /// The deadline passed (the attempt in flight, if any, was dropped).
    #[error("the deadline passed")]
    Deadline,
    /// The [`RetryCallback`] said not to go on.
    #[error("the callback said stop")]
    Callback,
    /// The [`RetryBudget`] allowed no more retries: too many attempts are failing.
    #[error("the retry budget is spent")]
    Budget,
}

/// The error of [`Retry::call`]: every attempt's error, in order, and why retrying stopped.
///
/// Its message says what happened and how many attempts ran; its `source()` is the last
/// attempt's error (when the call's error type is an `Error`). [`sd_core::Report`] prints both.
///
/// ```
/// use std::time::Duration;
/// use sd_core::{FixedEndpointer, Report};
/// use sd_lb::{AttemptError, Retry, RoundRobin, StopReason};
///
/// # futures::executor::block_on(async {
/// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
/// let refused = || std::io::Error::other("refused");
/// let err = retry.call(|_| async { Err::<(), _>(refused()) }).await.unwrap_err();
/// assert_eq!(err.to_string(), "all 2 attempts failed");
/// assert_eq!(Report(&err).to_string(), "all 2 attempts failed: refused");
/// assert_eq!(err.reason(), StopReason::MaxAttempts);
/// assert!(matches!(err.last(), Some(AttemptError::Call(e)) if e.to_string() == "refused"));
/// # });
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct RetryError<Er> {
    errors: Vec<AttemptError<Er>>,
    reason: StopReason,
    attempts: usize,
    deadline: Duration,
    /// The error the callback chose as the final one ([`Decision::StopWith`]).
    replacement: Option<Er>,
}

impl<Er> RetryError<Er> {
    /// The call's final error: the one the callback chose ([`Decision::StopWith`]), else the
    /// last call error, if the last attempt got as far as a call.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sd_core::FixedEndpointer;
    /// # use sd_lb::{Retry, RoundRobin};
    /// # futures::executor::block_on(async {
    /// # let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
    /// let err = retry.call(|_| async { Err::<(), _>("refused") }).await.unwrap_err();
    /// assert_eq!(err.final_error(), Some(&"refused"));
    /// # });
    /// ```
    pub fn final_error(&self) -> Option<&Er> {
        self.replacement
            .as_ref()
            .or_else(|| self.errors.last().and_then(AttemptError::call_error))
    }

    /// Why retrying stopped.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sd_core::FixedEndpointer;
    /// # use sd_lb::{Retry, RoundRobin, StopReason};
    /// # futures::executor::block_on(async {
    /// # let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 1, Duration::from_secs(1)).unwrap();
    /// let err = retry.call(|_| async { Err::<(), _>("no") }).await.unwrap_err();
    /// assert_eq!(err.reason(), StopReason::MaxAttempts);
    /// # });
    /// ```
    pub fn reason(&self) -> StopReason {
        self.reason
    }

    /// Every failed attempt's error, in order. On [`StopReason::Deadline`] the attempt that was
    /// cut short has none, so this may be one shorter than [`attempts`](Self::attempts).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sd_core::FixedEndpointer;
    /// # use sd_lb::{Retry, RoundRobin};
    /// # futures::executor::block_on(async {
    /// # let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 3, Duration::from_secs(1)).unwrap();
    /// let err = retry.call(|_| async { Err::<(), _>("no") }).await.unwrap_err();
    /// assert_eq!(err.errors().len(), 3);
    /// # });
    /// ```
    pub fn errors(&self) -> &[AttemptError<Er>] {
        &self.errors
    }

    /// The errors, by value.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sd_core::FixedEndpointer;
    /// # use sd_lb::{Retry, RoundRobin};
    /// # futures::executor::block_on(async {
    /// # let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
    /// let err = retry.call(|_| async { Err::<(), _>(String::from("no")) }).await.unwrap_err();
    /// let owned: Vec<String> = err.into_errors().into_iter().filter_map(|e| match e {
    ///     sd_lb::AttemptError::Call(s) => Some(s),
    ///     _ => None,
    /// }).collect();
    /// assert_eq!(owned, ["no", "no"]);
    /// # });
    /// ```
    pub fn into_errors(self) -> Vec<AttemptError<Er>> {
        self.errors
    }

    /// The last attempt's error, if any attempt finished.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sd_core::FixedEndpointer;
    /// # use sd_lb::{AttemptError, Retry, RoundRobin};
    /// # futures::executor::block_on(async {
    /// # let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
    /// let err = retry.call(|n| async move { Err::<(), _>(n) }).await.unwrap_err();
    /// assert!(matches!(err.last(), Some(AttemptError::Call(1))));
    /// # });
    /// ```
    pub fn last(&self) -> Option<&AttemptError<Er>> {
        self.errors.last()
    }

    /// How many attempts were started, the one the deadline cut short included.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sd_core::FixedEndpointer;
    /// # use sd_lb::{Retry, RoundRobin};
    /// # futures::executor::block_on(async {
    /// # let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 4, Duration::from_secs(1)).unwrap();
    /// let err = retry.call(|_| async { Err::<(), _>(()) }).await.unwrap_err();
    /// assert_eq!(err.attempts(), 4);
    /// # });
    /// ```
    pub fn attempts(&self) -> usize {
        self.attempts
    }
}

impl<Er: fmt::Display> fmt::Display for RetryError<Er> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.attempts;
        let s = if n == 1 { "" } else { "s" };
        match self.reason {
            StopReason::MaxAttempts => write!(f, "all {n} attempt{s} failed")?,
            StopReason::Callback => write!(
                f,
                "the retry callback stopped retrying after {n} attempt{s}"
            )?,
            StopReason::Budget => write!(
                f,
                "the retry budget allowed no retry after {n} attempt{s} (too many calls are failing)"
            )?,
            StopReason::Deadline => write!(
                f,
                "the retry deadline of {:?} passed during attempt {n} ({} failed before)",
                self.deadline,
                self.errors.len()
            )?,
        }
        Ok(())
    }
}

/// The `source()` is the error the callback chose as final, else the last attempt's error.
impl<Er: std::error::Error + 'static> std::error::Error for RetryError<Er> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.replacement {
            Some(e) => Some(e),
            None => self
                .errors
                .last()
                .map(|e| e as &(dyn std::error::Error + 'static)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RoundRobin;
    use sd_core::FixedEndpointer;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    fn retry(
        endpoints: Vec<u32>,
        max: usize,
        deadline: Duration,
    ) -> Retry<RoundRobin<u32, FixedEndpointer<u32>>> {
        Retry::new(
            RoundRobin::new(FixedEndpointer::new(endpoints)),
            max,
            deadline,
        )
        .unwrap()
    }

    #[test]
    fn new_refuses_arguments_that_never_work() {
        let rr = || RoundRobin::new(FixedEndpointer::new(vec![1u32]));
        let err = Retry::new(rr(), 0, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
        assert!(err.to_string().contains("use at least 1"), "{err}");
        let err = Retry::new(rr(), 1, Duration::ZERO).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(Retry::new(rr(), 1, Duration::from_nanos(1)).is_ok());
    }

    #[tokio::test]
    async fn stops_at_max_attempts_with_every_error() {
        let r = retry(vec![1, 2, 3], 3, Duration::from_secs(1));
        let calls = AtomicUsize::new(0);
        let err = r
            .call(|e| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move { Err::<(), _>(format!("endpoint {e} refused")) }
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(err.reason(), StopReason::MaxAttempts);
        assert_eq!(err.attempts(), 3);
        let msgs: Vec<_> = err.errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            msgs,
            [
                "endpoint 1 refused",
                "endpoint 2 refused",
                "endpoint 3 refused"
            ]
        );
        assert_eq!(err.to_string(), "all 3 attempts failed");
        assert_eq!(
            err.last().map(|e| e.to_string()).as_deref(),
            Some("endpoint 3 refused")
        );
    }

    #[tokio::test]
    async fn succeeds_on_a_later_attempt() {
        let r = retry(vec![1, 2, 3], 5, Duration::from_secs(1));
        let seen = Mutex::new(Vec::new());
        let out = r
            .call(|e| {
                seen.lock().unwrap().push(e);
                async move {
                    if e == 3 {
                        Ok(e * 10)
                    } else {
                        Err("down")
                    }
                }
            })
            .await;
        assert_eq!(out.unwrap(), 30);
        assert_eq!(*seen.lock().unwrap(), [1, 2, 3], "each attempt picks anew");
    }

    #[tokio::test]
    async fn a_failed_pick_counts_as_an_attempt() {
        let r = retry(vec![], 2, Duration::from_secs(1));
        let err = r.call(|_| async { Ok::<_, &str>(()) }).await.unwrap_err();
        assert_eq!(err.reason(), StopReason::MaxAttempts);
        assert_eq!(err.errors().len(), 2);
        assert!(err
            .errors()
            .iter()
            .all(|e| matches!(e.balancer_error(), Some(Error::NoEndpoints { .. }))));
        let last = err
            .last()
            .and_then(|e| e.balancer_error())
            .map(|e| e.to_string());
        assert!(
            last.as_deref()
                .is_some_and(|m| m.contains("no endpoints available")),
            "{last:?}"
        );
    }

    #[tokio::test]
    async fn the_callback_sees_each_error_and_can_stop() {
        let seen = Mutex::new(Vec::new());
        let r = retry(vec![1], 10, Duration::from_secs(1)).with_callback(
            |attempt: usize, err: &AttemptError<String>| {
                seen.lock().unwrap().push((attempt, err.to_string()));
                attempt < 3
            },
        );
        let err = r
            .call(|_| async { Err::<(), _>(String::from("boom")) })
            .await
            .unwrap_err();
        assert_eq!(err.reason(), StopReason::Callback);
        assert_eq!(err.attempts(), 3);
        assert_eq!(err.errors().len(), 3);
        assert_eq!(
            *seen.lock().unwrap(),
            [(1, "boom".into()), (2, "boom".into()), (3, "boom".into())]
        );
        assert!(
            err.to_string()
                .starts_with("the retry callback stopped retrying after 3 attempts"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_callback_also_sees_the_last_attempt() {
        let calls = AtomicUsize::new(0);
        let r = retry(vec![1], 2, Duration::from_secs(1)).with_callback(
            |_: usize, _: &AttemptError<()>| {
                calls.fetch_add(1, Ordering::SeqCst);
                true
            },
        );
        let err = r.call(|_| async { Err::<(), _>(()) }).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(err.reason(), StopReason::MaxAttempts);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_drops_the_attempt_in_flight() {
        let r = retry(vec![1, 2], 5, Duration::from_millis(300));
        let dropped = AtomicUsize::new(0);
        struct CountDrop<'a>(&'a AtomicUsize);
        impl Drop for CountDrop<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let start = Instant::now();
        let err = r
            .call(|e| {
                let guard = CountDrop(&dropped);
                async move {
                    let _guard = guard;
                    if e == 1 {
                        Err("refused")
                    } else {
                        std::future::pending::<()>().await;
                        Ok(())
                    }
                }
            })
            .await
            .unwrap_err();
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(300),
            "stopped exactly at the deadline"
        );
        assert_eq!(err.reason(), StopReason::Deadline);
        assert_eq!(err.attempts(), 2);
        assert_eq!(err.errors().len(), 1, "the hung attempt has no error");
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            2,
            "both attempts' futures were dropped"
        );
        assert_eq!(
            err.to_string(),
            "the retry deadline of 300ms passed during attempt 2 (1 failed before)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_deadline_covers_all_attempts() {
        // Each attempt takes 100 ms and fails; 10 attempts would take 1 s, the deadline is 250 ms.
        let r = retry(vec![1], 10, Duration::from_millis(250));
        let start = Instant::now();
        let err = r
            .call(|_| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err::<(), _>("slow failure")
            })
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        assert_eq!(err.reason(), StopReason::Deadline);
        assert_eq!((err.attempts(), err.errors().len()), (3, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_waits_between_attempts_only() {
        let r = retry(vec![1], 3, Duration::from_secs(10)).with_backoff(Duration::from_millis(100));
        let start = Instant::now();
        let times = Mutex::new(Vec::new());
        let err = r
            .call(|_| {
                times.lock().unwrap().push(start.elapsed());
                async { Err::<(), _>(()) }
            })
            .await
            .unwrap_err();
        assert_eq!(err.reason(), StopReason::MaxAttempts);
        let ms = |m| Duration::from_millis(m);
        assert_eq!(*times.lock().unwrap(), [ms(0), ms(100), ms(200)]);
        assert_eq!(start.elapsed(), ms(200), "no wait after the last attempt");
    }

    /// Exponential backoff with full jitter: each wait is below its doubling bound and the cap,
    /// and the waits are not all the same (over 20 calls).
    #[tokio::test(start_paused = true)]
    async fn exponential_backoff_stays_below_its_bounds() {
        let r = retry(vec![1], 6, Duration::from_secs(100))
            .with_exponential_backoff(Duration::from_millis(100), Duration::from_millis(500));
        let mut firsts = Vec::new();
        for _ in 0..20 {
            let start = Instant::now();
            let times = Mutex::new(Vec::new());
            r.call(|_| {
                times.lock().unwrap().push(start.elapsed());
                async { Err::<(), _>(()) }
            })
            .await
            .unwrap_err();
            let times = times.into_inner().unwrap();
            let bounds = [100u64, 200, 400, 500, 500];
            for (n, (w, bound)) in times.windows(2).zip(bounds).enumerate() {
                let wait = w[1] - w[0];
                assert!(
                    wait <= Duration::from_millis(bound),
                    "wait {} was {wait:?}, bound {bound} ms",
                    n + 1
                );
            }
            firsts.push(times[1]);
        }
        firsts.sort();
        firsts.dedup();
        assert!(
            firsts.len() > 10,
            "the waits are drawn, not fixed: {firsts:?}"
        );
    }

    /// Every call failing: retries stop once the budget is half spent, whatever `max` is, and
    /// come back as calls succeed again.
    #[tokio::test]
    async fn retries_stay_within_the_budget() {
        let budget = Arc::new(RetryBudget::new(10, 0.1).unwrap());
        let r = retry(vec![1, 2, 3], 10, Duration::from_secs(10)).with_budget(budget.clone());
        let attempts = AtomicUsize::new(0);
        let mut budget_stops = 0;
        for _ in 0..100 {
            let err = r
                .call(|_| {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    async { Err::<(), _>("down") }
                })
                .await
                .unwrap_err();
            budget_stops += usize::from(err.reason() == StopReason::Budget);
        }
        let attempts = attempts.load(Ordering::SeqCst);
        // 100 first attempts, then retries only while more than 5 of 10 tokens were left:
        // 4 of them (without a budget: 900).
        assert_eq!(attempts, 104, "retries: {}", attempts - 100);
        assert_eq!(budget_stops, 100);
        assert!(!budget.allows_retry());
        // 60 successes give back 6 tokens: retries are allowed again.
        for _ in 0..60 {
            r.call(|_| async { Ok::<_, &str>(()) }).await.unwrap();
        }
        assert!(budget.allows_retry(), "tokens: {}", budget.tokens());
    }

    #[tokio::test(start_paused = true)]
    async fn no_backoff_unless_asked() {
        let r = retry(vec![1], 3, Duration::from_secs(10));
        let start = Instant::now();
        let _ = r.call(|_| async { Err::<(), _>(()) }).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn a_huge_deadline_is_no_deadline() {
        let r = retry(vec![1], 1, Duration::MAX);
        let out = futures::executor::block_on(r.call(|e| async move { Ok::<_, ()>(e) }));
        assert_eq!(out.unwrap(), 1);
    }

    #[test]
    fn an_immediate_success_needs_no_runtime() {
        // The timer is armed only when an attempt waits, so a plain executor works.
        let r = retry(vec![4], 3, Duration::from_secs(1));
        let out = futures::executor::block_on(r.call(|e| async move { Ok::<_, ()>(e + 1) }));
        assert_eq!(out.unwrap(), 5);
    }

    #[test]
    fn debug_names_the_settings() {
        let r = retry(vec![1], 3, Duration::from_secs(1));
        let s = format!("{r:?}");
        assert!(s.contains("max: 3") && s.contains("AlwaysRetry"), "{s}");
    }
}
