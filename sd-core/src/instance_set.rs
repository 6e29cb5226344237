//! The set of instances an [`Event`](crate::Event) carries.

use std::fmt;

use crate::Instance;

/// A sorted set of distinct, non-empty instances: what an instancer publishes.
///
/// A persistent B-tree: cloning it is O(1), and a set derived from another by
/// [`insert`](Self::insert) and [`remove`](Self::remove) shares all the structure it did not
/// change. So an instancer that keeps one set and edits it per store change publishes each new
/// state in O(log N), and a subscriber that kept the previous set finds what changed with
/// [`changes`](Self::changes) in time proportional to the changes, not to the size of the set.
/// Equality skips shared structure the same way.
///
/// ```
/// use sd_core::{Change, InstanceSet};
///
/// let before: InstanceSet = ["b:1", "a:1", "b:1", ""].into_iter().collect();
/// assert_eq!(before, ["a:1", "b:1"], "sorted, without duplicates or empty strings");
///
/// let mut after = before.clone();
/// assert!(after.insert("c:1"));
/// assert!(after.remove("a:1"));
/// let changes: Vec<Change> = before.changes(&after).collect();
/// assert_eq!(changes, [Change::Removed(&"a:1".into()), Change::Added(&"c:1".into())]);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct InstanceSet(imbl::OrdSet<Instance>);

/// One difference between two [`InstanceSet`]s, as [`InstanceSet::changes`] lists them.
///
/// ```
/// use sd_core::{Change, Instance, InstanceSet};
///
/// let old = InstanceSet::from_iter(["a:1"]);
/// let new = InstanceSet::from_iter(["b:1"]);
/// for change in old.changes(&new) {
///     match change {
///         Change::Added(i) => assert_eq!(i, "b:1"),
///         Change::Removed(i) => assert_eq!(i, "a:1"),
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// In the newer set only.
    Added(&'a Instance),
    /// In the older set only.
    Removed(&'a Instance),
}

impl InstanceSet {
    /// An empty set.
    ///
    /// ```
    /// assert!(sd_core::InstanceSet::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of instances.
    ///
    /// ```
    /// assert_eq!(sd_core::InstanceSet::from_iter(["a:1", "b:1"]).len(), 2);
    /// ```
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set holds no instance.
    ///
    /// ```
    /// assert!(sd_core::InstanceSet::from_iter([""]).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `instance` is in the set: an [`Instance`], or a stored value as `&str` (an
    /// instance is its stored value, not its address). O(log N).
    ///
    /// ```
    /// let set = sd_core::InstanceSet::from_iter(["a:1"]);
    /// assert!(set.contains("a:1"));
    /// assert!(!set.contains("b:1"));
    /// ```
    pub fn contains<Q>(&self, instance: &Q) -> bool
    where
        Q: Ord + ?Sized,
        Instance: std::borrow::Borrow<Q>,
    {
        self.0.contains(instance)
    }

    /// Adds `instance`; returns whether it was new. An empty string is never added (it is no
    /// address), and returns `false`. O(log N).
    ///
    /// ```
    /// let mut set = sd_core::InstanceSet::new();
    /// assert!(set.insert("a:1"));
    /// assert!(!set.insert("a:1"), "already there");
    /// assert!(!set.insert(""), "empty strings are not instances");
    /// assert_eq!(set.len(), 1);
    /// ```
    pub fn insert(&mut self, instance: impl Into<Instance>) -> bool {
        let instance = instance.into();
        !instance.is_empty() && self.0.insert(instance).is_none()
    }

    /// Removes `instance` (an [`Instance`], or a stored value as `&str`); returns whether it was
    /// there. O(log N).
    ///
    /// ```
    /// let mut set = sd_core::InstanceSet::from_iter(["a:1"]);
    /// assert!(set.remove("a:1"));
    /// assert!(!set.remove("a:1"));
    /// ```
    pub fn remove<Q>(&mut self, instance: &Q) -> bool
    where
        Q: Ord + ?Sized,
        Instance: std::borrow::Borrow<Q>,
    {
        self.0.remove(instance).is_some()
    }

    /// The instances, in order.
    ///
    /// ```
    /// let set = sd_core::InstanceSet::from_iter(["b:1", "a:1"]);
    /// let v: Vec<&str> = set.iter().map(|i| i.as_str()).collect();
    /// assert_eq!(v, ["a:1", "b:1"]);
    /// ```
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.0.iter())
    }

    /// The instances, in order, as a vector.
    ///
    /// ```
    /// let set = sd_core::InstanceSet::from_iter(["b:1", "a:1"]);
    /// assert_eq!(set.to_vec(), ["a:1", "b:1"]);
    /// ```
    pub fn to_vec(&self) -> Vec<Instance> {
        self.iter().cloned().collect()
    }

    /// What changed from `self` to `newer`, in instance order.
    ///
    /// Parts of the two sets that are shared (`newer` was derived from `self`, or both from a
    /// common set, by inserts and removals) are skipped without being read, so the cost is
    /// O(changes × log N) for such sets; for unrelated sets it is one merge walk, O(N).
    ///
    /// ```
    /// use sd_core::{Change, InstanceSet};
    ///
    /// let old: InstanceSet = (0..100_000).map(|i| format!("10.0.{}.{}:80", i / 256, i % 256)).collect();
    /// let mut new = old.clone();
    /// new.remove("10.0.0.7:80");
    /// let changes: Vec<Change> = old.changes(&new).collect();
    /// assert_eq!(changes, [Change::Removed(&"10.0.0.7:80".into())]);
    /// ```
    pub fn changes<'a>(&'a self, newer: &'a InstanceSet) -> Changes<'a> {
        Changes(self.0.diff(&newer.0))
    }
}

