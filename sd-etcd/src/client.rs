//! The [`Client`] trait: the few etcd operations the registrar and instancer need.

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::{Error, LeasePools};

/// One key of a prefix, as read by [`Client::get_prefix`]. Keys and values are bytes, as etcd
/// stores them: two keys that differ only in bytes that are not UTF-8 are two keys.
///
/// ```
/// let kv = sd_etcd::KeyValue { key: b"/svc/a".to_vec(), value: b"a:1".to_vec(), mod_revision: 7, lease: 0 };
/// assert_eq!(kv.value, b"a:1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision of the key's last change.
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// Which store answered, and when: the parts of etcd's response header that tell a store
/// that went back in time (restored from a backup, or wiped) from one that moved on.
///
/// Within one store the revision never decreases and neither does the raft term; a new store
/// (a wiped data directory, a restored snapshot) starts both again low, and a restored snapshot
/// also gets a new cluster id.
///
/// ```
/// let h = sd_etcd::Header { revision: 12, cluster_id: 7, raft_term: 2 };
/// assert!(h.revision > 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// The store revision when the response was made (0 when etcd sent none).
    pub revision: i64,
    /// The cluster that answered (0 when etcd sent none).
    pub cluster_id: u64,
    /// The raft term of the member that answered (0 when etcd sent none).
    pub raft_term: u64,
}

/// What happened to one key in a watch.
///
/// ```
/// let ev = sd_etcd::WatchEvent::Delete { key: b"/svc/a".to_vec(), mod_revision: 9 };
/// assert_eq!(ev.key(), b"/svc/a");
/// assert_eq!(ev.mod_revision(), 9);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or changed.
    Put {
        /// The key.
        key: Vec<u8>,
        /// Its new value.
        value: Vec<u8>,
        /// The revision of the change.
        mod_revision: i64,
    },
    /// The key was deleted (or its lease expired).
    Delete {
        /// The key.
        key: Vec<u8>,
        /// The revision of the deletion.
        mod_revision: i64,
    },
}

impl WatchEvent {
    /// The key the event is about.
    ///
    /// ```
    /// let ev = sd_etcd::WatchEvent::Put { key: b"/k".to_vec(), value: b"v".to_vec(), mod_revision: 2 };
    /// assert_eq!(ev.key(), b"/k");
    /// ```
    pub fn key(&self) -> &[u8] {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    ///
    /// ```
    /// let ev = sd_etcd::WatchEvent::Put { key: b"/k".to_vec(), value: b"v".to_vec(), mod_revision: 2 };
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
/// the watch (`canceled`). The first batch of every watch is etcd's answer to its creation (no
/// events), so its header tells which store the watch runs on. Responses etcd split into
/// fragments arrive reassembled, as one batch.
///
/// ```
/// let progress = sd_etcd::WatchBatch {
///     header: sd_etcd::Header { revision: 12, ..Default::default() },
///     ..Default::default()
/// };
/// assert!(progress.events.is_empty() && !progress.canceled);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchBatch {
    /// The events, in revision order.
    pub events: Vec<WatchEvent>,
    /// The response header (all zero in canceled responses). Its revision is not a resume
    /// point: etcd 3.4 answers a progress request with its current revision even while events
    /// of a watch that is catching up are still queued; resume after the last event's revision.
    pub header: Header,
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

/// The etcd operations the registrar and instancer use: revision-aware, holding no lease state
/// of its own, so one client can be shared by any number of registrars and instancers.
///
/// [`EtcdClient`](crate::EtcdClient) is the real one; tests use the `mockall` mock
/// (`MockClient`, in this crate's unit tests).
///
/// ```no_run
/// use std::time::Duration;
/// use sd_etcd::{Client, ClientOptions, EtcdClient};
///
/// # async fn run() -> Result<(), sd_etcd::Error> {
/// let client = EtcdClient::connect(["http://127.0.0.1:2379"], ClientOptions::new()).await?;
/// let (lease, ttl) = client.grant(10).await?;
/// client.put("/services/foo/10.0.0.1:80", "10.0.0.1:80", Some(lease)).await?;
/// assert!(client.keep_alive(lease, Duration::from_secs(1)).await?);
/// let (entries, header) = client.get_prefix("/services/foo/").await?;
/// println!("{} entries at revision {}, lease ttl {ttl}", entries.len(), header.revision);
/// # Ok(()) }
/// ```
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait Client: Send + Sync + 'static {
    /// Every key under `prefix`, all read at one revision (in pages, so a prefix of any size
    /// can be read), and the header of that read.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient) -> Result<(), sd_etcd::Error> {
    /// let (entries, header) = c.get_prefix("/services/foo/").await?;
    /// # Ok(()) }
    /// ```
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Header), Error>;

