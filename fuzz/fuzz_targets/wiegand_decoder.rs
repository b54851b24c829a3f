//! Arbitrary edge trains into the Wiegand decoder: it must never panic, its deadlines must always
//! move on once handled, and anything it calls a card must pass its format's parity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use menshen::clock::MonoTime;
use menshen::wiegand::{decode_fixed, Decoder, Format, Line, Outcome, Timing, WEdge};
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let all = [Format::H10301, Format::H10306, Format::C1k35s, Format::H10304, Format::Raw];
    let formats: Vec<Format> = all.iter().enumerate().filter(|(i, _)| data[0] >> i & 1 == 1).map(|(_, f)| *f).collect();
    if formats.is_empty() {
        return;
    }
    let mut dec = Decoder::new(&formats, Timing::default(), data[1] & 1 == 1);
    let mut t = MonoTime::from_nanos(1_000_000_000);
    let mut check = |o: Option<Outcome>| {
        if let Some(Outcome::Card(r)) = o {
            assert!(formats.contains(&r.card.format));
            if r.card.format != Format::Raw {
                assert_eq!(decode_fixed(r.card.format, r.bits), Ok(r));
            }
        }
    };
    for chunk in data[2..].chunks(3) {
        let [b, lo, hi] = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        // Up to ~33 ms between edges, in 1 µs steps: covers noise, standard and gap timings.
        t = t + Duration::from_micros(u64::from(u16::from_le_bytes([lo, hi])) / 2);
        while let Some(d) = dec.deadline() {
            if d > t {
                break;
            }
            check(dec.on_deadline(d));
            assert!(dec.deadline().is_none_or(|n| n > d));
        }
        let line = if b & 1 == 1 { Line::D1 } else { Line::D0 };
        check(dec.on_edge(WEdge { line, high: b & 2 == 2, at: t }));
    }
    if let Some(d) = dec.deadline() {
        check(dec.on_deadline(d + Duration::from_secs(1)));
    }
});