/// An iterator over an [`InstanceSet`]'s instances, in order (see [`InstanceSet::iter`]).
///
/// ```
/// let set = sd_core::InstanceSet::from_iter(["a:1"]);
/// let mut it: sd_core::instance_set::Iter<'_> = set.iter();
/// assert_eq!(it.next().unwrap(), "a:1");
/// assert!(it.next().is_none());
/// ```
pub struct Iter<'a>(imbl::ordset::Iter<'a, Instance, imbl::shared_ptr::DefaultSharedPtr>);

impl<'a> Iterator for Iter<'a> {
    type Item = &'a Instance;

    fn next(&mut self) -> Option<&'a Instance> {
        self.0.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back()
    }
}

impl fmt::Debug for Iter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Iter")
    }
}

/// The differences between two [`InstanceSet`]s (see [`InstanceSet::changes`]).
///
/// ```
/// use sd_core::InstanceSet;
///
/// let a = InstanceSet::from_iter(["a:1"]);
/// let mut changes: sd_core::instance_set::Changes<'_> = a.changes(&a);
/// assert!(changes.next().is_none());
/// ```
pub struct Changes<'a>(
    imbl::ordset::DiffIter<'a, 'a, Instance, imbl::shared_ptr::DefaultSharedPtr>,
);

impl<'a> Iterator for Changes<'a> {
    type Item = Change<'a>;

    fn next(&mut self) -> Option<Change<'a>> {
        self.0.next().map(|item| match item {
            imbl::ordset::DiffItem::Add(i) => Change::Added(i),
            imbl::ordset::DiffItem::Remove(i) => Change::Removed(i),
        })
    }
}

impl fmt::Debug for Changes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Changes")
    }
}

impl<'a> IntoIterator for &'a InstanceSet {
    type Item = &'a Instance;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

/// Collects any strings into a set: sorted, without duplicates or empty strings.
///
/// ```
/// let set: sd_core::InstanceSet = vec![String::from("b:1"), String::from("a:1")].into_iter().collect();
/// assert_eq!(set, ["a:1", "b:1"]);
/// ```
impl<S: Into<Instance>> FromIterator<S> for InstanceSet {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut set = InstanceSet::new();
        set.extend(iter);
        set
    }
}

