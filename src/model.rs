//! Domain types: residents, access modes, credentials, validity windows and weekly schedules.
//!
//! Preconditions live in the types: a [`ResidentId`] is always a short opaque reference (never a
//! name), a [`Schedule`] window always has `start < end`. The store keeps no names or other
//! personal details: the BMS maps a resident reference to a person.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::wiegand::CardId;

/// An opaque resident reference chosen by the BMS: 1–64 characters of `A-Z a-z 0-9 _ - .`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ResidentId(String);

impl ResidentId {
    pub fn new(s: &str) -> Result<ResidentId, String> {
        let ok = !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if ok {
            Ok(ResidentId(s.to_string()))
        } else {
            Err(format!(
                "resident id `{}` must be 1-64 characters of A-Z, a-z, 0-9, `_`, `-`, `.`",
                s.chars().take(80).collect::<String>()
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ResidentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ResidentId::new(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ResidentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a resident may get in. The resident chooses (P2); face is never required (P1).
///
/// Every mode that admits face names a non-face credential kind, [`AccessMode::fallback`], that
/// the Art. 10 guard (`policy::guard`) requires the resident to hold: `face_or_card` and
/// `face_and_card` a card, `face_or_pin` a PIN. So no mode can leave face as the only way in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessMode {
    /// A card alone. Face is not used at all.
    Card,
    /// Either a recognised face or a card.
    FaceOrCard,
    /// A card and the recognised face of the same resident (two factors).
    FaceAndCard,
    /// A card, or the resident's PIN on a keypad.
    CardOrPin,
    /// A card and then its holder's PIN at the same reader (two factors).
    CardAndPin,
    /// Either a recognised face or the resident's PIN.
    FaceOrPin,
}

/// A kind of non-face credential a mode relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    Card,
    Pin,
}

impl AccessMode {
    pub const ALL: [AccessMode; 6] = [
        AccessMode::Card,
        AccessMode::FaceOrCard,
        AccessMode::FaceAndCard,
        AccessMode::CardOrPin,
        AccessMode::CardAndPin,
        AccessMode::FaceOrPin,
    ];

    pub fn admits_face(self) -> bool {
        matches!(self, AccessMode::FaceOrCard | AccessMode::FaceAndCard | AccessMode::FaceOrPin)
    }

    /// A card alone opens.
    pub fn card_alone(self) -> bool {
        matches!(self, AccessMode::Card | AccessMode::FaceOrCard | AccessMode::CardOrPin)
    }

    /// A PIN alone (without a card) opens.
    pub fn pin_alone(self) -> bool {
        matches!(self, AccessMode::CardOrPin | AccessMode::FaceOrPin)
    }

    /// A face alone opens.
    pub fn face_alone(self) -> bool {
        matches!(self, AccessMode::FaceOrCard | AccessMode::FaceOrPin)
    }

    /// The non-face credential a face mode requires the resident to hold (P1); `None` for the
    /// modes without face.
    pub fn fallback(self) -> Option<Factor> {
        match self {
            AccessMode::FaceOrCard | AccessMode::FaceAndCard => Some(Factor::Card),
            AccessMode::FaceOrPin => Some(Factor::Pin),
            AccessMode::Card | AccessMode::CardOrPin | AccessMode::CardAndPin => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AccessMode::Card => "card",
            AccessMode::FaceOrCard => "face_or_card",
            AccessMode::FaceAndCard => "face_and_card",
            AccessMode::CardOrPin => "card_or_pin",
            AccessMode::CardAndPin => "card_and_pin",
            AccessMode::FaceOrPin => "face_or_pin",
        }
    }
}

impl fmt::Display for AccessMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AccessMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AccessMode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            format!("unknown access mode `{s}` (expected one of: {})", AccessMode::ALL.map(AccessMode::name).join(", "))
        })
    }
}

/// A validity window in Unix milliseconds; either end may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until_ms: Option<i64>,
}

/// Where `now` falls relative to a validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidityState {
    NotYetValid,
    Valid,
    Expired,
}

impl Validity {
    pub fn check(&self, now_ms: i64) -> ValidityState {
        if self.valid_from_ms.is_some_and(|f| now_ms < f) {
            ValidityState::NotYetValid
        } else if self.valid_until_ms.is_some_and(|u| now_ms >= u) {
            ValidityState::Expired
        } else {
            ValidityState::Valid
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        match (self.valid_from_ms, self.valid_until_ms) {
            (Some(f), Some(u)) if f >= u => Err(format!("valid_from ({f}) must be before valid_until ({u})")),
            _ => Ok(()),
        }
    }
}

/// A day of the week, Monday first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Day {
    pub fn from_monday0(n: u32) -> Day {
        [Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri, Day::Sat, Day::Sun][(n % 7) as usize]
    }
}

