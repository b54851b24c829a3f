//! A broker outage with more than a thousand events and a SIGKILL of the daemon in the middle:
//! when the broker returns, every event arrives, each id once after de-duplication, in sequence
//! order, marked backfill; and no old unlock can be replayed (REQUIREMENTS D1, D2, M2, M3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use menshen::hw::sim::{self, WorldOp};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

const READERS: [(&str, u8, u8); 5] = [("r2", 5, 6), ("r3", 12, 13), ("r4", 16, 19), ("r5", 20, 21), ("r6", 26, 18)];

/// Swipe `per_reader` unknown cards on every reader at once (each reader in its own thread, with
/// real Wiegand timing); returns how many swipes were made.
fn swipe_burst(socket: &std::path::Path, per_reader: u64, base: u64) -> u64 {
    let names: Vec<String> =
        std::iter::once("front".to_string()).chain(READERS.iter().map(|r| r.0.to_string())).collect();
    let handles: Vec<_> = names
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let socket = socket.to_path_buf();
            std::thread::spawn(move || {
                for n in 0..per_reader {
                    let op = WorldOp::Swipe {
                        reader: name.clone(),
                        facility: 200,
                        card: base + i as u64 * 1_000 + n,
                        format: None,
                    };
                    sim::request(&socket, &op).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    per_reader * (READERS.len() as u64 + 1)
}

fn next_seq(gate: &Gate) -> u64 {
    gate.status().unwrap()["next_seq"].as_u64().unwrap()
}

#[test]
fn an_outage_with_a_kill_loses_nothing_and_replays_no_unlock() {
    let port = free_port();
    let bdir = tempfile::tempdir().unwrap();
    let broker = Broker::start_persistent(port, bdir.path());
    let bms = Bms::connect_with(port, Some("bms-outage"));
    let mut gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 300, ..GateOpts::default() });
    gate.edit_config(|t| {
        let readers = t["readers"].as_array_mut().unwrap();
        for (name, d0, d1) in READERS {
            let mut r = toml::Table::new();
            r.insert("name".into(), name.into());
            r.insert("door".into(), "front".into());
            r.insert("formats".into(), toml::Value::Array(vec!["H10301".into()]));
            r.insert("d0_pin".into(), i64::from(d0).into());
            r.insert("d1_pin".into(), i64::from(d1).into());
            readers.push(r.into());
        }
    });
    gate.start_sim();
    gate.start_daemon();
    assert!(wait_for(Duration::from_secs(10), || bms.retained("/status").iter().any(|v| v["state"] == "online")
        || bms.messages("/status").iter().any(|v| v["state"] == "online")));

    // Before the outage: an unlock that really happens, and some events that go out live.
    let unlock = |id: &str, exp: i64| json!({"door": "front", "duration_ms": 200, "request_id": id, "expires_at": exp});
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let r = bms.command("site1", "gate1", "unlock", unlock("pre-1", now() + 30_000), None);
    assert_eq!(r["ok"], true, "{r}");
    swipe_burst(&gate.socket, 2, 1);
    assert!(wait_for(Duration::from_secs(10), || gate.status().unwrap()["outbox_depth"] == 0));
    assert!(wait_for(Duration::from_secs(3), || gate.relay("front")["relay_energized"] == false));

    // The broker goes away.
    broker.terminate();
    assert!(wait_for(Duration::from_secs(10), || gate.status().unwrap()["stats"]["mqtt_online"] == false));
    let first_outage_seq = next_seq(&gate);
    let t0 = Instant::now();
    let mut swipes = swipe_burst(&gate.socket, 90, 10_000);
    // SIGKILL in the middle of the outage, then start again (the broker is still down).
    assert!(wait_for(Duration::from_secs(10), || gate.status().unwrap()["outbox_depth"].as_u64().unwrap() >= 500));
    gate.signal_daemon("KILL");
    gate.start_daemon();
    swipes += swipe_burst(&gate.socket, 90, 20_000);
    let swipe_secs = t0.elapsed().as_secs_f64();
    assert!(wait_for(Duration::from_secs(10), || next_seq(&gate) >= first_outage_seq + 1_000), "{}", gate.log());
    let last_seq = next_seq(&gate) - 1;
    let st = gate.status().unwrap();
    let depth = st["outbox_depth"].as_u64().unwrap();
    eprintln!(
        "outage: {swipes} swipes in {swipe_secs:.1} s, events {first_outage_seq}..={last_seq} stored, {depth} waiting"
    );
    assert!(last_seq + 1 - first_outage_seq >= 1_000);
    let writes_before = gate.relay_writes("front");

    // The broker returns: the same BMS session gets everything.
    let _broker = Broker::start_persistent(port, bdir.path());
    let t1 = Instant::now();
    let all_arrived = || {
        let got: HashSet<u64> = bms
            .msgs
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _, _)| t.contains("/event/"))
            .filter_map(|(_, v, _)| v["seq"].as_u64())
            .collect();
        (1..=last_seq).all(|s| got.contains(&s))
    };
    if !wait_for(Duration::from_secs(60), all_arrived) {
        let got = bms.msgs.lock().unwrap().iter().filter(|(t, _, _)| t.contains("/event/")).count();
        let log = gate.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let blog = std::fs::read_to_string(bdir.path().join("mosquitto.log")).unwrap_or_default();
        eprintln!(
            "BROKER LOG:\n{}",
            blog.lines()
                .filter(|l| l.contains("bms") || l.contains("Saving") || l.contains("Restor"))
                .take(60)
                .collect::<Vec<_>>()
                .join("\n")
        );
        panic!(
            "not every event arrived: {got} received; status {}; log tail:\n{}",
            gate.status().unwrap(),
            tail.join("\n")
        );
    }
    eprintln!("outage: backlog of {depth} drained in {:.2} s after the broker returned", t1.elapsed().as_secs_f64());
    assert!(wait_for(Duration::from_secs(10), || gate.status().unwrap()["outbox_depth"] == 0));

    // Each id once after de-duplication; one content per seq; seq order; backfill marked.
    let msgs: Vec<Value> =
        bms.msgs.lock().unwrap().iter().filter(|(t, _, _)| t.contains("/event/")).map(|(_, v, _)| v.clone()).collect();
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    let mut order = Vec::new();
    let mut dups = 0;
    for m in &msgs {
        let id = m["id"].as_str().unwrap().to_string();
        match by_id.get(&id) {
            Some(prev) => {
                assert_eq!(prev, m, "a re-sent event must be identical");
                dups += 1;
            }
            None => {
                order.push(m["seq"].as_u64().unwrap());
                by_id.insert(id, m.clone());
            }
        }
    }
    let seqs: HashSet<u64> = by_id.values().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs.len(), by_id.len(), "one id per seq");
    assert!((1..=last_seq).all(|s| seqs.contains(&s)));
    assert!(order.windows(2).all(|w| w[0] < w[1]), "first arrivals are in seq order");
    for v in by_id.values() {
        let s = v["seq"].as_u64().unwrap();
        if (first_outage_seq..=last_seq).contains(&s) {
            assert_eq!(v["backfill"], true, "seq {s} was made during the outage: {v}");
        }
    }
    eprintln!("outage: {} unique events, {dups} duplicates removed by id", by_id.len());

    // No replay: the old unlock again, and an expired one, leave the relay alone.
    let r = bms.command("site1", "gate1", "unlock", unlock("pre-1", now() + 30_000), None);
    assert_eq!(r["code"], "duplicate_request", "{r}");
    let r = bms.command("site1", "gate1", "unlock", unlock("late-1", now() - 1_000), None);
    assert_eq!(r["code"], "expired", "{r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gate.relay_writes("front"), writes_before, "no unlock was replayed");
    assert_eq!(gate.relay("front")["relay_energized"], false);
    common::schema::check_all(&bms);
}
