//! Gate events: what the BMS is told, as JSON envelopes with a ULID, a per-gate sequence number
//! and a millisecond timestamp (REQUIREMENTS M2).
//!
//! Events are built here, stored durably by the outbox stage (which assigns `seq`), and published
//! by the MQTT link to `menshen/v1/{site}/{gate}/event/{type}`. No image, no embedding and no
//! score beyond a coarse bucket ever goes into an event (P5).

use serde::{Deserialize, Serialize};

use crate::door::DoorEvent;
use crate::policy::{Decision, Reason};
use crate::wiegand::{Bits, CardId, Rejection};

/// The event topics under `event/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Access,
    Door,
    Alarm,
    Privacy,
    System,
}

impl EventType {
    pub fn name(self) -> &'static str {
        match self {
            EventType::Access => "access",
            EventType::Door => "door",
            EventType::Alarm => "alarm",
            EventType::Privacy => "privacy",
            EventType::System => "system",
        }
    }
}

/// How an attempt was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Card,
    Face,
    FaceAndCard,
    /// A PIN alone on a keypad.
    Pin,
    /// A card and then its holder's PIN.
    CardAndPin,
    Rex,
    Remote,
}

/// The card part of an access event: identity and the raw frame (REQUIREMENTS A2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardInfo {
    pub format: String,
    pub facility: u64,
    pub number: u64,
}

impl From<CardId> for CardInfo {
    fn from(c: CardId) -> Self {
        CardInfo { format: c.format.to_string(), facility: c.facility, number: c.number }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameInfo {
    pub bits: String,
    pub len: u8,
}

impl From<Bits> for FrameInfo {
    fn from(b: Bits) -> Self {
        FrameInfo { bits: b.to_string(), len: b.len }
    }
}

/// The body of an event (everything but the envelope fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Body {
    Access {
        decision: String,
        reason: String,
        method: Method,
        door: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        reader: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        resident: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        card: Option<CardInfo>,
        #[serde(skip_serializing_if = "Option::is_none")]
        frame: Option<FrameInfo>,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
        /// The command that caused it (remote unlock).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// Face decisions: a coarse match bucket (`high`, `medium`, `low`), never the score,
        /// never an image or an embedding.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        face_match: Option<String>,
    },
    Door {
        door: String,
        event: String,
        /// `daemon_start`: the door's real state as the daemon found and set it at start (after
        /// a crash it closes an `unlocked` that no `locked` followed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cause: Option<String>,
    },
    Alarm {
        alarm: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        door: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reader: Option<String>,
        /// The resident it concerns (`duress`, a resident's `pin_lockout`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resident: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A resident's own choices (P2), consent changes (P3) and deletion receipts (P7).
    Privacy {
        privacy: String,
        resident: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_mode: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_mode: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// With `template_deleted`: the signed deletion receipt (P7).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        receipt: Option<Box<serde_json::Value>>,
    },
    System {
        event: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

/// The alarms that are not one door's (those are [`DoorEvent`]s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateAlarm {
    /// A reader's data line held low: wiring or reader fault.
    ReaderLineStuck,
    /// The driver lost a reader's data line (the GPIO chip went away).
    GpioLineLost,
    /// The outbox passed `gate.outbox_alarm_depth`.
    OutboxOverCapacity,
    /// The store could not be written; events were held in memory.
    StoreUnavailable,
    /// The broker refused to take an event.
    PublishRefused,
    /// Too many wrong PINs: PIN entry is locked at a reader or for a resident.
    PinLockout,
    /// A resident typed their duress PIN: the door opened as usual, nothing at the door shows it.
    Duress,
    /// An OSDP reader does not answer (unplugged, wiring, power) for `offline_alarm_ms`.
    ReaderOffline,
    /// An OSDP reader without a Secure Channel (it claims none, or the handshake fails): refused.
    SecureChannelRefused,
    /// An OSDP reader is usable again after `reader_offline` or `secure_channel_refused`.
    ReaderRestored,
    /// An OSDP reader's tamper switch opened.
    ReaderTamper,
    /// An OSDP reader's tamper switch closed again.
    ReaderTamperCleared,
}

impl GateAlarm {
    pub const ALL: [GateAlarm; 12] = [
        GateAlarm::ReaderLineStuck,
        GateAlarm::GpioLineLost,
        GateAlarm::OutboxOverCapacity,
        GateAlarm::StoreUnavailable,
        GateAlarm::PublishRefused,
        GateAlarm::PinLockout,
        GateAlarm::Duress,
        GateAlarm::ReaderOffline,
        GateAlarm::SecureChannelRefused,
        GateAlarm::ReaderRestored,
        GateAlarm::ReaderTamper,
        GateAlarm::ReaderTamperCleared,
    ];

    pub fn code(self) -> &'static str {
        match self {
            GateAlarm::ReaderLineStuck => "reader_line_stuck",
            GateAlarm::GpioLineLost => "gpio_line_lost",
            GateAlarm::OutboxOverCapacity => "outbox_over_capacity",
            GateAlarm::StoreUnavailable => "store_unavailable",
            GateAlarm::PublishRefused => "publish_refused",
            GateAlarm::PinLockout => "pin_lockout",
            GateAlarm::Duress => "duress",
            GateAlarm::ReaderOffline => "reader_offline",
            GateAlarm::SecureChannelRefused => "secure_channel_refused",
            GateAlarm::ReaderRestored => "reader_restored",
            GateAlarm::ReaderTamper => "reader_tamper",
            GateAlarm::ReaderTamperCleared => "reader_tamper_cleared",
        }
    }
}

/// Every `alarm` code an `event/alarm` can carry: the doors' and the gate's.
pub fn alarm_codes() -> Vec<&'static str> {
    let doors = DoorEvent::ALL.into_iter().filter(|e| e.is_alarm()).map(DoorEvent::code);
    doors.chain(GateAlarm::ALL.into_iter().map(GateAlarm::code)).collect()
}

/// An event not yet stored (it has no id or sequence number yet).
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: EventType,
    pub ts_ms: i64,
    pub body: Body,
}

