//! `menshen demo`: the daemon on simulated hardware with sample residents, swipes and (when the
//! runtime, models and LFW photos are there) a face at the camera.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::wall_ms;
use crate::config::{self, Config};
use crate::hw::sim::WorldOp;
use crate::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Validity};
use crate::wiegand::{CardId, Format};

/// The demo's directory (config, state, sockets), under the current directory.
pub const DEMO_DIR: &str = "menshen-demo";

pub fn demo(no_script: bool, once: bool) -> anyhow::Result<()> {
    let dir = std::path::Path::new(DEMO_DIR);
    // Each run starts from the same residents: the last run's script turned r-1004's face off.
    let _ = std::fs::remove_dir_all(dir.join("state"));
    std::fs::create_dir_all(dir)?;
    let broker = match super::demo_bms::find_mosquitto() {
        Some(m) => Some(super::demo_bms::DemoBroker::start(&m, dir)?),
        None => None,
    };
    let cfg_path = dir.join("menshen.toml");
    std::fs::write(&cfg_path, demo_config(dir, broker.as_ref().map(|b| b.port))?)?;
    let cfg = config::load(&cfg_path)?;
    super::init_logging(cfg.log.format, &cfg.log.level);
    seed_demo(&cfg)?;
    let face = demo_face();
    let camera = dir.join("camera");
    if let Some(f) = &face {
        demo_show(&camera, &[])?;
        demo_enrol(&cfg_path, f)?;
    }
    println!("Menshen demo: simulated hardware, config {}", cfg_path.display());
    println!(
        "Residents: r-1001 card 7:12345 (card) · r-1002 card 7:22222 (face_and_card) · r-1003 card 7:33333 (expired)"
    );
    match &face {
        Some(_) => println!(
            "           r-1004 card 7:44444 (face_or_card; consented; face enrolled from two photos, sealed in the store)"
        ),
        None => println!("{}", face_off_line()),
    }
    match &broker {
        Some(b) => println!(
            "BMS view: a mosquitto of the demo's own on 127.0.0.1:{} (stopped with the demo); lines `BMS ◀` are what a BMS receives under {}",
            b.port,
            cfg.topic_root()
        ),
        None => println!(
            "BMS view off: no mosquitto found (sudo apt-get install mosquitto, or run scripts/demo.sh); events wait in the durable outbox"
        ),
    }
    let rt = super::runtime()?;
    rt.block_on(async move {
        let cfg = Arc::new(cfg);
        let mut bms = match &broker {
            Some(b) => Some(super::demo_bms::DemoBms::connect(b.port, &cfg.topic_root()).await?),
            None => None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stop = tokio_util::sync::CancellationToken::new();
        let daemon = tokio::spawn(crate::daemon::run(cfg.clone(), Some(tx), Some(stop.clone())));
        if rx.await.is_err() {
            return match daemon.await {
                Ok(r) => r,
                Err(e) => Err(e.into()),
            };
        }
        let mut script_error = None;
        if !no_script {
            if let Some(f) = &face {
                println!("\n▶ r-1004 walks up to the camera (two other photos of the same person): face_or_card opens the door");
                if let Err(e) = demo_show(&camera, &f.show) {
                    println!("  camera error: {e}");
                }
                tokio::time::sleep(Duration::from_millis(4_000)).await;
                let _ = demo_show(&camera, &[]);
                tokio::time::sleep(Duration::from_millis(3_500)).await;
            }
            let socket = cfg.hardware.sim.socket.clone();
            for (what, op) in demo_script() {
                println!("\n▶ {what}");
                let s = socket.clone();
                let r = tokio::task::spawn_blocking(move || crate::hw::sim::request(&s, &op)).await?;
                if let Err(e) = r {
                    println!("  sim error: {e}");
                }
                // Let the 3 s unlock and the 2 s shunt grace after it run out before the forced-door step.
                let pause = if what.starts_with("the exit button") { 5_500 } else { 400 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            if let Some(b) = bms.as_mut() {
                if let Err(e) = super::demo_bms::exchange(b, &cfg_path, dir, face.is_some()).await {
                    println!("  BMS exchange failed: {e:#}");
                    script_error = Some(e);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        // Name the binary as it was started (e.g. target/release/menshen from `cargo run`), so
        // the commands can be pasted as they are: a fresh clone has no `menshen` on its PATH.
        let me = std::env::args().next().unwrap_or_else(|| "menshen".into());
        println!("\nTry it yourself from another terminal in this directory:");
        println!("  {me} sim swipe --reader front --card 12345 --facility 7");
        println!("  {me} sim raw --reader front --bits 10000011100110000001110010");
        println!("  {me} sim door open ; {me} sim rex ; {me} sim state");
        println!("  {me} status --config {}/menshen.toml", DEMO_DIR);
        println!("  {me} resident list --config {}/menshen.toml", DEMO_DIR);
        if let Some(b) = &broker {
            println!("  mosquitto_sub -p {} -t 'menshen/v1/#' -v", b.port);
        }
        if once {
            // Stop the daemon as SIGTERM would: the same drain, relays left safe.
            stop.cancel();
        } else {
            println!("Ctrl-C stops the demo.");
        }
        let r = match daemon.await {
            Ok(r) => r,
            Err(e) => Err(e.into()),
        };
        if let Some(b) = &bms {
            b.disconnect().await;
        }
        drop(broker);
        match script_error {
            Some(e) => Err(e),
            None => r,
        }
    })
}

/// Why the demo's face part is off, and how to turn it on.
fn face_off_line() -> String {
    let f = crate::face::tools::locate(&config::FaceConfig::default());
    let missing_runtime = !f.onnxruntime_library.exists() || !f.models_dir.is_dir();
    if missing_runtime {
        "Face part off: no ONNX Runtime and models (scripts/demo.sh installs them; or scripts/setup-runtime.sh --dest target/menshen-runtime)".into()
    } else {
        "Face part off: no face photos (LFW is an evaluation set and is never shipped). To turn it on, set MENSHEN_DEMO_PHOTOS to a directory with four or more JPEG photos of one person (your own): two enrol, two are shown to the camera".into()
    }
}

/// The demo's config: simulated chip embedded, state and socket under ./menshen-demo.
pub fn demo_config(dir: &Path, broker_port: Option<u16>) -> anyhow::Result<String> {
    let mut t: toml::Table = toml::from_str(config::DEFAULT_CONFIG)?;
    if let Some(port) = broker_port {
        let m = t["mqtt"].as_table_mut().context("mqtt")?;
        m.insert("host".into(), "127.0.0.1".into());
        m.insert("port".into(), i64::from(port).into());
        // The demo's broker comes and goes with it: reconnect quickly.
        m.insert("backoff_max_ms".into(), 2_000.into());
    }
    let abs = std::env::current_dir()?.join(dir);
    t["gate"]
        .as_table_mut()
        .context("gate")?
        .insert("state_dir".into(), abs.join("state").display().to_string().into());
    let hw = t["hardware"].as_table_mut().context("hardware")?;
    hw.insert("backend".into(), "sim".into());
    hw["sim"].as_table_mut().context("sim")?.insert("socket".into(), abs.join("sim.sock").display().to_string().into());
    if let Some(face) = demo_face() {
        let mut f = toml::Table::new();
        f.insert("enabled".into(), true.into());
        f.insert("onnxruntime_library".into(), face.runtime.onnxruntime_library.display().to_string().into());
        f.insert("models_dir".into(), face.runtime.models_dir.display().to_string().into());
        let mut cam = toml::Table::new();
        cam.insert("kind".into(), "files".into());
        cam.insert("dir".into(), abs.join("camera").display().to_string().into());
        cam.insert("fps".into(), 5.0.into());
        f.insert("camera".into(), cam.into());
        t.insert("face".into(), f.into());
    }
    Ok(toml::to_string(&t)?)
}

/// What the demo needs for its face part: the runtime, the models and photos of one person (two
/// to enrol, two others to show the camera). Without them the demo is card-only.
pub struct DemoFace {
    pub runtime: config::FaceConfig,
    pub enrol: Vec<PathBuf>,
    pub show: Vec<PathBuf>,
}

/// The photos: `MENSHEN_DEMO_PHOTOS` (a directory with four or more JPEGs of one person, your
/// own), else LFW beside the clone (found as the tests find it; LFW is never shipped).
pub fn demo_face() -> Option<DemoFace> {
    let f = crate::face::tools::locate(&config::FaceConfig::default());
    let mut runtime = f.clone();
    runtime.onnxruntime_library = f.onnxruntime_library.canonicalize().ok()?;
    runtime.models_dir = f.models_dir.canonicalize().ok()?;
    if let Some(own) = std::env::var_os("MENSHEN_DEMO_PHOTOS") {
        let mut photos: Vec<PathBuf> = std::fs::read_dir(own)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("jpg") || x.eq_ignore_ascii_case("jpeg")))
            .collect();
        photos.sort();
        if photos.len() < 4 {
            return None;
        }
        let show = photos.split_off(2);
        return Some(DemoFace { runtime, enrol: photos, show: show.into_iter().take(2).collect() });
    }
    let data = match std::env::var_os("MENSHEN_DATA_DIR") {
        Some(d) => PathBuf::from(d),
        None => [runtime.models_dir.join("../data"), PathBuf::from("../shared/data")]
            .into_iter()
            .find(|d| d.join("lfw").is_dir())
            .unwrap_or_else(|| PathBuf::from("../shared/data")),
    };
    let person = data.join("lfw/images_deepfunneled/Colin_Powell");
    let photo = |n: &str| person.join(format!("{n}.jpg"));
    person.is_dir().then(|| DemoFace {
        runtime,
        enrol: DEMO_FACE_ENROL.iter().map(|n| photo(n)).collect(),
        show: DEMO_FACE_SHOW.iter().map(|n| photo(n)).collect(),
    })
}

/// The demo's face resident r-1004 (face_or_card): consent, then enrolment from two LFW photos.
pub const DEMO_FACE_ENROL: [&str; 2] = ["Colin_Powell_0040", "Colin_Powell_0049"];

/// Other photos of the same person, played by the demo camera.
pub const DEMO_FACE_SHOW: [&str; 2] = ["Colin_Powell_0095", "Colin_Powell_0133"];

pub fn demo_enrol(cfg_path: &Path, face: &DemoFace) -> anyhow::Result<()> {
    let cfg = config::load(cfg_path)?;
    let rid = ResidentId::new("r-1004").map_err(anyhow::Error::msg)?;
    {
        let s = crate::privacy::audit::AuditLog::open_store(&cfg.store_path())?;
        if s.templates()?.iter().any(|(id, _)| id == "r-1004") {
            return Ok(());
        }
        if s.resident(&rid)?.is_none() {
            let c = CardId { format: Format::H10301, facility: 7, number: 44444 };
            let cred = Credential {
                credential: CredentialKind::Card(c),
                resident: rid.clone(),
                validity: Validity::default(),
            };
            let r = Resident {
                id: rid.clone(),
                mode: AccessMode::FaceOrCard,
                validity: Validity::default(),
                schedule: None,
            };
            s.add_resident(&r, &[cred], wall_ms())?;
        }
        let req = crate::privacy::ConsentRequest { channel: "cli".into(), ..Default::default() };
        let c = crate::privacy::consent_for(&cfg, &req, wall_ms()).map_err(anyhow::Error::msg)?;
        s.record_face_consent(&rid, &c, None, wall_ms())?;
    }
    super::resident::enrol_face(cfg_path, "r-1004", &face.enrol, 2, wall_ms())
}

/// Put these frames in front of the demo camera (a grey frame when empty: no face).
pub fn demo_show(camera: &Path, frames: &[PathBuf]) -> anyhow::Result<()> {
    let tmp = camera.with_extension("next");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    if frames.is_empty() {
        image::RgbImage::from_pixel(640, 480, image::Rgb([120, 120, 120])).save(tmp.join("00.jpg"))?;
    }
    for (i, f) in frames.iter().enumerate() {
        std::fs::copy(f, tmp.join(format!("{i:02}.jpg")))?;
    }
    let _ = std::fs::remove_dir_all(camera);
    std::fs::rename(&tmp, camera)?;
    Ok(())
}

/// Seed the demo residents (once).
pub fn seed_demo(cfg: &Config) -> anyhow::Result<()> {
    let s = crate::privacy::audit::AuditLog::open_store(&cfg.store_path())?;
    let now = wall_ms();
    let card = |f, n| CardId { format: Format::H10301, facility: f, number: n };
    let add = |id: &str, mode, cards: Vec<(CardId, Validity)>| -> anyhow::Result<()> {
        let rid = ResidentId::new(id).map_err(anyhow::Error::msg)?;
        if s.resident(&rid)?.is_some() {
            return Ok(());
        }
        let creds: Vec<_> = cards
            .into_iter()
            .map(|(c, v)| Credential { credential: CredentialKind::Card(c), resident: rid.clone(), validity: v })
            .collect();
        s.add_resident(&Resident { id: rid, mode, validity: Validity::default(), schedule: None }, &creds, now)?;
        Ok(())
    };
    add("r-1001", AccessMode::Card, vec![(card(7, 12345), Validity::default())])?;
    add("r-1002", AccessMode::FaceAndCard, vec![(card(7, 22222), Validity::default())])?;
    add(
        "r-1003",
        AccessMode::Card,
        vec![(card(7, 33333), Validity { valid_from_ms: None, valid_until_ms: Some(now - 86_400_000) })],
    )?;
    Ok(())
}

/// The demo script: what each step shows.
pub fn demo_script() -> Vec<(&'static str, WorldOp)> {
    let swipe = |fac, card| WorldOp::Swipe { reader: "front".into(), facility: fac, card, format: None };
    let mut parity = crate::wiegand::encode(Format::H10301, 7, 12345).map(|b| b.to_string()).unwrap_or_default();
    // Flip the last bit: a parity error.
    if let Some(last) = parity.pop() {
        parity.push(if last == '1' { '0' } else { '1' });
    }
    vec![
        ("resident r-1001 (mode card) swipes card 7:12345 -> granted, relay pulses", swipe(7, 12345)),
        ("an unknown card 7:55555 -> denied unknown_card", swipe(7, 55555)),
        (
            "a frame with a parity error -> denied parity_error",
            WorldOp::Raw { reader: "front".into(), bits: parity, pulse_us: None, interval_us: None },
        ),
        ("resident r-1003's expired card -> denied credential_expired", swipe(7, 33333)),
        ("resident r-1002 (face_and_card) shows only the card -> denied mode_requires_face", swipe(7, 22222)),
        (
            "the exit button -> granted exit_request (then we wait for the relock)",
            WorldOp::Rex { door: "front".into(), hold_ms: None },
        ),
        ("the door opened without a grant -> alarm door_forced", WorldOp::Door { door: "front".into(), open: true }),
        ("the door closes", WorldOp::Door { door: "front".into(), open: false }),
    ]
}
