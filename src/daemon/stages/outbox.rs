//! The outbox stage: events are stored durably (group commit, fdatasync), then the MQTT link is
//! woken. Nothing is published that is not stored (M2).
//!
//! When the store cannot be written (a full disk, an I/O error), events are held in memory in
//! the order they happened — bounded by `gate.events_held_max`, beyond which they are counted as
//! lost — and the write is retried with backoff. Once it works again they are stored in order,
//! with their sequence numbers assigned then, and **followed** by one `store_unavailable` alarm
//! that says for how long and how many events waited (and how many were lost): only then are
//! those figures known. A crash during the outage loses the events held in memory; their count is
//! always in `status` and `health` (`events_held`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

use super::StageCtx;
use crate::clock::{wall_ms, MonoTime};
use crate::events::{GateAlarm, NewEvent};

/// Events per commit at most.
const BATCH: usize = 512;
/// Retry delays while the store cannot be written.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The outbox stage's channels.
pub struct OutboxIo {
    pub events: mpsc::Receiver<NewEvent>,
    /// Signalled whenever new events are stored.
    pub wake: Arc<Notify>,
}

/// An outage of the store, while it lasts.
#[derive(Debug, Clone, Copy)]
struct Outage {
    since: MonoTime,
    held_peak: usize,
    lost: u64,
}

/// The events waiting for the store, in order, and the outage they wait through.
#[derive(Debug)]
struct Held {
    events: VecDeque<NewEvent>,
    outage: Option<Outage>,
    /// The next delay, and when the next write may be tried during an outage (new events do not
    /// make it sooner: each try may reopen the store file).
    retry: Duration,
    next_try: tokio::time::Instant,
}

impl Held {
    fn due(&self) -> bool {
        self.outage.is_none() || tokio::time::Instant::now() >= self.next_try
    }
}

impl Held {
    /// Take an event in; beyond `max` it is dropped and counted.
    fn push(&mut self, e: NewEvent, max: usize) -> bool {
        if self.events.len() >= max {
            if let Some(o) = &mut self.outage {
                o.lost += 1;
            }
            return false;
        }
        self.events.push_back(e);
        if let Some(o) = &mut self.outage {
            o.held_peak = o.held_peak.max(self.events.len());
        }
        true
    }
}

/// Run until every producer has stopped (the channel closed), so shutdown loses nothing the store
/// can take. It beats while idle too: a quiet gate is not a hung one.
pub async fn run(ctx: StageCtx, mut io: OutboxIo) {
    let max = ctx.cfg.gate.events_held_max;
    let mut held =
        Held { events: VecDeque::new(), outage: None, retry: RETRY_MIN, next_try: tokio::time::Instant::now() };
    let mut alarmed = false;
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut open = true;
    while open || !held.events.is_empty() {
        let waiting = !held.events.is_empty();
        tokio::select! {
            m = io.events.recv(), if open => match m {
                Some(e) => take(&ctx, &mut held, e, max),
                None => open = false,
            },
            _ = tokio::time::sleep_until(held.next_try), if waiting => {}
            _ = beat.tick() => { ctx.beat(); continue; }
        }
        while held.events.len() < max {
            match io.events.try_recv() {
                Ok(e) => take(&ctx, &mut held, e, max),
                Err(_) => break,
            }
        }
        if !open && held.outage.is_some() && ctx.shutdown.is_cancelled() && !store_once(&ctx, &mut held).await {
            // Shutting down with a store that still cannot be written: what is held is lost.
            let n = held.events.len();
            ctx.stats.events_lost.fetch_add(n as u64, Ordering::Relaxed);
            tracing::error!(lost = n, "shutting down while the store cannot be written: held events lost");
            break;
        }
        while !held.events.is_empty() && held.due() && store_once(&ctx, &mut held).await {
            io.wake.notify_one();
        }
        ctx.stats.events_held.store(held.events.len() as u64, Ordering::Relaxed);
        ctx.beat();
        if held.events.is_empty() {
            alarmed = depth_alarm(&ctx, &io.wake, alarmed).await;
        }
    }
}

