//! A value computed once per endpointer snapshot and shared by the threads that move to it.

use std::sync::Mutex;

use sd_core::{Instance, Slots, Snapshot};

/// The value built for the last snapshot seen (by version and instance slots), so that the
/// threads moving to a snapshot build what they pick through (a schedule, a table, a zone's
/// slots) once between them, not once each.
pub(crate) struct PerSnapshot<T>(Mutex<Option<(u64, Slots<Instance>, T)>>);

impl<T> Default for PerSnapshot<T> {
    fn default() -> Self {
        PerSnapshot(Mutex::new(None))
    }
}

impl<T: Clone> PerSnapshot<T> {
    /// The value for `snapshot`: the one already built for it, or `build`'s.
    pub(crate) fn get<E>(&self, snapshot: &Snapshot<E>, build: impl FnOnce() -> T) -> T {
        // Every critical section leaves the value whole, so a poisoned lock is still usable.
        let mut current = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((version, instances, value)) = &*current {
            if *version == snapshot.version() && instances.ptr_eq(snapshot.instances()) {
                return value.clone();
            }
        }
        let value = build();
        *current = Some((
            snapshot.version(),
            snapshot.instances().clone(),
            value.clone(),
        ));
        value
    }
}

/// The slots of `snapshot`'s endpoints whose instance is in `zone`.
pub(crate) fn slots_in_zone<E>(snapshot: &Snapshot<E>, zone: &str) -> Vec<u32> {
    snapshot
        .instances()
        .iter()
        .take(snapshot.endpoints().len())
        .enumerate()
        .filter(|(_, i)| i.zone() == Some(zone))
        .map(|(slot, _)| slot as u32)
        .collect()
}