/// Inserts each string, as [`InstanceSet::insert`] does.
///
/// ```
/// let mut set = sd_core::InstanceSet::from_iter(["a:1"]);
/// set.extend(["b:1", ""]);
/// assert_eq!(set, ["a:1", "b:1"]);
/// ```
impl<S: Into<Instance>> Extend<S> for InstanceSet {
    fn extend<I: IntoIterator<Item = S>>(&mut self, iter: I) {
        for s in iter {
            self.insert(s);
        }
    }
}

/// Formats as a list, in order: `["a:1", "b:1"]`.
///
/// ```
/// let set = sd_core::InstanceSet::from_iter(["b:1", "a:1"]);
/// assert_eq!(format!("{set:?}"), r#"["a:1", "b:1"]"#);
/// ```
impl fmt::Debug for InstanceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// A set equals a list of strings that holds the same instances in the same (sorted) order.
///
/// ```
/// let set = sd_core::InstanceSet::from_iter(["b:1", "a:1"]);
/// assert_eq!(set, ["a:1", "b:1"]);
/// assert_ne!(set, ["b:1", "a:1"]);
/// ```
impl<S: AsRef<str>> PartialEq<[S]> for InstanceSet {
    fn eq(&self, other: &[S]) -> bool {
        self.len() == other.len()
            && self
                .iter()
                .zip(other)
                .all(|(a, b)| a.as_str() == b.as_ref())
    }
}

/// See the `PartialEq<[S]>` implementation.
///
/// ```
/// assert_eq!(sd_core::InstanceSet::from_iter(["a:1"]), ["a:1"]);
/// ```
impl<S: AsRef<str>, const N: usize> PartialEq<[S; N]> for InstanceSet {
    fn eq(&self, other: &[S; N]) -> bool {
        *self == other[..]
    }
}

/// See the `PartialEq<[S]>` implementation.
///
/// ```
/// assert_eq!(sd_core::InstanceSet::from_iter(["a:1"]), vec!["a:1"]);
/// ```
impl<S: AsRef<str>> PartialEq<Vec<S>> for InstanceSet {
    fn eq(&self, other: &Vec<S>) -> bool {
        *self == other[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instance is found and removed by itself or by its stored value, never by its address
    /// (which, for a JSON value, differs).
    #[test]
    fn instances_with_metadata_are_found_by_value() {
        let json = Instance::from_value(r#"{"addr":"10.0.0.1:80","weight":2}"#).unwrap();
        let mut set = InstanceSet::new();
        set.insert(json.clone());
        assert!(set.contains(&json));
        assert!(set.contains(json.value()));
        assert!(
            !set.contains("10.0.0.1:80"),
            "the address is not the instance"
        );
        assert!(set.remove(&json));
        assert!(set.is_empty());
    }

    #[test]
    fn changes_of_derived_and_unrelated_sets() {
        let base: InstanceSet = (0..5000).map(|i| format!("i{i:05}")).collect();
        let mut derived = base.clone();
        derived.remove("i00010");
        derived.insert("i00010x");
        derived.insert("zzz");
        let got: Vec<Change> = base.changes(&derived).collect();
        assert_eq!(
            got,
            [
                Change::Removed(&"i00010".into()),
                Change::Added(&"i00010x".into()),
                Change::Added(&"zzz".into())
            ]
        );
        // Same content built independently: no change, and equal.
        let rebuilt: InstanceSet = derived.iter().map(|i| i.to_string()).collect();
        assert_eq!(derived.changes(&rebuilt).count(), 0);
        assert_eq!(derived, rebuilt);
        assert_ne!(base, derived);
    }
}
