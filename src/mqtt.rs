//! The MQTT link: the one task that owns the broker connection (rumqttc).
//!
//! It publishes the retained `status` (with an `offline` last will) and drains the durable
//! outbox in sequence order at QoS 1, removing an event only after the broker's PUBACK
//! (REQUIREMENTS M2, D2). Each connection gets a fresh rumqttc event loop, so nothing is replayed
//! behind our back: after a reconnect the link re-reads the outbox and re-sends every event not
//! yet acknowledged, with the same id and content (consumers de-duplicate by id). While the
//! broker is unreachable it backs off exponentially with jitter (rumqttc's `poll()` fails at
//! once while the broker is down, so a plain loop would spin).

use rand::Rng;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::Head;
use crate::stats::Stats;
use crate::store::Store;

/// What the link needs.
pub struct LinkCtx {
    pub cfg: Arc<Config>,
    pub store: Arc<Store>,
    pub stats: Arc<Stats>,
    /// Signalled by the outbox stage whenever new events are stored.
    pub wake: Arc<Notify>,
    pub shutdown: CancellationToken,
}

fn status_payload(state: &str) -> Vec<u8> {
    serde_json::json!({"state": state, "version": env!("CARGO_PKG_VERSION")}).to_string().into_bytes()
}

fn options(cfg: &Config) -> anyhow::Result<MqttOptions> {
    let m = &cfg.mqtt;
    let id = m.client_id.clone().unwrap_or_else(|| format!("menshen-{}-{}", cfg.gate.site, cfg.gate.gate));
    let mut o = MqttOptions::new(id, m.host.clone(), m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_secs));
    o.set_clean_session(true);
    o.set_inflight(m.inflight);
    o.set_last_will(LastWill::new(
        format!("{}status", cfg.topic_root()),
        status_payload("offline"),
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &m.username {
        let password = match &m.password_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("mqtt.password_file {}: {e}", p.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    Ok(o)
}

/// Exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, current: min }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next delay: uniform in [min, current], then current doubles up to max.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let hi = self.current.as_millis().max(self.min.as_millis()) as u64;
        let d = Duration::from_millis(rng.gen_range(self.min.as_millis() as u64..=hi));
        self.current = (self.current * 2).min(self.max);
        d
    }
}

/// Run the link until shutdown.
pub async fn run(ctx: LinkCtx) {
    let m = &ctx.cfg.mqtt;
    let mut backoff = Backoff::new(Duration::from_millis(m.backoff_min_ms), Duration::from_millis(m.backoff_max_ms));
    let opts = match options(&ctx.cfg) {
        Ok(o) => o,
        Err(error) => {
            tracing::error!(%error, "MQTT disabled: bad options");
            ctx.shutdown.cancelled().await;
            return;
        }
    };
    let mut failures: u64 = 0;
    loop {
        if ctx.shutdown.is_cancelled() {
            return;
        }
        let connects = ctx.stats.mqtt_connects.load(Ordering::Relaxed);
        match session(&ctx, opts.clone(), &mut backoff).await {
            SessionEnd::Shutdown => return,
            SessionEnd::Lost(error) => {
                ctx.stats.mqtt_online.store(false, Ordering::Relaxed);
                if ctx.stats.mqtt_connects.load(Ordering::Relaxed) != connects {
                    failures = 0;
                }
                failures += 1;
                let delay = backoff.next_delay(&mut rand::thread_rng());
                // Say it loudly once, then every 20th attempt: events wait safely in the outbox.
                if failures == 1 || failures % 20 == 0 {
                    tracing::warn!(%error, attempts = failures, retry_ms = delay.as_millis() as u64, "MQTT broker unreachable");
                } else {
                    tracing::debug!(%error, retry_ms = delay.as_millis() as u64, "MQTT reconnect failed");
                }
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Entries of the publish pipeline: `None` is the status message, `Some(seq)` an event.
type Pending = Option<u64>;

async fn session(ctx: &LinkCtx, opts: MqttOptions, backoff: &mut Backoff) -> SessionEnd {
    let inflight = usize::from(ctx.cfg.mqtt.inflight);
    let (client, mut el) = AsyncClient::new(opts, inflight * 2 + 8);
    let root = ctx.cfg.topic_root();
    // Wait for the CONNACK.
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return SessionEnd::Shutdown,
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => return SessionEnd::Lost(e.to_string()),
            }
        }
    }
    backoff.reset();
    ctx.stats.mqtt_online.store(true, Ordering::Relaxed);
    ctx.stats.mqtt_connects.fetch_add(1, Ordering::Relaxed);
    tracing::info!(host = %ctx.cfg.mqtt.host, port = ctx.cfg.mqtt.port, "MQTT connected");

    let mut awaiting_pkid: VecDeque<Pending> = VecDeque::new();
    let mut in_flight: HashMap<u16, Pending> = HashMap::new();
    let mut cursor: u64 = 0; // highest seq handed to the client in this session
    let mut queued: usize = 0; // publishes handed over and not yet acknowledged
    let mut pending_acks: Vec<u64> = Vec::new(); // acknowledged, not yet removed from the outbox

    if client.try_publish(format!("{root}status"), QoS::AtLeastOnce, true, status_payload("online")).is_err() {
        return SessionEnd::Lost("client queue full".into());
    }
    awaiting_pkid.push_back(None);
    queued += 1;

    loop {
        // Fill the pipeline from the outbox.
        if queued < inflight {
            let store = ctx.store.clone();
            let want = inflight - queued;
            let batch = match tokio::task::spawn_blocking(move || store.outbox_after(cursor, want)).await {
                Ok(Ok(b)) => b,
                Ok(Err(error)) => {
                    tracing::error!(%error, "outbox read failed");
                    ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                    Vec::new()
                }
                Err(_) => Vec::new(),
            };
            for entry in batch {
                let topic = match serde_json::from_slice::<Head>(&entry.json) {
                    Ok(h) => format!("{root}event/{}", h.kind.name()),
                    Err(error) => {
                        // A record we wrote ourselves and cannot route: keep it, report it.
                        tracing::error!(seq = entry.seq, %error, "unroutable outbox record");
                        format!("{root}event/system")
                    }
                };
                if client.try_publish(topic, QoS::AtLeastOnce, false, entry.json).is_err() {
                    break;
                }
                awaiting_pkid.push_back(Some(entry.seq));
                cursor = entry.seq;
                queued += 1;
            }
        }
        let mut acked: Vec<u64> = Vec::new();
        if pending_acks.len() >= 64 {
            acked = std::mem::take(&mut pending_acks);
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                // Clean goodbye: retained offline status (the will covers the unclean case).
                let _ = client.try_publish(format!("{root}status"), QoS::AtLeastOnce, true, status_payload("offline"));
                let _ = client.try_disconnect();
                let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
                while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, el.poll()).await {
                    if let Event::Incoming(Packet::PubAck(a)) = &ev {
                        if let Some(Some(seq)) = in_flight.remove(&a.pkid) { acked.push(seq); }
                    }
                    if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) { break; }
                }
                acked.append(&mut pending_acks);
                ack(ctx, acked).await;
                return SessionEnd::Shutdown;
            }
            _ = ctx.wake.notified(), if queued < inflight => {}
            // Batch outbox removals: flush when the event loop has been quiet for a moment.
            _ = tokio::time::sleep(Duration::from_millis(2)), if !pending_acks.is_empty() => {
                acked = std::mem::take(&mut pending_acks);
            }
            ev = el.poll() => match ev {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(p) = awaiting_pkid.pop_front() {
                        in_flight.insert(pkid, p);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    if let Some(p) = in_flight.remove(&a.pkid) {
                        queued = queued.saturating_sub(1);
                        if let Some(seq) = p { pending_acks.push(seq); }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    ack(ctx, pending_acks).await;
                    return SessionEnd::Lost(e.to_string());
                }
            }
        }
        ack(ctx, acked).await;
    }
}

async fn ack(ctx: &LinkCtx, acked: Vec<u64>) {
    if acked.is_empty() {
        return;
    }
    let n = acked.len() as u64;
    let store = ctx.store.clone();
    match tokio::task::spawn_blocking(move || store.ack_events(&acked)).await {
        Ok(Ok(())) => {
            ctx.stats.events_delivered.fetch_add(n, Ordering::Relaxed);
        }
        Ok(Err(error)) => {
            // The events stay in the outbox and go out again: a duplicate, never a loss.
            tracing::error!(%error, "outbox ack failed");
            ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1_000));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay(&mut rng)).collect();
        assert!(delays.iter().all(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_millis(1_000)));
        assert!(delays.iter().any(|d| *d > Duration::from_millis(400)), "{delays:?}");
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(100));
    }
}
