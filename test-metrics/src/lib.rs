//! Test support shared by sd's crates (not published): reads what a `metrics-util`
//! [`DebuggingRecorder`](metrics_util::debugging::DebuggingRecorder) saw as `name{label=value}`
//! strings, so a test compares metrics as plain text.
//!
//! ```
//! use metrics_util::debugging::DebuggingRecorder;
//!
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! metrics::with_local_recorder(&recorder, || {
//!     metrics::counter!("sd_changes_total", "prefix" => "/services/a/").increment(2);
//! });
//! let seen = sd_test_metrics::deltas(&snapshotter);
//! assert_eq!(seen["sd_changes_total{prefix=/services/a/}"], 2.0);
//! // Counters give their increments since the last snapshot.
//! assert_eq!(sd_test_metrics::deltas(&snapshotter)["sd_changes_total{prefix=/services/a/}"], 0.0);
//! ```

use std::collections::BTreeMap;

use metrics_util::debugging::{DebugValue, Snapshotter};

/// What the recorder saw since the last snapshot, as `name{label=value,...}` → value: a
/// counter's increments since then, a gauge's value if it was set. Histograms are left out.
pub fn deltas(snapshotter: &Snapshotter) -> BTreeMap<String, f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let key = key.key();
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            match value {
                DebugValue::Counter(n) => Some((name, n as f64)),
                DebugValue::Gauge(g) => Some((name, g.into_inner())),
                DebugValue::Histogram(_) => None,
            }
        })
        .collect()
}

/// Running totals over successive snapshots, for gauges moved by increments (the debugging
/// recorder hands out a gauge's movement since the last snapshot, as it does a counter's).
///
/// ```
/// use metrics_util::debugging::DebuggingRecorder;
///
/// let recorder = DebuggingRecorder::new();
/// let snapshotter = recorder.snapshotter();
/// let mut totals = sd_test_metrics::Totals::default();
/// metrics::with_local_recorder(&recorder, || metrics::gauge!("sd_endpoints").increment(3.0));
/// assert_eq!(totals.read(&snapshotter)["sd_endpoints{}"], 3.0);
/// metrics::with_local_recorder(&recorder, || metrics::gauge!("sd_endpoints").decrement(1.0));
/// let moved = totals.read(&snapshotter);
/// assert_eq!(moved["sd_endpoints{}"], -1.0);
/// assert_eq!(totals.get("sd_endpoints{}"), 2.0);
/// ```
#[derive(Debug, Default, Clone)]
pub struct Totals(BTreeMap<String, f64>);

impl Totals {
    /// What moved since the last snapshot (as [`deltas`]), added to the totals.
    pub fn read(&mut self, snapshotter: &Snapshotter) -> BTreeMap<String, f64> {
        let moved = deltas(snapshotter);
        for (name, delta) in &moved {
            *self.0.entry(name.clone()).or_insert(0.0) += delta;
        }
        moved
    }

    /// The total of `name` (`name{label=value,...}`), 0 if it never moved.
    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }
}
