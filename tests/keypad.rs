#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! PIN keypads end to end: the real daemon on the simulated chip (Wiegand bit timing on the
//! lines), a real mosquitto, PINs set over MQTT and typed on the keypad as 4-bit, 8-bit and
//! 26-bit frames with both `*`/`#` maps; `card_and_pin`, lockouts, duress; bad keypad input.

mod common;

use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use menshen::hw::sim::WorldOp;
use serde_json::{json, Value};
use std::time::Duration;

const SITE: &str = "site1";
const GATE: &str = "gate1";

/// The reader the keys go to: `front` itself when it reads cards and keys (`both`), else the
/// keys-only reader `keypad` beside it at the same door (a door must have a card reader).
fn kp(role: &str) -> &'static str {
    if role == "both" {
        "front"
    } else {
        "keypad"
    }
}

/// A gate whose keypad has role `role` and sends `*` as `star_key`, with tight PIN timings so
/// the timeouts are quick to show.
fn up(role: &str, star_key: u8) -> (Broker, Gate, Bms) {
    up_with(role, star_key, None)
}

fn up_with(role: &str, star_key: u8, key_bits: Option<u8>) -> (Broker, Gate, Bms) {
    let port = free_port();
    let broker = Broker::start(port);
    let mut gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 300, ..GateOpts::default() });
    gate.edit_config(|t| {
        let readers = t["readers"].as_array_mut().unwrap();
        let mut r = readers[0].as_table().unwrap().clone();
        if role == "both" {
            readers.clear();
        } else {
            r.insert("name".into(), "keypad".into());
            r.insert("d0_pin".into(), 20.into());
            r.insert("d1_pin".into(), 21.into());
        }
        r.insert("role".into(), role.into());
        r.insert("star_key".into(), i64::from(star_key).into());
        if let Some(b) = key_bits {
            r.insert("key_bits".into(), i64::from(b).into());
        }
        readers.push(r.into());
        let mut kp = toml::Table::new();
        kp.insert("inter_key_ms".into(), 1500.into());
        kp.insert("card_pin_window_ms".into(), 3000.into());
        kp.insert("max_wrong".into(), 3.into());
        kp.insert("lockout_secs".into(), 4.into());
        t.insert("keypad".into(), kp.into());
    });
    gate.start_sim();
    gate.start_daemon();
    let bms = common::bms_when_online(&gate, port);
    (broker, gate, bms)
}

fn keys_at(gate: &Gate, reader: &str, keys: &str, bits: u8, star_key: u8) -> Value {
    gate.world(WorldOp::Keys {
        reader: reader.into(),
        keys: keys.into(),
        bits: Some(bits),
        star_key: Some(star_key),
        gap_ms: None,
    })
}

/// Keys at `front` (a `both` reader).
fn keys(gate: &Gate, keys: &str, bits: u8, star_key: u8) -> Value {
    keys_at(gate, "front", keys, bits, star_key)
}

fn ok(reply: &Value) -> &Value {
    assert_eq!(reply["ok"], true, "{reply}");
    &reply["result"]
}

/// The access events after the first `skip`, once there are `n` more.
fn next_access(bms: &Bms, skip: usize, n: usize, gate: &Gate) -> Vec<Value> {
    let got = wait_for(Duration::from_secs(10), || bms.messages("/event/access").len() >= skip + n);
    let all = bms.messages("/event/access");
    assert!(got, "wanted {n} access events after {skip}, have {:?}\nlog:\n{}", &all[skip.min(all.len())..], gate.log());
    all[skip..].to_vec()
}

/// How many times the relay has been energized.
fn pulses(gate: &Gate) -> usize {
    gate.relay("front")["transitions"].as_array().unwrap().iter().filter(|t| t["energized"] == true).count()
}

fn add_resident(bms: &Bms, id: &str, mode: &str, card: u64) {
    let spec = json!({"resident": {"id": id, "mode": "card",
        "cards": [{"format": "H10301", "facility": 7, "number": card}]}});
    ok(&bms.command(SITE, GATE, "resident.upsert", spec, None));
    if mode != "card" {
        ok(&bms.command(SITE, GATE, "resident.set_mode", json!({"resident": id, "mode": mode}), None));
    }
}

fn set_pin(bms: &Bms, id: &str, pin: &str, duress: bool) -> Value {
    bms.command(SITE, GATE, "credential.add", json!({"resident": id, "pin": {"pin": pin, "duress": duress}}), None)
}

