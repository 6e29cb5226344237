//! Passive health checking: instances that keep failing are ejected for a while.
//!
//! After Envoy's outlier detection (consecutive 5xx, `base_ejection_time`,
//! `max_ejection_percent`) and gRPC's (gRFC A50; its failure-percentage detector is
//! [`Outliers::failure_rate`], off by default): an instance whose calls fail
//! `consecutive_failures` times in a row (default 5) is *ejected*: it gets no picks for
//! `base_ejection` × the number of times it has been ejected (default 30 s, at most
//! `max_ejection`, default 300 s). When that time is over, one call goes to it (the *probe*) and
//! decides: success restores it, failure ejects it again for longer (outcomes of calls picked
//! before the ejection that arrive during it decide nothing). No more than
//! `max_ejection_percent` of the set (default 50 %) is ejected at once, so a widespread failure
//! does not leave the rest overloaded; and when every instance is ejected, picks go to all of
//! them as if none were (panic mode).
//!
//! State belongs to the instance (its stored value) and lasts while the instance is in the set:
//! one that leaves and comes back starts clean. A retry steps past ejected instances too: after
//! a failure it goes to an untried instance in service while there is one.
//!
//! **Slow start** ([`Outliers::slow_start`], off by default; 30 s is typical), after Envoy's
//! `slow_start_config`: an instance that joins the set after the first one a balancer saw gets a
//! share of picks that ramps up over the window, `max(min_percent, (elapsed / window)^(1 /
//! aggression))` of its fair share (defaults: aggression 1.0, a linear ramp; min 10 %), so cold
//! caches and empty connection pools are not hit with a full share at once. A pick that lands on a
//! warming instance is kept with that probability, else drawn again the balancer's own way (round
//! robin: the next in turn; random and P2C: a new draw), which also spreads an ejected instance's
//! picks evenly over the rest. One that leaves and comes back warms up again.
//!
//! With nothing ejected and nothing warming, a pick reads two shared counters and nothing of any
//! instance: health tracking costs the success path next to nothing. Outcomes reach it through
//! [`Balancer::report`](sd_core::Balancer::report), which [`Retry`](crate::Retry) calls after
//! every attempt; an outcome for a pick from a snapshot that has changed since is dropped (its
//! slot no longer names the same instance).

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_core::{Error, Instance, Snapshot, Tried};
use tokio::time::Instant;

use crate::metrics::{EjectedBy, EjectedGauge, OutlierMetrics};
use crate::per_snapshot::PerSnapshot;

/// Outlier detection settings and the state of every instance it follows (see the
/// [module docs](crate::outliers)). Share one between the balancers of a service.
///
/// ```
/// use std::time::Duration;
/// use sd_lb::Outliers;
///
/// let outliers = Outliers::new()
///     .consecutive_failures(3).unwrap()
///     .base_ejection(Duration::from_secs(10)).unwrap()
///     .max_ejection_percent(30).unwrap();
/// assert_eq!(outliers.ejected(), 0);
/// ```
pub struct Outliers {
    consecutive: u32,
    base: Duration,
    max: Duration,
    max_percent: usize,
    epoch: Instant,
    /// The health of the instances of the newest set a table was built for, by instance and
    /// by occurrence of the instance in its set (a fixed list names every endpoint alike).
    known: Mutex<Known>,
    counts: Arc<Counts>,
    tables: PerSnapshot<Arc<[Arc<Host>]>>,
    listener: Option<Box<Listener>>,
    /// The failure-rate detector: (percent, window of calls), off by default.
    rate: Option<(u64, u64)>,
    /// The size of the last set a table was built for (the cap's base for direct reports).
    last_n: AtomicUsize,
    /// Slow start, off by default.
    slow_start: Option<SlowStart>,
    /// Whether a table was built yet: the first set's instances start warm.
    seen_a_set: std::sync::atomic::AtomicBool,
    metrics: OutlierMetrics,
}

/// Instances ejected (high 32 bits) and warming (low 32 bits) now, in one word: a pick looks at
/// an instance's health only when it is non-zero, and finds out with one load.
#[derive(Default)]
pub(crate) struct Counts(AtomicU64);

/// One ejected instance in [`Counts`].
const EJECTED: u64 = 1 << 32;
/// One warming instance in [`Counts`].
const WARMING: u64 = 1;