/// The envelope as stored and published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    pub seq: u64,
    pub ts_ms: i64,
    pub site: String,
    pub gate: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Made while the broker was unreachable: it reaches the BMS late.
    pub backfill: bool,
    #[serde(flatten)]
    pub body: Body,
}

impl NewEvent {
    /// The stored JSON for this event with its sequence number.
    pub fn to_json(&self, seq: u64, site: &str, gate: &str, backfill: bool) -> Vec<u8> {
        let env = Envelope {
            id: ulid::Ulid::new().to_string(),
            seq,
            ts_ms: self.ts_ms,
            site: site.to_string(),
            gate: gate.to_string(),
            kind: self.kind,
            backfill,
            body: self.body.clone(),
        };
        // A struct of strings and numbers always serialises.
        serde_json::to_vec(&env).unwrap_or_default()
    }

    /// An access decision, every field given: the one place the access body is built.
    #[allow(clippy::too_many_arguments)]
    fn access(
        ts_ms: i64,
        decision: Decision,
        method: Method,
        door: &str,
        reader: Option<&str>,
        resident: Option<&str>,
        card: Option<CardId>,
        frame: Option<Bits>,
        detail: Option<&str>,
        face_match: Option<&str>,
    ) -> NewEvent {
        NewEvent {
            kind: EventType::Access,
            ts_ms,
            body: Body::Access {
                decision: if decision.granted { "granted" } else { "denied" }.into(),
                reason: decision.reason.code().into(),
                method,
                door: door.into(),
                reader: reader.map(str::to_string),
                resident: resident.map(str::to_string),
                card: card.map(CardInfo::from),
                frame: frame.map(FrameInfo::from),
                detail: detail.map(str::to_string),
                request_id: None,
                face_match: face_match.map(str::to_string),
            },
        }
    }

    /// A card decision (or a rejected frame: `detail` says why).
    #[allow(clippy::too_many_arguments)]
    pub fn access_card(
        ts_ms: i64,
        decision: Decision,
        door: &str,
        reader: &str,
        resident: Option<&str>,
        card: Option<CardId>,
        bits: Bits,
        detail: Option<Rejection>,
    ) -> NewEvent {
        let detail = detail.map(Rejection::code);
        NewEvent::access(ts_ms, decision, Method::Card, door, Some(reader), resident, card, Some(bits), detail, None)
    }

