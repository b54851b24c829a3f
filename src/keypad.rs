//! Wiegand keypads (issue 22, work in progress): the pure core. No I/O.
//!
//! A keypad on Wiegand lines sends each key as a 4-bit burst (the key's value), an 8-bit burst
//! (the high nibble the complement of the low one: key 1 = `0xE1`), or, once `#` is pressed, the
//! whole PIN as a 26-bit frame laid out like an H10301 card (facility 0, the PIN as the number).
//! A 26-bit frame looks like a card, so the reader's configured [`Role`] says what it is: frames
//! are never guessed. Which of 10 and 11 is `*` differs between vendors ([`StarHash`]).
//!
//! [`PinEntry`] collects digits until `#` (or a configured length), `*` clears, and a pause longer
//! than the inter-key timeout discards what was typed. [`PinGuard`] counts wrong PINs per reader
//! and per resident and locks PIN entry (never cards or faces) after too many. A [`Pin`] never
//! prints its digits.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use crate::clock::MonoTime;
use crate::wiegand::{decode_fixed, Bits, Format, Rejection};

/// What a reader's frames are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every frame is a card (the default: a keypad's bursts are then rejected as short frames).
    Cards,
    /// Every frame is a key (4 or 8 bits) or a whole PIN (26 bits).
    Keys,
    /// 4- and 8-bit frames are keys; every other length is a card (so a 26-bit frame is a card,
    /// never a PIN).
    Both,
}

/// Which key values mean `*` and `#`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StarHash {
    /// 10 = `*`, 11 = `#` (ESPHome's reading, and most HID keypads).
    StarTen,
    /// 10 = `#`, 11 = `*`.
    HashTen,
}

/// One key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Digit(u8),
    Star,
    Hash,
}

/// Why a key burst was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// An 8-bit burst whose high nibble is not the complement of the low one (noise).
    BadComplement,
    /// A value no key has (12–15).
    NoSuchKey(u8),
    /// Neither 4 nor 8 bits.
    WrongLength(u8),
}

impl KeyError {
    pub fn code(self) -> &'static str {
        match self {
            KeyError::BadComplement => "key_bad_complement",
            KeyError::NoSuchKey(_) => "key_unknown",
            KeyError::WrongLength(_) => "key_wrong_length",
        }
    }
}

/// A reader frame, by the reader's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Card(Bits),
    Key(Key),
    /// A whole PIN in one 26-bit frame.
    Pin(Pin),
    KeyRejected(KeyError),
    /// A 26-bit PIN frame with a parity error or a facility other than 0.
    PinRejected(Rejection),
}

/// Sort a frame by the reader's role.
pub fn classify(role: Role, map: StarHash, bits: Bits) -> Frame {
    let keyish = bits.len == 4 || bits.len == 8;
    match role {
        Role::Cards => Frame::Card(bits),
        Role::Both if !keyish => Frame::Card(bits),
        Role::Both => key_frame(map, bits),
        Role::Keys if keyish => key_frame(map, bits),
        Role::Keys if bits.len == 26 => match pin26(bits) {
            Ok(p) => Frame::Pin(p),
            Err(r) => Frame::PinRejected(r),
        },
        Role::Keys => Frame::KeyRejected(KeyError::WrongLength(bits.len)),
    }
}

fn key_frame(map: StarHash, bits: Bits) -> Frame {
    match decode_key(map, bits) {
        Ok(k) => Frame::Key(k),
        Err(e) => Frame::KeyRejected(e),
    }
}

/// A 4- or 8-bit key burst.
pub fn decode_key(map: StarHash, bits: Bits) -> Result<Key, KeyError> {
    let v = match bits.len {
        4 => bits.value as u8,
        8 => {
            let (hi, lo) = ((bits.value >> 4) as u8 & 0xF, bits.value as u8 & 0xF);
            if hi != !lo & 0xF {
                return Err(KeyError::BadComplement);
            }
            lo
        }
        n => return Err(KeyError::WrongLength(n)),
    };
    match (v, map) {
        (0..=9, _) => Ok(Key::Digit(v)),
        (10, StarHash::StarTen) | (11, StarHash::HashTen) => Ok(Key::Star),
        (11, StarHash::StarTen) | (10, StarHash::HashTen) => Ok(Key::Hash),
        _ => Err(KeyError::NoSuchKey(v)),
    }
}

