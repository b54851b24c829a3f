#![cfg(feature = "osdp")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! OSDP readers end to end: the real daemon as control panel on one side of a pty pair, a real
//! OSDP peripheral device (libosdp in PD mode, in this test process) on the other, a real
//! mosquitto. Secure Channel set up by `menshen osdp install`, a card read and a keypad PIN
//! decided like Wiegand's, LED and beeper commands seen by the reader; a wrong key, a reader
//! claiming no Secure Channel (a downgrade on the bus) and an unplugged reader each raise
//! their alarm; garbage on the bus is counted and never a read.

mod common;

use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use libosdp::{
    Channel, ChannelError, OsdpCommand, OsdpEvent, OsdpEventCardRead, OsdpEventKeyPress, OsdpFlag, PdCapEntity,
    PdCapability, PdInfoBuilder, PeripheralDevice,
};
use menshen::osdp::wire::{self, Scanner, Seen};
use serde_json::{json, Value};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SITE: &str = "site1";
const GATE: &str = "gate1";
const ADDRESS: u8 = 3;

/// A pty pair: the daemon opens `path` (the slave), the reader talks on `master`.
struct Pty {
    master: OwnedFd,
    path: String,
    /// Held open so the line keeps its raw settings and the master never reads EIO.
    _slave: OwnedFd,
}

fn pty() -> Pty {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let path = ptsname(&master, Vec::new()).unwrap().into_string().unwrap();
    let slave = rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
        rustix::fs::Mode::empty(),
    )
    .unwrap();
    let mut t = rustix::termios::tcgetattr(&slave).unwrap();
    t.make_raw();
    rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &t).unwrap();
    rustix::fs::fcntl_setfl(&master, rustix::fs::OFlags::NONBLOCK).unwrap();
    Pty { master, path, _slave: slave }
}

/// How the test reader behaves.
#[derive(Clone, Copy)]
struct PdOpts {
    /// Its Secure Channel key; `None`: a new reader in install mode (the install key, SCBK-D).
    key: Option<[u8; 16]>,
    /// A man in the middle rewrites its capability reply to claim no Secure Channel.
    downgrade: bool,
}

enum Ctl {
    Event(OsdpEvent),
    /// Stop answering (the cable pulled) or answer again.
    Unplug(bool),
    /// Write these bytes onto the bus.
    Raw(Vec<u8>),
}

/// The reader's side of the bus.
struct Bus {
    fd: Arc<OwnedFd>,
    unplugged: Arc<Mutex<bool>>,
    downgrade: bool,
}

