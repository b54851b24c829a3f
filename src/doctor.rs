//! `menshen doctor`: check an installation and explain, one line per check, what is wrong and how
//! to fix it. Exit code non-zero if any check fails. Works against real and simulated hardware.
//!
//! The judging parts (disk thresholds, clock plausibility, unit file contents) are pure functions
//! with tests; the shell gathers the facts.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::config::{self, CameraConfig, Config, LineRef};
use crate::face::source::SourceError;
use crate::hw;
use crate::store::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn check(name: &'static str, status: Status, message: impl Into<String>, fix: Option<&str>) -> Check {
    Check { name, status, message: message.into(), fix: fix.map(str::to_string) }
}

/// Options that tests and unusual installs may change.
#[derive(Debug, Clone)]
pub struct DoctorOpts {
    pub min_free_mb: u64,
    /// Unit files looked at for the watchdog check.
    pub unit_paths: Vec<PathBuf>,
    pub broker_timeout: Duration,
    /// Frames the camera check reads.
    pub camera_frames: usize,
}

impl Default for DoctorOpts {
    fn default() -> Self {
        DoctorOpts {
            min_free_mb: 100,
            unit_paths: vec![
                "/etc/systemd/system/menshen.service".into(),
                "/lib/systemd/system/menshen.service".into(),
                "/usr/lib/systemd/system/menshen.service".into(),
            ],
            broker_timeout: Duration::from_secs(5),
            camera_frames: 5,
        }
    }
}

/// Free space judgement (pure): below the minimum, or below 5 % of the disk, fails.
pub fn judge_disk(free_bytes: u64, total_bytes: u64, min_free_mb: u64) -> (Status, String) {
    let free_mb = free_bytes / (1024 * 1024);
    let pct = if total_bytes == 0 { 0.0 } else { free_bytes as f64 * 100.0 / total_bytes as f64 };
    let msg = format!("{free_mb} MiB free ({pct:.0} %)");
    if free_mb < min_free_mb || pct < 5.0 {
        (Status::Fail, msg)
    } else {
        (Status::Ok, msg)
    }
}

/// Clock plausibility (pure): a board without a real-time clock boots in the past, which breaks
/// validity windows and schedules.
pub fn judge_clock(unix_ms: i64, synchronised: Option<bool>) -> (Status, String) {
    let build_floor_ms = 1_735_689_600_000; // 2025-01-01: no gate runs before its software existed
    if unix_ms < build_floor_ms {
        return (Status::Fail, "the clock is in the past (before 2025): no RTC and no time sync yet?".into());
    }
    match synchronised {
        Some(true) => (Status::Ok, "set and synchronised".into()),
        Some(false) => (Status::Warn, "set, but not synchronised (NTP)".into()),
        None => (Status::Warn, "set; synchronisation could not be determined".into()),
    }
}

/// Watchdog in a unit file (pure): `Type=notify` and a positive `WatchdogSec=`.
pub fn judge_unit(text: &str) -> (Status, String) {
    let get = |k: &str| {
        text.lines().map(str::trim).filter_map(|l| l.strip_prefix(k)).next_back().map(|v| v.trim().to_string())
    };
    let notify = get("Type=").as_deref() == Some("notify");
    let wd = get("WatchdogSec=");
    let wd_ok = wd.as_deref().is_some_and(|v| !v.is_empty() && v != "0" && v != "infinity");
    match (notify, wd_ok) {
        (true, true) => (Status::Ok, format!("Type=notify, WatchdogSec={}", wd.unwrap_or_default())),
        (false, _) => (Status::Fail, "the unit is not Type=notify".into()),
        (true, false) => (Status::Fail, "the unit has no WatchdogSec".into()),
    }
}

