//! Test helpers shared by the integration tests and the benchmark: a live endpoint set fed by
//! hand through a [`Publisher`], the way a backend feeds its subscribers.

#![allow(dead_code)] // each test binary uses a part

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_core::{
    Closer, DefaultEndpointer, Endpointer, EndpointerOptions, Error, Event, EventStream, Instance,
    Instancer, Publisher,
};

/// An instancer whose instance set the test sets.
#[derive(Debug, Clone)]
pub struct Instances(Arc<Publisher>);

impl Instancer for Instances {
    fn subscribe(&self) -> EventStream {
        self.0.subscribe()
    }
    fn stop(&self) {
        self.0.stop()
    }
}

impl Instances {
    pub fn new<S: Into<Instance>>(set: impl IntoIterator<Item = S>) -> Self {
        Instances(Arc::new(Publisher::new(Event::from_instances(set))))
    }

    /// Publishes a new instance set.
    pub fn set<S: Into<Instance>>(&self, set: impl IntoIterator<Item = S>) {
        self.0.publish(Event::from_instances(set));
    }

    /// Publishes a discovery error.
    pub fn fail(&self, message: &str) {
        self.0.publish(Event::Error(Error::backend_msg(message)));
    }

    /// A live endpointer whose endpoints are the instance strings.
    pub async fn strings(&self) -> DefaultEndpointer<String> {
        let factory =
            |i: &Instance| -> Result<(String, Option<Closer>), Error> { Ok((i.to_string(), None)) };
        DefaultEndpointer::new(self, factory, EndpointerOptions::new()).await
    }

    /// A live endpointer of `u64` handles: each instance is a decimal number.
    pub async fn numbers(&self) -> DefaultEndpointer<u64> {
        self.numbers_with(EndpointerOptions::new()).await
    }

    /// [`numbers`](Self::numbers) with `options`.
    pub async fn numbers_with(&self, options: EndpointerOptions) -> DefaultEndpointer<u64> {
        let factory = |i: &Instance| -> Result<(u64, Option<Closer>), Error> {
            let n = i.parse::<u64>().map_err(|e| Error::factory(i, e))?;
            Ok((n, None))
        };
        DefaultEndpointer::new(self, factory, options).await
    }
}

/// Waits until `endpointer`'s version moves past `from`, yielding to the runtime so its
/// follower task can apply the event. Panics after 5 s.
pub async fn changed<E>(endpointer: &impl Endpointer<E>, from: u64) {
    let wait = async {
        while endpointer.version() == from {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("the endpointer did not apply the published event within 5 s");
}

/// [`changed`] for a test thread that is not inside the runtime (the follower task runs on
/// the runtime's worker threads meanwhile).
pub fn changed_blocking<E>(endpointer: &impl Endpointer<E>, from: u64) {
    let until = Instant::now() + Duration::from_secs(5);
    while endpointer.version() == from {
        assert!(
            Instant::now() < until,
            "the endpointer did not apply the published event within 5 s"
        );
        std::thread::yield_now();
    }
}

/// What a pick hands out, as the instance string it was made from: the endpoint itself for
/// most balancers, P2C's guard around it.
pub trait Name {
    fn name(&self) -> String;
}

impl Name for String {
    fn name(&self) -> String {
        self.clone()
    }
}

impl Name for sd_lb::InFlight<String> {
    fn name(&self) -> String {
        (**self).clone()
    }
}
