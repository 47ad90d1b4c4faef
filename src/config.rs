//! The daemon's configuration file (TOML).
//!
//! Every section and key is optional (but `subjects` and `max_pending` in each
//! `[[limits.quotas]]` entry); unknown keys are an error, so a typo
//! cannot silently fall back to a default. `config/natsched.toml` is the documented example.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Default NATS server URL.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Default connection name shown in the server's monitoring.
pub const DEFAULT_CONNECTION_NAME: &str = "natsched";
/// Default API subject prefix: requests go to `sched.add.<target>`.
pub const DEFAULT_PREFIX: &str = "sched";
/// Default largest accepted payload: 1 MiB, nats-server's own default `max_payload`.
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// Default store directory.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/natsched";
/// Default sled page cache: 64 MiB.
pub const DEFAULT_CACHE_CAPACITY: u64 = 64 * 1024 * 1024;
/// Default most requests made durable by one fsync.
pub const DEFAULT_MAX_BATCH: usize = 4096;
/// Default time ahead that schedules are loaded from disk into the in-memory wheel.
pub const DEFAULT_LOOKAHEAD: Duration = Duration::from_secs(10);
/// Default most schedules held in memory (wheel plus in-flight publishes). 50 000 drains a
/// backlog as fast as 200 000 did, and at 100 000 fires/s gives a tighter tail (p99.9 7 ms
/// instead of 26-46 ms, measured; the timer thread's id map and wheel stay smaller) with
/// less memory.
pub const DEFAULT_MAX_RESIDENT: usize = 50_000;
/// Default largest header block a schedule may deliver (its own headers, `Name: value\r\n`
/// each): 64 KiB.
pub const DEFAULT_MAX_HEADERS_BYTES: usize = 64 * 1024;
/// Default farthest ahead a schedule may be due: 10 years (of 365.25 days).
pub const DEFAULT_MAX_HORIZON: Duration = Duration::from_secs(10 * 31_557_600);
/// Default most schedules pending at once: 20 million, a few GiB of store at typical sizes.
pub const DEFAULT_MAX_PENDING: u64 = 20_000_000;
/// Default target subjects natsched may publish to (before the deny rules): all.
pub const DEFAULT_ALLOW_SUBJECTS: &str = ">";
/// Longest wait between two attempts to deliver a schedule NATS did not take.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The stream natsched creates for `[intake] mode = "jetstream"`.
pub const DEFAULT_INTAKE_STREAM: &str = "SCHED_INTAKE";
/// Replicas of that stream when natsched creates it (1; set 3 on a cluster).
pub const DEFAULT_INTAKE_REPLICAS: usize = 1;
/// How long that stream remembers a `Nats-Msg-Id` to drop a client's re-sent request.
pub const DEFAULT_INTAKE_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Default shortest `Sched-Every` accepted.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// How long the lease of the instance serving a prefix lasts (see `crate::cluster`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// How many bytes beyond twice the live data the replicated log may hold before it is
/// compacted.
pub const DEFAULT_LOG_SLACK: u64 = 8 * 1024 * 1024;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Default address of the Prometheus `/metrics` page, once `[metrics]` is given.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Default log filter: lifecycle events, warnings and errors; nothing per message.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How log lines are written to stderr.
    #[serde(default)]
    pub log_format: LogFormat,
    /// What is logged: a level (`error`, `warn`, `info`, `debug`, `trace`) or `tracing`
    /// filter directives (`info,natsched::cluster=debug`); absent: [`DEFAULT_LOG_LEVEL`].
    /// `RUST_LOG` in the environment overrides it. SIGHUP reloads it.
    pub log_level: Option<String>,
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub wheel: WheelConfig,
    #[serde(default)]
    pub security: SecurityConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub intake: IntakeConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub recurring: RecurringConfig,
    /// `[metrics]`: the Prometheus page; off when the section is absent.
    pub metrics: Option<MetricsConfig>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (`message` and the
    /// event's own fields).
    Json,
}

