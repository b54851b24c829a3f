//! The MQTT link: the one task that owns the broker connection (rumqttc, MQTT 5).
//!
//! It publishes the retained `status` (with an `offline` last will) and the retained `state/...`
//! of every door and lock, drains the durable outbox in sequence order at QoS 1, removing an event
//! only after the broker's PUBACK (REQUIREMENTS M2, D2), takes commands from `cmd/+` (and the
//! site-wide `_site/cmd/+`) for the command stage (`api`), and publishes its replies. Each
//! connection gets a fresh rumqttc event loop, so nothing is replayed behind our back: after a
//! reconnect the link re-reads the outbox and re-sends every event not yet acknowledged, with the
//! same id and content (consumers de-duplicate by id). While the broker is unreachable it backs
//! off exponentially with jitter (rumqttc's `poll()` fails at once while the broker is down, so a
//! plain loop would spin). In flight it never has more than the smaller of `mqtt.inflight` and
//! the broker's receive-maximum (mosquitto: 20).

use rand::Rng;
use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, Packet, PubAckReason, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing as Sent;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::clock::MonoTime;
use crate::command::{Inbound, SITE_SCOPE};
use crate::config::Config;
use crate::events::Head;
use crate::stats::Stats;
use crate::store::Store;

/// A message for the link to publish at QoS 1 (command replies, re-sent events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 correlation data of the request being answered.
    pub correlation: Option<Vec<u8>>,
    pub retain: bool,
}

/// The retained state topics (`state/door/{door}`, `state/lock/{door}`): the door stages write,
/// the link publishes what changed, and everything again after each reconnect.
#[derive(Debug, Default)]
pub struct StateBoard {
    entries: Mutex<BTreeMap<String, (u64, Vec<u8>)>>,
    version: AtomicU64,
    pub changed: Notify,
}

impl StateBoard {
    /// Set `suffix` (under the gate's topic root) to `payload`; a no-op if unchanged.
    pub fn set(&self, suffix: &str, payload: Vec<u8>) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if e.get(suffix).is_some_and(|(_, p)| *p == payload) {
            return;
        }
        let v = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        e.insert(suffix.to_string(), (v, payload));
        drop(e);
        self.changed.notify_one();
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Entries changed after version `after`.
    pub fn since(&self, after: u64) -> Vec<(String, Vec<u8>)> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().filter(|(_, (v, _))| *v > after).map(|(k, (_, p))| (k.clone(), p.clone())).collect()
    }
}

/// What the link needs.
pub struct LinkCtx {
    pub cfg: Arc<Config>,
    pub store: Arc<Store>,
    pub stats: Arc<Stats>,
    /// Signalled by the outbox stage whenever new events are stored.
    pub wake: Arc<Notify>,
    pub board: Arc<StateBoard>,
    /// Command publishes, for the command stage.
    pub commands: mpsc::Sender<Inbound>,
    /// Replies and re-sent events from the command stage.
    pub outgoing: mpsc::Receiver<Outgoing>,
    pub started: MonoTime,
    pub shutdown: CancellationToken,
}

fn status_payload(state: &str) -> Vec<u8> {
    serde_json::json!({"state": state, "version": env!("CARGO_PKG_VERSION")}).to_string().into_bytes()
}

