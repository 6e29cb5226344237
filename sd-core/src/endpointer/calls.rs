//! Calls in flight through one endpoint, so a removed endpoint is closed only once they end
//! (graceful drain; see [`EndpointerOptions::drain`](crate::EndpointerOptions::drain)).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::factory::CloseGuard;

/// Set once the endpoint has left the set: the last call to end closes it.
const DRAINING: usize = 1 << (usize::BITS - 1);
/// Set once its closer has run (or is running): no call may start through it any more.
const CLOSED: usize = 1 << (usize::BITS - 2);
const COUNT: usize = CLOSED - 1;

/// The calls in flight through one endpoint of a draining endpointer, and the endpoint's closer
/// once the endpoint has left the set.
///
/// A balancer counts a call when it records its pick with [`Tried::record_in`](crate::Tried::record_in);
/// the call ends when the [`CallGuard`] it got is dropped. When the endpoint leaves the set, its
/// closer waits here until the count is zero (or the drain timeout passes), and runs exactly
/// once. Counting is one atomic add and one atomic subtract per call; nothing allocates.
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
/// use sd_core::Calls;
///
/// let calls = Calls::new();
/// let call = calls.enter().expect("open");
/// let closed = Arc::new(AtomicBool::new(false));
/// let flag = closed.clone();
/// calls.drain(Some(Box::new(move || flag.store(true, Ordering::SeqCst))), None);
/// assert!(!closed.load(Ordering::SeqCst), "a call is in flight");
/// drop(call);
/// assert!(closed.load(Ordering::SeqCst), "closed by the last call to end");
/// assert!(calls.enter().is_none(), "no call starts through a closed endpoint");
/// ```
pub struct Calls {
    /// `DRAINING` and `CLOSED` flags over the count of calls in flight.
    state: AtomicUsize,
    closers: Mutex<Vec<CloseGuard>>,
}

impl Calls {
    /// No call in flight, not draining.
    ///
    /// ```
    /// assert_eq!(sd_core::Calls::new().in_flight(), 0);
    /// ```
    pub fn new() -> Arc<Self> {
        Arc::new(Calls {
            state: AtomicUsize::new(0),
            closers: Mutex::new(Vec::new()),
        })
    }

    /// Counts a call starting through this endpoint; `None` if the endpoint is already closed
    /// (a pick from a snapshot older than its removal: pick again from the current one).
    ///
    /// ```
    /// let calls = sd_core::Calls::new();
    /// let guard = calls.enter().unwrap();
    /// assert_eq!(calls.in_flight(), 1);
    /// drop(guard);
    /// assert_eq!(calls.in_flight(), 0);
    /// ```
    #[inline]
    pub fn enter(self: &Arc<Self>) -> Option<CallGuard> {
        let before = self.state.fetch_add(1, Ordering::AcqRel);
        if before & CLOSED != 0 {
            self.state.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(CallGuard(self.clone()))
    }

    /// Calls in flight now.
    ///
    /// ```
    /// assert_eq!(sd_core::Calls::new().in_flight(), 0);
    /// ```
    pub fn in_flight(&self) -> usize {
        self.state.load(Ordering::Acquire) & COUNT
    }

    /// Whether the closer has run.
    ///
    /// ```
    /// let calls = sd_core::Calls::new();
    /// calls.drain(None, None);
    /// assert!(calls.is_closed());
    /// ```
    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }

    /// The endpoint has left the set: run `closer` once no call is in flight, at once if none
    /// is. With a `timeout`, and within a tokio runtime, a timer runs it after `timeout` even
    /// if calls are still in flight (it runs once either way). Draining an endpoint already
    /// draining adds `closer` to run with the first one (the first drain's timeout stands);
    /// draining one already closed runs `closer` at once.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// let calls = sd_core::Calls::new();
    /// let _hung = calls.enter().unwrap();
    /// let closed = Arc::new(AtomicBool::new(false));
    /// let flag = closed.clone();
    /// calls.drain(Some(Box::new(move || flag.store(true, Ordering::SeqCst))), Some(Duration::from_secs(5)));
    /// tokio::time::sleep(Duration::from_secs(6)).await;
    /// assert!(closed.load(Ordering::SeqCst), "closed by the timeout");
    /// # }
    /// ```
    pub fn drain(self: &Arc<Self>, closer: Option<crate::Closer>, timeout: Option<Duration>) {
        self.drain_guard(CloseGuard::new(closer), timeout);
    }

