//! Arbitrary MQTT command publishes into the command parser: a request or a coded refusal, never
//! a panic; and whatever is accepted obeys the replay rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use menshen::command::{parse, Command, Inbound, Limits, Verb};

const NOW: i64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    // First byte: flags and the verb; the rest: the payload.
    let Some((&flags, payload)) = data.split_first() else { return };
    let verb = Verb::ALL[usize::from(flags & 0x0f) % Verb::ALL.len()];
    let inb = Inbound {
        topic: format!("menshen/v1/s/g/cmd/{}", verb.name()),
        payload: payload.to_vec(),
        retain: flags & 0x10 != 0,
        response_topic: (flags & 0x20 != 0).then(|| "bms/r".to_string()),
        correlation: (flags & 0x40 != 0).then(|| b"corr".to_vec()),
        expiry_secs: (flags & 0x80 != 0).then_some(30),
    };
    let limits = Limits { max_payload_bytes: 4096, ..Limits::default() };
    match parse(&inb, "s", "g", &limits, NOW) {
        Ok(req) => {
            assert!(!inb.retain, "a retained command was accepted");
            assert!(payload.len() <= limits.max_payload_bytes);
            assert!(!req.request_id.is_empty());
            // Every id fits the schemas' `^[!-~]{1,128}$`, whatever made it.
            assert!(req.request_id.len() <= 128 && req.request_id.bytes().all(|b| b.is_ascii_graphic()));
            if let Command::Unlock { duration_ms, .. } = req.command {
                assert!(duration_ms.is_none_or(|d| d >= 1 && d <= limits.unlock_max_ms));
                assert!(inb.expiry_secs.is_some() || std::str::from_utf8(payload).is_ok_and(|t| t.contains("expires_at")));
            }
        }
        Err(refusal) => assert!(!refusal.error.message.is_empty()),
    }
});
