//! The OSDP wire, read beside libosdp (pure): frames found in the bytes of one direction of the
//! bus, each checked (length, CRC-16 or checksum), so that garbage, bad CRCs and replies out of
//! sequence are *counted* (libosdp drops them silently), the time of a card read's reply frame
//! is known (the benchmark's start), and the capability reply's Secure Channel claim is seen
//! (a downgrade shows there first). libosdp decides the protocol; this never does.

/// Start of message.
pub const SOM: u8 = 0x53;
/// The optional mark byte before a packet (OSDP 2.2).
pub const MARK: u8 = 0xFF;
/// The longest packet taken (libosdp's packet buffer is 256 bytes; a reader's reply is less).
pub const MAX_PACKET: usize = 1024;
/// Reply codes this gate looks at.
pub const REPLY_PDCAP: u8 = 0x46;
pub const REPLY_RAW: u8 = 0x50;
pub const REPLY_KEYPAD: u8 = 0x53;
/// The capability function code of Communication Security (bit 0 of its compliance: AES-128).
pub const CAP_COMMUNICATION_SECURITY: u8 = 9;

const CTRL_SQN: u8 = 0x03;
const CTRL_CRC: u8 = 0x04;
const CTRL_SCB: u8 = 0x08;

/// CRC-16/AUG-CCITT as OSDP uses it (polynomial 0x1021, seed 0x1D0F, sent low byte first).
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0x1D0F;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// A frame that passed its length and check character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The PD's address (7 bits).
    pub address: u8,
    /// A reply from a PD (address bit 7), else a command from the CP.
    pub reply: bool,
    pub sqn: u8,
    /// The secure block's type, when the packet has one (0x11–0x18).
    pub secure: Option<u8>,
    /// The command or reply code (never encrypted).
    pub code: u8,
    /// The data, when it is plain (no secure block, or a MAC-only one); `None` when encrypted.
    pub data: Option<Vec<u8>>,
    /// The MAC of a Secure Channel packet. MACs are chained through the session, so one seen
    /// twice is a replay.
    pub mac: Option<[u8; 4]>,
}

impl Packet {
    /// The Secure Channel claim of a plain capability reply: `Some(true)` if it offers AES-128.
    pub fn claims_secure_channel(&self) -> Option<bool> {
        if !self.reply || self.code != REPLY_PDCAP {
            return None;
        }
        let data = self.data.as_ref()?;
        Some(data.chunks_exact(3).any(|c| c[0] == CAP_COMMUNICATION_SECURITY && c[1] & 0x01 != 0))
    }
}

/// Why bytes were not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Bytes outside any frame.
    Noise,
    /// A length field no packet can have.
    Length,
    /// The CRC-16 or checksum did not match.
    Check,
    /// A frame that stopped before its length (see [`Scanner::flush`]).
    Truncated,
}

impl Bad {
    pub fn code(self) -> &'static str {
        match self {
            Bad::Noise => "noise",
            Bad::Length => "bad_length",
            Bad::Check => "bad_crc",
            Bad::Truncated => "truncated",
        }
    }
}

/// What the scanner found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Packet(Packet),
    Bad(Bad),
}