/// `[metrics]`: Prometheus text format at `http://<listen>/metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address and port to listen on. The page shows no secret, but it is not meant for the
    /// open internet: the default listens on the loopback interface only.
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_METRICS_LISTEN.parse().expect("a socket address"),
        }
    }
}

/// `[recurring]`: recurring schedules (`Sched-Cron`, `Sched-Every`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecurringConfig {
    /// Shortest `Sched-Every` accepted, and shortest gap among the first occurrences of a
    /// `Sched-Cron` rule, e.g. `"1s"`: a series fires for as long as it is
    /// not cancelled, so a tiny interval is a load someone must have meant.
    #[serde(deserialize_with = "duration")]
    pub min_interval: Duration,
}

impl Default for RecurringConfig {
    fn default() -> Self {
        RecurringConfig {
            min_interval: DEFAULT_MIN_INTERVAL,
        }
    }
}

/// `[nats]`: the server natsched connects to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL (or comma-separated list of URLs).
    pub url: String,
    /// Connection name reported to the server.
    pub name: String,
    /// User name, for a server with `authorization { users = [...] }`; with `password`.
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<Secret>,
    /// Token, for a server with `authorization { token = ... }`.
    pub token: Option<Secret>,
    /// A NATS credentials file (JWT and nkey seed), for servers run with accounts.
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`), for a server with nkey users.
    pub nkey_seed_file: Option<PathBuf>,
    /// `[nats.tls]`: TLS to the server.
    pub tls: Option<TlsConfig>,
}

/// `[nats.tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// CA certificates (PEM) to trust for the server's certificate, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for a server that verifies clients; with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Connect with TLS only (otherwise TLS is used when the server asks for it).
    pub required: bool,
}

impl NatsConfig {
    /// Which way of authenticating `[nats]` gives, if any (for error messages).
    pub fn auth_kind(&self) -> Option<&'static str> {
        self.auth_kinds().next()
    }

    /// The ways of authenticating `[nats]` gives (validation allows one at most).
    fn auth_kinds(&self) -> impl Iterator<Item = &'static str> {
        [
            (
                self.user.is_some() || self.password.is_some(),
                "user/password",
            ),
            (self.token.is_some(), "token"),
            (self.creds_file.is_some(), "creds_file"),
            (self.nkey_seed_file.is_some(), "nkey_seed_file"),
        ]
        .into_iter()
        .filter_map(|(given, kind)| given.then_some(kind))
    }

    /// `url` with any credentials in it (`nats://user:pass@host`) masked: what logs and
    /// errors show.
    pub fn shown_url(&self) -> String {
        crate::connect::mask_credentials(&self.url)
    }
}

/// A secret from the config: its `Debug` output says only whether it is set, so it cannot
/// leak into logs or error messages.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself: pass it on, never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(****)")
    }
}

/// `[api]`: the request subjects natsched answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Subject prefix P of `P.add.<target>`.
    pub prefix: String,
    /// Largest payload accepted in a schedule request, in bytes; larger ones get a 413 reply.
    pub max_payload: usize,
}

/// `[store]`: the durable sled database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Directory of the database (created if missing).
    pub path: PathBuf,
    /// Bytes of sled page cache; bounds most of the daemon's memory.
    pub cache_capacity: u64,
    /// Most requests that one fsync makes durable (group commit).
    pub max_batch: usize,
}

/// `[wheel]`: the in-memory timing wheel fed from the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WheelConfig {
    /// How far ahead schedules are loaded from disk into memory, e.g. `"10s"`.
    #[serde(deserialize_with = "duration")]
    pub lookahead: Duration,
    /// Most schedules held in memory at once; beyond it the rest waits on disk. Each costs
    /// about 1 KiB with its index entries (plus its payload beyond 64 bytes), so this bounds
    /// the memory used while a backlog drains.
    pub max_resident: usize,
}

