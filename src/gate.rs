//! The gate's decisions, pure: what a card frame or a face verdict means at a door, given what
//! the shell read from the store. No I/O, no clock: `now` and the look-ups are passed in.
//!
//! It keeps the state a decision needs across messages: a face verdict waiting at a door for the
//! card of a `face_and_card` attempt (or any verdict a card may complete within the pair
//! window), a card waiting at a door for its holder's PIN (`card_and_pin`), and the wrong-PIN
//! counts and lockouts (`keypad::PinGuard`). The shell (`daemon::stages::gate`) does the reads, hands the outcome's grant to
//! the door stage and its event to the outbox; a face use goes to the privacy stage, so no store
//! write ever runs on the card path.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::bus::{FaceUse, FaceVerdict, ReaderOutput, Verdict};
use crate::clock::MonoTime;
use crate::events::{GateAlarm, Method, NewEvent};
use crate::face::track::score_bucket;
use crate::keypad::{GuardParams, KeyError, PinGuard, Subject};
use crate::model::{AccessMode, Credential, CredentialKind, Resident};
use crate::policy::{self, Attempt, CardPart, Decision, FacePart, Now, PinPart, Reason};
use crate::wiegand::{Bits, CardRead, Rejection};

/// A store read the shell made for the core: `Err` is a store that could not be read.
pub type Lookup<T> = Result<T, String>;

/// A face verdict waiting at a door.
#[derive(Debug, Clone)]
struct PendingFace {
    verdict: Verdict,
    at: MonoTime,
}

/// A card waiting at a door for its holder's PIN.
#[derive(Debug, Clone)]
struct PendingCard {
    reader: String,
    read: CardRead,
    credential: Credential,
    resident: Resident,
    until: MonoTime,
}

/// The keypads of a gate, for the core: which doors have one, how long a card waits for its
/// PIN, and the wrong-PIN limits.
#[derive(Debug, Clone, Default)]
pub struct KeypadSetup {
    pub doors: HashSet<String>,
    pub card_pin_window: Duration,
    pub guard: GuardParams,
}

/// A face verdict taken for a card at the same door, with its resident (if matched and known).
#[derive(Debug, Clone)]
pub struct FaceSeen {
    pub verdict: Verdict,
    pub resident: Option<Resident>,
}

/// What one message decided.
#[derive(Debug, Clone)]
pub struct GateOutcome {
    pub door: String,
    /// `None` for an alarm that decides nothing (a stuck reader line).
    pub decision: Option<Decision>,
    pub resident: Option<String>,
    pub event: NewEvent,
    /// Alarms the attempt raised besides its event (`duress`, `pin_lockout`).
    pub alarms: Vec<NewEvent>,
    /// The store could not be read (the decision is `system_error`).
    pub store_error: bool,
}

impl GateOutcome {
    /// A decision at `door` with its event, nothing more (no alarm, the store was read).
    fn decided(door: &str, decision: Decision, resident: Option<String>, event: NewEvent) -> GateOutcome {
        GateOutcome { door: door.into(), decision: Some(decision), resident, event, alarms: vec![], store_error: false }
    }

    pub fn granted(&self) -> bool {
        self.decision.is_some_and(|d| d.granted)
    }
}

/// What a face verdict leads to.
#[derive(Debug, Clone)]
pub struct FaceStep {
    /// `None`: the verdict waits for the card (`face_and_card`).
    pub outcome: Option<GateOutcome>,
    /// A matched face restarts its template's retention clock.
    pub face_use: Option<FaceUse>,
}

/// The local time facts the policy needs, at wall time `wall` (ms) in a zone `utc_offset_secs`
/// east of UTC.
pub fn now_at(utc_offset_secs: i32, wall: i64) -> Now {
    use chrono::{Datelike, Timelike};
    let local = wall + i64::from(utc_offset_secs) * 1000;
    let dt = chrono::DateTime::from_timestamp_millis(local).unwrap_or_default();
    Now {
        wall_ms: wall,
        day: crate::model::Day::from_monday0(dt.weekday().num_days_from_monday()),
        minute: (dt.hour() * 60 + dt.minute()) as u16,
    }
}

/// The reason code of a rejected frame.
pub fn rejection_reason(why: Rejection) -> Reason {
    if why == Rejection::ParityError {
        Reason::ParityError
    } else {
        Reason::BadFrame
    }
}

