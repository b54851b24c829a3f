#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! Installer wiring checks through the real binary on the simulated chip.

mod common;

use common::{wait_for, Gate, GateOpts, BIN};
use menshen::hw::sim::WorldOp;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn spawn_json(gate: &Gate, args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<Value>) {
    let mut a = vec!["test"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--config", gate.config.to_str().unwrap(), "--json"]);
    let mut child = Command::new(BIN).args(&a).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    (child, rx)
}

fn claimed(gate: &Gate, pin: u8) -> bool {
    gate.state()["lines"][pin.to_string()]["claimed"] == true
}

#[test]
fn test_reader_explains_good_swapped_and_noisy_frames() {
    let mut gate = Gate::new(GateOpts::default());
    gate.start_sim();
    let (mut child, rx) = spawn_json(&gate, &["reader", "--reader", "front", "--count", "3", "--seconds", "30"]);
    assert!(wait_for(Duration::from_secs(10), || claimed(&gate, 17) && claimed(&gate, 27)));
    gate.swipe(7, 12345);
    // D0 and D1 swapped: every bit arrives inverted.
    let inverted: String = gate.swipe_bits(7, 12345).iter().map(|c| if *c == '1' { '0' } else { '1' }).collect();
    gate.world(WorldOp::Raw { reader: "front".into(), bits: inverted, pulse_us: None, interval_us: None });
    // No common ground: pulses far too short.
    gate.world(WorldOp::Raw {
        reader: "front".into(),
        bits: "1".repeat(26),
        pulse_us: Some(3),
        interval_us: Some(2_000),
    });
    let got: Vec<Value> = (0..3).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    assert_eq!(got[0]["result"], "ok");
    assert_eq!(got[0]["number"], 12345);
    assert_eq!(got[0]["len"], 26);
    assert_eq!(got[1]["result"], "parity_error");
    assert!(got[1]["hint"].as_str().unwrap().contains("swapped"), "{}", got[1]);
    assert_eq!(got[2]["result"], "noise");
    assert!(got[2]["hint"].as_str().unwrap().contains("ground"), "{}", got[2]);
    assert!(child.wait().unwrap().success());
}

#[test]
fn test_relay_pulses_once_for_the_configured_time() {
    let mut gate = Gate::new(GateOpts { pulse_ms: 300, ..Default::default() });
    gate.start_sim();
    let out = gate.cli(&["test", "relay", "--door", "front", "--config", gate.config.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let relay = gate.relay("front");
    let tr: Vec<(u64, bool)> = relay["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["cmd_ns"].as_u64().unwrap(), t["energized"].as_bool().unwrap()))
        .collect();
    let on: Vec<_> = tr.iter().filter(|t| t.1).collect();
    assert_eq!(on.len(), 1, "{tr:?}");
    let off = tr.iter().find(|t| !t.1 && t.0 > on[0].0).unwrap();
    let ms = (off.0 - on[0].0) as f64 / 1e6;
    assert!((290.0..500.0).contains(&ms), "pulse {ms} ms");
    assert_eq!(relay["relay_energized"], false);
}

#[test]
fn test_inputs_reports_each_debounced_change() {
    let mut gate = Gate::new(GateOpts::default());
    gate.start_sim();
    let (mut child, rx) = spawn_json(&gate, &["inputs", "--seconds", "4"]);
    let initial: Vec<Value> = (0..3).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    assert!(initial.iter().any(|v| v["input"] == "front.contact" && v["state"] == "closed"), "{initial:?}");
    gate.world(WorldOp::Door { door: "front".into(), open: true });
    gate.world(WorldOp::Fire { door: "front".into(), active: true });
    let changes: Vec<Value> = (0..2).map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    assert!(changes.iter().any(|v| v["input"] == "front.contact" && v["state"] == "open"), "{changes:?}");
    assert!(changes.iter().any(|v| v["input"] == "front.fire" && v["state"] == "active"), "{changes:?}");
    // Bounce produced exactly one change per input.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    assert!(child.wait().unwrap().success());
}
