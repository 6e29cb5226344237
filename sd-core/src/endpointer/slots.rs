//! [`Slots`]: the persistent vector a [`Snapshot`](crate::Snapshot) keeps its endpoints in.

use std::fmt;
use std::ops::Index;
use std::sync::Arc;

/// Bits of an index consumed per tree level.
const BITS: u32 = 5;
/// Children per branch, items per leaf.
const WIDTH: usize = 1 << BITS;
const MASK: usize = WIDTH - 1;

/// The endpoints (or instances) of a [`Snapshot`](crate::Snapshot), in slot order: an immutable
/// vector that is O(1) to clone, O(log₃₂ N) to read at an index, and O(log₃₂ N) to derive a new
/// version from with one slot set, pushed or popped (the new version shares every part the
/// change did not touch).
///
/// That is what lets an endpointer publish a new endpoint set per change at a cost that does not
/// grow with the size of the set, while a balancer still picks by index. Up to 32 items it is a
/// single array; 1 024 items take two levels, 32 768 three.
///
/// ```
/// use sd_core::Slots;
///
/// let a: Slots<u32> = (0..1000).collect();
/// let mut b = a.clone();
/// b.set(7, 70);
/// b.push(1000);
/// assert_eq!((a[7], b[7]), (7, 70));
/// assert_eq!((a.len(), b.len()), (1000, 1001));
/// assert_eq!(b.pop(), Some(1000));
/// assert_eq!(b.iter().copied().sum::<u32>(), (0..1000).sum::<u32>() + 63);
/// ```
pub struct Slots<T> {
    len: usize,
    /// The index bits consumed above the leaves: 0 when the root is a leaf.
    shift: u32,
    root: Node<T>,
}

enum Node<T> {
    Leaf(Arc<[T]>),
    Branch(Arc<[Node<T>]>),
}

impl<T> Clone for Node<T> {
    fn clone(&self) -> Self {
        match self {
            Node::Leaf(a) => Node::Leaf(a.clone()),
            Node::Branch(b) => Node::Branch(b.clone()),
        }
    }
}

impl<T> Clone for Slots<T> {
    fn clone(&self) -> Self {
        Slots {
            len: self.len,
            shift: self.shift,
            root: self.root.clone(),
        }
    }
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots {
            len: 0,
            shift: 0,
            root: Node::Leaf(Arc::from(Vec::new())),
        }
    }
}

impl<T> Slots<T> {
    /// An empty vector.
    ///
    /// ```
    /// assert!(sd_core::Slots::<u8>::new().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of items.
    ///
    /// ```
    /// assert_eq!(sd_core::Slots::from(vec![1, 2]).len(), 2);
    /// ```
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no item.
    ///
    /// ```
    /// assert!(sd_core::Slots::<u8>::from(vec![]).is_empty());
    /// ```
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The item at `index`, or `None` past the end.
    ///
    /// ```
    /// let s = sd_core::Slots::from(vec!["a", "b"]);
    /// assert_eq!(s.get(1), Some(&"b"));
    /// assert_eq!(s.get(2), None);
    /// ```
    #[inline]
    pub fn get(&self, index: usize) -> Option<&T> {
        if index >= self.len {
            return None;
        }
        let mut node = &self.root;
        let mut shift = self.shift;
        loop {
            match node {
                Node::Leaf(items) => return items.get(index & MASK),
                Node::Branch(children) => {
                    node = children.get((index >> shift) & MASK)?;
                    shift = shift.saturating_sub(BITS);
                }
            }
        }
    }

