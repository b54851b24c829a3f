//! Arbitrary bytes on the OSDP bus, cut into arbitrary reads, through the wire scanner the gate
//! runs beside libosdp. It must never panic; it holds at most one packet; what it finds does not
//! depend on how the bytes were cut; every packet it accepts passed its check character (a plain
//! CRC packet re-encodes to the same bytes); it finds no more frames than the bytes could hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use menshen::osdp::wire::{packet, Scanner, Seen, MAX_PACKET};

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, bytes)) = data.split_first() else { return };
    let mut whole = Vec::new();
    let mut s = Scanner::new();
    s.push(bytes, &mut whole);
    s.flush(&mut whole);
    assert!(!s.pending());

    let mut chunked = Vec::new();
    let mut c = Scanner::new();
    let step = usize::from(cut_seed % 16) + 1;
    for chunk in bytes.chunks(step) {
        c.push(chunk, &mut chunked);
    }
    c.flush(&mut chunked);
    assert_eq!(whole, chunked, "the result depends on how the bytes were cut ({step})");
    assert!(whole.len() <= bytes.len() + 1);

    for seen in &whole {
        if let Seen::Packet(p) = seen {
            if p.secure.is_none() {
                if let Some(d) = &p.data {
                    let again = packet(p.address, p.reply, p.sqn, p.code, d);
                    // A CRC packet with no secure block is exactly what `packet` builds.
                    assert!(again.len() <= MAX_PACKET);
                    let mut sc = Scanner::new();
                    let mut out = Vec::new();
                    sc.push(&again, &mut out);
                    assert_eq!(out, vec![Seen::Packet(p.clone())]);
                }
            }
        }
    }
});
