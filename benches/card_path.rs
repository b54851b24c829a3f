#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! Card path latency: last Wiegand edge → relay command, on the whole daemon (simulated chip →
//! reader stage → store lookup + policy → door stage → relay), with real Wiegand timing (50 µs
//! pulses, 2 ms ± 10 % intervals) and early completion on.
//!
//! Two scenarios, one after the other in the same run:
//!
//! 1. `face off`: cards only.
//! 2. `face on`: the face path running flat out (a file camera at 30 fps showing an enrolled
//!    `face_or_card` resident at a door of its own, so every frame runs the whole pipeline and a
//!    face grant, with its events, is committed every few seconds) while the cards are swiped
//!    at the other doors. Needs the ONNX Runtime (`scripts/setup-runtime.sh --dest
//!    target/menshen-runtime`), the models and the LFW photos (`../shared`); without them it is
//!    skipped, and says so.
//!
//! The edge time is the simulated reader's true edge time (as a kernel timestamp would be); the
//! relay time is when the door stage issued the command. The daemon's own split by hop comes
//! from its counters (`menshen status`): `delivery` (edge → reader stage: scheduling), `decide`
//! (reader stage → decision: the store read and the policy), `actuate` (decision → relay
//! command: scheduling of the door stage). Run: `cargo bench --bench card_path` (`SWIPES=N` per
//! scenario, default 1,000; `SCENARIOS=off` for the first only).
//!
//! `SCENARIOS=pin` measures a PIN typed on a keypad (`card_or_pin` residents, a keys-only keypad
//! with `key_bits = 4` beside each door's card reader): the last edge of the `#` burst → relay
//! command, after the card scenario in the same run (6-digit PINs as 4-bit bursts; the lookup is
//! an HMAC-SHA-256 and a store read). Without `key_bits` every key waits for the frame gap
//! (25 ms).
//!
//! `SCENARIOS=osdp` measures a card read by an OSDP reader over Secure Channel (one libosdp
//! peripheral per door on a pty at 115,200 baud, in this process): from the moment the reader
//! wrote the reply frame carrying the read to the relay command, after the Wiegand card
//! scenario in the same run. The reader's poll interval (libosdp polls about ten times a
//! second) comes before that frame and is not counted, as the Wiegand figure starts at the last
//! edge, not at the card's arrival in the field.
//!
//! `SCENARIOS=drivers` compares the two GPIO drivers instead, one after the other in the same
//! run, with the daemon and the simulated chip as separate processes: the simulated chip's own
//! protocol (`backend = "sim"`), then the real gpiocdev driver (`backend = "gpiochip"`) on the
//! fake gpiochip (tests/support/fake_gpiochip.c, LD_PRELOAD). The relay time is stamped in the
//! daemon's process at the SET_VALUES ioctl (by the fake chip) or at the command (sim client).

#[cfg(feature = "osdp")]
#[path = "../tests/support/osdp_reader.rs"]
mod osdp_reader;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use menshen::hw::sim::{self, WorldOp};
use menshen::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Validity};
use menshen::wiegand::{CardId, Format};

const DOORS: usize = 4;
/// The face scenario's camera watches this door; cards are swiped at the others.
const FACE_DOOR: usize = 3;
const BIN: &str = env!("CARGO_BIN_EXE_menshen");

