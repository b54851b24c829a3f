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
    pub mqtt_online: AtomicBool,
    rejections: Mutex<BTreeMap<&'static str, u64>>,
    heartbeats: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn reject(&self, r: Rejection) {
        *self.rejections.lock().unwrap_or_else(|p| p.into_inner()).entry(r.code()).or_default() += 1;
    }

    pub fn rejections(&self) -> BTreeMap<&'static str, u64> {
        self.rejections.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A stage says it is alive.
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

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            granted: self.granted.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            events_stored: self.events_stored.load(Ordering::Relaxed),
            events_delivered: self.events_delivered.load(Ordering::Relaxed),
            store_errors: self.store_errors.load(Ordering::Relaxed),
            mqtt_connects: self.mqtt_connects.load(Ordering::Relaxed),
            mqtt_online: self.mqtt_online.load(Ordering::Relaxed),
            wiegand_rejections: self.rejections(),
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
    pub mqtt_online: bool,
    pub wiegand_rejections: BTreeMap<&'static str, u64>,
}
