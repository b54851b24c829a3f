//! Wiegand decoding: a pure state machine that turns timestamped D0/D1 edges into card reads.
//!
//! No I/O and no clock reads: the reader stage feeds [`Decoder::on_edge`] with kernel edge
//! timestamps and calls [`Decoder::on_deadline`] when [`Decoder::deadline`] passes. Everything
//! that is not a clean frame of a configured format (noise, short frames, both lines low, a line
//! stuck low, wrong length, parity errors, overlong trains) is reported as a [`Rejection`] and is
//! never a card read, so it can never become a grant.
//!
//! Formats are tables ([`FormatSpec`]): field positions and parity groups, numbered from the
//! first transmitted bit (position 0), as in the HID format descriptions.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::clock::MonoTime;

/// The most bits a frame may carry; longer trains are rejected as overlong.
pub const MAX_BITS: u8 = 64;

/// A configured Wiegand card format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Format {
    /// HID H10301, 26 bits: 8-bit facility, 16-bit card number.
    H10301,
    /// HID H10306, 34 bits: 16-bit facility, 16-bit card number.
    H10306,
    /// HID Corporate 1000, 35 bits: 12-bit company id, 20-bit card number.
    C1k35s,
    /// HID H10304, 37 bits: 16-bit facility, 19-bit card number.
    H10304,
    /// Any length from [`RAW_MIN_BITS`] to [`MAX_BITS`]; no parity, the whole frame is the number.
    Raw,
}

/// The shortest frame accepted by the raw format (shorter trains are noise).
pub const RAW_MIN_BITS: u8 = 4;

impl Format {
    pub const ALL: [Format; 5] = [Format::H10301, Format::H10306, Format::C1k35s, Format::H10304, Format::Raw];

    pub fn name(self) -> &'static str {
        match self {
            Format::H10301 => "H10301",
            Format::H10306 => "H10306",
            Format::C1k35s => "C1k35s",
            Format::H10304 => "H10304",
            Format::Raw => "raw",
        }
    }

    /// The table describing a fixed-length format; `None` for raw.
    pub fn spec(self) -> Option<&'static FormatSpec> {
        match self {
            Format::H10301 => Some(&H10301),
            Format::H10306 => Some(&H10306),
            Format::C1k35s => Some(&C1K35S),
            Format::H10304 => Some(&H10304),
            Format::Raw => None,
        }
    }

    /// The frame length of a fixed format.
    pub fn bits(self) -> Option<u8> {
        self.spec().map(|s| s.len)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown Wiegand format `{s}` (expected H10301, H10306, C1k35s, H10304 or raw)"))
    }
}

/// Even or odd parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    Even,
    Odd,
}

/// One parity bit: its position and the positions it covers (the bit itself excluded).
#[derive(Debug)]
pub struct ParityBit {
    pub at: u8,
    pub kind: Parity,
    pub covers: &'static [u8],
}

/// A fixed-length format as a table.
#[derive(Debug)]
pub struct FormatSpec {
    pub len: u8,
    /// First position and width of the facility / company code.
    pub facility: (u8, u8),
    /// First position and width of the card number.
    pub number: (u8, u8),
    /// Parity bits in the order they must be computed when encoding.
    pub parity: &'static [ParityBit],
}

const fn range<const N: usize>(start: u8) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = start + i as u8;
        i += 1;
    }
    out
}

static H10301_EVEN: [u8; 12] = range::<12>(1);
static H10301_ODD: [u8; 12] = range::<12>(13);
static H10301: FormatSpec = FormatSpec {
    len: 26,
    facility: (1, 8),
    number: (9, 16),
    parity: &[
        ParityBit { at: 0, kind: Parity::Even, covers: &H10301_EVEN },
        ParityBit { at: 25, kind: Parity::Odd, covers: &H10301_ODD },
    ],
};

static H10306_EVEN: [u8; 16] = range::<16>(1);
static H10306_ODD: [u8; 16] = range::<16>(17);
static H10306: FormatSpec = FormatSpec {
    len: 34,
    facility: (1, 16),
    number: (17, 16),
    parity: &[
        ParityBit { at: 0, kind: Parity::Even, covers: &H10306_EVEN },
        ParityBit { at: 33, kind: Parity::Odd, covers: &H10306_ODD },
    ],
};

// Corporate 1000 35-bit: position 1 is even parity over every position p in 2..=33 with
// p % 3 != 1, position 34 odd parity over every p in 1..=32 with p % 3 != 0, and position 0
// odd parity over the whole frame 1..=34 (so it is computed last).
static C1K35S_EVEN: [u8; 22] = [2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24, 26, 27, 29, 30, 32, 33];
static C1K35S_ODD: [u8; 22] = [1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29, 31, 32];
static C1K35S_ALL: [u8; 34] = range::<34>(1);
static C1K35S: FormatSpec = FormatSpec {
    len: 35,
    facility: (2, 12),
    number: (14, 20),
    parity: &[
        ParityBit { at: 1, kind: Parity::Even, covers: &C1K35S_EVEN },
        ParityBit { at: 34, kind: Parity::Odd, covers: &C1K35S_ODD },
        ParityBit { at: 0, kind: Parity::Odd, covers: &C1K35S_ALL },
    ],
};

