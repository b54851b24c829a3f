#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! `menshen doctor` through the real binary: a healthy simulated install passes; each broken part
//! fails its own check with a fix hint, and the exit code says so.

mod common;

use common::{Broker, Gate, GateOpts};
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

fn doctor(gate: &Gate, extra: &[&str]) -> (i32, BTreeMap<String, Value>) {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/menshen.service");
    let mut args = vec!["doctor", "--json", "--config", gate.config.to_str().unwrap()];
    if !extra.contains(&"--unit") {
        args.extend_from_slice(&["--unit", unit]);
    }
    args.extend_from_slice(extra);
    let out = gate.cli(&args);
    let checks = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| (v["name"].as_str().unwrap().to_string(), v))
        .collect();
    (out.status.code().unwrap(), checks)
}

fn status(checks: &BTreeMap<String, Value>, name: &str) -> String {
    checks[name]["status"].as_str().unwrap().to_string()
}

#[test]
fn a_healthy_simulated_install_passes() {
    let broker = Broker::start(common::free_port());
    let mut gate = Gate::new(GateOpts { mqtt_port: broker.port, ..Default::default() });
    gate.start_sim();
    assert!(gate.resident(&["add", "r-1", "--card", "H10301:7:1"]).status.success());
    let (code, c) = doctor(&gate, &[]);
    assert_eq!(code, 0, "{c:?}");
    for name in ["config", "gpio", "broker", "disk", "store", "watchdog"] {
        assert_eq!(status(&c, name), "ok", "{name}: {:?}", c[name]);
    }
    assert!(c["store"]["message"].as_str().unwrap().contains("1 residents"));
    assert!(["ok", "warn"].contains(&status(&c, "clock").as_str()));
    // With the daemon running, the store is reported through its status socket.
    gate.start_daemon();
    let (_, c) = doctor(&gate, &[]);
    assert_eq!(status(&c, "store"), "ok", "{:?}", c["store"]);
    assert!(c["store"]["message"].as_str().unwrap().contains("running daemon"));
    // ...but its lines are claimed, so the GPIO check fails and says why.
    assert_eq!(status(&c, "gpio"), "fail");
    assert!(c["gpio"]["message"].as_str().unwrap().contains("claimed"), "{:?}", c["gpio"]);
    assert!(c["gpio"]["fix"].as_str().unwrap().contains("stop the daemon"));
}

#[test]
fn each_broken_part_fails_its_own_check() {
    // Broker down, no chip running.
    let gate = Gate::new(GateOpts { mqtt_port: common::free_port(), ..Default::default() });
    let (code, c) = doctor(&gate, &[]);
    assert_eq!(code, 1);
    assert_eq!(status(&c, "broker"), "fail");
    assert!(c["broker"]["message"].as_str().unwrap().contains("cannot connect"), "{:?}", c["broker"]);
    assert_eq!(status(&c, "gpio"), "fail");
    assert!(c["gpio"]["fix"].is_string());
    // Too little disk for the outbox.
    let (_, c) = doctor(&gate, &["--min-free-mb", "999999999"]);
    assert_eq!(status(&c, "disk"), "fail");
    // A store that is not a store.
    std::fs::create_dir_all(gate.dir.path().join("state")).unwrap();
    std::fs::write(gate.dir.path().join("state/menshen.redb"), b"this is not a redb file, it is a note").unwrap();
    let (_, c) = doctor(&gate, &[]);
    assert_eq!(status(&c, "store"), "fail", "{:?}", c["store"]);
    // A unit without a watchdog.
    let unit = gate.dir.path().join("menshen.service");
    std::fs::write(&unit, "[Service]\nType=notify\nExecStart=/usr/bin/menshen run\n").unwrap();
    let (_, c) = doctor(&gate, &["--unit", unit.to_str().unwrap()]);
    assert_eq!(status(&c, "watchdog"), "fail");
    // A bad config stops everything after the config check.
    std::fs::write(&gate.config, "[gate]\nsite = 1\n").unwrap();
    let (code, c) = doctor(&gate, &[]);
    assert_eq!(code, 1);
    assert_eq!(status(&c, "config"), "fail");
    assert_eq!(c.len(), 1);
}

#[test]
fn the_broker_check_uses_the_configured_credentials() {
    let broker = Broker::start_with_login(common::free_port(), "gate1", "s3cret-for-test");
    let gate = Gate::new(GateOpts { mqtt_port: broker.port, ..Default::default() });
    let pw = gate.dir.path().join("mqtt-password");
    let text = std::fs::read_to_string(&gate.config).unwrap();
    let with_login = |password: &str| {
        std::fs::write(&pw, format!("{password}\n")).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t =
            text.replace("[mqtt]\n", &format!("[mqtt]\nusername = \"gate1\"\npassword_file = \"{}\"\n", pw.display()));
        std::fs::write(&gate.config, t).unwrap();
    };
    with_login("s3cret-for-test");
    let (_, c) = doctor(&gate, &[]);
    assert_eq!(status(&c, "broker"), "ok", "{:?}", c["broker"]);
    with_login("wrong");
    let (code, c) = doctor(&gate, &[]);
    assert_eq!(code, 1);
    assert_eq!(status(&c, "broker"), "fail");
    assert!(c["broker"]["message"].as_str().unwrap().contains("refused the login"), "{:?}", c["broker"]);
    assert!(c["broker"]["fix"].as_str().unwrap().contains("password_file"));
    // No secret others can read: a world-readable password file is refused, named, before any
    // connection (the right password, mode 0644).
    with_login("s3cret-for-test");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, c) = doctor(&gate, &[]);
    assert_eq!(code, 1);
    assert_eq!(status(&c, "broker"), "fail", "{:?}", c["broker"]);
    assert!(c["broker"]["message"].as_str().unwrap().contains("mode 0644"), "{:?}", c["broker"]);
}

