//! Schedule a message with any NATS client — here async-nats — and watch it arrive.
//!
//! With natsched and a NATS server running locally (`examples/quickstart.sh`):
//! `cargo run --example schedule`

use async_nats::HeaderMap;
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(url).await?;
    let mut expirations = client.subscribe("orders.expired").await?;

    // "Emit orders.expired for order 42 in 2 seconds" — re-sending with the same Sched-Id
    // reschedules instead of duplicating.
    let mut headers = HeaderMap::new();
    headers.insert("Sched-Delay", "2s");
    headers.insert("Sched-Id", "order-42");
    let reply = client
        .request_with_headers(
            "sched.add.orders.expired",
            headers,
            r#"{"order":42}"#.into(),
        )
        .await?;
    if let Some(code) = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
    {
        return Err(format!(
            "refused ({code}): {}",
            String::from_utf8_lossy(&reply.payload)
        )
        .into());
    }
    println!("scheduled: {}", String::from_utf8_lossy(&reply.payload));

    let message = expirations.next().await.ok_or("subscription closed")?;
    let due = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Sched-Due"))
        .map(|v| v.to_string());
    println!(
        "delivered on {}: {} (due {})",
        message.subject,
        String::from_utf8_lossy(&message.payload),
        due.unwrap_or_default()
    );
    Ok(())
}
