//! Arbitrary keypad frames (any length, any bits, any timing) through the keypad core as the
//! reader stage runs it: classified by role and `*`/`#` map, collected into PIN entry, wrong PINs
//! counted. It must never panic; a key it decodes must re-encode to the same burst; a PIN it
//! submits must come from `#`, the configured length or a 26-bit frame and have an allowed
//! length; a refused burst leaves nothing typed; the entry's deadline moves on once handled.
#![no_main]

use libfuzzer_sys::fuzz_target;
use menshen::clock::MonoTime;
use menshen::keypad::{
    classify, encode_key, GuardParams, Key, PinEntry, PinEvent, PinGuard, PinParams, Role, StarHash, Frame,
};
use menshen::wiegand::{decode, Bits, Format, Outcome};
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let role = [Role::Cards, Role::Keys, Role::Both][usize::from(flags & 3) % 3];
    let map = if flags & 4 != 0 { StarHash::HashTen } else { StarHash::StarTen };
    let params = PinParams {
        min_len: 4,
        max_len: 8,
        submit_len: (flags & 8 != 0).then_some(6),
        inter_key: Duration::from_millis(1500),
    };
    let mut entry = PinEntry::new(params);
    let mut guard = PinGuard::new(GuardParams::default());
    let mut t = MonoTime::from_nanos(1_000_000_000);
    for chunk in rest.chunks(6) {
        let [len, a, b, c, d, gap] = std::array::from_fn(|i| *chunk.get(i).unwrap_or(&0));
        t = t + Duration::from_millis(u64::from(gap) * 20);
        while let Some(dl) = entry.deadline() {
            if dl > t {
                break;
            }
            assert_eq!(entry.tick(dl), Some(PinEvent::TimedOut));
            assert!(entry.deadline().is_none());
        }
        let len = len % 40;
        let value = u64::from_le_bytes([a, b, c, d, 0, 0, 0, 0]) & ((1u64 << len) - 1);
        let bits = Bits { value, len };
        let o = match decode(&[Format::H10301], bits) {
            Ok(read) => Outcome::Card(read),
            Err(why) => Outcome::Rejected { why, bits },
        };
        match classify(role, map, o) {
            Frame::Card(_) => assert!(role != Role::Keys || !matches!(len, 4 | 8 | 26)),
            Frame::Key(k) => {
                assert!(role != Role::Cards && matches!(len, 4 | 8));
                assert_eq!(encode_key(map, k, len), Some(bits), "a key must re-encode to its burst");
                let typed = entry.typed();
                match entry.key(k, t) {
                    Some(PinEvent::Submit(p)) => {
                        assert!((4..=8).contains(&p.len()), "{} digits", p.len());
                        assert!(k == Key::Hash || params.submit_len == Some(p.len() as u8));
                        if p.digits() == [1, 2, 3, 4] {
                            guard.right("r", "x");
                        } else {
                            guard.wrong("r", Some("x"), t);
                        }
                    }
                    Some(PinEvent::TooLong) => assert_eq!(typed, 8),
                    Some(PinEvent::TooShort) => assert!(typed < 4 && k == Key::Hash),
                    _ => {}
                }
                assert!(entry.typed() <= 8);
            }
            Frame::Pin(p) => {
                assert!(role == Role::Keys && len == 26);
                assert!(!p.is_empty() && p.len() <= 5, "a 26-bit PIN holds at most 65535");
            }
            Frame::KeyRejected(..) => {
                assert!(role != Role::Cards);
                entry.clear();
                assert_eq!(entry.typed(), 0);
            }
        }
    }
});