fn synchronised() -> Option<bool> {
    if Path::new("/run/systemd/timesync/synchronized").exists() {
        return Some(true);
    }
    let out =
        std::process::Command::new("timedatectl").args(["show", "-p", "NTPSynchronized", "--value"]).output().ok()?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// ONNX Runtime and the face models: the same check the daemon runs at start.
async fn check_face(cfg: &Config) -> Check {
    if !cfg.face.enabled {
        return check("onnx", Status::Skip, "face.enabled = false (card-only gate)", None);
    }
    let face = cfg.face.clone();
    match tokio::task::spawn_blocking(move || crate::runtime::load(&face)).await {
        Ok(Ok(rt)) => check(
            "onnx",
            Status::Ok,
            format!(
                "ONNX Runtime loaded from {}; {} models match the manifest (sha256, input name and shape)",
                cfg.face.onnxruntime_library.display(),
                rt.sessions.len()
            ),
            None,
        ),
        Ok(Err(e)) => check("onnx", Status::Fail, e.to_string(), Some(e.hint())),
        Err(e) => check("onnx", Status::Fail, e.to_string(), None),
    }
}

/// One read of the camera check.
#[derive(Debug, Clone, PartialEq)]
pub enum CameraRead {
    Frame { width: u32, height: u32 },
    Corrupt(String),
    Stalled,
    Gone(String),
}

/// Judge the camera from what `frames` reads delivered in `elapsed`. `want` is the size the
/// config asks for (V4L2), if any.
pub fn judge_camera(want: Option<(u32, u32)>, reads: &[CameraRead], elapsed: Duration) -> (Status, String) {
    let frames: Vec<(u32, u32)> = reads
        .iter()
        .filter_map(|r| match r {
            CameraRead::Frame { width, height } => Some((*width, *height)),
            _ => None,
        })
        .collect();
    if let Some(CameraRead::Gone(why)) = reads.iter().find(|r| matches!(r, CameraRead::Gone(_))) {
        return (Status::Fail, format!("camera gone: {why}"));
    }
    let corrupt: Vec<&String> = reads
        .iter()
        .filter_map(|r| match r {
            CameraRead::Corrupt(e) => Some(e),
            _ => None,
        })
        .collect();
    if let Some(first) = corrupt.first() {
        return (Status::Fail, format!("{} of {} frames corrupt (first: {first})", corrupt.len(), reads.len()));
    }
    if frames.is_empty() {
        return (Status::Fail, format!("no frame within {:.1} s (stalled)", elapsed.as_secs_f32()));
    }
    if let Some(&(w, h)) = frames.iter().find(|&&s| want.is_some_and(|want| want != s)) {
        let (ww, wh) = want.unwrap_or_default();
        return (Status::Fail, format!("delivers {w}x{h}, the config asks for {ww}x{wh}"));
    }
    let fps = frames.len() as f32 / elapsed.as_secs_f32().max(1e-3);
    let (w, h) = frames[0];
    let stalls = reads.len() - frames.len();
    let msg = format!("{} frames of {w}x{h} in {:.1} s ({fps:.1} fps)", frames.len(), elapsed.as_secs_f32());
    if stalls > 0 {
        (Status::Warn, format!("{msg}; {stalls} reads stalled"))
    } else {
        (Status::Ok, msg)
    }
}

fn camera_fix(cam: &CameraConfig) -> &'static str {
    match cam {
        CameraConfig::Files { .. } => "put JPEG or PNG frames in face.camera.dir",
        CameraConfig::V4l2 { .. } => {
            "check the cable and `ls -l /dev/video*`; the menshen user needs the video group; \
             `v4l2-ctl -d DEVICE --list-formats-ext` lists the formats and sizes the camera offers"
        }
        CameraConfig::Opencv { .. } => {
            "check the URL, the credentials and the network; the stream should play in ffplay or VLC"
        }
    }
}

