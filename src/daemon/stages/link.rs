//! The link stage: the one task that owns the broker connection (rumqttc, MQTT 5).
//!
//! It publishes the retained `status` (with an `offline` last will) and the retained `state/...`
//! of every door and lock, drains the durable outbox in sequence order at QoS 1, removing an event
//! only after the broker's PUBACK (REQUIREMENTS M2, D2), takes commands from `cmd/+` (and the
//! site-wide `_site/cmd/+`) for the commands stage, and publishes its replies. Each connection
//! gets a fresh rumqttc event loop, so nothing is replayed behind our back: after a reconnect the
//! link re-reads the outbox and re-sends every event not yet acknowledged, with the same id and
//! content (consumers de-duplicate by id). While the broker is unreachable it backs off
//! exponentially with jitter (rumqttc's `poll()` fails at once while the broker is down, so a
//! plain loop would spin). In flight it never has more than the smaller of `mqtt.inflight` and
//! the broker's receive-maximum (mosquitto: 20). The bookkeeping is `mqtt::Pipeline` (pure).

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAckReason, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing as Sent;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

use super::StageCtx;
use crate::bus::{Outgoing, StateBoard};
use crate::command::{Inbound, SITE_SCOPE};
use crate::daemon::status;
use crate::events::Head;
use crate::mqtt::{discovery, options, status_payload, Acked, Backoff, Pipeline};

/// The link stage's channels.
pub struct LinkIo {
    /// Signalled by the outbox stage whenever new events are stored.
    pub wake: Arc<Notify>,
    pub board: Arc<StateBoard>,
    /// Command publishes, for the commands stage.
    pub commands: mpsc::Sender<Inbound>,
    /// Replies and re-sent events from the commands stage.
    pub outgoing: mpsc::Receiver<Outgoing>,
}

/// Run the link until shutdown.
pub async fn run(ctx: StageCtx, mut io: LinkIo) {
    let m = &ctx.cfg.mqtt;
    let mut backoff = Backoff::new(Duration::from_millis(m.backoff_min_ms), Duration::from_millis(m.backoff_max_ms));
    let opts = match options(&ctx.cfg) {
        Ok(o) => o,
        Err(error) => {
            // Checked at start by `main` too: this only happens if a file changed since.
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
        match session(&ctx, &mut io, opts.clone(), &mut backoff).await {
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

/// One connection's state.
struct Session<'a> {
    ctx: &'a StageCtx,
    client: AsyncClient,
    root: String,
    pipe: Pipeline,
    board_seen: u64,
}

impl Session<'_> {
    /// Hand one QoS 1 publish to the client; false if its queue is full.
    fn publish(&mut self, topic: String, payload: Vec<u8>, retain: bool, correlation: Option<Vec<u8>>) -> bool {
        self.publish_entry(topic, payload, retain, correlation, None)
    }

    fn publish_entry(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        correlation: Option<Vec<u8>>,
        seq: Option<u64>,
    ) -> bool {
        let props = PublishProperties { correlation_data: correlation.map(Into::into), ..PublishProperties::default() };
        let ok = self.client.try_publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, props).is_ok();
        if ok {
            self.pipe.handed(seq);
        }
        ok
    }
}

async fn session(ctx: &StageCtx, io: &mut LinkIo, opts: MqttOptions, backoff: &mut Backoff) -> SessionEnd {
    let cap = usize::from(ctx.cfg.mqtt.inflight) * 2 + 64;
    let (client, mut el) = AsyncClient::new(opts, cap);
    let inflight = match connack(ctx, &mut el).await {
        Ok(n) => n,
        Err(end) => return end,
    };
    backoff.reset();
    ctx.stats.mqtt_online.store(true, Ordering::Relaxed);
    ctx.stats.mqtt_connects.fetch_add(1, Ordering::Relaxed);
    ctx.stats.mqtt_inflight.store(inflight as u64, Ordering::Relaxed);
    tracing::info!(host = %ctx.cfg.mqtt.host, port = ctx.cfg.mqtt.port, inflight, "MQTT connected");
    let mut s = Session { ctx, client, root: ctx.cfg.topic_root(), pipe: Pipeline::new(inflight), board_seen: 0 };
    if let Err(e) = announce(&mut s, &io.board) {
        return e;
    }
    let health_every = ctx.cfg.mqtt.health_interval_secs;
    let mut health = tokio::time::interval(Duration::from_secs(health_every.max(1)));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick().await;
    loop {
        fill(&mut s, io).await;
        let mut acked = s.pipe.take_acks(false);
        let room = s.pipe.has_room();
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                goodbye(&mut s, &mut el, acked).await;
                return SessionEnd::Shutdown;
            }
            _ = io.wake.notified(), if room => {}
            Some(o) = io.outgoing.recv(), if room => {
                s.publish(o.topic, o.payload, o.retain, o.correlation);
            }
            _ = io.board.changed.notified(), if room => {}
            _ = health.tick(), if health_every > 0 => {
                let facts = status::gather(&ctx.store, false).await;
                let h = status::health(&ctx.cfg, &facts, &ctx.stats, ctx.started);
                let topic = format!("{}health", s.root);
                s.publish(topic, h.to_string().into_bytes(), false, None);
            }
            // Batch outbox removals: flush when the event loop has been quiet for a moment.
            _ = tokio::time::sleep(Duration::from_millis(2)), if s.pipe.acks_waiting() => {
                acked.extend(s.pipe.take_acks(true));
            }
            ev = el.poll() => {
                if let Err(end) = on_event(&mut s, io, ev) {
                    acked.extend(s.pipe.take_acks(true));
                    ack(ctx, acked).await;
                    return end;
                }
            }
        }
        ack(ctx, acked).await;
    }
}

