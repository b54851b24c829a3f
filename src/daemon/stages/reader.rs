//! The reader stage: one Wiegand reader's D0/D1 edges decoded into frames (`wiegand::Decoder`,
//! pure), sorted by the reader's role into cards and keys (`keypad::classify`), keys collected
//! into a PIN (`keypad::PinEntry`), and handed to the gate stage. A PIN leaves this stage only
//! inside a `ReaderInput::Pin`, which prints no digit.

use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;

use super::{sleep_until_mono, StageCtx};
use crate::bus::{ReaderInput, ReaderOutput};
use crate::clock::{wall_ms, MonoTime};
use crate::config::ReaderConfig;
use crate::events::{GateAlarm, NewEvent};
use crate::hw::{self, Edge};
use crate::keypad::{self, Frame, Key, PinEntry, PinEvent};
use crate::wiegand::{Decoder, Line, Outcome, WEdge};

/// One reader's claimed lines and their edge streams.
pub struct ReaderParts {
    pub cfg: ReaderConfig,
    pub d0: mpsc::UnboundedReceiver<Edge>,
    pub d1: mpsc::UnboundedReceiver<Edge>,
    /// The input lines must live as long as their edge streams.
    pub lines: Vec<Box<dyn hw::InputLine>>,
}

/// A reader's keys: its role and `*`/`#` map, and the PIN being typed.
pub(super) struct Keys {
    pub(super) role: keypad::Role,
    pub(super) map: keypad::StarHash,
    pub(super) entry: PinEntry,
}

impl Keys {
    /// What a decoded frame is for the gate stage.
    fn frame(&mut self, o: Outcome, at: MonoTime) -> Option<ReaderInput> {
        match keypad::classify(self.role, self.map, o) {
            Frame::Card(o) => Some(ReaderInput::Frame(o)),
            Frame::Key(k) => self.key(k, at),
            Frame::Pin(p) => Some(ReaderInput::Pin(p)),
            Frame::KeyRejected(why, bits) => {
                // A key may have been lost: what was typed is not what the resident typed.
                self.entry.clear();
                Some(ReaderInput::KeyRejected { why, bits })
            }
        }
    }

    pub(super) fn key(&mut self, k: Key, at: MonoTime) -> Option<ReaderInput> {
        match self.entry.key(k, at) {
            None | Some(PinEvent::Cleared) => Some(ReaderInput::Key),
            Some(e) => Some(Self::ended(e)),
        }
    }

    pub(super) fn ended(e: PinEvent) -> ReaderInput {
        match e {
            PinEvent::Submit(p) => ReaderInput::Pin(p),
            other => ReaderInput::PinFailed(other.reason().unwrap_or(crate::policy::Reason::PinTimeout)),
        }
    }
}

/// Decode one reader's edges into frames until shutdown.
pub async fn run(ctx: StageCtx, mut r: ReaderParts, out: mpsc::Sender<ReaderOutput>, events: mpsc::Sender<NewEvent>) {
    let formats = r.cfg.parsed_formats();
    let mut dec = Decoder::new(&formats, r.cfg.timing(), r.cfg.early_complete).complete_at(r.cfg.key_bits);
    let mut keys = Keys { role: r.cfg.role(), map: r.cfg.star_hash(), entry: PinEntry::new(ctx.cfg.keypad.entry()) };
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let (reader, door) = (r.cfg.name.clone(), r.cfg.door.clone());
    let emit = |input: ReaderInput, at: MonoTime| ReaderOutput {
        reader: reader.clone(),
        door: door.clone(),
        input,
        at,
        received: MonoTime::now(),
    };
    let mut batch: Vec<WEdge> = Vec::new();
    loop {
        let mut results = Vec::new();
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            e = r.d0.recv() => match e {
                Some(e) => batch.push(WEdge { line: Line::D0, high: e.high, at: e.at }),
                None => { lost(&reader, "D0", &events).await; break }
            },
            e = r.d1.recv() => match e {
                Some(e) => batch.push(WEdge { line: Line::D1, high: e.high, at: e.at }),
                None => { lost(&reader, "D1", &events).await; break }
            },
            _ = sleep_until_mono(dec.deadline()) => {
                // An edge may be on its way, woken in the same instant as this timer (the task
                // that reads the line has not run yet): let it run, and take what it delivered.
                // Those edges then decide by their own timestamps whether the frame went on.
                tokio::task::yield_now().await;
                drain(&mut r.d0, &mut r.d1, &mut batch);
                if batch.is_empty() {
                    let now = MonoTime::now();
                    results.extend(dec.on_deadline(now).and_then(|o| keys.frame(o, now)).map(|o| emit(o, now)));
                }
            }
            _ = sleep_until_mono(keys.entry.deadline()) => {
                let now = MonoTime::now();
                results.extend(keys.entry.tick(now).map(|e| emit(Keys::ended(e), now)));
            }
            _ = beat.tick() => ctx.beat(),
        }
        if !batch.is_empty() {
            // The two lines arrive on two channels: take everything already delivered on both and
            // feed it in timestamp order, so an earlier D1 edge is never decoded after a later D0.
            drain(&mut r.d0, &mut r.d1, &mut batch);
            batch.sort_by_key(|e| e.at);
            ctx.stats.wiegand_edges.fetch_add(batch.len() as u64, Ordering::Relaxed);
            let mut timed = Vec::new();
            for e in batch.drain(..) {
                dec.on_edge_in_time(e, &mut timed);
            }
            results.extend(timed.into_iter().filter_map(|(o, at)| keys.frame(o, at).map(|i| emit(i, at))));
        }
        ctx.stats.wiegand_frames.fetch_add(results.len() as u64, Ordering::Relaxed);
        for o in results {
            if out.send(o).await.is_err() {
                return;
            }
        }
    }
    drop(r.lines);
}

/// A data line's edge stream ended: the driver lost the line (the chip went away). The stage
/// ends, and with it the daemon, for systemd to restart it once the chip is back: a gate that
/// cannot read its reader must not look healthy.
/// The `gpio_line_lost` alarm is stored before the daemon stops, and reaches the BMS with the
/// backlog once the gate is back.
async fn lost(reader: &str, line: &str, events: &mpsc::Sender<NewEvent>) {
    tracing::error!(%reader, %line, "GPIO line lost (board or chip fault): stopping for a restart");
    let detail =
        format!("{line}: the GPIO line was lost (the chip went away); the daemon stops for systemd to restart it");
    let _ = events.send(NewEvent::alarm(wall_ms(), GateAlarm::GpioLineLost, Some(reader), Some(detail))).await;
}

/// Everything already delivered on both lines.
fn drain(d0: &mut mpsc::UnboundedReceiver<Edge>, d1: &mut mpsc::UnboundedReceiver<Edge>, batch: &mut Vec<WEdge>) {
    while let Ok(e) = d0.try_recv() {
        batch.push(WEdge { line: Line::D0, high: e.high, at: e.at });
    }
    while let Ok(e) = d1.try_recv() {
        batch.push(WEdge { line: Line::D1, high: e.high, at: e.at });
    }
}