impl Counts {
    fn ejected(&self) -> usize {
        (self.0.load(Ordering::Relaxed) >> 32) as usize
    }

    fn warming(&self) -> usize {
        (self.0.load(Ordering::Relaxed) & 0xffff_ffff) as usize
    }

    /// Whether no instance is ejected or warming.
    #[inline(always)]
    fn quiet(&self) -> bool {
        self.0.load(Ordering::Relaxed) == 0
    }

    fn add(&self, one: u64) {
        self.0.fetch_add(one, Ordering::Relaxed);
    }

    fn sub(&self, one: u64) {
        self.0.fetch_sub(one, Ordering::Relaxed);
    }
}

/// Slow start's ramp (see the [module docs](crate::outliers)).
#[derive(Debug, Clone, Copy)]
struct SlowStart {
    window_ms: u64,
    aggression: f64,
    min: f64,
}

type Listener = dyn Fn(&Instance, &HealthChange) + Send + Sync;

/// An instance and which occurrence of it in its set (a fixed list names every endpoint alike).
pub(crate) type HostKey = (Instance, usize);

/// The instances of the newest set (by snapshot version) a table was built for. Membership is
/// decided here, not by whether some thread's older table still holds an instance: one that
/// left this set has left, whatever stale tables remain.
#[derive(Default)]
struct Known {
    version: Option<u64>,
    hosts: HashMap<HostKey, Arc<Host>>,
}

/// What [`Outliers::on_change`] is told.
///
/// ```
/// use std::time::Duration;
/// use sd_lb::outliers::HealthChange;
///
/// let c = HealthChange::Ejected { times: 1, duration: Duration::from_secs(30) };
/// assert!(matches!(c, HealthChange::Ejected { times: 1, .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HealthChange {
    /// Ejected (again) for `duration`; `times` counts its ejections so far.
    Ejected {
        /// How many times the instance has been ejected, this one included.
        times: u32,
        /// How long this ejection lasts.
        duration: Duration,
    },
    /// Taken out of service by active health checks (see [`Outliers::spawn_checks`]) after
    /// `failures` failed checks in a row; it stays out until enough checks pass.
    Unhealthy {
        /// The failed checks in a row that took it out.
        failures: u32,
    },
    /// Back in service: its probe succeeded, or enough active checks passed.
    Restored,
}

/// One instance's health.
pub(crate) struct Host {
    fails: AtomicU32,
    /// Calls (high 32 bits) and failures (low 32 bits) in the current failure-rate window.
    window: AtomicU64,
    /// Milliseconds since the epoch until which the instance is ejected; 0 when in service.
    until: AtomicU64,
    times: AtomicU32,
    /// Milliseconds since the epoch when slow start began for it; 0 when warm.
    since: AtomicU64,
    /// Taken out by active health checks: only they bring it back.
    checked_out: AtomicBool,
    /// A probe is out: the next outcome reported while ejected is its own and decides.
    probing: AtomicBool,
    /// Left the set: outcomes from picks through older tables are ignored.
    left: AtomicBool,
    counts: Arc<Counts>,
    ejected_gauge: EjectedGauge,
    instance: Instance,
}

impl Host {
    /// The instance left the set: it no longer counts against the cap while ejected, nor as
    /// warming while warming, and outcomes still reported for it are ignored.
    fn leave(&self) {
        self.left.store(true, Ordering::Relaxed);
        self.end_ejection();
        if self.since.swap(0, Ordering::Relaxed) != 0 {
            self.counts.sub(WARMING);
        }
    }

    /// Back in service if it was out (ejected, or out by active checks): off the count and the
    /// gauge. Whoever ends the ejection first does it; returns whether that was this call.
    fn end_ejection(&self) -> bool {
        let ended = self.until.swap(0, Ordering::Relaxed) != 0;
        if ended {
            self.counts.sub(EJECTED);
            self.ejected_gauge.add(-1.0);
        }
        ended
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Whatever an outcome through a stale table did after `leave`.
        self.leave();
    }
}