/// Wait for the CONNACK; the broker's receive-maximum bounds what we keep in flight.
async fn connack(ctx: &StageCtx, el: &mut EventLoop) -> Result<usize, SessionEnd> {
    let mut inflight = usize::from(ctx.cfg.mqtt.inflight);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Err(SessionEnd::Shutdown),
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if let Some(max) = ack.properties.and_then(|p| p.receive_max) {
                        inflight = inflight.min(usize::from(max)).max(1);
                    }
                    return Ok(inflight);
                }
                Ok(_) => {}
                Err(e) => return Err(SessionEnd::Lost(e.to_string())),
            }
        }
    }
}

/// Subscriptions first (they do not count as publishes), then the retained announcements.
fn announce(s: &mut Session<'_>, board: &StateBoard) -> Result<(), SessionEnd> {
    let cfg = &s.ctx.cfg;
    // Retain As Published: a command published with the retain flag keeps it even when it reaches
    // us live, so it is refused (M3) instead of being carried out and left on the broker for the
    // next subscriber.
    let command_filter = |topic: String| {
        let mut f = Filter::new(topic, QoS::AtLeastOnce);
        f.preserve_retain = true;
        f
    };
    let mut filters = vec![command_filter(format!("{}cmd/+", s.root))];
    if cfg.mqtt.site_commands {
        filters.push(command_filter(format!("menshen/v1/{}/{SITE_SCOPE}/cmd/+", cfg.gate.site)));
    }
    if s.client.try_subscribe_many(filters).is_err() {
        return Err(SessionEnd::Lost("client queue full".into()));
    }
    let mut list = vec![(format!("{}status", s.root), status_payload("online"))];
    if cfg.homeassistant.enabled {
        list.extend(discovery(cfg));
    }
    s.board_seen = board.version();
    list.extend(board.since(0).into_iter().map(|(k, v)| (format!("{}{k}", s.root), v)));
    for (topic, payload) in list {
        if !s.publish(topic, payload, true, None) {
            return Err(SessionEnd::Lost("client queue full".into()));
        }
    }
    Ok(())
}

