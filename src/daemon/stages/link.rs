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
//!
//! A publish the broker refuses (MQTT 5 PUBACK reason ≥ 0x80: its ACL, a quota) never costs the
//! connection. A refused reply or state publish is logged, counted and dropped. A refused event
//! stays in the outbox and holds back the events behind it (in-order delivery): it is retried
//! with backoff (`mqtt.backoff_min_ms`..`backoff_max_ms`), `health` is published at once with
//! `outbox_blocked`, and one `publish_refused` alarm is stored (it goes out behind the held
//! event, once the broker takes it). MQTT 3.1.1 brokers cannot report a refusal at all: they
//! acknowledge and drop, so the ACL must be right before a 3.1.1 gate goes live.

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
use crate::clock::wall_ms;
use crate::command::{Inbound, SITE_SCOPE};
use crate::daemon::status;
use crate::events::{GateAlarm, Head, NewEvent};
use crate::mqtt::{discovery, ha_status_topic, options, status_payload, Acked, Backoff, Entry, Pipeline};

/// The link stage's channels.
pub struct LinkIo {
    /// Signalled by the outbox stage whenever new events are stored.
    pub wake: Arc<Notify>,
    pub board: Arc<StateBoard>,
    /// Command publishes, for the commands stage.
    pub commands: mpsc::Sender<Inbound>,
    /// Replies and re-sent events from the commands stage.
    pub outgoing: mpsc::Receiver<Outgoing>,
    /// For the `publish_refused` alarm.
    pub events: mpsc::Sender<NewEvent>,
}

/// A refused event holding back the outbox, across reconnects.
#[derive(Debug)]
struct Block {
    seq: u64,
    reason: String,
    since_ms: i64,
    attempts: u32,
    /// The `publish_refused` alarm for this seq is stored.
    alarmed: bool,
    backoff: Backoff,
    /// When to hand the held event over again.
    retry_at: Option<tokio::time::Instant>,
}

impl Block {
    fn report(&self) -> serde_json::Value {
        serde_json::json!({"seq": self.seq, "reason": self.reason, "since_ms": self.since_ms, "attempts": self.attempts})
    }
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
    let mut block: Option<Block> = None;
    loop {
        if ctx.shutdown.is_cancelled() {
            return;
        }
        let connects = ctx.stats.mqtt_connects.load(Ordering::Relaxed);
        match session(&ctx, &mut io, opts.clone(), &mut backoff, &mut block).await {
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
    block: &'a mut Option<Block>,
    /// Delivered events whose removal from the outbox failed (the store could not be written),
    /// and when to try again: they leave the outbox once the disk has room, without being sent
    /// again.
    removals_failed: Vec<u64>,
    removals_retry_at: Option<tokio::time::Instant>,
    /// The store's reopen count the outbox was read under (see `Store::reopens`).
    store_reopens: u64,
    /// The Home Assistant discovery configs (empty when it is off): made once per session, for
    /// the announcement and every republish.
    ha_configs: Vec<(String, Vec<u8>)>,
    /// Home Assistant's birth topic, when it is on.
    ha_status: Option<String>,
    /// When Home Assistant's `online` last made us publish discovery again.
    ha_announced: Option<tokio::time::Instant>,
}

/// Home Assistant's `online` republishes discovery at most this often (anyone may publish it).
const HA_REANNOUNCE_MIN: Duration = Duration::from_secs(5);

/// How long a failed outbox removal waits before it is tried again.
const REMOVAL_RETRY: Duration = Duration::from_millis(500);

impl Session<'_> {
    /// Hand one QoS 1 publish (state, status, health) to the client; false if its queue is full.
    fn publish(&mut self, topic: String, payload: Vec<u8>, retain: bool) -> bool {
        self.publish_entry(topic, payload, retain, None, Entry::Other)
    }

    fn publish_out(&mut self, o: Outgoing) -> bool {
        let kind = if o.reply { Entry::Reply } else { Entry::Other };
        self.publish_entry(o.topic, o.payload, o.retain, o.correlation, kind)
    }

    fn publish_entry(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        correlation: Option<Vec<u8>>,
        entry: Entry,
    ) -> bool {
        let props = PublishProperties { correlation_data: correlation.map(Into::into), ..PublishProperties::default() };
        let ok = self.client.try_publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, props).is_ok();
        if ok {
            self.pipe.handed(entry);
        }
        ok
    }

    /// Remove delivered events from the outbox; a failed removal is kept and retried.
    async fn remove(&mut self, acked: Vec<u64>) {
        if let Err(failed) = ack(self.ctx, acked).await {
            self.removals_failed.extend(failed);
            self.removals_retry_at.get_or_insert_with(|| tokio::time::Instant::now() + REMOVAL_RETRY);
        }
    }

