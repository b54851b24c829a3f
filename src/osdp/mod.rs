//! OSDP readers (IEC 60839-11-5) on RS-485, the gate as control panel. libosdp (C, through the
//! `libosdp` crate) runs the protocol and its Secure Channel; this module holds what the gate
//! decides about a reader, as pure code: what a card read or key press is for the decision path
//! (the same one as Wiegand's), which feedback a cue becomes, and when a reader's link is an
//! alarm ([`LinkWatch`]). [`wire`] reads the bus beside libosdp to count what it drops.
//! The shell (the serial port, libosdp's control panel thread) is [`cp`], the stage is
//! `daemon::stages::osdp`.

#[cfg(feature = "osdp")]
pub mod cp;
pub mod wire;

use std::time::Duration;

use crate::clock::MonoTime;
use crate::feedback::Cue;
use crate::keypad::Key;
use crate::wiegand::{Bits, MAX_BITS};

/// A key of an OSDP keypad reply (osdp_KEYPAD): ASCII digits, `*` as 0x7F and `#` as 0x0D (the
/// specification's codes), and the ASCII `*`/`#` some readers send.
pub fn key(byte: u8) -> Option<Key> {
    match byte {
        b'0'..=b'9' => Some(Key::Digit(byte - b'0')),
        0x7F | b'*' => Some(Key::Star),
        0x0D | b'#' => Some(Key::Hash),
        _ => None,
    }
}

/// A card read in Wiegand format (`bits` bits, MSB first in `data`) as the bits the Wiegand
/// decoder takes. `None` when it is longer than any format this gate reads, or the data is short.
pub fn card_bits(nr_bits: usize, data: &[u8]) -> Option<Bits> {
    if nr_bits == 0 || nr_bits > MAX_BITS as usize || data.len() * 8 < nr_bits {
        return None;
    }
    let mut b = Bits::default();
    for i in 0..nr_bits {
        b.push(data[i / 8] & (0x80 >> (i % 8)) != 0);
    }
    Some(b)
}

/// What the reader's LED and beeper do for a cue: (colour, on time) of the LED and beeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Show {
    pub led: Led,
    /// In units of 100 ms (OSDP's timer unit).
    pub led_tenths: u8,
    pub beeps: u8,
    pub beep_tenths: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Led {
    Green,
    Red,
    Amber,
}

/// The OSDP feedback for a cue (the reader's own LED and beeper, driven by commands over the
/// Secure Channel instead of GPIO lines).
pub fn show(cue: Cue) -> Show {
    match cue {
        Cue::Granted => Show { led: Led::Green, led_tenths: 30, beeps: 1, beep_tenths: 2 },
        Cue::Denied => Show { led: Led::Red, led_tenths: 15, beeps: 3, beep_tenths: 1 },
        Cue::FaceWaiting => Show { led: Led::Amber, led_tenths: 50, beeps: 0, beep_tenths: 0 },
        Cue::PinEntry => Show { led: Led::Amber, led_tenths: 10, beeps: 1, beep_tenths: 1 },
        Cue::Lockout => Show { led: Led::Red, led_tenths: 100, beeps: 5, beep_tenths: 1 },
    }
}

/// A reader's link as the control panel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStatus {
    /// libosdp has the reader online (with Secure Channel when the key is set).
    pub online: bool,
    pub secure: bool,
    /// The reader answered lately (a frame that passed its CRC within the last 0.5 s; libosdp
    /// polls about ten times a second).
    pub answering: bool,
    /// The reader answered anything within the last 1.5 s: it is on the bus, whatever fails.
    pub heard: bool,
    /// What its last capability reply claimed about Secure Channel.
    pub claims_secure: Option<bool>,
}

/// Why a reader is not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFault {
    /// Nothing answers (unplugged, wiring, power, wrong address or baud rate).
    Offline,
    /// It claims it cannot do Secure Channel (a reader without it, or a downgrade on the bus).
    NoSecureChannel,
    /// It answers but the Secure Channel handshake fails (a wrong key, or a reader still on
    /// its install key: run `menshen osdp install`).
    SecureChannelFailed,
}

impl LinkFault {
    pub fn code(self) -> &'static str {
        match self {
            LinkFault::Offline => "offline",
            LinkFault::NoSecureChannel => "no_secure_channel",
            LinkFault::SecureChannelFailed => "secure_channel_failed",
        }
    }

    pub fn detail(self) -> &'static str {
        match self {
            LinkFault::Offline => "the OSDP reader does not answer (wiring, power, address or baud rate)",
            LinkFault::NoSecureChannel => {
                "the OSDP reader claims no Secure Channel: refused (a reader without it, or a downgrade on the bus); plain mode only with insecure = true"
            }
            LinkFault::SecureChannelFailed => {
                "the OSDP reader answers but the Secure Channel handshake fails (wrong key, or the reader is not installed: menshen osdp install)"
            }
        }
    }
}

/// A change worth an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkChange {
    Fault(LinkFault),
    Restored,
}

/// Decides when a reader's link is an alarm: when it has not been usable for `alarm_after`
/// (online and answering, with Secure Channel unless the reader is `insecure`), once per
/// outage, and when it is back.
#[derive(Debug)]
pub struct LinkWatch {
    alarm_after: Duration,
    insecure: bool,
    since: MonoTime,
    usable: bool,
    raised: Option<LinkFault>,
}

impl LinkWatch {
    pub fn new(alarm_after: Duration, insecure: bool, now: MonoTime) -> LinkWatch {
        LinkWatch { alarm_after, insecure, since: now, usable: false, raised: None }
    }

