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
