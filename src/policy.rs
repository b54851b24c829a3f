//! Access policy: one decision with one reason code for every attempt (REQUIREMENTS A1, A5), and
//! the Art. 10 guard (P1) that keeps face from ever being the only way in.
//!
//! Pure: the caller looks up the resident and credential and passes `now` in. No I/O, no clock.

use serde::{Deserialize, Serialize};

use crate::model::{AccessMode, Credential, Day, Resident, ValidityState};

/// Why a decision came out as it did. The wire names are the reason codes of REQUIREMENTS A1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Granted,
    /// A request-to-exit button press (always granted: egress is never blocked).
    ExitRequest,
    /// A BMS `unlock` command (authenticated by the broker, checked for replay by the gate).
    RemoteUnlock,
    UnknownCard,
    ParityError,
    /// Noise, a short or wrong-length frame, both lines low: not a card read at all.
    BadFrame,
    CredentialExpired,
    CredentialNotYetValid,
    ResidentExpired,
    ResidentNotYetValid,
    OutsideSchedule,
    /// Mode `face_and_card` and only a card was shown.
    ModeRequiresFace,
    /// Mode `card` (or `face_and_card`) and only a face was shown.
    ModeRequiresCard,
    FaceNotRecognized,
    SpoofSuspected,
    /// Card and face belong to different residents.
    FaceCardMismatch,
    /// The gate could not decide (e.g. the store could not be read): fail secure.
    SystemError,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::Granted => "granted",
            Reason::ExitRequest => "exit_request",
            Reason::RemoteUnlock => "remote_unlock",
            Reason::UnknownCard => "unknown_card",
            Reason::ParityError => "parity_error",
            Reason::BadFrame => "bad_frame",
            Reason::CredentialExpired => "credential_expired",
            Reason::CredentialNotYetValid => "credential_not_yet_valid",
            Reason::ResidentExpired => "resident_expired",
            Reason::ResidentNotYetValid => "resident_not_yet_valid",
            Reason::OutsideSchedule => "outside_schedule",
            Reason::ModeRequiresFace => "mode_requires_face",
            Reason::ModeRequiresCard => "mode_requires_card",
            Reason::FaceNotRecognized => "face_not_recognized",
            Reason::SpoofSuspected => "spoof_suspected",
            Reason::FaceCardMismatch => "face_card_mismatch",
            Reason::SystemError => "system_error",
        }
    }
}

/// A decision: grant or deny, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub granted: bool,
    pub reason: Reason,
}

impl Decision {
    fn deny(reason: Reason) -> Decision {
        Decision { granted: false, reason }
    }
    fn grant() -> Decision {
        Decision { granted: true, reason: Reason::Granted }
    }
}

/// The moment of the decision: wall-clock milliseconds and the local weekday and minute of day
/// (the shell converts with the configured time zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall_ms: i64,
    pub day: Day,
    pub minute: u16,
}

/// What the card reader contributed to an attempt.
#[derive(Debug, Clone, Copy)]
pub enum CardPart<'a> {
    /// A frame that decoded, for a card nobody holds.
    Unknown,
    Known {
        credential: &'a Credential,
        resident: &'a Resident,
    },
}

/// What the face path contributed to an attempt.
#[derive(Debug, Clone, Copy)]
pub enum FacePart<'a> {
    NotRecognized,
    Spoof,
    Matched { resident: &'a Resident },
}

/// One attempt at the door: a card, a face, or both (for `face_and_card`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Attempt<'a> {
    pub card: Option<CardPart<'a>>,
    pub face: Option<FacePart<'a>>,
}

fn resident_checks(r: &Resident, now: &Now) -> Option<Reason> {
    match r.validity.check(now.wall_ms) {
        ValidityState::Expired => return Some(Reason::ResidentExpired),
        ValidityState::NotYetValid => return Some(Reason::ResidentNotYetValid),
        ValidityState::Valid => {}
    }
    match &r.schedule {
        Some(s) if !s.allows(now.day, now.minute) => Some(Reason::OutsideSchedule),
        _ => None,
    }
}

fn credential_checks(c: &Credential, now: &Now) -> Option<Reason> {
    match c.validity.check(now.wall_ms) {
        ValidityState::Expired => Some(Reason::CredentialExpired),
        ValidityState::NotYetValid => Some(Reason::CredentialNotYetValid),
        ValidityState::Valid => None,
    }
}