static H10304_EVEN: [u8; 18] = range::<18>(1);
static H10304_ODD: [u8; 18] = range::<18>(18);
static H10304: FormatSpec = FormatSpec {
    len: 37,
    facility: (1, 16),
    number: (17, 19),
    parity: &[
        ParityBit { at: 0, kind: Parity::Even, covers: &H10304_EVEN },
        ParityBit { at: 36, kind: Parity::Odd, covers: &H10304_ODD },
    ],
};

/// A train of bits in transmission order: bit 0 is the first transmitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Bits {
    /// Bits packed MSB-first: the first transmitted bit is bit `len - 1` of `value`.
    pub value: u64,
    pub len: u8,
}

impl Bits {
    pub fn push(&mut self, bit: bool) -> bool {
        if self.len >= MAX_BITS {
            return false;
        }
        self.value = (self.value << 1) | u64::from(bit);
        self.len += 1;
        true
    }

    /// The bit at transmission position `pos` (0 = first).
    pub fn at(&self, pos: u8) -> bool {
        debug_assert!(pos < self.len);
        (self.value >> (self.len - 1 - pos)) & 1 == 1
    }

    fn field(&self, start: u8, width: u8) -> u64 {
        (0..width).fold(0u64, |acc, i| (acc << 1) | u64::from(self.at(start + i)))
    }

    /// Parse a string of `0` and `1` characters.
    pub fn parse(s: &str) -> Result<Bits, String> {
        let mut b = Bits::default();
        for c in s.chars() {
            let bit = match c {
                '0' => false,
                '1' => true,
                '_' | ' ' => continue,
                other => return Err(format!("`{other}` is not a bit (use 0 and 1)")),
            };
            if !b.push(bit) {
                return Err(format!("more than {MAX_BITS} bits"));
            }
        }
        Ok(b)
    }

    pub fn iter(&self) -> impl Iterator<Item = bool> + '_ {
        (0..self.len).map(|p| self.at(p))
    }
}

impl fmt::Display for Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.iter() {
            f.write_str(if b { "1" } else { "0" })?;
        }
        Ok(())
    }
}

/// A card identity: format, facility and number. Raw frames carry the whole frame as the number
/// and their length as the facility, so that equal frames of different lengths differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct CardId {
    pub format: Format,
    pub facility: u64,
    pub number: u64,
}

impl CardId {
    /// The key a credential is stored under.
    pub fn key(&self) -> String {
        format!("card:{}:{}:{}", self.format, self.facility, self.number)
    }

    /// A masked form for logs: the last two digits of the number only.
    pub fn masked(&self) -> String {
        let n = self.number.to_string();
        let tail = &n[n.len().saturating_sub(2)..];
        format!("{}:*:*{}", self.format, tail)
    }
}

/// A successfully decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardRead {
    pub card: CardId,
    pub bits: Bits,
}

/// Why a frame was rejected. Every variant is counted; none is ever a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// The length matches a configured format but a parity bit is wrong.
    ParityError,
    /// Fewer bits than the shortest configured format.
    ShortFrame,
    /// A length no configured format has.
    WrongLength,
    /// More than [`MAX_BITS`], or more bits after an early-completed frame.
    Overlong,
    /// A pulse shorter than the minimum width, or edges closer than the minimum interval.
    Noise,
    /// A pulse on one line while the other was low.
    BothLinesLow,
    /// A line held low for a whole frame gap (wiring fault, reader fault, D0/D1 shorted).
    LineStuckLow,
}

impl Rejection {
    pub const ALL: [Rejection; 7] = [
        Rejection::ParityError,
        Rejection::ShortFrame,
        Rejection::WrongLength,
        Rejection::Overlong,
        Rejection::Noise,
        Rejection::BothLinesLow,
        Rejection::LineStuckLow,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Rejection::ParityError => "parity_error",
            Rejection::ShortFrame => "short_frame",
            Rejection::WrongLength => "wrong_length",
            Rejection::Overlong => "overlong",
            Rejection::Noise => "noise",
            Rejection::BothLinesLow => "both_lines_low",
            Rejection::LineStuckLow => "line_stuck_low",
        }
    }
}

/// What a finished frame became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Card(CardRead),
    Rejected { why: Rejection, bits: Bits },
}