/// A whole PIN sent as a 26-bit frame: H10301's layout and parity, facility 0, the PIN as the
/// 16-bit number. Such keypads cannot send leading zeros or more than 5 digits (65,535).
pub fn pin26(bits: Bits) -> Result<Pin, Rejection> {
    let read = decode_fixed(Format::H10301, bits)?;
    if read.card.facility != 0 {
        return Err(Rejection::WrongLength);
    }
    Ok(Pin(read.card.number.to_string().bytes().map(|b| b - b'0').collect()))
}

/// A PIN: its digits, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Pin(Vec<u8>);

impl Pin {
    pub fn digits(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// For tests and the CLI that sets a PIN: `"1234"`.
    pub fn parse(s: &str) -> Option<Pin> {
        s.bytes().all(|b| b.is_ascii_digit()).then(|| Pin(s.bytes().map(|b| b - b'0').collect()))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({} digits)", self.0.len())
    }
}

/// How PIN entry ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinParams {
    /// Fewer digits than this at `#` is refused (`pin_too_short`).
    pub min_len: u8,
    /// More digits than this is refused at once (`pin_too_long`) and entry starts again.
    pub max_len: u8,
    /// Submit as soon as this many digits are in, without `#`.
    pub submit_len: Option<u8>,
    /// A longer pause between keys discards the digits typed (`pin_timeout`).
    pub inter_key: Duration,
}

impl Default for PinParams {
    fn default() -> Self {
        PinParams { min_len: 4, max_len: 8, submit_len: None, inter_key: Duration::from_secs(5) }
    }
}

/// What a key (or the passing of time) did to PIN entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinEvent {
    /// A PIN to decide.
    Submit(Pin),
    /// `*`: the digits were discarded.
    Cleared,
    TimedOut,
    TooLong,
    TooShort,
}

impl PinEvent {
    /// The access event's reason when entry failed.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            PinEvent::TimedOut => Some("pin_timeout"),
            PinEvent::TooLong => Some("pin_too_long"),
            PinEvent::TooShort => Some("pin_too_short"),
            PinEvent::Submit(_) | PinEvent::Cleared => None,
        }
    }
}

/// One reader's PIN entry.
#[derive(Debug, Clone)]
pub struct PinEntry {
    p: PinParams,
    digits: Vec<u8>,
    last: Option<MonoTime>,
}

impl PinEntry {
    pub fn new(p: PinParams) -> PinEntry {
        PinEntry { p, digits: Vec::new(), last: None }
    }

    /// Digits typed so far (for the feedback stage's key click; never the digits).
    pub fn typed(&self) -> usize {
        self.digits.len()
    }

    /// When [`PinEntry::tick`] must be called.
    pub fn deadline(&self) -> Option<MonoTime> {
        self.last.filter(|_| !self.digits.is_empty()).map(|t| t + self.p.inter_key)
    }

    /// The pause ran out: the digits typed are discarded.
    pub fn tick(&mut self, now: MonoTime) -> Option<PinEvent> {
        match self.deadline() {
            Some(d) if now >= d => {
                self.reset();
                Some(PinEvent::TimedOut)
            }
            _ => None,
        }
    }

    pub fn key(&mut self, k: Key, now: MonoTime) -> Option<PinEvent> {
        let timed_out = self.tick(now);
        self.last = Some(now);
        let ev = match k {
            Key::Star => {
                let had = !self.digits.is_empty();
                self.reset();
                had.then_some(PinEvent::Cleared)
            }
            Key::Hash if self.digits.is_empty() => None,
            Key::Hash if self.digits.len() < usize::from(self.p.min_len) => {
                self.reset();
                Some(PinEvent::TooShort)
            }
            Key::Hash => Some(PinEvent::Submit(Pin(std::mem::take(&mut self.digits)))),
            Key::Digit(d) => {
                self.digits.push(d);
                if self.digits.len() > usize::from(self.p.max_len) {
                    self.reset();
                    Some(PinEvent::TooLong)
                } else if self.p.submit_len.is_some_and(|n| self.digits.len() == usize::from(n)) {
                    Some(PinEvent::Submit(Pin(std::mem::take(&mut self.digits))))
                } else {
                    None
                }
            }
        };
        // A timeout followed by a key: the key starts a new entry, and the timeout is reported.
        ev.or(timed_out)
    }

    fn reset(&mut self) {
        self.digits.clear();
    }
}

/// Wrong-PIN limits: `max_wrong` within `window` locks PIN entry for `lockout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardParams {
    pub max_wrong: u32,
    pub window: Duration,
    pub lockout: Duration,
}

