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

use crate::config::{self, Config};
use crate::hw;
use crate::store::{Store, StoreError};

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

async fn check_broker(cfg: &Config, timeout: Duration) -> Check {
    if !cfg.mqtt.enabled {
        return check("broker", Status::Skip, "MQTT disabled in the config", None);
    }
    let m = &cfg.mqtt;
    // The daemon's own options (TLS, login), under another client id and without its last will.
    let mut o = match crate::mqtt::base_options(cfg, format!("menshen-doctor-{}", std::process::id())) {
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
            return check("gpio", Status::Fail, format!("{e:#}"), Some("on a Pi: is /dev/gpiochip0 there and is menshen in the gpio group? simulated: is `menshen sim serve` running?"))
        }
    };
    let mut pins: Vec<(String, u8)> = Vec::new();
    for d in &cfg.doors {
        pins.push((format!("{}.relay", d.name), d.relay_pin));
        for (k, p) in [("contact", d.contact_pin), ("rex", d.rex_pin), ("fire", d.fire_pin)] {
            if let Some(p) = p {
                pins.push((format!("{}.{k}", d.name), p));
            }
        }
    }
    for r in &cfg.readers {
        pins.push((format!("{}.d0", r.name), r.d0_pin));
        pins.push((format!("{}.d1", r.name), r.d1_pin));
    }
    let mut claimed = Vec::new();
    let mut problems = Vec::new();
    for (name, pin) in &pins {
        // Relays are claimed in their safe state, exactly as the daemon does.
        let relay = cfg.doors.iter().find(|d| d.relay_pin == *pin);
        let res = match relay {
            Some(d) => gpio.output(*pin, !d.relay_active_high).map(|_| ()),
            None => gpio.input(*pin).map(|l| claimed.push(l)),
        };
        if let Err(e) = res {
            problems.push(format!("{name} (GPIO{pin}): {e}"));
        }
    }
    drop(claimed);
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
    match Store::open(&path) {
        Ok(s) => {
            let residents = s.residents().map(|r| r.len()).unwrap_or(0);
            let depth = s.outbox_depth().unwrap_or(0);
            let v = s.schema_version().unwrap_or(0);
            check("store", Status::Ok, format!("schema {v}, {residents} residents, {depth} events waiting"), None)
        }
        Err(StoreError::Locked) => match crate::app::status(cfg) {
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

/// Run every check.
pub async fn run(config_path: &Path, opts: &DoctorOpts) -> Vec<Check> {
    let mut out = Vec::new();
    let cfg = match config::load(config_path) {
        Ok(c) => {
            out.push(check(
                "config",
                Status::Ok,
                format!("{} ({} doors, {} readers)", config_path.display(), c.doors.len(), c.readers.len()),
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
    out.push(check("camera", Status::Skip, "no camera configured (card-only gate)", None));
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
    use super::*;

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
