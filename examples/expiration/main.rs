//! The scenario natsched was made for: orders that expire unless paid in time.
//!
//! With NATS and natsched running locally (`examples/quickstart.sh`):
//! `cargo run --example expiration` (`-- --server nats://host:4222` or `NATS_URL` for another
//! server, `--prefix` if natsched's `api.prefix` is not `sched`).
//!
//! Two services (`services.rs`) run as tasks of this one program, each with its own
//! connection, as if in processes of their own. The demo creates two orders, pays one of them
//! (as a payments service would), waits until both expired, and prints how each ended. The
//! README's *Example: expiring orders* walks through it.

mod services;

use std::time::Duration;

use clap::Parser;
use jiff::{Timestamp, ToSpan};
use services::{OrderPaid, OrderState, Orders};

#[derive(Parser)]
struct Args {
    /// NATS server URL.
    #[arg(long, short, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    server: String,
    /// natsched's API subject prefix.
    #[arg(long, default_value = "sched")]
    prefix: String,
    /// How long an order may stay unpaid, e.g. 2s, 1m.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    expire_after: Duration,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,expiration=info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
    match demo(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn demo(args: Args) -> Result<(), services::Error> {
    let connect = async || {
        async_nats::connect(args.server.as_str())
            .await
            .map_err(|err| format!("cannot connect to NATS at {}: {err}", args.server))
    };

    // Fail at once, and clearly, when natsched is not there: every order would wait forever.
    let payments = connect().await?;
    if let Err(err) = payments
        .request(format!("{}.stats", args.prefix), "".into())
        .await
    {
        return Err(format!(
            "natsched does not answer on {}.stats ({}): is it running? (examples/quickstart.sh)",
            args.prefix,
            err.kind()
        )
        .into());
    }
    services::expiration_service(connect().await?, &args.prefix).await?;
    let orders = Orders::start(connect().await?, &args.prefix).await?;

    // Ids unique to this run, so a run cannot meet the expirations of an earlier one.
    let run = Timestamp::now().as_second();
    let (unpaid, paid) = (format!("{run}-1"), format!("{run}-2"));
    // Whole milliseconds: natsched rounds finer instants up.
    let expires_at = Timestamp::from_millisecond(
        Timestamp::now().as_millisecond() + args.expire_after.as_millis() as i64,
    )?;
    orders.create(&unpaid, expires_at).await?;
    orders.create(&paid, expires_at).await?;

    // Halfway to the expiry a payment comes in for the second order.
    tokio::time::sleep(args.expire_after / 2).await;
    let event = serde_json::to_vec(&OrderPaid { id: paid.clone() })?;
    payments.publish(services::ORDER_PAID, event.into()).await?;

    // The unpaid order is cancelled at its expiry; a little past it, the paid one is still paid.
    let give_up = expires_at + 10.seconds();
    while orders.get(&unpaid).map(|o| o.state) != Some(OrderState::Cancelled) {
        if Timestamp::now() > give_up {
            return Err(format!("order {unpaid} was not cancelled by {give_up}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let past_expiry = (expires_at + 500.milliseconds()).duration_since(Timestamp::now());
    tokio::time::sleep(past_expiry.try_into().unwrap_or_default()).await;

    println!();
    let time = |t: Timestamp| t.strftime("%H:%M:%S%.3f UTC");
    for id in [&unpaid, &paid] {
        let order = orders.get(id).expect("created above");
        println!(
            "order {id}: {:?} at {}, expiry {}",
            order.state,
            time(order.since),
            time(order.expires_at)
        );
    }
    Ok(())
}