impl Default for Outliers {
    fn default() -> Self {
        Outliers {
            consecutive: 5,
            base: Duration::from_secs(30),
            max: Duration::from_secs(300),
            max_percent: 50,
            epoch: Instant::now(),
            known: Mutex::default(),
            counts: Arc::default(),
            tables: PerSnapshot::default(),
            listener: None,
            rate: None,
            last_n: AtomicUsize::new(0),
            slow_start: None,
            seen_a_set: Default::default(),
            metrics: OutlierMetrics::new(),
        }
    }
}

impl Outliers {
    /// The defaults: eject after 5 failures in a row, for 30 s × times ejected (at most 300 s),
    /// never more than 50 % of the set. Reads tokio's clock (so tests can pause it).
    ///
    /// ```
    /// assert_eq!(sd_lb::Outliers::new().ejected(), 0);
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Failures in a row that eject an instance (at least 1; default 5).
    ///
    /// ```
    /// assert!(sd_lb::Outliers::new().consecutive_failures(0).is_err());
    /// ```
    pub fn consecutive_failures(mut self, n: u32) -> Result<Self, Error> {
        if n == 0 {
            return Err(Error::invalid_argument(
                "consecutive failures 0: at least 1 (5 is usual)",
            ));
        }
        self.consecutive = n;
        Ok(self)
    }

    /// The first ejection's length (default 30 s); the n-th lasts n times as long, up to
    /// [`max_ejection`](Self::max_ejection). Above zero.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert!(sd_lb::Outliers::new().base_ejection(Duration::ZERO).is_err());
    /// ```
    pub fn base_ejection(mut self, base: Duration) -> Result<Self, Error> {
        if base.is_zero() {
            return Err(Error::invalid_argument(
                "base ejection time 0: above zero (30 s is usual)",
            ));
        }
        self.base = base;
        self.max = self.max.max(base);
        Ok(self)
    }

    /// The longest ejection (default 300 s; at least the base).
    ///
    /// ```
    /// use std::time::Duration;
    /// let o = sd_lb::Outliers::new().max_ejection(Duration::from_secs(60)).unwrap();
    /// # let _ = o;
    /// ```
    pub fn max_ejection(mut self, max: Duration) -> Result<Self, Error> {
        if max < self.base {
            return Err(Error::invalid_argument(format!(
                "max ejection {max:?} is shorter than the base ejection {:?}",
                self.base
            )));
        }
        self.max = max;
        Ok(self)
    }

    /// The most of the set ejected at once, in percent (0 to 100; default 50).
    ///
    /// ```
    /// assert!(sd_lb::Outliers::new().max_ejection_percent(101).is_err());
    /// ```
    pub fn max_ejection_percent(mut self, percent: u32) -> Result<Self, Error> {
        if percent > 100 {
            return Err(Error::invalid_argument(format!(
                "max ejection percent {percent}: 0 to 100 (50 is usual)"
            )));
        }
        self.max_percent = percent as usize;
        Ok(self)
    }

    /// Calls `listener` when an instance is ejected or restored (from the thread that reported
    /// the outcome; keep it short). For logs and programs: the same is logged with `tracing`.
    ///
    /// ```
    /// use sd_lb::{outliers::HealthChange, Outliers};
    ///
    /// let outliers = Outliers::new().on_change(|instance, change| match change {
    ///     HealthChange::Ejected { duration, .. } => println!("ejected {instance} for {duration:?}"),
    ///     _ => println!("restored {instance}"),
    /// });
    /// # let _ = outliers;
    /// ```
    pub fn on_change(
        mut self,
        listener: impl Fn(&Instance, &HealthChange) + Send + Sync + 'static,
    ) -> Self {
        self.listener = Some(Box::new(listener));
        self
    }

    /// Slow start: instances that join after the first set a balancer saw ramp up to their
    /// share of picks over `window` (see the [module docs](crate::outliers); Envoy's
    /// `slow_start_window`). Off by default; 30 s is typical. Above zero.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let o = sd_lb::Outliers::new().slow_start(Duration::from_secs(30)).unwrap();
    /// assert!(sd_lb::Outliers::new().slow_start(Duration::ZERO).is_err());
    /// # let _ = o;
    /// ```
    pub fn slow_start(mut self, window: Duration) -> Result<Self, Error> {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        if window_ms == 0 {
            return Err(Error::invalid_argument(format!(
                "slow start window {window:?}: at least 1 ms (30 s is typical)"
            )));
        }
        let shape = self
            .slow_start
            .map_or((1.0, 0.1), |s| (s.aggression, s.min));
        self.slow_start = Some(SlowStart {
            window_ms,
            aggression: shape.0,
            min: shape.1,
        });
        Ok(self)
    }

