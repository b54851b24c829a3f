//! Crash loop (issue 6, short form): the daemon under mixed load (swipes on the simulated readers,
//! MQTT roster commands) is killed with SIGKILL at random moments and restarted, round after round.
//! After each start the relay is in its safe state; at the end every acknowledged command is in the
//! store exactly as acknowledged, every event arrived, and no sequence number was ever published
//! with two different contents. `CRASH_ROUNDS=N` (default 50) and `CRASH_SEED=S` change the run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use menshen::hw::sim::{self, WorldOp};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let rounds: u64 = std::env::var("CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20_261_122);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let port = free_port();
    let bdir = tempfile::tempdir().unwrap();
    let _broker = Broker::start_persistent(port, bdir.path());
    let bms = Bms::connect_with(port, Some("bms-crash-loop"));
    let mut gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 150, ..GateOpts::default() });
    gate.start_sim();
    // A resident whose card opens the door, so kills also land in the middle of unlocks.
    let out = gate.resident(&["add", "known", "--card", "H10301:9:9"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // round -> (upsert acknowledged, set_mode acknowledged)
    let mut acked: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
    let t0 = Instant::now();
    for round in 0..rounds {
        gate.start_daemon();
        let relay = gate.relay("front");
        assert_eq!(relay["relay_energized"], false, "round {round}: the relay must start in its safe state");
        let socket = gate.socket.clone();
        let swipes = rng.gen_range(1..6u64);
        let swiper = std::thread::spawn(move || {
            for n in 0..swipes {
                let (facility, card) = if n % 2 == 0 { (9, 9) } else { (8, 1000 + n) };
                let _ = sim::request(&socket, &WorldOp::Swipe { reader: "front".into(), facility, card, format: None });
            }
        });
        let id = format!("cr-{round}");
        let corr_up = format!("up-{round}");
        let corr_mode = format!("mode-{round}");
        let topic = |verb: &str| format!("menshen/v1/site1/gate1/cmd/{verb}");
        let up = json!({"resident": {"id": id, "mode": "card", "cards": [{"format": "H10301", "facility": 50, "number": round}]}});
        bms.publish(&topic("resident.upsert"), up.to_string().into_bytes(), Some(corr_up.as_bytes()), None, false);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..40)));
        let mode = json!({"resident": id, "mode": "face_or_card"});
        bms.publish(
            &topic("resident.set_mode"),
            mode.to_string().into_bytes(),
            Some(corr_mode.as_bytes()),
            None,
            false,
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..400)));
        gate.signal_daemon("KILL");
        swiper.join().unwrap();
        let ok = |c: &str| {
            bms.replies.lock().unwrap().iter().any(|(k, v)| k.as_deref() == Some(c.as_bytes()) && v["ok"] == true)
        };
        acked.insert(round, (ok(&corr_up), ok(&corr_mode)));
    }
    let loop_secs = t0.elapsed().as_secs_f64();

    // A last start drains everything; then a clean stop.
    gate.start_daemon();
    assert_eq!(gate.relay("front")["relay_energized"], false);
    assert!(wait_for(Duration::from_secs(30), || gate.status().unwrap()["outbox_depth"] == 0), "{}", gate.log());
    let last = gate.status().unwrap()["next_seq"].as_u64().unwrap() - 1;
    let events = || -> Vec<Value> {
        bms.msgs.lock().unwrap().iter().filter(|(t, _, _)| t.contains("/event/")).map(|(_, v, _)| v.clone()).collect()
    };
    assert!(
        wait_for(Duration::from_secs(30), || {
            let seen: std::collections::HashSet<u64> = events().iter().filter_map(|v| v["seq"].as_u64()).collect();
            (1..=last).all(|s| seen.contains(&s))
        }),
        "not every event arrived"
    );
    let st = gate.signal_daemon("TERM");
    assert!(st.success());

    // No seq with two contents; no id on two seqs.
    let mut by_seq: HashMap<u64, Value> = HashMap::new();
    let mut by_id: HashMap<String, u64> = HashMap::new();
    let all = events();
    for v in &all {
        let seq = v["seq"].as_u64().unwrap();
        if let Some(prev) = by_seq.get(&seq) {
            assert_eq!(prev, v, "seq {seq} was published with two different contents");
        }
        by_seq.insert(seq, v.clone());
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(*by_id.entry(id).or_insert(seq), seq, "one id, two seqs");
    }

    // Every acknowledged command is in the store as acknowledged.
    let out = gate.resident(&["list"]);
    assert!(out.status.success());
    let listed: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect();
    let (mut ups, mut modes) = (0, 0);
    for (round, (up, mode)) in &acked {
        let id = format!("cr-{round}");
        if *mode {
            modes += 1;
            assert_eq!(
                listed.get(&id).map(String::as_str),
                Some("face_or_card"),
                "{id}: acknowledged mode change lost"
            );
        }
        if *up {
            ups += 1;
            assert!(listed.contains_key(&id), "{id}: acknowledged upsert lost");
        }
    }
    eprintln!(
        "crash loop: {rounds} rounds (seed {seed}) in {loop_secs:.1} s; {ups} upserts and {modes} mode changes \
         acknowledged, all present; {} events (seq 1..={last}) delivered, {} messages with duplicates, none conflicting",
        by_seq.len(),
        all.len()
    );
    assert!(ups > 0 && modes > 0, "the loop never got a command through: it tests nothing");
}