    /// Whether `self` and `other` are the same version of one vector (clones of each other,
    /// unchanged since): a pointer comparison, not a comparison of the items.
    ///
    /// ```
    /// let a = sd_core::Slots::from(vec![1]);
    /// let b = a.clone();
    /// assert!(a.ptr_eq(&b));
    /// assert!(!a.ptr_eq(&sd_core::Slots::from(vec![1])));
    /// ```
    pub fn ptr_eq(&self, other: &Self) -> bool {
        self.len == other.len
            && match (&self.root, &other.root) {
                (Node::Leaf(a), Node::Leaf(b)) => Arc::ptr_eq(a, b),
                (Node::Branch(a), Node::Branch(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// The items, in slot order.
    ///
    /// ```
    /// let s: sd_core::Slots<u32> = (0..100).collect();
    /// assert!(s.iter().copied().eq(0..100));
    /// ```
    pub fn iter(&self) -> Iter<'_, T> {
        Iter {
            slots: self,
            next: 0,
            leaf: &[],
        }
    }

    /// The items, in slot order, as a vector.
    ///
    /// ```
    /// assert_eq!(sd_core::Slots::from(vec![3, 1]).to_vec(), [3, 1]);
    /// ```
    pub fn to_vec(&self) -> Vec<T>
    where
        T: Clone,
    {
        self.iter().cloned().collect()
    }

    /// Builds the tree over `items` bottom-up: full leaves, then full branches, left to right.
    fn build(items: Vec<T>) -> Self {
        let len = items.len();
        if len <= WIDTH {
            return Slots {
                len,
                shift: 0,
                root: Node::Leaf(Arc::from(items)),
            };
        }
        let mut level: Vec<Node<T>> = Vec::with_capacity(len.div_ceil(WIDTH));
        let mut items = items.into_iter();
        loop {
            let leaf: Arc<[T]> = items.by_ref().take(WIDTH).collect();
            if leaf.is_empty() {
                break;
            }
            level.push(Node::Leaf(leaf));
        }
        let mut shift = 0;
        while level.len() > 1 {
            shift += BITS;
            let mut up = Vec::with_capacity(level.len().div_ceil(WIDTH));
            let mut nodes = level.into_iter();
            loop {
                let branch: Arc<[Node<T>]> = nodes.by_ref().take(WIDTH).collect();
                if branch.is_empty() {
                    break;
                }
                up.push(Node::Branch(branch));
            }
            level = up;
        }
        let root = level.pop().unwrap_or(Node::Leaf(Arc::from(Vec::new())));
        Slots { len, shift, root }
    }
}

impl<T: Clone> Slots<T> {
    /// Replaces the item at `index` and returns the old one; `None` (and no change) past the end.
    ///
    /// ```
    /// let mut s = sd_core::Slots::from(vec![1, 2]);
    /// assert_eq!(s.set(0, 5), Some(1));
    /// assert_eq!(s.set(2, 5), None);
    /// assert_eq!(s.to_vec(), [5, 2]);
    /// ```
    pub fn set(&mut self, index: usize, item: T) -> Option<T> {
        if index >= self.len {
            return None;
        }
        let mut node = &mut self.root;
        let mut shift = self.shift;
        loop {
            match node {
                Node::Leaf(items) => {
                    let slot = Arc::make_mut(items).get_mut(index & MASK)?;
                    return Some(std::mem::replace(slot, item));
                }
                Node::Branch(children) => {
                    node = Arc::make_mut(children).get_mut((index >> shift) & MASK)?;
                    shift = shift.saturating_sub(BITS);
                }
            }
        }
    }

    /// Appends an item.
    ///
    /// ```
    /// let mut s = sd_core::Slots::new();
    /// for i in 0..40 {
    ///     s.push(i);
    /// }
    /// assert_eq!(s.get(39), Some(&39));
    /// ```
    pub fn push(&mut self, item: T) {
        let capacity = WIDTH << self.shift;
        if self.len == capacity {
            // The tree is full: grow a level, the old root becoming the first child.
            let old = std::mem::replace(&mut self.root, Node::Branch(Arc::from(Vec::new())));
            self.root = Node::Branch(Arc::from(vec![old, path(self.shift, item)]));
            self.shift += BITS;
        } else {
            push_in(&mut self.root, self.shift, self.len, item);
        }
        self.len += 1;
    }

    /// Removes and returns the last item.
    ///
    /// ```
    /// let mut s = sd_core::Slots::from(vec![1, 2]);
    /// assert_eq!(s.pop(), Some(2));
    /// assert_eq!(s.pop(), Some(1));
    /// assert_eq!(s.pop(), None);
    /// ```
    pub fn pop(&mut self) -> Option<T> {
        let last = self.len.checked_sub(1)?;
        let item = pop_in(&mut self.root, self.shift, last)?;
        self.len = last;
        // A root left with one child hands the tree down to it.
        while self.shift > 0 {
            let child = match &self.root {
                Node::Branch(children) if children.len() == 1 => children[0].clone(),
                _ => break,
            };
            self.root = child;
            self.shift -= BITS;
        }
        Some(item)
    }

    /// Removes the item at `index` by moving the last item into its slot, and returns it.
    /// O(log N): the order of the other items is kept except for the moved one.
    ///
    /// ```
    /// let mut s = sd_core::Slots::from(vec!["a", "b", "c", "d"]);
    /// assert_eq!(s.swap_remove(1), Some("b"));
    /// assert_eq!(s.to_vec(), ["a", "d", "c"]);
    /// ```
    pub fn swap_remove(&mut self, index: usize) -> Option<T> {
        if index >= self.len {
            return None;
        }
        let last = self.pop()?;
        if index == self.len {
            Some(last)
        } else {
            self.set(index, last)
        }
    }
}

/// A new path down to a leaf holding only `item`, for a subtree of `shift` index bits.
fn path<T>(shift: u32, item: T) -> Node<T> {
    if shift == 0 {
        Node::Leaf(Arc::from(vec![item]))
    } else {
        Node::Branch(Arc::from(vec![path(shift - BITS, item)]))
    }
}

/// Appends `item` at `index` (the subtree's length) below `node`, which has room for it.
fn push_in<T: Clone>(node: &mut Node<T>, shift: u32, index: usize, item: T) {
    match node {
        Node::Leaf(items) => {
            let mut grown = Vec::with_capacity(items.len() + 1);
            grown.extend(items.iter().cloned());
            grown.push(item);
            *items = Arc::from(grown);
        }
        Node::Branch(children) => {
            let child = (index >> shift) & MASK;
            if child < children.len() {
                if let Some(node) = Arc::make_mut(children).get_mut(child) {
                    push_in(node, shift - BITS, index, item);
                }
            } else {
                let mut grown = Vec::with_capacity(children.len() + 1);
                grown.extend(children.iter().cloned());
                grown.push(path(shift - BITS, item));
                *children = Arc::from(grown);
            }
        }
    }
}

/// Removes the item at `index`, the subtree's last, below `node`.
fn pop_in<T: Clone>(node: &mut Node<T>, shift: u32, index: usize) -> Option<T> {
    match node {
        Node::Leaf(items) => {
            let (last, rest) = items.split_last()?;
            let last = last.clone();
            *items = Arc::from(rest.to_vec());
            Some(last)
        }
        Node::Branch(children) => {
            let child = (index >> shift) & MASK;
            let item = pop_in(Arc::make_mut(children).get_mut(child)?, shift - BITS, index)?;
            // The popped item was its child's first: that child is empty now.
            if index & ((1 << shift) - 1) == 0 {
                let (_, rest) = children.split_last()?;
                *children = Arc::from(rest.to_vec());
            }
            Some(item)
        }
    }
}

/// An iterator over a [`Slots`]' items, in slot order (see [`Slots::iter`]).
///
/// ```
/// let s = sd_core::Slots::from(vec![1]);
/// let mut it: sd_core::slots::Iter<'_, i32> = s.iter();
/// assert_eq!(it.next(), Some(&1));
/// assert_eq!(it.next(), None);
/// ```
pub struct Iter<'a, T> {
    slots: &'a Slots<T>,
    next: usize,
    /// The rest of the current leaf.
    leaf: &'a [T],
}

impl<'a, T> Iterator for Iter<'a, T> {
    type Item = &'a T;

    fn next(&mut self) -> Option<&'a T> {
        if self.leaf.is_empty() {
            if self.next >= self.slots.len {
                return None;
            }
            self.leaf = self.slots.leaf_of(self.next);
        }
        let (first, rest) = self.leaf.split_first()?;
        self.leaf = rest;
        self.next += 1;
        Some(first)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.slots.len - self.next;
        (n, Some(n))
    }
}

impl<T> ExactSizeIterator for Iter<'_, T> {}

impl<T> Slots<T> {
    /// The items of the leaf that holds `index`, from `index` on.
    fn leaf_of(&self, index: usize) -> &[T] {
        let mut node = &self.root;
        let mut shift = self.shift;
        loop {
            match node {
                Node::Leaf(items) => return items.get(index & MASK..).unwrap_or(&[]),
                Node::Branch(children) => match children.get((index >> shift) & MASK) {
                    Some(child) => node = child,
                    None => return &[],
                },
            }
            shift = shift.saturating_sub(BITS);
        }
    }
}

impl<'a, T> IntoIterator for &'a Slots<T> {
    type Item = &'a T;
    type IntoIter = Iter<'a, T>;