    /// The ramp's shape (Envoy's `aggression` and `min_weight_percent`): a warming instance gets
    /// `max(min_percent, (elapsed / window)^(1 / aggression))` of its share. Aggression 1.0 (the
    /// default) ramps linearly, above 1 faster at first, below 1 slower; `min_percent` (default
    /// 10) is the share it starts with. Set [`slow_start`](Self::slow_start) to turn it on.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let o = sd_lb::Outliers::new()
    ///     .slow_start(Duration::from_secs(60)).unwrap()
    ///     .slow_start_shape(2.0, 5).unwrap();
    /// assert!(sd_lb::Outliers::new().slow_start_shape(0.0, 10).is_err());
    /// assert!(sd_lb::Outliers::new().slow_start_shape(1.0, 101).is_err());
    /// # let _ = o;
    /// ```
    pub fn slow_start_shape(mut self, aggression: f64, min_percent: u32) -> Result<Self, Error> {
        if !(aggression.is_finite() && aggression > 0.0) || min_percent > 100 {
            return Err(Error::invalid_argument(format!(
                "slow start aggression {aggression} and min {min_percent} %: aggression above 0 \
                 (1.0 ramps linearly), min 0 to 100 % (Envoy's defaults: 1.0 and 10 %)"
            )));
        }
        let window_ms = self.slow_start.map_or(0, |s| s.window_ms);
        self.slow_start = Some(SlowStart {
            window_ms,
            aggression,
            min: f64::from(min_percent) / 100.0,
        });
        Ok(self)
    }

    /// How many instances are warming up now (see [`slow_start`](Self::slow_start)).
    ///
    /// ```
    /// assert_eq!(sd_lb::Outliers::new().warming(), 0);
    /// ```
    pub fn warming(&self) -> usize {
        self.counts.warming()
    }

    fn tell(&self, host: &Host, change: HealthChange) {
        if let Some(listener) = &self.listener {
            listener(&host.instance, &change);
        }
    }

    /// Also ejects an instance when at least `percent` of its calls failed over a window of
    /// `window` calls (gRPC's `failure_percentage_ejection`, gRFC A50, counted per window of
    /// calls rather than per interval of time, so no call reads the clock). Catches an instance
    /// that fails often but not `consecutive_failures` times in a row. Off by default; gRPC's
    /// defaults are 85 % and a volume of 50.
    ///
    /// ```
    /// let o = sd_lb::Outliers::new().failure_rate(85, 50).unwrap();
    /// assert!(sd_lb::Outliers::new().failure_rate(0, 50).is_err());
    /// assert!(sd_lb::Outliers::new().failure_rate(85, 0).is_err());
    /// # let _ = o;
    /// ```
    pub fn failure_rate(mut self, percent: u32, window: u32) -> Result<Self, Error> {
        if !(1..=100).contains(&percent) || window == 0 {
            return Err(Error::invalid_argument(format!(
                "failure rate {percent} % over {window} calls: use 1 to 100 % over at least 1 call \
                 (gRPC's defaults: 85 % over 50)"
            )));
        }
        self.rate = Some((u64::from(percent), u64::from(window)));
        Ok(self)
    }

    /// Reports the outcome of a call to `instance`, for code that calls endpoints itself rather
    /// than through [`Retry`](crate::Retry) (which reports on its own). Finds the instance's
    /// health by its stored value (a lock and a map lookup: slower than `Retry`'s report); an
    /// instance not in the set is ignored.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sd_core::{Balancer, Endpointer, FixedEndpointer, Instance};
    /// use sd_lb::{Outliers, RoundRobin};
    ///
    /// let outliers = Arc::new(Outliers::new().consecutive_failures(1).unwrap());
    /// let rr = RoundRobin::new(FixedEndpointer::new(vec!["a", "b"])).with_outliers(outliers.clone());
    /// rr.endpoint().unwrap(); // the balancer's first pick builds its table
    /// // A fixed list's instances are unnamed; a live endpointer's are the stored values.
    /// outliers.report(&Instance::new("not in the set"), false);
    /// assert_eq!(outliers.ejected(), 0);
    /// ```
    pub fn report(&self, instance: &Instance, ok: bool) {
        let host = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hosts
            .get(&(instance.clone(), 0))
            .cloned();
        if let Some(host) = host {
            self.record(&host, ok, self.last_n.load(Ordering::Relaxed));
        }
    }

