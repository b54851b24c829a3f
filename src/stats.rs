//! Counters and liveness shared by the stages: what `menshen status` reports and what the
//! watchdog checks before it pings systemd.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::clock::MonoTime;
use crate::wiegand::Rejection;

#[derive(Debug, Default)]
pub struct Stats {
    pub granted: AtomicU64,
    pub denied: AtomicU64,
    pub events_stored: AtomicU64,
    pub events_delivered: AtomicU64,
    pub store_errors: AtomicU64,
    pub mqtt_connects: AtomicU64,
    /// Publishes kept in flight on the current connection: min(mqtt.inflight, broker receive-maximum).
    pub mqtt_inflight: AtomicU64,
    pub mqtt_online: AtomicBool,
    /// Wall ms of the last CONNACK: a paged sync's timeout counts from it too (a gate that was
    /// offline could not receive pages).
    pub mqtt_connected_ms: std::sync::atomic::AtomicI64,
    pub commands_ok: AtomicU64,
    /// Frames the face path has analysed.
    pub face_frames: AtomicU64,
    /// Frames refused because they did not decode (truncated, corrupt, empty, too small).
    pub frames_rejected: AtomicU64,
    /// Wiegand edges the reader stages have taken from their lines (both lines, all readers).
    pub wiegand_edges: AtomicU64,
    /// Wiegand frames the reader stages have ended (cards and rejections), all readers.
    pub wiegand_frames: AtomicU64,
    /// Events held in memory because the store could not be written (a full disk, an I/O
    /// error): what a crash at this moment would lose.
    pub events_held: AtomicU64,
    /// Events dropped because more than the memory bound waited for the store.
    pub events_lost: AtomicU64,
    /// Command replies the broker refused (MQTT 5 PUBACK ≥ 0x80, e.g. its ACL): dropped, the
    /// connection kept.
    pub replies_refused: AtomicU64,
    /// Retained state, status or health publishes the broker refused: dropped likewise.
    pub publishes_refused: AtomicU64,
    /// Admin socket connections refused: the peer (SO_PEERCRED) is not root, the daemon's own
    /// user or in the admin group.
    pub admin_refused: AtomicU64,
    /// Resident commands carried out through the admin socket.
    pub admin_commands: AtomicU64,
    /// The refused event holding back the outbox (`seq`, `reason`, `since_ms`, `attempts`).
    outbox_blocked: Mutex<Option<serde_json::Value>>,
    /// The camera's state (`disabled` without a face path).
    camera: Mutex<&'static str>,
    rejections: Mutex<BTreeMap<&'static str, u64>>,
    command_rejections: Mutex<BTreeMap<&'static str, u64>>,
    heartbeats: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<LatencyRings>,
    osdp: Mutex<BTreeMap<String, OsdpHealth>>,
}

/// One OSDP reader's link and counters, in `health` and `menshen status`.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct OsdpHealth {
    /// `ok`, `starting`, `offline`, `no_secure_channel` or `secure_channel_failed`.
    pub state: &'static str,
    pub secure_channel: bool,
    /// Configured `insecure = true`: plain mode allowed (flagged).
    pub insecure: bool,
    pub tamper: bool,
    pub cards: u64,
    pub keys: u64,
    /// Bytes that were no frame and frames refused, by why (`noise`, `bad_crc`, `bad_length`,
    /// `truncated`); libosdp drops them, none is ever a read.
    pub bad_frames: BTreeMap<&'static str, u64>,
    /// Replies that answer no command (out of sequence, replayed, or a second talker).
    pub out_of_sequence: u64,
    /// Reads refused: longer than any format, or not a format this reader takes.
    pub reads_refused: u64,
}

/// The last [`RING`] granted card decisions, split by hop, in nanoseconds.
pub const RING: usize = 4096;

#[derive(Debug, Default, Clone)]
pub struct LatencyRings {
    /// Last Wiegand edge (kernel timestamp) → the reader stage has it.
    pub delivery: Vec<u64>,
    /// Reader stage → decision made (decode, store lookup, policy).
    pub decide: Vec<u64>,
    /// Decision → relay command issued by the door stage.
    pub actuate: Vec<u64>,
    /// Reader stage has the edge → relay command: the daemon's own processing.
    pub processing: Vec<u64>,
    /// Last edge → relay command, end to end.
    pub total: Vec<u64>,
    next: usize,
}

/// Timestamps of one granted card decision on its way to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantTrace {
    pub edge: MonoTime,
    pub received: MonoTime,
    pub decided: MonoTime,
}

/// p50/p99/max of a set of nanosecond samples, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    pub n: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    pub fn of(samples: &[u64]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        let mut v = samples.to_vec();
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1_000.0;
        Percentiles { n: v.len(), p50_us: at(0.5), p99_us: at(0.99), max_us: at(1.0) }
    }
}

impl Stats {
    /// Change one OSDP reader's entry.
    pub fn osdp_update(&self, reader: &str, f: impl FnOnce(&mut OsdpHealth)) {
        let mut m = self.osdp.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(reader) {
            Some(h) => f(h),
            None => f(m.entry(reader.to_string()).or_default()),
        }
    }

