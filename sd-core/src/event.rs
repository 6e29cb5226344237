//! What an instancer tells its subscribers.

use std::pin::Pin;

use futures::Stream;

use crate::{Error, Instance, InstanceSet};

/// A stream of [`Event`]s, as returned by [`Instancer::subscribe`](crate::Instancer::subscribe).
///
/// ```
/// use futures::StreamExt;
/// use sd_core::{Event, EventStream, Publisher};
///
/// # futures::executor::block_on(async {
/// let mut s: EventStream = Publisher::new(Event::empty()).subscribe();
/// assert_eq!(s.next().await, Some(Event::empty()));
/// # });
/// ```
pub type EventStream = Pin<Box<dyn Stream<Item = Event> + Send + 'static>>;

/// The state of a watched prefix: the full, sorted, deduplicated set of instances, or an error.
///
/// A subscriber never has to merge deltas: every `Instances` event is the whole truth at some
/// point in time. Cheap to clone (both arms are `Arc`-backed). The set is an [`InstanceSet`], which
/// an instancer edits in place per store change, so a subscriber that kept the previous event's set
/// finds what changed with [`InstanceSet::changes`] at a cost that grows with the changes, not
/// with the size of the set.
///
/// ```
/// use sd_core::{Change, Event};
///
/// let first = Event::from_instances(["b:1", "a:1", "b:1", ""]);
/// assert_eq!(first.instances().unwrap(), &["a:1", "b:1"]);
///
/// let mut set = first.instances().unwrap().clone();
/// set.insert("c:1");
/// let second = Event::Instances(set);
/// let added: Vec<Change> = first.instances().unwrap().changes(second.instances().unwrap()).collect();
/// assert_eq!(added, [Change::Added(&"c:1".into())]);
/// ```
#[derive(Debug, Clone)]
pub enum Event {
    /// The current set of instances (sorted, without duplicates or empty strings).
    Instances(InstanceSet),
    /// The store could not be read or watched; the set is unknown until the next `Instances`.
    Error(Error),
}

impl Event {
    /// Builds an `Instances` event from any strings: sorts, drops duplicates and empty strings.
    ///
    /// ```
    /// let ev = sd_core::Event::from_instances(["b:1", "a:1", "a:1"]);
    /// assert_eq!(ev.instances().unwrap(), &["a:1", "b:1"]);
    /// ```
    pub fn from_instances<I, S>(instances: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<Instance>,
    {
        Event::Instances(instances.into_iter().collect())
    }

    /// An `Instances` event with no instance.
    ///
    /// ```
    /// assert!(sd_core::Event::empty().instances().unwrap().is_empty());
    /// ```
    pub fn empty() -> Self {
        Event::Instances(InstanceSet::new())
    }

    /// The instances, or `None` for an error event.
    ///
    /// ```
    /// use sd_core::{Error, Event};
    ///
    /// assert_eq!(Event::from_instances(["a:1"]).instances().unwrap().len(), 1);
    /// assert!(Event::from(Error::backend_msg("down")).instances().is_none());
    /// ```
    pub fn instances(&self) -> Option<&InstanceSet> {
        match self {
            Event::Instances(i) => Some(i),
            Event::Error(_) => None,
        }
    }

    /// The error, or `None` for an instances event.
    ///
    /// ```
    /// use sd_core::{Error, Event};
    ///
    /// let ev = Event::from(Error::backend_msg("down"));
    /// assert_eq!(ev.error().unwrap().to_string(), "down");
    /// assert!(Event::empty().error().is_none());
    /// ```
    pub fn error(&self) -> Option<&Error> {
        match self {
            Event::Error(e) => Some(e),
            Event::Instances(_) => None,
        }
    }
}

impl From<Error> for Event {
    fn from(e: Error) -> Self {
        Event::Error(e)
    }
}

/// Two events are equal when they carry the same instances, or errors with the same message
/// (publishers use this to avoid sending a subscriber the state it already has).
impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Event::Instances(a), Event::Instances(b)) => a == b,
            (Event::Error(a), Event::Error(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_is_by_content() {
        assert_eq!(
            Event::from_instances(["a", "b"]),
            Event::from_instances(["b", "a"])
        );
        assert_ne!(
            Event::from_instances(["a"]),
            Event::from_instances(["a", "b"])
        );
        let e1 = Event::Error(Error::backend_msg("down"));
        assert_eq!(e1, Event::Error(Error::backend_msg("down")));
        assert_ne!(e1, Event::Error(Error::backend_msg("other")));
        assert_ne!(e1, Event::empty());
    }
}
