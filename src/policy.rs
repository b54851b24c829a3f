//! Access policy: one decision with one reason code for every attempt (REQUIREMENTS A1, A5), and
//! the Art. 10 guard (P1) that keeps face from ever being the only way in.
//!
//! Pure: the caller looks up the resident and credential and passes `now` in. No I/O, no clock.

use serde::{Deserialize, Serialize};

use crate::model::{AccessMode, Credential, Day, Factor, Resident, ValidityState};

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
    /// Mode `card_and_pin` and the card's holder typed no PIN (or `face_or_pin` and a card).
    ModeRequiresPin,
    /// A PIN no resident holds, or not the card holder's (`card_and_pin`).
    PinWrong,
    /// Too many wrong PINs at this reader or for this resident: PIN entry is locked for a while
    /// (cards and faces are not).
    PinLockedOut,
    /// The pause between keys (or between the card and the PIN) was too long.
    PinTimeout,
    PinTooLong,
    PinTooShort,
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
            Reason::ModeRequiresPin => "mode_requires_pin",
            Reason::PinWrong => "pin_wrong",
            Reason::PinLockedOut => "pin_locked_out",
            Reason::PinTimeout => "pin_timeout",
            Reason::PinTooLong => "pin_too_long",
            Reason::PinTooShort => "pin_too_short",
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

/// What the keypad contributed to an attempt: a PIN, looked up by its keyed hash.
#[derive(Debug, Clone, Copy)]
pub enum PinPart<'a> {
    /// No resident holds this PIN.
    Unknown,
    Known {
        credential: &'a Credential,
        resident: &'a Resident,
    },
}

/// One attempt at the door: a card, a face, a PIN, or two of them (`face_and_card`,
/// `card_and_pin`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Attempt<'a> {
    pub card: Option<CardPart<'a>>,
    pub face: Option<FacePart<'a>>,
    pub pin: Option<PinPart<'a>>,
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
    match (attempt.card, attempt.face, attempt.pin) {
        (None, None, None) => Decision::deny(Reason::BadFrame),
        (Some(CardPart::Unknown), _, _) => Decision::deny(Reason::UnknownCard),
        (Some(CardPart::Known { credential, resident }), face, pin) => {
            if let Some(r) = credential_checks(credential, now).or_else(|| resident_checks(resident, now)) {
                return Decision::deny(r);
            }
            match (resident.mode, face) {
                (m, _) if m.card_alone() => Decision::grant(),
                (AccessMode::CardAndPin | AccessMode::FaceOrPin, _) => pin_of(resident, pin, now),
                (_, None) => Decision::deny(Reason::ModeRequiresFace),
                (_, Some(FacePart::NotRecognized)) => Decision::deny(Reason::FaceNotRecognized),
                (_, Some(FacePart::Spoof)) => Decision::deny(Reason::SpoofSuspected),
                (_, Some(FacePart::Matched { resident: f })) => {
                    if f.id == resident.id {
                        Decision::grant()
                    } else {
                        Decision::deny(Reason::FaceCardMismatch)
                    }
                }
            }
        }
        (None, _, Some(PinPart::Unknown)) => Decision::deny(Reason::PinWrong),
        (None, _, Some(PinPart::Known { credential, resident })) => {
            if let Some(r) = credential_checks(credential, now).or_else(|| resident_checks(resident, now)) {
                return Decision::deny(r);
            }
            if resident.mode.pin_alone() {
                Decision::grant()
            } else {
                Decision::deny(Reason::ModeRequiresCard)
            }
        }
        (None, Some(FacePart::NotRecognized), None) => Decision::deny(Reason::FaceNotRecognized),
        (None, Some(FacePart::Spoof), None) => Decision::deny(Reason::SpoofSuspected),
        (None, Some(FacePart::Matched { resident }), None) => {
            if let Some(r) = resident_checks(resident, now) {
                return Decision::deny(r);
            }
            if resident.mode.face_alone() {
                Decision::grant()
            } else {
                Decision::deny(Reason::ModeRequiresCard)
            }
        }
    }
}

/// The second factor of a card whose mode needs a PIN: the card holder's own PIN.
fn pin_of(holder: &Resident, pin: Option<PinPart<'_>>, now: &Now) -> Decision {
    match pin {
        None => Decision::deny(Reason::ModeRequiresPin),
        Some(PinPart::Known { credential, resident }) if resident.id == holder.id => {
            credential_checks(credential, now).map_or_else(Decision::grant, Decision::deny)
        }
        Some(_) => Decision::deny(Reason::PinWrong),
    }
}

/// Why a resident state was refused by the Art. 10 guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error(
        "resident {resident} would have mode {mode} without a valid {needs}: face must never be the only way in \
         (SPC 2021 face-recognition provisions Art. 10, REQUIREMENTS P1); add a {needs} first, or set a mode without face"
    )]
    FaceOnly { resident: String, mode: AccessMode, needs: &'static str },
}

