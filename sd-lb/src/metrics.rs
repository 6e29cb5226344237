//! Metrics of `sd-lb` (feature `metrics`), recorded through the
//! [`metrics`](https://docs.rs/metrics) facade: install any recorder (for Prometheus,
//! `metrics-exporter-prometheus`) and they appear in it; without one, recording does nothing.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `sd_picks_no_endpoint_total` | counter | | picks that found no endpoint to give (every balancer of this crate; a [`Retry`] attempt whose pick failed is one) |
//! | `sd_retries_total` | counter | | attempts a [`Retry`] made after a failed one |
//! | `sd_retry_stops_total` | counter | `reason` | calls a [`Retry`] gave up on, by why: `max_attempts`, `deadline`, `callback`, `budget` |
//! | `sd_ejections_total` | counter | `by` | instances [`Outliers`] ejected, by what decided it: `consecutive` (failures in a row), `rate` (the failure-rate detector) `probe` (a failed probe ejects again, for longer) or `check` (active health checks took it out) |
//! | `sd_restorations_total` | counter | | ejected instances brought back by a successful probe or by active health checks |
//! | `sd_ejected` | gauge | | instances ejected now (over every [`Outliers`] of the program) |
//!
//! Only failures record anything: a successful pick or call touches no metric. [`Retry`] and
//! [`Outliers`] register their handles once, when they are made; a pick with no endpoint finds
//! its counter through the facade when it happens.
//!
//! The endpointer's metrics (`sd_endpoints`, ...) are `sd-core`'s, the etcd backend's
//! (`sd_instances`, ...) `sd-etcd`'s: each crate's feature `metrics` turns on its own.
//!
//! [`Retry`]: crate::Retry
//! [`Outliers`]: crate::Outliers
//!
//! ```
//! use std::time::Duration;
//! use metrics_util::debugging::{DebugValue, DebuggingRecorder};
//! use sd_core::FixedEndpointer;
//! use sd_lb::{Retry, RoundRobin};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! let _recording = metrics::set_default_local_recorder(&recorder);
//!
//! let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1, 2])), 3, Duration::from_secs(1)).unwrap();
//! let _ = retry.call(|_| async { Err::<(), _>("refused") }).await;
//!
//! let retries = snapshotter.snapshot().into_vec().into_iter().find_map(|(key, _, _, value)| {
//!     (key.key().name() == "sd_retries_total").then_some(value)
//! });
//! assert_eq!(retries, Some(DebugValue::Counter(2)));
//! # }
//! ```

use crate::StopReason;

pub(crate) const PICKS_NO_ENDPOINT: &str = "sd_picks_no_endpoint_total";
pub(crate) const RETRIES: &str = "sd_retries_total";
pub(crate) const RETRY_STOPS: &str = "sd_retry_stops_total";
pub(crate) const EJECTIONS: &str = "sd_ejections_total";
pub(crate) const RESTORATIONS: &str = "sd_restorations_total";
pub(crate) const EJECTED: &str = "sd_ejected";

/// The snapshot's "no endpoints" error, counted: for every pick that has nothing to give.
///
/// Built inline, with only the counting out of line: a pick whose result came from a call on
/// this path would have it built in a temporary and copied, on the hit path too.
#[inline(always)]
pub(crate) fn no_endpoint<E>(snapshot: &sd_core::Snapshot<E>) -> sd_core::Error {
    count_no_endpoint();
    snapshot.no_endpoints()
}

#[cold]
#[inline(never)]
fn count_no_endpoint() {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(PICKS_NO_ENDPOINT).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = PICKS_NO_ENDPOINT;
}

/// A [`Retry`](crate::Retry)'s handles, registered once when it is made (empty without the
/// feature).
pub(crate) struct RetryMetrics {
    #[cfg(feature = "metrics")]
    retries: ::metrics::Counter,
    /// Stops by reason, in [`reason_index`] order.
    #[cfg(feature = "metrics")]
    stops: [::metrics::Counter; 4],
}

#[cfg(feature = "metrics")]
const REASONS: [(StopReason, &str); 4] = [
    (StopReason::MaxAttempts, "max_attempts"),
    (StopReason::Deadline, "deadline"),
    (StopReason::Callback, "callback"),
    (StopReason::Budget, "budget"),
];

