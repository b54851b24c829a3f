#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! Card path latency: last Wiegand edge → relay command, over ≥ 1,000 swipes on the whole
//! pipeline (simulated chip → reader stage → store lookup + policy → door stage → relay), with
//! real Wiegand timing (50 µs pulses, 2 ms ± 10 % intervals) and early completion on.
//!
//! The edge time is the simulated reader's true edge time (as a kernel timestamp would be); the
//! relay time is when the door stage issued the command. Run: `cargo bench --bench card_path`
//! (`SWIPES=N` to change the count). Prints p50/p90/p99/max.

use std::sync::Arc;
use std::time::{Duration, Instant};

use menshen::hw::sim::{self, WorldOp};
use menshen::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Validity};
use menshen::store::Store;
use menshen::wiegand::{CardId, Format};

const DOORS: usize = 4;

fn config(dir: &std::path::Path) -> menshen::config::Config {
    let mut t: toml::Table = toml::from_str(menshen::config::DEFAULT_CONFIG).unwrap();
    t["gate"].as_table_mut().unwrap().insert("state_dir".into(), dir.join("state").display().to_string().into());
    t["log"].as_table_mut().unwrap().insert("level".into(), "warn".into());
    let sim = t["hardware"].as_table_mut().unwrap()["sim"].as_table_mut().unwrap();
    sim.insert("socket".into(), dir.join("sim.sock").display().to_string().into());
    t["mqtt"].as_table_mut().unwrap().insert("enabled".into(), false.into());
    let mut doors = Vec::new();
    let mut readers = Vec::new();
    for i in 0..DOORS as i64 {
        let mut d = toml::Table::new();
        d.insert("name".into(), format!("d{i}").into());
        d.insert("relay_pin".into(), (i * 3).into());
        d.insert("fail_mode".into(), "secure".into());
        d.insert("pulse_ms".into(), 100.into());
        doors.push(toml::Value::Table(d));
        let mut r = toml::Table::new();
        r.insert("name".into(), format!("r{i}").into());
        r.insert("door".into(), format!("d{i}").into());
        r.insert("formats".into(), toml::Value::Array(vec!["H10301".into()]));
        r.insert("d0_pin".into(), (i * 3 + 1).into());
        r.insert("d1_pin".into(), (i * 3 + 2).into());
        readers.push(toml::Value::Table(r));
    }
    t.insert("doors".into(), toml::Value::Array(doors));
    t.insert("readers".into(), toml::Value::Array(readers));
    menshen::config::parse(&toml::to_string(&t).unwrap()).unwrap()
}

fn main() {
    let swipes: usize = std::env::var("SWIPES").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    {
        // 1,000 enrolled residents, so the lookup is not in an empty table.
        let store = Store::open(&cfg.store_path()).unwrap();
        for n in 0..1_000u64 {
            let id = ResidentId::new(&format!("r{n}")).unwrap();
            let card = CardId { format: Format::H10301, facility: 7, number: 10_000 + n };
            let c = Credential {
                credential: CredentialKind::Card(card),
                resident: id.clone(),
                validity: Validity::default(),
            };
            let r = Resident { id, mode: AccessMode::Card, validity: Validity::default(), schedule: None };
            store.add_resident(&r, &[c], 0).unwrap();
        }
    }
    // The daemon's runtime (`menshen run`): multi-thread, two workers. RUNTIME=current compares
    // a current-thread runtime (measured slower here: a blocked hop stalls every stage).
    let rt = match std::env::var("RUNTIME").as_deref() {
        Ok("current") => tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
        _ => tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap(),
    };
    let cfg = Arc::new(cfg);
    let socket = cfg.hardware.sim.socket.clone();
    // The daemon's runtime runs on its own thread, as in `menshen run`.
    let stop = tokio_util::sync::CancellationToken::new();
    let (stop2, cfg2) = (stop.clone(), cfg.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let daemon = std::thread::spawn(move || {
        rt.block_on(async move {
            let (ready, ready_rx2) = tokio::sync::oneshot::channel();
            let daemon = tokio::spawn(menshen::daemon::run(cfg2.clone(), Some(ready), Some(stop2.clone())));
            ready_rx2.await.unwrap();
            ready_tx.send(()).unwrap();
            // The split by hop comes from the daemon's own counters (`menshen status`), read
            // just before the stop.
            let mut lat = serde_json::Value::Null;
            while !stop2.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let c = cfg2.clone();
                if let Ok(Ok(v)) = tokio::task::spawn_blocking(move || menshen::daemon::status_query(&c)).await {
                    lat = v["stats"]["card_latency"].clone();
                }
            }
            daemon.await.unwrap().unwrap();
            lat
        })
    });
    ready_rx.recv().unwrap();
    let started = Instant::now();
    let mut lat_us: Vec<f64> = Vec::with_capacity(swipes);
    for i in 0..swipes {
        let door = i % DOORS;
        let reply = sim::request(
            &socket,
            &WorldOp::Swipe {
                reader: format!("r{door}"),
                facility: 7,
                card: 10_000 + (i as u64 % 1_000),
                format: None,
            },
        )
        .unwrap();
        let edge = reply["last_edge_ns"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // Wait for the relay command that answers this swipe.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let st = sim::request(&socket, &WorldOp::State).unwrap();
            let on = st["doors"][format!("d{door}")]["transitions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["energized"] == true)
                .filter_map(|t| t["cmd_ns"].as_u64())
                .find(|&t| t >= edge);
            if let Some(t) = on {
                lat_us.push((t - edge) as f64 / 1_000.0);
                break;
            }
            assert!(Instant::now() < deadline, "swipe {i}: no relay command");
            // The chip records when each command was issued, so reading it late costs nothing;
            // polling fast would only compete with the pipeline for the two cores.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let wall = started.elapsed();
    stop.cancel();
    let split = daemon.join().unwrap();
    lat_us.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat_us[((lat_us.len() as f64 - 1.0) * p).round() as usize];
    let mean = lat_us.iter().sum::<f64>() / lat_us.len() as f64;
    println!(
        "card path: last Wiegand edge -> relay command ({} swipes, {} doors, early completion, {:.1} s)",
        lat_us.len(),
        DOORS,
        wall.as_secs_f64()
    );
    println!("  p50 {:>8.1} us", pct(0.50));
    println!("  p90 {:>8.1} us", pct(0.90));
    println!("  p99 {:>8.1} us", pct(0.99));
    println!("  max {:>8.1} us", pct(1.0));
    println!("  mean {:>7.1} us", mean);
    println!("  inside the daemon (last edge -> relay, as recorded by its stages):");
    for name in ["delivery", "decide", "actuate", "processing", "total"] {
        let p = &split[name];
        let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "    {name:<10} p50 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us  (n={})",
            f("p50_us"),
            f("p99_us"),
            f("max_us"),
            p["n"]
        );
    }
    let target = 1_000.0;
    println!("  target p99 <= {target} us, end to end: {}", if pct(0.99) <= target { "met" } else { "NOT met" });
    println!(
        "  target p99 <= {target} us, daemon processing (edge received -> relay): {}",
        if split["processing"]["p99_us"].as_f64().is_some_and(|p| p <= target) { "met" } else { "NOT met" }
    );
}
