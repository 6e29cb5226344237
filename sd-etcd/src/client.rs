//! The [`Client`] trait: the few etcd operations the registrar and instancer need.

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::Error;

/// One key of a prefix, as read by [`Client::get_prefix`].
///
/// ```
/// let kv = sd_etcd::KeyValue { key: "/svc/a".into(), value: "a:1".into(), mod_revision: 7, lease: 0 };
/// assert_eq!(kv.value, "a:1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
    /// The revision of the key's last change.
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// What happened to one key in a watch.
///
/// ```
/// let ev = sd_etcd::WatchEvent::Delete { key: "/svc/a".into(), mod_revision: 9 };
/// assert_eq!(ev.key(), "/svc/a");
/// assert_eq!(ev.mod_revision(), 9);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or changed.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: String,
        /// The revision of the change.
        mod_revision: i64,
    },
    /// The key was deleted (or its lease expired).
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        mod_revision: i64,
    },
}

impl WatchEvent {
    /// The key the event is about.
    ///
    /// ```
    /// let ev = sd_etcd::WatchEvent::Put { key: "/k".into(), value: "v".into(), mod_revision: 2 };
    /// assert_eq!(ev.key(), "/k");
    /// ```
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    ///
    /// ```
    /// let ev = sd_etcd::WatchEvent::Put { key: "/k".into(), value: "v".into(), mod_revision: 2 };
    /// assert_eq!(ev.mod_revision(), 2);
    /// ```
    pub fn mod_revision(&self) -> i64 {
        match self {
            WatchEvent::Put { mod_revision, .. } | WatchEvent::Delete { mod_revision, .. } => {
                *mod_revision
            }
        }
    }
}

/// One response of a watch: its events, or a progress notification (no events), or the end of
/// the watch (`canceled`).
///
/// ```
/// let progress = sd_etcd::WatchBatch { header_revision: 12, ..Default::default() };
/// assert!(progress.events.is_empty() && !progress.canceled);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchBatch {
    /// The events, in revision order.
    pub events: Vec<WatchEvent>,
    /// The store revision in the response header (0 in canceled responses). Not a resume
    /// point: etcd 3.4 answers a progress request with its current revision even while events
    /// of a watch that is catching up are still queued; resume after the last event's revision.
    pub header_revision: i64,
    /// etcd ended this watch; no more events follow on it.
    pub canceled: bool,
    /// With `canceled`: the oldest revision still available (the start revision was compacted).
    pub compact_revision: i64,
    /// With `canceled`: why etcd ended the watch (e.g. an expired auth token).
    pub cancel_reason: String,
}

/// A stream of watch responses; it ends (or yields an `Err`) when the watch breaks.
///
/// ```
/// use futures::StreamExt;
/// use sd_etcd::{WatchBatch, WatchStream};
///
/// let mut s: WatchStream = futures::stream::iter([Ok(WatchBatch::default())]).boxed();
/// # futures::executor::block_on(async {
/// assert!(s.next().await.unwrap().unwrap().events.is_empty());
/// assert!(s.next().await.is_none());
/// # });
/// ```
pub type WatchStream = BoxStream<'static, Result<WatchBatch, Error>>;

