//! # sd-lb: load balancing and retries over any sd backend
//!
//! Balancers pick one endpoint of an [`Endpointer`](sd_core::Endpointer) per call, after go-kit's
//! `sd/lb`; [`Retry`] calls through any [`Balancer`](sd_core::Balancer) until an attempt succeeds.
//! They are generic over the endpointer and the balancer, so they compose with every backend
//! (etcd, in-memory, your own) and with each other.
//!
//! | type | picks | returns |
//! |---|---|---|
//! | [`RoundRobin`] | each endpoint in turn | the endpoint `E` |
//! | [`Random`] | a uniformly random endpoint (seedable) | the endpoint `E` |
//! | [`P2c`] | the less loaded of two random endpoints (load divided by weight) | an [`InFlight`] guard (derefs to `E`) |
//! | [`WeightedRoundRobin`] | smooth weighted round robin by each instance's weight | the endpoint `E` |
//! | [`WeightedRandom`] | a random endpoint with probability weight / total | the endpoint `E` |
//! | [`ZoneAware`] | round robin in the caller's zone, spilling over all zones when it has too few | the endpoint `E` |
//! | [`Maglev`] | the endpoint of a request key (consistent hashing, optionally with bounded loads) | the endpoint `E`, or a [`Held`] guard |
//! | [`Retry`] | wraps any balancer: attempts, one deadline, a callback, a [`RetryBudget`], backoff; retries avoid endpoints that failed in the call and report every outcome | the call's result |
//!
//! With feature `tower`, `tower::Balanced` makes any of them one `tower::Service` when its
//! endpoints are services, and `tower::RetryService` does the same for [`Retry`] (module
//! `tower`).
//! Feature `metrics` counts what goes wrong (picks with no endpoint, retries and why they stop,
//! ejections) through the `metrics` facade: see the module `metrics` for the table.
//!
//! [`RoundRobin`], [`Random`] and [`P2c`] take [`Outliers`] (`with_outliers`): passive health
//! checking that ejects instances whose calls keep failing, slow start for instances that just
//! joined (see [`outliers`]), and optional active health checks of your own
//! ([`Outliers::spawn_checks`], see [`checks`]). With
//! [`EndpointerOptions::drain`](sd_core::EndpointerOptions::drain), a removed instance is closed
//! only once the calls these balancers (and [`Retry`]) picked it for have ended.
//!
//! A pick takes no lock, allocates nothing and never awaits: each thread caches the endpointer's
//! snapshot and re-reads it only when the endpointer's version moves (one atomic load per pick).
//! A thread that stops picking keeps its last snapshot (and so those endpoints) alive until it
//! picks again or the balancer is dropped; a closed endpoint is never handed out after the
//! endpointer's version has moved past it, since every pick checks the version first.
//!
//! The whole path, from an instancer to a retried call:
//!
//! ```
//! use std::time::Duration;
//! use sd_core::{Closer, DefaultEndpointer, EndpointerOptions, Error, Event, Instance, Instancer,
//!               Publisher};
//! use sd_lb::{Retry, RoundRobin};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A backend's instancer (sd-etcd, sd-memory, ...); here a Publisher fed by hand.
//! struct Static(Publisher);
//! impl Instancer for Static {
//!     fn subscribe(&self) -> sd_core::EventStream { self.0.subscribe() }
//!     fn stop(&self) { self.0.stop() }
//! }
//! let instancer = Static(Publisher::new(Event::from_instances(["10.0.0.1:80", "10.0.0.2:80"])));
//!
//! // The factory turns an instance into an endpoint: here, a URL.
//! let factory = |i: &Instance| -> Result<(String, Option<Closer>), Error> {
//!     Ok((format!("http://{i}/hello"), None))
//! };
//! let endpointer = DefaultEndpointer::new(&instancer, factory, EndpointerOptions::new()).await;
//! let retry = Retry::new(RoundRobin::new(endpointer), 3, Duration::from_secs(2))?;
//!
//! let reply = retry
//!     .call(|url| async move {
//!         // Your client call goes here.
//!         Ok::<_, std::io::Error>(format!("GET {url}"))
//!     })
//!     .await?;
//! assert_eq!(reply, "GET http://10.0.0.1:80/hello");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod checks;
pub mod hash;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
mod metrics;
pub mod outliers;
pub mod p2c;
mod per_snapshot;
mod pick;
mod random;
mod retry;
mod round_robin;
mod thread_cache;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod tower;
pub mod weighted;
pub mod zone;

pub use hash::{hash_key, ForKey, Held, Maglev};
pub use outliers::Outliers;
pub use p2c::{InFlight, P2c};
pub use random::Random;
pub use retry::{
    decide_with, AlwaysRetry, AttemptError, DecideWith, Decision, Retry, RetryBudget,
    RetryCallback, RetryError, StopReason,
};
pub use round_robin::RoundRobin;
pub use weighted::{WeightedRandom, WeightedRoundRobin};
pub use zone::ZoneAware;
