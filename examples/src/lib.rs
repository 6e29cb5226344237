//! What the example programs share: the etcd connection flags of go-kit's `etcdv3.ClientOptions`,
//! the checks every duration flag goes through, how an instance is printed, and the gRPC
//! [`greeter`].

/// The README's Rust examples, compiled and run as doc tests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

use std::net::SocketAddr;

pub mod greeter;

use std::path::PathBuf;
use std::time::Duration;

use sd_etcd::{ClientOptions, EtcdClient};

/// Prints a line to stdout like `println!`, but a stdout that cannot be written (its reader
/// went away: `foosvc ... | head -3`, or a pipe's reader stopped by the same Ctrl-C) is not a
/// panic: a program shutting down still deregisters.
///
/// ```
/// examples::say!("registered {}", "/services/foosvc/127.0.0.1:8080");
/// ```
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

/// The environment variable that gives the etcd password when `--password` is not given.
///
/// ```
/// assert_eq!(examples::PASSWORD_ENV, "ETCD_PASSWORD");
/// ```
pub const PASSWORD_ENV: &str = "ETCD_PASSWORD";

/// The longest duration any flag of the example programs takes: 365 days. Longer ones are
/// mistakes, and the longest ones (`--run-for 18446744073709551615s`) overflow the clock.
///
/// ```
/// assert_eq!(examples::MAX_FLAG_DURATION.as_secs(), 365 * 24 * 3600);
/// ```
pub const MAX_FLAG_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Checks the value of a duration flag: more than zero, at most [`MAX_FLAG_DURATION`]. The
/// error names the flag and the value and says what to give instead.
///
/// ```
/// use std::time::Duration;
/// use examples::check_duration;
///
/// assert!(check_duration("--call-every", Duration::from_secs(2)).is_ok());
/// let err = check_duration("--call-every", Duration::ZERO).unwrap_err();
/// assert_eq!(err, "--call-every 0s: give a duration above zero, e.g. 500ms, 3s or 1m");
/// assert!(check_duration("--run-for", Duration::MAX).unwrap_err().contains("at most 365 days"));
/// ```
pub fn check_duration(flag: &str, value: Duration) -> Result<(), String> {
    if value.is_zero() {
        return Err(format!(
            "{flag} 0s: give a duration above zero, e.g. 500ms, 3s or 1m"
        ));
    }
    if value > MAX_FLAG_DURATION {
        // In seconds: humantime would spell 10^11 s out in years, months and days.
        return Err(format!(
            "{flag} {}s: too long, give at most 365 days",
            value.as_secs()
        ));
    }
    Ok(())
}

/// etcd connection flags (`--etcd`, TLS files, user and password, timeouts).
///
/// ```
/// use clap::Parser;
///
/// #[derive(Parser)]
/// struct Args {
///     #[command(flatten)]
///     etcd: examples::EtcdArgs,
/// }
///
/// let args = Args::parse_from(["prog", "--etcd", "http://127.0.0.1:2379", "--dial-timeout", "1s"]);
/// let options = args.etcd.client_options(None).unwrap();
/// assert_eq!(options.connect_timeout(), std::time::Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated: http://HOST:PORT or https://HOST:PORT (IPv6 addresses
    /// in brackets, e.g. `http://[::1]:2379`).
    #[arg(
        long = "etcd",
        env = "ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) to verify etcd's server certificate; implies TLS.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM); it must belong to --cert-file.
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// etcd user name; needs a password, from --password or the ETCD_PASSWORD environment
    /// variable.
    #[arg(long, env = "ETCD_USER")]
    pub user: Option<String>,
    /// etcd password; needs --user. When it is not given, the ETCD_PASSWORD environment
    /// variable is used if a user is given, and ignored (with a note) if none is.
    #[arg(long, requires = "user")]
    pub password: Option<String>,
    /// How long to wait for an etcd endpoint to answer when connecting.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,
    /// HTTP/2 keep-alive: how long to wait for a ping's answer.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub keep_alive: Duration,
}