impl Channel for Bus {
    fn get_id(&self) -> i32 {
        1
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChannelError> {
        match rustix::io::read(self.fd.as_fd(), &mut *buf) {
            Ok(n) if *self.unplugged.lock().unwrap() => {
                let _ = n; // a pulled cable: the bytes never reach the reader
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(rustix::io::Errno::AGAIN) => Ok(0),
            Err(_) => Err(ChannelError::TransportError),
        }
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, ChannelError> {
        if *self.unplugged.lock().unwrap() {
            return Ok(buf.len());
        }
        let mut out = buf.to_vec();
        if self.downgrade {
            out = downgrade(buf);
        }
        rustix::io::write(self.fd.as_fd(), &out).map_err(|_| ChannelError::TransportError)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
    fn close(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
}

/// The DEF CON 31 downgrade: the capability reply rewritten to say "no Secure Channel", with a
/// fresh CRC so that it passes as genuine.
fn downgrade(buf: &[u8]) -> Vec<u8> {
    let mut s = Scanner::new();
    let mut seen = Vec::new();
    s.push(buf, &mut seen);
    match seen.as_slice() {
        [Seen::Packet(p)] if p.reply && p.code == wire::REPLY_PDCAP => {
            let mut data = p.data.clone().unwrap();
            for c in data.chunks_exact_mut(3) {
                if c[0] == wire::CAP_COMMUNICATION_SECURITY {
                    c[1] = 0;
                }
            }
            wire::packet(p.address, true, p.sqn, p.code, &data)
        }
        _ => buf.to_vec(),
    }
}

/// A real OSDP reader (libosdp PD) on its own thread.
struct Reader {
    ctl: mpsc::Sender<Ctl>,
    commands: mpsc::Receiver<OsdpCommand>,
    seen: Vec<OsdpCommand>,
    _pty: Arc<Pty>,
    stop: Arc<Mutex<bool>>,
}

impl Reader {
    fn start(pty: Pty, o: PdOpts) -> Reader {
        let pty = Arc::new(pty);
        let fd = Arc::new(pty.master.try_clone().unwrap());
        let unplugged = Arc::new(Mutex::new(false));
        let bus = Bus { fd: fd.clone(), unplugged: unplugged.clone(), downgrade: o.downgrade };
        let (ctl_tx, ctl_rx) = mpsc::channel::<Ctl>();
        let (cmd_tx, cmd_rx) = mpsc::channel::<OsdpCommand>();
        let stop = Arc::new(Mutex::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            let mut info = PdInfoBuilder::new()
                .name("test-reader")
                .unwrap()
                .address(ADDRESS as i32)
                .unwrap()
                .baud_rate(9600)
                .unwrap()
                .capability(PdCapability::CommunicationSecurity(PdCapEntity::new(1, 1)))
                .capability(PdCapability::AudibleOutput(PdCapEntity::new(1, 1)))
                .capability(PdCapability::LedControl(PdCapEntity::new(1, 1)))
                .capability(PdCapability::CardDataFormat(PdCapEntity::new(1, 1)))
                .capability(PdCapability::ContactStatusMonitoring(PdCapEntity::new(1, 1)));
            info = match o.key {
                Some(k) => info.secure_channel_key(k),
                None => info.flag(OsdpFlag::InstallMode),
            };
            let mut pd = PeripheralDevice::new(info, Box::new(bus)).unwrap();
            pd.set_command_callback(move |c| {
                let _ = cmd_tx.send(c.clone());
                0
            });
            // Events wait here while libosdp's small event pool is full (a real reader buffers too).
            let mut waiting: std::collections::VecDeque<OsdpEvent> = Default::default();
            while !*stopping.lock().unwrap() {
                while let Some(e) = waiting.pop_front() {
                    if pd.notify_event(e.clone()).is_err() {
                        waiting.push_front(e);
                        break;
                    }
                }
                while let Ok(c) = ctl_rx.try_recv() {
                    match c {
                        Ctl::Event(e) => waiting.push_back(e),
                        Ctl::Unplug(u) => *unplugged.lock().unwrap() = u,
                        Ctl::Raw(b) => {
                            rustix::io::write(fd.as_fd(), &b).unwrap();
                        }
                    }
                }
                if !*unplugged.lock().unwrap() {
                    pd.refresh();
                } else {
                    let mut sink = [0u8; 256];
                    let _ = rustix::io::read(fd.as_fd(), &mut sink);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Reader { ctl: ctl_tx, commands: cmd_rx, seen: Vec::new(), _pty: pty, stop }
    }

    fn card(&self, facility: u64, number: u64) {
        let fields = (facility << 16) | number;
        let even = (fields >> 12).count_ones() % 2 == 1;
        let odd = (fields & 0xFFF).count_ones() % 2 == 0;
        let frame = ((even as u64) << 25) | (fields << 1) | odd as u64;
        let packed = (frame << 6).to_be_bytes()[4..8].to_vec();
        let read = OsdpEventCardRead::new_wiegand(26, packed).unwrap();
        self.ctl.send(Ctl::Event(OsdpEvent::CardRead(read))).unwrap();
    }

    fn keys(&self, keys: &[u8]) {
        self.ctl.send(Ctl::Event(OsdpEvent::KeyPress(OsdpEventKeyPress::new(keys.to_vec())))).unwrap();
    }

    /// Commands the gate sent this reader so far.
    fn commands(&mut self) -> &[OsdpCommand] {
        while let Ok(c) = self.commands.try_recv() {
            self.seen.push(c);
        }
        &self.seen
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        *self.stop.lock().unwrap() = true;
    }
}

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
    let bms = Bms::connect(port);
    assert!(
        wait_for(Duration::from_secs(10), || bms.retained("/status").iter().any(|v| v["state"] == "online")),
        "gate never came online; log:\n{}",
        gate.log()
    );
    bms
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
    assert!(
        wait_for(Duration::from_secs(10), || osdp_health(&gate)["state"] == "ok"),
        "reader never usable: {}\nlog:\n{}",
        osdp_health(&gate),
        gate.log()
    );
    let h = osdp_health(&gate);
    assert_eq!((h["secure_channel"].as_bool(), h["insecure"].as_bool()), (Some(true), Some(false)), "{h}");

    // A card read over the Secure Channel: the same decision path as Wiegand.
    let spec = json!({"resident": {"id": "r-1", "mode": "card_or_pin",
        "cards": [{"format": "H10301", "facility": 7, "number": 1001}]}});
    ok(&bms.command(SITE, GATE, "resident.upsert", spec, None));
    ok(&bms.command(SITE, GATE, "credential.add", json!({"resident": "r-1", "pin": {"pin": "4821"}}), None));
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
    for keys in [&b"4821\r"[..], &b"4821#"[..]] {
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
    assert!(!gate.log().contains("4821"), "the PIN is never logged");

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
    // A reader without a key, not in install mode: plain OSDP only.
    let reader = Reader::start(p, PdOpts { key: Some([5u8; 16]), downgrade: true });
    let (_broker, mut gate, port) = gate_with_osdp(&path, true, 2000);
    let bms = start(&mut gate, port);
    assert!(
        wait_for(Duration::from_secs(10), || osdp_health(&gate)["state"] == "ok"),
        "{}\n{}",
        osdp_health(&gate),
        gate.log()
    );
    let h = osdp_health(&gate);
    assert_eq!((h["insecure"].as_bool(), h["secure_channel"].as_bool()), (Some(true), Some(false)), "{h}");
    let health = bms.command(SITE, GATE, "health.get", json!({}), None);
    assert_eq!(ok(&health)["osdp"]["lobby"]["insecure"], true, "{health}");
    let doctor = gate.cli(&["doctor", "--config", gate.config.to_str().unwrap(), "--json"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(text.contains("insecure"), "doctor flags the plain reader: {text}");
    ok(&bms.command(SITE, GATE, "resident.upsert",
        json!({"resident": {"id": "r-1", "mode": "card", "cards": [{"format": "H10301", "facility": 7, "number": 1001}]}}), None));
    reader.card(7, 1001);
    assert!(wait_for(Duration::from_secs(5), || !bms.messages("/event/access").is_empty()), "log:\n{}", gate.log());
    assert_eq!(bms.messages("/event/access")[0]["decision"], "granted");
}