fn config(dir: &Path, face: Option<&Face>) -> toml::Table {
    let mut t: toml::Table = toml::from_str(menshen::config::DEFAULT_CONFIG).unwrap();
    t["gate"].as_table_mut().unwrap().insert("state_dir".into(), dir.join("state").display().to_string().into());
    t["log"].as_table_mut().unwrap().insert("level".into(), "warn".into());
    let sim = t["hardware"].as_table_mut().unwrap()["sim"].as_table_mut().unwrap();
    sim.insert("socket".into(), dir.join("sim.sock").display().to_string().into());
    t["mqtt"].as_table_mut().unwrap().insert("enabled".into(), false.into());
    let mut doors = Vec::new();
    let mut readers = Vec::new();
    for i in 0..DOORS as i64 {
        let mut d = toml::Table::new();
        d.insert("name".into(), format!("d{i}").into());
        d.insert("relay_pin".into(), (i * 3).into());
        d.insert("fail_mode".into(), "secure".into());
        d.insert("pulse_ms".into(), 100.into());
        doors.push(toml::Value::Table(d));
        let mut r = toml::Table::new();
        r.insert("name".into(), format!("r{i}").into());
        r.insert("door".into(), format!("d{i}").into());
        r.insert("formats".into(), toml::Value::Array(vec!["H10301".into()]));
        r.insert("d0_pin".into(), (i * 3 + 1).into());
        r.insert("d1_pin".into(), (i * 3 + 2).into());
        readers.push(toml::Value::Table(r));
    }
    t.insert("doors".into(), toml::Value::Array(doors));
    t.insert("readers".into(), toml::Value::Array(readers));
    if let Some(f) = face {
        let mut ft = toml::Table::new();
        ft.insert("enabled".into(), true.into());
        ft.insert("onnxruntime_library".into(), f.runtime.onnxruntime_library.display().to_string().into());
        ft.insert("models_dir".into(), f.runtime.models_dir.display().to_string().into());
        ft.insert("door".into(), format!("d{FACE_DOOR}").into());
        let mut cam = toml::Table::new();
        cam.insert("kind".into(), "files".into());
        cam.insert("dir".into(), dir.join("camera").display().to_string().into());
        cam.insert("fps".into(), 30.0.into());
        ft.insert("camera".into(), cam.into());
        t.insert("face".into(), ft.into());
    }
    t
}

/// What the face scenario needs (found as the tools find them).
struct Face {
    runtime: menshen::config::FaceConfig,
    person: PathBuf,
}