impl RetryMetrics {
    pub(crate) fn new() -> Self {
        #[cfg(feature = "metrics")]
        {
            ::metrics::describe_counter!(RETRIES, "Attempts a Retry made after a failed one");
            ::metrics::describe_counter!(RETRY_STOPS, "Calls a Retry gave up on, by why");
            ::metrics::describe_counter!(PICKS_NO_ENDPOINT, "Picks that found no endpoint");
            RetryMetrics {
                retries: ::metrics::counter!(RETRIES),
                stops: REASONS.map(|(_, name)| ::metrics::counter!(RETRY_STOPS, "reason" => name)),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (RETRIES, RETRY_STOPS);
            RetryMetrics {}
        }
    }

    pub(crate) fn retry(&self) {
        #[cfg(feature = "metrics")]
        self.retries.increment(1);
    }

    pub(crate) fn stopped(&self, reason: StopReason) {
        #[cfg(feature = "metrics")]
        if let Some(i) = REASONS.iter().position(|(r, _)| *r == reason) {
            self.stops[i].increment(1);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = reason;
    }
}

/// What decided an ejection (the `by` label of `sd_ejections_total`).
#[derive(Clone, Copy)]
pub(crate) enum EjectedBy {
    Consecutive = 0,
    Rate = 1,
    Probe = 2,
    Check = 3,
}

/// An [`Outliers`](crate::Outliers)' handles, registered once when it is made (empty without
/// the feature).
pub(crate) struct OutlierMetrics {
    #[cfg(feature = "metrics")]
    ejections: [::metrics::Counter; 4],
    #[cfg(feature = "metrics")]
    restorations: ::metrics::Counter,
    ejected: EjectedGauge,
}

/// The `sd_ejected` gauge, held by each instance's health so an instance that leaves while
/// ejected takes itself off it.
#[derive(Clone)]
pub(crate) struct EjectedGauge {
    #[cfg(feature = "metrics")]
    gauge: ::metrics::Gauge,
}

impl EjectedGauge {
    pub(crate) fn add(&self, delta: f64) {
        #[cfg(feature = "metrics")]
        self.gauge.increment(delta);
        #[cfg(not(feature = "metrics"))]
        let _ = delta;
    }
}

impl OutlierMetrics {
    pub(crate) fn new() -> Self {
        #[cfg(feature = "metrics")]
        {
            ::metrics::describe_counter!(EJECTIONS, "Instances ejected by outlier detection");
            ::metrics::describe_counter!(
                RESTORATIONS,
                "Ejected instances restored by a successful probe"
            );
            ::metrics::describe_gauge!(EJECTED, "Instances ejected now");
            OutlierMetrics {
                ejections: ["consecutive", "rate", "probe", "check"]
                    .map(|by| ::metrics::counter!(EJECTIONS, "by" => by)),
                restorations: ::metrics::counter!(RESTORATIONS),
                ejected: EjectedGauge {
                    gauge: ::metrics::gauge!(EJECTED),
                },
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (EJECTIONS, RESTORATIONS, EJECTED);
            OutlierMetrics {
                ejected: EjectedGauge {},
            }
        }
    }

    pub(crate) fn gauge(&self) -> EjectedGauge {
        self.ejected.clone()
    }

    /// An instance ejected by `by`; `newly` when it was in service before (a failed probe
    /// ejects one that already counts as ejected).
    pub(crate) fn ejected(&self, by: EjectedBy, newly: bool) {
        #[cfg(feature = "metrics")]
        self.ejections[by as usize].increment(1);
        #[cfg(not(feature = "metrics"))]
        let _ = by;
        if newly {
            self.ejected.add(1.0);
        }
    }

    /// An instance restored (it has already taken itself off the gauge, see
    /// [`EjectedGauge`]).
    pub(crate) fn restored(&self) {
        #[cfg(feature = "metrics")]
        self.restorations.increment(1);
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use metrics_util::debugging::DebuggingRecorder;
    use sd_core::FixedEndpointer;
    use sd_test_metrics::{deltas, Totals};

    use crate::{decide_with, Decision, Outliers, Retry, RetryBudget, RoundRobin};

    /// Each way a retried call can stop is counted under its reason, retries are the attempts
    /// after the first, and a pick with nothing to give is counted; successful calls leave
    /// every metric as it was.
    #[tokio::test(start_paused = true)]
    async fn retries_and_stops_are_counted_by_reason_and_success_records_nothing() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recording = ::metrics::set_default_local_recorder(&recorder);
        let mut totals = Totals::default();
        let rr = || RoundRobin::new(FixedEndpointer::new(vec![1, 2, 3]));

        let retry = Retry::new(rr(), 3, Duration::from_secs(5)).unwrap();
        deltas(&snapshotter);
        for _ in 0..10 {
            retry.call(|n| async move { Ok::<_, ()>(n) }).await.unwrap();
        }
        assert!(
            deltas(&snapshotter).iter().all(|(_, d)| *d == 0.0),
            "successful calls record nothing"
        );

        // Every attempt fails: 3 attempts, 2 of them retries.
        let _ = retry.call(|_| async { Err::<(), _>("refused") }).await;
        // The deadline passes during the second attempt.
        let slow = Retry::new(rr(), 3, Duration::from_millis(150)).unwrap();
        let _ = slow
            .call(|_| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err::<(), _>("slow")
            })
            .await;
        // The callback stops after the first failure.
        let stop = Retry::new(rr(), 3, Duration::from_secs(5))
            .unwrap()
            .with_callback(decide_with(|_, _| Decision::<&str>::Stop));
        let _ = stop.call(|_| async { Err::<(), _>("no") }).await;
        // A budget of 2 tokens: half spent after one failure, no retry.
        let budget = Retry::new(rr(), 3, Duration::from_secs(5))
            .unwrap()
            .with_budget(Arc::new(RetryBudget::new(2, 0.1).unwrap()));
        let _ = budget.call(|_| async { Err::<(), _>("no") }).await;
        // Nothing to pick from: every attempt's pick fails.
        let empty = Retry::new(
            RoundRobin::new(FixedEndpointer::<u8>::new(vec![])),
            2,
            Duration::from_secs(5),
        )
        .unwrap();
        let _ = empty.call(|_| async { Ok::<_, ()>(()) }).await;

        totals.read(&snapshotter);
        let v = &totals;
        assert_eq!(
            v.get("sd_retry_stops_total{reason=max_attempts}"),
            2.0,
            "{v:?}"
        );
        assert_eq!(v.get("sd_retry_stops_total{reason=deadline}"), 1.0, "{v:?}");
        assert_eq!(v.get("sd_retry_stops_total{reason=callback}"), 1.0, "{v:?}");
        assert_eq!(v.get("sd_retry_stops_total{reason=budget}"), 1.0, "{v:?}");
        // 2 (all failed) + 1 (the deadline's second attempt) + 0 + 0 + 1 (the empty set's).
        assert_eq!(v.get("sd_retries_total{}"), 4.0, "{v:?}");
        assert_eq!(v.get("sd_picks_no_endpoint_total{}"), 2.0, "{v:?}");
    }

    /// An instance failing twice in a row is ejected (`consecutive`), its failed probe ejects
    /// it again (`probe`) without counting it twice as ejected, and its good probe restores it.
    #[tokio::test(start_paused = true)]
    async fn ejections_restorations_and_the_ejected_gauge_follow_outlier_detection() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recording = ::metrics::set_default_local_recorder(&recorder);
        let mut totals = Totals::default();
        let outliers = Arc::new(
            Outliers::new()
                .consecutive_failures(2)
                .unwrap()
                .base_ejection(Duration::from_secs(10))
                .unwrap(),
        );
        let rr = RoundRobin::new(FixedEndpointer::new(vec!["a", "b", "c", "d"]))
            .with_outliers(outliers.clone());
        let retry = Retry::new(rr, 1, Duration::from_secs(1)).unwrap();
        let broken = AtomicBool::new(true);
        let round = |n: usize| {
            let (retry, broken) = (&retry, &broken);
            async move {
                for _ in 0..n {
                    let _ = retry
                        .call(|e| async move {
                            if e == "b" && broken.load(Ordering::SeqCst) {
                                Err("down")
                            } else {
                                Ok(())
                            }
                        })
                        .await;
                }
            }
        };

        round(8).await;
        totals.read(&snapshotter);
        let v = &totals;
        assert_eq!(outliers.ejected(), 1);
        assert_eq!(v.get("sd_ejections_total{by=consecutive}"), 1.0, "{v:?}");
        assert_eq!(v.get("sd_ejected{}"), 1.0, "{v:?}");

        tokio::time::advance(Duration::from_secs(11)).await;
        round(4).await;
        totals.read(&snapshotter);
        let v = &totals;
        assert_eq!(v.get("sd_ejections_total{by=probe}"), 1.0, "{v:?}");
        assert_eq!(v.get("sd_ejected{}"), 1.0, "still one ejected: {v:?}");
        assert_eq!(v.get("sd_restorations_total{}"), 0.0, "{v:?}");

        broken.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(21)).await;
        round(4).await;
        totals.read(&snapshotter);
        let v = &totals;
        assert_eq!(outliers.ejected(), 0);
        assert_eq!(v.get("sd_restorations_total{}"), 1.0, "{v:?}");
        assert_eq!(v.get("sd_ejected{}"), 0.0, "{v:?}");
        assert_eq!(v.get("sd_ejections_total{by=rate}"), 0.0, "{v:?}");
        assert_eq!(
            v.get("sd_retry_stops_total{reason=max_attempts}"),
            3.0,
            "b failed twice, then its probe: {v:?}"
        );
    }
}
