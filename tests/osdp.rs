#![cfg(feature = "osdp")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! OSDP readers end to end: the real daemon as control panel on one side of a pty pair, a real
//! OSDP peripheral device (libosdp in PD mode, in this test process) on the other, a real
//! mosquitto. Secure Channel set up by `menshen osdp install`, a card read and a keypad PIN
//! decided like Wiegand's, LED and beeper commands seen by the reader; a wrong key, a reader
//! claiming no Secure Channel (a downgrade on the bus) and an unplugged reader each raise
//! their alarm; garbage on the bus is counted and never a read.

mod common;
#[path = "support/osdp_reader.rs"]
mod osdp_reader;

use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use libosdp::{OsdpCommand, OsdpEvent};
use menshen::osdp::wire::{self, Scanner, Seen};
use osdp_reader::{pty, Ctl, PdOpts, Reader, ADDRESS};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const SITE: &str = "site1";
const GATE: &str = "gate1";

/// A gate whose door `front` has the Wiegand reader and the OSDP reader `lobby` on `path`.
fn gate_with_osdp(path: &str, insecure: bool, alarm_ms: u64) -> (Broker, Gate, u16) {
    let port = free_port();
    let broker = Broker::start(port);
    let gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 300, ..GateOpts::default() });
    gate.edit_config(|t| {
        let mut r = toml::Table::new();
        r.insert("name".into(), "lobby".into());
        r.insert("door".into(), "front".into());
        r.insert("device".into(), path.into());
        r.insert("address".into(), i64::from(ADDRESS).into());
        r.insert("insecure".into(), insecure.into());
        r.insert("offline_alarm_ms".into(), (alarm_ms as i64).into());
        t.insert("osdp_readers".into(), toml::Value::Array(vec![r.into()]));
        let mut kp = toml::Table::new();
        kp.insert("inter_key_ms".into(), 1500.into());
        t.insert("keypad".into(), kp.into());
    });
    (broker, gate, port)
}

fn start(gate: &mut Gate, port: u16) -> Bms {
    gate.start_sim();
    gate.start_daemon();
    common::bms_when_online(gate, port)
}

/// Wait until the OSDP reader is usable (answering over Secure Channel, or plain if insecure).
fn wait_usable(gate: &Gate) {
    assert!(
        wait_for(Duration::from_secs(10), || osdp_health(gate)["state"] == "ok"),
        "reader never usable: {}\nlog:\n{}",
        osdp_health(gate),
        gate.log()
    );
}

fn ok(reply: &Value) -> &Value {
    assert_eq!(reply["ok"], true, "{reply}");
    &reply["result"]
}

fn osdp_health(gate: &Gate) -> Value {
    gate.status().map(|s| s["osdp"]["lobby"].clone()).unwrap_or(Value::Null)
}

fn pulses(gate: &Gate) -> usize {
    gate.relay("front")["transitions"].as_array().unwrap().iter().filter(|t| t["energized"] == true).count()
}

fn alarms(bms: &Bms, code: &str) -> Vec<Value> {
    bms.messages("/event/alarm").into_iter().filter(|a| a["alarm"] == code).collect()
}