impl EtcdArgs {
    /// The client options these flags describe, after checking the durations and the
    /// credentials. `env_password` is the value of [`PASSWORD_ENV`] (see
    /// [`env_password`](Self::env_password)); `--password` takes precedence over it, and it is
    /// not used without a user.
    ///
    /// ```
    /// use clap::Parser;
    ///
    /// #[derive(Parser)]
    /// struct Args {
    ///     #[command(flatten)]
    ///     etcd: examples::EtcdArgs,
    /// }
    ///
    /// let args = Args::parse_from(["prog", "--user", "root"]);
    /// let options = args.etcd.client_options(Some("secret".into())).unwrap();
    /// assert_eq!(options.user(), Some("root"));
    /// // A user without any password is refused.
    /// assert!(args.etcd.client_options(None).is_err());
    /// // A password from the environment without a user is left out.
    /// let args = Args::parse_from(["prog"]);
    /// assert_eq!(args.etcd.client_options(Some("secret".into())).unwrap().user(), None);
    /// ```
    pub fn client_options(
        &self,
        env_password: Option<String>,
    ) -> Result<ClientOptions, sd_etcd::Error> {
        let invalid = sd_etcd::Error::InvalidOptions;
        check_duration("--dial-timeout", self.dial_timeout).map_err(invalid)?;
        check_duration("--keep-alive", self.keep_alive).map_err(invalid)?;
        let mut opts = ClientOptions::new()
            .with_connect_timeout(self.dial_timeout)
            .with_keep_alive_timeout(self.keep_alive);
        if let Some(ca) = &self.ca_file {
            opts = opts.with_ca_file(ca);
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            opts = opts.with_client_cert_files(cert, key);
        }
        match (&self.user, self.password.clone().or(env_password)) {
            (Some(user), Some(password)) => opts = opts.with_user(user, password),
            (Some(user), None) => {
                return Err(invalid(format!(
                    "the etcd user {user:?} (from --user or ETCD_USER) has no password: give \
                     --password or set {PASSWORD_ENV}"
                )));
            }
            (None, _) if self.password.is_some() => {
                return Err(invalid(
                    "--password was given without --user: give the user name too".into(),
                ));
            }
            (None, _) => {}
        }
        Ok(opts)
    }

    /// What the user should be told about the flags, given the value of [`PASSWORD_ENV`]: a
    /// password in the environment without a user is ignored.
    ///
    /// ```
    /// use clap::Parser;
    ///
    /// #[derive(Parser)]
    /// struct Args {
    ///     #[command(flatten)]
    ///     etcd: examples::EtcdArgs,
    /// }
    ///
    /// let args = Args::parse_from(["prog"]);
    /// assert_eq!(
    ///     args.etcd.notes(Some("secret")),
    ///     ["ETCD_PASSWORD is set but no --user was given: ignoring it"]
    /// );
    /// assert!(args.etcd.notes(None).is_empty());
    /// ```
    pub fn notes(&self, env_password: Option<&str>) -> Vec<String> {
        let mut notes = Vec::new();
        if env_password.is_some() && self.user.is_none() {
            notes.push(format!(
                "{PASSWORD_ENV} is set but no --user was given: ignoring it"
            ));
        }
        notes
    }

    /// The value of [`PASSWORD_ENV`]: `None` when it is unset or empty. A value that is not
    /// UTF-8 is an error naming the variable.
    ///
    /// ```
    /// // Whatever the environment holds, it is read without panicking.
    /// let _ = examples::EtcdArgs::env_password();
    /// ```
    pub fn env_password() -> Result<Option<String>, sd_etcd::Error> {
        match std::env::var(PASSWORD_ENV) {
            Ok(p) if p.is_empty() => Ok(None),
            Ok(p) => Ok(Some(p)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(sd_etcd::Error::InvalidOptions(format!(
                "{PASSWORD_ENV} is not UTF-8 text: unset it or give --password"
            ))),
        }
    }

    /// Checks the flags, prints the [`notes`](Self::notes) to stderr (each prefixed with
    /// `program`), then connects to etcd: fails before any network traffic on a malformed
    /// endpoint or TLS file, and within the dial timeout, naming the endpoints, if none answers.
    ///
    /// ```no_run
    /// use clap::Parser;
    ///
    /// #[derive(Parser)]
    /// struct Args {
    ///     #[command(flatten)]
    ///     etcd: examples::EtcdArgs,
    /// }
    ///
    /// # async fn run() -> Result<(), sd_etcd::Error> {
    /// let args = Args::parse();
    /// let client = args.etcd.connect("prog").await?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub async fn connect(&self, program: &str) -> Result<EtcdClient, sd_etcd::Error> {
        let env_password = Self::env_password()?;
        for note in self.notes(env_password.as_deref()) {
            eprintln!("{program}: {note}");
        }
        let options = self.client_options(env_password)?;
        EtcdClient::connect(self.endpoints.iter().map(String::as_str), options).await
    }
}

/// An instance as the programs print it: its address, then what its metadata says, if it says
/// anything (see [`sd_core::Metadata::summary`]).
///
/// ```
/// use sd_core::{Instance, Metadata, ValueFormat};
///
/// assert_eq!(examples::describe(&Instance::new("127.0.0.1:9000")), "127.0.0.1:9000");
/// let meta = Metadata::new().with_weight(3).unwrap().with_zone("z1");
/// let i = Instance::with_metadata("127.0.0.1:9001", meta, ValueFormat::Json).unwrap();
/// assert_eq!(examples::describe(&i), "127.0.0.1:9001 weight=3 zone=z1");
/// ```
pub fn describe(i: &sd_core::Instance) -> String {
    match i.metadata().summary() {
        s if s.is_empty() => i.addr().to_string(),
        s => format!("{} {s}", i.addr()),
    }
}