/// Decide one attempt.
pub fn decide(attempt: &Attempt<'_>, now: &Now) -> Decision {
    match (attempt.card, attempt.face) {
        (None, None) => Decision::deny(Reason::BadFrame),
        (Some(CardPart::Unknown), _) => Decision::deny(Reason::UnknownCard),
        (Some(CardPart::Known { credential, resident }), face) => {
            if let Some(r) = credential_checks(credential, now).or_else(|| resident_checks(resident, now)) {
                return Decision::deny(r);
            }
            match (resident.mode, face) {
                (AccessMode::Card | AccessMode::FaceOrCard, _) => Decision::grant(),
                (AccessMode::FaceAndCard, None) => Decision::deny(Reason::ModeRequiresFace),
                (AccessMode::FaceAndCard, Some(FacePart::NotRecognized)) => Decision::deny(Reason::FaceNotRecognized),
                (AccessMode::FaceAndCard, Some(FacePart::Spoof)) => Decision::deny(Reason::SpoofSuspected),
                (AccessMode::FaceAndCard, Some(FacePart::Matched { resident: f })) => {
                    if f.id == resident.id {
                        Decision::grant()
                    } else {
                        Decision::deny(Reason::FaceCardMismatch)
                    }
                }
            }
        }
        (None, Some(FacePart::NotRecognized)) => Decision::deny(Reason::FaceNotRecognized),
        (None, Some(FacePart::Spoof)) => Decision::deny(Reason::SpoofSuspected),
        (None, Some(FacePart::Matched { resident })) => {
            if let Some(r) = resident_checks(resident, now) {
                return Decision::deny(r);
            }
            match resident.mode {
                AccessMode::FaceOrCard => Decision::grant(),
                AccessMode::Card | AccessMode::FaceAndCard => Decision::deny(Reason::ModeRequiresCard),
            }
        }
    }
}

/// Why a resident state was refused by the Art. 10 guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error(
        "resident {resident} would have mode {mode} without a valid card: face must never be the only way in \
         (SPC 2021 face-recognition provisions Art. 10, REQUIREMENTS P1); add a card first, or set the mode to `card`"
    )]
    FaceOnly { resident: String, mode: AccessMode },
}