    /// A keypad decision: `pin` alone, or `card_and_pin` (with the card). Carries no digit and no
    /// hash of the PIN. `detail` says why a key burst was refused (`key_bad_complement`, ...).
    #[allow(clippy::too_many_arguments)]
    pub fn access_pin(
        ts_ms: i64,
        decision: Decision,
        door: &str,
        reader: &str,
        resident: Option<&str>,
        card: Option<CardId>,
        frame: Option<Bits>,
        detail: Option<&str>,
    ) -> NewEvent {
        let method = if card.is_some() { Method::CardAndPin } else { Method::Pin };
        NewEvent::access(ts_ms, decision, method, door, Some(reader), resident, card, frame, detail, None)
    }

    /// A face decision (`method` `face`). Carries no image, no embedding and no score: at most
    /// the coarse bucket of a match.
    pub fn access_face(
        ts_ms: i64,
        decision: Decision,
        method: Method,
        door: &str,
        resident: Option<&str>,
        card: Option<CardId>,
        face_match: Option<&str>,
    ) -> NewEvent {
        NewEvent::access(ts_ms, decision, method, door, None, resident, card, None, None, face_match)
    }

    /// A `face_and_card` decision: the card's frame and reader, and the face's match bucket.
    #[allow(clippy::too_many_arguments)]
    pub fn access_face_and_card(
        ts_ms: i64,
        decision: Decision,
        door: &str,
        reader: &str,
        resident: Option<&str>,
        card: CardId,
        bits: Bits,
        face_match: Option<&str>,
    ) -> NewEvent {
        let m = Method::FaceAndCard;
        NewEvent::access(ts_ms, decision, m, door, Some(reader), resident, Some(card), Some(bits), None, face_match)
    }

    pub fn exit_request(ts_ms: i64, door: &str) -> NewEvent {
        NewEvent {
            kind: EventType::Access,
            ts_ms,
            body: Body::Access {
                decision: "granted".into(),
                reason: Reason::ExitRequest.code().into(),
                method: Method::Rex,
                door: door.into(),
                reader: None,
                resident: None,
                card: None,
                frame: None,
                detail: None,
                request_id: None,
                face_match: None,
            },
        }
    }

    /// A remote unlock by a BMS command.
    pub fn remote_unlock(ts_ms: i64, door: &str, request_id: &str, duration_ms: u64) -> NewEvent {
        NewEvent {
            kind: EventType::Access,
            ts_ms,
            body: Body::Access {
                decision: "granted".into(),
                reason: Reason::RemoteUnlock.code().into(),
                method: Method::Remote,
                door: door.into(),
                reader: None,
                resident: None,
                card: None,
                frame: None,
                detail: Some(format!("{duration_ms} ms")),
                request_id: Some(request_id.into()),
                face_match: None,
            },
        }
    }

    /// A resident's access mode changed (P2: audited and confirmed by an event).
    pub fn mode_changed(ts_ms: i64, resident: &str, from: &str, to: &str, request_id: Option<&str>) -> NewEvent {
        NewEvent {
            kind: EventType::Privacy,
            ts_ms,
            body: Body::Privacy {
                privacy: "mode_changed".into(),
                resident: resident.into(),
                from_mode: Some(from.into()),
                to_mode: Some(to.into()),
                request_id: request_id.map(str::to_string),
                receipt: None,
            },
        }
    }

    /// A face template and its key were destroyed: the signed receipt (P7).
    pub fn template_deleted<R: DeletionReceipt>(ts_ms: i64, r: &R) -> NewEvent {
        NewEvent {
            kind: EventType::Privacy,
            ts_ms,
            body: Body::Privacy {
                privacy: "template_deleted".into(),
                resident: r.resident().to_string(),
                from_mode: None,
                to_mode: None,
                request_id: None,
                // A struct of strings and numbers always serialises.
                receipt: Some(Box::new(serde_json::to_value(r).unwrap_or_default())),
            },
        }
    }

    /// A face consent was recorded or withdrawn (P3): `consent_recorded` / `consent_withdrawn`.
    pub fn consent(ts_ms: i64, what: &str, resident: &str, request_id: Option<&str>) -> NewEvent {
        NewEvent {
            kind: EventType::Privacy,
            ts_ms,
            body: Body::Privacy {
                privacy: what.into(),
                resident: resident.into(),
                from_mode: None,
                to_mode: None,
                request_id: request_id.map(str::to_string),
                receipt: None,
            },
        }
    }