/// The etcd operations the registrar and instancer use: revision-aware, holding no lease state,
/// so one client can be shared by any number of registrars and instancers.
///
/// [`EtcdClient`](crate::EtcdClient) is the real one; tests use the `mockall` mock
/// (`MockClient`, in this crate's unit tests).
///
/// ```no_run
/// use sd_etcd::{Client, ClientOptions, EtcdClient};
///
/// # async fn run() -> Result<(), sd_etcd::Error> {
/// let client = EtcdClient::connect(["http://127.0.0.1:2379"], ClientOptions::new()).await?;
/// let (lease, ttl) = client.grant(10).await?;
/// client.put("/services/foo/10.0.0.1:80", "10.0.0.1:80", Some(lease)).await?;
/// let (entries, revision) = client.get_prefix("/services/foo/").await?;
/// println!("{} entries at revision {revision}, lease ttl {ttl}", entries.len());
/// # Ok(()) }
/// ```
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait Client: Send + Sync + 'static {
    /// Every key under `prefix`, and the store revision of the read.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient) -> Result<(), sd_etcd::Error> {
    /// let (entries, revision) = c.get_prefix("/services/foo/").await?;
    /// # Ok(()) }
    /// ```
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), Error>;

    /// Watches `prefix` from `start_revision` (inclusive). Returns once etcd created the watch.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// use futures::StreamExt;
    /// # async fn f(c: sd_etcd::EtcdClient) -> Result<(), sd_etcd::Error> {
    /// let (_, revision) = c.get_prefix("/services/foo/").await?;
    /// let mut watch = c.watch_prefix("/services/foo/", revision + 1).await?;
    /// while let Some(batch) = watch.next().await {
    ///     println!("{:?}", batch?.events);
    /// }
    /// # Ok(()) }
    /// ```
    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, Error>;

    /// Grants a lease of `ttl_secs` seconds; returns its id and the TTL etcd granted.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient) -> Result<(), sd_etcd::Error> {
    /// let (lease, granted) = c.grant(10).await?;
    /// # Ok(()) }
    /// ```
    async fn grant(&self, ttl_secs: i64) -> Result<(i64, i64), Error>;

    /// Refreshes `lease` once; returns its remaining TTL in seconds, 0 when etcd no longer knows it.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient, lease: i64) -> Result<(), sd_etcd::Error> {
    /// if c.keep_alive(lease).await? == 0 { println!("lease lost"); }
    /// # Ok(()) }
    /// ```
    async fn keep_alive(&self, lease: i64) -> Result<i64, Error>;

    /// Puts `key` = `value`, on `lease` if given. A lease etcd does not know gives
    /// [`Error::LeaseNotFound`].
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient) -> Result<(), sd_etcd::Error> {
    /// c.put("/services/foo/a:1", "a:1", None).await?;
    /// # Ok(()) }
    /// ```
    async fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<(), Error>;

    /// Deletes `key` only if it is still attached to `lease`; returns whether it was deleted.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient, lease: i64) -> Result<(), sd_etcd::Error> {
    /// let deleted = c.delete_if_lease("/services/foo/a:1", lease).await?;
    /// # Ok(()) }
    /// ```
    async fn delete_if_lease(&self, key: &str, lease: i64) -> Result<bool, Error>;

    /// Deletes `key`.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient) -> Result<(), sd_etcd::Error> {
    /// c.delete("/services/foo/a:1").await?;
    /// # Ok(()) }
    /// ```
    async fn delete(&self, key: &str) -> Result<(), Error>;

    /// Revokes `lease` (deleting its keys); revoking an unknown lease is not an error.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient, lease: i64) -> Result<(), sd_etcd::Error> {
    /// c.revoke(lease).await?;
    /// # Ok(()) }
    /// ```
    async fn revoke(&self, lease: i64) -> Result<(), Error>;
}

#[async_trait]
impl<C: Client + ?Sized> Client for std::sync::Arc<C> {
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), Error> {
        (**self).get_prefix(prefix).await
    }
    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, Error> {
        (**self).watch_prefix(prefix, start_revision).await
    }
    async fn grant(&self, ttl_secs: i64) -> Result<(i64, i64), Error> {
        (**self).grant(ttl_secs).await
    }
    async fn keep_alive(&self, lease: i64) -> Result<i64, Error> {
        (**self).keep_alive(lease).await
    }
    async fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<(), Error> {
        (**self).put(key, value, lease).await
    }
    async fn delete_if_lease(&self, key: &str, lease: i64) -> Result<bool, Error> {
        (**self).delete_if_lease(key, lease).await
    }
    async fn delete(&self, key: &str) -> Result<(), Error> {
        (**self).delete(key).await
    }
    async fn revoke(&self, lease: i64) -> Result<(), Error> {
        (**self).revoke(lease).await
    }
}