/// The Art. 10 guard (P1), the one place this rule lives: a resident whose mode admits face must
/// hold at least one non-face credential that is not expired at `now_ms`. Every write that can
/// change a resident's mode or credentials runs it on the state it would produce.
pub fn guard(resident: &Resident, credentials: &[Credential], now_ms: i64) -> Result<(), GuardError> {
    if !resident.mode.admits_face() {
        return Ok(());
    }
    let has_way_in = credentials.iter().any(|c| {
        c.resident == resident.id && c.credential.is_non_face() && c.validity.check(now_ms) != ValidityState::Expired
    });
    if has_way_in {
        Ok(())
    } else {
        Err(GuardError::FaceOnly { resident: resident.id.to_string(), mode: resident.mode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CredentialKind, HourMinute, ResidentId, Schedule, Validity, Window};
    use crate::wiegand::{CardId, Format};
    use proptest::prelude::*;

    fn resident(id: &str, mode: AccessMode) -> Resident {
        Resident { id: ResidentId::new(id).unwrap(), mode, validity: Validity::default(), schedule: None }
    }

    fn card(r: &Resident, n: u64) -> Credential {
        Credential {
            credential: CredentialKind::Card(CardId { format: Format::H10301, facility: 7, number: n }),
            resident: r.id.clone(),
            validity: Validity::default(),
        }
    }

    const NOW: Now = Now { wall_ms: 1_000_000, day: Day::Wed, minute: 600 };

    fn card_only<'a>(c: &'a Credential, r: &'a Resident) -> Attempt<'a> {
        Attempt { card: Some(CardPart::Known { credential: c, resident: r }), face: None }
    }

    #[test]
    fn card_modes() {
        for (mode, want) in [
            (AccessMode::Card, Reason::Granted),
            (AccessMode::FaceOrCard, Reason::Granted),
            (AccessMode::FaceAndCard, Reason::ModeRequiresFace),
        ] {
            let r = resident("a", mode);
            let c = card(&r, 1);
            let d = decide(&card_only(&c, &r), &NOW);
            assert_eq!(d.reason, want, "{mode}");
            assert_eq!(d.granted, want == Reason::Granted);
        }
    }

    #[test]
    fn face_modes() {
        let cases = [
            (AccessMode::Card, Reason::ModeRequiresCard),
            (AccessMode::FaceOrCard, Reason::Granted),
            (AccessMode::FaceAndCard, Reason::ModeRequiresCard),
        ];
        for (mode, want) in cases {
            let r = resident("a", mode);
            let a = Attempt { card: None, face: Some(FacePart::Matched { resident: &r }) };
            assert_eq!(decide(&a, &NOW).reason, want, "{mode}");
        }
        let a = Attempt { card: None, face: Some(FacePart::Spoof) };
        assert_eq!(decide(&a, &NOW).reason, Reason::SpoofSuspected);
        let a = Attempt { card: None, face: Some(FacePart::NotRecognized) };
        assert_eq!(decide(&a, &NOW).reason, Reason::FaceNotRecognized);
    }

    #[test]
    fn two_factor_needs_the_same_resident() {
        let r = resident("a", AccessMode::FaceAndCard);
        let other = resident("b", AccessMode::FaceOrCard);
        let c = card(&r, 1);
        let both = |f| Attempt { card: Some(CardPart::Known { credential: &c, resident: &r }), face: Some(f) };
        assert!(decide(&both(FacePart::Matched { resident: &r }), &NOW).granted);
        assert_eq!(decide(&both(FacePart::Matched { resident: &other }), &NOW).reason, Reason::FaceCardMismatch);
        assert_eq!(decide(&both(FacePart::Spoof), &NOW).reason, Reason::SpoofSuspected);
    }

    #[test]
    fn unknown_card_and_validity_and_schedule() {
        assert_eq!(decide(&Attempt { card: Some(CardPart::Unknown), face: None }, &NOW).reason, Reason::UnknownCard);
        let r = resident("a", AccessMode::Card);
        let mut c = card(&r, 1);
        c.validity.valid_until_ms = Some(NOW.wall_ms);
        assert_eq!(decide(&card_only(&c, &r), &NOW).reason, Reason::CredentialExpired);
        c.validity = Validity { valid_from_ms: Some(NOW.wall_ms + 1), valid_until_ms: None };
        assert_eq!(decide(&card_only(&c, &r), &NOW).reason, Reason::CredentialNotYetValid);
        let c = card(&r, 1);
        let mut r2 = r.clone();
        r2.validity.valid_until_ms = Some(1);
        assert_eq!(decide(&card_only(&c, &r2), &NOW).reason, Reason::ResidentExpired);
        let mut r3 = r.clone();
        r3.schedule = Some(Schedule {
            windows: vec![Window { days: vec![Day::Wed], start: HourMinute(0), end: HourMinute(600) }],
        });
        assert_eq!(decide(&card_only(&c, &r3), &NOW).reason, Reason::OutsideSchedule);
        let earlier = Now { minute: 599, ..NOW };
        assert!(decide(&card_only(&c, &r3), &earlier).granted);
    }

    #[test]
    fn guard_refuses_face_without_a_valid_card() {
        let r = resident("a", AccessMode::FaceOrCard);
        assert!(guard(&r, &[], 0).is_err());
        let c = card(&r, 1);
        assert!(guard(&r, std::slice::from_ref(&c), 0).is_ok());
        let mut expired = c.clone();
        expired.validity.valid_until_ms = Some(10);
        assert!(guard(&r, &[expired], 10).is_err());
        // Someone else's card does not count.
        let other = resident("b", AccessMode::Card);
        assert!(guard(&r, &[card(&other, 2)], 0).is_err());
        assert!(guard(&resident("c", AccessMode::Card), &[], 0).is_ok());
        let msg = guard(&r, &[], 0).unwrap_err().to_string();
        assert!(msg.contains("Art. 10") && msg.contains("face_or_card"), "{msg}");
    }

    proptest! {
        /// No combination of mode, cards and attempt grants a face-only entry to anyone whose mode
        /// does not say face_or_card, and a guarded resident always has a card that can open.
        #[test]
        fn face_alone_opens_only_for_face_or_card(mode in 0..3u8, has_card in any::<bool>(), expired in any::<bool>()) {
            let mode = [AccessMode::Card, AccessMode::FaceOrCard, AccessMode::FaceAndCard][mode as usize];
            let r = resident("p", mode);
            let mut creds = Vec::new();
            if has_card {
                let mut c = card(&r, 9);
                if expired { c.validity.valid_until_ms = Some(NOW.wall_ms - 1); }
                creds.push(c);
            }
            let face_only = decide(&Attempt { card: None, face: Some(FacePart::Matched { resident: &r }) }, &NOW);
            prop_assert_eq!(face_only.granted, mode == AccessMode::FaceOrCard);
            if guard(&r, &creds, NOW.wall_ms).is_ok() && mode.admits_face() {
                // The guard passed, so a card exists that opens the door (with the face if two-factor).
                let c = &creds[0];
                let face = if mode == AccessMode::FaceAndCard { Some(FacePart::Matched { resident: &r }) } else { None };
                let d = decide(&Attempt { card: Some(CardPart::Known { credential: c, resident: &r }), face }, &NOW);
                prop_assert!(d.granted);
            }
        }
    }
}
