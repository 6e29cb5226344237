//! # sd-etcd: the etcd v3 backend of `sd`
//!
//! What go-kit's `sd/etcdv3` does, on [`etcd-client`](https://docs.rs/etcd-client): an
//! [`EtcdRegistrar`] puts a service's key on a lease and keeps it alive; an [`EtcdInstancer`]
//! reads a prefix once, then follows it with a watch, applying changes incrementally and
//! telling subscribers the full instance set. Unlike go-kit's, it recovers from etcd's faults:
//! lost leases are re-granted, broken or compacted watches resume without missing an update,
//! dead or hung endpoints are taken out of rotation.
//!
//! Keys follow go-kit's layout: key = prefix + instance, value = instance.
//!
//! - [`ClientOptions`]: TLS (CA, client certificate; files or PEM), credentials, timeouts.
//! - [`EtcdClient`]: connects (probing the endpoints), fails over between endpoints, detects
//!   hung nodes; implements the small [`Client`] trait the registrar and instancer are written
//!   against (so their logic is unit-tested with a mock).
//! - [`EtcdRegistrar`], [`EtcdInstancer`]: `sd_core::Registrar` and `sd_core::Instancer`.
//!
//! Feature `metrics` records what the instancers and registrars go through (instances, changes,
//! errors, lost leases) through the `metrics` facade: see the module `metrics` for the
//! table. Every background task logs in a span naming what it serves (`etcd_instancer{prefix}`,
//! `etcd_lease_pool{ttl_secs, heartbeat, lease}`, `etcd_endpoint_probe{endpoint}`, ...), so with
//! many prefixes the log says which one is failing.
//!
//! Feature `testing` adds the module `testing`: throwaway etcd servers and clusters on
//! loopback (with TLS or auth), and a TCP proxy that cuts connections, as used by this crate's
//! tests and `cargo xtask etcd`.
//!
//! ```no_run
//! use std::time::Duration;
//! use futures::StreamExt;
//! use sd_core::{Instancer, Registrar, Service, TtlOption};
//! use sd_etcd::{ClientOptions, EtcdClient, EtcdInstancer, EtcdRegistrar};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = EtcdClient::connect(["http://127.0.0.1:2379"], ClientOptions::new()).await?;
//!
//! let ttl = TtlOption::new(Duration::from_secs(3), Duration::from_secs(10))?;
//! let svc = Service::new("/services/foosvc/10.0.0.7:8080", "10.0.0.7:8080")?.with_ttl(ttl);
//! let registrar = EtcdRegistrar::new(client.clone(), svc);
//! registrar.register().await?;
//!
//! let instancer = EtcdInstancer::new(client, "/services/foosvc/").await?;
//! let mut events = instancer.subscribe();
//! println!("{:?}", events.next().await);
//!
//! registrar.deregister().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
mod error;
mod etcd;
mod instancer;
mod options;
mod registrar;

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
mod metrics;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use client::{Client, Header, KeyValue, WatchBatch, WatchEvent, WatchStream};
pub use error::Error;
pub use etcd::EtcdClient;
pub use instancer::EtcdInstancer;
pub use options::{ClientOptions, MIN_KEEP_ALIVE_INTERVAL};
pub use registrar::{EtcdRegistrar, LeasePools};

#[cfg(test)]
pub(crate) use client::MockClient;
