#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! Daemon lifecycle through the real binary: config checking exit codes, systemd readiness and
//! watchdog over a real NOTIFY_SOCKET, the retained last will on a kill.

mod common;

use common::{wait_for, Broker, Gate, GateOpts, Subscriber, BIN};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn check_config_exit_codes_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, menshen::config::DEFAULT_CONFIG).unwrap();
    let out = Command::new(BIN).args(["check-config", good.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));

    let missing = dir.path().join("missing.toml");
    let out = Command::new(BIN).args(["check-config", missing.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, menshen::config::DEFAULT_CONFIG.replace("pulse_ms = 3000", "pulse_ms = \"long\"")).unwrap();
    let out = Command::new(BIN).args(["check-config", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pulse_ms"));

    std::fs::write(&bad, menshen::config::DEFAULT_CONFIG.replace("pulse_ms = 3000", "pulse_ms = 5")).unwrap();
    let out = Command::new(BIN).args(["check-config", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("doors[0].pulse_ms"), "{out:?}");

    // `run` refuses a bad config with the same code, before touching anything.
    let out = Command::new(BIN).args(["run", "--config", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(5));

    let out = Command::new(BIN).arg("print-default-config").output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), menshen::config::DEFAULT_CONFIG);
}

#[test]
fn systemd_readiness_and_watchdog_pings() {
    let mut gate = Gate::new(GateOpts::default());
    gate.start_sim();
    let sock_path = gate.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the shell's pid for the daemon.
    let mut child = Command::new("sh")
        .args(["-c", &format!("WATCHDOG_PID=$$ exec {BIN} run --config {}", gate.config.display())])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.iter().filter(|m: &&String| m.contains("WATCHDOG=1")).count() < 3 {
        let n = sock.recv(&mut buf).expect("no sd_notify message");
        got.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert!(got[0].contains("READY=1"), "{got:?}");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1");
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_killed_daemon_leaves_a_retained_offline_status() {
    let broker = Broker::start(common::free_port());
    let mut gate = Gate::new(GateOpts { mqtt_port: broker.port, ..Default::default() });
    gate.start_sim();
    gate.start_daemon();
    let sub = Subscriber::start(broker.port, "menshen/v1/+/+/status");
    assert!(wait_for(Duration::from_secs(10), || sub.all().iter().any(|(_, v, _)| v["state"] == "online")));
    gate.signal_daemon("KILL");
    // The broker publishes the will when the connection drops; a new subscriber sees it retained.
    assert!(wait_for(Duration::from_secs(10), || sub.all().iter().any(|(_, v, _)| v["state"] == "offline")));
    let late = Subscriber::start(broker.port, "menshen/v1/+/+/status");
    assert!(wait_for(Duration::from_secs(5), || late
        .all()
        .iter()
        .any(|(_, v, retain)| v["state"] == "offline" && *retain)));
}
