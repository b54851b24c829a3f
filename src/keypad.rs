//! Wiegand keypads: the pure core. No I/O.
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
//! prints its digits; [`PinKey`] turns it into the keyed hash the store keeps.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use crate::clock::MonoTime;
use crate::policy::Reason;
use crate::wiegand::{decode_fixed, Bits, Format, Outcome, Rejection};

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
    /// Neither 4 nor 8 bits (nor 26, on a keys-only reader).
    WrongLength(u8),
    /// A 26-bit PIN frame whose parity does not hold.
    PinParity,
    /// A 26-bit frame with a facility code: a card on a keys-only reader, not a PIN.
    PinFacility,
}

impl KeyError {
    pub fn code(self) -> &'static str {
        match self {
            KeyError::BadComplement => "key_bad_complement",
            KeyError::NoSuchKey(_) => "key_unknown",
            KeyError::WrongLength(_) => "key_wrong_length",
            KeyError::PinParity => "pin_parity_error",
            KeyError::PinFacility => "pin_frame_has_facility",
        }
    }
}

/// A reader frame, by the reader's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A card read or a rejected frame, as the Wiegand decoder gave it.
    Card(Outcome),
    Key(Key),
    /// A whole PIN in one 26-bit frame.
    Pin(Pin),
    KeyRejected(KeyError, Bits),
}

/// Sort a decoded frame by the reader's role. A frame the decoder refused for its length or
/// parity is still a complete frame, and may be a key; noise, both lines low, a stuck line and
/// overlong trains stay what the decoder said.
pub fn classify(role: Role, map: StarHash, o: Outcome) -> Frame {
    let bits = match o {
        _ if role == Role::Cards => return Frame::Card(o),
        Outcome::Card(read) => read.bits,
        Outcome::Rejected { why: Rejection::ShortFrame | Rejection::WrongLength | Rejection::ParityError, bits } => {
            bits
        }
        Outcome::Rejected { .. } => return Frame::Card(o),
    };
    let keyish = bits.len == 4 || bits.len == 8;
    match role {
        Role::Cards => Frame::Card(o),
        Role::Both if !keyish => Frame::Card(o),
        Role::Both => key_frame(map, bits),
        Role::Keys if keyish => key_frame(map, bits),
        Role::Keys if bits.len == 26 => match pin26(bits) {
            Ok(p) => Frame::Pin(p),
            Err(e) => Frame::KeyRejected(e, bits),
        },
        Role::Keys => Frame::KeyRejected(KeyError::WrongLength(bits.len), bits),
    }
}