/// The Art. 10 guard (P1), the one place this rule lives: a resident whose mode admits face must
/// hold the non-face credential that mode relies on ([`AccessMode::fallback`]: a card for
/// `face_or_card` and `face_and_card`, a PIN for `face_or_pin`; a duress PIN does not count),
/// not expired at `now_ms`. Every write that can change a resident's mode or credentials runs it
/// on the state it would produce.
pub fn guard(resident: &Resident, credentials: &[Credential], now_ms: i64) -> Result<(), GuardError> {
    let Some(needed) = resident.mode.fallback() else {
        return Ok(());
    };
    let has_way_in = credentials.iter().any(|c| {
        c.resident == resident.id
            && c.credential.is_non_face()
            && c.credential.factor() == Some(needed)
            && c.validity.check(now_ms) != ValidityState::Expired
    });
    if has_way_in {
        Ok(())
    } else {
        let needs = match needed {
            Factor::Card => "card",
            Factor::Pin => "PIN",
        };
        Err(GuardError::FaceOnly { resident: resident.id.to_string(), mode: resident.mode, needs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CredentialKind, HourMinute, PinHash, ResidentId, Schedule, Validity, Window};
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
        Attempt { card: Some(CardPart::Known { credential: c, resident: r }), face: None, pin: None }
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
            let a = Attempt { card: None, face: Some(FacePart::Matched { resident: &r }), pin: None };
            assert_eq!(decide(&a, &NOW).reason, want, "{mode}");
        }
        let a = Attempt { card: None, face: Some(FacePart::Spoof), pin: None };
        assert_eq!(decide(&a, &NOW).reason, Reason::SpoofSuspected);
        let a = Attempt { card: None, face: Some(FacePart::NotRecognized), pin: None };
        assert_eq!(decide(&a, &NOW).reason, Reason::FaceNotRecognized);
    }

    #[test]
    fn two_factor_needs_the_same_resident() {
        let r = resident("a", AccessMode::FaceAndCard);
        let other = resident("b", AccessMode::FaceOrCard);
        let c = card(&r, 1);
        let both =
            |f| Attempt { card: Some(CardPart::Known { credential: &c, resident: &r }), face: Some(f), pin: None };
        assert!(decide(&both(FacePart::Matched { resident: &r }), &NOW).granted);
        assert_eq!(decide(&both(FacePart::Matched { resident: &other }), &NOW).reason, Reason::FaceCardMismatch);
        assert_eq!(decide(&both(FacePart::Spoof), &NOW).reason, Reason::SpoofSuspected);
    }

    #[test]
    fn unknown_card_and_validity_and_schedule() {
        assert_eq!(
            decide(&Attempt { card: Some(CardPart::Unknown), face: None, pin: None }, &NOW).reason,
            Reason::UnknownCard
        );
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

    fn pin(r: &Resident, n: u8, duress: bool) -> Credential {
        Credential {
            credential: CredentialKind::Pin(PinHash { hash: [n; 32], duress }),
            resident: r.id.clone(),
            validity: Validity::default(),
        }
    }

    #[test]
    fn pin_modes() {
        let card_attempt = |c: &Credential, r: &Resident, p: Option<&Credential>| {
            let pin = p.map(|p| PinPart::Known { credential: p, resident: r });
            decide(&Attempt { card: Some(CardPart::Known { credential: c, resident: r }), face: None, pin }, &NOW)
        };
        let pin_alone = |p: &Credential, r: &Resident| {
            decide(&Attempt { pin: Some(PinPart::Known { credential: p, resident: r }), ..Attempt::default() }, &NOW)
        };
        for (mode, card_alone, pin_alone_ok, card_pin) in [
            (AccessMode::Card, Reason::Granted, Reason::ModeRequiresCard, Reason::Granted),
            (AccessMode::CardOrPin, Reason::Granted, Reason::Granted, Reason::Granted),
            (AccessMode::CardAndPin, Reason::ModeRequiresPin, Reason::ModeRequiresCard, Reason::Granted),
            (AccessMode::FaceOrPin, Reason::ModeRequiresPin, Reason::Granted, Reason::Granted),
        ] {
            let r = resident("a", mode);
            let (c, p) = (card(&r, 1), pin(&r, 1, false));
            assert_eq!(card_attempt(&c, &r, None).reason, card_alone, "{mode} card");
            assert_eq!(pin_alone(&p, &r).reason, pin_alone_ok, "{mode} pin");
            assert_eq!(card_attempt(&c, &r, Some(&p)).reason, card_pin, "{mode} card+pin");
        }
        // card_and_pin: someone else's PIN, or a PIN nobody holds, is wrong.
        let r = resident("a", AccessMode::CardAndPin);
        let other = resident("b", AccessMode::CardOrPin);
        let (c, theirs) = (card(&r, 1), pin(&other, 2, false));
        let with = |pin| {
            decide(&Attempt { card: Some(CardPart::Known { credential: &c, resident: &r }), face: None, pin }, &NOW)
        };
        assert_eq!(with(Some(PinPart::Known { credential: &theirs, resident: &other })).reason, Reason::PinWrong);
        assert_eq!(with(Some(PinPart::Unknown)).reason, Reason::PinWrong);
        assert_eq!(
            decide(&Attempt { pin: Some(PinPart::Unknown), ..Attempt::default() }, &NOW).reason,
            Reason::PinWrong
        );
        // An expired PIN does not open, even with a valid card.
        let mut old = pin(&r, 1, false);
        old.validity.valid_until_ms = Some(NOW.wall_ms);
        assert_eq!(card_attempt(&c, &r, Some(&old)).reason, Reason::CredentialExpired);
        // face_or_pin: the face alone opens; card and face modes refuse a PIN alone.
        let fp = resident("f", AccessMode::FaceOrPin);
        let a = Attempt { face: Some(FacePart::Matched { resident: &fp }), ..Attempt::default() };
        assert!(decide(&a, &NOW).granted);
        let cp = resident("g", AccessMode::CardOrPin);
        let a = Attempt { face: Some(FacePart::Matched { resident: &cp }), ..Attempt::default() };
        assert_eq!(decide(&a, &NOW).reason, Reason::ModeRequiresCard);
    }

    #[test]
    fn guard_needs_the_credential_the_face_mode_relies_on() {
        let fp = resident("a", AccessMode::FaceOrPin);
        assert!(guard(&fp, &[card(&fp, 1)], 0).is_err(), "a card does not help face_or_pin");
        assert!(guard(&fp, &[pin(&fp, 1, true)], 0).is_err(), "a duress PIN does not count");
        assert!(guard(&fp, &[pin(&fp, 1, false)], 0).is_ok());
        let msg = guard(&fp, &[], 0).unwrap_err().to_string();
        assert!(msg.contains("valid PIN") && msg.contains("face_or_pin"), "{msg}");
        let fc = resident("b", AccessMode::FaceOrCard);
        assert!(guard(&fc, &[pin(&fc, 1, false)], 0).is_err(), "a PIN does not help face_or_card");
        for m in [AccessMode::CardOrPin, AccessMode::CardAndPin] {
            assert!(guard(&resident("c", m), &[], 0).is_ok(), "{m} admits no face");
        }
    }

    proptest! {
        /// The Art. 10 property (P1) over every mode and every mix of cards and PINs: a face alone
        /// opens only for the modes that say so, and whenever the guard accepts a resident whose
        /// mode admits face, some attempt without a face opens their door — or, for
        /// `face_and_card`, their card is there for a switch to `card` (the guard holds it).
        #[test]
        fn face_is_never_the_only_way_in(
            mode in 0..6u8, has_card in any::<bool>(), card_expired in any::<bool>(),
            has_pin in any::<bool>(), pin_expired in any::<bool>(), duress in any::<bool>(),
        ) {
            let mode = AccessMode::ALL[mode as usize];
            let r = resident("p", mode);
            let mut creds = Vec::new();
            if has_card {
                let mut c = card(&r, 9);
                if card_expired { c.validity.valid_until_ms = Some(NOW.wall_ms - 1); }
                creds.push(c);
            }
            if has_pin {
                let mut p = pin(&r, 9, duress);
                if pin_expired { p.validity.valid_until_ms = Some(NOW.wall_ms - 1); }
                creds.push(p);
            }
            let face = Some(FacePart::Matched { resident: &r });
            let face_only = decide(&Attempt { face, ..Attempt::default() }, &NOW);
            prop_assert_eq!(face_only.granted, mode.face_alone());
            if guard(&r, &creds, NOW.wall_ms).is_ok() && mode.admits_face() {
                let find = |f: Factor| creds.iter().find(|c| c.credential.factor() == Some(f));
                let opened = match mode.fallback() {
                    Some(Factor::Card) => {
                        let c = find(Factor::Card);
                        prop_assert!(c.is_some(), "the guard passed {} without a card", mode);
                        let card = Some(CardPart::Known { credential: c.unwrap(), resident: &r });
                        // face_and_card: with `card` (the resident's switch) the card alone opens.
                        let as_card = resident("p", AccessMode::Card);
                        let alone = Attempt { card: Some(CardPart::Known { credential: c.unwrap(), resident: &as_card }), ..Attempt::default() };
                        decide(&alone, &NOW).granted && (mode != AccessMode::FaceOrCard || decide(&Attempt { card, ..Attempt::default() }, &NOW).granted)
                    }
                    Some(Factor::Pin) => {
                        let p = find(Factor::Pin);
                        prop_assert!(p.is_some(), "the guard passed {} without a PIN", mode);
                        decide(&Attempt { pin: Some(PinPart::Known { credential: p.unwrap(), resident: &r }), ..Attempt::default() }, &NOW).granted
                    }
                    None => false,
                };
                prop_assert!(opened, "{} passed the guard but nothing without a face opens", mode);
            }
        }
    }
}