/// `[security]`: which target subjects natsched may publish to (see [`crate::policy`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// NATS subject patterns a target must match one of.
    pub allow_subjects: Vec<String>,
    /// Patterns refused, in addition to the built-in ones (`$SYS.>`, `$JS.>`, `$KV.>`,
    /// `$O.>`, `$SRV.>`, `_INBOX.>` and `<prefix>.>`). Deny wins, except against an allow
    /// pattern strictly more specific than the deny pattern.
    pub deny_subjects: Vec<String>,
}

/// `[limits]`: bounds on what one request and all of them together may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest header block a schedule may deliver, in bytes; larger gets 431.
    pub max_headers_bytes: usize,
    /// Farthest ahead a schedule may be due, e.g. `"10years"`; later gets 422.
    #[serde(deserialize_with = "duration")]
    pub max_horizon: Duration,
    /// Most schedules pending at once; beyond, new ones get 503 (cancels and fires go on).
    pub max_pending: u64,
    /// Per-subject limits on pending schedules; beyond, new ones get 429.
    pub quotas: Vec<QuotaConfig>,
}

/// `[delivery]`: how due schedules are published.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Targets delivered through JetStream (publish, wait for the stream's PubAck, dedupe by
    /// `Nats-Msg-Id`) unless a request says otherwise with `Sched-Deliver`.
    pub jetstream_subjects: Vec<String>,
    /// Longest wait between attempts to deliver a schedule NATS did not take, e.g. `"30s"`;
    /// the wait starts at 100 ms and doubles.
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
}

/// `[intake]`: where schedule requests come in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    /// `core` (request/reply) or `jetstream` (requests wait in a work-queue stream).
    pub mode: IntakeMode,
    /// The stream capturing `<prefix>.add.>` in jetstream mode (created if absent).
    pub stream: String,
    /// Its replicas.
    pub replicas: usize,
    /// Its duplicate window, e.g. `"2m"`: a request re-sent with the same `Nats-Msg-Id`
    /// within it is stored once.
    #[serde(deserialize_with = "duration")]
    pub duplicate_window: Duration,
}

/// How requests reach natsched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntakeMode {
    /// Core NATS request/reply: natsched answers each request once it is durable.
    #[default]
    Core,
    /// A JetStream work-queue stream: the server acknowledges the publish, natsched consumes
    /// it and acknowledges the message once the schedule is durable.
    Jetstream,
}

/// `[cluster]`: how instances serving one prefix share it (see `crate::cluster`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `standalone` (one instance serves, with its own store; others wait) or `replicated`
    /// (the leader's store is replicated to followers through a JetStream stream).
    pub mode: ClusterMode,
    /// How long the serving instance's lease lasts, e.g. `"5s"`; it is renewed every third
    /// of that, and an instance that died is replaced after at most this long.
    #[serde(deserialize_with = "duration")]
    pub lease: Duration,
    /// The JetStream KV bucket holding the lease; empty: `natsched_<prefix>` (every character
    /// of the prefix that a bucket name cannot hold becomes `_`).
    pub bucket: String,
    /// The JetStream stream holding the replicated log; empty: `natsched_log_<prefix>`.
    pub log_stream: String,
    /// The replicated log is compacted once it holds more than twice the live data plus this
    /// many bytes.
    pub log_slack: u64,
    /// Replicated mode: also fsync the local store before acknowledging a round. The log's
    /// PubAck already makes it durable on the log's replicas, so this is off by default.
    pub fsync: bool,
    /// Replicas of the lease bucket and the log; absent: 3 on a NATS cluster, 1 on a single
    /// server.
    pub replicas: Option<usize>,
}

/// How instances serving one prefix share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterMode {
    /// One instance serves at a time, from its own store; others wait for its lease.
    #[default]
    Standalone,
    /// The lease holder leads and logs every change to a JetStream stream; the others follow
    /// it into their own stores and take over when it goes.
    Replicated,
}

