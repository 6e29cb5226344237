//! # sd-memory: an in-process store with etcd's semantics
//!
//! For unit tests of code that uses service discovery: [`MemoryStore`] holds keys with optional
//! TTL leases (expiry runs on tokio time, so `tokio::time::pause()` makes tests instant), prefix
//! watches through [`MemoryInstancer`], heart-beated registrations through [`MemoryRegistrar`],
//! and fault injection a test drives: fail the next N operations, break every watch, or take the
//! whole store down and back up.
//!
//! ```
//! use futures::StreamExt;
//! use sd_core::{Event, Instancer, Registrar, Service};
//! use sd_memory::{MemoryInstancer, MemoryRegistrar, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), sd_core::Error> {
//! let store = MemoryStore::new();
//! let instancer = MemoryInstancer::new(&store, "/services/bar/")?;
//! let mut events = instancer.subscribe();
//! assert_eq!(events.next().await, Some(Event::empty()));
//!
//! let registrar = MemoryRegistrar::new(&store, Service::new("/services/bar/a:80", "a:80")?)?;
//! registrar.register().await?;
//! assert_eq!(events.next().await, Some(Event::from_instances(["a:80"])));
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod instancer;
mod registrar;
mod store;

pub use instancer::MemoryInstancer;
pub use registrar::MemoryRegistrar;
pub use store::{LeaseId, MemoryStore};
