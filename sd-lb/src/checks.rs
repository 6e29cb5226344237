//! Active health checks: a check of your own, run on every instance at an interval, whose
//! results feed [`Outliers`]' ejection state.
//!
//! After pingora's and Envoy's active health checking: an instance whose check fails
//! `unhealthy` times in a row (default 3) is taken out of service, and comes back once its
//! check passes `healthy` times in a row (default 2); a check that does not answer within the
//! timeout (default the interval, at most 2 s) has failed. An instance taken out counts against
//! [`Outliers::max_ejection_percent`] like an ejected one, and calls neither restore it nor
//! extend its time out: only its checks decide. The instances checked are those of the sets the
//! balancers sharing the [`Outliers`] pick from. When the checks stop (their [`HealthChecks`]
//! handle is dropped), the instances they took out are back in service: nothing else would
//! bring them back. A `check` that panics has failed.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use sd_core::{Balancer, FixedEndpointer};
//! use sd_lb::{checks::ActiveChecks, Outliers, RoundRobin};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sd_core::Error> {
//! let outliers = Arc::new(Outliers::new());
//! let rr = RoundRobin::new(FixedEndpointer::new(vec!["127.0.0.1:8080"])).with_outliers(outliers.clone());
//! rr.endpoint()?;
//! let checks = outliers.spawn_checks(
//!     ActiveChecks::new(Duration::from_secs(5))?.thresholds(2, 3)?,
//!     |instance| async move {
//!         // e.g. GET http://{instance.addr()}/health
//!         let _ = instance;
//!         true
//!     },
//! )?;
//! drop(checks); // stops checking
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sd_core::{Error, Instance};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::outliers::HostKey;
use crate::Outliers;

/// How often to check, how long a check may take, and how many results in a row change an
/// instance's state (see the [module docs](crate::checks)).
///
/// ```
/// use std::time::Duration;
/// use sd_lb::checks::ActiveChecks;
///
/// let c = ActiveChecks::new(Duration::from_secs(10)).unwrap();
/// assert_eq!(c.check_timeout(), Duration::from_secs(2));
/// assert!(ActiveChecks::new(Duration::ZERO).is_err());
/// ```
#[derive(Debug, Clone)]
pub struct ActiveChecks {
    interval: Duration,
    timeout: Duration,
    healthy: u32,
    unhealthy: u32,
}

impl ActiveChecks {
    /// Checks every `interval` (above zero), with a timeout of the interval or 2 s, whichever
    /// is shorter, 2 passes to come back and 3 failures to go out (Envoy's usual thresholds).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let c = sd_lb::checks::ActiveChecks::new(Duration::from_millis(500)).unwrap();
    /// assert_eq!(c.check_timeout(), Duration::from_millis(500));
    /// ```
    pub fn new(interval: Duration) -> Result<Self, Error> {
        if interval.is_zero() {
            return Err(Error::invalid_argument(
                "health check interval 0: above zero (5 to 30 s is usual)",
            ));
        }
        Ok(ActiveChecks {
            interval,
            timeout: interval.min(Duration::from_secs(2)),
            healthy: 2,
            unhealthy: 3,
        })
    }

    /// How long one check may take before it counts as failed (above zero).
    ///
    /// ```
    /// # use std::time::Duration;
    /// use sd_lb::checks::ActiveChecks;
    ///
    /// let c = ActiveChecks::new(Duration::from_secs(5)).unwrap().timeout(Duration::from_secs(1)).unwrap();
    /// assert_eq!(c.check_timeout(), Duration::from_secs(1));
    /// assert!(ActiveChecks::new(Duration::from_secs(5)).unwrap().timeout(Duration::ZERO).is_err());
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Result<Self, Error> {
        if timeout.is_zero() {
            return Err(Error::invalid_argument(
                "health check timeout 0: above zero (at most the interval is usual)",
            ));
        }
        self.timeout = timeout;
        Ok(self)
    }

    /// Passes in a row that bring an instance back (`healthy`) and failures in a row that take
    /// it out (`unhealthy`); both at least 1.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use sd_lb::checks::ActiveChecks;
    ///
    /// let c = ActiveChecks::new(Duration::from_secs(5)).unwrap();
    /// assert!(c.clone().thresholds(1, 1).is_ok());
    /// assert!(c.thresholds(0, 3).is_err());
    /// ```
    pub fn thresholds(mut self, healthy: u32, unhealthy: u32) -> Result<Self, Error> {
        if healthy == 0 || unhealthy == 0 {
            return Err(Error::invalid_argument(format!(
                "health check thresholds {healthy} healthy / {unhealthy} unhealthy: both at \
                 least 1 (2 and 3 are usual)"
            )));
        }
        self.healthy = healthy;
        self.unhealthy = unhealthy;
        Ok(self)
    }

