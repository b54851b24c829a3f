#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! `menshen doctor` through the real binary: a healthy simulated install passes; each broken part
//! fails its own check with a fix hint, and the exit code says so.

mod common;

use common::{Broker, Gate, GateOpts};
use serde_json::Value;
use std::collections::BTreeMap;

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
}