/// Decode a complete frame against one fixed format.
pub fn decode_fixed(format: Format, bits: Bits) -> Result<CardRead, Rejection> {
    let spec = format.spec().ok_or(Rejection::WrongLength)?;
    if bits.len != spec.len {
        return Err(Rejection::WrongLength);
    }
    for p in spec.parity {
        let ones = p.covers.iter().filter(|&&pos| bits.at(pos)).count() + usize::from(bits.at(p.at));
        let ok = match p.kind {
            Parity::Even => ones % 2 == 0,
            Parity::Odd => ones % 2 == 1,
        };
        if !ok {
            return Err(Rejection::ParityError);
        }
    }
    Ok(CardRead {
        card: CardId {
            format,
            facility: bits.field(spec.facility.0, spec.facility.1),
            number: bits.field(spec.number.0, spec.number.1),
        },
        bits,
    })
}

/// Decode a complete frame against the formats configured for a reader.
pub fn decode(formats: &[Format], bits: Bits) -> Result<CardRead, Rejection> {
    if let Some(f) = formats.iter().copied().find(|f| f.bits() == Some(bits.len)) {
        return decode_fixed(f, bits);
    }
    if formats.contains(&Format::Raw) {
        if bits.len < RAW_MIN_BITS {
            return Err(Rejection::ShortFrame);
        }
        return Ok(CardRead {
            card: CardId { format: Format::Raw, facility: u64::from(bits.len), number: bits.value },
            bits,
        });
    }
    let shortest = formats.iter().filter_map(|f| f.bits()).min().unwrap_or(0);
    if bits.len < shortest {
        Err(Rejection::ShortFrame)
    } else {
        Err(Rejection::WrongLength)
    }
}

/// Why a card cannot be encoded in a format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the raw format has no facility/number layout; send raw bits instead")]
    Raw,
    #[error("facility {0} does not fit in {1} bits")]
    Facility(u64, u8),
    #[error("card number {0} does not fit in {1} bits")]
    Number(u64, u8),
}

/// Encode a card as its frame, parity included (the simulator's transmitter and tests use it).
pub fn encode(format: Format, facility: u64, number: u64) -> Result<Bits, EncodeError> {
    let spec = format.spec().ok_or(EncodeError::Raw)?;
    let (fs, fw) = spec.facility;
    let (ns, nw) = spec.number;
    if facility >> fw != 0 {
        return Err(EncodeError::Facility(facility, fw));
    }
    if number >> nw != 0 {
        return Err(EncodeError::Number(number, nw));
    }
    let mut bits = [false; MAX_BITS as usize];
    for i in 0..fw {
        bits[(fs + i) as usize] = (facility >> (fw - 1 - i)) & 1 == 1;
    }
    for i in 0..nw {
        bits[(ns + i) as usize] = (number >> (nw - 1 - i)) & 1 == 1;
    }
    for p in spec.parity {
        let ones = p.covers.iter().filter(|&&pos| bits[pos as usize]).count();
        bits[p.at as usize] = match p.kind {
            Parity::Even => ones % 2 == 1,
            Parity::Odd => ones % 2 == 0,
        };
    }
    let mut out = Bits::default();
    for &b in &bits[..spec.len as usize] {
        out.push(b);
    }
    Ok(out)
}

/// Timing bounds of the decoder. Defaults follow the SIA AC-01 Wiegand standard with margins for
/// real readers (pulse 20–100 µs, interval 200 µs–20 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A low pulse shorter than this is noise.
    pub pulse_min: Duration,
    /// A low pulse longer than this is noise (a line low for a whole frame gap is stuck).
    pub pulse_max: Duration,
    /// Falling edges closer than this are noise.
    pub interval_min: Duration,
    /// No edge for this long ends the frame.
    pub frame_gap: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            pulse_min: Duration::from_micros(10),
            pulse_max: Duration::from_micros(2_000),
            interval_min: Duration::from_micros(200),
            frame_gap: Duration::from_millis(25),
        }
    }
}

/// Which data line an edge is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Line {
    D0,
    D1,
}

/// One edge on a data line: the level after the edge and its kernel timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WEdge {
    pub line: Line,
    /// `true` when the line went high (end of a pulse), `false` when it went low (a bit).
    pub high: bool,
    pub at: MonoTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Collecting a frame.
    Collecting,
    /// A fixed-format frame completed early; any bit before the gap makes it overlong.
    Trailing,
    /// A line is stuck low; everything is ignored until both lines are high again.
    Stuck,
}

/// The decoder for one reader.
#[derive(Debug, Clone)]
pub struct Decoder {
    formats: Vec<Format>,
    timing: Timing,
    early_complete_at: Option<u8>,
    phase: Phase,
    bits: Bits,
    fault: Option<Rejection>,
    low_since: [Option<MonoTime>; 2],
    last_fall: Option<MonoTime>,
    last_edge: Option<MonoTime>,
}

