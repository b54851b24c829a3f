#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a panic is a failed run
//! A BMS command's round trip through the real daemon and a real mosquitto (issue 16).
//!
//! A BMS that sends commands one after another (a resident pressing "open" in an app, a sync
//! resident by resident) waits for each reply. With Nagle's algorithm on either side, the reply
//! (a small write right after the small PUBACK of the command) waits for the peer's delayed ACK,
//! about 40 ms on Linux. Measured here, in one run, for the four combinations of the broker's
//! `set_tcp_nodelay` and the gate's `mqtt.tcp_nodelay`, with a BMS client that sets TCP_NODELAY:
//!
//! - sequential round trips, publish → reply, p50/p99: `rules.get` (reads) and
//!   `resident.set_mode` (a durable write with fdatasync);
//! - pipelined `rules.get`, commands per second (all sent, then all replies awaited);
//! - a remote `unlock`: publish → the relay command, read from the simulated chip's own record of
//!   the line (CLOCK_MONOTONIC, the same clock as ours).
//!
//! Run: `cargo bench --bench command_round_trip` (needs mosquitto). `ROUNDS=N` changes the number
//! of sequential round trips (default 200).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use menshen::clock::MonoTime;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

struct Figures {
    read: (f64, f64),
    write: (f64, f64),
    pipelined: f64,
    unlock: (f64, f64),
}

fn round_trips(bms: &Bms, n: usize, verb: &str, payload: impl Fn(usize) -> Value) -> Vec<f64> {
    let topic = format!("menshen/v1/site1/gate1/cmd/{verb}");
    (0..n)
        .map(|i| {
            let corr = bms.corr();
            let t = Instant::now();
            bms.publish(&topic, payload(i).to_string().into_bytes(), Some(corr.as_bytes()), None, false);
            let r = bms.reply_within(corr.as_bytes(), Duration::from_secs(10)).expect("a reply");
            let ms = t.elapsed().as_secs_f64() * 1e3;
            assert_eq!(r["ok"], true, "{r}");
            ms
        })
        .collect()
}

fn run(broker_nodelay: bool, gate_nodelay: bool, rounds: usize) -> Figures {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "listener {port} 127.0.0.1\npersistence false\nallow_anonymous true\nmax_queued_messages 100000\n\
         set_tcp_nodelay {broker_nodelay}\n"
    );
    let broker = Broker::with_config(port, dir, &text);
    let mut gate = Gate::new(GateOpts { mqtt_port: broker.port, pulse_ms: 100, ..Default::default() });
    gate.edit_config(|t| {
        let m = t["mqtt"].as_table_mut().unwrap();
        m.insert("tcp_nodelay".into(), gate_nodelay.into());
        m.insert("health_interval_secs".into(), 0.into());
        t["log"].as_table_mut().unwrap().insert("level".into(), "info".into());
    });
    gate.start_sim();
    gate.start_daemon();
    let bms = Bms::connect(broker.port);
    assert!(wait_for(Duration::from_secs(10), || bms.retained("/status").iter().any(|v| v["state"] == "online")));
    let upsert =
        json!({"resident": {"id": "r1", "mode": "card", "cards": [{"format": "H10301", "facility": 7, "number": 5}]}});
    assert_eq!(bms.command("site1", "gate1", "resident.upsert", upsert, None)["ok"], true);
    // Warm up the connection and the store.
    round_trips(&bms, 10, "rules.get", |_| json!({}));

    let mut read = round_trips(&bms, rounds, "rules.get", |_| json!({}));
    let mut write = round_trips(
        &bms,
        rounds / 2,
        "resident.set_mode",
        |i| json!({"resident": "r1", "mode": if i % 2 == 0 { "face_or_card" } else { "card" }}),
    );

    // Pipelined: every command out at once, then every reply.
    let n = 1_000;
    let topic = "menshen/v1/site1/gate1/cmd/rules.get";
    let corrs: Vec<String> = (0..n).map(|_| bms.corr()).collect();
    let t = Instant::now();
    for c in &corrs {
        bms.publish(topic, b"{}".to_vec(), Some(c.as_bytes()), None, false);
    }
    for c in &corrs {
        assert!(bms.reply_within(c.as_bytes(), Duration::from_secs(60)).is_some(), "a pipelined reply is missing");
    }
    let pipelined = n as f64 / t.elapsed().as_secs_f64();

    // Remote unlock: publish → relay command (the chip's record of the relay line).
    let mut unlock = Vec::new();
    for _ in 0..20 {
        let before = gate.relay("front")["transitions"].as_array().map_or(0, Vec::len);
        let corr = bms.corr();
        let sent = MonoTime::now();
        let p = json!({"door": "front", "duration_ms": 100});
        bms.publish(
            "menshen/v1/site1/gate1/cmd/unlock",
            p.to_string().into_bytes(),
            Some(corr.as_bytes()),
            Some(10),
            false,
        );
        let mut on_ns = None;
        assert!(wait_for(Duration::from_secs(5), || {
            let tr = gate.relay("front")["transitions"].as_array().cloned().unwrap_or_default();
            on_ns = tr.iter().skip(before).find(|t| t["energized"] == true).and_then(|t| t["cmd_ns"].as_u64());
            on_ns.is_some()
        }));
        unlock.push((on_ns.unwrap() - sent.as_nanos()) as f64 / 1e6);
        assert!(bms.reply_within(corr.as_bytes(), Duration::from_secs(5)).is_some());
        // Let the pulse end before the next one.
        assert!(wait_for(Duration::from_secs(5), || gate.relay("front")["relay_energized"] == false));
    }
    Figures {
        read: (pct(&mut read, 0.5), pct(&mut read, 0.99)),
        write: (pct(&mut write, 0.5), pct(&mut write, 0.99)),
        pipelined,
        unlock: (pct(&mut unlock, 0.5), pct(&mut unlock, 0.99)),
    }
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    println!(
        "sequential round trips ({rounds} rules.get, {} resident.set_mode), 1,000 pipelined rules.get, 20 unlocks;\n\
         BMS client with TCP_NODELAY; mosquitto on loopback; the daemon on the simulated chip",
        rounds / 2
    );
    println!(
        "{:<34} {:>18} {:>18} {:>12} {:>18}",
        "broker set_tcp_nodelay / gate", "rules.get p50/p99", "set_mode p50/p99", "pipelined/s", "unlock→relay p50/p99"
    );
    let mut figures = Vec::new();
    for (b, g) in [(false, false), (false, true), (true, false), (true, true)] {
        let f = run(b, g, rounds);
        println!(
            "{:<34} {:>8.2} / {:>6.2} ms {:>8.2} / {:>6.2} ms {:>12.0} {:>8.2} / {:>6.2} ms",
            format!("broker {} / gate {}", if b { "on" } else { "off" }, if g { "on" } else { "off" }),
            f.read.0,
            f.read.1,
            f.write.0,
            f.write.1,
            f.pipelined,
            f.unlock.0,
            f.unlock.1
        );
        figures.push(((b, g), f));
    }
    let get = |b, g| &figures.iter().find(|(k, _)| *k == (b, g)).unwrap().1;
    let (on, off) = (get(true, true), get(true, false));
    println!(
        "with the broker's set_tcp_nodelay on, the gate's TCP_NODELAY takes rules.get from p50 {:.2} ms to {:.2} ms \
         ({:.1}x)",
        off.read.0,
        on.read.0,
        off.read.0 / on.read.0
    );
}