/// The camera opens and delivers frames at the configured format. With the daemon running, the
/// camera is its own (a V4L2 device streams to one reader), so its reported state is used.
async fn check_camera(cfg: &Config, n: usize) -> Check {
    if !cfg.face.enabled {
        return check("camera", Status::Skip, "face.enabled = false (card-only gate)", None);
    }
    let Some(cam) = cfg.face.camera.clone() else {
        return check("camera", Status::Warn, "face.enabled but no face.camera: no face verdicts will come", None);
    };
    let fix = camera_fix(&cam);
    if let Ok(st) = crate::daemon::status_query(cfg) {
        let state = st["camera"].as_str().unwrap_or("unknown").to_string();
        let status = if state == "ok" { Status::Ok } else { Status::Fail };
        return check(
            "camera",
            status,
            format!("in use by the running daemon, which reports it `{state}`"),
            (status == Status::Fail).then_some(fix),
        );
    }
    let want = match &cam {
        CameraConfig::V4l2 { width, height, .. } => Some((*width, *height)),
        _ => None,
    };
    let read = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut reads = Vec::new();
        let mut source = match crate::face::camera::open_source(&cam) {
            Ok(s) => s,
            Err(e) => return (vec![CameraRead::Gone(e.to_string())], started.elapsed()),
        };
        while reads.len() < n {
            let r = match source.next(crate::face::camera::STALL) {
                Ok(raw) => match raw.decode() {
                    Ok(img) => CameraRead::Frame { width: img.width, height: img.height },
                    Err(e) => CameraRead::Corrupt(e.to_string()),
                },
                Err(SourceError::Stalled(_)) => CameraRead::Stalled,
                Err(SourceError::Gone(why)) => CameraRead::Gone(why),
            };
            let stop = matches!(r, CameraRead::Gone(_) | CameraRead::Stalled);
            reads.push(r);
            if stop {
                break;
            }
        }
        (reads, started.elapsed())
    })
    .await;
    let desc = cfg.face.camera.as_ref().map(CameraConfig::describe).unwrap_or_default();
    match read {
        Ok((reads, elapsed)) => {
            let (st, msg) = judge_camera(want, &reads, elapsed);
            check("camera", st, format!("{desc}: {msg}"), (st == Status::Fail).then_some(fix))
        }
        Err(e) => check("camera", Status::Fail, format!("{desc}: {e}"), Some(fix)),
    }
}

async fn check_broker(cfg: &Config, timeout: Duration) -> Check {
    if !cfg.mqtt.enabled {
        return check("broker", Status::Skip, "MQTT disabled in the config", None);
    }
    let m = &cfg.mqtt;
    // The daemon's own options (TLS, login), under another client id and without its last will.
    let mut o = match crate::mqtt::base_options(&cfg.mqtt, format!("menshen-doctor-{}", std::process::id())) {
        Ok(o) => o,
        Err(e) => {
            return check(
                "broker",
                Status::Fail,
                e.to_string(),
                Some("check mqtt.password_file and the mqtt.tls files (paths, permissions, PEM contents)"),
            )
        }
    };
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 4);
    let res = tokio::time::timeout(timeout, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    let _ = client.try_disconnect();
    let at = format!("{}:{}", m.host, m.port);
    match res {
        Ok(Ok(())) => check("broker", Status::Ok, format!("connected to {at}"), None),
        Ok(Err(e)) if e.contains("return code") => check(
            "broker",
            Status::Fail,
            format!("{at} refused the login: {e}"),
            Some("check mqtt.username and mqtt.password_file, and the broker's ACL"),
        ),
        Ok(Err(e)) => check(
            "broker",
            Status::Fail,
            format!("cannot connect to {at}: {e}"),
            Some("start the broker, or correct mqtt.host / mqtt.port; check the firewall"),
        ),
        Err(_) => check(
            "broker",
            Status::Fail,
            format!("no answer from {at} within {} s", timeout.as_secs()),
            Some("check the address, the network and the firewall"),
        ),
    }
}

