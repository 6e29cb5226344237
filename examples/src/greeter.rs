//! The gRPC greeter of the `greeter` program, its benchmark and its tests: the client and
//! server generated from `proto/greeter.proto`, [`Answer`] (the service), and
//! [`LocalServer`] (one on loopback, in process).
//!
//! ```
//! use examples::greeter::{GreeterClient, HelloRequest, LocalServer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = LocalServer::start().await?;
//! let mut client = GreeterClient::connect(format!("http://{}", server.addr())).await?;
//! let reply = client.say_hello(HelloRequest { name: "sd".into() }).await?.into_inner();
//! assert_eq!(reply.message, "hello sd");
//! assert_eq!(reply.server, server.addr().to_string());
//! server.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// The code generated from `proto/greeter.proto` (in `OUT_DIR`, never committed).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("greeter");
}

pub use proto::greeter_client::GreeterClient;
pub use proto::greeter_server::{Greeter, GreeterServer};
pub use proto::{HelloReply, HelloRequest};

/// Where greeter servers register: `/services/greeter/<addr>`, the address as the value.
///
/// ```
/// assert_eq!(examples::greeter::PREFIX, "/services/greeter/");
/// ```
pub const PREFIX: &str = "/services/greeter/";

/// The greeter service: answers `hello NAME`, with the address it serves on, so a caller sees
/// which instance answered.
///
/// ```
/// use examples::greeter::{Answer, Greeter, HelloRequest};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let answer = Answer::new("127.0.0.1:50051");
/// let reply = answer.say_hello(tonic::Request::new(HelloRequest { name: "sd".into() })).await;
/// assert_eq!(reply.unwrap().into_inner().server, "127.0.0.1:50051");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Answer {
    server: String,
}

impl Answer {
    /// A greeter that says it serves on `server`.
    ///
    /// ```
    /// let answer = examples::greeter::Answer::new("127.0.0.1:50051");
    /// # let _ = answer;
    /// ```
    pub fn new(server: impl Into<String>) -> Self {
        Answer {
            server: server.into(),
        }
    }
}

#[tonic::async_trait]
impl Greeter for Answer {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        Ok(Response::new(HelloReply {
            message: format!("hello {name}"),
            server: self.server.clone(),
        }))
    }
}

/// Serves [`Answer`] on `listener` (naming its local address) until `shutdown` completes,
/// then finishes the calls in flight.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
/// examples::greeter::serve(listener, tokio::signal::ctrl_c()).await?;
/// # Ok(())
/// # }
/// ```
pub async fn serve<F, T>(listener: TcpListener, shutdown: F) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = T>,
{
    let addr = listener
        .local_addr()
        .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
    tonic::transport::Server::builder()
        .add_service(GreeterServer::new(Answer::new(addr)))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            shutdown.await;
        })
        .await
}

/// A greeter server on `127.0.0.1` (a port the system chooses), run on the current tokio
/// runtime: for tests and benchmarks. Dropping it stops it at once.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let server = examples::greeter::LocalServer::start().await?;
/// assert!(server.addr().ip().is_loopback());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LocalServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl LocalServer {
    /// Binds `127.0.0.1:0` and serves there.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let server = examples::greeter::LocalServer::start().await?;
    /// assert_ne!(server.addr().port(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, rx));
        Ok(LocalServer {
            addr,
            shutdown: Some(tx),
            task,
        })
    }

    /// The address it serves on.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let server = examples::greeter::LocalServer::start().await?;
    /// println!("serving on {}", server.addr());
    /// # Ok(())
    /// # }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting calls, lets those in flight finish, and returns how serving ended.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = examples::greeter::LocalServer::start().await?;
    /// server.stop().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stop(mut self) -> Result<(), tonic::transport::Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match (&mut self.task).await {
            Ok(served) => served,
            // Only a panic of the server's task gets here: pass it on.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
