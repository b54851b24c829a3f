//! The gate stage: the shell around `gate::GateCore`. It reads the store (MVCC snapshots, never
//! blocked by a commit), lets the core decide, hands a grant to the door stage, and the event to
//! the outbox. It never writes the store: a face use goes to the privacy stage, so no card waits
//! behind a commit (an event batch's fdatasync, an enrolment).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use super::{recv_opt, sleep_until_mono, StageCtx};
use crate::bus::{DoorCmd, FaceUse, FaceVerdict, ReaderInput, ReaderOutput, Verdict};
use crate::clock::{wall_ms, MonoTime};
use crate::config::Config;
use crate::events::NewEvent;
use crate::feedback::Cue;
use crate::gate::{now_at, FaceSeen, GateCore, GateOutcome, KeypadSetup};
use crate::keypad::{Pin, PinKey};
use crate::model::{PinHash, ResidentId};
use crate::policy::Reason;
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
    /// Each reader's feedback stage (readers with LEDs or a beeper), by reader name.
    pub cues: HashMap<String, mpsc::Sender<Cue>>,
    /// The key PINs are hashed with before they are looked up (none: it could not be loaded,
    /// and every PIN is refused with `system_error`).
    pub pin_key: Option<Arc<PinKey>>,
}

/// One decision to hand on: the outcome, its timing, and the reader that showed it (none: every
/// reader of the door).
type Decided = (GateOutcome, GrantTrace, Option<String>);

/// What the core needs to know of the gate's keypads.
pub fn keypad_setup(cfg: &Config) -> KeypadSetup {
    KeypadSetup {
        doors: cfg
            .readers
            .iter()
            .filter(|r| r.has_keys())
            .map(|r| r.door.clone())
            .chain(cfg.osdp_readers.iter().map(|r| r.door.clone()))
            .collect(),
        card_pin_window: Duration::from_millis(cfg.keypad.card_pin_window_ms),
        guard: cfg.keypad.guard(),
    }
}