impl Decoder {
    /// `early_complete`: finish a frame as soon as it reaches the length of the longest configured
    /// fixed format (only when raw is not configured, so no longer frame can be valid).
    /// Finish every frame as soon as it has `len` bits (a keypad that sends each key in 4 or 8
    /// bits and nothing else), instead of at the frame gap.
    pub fn complete_at(mut self, len: Option<u8>) -> Decoder {
        if len.is_some() {
            self.early_complete_at = len;
        }
        self
    }

    pub fn new(formats: &[Format], timing: Timing, early_complete: bool) -> Decoder {
        let early_complete_at = if early_complete && !formats.contains(&Format::Raw) {
            formats.iter().filter_map(|f| f.bits()).max()
        } else {
            None
        };
        Decoder {
            formats: formats.to_vec(),
            timing,
            early_complete_at,
            phase: Phase::Collecting,
            bits: Bits::default(),
            fault: None,
            low_since: [None, None],
            last_fall: None,
            last_edge: None,
        }
    }

    fn idx(line: Line) -> usize {
        match line {
            Line::D0 => 0,
            Line::D1 => 1,
        }
    }

    fn is_idle(&self) -> bool {
        self.bits.len == 0 && self.fault.is_none() && self.phase == Phase::Collecting
    }

    fn reset(&mut self) {
        self.phase = Phase::Collecting;
        self.bits = Bits::default();
        self.fault = None;
        self.last_fall = None;
    }

    fn fault(&mut self, why: Rejection) {
        // Keep the first fault: it is the cause, later ones are consequences.
        self.fault.get_or_insert(why);
    }