    /// The health message, now.
    async fn publish_health(&mut self) {
        let facts = status::gather(&self.ctx.store, false).await;
        let h = status::health(&self.ctx.cfg, &facts, &self.ctx.stats, self.ctx.started);
        let topic = format!("{}health", self.root);
        self.publish(topic, h.to_string().into_bytes(), false);
        self.publish_summary(&facts);
    }

    /// The retained `summary` (for `menshen site status`).
    fn publish_summary(&mut self, facts: &crate::bus::StoreFacts) -> bool {
        let v = status::summary(&self.ctx.cfg, facts, &self.ctx.stats);
        let topic = format!("{}summary", self.root);
        self.publish(topic, v.to_string().into_bytes(), true)
    }
}

async fn session(
    ctx: &StageCtx,
    io: &mut LinkIo,
    opts: MqttOptions,
    backoff: &mut Backoff,
    block: &mut Option<Block>,
) -> SessionEnd {
    // The announcement (discovery, the doors' states) is handed over before the loop runs.
    let ha = ctx.cfg.homeassistant.enabled;
    let ha_configs = if ha { discovery(&ctx.cfg) } else { Vec::new() };
    let cap = usize::from(ctx.cfg.mqtt.inflight) * 2 + 64 + ha_configs.len() + 4 * ctx.cfg.doors.len();
    let (client, mut el) = AsyncClient::new(opts, cap);
    let inflight = match connack(ctx, &mut el).await {
        Ok(n) => n,
        Err(end) => return end,
    };
    backoff.reset();
    ctx.stats.mqtt_connected_ms.store(wall_ms(), Ordering::Relaxed);
    ctx.stats.mqtt_online.store(true, Ordering::Relaxed);
    ctx.stats.mqtt_connects.fetch_add(1, Ordering::Relaxed);
    ctx.stats.mqtt_inflight.store(inflight as u64, Ordering::Relaxed);
    tracing::info!(host = %ctx.cfg.mqtt.host, port = ctx.cfg.mqtt.port, inflight, "MQTT connected");
    // A block from an earlier connection is retried at once on this one, alone.
    let mut pipe = Pipeline::new(inflight);
    if let Some(b) = block.as_mut() {
        b.retry_at = None;
        pipe.probe_first(b.seq);
    }
    let mut s = Session {
        ctx,
        client,
        root: ctx.cfg.topic_root(),
        pipe,
        board_seen: 0,
        block,
        removals_failed: Vec::new(),
        removals_retry_at: None,
        store_reopens: ctx.store.reopens(),
        ha_configs,
        ha_status: ha.then(|| ha_status_topic(&ctx.cfg)),
        ha_announced: None,
    };
    if let Err(e) = announce(&mut s, &io.board) {
        return e;
    }
    let facts = status::gather(&ctx.store, false).await;
    if !s.publish_summary(&facts) {
        return SessionEnd::Lost("client queue full".into());
    }
    let health_every = ctx.cfg.mqtt.health_interval_secs;
    let mut health = tokio::time::interval(Duration::from_secs(health_every.max(1)));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick().await;
    loop {
        fill(&mut s, io).await;
        let mut acked = s.pipe.take_acks(false);
        let room = s.pipe.has_room();
        let retry_at = s.block.as_ref().and_then(|b| b.retry_at);
        let removals_at = s.removals_retry_at;
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                goodbye(&mut s, &mut el, acked).await;
                return SessionEnd::Shutdown;
            }
            _ = io.wake.notified(), if room => {}
            Some(o) = io.outgoing.recv(), if room => {
                s.publish_out(o);
            }
            _ = io.board.changed.notified(), if room => {}
            _ = health.tick(), if health_every > 0 => s.publish_health().await,
            // Batch outbox removals: flush when the event loop has been quiet for a moment.
            _ = tokio::time::sleep(Duration::from_millis(2)), if s.pipe.acks_waiting() => {
                acked.extend(s.pipe.take_acks(true));
            }
            _ = tokio::time::sleep_until(removals_at.unwrap_or_else(tokio::time::Instant::now)), if removals_at.is_some() => {
                s.removals_retry_at = None;
                acked.append(&mut s.removals_failed);
            }
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                // Retry the held event: what was delivered behind it leaves the outbox first, so
                // the re-read starts at the held event with as few duplicates as possible.
                acked.extend(s.pipe.take_acks(true));
                s.remove(std::mem::take(&mut acked)).await;
                if let Some(b) = s.block.as_mut() {
                    b.retry_at = None;
                    b.attempts += 1;
                }
                s.pipe.release();
            }
            ev = el.poll() => {
                match on_event(&mut s, io, ev) {
                    Err(end) => {
                        acked.extend(s.pipe.take_acks(true));
                        s.remove(acked).await;
                        return end;
                    }
                    Ok(Some(Refusal::FirstOfBlock)) => s.publish_health().await,
                    Ok(_) => {}
                }
            }
        }
        s.remove(acked).await;
    }
}