/// Serves the metrics the program records (sd's included: the examples build `sd-core`, `sd-etcd`
/// and `sd-lb` with their feature `metrics`) as Prometheus text at `http://ADDR/metrics`, from
/// a task on the current tokio runtime. Call it before making instancers, registrars and
/// balancers: they register their metrics with the recorder installed when they are made.
///
/// Fails, naming the address and why, when it cannot listen there (in use, not an address of
/// this host) or when a recorder is installed already.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() {
/// examples::serve_metrics("127.0.0.1:9100".parse().unwrap()).unwrap();
/// // curl http://127.0.0.1:9100/metrics
/// # }
/// ```
pub fn serve_metrics(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("--metrics-addr {addr}: cannot serve metrics there: {e}"))
}

/// Logs to stderr, at the level `RUST_LOG` asks for (default: `default`).
///
/// ```no_run
/// examples::init_logging("warn");
/// tracing::warn!("shown");
/// ```
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .init();
}

/// What the programs print for a failed attempt of a retried call: its error and every cause.
///
/// ```
/// use sd_core::Error;
/// use sd_lb::AttemptError;
///
/// let e = AttemptError::<String>::Balancer(Error::NoEndpoints { last_error: None });
/// assert_eq!(
///     examples::attempt_failure(&e),
///     "no endpoint to call: no endpoints available: no instance is registered under the watched prefix"
/// );
/// assert_eq!(examples::attempt_failure(&AttemptError::Call(String::from("refused"))), "refused");
/// ```
pub fn attempt_failure<Er: std::fmt::Display>(e: &sd_lb::AttemptError<Er>) -> String {
    match e.balancer_error() {
        Some(b) => format!("{e}: {}", sd_core::Report(b)),
        None => e.to_string(),
    }
}

/// What the programs print for a failed retried call: why retrying stopped, and the last
/// attempt's error with its causes.
///
/// ```
/// # use std::time::Duration;
/// use sd_core::FixedEndpointer;
/// use sd_lb::{Retry, RoundRobin};
///
/// # futures::executor::block_on(async {
/// let retry = Retry::new(RoundRobin::new(FixedEndpointer::new(vec![1])), 2, Duration::from_secs(1)).unwrap();
/// let err = retry.call(|_| async { Err::<(), _>(String::from("refused")) }).await.unwrap_err();
/// assert_eq!(examples::retry_failure(&err), "all 2 attempts failed; last error: refused");
/// # });
/// ```
pub fn retry_failure<Er: std::fmt::Display>(e: &sd_lb::RetryError<Er>) -> String {
    match e.last() {
        Some(last) => format!("{e}; last error: {}", attempt_failure(last)),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    fn parse(args: &[&str]) -> Result<EtcdArgs, clap::Error> {
        Args::try_parse_from(std::iter::once("prog").chain(args.iter().copied())).map(|a| a.etcd)
    }

    #[test]
    fn zero_and_huge_timeouts_are_refused_naming_the_flag() {
        for (args, says) in [
            (&["--dial-timeout", "0s"][..], "--dial-timeout 0s"),
            (&["--keep-alive", "0s"][..], "--keep-alive 0s"),
            (
                &["--dial-timeout", "18446744073709551615s"][..],
                "--dial-timeout",
            ),
            (&["--keep-alive", "400days"][..], "at most 365 days"),
        ] {
            let err = parse(args).unwrap().client_options(None).unwrap_err();
            assert!(matches!(err, sd_etcd::Error::InvalidOptions(_)), "{err:?}");
            assert!(err.to_string().contains(says), "{args:?}: {err}");
        }
    }

    #[test]
    fn a_password_from_the_environment_needs_a_user() {
        let no_user = parse(&[]).unwrap();
        let opts = no_user.client_options(Some("secret".into())).unwrap();
        assert_eq!(opts.user(), None, "ignored");
        assert_eq!(no_user.notes(Some("secret")).len(), 1);

        let with_user = parse(&["--user", "root"]).unwrap();
        let opts = with_user.client_options(Some("secret".into())).unwrap();
        assert_eq!(opts.user(), Some("root"));
        assert!(with_user.notes(Some("secret")).is_empty());

        let err = with_user.client_options(None).unwrap_err().to_string();
        assert!(err.contains("\"root\""), "{err}");
        assert!(err.contains("--password"), "{err}");
        assert!(err.contains(PASSWORD_ENV), "{err}");
    }

    #[test]
    fn the_command_line_password_wins_and_needs_a_user() {
        let args = parse(&["--user", "root", "--password", "cli"]).unwrap();
        assert_eq!(
            args.client_options(Some("env".into())).unwrap().user(),
            Some("root")
        );
        let err = parse(&["--password", "cli"]).unwrap_err();
        assert_eq!(
            err.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{err}"
        );
        assert!(err.to_string().contains("--user"), "{err}");
    }
}
