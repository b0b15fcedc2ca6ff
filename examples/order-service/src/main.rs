//! A tiny service: each transaction stores an order (the decision) and its
//! `OrderPlaced` event (the side effect) in `kurier.outbox`, atomically.
//!
//!   DATABASE_URL=postgres://... cargo run -p order-service -- [RATE_PER_SEC] [TOPIC]
//!
//! It depends on the `kurier` library only: no librdkafka, no cmake.

use std::time::Duration;

use kurier::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("set DATABASE_URL"))?;
    let mut args = std::env::args().skip(1);
    let rate: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let topic = args.next().unwrap_or_else(|| "kurier-demo".into());
    let pool = sqlx::PgPool::connect(&url).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS demo_orders (id bigserial PRIMARY KEY, customer text NOT NULL, total_cents int NOT NULL)")
        .execute(&pool)
        .await?;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    for n in 0u64.. {
        tick.tick().await;
        let customer = format!("customer-{}", n % 5);
        let mut tx = pool.begin().await?;
        let order: i64 = sqlx::query_scalar(
            "INSERT INTO demo_orders (customer, total_cents) VALUES ($1, $2) RETURNING id",
        )
        .bind(&customer)
        .bind((n % 97) as i32 * 100)
        .fetch_one(&mut *tx)
        .await?;
        let event = Message::json(
            &topic,
            serde_json::json!({"type": "OrderPlaced", "order": order, "customer": customer}),
        )
        .key(&customer);
        let id = kurier::enqueue(&mut *tx, &event).await?;
        tx.commit().await?;
        println!("committed order {order} for {customer}, message-id {id}");
    }
    Ok(())
}