fn take(ctx: &StageCtx, held: &mut Held, e: NewEvent, max: usize) {
    if !held.push(e, max) {
        ctx.stats.events_lost.fetch_add(1, Ordering::Relaxed);
    }
}

/// Store one batch from the front of `held`; false if the store refused it (kept, retried later
/// with a longer delay). After an outage, the `store_unavailable` alarm follows the last held event.
async fn store_once(ctx: &StageCtx, held: &mut Held) -> bool {
    let n = held.events.len().min(BATCH);
    let batch: Vec<NewEvent> = held.events.iter().take(n).cloned().collect();
    match append(ctx, batch).await {
        Ok(()) => {
            held.events.drain(..n);
            ctx.stats.events_stored.fetch_add(n as u64, Ordering::Relaxed);
            held.retry = RETRY_MIN;
            if held.events.is_empty() {
                if let Some(o) = held.outage.take() {
                    recovered(ctx, o).await;
                }
            }
            true
        }
        Err(error) => {
            ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            if held.outage.is_none() {
                held.outage = Some(Outage { since: MonoTime::now(), held_peak: held.events.len(), lost: 0 });
                tracing::error!(%error, held = held.events.len(), "could not store events: holding them in memory and retrying");
            } else {
                tracing::debug!(%error, held = held.events.len(), "store still unavailable");
            }
            held.next_try = tokio::time::Instant::now() + held.retry;
            held.retry = (held.retry * 2).min(RETRY_MAX);
            false
        }
    }
}

/// The store works again: say for how long it did not, and what waited.
async fn recovered(ctx: &StageCtx, o: Outage) {
    let ms = MonoTime::now().saturating_sub(o.since).as_millis() as u64;
    tracing::warn!(unavailable_ms = ms, held = o.held_peak, lost = o.lost, "store writable again: held events stored");
    let detail = format!("store unavailable for {ms} ms: {} events held in memory, {} lost", o.held_peak, o.lost);
    let alarm = NewEvent::alarm(wall_ms(), GateAlarm::StoreUnavailable, None, Some(detail));
    // If this one fails, the store broke again: the alarm is lost with a log line, the next
    // outage raises its own.
    match append(ctx, vec![alarm]).await {
        Ok(()) => {
            ctx.stats.events_stored.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => tracing::error!(%error, "store_unavailable alarm not stored"),
    }
}

/// One durable commit of `batch`, sequence numbers assigned in it.
async fn append(ctx: &StageCtx, batch: Vec<NewEvent>) -> Result<(), String> {
    let backfill = !ctx.stats.mqtt_online.load(Ordering::Relaxed);
    let (site, gate) = (ctx.cfg.gate.site.clone(), ctx.cfg.gate.gate.clone());
    let builders: Vec<_> = batch
        .into_iter()
        .map(|e| {
            let (site, gate) = (site.clone(), gate.clone());
            move |seq: u64| e.to_json(seq, &site, &gate, backfill)
        })
        .collect();
    let st = ctx.store.clone();
    match tokio::task::spawn_blocking(move || st.append_events(builders)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// D2: the backlog is bounded by disk; past the configured depth, raise an alarm that itself
/// waits in the outbox and reaches the BMS first thing after the outage. Returns whether it is
/// raised.
async fn depth_alarm(ctx: &StageCtx, wake: &Notify, alarmed: bool) -> bool {
    let depth = ctx.store.outbox_depth().unwrap_or(0);
    let limit = ctx.cfg.gate.outbox_alarm_depth;
    if depth >= limit && !alarmed {
        tracing::error!(depth, "outbox over its alarm depth: the broker has been unreachable for long");
        let alarm = NewEvent::alarm(
            wall_ms(),
            GateAlarm::OutboxOverCapacity,
            None,
            Some(format!("{depth} undelivered events")),
        );
        if append(ctx, vec![alarm]).await.is_ok() {
            ctx.stats.events_stored.fetch_add(1, Ordering::Relaxed);
            wake.notify_one();
        }
        return true;
    }
    if depth < limit / 2 {
        return false;
    }
    alarmed
}