#[test]
fn pins_typed_in_every_burst_form_and_both_star_hash_maps_open_and_never_leak() {
    for (star_key, role) in [(10u8, "keys"), (11, "both")] {
        let (_broker, gate, bms) = up(role, star_key);
        add_resident(&bms, "r-1", "card_or_pin", 1001);
        let r = set_pin(&bms, "r-1", "48213579", false);
        assert_eq!(ok(&r)["pin"], "pin", "{r}");
        assert!(!r.to_string().contains("48213579"), "the reply never carries the PIN: {r}");

        // 4-bit and 8-bit bursts ended by `#` (the map decides which value `#` is).
        for (bits, n) in [(4u8, 0usize), (8, 1)] {
            let before = pulses(&gate);
            keys_at(&gate, kp(role), "48213579#", bits, star_key);
            let ev = &next_access(&bms, n, 1, &gate)[0];
            assert_eq!((ev["decision"].as_str(), ev["method"].as_str()), (Some("granted"), Some("pin")), "{ev}");
            assert_eq!(ev["resident"], "r-1");
            assert!(wait_for(Duration::from_secs(3), || pulses(&gate) > before), "no relay pulse for {bits}-bit keys");
        }
        // `*` clears what was typed: `99*48213579#` is the PIN 48213579.
        keys_at(&gate, kp(role), "99*48213579#", 4, star_key);
        assert_eq!(next_access(&bms, 2, 1, &gate)[0]["decision"], "granted");
        // A wrong PIN: pin_wrong.
        keys_at(&gate, kp(role), "1111#", 4, star_key);
        assert_eq!(next_access(&bms, 3, 1, &gate)[0]["reason"], "pin_wrong");

        // Nothing the gate published, and nothing in its log, holds the PIN or its hash.
        let pin_hash_key = std::fs::read(gate.dir.path().join("state/pin.key")).unwrap();
        assert_eq!(pin_hash_key.len(), 32, "the PIN key is a 32-byte file");
        let mode = std::fs::metadata(gate.dir.path().join("state/pin.key")).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
        for e in bms.messages("/event/access").iter().chain(bms.messages("/event/system").iter()) {
            assert!(!e.to_string().contains("48213579"), "an event holds the PIN: {e}");
        }
        assert!(!gate.log().contains("48213579"), "the log holds the PIN");
        // The store file holds the PIN's keyed hash, not the digits.
        let store = std::fs::read(gate.dir.path().join("state/menshen.redb")).unwrap();
        assert!(!store.windows(8).any(|w| w == b"48213579"), "the store holds the PIN in clear");
        // A 26-bit PIN frame is a PIN on a keys reader, a card on a `both` reader (by the
        // configured role; its number is then in the card event, so docs/install.md says a
        // keypad that sends whole PINs is `keys`).
        // (A whole-PIN keypad sends at most 65,535: resident r-2's PIN is five digits.)
        add_resident(&bms, "r-2", "card_or_pin", 1002);
        ok(&set_pin(&bms, "r-2", "60375", false));
        keys_at(&gate, kp(role), "60375", 26, star_key);
        let ev = &next_access(&bms, 4, 1, &gate)[0];
        if role == "keys" {
            assert_eq!((ev["decision"].as_str(), ev["method"].as_str()), (Some("granted"), Some("pin")), "{ev}");
        } else {
            assert_eq!((ev["method"].as_str(), ev["reason"].as_str()), (Some("card"), Some("unknown_card")), "{ev}");
        }
    }
}