    /// How many instances are ejected now.
    ///
    /// ```
    /// assert_eq!(sd_lb::Outliers::new().ejected(), 0);
    /// ```
    pub fn ejected(&self) -> usize {
        self.counts.ejected()
    }

    fn now_ms(&self) -> u64 {
        // Offset by one: `until` 0 means "in service".
        millis(self.epoch.elapsed()).saturating_add(1)
    }

    /// The time `length` from now (never 0; saturating for very long ejections).
    fn deadline(&self, length: Duration) -> u64 {
        self.now_ms().saturating_add(millis(length))
    }

    /// The health of each of `snapshot`'s endpoints, in slot order (built once per snapshot).
    /// An instance of the previous set keeps its health; a new one starts clean (warming, with
    /// slow start on, unless it is in the first set); one that left is let go.
    pub(crate) fn table<E>(&self, snapshot: &Snapshot<E>) -> Arc<[Arc<Host>]> {
        self.tables.get(snapshot, || {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            // A table for a snapshot older than the newest one seen (a thread that loaded it
            // before another moved on) reuses what it finds, but decides no membership.
            let newest = known.version.is_none_or(|v| snapshot.version() >= v);
            let unnamed = Instance::new("");
            let mut occurrences: HashMap<&Instance, usize> = HashMap::new();
            // The first set's instances are warm; later ones warm up (with slow start on).
            let warm_up = self.slow_start.filter(|s| s.window_ms > 0).is_some()
                && (!newest || self.seen_a_set.swap(true, Ordering::Relaxed));
            let now = if warm_up { self.now_ms() } else { 0 };
            let mut hosts = HashMap::with_capacity(snapshot.endpoints().len());
            let table: Arc<[Arc<Host>]> = (0..snapshot.endpoints().len())
                .map(|i| {
                    let instance = snapshot.instances().get(i).unwrap_or(&unnamed);
                    let seen = occurrences.entry(instance).or_insert(0);
                    let key = (instance.clone(), *seen);
                    *seen += 1;
                    let host = match known.hosts.get(&key) {
                        Some(host) => host.clone(),
                        None => {
                            if warm_up {
                                self.counts.add(WARMING);
                            }
                            Arc::new(Host {
                                fails: AtomicU32::new(0),
                                window: AtomicU64::new(0),
                                until: AtomicU64::new(0),
                                times: AtomicU32::new(0),
                                since: AtomicU64::new(now),
                                checked_out: AtomicBool::new(false),
                                probing: AtomicBool::new(false),
                                left: AtomicBool::new(false),
                                counts: self.counts.clone(),
                                ejected_gauge: self.metrics.gauge(),
                                instance: instance.clone(),
                            })
                        }
                    };
                    if newest {
                        hosts.insert(key, host.clone());
                    }
                    host
                })
                .collect();
            if newest {
                let old = std::mem::replace(&mut known.hosts, hosts);
                for (key, host) in old {
                    if !known.hosts.contains_key(&key) {
                        host.leave();
                    }
                }
                known.version = Some(snapshot.version());
                self.last_n.store(table.len(), Ordering::Relaxed);
            }
            table
        })
    }

    /// Whether any instance is ejected or warming: only then does a pick look at one.
    #[inline(always)]
    fn quiet(&self) -> bool {
        self.counts.quiet()
    }

    /// Whether `host` may be picked now. Warming: with its slow-start probability. Ejected: no,
    /// until its time is over; then one pick gets through (the probe), and the next waits
    /// another base period unless the probe's outcome decides first.
    #[inline]
    pub(crate) fn admits(&self, host: &Host) -> bool {
        let since = host.since.load(Ordering::Relaxed);
        if since != 0 && !self.warm_enough(host, since) {
            return false;
        }
        let until = host.until.load(Ordering::Relaxed);
        until == 0 || self.probe(host, until)
    }

