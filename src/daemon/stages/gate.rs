//! The gate stage: the shell around `gate::GateCore`. It reads the store (MVCC snapshots, never
//! blocked by a commit), lets the core decide, hands a grant to the door stage, and the event to
//! the outbox. It never writes the store: a face use goes to the privacy stage, so no card waits
//! behind a commit (an event batch's fdatasync, an enrolment).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;

use super::{recv_opt, StageCtx};
use crate::bus::{DoorCmd, FaceUse, FaceVerdict, ReaderOutput, Verdict};
use crate::clock::{wall_ms, MonoTime};
use crate::events::NewEvent;
use crate::gate::{now_at, FaceSeen, GateCore, GateOutcome};
use crate::model::ResidentId;
use crate::stats::GrantTrace;
use crate::wiegand::{Outcome, Rejection};

/// The gate stage's channels.
pub struct GateIo {
    pub frames: mpsc::Receiver<ReaderOutput>,
    /// Face verdicts (none without a face path).
    pub faces: Option<mpsc::Receiver<FaceVerdict>>,
    pub doors: HashMap<String, mpsc::Sender<DoorCmd>>,
    pub events: mpsc::Sender<NewEvent>,
    /// Face uses, for the privacy stage to record (none without one).
    pub face_uses: Option<mpsc::Sender<FaceUse>>,
}

/// Decide every frame and verdict until shutdown.
pub async fn run(ctx: StageCtx, mut io: GateIo) {
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut core = GateCore::new(Duration::from_millis(ctx.cfg.face.pair_window_ms));
    loop {
        let outcome = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            m = io.frames.recv() => match m {
                Some(m) => on_frame(&ctx, &mut core, m),
                None => break,
            },
            v = recv_opt(&mut io.faces) => match v {
                Some(v) => on_face(&ctx, &mut core, &io, v),
                None => { io.faces = None; continue }
            },
            _ = beat.tick() => { ctx.beat(); continue }
        };
        let Some((outcome, trace)) = outcome else { continue };
        dispatch(&ctx, &io, &outcome, trace);
        if io.events.send(outcome.event).await.is_err() {
            break;
        }
    }
}

/// A reader's frame: a card (with any face verdict waiting at its door), or a rejection.
fn on_frame(ctx: &StageCtx, core: &mut GateCore, msg: ReaderOutput) -> Option<(GateOutcome, GrantTrace)> {
    let wall = wall_ms();
    let now = now_at(ctx.cfg.utc_offset_secs(), wall);
    let outcome = match msg.outcome {
        Outcome::Card(read) => {
            let face = core.take_face(&msg.door, MonoTime::now()).map(|verdict| {
                let resident = match &verdict {
                    Verdict::Matched { resident, .. } => face_resident(ctx, resident).ok().flatten(),
                    _ => None,
                };
                FaceSeen { verdict, resident }
            });
            let lookup = ctx.store.lookup_card(&read.card).map_err(|e| e.to_string());
            let out = core.on_card(&msg, read, lookup, face, &now);
            tracing::info!(
                door = %msg.door, reader = %msg.reader, card = %read.card.masked(),
                resident = out.resident.as_deref().unwrap_or("-"),
                decision = decision_word(&out), reason = reason_code(&out), "access"
            );
            out
        }
        Outcome::Rejected { why, bits } => {
            ctx.stats.reject(why);
            let out = core.on_rejected(&msg, why, bits, wall);
            if why == Rejection::LineStuckLow {
                tracing::warn!(reader = %msg.reader, "Wiegand line stuck low (wiring or reader fault)");
            } else {
                tracing::info!(
                    door = %msg.door, reader = %msg.reader, bits = bits.len, detail = why.code(),
                    decision = "denied", reason = reason_code(&out), "access"
                );
            }
            out
        }
    };
    let trace = GrantTrace { edge: msg.at, received: msg.received, decided: MonoTime::now() };
    Some((outcome, trace))
}

/// A face verdict: decided now, or waiting at its door for the card.
fn on_face(ctx: &StageCtx, core: &mut GateCore, io: &GateIo, v: FaceVerdict) -> Option<(GateOutcome, GrantTrace)> {
    let wall = wall_ms();
    let resident = match &v.verdict {
        Verdict::Matched { resident, .. } => face_resident(ctx, resident),
        _ => Ok(None),
    };
    let step = core.on_face(&v, resident, &now_at(ctx.cfg.utc_offset_secs(), wall));
    if let (Some(u), Some(tx)) = (step.face_use, &io.face_uses) {
        // A lost record only makes the template expire sooner (P7); it never holds up a card.
        if tx.try_send(u).is_err() {
            tracing::warn!("face use not recorded (privacy stage busy)");
        }
    }
    let Some(out) = step.outcome else {
        tracing::info!(door = %v.door, "face matched: waiting for the card (face_and_card)");
        return None;
    };
    tracing::info!(
        door = %v.door, method = "face", resident = out.resident.as_deref().unwrap_or("-"),
        decision = decision_word(&out), reason = reason_code(&out), "access"
    );
    Some((out, GrantTrace { edge: v.at, received: v.at, decided: MonoTime::now() }))
}

/// The one place a decision reaches a door and the counters.
fn dispatch(ctx: &StageCtx, io: &GateIo, out: &GateOutcome, trace: GrantTrace) {
    if out.store_error {
        tracing::error!("store lookup failed");
        ctx.stats.store_errors.fetch_add(1, Ordering::Relaxed);
    }
    let Some(decision) = out.decision else { return };
    if decision.granted {
        match io.doors.get(&out.door).map(|d| d.try_send(DoorCmd::Grant(trace))) {
            Some(Ok(())) => {}
            _ => tracing::error!(door = %out.door, "door stage not accepting grants"),
        }
        ctx.stats.granted.fetch_add(1, Ordering::Relaxed);
    } else {
        ctx.stats.denied.fetch_add(1, Ordering::Relaxed);
    }
}

/// The resident of a face match (a read).
fn face_resident(ctx: &StageCtx, id: &str) -> Result<Option<crate::model::Resident>, String> {
    let rid = ResidentId::new(id).map_err(|e| e.to_string())?;
    ctx.store.resident(&rid).map_err(|e| e.to_string())
}

fn decision_word(out: &GateOutcome) -> &'static str {
    if out.granted() {
        "granted"
    } else {
        "denied"
    }
}

fn reason_code(out: &GateOutcome) -> &'static str {
    out.decision.map_or("-", |d| d.reason.code())
}