#[test]
fn the_camera_check_reads_frames_and_names_each_fault() {
    let mut gate = Gate::new(GateOpts::default());
    let cam = gate.dir.path().join("camera");
    std::fs::create_dir_all(&cam).unwrap();
    let good = std::fs::read(common::shared_models().join("../data/smoke/George_W_Bush_0001.jpg")).unwrap();
    std::fs::write(cam.join("00.jpg"), &good).unwrap();
    gate.enable_face(&cam, 20.0);
    let (_, c) = doctor(&gate, &[]);
    assert_eq!(status(&c, "onnx"), "ok", "{:?}", c["onnx"]);
    let (w, h) = image_size(&good);
    assert_eq!(status(&c, "camera"), "ok", "{:?}", c["camera"]);
    let msg = c["camera"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("5 frames of {w}x{h}")), "{msg}");
    // A truncated JPEG among the frames.
    std::fs::write(cam.join("01.jpg"), &good[..good.len() / 2]).unwrap();
    let (code, c) = doctor(&gate, &[]);
    assert_eq!(code, 1);
    assert_eq!(status(&c, "camera"), "fail", "{:?}", c["camera"]);
    assert!(c["camera"]["message"].as_str().unwrap().contains("corrupt"), "{:?}", c["camera"]);
    assert!(c["camera"]["fix"].as_str().unwrap().contains("face.camera.dir"));
    // No frames at all, then no camera directory.
    std::fs::remove_file(cam.join("00.jpg")).unwrap();
    std::fs::remove_file(cam.join("01.jpg")).unwrap();
    let (_, c) = doctor(&gate, &[]);
    assert_eq!(status(&c, "camera"), "fail", "{:?}", c["camera"]);
    assert!(c["camera"]["message"].as_str().unwrap().contains("gone"), "{:?}", c["camera"]);
    std::fs::remove_dir(&cam).unwrap();
    let (_, c) = doctor(&gate, &[]);
    assert_eq!(status(&c, "camera"), "fail", "{:?}", c["camera"]);
    // A V4L2 device that does not exist (none exists here): a clear failure with the fix.
    gate.edit_config(|t| {
        let mut v = toml::Table::new();
        v.insert("kind".into(), "v4l2".into());
        v.insert("device".into(), "/dev/video-menshen-test".into());
        t["face"].as_table_mut().unwrap().insert("camera".into(), v.into());
    });
    let (_, c) = doctor(&gate, &[]);
    assert_eq!(status(&c, "camera"), "fail", "{:?}", c["camera"]);
    assert!(c["camera"]["message"].as_str().unwrap().contains("/dev/video-menshen-test"), "{:?}", c["camera"]);
    assert!(c["camera"]["fix"].as_str().unwrap().contains("video group"));
    // With the daemon running, its own report of the camera is used.
    std::fs::create_dir_all(&cam).unwrap();
    std::fs::write(cam.join("00.jpg"), &good).unwrap();
    gate.enable_face(&cam, 10.0);
    gate.edit_config(|t| {
        t["mqtt"].as_table_mut().unwrap().insert("enabled".into(), false.into());
    });
    gate.start_sim();
    gate.start_daemon();
    assert!(common::wait_for(std::time::Duration::from_secs(30), || gate
        .status()
        .is_some_and(|s| s["camera"] == "ok")));
    let (_, c) = doctor(&gate, &[]);
    assert_eq!(status(&c, "camera"), "ok", "{:?}", c["camera"]);
    assert!(c["camera"]["message"].as_str().unwrap().contains("running daemon"), "{:?}", c["camera"]);
    // Card-only: skipped.
    gate.edit_config(|t| {
        t["face"].as_table_mut().unwrap().insert("enabled".into(), false.into());
    });
    let (_, c) = doctor(&gate, &[]);
    assert_eq!(status(&c, "camera"), "skip", "{:?}", c["camera"]);
}

/// Width and height from a JPEG's SOF marker.
fn image_size(jpeg: &[u8]) -> (u32, u32) {
    let mut i = 2;
    while i + 9 < jpeg.len() {
        let marker = jpeg[i + 1];
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if (0xC0..=0xC2).contains(&marker) {
            let h = u16::from_be_bytes([jpeg[i + 5], jpeg[i + 6]]) as u32;
            let w = u16::from_be_bytes([jpeg[i + 7], jpeg[i + 8]]) as u32;
            return (w, h);
        }
        i += 2 + len;
    }
    panic!("no SOF marker");
}