    /// Whether `host` is ejected and not due for its probe (for the fallback when draws keep
    /// failing: warming instances are acceptable then).
    fn shut(&self, host: &Host) -> bool {
        let until = host.until.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    /// Slow start's draw for a warming `host` (warming since `since`): true with its current
    /// share; marks it warm once the window is over.
    #[cold]
    fn warm_enough(&self, host: &Host, since: u64) -> bool {
        let Some(ramp) = self.slow_start else {
            return true;
        };
        let elapsed = self.now_ms().saturating_sub(since);
        if elapsed >= ramp.window_ms {
            if host
                .since
                .compare_exchange(since, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.counts.sub(WARMING);
            }
            return true;
        }
        let share = (elapsed as f64 / ramp.window_ms as f64)
            .powf(1.0 / ramp.aggression)
            .max(ramp.min);
        fastrand::f64() < share
    }

    #[cold]
    fn probe(&self, host: &Host, until: u64) -> bool {
        let now = self.now_ms();
        if now < until {
            return false;
        }
        let next = self.deadline(self.base);
        let won = host
            .until
            .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if won {
            host.probing.store(true, Ordering::Relaxed);
        }
        won
    }

    /// An outcome of a call to `host`, one of `n` instances in the set.
    pub(crate) fn record(&self, host: &Host, ok: bool, n: usize) {
        if host.left.load(Ordering::Relaxed) || host.checked_out.load(Ordering::Relaxed) {
            // Gone from the set, or out by active checks (calls neither restore nor extend).
            return;
        }
        let until = host.until.load(Ordering::Relaxed);
        if until != 0 {
            // Ejected: only the probe's outcome decides. Outcomes of calls picked before the
            // ejection, arriving late, are dropped.
            if host.probing.swap(false, Ordering::Relaxed) {
                self.probed(host, ok, until);
            }
            return;
        }
        let too_often = self.window_says_eject(host, ok);
        if ok {
            if host.fails.load(Ordering::Relaxed) != 0 {
                host.fails.store(0, Ordering::Relaxed);
            }
            if too_often {
                self.try_eject(host, n, EjectedBy::Rate);
            }
            return;
        }
        let fails = host.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= self.consecutive {
            self.try_eject(host, n, EjectedBy::Consecutive);
        } else if too_often {
            self.try_eject(host, n, EjectedBy::Rate);
        }
    }

    /// The probe's outcome for ejected `host` (ejected until `until` when read): success
    /// restores it, failure ejects it again, longer.
    #[cold]
    fn probed(&self, host: &Host, ok: bool, until: u64) {
        if ok {
            host.fails.store(0, Ordering::Relaxed);
            if host.end_ejection() {
                self.metrics.restored();
                tracing::info!(instance = %host.instance, "restored: the probe succeeded");
                self.tell(host, HealthChange::Restored);
            }
            return;
        }
        if let Some((times, duration)) = self.eject_from(host, until) {
            self.metrics.ejected(EjectedBy::Probe, false);
            tracing::debug!(instance = %host.instance, times, "ejected again: the probe failed");
            self.tell(host, HealthChange::Ejected { times, duration });
        }
    }

    /// Counts a call in `host`'s failure-rate window; at the end of a window, whether its
    /// failures reached the rate.
    fn window_says_eject(&self, host: &Host, ok: bool) -> bool {
        let Some((percent, window)) = self.rate else {
            return false;
        };
        let add = (1u64 << 32) | u64::from(!ok);
        let seen = host
            .window
            .fetch_add(add, Ordering::Relaxed)
            .wrapping_add(add);
        if seen >> 32 < window {
            return false;
        }
        // The window is full: whoever takes it evaluates it, and the next one starts empty
        // (calls counted meanwhile by other threads go to whichever window they land in).
        let taken = host.window.swap(0, Ordering::Relaxed);
        let (calls, failures) = (taken >> 32, taken & 0xffff_ffff);
        calls >= window && failures * 100 >= percent * calls
    }

    /// The instances balancers have picked from and that are still in their sets, for active
    /// checks, with the size of the last set (the cap's base).
    pub(crate) fn live(&self) -> (Vec<(HostKey, Arc<Host>)>, usize) {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let hosts = known
            .hosts
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        (hosts, self.last_n.load(Ordering::Relaxed))
    }

    /// Active checks failed `failures` times in a row for `host`: take it out until they pass
    /// again, within the cap. Returns whether it is out.
    pub(crate) fn check_out(&self, host: &Host, failures: u32, n: usize) -> bool {
        if host.checked_out.load(Ordering::Relaxed) {
            return true;
        }
        if host.left.load(Ordering::Relaxed) {
            return false;
        }
        // Out until the checks pass: `until` at its largest, taken from whatever it was. One
        // already ejected by its calls counts against the cap once.
        let newly = loop {
            let until = host.until.load(Ordering::Relaxed);
            let newly = until == 0;
            if newly && !self.take_cap(n) {
                return false;
            }
            match host
                .until
                .compare_exchange(until, u64::MAX, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break newly,
                Err(_) if newly => self.give_back_cap(),
                Err(_) => {}
            }
        };
        host.checked_out.store(true, Ordering::Relaxed);
        self.metrics.ejected(EjectedBy::Check, newly);
        tracing::warn!(instance = %host.instance, failures, "out of service: active health checks failed");
        self.tell(host, HealthChange::Unhealthy { failures });
        true
    }

    /// Active checks passed enough times in a row for `host`: back in service if they took it
    /// out.
    pub(crate) fn check_in(&self, host: &Host) {
        if host.checked_out.swap(false, Ordering::Relaxed) {
            host.fails.store(0, Ordering::Relaxed);
            if host.end_ejection() {
                self.metrics.restored();
            }
            tracing::info!(instance = %host.instance, "restored: active health checks passed");
            self.tell(host, HealthChange::Restored);
        }
    }

    /// Active checks stopped: every instance they took out is back in service.
    pub(crate) fn checks_stopped(&self) {
        let (hosts, _) = self.live();
        for (_, host) in hosts {
            self.check_in(&host);
        }
    }

    /// Counts one more instance out, unless that would put more than `max_ejection_percent` of
    /// the `n` instances out at once.
    fn take_cap(&self, n: usize) -> bool {
        let allowed = |current: u64| {
            let ejected = (current >> 32) as usize;
            ejected.saturating_add(1).saturating_mul(100) <= self.max_percent.saturating_mul(n)
        };
        self.counts
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                allowed(c).then_some(c + EJECTED)
            })
            .is_ok()
    }

    /// Undoes a [`take_cap`](Self::take_cap) whose instance another thread took out first.
    fn give_back_cap(&self) {
        self.counts.sub(EJECTED);
    }

    /// Ejects `host` for what `by` saw, unless that would put more than `max_ejection_percent`
    /// of the `n` instances out at once, or another thread ejected it first.
    fn try_eject(&self, host: &Host, n: usize, by: EjectedBy) {
        if host.until.load(Ordering::Relaxed) != 0 || !self.take_cap(n) {
            return;
        }
        let Some((times, duration)) = self.eject_from(host, 0) else {
            self.give_back_cap();
            return;
        };
        host.fails.store(0, Ordering::Relaxed);
        host.window.store(0, Ordering::Relaxed);
        self.metrics.ejected(by, true);
        let why = match by {
            EjectedBy::Rate => "too many of its calls failed",
            _ => "too many failures in a row",
        };
        tracing::warn!(instance = %host.instance, times, "ejected: {why}");
        self.tell(host, HealthChange::Ejected { times, duration });
    }

    /// Ejects `host` (again) for base × times ejected, capped, if its `until` is still `from`
    /// (one thread ejects it, however many saw its failures); returns the times and length.
    fn eject_from(&self, host: &Host, from: u64) -> Option<(u32, Duration)> {
        let times = host.times.load(Ordering::Relaxed).saturating_add(1);
        let length = self.base.saturating_mul(times).min(self.max);
        host.until
            .compare_exchange(
                from,
                self.deadline(length),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .ok()?;
        host.times.store(times, Ordering::Relaxed);
        Some((times, length))
    }
}

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl std::fmt::Debug for Outliers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outliers")
            .field("consecutive", &self.consecutive)
            .field("base", &self.base)
            .field("max", &self.max)
            .field("max_percent", &self.max_percent)
            .field("ejected", &self.ejected())
            .field("slow_start", &self.slow_start)
            .field("warming", &self.warming())
            .finish()
    }
}