/// Finds frames in one direction's bytes, in order. Bounded: it holds at most one packet.
#[derive(Debug, Default)]
pub struct Scanner {
    buf: Vec<u8>,
    /// Noise bytes run together count as one `Noise`.
    in_noise: bool,
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner::default()
    }

    /// Bytes are waiting for the rest of a frame.
    pub fn pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Feed bytes; what they completed is appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Seen>) {
        self.buf.extend_from_slice(bytes);
        self.scan(out);
    }

    /// The line went quiet with a frame half read: count it, and look for frames in what it held.
    pub fn flush(&mut self, out: &mut Vec<Seen>) {
        if self.buf.first() == Some(&SOM) {
            out.push(Seen::Bad(Bad::Truncated));
            self.buf.remove(0);
            self.in_noise = true;
            self.scan(out);
            if !self.buf.is_empty() {
                self.buf.clear();
                out.push(Seen::Bad(Bad::Truncated));
            }
        }
    }

    fn scan(&mut self, out: &mut Vec<Seen>) {
        loop {
            // Up to the next start of message: mark bytes are allowed, anything else is noise.
            let start = self.buf.iter().position(|&b| b == SOM).unwrap_or(self.buf.len());
            if self.buf[..start].iter().any(|&b| b != MARK) && !self.in_noise {
                out.push(Seen::Bad(Bad::Noise));
                self.in_noise = true;
            }
            self.buf.drain(..start);
            if self.buf.len() < 5 {
                return;
            }
            let len = u16::from_le_bytes([self.buf[2], self.buf[3]]) as usize;
            let ctrl = self.buf[4];
            let check_len = if ctrl & CTRL_CRC != 0 { 2 } else { 1 };
            if len < 5 + 1 + check_len || len > MAX_PACKET {
                self.resync(out, Bad::Length);
                continue;
            }
            if self.buf.len() < len {
                return;
            }
            let frame = &self.buf[..len];
            let ok = if check_len == 2 {
                crc16(&frame[..len - 2]) == u16::from_le_bytes([frame[len - 2], frame[len - 1]])
            } else {
                frame[..len - 1].iter().fold(0u8, |a, &b| a.wrapping_add(b)).wrapping_neg() == frame[len - 1]
            };
            let packet = if ok { parse(frame, check_len) } else { None };
            match packet {
                Some(p) => {
                    out.push(Seen::Packet(p));
                    self.in_noise = false;
                    self.buf.drain(..len);
                }
                None => self.resync(out, Bad::Check),
            }
        }
    }

    /// A start of message that led nowhere: count it and look again from the next byte.
    fn resync(&mut self, out: &mut Vec<Seen>, why: Bad) {
        out.push(Seen::Bad(why));
        self.in_noise = true;
        self.buf.remove(0);
    }
}

/// The fields of a frame whose check character matched.
fn parse(frame: &[u8], check_len: usize) -> Option<Packet> {
    let ctrl = frame[4];
    let mut at = 5;
    let mut secure = None;
    if ctrl & CTRL_SCB != 0 {
        let sb_len = *frame.get(at)? as usize;
        secure = Some(*frame.get(at + 1)?);
        if sb_len < 2 {
            return None;
        }
        at += sb_len;
    }
    let code = *frame.get(at)?;
    at += 1;
    let mac = match secure {
        Some(t) if t >= 0x15 => 4,
        _ => 0,
    };
    let end = frame.len().checked_sub(check_len + mac)?;
    if end < at {
        return None;
    }
    let plain = matches!(secure, None | Some(0x11..=0x16));
    let mac_bytes = (mac == 4).then(|| [frame[end], frame[end + 1], frame[end + 2], frame[end + 3]]);
    Some(Packet {
        address: frame[1] & 0x7F,
        reply: frame[1] & 0x80 != 0,
        sqn: ctrl & CTRL_SQN,
        secure,
        code,
        data: plain.then(|| frame[at..end].to_vec()),
        mac: mac_bytes,
    })
}

/// Build a plain packet with a CRC (for tests and the simulated bus).
pub fn packet(address: u8, reply: bool, sqn: u8, code: u8, data: &[u8]) -> Vec<u8> {
    let len = 5 + 1 + data.len() + 2;
    let mut p = vec![
        SOM,
        address | if reply { 0x80 } else { 0 },
        len as u8,
        (len >> 8) as u8,
        CTRL_CRC | (sqn & CTRL_SQN),
        code,
    ];
    p.extend_from_slice(data);
    let crc = crc16(&p);
    p.extend_from_slice(&crc.to_le_bytes());
    p
}