impl Default for GuardParams {
    fn default() -> Self {
        GuardParams { max_wrong: 5, window: Duration::from_secs(60), lockout: Duration::from_secs(300) }
    }
}

/// Who a lockout is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Reader(String),
    Resident(String),
}

/// Wrong PINs per reader and per resident. Pure: the caller gives the time.
#[derive(Debug, Clone, Default)]
pub struct PinGuard {
    p: GuardParams,
    wrong: HashMap<Subject, Vec<MonoTime>>,
    locked_until: HashMap<Subject, MonoTime>,
}

impl PinGuard {
    pub fn new(p: GuardParams) -> PinGuard {
        PinGuard { p, ..PinGuard::default() }
    }

    /// Is PIN entry locked for this subject now?
    pub fn locked(&self, s: &Subject, now: MonoTime) -> bool {
        self.locked_until.get(s).is_some_and(|&t| now < t)
    }

    /// A wrong PIN: returns the subjects this locks out (for the alarm event).
    pub fn wrong(&mut self, reader: &str, resident: Option<&str>, now: MonoTime) -> Vec<Subject> {
        let mut subjects = vec![Subject::Reader(reader.to_string())];
        subjects.extend(resident.map(|r| Subject::Resident(r.to_string())));
        let mut locked = Vec::new();
        for s in subjects {
            let already = self.locked(&s, now);
            let window = self.p.window;
            let times = self.wrong.entry(s.clone()).or_default();
            times.retain(|&t| now.saturating_sub(t) < window);
            times.push(now);
            if times.len() >= self.p.max_wrong as usize && !already {
                times.clear();
                self.locked_until.insert(s.clone(), now + self.p.lockout);
                locked.push(s);
            }
        }
        locked
    }