/// A balancer's outlier detection, if it has one, at each step of a pick: the health table of
/// a new snapshot, admission of a picked slot, and the outcome of a call.
#[derive(Default)]
pub(crate) struct Health(Option<Arc<Outliers>>, Option<Arc<Counts>>);

impl Health {
    pub(crate) fn new(outliers: Arc<Outliers>) -> Self {
        // The counts beside the detection, so a pick's check loads their address from the
        // balancer and their value from there, not the detection's address first.
        let counts = outliers.counts.clone();
        Health(Some(outliers), Some(counts))
    }

    /// Moves `hosts` to `snapshot`'s health table (left empty without detection).
    pub(crate) fn refresh<E>(&self, snapshot: &Snapshot<E>, hosts: &mut Arc<[Arc<Host>]>) {
        if let Some(outliers) = &self.0 {
            *hosts = outliers.table(snapshot);
        }
    }

    /// `first` (the balancer's own draw), or, when it lands on an ejected instance or a warming
    /// one that slow start turns away, drawn again with `draw` (the balancer's own way: the next
    /// in turn, a new random draw). After `n` draws (at most 64) that all miss, the first slot
    /// in order whose instance is not ejected, or `first` when every instance is (panic mode).
    #[inline(always)]
    pub(crate) fn pick(
        &self,
        hosts: &[Arc<Host>],
        n: usize,
        first: usize,
        draw: impl FnMut() -> usize,
    ) -> usize {
        match &self.1 {
            // Out of line: the healthy fleet's pick inlines nothing of the rest.
            Some(counts) if !counts.quiet() => unquiet(self, hosts, n, first, draw),
            _ => first,
        }
    }