/// What a refused event meant for the block.
enum Refusal {
    /// A new block began: say so now.
    FirstOfBlock,
    /// The block goes on (retried later).
    Held,
}

/// An event was refused: hold it (the pipeline already does), schedule its retry, and on the
/// first refusal of this seq log it loudly and store one alarm.
fn on_refused_event(s: &mut Session<'_>, io: &LinkIo, seq: u64, reason: &str) -> Refusal {
    let m = &s.ctx.cfg.mqtt;
    let held = s.pipe.held().unwrap_or(seq);
    let first = s.block.as_ref().is_none_or(|b| b.seq != held);
    if first {
        tracing::error!(
            seq = held, %reason,
            "broker refused an event (check its ACL): it and the events behind it are held and retried; \
             the connection stays up"
        );
        let b = Block {
            seq: held,
            reason: reason.to_string(),
            since_ms: wall_ms(),
            attempts: 1,
            alarmed: false,
            backoff: Backoff::new(Duration::from_millis(m.backoff_min_ms), Duration::from_millis(m.backoff_max_ms)),
            retry_at: None,
        };
        *s.block = Some(b);
    }
    let Some(b) = s.block.as_mut() else { return Refusal::Held };
    if b.retry_at.is_none() {
        b.retry_at = Some(tokio::time::Instant::now() + b.backoff.next_delay(&mut rand::thread_rng()));
    }
    if !b.alarmed {
        b.alarmed = true;
        let detail = format!(
            "the broker refused event seq {} ({reason}); it and the events behind it were held and retried \
             (check the broker's ACL for this gate's event topics)",
            b.seq
        );
        // Stored behind the held event: it arrives once the broker takes that one.
        if io.events.try_send(NewEvent::alarm(wall_ms(), GateAlarm::PublishRefused, None, Some(detail))).is_err() {
            tracing::warn!("publish_refused alarm not stored: the outbox queue is full");
        }
    }
    s.ctx.stats.set_outbox_blocked(Some(b.report()));
    if first {
        Refusal::FirstOfBlock
    } else {
        Refusal::Held
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
    if let Some(topic) = &s.ha_status {
        // Home Assistant's birth message: discovery again when HA comes back (HA's advice).
        filters.push(Filter::new(topic.clone(), QoS::AtLeastOnce));
    }
    if s.client.try_subscribe_many(filters).is_err() {
        return Err(SessionEnd::Lost("client queue full".into()));
    }
    if !cfg.mqtt.site_commands {
        // The session is persistent: a `_site` subscription of an earlier configuration would
        // outlive it on the broker.
        let site = format!("menshen/v1/{}/{SITE_SCOPE}/cmd/+", cfg.gate.site);
        if s.client.try_unsubscribe(site).is_err() {
            return Err(SessionEnd::Lost("client queue full".into()));
        }
    }
    let mut list = vec![(format!("{}status", s.root), status_payload("online"))];
    list.extend(s.ha_configs.iter().cloned());
    s.board_seen = board.version();
    list.extend(board.since(0).into_iter().map(|(k, v)| (format!("{}{k}", s.root), v)));
    for (topic, payload) in list {
        if !s.publish(topic, payload, true) {
            return Err(SessionEnd::Lost("client queue full".into()));
        }
    }
    Ok(())
}

/// Fill the pipeline: replies first (someone is waiting), then the outbox, then changed state.
async fn fill(s: &mut Session<'_>, io: &mut LinkIo) {
    while s.pipe.has_room() {
        let Ok(o) = io.outgoing.try_recv() else { break };
        if !s.publish_out(o) {
            break;
        }
    }
    let reopens = s.ctx.store.reopens();
    if reopens != s.store_reopens {
        // The store went back to its last durable commit: removals since then are undone, so
        // events already delivered are in the outbox again. Read it from the start: they go out
        // again (duplicates, consumers de-duplicate by id) and leave it for good.
        s.store_reopens = reopens;
        s.pipe.rewind();
        tracing::info!("store reopened: the outbox is read again from its start");
    }
    if s.pipe.outbox_room() > 0 {
        let (store, cursor, want) = (s.ctx.store.clone(), s.pipe.cursor(), s.pipe.outbox_room());
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
            if !s.publish_entry(topic, entry.json, false, None, Entry::Event(entry.seq)) {
                break;
            }
        }
    }
    if io.board.version() != s.board_seen && s.pipe.has_room() {
        let v = io.board.version();
        for (k, p) in io.board.since(s.board_seen) {
            let topic = format!("{}{k}", s.root);
            s.publish(topic, p, true);
        }
        s.board_seen = v;
    }
}

