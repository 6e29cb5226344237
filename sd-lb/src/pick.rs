//! The two steps every balancer's pick ends with: advancing a cyclic position, and cloning the
//! endpoint at a slot (or saying there is none).

use sd_core::{Error, Slots, Snapshot, Tried};

/// The position to pick at in a cycle of `len`, advancing `next`; `None` when `len` is 0.
///
/// `next` is out of range only on a thread's first pick (its position is its ordinal) or the
/// first after the set shrank, so the division stays off the hot path: the cycle wraps with a
/// compare.
#[inline(always)]
pub(crate) fn step(next: &mut usize, len: usize) -> Option<usize> {
    let mut i = *next;
    if i >= len {
        if len == 0 {
            return None;
        }
        i %= len;
    }
    *next = if i + 1 == len { 0 } else { i + 1 };
    Some(i)
}

/// The next slot of a cycle over `list` (slots of the snapshot), or over all `len` slots when
/// there is no list: how weighted round robin walks its schedule and zone preference its zone.
#[inline(always)]
pub(crate) fn step_over(next: &mut usize, list: Option<&[u32]>, len: usize) -> Option<usize> {
    match list {
        None => step(next, len),
        Some(list) => step(next, list.len())
            .and_then(|i| list.get(i))
            .map(|&slot| slot as usize),
    }
}

/// The endpoint at `slot`, cloned, or the snapshot's "no endpoints" error.
#[inline(always)]
pub(crate) fn cloned_at<E: Clone>(
    endpoints: &Slots<E>,
    snapshot: &Snapshot<E>,
    slot: Option<usize>,
) -> Result<E, Error> {
    match slot.and_then(|i| endpoints.get(i)) {
        Some(endpoint) => Ok(endpoint.clone()),
        None => Err(crate::metrics::no_endpoint(snapshot)),
    }
}

/// For a retry: `slot` if it did not fail in this call, else the next slot in order (wrapping)
/// of the `n` that did not and is not `shut` (ejected), else the next that did not fail; `slot`
/// itself when all have failed. Records the result in `tried`
/// (counting a call in flight when the endpointer drains); `None` when the chosen endpoint was
/// already closed, which happens only to a pick from a snapshot older than the endpoint's
/// removal: pick again (the endpointer's version has moved, so the next pick refreshes).
#[inline]
pub(crate) fn avoiding<E>(
    tried: &mut Tried,
    snapshot: &Snapshot<E>,
    slot: usize,
    n: usize,
    shut: impl Fn(usize) -> bool,
) -> Option<usize> {
    let version = snapshot.version();
    let chosen = if tried.any(version) && tried.avoids(version, slot) {
        let untried = || {
            (1..n)
                .map(|k| (slot + k) % n)
                .filter(|&s| !tried.avoids(version, s))
        };
        untried()
            .find(|&s| !shut(s))
            .or_else(|| untried().next())
            .unwrap_or(slot)
    } else {
        slot
    };
    tried.record_in(snapshot, chosen).then_some(chosen)
}

/// The endpoint at `slot` for a pick that may be recorded: with `tried` (a retry's pick),
/// steered past the slots that failed in the call, and if it can past those `shut`, and
/// recorded (see [`avoiding`]; `None` when it met an endpoint closed under a stale snapshot);
/// without, as [`cloned_at`].
#[inline(always)]
pub(crate) fn cloned_avoiding<E: Clone>(
    endpoints: &Slots<E>,
    snapshot: &Snapshot<E>,
    slot: Option<usize>,
    tried: Option<&mut Tried>,
    shut: impl Fn(usize) -> bool,
) -> Option<Result<E, Error>> {
    match (slot, tried) {
        (Some(slot), Some(tried)) => {
            let slot = avoiding(tried, snapshot, slot, endpoints.len(), shut)?;
            Some(cloned_at(endpoints, snapshot, Some(slot)))
        }
        (slot, _) => Some(cloned_at(endpoints, snapshot, slot)),
    }
}

/// Runs `pick` until it does not meet a closed endpoint (see [`avoiding`]): at most a few
/// rounds, since each stale round moves the thread to the endpointer's newer snapshot.
#[inline]
pub(crate) fn until_open<R>(mut pick: impl FnMut() -> Option<R>, stale: impl FnOnce() -> R) -> R {
    for _ in 0..4 {
        if let Some(r) = pick() {
            return r;
        }
    }
    stale()
}

/// `Balancer::endpoint` and `Balancer::endpoint_avoiding` of a balancer whose picks all go
/// through one `fn pick(&self, tried: Option<&mut Tried>) -> Option<Result<E, Error>>`
/// (recorded when given a `Tried`, see [`cloned_avoiding`]) over `self.endpointer`.
macro_rules! endpoint_by_pick {
    () => {
        #[inline]
        fn endpoint(&self) -> Result<E, Error> {
            self.pick(None)
                .unwrap_or_else(|| Err(crate::metrics::no_endpoint(&self.endpointer.snapshot())))
        }

        /// Its own pick, or the next endpoint in order that has not failed in this call (see
        /// [`Balancer::endpoint_avoiding`]).
        fn endpoint_avoiding(&self, tried: &mut Tried) -> Result<E, Error> {
            crate::pick::until_open(
                || self.pick(Some(&mut *tried)),
                || Err(crate::metrics::no_endpoint(&self.endpointer.snapshot())),
            )
        }
    };
}
pub(crate) use endpoint_by_pick;

/// `Balancer::endpoint_avoiding` of a balancer that picks through `self.with` (its thread
/// cache) and `self.next_slot` (its own draw, past ejected and warming instances): round robin
/// and random, whose `endpoint` stays their own hand-tuned pick.
macro_rules! endpoint_avoiding_by_next_slot {
    () => {
        /// Its own next slot, or the next endpoint in order that has not failed in this call
        /// (see [`Balancer::endpoint_avoiding`]).
        fn endpoint_avoiding(&self, tried: &mut Tried) -> Result<E, Error> {
            crate::pick::until_open(
                || {
                    self.with(|endpoints, snapshot, state| {
                        let slot = self.next_slot(state, endpoints.len());
                        crate::pick::cloned_avoiding(
                            endpoints,
                            snapshot,
                            slot,
                            Some(&mut *tried),
                            |s| self.health.shut_at(&state.hosts, s),
                        )
                    })
                },
                || Err(crate::metrics::no_endpoint(&self.endpointer.snapshot())),
            )
        }
    };
}
pub(crate) use endpoint_avoiding_by_next_slot;
