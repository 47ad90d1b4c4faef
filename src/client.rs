//! The operator's command-line client: `natsched schedule | cancel | get | list | stats`, modelled on the `nats`
//! CLI. It speaks the same public protocol as any service would.

use std::time::Duration;

use async_nats::header::HeaderValue;
use async_nats::{Client, HeaderMap};
use bytes::Bytes;

use crate::protocol;

/// How long to wait for natsched to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where natsched is reached, shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// NATS server URL.
    #[arg(long, short, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub server: String,
    /// natsched's API subject prefix.
    #[arg(long, default_value = "sched")]
    pub prefix: String,
    /// Print the daemon's JSON reply instead of a human-readable summary.
    #[arg(long)]
    pub json: bool,
}

/// `natsched schedule`.
#[derive(Debug, Clone, clap::Args)]
#[command(group = clap::ArgGroup::new("when").required(true).multiple(true).args(["at", "delay", "cron", "every"]))]
pub struct ScheduleArgs {
    /// Subject to deliver to.
    pub subject: String,
    /// Payload to deliver (empty if omitted).
    pub payload: Option<String>,
    /// Due instant, RFC 3339 (e.g. 2026-11-24T18:00:00Z); with --cron or --every, when the
    /// series starts.
    #[arg(long)]
    pub at: Option<String>,
    /// Due after this long: 15m, 1h30m, 250ms, or milliseconds.
    #[arg(long = "in", value_name = "DURATION")]
    pub delay: Option<String>,
    /// Recur on a crontab expression: 5 fields, 6 with seconds first, or @hourly, @daily,
    /// @weekly, @monthly, @yearly.
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,
    /// Recur every DURATION (e.g. 30s, 15m), the first one DURATION from now (or at --at).
    #[arg(long, value_name = "DURATION")]
    pub every: Option<String>,
    /// The IANA time zone of --cron (default UTC), e.g. Europe/Berlin.
    #[arg(long, value_name = "ZONE", requires = "cron")]
    pub tz: Option<String>,
    /// End the series after this instant, RFC 3339.
    #[arg(long, value_name = "INSTANT")]
    pub until: Option<String>,
    /// End the series after this many occurrences.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// The schedule's id (re-scheduling an id replaces it).
    #[arg(long)]
    pub id: Option<String>,
    /// A header to deliver, as 'Name: value' (repeatable).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] crate::connect::ToolConnectError),
    #[error("no answer from natsched on {subject}: {source}")]
    Request {
        subject: String,
        source: async_nats::RequestError,
    },
    #[error("no answer from natsched on {subject} within {REQUEST_TIMEOUT:?}")]
    Timeout { subject: String },
    #[error("natsched refused: {code} {description}")]
    Refused { code: u16, description: String },
    #[error("invalid header {0:?}: use 'Name: value'")]
    Header(String),
}

/// Sends one request and returns the reply body, turning error replies into [`ClientError`].
async fn call(
    connection: &Connection,
    subject: String,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Bytes, ClientError> {
    let client: Client = crate::connect::for_tool(&connection.server).await?;
    let request = client.request_with_headers(subject.clone(), headers, body);
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(source)) => return Err(ClientError::Request { subject, source }),
        Err(_) => return Err(ClientError::Timeout { subject }),
    };
    if let Some((code, description)) = protocol::reply_error(&reply) {
        return Err(ClientError::Refused {
            code: code.parse().unwrap_or(0),
            description,
        });
    }
    Ok(reply.payload)
}

fn field(body: &[u8], name: &str) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get(name)?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `natsched schedule`: prints the id and due instant.
pub async fn schedule(connection: &Connection, args: &ScheduleArgs) -> Result<String, ClientError> {
    let mut headers = HeaderMap::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| ClientError::Header(header.clone()))?;
        let name = name.trim();
        // What NATS allows in a header name: printable ASCII without ':' (async-nats panics
        // on anything else).
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(ClientError::Header(header.clone()));
        }
        let value: HeaderValue = value
            .trim()
            .parse()
            .map_err(|_| ClientError::Header(header.clone()))?;
        headers.append(name, value);
    }
    let count = args.count.map(|n| n.to_string());
    for (name, value) in [
        (protocol::AT, &args.at),
        (protocol::DELAY, &args.delay),
        (protocol::ID, &args.id),
        (protocol::CRON, &args.cron),
        (protocol::EVERY, &args.every),
        (protocol::TZ, &args.tz),
        (protocol::UNTIL, &args.until),
        (protocol::COUNT, &count),
    ] {
        if let Some(value) = value {
            // Checked: async-nats asserts on a value with CR or LF.
            let value: HeaderValue = value
                .parse()
                .map_err(|_| ClientError::Header(format!("{name}: {value}")))?;
            headers.insert(name, value);
        }
    }
    let subject = format!("{}.add.{}", connection.prefix, args.subject);
    let payload = Bytes::from(args.payload.clone().unwrap_or_default());
    let body = call(connection, subject, headers, payload).await?;
    Ok(if connection.json {
        String::from_utf8_lossy(&body).into_owned()
    } else {
        format!(
            "scheduled {} for {} on {}",
            field(&body, "id"),
            field(&body, "due"),
            args.subject
        )
    })
}