    /// When [`Decoder::on_deadline`] must be called next, if at all.
    pub fn deadline(&self) -> Option<MonoTime> {
        // A line is called stuck only after a whole frame gap: pulse widths are judged on the
        // kernel timestamps of the rising edge, so late delivery of that edge never looks stuck.
        let stuck = if self.phase == Phase::Stuck {
            None // already reported: wait for the line to come back
        } else {
            self.low_since.iter().flatten().map(|t| *t + self.timing.frame_gap).min()
        };
        let gap = match (self.phase, self.last_edge) {
            (Phase::Stuck, _) => None,
            (_, Some(t)) if !self.is_idle() => Some(t + self.timing.frame_gap),
            _ => None,
        };
        match (stuck, gap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Feed one edge. Returns a finished frame when this edge completes one early.
    pub fn on_edge(&mut self, e: WEdge) -> Option<Outcome> {
        let i = Self::idx(e.line);
        let other = 1 - i;
        self.last_edge = Some(e.at);
        if self.phase == Phase::Stuck {
            if e.high {
                self.low_since[i] = None;
            } else {
                self.low_since[i] = Some(e.at);
            }
            if self.low_since.iter().all(Option::is_none) {
                self.reset();
            }
            return None;
        }
        if !e.high {
            // A falling edge: one bit.
            if self.low_since[i].is_some() {
                // Two falls without a rise: a missed edge; the frame cannot be trusted.
                self.fault(Rejection::Noise);
            }
            self.low_since[i] = Some(e.at);
            if self.low_since[other].is_some() {
                self.fault(Rejection::BothLinesLow);
            }
            if let Some(prev) = self.last_fall {
                if e.at.saturating_sub(prev) < self.timing.interval_min {
                    self.fault(Rejection::Noise);
                }
            }
            self.last_fall = Some(e.at);
            if self.phase == Phase::Trailing {
                self.fault(Rejection::Overlong);
                self.phase = Phase::Collecting;
                self.bits = Bits::default();
            }
            if !self.bits.push(e.line == Line::D1) {
                self.fault(Rejection::Overlong);
            }
            None
        } else {
            // A rising edge: the end of a pulse.
            let Some(fell) = self.low_since[i].take() else {
                // A rise without a fall (we started mid-pulse): ignore.
                return None;
            };
            let width = e.at.saturating_sub(fell);
            if width < self.timing.pulse_min || width > self.timing.pulse_max {
                self.fault(Rejection::Noise);
            }
            if self.phase == Phase::Collecting
                && self.fault.is_none()
                && self.low_since[other].is_none()
                && Some(self.bits.len) == self.early_complete_at
            {
                let bits = self.bits;
                self.phase = Phase::Trailing;
                self.bits = Bits::default();
                return Some(match decode(&self.formats, bits) {
                    Ok(read) => Outcome::Card(read),
                    Err(why) => Outcome::Rejected { why, bits },
                });
            }
            None
        }
    }

    /// An edge, after every deadline that passed before it by the edges' own timestamps: a frame
    /// ends where its edges say, not when the shell happened to read them (an edge delivered
    /// late, after the shell's timer fired, still belongs to its frame; one that really came
    /// after a gap starts a new one). Outcomes come with the time they are decided at.
    pub fn on_edge_in_time(&mut self, e: WEdge, out: &mut Vec<(Outcome, MonoTime)>) {
        while let Some(d) = self.deadline() {
            if d > e.at {
                break;
            }
            if let Some(o) = self.on_deadline(d) {
                out.push((o, d));
            }
            if self.deadline().is_some_and(|n| n <= d) {
                break; // no progress: never spin (a handled deadline always moves on)
            }
        }
        if let Some(o) = self.on_edge(e) {
            out.push((o, e.at));
        }
    }

    /// Call when the deadline has passed: ends a frame after the gap, or reports a stuck line.
    pub fn on_deadline(&mut self, now: MonoTime) -> Option<Outcome> {
        let stuck = self.low_since.iter().flatten().any(|t| now.saturating_sub(*t) >= self.timing.frame_gap);
        if stuck && self.phase != Phase::Stuck {
            let bits = self.bits;
            self.phase = Phase::Stuck;
            self.bits = Bits::default();
            self.fault = None;
            return Some(Outcome::Rejected { why: Rejection::LineStuckLow, bits });
        }
        let gap_over = self.last_edge.is_some_and(|t| now.saturating_sub(t) >= self.timing.frame_gap);
        if !gap_over || self.is_idle() || self.phase == Phase::Stuck {
            return None;
        }
        let bits = self.bits;
        let fault = self.fault;
        let phase = self.phase;
        self.reset();
        if let Some(why) = fault {
            return Some(Outcome::Rejected { why, bits });
        }
        if phase == Phase::Trailing {
            // The early-completed frame was already reported, and nothing followed.
            return None;
        }
        Some(match decode(&self.formats, bits) {
            Ok(read) => Outcome::Card(read),
            Err(why) => Outcome::Rejected { why, bits },
        })
    }
}

/// Turn a frame into the edges a reader would send: low pulses of `pulse` width, falling edges
/// `interval` apart, starting at `start`. `jitter(i)` adds to each interval (the simulator uses
/// random jitter; tests use zero).
pub fn edges_for(
    bits: Bits,
    start: MonoTime,
    pulse: Duration,
    interval: Duration,
    mut jitter: impl FnMut(usize) -> Duration,
) -> Vec<WEdge> {
    let mut out = Vec::with_capacity(bits.len as usize * 2);
    let mut t = start;
    for (i, b) in bits.iter().enumerate() {
        if i > 0 {
            t = t + interval + jitter(i);
        }
        let line = if b { Line::D1 } else { Line::D0 };
        out.push(WEdge { line, high: false, at: t });
        out.push(WEdge { line, high: true, at: t + pulse });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> MonoTime {
        MonoTime::from_nanos(1_000_000_000)
    }

    fn run(dec: &mut Decoder, edges: &[WEdge]) -> Vec<Outcome> {
        let mut out = Vec::new();
        let mut last = t0();
        for e in edges {
            // Any deadline that passes before this edge fires first, as in the reader stage.
            let mut timed = Vec::new();
            dec.on_edge_in_time(*e, &mut timed);
            out.extend(timed.into_iter().map(|(o, _)| o));
            last = e.at;
        }
        let end = last + Duration::from_secs(1);
        while let Some(d) = dec.deadline() {
            if d > end {
                break;
            }
            out.extend(dec.on_deadline(d));
            assert!(dec.deadline().is_none_or(|n| n > d), "a handled deadline must move on");
        }
        out
    }

    fn std_edges(bits: Bits) -> Vec<WEdge> {
        edges_for(bits, t0(), Duration::from_micros(50), Duration::from_millis(2), |_| Duration::ZERO)
    }

    #[test]
    fn known_h10301_vector() {
        // FC 7, card 12345: P 00000111 0011000000111001 P. Bits 1..=12 hold five ones, so the
        // leading even parity bit is 1; bits 13..=24 hold four, so the trailing odd parity bit is 1.
        let bits = encode(Format::H10301, 7, 12345).unwrap();
        assert_eq!(bits.to_string(), "10000011100110000001110011");
        let read = decode_fixed(Format::H10301, bits).unwrap();
        assert_eq!((read.card.facility, read.card.number), (7, 12345));
    }

    #[test]
    fn every_format_roundtrips_extremes() {
        for f in [Format::H10301, Format::H10306, Format::C1k35s, Format::H10304] {
            let spec = f.spec().unwrap();
            let fmax = (1u64 << spec.facility.1) - 1;
            let nmax = (1u64 << spec.number.1) - 1;
            for (fc, n) in [(0, 0), (fmax, nmax), (1, 1), (fmax / 3, nmax / 5)] {
                let bits = encode(f, fc, n).unwrap();
                assert_eq!(bits.len, spec.len, "{f}");
                let read = decode(&[f], bits).unwrap();
                assert_eq!(read.card, CardId { format: f, facility: fc, number: n }, "{f}");
            }
            assert!(encode(f, fmax + 1, 0).is_err());
            assert!(encode(f, 0, nmax + 1).is_err());
        }
    }

    #[test]
    fn every_single_bit_error_is_rejected_in_every_format() {
        for f in [Format::H10301, Format::H10306, Format::C1k35s, Format::H10304] {
            for (fc, n) in [(7, 12345), (0, 0), (1, 2)] {
                let spec = f.spec().unwrap();
                let fc = fc & ((1 << spec.facility.1) - 1);
                let good = encode(f, fc, n).unwrap();
                for pos in 0..good.len {
                    let mut bad = good;
                    bad.value ^= 1 << (good.len - 1 - pos);
                    assert_eq!(
                        decode(&[f], bad),
                        Err(Rejection::ParityError),
                        "{f}: flipping bit {pos} of {good} must be a parity error"
                    );
                }
            }
        }
    }

    #[test]
    fn c1k35s_matches_a_reference_frame() {
        // Company 1234, card 567890 computed independently from the HID Corporate 1000 layout.
        let bits = encode(Format::C1k35s, 1234, 567890).unwrap();
        // Check the three parity rules directly against their definitions.
        let b: Vec<bool> = bits.iter().collect();
        let even1 = (2..=33).filter(|p| p % 3 != 1).filter(|&p| b[p]).count() + usize::from(b[1]);
        let odd34 = (1..=32).filter(|p| p % 3 != 0).filter(|&p| b[p]).count() + usize::from(b[34]);
        let odd0 = b.iter().filter(|&&x| x).count();
        assert_eq!(even1 % 2, 0);
        assert_eq!(odd34 % 2, 1);
        assert_eq!(odd0 % 2, 1);
    }

    #[test]
    fn gap_ends_a_frame_and_early_completion_does_not_wait() {
        let bits = encode(Format::H10301, 7, 12345).unwrap();
        let edges = std_edges(bits);
        let last = edges.last().unwrap().at;
        // Without early completion the frame ends only after the gap.
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), false);
        let mut got = None;
        for e in &edges {
            assert!(d.on_edge(*e).is_none());
        }
        assert_eq!(d.deadline(), Some(last + Timing::default().frame_gap));
        got = got.or(d.on_deadline(last + Timing::default().frame_gap));
        assert!(matches!(got, Some(Outcome::Card(r)) if r.card.number == 12345));
        // With it, the last rising edge finishes the frame.
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), true);
        let outs: Vec<_> = edges.iter().filter_map(|e| d.on_edge(*e)).collect();
        assert_eq!(outs.len(), 1);
        assert!(matches!(outs[0], Outcome::Card(r) if r.card.facility == 7));
        // And the trailing gap reports nothing more.
        assert_eq!(d.on_deadline(last + Duration::from_secs(1)), None);
    }

    #[test]
    fn frame_boundaries_follow_the_edges_timestamps_not_when_they_are_read() {
        // A parity-error frame (bit 1 flipped), all its edges read at once long after they
        // happened (the shell was held up): still one 26-bit frame.
        let mut b: Vec<bool> = encode(Format::H10301, 7, 1001).unwrap().iter().collect();
        b[1] = !b[1];
        let text: String = b.iter().map(|x| if *x { '1' } else { '0' }).collect();
        let edges = std_edges(Bits::parse(&text).unwrap());
        // Every edge through `on_edge_in_time`, then a late deadline.
        let feed = |edges: &[WEdge]| {
            let mut d = Decoder::new(&[Format::H10301], Timing::default(), true);
            let mut out = Vec::new();
            for e in edges {
                d.on_edge_in_time(*e, &mut out);
            }
            out.extend(d.on_deadline(edges.last().unwrap().at + Duration::from_secs(1)).map(|o| (o, t0())));
            out
        };
        let out = feed(&edges);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(matches!(out[0].0, Outcome::Rejected { why: Rejection::ParityError, bits } if bits.len == 26));
        // The same bits with a real 30 ms pause after the 17th: two frames, the first decided at
        // its own gap's end, not at the late edge.
        let gap = Duration::from_millis(30);
        let split: Vec<WEdge> =
            edges.iter().enumerate().map(|(i, e)| if i >= 34 { WEdge { at: e.at + gap, ..*e } } else { *e }).collect();
        let out = feed(&split);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(out[0].0, Outcome::Rejected { why: Rejection::ShortFrame, bits } if bits.len == 17));
        assert_eq!(out[0].1, split[33].at + Timing::default().frame_gap, "decided at the gap's end");
        assert!(matches!(out[1].0, Outcome::Rejected { why: Rejection::ShortFrame, bits } if bits.len == 9));
    }

    #[test]
    fn early_completion_waits_for_the_longest_configured_format() {
        let short = encode(Format::H10301, 1, 2).unwrap();
        let mut d = Decoder::new(&[Format::H10301, Format::H10306], Timing::default(), true);
        let outs = run(&mut d, &std_edges(short));
        assert_eq!(outs.len(), 1);
        assert!(matches!(outs[0], Outcome::Card(r) if r.card.format == Format::H10301));
        let long = encode(Format::H10306, 300, 2).unwrap();
        let outs = run(&mut d, &std_edges(long));
        assert!(matches!(outs[..], [Outcome::Card(r)] if r.card.format == Format::H10306));
    }

    #[test]
    fn bits_after_an_early_frame_are_overlong() {
        let bits = encode(Format::H10301, 7, 1).unwrap();
        let mut longer = bits;
        longer.push(true);
        longer.push(false);
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), true);
        let outs = run(&mut d, &std_edges(longer));
        assert_eq!(outs.len(), 2, "{outs:?}");
        assert!(matches!(outs[1], Outcome::Rejected { why: Rejection::Overlong, .. }));
    }

    #[test]
    fn short_wrong_and_overlong_frames() {
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), true);
        let outs = run(&mut d, &std_edges(Bits::parse("0101").unwrap()));
        assert!(matches!(outs[..], [Outcome::Rejected { why: Rejection::ShortFrame, .. }]));
        let outs = run(&mut d, &std_edges(Bits::parse(&"1".repeat(30)).unwrap()));
        assert!(
            matches!(outs[..], [Outcome::Card(_), Outcome::Rejected { why: Rejection::Overlong, .. }])
                || matches!(outs[..], [Outcome::Rejected { .. }, Outcome::Rejected { why: Rejection::Overlong, .. }]),
            "{outs:?}"
        );
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), false);
        let outs = run(&mut d, &std_edges(Bits::parse(&"1".repeat(30)).unwrap()));
        assert!(matches!(outs[..], [Outcome::Rejected { why: Rejection::WrongLength, .. }]));
        // 65 edges: more than a frame can hold.
        let mut edges = std_edges(Bits::parse(&"10".repeat(32)).unwrap());
        let t = edges.last().unwrap().at + Duration::from_millis(2);
        edges.push(WEdge { line: Line::D0, high: false, at: t });
        edges.push(WEdge { line: Line::D0, high: true, at: t + Duration::from_micros(50) });
        let mut d = Decoder::new(&[Format::Raw], Timing::default(), true);
        let outs = run(&mut d, &edges);
        assert!(matches!(outs[..], [Outcome::Rejected { why: Rejection::Overlong, .. }]), "{outs:?}");
    }

    #[test]
    fn raw_keeps_bits_and_length() {
        let bits = Bits::parse("1011001110001").unwrap();
        let mut d = Decoder::new(&[Format::Raw], Timing::default(), true);
        let outs = run(&mut d, &std_edges(bits));
        match outs[..] {
            [Outcome::Card(r)] => {
                assert_eq!(r.bits, bits);
                assert_eq!(r.card.facility, 13);
                assert_eq!(r.card.number, 0b1011001110001);
            }
            _ => panic!("{outs:?}"),
        }
    }

    #[test]
    fn noise_pulse_interval_and_both_low() {
        let bits = encode(Format::H10301, 7, 12345).unwrap();
        // A 3 µs glitch pulse among the bits.
        let mut edges = std_edges(bits);
        edges[1].at = edges[0].at + Duration::from_micros(3);
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), true);
        let outs = run(&mut d, &edges);
        assert!(matches!(outs[..], [Outcome::Rejected { why: Rejection::Noise, .. }]), "{outs:?}");
        // Falling edges 100 µs apart.
        let edges = edges_for(bits, t0(), Duration::from_micros(20), Duration::from_micros(100), |_| Duration::ZERO);
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), true);
        let outs = run(&mut d, &edges);
        assert!(matches!(outs[..], [Outcome::Rejected { why: Rejection::Noise, .. }]), "{outs:?}");
        // D1 pulses while D0 is held low for 1 ms.
        let t = t0();
        let edges = [
            WEdge { line: Line::D0, high: false, at: t },
            WEdge { line: Line::D1, high: false, at: t + Duration::from_micros(500) },
            WEdge { line: Line::D1, high: true, at: t + Duration::from_micros(550) },
            WEdge { line: Line::D0, high: true, at: t + Duration::from_micros(1000) },
        ];
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), true);
        let outs = run(&mut d, &edges);
        assert!(matches!(outs[..], [Outcome::Rejected { why: Rejection::BothLinesLow, .. }]), "{outs:?}");
    }

    #[test]
    fn a_pulse_longer_than_the_maximum_is_noise() {
        let bits = encode(Format::H10301, 7, 12345).unwrap();
        let edges = edges_for(bits, t0(), Duration::from_micros(2_500), Duration::from_millis(5), |_| Duration::ZERO);
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), true);
        let outs = run(&mut d, &edges);
        assert!(matches!(outs[..], [Outcome::Rejected { why: Rejection::Noise, .. }]), "{outs:?}");
    }

    #[test]
    fn stuck_line_is_reported_once_and_recovers() {
        let t = t0();
        let mut d = Decoder::new(&[Format::H10301], Timing::default(), true);
        assert!(d.on_edge(WEdge { line: Line::D0, high: false, at: t }).is_none());
        let dl = d.deadline().unwrap();
        assert_eq!(dl, t + Timing::default().frame_gap);
        assert!(matches!(d.on_deadline(dl), Some(Outcome::Rejected { why: Rejection::LineStuckLow, .. })));
        // Pulses on the other line while stuck are ignored, and nothing more is reported.
        for k in 0..30u64 {
            let at = t + Duration::from_millis(10 + 2 * k);
            assert!(d.on_edge(WEdge { line: Line::D1, high: false, at }).is_none());
            assert!(d.on_edge(WEdge { line: Line::D1, high: true, at: at + Duration::from_micros(50) }).is_none());
        }
        assert_eq!(d.deadline(), None);
        // The line comes back: a clean frame decodes again.
        d.on_edge(WEdge { line: Line::D0, high: true, at: t + Duration::from_millis(200) });
        let bits = encode(Format::H10301, 7, 12345).unwrap();
        let edges = edges_for(
            bits,
            t + Duration::from_millis(300),
            Duration::from_micros(50),
            Duration::from_millis(2),
            |_| Duration::ZERO,
        );
        let outs = run(&mut d, &edges);
        assert!(matches!(outs[..], [Outcome::Card(_)]), "{outs:?}");
    }

    #[test]
    fn masked_card_hides_the_number() {
        let c = CardId { format: Format::H10301, facility: 7, number: 12345 };
        assert_eq!(c.masked(), "H10301:*:*45");
        assert!(!c.masked().contains("123"));
    }

    fn any_format() -> impl Strategy<Value = Format> {
        prop_oneof![Just(Format::H10301), Just(Format::H10306), Just(Format::C1k35s), Just(Format::H10304)]
    }

    proptest! {
        #[test]
        fn encode_decode_roundtrip(f in any_format(), fc in any::<u64>(), n in any::<u64>(), jit in 0u64..3000) {
            let spec = f.spec().unwrap();
            let fc = fc & ((1 << spec.facility.1) - 1);
            let n = n & ((1 << spec.number.1) - 1);
            let bits = encode(f, fc, n).unwrap();
            let edges = edges_for(bits, t0(), Duration::from_micros(50), Duration::from_millis(2), |i| Duration::from_micros((i as u64 * jit) % 1500));
            for early in [false, true] {
                let mut d = Decoder::new(&[f], Timing::default(), early);
                let outs = run(&mut d, &edges);
                prop_assert_eq!(outs.len(), 1);
                let want = CardId { format: f, facility: fc, number: n };
                prop_assert!(matches!(outs[0], Outcome::Card(r) if r.card == want));
            }
        }

        /// Whatever arrives, the decoder never panics and a card read always has a configured
        /// format and passes that format's parity.
        #[test]
        fn arbitrary_edges_never_yield_an_invalid_card(
            raw in proptest::collection::vec((any::<bool>(), any::<bool>(), 0u64..5_000_000), 0..150),
            formats in proptest::sample::subsequence(vec![Format::H10301, Format::H10306, Format::C1k35s, Format::H10304], 1..4),
            early in any::<bool>(),
        ) {
            let mut d = Decoder::new(&formats, Timing::default(), early);
            let mut t = t0();
            let mut edges = Vec::new();
            for (line, high, dt) in raw {
                t = t + Duration::from_nanos(dt);
                edges.push(WEdge { line: if line { Line::D1 } else { Line::D0 }, high, at: t });
            }
            // Every deadline, once handled, moves on (the stage would spin otherwise).
            if let Some(dl) = d.deadline() {
                d.on_deadline(dl);
                prop_assert!(d.deadline().is_none_or(|n| n > dl));
            }
            for o in run(&mut d, &edges) {
                if let Outcome::Card(r) = o {
                    prop_assert!(formats.contains(&r.card.format));
                    prop_assert_eq!(decode_fixed(r.card.format, r.bits), Ok(r));
                }
            }
        }
    }
}