/// The pure gate.
#[derive(Debug)]
pub struct GateCore {
    pending: HashMap<String, PendingFace>,
    pair_window: Duration,
    cards: HashMap<String, PendingCard>,
    keypads: KeypadSetup,
    pins: PinGuard,
}

impl GateCore {
    pub fn new(pair_window: Duration) -> GateCore {
        GateCore::with_keypads(pair_window, KeypadSetup::default())
    }

    pub fn with_keypads(pair_window: Duration, keypads: KeypadSetup) -> GateCore {
        let pins = PinGuard::new(keypads.guard);
        GateCore { pending: HashMap::new(), pair_window, cards: HashMap::new(), keypads, pins }
    }

    /// A face verdict on its own: grant (`face_or_card`), refuse, or wait for the card
    /// (`face_and_card`, and any verdict a card may complete within the pair window).
    /// `resident` is the matched resident's record (look it up only for a match).
    pub fn on_face(&mut self, v: &FaceVerdict, resident: Lookup<Option<Resident>>, now: &Now) -> FaceStep {
        let face_use = match &v.verdict {
            Verdict::Matched { resident, .. } => Some(FaceUse { resident: resident.clone(), wall_ms: now.wall_ms }),
            _ => None,
        };
        let decided = |decision: Decision, resident: Option<String>, bucket: Option<&str>, store_error: bool| {
            let event =
                NewEvent::access_face(now.wall_ms, decision, Method::Face, &v.door, resident.as_deref(), None, bucket);
            Some(GateOutcome {
                door: v.door.clone(),
                decision: Some(decision),
                resident,
                event,
                alarms: vec![],
                store_error,
            })
        };
        let outcome = match &v.verdict {
            Verdict::Matched { score, .. } => match resident {
                Ok(Some(r)) if r.mode == AccessMode::FaceAndCard => {
                    self.wait(v);
                    None
                }
                Ok(Some(r)) => {
                    let a = Attempt { face: Some(FacePart::Matched { resident: &r }), ..Attempt::default() };
                    decided(policy::decide(&a, now), Some(r.id.to_string()), Some(score_bucket(*score)), false)
                }
                Ok(None) => decided(Decision { granted: false, reason: Reason::FaceNotRecognized }, None, None, false),
                Err(_) => decided(Decision { granted: false, reason: Reason::SystemError }, None, None, true),
            },
            Verdict::NotRecognized => {
                self.wait(v);
                let a = Attempt { face: Some(FacePart::NotRecognized), ..Attempt::default() };
                decided(policy::decide(&a, now), None, None, false)
            }
            Verdict::Spoof => {
                self.wait(v);
                decided(
                    policy::decide(&Attempt { face: Some(FacePart::Spoof), ..Attempt::default() }, now),
                    None,
                    None,
                    false,
                )
            }
        };
        FaceStep { outcome, face_use }
    }

    fn wait(&mut self, v: &FaceVerdict) {
        self.pending.insert(v.door.clone(), PendingFace { verdict: v.verdict.clone(), at: v.at });
    }

    /// The face verdict at `door` that a card arriving at `mono_now` completes, if any within the
    /// pair window (taken: a verdict takes part in one attempt).
    pub fn take_face(&mut self, door: &str, mono_now: MonoTime) -> Option<Verdict> {
        self.pending.remove(door).filter(|p| mono_now.saturating_sub(p.at) <= self.pair_window).map(|p| p.verdict)
    }

