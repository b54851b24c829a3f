//! What the daemon reports about itself: gathered once ([`gather`]), shown two ways — the
//! admin socket's `menshen status` and the MQTT `health` message (also the `health.get` reply).

use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bus::StoreFacts;
use crate::clock::{wall_ms, MonoTime};
use crate::config::Config;
use crate::stats::Stats;
use crate::store::Store;

/// Read the store's facts (off the async workers). A fact that cannot be read shows as zero.
pub async fn gather(store: &Arc<Store>, with_fingerprint: bool) -> StoreFacts {
    let st = store.clone();
    tokio::task::spawn_blocking(move || {
        let next_seq = st.next_seq().unwrap_or(0);
        let (residents, credentials) = st.roster_counts().unwrap_or((0, 0));
        let last_event_ms = st
            .events_from(next_seq.saturating_sub(1), 1)
            .ok()
            .and_then(|e| e.into_iter().last())
            .and_then(|e| serde_json::from_slice::<Value>(&e.json).ok())
            .and_then(|v| v["ts_ms"].as_i64());
        StoreFacts {
            outbox_depth: st.outbox_depth().unwrap_or(0),
            next_seq,
            store_bytes: st.file_size(),
            roster_version: st.roster_version().unwrap_or(0),
            deletions_pending: st.pending_deletions().map(|p| p.len() as u64).unwrap_or(0),
            store_write_failed: st.write_failed(),
            roster_fingerprint: if with_fingerprint { Some(st.fingerprint().unwrap_or_default()) } else { None },
            residents,
            credentials,
            templates: st.template_count().unwrap_or(0),
            roster_sync: st.sync_progress().ok().flatten(),
            last_event_ms,
        }
    })
    .await
    .unwrap_or_default()
}

/// The periodic `health` message and the `health.get` reply (docs/schemas/health.json).
pub fn health(cfg: &Config, f: &StoreFacts, stats: &Stats, started: MonoTime) -> Value {
    let snap = stats.snapshot();
    json!({
        "site": cfg.gate.site,
        "gate": cfg.gate.gate,
        "version": env!("CARGO_PKG_VERSION"),
        "ts_ms": wall_ms(),
        "uptime_s": MonoTime::now().saturating_sub(started).as_secs(),
        "mqtt_connected": snap.mqtt_online,
        // `disabled` without a camera; else ok, stalled, corrupt, gone or error.
        "camera": stats.camera(),
        "outbox_depth": f.outbox_depth,
        "next_seq": f.next_seq,
        "store_bytes": f.store_bytes,
        "roster_version": f.roster_version,
        "roster_sync": f.roster_sync,
        "store_write_failed": f.store_write_failed,
        "events_held": stats.events_held.load(Ordering::Relaxed),
        "events_lost": stats.events_lost.load(Ordering::Relaxed),
        // A refused event holding back the outbox (null when none): fix the broker's ACL.
        "outbox_blocked": stats.outbox_blocked(),
        "replies_refused": snap.replies_refused,
        "admin_refused": stats.admin_refused.load(Ordering::Relaxed),
        "admin_commands": stats.admin_commands.load(Ordering::Relaxed),
        "granted": snap.granted,
        "denied": snap.denied,
        "events_stored": snap.events_stored,
        "events_delivered": snap.events_delivered,
        "store_errors": snap.store_errors,
        "commands_ok": snap.commands_ok,
        "rejected": {
            "commands": snap.command_rejections,
            "wiegand": snap.wiegand_rejections,
        },
        // OSDP readers: link state, Secure Channel, `insecure` flagged, bad frames counted.
        "osdp": stats.osdp(),
    })
}

/// The retained `summary`: one gate's line in `menshen site status` (docs/schemas/summary.json).
/// Published when the gate connects and with every `health` message, so a site tool reads every
/// gate's state from the broker's retained messages without asking any gate.
pub fn summary(cfg: &Config, f: &StoreFacts, stats: &Stats) -> Value {
    json!({
        "site": cfg.gate.site,
        "gate": cfg.gate.gate,
        "version": env!("CARGO_PKG_VERSION"),
        "ts_ms": wall_ms(),
        "interval_s": cfg.mqtt.health_interval_secs,
        "roster_version": f.roster_version,
        "residents": f.residents,
        "credentials": f.credentials,
        "templates": f.templates,
        "deletions_pending": f.deletions_pending,
        "camera": stats.camera(),
        "outbox_depth": f.outbox_depth,
        "last_event_ms": f.last_event_ms,
        "roster_sync": f.roster_sync,
    })
}

/// `menshen status`: the same facts, with every counter and the stages' liveness.
pub fn status(f: &StoreFacts, stats: &Stats, started: MonoTime) -> Value {
    json!({
        "ok": true,
        "uptime_s": MonoTime::now().saturating_sub(started).as_secs(),
        "outbox_depth": f.outbox_depth,
        "next_seq": f.next_seq,
        "roster_version": f.roster_version,
        "roster_fingerprint": f.roster_fingerprint.clone().unwrap_or_default(),
        "residents": f.residents,
        "credentials": f.credentials,
        "templates": f.templates,
        "roster_sync": f.roster_sync,
        // Template deletions decided but whose key is not yet destroyed and receipted.
        "deletions_pending": f.deletions_pending,
        "store_write_failed": f.store_write_failed,
        "events_held": stats.events_held.load(Ordering::Relaxed),
        "events_lost": stats.events_lost.load(Ordering::Relaxed),
        "outbox_blocked": stats.outbox_blocked(),
        "stats": stats.snapshot(),
        "camera": stats.camera(),
        "face_frames": stats.face_frames.load(Ordering::Relaxed),
        "frames_rejected": stats.frames_rejected.load(Ordering::Relaxed),
        "stale_stages": stats.stale_stages(5_000_000_000),
        "osdp": stats.osdp(),
        // Admin socket peers refused (not root, the daemon's user or the admin group), and the
        // resident commands carried out through it.
        "admin_refused": stats.admin_refused.load(Ordering::Relaxed),
        "admin_commands": stats.admin_commands.load(Ordering::Relaxed),
    })
}
