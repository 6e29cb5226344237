//! The instance string a service publishes.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// One service instance, as published in the store: usually `host:port`, but any string the
/// service's factory understands (go-kit calls it an "instance").
///
/// Cheap to clone (an `Arc<str>`), ordered and hashable so instance sets can be sorted and diffed.
///
/// ```
/// use sd_core::Instance;
///
/// let a = Instance::new("10.0.0.7:8080");
/// let b = a.clone();
/// assert_eq!(a, b);
/// assert_eq!(a.as_str(), "10.0.0.7:8080");
/// assert_eq!(&*a, "10.0.0.7:8080");
/// ```
#[derive(Clone, Eq, PartialOrd, Ord)]
pub struct Instance(Arc<str>);

/// Hashes the string, as `PartialEq` compares it.
impl std::hash::Hash for Instance {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

/// Equal strings; two clones of one instance compare without reading the strings (the sets
/// publishers and endpointers compare share most of their instances).
impl PartialEq for Instance {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Instance {
    /// Makes an instance from any string.
    ///
    /// ```
    /// let i = sd_core::Instance::new(String::from("10.0.0.7:8080"));
    /// assert_eq!(i, "10.0.0.7:8080");
    /// ```
    pub fn new(s: impl AsRef<str>) -> Self {
        Instance(Arc::from(s.as_ref()))
    }

    /// The instance string.
    ///
    /// ```
    /// assert_eq!(sd_core::Instance::new("a:1").as_str(), "a:1");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Instance {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Instance {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Instance {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Instance {
    fn from(s: &str) -> Self {
        Instance::new(s)
    }
}

impl From<String> for Instance {
    fn from(s: String) -> Self {
        Instance(Arc::from(s))
    }
}

impl PartialEq<str> for Instance {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Instance {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}