    /// A card frame, with the card's credential and holder, and the face verdict taken for it.
    /// `None`: the card waits at its door for the holder's PIN (`card_and_pin`, or a card in
    /// `face_or_pin`), at a door with a keypad. A card that replaces a waiting one ends that
    /// attempt (`mode_requires_pin`), so every attempt gets its decision.
    pub fn on_card(
        &mut self,
        msg: &ReaderOutput,
        read: CardRead,
        lookup: Lookup<Option<(Credential, Resident)>>,
        face: Option<FaceSeen>,
        now: &Now,
    ) -> Vec<GateOutcome> {
        let mut out: Vec<GateOutcome> = self
            .cards
            .remove(&msg.door)
            .map(|p| self.card_ended(&msg.door, p, Reason::ModeRequiresPin, now))
            .into_iter()
            .collect();
        let face_part = face.as_ref().and_then(|f| match &f.verdict {
            Verdict::Matched { .. } => f.resident.as_ref().map(|r| FacePart::Matched { resident: r }),
            Verdict::NotRecognized => Some(FacePart::NotRecognized),
            Verdict::Spoof => Some(FacePart::Spoof),
        });
        let (decision, resident, store_error) = match &lookup {
            Ok(Some((cred, res))) => {
                let a = Attempt {
                    card: Some(CardPart::Known { credential: cred, resident: res }),
                    face: face_part,
                    pin: None,
                };
                (policy::decide(&a, now), Some(res.id.to_string()), false)
            }
            Ok(None) => {
                (policy::decide(&Attempt { card: Some(CardPart::Unknown), ..Attempt::default() }, now), None, false)
            }
            // Fail secure: a store we cannot read grants nothing.
            Err(_) => (Decision { granted: false, reason: Reason::SystemError }, None, true),
        };
        if let (Reason::ModeRequiresPin, Ok(Some((credential, r)))) = (decision.reason, &lookup) {
            if self.keypads.doors.contains(&msg.door) {
                let until = msg.at + self.keypads.card_pin_window;
                let p = PendingCard {
                    reader: msg.reader.clone(),
                    read,
                    credential: credential.clone(),
                    resident: r.clone(),
                    until,
                };
                self.cards.insert(msg.door.clone(), p);
                return out;
            }
        }
        let with_face = face_part.is_some() && matches!(&lookup, Ok(Some((_, r))) if r.mode == AccessMode::FaceAndCard);
        let event = if with_face {
            let bucket = match face.as_ref().map(|f| &f.verdict) {
                Some(Verdict::Matched { score, .. }) => Some(score_bucket(*score)),
                _ => None,
            };
            NewEvent::access_face_and_card(
                now.wall_ms,
                decision,
                &msg.door,
                &msg.reader,
                resident.as_deref(),
                read.card,
                read.bits,
                bucket,
            )
        } else {
            NewEvent::access_card(
                now.wall_ms,
                decision,
                &msg.door,
                &msg.reader,
                resident.as_deref(),
                Some(read.card),
                read.bits,
                None,
            )
        };
        out.push(GateOutcome {
            door: msg.door.clone(),
            decision: Some(decision),
            resident,
            event,
            alarms: vec![],
            store_error,
        });
        out
    }

    /// A card waits at `door` for its PIN.
    pub fn card_waiting(&self, door: &str) -> bool {
        self.cards.contains_key(door)
    }

    /// The waiting card's attempt ends without its PIN.
    fn card_ended(&self, door: &str, p: PendingCard, reason: Reason, now: &Now) -> GateOutcome {
        let d = Decision { granted: false, reason };
        let resident = Some(p.resident.id.to_string());
        let event = NewEvent::access_pin(
            now.wall_ms,
            d,
            door,
            &p.reader,
            resident.as_deref(),
            Some(p.read.card),
            Some(p.read.bits),
            None,
        );
        GateOutcome::decided(door, d, resident, event)
    }

    /// When [`GateCore::tick`] must next run (a card waiting for its PIN).
    pub fn deadline(&self) -> Option<MonoTime> {
        self.cards.values().map(|p| p.until).min()
    }

    /// Cards whose PIN did not come within the window: `pin_timeout`.
    pub fn tick(&mut self, mono_now: MonoTime, now: &Now) -> Vec<GateOutcome> {
        let late: Vec<String> =
            self.cards.iter().filter(|(_, p)| mono_now >= p.until).map(|(d, _)| d.clone()).collect();
        late.into_iter()
            .filter_map(|d| self.cards.remove(&d).map(|p| self.card_ended(&d, p, Reason::PinTimeout, now)))
            .collect()
    }