async fn check_gpio(cfg: &Arc<Config>) -> Check {
    let shutdown = CancellationToken::new();
    let opened = hw::open_gpio(cfg, &shutdown).await;
    let (gpio, chip) = match opened {
        Ok(g) => g,
        Err(e) => {
            return check("gpio", Status::Fail, format!("{e:#}"), Some("is hardware.chip there (`ls /dev/gpiochip*`, `gpioinfo`) and is menshen in the gpio group? simulated: is `menshen sim serve` running?"))
        }
    };
    // (key, line, the safe level of an output; None for an input)
    let mut pins: Vec<(String, LineRef, Option<bool>)> = Vec::new();
    for d in &cfg.doors {
        pins.push((format!("{}.relay", d.name), d.relay_pin.clone(), Some(!d.relay_active_high)));
        for (k, p) in [("contact", &d.contact_pin), ("rex", &d.rex_pin), ("fire", &d.fire_pin)] {
            if let Some(p) = p {
                pins.push((format!("{}.{k}", d.name), p.clone(), None));
            }
        }
    }
    for r in &cfg.readers {
        pins.push((format!("{}.d0", r.name), r.d0_pin.clone(), None));
        pins.push((format!("{}.d1", r.name), r.d1_pin.clone(), None));
        for (k, p) in r.feedback.lines() {
            pins.push((format!("{}.{k}", r.name), p.clone(), Some(!r.feedback.active_high())));
        }
    }
    let mut claimed = Vec::new();
    let mut outputs = Vec::new();
    let mut problems = Vec::new();
    for (name, pin, safe) in &pins {
        // Outputs are claimed at their safe level, exactly as the daemon does; every line stays
        // claimed until all are tried, so one line named twice (`22` and `"GPIO22"`) is caught.
        let res = match safe {
            Some(level) => gpio.output(pin, *level).map(|l| outputs.push(l)),
            None => gpio.input(pin, None).map(|l| claimed.push(l)),
        };
        if let Err(e) = res {
            problems.push(format!("{name} (GPIO{pin}): {e}"));
        }
    }
    drop((claimed, outputs));
    shutdown.cancel();
    drop(gpio);
    if let Some(t) = chip {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if problems.is_empty() {
        check("gpio", Status::Ok, format!("{} lines available", pins.len()), None)
    } else {
        check(
            "gpio",
            Status::Fail,
            problems.join("; "),
            Some("a line claimed by another process: stop the daemon (`systemctl stop menshen`) or whatever holds it"),
        )
    }
}

fn check_store(cfg: &Config) -> Check {
    let path = cfg.store_path();
    if !path.exists() {
        return check(
            "store",
            Status::Warn,
            format!("{} does not exist yet (created at first start)", path.display()),
            None,
        );
    }
    match crate::privacy::audit::AuditLog::open_store(&path) {
        Ok(s) => {
            let residents = s.residents().map(|r| r.len()).unwrap_or(0);
            let depth = s.outbox_depth().unwrap_or(0);
            let v = s.schema_version().unwrap_or(0);
            check("store", Status::Ok, format!("schema {v}, {residents} residents, {depth} events waiting"), None)
        }
        Err(StoreError::Locked) => match crate::daemon::status_query(cfg) {
            Ok(st) => check(
                "store",
                Status::Ok,
                format!("in use by the running daemon, {} events waiting", st["outbox_depth"]),
                None,
            ),
            Err(_) => check(
                "store",
                Status::Fail,
                "locked by another process, which does not answer `menshen status`",
                Some("stop the other process holding the store"),
            ),
        },
        Err(e) => check(
            "store",
            Status::Fail,
            format!("{}: {e}", path.display()),
            Some("restore the store from a backup, or move it away to start empty (residents must then be re-synced)"),
        ),
    }
}

fn check_disk(cfg: &Config, min_free_mb: u64) -> Check {
    let mut dir = cfg.gate.state_dir.clone();
    while !dir.exists() {
        match dir.parent() {
            Some(p) => dir = p.to_path_buf(),
            None => break,
        }
    }
    match rustix::fs::statvfs(&dir) {
        Ok(s) => {
            let (st, msg) = judge_disk(s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize, min_free_mb);
            check(
                "disk",
                st,
                format!("{}: {msg}", dir.display()),
                (st == Status::Fail).then_some("free space: the outbox needs room while the broker is away"),
            )
        }
        Err(e) => check("disk", Status::Fail, format!("{}: {e}", dir.display()), None),
    }
}

fn check_watchdog(paths: &[PathBuf]) -> Check {
    let Some(p) = paths.iter().find(|p| p.exists()) else {
        return check(
            "watchdog",
            Status::Warn,
            "no menshen.service installed (fine for a demo)",
            Some("install the package, or systemd/menshen.service"),
        );
    };
    match std::fs::read_to_string(p) {
        Ok(text) => {
            let (st, msg) = judge_unit(&text);
            check(
                "watchdog",
                st,
                format!("{}: {msg}", p.display()),
                (st == Status::Fail).then_some("use the shipped systemd/menshen.service"),
            )
        }
        Err(e) => check("watchdog", Status::Fail, format!("{}: {e}", p.display()), None),
    }
}

/// OSDP readers: the port is a serial port, the key is installed and private, and a reader in
/// plain mode (`insecure = true`) is flagged. Pure over what it is given (see [`check_osdp`]).
/// One OSDP reader as `doctor` found it: name, `insecure`, its port, its key (`None`: missing).
pub type OsdpFacts = (String, bool, Result<(), String>, Result<Option<()>, String>);

pub fn judge_osdp(readers: &[OsdpFacts]) -> Check {
    if readers.is_empty() {
        return check("osdp", Status::Skip, "no OSDP readers", None);
    }
    let mut st = Status::Ok;
    let mut parts = Vec::new();
    let mut fix = None;
    for (name, insecure, port, key) in readers {
        let mut say = |s: Status, m: String, f: &'static str| {
            if s == Status::Fail || (s == Status::Warn && st == Status::Ok) {
                st = s;
            }
            if s != Status::Ok {
                fix = fix.or(Some(f));
            }
            parts.push(m);
        };
        if let Err(e) = port {
            say(Status::Fail, format!("{name}: {e}"), "check the RS-485 adapter (USB) and the reader's `device` path");
            continue;
        }
        if *insecure {
            say(
                Status::Warn,
                format!(
                    "{name}: insecure = true, plain OSDP: card numbers and PINs cross the wire readable and forgeable"
                ),
                "run `menshen osdp install --reader NAME` and remove insecure = true",
            );
            continue;
        }
        match key {
            Ok(Some(())) => say(Status::Ok, format!("{name}: Secure Channel key installed"), ""),
            Ok(None) => say(
                Status::Fail,
                format!("{name}: no Secure Channel key: the reader is refused"),
                "run `menshen osdp install --reader NAME` (daemon stopped)",
            ),
            Err(e) => say(Status::Fail, format!("{name}: key: {e}"), "chmod 0600 the key file, or install again"),
        }
    }
    check("osdp", st, parts.join("; "), if st == Status::Ok { None } else { fix })
}

