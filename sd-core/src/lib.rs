//! # sd-core: service discovery that works on any backend
//!
//! The backend-agnostic heart of `sd`, after go-kit's `sd` package. A service *registers* itself
//! in a store through a [`Registrar`]; clients *watch* a prefix through an [`Instancer`], turn
//! each instance into an endpoint with a [`Factory`] inside an [`Endpointer`], and pick one with a
//! [`Balancer`] (round robin, random, P2C and retry live in `sd-lb`).
//!
//! ```text
//! Registrar ──▶ store ──▶ Instancer ──Event──▶ Endpointer ──▶ Balancer ──▶ Retry ──▶ call
//! ```
//!
//! Backends (`sd-etcd`, `sd-memory`, your own) implement [`Instancer`] and [`Registrar`], usually
//! with a [`Publisher`] for the subscriber side, and prove it with the conformance kit (feature
//! `testkit`, module `testkit`).
//!
//! ```
//! use sd_core::{Closer, DefaultEndpointer, Endpointer, EndpointerOptions, Error, Event,
//!               Instance, Instancer, Publisher};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A backend's instancer is usually a Publisher fed from the store.
//! struct Static(Publisher);
//! impl Instancer for Static {
//!     fn subscribe(&self) -> sd_core::EventStream { self.0.subscribe() }
//!     fn stop(&self) { self.0.stop() }
//! }
//! let instancer = Static(Publisher::new(Event::from_instances(["127.0.0.1:8080"])));
//! let endpointer = DefaultEndpointer::new(
//!     &instancer,
//!     |i: &Instance| -> Result<(String, Option<Closer>), Error> { Ok((i.to_string(), None)) },
//!     EndpointerOptions::new(),
//! )
//! .await;
//! assert_eq!(endpointer.endpoints().unwrap(), ["127.0.0.1:8080"]);
//! # }
//! ```

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod balancer;
mod endpointer;
mod error;
mod event;
mod factory;
mod instance;
pub mod instance_set;
mod instancer;
mod registrar;

#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
#[cfg(not(feature = "metrics"))]
mod metrics;

#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub mod discover;
#[cfg(feature = "tower")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower")))]
pub use discover::{discover, discover_owning, Discovery};

#[cfg(feature = "tonic")]
#[cfg_attr(docsrs, doc(cfg(feature = "tonic")))]
pub mod tonic;

pub use balancer::{Balancer, Tried};
pub use endpointer::{
    slots, CallGuard, Calls, DefaultEndpointer, Endpointer, EndpointerOptions, FixedEndpointer,
    Slots, Snapshot,
};
pub use error::{BackendError, Error, Report};
pub use event::{Event, EventStream};
pub use factory::{endpoint_fn, factory, Closer, EndpointFn, Factory};
pub use instance::{Instance, Metadata, ValueFormat};
pub use instance_set::{Change, InstanceSet};
pub use instancer::{Instancer, Publisher};
pub use registrar::{Registrar, RegistrationState, Service, TtlOption, MIN_HEARTBEAT};
