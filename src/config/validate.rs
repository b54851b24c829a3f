//! Validation of a parsed configuration: every refusal names the key (exit code 5).

use std::collections::HashSet;

use super::*;

/// Check everything types cannot: ranges, references, uniqueness, wiring, and the Art. 10 rule
/// that no door can be face-only (every door needs a card reader).
pub fn validate(cfg: &Config) -> Result<(), ConfigError> {
    check_id("gate.site", &cfg.gate.site)?;
    check_id("gate.gate", &cfg.gate.gate)?;
    if cfg.gate.gate.starts_with('_') {
        return Err(invalid("gate.gate", "gate ids starting with `_` are reserved (`_site` addresses every gate)"));
    }
    let m = &cfg.mqtt;
    if !(256..=64 << 20).contains(&m.max_payload_bytes) {
        return Err(invalid("mqtt.max_payload_bytes", "must be 256..=67108864"));
    }
    if !(1024..=m.max_payload_bytes).contains(&m.roster_page_max_bytes) {
        return Err(invalid("mqtt.roster_page_max_bytes", "must be 1024..=mqtt.max_payload_bytes"));
    }
    if !(10..=86_400).contains(&m.roster_sync_timeout_secs) {
        return Err(invalid("mqtt.roster_sync_timeout_secs", "must be 10..=86400"));
    }
    if !(2..=64).contains(&m.max_json_depth) {
        return Err(invalid("mqtt.max_json_depth", "must be 2..=64"));
    }
    if !(100..=600_000).contains(&m.unlock_max_ms) {
        return Err(invalid("mqtt.unlock_max_ms", "must be 100..=600000"));
    }
    if !(1_000..=3_600_000).contains(&m.max_command_lifetime_ms) {
        return Err(invalid("mqtt.max_command_lifetime_ms", "must be 1000..=3600000"));
    }
    let prefix = &m.reply_topic_prefix;
    if prefix.is_empty()
        || prefix.len() > 128
        || prefix.contains(['+', '#', '\0'])
        || prefix.starts_with("menshen/")
        || prefix.starts_with('$')
    {
        return Err(invalid(
            "mqtt.reply_topic_prefix",
            "must be 1-128 characters, no wildcards, not under menshen/ or $ (e.g. \"bms/\")",
        ));
    }
    if m.request_keep < 100 {
        return Err(invalid("mqtt.request_keep", "must be at least 100"));
    }
    if let Some(t) = &m.tls {
        if t.client_cert_file.is_some() != t.client_key_file.is_some() {
            return Err(invalid("mqtt.tls.client_key_file", "client_cert_file and client_key_file go together"));
        }
    }
    if m.password_file.is_some() && m.username.is_none() {
        return Err(invalid("mqtt.username", "a password_file needs a username"));
    }
    let p = &cfg.privacy;
    if p.max_retention_days == 0 || p.max_retention_days > crate::model::MAX_RETENTION_DAYS {
        return Err(invalid("privacy.max_retention_days", "must be 1..=3650: no consent is unlimited"));
    }
    if p.default_retention_days == 0 || p.default_retention_days > p.max_retention_days {
        return Err(invalid("privacy.default_retention_days", "must be 1..=max_retention_days"));
    }
    if p.audit_retention_days < 365 {
        return Err(invalid("privacy.audit_retention_days", "audit records are kept at least a year"));
    }
    if cfg.privacy.rules_file.is_some() && cfg.privacy.rules_version.as_deref().unwrap_or("").is_empty() {
        return Err(invalid("privacy.rules_version", "a rules_file needs its version (consents name it)"));
    }
    let kp = &cfg.keypad;
    if !(4..=12).contains(&kp.min_len) || !(kp.min_len..=12).contains(&kp.max_len) {
        return Err(invalid("keypad.min_len", "PINs are 4..=12 digits: min_len 4..=12, max_len min_len..=12"));
    }
    if kp.submit_len.is_some_and(|n| !(kp.min_len..=kp.max_len).contains(&n)) {
        return Err(invalid("keypad.submit_len", "must be within min_len..=max_len"));
    }
    if !(500..=60_000).contains(&kp.inter_key_ms) {
        return Err(invalid("keypad.inter_key_ms", "must be 500..=60000"));
    }
    if !(1_000..=60_000).contains(&kp.card_pin_window_ms) {
        return Err(invalid("keypad.card_pin_window_ms", "must be 1000..=60000"));
    }
    if !(1..=100).contains(&kp.max_wrong) {
        return Err(invalid("keypad.max_wrong", "must be 1..=100"));
    }
    if !(1..=86_400).contains(&kp.wrong_window_secs) || !(1..=86_400).contains(&kp.lockout_secs) {
        return Err(invalid("keypad.lockout_secs", "wrong_window_secs and lockout_secs must be 1..=86400"));
    }
    if !(1..=16).contains(&cfg.face.threads) {
        return Err(invalid("face.threads", "must be 1..=16"));
    }
    let f = &cfg.face;
    if !(64..=1920).contains(&f.detector_long_side) {
        return Err(invalid("face.detector_long_side", "must be 64..=1920"));
    }
    if !(0.3..=0.95).contains(&f.match_threshold) {
        return Err(invalid("face.match_threshold", "must be 0.3..=0.95 (0.53 is FAR 1e-4 on LFW)"));
    }
    if !(0.0..=0.5).contains(&f.match_margin) {
        return Err(invalid("face.match_margin", "must be 0..=0.5"));
    }
    if !(0.0..=1.0).contains(&f.liveness_threshold) {
        return Err(invalid("face.liveness_threshold", "must be 0..=1"));
    }
    if !(1..=30).contains(&f.agreement.frames) {
        return Err(invalid("face.agreement.frames", "must be 1..=30"));
    }
    if let Some(d) = &f.door {
        if !cfg.doors.iter().any(|x| &x.name == d) {
            return Err(invalid("face.door", format!("no door `{d}`")));
        }
    }
    match &f.camera {
        Some(CameraConfig::Files { fps, .. }) if !(0.1..=60.0).contains(fps) => {
            return Err(invalid("face.camera.fps", "must be 0.1..=60"));
        }
        Some(CameraConfig::V4l2 { width, height, .. })
            if !(160..=4096).contains(width) || !(120..=4096).contains(height) || width % 2 != 0 =>
        {
            return Err(invalid("face.camera.width", "width 160..=4096 (even) and height 120..=4096"));
        }
        _ => {}
    }
    if cfg.homeassistant.discovery_prefix.is_empty() || cfg.homeassistant.discovery_prefix.contains(['+', '#']) {
        return Err(invalid("homeassistant.discovery_prefix", "a plain topic prefix"));
    }
    if parse_offset(&cfg.gate.utc_offset).is_none() {
        return Err(invalid("gate.utc_offset", format!("`{}` is not an offset like +08:00", cfg.gate.utc_offset)));
    }
    if !(100..=60_000).contains(&cfg.gate.shutdown_grace_ms) {
        return Err(invalid("gate.shutdown_grace_ms", "must be 100..=60000"));
    }
    if cfg.gate.events_held_max == 0 {
        return Err(invalid("gate.events_held_max", "must be at least 1"));
    }
    if cfg.gate.outbox_alarm_depth == 0 {
        return Err(invalid("gate.outbox_alarm_depth", "must be at least 1"));
    }
    if cfg.log.level.parse::<tracing_subscriber::filter::LevelFilter>().is_err() {
        return Err(invalid(
            "log.level",
            format!("`{}` is not one of off, error, warn, info, debug, trace", cfg.log.level),
        ));
    }
    if cfg.doors.is_empty() {
        return Err(invalid("doors", "at least one door is needed"));
    }
    if !(cfg.hardware.chip.starts_with("gpiochip") || cfg.hardware.chip.starts_with('/')) {
        return Err(invalid("hardware.chip", format!("`{}` is not gpiochipN or a /dev path", cfg.hardware.chip)));
    }
    // Two keys naming the same line by different forms (`22` and `"GPIO22"`) are caught when
    // the driver resolves them: the kernel refuses the second request.
    let mut pins: HashSet<LineRef> = HashSet::new();
    let mut claim = |key: String, pin: &LineRef| -> Result<(), ConfigError> {
        pin.spec().map_err(|e| invalid(key.clone(), e))?;
        if cfg.hardware.backend == Backend::Sim {
            pin.sim_pin().map_err(|e| invalid(key.clone(), e))?;
        }
        if !pins.insert(pin.clone()) {
            return Err(invalid(key, format!("GPIO line {pin} is used twice")));
        }
        Ok(())
    };
    let mut names = HashSet::new();
    for (i, d) in cfg.doors.iter().enumerate() {
        let k = |f: &str| format!("doors[{i}].{f}");
        check_id(&k("name"), &d.name)?;
        if !names.insert(d.name.clone()) {
            return Err(invalid(k("name"), format!("door `{}` is defined twice", d.name)));
        }
        claim(k("relay_pin"), &d.relay_pin)?;
        for (f, p) in [("contact_pin", &d.contact_pin), ("rex_pin", &d.rex_pin), ("fire_pin", &d.fire_pin)] {
            if let Some(p) = p {
                claim(k(f), p)?;
            }
        }
        if !(100..=60_000).contains(&d.pulse_ms) {
            return Err(invalid(k("pulse_ms"), "must be 100..=60000 (a relay pulse of 0.1 s to 60 s)"));
        }
        if !(1..=1_000).contains(&d.debounce_ms) {
            return Err(invalid(k("debounce_ms"), "must be 1..=1000"));
        }
        if !(1..=3_600).contains(&d.held_open_secs) {
            return Err(invalid(k("held_open_secs"), "must be 1..=3600"));
        }
    }
    let mut rnames = HashSet::new();
    for (i, r) in cfg.readers.iter().enumerate() {
        let k = |f: &str| format!("readers[{i}].{f}");
        check_id(&k("name"), &r.name)?;
        if !rnames.insert(r.name.clone()) {
            return Err(invalid(k("name"), format!("reader `{}` is defined twice", r.name)));
        }
        if cfg.door(&r.door).is_none() {
            return Err(invalid(k("door"), format!("no door named `{}`", r.door)));
        }
        if r.formats.is_empty() && r.reads_cards() {
            return Err(invalid(
                k("formats"),
                "list at least one format (a keys-only reader, role = \"keys\", needs none)",
            ));
        }
        let mut seen = HashSet::new();
        for (j, f) in r.formats.iter().enumerate() {
            let parsed: Format = f.parse().map_err(|e: String| invalid(format!("readers[{i}].formats[{j}]"), e))?;
            if !seen.insert(parsed) {
                return Err(invalid(format!("readers[{i}].formats[{j}]"), format!("{parsed} is listed twice")));
            }
        }
        match r.key_bits {
            None => {}
            Some(4 | 8) if r.role == ReaderRole::Keys => {}
            Some(4 | 8) => return Err(invalid(
                k("key_bits"),
                "only a keys-only reader (role = \"keys\") can end frames at 4 or 8 bits: a card would be cut short",
            )),
            Some(_) => return Err(invalid(k("key_bits"), "must be 4 or 8")),
        }
        if !matches!(r.star_key, 10 | 11) {
            return Err(invalid(k("star_key"), "must be 10 or 11 (the key value the keypad sends for `*`)"));
        }
        claim(k("d0_pin"), &r.d0_pin)?;
        claim(k("d1_pin"), &r.d1_pin)?;
        for (f, line) in r.feedback.lines() {
            let f = if f == "beeper" { "beeper_pin".to_string() } else { format!("{f}_pin") };
            claim(k(&format!("feedback.{f}")), line)?;
        }
        for cue in crate::feedback::Cue::ALL {
            if let Some(spec) = r.feedback.pattern(cue) {
                crate::feedback::parse_steps(spec).map_err(|e| invalid(k(&format!("feedback.{}", cue.code())), e))?;
            }
        }
        let longest_interval = 20_000u64; // µs, the Wiegand standard's maximum bit interval
        if !(21..=1_000).contains(&r.frame_gap_ms) || r.frame_gap_ms * 1_000 <= longest_interval {
            return Err(invalid(k("frame_gap_ms"), "must be 21..=1000 (longer than the 20 ms maximum bit interval)"));
        }
        if r.pulse_min_us == 0 || r.pulse_min_us >= r.pulse_max_us {
            return Err(invalid(k("pulse_min_us"), "must be at least 1 and below pulse_max_us"));
        }
        if r.pulse_max_us > 100_000 {
            return Err(invalid(k("pulse_max_us"), "must be at most 100000"));
        }
        if r.interval_min_us <= r.pulse_min_us {
            return Err(invalid(k("interval_min_us"), "must be above pulse_min_us"));
        }
    }
    for (i, r) in cfg.osdp_readers.iter().enumerate() {
        let k = |f: &str| format!("osdp_readers[{i}].{f}");
        check_id(&k("name"), &r.name)?;
        if !rnames.insert(r.name.clone()) {
            return Err(invalid(k("name"), format!("reader `{}` is defined twice", r.name)));
        }
        if cfg.door(&r.door).is_none() {
            return Err(invalid(k("door"), format!("no door named `{}`", r.door)));
        }
        if r.formats.is_empty() {
            return Err(invalid(k("formats"), "list at least one format"));
        }
        for (j, f) in r.formats.iter().enumerate() {
            let _: Format = f.parse().map_err(|e: String| invalid(format!("osdp_readers[{i}].formats[{j}]"), e))?;
        }
        if r.address > 126 {
            return Err(invalid(k("address"), "must be 0..=126 (127 is the broadcast address)"));
        }
        if ![9600, 19200, 38400, 57600, 115200, 230400].contains(&r.baud) {
            return Err(invalid(k("baud"), "must be one of OSDP's rates: 9600, 19200, 38400, 57600, 115200, 230400"));
        }
        if !(2_000..=600_000).contains(&r.offline_alarm_ms) {
            return Err(invalid(
                k("offline_alarm_ms"),
                "must be 2000..=600000 (a reader is retried every second; it takes that long to tell a wrong key from a pulled cable)",
            ));
        }
        if let Some(other) = cfg.osdp_readers[..i].iter().find(|o| o.device == r.device) {
            return Err(invalid(
                k("device"),
                format!(
                    "reader `{}` is on the same port: one OSDP reader per port (several readers on one bus, multi-drop, are not supported yet: give each its own adapter)",
                    other.name
                ),
            ));
        }
    }
    // P1 at the site level: every door must have a non-face way in.
    for (i, d) in cfg.doors.iter().enumerate() {
        if !cfg.readers.iter().any(|r| r.door == d.name && r.reads_cards())
            && !cfg.osdp_readers.iter().any(|r| r.door == d.name)
        {
            return Err(invalid(
                format!("doors[{i}]"),
                format!(
                    "door `{}` has no card reader: face can never be the only way in (SPC 2021 Art. 10, REQUIREMENTS P1)",
                    d.name
                ),
            ));
        }
    }
    let m = &cfg.mqtt;
    if m.enabled {
        if m.host.trim().is_empty() {
            return Err(invalid("mqtt.host", "must not be empty"));
        }
        if m.port == 0 {
            return Err(invalid("mqtt.port", "must not be 0"));
        }
        if m.password_file.is_some() && m.username.is_none() {
            return Err(invalid("mqtt.password_file", "a password needs a username"));
        }
    }
    if !(5..=600).contains(&m.keep_alive_secs) {
        return Err(invalid("mqtt.keep_alive_secs", "must be 5..=600"));
    }
    if !(1..=1_000).contains(&m.inflight) {
        return Err(invalid("mqtt.inflight", "must be 1..=1000"));
    }
    if m.backoff_min_ms == 0 || m.backoff_min_ms > m.backoff_max_ms {
        return Err(invalid("mqtt.backoff_min_ms", "must be at least 1 and at most backoff_max_ms"));
    }
    if let Some(id) = &m.client_id {
        if id.is_empty() || id.len() > 64 {
            return Err(invalid("mqtt.client_id", "must be 1-64 characters"));
        }
    }
    Ok(())
}