#[test]
fn installed_reader_opens_the_door_with_a_card_and_a_pin_over_secure_channel() {
    let p = pty();
    let path = p.path.clone();
    let mut reader = Reader::start(p, PdOpts { key: None, downgrade: false });
    let (_broker, mut gate, port) = gate_with_osdp(&path, false, 2000);

    // The installer sets the reader's own key, with the install key for one session.
    let cfg = gate.config.to_str().unwrap().to_string();
    let out = gate.cli(&["osdp", "install", "--reader", "lobby", "--config", &cfg, "--timeout-secs", "15"]);
    assert!(
        out.status.success(),
        "install failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let key_file = gate.dir.path().join("state/osdp-lobby.key");
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let key = std::fs::read(&key_file).unwrap();
    assert_eq!(key.len(), 16);
    assert_ne!(key, (0x30..0x40).collect::<Vec<u8>>(), "not the install key SCBK-D");
    assert!(
        reader.commands().iter().any(|c| matches!(c, OsdpCommand::KeySet(k) if k.data == key)),
        "the reader was given the key in the file"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(&hex(&key)), "the key is never printed: {text}");

    let bms = start(&mut gate, port);
    wait_usable(&gate);
    let h = osdp_health(&gate);
    assert_eq!((h["secure_channel"].as_bool(), h["insecure"].as_bool()), (Some(true), Some(false)), "{h}");

    // A card read over the Secure Channel: the same decision path as Wiegand.
    let spec = json!({"resident": {"id": "r-1", "mode": "card_or_pin",
        "cards": [{"format": "H10301", "facility": 7, "number": 1001}]}});
    ok(&bms.command(SITE, GATE, "resident.upsert", spec, None));
    ok(&bms.command(SITE, GATE, "credential.add", json!({"resident": "r-1", "pin": {"pin": "48213579"}}), None));
    let before = pulses(&gate);
    reader.card(7, 1001);
    assert!(
        wait_for(Duration::from_secs(5), || !bms.messages("/event/access").is_empty()),
        "no access event; log:\n{}",
        gate.log()
    );
    let ev = &bms.messages("/event/access")[0];
    assert_eq!(
        (ev["decision"].as_str(), ev["method"].as_str(), ev["reader"].as_str()),
        (Some("granted"), Some("card"), Some("lobby")),
        "{ev}"
    );
    assert!(wait_for(Duration::from_secs(3), || pulses(&gate) > before), "the relay did not pulse");
    // The reader showed it: a green LED and a beep, as OSDP commands.
    assert!(
        wait_for(Duration::from_secs(3), || reader
            .commands()
            .iter()
            .any(|c| matches!(c, OsdpCommand::Led(l) if l.temporary.on_color == libosdp::OsdpLedColor::Green))),
        "no green LED command: {:?}",
        reader.commands()
    );
    assert!(
        wait_for(Duration::from_secs(3), || reader.commands().iter().any(|c| matches!(c, OsdpCommand::Buzzer(_)))),
        "no beep: {:?}",
        reader.commands()
    );

    // An unknown card: denied, red LED.
    reader.card(7, 9999);
    assert!(wait_for(Duration::from_secs(5), || bms.messages("/event/access").len() >= 2));
    assert_eq!(bms.messages("/event/access")[1]["reason"], "unknown_card");
    assert!(wait_for(Duration::from_secs(3), || reader
        .commands()
        .iter()
        .any(|c| matches!(c, OsdpCommand::Led(l) if l.temporary.on_color == libosdp::OsdpLedColor::Red))));

    // A PIN on the reader's keypad (OSDP's `#` is 0x0D), one key per reply and all at once.
    for keys in [&b"48213579\r"[..], &b"48213579#"[..]] {
        let n = bms.messages("/event/access").len();
        let before = pulses(&gate);
        for k in keys {
            reader.keys(&[*k]);
        }
        assert!(
            wait_for(Duration::from_secs(5), || bms.messages("/event/access").len() > n),
            "no PIN decision; log:\n{}",
            gate.log()
        );
        let ev = &bms.messages("/event/access")[n];
        assert_eq!((ev["decision"].as_str(), ev["method"].as_str()), (Some("granted"), Some("pin")), "{ev}");
        assert!(wait_for(Duration::from_secs(3), || pulses(&gate) > before));
    }
    assert!(!gate.log().contains("48213579"), "the PIN is never logged");

    // Garbage and a frame with a bad CRC on the bus: counted, never a read, the link stays up.
    let n = bms.messages("/event/access").len();
    let mut bad = wire::packet(ADDRESS, true, 1, wire::REPLY_RAW, &[0, 1, 26, 0, 0x87, 0xD3, 0x40]);
    let last = bad.len() - 1;
    bad[last] ^= 0xA5;
    reader.ctl.send(Ctl::Raw(vec![0x00, 0x13, 0x37, 0x42])).unwrap();
    reader.ctl.send(Ctl::Raw(bad)).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || {
            let h = osdp_health(&gate);
            h["bad_frames"]["bad_crc"].as_u64().unwrap_or(0) >= 1 && h["bad_frames"]["noise"].as_u64().unwrap_or(0) >= 1
        }),
        "bad frames not counted: {}",
        osdp_health(&gate)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(bms.messages("/event/access").len(), n, "garbage is never a read");
    reader.card(7, 1001);
    assert!(
        wait_for(Duration::from_secs(5), || bms.messages("/event/access").len() > n),
        "a read after the garbage still works; log:\n{}",
        gate.log()
    );

    // The reader unplugged: `reader_offline` within the configured 2 s (plus the poll), and
    // `reader_restored` when it is back.
    reader.ctl.send(Ctl::Unplug(true)).unwrap();
    let t0 = std::time::Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || !alarms(&bms, "reader_offline").is_empty()),
        "no offline alarm; log:\n{}",
        gate.log()
    );
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(6), "offline alarm after {took:?}");
    assert_eq!(alarms(&bms, "reader_offline")[0]["reader"], "lobby");
    reader.ctl.send(Ctl::Unplug(false)).unwrap();
    assert!(
        wait_for(Duration::from_secs(15), || !alarms(&bms, "reader_restored").is_empty()),
        "never restored; log:\n{}",
        gate.log()
    );
    assert!(alarms(&bms, "secure_channel_refused").is_empty());
    // Tamper.
    let mut report = [0u8; 64];
    report[0] = 1;
    let tamper = libosdp::OsdpStatusReport { type_: libosdp::OsdpStatusReportType::Local, nr_entries: 2, report };
    reader.ctl.send(Ctl::Event(OsdpEvent::Status(tamper))).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || !alarms(&bms, "reader_tamper").is_empty()),
        "no tamper alarm; log:\n{}",
        gate.log()
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_wrong_key_and_a_downgraded_reader_are_refused_with_alarms() {
    for downgrade in [false, true] {
        let p = pty();
        let path = p.path.clone();
        // The reader holds one key, the gate another (or the reader claims no Secure Channel).
        let reader_key = if downgrade { [9u8; 16] } else { [1u8; 16] };
        let reader = Reader::start(p, PdOpts { key: Some(reader_key), downgrade });
        let (_broker, mut gate, port) = gate_with_osdp(&path, false, 2000);
        let key_file = gate.dir.path().join("state/osdp-lobby.key");
        std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
        std::fs::write(&key_file, [9u8; 16]).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let bms = start(&mut gate, port);
        assert!(
            wait_for(Duration::from_secs(10), || !alarms(&bms, "secure_channel_refused").is_empty()),
            "no refusal (downgrade {downgrade}); log:\n{}",
            gate.log()
        );
        let a = &alarms(&bms, "secure_channel_refused")[0];
        let want = if downgrade { "claims no Secure Channel" } else { "handshake fails" };
        assert!(a["detail"].as_str().unwrap().contains(want), "{a}");
        let h = osdp_health(&gate);
        assert_eq!(h["state"], if downgrade { "no_secure_channel" } else { "secure_channel_failed" }, "{h}");
        assert_eq!(h["secure_channel"], false);
        // A card read from it is never taken (libosdp has the reader offline).
        ok(&bms.command(SITE, GATE, "resident.upsert",
            json!({"resident": {"id": "r-1", "mode": "card", "cards": [{"format": "H10301", "facility": 7, "number": 1001}]}}), None));
        reader.card(7, 1001);
        std::thread::sleep(Duration::from_millis(800));
        assert!(bms.messages("/event/access").is_empty(), "a refused reader's read was decided");
        assert_eq!(pulses(&gate), 0);
    }
}