#[test]
fn card_and_pin_needs_the_card_then_its_holders_pin() {
    let (_broker, gate, bms) = up("both", 10);
    add_resident(&bms, "r-1", "card_and_pin", 2001);
    add_resident(&bms, "r-2", "card_or_pin", 2002);
    // No PIN yet is fine: card_and_pin admits no face (P1 is not at stake).
    ok(&set_pin(&bms, "r-1", "135790", false));
    ok(&set_pin(&bms, "r-2", "246802", false));
    // The same PIN for a second resident is refused, without naming who holds it.
    let r = set_pin(&bms, "r-2", "135790", false);
    assert_eq!(r["code"], "credential_taken", "{r}");
    assert!(!r.to_string().contains("r-1"), "{r}");

    // The card alone waits; the holder's PIN completes it.
    let before = pulses(&gate);
    gate.swipe(7, 2001);
    std::thread::sleep(Duration::from_millis(300));
    assert!(bms.messages("/event/access").is_empty(), "the card waits for its PIN");
    keys(&gate, "135790#", 4, 10);
    let ev = &next_access(&bms, 0, 1, &gate)[0];
    assert_eq!((ev["decision"].as_str(), ev["method"].as_str()), (Some("granted"), Some("card_and_pin")), "{ev}");
    assert_eq!(ev["card"]["number"], 2001);
    assert!(wait_for(Duration::from_secs(3), || pulses(&gate) > before));

    // Another resident's PIN after the card: pin_wrong, naming only the card's holder.
    gate.swipe(7, 2001);
    keys(&gate, "246802#", 8, 10);
    let ev = &next_access(&bms, 1, 1, &gate)[0];
    assert_eq!(ev["reason"], "pin_wrong", "{ev}");
    assert_eq!(ev["resident"], "r-1");
    // The PIN alone does not open card_and_pin.
    keys(&gate, "135790#", 4, 10);
    assert_eq!(next_access(&bms, 2, 1, &gate)[0]["reason"], "mode_requires_card");
    // The card, then no PIN within the window: pin_timeout for that card.
    gate.swipe(7, 2001);
    let ev = &next_access(&bms, 3, 1, &gate)[0];
    assert_eq!((ev["reason"].as_str(), ev["card"]["number"].as_u64()), (Some("pin_timeout"), Some(2001)), "{ev}");
    // A pause longer than the inter-key timeout discards the digits typed.
    gate.world(WorldOp::Keys {
        reader: "front".into(),
        keys: "2468".into(),
        bits: Some(4),
        star_key: Some(10),
        gap_ms: Some(1800),
    });
    let ev = &next_access(&bms, 4, 1, &gate)[0];
    assert_eq!(ev["reason"], "pin_timeout", "{ev}");
    // Too many digits.
    keys(&gate, "123456789", 4, 10);
    assert!(wait_for(Duration::from_secs(5), || bms
        .messages("/event/access")
        .iter()
        .any(|e| e["reason"] == "pin_too_long")));
}

#[test]
fn wrong_pins_lock_the_keypad_not_the_cards_and_the_duress_pin_opens_with_a_silent_alarm() {
    let (_broker, gate, bms) = up("both", 10);
    add_resident(&bms, "r-1", "card_or_pin", 3001);
    ok(&set_pin(&bms, "r-1", "5555", false));
    ok(&set_pin(&bms, "r-1", "9111", true));
    let r = set_pin(&bms, "r-1", "5555", true);
    assert_eq!(r["code"], "invalid_value", "the duress PIN must differ: {r}");

    // max_wrong = 3: the third wrong PIN locks the reader, with an alarm.
    for (i, pin) in ["1000#", "1001#", "1002#"].into_iter().enumerate() {
        keys(&gate, pin, 4, 10);
        assert_eq!(next_access(&bms, i, 1, &gate)[0]["reason"], "pin_wrong");
    }
    assert!(
        wait_for(Duration::from_secs(5), || bms
            .messages("/event/alarm")
            .iter()
            .any(|a| a["alarm"] == "pin_lockout" && a["reader"] == "front")),
        "{}",
        gate.log()
    );
    // Locked: the right PIN is refused; a card still opens.
    keys(&gate, "5555#", 4, 10);
    assert_eq!(next_access(&bms, 3, 1, &gate)[0]["reason"], "pin_locked_out");
    gate.swipe(7, 3001);
    assert_eq!(next_access(&bms, 4, 1, &gate)[0]["decision"], "granted");
    // After the lockout (4 s), the right PIN opens again.
    std::thread::sleep(Duration::from_millis(4200));
    keys(&gate, "5555#", 4, 10);
    assert_eq!(next_access(&bms, 5, 1, &gate)[0]["decision"], "granted");

    // The duress PIN opens like the PIN, and raises `duress` naming the resident; the access
    // event itself does not say so (anyone watching the door's display or the event sees nothing).
    let before = pulses(&gate);
    keys(&gate, "9111#", 4, 10);
    let ev = &next_access(&bms, 6, 1, &gate)[0];
    assert_eq!((ev["decision"].as_str(), ev["resident"].as_str()), (Some("granted"), Some("r-1")), "{ev}");
    assert!(!ev.to_string().contains("duress"));
    assert!(wait_for(Duration::from_secs(3), || pulses(&gate) > before));
    assert!(wait_for(Duration::from_secs(5), || bms
        .messages("/event/alarm")
        .iter()
        .any(|a| a["alarm"] == "duress" && a["resident"] == "r-1" && a["door"] == "front")));

    // Removing the PIN: it no longer opens.
    let r = bms.command(SITE, GATE, "credential.remove", json!({"resident": "r-1", "pin": "pin"}), None);
    ok(&r);
    keys(&gate, "5555#", 4, 10);
    assert_eq!(next_access(&bms, 7, 1, &gate)[0]["reason"], "pin_wrong");
}