    pub fn door(ts_ms: i64, door: &str, e: DoorEvent) -> NewEvent {
        if e.is_alarm() {
            NewEvent {
                kind: EventType::Alarm,
                ts_ms,
                body: Body::Alarm {
                    alarm: e.code().into(),
                    door: Some(door.into()),
                    reader: None,
                    resident: None,
                    detail: None,
                },
            }
        } else {
            NewEvent {
                kind: EventType::Door,
                ts_ms,
                body: Body::Door { door: door.into(), event: e.code().into(), cause: None },
            }
        }
    }

    /// The lock's state as the daemon set it at start: `locked` (or `unlocked` while a fire
    /// input holds the door open), with `cause: daemon_start`.
    pub fn door_at_start(ts_ms: i64, door: &str, unlocked: bool) -> NewEvent {
        let event = if unlocked { DoorEvent::Unlocked } else { DoorEvent::Locked };
        NewEvent {
            kind: EventType::Door,
            ts_ms,
            body: Body::Door { door: door.into(), event: event.code().into(), cause: Some("daemon_start".into()) },
        }
    }

    pub fn alarm(ts_ms: i64, alarm: GateAlarm, reader: Option<&str>, detail: Option<String>) -> NewEvent {
        NewEvent {
            kind: EventType::Alarm,
            ts_ms,
            body: Body::Alarm {
                alarm: alarm.code().into(),
                door: None,
                reader: reader.map(str::to_string),
                resident: None,
                detail,
            },
        }
    }

    /// A keypad alarm at a door (`duress`, `pin_lockout`), naming the resident where known.
    pub fn pin_alarm(
        ts_ms: i64,
        alarm: GateAlarm,
        door: &str,
        reader: &str,
        resident: Option<&str>,
        detail: Option<String>,
    ) -> NewEvent {
        NewEvent {
            kind: EventType::Alarm,
            ts_ms,
            body: Body::Alarm {
                alarm: alarm.code().into(),
                door: Some(door.into()),
                reader: Some(reader.into()),
                resident: resident.map(str::to_string),
                detail,
            },
        }
    }

    pub fn system(ts_ms: i64, event: &str, detail: Option<String>) -> NewEvent {
        NewEvent { kind: EventType::System, ts_ms, body: Body::System { event: event.into(), detail } }
    }

    /// `roster_changed`: what changed and the request that changed it (MQTT or CLI).
    pub fn roster_changed(ts_ms: i64, what: &str, request_id: &str) -> NewEvent {
        NewEvent::system(ts_ms, "roster_changed", Some(format!("{what} (request {request_id})")))
    }
}

/// Just enough of a stored envelope to route it.
#[derive(Debug, Deserialize)]
pub struct Head {
    #[serde(rename = "type")]
    pub kind: EventType,
}

/// A signed deletion receipt, as an event carries it (`privacy::Receipt`): the events know its
/// shape, not the keys that sign it.
pub trait DeletionReceipt: Serialize {
    fn resident(&self) -> &str;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wiegand::{encode, Format};

    #[test]
    fn access_event_json_has_the_envelope_fields() {
        let bits = encode(Format::H10301, 7, 12345).unwrap();
        let card = CardId { format: Format::H10301, facility: 7, number: 12345 };
        let d = Decision { granted: true, reason: Reason::Granted };
        let e = NewEvent::access_card(1_700_000_000_123, d, "front", "front", Some("r1"), Some(card), bits, None);
        let json = e.to_json(42, "s", "g", false);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["type"], "access");
        assert_eq!(v["decision"], "granted");
        assert_eq!(v["reason"], "granted");
        assert_eq!(v["method"], "card");
        assert_eq!(v["card"]["number"], 12345);
        assert_eq!(v["frame"]["len"], 26);
        assert_eq!(v["ts_ms"], 1_700_000_000_123i64);
        assert_eq!(v["id"].as_str().unwrap().len(), 26, "a ULID");
        let back: Envelope = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.seq, 42);
        let head: Head = serde_json::from_slice(&json).unwrap();
        assert_eq!(head.kind, EventType::Access);
    }

    #[test]
    fn door_alarms_go_to_the_alarm_topic() {
        assert_eq!(NewEvent::door(0, "d", DoorEvent::Forced).kind, EventType::Alarm);
        assert_eq!(NewEvent::door(0, "d", DoorEvent::Opened).kind, EventType::Door);
    }
}
