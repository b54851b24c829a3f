//! The shapes of command arguments (strict: unknown fields are refused).

use serde::{Deserialize, Serialize};

use super::{CmdError, ErrorCode};
use crate::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Schedule, Validity};
use crate::wiegand::{encode, CardId, Format};

/// A card as commands name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardSpec {
    pub format: Format,
    pub facility: u64,
    pub number: u64,
    #[serde(default)]
    pub validity: Validity,
}

impl CardSpec {
    pub fn card(&self) -> CardId {
        CardId { format: self.format, facility: self.facility, number: self.number }
    }

    pub(super) fn check(&self) -> Result<(), CmdError> {
        if self.format == Format::Raw {
            return Err(CmdError::new(ErrorCode::InvalidValue, "raw frames cannot be enrolled as cards"));
        }
        encode(self.format, self.facility, self.number)
            .map_err(|e| CmdError::new(ErrorCode::InvalidValue, format!("card: {e}")))?;
        self.validity.validate().map_err(|e| CmdError::new(ErrorCode::InvalidValue, format!("card validity: {e}")))
    }

    pub fn credential(&self, holder: &ResidentId) -> Credential {
        Credential { credential: CredentialKind::Card(self.card()), resident: holder.clone(), validity: self.validity }
    }
}

/// A resident with the complete set of their cards (upsert and roster entries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidentSpec {
    pub id: ResidentId,
    pub mode: AccessMode,
    #[serde(default)]
    pub validity: Validity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// When present, the resident's cards become exactly these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cards: Option<Vec<CardSpec>>,
}

impl ResidentSpec {
    pub fn resident(&self) -> Resident {
        Resident { id: self.id.clone(), mode: self.mode, validity: self.validity, schedule: self.schedule.clone() }
    }

    pub fn credentials(&self) -> Option<Vec<Credential>> {
        self.cards.as_ref().map(|cs| cs.iter().map(|c| c.credential(&self.id)).collect())
    }

    pub(super) fn check(&self) -> Result<(), CmdError> {
        self.resident().validate().map_err(|e| CmdError::new(ErrorCode::InvalidValue, e))?;
        if let Some(cards) = &self.cards {
            if cards.len() > 64 {
                return Err(CmdError::new(ErrorCode::InvalidValue, "at most 64 cards per resident"));
            }
            for c in cards {
                c.check()?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UnlockArgs {
    pub(super) door: String,
    #[serde(default)]
    pub(super) duration_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpsertArgs {
    pub(super) resident: ResidentSpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResidentArgs {
    pub(super) resident: ResidentId,
}

/// `consent.record`: the resident's separate consent to face processing (P3), as given through
/// the BMS. There is no field for "irrevocable" or "unlimited": unknown fields are refused, and
/// the retention is bounded by the site's limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentArgs {
    pub resident: ResidentId,
    /// The rules version and sha256 the resident was shown (from `rules.get`).
    pub rules_version: String,
    pub rules_sha256: String,
    /// How it was given (`bms`, `app`, `paper`, ...).
    #[serde(default = "default_channel")]
    pub channel: String,
    #[serde(default)]
    pub retention_days: Option<u32>,
    #[serde(default)]
    pub minor: bool,
    #[serde(default)]
    pub guardian: Option<ResidentId>,
}

/// `face.enrol`: how many good frames, and how long the resident may take to give them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FaceEnrolArgs {
    pub(super) resident: ResidentId,
    #[serde(default)]
    pub(super) frames: Option<u64>,
    #[serde(default)]
    pub(super) timeout_ms: Option<u64>,
}

/// Bounds of `face.enrol`.
pub const ENROL_FRAMES: std::ops::RangeInclusive<u64> = 1..=10;
pub const ENROL_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 1_000..=30_000;

fn default_channel() -> String {
    "bms".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetModeArgs {
    pub(super) resident: ResidentId,
    pub(super) mode: AccessMode,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CredentialAddArgs {
    pub(super) resident: ResidentId,
    #[serde(default)]
    pub(super) card: Option<CardSpec>,
    #[serde(default)]
    pub(super) pin: Option<PinSpec>,
}

/// A PIN as `credential.add` carries it: the digits (inbound only: never in a reply, an event,
/// a log or an export), whether it is the duress PIN, and its validity.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinSpec {
    pub pin: PinDigits,
    #[serde(default)]
    pub duress: bool,
    #[serde(default)]
    pub validity: Validity,
}

/// The digits of a PIN. Deserializing never echoes the value in an error (serde's messages
/// would: "invalid type: integer `482913`"), and `Debug` prints no digit.
#[derive(Clone, PartialEq)]
pub struct PinDigits(pub crate::keypad::Pin);

impl std::fmt::Debug for PinDigits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for PinDigits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d).map_err(|_| serde::de::Error::custom(PIN_SHAPE))?;
        v.as_str()
            .and_then(crate::keypad::Pin::parse)
            .filter(|p| !p.is_empty())
            .map(PinDigits)
            .ok_or_else(|| serde::de::Error::custom(PIN_SHAPE))
    }
}

const PIN_SHAPE: &str = "pin.pin must be a string of digits (\"482913\")";

/// Which of a resident's PINs `credential.remove` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinSlot {
    /// Their PIN.
    Pin,
    /// Their duress PIN.
    Duress,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CardRef {
    pub(super) format: Format,
    pub(super) facility: u64,
    pub(super) number: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CredentialRemoveArgs {
    #[serde(default)]
    pub(super) card: Option<CardRef>,
    /// With `pin`: whose PIN.
    #[serde(default)]
    pub(super) resident: Option<ResidentId>,
    #[serde(default)]
    pub(super) pin: Option<PinSlot>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RosterArgs {
    pub(super) version: u64,
    pub(super) residents: Vec<ResidentSpec>,
    /// Paging (all three or none): which sync this page belongs to, its 0-based index, and how
    /// many pages the sync has.
    #[serde(default)]
    pub(super) sync_id: Option<String>,
    #[serde(default)]
    pub(super) page: Option<u32>,
    #[serde(default)]
    pub(super) pages: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchArgs {
    #[serde(default)]
    pub(super) upserts: Vec<ResidentSpec>,
    #[serde(default)]
    pub(super) removes: Vec<ResidentId>,
}

/// Where a page of a paged `roster.sync` belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paging {
    pub sync_id: String,
    pub page: u32,
    pub pages: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Empty {}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackfillArgs {
    pub(super) from_seq: u64,
    #[serde(default)]
    pub(super) limit: Option<usize>,
}