#[test]
fn face_or_pin_needs_a_pin_first_and_keeps_it() {
    let (_broker, gate, bms) = up("both", 10);
    add_resident(&bms, "r-1", "card", 4001);
    // face_or_pin without a PIN is refused by the Art. 10 guard: the PIN is its non-face way in.
    let r = bms.command(SITE, GATE, "resident.set_mode", json!({"resident": "r-1", "mode": "face_or_pin"}), None);
    assert_eq!(r["code"], "face_only_refused", "{r}");
    assert!(r["message"].as_str().unwrap().contains("PIN"), "{r}");
    // A duress PIN does not count as that way in.
    ok(&set_pin(&bms, "r-1", "7777", true));
    let r = bms.command(SITE, GATE, "resident.set_mode", json!({"resident": "r-1", "mode": "face_or_pin"}), None);
    assert_eq!(r["code"], "face_only_refused", "{r}");
    ok(&set_pin(&bms, "r-1", "2580", false));
    ok(&bms.command(SITE, GATE, "resident.set_mode", json!({"resident": "r-1", "mode": "face_or_pin"}), None));
    // Now the PIN cannot be removed while the mode relies on it.
    let r = bms.command(SITE, GATE, "credential.remove", json!({"resident": "r-1", "pin": "pin"}), None);
    assert_eq!(r["code"], "face_only_refused", "{r}");
    // A roster upsert that replaces the cards keeps the PIN (PINs are never carried in a roster).
    let spec = json!({"resident": {"id": "r-1", "mode": "face_or_pin", "cards": []}});
    ok(&bms.command(SITE, GATE, "resident.upsert", spec, None));
    keys(&gate, "2580#", 4, 10);
    assert_eq!(next_access(&bms, 0, 1, &gate)[0]["decision"], "granted");
    // The card alone does not open face_or_pin (it was removed; a card of another resident in
    // `card` mode still does).
    add_resident(&bms, "r-2", "card", 4002);
    gate.swipe(7, 4002);
    assert_eq!(next_access(&bms, 1, 1, &gate)[0]["decision"], "granted");
}