/// One weekly window: on these days, from `start` to `end` (minutes after local midnight,
/// `end` exclusive, `start < end`; a night shift is two windows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub days: Vec<Day>,
    /// "HH:MM"
    pub start: HourMinute,
    /// "HH:MM", or "24:00" for the end of the day.
    pub end: HourMinute,
}

/// A time of day as "HH:MM" (00:00 to 24:00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HourMinute(pub u16);

impl FromStr for HourMinute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || format!("`{s}` is not a time of day HH:MM");
        let (h, m) = s.split_once(':').ok_or_else(err)?;
        let (h, m): (u16, u16) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
        if m >= 60 || h > 24 || (h == 24 && m != 0) || s.len() != 5 {
            return Err(err());
        }
        Ok(HourMinute(h * 60 + m))
    }
}

impl Serialize for HourMinute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:02}:{:02}", self.0 / 60, self.0 % 60))
    }
}

impl<'de> Deserialize<'de> for HourMinute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A weekly schedule: access is allowed inside any window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub windows: Vec<Window>,
}

impl Schedule {
    pub fn validate(&self) -> Result<(), String> {
        if self.windows.is_empty() {
            return Err("a schedule needs at least one window (omit it for no restriction)".into());
        }
        for (i, w) in self.windows.iter().enumerate() {
            if w.days.is_empty() {
                return Err(format!("schedule window {i} has no days"));
            }
            if w.start >= w.end {
                return Err(format!("schedule window {i}: start must be before end"));
            }
        }
        Ok(())
    }

    pub fn allows(&self, day: Day, minute: u16) -> bool {
        self.windows.iter().any(|w| w.days.contains(&day) && w.start.0 <= minute && minute < w.end.0)
    }
}

/// A resident as the gate knows them: a reference, a mode, a validity window, a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resident {
    pub id: ResidentId,
    pub mode: AccessMode,
    #[serde(default)]
    pub validity: Validity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
}

impl Resident {
    pub fn validate(&self) -> Result<(), String> {
        self.validity.validate()?;
        if let Some(s) = &self.schedule {
            s.validate()?;
        }
        Ok(())
    }
}

/// What a credential is. Face templates are not credentials here: they live in the privacy store
/// and never count as a way in on their own (P1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CredentialKind {
    Card(CardId),
    /// A PIN, as its keyed hash (`keypad::PinKey`): the digits are never stored.
    Pin(PinHash),
}

/// A PIN's keyed hash (HMAC-SHA-256 under the gate's PIN key), and whether it is the resident's
/// duress PIN (opens as usual and raises a silent `duress` alarm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinHash {
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
    #[serde(default)]
    pub duress: bool,
}

impl PinHash {
    /// The store key of a PIN with this hash (the same for its normal and duress use, so one
    /// PIN can never be both, nor held by two residents).
    pub fn key_of(hash: &[u8; 32]) -> String {
        format!("pin:{}", crate::digest::hex(hash))
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::digest::hex(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let bytes = crate::digest::unhex(&s).ok_or_else(|| serde::de::Error::custom("a PIN hash is 64 hex digits"))?;
        bytes.try_into().map_err(|_| serde::de::Error::custom("a PIN hash is 64 hex digits"))
    }
}

impl CredentialKind {
    pub fn key(&self) -> String {
        match self {
            CredentialKind::Card(c) => c.key(),
            CredentialKind::Pin(p) => PinHash::key_of(&p.hash),
        }
    }

    /// For logs and the audit trail: the card number masked; a PIN is never shown, not even its
    /// hash.
    pub fn masked(&self) -> String {
        match self {
            CredentialKind::Card(c) => format!("card {}", c.masked()),
            CredentialKind::Pin(p) if p.duress => "duress pin".into(),
            CredentialKind::Pin(_) => "pin".into(),
        }
    }

    pub fn is_pin(&self) -> bool {
        matches!(self, CredentialKind::Pin(_))
    }

    /// Every credential kind here is a non-face way in.
    pub fn is_non_face(&self) -> bool {
        true
    }