#[test]
fn an_insecure_reader_works_in_plain_mode_and_is_flagged() {
    let p = pty();
    let path = p.path.clone();
    // A reader whose capability reply offers no Secure Channel: plain OSDP only.
    let reader = Reader::start(p, PdOpts { key: Some([5u8; 16]), downgrade: true });
    let (_broker, mut gate, port) = gate_with_osdp(&path, true, 2000);
    let bms = start(&mut gate, port);
    wait_usable(&gate);
    let h = osdp_health(&gate);
    assert_eq!((h["insecure"].as_bool(), h["secure_channel"].as_bool()), (Some(true), Some(false)), "{h}");
    let health = bms.command(SITE, GATE, "health.get", json!({}), None);
    assert_eq!(ok(&health)["osdp"]["lobby"]["insecure"], true, "{health}");
    common::schema::validate("health.json", ok(&health)).unwrap();
    let doctor = gate.cli(&["doctor", "--config", gate.config.to_str().unwrap(), "--json"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(text.contains("insecure"), "doctor flags the plain reader: {text}");
    ok(&bms.command(SITE, GATE, "resident.upsert",
        json!({"resident": {"id": "r-1", "mode": "card", "cards": [{"format": "H10301", "facility": 7, "number": 1001}]}}), None));
    reader.card(7, 1001);
    assert!(wait_for(Duration::from_secs(5), || !bms.messages("/event/access").is_empty()), "log:\n{}", gate.log());
    assert_eq!(bms.messages("/event/access")[0]["decision"], "granted");
}

/// A gate and reader that share `key` (installed earlier).
fn installed(key: [u8; 16]) -> (Broker, Gate, Reader, u16) {
    let p = pty();
    let path = p.path.clone();
    let reader = Reader::start(p, PdOpts { key: Some(key), downgrade: false });
    let (broker, gate, port) = gate_with_osdp(&path, false, 2000);
    let key_file = gate.dir.path().join("state/osdp-lobby.key");
    std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
    std::fs::write(&key_file, key).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    (broker, gate, reader, port)
}

#[test]
fn forged_and_replayed_frames_are_counted_and_never_a_read() {
    let (_broker, mut gate, reader, port) = installed([2u8; 16]);
    let bms = start(&mut gate, port);
    wait_usable(&gate);
    ok(&bms.command(SITE, GATE, "resident.upsert",
        json!({"resident": {"id": "r-1", "mode": "card", "cards": [{"format": "H10301", "facility": 7, "number": 1001}]}}), None));

    // A forged card read: a well-formed plain reply (good CRC) for a valid card, injected into
    // the Secure Channel session. No MAC, no matching command: never a read.
    let fields: u64 = (7 << 16) | 1001;
    let even = (fields >> 12).count_ones() % 2 == 1;
    let odd = (fields & 0xFFF).count_ones() % 2 == 0;
    let frame = ((even as u64) << 25) | (fields << 1) | odd as u64;
    let mut data = vec![0u8, 1, 26, 0];
    data.extend_from_slice(&(frame << 6).to_be_bytes()[4..8]);
    reader.ctl.send(Ctl::Raw(wire::packet(ADDRESS, true, 3, wire::REPLY_RAW, &data))).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || osdp_health(&gate)["out_of_sequence"].as_u64().unwrap_or(0) >= 1),
        "forged reply not counted: {}",
        osdp_health(&gate)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(bms.messages("/event/access").is_empty(), "a forged frame was decided");
    assert_eq!(pulses(&gate), 0);

    // A genuine read, then its secure reply frame replayed byte for byte.
    wait_usable(&gate);
    reader.card(7, 1001);
    assert!(wait_for(Duration::from_secs(5), || bms.messages("/event/access").len() == 1), "{}", gate.log());
    let replay = reader
        .sent
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|f| {
            let mut sc = Scanner::new();
            let mut seen = Vec::new();
            sc.push(f, &mut seen);
            matches!(seen.as_slice(), [Seen::Packet(p)] if p.code == wire::REPLY_RAW && p.secure.is_some())
        })
        .cloned()
        .expect("the reader sent its card read under Secure Channel");
    let before = osdp_health(&gate)["out_of_sequence"].as_u64().unwrap();
    let pulsed = pulses(&gate);
    reader.ctl.send(Ctl::Raw(replay)).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || osdp_health(&gate)["out_of_sequence"].as_u64().unwrap_or(0) > before),
        "replay not counted: {}",
        osdp_health(&gate)
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(bms.messages("/event/access").len(), 1, "a replayed read was decided again");
    assert_eq!(pulses(&gate), pulsed);
    // And the reader still works after both.
    wait_usable(&gate);
    reader.card(7, 1001);
    assert!(wait_for(Duration::from_secs(5), || bms.messages("/event/access").len() == 2), "{}", gate.log());
}

#[test]
fn install_again_rotates_the_key_with_the_current_one() {
    let (_broker, mut gate, mut reader, port) = installed([4u8; 16]);
    let cfg = gate.config.to_str().unwrap().to_string();
    let out = gate.cli(&["osdp", "install", "--reader", "lobby", "--config", &cfg, "--timeout-secs", "15"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("its current key"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let key = std::fs::read(gate.dir.path().join("state/osdp-lobby.key")).unwrap();
    assert_ne!(key, [4u8; 16], "a new key");
    assert!(reader.commands().iter().any(|c| matches!(c, OsdpCommand::KeySet(k) if k.data == key)));
    assert!(!gate.dir.path().join("state/osdp-lobby.key.new").exists(), "no pending key left");
    let _bms = start(&mut gate, port);
    wait_usable(&gate);
}