    /// The timeout of one check.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let c = sd_lb::checks::ActiveChecks::new(Duration::from_secs(60)).unwrap();
    /// assert_eq!(c.check_timeout(), Duration::from_secs(2));
    /// ```
    pub fn check_timeout(&self) -> Duration {
        self.timeout
    }
}

/// The running checks of [`Outliers::spawn_checks`]; dropping it stops them.
///
/// ```
/// # use std::time::Duration;
/// use std::sync::Arc;
/// use sd_lb::{checks::ActiveChecks, Outliers};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let outliers = Arc::new(Outliers::new());
/// let checks = outliers
///     .spawn_checks(ActiveChecks::new(Duration::from_secs(5)).unwrap(), |_| async { true })
///     .unwrap();
/// drop(checks);
/// # }
/// ```
#[derive(Debug)]
pub struct HealthChecks {
    task: JoinHandle<()>,
    outliers: Weak<Outliers>,
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.task.abort();
        // Only checks bring back what checks took out.
        if let Some(outliers) = self.outliers.upgrade() {
            outliers.checks_stopped();
        }
    }
}

impl Outliers {
    /// Runs `check` on every instance every interval, all of an interval's checks at once, in
    /// a task of the current tokio runtime (see the [`checks`](crate::checks) module). `check`
    /// returns whether the instance is healthy. Fails without a tokio runtime.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use std::sync::Arc;
    /// use sd_lb::{checks::ActiveChecks, Outliers};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let outliers = Arc::new(Outliers::new());
    /// let _checks = outliers
    ///     .spawn_checks(ActiveChecks::new(Duration::from_secs(5)).unwrap(), |instance| async move {
    ///         !instance.addr().is_empty()
    ///     })
    ///     .unwrap();
    /// # }
    /// ```
    pub fn spawn_checks<C, Fut>(
        self: &Arc<Self>,
        settings: ActiveChecks,
        check: C,
    ) -> Result<HealthChecks, Error>
    where
        C: Fn(Instance) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::invalid_argument(
                "active health checks run in a tokio runtime: start them in one",
            )
        })?;
        let outliers = Arc::downgrade(self);
        let span = tracing::error_span!("sd_health_checks", interval = ?settings.interval);
        let task = runtime.spawn(
            async move {
                let mut streaks: HashMap<HostKey, Streak> = HashMap::new();
                let mut ticks = tokio::time::interval(settings.interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let Some(outliers) = outliers.upgrade() else {
                        return;
                    };
                    round(&outliers, &settings, &check, &mut streaks).await;
                }
            }
            .instrument(span),
        );
        Ok(HealthChecks {
            task,
            outliers: Arc::downgrade(self),
        })
    }
}

/// One instance's results in a row: passes (positive) or failures (negative).
type Streak = i64;

/// Checks every live instance once, together, and applies the results.
async fn round<C, Fut>(
    outliers: &Outliers,
    settings: &ActiveChecks,
    check: &C,
    streaks: &mut HashMap<HostKey, Streak>,
) where
    C: Fn(Instance) -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    let (hosts, n) = outliers.live();
    let mut running = JoinSet::new();
    for (i, (key, _)) in hosts.iter().enumerate() {
        // A check that panics, before its future or in it, has failed.
        let Ok(checking) = std::panic::catch_unwind(AssertUnwindSafe(|| check(key.0.clone())))
        else {
            continue;
        };
        let checked = tokio::time::timeout(settings.timeout, checking);
        running.spawn(async move { (i, matches!(checked.await, Ok(true))) });
    }
    let mut results = vec![false; hosts.len()];
    while let Some(done) = running.join_next().await {
        if let Ok((i, ok)) = done {
            results[i] = ok;
        }
    }
    streaks.retain(|key, _| hosts.iter().any(|(k, _)| k == key));
    for ((key, host), ok) in hosts.into_iter().zip(results) {
        let streak = streaks.entry(key).or_insert(0);
        *streak = match (ok, *streak) {
            (true, s) if s > 0 => s + 1,
            (true, _) => 1,
            (false, s) if s < 0 => s - 1,
            (false, _) => -1,
        };
        if *streak >= i64::from(settings.healthy) {
            outliers.check_in(&host);
        } else if -*streak >= i64::from(settings.unhealthy) {
            let failures = u32::try_from(-*streak).unwrap_or(u32::MAX);
            outliers.check_out(&host, failures, n);
        }
    }
}