/// One `[[limits.quotas]]` entry: schedules whose target matches `subjects` may be at most
/// `max_pending` at once. A schedule counts against every quota it matches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    pub subjects: String,
    pub max_pending: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: DEFAULT_NATS_URL.to_owned(),
            name: DEFAULT_CONNECTION_NAME.to_owned(),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            nkey_seed_file: None,
            tls: None,
        }
    }
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            allow_subjects: vec![DEFAULT_ALLOW_SUBJECTS.to_owned()],
            deny_subjects: Vec::new(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_headers_bytes: DEFAULT_MAX_HEADERS_BYTES,
            max_horizon: DEFAULT_MAX_HORIZON,
            max_pending: DEFAULT_MAX_PENDING,
            quotas: Vec::new(),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            jetstream_subjects: Vec::new(),
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            mode: IntakeMode::Core,
            stream: DEFAULT_INTAKE_STREAM.to_owned(),
            replicas: DEFAULT_INTAKE_REPLICAS,
            duplicate_window: DEFAULT_INTAKE_DUPLICATE_WINDOW,
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            mode: ClusterMode::Standalone,
            lease: DEFAULT_LEASE,
            bucket: String::new(),
            log_stream: String::new(),
            log_slack: DEFAULT_LOG_SLACK,
            fsync: false,
            replicas: None,
        }
    }
}

impl ClusterConfig {
    /// The lease bucket's name for `prefix`.
    pub fn bucket(&self, prefix: &str) -> String {
        match self.bucket.is_empty() {
            true => format!("natsched_{}", name_part(prefix)),
            false => self.bucket.clone(),
        }
    }
}

impl ClusterConfig {
    /// The log stream's name for `prefix`.
    pub fn log_stream(&self, prefix: &str) -> String {
        match self.log_stream.is_empty() {
            true => format!("natsched_log_{}", name_part(prefix)),
            false => self.log_stream.clone(),
        }
    }

    /// The log's subject for `prefix`: outside `<prefix>.>`, so that a client allowed to use
    /// the API cannot write into the log.
    pub fn log_subject(&self, prefix: &str) -> String {
        format!("$NATSCHED.{prefix}.log")
    }
}

/// `text` with every character a JetStream bucket or stream name cannot hold as `_`.
fn name_part(text: &str) -> String {
    text.chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                true => c,
                false => '_',
            },
        )
        .collect()
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            prefix: DEFAULT_PREFIX.to_owned(),
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from(DEFAULT_STORE_PATH),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