    /// A PIN typed at a keypad, with the credential and holder its keyed hash found. It
    /// completes a card waiting at the door, or stands alone. Wrong PINs count towards the
    /// reader's lockout (and the waiting card's holder's); a locked reader or resident is refused
    /// before the PIN is looked at. A duress PIN raises a silent `duress` alarm.
    pub fn on_pin(
        &mut self,
        msg: &ReaderOutput,
        lookup: Lookup<Option<(Credential, Resident)>>,
        mono_now: MonoTime,
        now: &Now,
    ) -> GateOutcome {
        let card = self.cards.remove(&msg.door).filter(|p| mono_now < p.until);
        let holder = card.as_ref().map(|p| p.resident.id.to_string());
        let owner = match &lookup {
            Ok(Some((_, r))) => Some(r.id.to_string()),
            _ => None,
        };
        let locked = self.pins.locked(&Subject::Reader(msg.reader.clone()), mono_now)
            || [&holder, &owner]
                .into_iter()
                .flatten()
                .any(|r| self.pins.locked(&Subject::Resident(r.clone()), mono_now));
        let (decision, store_error) = match &lookup {
            _ if locked => (Decision { granted: false, reason: Reason::PinLockedOut }, false),
            Err(_) => (Decision { granted: false, reason: Reason::SystemError }, true),
            Ok(found) => {
                let pin = Some(match found {
                    Some((c, r)) => PinPart::Known { credential: c, resident: r },
                    None => PinPart::Unknown,
                });
                let a = match &card {
                    Some(p) => Attempt {
                        card: Some(CardPart::Known { credential: &p.credential, resident: &p.resident }),
                        pin,
                        ..Attempt::default()
                    },
                    None => Attempt { pin, ..Attempt::default() },
                };
                (policy::decide(&a, now), false)
            }
        };
        // The event names the card's holder, or the PIN's holder when it stands alone: never the
        // holder of a PIN typed with someone else's card.
        let resident = if card.is_some() { holder.clone() } else { owner.clone() };
        let mut alarms = Vec::new();
        if decision.reason == Reason::PinWrong {
            for s in self.pins.wrong(&msg.reader, holder.as_deref(), mono_now) {
                let (who, detail) = match &s {
                    Subject::Reader(r) => (None, format!("PIN entry locked at reader {r}")),
                    Subject::Resident(r) => (Some(r.as_str()), format!("PIN entry locked for resident {r}")),
                };
                let detail =
                    format!("{detail} for {} s after too many wrong PINs", self.keypads.guard.lockout.as_secs());
                alarms.push(NewEvent::pin_alarm(
                    now.wall_ms,
                    GateAlarm::PinLockout,
                    &msg.door,
                    &msg.reader,
                    who,
                    Some(detail),
                ));
            }
        } else if decision.granted {
            if let Some(r) = &resident {
                self.pins.right(&msg.reader, r);
            }
        }
        let duress = matches!(&lookup, Ok(Some((c, _))) if matches!(c.credential, CredentialKind::Pin(p) if p.duress));
        if duress && !locked && (card.is_none() || holder == owner) {
            alarms.push(NewEvent::pin_alarm(
                now.wall_ms,
                GateAlarm::Duress,
                &msg.door,
                &msg.reader,
                owner.as_deref(),
                None,
            ));
        }
        let (card_id, bits) = card.as_ref().map(|p| (p.read.card, p.read.bits)).unzip();
        let event = NewEvent::access_pin(
            now.wall_ms,
            decision,
            &msg.door,
            &msg.reader,
            resident.as_deref(),
            card_id,
            bits,
            None,
        );
        GateOutcome { door: msg.door.clone(), decision: Some(decision), resident, event, alarms, store_error }
    }

    /// Is PIN entry locked at this reader now (for the feedback stage's lockout cue)?
    pub fn reader_locked(&self, reader: &str, mono_now: MonoTime) -> bool {
        self.pins.locked(&Subject::Reader(reader.to_string()), mono_now)
    }

    /// PIN entry failed (timeout, too long, too short): a denial, ending a waiting card's attempt.
    pub fn on_pin_failed(&mut self, msg: &ReaderOutput, reason: Reason, now: &Now) -> GateOutcome {
        if let Some(p) = self.cards.remove(&msg.door) {
            return self.card_ended(&msg.door, p, reason, now);
        }
        let d = Decision { granted: false, reason };
        let event = NewEvent::access_pin(now.wall_ms, d, &msg.door, &msg.reader, None, None, None, None);
        GateOutcome::decided(&msg.door, d, None, event)
    }

    /// A keypad frame that is no key: a denial (`bad_frame`, or `parity_error` for a 26-bit PIN
    /// frame) with the keypad's reason in `detail`. A waiting card keeps waiting.
    pub fn on_key_rejected(&self, msg: &ReaderOutput, why: KeyError, bits: Bits, wall_ms: i64) -> GateOutcome {
        let reason = if why == KeyError::PinParity { Reason::ParityError } else { Reason::BadFrame };
        let d = Decision { granted: false, reason };
        let event = NewEvent::access_pin(wall_ms, d, &msg.door, &msg.reader, None, None, Some(bits), Some(why.code()));
        GateOutcome::decided(&msg.door, d, None, event)
    }

