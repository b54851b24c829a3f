//! The gate's decisions, pure: what a card frame or a face verdict means at a door, given what
//! the shell read from the store. No I/O, no clock: `now` and the look-ups are passed in.
//!
//! It keeps the one piece of state a decision needs across messages: a face verdict waiting at a
//! door for the card of a `face_and_card` attempt (or any verdict a card may complete within the
//! pair window). The shell (`daemon::stages::gate`) does the reads, hands the outcome's grant to
//! the door stage and its event to the outbox; a face use goes to the privacy stage, so no store
//! write ever runs on the card path.

use std::collections::HashMap;
use std::time::Duration;

use crate::bus::{FaceUse, FaceVerdict, ReaderOutput, Verdict};
use crate::clock::MonoTime;
use crate::events::{GateAlarm, Method, NewEvent};
use crate::face::track::score_bucket;
use crate::model::{AccessMode, Credential, Resident};
use crate::policy::{self, Attempt, CardPart, Decision, FacePart, Now, Reason};
use crate::wiegand::{Bits, CardRead, Rejection};

/// A store read the shell made for the core: `Err` is a store that could not be read.
pub type Lookup<T> = Result<T, String>;

/// A face verdict waiting at a door.
#[derive(Debug, Clone)]
struct PendingFace {
    verdict: Verdict,
    at: MonoTime,
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
    /// The store could not be read (the decision is `system_error`).
    pub store_error: bool,
}

impl GateOutcome {
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
}

impl GateCore {
    pub fn new(pair_window: Duration) -> GateCore {
        GateCore { pending: HashMap::new(), pair_window }
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
            Some(GateOutcome { door: v.door.clone(), decision: Some(decision), resident, event, store_error })
        };
        let outcome = match &v.verdict {
            Verdict::Matched { score, .. } => match resident {
                Ok(Some(r)) if r.mode == AccessMode::FaceAndCard => {
                    self.wait(v);
                    None
                }
                Ok(Some(r)) => {
                    let a = Attempt { card: None, face: Some(FacePart::Matched { resident: &r }) };
                    decided(policy::decide(&a, now), Some(r.id.to_string()), Some(score_bucket(*score)), false)
                }
                Ok(None) => decided(Decision { granted: false, reason: Reason::FaceNotRecognized }, None, None, false),
                Err(_) => decided(Decision { granted: false, reason: Reason::SystemError }, None, None, true),
            },
            Verdict::NotRecognized => {
                self.wait(v);
                let a = Attempt { card: None, face: Some(FacePart::NotRecognized) };
                decided(policy::decide(&a, now), None, None, false)
            }
            Verdict::Spoof => {
                self.wait(v);
                decided(policy::decide(&Attempt { card: None, face: Some(FacePart::Spoof) }, now), None, None, false)
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
    pub fn on_card(
        &self,
        msg: &ReaderOutput,
        read: CardRead,
        lookup: Lookup<Option<(Credential, Resident)>>,
        face: Option<FaceSeen>,
        now: &Now,
    ) -> GateOutcome {
        let face_part = face.as_ref().and_then(|f| match &f.verdict {
            Verdict::Matched { .. } => f.resident.as_ref().map(|r| FacePart::Matched { resident: r }),
            Verdict::NotRecognized => Some(FacePart::NotRecognized),
            Verdict::Spoof => Some(FacePart::Spoof),
        });
        let (decision, resident, store_error) = match &lookup {
            Ok(Some((cred, res))) => {
                let a = Attempt { card: Some(CardPart::Known { credential: cred, resident: res }), face: face_part };
                (policy::decide(&a, now), Some(res.id.to_string()), false)
            }
            Ok(None) => (policy::decide(&Attempt { card: Some(CardPart::Unknown), face: None }, now), None, false),
            // Fail secure: a store we cannot read grants nothing.
            Err(_) => (Decision { granted: false, reason: Reason::SystemError }, None, true),
        };
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
        GateOutcome { door: msg.door.clone(), decision: Some(decision), resident, event, store_error }
    }

    /// A frame the decoder rejected: a denial with its reason, or (a line stuck low) an alarm.
    pub fn on_rejected(&self, msg: &ReaderOutput, why: Rejection, bits: Bits, wall_ms: i64) -> GateOutcome {
        if why == Rejection::LineStuckLow {
            let event = NewEvent::alarm(wall_ms, GateAlarm::ReaderLineStuck, Some(&msg.reader), None);
            return GateOutcome { door: msg.door.clone(), decision: None, resident: None, event, store_error: false };
        }
        let d = Decision { granted: false, reason: rejection_reason(why) };
        let event = NewEvent::access_card(wall_ms, d, &msg.door, &msg.reader, None, None, bits, Some(why));
        GateOutcome { door: msg.door.clone(), decision: Some(d), resident: None, event, store_error: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            outcome: Outcome::Card(read),
            at,
            received: at,
        };
        (msg, read)
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
        let out = core.on_card(&msg, read, Ok(Some((cred.clone(), r.clone()))), face, &now());
        assert!(out.granted(), "{out:?}");
        let json = String::from_utf8(out.event.to_json(1, "s", "g", false)).unwrap();
        assert!(json.contains("\"method\":\"face_and_card\"") && json.contains("\"reader\":\"front\""), "{json}");
        // Taken: the next card alone is not completed by the same verdict.
        assert!(core.take_face("front", MonoTime::now()).is_none());
        let alone = core.on_card(&msg, read, Ok(Some((cred, r))), None, &now());
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
        let c = core.on_card(&msg, read, Err("disk".into()), None, &now());
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
}
