//! Metrics of `sd-core` (feature `metrics`), recorded through the
//! [`metrics`](https://docs.rs/metrics) facade: install any recorder (for Prometheus,
//! `metrics-exporter-prometheus`) and they appear in it; without one, recording does nothing.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `sd_endpoints` | gauge | `endpointer` | endpoints the [`DefaultEndpointer`]s of that name serve now (an endpointer's leave the sum when it is dropped) |
//! | `sd_endpointer_changes_total` | counter | `endpointer` | endpoints added or removed by a [`DefaultEndpointer`] (one per instance that appears or goes, and one per endpoint dropped by `invalidate_on_error`) |
//!
//! `endpointer` is the name given with [`EndpointerOptions::name`], or `default`. Both are
//! recorded when the endpoint set changes, never when a balancer picks: handles are registered
//! once, when the endpointer is made.
//!
//! [`DefaultEndpointer`]: crate::DefaultEndpointer
//! [`EndpointerOptions::name`]: crate::EndpointerOptions::name
//!
//! ```
//! use metrics_util::debugging::{DebugValue, DebuggingRecorder};
//! use sd_core::{endpoint_fn, DefaultEndpointer, EndpointerOptions, Event, Publisher};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! let _recording = metrics::set_default_local_recorder(&recorder);
//!
//! let instancer = Publisher::new(Event::from_instances(["a:1", "b:1"]));
//! let options = EndpointerOptions::new().name("barsvc");
//! let _e = DefaultEndpointer::new(&instancer, endpoint_fn(|i| i.to_string()), options).await;
//!
//! let endpoints = snapshotter.snapshot().into_vec().into_iter().find_map(|(key, _, _, value)| {
//!     (key.key().name() == "sd_endpoints").then_some(value)
//! });
//! assert_eq!(endpoints, Some(DebugValue::Gauge(2.0.into())));
//! # }
//! ```

/// Metric names, shared by the code that records them and its tests.
pub(crate) const ENDPOINTS: &str = "sd_endpoints";
pub(crate) const ENDPOINTER_CHANGES: &str = "sd_endpointer_changes_total";

/// A [`DefaultEndpointer`](crate::DefaultEndpointer)'s handles, registered once when it is made
/// (empty without the feature).
pub(crate) struct EndpointerMetrics {
    #[cfg(feature = "metrics")]
    endpoints: ::metrics::Gauge,
    #[cfg(feature = "metrics")]
    changes: ::metrics::Counter,
    /// What this endpointer adds to `sd_endpoints`: endpointers of one name (unnamed ones
    /// among them) share the series, so each moves it by its own changes.
    #[cfg(feature = "metrics")]
    counted: std::sync::atomic::AtomicUsize,
}

#[cfg(feature = "metrics")]
impl Drop for EndpointerMetrics {
    fn drop(&mut self) {
        self.endpoints.decrement(*self.counted.get_mut() as f64);
    }
}

