//! Arbitrary text into the config parser: a clear error or a valid config, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = menshen::config::parse(text) {
            // Whatever parses has passed validation: every reader names an existing door.
            assert!(cfg.readers.iter().all(|r| cfg.door(&r.door).is_some()));
        }
    }
});