/// Fill the pipeline: replies first (someone is waiting), then the outbox, then changed state.
async fn fill(s: &mut Session<'_>, io: &mut LinkIo) {
    while s.pipe.has_room() {
        let Ok(o) = io.outgoing.try_recv() else { break };
        if !s.publish(o.topic, o.payload, o.retain, o.correlation) {
            break;
        }
    }
    if s.pipe.has_room() {
        let (store, cursor, want) = (s.ctx.store.clone(), s.pipe.cursor(), s.pipe.room());
        let batch = match tokio::task::spawn_blocking(move || store.outbox_after(cursor, want)).await {
            Ok(Ok(b)) => b,
            Ok(Err(error)) => {
                tracing::error!(%error, "outbox read failed");
                s.ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        for entry in batch {
            let topic = match serde_json::from_slice::<Head>(&entry.json) {
                Ok(h) => format!("{}event/{}", s.root, h.kind.name()),
                Err(error) => {
                    // A record we wrote ourselves and cannot route: keep it, report it.
                    tracing::error!(seq = entry.seq, %error, "unroutable outbox record");
                    format!("{}event/system", s.root)
                }
            };
            if !s.publish_entry(topic, entry.json, false, None, Some(entry.seq)) {
                break;
            }
        }
    }
    if io.board.version() != s.board_seen && s.pipe.has_room() {
        let v = io.board.version();
        for (k, p) in io.board.since(s.board_seen) {
            let topic = format!("{}{k}", s.root);
            s.publish(topic, p, true, None);
        }
        s.board_seen = v;
    }
}

/// One event from the client's loop; `Err` ends the session.
fn on_event(
    s: &mut Session<'_>,
    io: &LinkIo,
    ev: Result<Event, rumqttc::v5::ConnectionError>,
) -> Result<(), SessionEnd> {
    match ev {
        Ok(Event::Outgoing(Sent::Publish(pkid))) => s.pipe.sent(pkid),
        Ok(Event::Incoming(Packet::PubAck(a))) => {
            if let Acked::Refused(seq) = s.pipe.acked(a.pkid, delivered(&a.reason)) {
                // Refused (an ACL, a quota): keep the event, reconnect after a pause, and say so
                // loudly; never drop it silently.
                tracing::error!(reason = ?a.reason, ?seq, "broker refused a publish (check its ACL)");
                return Err(SessionEnd::Lost(format!("publish refused: {:?}", a.reason)));
            }
        }
        Ok(Event::Incoming(Packet::SubAck(sub))) => {
            for code in &sub.return_codes {
                if !matches!(code, SubscribeReasonCode::Success(_)) {
                    tracing::error!(?code, "broker refused the command subscription (check its ACL)");
                }
            }
        }
        Ok(Event::Incoming(Packet::Publish(p))) => {
            let props = p.properties.unwrap_or_default();
            let inb = Inbound {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                retain: p.retain,
                response_topic: props.response_topic,
                correlation: props.correlation_data.map(|b| b.to_vec()),
                expiry_secs: props.message_expiry_interval,
            };
            if io.commands.try_send(inb).is_err() {
                s.ctx.stats.reject_command("busy");
                tracing::warn!("command stage busy: command dropped");
            }
        }
        Ok(_) => {}
        Err(e) => return Err(SessionEnd::Lost(e.to_string())),
    }
    Ok(())
}

/// Clean goodbye: the retained offline status (the will covers the unclean case), the PUBACKs
/// that arrive within half a second, then the outbox removals.
async fn goodbye(s: &mut Session<'_>, el: &mut EventLoop, mut acked: Vec<u64>) {
    let topic = format!("{}status", s.root);
    let _ = s.publish(topic, status_payload("offline"), true, None);
    let _ = s.client.try_disconnect();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, el.poll()).await {
        match ev {
            Event::Outgoing(Sent::Publish(pkid)) => s.pipe.sent(pkid),
            Event::Incoming(Packet::PubAck(a)) if delivered(&a.reason) => {
                s.pipe.acked(a.pkid, true);
            }
            Event::Outgoing(Sent::Disconnect) => break,
            _ => {}
        }
    }
    acked.extend(s.pipe.take_acks(true));
    ack(s.ctx, acked).await;
}

/// A PUBACK that means the broker took the message.
fn delivered(r: &PubAckReason) -> bool {
    matches!(r, PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
}

async fn ack(ctx: &StageCtx, acked: Vec<u64>) {
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
