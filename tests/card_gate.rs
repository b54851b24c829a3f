#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! The card gate end to end: the real daemon on the simulated chip (its own process), a real
//! mosquitto, real redb files, real signals.

mod common;

use common::{wait_for, Broker, Gate, GateOpts, Subscriber};
use menshen::hw::sim::WorldOp;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

fn ok(out: std::process::Output) {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn transitions(relay: &Value) -> Vec<(u64, bool)> {
    relay["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["cmd_ns"].as_u64().unwrap(), t["energized"].as_bool().unwrap()))
        .collect()
}

#[test]
fn card_swipes_open_the_door_or_are_denied_with_the_right_reason() {
    let broker = Broker::start(common::free_port());
    let mut gate = Gate::new(GateOpts { mqtt_port: broker.port, pulse_ms: 500, ..Default::default() });
    ok(gate.resident(&["add", "r-1", "--card", "H10301:7:12345"]));
    ok(gate.resident(&["add", "r-2", "--card", "H10301:7:33333", "--card-valid-until", "1000"]));
    let sub = Subscriber::start(broker.port, "menshen/v1/#");
    gate.start_sim();
    gate.start_daemon();

    // Retained online status.
    assert!(wait_for(Duration::from_secs(10), || sub
        .all()
        .iter()
        .any(|(t, v, _)| t == "menshen/v1/site1/gate1/status" && v["state"] == "online")));

    // 1. An enrolled card: the relay pulses for the configured time, a granted event arrives.
    let before = now_ms();
    let swipe = gate.swipe(7, 12345);
    let last_edge = swipe["last_edge_ns"].as_u64().unwrap();
    let ev = sub.wait_events("access", Duration::from_secs(10), |e| !e.is_empty());
    assert_eq!(ev.len(), 1, "{ev:?}\nlog:\n{}", gate.log());
    let e = &ev[0];
    assert_eq!(e["type"], "access");
    assert_eq!(e["decision"], "granted");
    assert_eq!(e["reason"], "granted");
    assert_eq!(e["method"], "card");
    assert_eq!(e["door"], "front");
    assert_eq!(e["reader"], "front");
    assert_eq!(e["resident"], "r-1");
    assert_eq!(e["card"]["format"], "H10301");
    assert_eq!(e["card"]["facility"], 7);
    assert_eq!(e["card"]["number"], 12345);
    assert_eq!(e["frame"]["len"], 26);
    assert_eq!(e["frame"]["bits"], swipe["bits"]);
    assert_eq!(e["site"], "site1");
    assert_eq!(e["gate"], "gate1");
    assert_eq!(e["backfill"], false);
    assert_eq!(e["id"].as_str().unwrap().len(), 26, "ULID");
    assert!(e["seq"].as_u64().unwrap() >= 1);
    let ts = e["ts_ms"].as_i64().unwrap();
    assert!(ts >= before && ts <= now_ms(), "timestamp {ts} outside the swipe window");

    std::thread::sleep(Duration::from_millis(900));
    let relay = gate.relay("front");
    let tr = transitions(&relay);
    let on = tr.iter().find(|(_, e)| *e).expect("relay energized");
    let off = tr.iter().find(|(t, e)| !*e && *t > on.0).expect("relay released");
    let pulse_ms = (off.0 - on.0) as f64 / 1e6;
    assert!((480.0..700.0).contains(&pulse_ms), "pulse {pulse_ms} ms, configured 500");
    let latency_ms = (on.0 as i64 - last_edge as i64) as f64 / 1e6;
    assert!((0.0..100.0).contains(&latency_ms), "last edge -> relay {latency_ms} ms");
    assert_eq!(relay["relay_energized"], false);
    let writes = relay["relay_writes"].as_u64().unwrap();

    // 2. Unknown card, parity error, expired card: denied with the reason, the relay never moves.
    gate.swipe(7, 55555);
    let mut bits: Vec<char> = gate.swipe_bits(7, 12345);
    let last = bits.len() - 1;
    bits[last] = if bits[last] == '1' { '0' } else { '1' };
    gate.world(WorldOp::Raw {
        reader: "front".into(),
        bits: bits.into_iter().collect(),
        pulse_us: None,
        interval_us: None,
    });
    gate.swipe(7, 33333);
    let ev = sub.wait_events("access", Duration::from_secs(10), |e| e.len() >= 4);
    let reasons: Vec<(&str, &str)> =
        ev.iter().map(|e| (e["decision"].as_str().unwrap(), e["reason"].as_str().unwrap())).collect();
    assert_eq!(
        reasons,
        vec![
            ("granted", "granted"),
            ("denied", "unknown_card"),
            ("denied", "parity_error"),
            ("denied", "credential_expired")
        ],
        "log:\n{}",
        gate.log()
    );
    assert_eq!(ev[1]["card"]["number"], 55555);
    assert!(ev[2].get("card").is_none(), "a parity error is not a card");
    assert_eq!(ev[2]["detail"], "parity_error");
    assert_eq!(ev[3]["resident"], "r-2");
    std::thread::sleep(Duration::from_millis(300));
    let relay = gate.relay("front");
    assert_eq!(relay["relay_writes"].as_u64().unwrap(), writes, "a denied swipe must not touch the relay");
    assert_eq!(relay["relay_energized"], false);

    // Sequence numbers rise with every stored event; no access event is retained.
    let seqs: Vec<u64> = ev.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(sub.all().iter().filter(|(t, _, _)| t.contains("/event/")).all(|(_, _, retain)| !retain));

    // 3. A D0 line stuck low: an alarm, counted, and a good swipe still works after it recovers.
    gate.world(WorldOp::Line { pin: 17, high: false });
    let alarms =
        sub.wait_events("alarm", Duration::from_secs(10), |e| e.iter().any(|a| a["alarm"] == "reader_line_stuck"));
    assert!(alarms.iter().any(|a| a["alarm"] == "reader_line_stuck" && a["reader"] == "front"), "{alarms:?}");
    gate.world(WorldOp::Line { pin: 17, high: true });
    std::thread::sleep(Duration::from_millis(100));
    gate.swipe(7, 12345);
    let ev = sub.wait_events("access", Duration::from_secs(10), |e| e.len() >= 5);
    assert_eq!(ev[4]["decision"], "granted", "{:?}", ev.last());
    let st = gate.status().unwrap();
    assert_eq!(st["stats"]["wiegand_rejections"]["line_stuck_low"], 1);
    assert_eq!(st["stats"]["wiegand_rejections"]["parity_error"], 1);
}

#[test]
fn sigterm_leaves_every_relay_in_its_safe_state() {
    let mut gate = Gate::new(GateOpts { pulse_ms: 10_000, fail_safe_door: true, ..Default::default() });
    ok(gate.resident(&["add", "r-1", "--card", "H10301:7:12345"]));
    gate.start_sim();
    gate.start_daemon();
    // While running: the fail-safe door is held locked (energized); the fail-secure one is not.
    assert!(wait_for(Duration::from_secs(5), || gate.relay("side")["relay_energized"] == true));
    assert_eq!(gate.relay("front")["relay_energized"], false);
    // Unlock the fail-secure door and stop the daemon in the middle of its 10 s pulse.
    gate.swipe(7, 12345);
    assert!(wait_for(Duration::from_secs(5), || gate.relay("front")["relay_energized"] == true), "{}", gate.log());
    let status = gate.signal_daemon("TERM");
    assert!(status.success(), "exit {status:?}; log:\n{}", gate.log());
    // The chip outlives the daemon: both relays are de-energized (the safe state) and released.
    let st = gate.state();
    for door in ["front", "side"] {
        assert_eq!(st["doors"][door]["relay_energized"], false, "{door}: {st}");
        assert_eq!(st["doors"][door]["relay_claimed"], false, "{door}: {st}");
    }
    assert!(gate.log().contains("door in its safe state"));
}

#[test]
fn sigkill_then_restart_publishes_every_stored_event_and_starts_safe() {
    let port = common::free_port();
    let mut gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 10_000, ..Default::default() });
    ok(gate.resident(&["add", "r-1", "--card", "H10301:7:12345"]));
    gate.start_sim();
    // The broker is down: events wait in the outbox.
    gate.start_daemon();
    for i in 0..12u64 {
        gate.swipe(7, if i % 3 == 0 { 12345 } else { 40_000 + i });
    }
    // Wait until the daemon reports every access event stored.
    let mut stored = 0;
    assert!(wait_for(Duration::from_secs(10), || {
        let st = gate.status().unwrap_or_default();
        stored = st["next_seq"].as_u64().unwrap_or(1) - 1;
        st["stats"]["granted"].as_u64().unwrap_or(0) + st["stats"]["denied"].as_u64().unwrap_or(0) >= 12
            && st["outbox_depth"].as_u64() == Some(stored)
            && stored >= 12
    }));
    // Mid-pulse: the relay is energized when the daemon dies, and stays so (the line keeps its level).
    assert_eq!(gate.relay("front")["relay_energized"], true);
    let status = gate.signal_daemon("KILL");
    assert!(!status.success());
    assert_eq!(gate.relay("front")["relay_energized"], true, "a killed process leaves the line as it was");

    let broker = Broker::start(port);
    let sub = Subscriber::start(broker.port, "menshen/v1/#");
    let spawned = menshen::clock::MonoTime::now();
    gate.start_daemon();
    // First thing on start: the safe state; and no stale unlock is replayed afterwards.
    let relay = gate.relay("front");
    assert_eq!(relay["relay_energized"], false);
    // The bound docs/reliability.md gives: from the daemon's start (exec) to the relay in its
    // safe state, read from the chip's own record of the line (CLOCK_MONOTONIC, as ours).
    let safe_at = relay["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|t| t["energized"] == false)
        .and_then(|t| t["at_ns"].as_u64())
        .expect("the restart put the relay line down");
    assert!(safe_at > spawned.as_nanos(), "the relay went safe before the restart?");
    eprintln!("relay safe {:.1} ms after the daemon was started", (safe_at - spawned.as_nanos()) as f64 / 1e6);
    std::thread::sleep(Duration::from_millis(500));
    let relay = gate.relay("front");
    assert_eq!(relay["relay_energized"], false, "restart must not re-send the unlock");

    // Every stored event arrives; each seq has one id and one content; they are marked backfill.
    let kinds = ["access", "door", "alarm", "system"];
    let got = |sub: &Subscriber| -> Vec<Value> { kinds.iter().flat_map(|k| sub.events(k)).collect() };
    assert!(
        wait_for(Duration::from_secs(20), || {
            let s: HashSet<u64> = got(&sub).iter().filter_map(|e| e["seq"].as_u64()).collect();
            (1..=stored).all(|q| s.contains(&q))
        }),
        "not every stored event arrived; log:\n{}",
        gate.log()
    );
    let mut by_seq: BTreeMap<u64, Value> = BTreeMap::new();
    for e in got(&sub) {
        let seq = e["seq"].as_u64().unwrap();
        if let Some(prev) = by_seq.insert(seq, e.clone()) {
            assert_eq!(prev, e, "seq {seq} published twice with different content");
        }
    }
    for seq in 1..=stored {
        assert_eq!(by_seq[&seq]["backfill"], true, "seq {seq} was made while offline");
    }
    // The unlock the crash cut short is closed by the door's real state, published at start.
    let unlocked = by_seq.values().filter(|e| e["event"] == "unlocked").map(|e| e["seq"].as_u64().unwrap()).max();
    let unlocked = unlocked.expect("the granted swipes' unlocked events");
    assert!(
        wait_for(Duration::from_secs(10), || sub
            .events("door")
            .iter()
            .any(|e| e["event"] == "locked" && e["cause"] == "daemon_start" && e["seq"].as_u64() > Some(unlocked))),
        "no `locked` (daemon_start) after the last `unlocked` (seq {unlocked}): {:?}",
        sub.events("door")
    );
    let access: Vec<&Value> = by_seq.values().filter(|e| e["type"] == "access").collect();
    assert_eq!(access.len(), 12);
    let reasons: Vec<&Value> = access.iter().map(|e| &e["reason"]).collect();
    assert_eq!(access.iter().filter(|e| e["decision"] == "granted").count(), 4, "{reasons:?}");
    // The outbox drains once the broker has acknowledged everything.
    assert!(
        wait_for(Duration::from_secs(10), || gate.status().unwrap_or_default()["outbox_depth"] == 0),
        "outbox not drained: {:?}\nlog:\n{}",
        gate.status(),
        gate.log()
    );
}

#[test]
fn an_outbox_over_its_cap_raises_an_alarm_that_is_delivered_later() {
    let port = common::free_port();
    let gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 200, ..Default::default() });
    // A tiny cap, so a few swipes during the outage cross it.
    let text = std::fs::read_to_string(&gate.config)
        .unwrap()
        .replace("outbox_alarm_depth = 1000000", "outbox_alarm_depth = 3");
    std::fs::write(&gate.config, text).unwrap();
    let mut gate = gate;
    gate.start_sim();
    gate.start_daemon();
    for n in 0..4 {
        gate.swipe(7, 60_000 + n);
    }
    assert!(wait_for(Duration::from_secs(10), || gate.status().unwrap_or_default()["stats"]["denied"] == 4));
    assert!(wait_for(Duration::from_secs(5), || gate.log().contains("outbox over its alarm depth")));
    // Stop, bring the broker and a subscriber up, restart: the stored alarm goes out.
    assert!(gate.signal_daemon("TERM").success());
    let broker = Broker::start(port);
    let sub = Subscriber::start(broker.port, "menshen/v1/#");
    gate.start_daemon();
    let alarms =
        sub.wait_events("alarm", Duration::from_secs(20), |a| a.iter().any(|e| e["alarm"] == "outbox_over_capacity"));
    let a = alarms.iter().find(|e| e["alarm"] == "outbox_over_capacity").expect("no outbox alarm");
    assert_eq!(a["backfill"], true);
}
