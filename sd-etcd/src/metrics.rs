//! Metrics of `sd-etcd` (feature `metrics`), recorded through the
//! [`metrics`](https://docs.rs/metrics) facade: install any recorder (for Prometheus,
//! `metrics-exporter-prometheus`) and they appear in it; without one, recording does nothing.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `sd_instances` | gauge | `prefix` | instances the [`EtcdInstancer`]s of that prefix see now (a stopped one's leave the sum) |
//! | `sd_changes_applied_total` | counter | `prefix` | puts and deletes under the prefix the instancer applied from its watch (a re-read of the whole prefix counts as one) |
//! | `sd_discovery_errors_total` | counter | `prefix` | failed attempts to re-open the watch or re-read the prefix (each is an error event for subscribers) |
//! | `sd_lease_losses_total` | counter | `ttl_secs` | leases of [`EtcdRegistrar`]s that etcd said were gone (expired while cut off, revoked, a store restored from a backup) |
//! | `sd_reregistrations_total` | counter | `ttl_secs` | keys put again by the registrars: every key of a lost lease on its new lease, and each key deleted or overwritten behind their back |
//!
//! `prefix` is the watched prefix (`/services/barsvc/`); `ttl_secs` is the registrations' TTL
//! in whole seconds (registrars share one lease per TTL and heartbeat). Handles are registered
//! once, when an instancer or a lease is made; they are recorded when the store changes or
//! fails, never per call.
//!
//! The endpointer's metrics (`sd_endpoints`, ...) are `sd-core`'s (its feature `metrics`), the
//! balancers' and retries' are `sd-lb`'s.
//!
//! [`EtcdInstancer`]: crate::EtcdInstancer
//! [`EtcdRegistrar`]: crate::EtcdRegistrar
//!
//! ```no_run
//! use metrics_util::debugging::{DebugValue, DebuggingRecorder};
//! use sd_etcd::{ClientOptions, EtcdClient, EtcdInstancer};
//!
//! # async fn run() -> Result<(), sd_etcd::Error> {
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! metrics::set_global_recorder(recorder).expect("no recorder installed yet");
//!
//! let client = EtcdClient::connect(["http://127.0.0.1:2379"], ClientOptions::new()).await?;
//! let _instancer = EtcdInstancer::new(client, "/services/barsvc/").await?;
//! for (key, _, _, value) in snapshotter.snapshot().into_vec() {
//!     println!("{} {:?}", key.key().name(), value); // sd_instances Gauge(..), ...
//! }
//! # Ok(()) }
//! ```

pub(crate) const INSTANCES: &str = "sd_instances";
pub(crate) const CHANGES_APPLIED: &str = "sd_changes_applied_total";
pub(crate) const DISCOVERY_ERRORS: &str = "sd_discovery_errors_total";
pub(crate) const LEASE_LOSSES: &str = "sd_lease_losses_total";
pub(crate) const REREGISTRATIONS: &str = "sd_reregistrations_total";

/// An instancer's handles, registered once when it is made (empty without the feature).
pub(crate) struct InstancerMetrics {
    #[cfg(feature = "metrics")]
    instances: ::metrics::Gauge,
    #[cfg(feature = "metrics")]
    changes: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    errors: ::metrics::Counter,
    /// What this instancer adds to `sd_instances`: instancers of one prefix share the series,
    /// so each moves it by its own changes, and takes its part off when it stops.
    #[cfg(feature = "metrics")]
    counted: std::sync::atomic::AtomicUsize,
}

#[cfg(feature = "metrics")]
impl Drop for InstancerMetrics {
    fn drop(&mut self) {
        self.instances.decrement(*self.counted.get_mut() as f64);
    }
}