impl EndpointerMetrics {
    pub(crate) fn new(name: Option<&str>) -> Self {
        #[cfg(feature = "metrics")]
        {
            let name = name.unwrap_or("default").to_owned();
            ::metrics::describe_gauge!(ENDPOINTS, "Endpoints a DefaultEndpointer serves now");
            ::metrics::describe_counter!(
                ENDPOINTER_CHANGES,
                "Endpoints added or removed by a DefaultEndpointer"
            );
            EndpointerMetrics {
                endpoints: ::metrics::gauge!(ENDPOINTS, "endpointer" => name.clone()),
                changes: ::metrics::counter!(ENDPOINTER_CHANGES, "endpointer" => name),
                counted: Default::default(),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (name, ENDPOINTS, ENDPOINTER_CHANGES);
            EndpointerMetrics {}
        }
    }

    /// The endpoint set changed: `changes` endpoints added or removed, `endpoints` now.
    pub(crate) fn changed(&self, changes: usize, endpoints: usize) {
        #[cfg(feature = "metrics")]
        {
            if changes > 0 {
                self.changes.increment(changes as u64);
            }
            let before = self
                .counted
                .swap(endpoints, std::sync::atomic::Ordering::Relaxed);
            self.endpoints.increment(endpoints as f64 - before as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = (changes, endpoints);
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use std::time::Duration;

    use metrics_util::debugging::DebuggingRecorder;
    use sd_test_metrics::Totals;

    use crate::{
        endpoint_fn, DefaultEndpointer, Endpointer, EndpointerOptions, Error, Event, Publisher,
    };

    /// Each endpointer's metrics carry its name (`default` without one); the gauge follows the
    /// set, the counter counts endpoints added and removed, and `invalidate_on_error` dropping
    /// them counts too.
    #[tokio::test(start_paused = true)]
    async fn endpoints_and_changes_per_named_endpointer() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recording = ::metrics::set_default_local_recorder(&recorder);
        let mut totals = Totals::default();

        let bar = Publisher::new(Event::from_instances(["a:1", "b:1"]));
        let options = EndpointerOptions::new()
            .name("barsvc")
            .invalidate_on_error(Duration::from_secs(5));
        let named = DefaultEndpointer::new(&bar, endpoint_fn(|i| i.to_string()), options).await;
        let baz = Publisher::new(Event::from_instances(["z:1"]));
        let _unnamed = DefaultEndpointer::new(
            &baz,
            endpoint_fn(|i| i.to_string()),
            EndpointerOptions::new(),
        )
        .await;
        let d = totals.read(&snapshotter);
        assert_eq!(totals.get("sd_endpoints{endpointer=barsvc}"), 2.0, "{d:?}");
        assert_eq!(
            d["sd_endpointer_changes_total{endpointer=barsvc}"], 2.0,
            "{d:?}"
        );
        assert_eq!(totals.get("sd_endpoints{endpointer=default}"), 1.0, "{d:?}");

        // b goes, c and d come: 3 changes, 3 endpoints.
        let v = named.version();
        bar.publish(Event::from_instances(["a:1", "c:1", "d:1"]));
        named.changed(v).await;
        let d = totals.read(&snapshotter);
        assert_eq!(totals.get("sd_endpoints{endpointer=barsvc}"), 3.0, "{d:?}");
        assert_eq!(
            d["sd_endpointer_changes_total{endpointer=barsvc}"], 3.0,
            "{d:?}"
        );

        // Discovery fails for longer than invalidate_on_error: all 3 dropped.
        bar.publish(Event::Error(Error::backend_msg("etcd down")));
        named.wait_until(|s| s.error().is_some()).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        named.wait_until(|s| s.endpoints().is_empty()).await;
        let d = totals.read(&snapshotter);
        assert_eq!(
            d["sd_endpointer_changes_total{endpointer=barsvc}"], 3.0,
            "{d:?}"
        );
        assert_eq!(
            d["sd_endpointer_changes_total{endpointer=default}"], 0.0,
            "{d:?}"
        );

        // Back: one endpoint made again.
        bar.publish(Event::from_instances(["a:1"]));
        named.wait_until(|s| s.endpoints().len() == 1).await;
        let d = totals.read(&snapshotter);
        assert_eq!(totals.get("sd_endpoints{endpointer=barsvc}"), 1.0, "{d:?}");
        assert_eq!(
            d["sd_endpointer_changes_total{endpointer=barsvc}"], 1.0,
            "{d:?}"
        );
    }

    /// Unnamed endpointers share `default`: the gauge is their sum, and a dropped one's
    /// endpoints leave it.
    #[tokio::test]
    async fn endpointers_sharing_a_name_add_up_and_leave_when_dropped() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recording = ::metrics::set_default_local_recorder(&recorder);
        let mut totals = Totals::default();
        let mut endpoints = || {
            totals.read(&snapshotter);
            totals.get("sd_endpoints{endpointer=default}")
        };
        let three = Publisher::new(Event::from_instances(["a:1", "b:1", "c:1"]));
        let five = Publisher::new(Event::from_instances(["v:1", "w:1", "x:1", "y:1", "z:1"]));
        let options = EndpointerOptions::new;
        let e3 = DefaultEndpointer::new(&three, endpoint_fn(|i| i.to_string()), options()).await;
        let e5 = DefaultEndpointer::new(&five, endpoint_fn(|i| i.to_string()), options()).await;
        assert_eq!(endpoints(), 8.0);
        let v = e5.version();
        five.publish(Event::from_instances(["v:1"]));
        e5.changed(v).await;
        assert_eq!(endpoints(), 4.0);
        drop(e3);
        // The endpointer's task ends at the runtime's next turn.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(endpoints(), 1.0);
    }
}