fn check_osdp(cfg: &Config) -> Check {
    let readers: Vec<_> = cfg
        .osdp_readers
        .iter()
        .map(|r| {
            let port = match std::fs::metadata(&r.device) {
                Err(e) => Err(format!("{}: {e}", r.device.display())),
                Ok(m) if std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()) => Ok(()),
                Ok(_) => Err(format!("{}: not a serial port (no character device)", r.device.display())),
            };
            let key = crate::secrets::read_osdp_key(&cfg.osdp_key_path(r)).map(|k| k.map(|_| ()));
            (r.name.clone(), r.insecure, port, key)
        })
        .collect();
    judge_osdp(&readers)
}

/// Run every check.
pub async fn run(config_path: &Path, opts: &DoctorOpts) -> Vec<Check> {
    let mut out = Vec::new();
    let cfg = match config::load(config_path) {
        Ok(c) => {
            out.push(check(
                "config",
                Status::Ok,
                format!(
                    "{} ({} doors, {} readers)",
                    config_path.display(),
                    c.doors.len(),
                    c.readers.len() + c.osdp_readers.len()
                ),
                None,
            ));
            Arc::new(c)
        }
        Err(e) => {
            out.push(check(
                "config",
                Status::Fail,
                format!("{}: {e}", config_path.display()),
                Some("fix the named key; `menshen check-config FILE` re-checks"),
            ));
            return out;
        }
    };
    out.push(check_gpio(&cfg).await);
    out.push(check_osdp(&cfg));
    out.push(check_camera(&cfg, opts.camera_frames).await);
    out.push(check_face(&cfg).await);
    out.push(check_broker(&cfg, opts.broker_timeout).await);
    let (st, msg) = judge_clock(crate::clock::wall_ms(), synchronised());
    out.push(check(
        "clock",
        st,
        msg,
        (st != Status::Ok).then_some("enable time sync (systemd-timesyncd or chrony); a Pi has no RTC"),
    ));
    out.push(check_disk(&cfg, opts.min_free_mb));
    out.push(check_store(&cfg));
    out.push(check_watchdog(&opts.unit_paths));
    out
}