impl InstancerMetrics {
    pub(crate) fn new(prefix: &str) -> Self {
        #[cfg(feature = "metrics")]
        {
            ::metrics::describe_gauge!(INSTANCES, "Instances an etcd instancer sees now");
            ::metrics::describe_counter!(
                CHANGES_APPLIED,
                "Puts and deletes an etcd instancer applied from its watch"
            );
            ::metrics::describe_counter!(
                DISCOVERY_ERRORS,
                "Failed attempts of an etcd instancer to re-open its watch or re-read its prefix"
            );
            let prefix = prefix.to_owned();
            InstancerMetrics {
                instances: ::metrics::gauge!(INSTANCES, "prefix" => prefix.clone()),
                changes: ::metrics::counter!(CHANGES_APPLIED, "prefix" => prefix.clone()),
                errors: ::metrics::counter!(DISCOVERY_ERRORS, "prefix" => prefix),
                counted: Default::default(),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (prefix, INSTANCES, CHANGES_APPLIED, DISCOVERY_ERRORS);
            InstancerMetrics {}
        }
    }

    /// The instance set was published with `n` instances.
    pub(crate) fn instances(&self, n: usize) {
        #[cfg(feature = "metrics")]
        {
            let before = self.counted.swap(n, std::sync::atomic::Ordering::Relaxed);
            self.instances.increment(n as f64 - before as f64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }

    /// `n` changes applied.
    pub(crate) fn applied(&self, n: u64) {
        #[cfg(feature = "metrics")]
        if n > 0 {
            self.changes.increment(n);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }

    pub(crate) fn error(&self) {
        #[cfg(feature = "metrics")]
        self.errors.increment(1);
    }
}

/// A lease pool's handles, registered once when the pool is made (empty without the feature).
pub(crate) struct LeaseMetrics {
    #[cfg(feature = "metrics")]
    losses: ::metrics::Counter,
    #[cfg(feature = "metrics")]
    reregistrations: ::metrics::Counter,
}

impl LeaseMetrics {
    pub(crate) fn new(ttl_secs: i64) -> Self {
        #[cfg(feature = "metrics")]
        {
            ::metrics::describe_counter!(LEASE_LOSSES, "Registration leases etcd said were gone");
            ::metrics::describe_counter!(
                REREGISTRATIONS,
                "Keys put again after their lease was lost or they were deleted behind our back"
            );
            let ttl = ttl_secs.to_string();
            LeaseMetrics {
                losses: ::metrics::counter!(LEASE_LOSSES, "ttl_secs" => ttl.clone()),
                reregistrations: ::metrics::counter!(REREGISTRATIONS, "ttl_secs" => ttl),
            }
        }
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (ttl_secs, LEASE_LOSSES, REREGISTRATIONS);
            LeaseMetrics {}
        }
    }

    pub(crate) fn lease_lost(&self) {
        #[cfg(feature = "metrics")]
        self.losses.increment(1);
    }

    /// `n` keys put again.
    pub(crate) fn reregistered(&self, n: usize) {
        #[cfg(feature = "metrics")]
        if n > 0 {
            self.reregistrations.increment(n as u64);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = n;
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use futures::StreamExt;
    use metrics_util::debugging::DebuggingRecorder;
    use sd_core::{Event, Instancer, Registrar, Service, TtlOption};
    use sd_test_metrics::{deltas, Totals};

    use crate::{
        Error, EtcdInstancer, EtcdRegistrar, Header, KeyValue, MockClient, WatchBatch, WatchEvent,
    };

    fn header(revision: i64) -> Header {
        Header {
            revision,
            cluster_id: 1,
            raft_term: 2,
        }
    }

    fn put(key: &str, rev: i64) -> WatchEvent {
        WatchEvent::Put {
            key: key.as_bytes().to_vec(),
            value: key.rsplit('/').next().unwrap_or(key).as_bytes().to_vec(),
            mod_revision: rev,
        }
    }

    /// Paused time (the reconnect backoff): three changes applied, two failed reconnects
    /// counted as discovery errors, the instance gauge at the final set, all under the prefix.
    #[tokio::test(start_paused = true)]
    async fn instancer_counts_changes_and_errors_per_prefix() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recording = ::metrics::set_default_local_recorder(&recorder);
        let mut mock = MockClient::new();
        mock.expect_get_prefix().returning(|_| {
            Ok((
                vec![KeyValue {
                    key: b"/svc/a:1".to_vec(),
                    value: b"a:1".to_vec(),
                    mod_revision: 2,
                    lease: 0,
                }],
                header(2),
            ))
        });
        let opens = Arc::new(AtomicUsize::new(0));
        let o = opens.clone();
        mock.expect_watch_prefix()
            .returning(move |_, _| match o.fetch_add(1, Ordering::SeqCst) {
                0 => Ok(futures::stream::iter(vec![
                    Ok(WatchBatch {
                        events: vec![
                            put("/svc/b:1", 3),
                            put("/svc/c:1", 4),
                            WatchEvent::Delete {
                                key: b"/svc/a:1".to_vec(),
                                mod_revision: 5,
                            },
                        ],
                        header: header(5),
                        ..Default::default()
                    }),
                    Err(Error::Watch("connection reset".into())),
                ])
                .boxed()),
                1 | 2 => Err(Error::Watch("connection refused".into())),
                _ => Ok(futures::stream::pending().boxed()),
            });
        let instancer = EtcdInstancer::new(mock, "/svc/").await.unwrap();
        let mut totals = Totals::default();
        let d = totals.read(&snapshotter);
        assert_eq!(totals.get("sd_instances{prefix=/svc/}"), 1.0, "{d:?}");

        let mut events = instancer.subscribe();
        let want = Event::from_instances(["b:1", "c:1"]);
        tokio::time::timeout(Duration::from_secs(10), async {
            while opens.load(Ordering::SeqCst) < 4 || events.next().await != Some(want.clone()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the watch recovers");
        let d = totals.read(&snapshotter);
        assert_eq!(d["sd_changes_applied_total{prefix=/svc/}"], 3.0, "{d:?}");
        assert_eq!(d["sd_discovery_errors_total{prefix=/svc/}"], 2.0, "{d:?}");
        assert_eq!(totals.get("sd_instances{prefix=/svc/}"), 2.0, "{d:?}");
        // A stopped instancer's instances leave the gauge.
        instancer.stop();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        totals.read(&snapshotter);
        assert_eq!(totals.get("sd_instances{prefix=/svc/}"), 0.0);
    }

    /// Paused time: lease 1 is lost (one loss, its key put again on lease 2), then the key is
    /// deleted behind the registrar's back (put back: a second re-registration).
    #[tokio::test(start_paused = true)]
    async fn lease_losses_and_reregistrations_are_counted() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _recording = ::metrics::set_default_local_recorder(&recorder);
        let mut mock = MockClient::new();
        mock.expect_lease_pools().returning(|| None);
        let next = Arc::new(AtomicI64::new(1));
        let n = next.clone();
        mock.expect_grant()
            .returning(move |ttl| Ok((n.fetch_add(1, Ordering::SeqCst), ttl)));
        mock.expect_put_many().returning(|_, _| Ok(()));
        mock.expect_keep_alive()
            .returning(|lease, _| Ok(lease != 1));
        let rounds = Arc::new(AtomicUsize::new(0));
        let r = rounds.clone();
        // Lease 2's second check finds the key gone.
        mock.expect_lease_keys().returning(move |_| {
            Ok(Some(if r.fetch_add(1, Ordering::SeqCst) == 1 {
                vec![]
            } else {
                vec![b"/svc/a:1".to_vec()]
            }))
        });
        mock.expect_get().returning(|_| Ok((None, header(9))));
        mock.expect_delete_many_if_lease().returning(|_, _| Ok(()));
        mock.expect_revoke().returning(|_| Ok(()));
        let ttl = TtlOption::new(Duration::from_millis(500), Duration::from_millis(1500)).unwrap();
        let service = Service::new("/svc/a:1", "a:1").unwrap().with_ttl(ttl);
        let registrar = EtcdRegistrar::new(Arc::new(mock), service);
        registrar.register().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2600)).await;
        assert!(rounds.load(Ordering::SeqCst) >= 3);
        assert_eq!(registrar.lease(), Some(2));
        let d = deltas(&snapshotter);
        assert_eq!(d["sd_lease_losses_total{ttl_secs=2}"], 1.0, "{d:?}");
        assert_eq!(d["sd_reregistrations_total{ttl_secs=2}"], 2.0, "{d:?}");
        registrar.deregister().await.unwrap();
    }
}