impl Default for WheelConfig {
    fn default() -> Self {
        WheelConfig {
            lookahead: DEFAULT_LOOKAHEAD,
            max_resident: DEFAULT_MAX_RESIDENT,
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(serde::de::Error::custom)
}

/// `log_level`: filter directives, each a level or `target=level` (`tracing`'s syntax).
/// A bare word that is not a level would be read as a target logged at every level, and
/// silence everything else: `"warning"` would log nothing at all.
fn check_log_level(text: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in text.split(',') {
        let directive = directive.trim();
        if directive.is_empty() {
            return Err(format!("{text:?}: an empty directive"));
        }
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level ({}) nor a target=level directive",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| ())
        .map_err(|err| format!("{text:?}: {err}"))
}

impl Config {
    /// The log filter directives in effect (before `RUST_LOG`).
    pub fn log_level(&self) -> &str {
        self.log_level.as_deref().unwrap_or(DEFAULT_LOG_LEVEL)
    }

    /// Reads, parses and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|err| match err {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.nats.url.trim().is_empty() {
            return invalid("nats.url", "must not be empty");
        }
        let prefix = &self.api.prefix;
        let token_ok = |t: &str| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && !t.chars().any(|c| c.is_whitespace() || c == '*' || c == '>')
        };
        let pattern_ok = crate::policy::Pattern::parse(&format!("{prefix}.>")).is_ok();
        if !prefix.split('.').all(token_ok) || !pattern_ok {
            return invalid(
                "api.prefix",
                "must be a subject without wildcards, spaces or empty tokens, e.g. \"sched\"",
            );
        }
        if self.api.max_payload == 0 {
            return invalid("api.max_payload", "must be at least 1 byte");
        }
        if self.store.path.as_os_str().is_empty() {
            return invalid("store.path", "must not be empty");
        }
        if self.store.max_batch == 0 {
            return invalid("store.max_batch", "must be at least 1");
        }
        if self.wheel.lookahead < Duration::from_millis(100) {
            return invalid("wheel.lookahead", "must be at least 100ms");
        }
        if self.recurring.min_interval < Duration::from_millis(1) {
            return invalid("recurring.min_interval", "must be at least 1ms");
        }
        if let Some(level) = &self.log_level
            && let Err(reason) = check_log_level(level)
        {
            return Err(ConfigError::Invalid {
                key: "log_level",
                reason,
            });
        }
        if self.wheel.max_resident < 1000 {
            return invalid("wheel.max_resident", "must be at least 1000");
        }
        let nats = &self.nats;
        if nats.user.is_some() != nats.password.is_some() {
            return invalid(
                "nats.user",
                "give both nats.user and nats.password, or neither",
            );
        }
        if nats.auth_kinds().count() > 1 {
            return invalid(
                "nats",
                "give one way to authenticate: user/password, token, creds_file or nkey_seed_file",
            );
        }
        if let Some(tls) = &nats.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            return invalid("nats.tls", "give both cert_file and key_file, or neither");
        }
        self.validate_policy()
    }

    fn validate_policy(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        let security = &self.security;
        if security.allow_subjects.is_empty() {
            return invalid(
                "security.allow_subjects",
                "must not be empty: natsched could deliver nothing".to_owned(),
            );
        }
        for (key, texts) in [
            ("security.allow_subjects", &security.allow_subjects),
            ("security.deny_subjects", &security.deny_subjects),
        ] {
            for text in texts {
                if let Err(reason) = crate::policy::Pattern::parse(text) {
                    return invalid(key, reason);
                }
            }
        }
        let limits = &self.limits;
        if limits.max_headers_bytes == 0 {
            return invalid("limits.max_headers_bytes", "must be at least 1".to_owned());
        }
        if limits.max_horizon < Duration::from_secs(1) {
            return invalid("limits.max_horizon", "must be at least 1s".to_owned());
        }
        if limits.max_pending == 0 {
            return invalid("limits.max_pending", "must be at least 1".to_owned());
        }
        if limits.quotas.len() > crate::policy::MAX_QUOTAS {
            let reason = format!("at most {} quotas", crate::policy::MAX_QUOTAS);
            return invalid("limits.quotas", reason);
        }
        for text in &self.delivery.jetstream_subjects {
            if let Err(reason) = crate::policy::Pattern::parse(text) {
                return invalid("delivery.jetstream_subjects", reason);
            }
        }
        if self.delivery.max_backoff < crate::retries::FIRST_BACKOFF {
            return invalid("delivery.max_backoff", "must be at least 100ms".to_owned());
        }
        let intake = &self.intake;
        let name_ok = |c: char| !c.is_whitespace() && !c.is_control() && !".*>/\\".contains(c);
        if intake.stream.is_empty()
            || intake.stream.len() > 255
            || !intake.stream.chars().all(name_ok)
        {
            return invalid(
                "intake.stream",
                "must be a JetStream stream name: 1-255 bytes, none of . * > / \\ or spaces"
                    .to_owned(),
            );
        }
        if !(1..=5).contains(&intake.replicas) {
            return invalid("intake.replicas", "must be 1 to 5".to_owned());
        }
        let cluster = &self.cluster;
        if cluster.lease < Duration::from_secs(1) {
            return invalid("cluster.lease", "must be at least 1s".to_owned());
        }
        let kv_ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if cluster.bucket.len() > 255 || !cluster.bucket.chars().all(kv_ok) {
            return invalid(
                "cluster.bucket",
                "must be a KV bucket name: letters, digits, - and _".to_owned(),
            );
        }
        if cluster.log_stream.len() > 255 || !cluster.log_stream.chars().all(name_ok) {
            return invalid(
                "cluster.log_stream",
                "must be a JetStream stream name: at most 255 bytes, none of . * > / \\ or spaces"
                    .to_owned(),
            );
        }
        if cluster.replicas.is_some_and(|r| !(1..=5).contains(&r)) {
            return invalid("cluster.replicas", "must be 1 to 5".to_owned());
        }
        if intake.duplicate_window < Duration::from_secs(1) {
            return invalid("intake.duplicate_window", "must be at least 1s".to_owned());
        }
        let mut seen = std::collections::HashSet::new();
        for quota in &limits.quotas {
            if let Err(reason) = crate::policy::Pattern::parse(&quota.subjects) {
                return invalid("limits.quotas", reason);
            }
            if !seen.insert(quota.subjects.as_str()) {
                let reason = format!("{:?} is given more than once", quota.subjects);
                return invalid("limits.quotas", reason);
            }
            if quota.max_pending == 0 {
                let reason = format!("max_pending of {:?} must be at least 1", quota.subjects);
                return invalid("limits.quotas", reason);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_schema_from_the_issue() {
        let config = Config::from_toml(
            r#"
            [nats]
            url = "nats://127.0.0.1:4222"
            [api]
            prefix = "sched"
            [store]
            path = "/var/lib/natsched"
            "#,
        )
        .unwrap();
        assert_eq!(config.api.prefix, "sched");
        assert_eq!(config.store.path, Path::new("/var/lib/natsched"));
        assert_eq!(config.wheel.lookahead, DEFAULT_LOOKAHEAD);
    }

    /// The `.toml` files of `dir` (relative to the crate), at least one.
    fn fixtures(dir: &str) -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "no config files found in {}",
            dir.display()
        );
        files
    }

    #[test]
    fn every_example_and_valid_fixture_parses() {
        for dir in ["config", "tests/config/valid"] {
            for path in fixtures(dir) {
                Config::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
        }
    }

    /// Each file of `tests/config/invalid` starts with `# refused, naming: <key>`.
    #[test]
    fn every_invalid_fixture_is_refused_naming_its_key() {
        for path in fixtures("tests/config/invalid") {
            let text = std::fs::read_to_string(&path).unwrap();
            let key = text
                .lines()
                .next()
                .and_then(|line| line.strip_prefix("# refused, naming: "))
                .unwrap_or_else(|| panic!("{}: no '# refused, naming:' line", path.display()));
            let err = Config::from_file(&path).expect_err(&path.display().to_string());
            assert!(err.to_string().contains(key), "{}: {err}", path.display());
            if let ConfigError::Invalid { key: named, .. } = &err {
                assert_eq!(*named, key, "{}", path.display());
            }
        }
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let config =
            Config::from_toml("[nats]\nuser = \"natsched\"\npassword = \"hunter2-secret\"\n")
                .unwrap();
        assert_eq!(
            config.nats.password.as_ref().unwrap().expose(),
            "hunter2-secret"
        );
        let debug = format!("{config:?} {:#?}", config.nats);
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("Secret(****)"), "{debug}");
    }

    #[test]
    fn policy_defaults_apply_when_the_sections_are_absent() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.security.allow_subjects, [">"]);
        assert!(config.security.deny_subjects.is_empty());
        assert_eq!(config.limits.max_horizon, DEFAULT_MAX_HORIZON);
        assert_eq!(config.limits.max_pending, DEFAULT_MAX_PENDING);
        assert_eq!(config.limits.max_headers_bytes, DEFAULT_MAX_HEADERS_BYTES);
        let config = Config::from_toml(
            "[limits]\nmax_horizon = \"30days\"\n[[limits.quotas]]\n\
             subjects = \"orders.>\"\nmax_pending = 5\n",
        )
        .unwrap();
        assert_eq!(config.limits.max_horizon, Duration::from_secs(30 * 86_400));
        assert_eq!(config.limits.quotas[0].subjects, "orders.>");
        assert_eq!(config.limits.max_pending, DEFAULT_MAX_PENDING);
    }
}