    pub(crate) fn drain_guard(self: &Arc<Self>, closer: CloseGuard, timeout: Option<Duration>) {
        // Stored before the flag is visible, so the last call to end finds it.
        self.closers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(closer);
        let before = self.state.fetch_or(DRAINING, Ordering::AcqRel);
        if before & CLOSED != 0 {
            // Closed already: whoever closed may have taken the closers before this one came.
            self.close();
            return;
        }
        if before & DRAINING != 0 {
            // Draining already: this closer runs with the first one.
            return;
        }
        if before & COUNT == 0 {
            self.try_close();
            return;
        }
        if let (Some(timeout), Ok(runtime)) = (timeout, tokio::runtime::Handle::try_current()) {
            let calls = Arc::downgrade(self);
            runtime.spawn(async move {
                tokio::time::sleep(timeout).await;
                if let Some(calls) = calls.upgrade() {
                    if !calls.is_closed() {
                        tracing::warn!(
                            in_flight = calls.in_flight(),
                            ?timeout,
                            "drain timeout: closing an endpoint with calls still in flight"
                        );
                        calls.state.fetch_or(CLOSED, Ordering::AcqRel);
                        calls.close();
                    }
                }
            });
        }
    }

    /// Closes if draining with no call in flight, once.
    fn try_close(&self) {
        if self
            .state
            .compare_exchange(
                DRAINING,
                DRAINING | CLOSED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            self.close();
        }
    }

    fn close(&self) {
        let closers = std::mem::take(&mut *self.closers.lock().unwrap_or_else(|e| e.into_inner()));
        // Runs the closers (outside the lock: they are the user's code).
        drop(closers);
    }
}

impl fmt::Debug for Calls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.load(Ordering::Acquire);
        f.debug_struct("Calls")
            .field("in_flight", &(state & COUNT))
            .field("draining", &(state & DRAINING != 0))
            .field("closed", &(state & CLOSED != 0))
            .finish()
    }
}

/// One call in flight through an endpoint (see [`Calls`]); dropping it ends the call, and the
/// last call of a removed endpoint to end runs its closer (on the dropping thread).
///
/// ```
/// let calls = sd_core::Calls::new();
/// let a = calls.enter().unwrap();
/// let b = a.clone();
/// assert_eq!(calls.in_flight(), 2);
/// drop((a, b));
/// assert_eq!(calls.in_flight(), 0);
/// ```
#[derive(Debug)]
pub struct CallGuard(Arc<Calls>);

impl Clone for CallGuard {
    fn clone(&self) -> Self {
        // This guard keeps the count above zero, so the endpoint cannot close in between.
        self.0.state.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.0.clone())
    }
}

impl Drop for CallGuard {
    #[inline]
    fn drop(&mut self) {
        let before = self.0.state.fetch_sub(1, Ordering::AcqRel);
        if before & DRAINING != 0 && before & COUNT == 1 {
            self.0.try_close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn counting(closes: &Arc<AtomicUsize>) -> Option<crate::Closer> {
        let closes = closes.clone();
        Some(Box::new(move || {
            closes.fetch_add(1, Ordering::SeqCst);
        }))
    }

    #[test]
    fn idle_endpoint_closes_at_once() {
        let closes = Arc::new(AtomicUsize::new(0));
        let calls = Calls::new();
        calls.drain(counting(&closes), None);
        assert_eq!(closes.load(Ordering::SeqCst), 1);
        assert!(calls.enter().is_none());
        assert_eq!(calls.in_flight(), 0, "a refused call is not counted");
    }

    #[test]
    fn a_second_drain_waits_for_the_calls_in_flight_too() {
        let (first, second) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let calls = Calls::new();
        let call = calls.enter().unwrap();
        calls.drain(counting(&first), None);
        calls.drain(counting(&second), None);
        assert_eq!(first.load(Ordering::SeqCst), 0, "a call is in flight");
        assert_eq!(second.load(Ordering::SeqCst), 0, "a call is in flight");
        drop(call);
        assert_eq!(first.load(Ordering::SeqCst), 1);
        assert_eq!(second.load(Ordering::SeqCst), 1);
        // Once closed, a drain's closer runs at once.
        let third = Arc::new(AtomicUsize::new(0));
        calls.drain(counting(&third), None);
        assert_eq!(third.load(Ordering::SeqCst), 1);
        assert_eq!(
            first.load(Ordering::SeqCst) + second.load(Ordering::SeqCst),
            2
        );
    }

    #[test]
    fn closes_once_when_calls_race_the_drain() {
        for round in 0..200 {
            let closes = Arc::new(AtomicUsize::new(0));
            let calls = Calls::new();
            let violations = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..200 {
                            if let Some(guard) = calls.enter() {
                                // While a call is counted, the closer must not have run.
                                if closes.load(Ordering::SeqCst) != 0 {
                                    violations.fetch_add(1, Ordering::SeqCst);
                                }
                                drop(guard);
                            }
                        }
                    });
                }
                s.spawn(|| calls.drain(counting(&closes), None));
            });
            assert_eq!(violations.load(Ordering::SeqCst), 0, "round {round}");
            assert_eq!(closes.load(Ordering::SeqCst), 1, "round {round}");
        }
    }
}