    /// Whether the instance at `slot` is ejected and not due for its probe (a retry steers
    /// past it while it can).
    #[inline]
    pub(crate) fn shut_at(&self, hosts: &[Arc<Host>], slot: usize) -> bool {
        match &self.0 {
            Some(outliers) if !outliers.quiet() => {
                hosts.get(slot).is_some_and(|h| outliers.shut(h))
            }
            _ => false,
        }
    }

    /// The pick an outcome is for, when there is detection to report it to.
    pub(crate) fn wants(&self, tried: &Tried) -> Option<(u64, usize)> {
        self.0.as_ref().and(tried.last())
    }

    /// Records an outcome for `pick` (snapshot version, slot) if `hosts` still belongs to that
    /// snapshot (a pick from a snapshot that has changed since names a slot that means nothing
    /// now), `n` being the size of its set.
    pub(crate) fn record<E>(
        &self,
        hosts: &[Arc<Host>],
        snapshot: &Snapshot<E>,
        (version, slot): (u64, usize),
        ok: bool,
        n: usize,
    ) {
        if let (Some(outliers), true) = (&self.0, snapshot.version() == version) {
            if let Some(host) = hosts.get(slot) {
                outliers.record(host, ok, n);
            }
        }
    }
}

/// [`Health::pick`] while an instance is ejected or warming: `slot` if its instance is
/// admitted, else drawn again.
#[cold]
#[inline(never)]
fn unquiet(
    health: &Health,
    hosts: &[Arc<Host>],
    n: usize,
    slot: usize,
    draw: impl FnMut() -> usize,
) -> usize {
    let Some(outliers) = &health.0 else {
        return slot;
    };
    match hosts.get(slot) {
        Some(h) if !outliers.admits(h) => redraw(outliers, hosts, n, slot, draw),
        _ => slot,
    }
}

/// [`Health::pick`]'s slow path: `first` was turned away.
#[cold]
#[inline(never)]
fn redraw(
    outliers: &Outliers,
    hosts: &[Arc<Host>],
    n: usize,
    first: usize,
    mut draw: impl FnMut() -> usize,
) -> usize {
    for _ in 1..n.min(64) {
        let slot = draw();
        if hosts.get(slot).is_none_or(|h| outliers.admits(h)) {
            return slot;
        }
    }
    (1..n)
        .map(|k| (first + k) % n)
        .find(|&s| hosts.get(s).is_some_and(|h| !outliers.shut(h)))
        .unwrap_or(first)
}