/// One event from the client's loop; `Err` ends the session.
fn on_event(
    s: &mut Session<'_>,
    io: &LinkIo,
    ev: Result<Event, rumqttc::v5::ConnectionError>,
) -> Result<Option<Refusal>, SessionEnd> {
    match ev {
        Ok(Event::Outgoing(Sent::Publish(pkid))) => s.pipe.sent(pkid),
        Ok(Event::Incoming(Packet::PubAck(a))) => match s.pipe.acked(a.pkid, delivered(&a.reason)) {
            // Refused (an ACL, a quota): never the connection's end, never dropped silently.
            Acked::Refused(Entry::Event(seq)) => {
                return Ok(Some(on_refused_event(s, io, seq, &format!("{:?}", a.reason))));
            }
            Acked::Refused(Entry::Reply) => {
                s.ctx.stats.replies_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reason = ?a.reason, "broker refused a command reply (check its ACL): dropped");
            }
            Acked::Refused(Entry::Other) => {
                s.ctx.stats.publishes_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reason = ?a.reason, "broker refused a state or health publish (check its ACL): dropped");
            }
            Acked::Delivered(Entry::Event(seq)) if s.block.as_ref().is_some_and(|b| b.seq == seq) => {
                if let Some(b) = s.block.take() {
                    tracing::info!(seq, attempts = b.attempts, "held event delivered: the outbox flows again");
                }
                s.ctx.stats.set_outbox_blocked(None);
            }
            Acked::Delivered(_) | Acked::Unknown => {}
        },
        Ok(Event::Incoming(Packet::SubAck(sub))) => {
            for code in &sub.return_codes {
                if !matches!(code, SubscribeReasonCode::Success(_)) {
                    tracing::error!(?code, "broker refused the command subscription (check its ACL)");
                }
            }
        }
        Ok(Event::Incoming(Packet::Publish(p))) if s.ha_status.as_deref().is_some_and(|t| p.topic == t.as_bytes()) => {
            if p.payload.trim_ascii() == b"online" {
                reannounce_ha(s);
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
    Ok(None)
}

/// Home Assistant came online: publish discovery again (not more than once per
/// [`HA_REANNOUNCE_MIN`]). A full client queue skips the rest: the configs are retained anyway.
fn reannounce_ha(s: &mut Session<'_>) {
    let now = tokio::time::Instant::now();
    if s.ha_announced.is_some_and(|t| now.duration_since(t) < HA_REANNOUNCE_MIN) {
        tracing::debug!("Home Assistant online again within {HA_REANNOUNCE_MIN:?}: discovery not repeated");
        return;
    }
    s.ha_announced = Some(now);
    let configs = s.ha_configs.clone();
    let n = configs.len();
    for (topic, payload) in configs {
        if !s.publish(topic, payload, true) {
            tracing::warn!("client queue full: Home Assistant discovery only partly republished (it is retained)");
            return;
        }
    }
    tracing::info!(configs = n, "Home Assistant online: discovery republished");
}

/// Clean goodbye: the retained offline status (the will covers the unclean case), the PUBACKs
/// that arrive within half a second, then the outbox removals.
async fn goodbye(s: &mut Session<'_>, el: &mut EventLoop, mut acked: Vec<u64>) {
    let topic = format!("{}status", s.root);
    let _ = s.publish(topic, status_payload("offline"), true);
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
    acked.append(&mut s.removals_failed);
    s.remove(acked).await;
}

/// A PUBACK that means the broker took the message.
fn delivered(r: &PubAckReason) -> bool {
    matches!(r, PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
}

/// Remove delivered events from the outbox; `Err` gives back those that are still in it.
async fn ack(ctx: &StageCtx, acked: Vec<u64>) -> Result<(), Vec<u64>> {
    if acked.is_empty() {
        return Ok(());
    }
    let n = acked.len() as u64;
    let (store, seqs) = (ctx.store.clone(), acked.clone());
    match tokio::task::spawn_blocking(move || store.ack_events(&seqs)).await {
        Ok(Ok(())) => {
            ctx.stats.events_delivered.fetch_add(n, Ordering::Relaxed);
            Ok(())
        }
        Ok(Err(error)) => {
            // The events stay in the outbox (delivered: never a loss) and their removal is tried
            // again; after a reconnect first they would go out again, a duplicate.
            tracing::warn!(%error, events = n, "outbox removal failed: retried");
            ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            Err(acked)
        }
        Err(_) => Err(acked),
    }
}