/// Tracks the command sequence so that a reply out of sequence is counted. OSDP: every reply
/// carries the sequence number of the command it answers. A Secure Channel reply whose MAC was
/// seen before is a replay, even where its sequence number happens to fit (one in three).
#[derive(Debug, Default)]
pub struct Sequence {
    last_command: Option<(u8, u8)>,
    macs: std::collections::VecDeque<[u8; 4]>,
}

/// How many recent reply MACs are remembered.
const MACS_KEPT: usize = 256;

impl Sequence {
    /// A command the CP sent.
    pub fn command(&mut self, p: &Packet) {
        self.last_command = Some((p.address, p.sqn));
    }

    /// A reply: is it the answer to the last command (and not a replay)?
    pub fn reply_in_sequence(&mut self, p: &Packet) -> bool {
        let fits = match self.last_command.take() {
            Some((address, sqn)) => address == p.address && sqn == p.sqn,
            None => false,
        };
        let replayed = p.mac.is_some_and(|m| self.macs.contains(&m));
        if let Some(m) = p.mac {
            if self.macs.len() == MACS_KEPT {
                self.macs.pop_front();
            }
            self.macs.push_back(m);
        }
        fits && !replayed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(bytes: &[u8]) -> Vec<Seen> {
        let mut s = Scanner::new();
        let mut out = Vec::new();
        s.push(bytes, &mut out);
        out
    }

    #[test]
    fn crc_matches_the_osdp_check_value() {
        // CRC-16/AUG-CCITT's catalogued check value for "123456789".
        assert_eq!(crc16(b"123456789"), 0xE5CC);
    }

    #[test]
    fn a_poll_from_the_spec_is_read() {
        // osdp_POLL to address 0, sequence 1, with CRC: the header as the specification lays it out.
        let p = packet(0, false, 1, 0x60, &[]);
        assert_eq!(p[..6], [0x53, 0x00, 0x08, 0x00, 0x05, 0x60]);
        assert_eq!(u16::from_le_bytes([p[6], p[7]]), crc16(&p[..6]));
        let seen = scan(&p);
        assert_eq!(
            seen,
            vec![Seen::Packet(Packet {
                address: 0,
                reply: false,
                sqn: 1,
                secure: None,
                code: 0x60,
                data: Some(vec![]),
                mac: None,
            })]
        );
    }

    #[test]
    fn frames_split_anywhere_and_marks_between_them() {
        let mut bytes = vec![MARK];
        bytes.extend(packet(1, false, 2, 0x60, &[]));
        bytes.push(MARK);
        bytes.extend(packet(1, true, 2, 0x40, &[]));
        for cut in 0..bytes.len() {
            let mut s = Scanner::new();
            let mut out = Vec::new();
            s.push(&bytes[..cut], &mut out);
            s.push(&bytes[cut..], &mut out);
            assert_eq!(out.len(), 2, "cut at {cut}: {out:?}");
            assert!(out.iter().all(|s| matches!(s, Seen::Packet(_))));
            assert!(!s.pending());
        }
    }

    #[test]
    fn a_bad_crc_is_counted_and_the_next_frame_still_read() {
        let mut bad = packet(0, true, 1, REPLY_RAW, &[0, 1, 26, 0, 1, 2, 3, 4]);
        let n = bad.len();
        bad[n - 1] ^= 0x55;
        bad.extend(packet(0, true, 2, 0x40, &[]));
        let seen = scan(&bad);
        assert_eq!(seen[0], Seen::Bad(Bad::Check));
        assert!(matches!(seen.last(), Some(Seen::Packet(p)) if p.code == 0x40), "{seen:?}");
    }

    #[test]
    fn noise_is_counted_once_per_run_and_a_bogus_length_resyncs() {
        let mut bytes = vec![1, 2, 3, 4];
        bytes.extend([SOM, 0x80, 0x02, 0x00, 0x04]); // length 2: impossible
        bytes.extend(packet(3, true, 0, 0x40, &[]));
        let seen = scan(&bytes);
        assert_eq!(seen[0], Seen::Bad(Bad::Noise));
        assert_eq!(seen[1], Seen::Bad(Bad::Length));
        assert!(matches!(seen.last(), Some(Seen::Packet(p)) if p.address == 3));
    }

    #[test]
    fn a_truncated_frame_is_flushed_and_counted() {
        let p = packet(0, true, 1, REPLY_RAW, &[0, 1, 26, 0, 1, 2, 3, 4]);
        let mut s = Scanner::new();
        let mut out = Vec::new();
        s.push(&p[..7], &mut out);
        assert!(out.is_empty() && s.pending());
        s.flush(&mut out);
        assert!(out.contains(&Seen::Bad(Bad::Truncated)));
        assert!(!s.pending());
    }

    #[test]
    fn the_capability_reply_says_whether_it_offers_secure_channel() {
        let with = packet(0, true, 1, REPLY_PDCAP, &[1, 1, 0, 9, 1, 0, 10, 0, 1]);
        let without = packet(0, true, 1, REPLY_PDCAP, &[1, 1, 0, 9, 0, 0]);
        let get = |b: &[u8]| match &scan(b)[0] {
            Seen::Packet(p) => p.claims_secure_channel(),
            other => panic!("{other:?}"),
        };
        assert_eq!(get(&with), Some(true));
        assert_eq!(get(&without), Some(false));
        assert_eq!(get(&packet(0, true, 1, 0x40, &[])), None);
    }

    #[test]
    fn checksum_frames_are_checked_too() {
        let mut p = vec![SOM, 0x00, 0x07, 0x00, 0x00, 0x60];
        let sum = p.iter().fold(0u8, |a, &b| a.wrapping_add(b)).wrapping_neg();
        p.push(sum);
        assert!(matches!(&scan(&p)[0], Seen::Packet(p) if p.code == 0x60));
        let n = p.len();
        p[n - 1] ^= 1;
        assert_eq!(scan(&p)[0], Seen::Bad(Bad::Check));
    }

    #[test]
    fn a_reply_out_of_sequence_is_seen() {
        let mut seq = Sequence::default();
        let cmd = Packet { address: 0, reply: false, sqn: 1, secure: None, code: 0x60, data: None, mac: None };
        seq.command(&cmd);
        assert!(seq.reply_in_sequence(&Packet { reply: true, code: 0x40, ..cmd.clone() }));
        seq.command(&cmd);
        assert!(!seq.reply_in_sequence(&Packet { reply: true, sqn: 2, code: 0x40, ..cmd.clone() }));
        // A second reply to one command is out of sequence too.
        assert!(!seq.reply_in_sequence(&Packet { reply: true, code: 0x40, ..cmd.clone() }));
        // A secure reply replayed where its sequence number fits: its MAC gives it away.
        let secure = Packet { reply: true, code: 0x50, secure: Some(0x16), mac: Some([1, 2, 3, 4]), ..cmd.clone() };
        seq.command(&cmd);
        assert!(seq.reply_in_sequence(&secure));
        seq.command(&cmd);
        assert!(!seq.reply_in_sequence(&secure), "a MAC seen twice is a replay");
    }

    #[test]
    fn a_secure_packet_gives_its_mac() {
        // A reply with a MAC-only secure block (SCS_16): header, SCB [2, 0x16], code, data, MAC, CRC.
        let mut p = vec![SOM, 0x83, 0, 0, 0x0C | 1, 2, 0x16, 0x40];
        p.extend([9, 8, 7, 6]);
        let len = p.len() + 2;
        p[2] = len as u8;
        let crc = crc16(&p);
        p.extend(crc.to_le_bytes());
        match &scan(&p)[0] {
            Seen::Packet(k) => {
                assert_eq!((k.secure, k.mac, k.code), (Some(0x16), Some([9, 8, 7, 6]), 0x40));
                assert_eq!(k.data.as_deref(), Some(&[][..]));
            }
            other => panic!("{other:?}"),
        }
    }
}