    /// A right PIN clears the reader's and the resident's wrong count.
    pub fn right(&mut self, reader: &str, resident: &str) {
        self.wrong.remove(&Subject::Reader(reader.to_string()));
        self.wrong.remove(&Subject::Resident(resident.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wiegand::encode;

    fn t(ms: u64) -> MonoTime {
        MonoTime::from_duration(Duration::from_millis(ms))
    }

    fn burst(len: u8, value: u64) -> Bits {
        Bits { value, len }
    }

    #[test]
    fn four_and_eight_bit_keys_with_both_star_hash_maps() {
        for d in 0..=9u64 {
            assert_eq!(decode_key(StarHash::StarTen, burst(4, d)), Ok(Key::Digit(d as u8)));
            let eight = ((!d & 0xF) << 4) | d;
            assert_eq!(decode_key(StarHash::HashTen, burst(8, eight)), Ok(Key::Digit(d as u8)));
        }
        assert_eq!(decode_key(StarHash::StarTen, burst(8, 0xE1)), Ok(Key::Digit(1)));
        assert_eq!(decode_key(StarHash::StarTen, burst(4, 10)), Ok(Key::Star));
        assert_eq!(decode_key(StarHash::StarTen, burst(4, 11)), Ok(Key::Hash));
        assert_eq!(decode_key(StarHash::HashTen, burst(4, 10)), Ok(Key::Hash));
        assert_eq!(decode_key(StarHash::HashTen, burst(8, 0x4B)), Ok(Key::Star));
        assert_eq!(decode_key(StarHash::StarTen, burst(8, 0xF1)), Err(KeyError::BadComplement));
        assert_eq!(decode_key(StarHash::StarTen, burst(4, 13)), Err(KeyError::NoSuchKey(13)));
        assert_eq!(decode_key(StarHash::StarTen, burst(5, 1)), Err(KeyError::WrongLength(5)));
    }

    #[test]
    fn the_role_decides_what_a_26_bit_frame_is() {
        let frame = encode(Format::H10301, 0, 1234).unwrap();
        assert_eq!(classify(Role::Cards, StarHash::StarTen, frame), Frame::Card(frame));
        assert_eq!(classify(Role::Both, StarHash::StarTen, frame), Frame::Card(frame));
        assert_eq!(classify(Role::Keys, StarHash::StarTen, frame), Frame::Pin(Pin::parse("1234").unwrap()));
        let card = encode(Format::H10301, 7, 1234).unwrap();
        assert!(matches!(classify(Role::Keys, StarHash::StarTen, card), Frame::PinRejected(_)));
        let mut bad = frame;
        bad.value ^= 1; // the trailing parity bit
        assert_eq!(classify(Role::Keys, StarHash::StarTen, bad), Frame::PinRejected(Rejection::ParityError));
        assert_eq!(classify(Role::Both, StarHash::StarTen, burst(4, 5)), Frame::Key(Key::Digit(5)));
        assert_eq!(classify(Role::Cards, StarHash::StarTen, burst(4, 5)), Frame::Card(burst(4, 5)));
        assert_eq!(
            classify(Role::Keys, StarHash::StarTen, burst(34, 5)),
            Frame::KeyRejected(KeyError::WrongLength(34))
        );
    }

    #[test]
    fn pin_entry_submits_clears_and_times_out() {
        let mut e = PinEntry::new(PinParams::default());
        for (i, d) in [1, 2, 3, 4].into_iter().enumerate() {
            assert_eq!(e.key(Key::Digit(d), t(i as u64 * 100)), None);
        }
        assert_eq!(e.key(Key::Hash, t(500)), Some(PinEvent::Submit(Pin::parse("1234").unwrap())));
        assert_eq!(e.typed(), 0);
        // `*` clears.
        e.key(Key::Digit(9), t(600));
        assert_eq!(e.key(Key::Star, t(700)), Some(PinEvent::Cleared));
        assert_eq!(e.key(Key::Hash, t(800)), None, "`#` with nothing typed does nothing");
        // A pause past the inter-key timeout discards the digits.
        e.key(Key::Digit(1), t(1000));
        assert_eq!(e.deadline(), Some(t(6000)));
        assert_eq!(e.tick(t(5999)), None);
        assert_eq!(e.tick(t(6000)), Some(PinEvent::TimedOut));
        assert_eq!(e.typed(), 0);
        // A key after the timeout, before any tick: the timeout is reported, the key starts anew.
        e.key(Key::Digit(1), t(10_000));
        assert_eq!(e.key(Key::Digit(2), t(20_000)), Some(PinEvent::TimedOut));
        assert_eq!(e.typed(), 1);
        // Too short, too long.
        let mut e = PinEntry::new(PinParams::default());
        e.key(Key::Digit(1), t(0));
        assert_eq!(e.key(Key::Hash, t(1)), Some(PinEvent::TooShort));
        for i in 0..8 {
            assert_eq!(e.key(Key::Digit(1), t(10 + i)), None);
        }
        assert_eq!(e.key(Key::Digit(1), t(20)), Some(PinEvent::TooLong));
        assert_eq!(e.typed(), 0);
        // A fixed length submits without `#`.
        let mut e = PinEntry::new(PinParams { submit_len: Some(4), ..PinParams::default() });
        let evs: Vec<_> = [5, 6, 7, 8].into_iter().map(|d| e.key(Key::Digit(d), t(0))).collect();
        assert_eq!(evs.last().unwrap(), &Some(PinEvent::Submit(Pin::parse("5678").unwrap())));
    }

    #[test]
    fn a_pin_never_prints_its_digits() {
        let p = Pin::parse("4711").unwrap();
        assert_eq!(format!("{p:?}"), "Pin(4 digits)");
        assert!(!format!("{:?}", PinEvent::Submit(p)).contains("4711"));
        assert!(Pin::parse("12a4").is_none());
    }

    #[test]
    fn five_wrong_within_a_minute_lock_the_reader_and_the_resident_for_five_minutes() {
        let mut g = PinGuard::new(GuardParams::default());
        let reader = Subject::Reader("front".into());
        let resident = Subject::Resident("r-1".into());
        for i in 0..4 {
            assert!(g.wrong("front", Some("r-1"), t(i * 10_000)).is_empty());
        }
        assert_eq!(g.wrong("front", Some("r-1"), t(40_000)), vec![reader.clone(), resident.clone()]);
        assert!(g.locked(&reader, t(40_000)) && g.locked(&resident, t(339_999)));
        assert!(!g.locked(&reader, t(340_000)), "the lockout ends");
        assert!(!g.locked(&Subject::Reader("side".into()), t(40_000)), "other readers are not locked");
        // Wrong PINs spread over more than the window never lock.
        let mut g = PinGuard::new(GuardParams::default());
        for i in 0..20 {
            assert!(g.wrong("front", None, t(i * 20_000)).is_empty());
        }
        // A right PIN clears the count.
        let mut g = PinGuard::new(GuardParams::default());
        for i in 0..4 {
            g.wrong("front", Some("r-1"), t(i));
        }
        g.right("front", "r-1");
        assert!(g.wrong("front", Some("r-1"), t(10)).is_empty());
    }
}