    /// Every OSDP reader's entry.
    pub fn osdp(&self) -> BTreeMap<String, OsdpHealth> {
        self.osdp.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn reject(&self, r: Rejection) {
        *self.rejections.lock().unwrap_or_else(|p| p.into_inner()).entry(r.code()).or_default() += 1;
    }

    /// A keypad frame that is no key, counted with the refused frames by its code
    /// (`key_bad_complement`, `key_unknown`, `pin_parity_error`, ...).
    pub fn reject_key(&self, why: crate::keypad::KeyError) {
        *self.rejections.lock().unwrap_or_else(|p| p.into_inner()).entry(why.code()).or_default() += 1;
    }

    /// A refused MQTT command, by error code.
    pub fn reject_command(&self, code: &'static str) {
        *self.command_rejections.lock().unwrap_or_else(|p| p.into_inner()).entry(code).or_default() += 1;
    }

    pub fn command_rejections(&self) -> BTreeMap<&'static str, u64> {
        self.command_rejections.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn rejections(&self) -> BTreeMap<&'static str, u64> {
        self.rejections.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A stage says it is alive.
    pub fn set_camera(&self, state: &'static str) {
        if let Ok(mut c) = self.camera.lock() {
            *c = state;
        }
    }

    pub fn camera(&self) -> &'static str {
        match self.camera.lock().map(|c| *c) {
            Ok("") => "disabled",
            Ok(s) => s,
            Err(_) => "unknown",
        }
    }

    pub fn beat(&self, stage: &str) {
        let now = MonoTime::now().as_nanos();
        let mut h = self.heartbeats.lock().unwrap_or_else(|p| p.into_inner());
        match h.get_mut(stage) {
            Some(v) => *v = now,
            None => {
                h.insert(stage.to_string(), now);
            }
        }
    }

    /// Stages whose last beat is older than `max_age_ns`.
    pub fn stale_stages(&self, max_age_ns: u64) -> Vec<String> {
        let now = MonoTime::now().as_nanos();
        self.heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, &t)| now.saturating_sub(t) > max_age_ns)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Record a granted decision's path once its relay command is issued at `relay`.
    pub fn record_grant(&self, t: GrantTrace, relay: MonoTime) {
        let mut guard = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let r = &mut *guard;
        let vals = [
            t.received.saturating_sub(t.edge),
            t.decided.saturating_sub(t.received),
            relay.saturating_sub(t.decided),
            relay.saturating_sub(t.received),
            relay.saturating_sub(t.edge),
        ]
        .map(|d| d.as_nanos() as u64);
        let i = r.next;
        for (ring, v) in
            [&mut r.delivery, &mut r.decide, &mut r.actuate, &mut r.processing, &mut r.total].into_iter().zip(vals)
        {
            if ring.len() < RING {
                ring.push(v);
            } else {
                ring[i] = v;
            }
        }
        r.next = (i + 1) % RING;
    }

    pub fn latency(&self) -> LatencyRings {
        self.latency.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The refused event holding back the outbox, if any.
    pub fn outbox_blocked(&self) -> Option<serde_json::Value> {
        self.outbox_blocked.lock().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set_outbox_blocked(&self, v: Option<serde_json::Value>) {
        match self.outbox_blocked.lock() {
            Ok(mut g) => *g = v,
            Err(p) => *p.into_inner() = v,
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let l = self.latency();
        StatsSnapshot {
            granted: self.granted.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            events_stored: self.events_stored.load(Ordering::Relaxed),
            events_delivered: self.events_delivered.load(Ordering::Relaxed),
            store_errors: self.store_errors.load(Ordering::Relaxed),
            mqtt_connects: self.mqtt_connects.load(Ordering::Relaxed),
            mqtt_inflight: self.mqtt_inflight.load(Ordering::Relaxed),
            mqtt_online: self.mqtt_online.load(Ordering::Relaxed),
            replies_refused: self.replies_refused.load(Ordering::Relaxed),
            publishes_refused: self.publishes_refused.load(Ordering::Relaxed),
            wiegand_edges: self.wiegand_edges.load(Ordering::Relaxed),
            wiegand_frames: self.wiegand_frames.load(Ordering::Relaxed),
            wiegand_rejections: self.rejections(),
            commands_ok: self.commands_ok.load(Ordering::Relaxed),
            command_rejections: self.command_rejections(),
            card_latency: LatencySnapshot {
                delivery: Percentiles::of(&l.delivery),
                decide: Percentiles::of(&l.decide),
                actuate: Percentiles::of(&l.actuate),
                processing: Percentiles::of(&l.processing),
                total: Percentiles::of(&l.total),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StatsSnapshot {
    pub granted: u64,
    pub denied: u64,
    pub events_stored: u64,
    pub events_delivered: u64,
    pub store_errors: u64,
    pub mqtt_connects: u64,
    pub mqtt_inflight: u64,
    pub mqtt_online: bool,
    pub replies_refused: u64,
    pub publishes_refused: u64,
    pub commands_ok: u64,
    pub command_rejections: BTreeMap<&'static str, u64>,
    /// Edges read from the Wiegand lines: with `wiegand_frames`, tells a silent reader (no
    /// edges) from a reader whose frames never end (edges, no frames).
    pub wiegand_edges: u64,
    pub wiegand_frames: u64,
    pub wiegand_rejections: BTreeMap<&'static str, u64>,
    /// Granted card decisions, last edge → relay command, split by hop.
    pub card_latency: LatencySnapshot,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencySnapshot {
    pub delivery: Percentiles,
    pub decide: Percentiles,
    pub actuate: Percentiles,
    pub processing: Percentiles,
    pub total: Percentiles,
}