/// Print the checks; returns whether any failed.
pub fn print(checks: &[Check], json: bool) -> bool {
    for c in checks {
        if json {
            println!("{}", serde_json::to_string(c).unwrap_or_default());
        } else {
            let mark = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            println!("{mark} {:<9} {}", c.name, c.message);
            if let Some(f) = &c.fix {
                println!("               fix: {f}");
            }
        }
    }
    checks.iter().any(|c| c.status == Status::Fail)
}

#[cfg(test)]
mod tests {
    #[test]
    fn osdp_readers_judged_insecure_flagged_missing_key_fails() {
        use super::{judge_osdp, Status};
        let r = |n: &str, insecure, port: Result<(), String>, key: Result<Option<()>, String>| {
            (n.to_string(), insecure, port, key)
        };
        assert_eq!(judge_osdp(&[]).status, Status::Skip);
        let c = judge_osdp(&[r("a", false, Ok(()), Ok(Some(())))]);
        assert_eq!(c.status, Status::Ok, "{}", c.message);
        let c = judge_osdp(&[r("a", false, Ok(()), Ok(Some(()))), r("b", true, Ok(()), Ok(None))]);
        assert_eq!(c.status, Status::Warn);
        assert!(c.message.contains("b: insecure = true"), "{}", c.message);
        let c = judge_osdp(&[r("b", true, Ok(()), Ok(None)), r("c", false, Ok(()), Ok(None))]);
        assert_eq!(c.status, Status::Fail, "a missing key fails, a warning does not hide it");
        assert!(c.fix.unwrap().contains("osdp install"));
        let c = judge_osdp(&[r("d", false, Err("/dev/ttyUSB0: not found".into()), Ok(Some(())))]);
        assert_eq!(c.status, Status::Fail);
    }

    use super::*;

    #[test]
    fn camera_judgement() {
        let f = |width, height| CameraRead::Frame { width, height };
        let s = Duration::from_secs(1);
        let (st, msg) = judge_camera(Some((640, 480)), &[f(640, 480), f(640, 480)], s);
        assert_eq!(st, Status::Ok, "{msg}");
        assert!(msg.contains("2 frames of 640x480"), "{msg}");
        assert_eq!(judge_camera(Some((640, 480)), &[f(1280, 720)], s).0, Status::Fail, "size not as configured");
        assert_eq!(judge_camera(None, &[f(1280, 720)], s).0, Status::Ok, "no size asked");
        assert_eq!(judge_camera(None, &[f(64, 64), CameraRead::Corrupt("EOI".into())], s).0, Status::Fail);
        assert_eq!(judge_camera(None, &[CameraRead::Stalled], s).0, Status::Fail);
        assert_eq!(judge_camera(None, &[f(64, 64), CameraRead::Stalled], s).0, Status::Warn);
        assert_eq!(judge_camera(None, &[CameraRead::Gone("unplugged".into())], s).0, Status::Fail);
    }

    #[test]
    fn disk_thresholds() {
        let mb = 1024 * 1024;
        assert_eq!(judge_disk(500 * mb, 1000 * mb, 100).0, Status::Ok);
        assert_eq!(judge_disk(50 * mb, 1000 * mb, 100).0, Status::Fail);
        assert_eq!(judge_disk(200 * mb, 10_000 * mb, 100).0, Status::Fail, "under 5 %");
    }

    #[test]
    fn clock_judgement() {
        assert_eq!(judge_clock(0, Some(true)).0, Status::Fail, "1970 after a boot without RTC");
        assert_eq!(judge_clock(1_800_000_000_000, Some(true)).0, Status::Ok);
        assert_eq!(judge_clock(1_800_000_000_000, Some(false)).0, Status::Warn);
    }

    #[test]
    fn unit_judgement() {
        assert_eq!(judge_unit(include_str!("../systemd/menshen.service")).0, Status::Ok);
        assert_eq!(judge_unit("[Service]\nType=simple\nWatchdogSec=10\n").0, Status::Fail);
        assert_eq!(judge_unit("[Service]\nType=notify\n").0, Status::Fail);
        assert_eq!(judge_unit("[Service]\nType=notify\nWatchdogSec=0\n").0, Status::Fail);
    }
}