#[test]
fn bad_keypad_input_is_refused_counted_and_never_a_grant() {
    let (_broker, gate, bms) = up("keys", 10);
    add_resident(&bms, "r-1", "card_or_pin", 5001);
    ok(&set_pin(&bms, "r-1", "3690", false));
    let before = pulses(&gate);
    let raw = |bits: &str| {
        gate.world(WorldOp::Raw { reader: "keypad".into(), bits: bits.into(), pulse_us: None, interval_us: None })
    };
    // An 8-bit burst whose nibbles are not complements (noise), a value no key has, a length no
    // keypad sends, a 26-bit card frame (facility 7) on a keys-only reader, a PIN frame with bad
    // parity.
    raw("11110001");
    raw("1101");
    raw("101");
    let card = menshen::wiegand::encode(menshen::wiegand::Format::H10301, 7, 3690).unwrap().to_string();
    raw(&card);
    let mut bad = menshen::wiegand::encode(menshen::wiegand::Format::H10301, 0, 3690).unwrap().to_string();
    let last = if bad.ends_with('1') { '0' } else { '1' };
    bad.pop();
    bad.push(last);
    raw(&bad);
    let ev = next_access(&bms, 0, 5, &gate);
    let details: Vec<&str> = ev.iter().map(|e| e["detail"].as_str().unwrap_or("-")).collect();
    assert_eq!(
        details,
        ["key_bad_complement", "key_unknown", "key_wrong_length", "pin_frame_has_facility", "pin_parity_error"],
        "{ev:?}"
    );
    assert!(ev.iter().all(|e| e["decision"] == "denied"));
    // A PIN with a refused burst inside it (a key split across a frame gap, noise): the burst is
    // refused and what was typed is discarded (a key may be lost), so `#` after the rest of the
    // PIN finds too few digits, never the PIN.
    keys_at(&gate, "keypad", "36", 4, 10);
    raw("11110001");
    keys_at(&gate, "keypad", "90#", 4, 10);
    let ev = next_access(&bms, 5, 2, &gate);
    assert_eq!(ev[0]["detail"], "key_bad_complement");
    assert_eq!(ev[1]["reason"], "pin_too_short", "{ev:?}");
    // An 8-bit key split across a frame gap arrives as two 4-bit bursts, 1110 (no such key) and
    // 0001 (a 1): the first is refused and discards the entry, so `3690#` typed around it is
    // `190#`, too short.
    keys_at(&gate, "keypad", "36", 4, 10);
    raw("1110");
    raw("0001");
    keys_at(&gate, "keypad", "90#", 4, 10);
    let ev = next_access(&bms, 7, 2, &gate);
    assert_eq!(ev[0]["detail"], "key_unknown", "{ev:?}");
    assert_eq!(ev[1]["reason"], "pin_too_short", "{ev:?}");
    // A card frame interleaved with the keys on a `keys` reader: refused, and the entry starts
    // again.
    keys_at(&gate, "keypad", "36", 4, 10);
    raw(&card);
    keys_at(&gate, "keypad", "90#", 4, 10);
    let ev = next_access(&bms, 9, 2, &gate);
    assert_eq!(ev[0]["detail"], "pin_frame_has_facility", "{ev:?}");
    assert_eq!(ev[1]["reason"], "pin_too_short", "{ev:?}");
    // And the PIN typed cleanly still opens: the refusals locked nothing.
    keys_at(&gate, "keypad", "3690#", 4, 10);
    assert_eq!(next_access(&bms, 11, 1, &gate)[0]["decision"], "granted");
    assert!(wait_for(Duration::from_secs(3), || pulses(&gate) == before + 1));
    assert_eq!(pulses(&gate), before + 1, "no bad input ever moved the relay");
    // Counted: the health reply has them by code.
    let h = bms.command(SITE, GATE, "health.get", json!({}), None);
    let rej = &ok(&h)["rejected"]["wiegand"];
    assert!(rej["key_bad_complement"].as_u64().unwrap() >= 2, "{h}");
    assert!(rej["pin_parity_error"].as_u64().unwrap() >= 1, "{h}");
    // PIN over MQTT: not digits, wrong type (never echoed), too short, both card and pin.
    for (payload, code) in [
        (json!({"resident": "r-1", "pin": {"pin": "12a4"}}), "invalid_value"),
        (json!({"resident": "r-1", "pin": {"pin": 98765432101_i64}}), "invalid_value"),
        (json!({"resident": "r-1", "pin": {"pin": "12"}}), "invalid_value"),
        (json!({"resident": "r-1", "pin": {"pin": "123456789012345"}}), "invalid_value"),
        (json!({"resident": "r-1"}), "missing_field"),
        (
            json!({"resident": "r-1", "pin": {"pin": "1234"}, "card": {"format": "H10301", "facility": 1, "number": 2}}),
            "invalid_value",
        ),
    ] {
        let r = bms.command(SITE, GATE, "credential.add", payload.clone(), None);
        assert_eq!(r["code"], code, "{payload}: {r}");
        assert!(!r.to_string().contains("98765432101"), "the refusal echoes the PIN: {r}");
    }
    assert!(!gate.log().contains("98765432101"), "the log holds a refused PIN");
}

#[test]
fn key_bits_four_decides_each_key_at_its_fourth_bit() {
    let (_broker, gate, bms) = up_with("keys", 10, Some(4));
    add_resident(&bms, "r-1", "card_or_pin", 6001);
    ok(&set_pin(&bms, "r-1", "8642", false));
    keys_at(&gate, "keypad", "8642#", 4, 10);
    let ev = &next_access(&bms, 0, 1, &gate)[0];
    assert_eq!((ev["decision"].as_str(), ev["method"].as_str()), (Some("granted"), Some("pin")), "{ev}");
    // Each frame ends at 4 bits: an 8-bit key 1 (0xE1) is read as two bursts, 1110 (no such key)
    // and 0001, so such a keypad must not be given `key_bits = 4` (docs/install.md).
    keys_at(&gate, "keypad", "1", 8, 10);
    let ev = &next_access(&bms, 1, 1, &gate)[0];
    assert_eq!(ev["detail"], "key_unknown", "{ev}");
}