    /// A frame the decoder rejected: a denial with its reason, or (a line stuck low) an alarm.
    pub fn on_rejected(&self, msg: &ReaderOutput, why: Rejection, bits: Bits, wall_ms: i64) -> GateOutcome {
        if why == Rejection::LineStuckLow {
            let event = NewEvent::alarm(wall_ms, GateAlarm::ReaderLineStuck, Some(&msg.reader), None);
            return GateOutcome {
                door: msg.door.clone(),
                decision: None,
                resident: None,
                event,
                alarms: vec![],
                store_error: false,
            };
        }
        let d = Decision { granted: false, reason: rejection_reason(why) };
        let event = NewEvent::access_card(wall_ms, d, &msg.door, &msg.reader, None, None, bits, Some(why));
        GateOutcome::decided(&msg.door, d, None, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::ReaderInput;
    use crate::model::{CredentialKind, ResidentId, Validity};
    use crate::wiegand::{encode, CardId, Format, Outcome};

    fn now() -> Now {
        Now { wall_ms: 1_800_000_000_000, day: crate::model::Day::from_monday0(0), minute: 600 }
    }

    fn resident(id: &str, mode: AccessMode) -> Resident {
        Resident { id: ResidentId::new(id).unwrap(), mode, validity: Validity::default(), schedule: None }
    }

    fn card_of(r: &Resident, n: u64) -> (Credential, CardId) {
        let card = CardId { format: Format::H10301, facility: 7, number: n };
        (
            Credential {
                credential: CredentialKind::Card(card),
                resident: r.id.clone(),
                validity: Validity::default(),
            },
            card,
        )
    }

    fn frame(card: CardId) -> (ReaderOutput, CardRead) {
        let bits = encode(card.format, card.facility, card.number).unwrap();
        let read = CardRead { card, bits };
        let at = MonoTime::now();
        let msg = ReaderOutput {
            reader: "front".into(),
            door: "front".into(),
            input: ReaderInput::Frame(Outcome::Card(read)),
            at,
            received: at,
        };
        (msg, read)
    }

    fn one(mut v: Vec<GateOutcome>) -> GateOutcome {
        assert_eq!(v.len(), 1, "{v:?}");
        v.pop().unwrap()
    }

    fn verdict(v: Verdict) -> FaceVerdict {
        FaceVerdict { door: "front".into(), verdict: v, at: MonoTime::now() }
    }

    #[test]
    fn face_and_card_waits_for_the_card_then_both_decide_once() {
        let r = resident("r-1", AccessMode::FaceAndCard);
        let mut core = GateCore::new(Duration::from_secs(10));
        let step = core.on_face(
            &verdict(Verdict::Matched { resident: "r-1".into(), score: 0.8 }),
            Ok(Some(r.clone())),
            &now(),
        );
        assert!(step.outcome.is_none(), "face_and_card waits for the card");
        assert_eq!(step.face_use.unwrap().resident, "r-1");
        let (cred, card) = card_of(&r, 5);
        let (msg, read) = frame(card);
        let face = core.take_face("front", MonoTime::now()).map(|v| FaceSeen { verdict: v, resident: Some(r.clone()) });
        assert!(face.is_some());
        let out = one(core.on_card(&msg, read, Ok(Some((cred.clone(), r.clone()))), face, &now()));
        assert!(out.granted(), "{out:?}");
        let json = String::from_utf8(out.event.to_json(1, "s", "g", false)).unwrap();
        assert!(json.contains("\"method\":\"face_and_card\"") && json.contains("\"reader\":\"front\""), "{json}");
        // Taken: the next card alone is not completed by the same verdict.
        assert!(core.take_face("front", MonoTime::now()).is_none());
        let alone = one(core.on_card(&msg, read, Ok(Some((cred, r))), None, &now()));
        assert_eq!(alone.decision.unwrap().reason, Reason::ModeRequiresFace);
    }

    #[test]
    fn a_verdict_outside_the_pair_window_is_not_taken() {
        let mut core = GateCore::new(Duration::from_millis(0));
        let mut v = verdict(Verdict::NotRecognized);
        v.at = MonoTime::now();
        let _ = core.on_face(&v, Ok(None), &now());
        std::thread::sleep(Duration::from_millis(2));
        assert!(core.take_face("front", MonoTime::now()).is_none());
    }

    #[test]
    fn face_or_card_grants_by_face_and_a_store_error_grants_nothing() {
        let r = resident("r-2", AccessMode::FaceOrCard);
        let mut core = GateCore::new(Duration::from_secs(10));
        let v = verdict(Verdict::Matched { resident: "r-2".into(), score: 0.9 });
        let out = core.on_face(&v, Ok(Some(r)), &now()).outcome.unwrap();
        assert!(out.granted());
        let failed = core.on_face(&v, Err("disk".into()), &now()).outcome.unwrap();
        assert!(!failed.granted() && failed.store_error);
        assert_eq!(failed.decision.unwrap().reason, Reason::SystemError);
        let (_, card) = card_of(&resident("x", AccessMode::Card), 9);
        let (msg, read) = frame(card);
        let c = one(core.on_card(&msg, read, Err("disk".into()), None, &now()));
        assert!(!c.granted() && c.store_error);
    }

    #[test]
    fn rejections_map_to_reasons_and_a_stuck_line_is_an_alarm_without_a_decision() {
        let core = GateCore::new(Duration::from_secs(1));
        let (msg, read) = frame(CardId { format: Format::H10301, facility: 1, number: 1 });
        let p = core.on_rejected(&msg, Rejection::ParityError, read.bits, 1);
        assert_eq!(p.decision.unwrap().reason, Reason::ParityError);
        let b = core.on_rejected(&msg, Rejection::ShortFrame, read.bits, 1);
        assert_eq!(b.decision.unwrap().reason, Reason::BadFrame);
        let s = core.on_rejected(&msg, Rejection::LineStuckLow, read.bits, 1);
        assert!(s.decision.is_none());
        assert!(String::from_utf8(s.event.to_json(1, "s", "g", false)).unwrap().contains("reader_line_stuck"));
    }

    fn pin_of(r: &Resident, n: u8, duress: bool) -> Credential {
        Credential {
            credential: CredentialKind::Pin(crate::model::PinHash { hash: [n; 32], duress }),
            resident: r.id.clone(),
            validity: Validity::default(),
        }
    }

    fn keypad_core() -> GateCore {
        let setup = KeypadSetup {
            doors: ["front".to_string()].into(),
            card_pin_window: Duration::from_secs(10),
            guard: GuardParams::default(),
        };
        GateCore::with_keypads(Duration::from_secs(1), setup)
    }

    fn json(e: &NewEvent) -> String {
        String::from_utf8(e.to_json(1, "s", "g", false)).unwrap()
    }

    #[test]
    fn card_and_pin_waits_for_the_holders_pin_and_times_out() {
        let r = resident("r-1", AccessMode::CardAndPin);
        let (cred, card) = card_of(&r, 5);
        let pin = pin_of(&r, 1, false);
        let mut core = keypad_core();
        let (msg, read) = frame(card);
        assert!(core.on_card(&msg, read, Ok(Some((cred.clone(), r.clone()))), None, &now()).is_empty());
        assert!(core.card_waiting("front"));
        let out = core.on_pin(&msg, Ok(Some((pin.clone(), r.clone()))), msg.at, &now());
        assert!(out.granted(), "{out:?}");
        let j = json(&out.event);
        assert!(j.contains("\"method\":\"card_and_pin\"") && j.contains("\"resident\":\"r-1\""), "{j}");
        assert!(!j.contains("hash") && !j.contains(&"01".repeat(8)), "no trace of the PIN's hash: {j}");
        // Someone else's PIN with this card: wrong, and the event does not name the other holder.
        let other = resident("r-2", AccessMode::CardOrPin);
        core.on_card(&msg, read, Ok(Some((cred.clone(), r.clone()))), None, &now());
        let out = core.on_pin(&msg, Ok(Some((pin_of(&other, 2, false), other.clone()))), msg.at, &now());
        assert_eq!(out.decision.unwrap().reason, Reason::PinWrong);
        assert!(!json(&out.event).contains("r-2"));
        // No PIN within the window: pin_timeout, for the card's attempt.
        core.on_card(&msg, read, Ok(Some((cred.clone(), r.clone()))), None, &now());
        assert_eq!(core.deadline(), Some(msg.at + Duration::from_secs(10)));
        assert!(core.tick(msg.at + Duration::from_millis(9_999), &now()).is_empty());
        let late = core.tick(msg.at + Duration::from_secs(10), &now());
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].decision.unwrap().reason, Reason::PinTimeout);
        assert!(json(&late[0].event).contains("\"card\""), "the timed-out attempt names its card");
        assert!(!core.card_waiting("front"));
        // A second card while one waits ends the first attempt.
        core.on_card(&msg, read, Ok(Some((cred.clone(), r.clone()))), None, &now());
        let out = core.on_card(&msg, read, Ok(Some((cred.clone(), r.clone()))), None, &now());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].decision.unwrap().reason, Reason::ModeRequiresPin);
        // At a door without a keypad the card is refused at once.
        let mut plain = GateCore::new(Duration::from_secs(1));
        let out = one(plain.on_card(&msg, read, Ok(Some((cred, r))), None, &now()));
        assert_eq!(out.decision.unwrap().reason, Reason::ModeRequiresPin);
    }

    #[test]
    fn wrong_pins_lock_the_reader_and_a_duress_pin_opens_with_a_silent_alarm() {
        let r = resident("r-1", AccessMode::CardOrPin);
        let mut core = keypad_core();
        let (msg, _) = frame(CardId { format: Format::H10301, facility: 7, number: 1 });
        for i in 0..4u64 {
            let out = core.on_pin(&msg, Ok(None), msg.at + Duration::from_secs(i), &now());
            assert_eq!(out.decision.unwrap().reason, Reason::PinWrong);
            assert!(out.alarms.is_empty());
        }
        let fifth = core.on_pin(&msg, Ok(None), msg.at + Duration::from_secs(4), &now());
        assert_eq!(fifth.alarms.len(), 1);
        assert!(json(&fifth.alarms[0]).contains("\"alarm\":\"pin_lockout\""), "{}", json(&fifth.alarms[0]));
        // Locked: even the right PIN is refused, before it is looked at.
        let right = pin_of(&r, 1, false);
        let t = msg.at + Duration::from_secs(5);
        let out = core.on_pin(&msg, Ok(Some((right.clone(), r.clone()))), t, &now());
        assert_eq!(out.decision.unwrap().reason, Reason::PinLockedOut);
        assert!(core.reader_locked("front", t));
        // Cards are never locked out.
        let (cred, card) = card_of(&r, 5);
        let (cmsg, read) = frame(card);
        assert!(one(core.on_card(&cmsg, read, Ok(Some((cred, r.clone()))), None, &now())).granted());
        // After the lockout, the right PIN opens.
        let after = msg.at + Duration::from_secs(4 + 300);
        assert!(core.on_pin(&msg, Ok(Some((right, r.clone()))), after, &now()).granted());
        // The duress PIN opens as usual and raises `duress`, naming the resident.
        let out = core.on_pin(&msg, Ok(Some((pin_of(&r, 9, true), r.clone()))), after, &now());
        assert!(out.granted());
        assert_eq!(out.alarms.len(), 1);
        let a = json(&out.alarms[0]);
        assert!(a.contains("\"alarm\":\"duress\"") && a.contains("\"resident\":\"r-1\""), "{a}");
        assert!(!json(&out.event).contains("duress"), "the access event looks like any other");
    }

    #[test]
    fn pin_entry_failures_and_refused_key_frames_are_denials() {
        let mut core = keypad_core();
        let (msg, read) = frame(CardId { format: Format::H10301, facility: 7, number: 1 });
        let out = core.on_pin_failed(&msg, Reason::PinTooLong, &now());
        assert_eq!(out.decision.unwrap().reason, Reason::PinTooLong);
        assert!(json(&out.event).contains("\"method\":\"pin\""));
        let out = core.on_key_rejected(&msg, KeyError::BadComplement, read.bits, 1);
        assert_eq!(out.decision.unwrap().reason, Reason::BadFrame);
        assert!(json(&out.event).contains("key_bad_complement"));
        let out = core.on_pin(&msg, Err("disk".into()), msg.at, &now());
        assert!(!out.granted() && out.store_error);
    }
}