/// The rustls client configuration: the configured CA only (pinned, no system roots), an
/// optional client certificate, the ring provider.
fn tls_config(t: &crate::config::TlsConfig) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&t.ca_file)
        .map_err(|e| anyhow::anyhow!("mqtt.tls.ca_file {}: {e}", t.ca_file.display()))?
    {
        let cert = cert.map_err(|e| anyhow::anyhow!("mqtt.tls.ca_file {}: {e}", t.ca_file.display()))?;
        roots.add(cert).map_err(|e| anyhow::anyhow!("mqtt.tls.ca_file {}: {e}", t.ca_file.display()))?;
    }
    if roots.is_empty() {
        anyhow::bail!("mqtt.tls.ca_file {}: no certificate in it", t.ca_file.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&t.client_cert_file, &t.client_key_file) {
        (Some(c), Some(k)) => {
            let certs = CertificateDer::pem_file_iter(c)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("mqtt.tls.client_cert_file {}: {e}", c.display()))?;
            let key = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| anyhow::anyhow!("mqtt.tls.client_key_file {}: {e}", k.display()))?;
            builder.with_client_auth_cert(certs, key)?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// The daemon's connection options, with its `offline` last will.
pub fn options(cfg: &Config) -> anyhow::Result<MqttOptions> {
    let id = cfg.mqtt.client_id.clone().unwrap_or_else(|| format!("menshen-{}-{}", cfg.gate.site, cfg.gate.gate));
    let mut o = base_options(cfg, id)?;
    o.set_last_will(LastWill::new(
        format!("{}status", cfg.topic_root()),
        status_payload("offline"),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    Ok(o)
}

/// Address, login, TLS and limits, without a last will (`menshen doctor` connects with these).
pub fn base_options(cfg: &Config, client_id: String) -> anyhow::Result<MqttOptions> {
    let m = &cfg.mqtt;
    let mut o = MqttOptions::new(client_id, m.host.clone(), m.port);
    o.set_keep_alive(Duration::from_secs(m.keep_alive_secs));
    o.set_clean_start(true);
    o.set_outgoing_inflight_upper_limit(m.inflight);
    // The broker drops anything larger for us; between our limit and this, commands are refused
    // with a reply (payload_too_large) instead of the connection failing.
    let max_packet = (m.max_payload_bytes.saturating_mul(2) + (64 << 10)).min(u32::MAX as usize) as u32;
    o.set_max_packet_size(Some(max_packet));
    if let Some(user) = &m.username {
        let password = match &m.password_file {
            Some(p) => {
                let bytes = crate::secrets::read_private(p)
                    .map_err(|e| anyhow::anyhow!("mqtt.password_file {}: {e}", p.display()))?;
                String::from_utf8(bytes)
                    .map_err(|_| anyhow::anyhow!("mqtt.password_file {}: not UTF-8", p.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string()
            }
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if let Some(t) = &m.tls {
        let c = tls_config(t)?;
        o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(Arc::new(c))));
    }
    Ok(o)
}

/// Home Assistant discovery configs: (topic, retained payload) for each entity (M5).
pub fn discovery(cfg: &Config) -> Vec<(String, Vec<u8>)> {
    use serde_json::json;
    let ha = &cfg.homeassistant;
    let root = cfg.topic_root();
    let (site, gate) = (&cfg.gate.site, &cfg.gate.gate);
    let node = format!("menshen_{site}_{gate}");
    let device = json!({
        "identifiers": [node],
        "name": format!("Menshen {site}/{gate}"),
        "manufacturer": "Menshen",
        "model": "gate controller",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let avail = json!([{
        "topic": format!("{root}status"),
        "value_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }]);
    let mut out = Vec::new();
    for d in &cfg.doors {
        let door = &d.name;
        let lock_state = format!("{root}state/lock/{door}");
        if ha.allow_unlock {
            // Only UNLOCK makes a command; anything else renders `{}`, which the gate refuses. Each
            // press gets a fresh request id and a 10 s expiry, so it can never be replayed.
            let template = format!(
                "{{% if value == 'UNLOCK' %}}{{\"door\":\"{door}\",\"request_id\":\"ha-{{{{ now().timestamp() }}}}-{{{{ range(1000000) | random }}}}\",\"expires_at\":{{{{ ((now().timestamp() + 10) * 1000) | int }}}}}}{{% else %}}{{}}{{% endif %}}"
            );
            let c = json!({
                "name": format!("{door} lock"),
                "unique_id": format!("{node}_{door}_lock"),
                "availability": avail,
                "state_topic": lock_state,
                "value_template": "{{ value_json.state }}",
                "state_locked": "LOCKED",
                "state_unlocked": "UNLOCKED",
                "command_topic": format!("{root}cmd/unlock"),
                "command_template": template,
                "payload_unlock": "UNLOCK",
                "payload_lock": "LOCK",
                "device": device,
            });
            out.push((format!("{}/lock/{node}/{door}/config", ha.discovery_prefix), c.to_string().into_bytes()));
        } else {
            let c = json!({
                "name": format!("{door} lock"),
                "unique_id": format!("{node}_{door}_lock"),
                "device_class": "lock",
                "availability": avail,
                "state_topic": lock_state,
                // HA's lock device class: ON means unlocked.
                "value_template": "{{ 'ON' if value_json.state == 'UNLOCKED' else 'OFF' }}",
                "device": device,
            });
            out.push((
                format!("{}/binary_sensor/{node}/{door}_lock/config", ha.discovery_prefix),
                c.to_string().into_bytes(),
            ));
        }
        if d.contact_pin.is_some() {
            let c = json!({
                "name": format!("{door} door"),
                "unique_id": format!("{node}_{door}_door"),
                "device_class": "door",
                "availability": avail,
                "state_topic": format!("{root}state/door/{door}"),
                "value_template": "{{ 'ON' if value_json.open else 'OFF' }}",
                "device": device,
            });
            out.push((
                format!("{}/binary_sensor/{node}/{door}_door/config", ha.discovery_prefix),
                c.to_string().into_bytes(),
            ));
        }
    }
    let c = json!({
        "name": "access",
        "unique_id": format!("{node}_access"),
        "availability": avail,
        "state_topic": format!("{root}event/access"),
        "event_types": ["granted", "denied"],
        "value_template": "{ \"event_type\": \"{{ value_json.decision }}\", \"reason\": \"{{ value_json.reason }}\", \"door\": \"{{ value_json.door }}\" }",
        "device": device,
    });
    out.push((format!("{}/event/{node}/access/config", ha.discovery_prefix), c.to_string().into_bytes()));
    out
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
pub async fn run(mut ctx: LinkCtx) {
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
        match session(&mut ctx, opts.clone(), &mut backoff).await {
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

/// Entries of the publish pipeline: `None` is anything but an outbox event, `Some(seq)` an event.
type Pending = Option<u64>;

/// Hand one QoS 1 publish to the client; false if its queue is full.
fn publish(client: &AsyncClient, topic: String, payload: Vec<u8>, retain: bool, correlation: Option<Vec<u8>>) -> bool {
    let props = PublishProperties { correlation_data: correlation.map(Into::into), ..PublishProperties::default() };
    client.try_publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, props).is_ok()
}

async fn session(ctx: &mut LinkCtx, opts: MqttOptions, backoff: &mut Backoff) -> SessionEnd {
    let cap = usize::from(ctx.cfg.mqtt.inflight) * 2 + 64;
    let (client, mut el) = AsyncClient::new(opts, cap);
    let root = ctx.cfg.topic_root();
    // Wait for the CONNACK; the broker's receive-maximum bounds what we keep in flight.
    let mut inflight = usize::from(ctx.cfg.mqtt.inflight);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return SessionEnd::Shutdown,
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if let Some(max) = ack.properties.and_then(|p| p.receive_max) {
                        inflight = inflight.min(usize::from(max)).max(1);
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) => return SessionEnd::Lost(e.to_string()),
            }
        }
    }
    backoff.reset();
    ctx.stats.mqtt_online.store(true, Ordering::Relaxed);
    ctx.stats.mqtt_connects.fetch_add(1, Ordering::Relaxed);
    ctx.stats.mqtt_inflight.store(inflight as u64, Ordering::Relaxed);
    tracing::info!(host = %ctx.cfg.mqtt.host, port = ctx.cfg.mqtt.port, inflight, "MQTT connected");

    let mut awaiting_pkid: VecDeque<Pending> = VecDeque::new();
    let mut in_flight: HashMap<u16, Pending> = HashMap::new();
    let mut cursor: u64 = 0; // highest seq handed to the client in this session
    let mut queued: usize = 0; // publishes handed over and not yet acknowledged
    let mut pending_acks: Vec<u64> = Vec::new(); // acknowledged, not yet removed from the outbox

    // Subscriptions first (they do not count as publishes), then the retained announcements.
    // Retain As Published: a command published with the retain flag keeps it even when it reaches
    // us live, so it is refused (M3) instead of being carried out and left on the broker for the
    // next subscriber.
    let command_filter = |topic: String| {
        let mut f = Filter::new(topic, QoS::AtLeastOnce);
        f.preserve_retain = true;
        f
    };
    let mut filters = vec![command_filter(format!("{root}cmd/+"))];
    if ctx.cfg.mqtt.site_commands {
        filters.push(command_filter(format!("menshen/v1/{}/{SITE_SCOPE}/cmd/+", ctx.cfg.gate.site)));
    }
    if client.try_subscribe_many(filters).is_err() {
        return SessionEnd::Lost("client queue full".into());
    }
    let mut announce = vec![(format!("{root}status"), status_payload("online"))];
    if ctx.cfg.homeassistant.enabled {
        announce.extend(discovery(&ctx.cfg));
    }
    let mut board_seen = ctx.board.version();
    announce.extend(ctx.board.since(0).into_iter().map(|(k, v)| (format!("{root}{k}"), v)));
    for (topic, payload) in announce {
        if !publish(&client, topic, payload, true, None) {
            return SessionEnd::Lost("client queue full".into());
        }
        awaiting_pkid.push_back(None);
        queued += 1;
    }
    let health_every = ctx.cfg.mqtt.health_interval_secs;
    let mut health = tokio::time::interval(Duration::from_secs(health_every.max(1)));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick().await;

    loop {
        // Fill the pipeline: replies first (someone is waiting), then the outbox.
        while queued < inflight {
            let Ok(o) = ctx.outgoing.try_recv() else { break };
            if !publish(&client, o.topic, o.payload, o.retain, o.correlation) {
                break;
            }
            awaiting_pkid.push_back(None);
            queued += 1;
        }
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
                if !publish(&client, topic, entry.json, false, None) {
                    break;
                }
                awaiting_pkid.push_back(Some(entry.seq));
                cursor = entry.seq;
                queued += 1;
            }
        }
        if ctx.board.version() != board_seen && queued < inflight {
            let v = ctx.board.version();
            for (k, p) in ctx.board.since(board_seen) {
                if publish(&client, format!("{root}{k}"), p, true, None) {
                    awaiting_pkid.push_back(None);
                    queued += 1;
                }
            }
            board_seen = v;
        }
        let mut acked: Vec<u64> = Vec::new();
        if pending_acks.len() >= 64 {
            acked = std::mem::take(&mut pending_acks);
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => {
                // Clean goodbye: retained offline status (the will covers the unclean case).
                let _ = publish(&client, format!("{root}status"), status_payload("offline"), true, None);
                let _ = client.try_disconnect();
                let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
                while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, el.poll()).await {
                    match ev {
                        Event::Outgoing(Sent::Publish(pkid)) => {
                            if let Some(p) = awaiting_pkid.pop_front() { in_flight.insert(pkid, p); }
                        }
                        Event::Incoming(Packet::PubAck(a)) if delivered(&a.reason) => {
                            if let Some(Some(seq)) = in_flight.remove(&a.pkid) { acked.push(seq); }
                        }
                        Event::Outgoing(Sent::Disconnect) => break,
                        _ => {}
                    }
                }
                acked.append(&mut pending_acks);
                ack(ctx, acked).await;
                return SessionEnd::Shutdown;
            }
            _ = ctx.wake.notified(), if queued < inflight => {}
            Some(o) = ctx.outgoing.recv(), if queued < inflight => {
                if publish(&client, o.topic, o.payload, o.retain, o.correlation) {
                    awaiting_pkid.push_back(None);
                    queued += 1;
                }
            }
            _ = ctx.board.changed.notified(), if queued < inflight => {}
            _ = health.tick(), if health_every > 0 => {
                let h = crate::api::health(&ctx.cfg, &ctx.store, &ctx.stats, ctx.started).await;
                if publish(&client, format!("{root}health"), h.to_string().into_bytes(), false, None) {
                    awaiting_pkid.push_back(None);
                    queued += 1;
                }
            }
            // Batch outbox removals: flush when the event loop has been quiet for a moment.
            _ = tokio::time::sleep(Duration::from_millis(2)), if !pending_acks.is_empty() => {
                acked = std::mem::take(&mut pending_acks);
            }
            ev = el.poll() => match ev {
                Ok(Event::Outgoing(Sent::Publish(pkid))) => {
                    if let Some(p) = awaiting_pkid.pop_front() {
                        in_flight.insert(pkid, p);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    if let Some(p) = in_flight.remove(&a.pkid) {
                        queued = queued.saturating_sub(1);
                        if !delivered(&a.reason) {
                            // Refused (an ACL, a quota): keep the event, reconnect after a pause,
                            // and say so loudly; never drop it silently.
                            tracing::error!(reason = ?a.reason, seq = ?p, "broker refused a publish (check its ACL)");
                            ack(ctx, pending_acks).await;
                            return SessionEnd::Lost(format!("publish refused: {:?}", a.reason));
                        }
                        if let Some(seq) = p { pending_acks.push(seq); }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    for code in &s.return_codes {
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
                    if ctx.commands.try_send(inb).is_err() {
                        ctx.stats.reject_command("busy");
                        tracing::warn!("command stage busy: command dropped");
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

/// A PUBACK that means the broker took the message.
fn delivered(r: &PubAckReason) -> bool {
    matches!(r, PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
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