    fn into_iter(self) -> Iter<'a, T> {
        self.iter()
    }
}

impl<T> From<Vec<T>> for Slots<T> {
    fn from(items: Vec<T>) -> Self {
        Slots::build(items)
    }
}

impl<T> FromIterator<T> for Slots<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Slots::build(iter.into_iter().collect())
    }
}

/// Panics past the end, as a slice does; [`Slots::get`] does not.
impl<T> Index<usize> for Slots<T> {
    type Output = T;

    fn index(&self, index: usize) -> &T {
        match self.get(index) {
            Some(item) => item,
            None => panic!(
                "index {index} out of range for Slots of length {}",
                self.len
            ),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Slots<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: PartialEq<U>, U> PartialEq<Slots<U>> for Slots<T> {
    fn eq(&self, other: &Slots<U>) -> bool {
        self.len == other.len && self.iter().zip(other).all(|(a, b)| a == b)
    }
}

impl<T: Eq> Eq for Slots<T> {}

/// Slots equal a slice with equal items in the same order.
///
/// ```
/// assert_eq!(sd_core::Slots::from(vec![String::from("a")]), ["a"]);
/// ```
impl<T: PartialEq<U>, U> PartialEq<[U]> for Slots<T> {
    fn eq(&self, other: &[U]) -> bool {
        self.len == other.len() && self.iter().zip(other).all(|(a, b)| a == b)
    }
}

/// See the `PartialEq<[U]>` implementation.
///
/// ```
/// assert_eq!(sd_core::Slots::from(vec![1, 2]), [1, 2]);
/// ```
impl<T: PartialEq<U>, U, const N: usize> PartialEq<[U; N]> for Slots<T> {
    fn eq(&self, other: &[U; N]) -> bool {
        *self == other[..]
    }
}

/// See the `PartialEq<[U]>` implementation.
///
/// ```
/// assert_eq!(sd_core::Slots::from(vec![1, 2]), vec![1, 2]);
/// ```
impl<T: PartialEq<U>, U> PartialEq<Vec<U>> for Slots<T> {
    fn eq(&self, other: &Vec<U>) -> bool {
        *self == other[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation, checked against a `Vec` after each step, across level boundaries.
    #[test]
    fn behaves_as_a_vec_across_levels() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut model: Vec<u32> = Vec::new();
        let mut slots: Slots<u32> = Slots::new();
        let mut kept = Vec::new();
        for step in 0..40_000u32 {
            let op = rng.u32(..10);
            if op < 5 || model.len() < 10 {
                model.push(step);
                slots.push(step);
            } else if op < 7 {
                assert_eq!(slots.pop(), model.pop());
            } else if op < 9 {
                let i = rng.usize(..model.len());
                assert_eq!(
                    slots.set(i, step),
                    Some(std::mem::replace(&mut model[i], step))
                );
            } else {
                let i = rng.usize(..model.len());
                assert_eq!(slots.swap_remove(i), Some(model.swap_remove(i)));
            }
            if step % 997 == 0 {
                assert_eq!(slots.to_vec(), model, "step {step}");
                kept.push((slots.clone(), model.clone()));
            }
        }
        // Earlier versions are untouched by later changes.
        for (slots, model) in kept {
            assert_eq!(slots.len(), model.len());
            assert!(slots.iter().eq(model.iter()));
            for (i, m) in model.iter().enumerate() {
                assert_eq!(slots.get(i), Some(m));
            }
        }
        while let Some(x) = model.pop() {
            assert_eq!(slots.pop(), Some(x));
        }
        assert!(slots.is_empty() && slots.shift == 0);
    }

    #[test]
    fn build_matches_pushes() {
        for n in [0usize, 1, 31, 32, 33, 1023, 1024, 1025, 40_000] {
            let built: Slots<usize> = (0..n).collect();
            let mut pushed = Slots::new();
            (0..n).for_each(|i| pushed.push(i));
            assert_eq!(built.shift, pushed.shift, "n = {n}");
            assert!(built.iter().copied().eq(0..n));
            assert!(pushed.iter().copied().eq(0..n));
            assert_eq!(built.get(n), None);
        }
    }
}