fn face_parts() -> Result<Face, String> {
    let f = menshen::face::tools::locate(&menshen::config::FaceConfig::default());
    let mut runtime = f.clone();
    runtime.onnxruntime_library = f.onnxruntime_library.canonicalize().map_err(|e| format!("ONNX Runtime: {e}"))?;
    runtime.models_dir = f.models_dir.canonicalize().map_err(|e| format!("models: {e}"))?;
    let data =
        std::env::var_os("MENSHEN_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| runtime.models_dir.join("../data"));
    let person = data.join("lfw/images_deepfunneled/Colin_Powell");
    if !person.is_dir() {
        return Err(format!("no LFW photos at {}", person.display()));
    }
    Ok(Face { runtime, person })
}

fn cli(cfg: &Path, args: &[&str]) {
    let mut a = vec!["resident", args[0], "--config", cfg.to_str().unwrap()];
    a.extend_from_slice(&args[1..]);
    let out = std::process::Command::new(BIN).args(&a).output().unwrap();
    assert!(out.status.success(), "menshen {a:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// One scenario's figures: end-to-end latencies (µs, sorted) and the daemon's split by hop.
struct Figures {
    lat_us: Vec<f64>,
    split: serde_json::Value,
    wall: Duration,
    face_frames: u64,
    granted: u64,
}

fn scenario(swipes: usize, face: Option<&Face>) -> Figures {
    scenario_with(swipes, face, Input::Cards)
}

/// What is presented at the doors.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Input {
    /// Wiegand cards.
    Cards,
    /// PINs on keys-only Wiegand keypads.
    Pins,
    /// Cards read by OSDP readers over Secure Channel (a libosdp peripheral on a pty per door).
    #[cfg(feature = "osdp")]
    Osdp,
}

fn scenario_with(swipes: usize, face: Option<&Face>, input: Input) -> Figures {
    let pins = input == Input::Pins;
    let dir = tempfile::tempdir().unwrap();
    let mut t = config(dir.path(), face);
    #[cfg(feature = "osdp")]
    let osdp = if input == Input::Osdp { osdp_readers(&mut t, dir.path()) } else { Vec::new() };
    if pins {
        // Beside each door's card reader, a keys-only keypad sending 4-bit keys (`key_bits`).
        let readers = t["readers"].as_array_mut().unwrap();
        for i in 0..DOORS as i64 {
            let mut r = toml::Table::new();
            r.insert("name".into(), format!("k{i}").into());
            r.insert("door".into(), format!("d{i}").into());
            r.insert("formats".into(), toml::Value::Array(vec![]));
            r.insert("role".into(), "keys".into());
            r.insert("key_bits".into(), 4.into());
            r.insert("d0_pin".into(), (20 + i * 2).into());
            r.insert("d1_pin".into(), (21 + i * 2).into());
            readers.push(toml::Value::Table(r));
        }
    }
    let cfg_path = dir.path().join("menshen.toml");
    std::fs::write(&cfg_path, toml::to_string(&t).unwrap()).unwrap();
    let cfg = menshen::config::load(&cfg_path).unwrap();
    seed(&cfg);
    if pins {
        seed_pins(&cfg);
    }
    if let Some(f) = face {
        cli(&cfg_path, &["add", "colin", "--mode", "face_or_card", "--card", "H10301:7:60000"]);
        cli(&cfg_path, &["consent", "colin"]);
        let photos = ["Colin_Powell_0040", "Colin_Powell_0049"].map(|n| f.person.join(format!("{n}.jpg")));
        let mut a = vec!["enrol-face", "colin"];
        for p in &photos {
            a.extend(["--photo", p.to_str().unwrap()]);
        }
        cli(&cfg_path, &a);
        // The camera plays other photos of the enrolled resident, over and over.
        let cam = dir.path().join("camera");
        std::fs::create_dir_all(&cam).unwrap();
        let mut others: Vec<PathBuf> =
            std::fs::read_dir(&f.person).unwrap().map(|e| e.unwrap().path()).filter(|p| !photos.contains(p)).collect();
        others.sort();
        for (i, p) in others.iter().take(4).enumerate() {
            std::fs::copy(p, cam.join(format!("{i:02}.jpg"))).unwrap();
        }
    }
    // The daemon's runtime (`menshen run`): multi-thread, two workers.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cfg = Arc::new(cfg);
    let socket = cfg.hardware.sim.socket.clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let (stop2, cfg2) = (stop.clone(), cfg.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let daemon = std::thread::spawn(move || {
        rt.block_on(async move {
            let (ready, ready_rx2) = tokio::sync::oneshot::channel();
            let daemon = tokio::spawn(menshen::daemon::run(cfg2.clone(), Some(ready), Some(stop2.clone())));
            ready_rx2.await.unwrap();
            ready_tx.send(()).unwrap();
            // The daemon's own counters (`menshen status`), read just before the stop.
            let mut last = serde_json::Value::Null;
            while !stop2.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let c = cfg2.clone();
                if let Ok(Ok(v)) = tokio::task::spawn_blocking(move || menshen::daemon::status_query(&c)).await {
                    last = v;
                }
            }
            daemon.await.unwrap().unwrap();
            last
        })
    });
    ready_rx.recv().unwrap();
    if face.is_some() {
        // Let the face path warm up and start granting.
        std::thread::sleep(Duration::from_secs(3));
    }
    let card_doors = if face.is_some() { FACE_DOOR } else { DOORS };
    let started = Instant::now();
    let lat_us = match input {
        Input::Cards => swipe_loop(&socket, swipes, card_doors),
        Input::Pins => pin_loop(&socket, swipes, card_doors),
        #[cfg(feature = "osdp")]
        Input::Osdp => osdp_loop(&socket, &cfg, &osdp, swipes),
    };
    let wall = started.elapsed();
    stop.cancel();
    let status = daemon.join().unwrap();
    Figures {
        lat_us,
        split: status["stats"]["card_latency"].clone(),
        wall,
        face_frames: status["face_frames"].as_u64().unwrap_or(0),
        granted: status["stats"]["granted"].as_u64().unwrap_or(0),
    }
}

/// Swipe `swipes` cards round the doors; each latency (µs, sorted) from the frame's last edge
/// to the relay command that answered it.
fn swipe_loop(socket: &Path, swipes: usize, card_doors: usize) -> Vec<f64> {
    let op = |i: usize, door: usize| WorldOp::Swipe {
        reader: format!("r{door}"),
        facility: 7,
        card: 10_000 + (i as u64 % 1_000),
        format: None,
    };
    relay_loop(socket, swipes, card_doors, op)
}

/// Type `n` PINs round the doors (`#` ends each); latency from the `#` burst's last edge.
fn pin_loop(socket: &Path, n: usize, doors: usize) -> Vec<f64> {
    let op = |i: usize, door: usize| WorldOp::Keys {
        reader: format!("k{door}"),
        keys: format!("{}#", pin_of(i as u64 % 1_000)),
        bits: Some(4),
        star_key: None,
        gap_ms: None,
    };
    relay_loop(socket, n, doors, op)
}

/// The PIN of seeded resident `n`: six digits, unique.
fn pin_of(n: u64) -> String {
    format!("{:06}", 100_000 + n * 7)
}

/// Play `n` frames made by `op(i, door)` round the doors; each latency (µs, sorted) from the
/// last edge to the relay command that answered it.
fn relay_loop(socket: &Path, n: usize, doors: usize, op: impl Fn(usize, usize) -> WorldOp) -> Vec<f64> {
    let swipes = n;
    let mut lat_us: Vec<f64> = Vec::with_capacity(swipes);
    for i in 0..swipes {
        let door = i % doors;
        let edge = sim::request(socket, &op(i, door)).unwrap()["last_edge_ns"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let deadline = Instant::now() + Duration::from_secs(2);
        let t = loop {
            if let Some(t) = relay_since(socket, door, edge) {
                break t;
            }
            assert!(Instant::now() < deadline, "swipe {i}: no relay command");
            // The chip records when each command was issued, so reading it late costs nothing;
            // polling fast would only compete with the pipeline for the two cores.
            std::thread::sleep(Duration::from_millis(5));
        };
        lat_us.push((t - edge) as f64 / 1_000.0);
    }
    lat_us.sort_by(|a, b| a.total_cmp(b));
    lat_us
}

/// When door `door`'s relay was first commanded on at or after `since_ns` (the simulated chip
/// records the command's time), if it has been.
fn relay_since(socket: &Path, door: usize, since_ns: u64) -> Option<u64> {
    let st = sim::request(socket, &WorldOp::State).unwrap();
    st["doors"][format!("d{door}")]["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["energized"] == true)
        .filter_map(|t| t["cmd_ns"].as_u64())
        .find(|&t| t >= since_ns)
}

/// One OSDP reader per door (`o0`..), each a libosdp peripheral on its own pty with its own
/// installed key, in place of the Wiegand readers.
#[cfg(feature = "osdp")]
fn osdp_readers(t: &mut toml::Table, dir: &Path) -> Vec<osdp_reader::Reader> {
    use std::os::unix::fs::PermissionsExt;
    t.insert("readers".into(), toml::Value::Array(vec![]));
    let mut readers = Vec::new();
    let mut cfgs = Vec::new();
    for i in 0..DOORS {
        let key = [i as u8 + 1; 16];
        let p = osdp_reader::pty();
        let mut r = toml::Table::new();
        r.insert("name".into(), format!("o{i}").into());
        r.insert("door".into(), format!("d{i}").into());
        r.insert("device".into(), p.path.clone().into());
        r.insert("address".into(), i64::from(osdp_reader::ADDRESS).into());
        r.insert("baud".into(), 115_200.into());
        let key_file = dir.join(format!("o{i}.key"));
        std::fs::write(&key_file, key).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        r.insert("key_file".into(), key_file.display().to_string().into());
        cfgs.push(toml::Value::Table(r));
        readers.push(osdp_reader::Reader::start(p, osdp_reader::PdOpts { key: Some(key), downgrade: false }));
    }
    t.insert("osdp_readers".into(), toml::Value::Array(cfgs));
    readers
}

/// Read `n` cards at the OSDP readers round the doors; latency from the moment the reader put
/// the reply frame carrying the read onto the bus to the relay command.
#[cfg(feature = "osdp")]
fn osdp_loop(socket: &Path, cfg: &menshen::config::Config, readers: &[osdp_reader::Reader], n: usize) -> Vec<f64> {
    use std::sync::atomic::Ordering;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = menshen::daemon::status_query(cfg).unwrap_or_default();
        if (0..DOORS).all(|i| st["osdp"][format!("o{i}")]["state"] == "ok") {
            break;
        }
        assert!(Instant::now() < deadline, "OSDP readers never usable: {}", st["osdp"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut lat_us = Vec::with_capacity(n);
    for i in 0..n {
        let door = i % DOORS;
        let r = &readers[door];
        let before = r.last_read_ns.load(Ordering::SeqCst);
        r.card(7, 10_000 + (i as u64 % 1_000));
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut sent = 0;
        loop {
            if sent == 0 {
                let t = r.last_read_ns.load(Ordering::SeqCst);
                if t > before {
                    sent = t;
                }
            }
            if let Some(t) = (sent != 0).then(|| relay_since(socket, door, sent)).flatten() {
                lat_us.push((t - sent) as f64 / 1_000.0);
                break;
            }
            assert!(Instant::now() < deadline, "read {i}: no relay command");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The door relocks (100 ms pulse) before its next read.
        std::thread::sleep(Duration::from_millis(20));
    }
    lat_us.sort_by(|a, b| a.total_cmp(b));
    lat_us
}

/// 1,000 enrolled residents, so the lookup is not in an empty table.
fn seed(cfg: &menshen::config::Config) {
    let store = menshen::privacy::audit::AuditLog::open_store(&cfg.store_path()).unwrap();
    for n in 0..1_000u64 {
        let id = ResidentId::new(&format!("r{n}")).unwrap();
        let card = CardId { format: Format::H10301, facility: 7, number: 10_000 + n };
        let c =
            Credential { credential: CredentialKind::Card(card), resident: id.clone(), validity: Validity::default() };
        let r = Resident { id, mode: AccessMode::Card, validity: Validity::default(), schedule: None };
        store.add_resident(&r, &[c], 0).unwrap();
    }
}

/// Every seeded resident gets mode `card_or_pin` and a PIN, hashed under a PIN key written where
/// the daemon will find it.
fn seed_pins(cfg: &menshen::config::Config) {
    use std::os::unix::fs::OpenOptionsExt;
    let key = [7u8; 32];
    let path = cfg.pin_key_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
    std::io::Write::write_all(&mut f, &key).unwrap();
    let pk = menshen::keypad::PinKey::from_bytes(&key);
    let store = menshen::privacy::audit::AuditLog::open_store(&cfg.store_path()).unwrap();
    for n in 0..1_000u64 {
        let id = ResidentId::new(&format!("r{n}")).unwrap();
        store.set_mode(&id, AccessMode::CardOrPin, 0).unwrap();
        let hash = pk.hash(&menshen::keypad::Pin::parse(&pin_of(n)).unwrap());
        let c = Credential {
            credential: CredentialKind::Pin(menshen::model::PinHash { hash, duress: false }),
            resident: id,
            validity: Validity::default(),
        };
        store.apply(menshen::store::RosterOp::SetPin(c), None, 0).unwrap();
    }
}

/// The driver comparison: the daemon as its own process (`menshen run`), the simulated chip as
/// another (`menshen sim serve`), once on the simulated chip's own protocol (`backend = "sim"`)
/// and once through the real gpiocdev driver on the fake gpiochip (`backend = "gpiochip"`,
/// tests/support/fake_gpiochip.c under LD_PRELOAD). Same swipes, same measurement.
fn scenario_process(swipes: usize, gpiochip: bool) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let mut t = config(dir.path(), None);
    let hw = t["hardware"].as_table_mut().unwrap();
    if gpiochip {
        hw.insert("backend".into(), "gpiochip".into());
    }
    hw["sim"].as_table_mut().unwrap().insert("embedded".into(), false.into());
    let cfg_path = dir.path().join("menshen.toml");
    std::fs::write(&cfg_path, toml::to_string(&t).unwrap()).unwrap();
    let cfg = menshen::config::load(&cfg_path).unwrap();
    seed(&cfg);
    let socket = cfg.hardware.sim.socket.clone();
    let mut env: Vec<(&str, String)> = Vec::new();
    if gpiochip {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fake_gpiochip.c");
        let lib = dir.path().join("fake_gpiochip.so");
        let st = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&lib)
            .arg(&src)
            .args(["-ldl", "-lpthread"])
            .status()
            .unwrap();
        assert!(st.success(), "building the fake gpiochip");
        env = vec![
            ("LD_PRELOAD", lib.display().to_string()),
            ("FAKE_GPIOCHIP_SOCKET", socket.display().to_string()),
            ("FAKE_GPIOCHIP_CHIPS", "pinctrl-bcm2711:58".into()),
        ];
    }
    let cfg_s = cfg_path.to_str().unwrap();
    let mut chip = std::process::Command::new(BIN).args(["sim", "serve", "--config", cfg_s]).spawn().unwrap();
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut daemon = std::process::Command::new(BIN)
        .args(["run", "--config", cfg_s])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .spawn()
        .unwrap();
    let cfg = Arc::new(cfg);
    while menshen::daemon::status_query(&cfg).is_err() {
        assert!(daemon.try_wait().unwrap().is_none(), "the daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let lat_us = swipe_loop(&socket, swipes, DOORS);
    let wall = started.elapsed();
    let status = menshen::daemon::status_query(&cfg).unwrap();
    let _ = std::process::Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    let _ = daemon.wait();
    let _ = chip.kill();
    let _ = chip.wait();
    Figures {
        lat_us,
        split: status["stats"]["card_latency"].clone(),
        wall,
        face_frames: 0,
        granted: status["stats"]["granted"].as_u64().unwrap_or(0),
    }
}

fn report(name: &str, f: &Figures) {
    let pct = |p: f64| f.lat_us[((f.lat_us.len() as f64 - 1.0) * p).round() as usize];
    let mean = f.lat_us.iter().sum::<f64>() / f.lat_us.len() as f64;
    println!(
        "card path, {name}: {} -> relay command ({} swipes, {:.1} s; face frames {}, grants {})",
        if name.starts_with("OSDP") { "reply frame on the bus" } else { "last Wiegand edge" },
        f.lat_us.len(),
        f.wall.as_secs_f64(),
        f.face_frames,
        f.granted
    );
    println!(
        "  p50 {:>8.1} us   p90 {:>8.1} us   p99 {:>8.1} us   max {:>8.1} us   mean {:>7.1} us",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0),
        mean
    );
    println!("  inside the daemon (as recorded by its stages):");
    for hop in ["delivery", "decide", "actuate", "processing", "total"] {
        let p = &f.split[hop];
        let v = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "    {hop:<10} p50 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us  (n={})",
            v("p50_us"),
            v("p99_us"),
            v("max_us"),
            p["n"]
        );
    }
    let target = 1_000.0;
    println!("  target p99 <= {target} us end to end: {}", if pct(0.99) <= target { "met" } else { "NOT met" });
}

fn main() {
    let swipes: usize = std::env::var("SWIPES").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000);
    let scenarios = std::env::var("SCENARIOS").unwrap_or_default();
    if scenarios == "drivers" {
        let sim = scenario_process(swipes, false);
        report("simulated chip protocol (daemon and chip in two processes)", &sim);
        let cdev = scenario_process(swipes, true);
        report("gpiocdev driver on the fake gpiochip (release daemon, LD_PRELOAD)", &cdev);
        let p = |f: &Figures, q: f64| f.lat_us[((f.lat_us.len() as f64 - 1.0) * q).round() as usize];
        println!(
            "gpiocdev / simulated chip: p50 {:.2}x, p99 {:.2}x",
            p(&cdev, 0.5) / p(&sim, 0.5),
            p(&cdev, 0.99) / p(&sim, 0.99)
        );
        return;
    }
    if scenarios == "pin" {
        let card = scenario(swipes, None);
        report("card (face off)", &card);
        let pin = scenario_with(swipes, None, Input::Pins);
        report("PIN from `#` (face off)", &pin);
        let p = |f: &Figures, q: f64| f.lat_us[((f.lat_us.len() as f64 - 1.0) * q).round() as usize];
        println!("PIN / card: p50 {:.2}x, p99 {:.2}x", p(&pin, 0.5) / p(&card, 0.5), p(&pin, 0.99) / p(&card, 0.99));
        return;
    }
    #[cfg(feature = "osdp")]
    if scenarios == "osdp" {
        let card = scenario(swipes, None);
        report("Wiegand card (face off)", &card);
        let osdp = scenario_with(swipes, None, Input::Osdp);
        report("OSDP card over Secure Channel, from the reply frame (face off)", &osdp);
        let p = |f: &Figures, q: f64| f.lat_us[((f.lat_us.len() as f64 - 1.0) * q).round() as usize];
        println!(
            "OSDP / Wiegand: p50 {:.2}x, p99 {:.2}x",
            p(&osdp, 0.5) / p(&card, 0.5),
            p(&osdp, 0.99) / p(&card, 0.99)
        );
        return;
    }
    let only_off = scenarios == "off";
    let off = scenario(swipes, None);
    report("face off", &off);
    if only_off {
        return;
    }
    match face_parts() {
        Ok(face) => {
            let on = scenario(swipes, Some(&face));
            report("face on (the face path flat out at another door)", &on);
            let p = |f: &Figures, q: f64| f.lat_us[((f.lat_us.len() as f64 - 1.0) * q).round() as usize];
            println!(
                "face on / face off: p50 {:.2}x, p99 {:.2}x",
                p(&on, 0.5) / p(&off, 0.5),
                p(&on, 0.99) / p(&off, 0.99)
            );
        }
        Err(why) => println!("card path, face on: skipped ({why})"),
    }
}