fn key_frame(map: StarHash, bits: Bits) -> Frame {
    match decode_key(map, bits) {
        Ok(k) => Frame::Key(k),
        Err(e) => Frame::KeyRejected(e, bits),
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

/// The burst a keypad sends for `key` in `len` bits (4, or 8 with the complement nibble): the
/// simulator's keypad and the tests use it.
pub fn encode_key(map: StarHash, key: Key, len: u8) -> Option<Bits> {
    let v = match (key, map) {
        (Key::Digit(d), _) if d <= 9 => u64::from(d),
        (Key::Digit(_), _) => return None,
        (Key::Star, StarHash::StarTen) | (Key::Hash, StarHash::HashTen) => 10,
        (Key::Star, StarHash::HashTen) | (Key::Hash, StarHash::StarTen) => 11,
    };
    match len {
        4 => Some(Bits { value: v, len: 4 }),
        8 => Some(Bits { value: ((!v & 0xF) << 4) | v, len: 8 }),
        _ => None,
    }
}

/// A key from its character: `0`-`9`, `*`, `#`.
pub fn key_of(c: char) -> Option<Key> {
    match c {
        '0'..='9' => Some(Key::Digit(c as u8 - b'0')),
        '*' => Some(Key::Star),
        '#' => Some(Key::Hash),
        _ => None,
    }
}

/// A whole PIN sent as a 26-bit frame: H10301's layout and parity, facility 0, the PIN as the
/// 16-bit number. Such keypads cannot send leading zeros or more than 5 digits (65,535).
pub fn pin26(bits: Bits) -> Result<Pin, KeyError> {
    let read = decode_fixed(Format::H10301, bits).map_err(|e| match e {
        Rejection::ParityError => KeyError::PinParity,
        _ => KeyError::WrongLength(bits.len),
    })?;
    if read.card.facility != 0 {
        return Err(KeyError::PinFacility);
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

/// The gate's PIN key: 32 random bytes outside the store (a file created 0600 on first use, or
/// the systemd credential `menshen-pin-key`), so a copied database does not give the PINs to an
/// offline search over the 10^n possible PINs. A PIN is stored only as
/// HMAC-SHA-256(key, "menshen-pin-v1" ‖ digits).
pub struct PinKey(ring::hmac::Key);

/// The systemd credential the PIN key is read from (`LoadCredential=`).
pub const PIN_KEY_CREDENTIAL: &str = "menshen-pin-key";

impl PinKey {
    pub fn from_bytes(key: &[u8; 32]) -> PinKey {
        PinKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key))
    }

    pub fn hash(&self, pin: &Pin) -> [u8; 32] {
        let mut ctx = ring::hmac::Context::with_key(&self.0);
        ctx.update(b"menshen-pin-v1\0");
        for d in &pin.0 {
            ctx.update(&[b'0' + d]);
        }
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

impl fmt::Debug for PinKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinKey(..)")
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
    pub fn reason(&self) -> Option<Reason> {
        match self {
            PinEvent::TimedOut => Some(Reason::PinTimeout),
            PinEvent::TooLong => Some(Reason::PinTooLong),
            PinEvent::TooShort => Some(Reason::PinTooShort),
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

    /// Discard what was typed (a refused key burst: a key may have been lost, so the digits that
    /// did arrive are not what the resident typed).
    pub fn clear(&mut self) {
        self.reset();
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
    use crate::wiegand::{decode, encode};

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
    fn encoding_a_key_and_decoding_it_give_the_key_back() {
        for map in [StarHash::StarTen, StarHash::HashTen] {
            for c in "0123456789*#".chars() {
                let k = key_of(c).unwrap();
                for len in [4, 8] {
                    assert_eq!(decode_key(map, encode_key(map, k, len).unwrap()), Ok(k), "{c} {len} {map:?}");
                }
            }
        }
        assert_eq!(encode_key(StarHash::StarTen, Key::Digit(1), 8), Some(burst(8, 0xE1)));
        assert_eq!(encode_key(StarHash::StarTen, Key::Digit(1), 26), None);
        assert_eq!(key_of('a'), None);
    }

    #[test]
    fn the_role_decides_what_a_26_bit_frame_is() {
        let formats = [Format::H10301];
        let out = |bits: Bits| match decode(&formats, bits) {
            Ok(read) => Outcome::Card(read),
            Err(why) => Outcome::Rejected { why, bits },
        };
        let m = StarHash::StarTen;
        let frame = encode(Format::H10301, 0, 1234).unwrap();
        assert_eq!(classify(Role::Cards, m, out(frame)), Frame::Card(out(frame)));
        assert_eq!(classify(Role::Both, m, out(frame)), Frame::Card(out(frame)));
        assert_eq!(classify(Role::Keys, m, out(frame)), Frame::Pin(Pin::parse("1234").unwrap()));
        let card = encode(Format::H10301, 7, 1234).unwrap();
        assert_eq!(classify(Role::Keys, m, out(card)), Frame::KeyRejected(KeyError::PinFacility, card));
        let mut bad = frame;
        bad.value ^= 1; // the trailing parity bit
        assert_eq!(classify(Role::Keys, m, out(bad)), Frame::KeyRejected(KeyError::PinParity, bad));
        assert_eq!(classify(Role::Both, m, out(burst(4, 5))), Frame::Key(Key::Digit(5)));
        assert_eq!(classify(Role::Cards, m, out(burst(4, 5))), Frame::Card(out(burst(4, 5))));
        let long = burst(34, 5);
        assert_eq!(classify(Role::Keys, m, out(long)), Frame::KeyRejected(KeyError::WrongLength(34), long));
        // Noise stays noise whatever the role.
        let noise = Outcome::Rejected { why: Rejection::Noise, bits: burst(4, 1) };
        assert_eq!(classify(Role::Keys, m, noise), Frame::Card(noise));
        // A PIN's keyed hash depends on the key and the digits, and on nothing else.
        let (k1, k2) = (PinKey::from_bytes(&[1; 32]), PinKey::from_bytes(&[2; 32]));
        let p = Pin::parse("1234").unwrap();
        assert_eq!(k1.hash(&p), k1.hash(&Pin::parse("1234").unwrap()));
        assert_ne!(k1.hash(&p), k2.hash(&p));
        assert_ne!(k1.hash(&p), k1.hash(&Pin::parse("01234").unwrap()));
        // The construction, checked against Python's hmac module (an independent implementation):
        // hmac.new(bytes([1]*32), b"menshen-pin-v1\0" + b"1234", hashlib.sha256).hexdigest()
        assert_eq!(
            crate::digest::hex(&k1.hash(&p)),
            "9b76bed01ef4b6703727d14200403d38f51524021000d6ded776002ed51c9f89"
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