    /// The reader can be used now: its reads are taken.
    pub fn usable(&self) -> bool {
        self.usable
    }

    pub fn fault(&self) -> Option<LinkFault> {
        self.raised
    }

    pub fn observe(&mut self, s: LinkStatus, now: MonoTime) -> Option<LinkChange> {
        let usable = s.online && s.answering && (s.secure || self.insecure);
        if usable {
            self.usable = true;
            self.since = now;
            return self.raised.take().map(|_| LinkChange::Restored);
        }
        if self.usable {
            self.usable = false;
            self.since = now;
        }
        if self.raised.is_some() || now.saturating_sub(self.since) < self.alarm_after {
            return None;
        }
        let fault = if s.claims_secure == Some(false) && !self.insecure {
            LinkFault::NoSecureChannel
        } else if s.heard {
            LinkFault::SecureChannelFailed
        } else {
            LinkFault::Offline
        };
        self.raised = Some(fault);
        Some(LinkChange::Fault(fault))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wiegand::{decode, Format};

    fn at(ms: u64) -> MonoTime {
        MonoTime::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn keys_in_both_codings() {
        assert_eq!(key(b'7'), Some(Key::Digit(7)));
        assert_eq!(key(0x7F), Some(Key::Star));
        assert_eq!(key(b'*'), Some(Key::Star));
        assert_eq!(key(0x0D), Some(Key::Hash));
        assert_eq!(key(b'#'), Some(Key::Hash));
        assert_eq!(key(b'A'), None);
    }

    #[test]
    fn a_26_bit_read_decodes_like_the_wiegand_wire() {
        // H10301 facility 18, card 4242 with its parity bits, as an OSDP reader packs it.
        let fields: u64 = (18 << 16) | 4242;
        let even = (fields >> 12).count_ones() % 2 == 1;
        let odd = (fields & 0xFFF).count_ones() % 2 == 0;
        let frame = ((even as u64) << 25) | (fields << 1) | odd as u64;
        let packed = (frame << 6).to_be_bytes();
        let bits = card_bits(26, &packed[4..8]).expect("26 bits");
        assert_eq!(bits.len, 26);
        assert_eq!(bits.value, frame);
        let read = decode(&[Format::H10301], bits).expect("decodes");
        assert_eq!((read.card.facility, read.card.number), (18, 4242));
        assert_eq!(card_bits(26, &packed[4..6]), None, "short data");
        assert_eq!(card_bits(200, &[0; 25]), None, "longer than any format");
    }

    #[test]
    fn an_unplugged_reader_alarms_after_the_configured_time_and_once() {
        let mut w = LinkWatch::new(Duration::from_millis(2000), false, at(0));
        let up = LinkStatus { online: true, secure: true, answering: true, heard: true, claims_secure: Some(true) };
        assert_eq!(w.observe(up, at(10)), None);
        assert!(w.usable());
        let down = LinkStatus::default();
        assert_eq!(w.observe(down, at(100)), None);
        assert!(!w.usable());
        assert_eq!(w.observe(down, at(2099)), None);
        assert_eq!(w.observe(down, at(2100)), Some(LinkChange::Fault(LinkFault::Offline)));
        assert_eq!(w.observe(down, at(9000)), None, "once per outage");
        assert_eq!(w.observe(up, at(9010)), Some(LinkChange::Restored));
        assert_eq!(w.observe(up, at(9020)), None);
    }

    #[test]
    fn a_reader_without_secure_channel_is_never_usable_unless_insecure() {
        let plain =
            LinkStatus { online: true, secure: false, answering: true, heard: true, claims_secure: Some(false) };
        let mut w = LinkWatch::new(Duration::from_millis(500), false, at(0));
        assert_eq!(w.observe(plain, at(100)), None);
        assert!(!w.usable());
        assert_eq!(w.observe(plain, at(600)), Some(LinkChange::Fault(LinkFault::NoSecureChannel)));
        let mut w = LinkWatch::new(Duration::from_millis(500), true, at(0));
        assert_eq!(w.observe(plain, at(100)), None);
        assert!(w.usable(), "insecure = true takes it");
    }

    #[test]
    fn a_silent_reader_libosdp_still_calls_online_is_not_usable() {
        let mut w = LinkWatch::new(Duration::from_millis(500), false, at(0));
        let up = LinkStatus { online: true, secure: true, answering: true, heard: true, claims_secure: Some(true) };
        w.observe(up, at(1));
        let silent = LinkStatus { answering: false, heard: false, ..up };
        assert_eq!(w.observe(silent, at(10)), None);
        assert!(!w.usable());
        assert_eq!(w.observe(silent, at(510)), Some(LinkChange::Fault(LinkFault::Offline)));
    }

    #[test]
    fn a_wrong_key_is_told_apart_from_an_unplugged_reader() {
        let mut w = LinkWatch::new(Duration::from_millis(500), false, at(0));
        let failing =
            LinkStatus { online: false, secure: false, answering: true, heard: true, claims_secure: Some(true) };
        assert_eq!(w.observe(failing, at(600)), Some(LinkChange::Fault(LinkFault::SecureChannelFailed)));
    }

    #[test]
    fn every_cue_has_a_show() {
        for c in Cue::ALL {
            let s = show(c);
            assert!(s.led_tenths > 0);
        }
        assert_eq!(show(Cue::Granted).led, Led::Green);
        assert_eq!(show(Cue::Denied).led, Led::Red);
    }
}