    /// One key, if it exists, and the header of the read.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient) -> Result<(), sd_etcd::Error> {
    /// let (kv, _) = c.get("/services/foo/10.0.0.1:80").await?;
    /// if let Some(kv) = kv { println!("on lease {:x}", kv.lease); }
    /// # Ok(()) }
    /// ```
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Header), Error>;

    /// Watches `prefix` from `start_revision` (inclusive). Returns once etcd created the watch;
    /// the stream's first batch is etcd's answer to the creation.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// use futures::StreamExt;
    /// # async fn f(c: sd_etcd::EtcdClient) -> Result<(), sd_etcd::Error> {
    /// let (_, header) = c.get_prefix("/services/foo/").await?;
    /// let mut watch = c.watch_prefix("/services/foo/", header.revision + 1).await?;
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

    /// Refreshes `lease` once: `true` when refreshed, `false` when etcd no longer knows it.
    /// A node that does not answer within `deadline` is treated as hung (taken out of rotation,
    /// so the next round goes to another endpoint) and the round fails with a timeout.
    /// [`EtcdClient`](crate::EtcdClient) keeps one keep-alive stream open per lease.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient, lease: i64) -> Result<(), sd_etcd::Error> {
    /// if !c.keep_alive(lease, std::time::Duration::from_secs(1)).await? { println!("lease lost"); }
    /// # Ok(()) }
    /// ```
    async fn keep_alive(&self, lease: i64, deadline: Duration) -> Result<bool, Error>;

    /// The keys attached to `lease`, or `None` when etcd no longer knows the lease.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient, lease: i64) -> Result<(), sd_etcd::Error> {
    /// if let Some(keys) = c.lease_keys(lease).await? { println!("{} keys", keys.len()); }
    /// # Ok(()) }
    /// ```
    async fn lease_keys(&self, lease: i64) -> Result<Option<Vec<Vec<u8>>>, Error>;

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

    /// Puts every `(key, value)`, on `lease` if given, in as few requests as etcd allows
    /// (transactions of at most 128 puts). A lease etcd does not know gives
    /// [`Error::LeaseNotFound`].
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient) -> Result<(), sd_etcd::Error> {
    /// let entries = vec![("/services/foo/a:1".to_string(), "a:1".to_string())];
    /// c.put_many(&entries, None).await?;
    /// # Ok(()) }
    /// ```
    async fn put_many(&self, entries: &[(String, String)], lease: Option<i64>)
        -> Result<(), Error>;

    /// Deletes each of `keys` that is still attached to `lease`, in as few requests as etcd
    /// allows (transactions of at most 64 conditional deletes).
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # async fn f(c: sd_etcd::EtcdClient, lease: i64) -> Result<(), sd_etcd::Error> {
    /// c.delete_many_if_lease(&["/services/foo/a:1".to_string()], lease).await?;
    /// # Ok(()) }
    /// ```
    async fn delete_many_if_lease(&self, keys: &[String], lease: i64) -> Result<(), Error>;

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

    /// Where the registrars made with this client share their leases. `None` (the default)
    /// gives each registrar a lease of its own; [`EtcdClient`](crate::EtcdClient) shares.
    ///
    /// ```no_run
    /// # use sd_etcd::Client;
    /// # fn f(c: sd_etcd::EtcdClient) {
    /// assert!(c.lease_pools().is_some());
    /// # }
    /// ```
    fn lease_pools(&self) -> Option<LeasePools> {
        None
    }
}

#[async_trait]
impl<C: Client + ?Sized> Client for std::sync::Arc<C> {
    async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Header), Error> {
        (**self).get_prefix(prefix).await
    }
    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Header), Error> {
        (**self).get(key).await
    }
    async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, Error> {
        (**self).watch_prefix(prefix, start_revision).await
    }
    async fn grant(&self, ttl_secs: i64) -> Result<(i64, i64), Error> {
        (**self).grant(ttl_secs).await
    }
    async fn keep_alive(&self, lease: i64, deadline: Duration) -> Result<bool, Error> {
        (**self).keep_alive(lease, deadline).await
    }
    async fn lease_keys(&self, lease: i64) -> Result<Option<Vec<Vec<u8>>>, Error> {
        (**self).lease_keys(lease).await
    }
    async fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<(), Error> {
        (**self).put(key, value, lease).await
    }
    async fn put_many(
        &self,
        entries: &[(String, String)],
        lease: Option<i64>,
    ) -> Result<(), Error> {
        (**self).put_many(entries, lease).await
    }
    async fn delete_many_if_lease(&self, keys: &[String], lease: i64) -> Result<(), Error> {
        (**self).delete_many_if_lease(keys, lease).await
    }
    async fn delete(&self, key: &str) -> Result<(), Error> {
        (**self).delete(key).await
    }
    async fn revoke(&self, lease: i64) -> Result<(), Error> {
        (**self).revoke(lease).await
    }
    fn lease_pools(&self) -> Option<LeasePools> {
        (**self).lease_pools()
    }
}