/// `natsched cancel`.
pub async fn cancel(connection: &Connection, id: &str) -> Result<String, ClientError> {
    let subject = format!("{}.cancel", connection.prefix);
    let body = call(connection, subject, HeaderMap::new(), id.to_owned().into()).await?;
    Ok(if connection.json {
        String::from_utf8_lossy(&body).into_owned()
    } else {
        format!("cancelled {id}")
    })
}

/// `natsched get`.
pub async fn get(connection: &Connection, id: &str) -> Result<String, ClientError> {
    let subject = format!("{}.get", connection.prefix);
    let body = call(connection, subject, HeaderMap::new(), id.to_owned().into()).await?;
    if connection.json {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut out = String::new();
    let field = |out: &mut String, key: &str, field: &serde_json::Value| {
        out.push_str(&format!(
            "{key:>12}: {}\n",
            field.to_string().trim_matches('"')
        ));
    };
    for key in [
        "id",
        "subject",
        "due",
        "created",
        "payload_size",
        "attempts",
    ] {
        field(&mut out, key, &value[key]);
    }
    if let Some(error) = value["last_error"].as_str() {
        out.push_str(&format!("{:>12}: {error}\n", "last_error"));
    }
    if let Some(recurring) = value["recurring"].as_object() {
        for key in ["cron", "tz", "every", "next_seq", "fired", "until", "count"] {
            if let Some(value) = recurring.get(key) {
                field(&mut out, key, value);
            }
        }
    }
    if let Some(headers) = value["headers"].as_object() {
        for (name, values) in headers {
            for v in values.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{:>12}  {name}: {}\n",
                    "",
                    v.as_str().unwrap_or("")
                ));
            }
        }
    }
    Ok(out.trim_end().to_owned())
}

/// `natsched stats`.
pub async fn stats(connection: &Connection) -> Result<String, ClientError> {
    let subject = format!("{}.stats", connection.prefix);
    let body = call(connection, subject, HeaderMap::new(), Bytes::new()).await?;
    if connection.json {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut out = String::new();
    for key in [
        "pending",
        "resident",
        "scheduled_total",
        "fired_total",
        "cancelled_total",
        "errors_total",
        "delivery_errors_total",
        "undeliverable",
        "store_bytes",
    ] {
        out.push_str(&format!("{key:>16}: {}\n", value[key]));
    }
    let l = &value["lateness_ms"];
    out.push_str(&format!(
        "{:>16}: p50 {} p90 {} p99 {} p99.9 {} max {} ms over {} fires",
        "lateness", l["p50"], l["p90"], l["p99"], l["p999"], l["max"], l["count"]
    ));
    Ok(out)
}

/// `natsched list`: one page.
pub async fn list(
    connection: &Connection,
    subject: &str,
    limit: usize,
    cursor: Option<&str>,
) -> Result<String, ClientError> {
    let request = serde_json::json!({"subject": subject, "limit": limit, "cursor": cursor});
    let body = call(
        connection,
        format!("{}.list", connection.prefix),
        HeaderMap::new(),
        request.to_string().into(),
    )
    .await?;
    if connection.json {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let page: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut out = String::new();
    for item in page["items"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{}  {}  {}\n",
            item["due"].as_str().unwrap_or(""),
            item["id"].as_str().unwrap_or(""),
            item["subject"].as_str().unwrap_or("")
        ));
    }
    if let Some(next) = page["next_cursor"].as_str() {
        out.push_str(&format!("more: --cursor '{next}'"));
    }
    Ok(out.trim_end().to_owned())
}