/// Decide every frame and verdict until shutdown.
pub async fn run(ctx: StageCtx, mut io: GateIo) {
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut core = GateCore::with_keypads(Duration::from_millis(ctx.cfg.face.pair_window_ms), keypad_setup(&ctx.cfg));
    loop {
        let decided: Vec<Decided> = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            m = io.frames.recv() => match m {
                Some(m) => on_frame(&ctx, &mut core, &io, m),
                None => break,
            },
            v = recv_opt(&mut io.faces) => match v {
                Some(v) => on_face(&ctx, &mut core, &io, v).map(|(o, t)| (o, t, None)).into_iter().collect(),
                None => { io.faces = None; continue }
            },
            _ = sleep_until_mono(core.deadline()) => {
                let (mono, wall) = (MonoTime::now(), wall_ms());
                let trace = GrantTrace { edge: mono, received: mono, decided: mono };
                let out = core.tick(mono, &now_at(ctx.cfg.utc_offset_secs(), wall));
                out.into_iter().map(|o| { log_access(&o, "card_and_pin"); (o, trace, None) }).collect()
            },
            _ = beat.tick() => { ctx.beat(); continue }
        };
        for (outcome, trace, reader) in decided {
            dispatch(&ctx, &io, &outcome, trace);
            if let Some(d) = outcome.decision {
                let cue = match (d.granted, d.reason) {
                    (true, _) => Cue::Granted,
                    (false, Reason::PinLockedOut) => Cue::Lockout,
                    (false, _) => Cue::Denied,
                };
                // A card shows at its reader; a face decision at every reader of its door.
                cue_readers(&ctx, &io, &outcome.door, reader.as_deref(), cue);
            }
            for e in std::iter::once(outcome.event).chain(outcome.alarms) {
                if io.events.send(e).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A reader's input: a card (with any face verdict waiting at its door), a PIN, or a refusal.
fn on_frame(ctx: &StageCtx, core: &mut GateCore, io: &GateIo, msg: ReaderOutput) -> Vec<Decided> {
    let wall = wall_ms();
    let now = now_at(ctx.cfg.utc_offset_secs(), wall);
    let outcomes = match &msg.input {
        ReaderInput::Frame(Outcome::Card(read)) => {
            let read = *read;
            let face = core.take_face(&msg.door, MonoTime::now()).map(|verdict| {
                let resident = match &verdict {
                    Verdict::Matched { resident, .. } => face_resident(ctx, resident).ok().flatten(),
                    _ => None,
                };
                FaceSeen { verdict, resident }
            });
            let lookup = ctx.store.lookup_card(&read.card).map_err(|e| e.to_string());
            let out = core.on_card(&msg, read, lookup, face, &now);
            if core.card_waiting(&msg.door) {
                tracing::info!(door = %msg.door, reader = %msg.reader, card = %read.card.masked(), "card: waiting for the PIN");
                cue_keypads(ctx, io, &msg.door);
            }
            for o in &out {
                tracing::info!(
                    door = %msg.door, reader = %msg.reader, card = %read.card.masked(),
                    resident = o.resident.as_deref().unwrap_or("-"),
                    decision = decision_word(o), reason = reason_code(o), "access"
                );
            }
            out
        }
        ReaderInput::Frame(Outcome::Rejected { why, bits }) => {
            let (why, bits) = (*why, *bits);
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
            vec![out]
        }
        ReaderInput::Key => {
            let cue = if core.reader_locked(&msg.reader, MonoTime::now()) { Cue::Lockout } else { Cue::PinEntry };
            cue_readers(ctx, io, &msg.door, Some(&msg.reader), cue);
            Vec::new()
        }
        ReaderInput::Pin(pin) => {
            let lookup = match &io.pin_key {
                Some(key) => lookup_pin(ctx, key, pin),
                None => Err("the PIN key could not be loaded".into()),
            };
            let out = core.on_pin(&msg, lookup, MonoTime::now(), &now);
            log_access(&out, "pin");
            vec![out]
        }
        ReaderInput::PinFailed(reason) => {
            let out = core.on_pin_failed(&msg, *reason, &now);
            log_access(&out, "pin");
            vec![out]
        }
        ReaderInput::KeyRejected { why, bits } => {
            ctx.stats.reject_key(*why);
            let out = core.on_key_rejected(&msg, *why, *bits, wall);
            tracing::info!(door = %msg.door, reader = %msg.reader, bits = bits.len, detail = why.code(), "keypad frame refused");
            vec![out]
        }
    };
    let trace = GrantTrace { edge: msg.at, received: msg.received, decided: MonoTime::now() };
    outcomes.into_iter().map(|o| (o, trace, Some(msg.reader.clone()))).collect()
}

/// A PIN's holder, found by its keyed hash (the PIN itself is never looked up, stored or logged).
fn lookup_pin(
    ctx: &StageCtx,
    key: &PinKey,
    pin: &Pin,
) -> crate::gate::Lookup<Option<(crate::model::Credential, crate::model::Resident)>> {
    ctx.store.lookup_credential(&PinHash::key_of(&key.hash(pin))).map_err(|e| e.to_string())
}

fn log_access(out: &GateOutcome, method: &str) {
    tracing::info!(
        door = %out.door, method, resident = out.resident.as_deref().unwrap_or("-"),
        decision = decision_word(out), reason = reason_code(out), "access"
    );
}

/// Tell every keypad of `door` that a card waits for its PIN.
fn cue_keypads(ctx: &StageCtx, io: &GateIo, door: &str) {
    for (name, _) in ctx.cfg.door_readers(door).filter(|(_, keys)| *keys) {
        if let Some(tx) = io.cues.get(name) {
            let _ = tx.try_send(Cue::PinEntry);
        }
    }
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
        cue_readers(ctx, io, &v.door, None, Cue::FaceWaiting);
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

/// Show `cue` at `reader`, or at every reader of `door`. Never waits: a busy feedback stage
/// loses the cue, not the next card.
fn cue_readers(ctx: &StageCtx, io: &GateIo, door: &str, reader: Option<&str>, cue: Cue) {
    for (name, _) in ctx.cfg.door_readers(door).filter(|(name, _)| reader.is_none_or(|r| r == *name)) {
        if let Some(tx) = io.cues.get(name) {
            let _ = tx.try_send(cue);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessMode, Credential, CredentialKind, Resident, Validity};
    use crate::wiegand::{encode, CardId, CardRead, Format};
    use std::sync::Arc;

    fn resident(id: &str, mode: AccessMode, card: u64) -> (Resident, Credential) {
        let rid = ResidentId::new(id).unwrap();
        let c = CardId { format: Format::H10301, facility: 7, number: card };
        let cred =
            Credential { credential: CredentialKind::Card(c), resident: rid.clone(), validity: Validity::default() };
        (Resident { id: rid, mode, validity: Validity::default(), schedule: None }, cred)
    }

    fn card_frame(door: &str, number: u64) -> ReaderOutput {
        let card = CardId { format: Format::H10301, facility: 7, number };
        let bits = encode(card.format, card.facility, card.number).unwrap();
        let at = MonoTime::now();
        ReaderOutput {
            reader: door.into(),
            door: door.into(),
            input: ReaderInput::Frame(Outcome::Card(CardRead { card, bits })),
            at,
            received: at,
        }
    }

    /// Defect: a face verdict made the gate task write the store (the face use) on the async
    /// worker; redb has one writer, so it waited for any commit in progress, and so did every
    /// card behind it. With the store's write transaction held for the whole test, a face grant
    /// and a card grant must both reach the door, and the face use must reach the privacy stage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_card_is_granted_while_a_store_write_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut t: toml::Table = toml::from_str(crate::config::DEFAULT_CONFIG).unwrap();
        t["gate"].as_table_mut().unwrap().insert("state_dir".into(), dir.path().display().to_string().into());
        let cfg = Arc::new(crate::config::parse(&toml::to_string(&t).unwrap()).unwrap());
        let door = cfg.doors[0].name.clone();
        let store = Arc::new(crate::store::Store::open(&cfg.store_path()).unwrap());
        for (r, c) in [resident("r-card", AccessMode::Card, 1), resident("r-face", AccessMode::FaceOrCard, 2)] {
            store.add_resident(&r, &[c], 0).unwrap();
        }
        // A commit in progress: the one write transaction, held until the end of the test.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let st = store.clone();
        let holder = std::thread::spawn(move || {
            let tx = st.write_for_test().unwrap();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
            drop(tx);
        });
        held_rx.recv().unwrap();

        let ctx = StageCtx {
            name: "gate".into(),
            cfg: cfg.clone(),
            store: store.clone(),
            stats: Arc::new(crate::stats::Stats::default()),
            shutdown: tokio_util::sync::CancellationToken::new(),
            started: MonoTime::now(),
        };
        let (frame_tx, frames) = mpsc::channel(8);
        let (face_tx, faces) = mpsc::channel(8);
        let (door_tx, mut door_rx) = mpsc::channel(8);
        let (events, mut event_rx) = mpsc::channel(8);
        let (use_tx, mut use_rx) = mpsc::channel(8);
        let io = GateIo {
            frames,
            faces: Some(faces),
            doors: HashMap::from([(door.clone(), door_tx)]),
            events,
            face_uses: Some(use_tx),
            cues: HashMap::new(),
            pin_key: None,
        };
        let stage = tokio::spawn(run(ctx.clone(), io));
        let matched = Verdict::Matched { resident: "r-face".into(), score: 0.9 };
        face_tx.send(FaceVerdict { door: door.clone(), verdict: matched, at: MonoTime::now() }).await.unwrap();
        frame_tx.send(card_frame(&door, 1)).await.unwrap();
        // A bound only against a hang: with the write held, before the fix nothing ever arrives.
        let within = Duration::from_secs(20);
        for which in ["face", "card"] {
            let cmd = tokio::time::timeout(within, door_rx.recv()).await;
            assert!(matches!(cmd, Ok(Some(DoorCmd::Grant(_)))), "the {which} grant did not reach the door: {cmd:?}");
            let ev = tokio::time::timeout(within, event_rx.recv()).await.unwrap().unwrap();
            assert!(String::from_utf8(ev.to_json(1, "s", "g", false)).unwrap().contains("\"granted\""));
        }
        let u = tokio::time::timeout(within, use_rx.recv()).await.unwrap().unwrap();
        assert_eq!(u.resident, "r-face");
        assert!(!holder.is_finished(), "the write was held throughout");
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        ctx.shutdown.cancel();
        stage.await.unwrap();
    }
}