    /// The factor it gives; a duress PIN counts for nothing (it raises an alarm at every use).
    pub fn factor(&self) -> Option<Factor> {
        match self {
            CredentialKind::Card(_) => Some(Factor::Card),
            CredentialKind::Pin(p) if !p.duress => Some(Factor::Pin),
            CredentialKind::Pin(_) => None,
        }
    }
}

/// A credential held by a resident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub credential: CredentialKind,
    pub resident: ResidentId,
    #[serde(default)]
    pub validity: Validity,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_ids_are_opaque_and_bounded() {
        assert!(ResidentId::new("r-0001.a_b").is_ok());
        for bad in ["", "has space", "名字", &"x".repeat(65), "a/b"] {
            assert!(ResidentId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hour_minute_parsing() {
        assert_eq!("07:30".parse::<HourMinute>().unwrap().0, 450);
        assert_eq!("24:00".parse::<HourMinute>().unwrap().0, 1440);
        for bad in ["7:30", "24:01", "12:60", "ab:cd", "1230"] {
            assert!(bad.parse::<HourMinute>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validity_edges() {
        let v = Validity { valid_from_ms: Some(100), valid_until_ms: Some(200) };
        assert_eq!(v.check(99), ValidityState::NotYetValid);
        assert_eq!(v.check(100), ValidityState::Valid);
        assert_eq!(v.check(199), ValidityState::Valid);
        assert_eq!(v.check(200), ValidityState::Expired);
        assert!(Validity { valid_from_ms: Some(5), valid_until_ms: Some(5) }.validate().is_err());
    }

    #[test]
    fn schedule_windows() {
        let s = Schedule {
            windows: vec![Window { days: vec![Day::Mon, Day::Fri], start: HourMinute(480), end: HourMinute(1080) }],
        };
        assert!(s.allows(Day::Mon, 480));
        assert!(!s.allows(Day::Mon, 1080));
        assert!(!s.allows(Day::Tue, 600));
        assert!(Schedule::default().validate().is_err());
    }
}

/// A resident's separate consent to face recognition (REQUIREMENTS P3, SPC Art. 2, PIPL Art. 29):
/// for face processing alone, naming the published rules they were shown. There is no field that
/// could make it irrevocable or unlimited: it can always be withdrawn, and the template it covers
/// is deleted after `retention_days` without face use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaceConsent {
    pub granted_ms: i64,
    pub rules_version: String,
    /// SHA-256 of the rules text shown (hex).
    #[serde(default)]
    pub rules_sha256: String,
    /// Always `gate_access`: recognition at this gate, nothing else (P8).
    #[serde(default = "default_purpose")]
    pub purpose: String,
    /// Days without face use after which the template is deleted.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// How it was given: `bms`, `cli`, `paper`, `app`, ... (a short word).
    #[serde(default)]
    pub channel: String,
    /// The resident is a minor: their guardian consents (PIPL Art. 31).
    #[serde(default)]
    pub minor: bool,
    /// For a minor: the guardian who consented (an opaque reference, never a name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardian: Option<String>,
}

/// The longest retention a consent may name (10 years); there is no unlimited consent.
pub const MAX_RETENTION_DAYS: u32 = 3650;

pub(crate) const DAY_MS: i64 = 86_400_000;

impl FaceConsent {
    /// What every stored consent must be (P3).
    pub fn validate(&self) -> Result<(), String> {
        let word = |s: &str| {
            !s.is_empty() && s.len() <= 32 && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        };
        if self.rules_version.is_empty() || self.rules_version.len() > 64 {
            return Err("rules_version must name the published rules (1-64 characters)".into());
        }
        if self.rules_sha256.len() != 64 || !self.rules_sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("rules_sha256 must be the 64-digit SHA-256 of the rules text".into());
        }
        if self.purpose != "gate_access" {
            return Err(format!("purpose `{}`: the only purpose is `gate_access` (P8)", self.purpose));
        }
        if self.retention_days == 0 || self.retention_days > MAX_RETENTION_DAYS {
            return Err(format!(
                "retention_days must be 1..={MAX_RETENTION_DAYS} (got {}): a consent is never unlimited",
                self.retention_days
            ));
        }
        if !word(&self.channel) {
            return Err("channel must be a short word (bms, cli, paper, app)".into());
        }
        match (&self.guardian, self.minor) {
            (Some(g), _) => {
                ResidentId::new(g).map_err(|e| format!("guardian: {e}"))?;
            }
            (None, true) => return Err("a minor's consent is given by a guardian: name the guardian".into()),
            (None, false) => {}
        }
        Ok(())
    }
}

fn default_purpose() -> String {
    "gate_access".into()
}

fn default_retention_days() -> u32 {
    365
}
